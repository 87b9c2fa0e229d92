"""The main job (scripts/demo.py): corpus, seed aggregation, greedy-vs-beam reporting, and the
pipeline end to end at a reduced tiny size."""

import io
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import demo  # noqa: E402
import demo_tasks  # noqa: E402
from number_corpus import make_corpus, render, split_german, words  # noqa: E402


def test_german_number_words_are_split_into_morphemes():
    assert split_german("dreiundzwanzig") == ["drei", "und", "zwanzig"]
    assert split_german("siebzehn") == ["sieb", "zehn"]
    assert words(1234, "de") == "ein tausend zwei hundert vier und dreißig"
    assert words(1234, "en") == "one thousand two hundred and thirty four"
    with pytest.raises(ValueError, match="segment"):
        split_german("dreixyz")


def test_every_form_is_rendered_in_both_languages():
    assert render("ordinal", 23, "de") == "drei und zwanzig ste"
    assert render("ordinal", 7, "de") == "sieb te"
    assert render("year", 1984, "en") == "nineteen eighty four"
    assert render("year", 1984, "de") == "neun zehn hundert vier und achtzig"
    assert render("currency", 1250, "de") == "zwölf euro und fünfzig cent"
    assert render("cardinal", 2_000_000, "de") == "zwei millionen"
    with pytest.raises(ValueError, match="form"):
        render("fraction", 3, "de")


def test_corpus_splits_hold_disjoint_items_of_every_form(tmp_path):
    sizes = make_corpus(tmp_path, 200, 30, 30, seed=3)
    assert sizes == {"train": 200, "valid": 30, "test": 30}
    items = {s: set((tmp_path / f"{s}.num").read_text().splitlines()) for s in sizes}
    assert len(items["train"]) == 200
    assert not (items["train"] & items["test"]) and not (items["train"] & items["valid"])
    forms = {line.split()[0] for line in items["train"]}
    assert forms == {"cardinal", "ordinal", "year", "currency"}
    assert len((tmp_path / "test.de").read_text().splitlines()) == 30
    with pytest.raises(ValueError, match="n_test"):
        make_corpus(tmp_path, 10, 10, 0)


def test_the_corpus_can_be_rebuilt_in_the_same_folder(tmp_path):
    size = {"train": 60, "valid": 10, "test": 10}
    for seed in (1, 2):  # a second run of the demo into the same --out
        assert demo_tasks.make_data(tmp_path, size, seed) == {"train": 60, "valid": 10, "test": 10}
    assert (tmp_path / "data-bin" / "dict.en.txt").exists() and (tmp_path / "data-bin" / "test.en-de.de.bin").exists()


def test_seed_aggregation_gives_mean_and_sample_standard_deviation():
    agg = demo_tasks.aggregate([80.0, 82.0, 84.0])
    assert agg == {"mean": 82.0, "std": 2.0, "min": 80.0, "max": 84.0, "n": 3}
    assert demo_tasks.aggregate([5.0])["std"] == 0.0
    assert demo_tasks.fmt(agg) == "82.0 ± 2.0"
    with pytest.raises(ValueError):
        demo_tasks.aggregate([])


def test_a_difference_counts_only_beyond_the_sum_of_the_spreads():
    a = demo_tasks.aggregate([80.0, 82.0, 84.0])  # 82 ± 2
    assert not demo_tasks.exceeds_noise(a, demo_tasks.aggregate([84.0, 85.0, 86.0]))  # 85 ± 1: |3| = 2 + 1
    assert demo_tasks.exceeds_noise(a, demo_tasks.aggregate([85.5, 86.0, 86.5]))  # 86 ± 0.5: 4 > 2.5
    assert not demo_tasks.exceeds_noise(demo_tasks.aggregate([50.0]), demo_tasks.aggregate([90.0]))  # one seed


def _run(mech, seed, greedy, beam, stock):
    return {"mechanism": mech, "spec": "softmax" if mech == "softmax" else mech, "seed": seed,
            "greedy_bleu": greedy, "beam_bleu": beam, "stock_beam_bleu": stock}


