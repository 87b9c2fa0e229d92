"""Sparsifying a pretrained softmax model: an abrupt switch against an annealed alpha, measured.

    .venv/bin/python scripts/sparsify_pretrained.py --out outputs/sparsify          # a few minutes on 2 CPU cores
    .venv/bin/python scripts/sparsify_pretrained.py --out outputs/sparsify --seeds 3 # more seeds

For each ecosystem (fairseq through ``fairseq-train``'s own flags, in this process; transformers
through ``SparseBartForConditionalGeneration`` and a hand-written loop) the script

1. trains a small softmax translation model on number words (cardinals up to 99,999 written by
   scripts/number_corpus.py, English -> German morphemes, disjoint numbers in train/valid/test);
2. fine-tunes it, every attention role at once, to 1.5-entmax (``entmax:alpha=1.5``) and to
   sparsemax (``entmax:alpha=2``), once **abruptly** (the target mechanism from the first step)
   and once **annealed** (``linear:start=1,steps=N``: alpha from 1 = softmax to the target
   over the first half of the fine-tuning updates), and once more with softmax (the control);
3. reports the validation loss (nats per target token, teacher forcing, the mechanism in use at
   that step) just after the switch (step 0, before any update) and along the way, the final
   test BLEU (sacreBLEU) and exact match of greedy decoding, and the attention support size
   (share of the allowed keys with a nonzero weight, every query of the validation set, per role);
4. writes ``results.json``, ``report.md`` and ``sparsify.png`` (validation loss against the
   fine-tuning step) in ``--out``.

Every run of one seed starts from the same pretrained weights and sees the same batches.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import plugin  # noqa: E402

ROLES = ("encoder", "decoder", "cross")
TARGETS = {"entmax-1.5": "entmax:alpha=1.5", "sparsemax": "entmax:alpha=2"}
SIZES = {
    # sentences (numbers up to max_number), pretraining epochs, fine-tuning updates, evaluations along the way
    "tiny": {"train": 300, "valid": 60, "test": 60, "max_number": 9999, "pre_epochs": 3, "hf_pre_epochs": 3,
             "updates": 8, "evals": 2},
    "default": {"train": 2000, "valid": 200, "test": 200, "max_number": 99999, "pre_epochs": 8, "hf_pre_epochs": 14,
                "updates": 60, "evals": 6},
}


def runs_of(updates: int) -> dict[str, dict[str, str | None]]:
    """Fine-tuning runs: label -> {"spec": target spec of every role, "schedule": schedule or None}."""
    runs: dict[str, dict[str, str | None]] = {"softmax (control)": {"spec": "softmax", "schedule": None}}
    for name, spec in TARGETS.items():
        runs[f"{name} abrupt"] = {"spec": spec, "schedule": None}
        runs[f"{name} annealed"] = {"spec": spec, "schedule": f"linear:start=1,steps={max(1, updates // 2)}"}
    return runs


# ----------------------------------------------------------------------------- attention support


@contextlib.contextmanager
def support_counter(model: torch.nn.Module):
    """Count, per role, nonzero attention weights and allowed keys over every call in the block."""
    counts = {role: [0, 0] for role in ROLES}
    originals = []

    def wrap(mech):
        forward = mech.forward

        def counting(q, k, v, mask=None, causal=False, scale=None, dropout_p=0.0, return_weights=False):
            out, weights = forward(q, k, v, mask=mask, causal=causal, scale=scale, dropout_p=dropout_p,
                                   return_weights=True)
            B, H, Lq, Lk = weights.shape
            allowed = torch.ones(B, H, Lq, Lk, dtype=torch.bool)
            if mask is not None:
                allowed = allowed & (mask if mask.dtype == torch.bool else mask > float("-inf"))
            if causal:
                allowed = allowed & (torch.arange(Lk) <= torch.arange(Lq).unsqueeze(-1) + (Lk - Lq))
            allowed = allowed & allowed.any(-1, keepdim=True)  # rows with no key at all do not count
            if mech.role in counts:
                counts[mech.role][0] += int(((weights > 0) & allowed).sum())
                counts[mech.role][1] += int(allowed.sum())
            return (out, weights) if return_weights else out

        return forward, counting

    for m in model.modules():
        if isinstance(m, plugin.AttentionMechanism):
            forward, counting = wrap(m)
            originals.append((m, forward))
            m.forward = counting
    try:
        yield counts
    finally:
        for m, _ in originals:
            del m.forward  # back to the class's forward


def support_share(counts: dict[str, list[int]]) -> dict[str, float]:
    return {role: round(nz / total, 4) for role, (nz, total) in counts.items() if total}


def bleu_and_exact(hyps: list[str], refs: list[str]) -> tuple[float, float]:
    import sacrebleu

    bleu = sacrebleu.corpus_bleu(hyps, [refs]).score
    return round(bleu, 2), round(sum(h == r for h, r in zip(hyps, refs)) / max(len(refs), 1), 4)


# ----------------------------------------------------------------------------- fairseq


class _Captured(logging.Handler):
    """The json records fairseq's progress bar logs under the tag 'valid' (the validation stats)."""

    def __init__(self) -> None:
        super().__init__()
        self.valid: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != "valid":
            return
        try:
            stats = json.loads(record.getMessage())
        except ValueError:
            return
        self.valid.append({k.removeprefix("valid_"): v for k, v in stats.items()})


