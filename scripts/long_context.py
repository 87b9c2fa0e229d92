"""Length extrapolation: train tiny decoder-only models on short sequences, test them on long ones.

    python scripts/long_context.py                  # the default run (24 CPU-min of jobs, 2 processes)
    python scripts/long_context.py --size tiny      # a smoke run (seconds)
    python scripts/long_context.py --publish        # copy the last run's tables and plots into docs/

Following Vasylenko et al., "Long-Context Generalization with Sparse Attention" (ICLR 2026):
each task of scripts/long_context_tasks.py is learned at lengths <= 64 and tested at 64, 128,
..., up to 4096 (the default size). The mechanisms compared are softmax, scalable softmax
(Nakanishi, 2025: scores scaled by s log n), 1.5-entmax and scalable 1.5-entmax, each a spec
string of the core registry, with two positional schemes: NoPE (no position information but
the causal mask) and ALiBi (``plugin.positions``). For each task, mechanism, scheme and seed the
script reports exact match (every target token right) and per-token accuracy per test length,
and the dispersion of the last layer's attention at the query that gives the first answer
token: its entropy and its support (the number of keys with nonzero weight).

Exact match is computed in one forward pass with the true target as the decoder input (teacher
forcing). It equals greedy decoding's exact match: if every teacher-forced prediction is right,
greedy decoding reads the same inputs and makes the same predictions, and if one is wrong,
greedy decoding writes that wrong token at the first such position.

The model is a plain pre-LayerNorm transformer decoder built on the core's modules
(``plugin.AttentionMechanism``, ``plugin.positions.ALiBiAttentionMechanism``), the fastest of
the project's routes on a CPU; the same specs and positions run in fairseq
(``--positions nope|alibi``) and transformers (``hf_models.positional``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT), str(ROOT / "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import long_context_tasks as tasks  # noqa: E402

MECHANISMS = [
    ("softmax", "softmax"),
    ("scalable softmax", "scalable_softmax"),
    ("1.5-entmax", "entmax:alpha=1.5"),
    ("scalable 1.5-entmax", "scalable_entmax:alpha=1.5"),
]

# per task: its parameters (the paper's, made smaller where a tiny model on a CPU needs it), the
# training length (seq_len +- vary_len, the paper's 48 +- 16), the model and the training budget
TASK_SETTINGS: dict[str, dict[str, Any]] = {
    "flip_flop": dict(params=dict(write_prob=0.1), seq_len=48, vary_len=16, layers=2, steps=600, lr=3e-3),
    "mqmtar": dict(params=dict(abc_size=64, vocab_size=64, k_len=1, v_len=1, num_kv=0.8, num_q=4),
                   seq_len=48, vary_len=16, layers=2, steps=1000, lr=3e-3),
    "local_count": dict(params=dict(vocab_size=16, max_reps=12), seq_len=48, vary_len=16, layers=2, steps=600,
                        lr=3e-3),
    "copy": dict(params=dict(vocab_size=16), seq_len=24, vary_len=8, layers=2, steps=1200, lr=3e-3),
}

SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(tasks=("flip_flop", "local_count"), seeds=1, lengths=(64, 128), step_factor=0.02, eval_n=8,
                 positions=("nope", "alibi"), d_model=32, heads=2),
    "default": dict(tasks=("flip_flop", "mqmtar"), seeds=2,
                    lengths=(64, 128, 256, 512, 1024, 2048, 4096), step_factor=1.0, eval_n=64,
                    positions=("alibi", "nope"), d_model=64, heads=4),
}

BATCH = 32


def eval_count(length: int, eval_n: int) -> int:
    """Test examples at ``length``: ``eval_n`` up to 512 tokens, fewer beyond (time grows with length^2)."""
    return max(8, min(eval_n, eval_n * 512 // length)) if length > 512 else eval_n


def eval_batch(length: int) -> int:
    return max(1, min(32, (1 << 20) // (length * length) * 4))


# ----------------------------------------------------------------------------- the model


def build_model(spec: str, positions: str, vocab_in: int, vocab_out: int, d_model: int, heads: int, layers: int):
    from torch import nn

    import plugin
    from plugin.positions import ALiBiAttentionMechanism, check_positions

    check_positions(positions, ("nope", "alibi"))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
            self.qkv = nn.Linear(d_model, 3 * d_model)
            self.out = nn.Linear(d_model, d_model)
            self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
            if positions == "alibi":
                self.mech = ALiBiAttentionMechanism(spec, num_heads=heads, role="decoder")
            else:
                self.mech = plugin.AttentionMechanism(spec, num_heads=heads, role="decoder")
            self.probe: int | None = None  # a query row whose weights are recorded (last layer)
            self.probed: Any = None

        def forward(self, x, keep_from: int = 0):
            """``keep_from``: compute only the query rows from there on (the last rows; keys from every row)."""
            B, L, _ = x.shape
            h = self.ln1(x)
            wq, wk, wv = self.qkv.weight.split(d_model)
            bq, bk, bv = self.qkv.bias.split(d_model)
            q = nn.functional.linear(h[:, keep_from:], wq, bq).view(B, L - keep_from, heads, -1).transpose(1, 2)
            k = nn.functional.linear(h, wk, bk).view(B, L, heads, -1).transpose(1, 2)
            v = nn.functional.linear(h, wv, bv).view(B, L, heads, -1).transpose(1, 2)
            x = x[:, keep_from:]
            att = self.mech(q, k, v, causal=True)  # queries are the last rows: causal aligns them bottom-right
            x = x + self.out(att.transpose(1, 2).reshape(B, L - keep_from, d_model))
            if self.probe is not None:
                row = self.probe - keep_from
                _, w = self.mech(q[:, :, row:row + 1], k[:, :, :self.probe + 1], v[:, :, :self.probe + 1],
                                 return_weights=True)
                self.probed = w[:, :, 0]  # (B, H, probe + 1)
            return x + self.mlp(self.ln2(x))

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab_in, d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.ln = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, vocab_out)

        def forward(self, tokens, keep_from: int = 0):
            """Logits (B, L - keep_from, vocab_out) of the positions from ``keep_from`` on."""
            x = self.embed(tokens)
            for i, block in enumerate(self.blocks):
                x = block(x, keep_from if i == len(self.blocks) - 1 else 0)
            return self.head(self.ln(x))

    return Decoder()


# ----------------------------------------------------------------------------- data


class Data:
    """Batches of one task as decoder inputs, target ids and the positions that predict them."""

    def __init__(self, task: str, params: dict[str, Any], seed: int) -> None:
        self.task, self.params = task, params
        self.rng = np.random.default_rng(seed)
        table_rng = np.random.default_rng(1234)  # one pair table for training and testing
        self.table = (tasks.KeyValueTable(table_rng, params["abc_size"], params["vocab_size"], params["k_len"],
                                          params["v_len"]) if task == "mqmtar" else None)
        self.vocab = tasks.vocab(task, **params)
        self.sep = self.vocab  # the separator between source and target
        self.pad = self.vocab + 1
        self.vocab_in = self.vocab + 2
        self.labeling = tasks.layout(task) == "labeling"

    def batch(self, n: int, seq_len: int, vary_len: int):
        """``(tokens (n, T), targets (n, T), weight (n, T))``: ``weight`` 1 where a target is predicted."""
        import torch

        rows = [tasks.sample(self.task, self.rng, seq_len, vary_len, table=self.table, **self.params)
                for _ in range(n)]
        if self.labeling:
            inputs = [src for src, _ in rows]
            targets = [tgt for _, tgt in rows]
            starts = [0] * n
        else:
            inputs = [src + [self.sep] + tgt[:-1] for src, tgt in rows]
            targets = [tgt for _, tgt in rows]
            starts = [len(src) for src, _ in rows]  # the separator predicts the first target token
        T = max(len(x) for x in inputs)
        tokens = torch.full((n, T), self.pad, dtype=torch.long)
        tgt = torch.zeros((n, T), dtype=torch.long)
        weight = torch.zeros((n, T))
        for r, (x, y, s) in enumerate(zip(inputs, targets, starts)):
            tokens[r, :len(x)] = torch.tensor(x)
            tgt[r, s:s + len(y)] = torch.tensor(y)
            weight[r, s:s + len(y)] = 1.0
        return tokens, tgt, weight, starts


# ----------------------------------------------------------------------------- one job


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Train one model and test it at every length; the result as a JSON-able dict."""
    import torch

    torch.set_num_threads(1)
    t0, c0 = time.time(), time.process_time()
    setting = TASK_SETTINGS[job["task"]]
    torch.manual_seed(job["seed"])
    data = Data(job["task"], tasks.params_of(job["task"], **setting["params"]), job["seed"])
    model = build_model(job["spec"], job["positions"], data.vocab_in, max(data.vocab, 1), job["d_model"],
                        job["heads"], setting["layers"])
    steps = max(2, int(setting["steps"] * job["step_factor"]))
    opt = torch.optim.AdamW(model.parameters(), lr=setting["lr"], weight_decay=0.0)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    losses = []
    model.train()
    for _ in range(steps):
        tokens, tgt, weight, _ = data.batch(BATCH, setting["seq_len"], setting["vary_len"])
        logits = model(tokens)
        loss = (torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none") * weight).sum()
        loss = loss / weight.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    train_time = time.time() - t0

    model.eval()
    per_length = {}
    test_rng_seed = 10_000 + job["seed"]
    data.rng = np.random.default_rng(test_rng_seed)
    last = model.blocks[-1]
    for length in job["lengths"]:
        n, bs = eval_count(length, job["eval_n"]), eval_batch(length)
        exact = tokens_right = tokens_all = 0
        entropy, support, probed = [], [], 0
        with torch.no_grad():
            done = 0
            while done < n:
                tokens, tgt, weight, starts = data.batch(min(bs, n - done), length, 0)
                # dispersion at the query of the first answer token (labeling: the last position)
                row = min(starts) if not data.labeling else int(weight.sum(1).min()) - 1
                if probed < 16 and len(set(starts)) <= 1:
                    last.probe = row
                keep = row if not data.labeling else 0  # the last layer computes the answer rows only
                pred = torch.cat([torch.zeros_like(tokens[:, :keep]), model(tokens, keep).argmax(-1)], 1)
                if last.probe is not None:
                    w = last.probed.clamp_min(0)
                    entropy += (-(w * torch.log(w.clamp_min(1e-30))).sum(-1)).mean(1).tolist()
                    support += (w > 0).sum(-1).float().mean(1).tolist()
                    probed += w.shape[0]
                    last.probe = None
                ok = (pred == tgt) | (weight == 0)
                exact += int(ok.all(-1).sum())
                tokens_right += int(((pred == tgt) & (weight > 0)).sum())
                tokens_all += int(weight.sum())
                done += tokens.shape[0]
        per_length[str(length)] = dict(
            exact=exact / n, token_acc=tokens_right / max(tokens_all, 1), n=n,
            entropy=float(np.mean(entropy)) if entropy else None,
            support=float(np.mean(support)) if support else None, keys=int(row + 1),
        )
        if length <= job.get("greedy_check_max", 256) and not data.labeling:
            per_length[str(length)]["greedy"] = greedy_check(model, data, length, job.get("greedy_n", 16))
    return dict(job, final_loss=float(np.mean(losses[-20:])), train_time=train_time,
                total_time=time.time() - t0, cpu_time=time.process_time() - c0, steps=steps, results=per_length)


def greedy_decode(model, source: list[int], sep: int, steps: int) -> list[int]:
    """Greedy decoding of ``steps`` tokens after ``source`` and the separator (no cache: a full pass per token)."""
    import torch

    tokens = list(source) + [sep]
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([tokens])).argmax(-1)[0, -1])
            out.append(nxt)
            tokens.append(nxt)
    return out


