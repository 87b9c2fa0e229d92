"""The main job: train and compare attention mechanisms on real embedded data; write a report.

    python scripts/demo.py                      # the default run (about 10 minutes on 2 CPU cores)
    python scripts/demo.py --size tiny          # a smoke run (about a minute)
    python scripts/demo.py --size large         # longer training, closer to convergence
    python scripts/demo.py --only fairseq,digits --out outputs/demo

Three tasks, each comparing mechanisms side by side:
1. translation with fairseq: English number words -> German number words (num2words,
   generated offline, held-out numbers), one model per cross-attention mechanism,
   BLEU with sacreBLEU on fairseq-generate's output;
2. the same data through HuggingFace: a small BART-style model with sparse
   cross-attention fine-tuned by scripts/finetune.py (accelerate);
3. 2-D continuous attention over the 8x8 digit images shipped with scikit-learn.
Everything goes to one folder: report.md, PNG plots, logs, the data and checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

SIZES = {
    # corpus sizes, fairseq epochs, HF epochs, digits steps
    "tiny": dict(train=300, valid=40, test=40, fairseq_epochs=2, hf_epochs=1, digits_steps=30, digits_train=300),
    "small": dict(train=3000, valid=200, test=200, fairseq_epochs=14, hf_epochs=10, digits_steps=600,
                  digits_train=1400),
    "large": dict(train=8000, valid=400, test=400, fairseq_epochs=60, hf_epochs=30, digits_steps=2500,
                  digits_train=1500),
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

TASKS = ("fairseq", "hf", "digits")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    ap.add_argument("--size", default="small", choices=sorted(SIZES), help="how much data and training")
    ap.add_argument("--only", default=",".join(TASKS), help=f"comma-separated tasks among {', '.join(TASKS)}")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per training process (0 = all cores)")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.only.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        ap.error(f"--only: unknown task(s) {unknown}; valid choices: {', '.join(TASKS)}")
    size = SIZES[args.size]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import demo_tasks

    started = time.time()
    results: dict[str, object] = {"size": args.size, "seed": args.seed}
    data_dir = out / "data"
    demo_tasks.make_data(data_dir, size, args.seed)
    if "fairseq" in tasks:
        results["fairseq"] = demo_tasks.run_fairseq(out, data_dir, size, FAIRSEQ_MECHANISMS, args.seed)
    if "hf" in tasks:
        results["hf"] = demo_tasks.run_hf(out, data_dir, size, args.seed)
    if "digits" in tasks:
        results["digits"] = demo_tasks.run_digits(out, size, args.seed)
    results["total_seconds"] = time.time() - started
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    report = demo_tasks.write_report(out, results)
    print(f"\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