@contextlib.contextmanager
def _fairseq_cli(tool: str, argv: list[str]):
    """Run ``fairseq-<tool>`` in this process (no Python start-up per run); yields the captured validations."""
    import importlib

    module = importlib.import_module(f"fairseq_cli.{tool}")
    handler = _Captured()
    bar_logger = logging.getLogger("fairseq.logging.progress_bar")
    bar_logger.addHandler(handler)
    bar_logger.propagate = False  # captured, not printed
    old = sys.argv
    sys.argv = [f"fairseq-{tool}", *argv]
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            module.cli_main()
        handler.stdout = out.getvalue()  # type: ignore[attr-defined]
        yield handler
    finally:
        sys.argv = old
        bar_logger.removeHandler(handler)
        bar_logger.propagate = True


def _quiet_fairseq() -> None:
    for name in ("fairseq", "fairseq_cli", "user_dir", "hydra"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("fairseq.logging.progress_bar").setLevel(logging.INFO)


def _role_flags(spec: str, schedule: str | None) -> list[str]:
    flags = []
    for role in ROLES:
        flags += [f"--{role}-attn", spec]
        if schedule:
            flags += [f"--{role}-attn-schedule", schedule]
    return flags


def _fairseq_common(bin_dir: Path, save: Path, seed: int) -> list[str]:
    return [
        str(bin_dir), "--user-dir", str(ROOT / "user_dir"), "--arch", "sparse_transformer_tiny", "--cpu",
        "--num-workers", "0", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--clip-norm", "1.0",
        "--criterion", "cross_entropy", "--max-tokens", "500", "--dropout", "0.1", "--seed", str(seed),
        "--save-dir", str(save), "--no-epoch-checkpoints", "--no-save-optimizer-state",
        "--log-format", "json", "--log-interval", "1000", "--required-batch-size-multiple", "1",
    ]


def fairseq_experiment(out: Path, data_dir: Path, size: dict[str, Any], seed: int) -> dict[str, Any]:
    from fairseq_cli import preprocess

    _quiet_fairseq()
    work = out / "fairseq"
    bin_dir = work / "data-bin"
    if not (bin_dir / "dict.en.txt").exists():
        argv = ["--source-lang", "en", "--target-lang", "de", "--trainpref", str(data_dir / "train"),
                "--validpref", str(data_dir / "valid"), "--testpref", str(data_dir / "test"),
                "--destdir", str(bin_dir), "--workers", "1"]
        old = sys.argv
        sys.argv = ["fairseq-preprocess", *argv]
        try:
            preprocess.cli_main()
        finally:
            sys.argv = old
    pre = work / f"pretrained-seed{seed}"
    start = time.time()
    with _fairseq_cli("train", [*_fairseq_common(bin_dir, pre, seed), *_role_flags("softmax", None),
                                "--lr", "0.003", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "100",
                                "--max-epoch", str(size["pre_epochs"]), "--disable-validation"]):
        pass
    pretrain_seconds = time.time() - start
    pretrained = pre / "checkpoint_last.pt"
    updates = size["updates"]
    interval = max(1, updates // size["evals"])
    results = {}
    for label, run in runs_of(updates).items():
        save = work / f"{label.replace(' ', '-').replace('(', '').replace(')', '')}-seed{seed}"
        # just after the switch: the pretrained weights with the mechanism of step 0
        step0 = run["spec"] if not run["schedule"] else "entmax:alpha=1"
        overrides = {f"{role}_attn": step0 for role in ROLES}
        with _fairseq_cli("validate", [str(bin_dir), "--task", "translation", "--user-dir", str(ROOT / "user_dir"),
                                       "--path", str(pretrained),
                                       "--cpu", "--num-workers", "0", "--max-tokens", "4000", "--criterion",
                                       "cross_entropy", "--log-format", "json", "--model-overrides",
                                       repr(overrides)]) as captured:
            pass
        curve = [{"step": 0, "valid_loss": round(float(captured.valid[-1]["loss"]) * math.log(2), 4)}]
        start = time.time()
        with _fairseq_cli("train", [*_fairseq_common(bin_dir, save, seed), *_role_flags(run["spec"], run["schedule"]),
                                    "--restore-file", str(pretrained), "--reset-optimizer", "--reset-dataloader",
                                    "--reset-meters", "--reset-lr-scheduler", "--lr", "0.0005",
                                    "--lr-scheduler", "fixed", "--max-update", str(updates),
                                    "--validate-interval-updates", str(interval), "--validate-interval", "1000",
                                    "--save-interval", "1000"]) as captured:
            pass
        seconds = time.time() - start
        for stats in captured.valid:
            step = int(stats["num_updates"])
            if not curve or curve[-1]["step"] != step:
                curve.append({"step": step, "valid_loss": round(float(stats["loss"]) * math.log(2), 4)})
        checkpoint = save / "checkpoint_last.pt"
        results[label] = {**run, "curve": curve, "finetune_seconds": round(seconds, 1),
                          **_fairseq_final(checkpoint, bin_dir, work)}
    return {"pretrain_seconds": round(pretrain_seconds, 1), "runs": results}


def _fairseq_final(checkpoint: Path, bin_dir: Path, work: Path) -> dict[str, Any]:
    """Greedy test BLEU / exact match (fairseq-generate: the schedule's end value) and the support on valid."""
    from fairseq import checkpoint_utils

    with _fairseq_cli("generate", [str(bin_dir), "--user-dir", str(ROOT / "user_dir"), "--path", str(checkpoint),
                                   "--gen-subset", "test", "--beam", "1", "--batch-size", "100",
                                   "--required-batch-size-multiple", "1", "--cpu", "--num-workers", "0"]) as captured:
        pass
    hyps, refs = {}, {}
    for line in captured.stdout.splitlines():  # type: ignore[attr-defined]
        head, _, rest = line.partition("\t")
        if head.startswith("H-"):
            hyps[int(head[2:])] = rest.split("\t", 1)[1]
        elif head.startswith("T-"):
            refs[int(head[2:])] = rest
    ids = sorted(refs)
    bleu, exact = bleu_and_exact([hyps.get(i, "") for i in ids], [refs[i] for i in ids])
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)],
                                                                    arg_overrides={"data": str(bin_dir)})
    model = models[0].eval()
    plugin.finish_schedules(model)
    task.load_dataset("valid")
    batches = task.get_batch_iterator(dataset=task.dataset("valid"), max_tokens=4000,
                                      required_batch_size_multiple=1).next_epoch_itr(shuffle=False)
    with torch.no_grad(), support_counter(model) as counts:
        for sample in batches:
            model(**sample["net_input"])
    return {"bleu": bleu, "exact_match": exact, "support": support_share(counts)}