def greedy_check(model, data: Data, length: int, n: int) -> dict[str, float]:
    """Exact match by greedy decoding and by teacher forcing on the same ``n`` fresh examples, and how often
    the two verdicts agree (they must, always: see the module docstring)."""
    import torch

    rng = np.random.default_rng(777 + length)
    agree = greedy_right = forced_right = 0
    for _ in range(n):
        src, tgt = tasks.sample(data.task, rng, length, 0, table=data.table, **data.params)
        decoded = greedy_decode(model, src, data.sep, len(tgt))
        with torch.no_grad():
            forced = model(torch.tensor([src + [data.sep] + tgt[:-1]])).argmax(-1)[0, len(src):].tolist()
        g, f = decoded == tgt, forced == tgt
        greedy_right += g
        forced_right += f
        agree += g == f
    return dict(n=n, greedy_exact=greedy_right / n, forced_exact=forced_right / n, agree=agree / n)


# ----------------------------------------------------------------------------- the run


def available(spec: str) -> str | None:
    """None if ``spec`` parses in this checkout's registry, else the reason."""
    import plugin

    try:
        plugin.parse_spec(spec)
    except ValueError as err:
        return str(err)
    return None


def plugin_canonical(spec: str) -> str:
    import plugin

    return plugin.canonical_spec(spec)


