"""The jobs of scripts/demo.py (fairseq and HF translation), seed aggregation, plots and the report.

Each job trains one model for one (mechanism, seed) and returns a dict of plain numbers; jobs
run in worker processes (scripts/demo.py), one torch thread each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
USER_DIR = ROOT / "user_dir"
PY = sys.executable

#: fairseq's Adam: peak learning rate, reached after this many linear warm-up updates, then inverse square root
FAIRSEQ_LR, FAIRSEQ_WARMUP = 0.003, 100
#: the HF route's model family (sinusoidal positions: see run_hf_job)
HF_ARCH = "marian"
#: decoding of every translation model: greedy and beam 5, outputs at most 1 * source + 10 tokens
BEAM = 5
MAX_LEN_A, MAX_LEN_B = 1, 10

logging.getLogger("matplotlib").setLevel(logging.WARNING)
logging.getLogger("PIL").setLevel(logging.WARNING)


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` with its output in ``log``; return seconds; raise with the log's tail on failure."""
    t0 = time.time()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n--- {log} ---\n{tail}")
    return time.time() - t0


# ----------------------------------------------------------------------------- data


def make_data(data_dir: Path, size: dict[str, Any], seed: int) -> dict[str, int]:
    """The number corpus, fairseq's binarized copy, and jsonl files for the HF route."""
    from number_corpus import make_corpus

    sizes = make_corpus(data_dir, size["train"], size["valid"], size["test"], target_lang="de", seed=seed)
    for split in ("train", "valid", "test"):
        src = (data_dir / f"{split}.en").read_text(encoding="utf-8").splitlines()
        tgt = (data_dir / f"{split}.de").read_text(encoding="utf-8").splitlines()
        with open(data_dir / f"{split}.jsonl", "w", encoding="utf-8") as fh:
            for s, t in zip(src, tgt):
                fh.write(json.dumps({"source": s, "target": t}, ensure_ascii=False) + "\n")
    bin_dir = data_dir / "data-bin"
    shutil.rmtree(bin_dir, ignore_errors=True)  # a rerun into the same folder (fairseq-preprocess refuses to overwrite)
    run(
        [PY, "-m", "fairseq_cli.preprocess", "--source-lang", "en", "--target-lang", "de",
         "--trainpref", str(data_dir / "train"), "--validpref", str(data_dir / "valid"),
         "--testpref", str(data_dir / "test"), "--destdir", str(bin_dir), "--workers", "1"],
        data_dir / "preprocess.log",
    )
    return sizes


# ----------------------------------------------------------------------------- seeds