def test_summary_calls_differences_only_beyond_the_spread():
    rows = [_run("softmax", s, g, g, g) for s, g in ((1, 80.0), (2, 82.0), (3, 84.0))]
    rows += [_run("close", s, g, g, g) for s, g in ((1, 83.0), (2, 85.0), (3, 84.0))]
    rows += [_run("worse", s, g, g, g) for s, g in ((1, 70.0), (2, 71.0), (3, 72.0))]
    groups = demo_tasks.group_by_mechanism(rows, ["greedy_bleu", "beam_bleu", "stock_beam_bleu"])
    text = demo_tasks.translation_summary("fairseq", groups)
    assert "82.0 ± 2.0" in text
    assert "Not distinguishable from softmax" in text and "close (+2.0)" in text
    assert "Worse than softmax beyond the spread: worse (-11.0)" in text
    assert "Better" not in text


def test_greedy_and_beam_are_compared_seed_by_seed():
    runs = [_run("m", s, g, b, st) for s, g, b, st in ((1, 90.0, 90.5, 80.0), (2, 88.0, 88.0, 81.0),
                                                        (3, 91.0, 91.2, 79.0))]
    ok = demo_tasks.beam_vs_greedy(runs, "beam_bleu")
    assert ok["mean"] == pytest.approx(0.7 / 3) and not ok["below"]
    bad = demo_tasks.beam_vs_greedy(runs, "stock_beam_bleu")
    assert bad["mean"] == pytest.approx(-29.0 / 3) and bad["below"]
    lines = demo_tasks._beam_lines(demo_tasks.group_by_mechanism(runs, ["greedy_bleu"]),
                                   [("beam_bleu", "Beam A"), ("stock_beam_bleu", "Beam B")])
    assert lines[0] == "Beam A is nowhere below greedy by more than the spread."
    assert lines[1].startswith("Beam B is below greedy by more than the spread for: m (-9.7 ± ")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One tiny run of the whole pipeline (3 fairseq, 1 HF and 2 canvas mechanisms, 2 seeds), shared."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(demo, "FAIRSEQ_MECHANISMS", [("softmax", "softmax"),
                                                         ("entmax (learned alpha)", "entmax:alpha=learned"),
                                                         ("continuous sparsemax", "sparsemax+continuous_sparsemax")])
        monkeypatch.setattr(demo, "HF_MECHANISMS", [("sparsemax", "sparsemax")])
        monkeypatch.setattr(demo, "CANVAS_MECHANISMS", ["discrete sparsemax", "continuous sparsemax"])
        out = tmp_path_factory.mktemp("run") / "demo"
        assert demo.main(["--size", "tiny", "--out", str(out), "--seeds", "2", "--workers", "2"]) == 0
    return out


