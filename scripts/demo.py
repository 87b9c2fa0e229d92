"""The main job: train and compare attention mechanisms on embedded data, over several seeds; write a report.

    python scripts/demo.py                      # the default run: 3 seeds, 42 models (the report gives
                                                # its wall and CPU time, in total and per job)
    python scripts/demo.py --size tiny          # a smoke run (one seed, a few updates)
    python scripts/demo.py --size large         # more data, training and seeds, closer to convergence
    python scripts/demo.py --only fairseq,canvas --out outputs/demo
    python scripts/demo.py --publish            # copy outputs/demo's results and plots into docs/demo.md

Three tasks, each comparing mechanisms side by side, every mechanism with several seeds:
1. translation with fairseq: English number expressions -> German number words (num2words,
   generated offline, held-out items), one model per cross-attention mechanism and seed, decoded
   greedily and with beam 5 (fairseq's search, and the optimal-stopping search of
   user_dir/beam_search.py), BLEU with sacreBLEU; the learned alpha of entmax tracked per epoch;
2. the same data through HuggingFace: a small Marian-style model with sparse cross-attention
   fine-tuned by scripts/finetune.py (accelerate), greedy and beam 5;
3. 2-D attention: a digit at a random place on a cluttered 32x32 canvas; accuracy and how well
   the attention (discrete, or a continuous density) localizes the digit's box.
The jobs run in parallel worker processes with one torch thread each (tiny models run faster on
one thread per process than on several contended ones). Everything goes to one folder:
report.md, PNG plots, results.json, logs, the data and the trained translation models
(report.md, "Use the trained models", gives their paths and the commands that load them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

SIZES = {
    # corpus sizes, fairseq epochs, HF epochs, canvas training steps and test canvases, seeds
    "tiny": dict(train=300, valid=30, test=40, fairseq_epochs=1, hf_epochs=1, canvas_steps=10, canvas_test=60,
                 seeds=1, canvas_entmax15=True),
    "small": dict(train=3000, valid=200, test=300, fairseq_epochs=6, hf_epochs=6, canvas_steps=600,
                  canvas_test=300, seeds=3, canvas_entmax15=False),
    "large": dict(train=8000, valid=400, test=500, fairseq_epochs=25, hf_epochs=15, canvas_steps=1500,
                  canvas_test=500, seeds=5, canvas_entmax15=True),
}

FAIRSEQ_MECHANISMS = [
    ("softmax", "softmax"),
    ("sparsemax", "sparsemax"),
    ("entmax (learned alpha)", "entmax:alpha=learned"),
    ("fusedmax", "fusedmax:lam=0.1"),
    ("oscarmax", "oscarmax:lam=0.01"),
    ("continuous softmax", "sparsemax+continuous_softmax"),
    ("continuous sparsemax", "sparsemax+continuous_sparsemax"),
]
HF_MECHANISMS = [
    ("softmax", "softmax"),
    ("sparsemax", "sparsemax"),
    ("entmax (learned alpha)", "entmax:alpha=learned"),
]
CANVAS_MECHANISMS = [
    "discrete softmax",
    "discrete sparsemax",
    "continuous softmax",
    "continuous sparsemax",
    "continuous entmax-1.5",  # only where the size's canvas_entmax15 is set (its 2-D quadrature is the slowest)
]
TASKS = ("fairseq", "hf", "canvas")
# CPU seconds of one job at the default size (measured on a 2-core machine), used only to order the jobs:
# the longest first, so that the workers finish together
JOB_COST = {
    "fairseq": {"softmax": 24, "sparsemax": 22, "entmax (learned alpha)": 32, "fusedmax": 26, "oscarmax": 29,
                "continuous softmax": 40, "continuous sparsemax": 52},
    "hf": {"softmax": 40, "sparsemax": 40, "entmax (learned alpha)": 50},
    "canvas": {"discrete softmax": 17, "discrete sparsemax": 18, "continuous softmax": 24,
               "continuous sparsemax": 34, "continuous entmax-1.5": 60},
}


def longest_first(jobs: list[tuple[str, dict]]) -> list[tuple[str, dict]]:
    """``jobs`` ordered by their expected cost (:data:`JOB_COST`), longest first; ties keep their order."""
    return sorted(jobs, key=lambda job: -JOB_COST[job[0]].get(job[1]["label"], 30))


def _worker_init(threads: int) -> None:
    """One torch thread per worker; fairseq's import-time logging set-up is replaced per job."""
    import logging
    import warnings

    import torch

    torch.set_num_threads(threads)
    # hydra's deprecation notices, printed for every in-process fairseq-train: noise in the progress display
    warnings.filterwarnings("ignore", message=r"(?s).*(ConfigStore schema|strict flag in the compose API)")
    import fairseq_cli.train  # noqa: F401  (configures the root logger on import: silence it here)

    logging.getLogger().handlers = []


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its children that have ended and been waited for."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _job(kind: str, kwargs: dict) -> dict:
    import demo_canvas
    import demo_tasks

    t0, c0 = time.time(), cpu_seconds()
    if kind == "fairseq":
        result = demo_tasks.run_fairseq_job(**kwargs)
    elif kind == "hf":
        result = demo_tasks.run_hf_job(**kwargs)
    else:
        result = demo_canvas.run_canvas_job(**kwargs)
    result["job_seconds"] = time.time() - t0
    result["job_cpu_seconds"] = cpu_seconds() - c0  # a subprocess's (finetune.py's) CPU time included
    return result