def aggregate(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min, max and count of per-seed values."""
    if not values:
        raise ValueError("aggregate: no values")
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def exceeds_noise(a: dict[str, float], b: dict[str, float]) -> bool:
    """True when two aggregated results differ by more than their spreads: |mean_a - mean_b| > std_a + std_b.

    With a single seed on either side the spread is unknown and nothing counts as a difference.
    """
    if a["n"] < 2 or b["n"] < 2:
        return False
    return abs(a["mean"] - b["mean"]) > a["std"] + b["std"]


def fmt(agg: dict[str, float], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± std`` (or just the value for one seed)."""
    if agg["n"] < 2:
        return f"{scale * agg['mean']:.{digits}f}"
    return f"{scale * agg['mean']:.{digits}f} ± {scale * agg['std']:.{digits}f}"


def group_by_mechanism(rows: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Per mechanism (in first-seen order): the seeds and an aggregate of each key present in every row."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["mechanism"], []).append(r)
    out = []
    for label, runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        agg = {k: aggregate([float(r[k]) for r in runs]) for k in keys if all(k in r for r in runs)}
        out.append({"mechanism": label, "spec": runs[0].get("spec", ""), "seeds": [r["seed"] for r in runs],
                    "runs": runs, **agg})
    return out


def beam_vs_greedy(runs: list[dict[str, Any]], beam_key: str = "beam_bleu") -> dict[str, float]:
    """Paired per-seed differences beam - greedy BLEU, aggregated; ``below`` is True when beam is
    below greedy by more than the spread of the differences (or by more than 0.5 BLEU with one seed)."""
    diffs = [float(r[beam_key]) - float(r["greedy_bleu"]) for r in runs]
    agg = aggregate(diffs)
    agg["below"] = agg["mean"] < -max(agg["std"], 0.5)
    return agg


# ----------------------------------------------------------------------------- fairseq jobs


def fairseq_train_argv(
    bin_dir: Path, save_dir: Path, spec: str, epochs: int, seed: int, epoch_checkpoints: bool
) -> list[str]:
    argv = [
        str(bin_dir), "--user-dir", str(USER_DIR), "--arch", "sparse_transformer_tiny", "--cross-attn", spec,
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(FAIRSEQ_LR), "--lr-scheduler",
        "inverse_sqrt", "--warmup-updates", str(FAIRSEQ_WARMUP), "--clip-norm", "1.0", "--dropout", "0.1",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--max-tokens", "1024", "--max-epoch", str(epochs), "--save-dir", str(save_dir),
        "--no-save-optimizer-state", "--log-format", "json", "--log-interval", "20", "--seed", str(seed),
        "--cpu", "--num-workers", "0", "--required-batch-size-multiple", "1",
    ]
    if not epoch_checkpoints:
        argv.append("--no-epoch-checkpoints")
    return argv


def _train_fairseq_in_process(argv: list[str], log: Path) -> float:
    """fairseq-train in this process (saves the interpreter start and imports per job), logging to ``log``."""
    from fairseq import checkpoint_utils, options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train as fairseq_train

    # fairseq keeps the best validation loss seen so far on a function attribute: reset it per job
    if hasattr(checkpoint_utils.save_checkpoint, "best"):
        del checkpoint_utils.save_checkpoint.best
    handler = logging.FileHandler(log, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s"))
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    t0 = time.time()
    try:
        parser = options.get_training_parser()
        args = options.parse_args_and_arch(parser, input_args=argv)
        fairseq_train.main(convert_namespace_to_omegaconf(args))
    finally:
        root.handlers = saved
        handler.close()
    return time.time() - t0


def parse_fairseq_log(log: Path) -> list[dict[str, float]]:
    """Per-epoch train/valid losses and update counts from a fairseq json log."""
    epochs: dict[int, dict[str, float]] = {}
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        start = line.find("{")
        if start < 0 or '"epoch"' not in line:
            continue
        try:
            rec = json.loads(line[start:])
        except json.JSONDecodeError:
            continue
        ep = int(rec["epoch"])
        for key in ("train_loss", "valid_loss", "train_num_updates"):
            if key in rec:
                epochs.setdefault(ep, {"epoch": ep})[key] = float(rec[key])
    return [epochs[e] for e in sorted(epochs)]


def alpha_trajectory(save_dir: Path) -> list[dict[str, Any]]:
    """Learned alpha per cross-attention layer and head after every epoch (from the epoch checkpoints,
    which are deleted afterwards), starting from the initial value at update 0."""
    from fairseq import checkpoint_utils

    from plugin.normalizers.entmax import ALPHA_MIN

    points = []
    for path in sorted(save_dir.glob("checkpoint[0-9]*.pt"), key=lambda p: int(re.findall(r"\d+", p.stem)[0])):
        state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
        weights = sorted(
            (k, v) for k, v in state["model"].items() if "encoder_attn" in k and k.endswith("learned.weight")
        )
        alphas = [(ALPHA_MIN + (2 - ALPHA_MIN) * torch.sigmoid(v.float())).tolist() for _, v in weights]
        updates = int(state["optimizer_history"][-1]["num_updates"])
        points.append({"updates": updates, "alpha": alphas})
        path.unlink()
    if points:
        init = 1.5  # LearnableAlpha's default start
        points.insert(0, {"updates": 0, "alpha": [[init] * len(layer) for layer in points[0]["alpha"]]})
    return points


def decode_fairseq(models, task, data_dir: Path) -> dict[str, Any]:
    """Greedy, beam 5 with fairseq's stopping rule, and beam 5 with the optimal stopping rule, on the test set."""
    import sacrebleu
    from fairseq.sequence_generator import SequenceGenerator

    from user_dir.beam_search import OptimalStopBeamSearch

    tgt = task.target_dictionary
    refs = (data_dir / "test.de").read_text(encoding="utf-8").splitlines()
    task.load_dataset("test")
    itr = task.get_batch_iterator(
        dataset=task.dataset("test"), max_sentences=128, required_batch_size_multiple=1, seed=1
    ).next_epoch_itr(shuffle=False)
    searches = {
        "greedy": SequenceGenerator(models, tgt, beam_size=1, max_len_a=MAX_LEN_A, max_len_b=MAX_LEN_B),
        "stock_beam": SequenceGenerator(models, tgt, beam_size=BEAM, max_len_a=MAX_LEN_A, max_len_b=MAX_LEN_B),
        "beam": OptimalStopBeamSearch(tgt, beam_size=BEAM, max_len_a=MAX_LEN_A, max_len_b=MAX_LEN_B),
    }
    hyps: dict[str, dict[int, str]] = {k: {} for k in searches}
    scores: dict[str, dict[int, float]] = {k: {} for k in searches}
    with torch.no_grad():
        for sample in itr:
            for name, search in searches.items():
                for sid, nbest in zip(sample["id"].tolist(), search.generate(models, sample)):
                    hyps[name][sid] = tgt.string(nbest[0]["tokens"])
                    scores[name][sid] = float(nbest[0]["score"])
    ids = sorted(hyps["greedy"])
    out: dict[str, Any] = {}
    for name in searches:
        h = [hyps[name][i] for i in ids]
        r = [refs[i] for i in ids]
        out[f"{name}_bleu"] = sacrebleu.corpus_bleu(h, [r]).score
        out[f"{name}_exact"] = sum(a == b for a, b in zip(h, r)) / len(r)
    # sentences where a beam's output has a lower model score than the greedy output
    out["stock_beam_worse_than_greedy"] = sum(scores["stock_beam"][i] < scores["greedy"][i] - 1e-4 for i in ids)
    out["beam_worse_than_greedy"] = sum(scores["beam"][i] < scores["greedy"][i] - 1e-4 for i in ids)
    out["test_sentences"] = len(ids)
    return out


def analyse_fairseq_model(model, task, data_dir: Path, n_sentences: int = 64,
                          example_index: int | None = None) -> dict[str, Any]:
    """Support size of the last decoder layer's cross-attention (per head) on test sentences, and one
    example (``example_index``, default: the first test sentence with at least 8 source words)."""
    src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
    src_lines = (data_dir / "test.en").read_text(encoding="utf-8").splitlines()[:n_sentences]
    tgt_lines = (data_dir / "test.de").read_text(encoding="utf-8").splitlines()[:n_sentences]
    show = next((i for i, s in enumerate(src_lines) if len(s.split()) >= 8), 0) if example_index is None \
        else example_index
    captured: list[torch.Tensor] = []
    layer = model.decoder.layers[-1].encoder_attn

    def hook(_mod, _inp, output):
        if isinstance(output, tuple) and len(output) > 1 and output[1] is not None:
            captured.append(output[1].detach())

    handle = layer.register_forward_hook(hook)
    nonzero, total, example = 0.0, 0.0, None
    try:
        with torch.no_grad():
            for i, (s, t) in enumerate(zip(src_lines, tgt_lines)):
                src = src_dict.encode_line(s, add_if_not_exist=False, append_eos=True).long().unsqueeze(0)
                tgt = tgt_dict.encode_line(t, add_if_not_exist=False, append_eos=True).long().unsqueeze(0)
                prev = torch.cat([torch.tensor([[tgt_dict.eos()]]), tgt[:, :-1]], dim=1)
                captured.clear()
                enc = model.encoder(src, src_lengths=torch.tensor([src.shape[1]]))
                model.decoder(prev, encoder_out=enc, features_only=True, alignment_layer=len(model.decoder.layers) - 1)
                if not captured:
                    raise RuntimeError("the cross-attention returned no weights")
                w = captured[-1].float()
                w = w[:, 0] if w.dim() == 4 else w[0].unsqueeze(0)  # (H, T, S) per head, or (1, T, S) averaged
                nonzero += float((w > 0).float().sum())
                total += float(w.numel())
                if i == show:
                    example = {"source": s.split() + ["</s>"], "target": t.split() + ["</s>"],
                               "per_head": w.tolist()}
    finally:
        handle.remove()
    return {"support_fraction": nonzero / max(total, 1.0), "example": example}


def run_fairseq_job(label: str, spec: str, seed: int, epochs: int, data_dir: Path, work: Path) -> dict[str, Any]:
    """Train one fairseq model (in this process), decode the test set three ways, analyse its attention."""
    from fairseq import checkpoint_utils, utils

    save = work / f"{slug(label)}_seed{seed}"
    save.mkdir(parents=True, exist_ok=True)
    learned = "learned" in spec
    argv = fairseq_train_argv(data_dir / "data-bin", save, spec, epochs, seed, epoch_checkpoints=learned)
    train_s = _train_fairseq_in_process(argv, save / "train.log")
    utils.import_user_module(argparse.Namespace(user_dir=str(USER_DIR)))
    t0 = time.time()
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(save / "checkpoint_last.pt")], arg_overrides={"data": str(data_dir / "data-bin")}
    )
    for m in models:
        m.eval()
    decoded = decode_fairseq(models, task, data_dir)
    analysis = analyse_fairseq_model(models[0], task, data_dir)
    curve = parse_fairseq_log(save / "train.log")
    # the model the numbers come from stays (checkpoint_last.pt, about 1 MB without the optimizer state:
    # the report says how to use it); checkpoint_best.pt (best validation loss) would be a second model
    (save / "checkpoint_best.pt").unlink(missing_ok=True)
    return {
        "model_path": str(save / "checkpoint_last.pt"),
        "route": "fairseq", "mechanism": label, "spec": spec, "seed": seed,
        "train_seconds": train_s, "eval_seconds": time.time() - t0,
        "updates": int(curve[-1]["train_num_updates"]) if curve and "train_num_updates" in curve[-1] else 0,
        "curve": curve, "alpha_trajectory": alpha_trajectory(save) if learned else [],
        **decoded, **analysis,
    }


# ----------------------------------------------------------------------------- HF jobs


def _finetune_in_process(argv: list[str], log: Path) -> float:
    """scripts/finetune.py's ``main(argv)`` in this process (saves the interpreter start and the imports of
    transformers and accelerate per job), its output (Python and C level) in ``log``; returns seconds."""
    import finetune
    from accelerate.state import AcceleratorState, GradientState

    t0 = time.time()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    failure: BaseException | None = None
    try:
        with open(log, "w", encoding="utf-8") as fh:
            os.dup2(fh.fileno(), 1)
            os.dup2(fh.fileno(), 2)
            try:
                with contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
                    finetune.main(argv)
            except BaseException as err:  # SystemExit of an argument error included
                failure = err
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])
        # the next job in this process builds its own Accelerator
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    if failure is not None:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-30:])
        raise RuntimeError(f"scripts/finetune.py {' '.join(argv)} failed: {failure!r}\n--- {log} ---\n{tail}") \
            from failure
    return time.time() - t0