def test_demo_pipeline_runs_every_task_and_writes_the_report(demo_run):
    out = demo_run

    results = json.loads((out / "results.json").read_text())
    fs = results["fairseq"]
    assert [g["spec"] for g in fs] == ["softmax", "entmax:alpha=learned", "sparsemax+continuous_sparsemax"]
    for g in fs:
        assert g["seeds"] == [1, 2] and g["greedy_bleu"]["n"] == 2
        for key in ("greedy_bleu", "beam_bleu", "stock_beam_bleu"):
            assert 0 <= g[key]["min"] <= g[key]["mean"] <= g[key]["max"] <= 100
        for r in g["runs"]:
            assert r["test_sentences"] == demo.SIZES["tiny"]["test"]
            assert r["train_seconds"] > 0 and r["updates"] > 0
    assert fs[0]["support_fraction"]["mean"] == 1.0  # softmax attends everywhere
    assert fs[2]["support_fraction"]["mean"] < 1.0  # the sparse cross-attention has exact zeros
    traj = fs[1]["runs"][0]["alpha_trajectory"]
    assert traj[0]["updates"] == 0 and traj[-1]["updates"] == fs[1]["runs"][0]["updates"]
    assert len(traj[-1]["alpha"]) == 2 and len(traj[-1]["alpha"][0]) == 4  # 2 decoder layers x 4 heads
    assert results["hf"][0]["spec"] == "sparsemax" and results["hf"][0]["beam_bleu"]["n"] == 2
    config = json.loads((out / "hf" / "sparsemax_seed1" / "config.json").read_text())
    assert config["model_type"] == "sparse_marian"  # the HF route's family (demo_tasks.HF_ARCH)
    # every job's wall and CPU time, and the run's CPU time, which holds every job's
    assert len(results["jobs"]) == 2 * (3 + 1 + 2)
    assert all(j["wall_seconds"] > 0 and j["cpu_seconds"] > 0 for j in results["jobs"])
    hf_job = next(j for j in results["jobs"] if j["task"] == "hf")
    # finetune.py's training runs in the worker: its CPU time is the job's (about 4-5 s at this size)
    assert hf_job["cpu_seconds"] > 1
    assert results["total_cpu_seconds"] >= sum(j["cpu_seconds"] for j in results["jobs"])
    canvas = results["canvas"]
    assert [g["mechanism"] for g in canvas] == ["discrete sparsemax", "continuous sparsemax"]
    for g in canvas:
        assert 0 <= g["accuracy"]["mean"] <= 1 and 0 <= g["mass_in_box"]["mean"] <= 1 and 0 <= g["iou"]["mean"] <= 1

    report = (out / "report.md").read_text()
    for heading in ["Translation with fairseq", "HuggingFace", "digit on a cluttered canvas", "greedy BLEU",
                    "beam 5, fairseq's stop", "mass in box", "Learned alpha", "## Time", "CPU per job",
                    "did not learn", demo_tasks.SUMMARY_START, demo_tasks.SUMMARY_END]:
        assert heading in report
    for png in ["fairseq_attention_heatmaps.png", "fairseq_training_curves.png", "fairseq_alpha.png",
                "canvas_attention.png"]:
        assert (out / png).stat().st_size > 1000
        assert png in report


def _fenced(report: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", report, flags=re.S)


def test_the_models_are_kept_and_the_report_commands_use_them(demo_run, capsys, monkeypatch):
    """Run the report's own commands: fairseq-interactive on a sentence, fairseq-generate with soft
    alignments, the fairseq hub from Python, and from_pretrained on the HF model."""
    from fairseq_cli import generate, interactive

    out = demo_run
    results = json.loads((out / "results.json").read_text())
    runs = [r for route in ("fairseq", "hf") for g in results[route] for r in g["runs"]]
    assert len(runs) == 2 * (3 + 1)
    for r in runs:
        path = Path(r["model_path"])
        assert (path / "model.safetensors").exists() if r["route"] == "hf" else path.name == "checkpoint_last.pt"
        assert path.exists()
    report = (out / "report.md").read_text()
    assert "## Use the trained models" in report and all(r["model_path"] in report for r in runs)

    (bash,) = _fenced(report, "bash")
    commands = bash.replace("\\\n", " ").strip().splitlines()
    sentence, interactive_cmd = commands[0].split(" | ")
    source = shlex.split(sentence)[1]
    n_test = demo.SIZES["tiny"]["test"]
    for cmd, stdin, tool, expected in ((interactive_cmd, source + "\n", interactive, ("H-", 1)),
                                       (commands[1], "", generate, ("A-", n_test))):
        argv = shlex.split(cmd)
        assert argv[0] == f"fairseq-{tool.__name__.split('.')[-1]}"
        monkeypatch.setattr(sys, "argv", argv)
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        tool.cli_main()
        printed = capsys.readouterr().out.splitlines()
        assert sum(line.startswith(expected[0]) for line in printed) == expected[1], printed[-5:]

    fairseq_py, hf_py = _fenced(report, "python")
    spaces: list[dict] = [{}, {}]
    for code, namespace in zip((fairseq_py, hf_py), spaces):
        exec(compile(code, "report.md", "exec"), namespace)
    fs, hf = spaces
    # the alignment: source words + </s> by target tokens + </s>; each target row sums to 1
    assert fs["weights"].shape == (len(source.split()) + 1, len(fs["best"]["tokens"]))
    assert torch.allclose(fs["weights"].sum(0), torch.ones(fs["weights"].shape[1]), atol=1e-4)
    assert hf["model"].config.model_type == "sparse_marian" and hf["out"].shape[0] == 1


def test_jobs_are_ordered_longest_first():
    jobs = [("canvas", {"label": "discrete softmax"}), ("hf", {"label": "entmax (learned alpha)"}),
            ("fairseq", {"label": "softmax"}), ("fairseq", {"label": "continuous sparsemax"})]
    order = [(kind, kw["label"]) for kind, kw in demo.longest_first(jobs)]
    assert order == [("fairseq", "continuous sparsemax"), ("hf", "entmax (learned alpha)"), ("fairseq", "softmax"),
                     ("canvas", "discrete softmax")]
    # every mechanism of the demo has a cost
    for kind, mechanisms in (("fairseq", [m for m, _ in demo.FAIRSEQ_MECHANISMS]),
                             ("hf", [m for m, _ in demo.HF_MECHANISMS]), ("canvas", demo.CANVAS_MECHANISMS)):
        assert set(mechanisms) <= set(demo.JOB_COST[kind])


def test_finetune_runs_in_process_twice_with_its_output_in_the_log(tmp_path, capfd):
    """Two trainings in one process (accelerate's state is reset between them); a failure raises with the log."""
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"source": f"{a} plus {b}", "target": f"{a + b}"} for a in range(8) for b in range(4)]
    (data / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (data / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:4]), encoding="utf-8")
    common = ["--task", "seq2seq", "--train-file", str(data / "train.jsonl"), "--valid-file",
              str(data / "valid.jsonl"), "--from-config", "--arch", "marian", "--d-model", "16", "--layers", "1",
              "--heads", "2", "--ffn-dim", "16", "--max-steps", "2", "--batch-size", "8", "--cpu", "--threads", "1",
              "--attention-dropout", "0"]
    for spec in ("sparsemax", "entmax15"):
        out = tmp_path / spec
        seconds = demo_tasks._finetune_in_process([*common, "--cross-attn", spec, "--output-dir", str(out)],
                                                  tmp_path / f"{spec}.log")
        assert seconds > 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["steps"] == 2 and f"cross:{spec}" in metrics["mechanisms_seen"]
        assert "training" in (tmp_path / f"{spec}.log").read_text()  # the progress bar went to the log
    assert "training" not in capfd.readouterr().err
    with pytest.raises(RuntimeError, match="--attention-dropout must be in"):
        demo_tasks._finetune_in_process([*common, "--attention-dropout", "2", "--output-dir", str(tmp_path / "x")],
                                        tmp_path / "bad.log")