def default_workers() -> int:
    """One worker per usable core (at most 8: each holds fairseq and transformers in memory)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    ap.add_argument("--size", default="small", choices=sorted(SIZES), help="how much data, training and seeds")
    ap.add_argument("--only", default=",".join(TASKS), help=f"comma-separated tasks among {', '.join(TASKS)}")
    ap.add_argument("--seeds", type=int, default=0, help="seeds per mechanism (0 = the size's default)")
    ap.add_argument("--data-seed", type=int, default=1, help="seed of the corpus and its split")
    ap.add_argument("--workers", type=int, default=0,
                    help="parallel worker processes (0 = one per core, at most 8)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker process (default 1)")
    ap.add_argument("--publish", action="store_true",
                    help="train nothing: copy the results block of --out's report.md into docs/demo.md (section "
                    "'Results of the default run') and its plots to docs/demo_*.png")
    args = ap.parse_args(argv)
    if args.publish:
        import demo_tasks

        for path in demo_tasks.publish(Path(args.out)):
            print(f"wrote {path}")
        return 0
    tasks = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        ap.error(f"--only: unknown task(s) {unknown}; valid choices: {', '.join(TASKS)}")
    for name in ("seeds", "workers"):
        if getattr(args, name) < 0:
            ap.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    size = SIZES[args.size]
    seeds = list(range(1, (args.seeds or size["seeds"]) + 1))
    workers = args.workers or default_workers()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # workers inherit these; tiny models lose time to OpenMP hand-offs on contended cores
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])

    import demo_tasks
    from tqdm import tqdm

    started, cpu_started = time.time(), cpu_seconds()
    load_start = round(os.getloadavg()[0], 1)
    results: dict = {"size": args.size, "seeds": len(seeds), "data_seed": args.data_seed}
    data_dir = out / "data"

    if {"fairseq", "hf"} & set(tasks):
        results["data"] = demo_tasks.make_data(data_dir, size, args.data_seed)

    jobs: list[tuple[str, dict]] = []
    for seed in seeds:
        if "canvas" in tasks:
            jobs += [("canvas", dict(label=label, seed=seed, steps=size["canvas_steps"], n_test=size["canvas_test"],
                                     out_dir=out / "canvas")) for label in CANVAS_MECHANISMS
                     if size.get("canvas_entmax15", True) or label != "continuous entmax-1.5"]
        if "fairseq" in tasks:
            jobs += [("fairseq", dict(label=label, spec=spec, seed=seed, epochs=size["fairseq_epochs"],
                                      data_dir=data_dir, work=out / "fairseq")) for label, spec in FAIRSEQ_MECHANISMS]
        if "hf" in tasks:
            jobs += [("hf", dict(label=label, spec=spec, seed=seed, epochs=size["hf_epochs"], data_dir=data_dir,
                                 work=out / "hf")) for label, spec in HF_MECHANISMS]

    done: dict[str, list[dict]] = {t: [] for t in tasks}
    timing: list[dict] = []
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(args.threads,)) as pool:
        futures = {pool.submit(_job, kind, kw): (kind, kw) for kind, kw in longest_first(jobs)}
        bar = tqdm(total=len(futures), desc=f"demo ({workers} workers)", unit="model")
        for fut in as_completed(futures):
            kind, kw = futures[fut]
            result = fut.result()  # a failed job stops the demo with its error
            done[kind].append(result)
            timing.append({"task": kind, "mechanism": kw["label"], "seed": kw["seed"],
                           "wall_seconds": result["job_seconds"], "cpu_seconds": result["job_cpu_seconds"]})
            bar.set_postfix_str(f"{kind}: {kw['label']} seed {kw['seed']}")
            bar.update(1)
        bar.close()

    results["machine"] = {"cpus": os.cpu_count(), "workers": workers, "threads": args.threads,
                          "load_start": load_start, "load_end": round(os.getloadavg()[0], 1)}
    order = {"fairseq": [m for m, _ in FAIRSEQ_MECHANISMS], "hf": [m for m, _ in HF_MECHANISMS],
             "canvas": CANVAS_MECHANISMS}
    results["jobs"] = sorted(timing, key=lambda j: (TASKS.index(j["task"]), order[j["task"]].index(j["mechanism"]),
                                                    j["seed"]))
    keys = {
        "fairseq": ["greedy_bleu", "beam_bleu", "stock_beam_bleu", "greedy_exact", "beam_exact", "stock_beam_exact",
                    "support_fraction"],
        "hf": ["greedy_bleu", "beam_bleu", "greedy_exact", "beam_exact"],
        "canvas": ["accuracy", "mass_in_box", "iou", "attended_area"],
    }
    for task in tasks:
        rows = sorted(done[task], key=lambda r: (order[task].index(r["mechanism"]), r["seed"]))
        results[task] = demo_tasks.group_by_mechanism(rows, keys[task])
    if "canvas" in tasks:
        import demo_canvas

        results["canvas_test"] = size["canvas_test"]
        results["canvas_steps"], results["canvas_batch"] = size["canvas_steps"], demo_canvas.BATCH
        results["canvas_fragments"] = demo_canvas.FRAGMENTS
        demo_canvas.plot_canvas(out, [g["runs"][0] for g in results["canvas"]])
    if "fairseq" in tasks:
        demo_tasks.plot_fairseq(out, results["fairseq"])
        demo_tasks.plot_alpha(out, [r for g in results["fairseq"] for r in g["runs"]])
    finish_run(out, results, started, cpu_started, demo_tasks.write_report)
    return 0


def finish_run(out: Path, results: dict, started: float, cpu_started: float,
               write_report: Callable[[Path, dict], Path]) -> Path:
    """Record a run's wall and CPU time (this process, the data preparation and every worker, each
    joined when the pool closed) in ``results``, write results.json and the report; the report's path."""
    results["total_seconds"] = time.time() - started
    results["total_cpu_seconds"] = cpu_seconds() - cpu_started
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    report = write_report(out, results)
    print(f"\nreport: {report} ({results['total_seconds'] / 60:.1f} min wall, "
          f"{results['total_cpu_seconds'] / 60:.1f} min CPU)")
    return report


if __name__ == "__main__":
    sys.exit(main())
