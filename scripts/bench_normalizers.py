"""Benchmark the discrete normalizers on the CPU, side by side with their peers, in one run.

Forward and forward+backward times of the plugin's normalizers (softmax, sparsemax, entmax15,
entmax alpha=1.3, fusedmax, oscarmax) next to ``torch.softmax`` and the ``entmax`` package
(sparsemax, entmax15, entmax_bisect) on float32 rows; then the compiled structured proxes
against a per-row Python loop around a per-row solver. Prints markdown tables for
docs/benchmarks.md, with the machine and the versions.

    python scripts/bench_normalizers.py            # best of 10 runs
    python scripts/bench_normalizers.py --quick    # 3 repeats: a loaded machine, a first look
    python scripts/bench_normalizers.py --threads 1 --clock cpu  # steadier on a shared machine
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plugin
from plugin.kernels.cpu import structured_prox
from plugin.kernels.cpu.reference import (
    oscar_ordered_prox_row,
    oscar_prox_row,
    prox_rows,
    tv_prox_row,
)

SHAPES = ((4096, 1024), (512, 8192))
LOOP_SHAPE = (4096, 128)
LAM = 0.1  # fusedmax / oscarmax strength in the benchmark


def machine() -> list[str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = [f"Python {platform.python_version()}", f"torch {torch.__version__}", f"numpy {np.__version__}"]
    try:
        import entmax

        versions.append(f"entmax {getattr(entmax, '__version__', '?')}")
    except ImportError:
        versions.append("entmax (not installed)")
    cc = os.environ.get("CC") or "gcc"
    if shutil.which(cc):
        first = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout.splitlines()
        versions.append(first[0] if first else cc)
    return [
        f"- CPU: {cpu}; {os.cpu_count()} logical cores; torch threads: {torch.get_num_threads()}",
        f"- {platform.system()} {platform.release()}; " + ", ".join(versions),
    ]


CLOCK = [time.perf_counter]


def timeit(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Best (minimum) time in milliseconds: on a shared machine other load only adds time."""
    clock = CLOCK[0]
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times) * 1e3


def forward_backward(fn: Callable, x: torch.Tensor, grad: torch.Tensor) -> None:
    x.grad = None
    fn(x).backward(grad)


def python_loop_normalizer(solver: Callable, x: np.ndarray) -> torch.Tensor:
    """The per-row Python prox of the shifted rows, then plugin.sparsemax (as fusedmax/oscarmax do)."""
    return plugin.sparsemax(torch.from_numpy(prox_rows(solver, x - x.max(-1, keepdims=True), LAM)))