def test_demo_rejects_unknown_tasks_and_bad_counts():
    with pytest.raises(SystemExit):
        demo.main(["--only", "nosuchtask"])
    with pytest.raises(SystemExit):
        demo.main(["--threads", "0"])


def test_cpu_seconds_count_a_finished_subprocess():
    import subprocess

    before = demo.cpu_seconds()
    subprocess.run([sys.executable, "-c", "sum(i * i for i in range(3_000_000))"], check=True)
    assert demo.cpu_seconds() - before > 0.1  # the child's CPU time, counted once it has been waited for


def test_time_section_totals_cpu_seconds_per_task():
    jobs = [{"task": "fairseq", "mechanism": "softmax", "seed": s, "wall_seconds": 30.0, "cpu_seconds": c}
            for s, c in ((1, 20.0), (2, 22.0))]
    jobs.append({"task": "canvas", "mechanism": "discrete softmax", "seed": 1, "wall_seconds": 9.0,
                 "cpu_seconds": 8.0})
    lines = demo_tasks.time_section({"jobs": jobs, "total_seconds": 120.0, "total_cpu_seconds": 90.0})
    text = "\n".join(lines)
    assert "Wall time 2.0 min; CPU time (user + system, every process) 1.5 min" in text
    assert "| fairseq | softmax | 2 | 30 s | 21 s | 42 s |" in text
    assert "| **fairseq** | all | 2 | | | **42 s** |" in text and "| **canvas** | all | 1 | | | **8 s** |" in text
    assert "| canvas | discrete softmax | 1 | 9 s | 8 s |" in text  # every job
    assert demo_tasks.time_section({}) == []