def run_hf_job(label: str, spec: str, seed: int, epochs: int, data_dir: Path, work: Path,
               in_process: bool = True) -> dict[str, Any]:
    """A small Marian-style model fine-tuned by scripts/finetune.py (accelerate), decoded greedily there and
    with beam 5 here (transformers' ``early_stopping="never"``: a sentence ends only when no active
    hypothesis can beat the finished ones).

    Marian, not BART: at this size and budget a BART model does not learn the task. Measured at
    the default size (softmax, seed 1, 564 steps): BART plateaus at validation loss 1.26 and greedy
    BLEU 9 (1.26 and 9 again after 1128 steps; 1.37 and 6 without the sqrt(d_model) embedding scale),
    with well-formed German numbers that are not the source's; Marian, whose positions are
    fixed sinusoids instead of BART's learned table (initialized with std 0.02), reaches 0.36 and 82.

    ``in_process``: run finetune.py's ``main`` here (as the demo's workers do), else as a subprocess."""
    import sacrebleu

    save = work / f"{slug(label)}_seed{seed}"
    save.mkdir(parents=True, exist_ok=True)
    cmd = [
        PY, str(ROOT / "scripts" / "finetune.py"), "--task", "seq2seq",
        "--train-file", str(data_dir / "train.jsonl"), "--valid-file", str(data_dir / "test.jsonl"),
        "--source-column", "source", "--target-column", "target", "--from-config", "--arch", HF_ARCH,
        "--d-model", "64", "--layers", "2", "--heads", "4", "--ffn-dim", "128", "--cross-attn", spec,
        "--output-dir", str(save), "--epochs", str(epochs), "--batch-size", "32", "--lr", "0.003",
        "--warmup-steps", "50", "--num-beams", "1", "--seed", str(seed), "--cpu", "--threads", "1",
        # attention dropout 0, as in the fairseq model: dropout on the weights would keep the sparse
        # mechanisms on their reference path (it needs the weights formed)
        "--dropout", "0.1", "--attention-dropout", "0",
        # the number words are a closed vocabulary: one token per word (what these results were measured with)
        "--tokenizer", "word",
    ]
    train_s = _finetune_in_process(cmd[2:], save / "finetune.log") if in_process else run(cmd, save / "finetune.log")
    metrics = json.loads((save / "metrics.json").read_text(encoding="utf-8"))
    t0 = time.time()
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import hf_models  # noqa: F401  (registers the Sparse* classes with the Auto classes)

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    tok = AutoTokenizer.from_pretrained(save)
    model = AutoModelForSeq2SeqLM.from_pretrained(save).eval()
    rows = [json.loads(line) for line in (data_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    hyps: list[str] = []
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            batch = tok([r["source"] for r in rows[i : i + 64]], return_tensors="pt", padding=True)
            gen = model.generate(**batch, num_beams=BEAM, early_stopping="never", do_sample=False,
                                 max_new_tokens=MAX_LEN_A * batch["input_ids"].shape[1] + MAX_LEN_B)
            hyps += [t.strip() for t in tok.batch_decode(gen, skip_special_tokens=True)]
    refs = [r["target"] for r in rows]
    return {
        "model_path": str(save),  # config.json, model.safetensors and the tokenizer: from_pretrained(save)
        "route": "hf", "mechanism": label, "spec": spec, "seed": seed,
        "train_seconds": train_s, "eval_seconds": time.time() - t0,
        "greedy_bleu": float(metrics["bleu"]), "greedy_exact": float(metrics["exact_match"]),
        "beam_bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
        "beam_exact": sum(h == r for h, r in zip(hyps, refs)) / len(refs),
        "steps": int(metrics.get("steps", 0)), "valid_loss": float(metrics.get("valid_loss", math.nan)),
    }


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(ax: Any, w: Any, xlabels: list[str], ylabels: list[str], title: str, vmax: float | None = None) -> None:
    """Attention weights ``w`` (rows attend to columns) on ``ax``, exact zeros white, tokens on the axes;
    the colour scale runs from 0 to ``vmax`` (default: the largest weight)."""
    import numpy as np

    w = np.asarray(w)
    top = max(float(w.max()), 1e-9) if vmax is None else vmax
    ax.imshow(np.ma.masked_where(w == 0, w), cmap="viridis", vmin=0, vmax=top, aspect="auto")
    ax.set_facecolor("white")
    ax.set_xticks(range(len(xlabels)))
    ax.set_xticklabels(xlabels, rotation=70, ha="right", fontsize=6)
    ax.set_yticks(range(len(ylabels)))
    ax.set_yticklabels(ylabels, fontsize=6)
    ax.set_title(title, fontsize=8)


def plot_fairseq(out: Path, groups: list[dict[str, Any]]) -> None:
    """Cross-attention heatmaps (first seed of each mechanism), validation curves (every seed)."""
    plt = _plt()
    n = len(groups)
    cols = min(4, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 4.2 * nrows), squeeze=False)
    for ax, g in zip(axes.flat, groups):
        run0 = g["runs"][0]
        ex = run0["example"]
        heatmap(ax, ex["per_head"][0], ex["source"], ex["target"],
                f"{g['mechanism']} (seed {run0['seed']})\ngreedy BLEU {run0['greedy_bleu']:.1f}, "
                f"support {100 * run0['support_fraction']:.0f}%", vmax=1.0)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("Cross-attention, first head of the last decoder layer, one test sentence; white = exactly zero")
    fig.tight_layout()
    fig.savefig(out / "fairseq_attention_heatmaps.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, g in enumerate(groups):
        for j, r in enumerate(g["runs"]):
            curve = [c for c in r["curve"] if "valid_loss" in c]
            ax.plot([c["epoch"] for c in curve], [c["valid_loss"] for c in curve], color=colors[k % len(colors)],
                    alpha=0.8, lw=1, label=g["mechanism"] if j == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss (label-smoothed, base 2)")
    ax.set_yscale("log")
    ax.set_title("fairseq validation loss, every seed")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fairseq_training_curves.png", dpi=100)
    plt.close(fig)


def plot_alpha(out: Path, runs: list[dict[str, Any]]) -> Path | None:
    """Learned alpha per head over training: one panel per cross-attention layer, one line per head and seed."""
    runs = [r for r in runs if r.get("alpha_trajectory")]
    if not runs:
        return None
    plt = _plt()
    layers = len(runs[0]["alpha_trajectory"][0]["alpha"])
    fig, axes = plt.subplots(1, layers, figsize=(5 * layers, 3.8), squeeze=False, sharey=True)
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for li, ax in enumerate(axes.flat):
        for si, r in enumerate(runs):
            traj = r["alpha_trajectory"]
            steps = [p["updates"] for p in traj]
            for h in range(len(traj[0]["alpha"][li])):
                ax.plot(steps, [p["alpha"][li][h] for p in traj], styles[si % len(styles)], color=colors[h],
                        marker=".", label=f"head {h + 1}" if si == 0 else None)
        ax.set_title(f"decoder layer {li + 1} cross-attention")
        ax.set_xlabel("updates")
        ax.axhline(1.5, color="grey", lw=0.5)
    axes.flat[0].set_ylabel("alpha (1 = softmax, 2 = sparsemax)")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("entmax with a learned alpha per head; line style = seed (" +
                 ", ".join(f"{styles[i % len(styles)]} {r['seed']}" for i, r in enumerate(runs)) + ")", fontsize=9)
    fig.tight_layout()
    path = out / "fairseq_alpha.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- report


def inverse_sqrt_lr_sum(updates: int, peak: float = FAIRSEQ_LR, warmup: int = FAIRSEQ_WARMUP) -> float:
    """The learning rates of fairseq's ``inverse_sqrt`` schedule summed over ``updates`` updates: update k
    (1-based) uses ``peak * (k - 1) / warmup`` during the warm-up (from 0), then ``peak * sqrt(warmup / (k - 1))``."""
    return sum(peak * t / warmup if t < warmup else peak * math.sqrt(warmup / t) for t in range(updates))


def alpha_move_bound(updates: int, peak: float = FAIRSEQ_LR, warmup: int = FAIRSEQ_WARMUP) -> float:
    """How far a learned alpha can move in ``updates`` Adam updates when every update pushes it the same way.

    Adam moves a parameter by about the learning rate per update at most (its step is the running
    mean of the gradient over the running RMS, at most about 1 in size); alpha = 1.01 + 0.99 *
    sigmoid(w) changes by at most 0.99 / 4 per unit of w (the slope at w = 0, alpha = 1.505).
    """
    return 0.99 / 4 * inverse_sqrt_lr_sum(updates, peak, warmup)


def _alpha_summary(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    runs = [r for r in runs if r.get("alpha_trajectory")]
    if not runs:
        return None
    finals = [a for r in runs for layer in r["alpha_trajectory"][-1]["alpha"] for a in layer]
    moves = [
        abs(b - a)
        for r in runs
        for la, lb in zip(r["alpha_trajectory"][0]["alpha"], r["alpha_trajectory"][-1]["alpha"])
        for a, b in zip(la, lb)
    ]
    every = [a for r in runs for p in r["alpha_trajectory"] for layer in p["alpha"] for a in layer]
    start = runs[0]["alpha_trajectory"][0]["alpha"][0][0]
    updates = runs[0]["alpha_trajectory"][-1]["updates"]
    return {"start": start, "down": sum(a < start for a in finals), "up": sum(a > start for a in finals),
            "heads": len(finals), "bound": alpha_move_bound(updates), "final_min": min(finals),
            "final_max": max(finals), "max_move": max(moves), "median_move": statistics.median(moves),
            "range_min": min(every), "range_max": max(every), "updates": updates}


def alpha_sentence(alpha: dict[str, Any]) -> str:
    """Plain words on the learned alpha: where it went, and how far Adam could have taken it."""
    ratio = alpha["max_move"] / alpha["bound"] if alpha["bound"] > 0 else 0.0
    if alpha["bound"] < 0.01:
        why = (f"With this learning-rate schedule Adam could move alpha by at most about {alpha['bound']:.4f} in "
               f"{alpha['updates']} updates: far too few updates for alpha to move.")
    else:
        why = (f"With this learning-rate schedule Adam could move alpha by about {alpha['bound']:.2f} if every "
               "update pushed it the same way (summed learning rate x the largest slope of alpha in its weight, "
               f"0.99/4); the largest measured move is {100 * ratio:.0f}% of that, so "
               + ("the mean of alpha's gradient is small against its batch-to-batch spread: within this run the "
                  "data pull alpha only weakly." if ratio < 0.5 else
                  "the data push alpha consistently: it moves at a good part of the fastest rate Adam allows."))
    return (
        f"Learned alpha (entmax, one per head and decoder layer, every head starting at {alpha['start']:.2f}; "
        f"plot below): after {alpha['updates']} updates the {alpha['heads']} final values (heads x layers x seeds) "
        f"lie in {alpha['final_min']:.2f}-{alpha['final_max']:.2f}, {alpha['down']} below the start (towards "
        f"softmax) and {alpha['up']} above (towards sparsemax); every value seen during training lies in "
        f"{alpha['range_min']:.2f}-{alpha['range_max']:.2f} (median move {alpha['median_move']:.3f}, largest "
        f"{alpha['max_move']:.3f}). " + why
    )


def translation_summary(route: str, groups: list[dict[str, Any]], metric: str = "greedy_bleu") -> str:
    """Plain words: each mechanism against softmax, a difference only when it exceeds the seeds' spread."""
    base = next((g for g in groups if g["spec"] == "softmax"), None)
    if base is None or metric not in base:
        return ""
    same, better, worse = [], [], []
    for g in groups:
        if g is base or metric not in g:
            continue
        d = g[metric]["mean"] - base[metric]["mean"]
        if not exceeds_noise(g[metric], base[metric]):
            same.append(f"{g['mechanism']} ({d:+.1f})")
        elif d > 0:
            better.append(f"{g['mechanism']} ({d:+.1f})")
        else:
            worse.append(f"{g['mechanism']} ({d:+.1f})")
    name = "greedy BLEU" if metric == "greedy_bleu" else metric
    parts = [f"{route}: softmax reaches {name} {fmt(base[metric])} (mean ± standard deviation over "
             f"{base[metric]['n']} seed{'s' if base[metric]['n'] > 1 else ''})."]
    if base[metric]["n"] < 2:
        parts.append("With one seed per mechanism no difference can be told from noise.")
    if same:
        parts.append("Not distinguishable from softmax (difference within the sum of the two spreads): "
                     + ", ".join(same) + ".")
    if better:
        parts.append("Better than softmax beyond the spread: " + ", ".join(better) + ".")
    if worse:
        parts.append("Worse than softmax beyond the spread: " + ", ".join(worse) + ".")
    return " ".join(parts)


def _beam_lines(groups: list[dict[str, Any]], keys: list[tuple[str, str]]) -> list[str]:
    lines = []
    for beam_key, what in keys:
        below = []
        for g in groups:
            d = beam_vs_greedy(g["runs"], beam_key)
            if d["below"]:
                below.append(f"{g['mechanism']} ({d['mean']:+.1f} ± {d['std']:.1f})")
        if below:
            lines.append(f"{what} is below greedy by more than the spread for: {', '.join(below)}.")
        else:
            lines.append(f"{what} is nowhere below greedy by more than the spread.")
    return lines


#: the report's results (tables and plain-words conclusions, no plots) lie between these lines; docs/demo.md
#: holds a copy between the same lines, which ``scripts/demo.py --publish`` refreshes
SUMMARY_START, SUMMARY_END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"


def summary_block(report: str) -> str:
    """The results block of a report, made to sit under a section of docs/demo.md: headings one level
    lower, plot lines left out (the page shows the published copies of the plots)."""
    if report.count(SUMMARY_START) != 1 or report.count(SUMMARY_END) != 1:
        raise ValueError(f"report: expected one {SUMMARY_START} ... {SUMMARY_END} block")
    body = report.split(SUMMARY_START, 1)[1].split(SUMMARY_END, 1)[0]
    lines = ["#" + line if line.startswith("#") else line for line in body.strip("\n").splitlines()
             if not line.startswith("![")]
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip("\n")


def replace_block(document: str, block: str) -> str:
    """``document`` with the text between its SUMMARY_START and SUMMARY_END lines replaced by ``block``."""
    if document.count(SUMMARY_START) != 1 or document.count(SUMMARY_END) != 1:
        raise ValueError(f"document: expected one {SUMMARY_START} ... {SUMMARY_END} block")
    head, rest = document.split(SUMMARY_START, 1)
    tail = rest.split(SUMMARY_END, 1)[1]
    return f"{head}{SUMMARY_START}\n{block}\n{SUMMARY_END}{tail}"


#: plots of a run -> their published copies, beside the page (docs/), which docs/demo.md shows (README.md
#: shows the canvas plot)
PUBLISHED_PLOTS = {
    "fairseq_attention_heatmaps.png": "demo_attention_heatmaps.png",
    "fairseq_alpha.png": "demo_alpha.png",
    "canvas_attention.png": "demo_canvas.png",
}


def publish(out: Path, page: Path = ROOT / "docs" / "demo.md") -> list[Path]:
    """Copy a finished run's results block into ``page`` and its plots beside it; the files written."""
    import shutil

    report = (out / "report.md").read_text(encoding="utf-8")
    page.write_text(replace_block(page.read_text(encoding="utf-8"), summary_block(report)), encoding="utf-8")
    written = [page]
    for name, dest in PUBLISHED_PLOTS.items():
        if (out / name).exists():
            shutil.copyfile(out / name, page.parent / dest)
            written.append(page.parent / dest)
    return written


def write_report(out: Path, results: dict[str, Any]) -> Path:
    """report.md from the per-job results in ``results``."""
    lines = ["# Attention mechanisms compared", "", SUMMARY_START, ""]
    machine = results.get("machine", {})
    lines.append(
        f"Run size `{results['size']}`: {results.get('seeds', 1)} seed(s) per mechanism, "
        f"{machine.get('workers', 1)} parallel worker process(es) with {machine.get('threads', 1)} torch thread(s) "
        f"each on {machine.get('cpus', '?')} CPU core(s); wall time {results.get('total_seconds', 0) / 60:.1f} min, "
        f"CPU time {results.get('total_cpu_seconds', 0) / 60:.1f} min (load average {machine.get('load_start', '?')} "
        f"at the start, {machine.get('load_end', '?')} at the end: other work on the machine lengthens the wall "
        "time, hardly the CPU time). Every number below comes from this run."
    )
    lines.append("")
    data = results.get("data")
    if data:
        lines += [
            "## Data",
            "",
            f"English number expressions -> German number words, written by num2words: cardinals up to "
            f"999 999 999, ordinals up to 999 999, years 1000-2099, euro amounts (40/20/20/20 %). German words "
            f"are split into morphemes (\"vier und achtzig\"), so the model has to reorder units and tens. "
            f"Train / valid / test: {data['train']} / {data['valid']} / {data['test']} distinct items "
            f"(form, number) drawn with seed {results['data_seed']}; no test item occurs in training. "
            "Decoding: greedy, and beam 5 (at most source length + 10 tokens).",
            "",
        ]
    if "fairseq" in results:
        groups = results["fairseq"]
        n_test = groups[0]["runs"][0]["test_sentences"]
        lines += [
            "## Translation with fairseq",
            "",
            "One `sparse_transformer_tiny` model per cross-attention mechanism and seed (encoder and decoder "
            "self-attention stay softmax). BLEU: sacreBLEU on the "
            f"{n_test} held-out test items. *beam 5* stops a sentence only when no active hypothesis can "
            "beat the finished ones (`user_dir/beam_search.py`); *beam 5, fairseq's stop* is "
            "fairseq-generate's search, which stops once 5 hypotheses have ended. *below greedy*: test "
            "sentences whose beam output has a lower model score than the greedy output (summed over seeds). "
            "Support: share of nonzero cross-attention weights, last decoder layer.",
            "",
            "| mechanism | greedy BLEU | beam 5 BLEU | beam 5, fairseq's stop | exact match (greedy) | "
            "support | below greedy: beam / fairseq's stop | updates | train time |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for g in groups:
            runs = g["runs"]
            lines.append(
                f"| {g['mechanism']} | {fmt(g['greedy_bleu'])} | {fmt(g['beam_bleu'])} | {fmt(g['stock_beam_bleu'])} "
                f"| {fmt(g['greedy_exact'], 100, 0)}% | {fmt(g['support_fraction'], 100, 0)}% | "
                f"{sum(r['beam_worse_than_greedy'] for r in runs)} / "
                f"{sum(r['stock_beam_worse_than_greedy'] for r in runs)} | {runs[0]['updates']} | "
                f"{statistics.fmean(r['train_seconds'] for r in runs):.0f} s |"
            )
        lines += ["", translation_summary("fairseq", groups), ""]
        lines += _beam_lines(groups, [("beam_bleu", "Beam 5 with the optimal stop"),
                                      ("stock_beam_bleu", "Beam 5 with fairseq's stop")])
        lines.append("")
        alpha = _alpha_summary([r for g in groups for r in g["runs"]])
        if alpha:
            lines += [alpha_sentence(alpha), "", "![learned alpha per head](fairseq_alpha.png)", ""]
        lines += ["![cross-attention heatmaps](fairseq_attention_heatmaps.png)", "",
                  "![validation curves](fairseq_training_curves.png)", ""]
    if "hf" in results:
        groups = results["hf"]
        lines += [
            "## Translation with HuggingFace + accelerate (Marian-style, sparse cross-attention)",
            "",
            "scripts/finetune.py (accelerate) per mechanism and seed; greedy as its evaluation, beam 5 with "
            "transformers' `early_stopping=\"never\"` (no sentence ends while a better hypothesis may remain).",
            "",
            "| mechanism | greedy BLEU | beam 5 BLEU | exact match (greedy) | steps | train time |",
            "|---|---|---|---|---|---|",
        ]
        for g in groups:
            runs = g["runs"]
            lines.append(
                f"| {g['mechanism']} | {fmt(g['greedy_bleu'])} | {fmt(g['beam_bleu'])} | "
                f"{fmt(g['greedy_exact'], 100, 0)}% | {runs[0]['steps']} | "
                f"{statistics.fmean(r['train_seconds'] for r in runs):.0f} s |"
            )
        lines += ["", translation_summary("HuggingFace", groups), ""]
        lines += _beam_lines(groups, [("beam_bleu", "Beam 5")])
        lines.append("")
    if "canvas" in results:
        groups = results["canvas"]
        lines += [
            "## 2-D attention: a digit on a cluttered canvas",
            "",
            f"A scikit-learn 8x8 digit at a random place on a 32x32 canvas with {results.get('canvas_fragments', 4)} "
            "fragments of other digits; local features (16x16 cells, each seeing 8x8 pixels); the classifier "
            "sees only the attended context, so the attention has to find the digit. Training: "
            f"{results.get('canvas_steps', '?')} steps of {results.get('canvas_batch', '?')} fresh canvases, "
            "clean at first, with clutter growing to the full count over the first half of the steps. Test: "
            f"{results.get('canvas_test', '?')} canvases of held-out digits. *mass in box*: share of the "
            "attention weight inside the digit's true box; *IoU*: overlap of the attended region (nonzero cells, "
            "support ellipse, or 2-sigma ellipse for continuous softmax) with the box; *area*: the attended "
            "region's share of the canvas (the box is 6.25%). As in Martins et al. (2020), a continuous density "
            "is placed by the mean and covariance of a discrete softmax attention, and the classifier reads the "
            "discrete and continuous contexts summed.",
            "",
            "| attention | accuracy | mass in box | IoU with the box | IoU region | attended area | train time |",
            "|---|---|---|---|---|---|---|",
        ]
        for g in groups:
            runs = g["runs"]
            lines.append(
                f"| {g['mechanism']} | {fmt(g['accuracy'], 100)}% | {fmt(g['mass_in_box'], 100)}% | "
                f"{fmt(g['iou'], 100)}% | {runs[0]['region']} | {fmt(g['attended_area'], 100)}% | "
                f"{statistics.fmean(r['train_seconds'] for r in runs):.0f} s |"
            )
        lines += ["", canvas_summary(groups), "", "![attention on canvases](canvas_attention.png)", ""]
    lines += [SUMMARY_END, ""]
    lines += models_section(out, results)
    lines += time_section(results)
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _shown(path: str | Path) -> str:
    """``path`` relative to the repository root when it lies inside it (the report's commands run from there)."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _example_run(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The first run of the first sparse mechanism (its alignments show exact zeros), else the first run."""
    return next((g["runs"][0] for g in groups if g["spec"] != "softmax"), groups[0]["runs"][0])


def models_section(out: Path, results: dict[str, Any]) -> list[str]:
    """Where the trained translation models are, and the commands that use them."""
    routes = [r for r in ("fairseq", "hf") if r in results]
    if not routes:
        return []
    data = out / "data"
    source = (data / "test.en").read_text(encoding="utf-8").splitlines()[0]
    lines = [
        "## Use the trained models",
        "",
        "Every translation model of this run is kept (the canvas models are not). Commands from the "
        "repository root, with the venv's tools on the PATH.",
        "",
        "| route | mechanism | seed | model |",
        "|---|---|---|---|",
    ]
    lines += [f"| {route} | {g['mechanism']} | {r['seed']} | `{_shown(r['model_path'])}` |"
              for route in routes for g in results[route] for r in g["runs"]]
    lines.append("")
    if "fairseq" in results:
        run_ = _example_run(results["fairseq"])
        ckpt, bin_dir, user_dir = _shown(run_["model_path"]), _shown(data / "data-bin"), _shown(USER_DIR)
        lines += [
            f"fairseq ({run_['mechanism']}, seed {run_['seed']}): translate your own sentence (tokenized as "
            f"`{_shown(data / 'test.en')}`) with the optimal-stop beam search; then the test set with the "
            "cross-attention weights of the last layer (`A-` lines; exact zeros where the mechanism is sparse). "
            "`--print-alignment soft` works in fairseq-generate only: fairseq-interactive crashes with it inside "
            "fairseq (`--print-alignment hard` works there). `--user-dir` is needed every time; the length "
            f"limit (at most {MAX_LEN_A} x source + {MAX_LEN_B} tokens) is the one the numbers above were "
            "decoded with.",
            "",
            "```bash",
            f'echo "{source}" | fairseq-interactive {bin_dir} --user-dir {user_dir} \\',
            f"    --path {ckpt} --source-lang en --target-lang de \\",
            f"    --task translation_optimal_stop --beam 5 --max-len-a {MAX_LEN_A} --max-len-b {MAX_LEN_B} --cpu",
            f"fairseq-generate {bin_dir} --user-dir {user_dir} --path {ckpt} \\",
            f"    --beam 5 --max-len-a {MAX_LEN_A} --max-len-b {MAX_LEN_B} --print-alignment soft \\",
            "    --batch-size 64 --required-batch-size-multiple 1 --cpu",
            "```",
            "",
            "The alignment of your own sentence, from Python (docs/fairseq.md):",
            "",
            "```python",
            "from fairseq.models.transformer import TransformerModel",
            "",
            f'hub = TransformerModel.from_pretrained("{_shown(Path(run_["model_path"]).parent)}", '
            f'checkpoint_file="checkpoint_last.pt",',
            f'                                     data_name_or_path="{bin_dir}", user_dir="{user_dir}")',
            f'best = hub.generate([hub.encode("{source}")], beam=5)[0][0]',
            'print(hub.decode(best["tokens"]))',
            'weights = best["attention"]   # (source words + </s>, target words + </s>), e.g. plt.imshow(weights.T)',
            "```",
            "",
        ]
    if "hf" in results:
        run_ = _example_run(results["hf"])
        lines += [
            f"HuggingFace ({run_['mechanism']}, seed {run_['seed']}): `from_pretrained` on the folder "
            "(`import hf_models` registers the sparse classes with the Auto classes).",
            "",
            "```python",
            "import hf_models",
            "from transformers import AutoModelForSeq2SeqLM, AutoTokenizer",
            "",
            f'tok = AutoTokenizer.from_pretrained("{_shown(run_["model_path"])}")',
            f'model = AutoModelForSeq2SeqLM.from_pretrained("{_shown(run_["model_path"])}").eval()',
            f'batch = tok(["{source}"], return_tensors="pt")',
            'out = model.generate(**batch, num_beams=5, early_stopping="never", max_new_tokens=40)',
            "print(tok.batch_decode(out, skip_special_tokens=True))",
            "```",
            "",
        ]
    return lines


def time_section(results: dict[str, Any]) -> list[str]:
    """Measured wall and CPU seconds: per task and mechanism (mean per job, total), every job, and the run."""
    jobs = results.get("jobs") or []
    if not jobs:
        return []
    lines = [
        "## Time",
        "",
        f"Wall time {results.get('total_seconds', 0) / 60:.1f} min; CPU time (user + system, every process) "
        f"{results.get('total_cpu_seconds', 0) / 60:.1f} min, of which the jobs below "
        f"{sum(j['cpu_seconds'] for j in jobs) / 60:.1f} min (the rest: corpus preparation, worker start-up, "
        "plots). CPU time hardly depends on other load on the machine; wall time does.",
        "",
        "| task | mechanism | jobs | wall per job | CPU per job | CPU, all its jobs |",
        "|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for j in jobs:
        groups.setdefault((j["task"], j["mechanism"]), []).append(j)
    for (task, mech), js in groups.items():
        lines.append(f"| {task} | {mech} | {len(js)} | {statistics.fmean(j['wall_seconds'] for j in js):.0f} s | "
                     f"{statistics.fmean(j['cpu_seconds'] for j in js):.0f} s | "
                     f"{sum(j['cpu_seconds'] for j in js):.0f} s |")
    for task in dict.fromkeys(j["task"] for j in jobs):
        lines.append(f"| **{task}** | all | {sum(j['task'] == task for j in jobs)} | | | "
                     f"**{sum(j['cpu_seconds'] for j in jobs if j['task'] == task):.0f} s** |")
    lines += ["", "<details><summary>every job</summary>", "", "| task | mechanism | seed | wall | CPU |",
              "|---|---|---|---|---|"]
    lines += [f"| {j['task']} | {j['mechanism']} | {j['seed']} | {j['wall_seconds']:.0f} s | {j['cpu_seconds']:.0f} s |"
              for j in jobs]
    lines += ["", "</details>", ""]
    return lines


#: a canvas model below this test accuracy has not learned to find the digit (chance: 0.1)
LEARNED_ACCURACY = 0.3


def canvas_summary(groups: list[dict[str, Any]]) -> str:
    """Plain words for the 2-D task: each mechanism against discrete softmax, beyond the spread only."""
    base = next((g for g in groups if g["mechanism"] == "discrete softmax"), groups[0])
    parts = [f"Discrete softmax: accuracy {fmt(base['accuracy'], 100)}%, {fmt(base['mass_in_box'], 100)}% of its "
             "attention inside the digit's box."]
    if base["accuracy"]["n"] < 2:
        parts.append("One seed per mechanism: the spread is unknown, so no difference below is called one.")
    for g in groups:
        if g is base:
            continue
        words = []
        for key, what in (("accuracy", "accuracy"), ("mass_in_box", "mass in the box")):
            d = 100 * (g[key]["mean"] - base[key]["mean"])
            verdict = "beyond the spread" if exceeds_noise(g[key], base[key]) else "within the spread"
            words.append(f"{what} {d:+.1f} points ({verdict})")
        parts.append(f"{g['mechanism']}: " + ", ".join(words) + f"; IoU {fmt(g['iou'], 100)}%.")
    failed = [f"{g['mechanism']} seed {r['seed']} ({100 * r['accuracy']:.0f}%)" for g in groups for r in g["runs"]
              if r["accuracy"] < LEARNED_ACCURACY]
    parts.append(f"Seeds that did not learn (test accuracy below {100 * LEARNED_ACCURACY:.0f}%; chance is 10%): "
                 + (", ".join(failed) if failed else "none") + ".")
    return " ".join(parts)

