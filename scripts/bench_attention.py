"""Attention benchmark: every registered variant next to torch SDPA and the entmax package, same run.

For each method, sequence length L and dtype it measures the forward time (no grad), the
forward+backward time, and the peak memory of a forward+backward, on q, k, v of shape
(B, H, L, D). Methods:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (softmax); on CUDA also
  ``sdpa_flash`` (the flash backend forced);
- every variant registered in :func:`plugin.variants` through :func:`plugin.attention`
  (automatic path: the fast path where there is one), and for the variants with a fast path
  also their ``reference`` path (``plugin.reference_path()``); ``entmax`` is run as
  ``entmax:alpha=1.3`` and ``entmax:alpha=learned``;
- ``entmax-pkg ...``: scores -> ``entmax.sparsemax`` / ``entmax.entmax15`` /
  ``entmax.entmax_bisect(alpha=1.3)`` -> weights @ v (the entmax package route);
- on CUDA, ``adasplash`` (``import adasplash``) when it is installed;
- with ``--compile``, SDPA and every ``plugin`` method (automatic path) also wrapped in
  ``torch.compile(fullgraph=True)`` (``--compile-backend``, default inductor), as
  ``"<method> [compiled]"``; compilation happens in warm-up calls at the measured shapes
  (forward and forward+backward) before memory and time are measured.

Memory. CUDA: ``torch.cuda.max_memory_allocated`` minus the memory in use before the call.
CPU: every (method, L, dtype) runs in a fresh subprocess; the peak is the growth of the
process's maximum resident set size (``resource.getrusage(...).ru_maxrss``) over one
forward+backward, measured after the inputs exist, everything is imported and one tiny
(L = 32) call has run (so thread pools and kernel loading are not counted, and no earlier
large run has raised the maximum). This is physical memory: it includes allocator slack
and excludes nothing PyTorch allocates.

Timing: ``--repeat`` runs after one warm-up (one run when the warm-up took over 2 s); the
median is reported (``--stat min`` for the minimum, steadier on a shared machine).
Configurations predicted to take longer than ``--max-seconds`` or to need more than half of
the free memory (from the previous length, assuming quadratic growth; for methods that
materialize L x L matrices also from their size) are skipped with a note. ``--plot`` writes a log-log figure of
forward+backward time (and peak memory) vs L.

Examples::

    python scripts/bench_attention.py --quick
    python scripts/bench_attention.py --lengths 256 1024 4096 16384 --markdown out.md --plot docs/bench.png
    python scripts/bench_attention.py --device cuda --dtypes float16 bfloat16 --lengths 1024 4096 16384
    python scripts/bench_attention.py --compile --lengths 1024 --exclude reference entmax-pkg
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# ----------------------------------------------------------------------------- methods


COMPILED = " [compiled]"


def method_names(device: str, compiled: bool = False) -> list[str]:
    """All methods of the suite for ``device``, in table order (with ``compiled``: also the compiled ones)."""
    import plugin

    names = ["sdpa"] + (["sdpa" + COMPILED] if compiled else [])
    if device == "cuda":
        names.append("sdpa_flash")
    for name in plugin.variants():
        specs = ["entmax:alpha=1.3", "entmax:alpha=learned"] if name == "entmax" else [name]
        for spec in specs:
            names.append(f"plugin {spec}")
            if compiled:
                names.append(f"plugin {spec}{COMPILED}")
            if has_fast_path(spec, device):
                names.append(f"plugin {spec} [reference]")
    names += ["entmax-pkg sparsemax", "entmax-pkg entmax15", "entmax-pkg bisect alpha=1.3"]
    if device == "cuda":
        names += ["adasplash alpha=2", "adasplash alpha=1.5", "adasplash alpha=1.3"]
    return names


def has_fast_path(spec: str, device: str = "cpu") -> bool:
    """Whether ``spec`` takes a path other than the reference on ``device`` (probed with a tiny call)."""
    import plugin

    try:
        mech = plugin.AttentionMechanism(spec, num_heads=1).to(device)
    except ValueError:
        return False
    if device == "cuda" and not torch.cuda.is_available():
        return False
    q = torch.randn(1, 1, 4, 8, device=device)
    with plugin.record_calls() as calls, torch.no_grad():
        mech(q, q, q)
    return calls[0].path != "reference"


def materializes_scores(name: str) -> bool:
    """Methods that hold (B, H, L, L) matrices (used to predict memory)."""
    if name.startswith(("sdpa", "adasplash")):
        return False
    name = name.removesuffix(COMPILED)
    fast = name.startswith("plugin ") and not name.endswith("[reference]") and has_fast_path(name.split(" ", 1)[1])
    return not fast


def build(name: str, B: int, H: int, L: int, D: int, dtype: torch.dtype, device: str,
          compile_backend: str = "inductor") -> Callable[..., torch.Tensor]:
    """A function ``f(q, k, v) -> out`` for method ``name``."""
    import torch.nn.functional as F

    if name.endswith(COMPILED):
        fn = build(name.removesuffix(COMPILED), B, H, L, D, dtype, device)
        return torch.compile(fn, fullgraph=True, backend=compile_backend)
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if name == "sdpa_flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v)

        return flash
    if name.startswith("plugin "):
        import plugin
        from plugin import kernels

        spec = name.split(" ")[1]
        mech = plugin.AttentionMechanism(spec, num_heads=H).to(device)
        if name.endswith("[reference]"):
            def reference(q, k, v):
                with kernels.reference_path():
                    return mech(q, k, v)

            return reference
        return lambda q, k, v: mech(q, k, v)
    if name.startswith("entmax-pkg"):
        import entmax

        fn = {
            "sparsemax": lambda s: entmax.sparsemax(s, dim=-1),
            "entmax15": lambda s: entmax.entmax15(s, dim=-1),
            "bisect": lambda s: entmax.entmax_bisect(s, alpha=1.3, dim=-1),
        }[name.split(" ")[1]]
        scale = 1.0 / math.sqrt(D)

        def package(q, k, v):
            scores = (q @ k.transpose(-1, -2)) * scale
            return fn(scores.float()).to(v.dtype) @ v

        return package
    if name.startswith("adasplash"):
        import adasplash

        alpha = float(name.split("=")[1])
        return lambda q, k, v: adasplash.adasplash(q, k, v, alpha=alpha, is_causal=False)
    raise ValueError(f"unknown method {name!r}")


# ----------------------------------------------------------------------------- one measurement


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def measure(name: str, B: int, H: int, L: int, D: int, dtype_name: str, device: str, repeat: int,
            compile_backend: str = "inductor") -> dict[str, Any]:
    """Time and memory of one (method, L, dtype); CPU memory is meaningful in a fresh process only."""
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    try:
        fn = build(name, B, H, L, D, dtype, device, compile_backend)
    except ImportError as exc:
        return {"status": f"not installed ({exc.name})"}
    # one tiny call first: one-time set-up (thread pools, kernel loading) is not counted as peak
    tiny = [torch.randn(1, H, 32, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
    t_tiny = time.perf_counter()
    try:
        fn(*tiny).sum().backward()
    except ImportError as exc:
        return {"status": f"not installed ({exc.name})"}
    t_tiny = time.perf_counter() - t_tiny
    del tiny
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, L, D, device=device, dtype=dtype)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def forward() -> None:
        with torch.no_grad():
            fn(q, k, v)
        sync()

    def forward_backward() -> None:
        out = fn(q, k, v)
        out.backward(grad)
        q.grad = k.grad = v.grad = None
        sync()

    result: dict[str, Any] = {"status": "ok"}
    try:
        if name.endswith(COMPILED):  # compile for the measured shapes first (no grad, and with grad)
            t0 = time.perf_counter()
            forward()
            forward_backward()
            result["compile_s"] = time.perf_counter() - t0 + t_tiny  # with the tiny call's compilation
        if device == "cuda":
            forward_backward()  # warm-up: compilation / autotuning
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            forward_backward()
            result["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            base = _maxrss_bytes()
            forward_backward()
            result["peak_mib"] = (_maxrss_bytes() - base) / 2**20
        for key, f in (("fwd_ms", forward), ("fwdbwd_ms", forward_backward)):
            t0 = time.perf_counter()
            f()  # warm-up
            # long runs (over 2 s) are timed once: their noise is small next to their length
            runs = repeat if time.perf_counter() - t0 < 2.0 else 1
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                f()
                times.append((time.perf_counter() - t0) * 1e3)
            result[key] = times
    except (RuntimeError, MemoryError) as exc:  # out of memory and the like: reported, not hidden
        result = {"status": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}
    return result


def measure_in_subprocess(config: dict[str, Any], timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(config)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"failed (exit {done.returncode}): {tail[:160]}"}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- the suite


def machine_description(device: str) -> dict[str, str]:
    import plugin

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "plugin": plugin.__version__,
        "platform": platform.platform(),
        "threads": str(torch.get_num_threads()),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        info["cores"] = str(os.cpu_count())
    except OSError:
        pass
    if hasattr(os, "getloadavg"):  # other work on the machine shows in the timings
        info["load average (1, 5, 15 min)"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    for module in ("entmax", "triton", "adasplash"):
        try:
            mod = __import__(module)
            info[module] = getattr(mod, "__version__", "installed")
        except ImportError:
            info[module] = "not installed"
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    names = method_names(args.device, args.compile)
    if args.methods:
        wanted = [m.lower() for m in args.methods]
        names = [n for n in names if any(w in n.lower() for w in wanted)]
    if args.exclude:
        unwanted = [m.lower() for m in args.exclude]
        names = [n for n in names if not any(w in n.lower() for w in unwanted)]
    if args.device == "cpu":
        from plugin.kernels.chunked import c_kernel_available

        c_kernel_available()  # build the C kernel now, not inside a measured run
    rows = []
    start = machine_description(args.device)
    for dtype_name in args.dtypes:
        for name in names:
            previous: tuple[int, float, float] | None = None
            for L in args.lengths:
                row = {"method": name, "L": L, "dtype": dtype_name}
                note = predicted_skip(name, L, previous, args)
                if note:
                    row["status"] = note
                else:
                    config = {"name": name, "B": args.batch, "H": args.heads, "L": L, "D": args.dim,
                              "dtype": dtype_name, "device": args.device, "repeat": args.repeat,
                              "compile_backend": args.compile_backend}
                    if args.device == "cpu":
                        row.update(measure_in_subprocess(config, timeout=max(60.0, 20 * args.max_seconds)))
                    else:
                        row.update(measure(**{k: config[k] for k in ("name", "B", "H", "L", "D", "device", "repeat",
                                                                     "compile_backend")}, dtype_name=dtype_name))
                    if row.get("status") == "ok":
                        previous = (L, statistics.median(row["fwdbwd_ms"]), row["peak_mib"])
                rows.append(row)
                print(format_progress(row, args.stat), flush=True)
    machine = machine_description(args.device)
    load = "load average (1, 5, 15 min)"
    if load in start:
        machine[load] = f"{start[load]} at the start, {machine[load]} at the end"
    return {"machine": machine, "args": vars(args), "rows": rows}


def predicted_skip(name: str, L: int, previous: tuple[int, float, float] | None, args: argparse.Namespace) -> str:
    if previous is not None:
        L0, ms, mib = previous
        one = ms * (L / L0) ** 2 / 1e3  # one forward+backward, growing quadratically
        predicted = one * (2 + (args.repeat if one < 2.0 else 1)) * 2
        if predicted > args.max_seconds:
            return f"skipped: predicted {predicted:.0f} s > --max-seconds {args.max_seconds:.0f}"
        need = mib * 2**20 * (L / L0) ** 2  # at worst quadratic
        avail = available_memory(args.device)
        if need > 0.5 * avail:
            return f"skipped: predicted peak {need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB free"
    if materializes_scores(name):
        # scores, weights and their gradients: about 4 (B, H, L, L) float32 matrices
        need = 4 * args.batch * args.heads * L * L * 4
        avail = available_memory(args.device)
        if need > 0.6 * avail:
            return f"skipped: needs about {need / 2**30:.1f} GiB of (L, L) matrices, {avail / 2**30:.1f} GiB free"
    return ""


def available_memory(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _stat(values: list[float], how: str) -> float:
    return min(values) if how == "min" else statistics.median(values)


def format_progress(row: dict[str, Any], how: str) -> str:
    if row.get("status") != "ok":
        return f"{row['dtype']:>8} L={row['L']:<6} {row['method']:<40} {row['status']}"
    return (f"{row['dtype']:>8} L={row['L']:<6} {row['method']:<40} fwd {_stat(row['fwd_ms'], how):9.1f} ms  "
            f"fwd+bwd {_stat(row['fwdbwd_ms'], how):9.1f} ms  peak {row['peak_mib']:8.1f} MiB")


def markdown(result: dict[str, Any], how: str) -> str:
    """The results as markdown: the machine, then one table per dtype, rows grouped by L."""
    machine = result["machine"]
    args = result["args"]
    lines = ["| machine | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in machine.items()]
    lines.append("")
    lines.append(
        f"B={args['batch']}, H={args['heads']}, D={args['dim']}, device={args['device']}; times are the "
        f"{'minimum' if how == 'min' else 'median'} of {args['repeat']} runs after a warm-up; "
        f"x SDPA = forward+backward time / SDPA's at the same L; peak = memory of one forward+backward "
        f"({'CUDA allocator peak' if args['device'] == 'cuda' else 'growth of max RSS in a fresh process'})."
    )
    compiled = bool(args.get("compile"))
    if compiled:
        lines.append(f"`[compiled]`: `torch.compile(fullgraph=True, backend={args.get('compile_backend')!r})`; "
                     f"compile s = the warm-up calls that compile it (a tiny call, then forward and "
                     f"forward+backward at the measured shape).")
    for dtype_name in args["dtypes"]:
        lines += ["", f"**{dtype_name}**", "",
                  "| L | method | fwd ms | fwd+bwd ms | x SDPA (fwd+bwd) | peak MiB (fwd+bwd) |"
                  + (" compile s |" if compiled else ""),
                  "|---:|---|---:|---:|---:|---:|" + ("---:|" if compiled else "")]
        rows = [r for r in result["rows"] if r["dtype"] == dtype_name]
        for L in args["lengths"]:
            at_L = [r for r in rows if r["L"] == L]
            sdpa = next((r for r in at_L if r["method"] == "sdpa" and r.get("status") == "ok"), None)
            base = _stat(sdpa["fwdbwd_ms"], how) if sdpa else None
            for r in at_L:
                if r.get("status") != "ok":
                    lines.append(f"| {L} | {r['method']} | | | | {r['status']} |")
                    continue
                fb = _stat(r["fwdbwd_ms"], how)
                ratio = f"{fb / base:.2f}" if base else ""
                extra = (f" {r['compile_s']:.0f} |" if "compile_s" in r else " |") if compiled else ""
                lines.append(f"| {L} | {r['method']} | {_stat(r['fwd_ms'], how):.1f} | {fb:.1f} | {ratio} | "
                             f"{r['peak_mib']:.0f} |{extra}")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str, how: str) -> None:
    """Log-log figure: forward+backward time and peak memory vs L, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args = result["args"]
    dtype_name = args["dtypes"][0]
    rows = [r for r in result["rows"] if r["dtype"] == dtype_name and r.get("status") == "ok"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = plt.get_cmap("tab20").colors
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(14, 6.5))
    for i, name in enumerate(methods):
        pts = sorted((r["L"], _stat(r["fwdbwd_ms"], how), r["peak_mib"]) for r in rows if r["method"] == name)
        if name.startswith("sdpa"):
            style = {"linestyle": ":", "linewidth": 2.5, "color": "black"}
        elif name.endswith("[reference]"):
            style = {"linestyle": "--", "linewidth": 1.2, "color": colors[i % 20]}
        elif name.startswith(("entmax-pkg", "adasplash")):
            style = {"linestyle": "-.", "linewidth": 1.2, "color": colors[i % 20]}
        else:
            style = {"linestyle": "-", "linewidth": 2.0, "color": colors[i % 20]}
        ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name, **style)
        resolved = [p for p in pts if p[2] >= 1.0]  # below 1 MiB the RSS growth is not resolved
        ax_m.plot([p[0] for p in resolved], [p[2] for p in resolved], marker="o", ms=3, **style)
    for ax, ylabel in ((ax_t, f"forward+backward time (ms, {how})"), (ax_m, "peak memory of forward+backward (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(loc="lower center", ncol=4, fontsize=8, frameon=False)
    machine = result["machine"]
    fig.suptitle(f"attention, B={args['batch']} H={args['heads']} D={args['dim']} {dtype_name}, "
                 f"{args['device']} ({machine.get('gpu') or machine.get('cpu')}, {machine['threads']} threads); "
                 f"solid: plugin (automatic path), dashed: plugin reference path, dash-dot: peers, dotted: SDPA",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--stat", choices=("median", "min"), default="median")
    parser.add_argument("--max-seconds", type=float, default=60.0,
                        help="skip a configuration predicted to take longer than this (all its runs)")
    parser.add_argument("--methods", nargs="+", help="only methods whose name contains one of these")
    parser.add_argument("--exclude", nargs="+", help="leave out methods whose name contains one of these")
    parser.add_argument("--quick", action="store_true", help="L = 256, 512, 1024 and 3 repeats")
    parser.add_argument("--compile", action="store_true",
                        help="also time SDPA and every plugin method under torch.compile(fullgraph=True)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend for --compile")
    parser.add_argument("--markdown", help="write the tables to this file")
    parser.add_argument("--json", help="write the raw results to this file")
    parser.add_argument("--plot", help="write a PNG figure to this file")
    parser.add_argument("--from-json", help="re-render the tables / plot of an earlier --json file")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every measurement (default: torch's, one per core; recorded in "
                        "the output). 1 gives steadier numbers on a shared machine")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the measuring child processes inherit it
        torch.set_num_threads(args.threads)

    if args.child:
        config = json.loads(args.child)
        res = measure(config["name"], config["B"], config["H"], config["L"], config["D"], config["dtype"],
                      config["device"], config["repeat"], config.get("compile_backend", "inductor"))
        print(json.dumps(res))
        return 0
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    else:
        if args.quick:
            args.lengths = [256, 512, 1024]
            args.repeat = 3
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
        result = run_suite(args)
    text = markdown(result, args.stat)
    print()
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json and not args.from_json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, args.plot, args.stat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