# ----------------------------------------------------------------------------- transformers


class Vocab:
    """Word-level ids: <s>=0, <pad>=1, </s>=2, <unk>=3, then the corpus words."""

    def __init__(self, texts: list[str]) -> None:
        words = sorted({w for t in texts for w in t.split()})
        self.itos = ["<s>", "<pad>", "</s>", "<unk>", *words]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, 3) for w in text.split()] + [2]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.itos[i] for i in ids if i > 3)


def _batches(pairs, vocab, batch_size, shuffle_seed=None):
    order = list(range(len(pairs)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        chunk = [pairs[j] for j in order[i:i + batch_size]]
        src = [vocab.encode(s) for s, _ in chunk]
        tgt = [vocab.encode(t) for _, t in chunk]
        ids = torch.full((len(chunk), max(map(len, src))), 1)
        labels = torch.full((len(chunk), max(map(len, tgt))), -100)
        for r, (s, t) in enumerate(zip(src, tgt)):
            ids[r, :len(s)] = torch.tensor(s)
            labels[r, :len(t)] = torch.tensor(t)
        yield {"input_ids": ids, "attention_mask": (ids != 1).long(), "labels": labels}


@torch.no_grad()
def _hf_valid_loss(model, pairs, vocab) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for batch in _batches(pairs, vocab, 100):
        n = int((batch["labels"] != -100).sum())
        total += float(model(**batch).loss) * n
        tokens += n
    model.train()
    return round(total / tokens, 4)


def hf_experiment(out: Path, data: dict[str, list[tuple[str, str]]], size: dict[str, Any], seed: int) -> dict[str, Any]:
    import transformers

    import hf_models

    transformers.logging.set_verbosity_error()  # the load report lists the new schedule_step buffers
    transformers.utils.logging.disable_progress_bar()

    vocab = Vocab([t for pairs in data.values() for p in pairs for t in p])
    config = hf_models.SparseBartConfig(
        vocab_size=len(vocab.itos), pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        forced_eos_token_id=None, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64,
        dropout=0.1, attention_dropout=0.0, scale_embedding=True,
    )
    torch.manual_seed(seed)
    model = hf_models.SparseBartForConditionalGeneration(config)
    start = time.time()
    _hf_train(model, data["train"], vocab, epochs=size["hf_pre_epochs"], lr=1e-3, seed=seed)
    pretrain_seconds = time.time() - start
    pretrained = out / "hf" / f"pretrained-seed{seed}"
    model.save_pretrained(pretrained)
    updates = size["updates"]
    interval = max(1, updates // size["evals"])
    results = {}
    for label, run in runs_of(updates).items():
        fields = {f"{role}_attn": run["spec"] for role in ROLES}
        if run["schedule"]:
            fields |= {f"{role}_attn_schedule": run["schedule"] for role in ROLES}
        tuned = hf_models.SparseBartForConditionalGeneration.from_pretrained(pretrained, **fields)
        curve = [{"step": 0, "valid_loss": _hf_valid_loss(tuned, data["valid"], vocab)}]
        start = time.time()
        _hf_train(tuned, data["train"], vocab, max_updates=updates, lr=5e-4, seed=seed,
                  on_update=lambda step, m=tuned, c=curve: c.append(
                      {"step": step, "valid_loss": _hf_valid_loss(m, data["valid"], vocab)}) if step % interval == 0
                  else None)
        seconds = time.time() - start
        hf_models.finish_schedules(tuned)  # inference with the end value
        tuned.eval()
        hyps, refs = [], []
        with torch.no_grad():
            for batch in _batches(data["test"], vocab, 100):
                gen = tuned.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     num_beams=1, do_sample=False, max_new_tokens=24)
                hyps += [vocab.decode(g.tolist()) for g in gen]
                refs += [vocab.decode([t for t in row.tolist() if t >= 0]) for row in batch["labels"]]
            with support_counter(tuned) as counts:
                for batch in _batches(data["valid"], vocab, 100):
                    tuned(**batch)
        bleu, exact = bleu_and_exact(hyps, refs)
        results[label] = {**run, "curve": curve, "finetune_seconds": round(seconds, 1), "bleu": bleu,
                          "exact_match": exact, "support": support_share(counts)}
    return {"pretrain_seconds": round(pretrain_seconds, 1), "runs": results}


def _hf_train(model, pairs, vocab, lr, seed, epochs=None, max_updates=None, warmup=0, on_update=None) -> None:
    """Adam on batches of 32 sentences; ``plugin.set_schedule_step`` before every update (hand-written loop)."""
    import hf_models

    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
    torch.manual_seed(seed)
    step, epoch = 0, 0
    while (epochs is None or epoch < epochs) and (max_updates is None or step < max_updates):
        for batch in _batches(pairs, vocab, 32, shuffle_seed=seed * 1000 + epoch):
            hf_models.set_schedule_step(model, step)
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if on_update is not None:
                on_update(step)
            if max_updates is not None and step >= max_updates:
                break
        epoch += 1


# ----------------------------------------------------------------------------- report


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summarize(results: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per ecosystem and run: the mean over seeds of step-0 loss, the loss at the end of annealing, final numbers."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for eco in ("fairseq", "hf"):
        seeds = [s for s in results["seeds"] if eco in s]
        if not seeds:
            continue
        table[eco] = {}
        for label in seeds[0][eco]["runs"]:
            runs = [s[eco]["runs"][label] for s in seeds]
            curve = runs[0]["curve"]
            row: dict[str, Any] = {"spec": runs[0]["spec"], "schedule": runs[0]["schedule"]}
            for i, point in enumerate(curve):
                row[f"loss@{point['step']}"] = round(_mean([r["curve"][i]["valid_loss"] for r in runs]), 4)
            row["max_loss_after_0"] = round(_mean([max(p["valid_loss"] for p in r["curve"][1:]) for r in runs]), 4)
            row["bleu"] = round(_mean([r["bleu"] for r in runs]), 2)
            row["bleu_per_seed"] = [r["bleu"] for r in runs]
            row["exact_match"] = round(_mean([r["exact_match"] for r in runs]), 4)
            row["support"] = {role: round(_mean([r["support"][role] for r in runs]), 4) for role in runs[0]["support"]}
            table[eco][label] = row
    return table


def write_report(out: Path, results: dict[str, Any]) -> Path:
    table = summarize(results)
    lines = [
        "# Sparsifying a pretrained softmax model: abrupt switch vs. annealed alpha",
        "",
        f"Command: `{results['command']}`; {len(results['seeds'])} seed(s); size `{results['size']}` "
        f"({results['sizes']['train']} training sentences, {results['sizes']['updates']} fine-tuning updates, "
        f"annealing `linear:start=1,steps={max(1, results['sizes']['updates'] // 2)}` in every role); "
        f"{results['seconds']:.0f} s on this machine ({os.cpu_count()} CPU cores, shared).",
        "",
        "Validation loss: nats per target token with teacher forcing, computed with the mechanism in use at "
        "that step (annealed runs: the intermediate alpha). Step 0 is the pretrained softmax model right after "
        "the switch, before any update. BLEU / exact match: greedy decoding of the test set with the end value. "
        "Support: share of the allowed keys with a nonzero weight (validation set, every query).",
        "",
    ]
    for eco, rows in table.items():
        name = {"fairseq": "fairseq (fairseq-train flags)", "hf": "transformers (SparseBart, hand-written loop)"}[eco]
        steps = [k for k in next(iter(rows.values())) if k.startswith("loss@")]
        lines += [f"## {name}", "",
                  "| run | " + " | ".join(f"loss @{s[5:]}" for s in steps) +
                  " | worst after step 0 | BLEU (per seed) | exact | support enc / dec / cross |",
                  "|---" * (len(steps) + 5) + "|"]
        for label, row in rows.items():
            support = " / ".join(f"{100 * row['support'].get(r, float('nan')):.0f}%" for r in ROLES)
            lines.append(f"| {label} | " + " | ".join(f"{row[s]:.4f}" for s in steps) +
                         f" | {row['max_loss_after_0']:.4f} | {row['bleu']:.1f} "
                         f"({', '.join(f'{b:.1f}' for b in row['bleu_per_seed'])}) | {100 * row['exact_match']:.0f}% |"
                         f" {support} |")
        lines += ["", _findings(rows), ""]
    lines += ["![validation loss during fine-tuning](sparsify.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _findings(rows: dict[str, dict[str, Any]]) -> str:
    """Plain words, computed from the numbers (whatever they show)."""
    control = rows["softmax (control)"]
    said = [f"The softmax control ends at BLEU {control['bleu']:.1f}."]
    for name in TARGETS:
        abrupt, annealed = rows[f"{name} abrupt"], rows[f"{name} annealed"]
        jump = abrupt["loss@0"] - control["loss@0"]
        said.append(
            f"{name}: the abrupt switch moves the validation loss at step 0 from {control['loss@0']:.4f} to "
            f"{abrupt['loss@0']:.4f} ({jump:+.4f}); annealing starts at softmax ({annealed['loss@0']:.4f}) and its "
            f"worst loss after step 0 is {annealed['max_loss_after_0']:.4f} against {abrupt['max_loss_after_0']:.4f} "
            f"abrupt. Final BLEU: annealed {annealed['bleu']:.1f}, abrupt {abrupt['bleu']:.1f} "
            f"({annealed['bleu'] - abrupt['bleu']:+.1f}); final support of the cross-attention: annealed "
            f"{100 * annealed['support']['cross']:.0f}%, abrupt {100 * abrupt['support']['cross']:.0f}%."
        )
    return " ".join(said)


def plot(out: Path, results: dict[str, Any]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ecos = [e for e in ("fairseq", "hf") if e in results["seeds"][0]]
    fig, axes = plt.subplots(len(ecos), len(TARGETS), figsize=(5.5 * len(TARGETS), 3.6 * len(ecos)), squeeze=False)
    anneal_end = max(1, results["sizes"]["updates"] // 2)
    for i, eco in enumerate(ecos):
        for j, name in enumerate(TARGETS):
            ax = axes[i][j]
            for label, style in ((f"{name} abrupt", "-o"), (f"{name} annealed", "-s"), ("softmax (control)", "--")):
                for k, seed in enumerate(results["seeds"]):
                    curve = seed[eco]["runs"][label]["curve"]
                    ax.plot([p["step"] for p in curve], [p["valid_loss"] for p in curve], style, markersize=3,
                            color={"abrupt": "C3", "annealed": "C0"}.get(label.split()[-1], "gray"),
                            alpha=0.9 if k == 0 else 0.45, label=label if k == 0 else None)
            ax.axvline(anneal_end, color="C0", linestyle=":", linewidth=1)
            ax.set_title(f"{'fairseq' if eco == 'fairseq' else 'transformers'}: softmax -> {name}")
            ax.set_xlabel("fine-tuning update")
            ax.set_ylabel("validation loss (nats/token)")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "sparsify.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_pairs(out: Path, n_train: int, n_valid: int, n_test: int, max_number: int, seed: int = 1) -> None:
    """``{train,valid,test}.{en,de}``: cardinal numbers 1..max_number in words, disjoint across splits.

    The words come from scripts/number_corpus.py (German split into morphemes, so the word order
    differs from English: "twenty three" -> "drei und zwanzig").
    """
    from number_corpus import words

    rng = random.Random(seed)
    numbers = rng.sample(range(1, max_number + 1), n_train + n_valid + n_test)
    splits = {"train": numbers[:n_train], "valid": numbers[n_train:n_train + n_valid],
              "test": numbers[n_train + n_valid:]}
    out.mkdir(parents=True, exist_ok=True)
    for split, nums in splits.items():
        for lang in ("en", "de"):
            (out / f"{split}.{lang}").write_text("".join(words(n, lang) + "\n" for n in nums), encoding="utf-8")


def _read_pairs(data_dir: Path) -> dict[str, list[tuple[str, str]]]:
    return {split: list(zip((data_dir / f"{split}.en").read_text().splitlines(),
                            (data_dir / f"{split}.de").read_text().splitlines()))
            for split in ("train", "valid", "test")}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/sparsify", help="output folder (default: outputs/sparsify)")
    ap.add_argument("--size", choices=sorted(SIZES), default="default", help="tiny: a smoke run of about a minute")
    ap.add_argument("--seeds", type=int, default=1, help="pretrain + fine-tune with this many seeds (default 1)")
    ap.add_argument("--only", choices=("fairseq", "hf"), help="run one ecosystem only")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = SIZES[args.size]
    data_dir = out / "corpus"
    make_pairs(data_dir, size["train"], size["valid"], size["test"], size["max_number"])
    pairs = _read_pairs(data_dir)
    start = time.time()
    results: dict[str, Any] = {"command": "scripts/sparsify_pretrained.py " + " ".join(argv or sys.argv[1:]),
                               "size": args.size, "sizes": size, "seeds": []}
    for seed in range(1, args.seeds + 1):
        per_seed: dict[str, Any] = {"seed": seed}
        if args.only in (None, "fairseq"):
            per_seed["fairseq"] = fairseq_experiment(out, data_dir, size, seed)
        if args.only in (None, "hf"):
            per_seed["hf"] = hf_experiment(out, pairs, size, seed)
        results["seeds"].append(per_seed)
    results["seconds"] = round(time.time() - start, 1)
    results["summary"] = summarize(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    report = write_report(out, results)
    plot(out, results)
    print(report.read_text(encoding="utf-8"))
    return results


if __name__ == "__main__":
    main()