def timed_both_ways(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(ms with the current torch thread count, ms with one thread)."""
    threads = torch.get_num_threads()
    many = timeit(fn, repeat)
    if threads == 1:
        return many, many
    torch.set_num_threads(1)
    try:
        one = timeit(fn, repeat)
    finally:
        torch.set_num_threads(threads)
    return many, one


def normalizers() -> dict[str, tuple[Callable, str | None]]:
    """name -> (function of a (rows, d) tensor, name of the peer it is compared with)."""
    import entmax

    table: dict[str, tuple[Callable, str | None]] = {
        "torch.softmax": (lambda x: torch.softmax(x, -1), None),
        "entmax.sparsemax": (lambda x: entmax.sparsemax(x, dim=-1), None),
        "entmax.entmax15": (lambda x: entmax.entmax15(x, dim=-1), None),
        "entmax.entmax_bisect(1.3)": (lambda x: entmax.entmax_bisect(x, alpha=1.3, dim=-1), None),
        "plugin softmax": (lambda x: plugin.softmax(x), "torch.softmax"),
        "plugin sparsemax": (lambda x: plugin.sparsemax(x), "entmax.sparsemax"),
        "plugin entmax15": (lambda x: plugin.entmax15(x), "entmax.entmax15"),
        "plugin entmax(alpha=1.3)": (lambda x: plugin.entmax(x, alpha=1.3), "entmax.entmax_bisect(1.3)"),
        f"plugin fusedmax(lam={LAM})": (lambda x: plugin.fusedmax(x, lam=LAM), None),
        f"plugin oscarmax(lam={LAM})": (lambda x: plugin.oscarmax(x, lam=LAM), None),
    }
    return table


def bench_normalizers(repeat: int) -> list[str]:
    lines = []
    for rows, d in SHAPES:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(rows, d, generator=gen)
        grad = torch.randn(rows, d, generator=gen)
        results: dict[str, tuple[float, float]] = {}
        for name, (fn, _) in normalizers().items():
            forward = timeit(partial(fn, x), repeat)
            both = timeit(partial(forward_backward, fn, x.clone().requires_grad_(True), grad), repeat)
            results[name] = (forward, both)
        base_f, base_b = results["torch.softmax"]
        lines += [
            f"### {rows} rows x {d}, float32, CPU (best of {repeat})",
            "",
            "| normalizer | forward ms | x torch.softmax | fwd+bwd ms | x torch.softmax | peer "
            "| fwd / peer | fwd+bwd / peer |",
            "|---|---:|---:|---:|---:|---|---:|---:|",
        ]
        for name, (_fn, peer) in normalizers().items():
            f, b = results[name]
            peer_cells = ["", "", ""]
            if peer is not None:
                pf, pb = results[peer]
                peer_cells = [peer, f"{f / pf:.2f}", f"{b / pb:.2f}"]
            cells = [name, f"{f:.1f}", f"{f / base_f:.1f}", f"{b:.1f}", f"{b / base_b:.1f}", *peer_cells]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def bench_python_loop(repeat: int) -> list[str]:
    rows, d = LOOP_SHAPE
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, d, generator=gen)
    xn = x.numpy().astype(np.float64)
    loop_repeat = 1 if repeat <= 3 else 3
    threads = torch.get_num_threads()
    one = threads == 1
    lines = [
        f"### Structured proxes: compiled batch vs per-row Python loop, {rows} rows x {d}, lam={LAM}",
        "",
        (
            f"Compiled: C over all rows (float32){'' if one else f', {threads} threads and 1 thread'}; Python: a "
            f"loop over rows around a per-row numpy/Python solver (best of {loop_repeat}). Full normalizers: the "
            "compiled forward against the Python-loop prox followed by plugin.sparsemax."
        ),
        "",
    ]
    if one:
        lines += ["| operation | compiled ms | Python loop ms | speed-up |", "|---|---:|---:|---:|"]
    else:
        header = (
            f"| operation | compiled ms ({threads} thr.) | compiled ms (1 thr.) | Python loop ms "
            f"| speed-up ({threads} thr.) | speed-up (1 thr.) |"
        )
        lines += [header, "|---|---:|---:|---:|---:|---:|"]
    cases = [
        ("TV prox (fusedmax)", "tv", tv_prox_row),
        ("ordered OSCAR prox (oscarmax)", "oscar_ordered", oscar_ordered_prox_row),
        ("OSCAR prox", "oscar", oscar_prox_row),
    ]
    measured = []
    for label, kind, solver in cases:
        compiled, single = timed_both_ways(partial(structured_prox, kind, x, None, LAM), repeat)
        python = timeit(partial(prox_rows, solver, xn, LAM), loop_repeat, warmup=0)
        measured.append((label, compiled, single, python))
    for label, fn, solver in (
        ("fusedmax forward", plugin.fusedmax, tv_prox_row),
        ("oscarmax forward", plugin.oscarmax, oscar_ordered_prox_row),
    ):
        compiled, single = timed_both_ways(partial(fn, x, lam=LAM), repeat)
        python = timeit(partial(python_loop_normalizer, solver, xn), loop_repeat, warmup=0)
        measured.append((label, compiled, single, python))
    for label, compiled, single, python in measured:
        if one:
            lines.append(f"| {label} | {compiled:.2f} | {python:.0f} | {python / compiled:.0f}x |")
        else:
            lines.append(
                f"| {label} | {compiled:.2f} | {single:.2f} | {python:.0f} | {python / compiled:.0f}x "
                f"| {python / single:.0f}x |"
            )
    lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per measurement (the best is reported)")
    parser.add_argument("--quick", action="store_true", help="3 repeats (overrides --repeat)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch (and kernel) threads; default: torch's default. 1 gives steadier numbers on a shared machine",
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: CPU time of the process (needs --threads 1; steadier on a loaded machine)",
    )
    args = parser.parse_args()
    if args.clock == "cpu":
        if args.threads != 1:
            parser.error("--clock cpu measures the CPU time of all threads together: use it with --threads 1")
        CLOCK[0] = time.process_time
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    repeat = 3 if args.quick else args.repeat
    structured_prox("tv", torch.zeros(1, 2), None, 0.0)  # compile the kernels outside the timings
    try:
        load = "; load average " + " ".join(f"{v:.1f}" for v in os.getloadavg()) + " at the start"
    except OSError:
        load = ""
    lines = ["## Normalizers on the CPU", ""] + machine()
    lines[-1] += load
    lines.append(f"- clock: {'CPU time of the process' if args.clock == 'cpu' else 'wall time'}, best of {repeat}")
    command = " ".join(["python scripts/bench_normalizers.py", *sys.argv[1:]])
    lines += [f"- command: `{command}`", ""]
    lines += bench_normalizers(repeat)
    lines += bench_python_loop(repeat)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