def test_alpha_bound_sums_fairseqs_inverse_sqrt_schedule():
    # update k uses lr(k - 1): 0, peak/W, ..., (W-1)/W peak during the warm-up, then peak * sqrt(W / t)
    assert demo_tasks.inverse_sqrt_lr_sum(1, peak=1.0, warmup=4) == 0.0
    assert demo_tasks.inverse_sqrt_lr_sum(4, peak=1.0, warmup=4) == pytest.approx(0.25 + 0.5 + 0.75)
    assert demo_tasks.inverse_sqrt_lr_sum(6, peak=1.0, warmup=4) == pytest.approx(1.5 + 1.0 + (4 / 5) ** 0.5)
    assert demo_tasks.alpha_move_bound(6, peak=1.0, warmup=4) == pytest.approx(0.2475 * (2.5 + (4 / 5) ** 0.5))
    base = {"start": 1.5, "final_min": 1.49, "final_max": 1.51, "range_min": 1.48, "range_max": 1.51, "heads": 24,
            "down": 20, "up": 4, "median_move": 0.01, "updates": 186}
    text = demo_tasks.alpha_sentence({**base, "max_move": 0.02, "bound": 0.1})
    assert "20 below the start (towards softmax) and 4 above" in text
    assert "20% of that" in text and "pull alpha only weakly" in text
    assert "push alpha consistently" in demo_tasks.alpha_sentence({**base, "max_move": 0.09, "bound": 0.1})
    assert "far too few updates" in demo_tasks.alpha_sentence({**base, "max_move": 0.0, "bound": 0.0001})


def test_results_block_is_copied_into_the_demo_page(tmp_path):
    report = "\n".join(["# Attention mechanisms compared", "", demo_tasks.SUMMARY_START, "", "Run size `small`.", "",
                        "## Translation with fairseq", "", "| a | b |", "", "![plot](fairseq_alpha.png)", "",
                        demo_tasks.SUMMARY_END, "", "## Time", "per job"])
    block = demo_tasks.summary_block(report)
    assert block == "Run size `small`.\n\n### Translation with fairseq\n\n| a | b |"  # no plots, headings demoted
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "report.md").write_text(report)
    (tmp_path / "out" / "fairseq_alpha.png").write_bytes(b"png")
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "demo.md"
    page.write_text(f"## Results of the default run\n\nintro\n\n{demo_tasks.SUMMARY_START}\nold numbers\n"
                    f"{demo_tasks.SUMMARY_END}\n\nafter\n")
    written = demo_tasks.publish(tmp_path / "out", page)
    assert page.read_text() == (f"## Results of the default run\n\nintro\n\n{demo_tasks.SUMMARY_START}\n{block}\n"
                                f"{demo_tasks.SUMMARY_END}\n\nafter\n")
    assert (tmp_path / "docs" / "demo_alpha.png").read_bytes() == b"png"
    assert written == [page, tmp_path / "docs" / "demo_alpha.png"]
    # the published page is the one in the repository, and it holds one block to replace
    assert demo_tasks.publish.__defaults__ == (ROOT / "docs" / "demo.md",)
    assert (ROOT / "docs" / "demo.md").read_text().count(demo_tasks.SUMMARY_START) == 1
    assert demo_tasks.SUMMARY_START not in (ROOT / "README.md").read_text()
    with pytest.raises(ValueError, match="block"):
        demo_tasks.replace_block("no markers", block)
    with pytest.raises(ValueError, match="block"):
        demo_tasks.summary_block("no markers")


def test_form_counts_keep_the_proportions_until_the_years_run_out():
    from number_corpus import FORM_CAPACITY, form_counts, sample_items

    assert form_counts(3500) == {"cardinal": 1400, "ordinal": 700, "year": 700, "currency": 700}  # the default
    big = form_counts(8900)  # SIZE=large: 20% would be 1780 years, only 1100 exist
    assert big["year"] == FORM_CAPACITY["year"] == 1100 and sum(big.values()) == 8900
    assert big["cardinal"] == 2 * big["ordinal"] and abs(big["ordinal"] - big["currency"]) <= 1
    items = sample_items(8900, seed=1)
    assert len(set(items)) == 8900 and sum(form == "year" for form, _ in items) == 1100


def test_every_size_of_the_demo_fits_the_corpus():
    from number_corpus import sample_items

    for name, size in demo.SIZES.items():
        total = size["train"] + size["valid"] + size["test"]
        assert len(sample_items(total, seed=1)) == total, name