def plan(size: str, seeds: int | None, only: list[str] | None) -> tuple[list[dict[str, Any]], list[str]]:
    cfg = SIZES[size]
    jobs, notes = [], []
    mechanisms = []
    for label, spec in MECHANISMS:
        reason = available(spec)
        if reason is not None:
            if not spec.startswith("scalable_"):
                raise ValueError(f"mechanism {spec!r} is not available: {reason}")
            notes.append(f"{label} ({spec}) is not in this checkout's registry and was not run: {reason}")
            print(f"NOTE: {notes[-1]}", flush=True)
            continue
        mechanisms.append((label, spec))
    for task in cfg["tasks"]:
        if only and task not in only:
            continue
        for positions in cfg["positions"]:
            for label, spec in mechanisms:
                for seed in range(1, (seeds or cfg["seeds"]) + 1):
                    jobs.append(dict(task=task, positions=positions, label=label, spec=spec, seed=seed,
                                     lengths=list(cfg["lengths"]), step_factor=cfg["step_factor"],
                                     eval_n=cfg["eval_n"], d_model=cfg["d_model"], heads=cfg["heads"]))
    return jobs, notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="default")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "long_context"))
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (one torch thread each)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma-separated tasks")
    ap.add_argument("--positions", default=None, help="comma-separated positional schemes to run (default: the size's)")
    ap.add_argument("--mechanisms", default=None,
                    help="comma-separated specs of MECHANISMS to run (default: all of them)")
    ap.add_argument("--append", action="store_true",
                    help="merge into --out's results.json (runs of the same task, positions, spec and seed replaced)")
    ap.add_argument("--publish", action="store_true", help="copy the run in --out into docs/ (no training)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.publish:
        import long_context_report

        long_context_report.publish(out, ROOT / "docs")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    jobs, notes = plan(args.size, args.seeds, args.only.split(",") if args.only else None)
    if args.mechanisms:
        chosen = [plugin_canonical(x) for x in args.mechanisms.split(",")]
        known = [plugin_canonical(spec) for _, spec in MECHANISMS if available(spec) is None]
        bad = [x for x in chosen if x not in known]
        if bad:
            raise ValueError(f"--mechanisms: {', '.join(bad)} not among the available ones: {', '.join(known)}")
        jobs = [j for j in jobs if plugin_canonical(j["spec"]) in chosen]
    if args.positions:
        jobs = [j for j in jobs if j["positions"] in args.positions.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.time()
    results = []
    print(f"{len(jobs)} jobs on {args.jobs} processes", flush=True)
    if args.jobs <= 1:
        for job in jobs:
            results.append(run_job(job))
            _progress(results[-1], len(results), len(jobs), t0)
    else:
        with ProcessPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_job, job) for job in jobs]
            for fut in as_completed(futures):
                results.append(fut.result())
                _progress(results[-1], len(results), len(jobs), t0)
    import long_context_report
    import torch

    import plugin

    phase = dict(started=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)), wall_s=time.time() - t0,
                 jobs=len(results), specs=sorted({r["spec"] for r in results}), load=os.getloadavg())
    phases = [phase]
    if args.append and (out / "results.json").exists():
        before = json.loads((out / "results.json").read_text())
        def key(r: dict[str, Any]) -> tuple[Any, ...]:
            return r["task"], r["positions"], r["spec"], r["seed"]

        new = {key(r) for r in results}
        results = [r for r in before["results"] if key(r) not in new] + results
        phases = before.get("phases", []) + phases
        # a mechanism run now is no longer missing
        notes = [n for n in notes if not any(f"({r['spec']})" in n for r in results)]
    run = dict(size=args.size, jobs=args.jobs, wall_s=sum(p["wall_s"] for p in phases), phases=phases,
               job_wall_s=sum(r["total_time"] for r in results), cpu_s=sum(r.get("cpu_time", 0) for r in results),
               notes=notes, torch=torch.__version__,
               python=sys.version.split()[0], plugin=plugin.__version__, cores=os.cpu_count(),
               settings={t: TASK_SETTINGS[t] for t in SIZES[args.size]["tasks"]}, config=SIZES[args.size],
               results=results)
    (out / "results.json").write_text(json.dumps(run, indent=1))
    long_context_report.write_report(run, out)
    print(f"wrote {out / 'report.md'} ({run['wall_s'] / 60:.1f} min)")
    return 0


def _progress(r: dict[str, Any], done: int, total: int, t0: float) -> None:
    accs = " ".join(f"{k}:{v['exact']:.2f}" for k, v in r["results"].items())
    print(f"[{done}/{total} {time.time() - t0:5.0f}s] {r['task']} {r['positions']} {r['spec']} seed {r['seed']}: "
          f"loss {r['final_loss']:.3f}, {r['total_time']:.0f}s | {accs}", flush=True)


if __name__ == "__main__":
    shutil.os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
