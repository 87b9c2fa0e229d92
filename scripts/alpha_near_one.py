"""The error of alpha-entmax attention near alpha = 1, per path, against a float64 reference.

For alpha in {1, 1 + 1e-9, 1 + 1e-8, ..., 1 + 1e-2}, float32 attention on each CPU path
(``reference``, ``cpu_chunked``, ``cpu_chunked_torch``) and, with ``--triton`` (run with
``TRITON_INTERPRET=1`` on a machine without a GPU), the Triton kernels, is compared with the
reference path in float64 (bisection on the threshold in the log domain). Prints one table row
per alpha: the largest absolute error of the outputs and of the query gradients.

    PYTHONPATH=. python scripts/alpha_near_one.py
    TRITON_INTERPRET=1 PYTHONPATH=. python scripts/alpha_near_one.py --triton
"""

from __future__ import annotations

import argparse
import math

import torch

import plugin

ALPHAS = [1.0] + [1 + 10.0 ** -k for k in range(9, 1, -1)]


def errors(path: str, alpha: float, seed: int = 0, size: int = 48) -> tuple[float, float]:
    """(max |out - out64|, max |dq - dq64|) on random scores with a spread of about 6 (scale 3).

    alpha = 1 is softmax: every path then takes sdpa (the Triton kernels are for alpha in (1, 2]).
    """
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, size, 16, generator=g, dtype=torch.float64) for _ in range(3))
    dout = torch.randn(2, 2, size, 16, generator=g, dtype=torch.float64)
    spec = f"entmax:alpha={alpha!r}"
    scale = 3 / math.sqrt(16)
    results = []
    for dtype, forced in ((torch.float64, "reference"), (torch.float32, path)):
        qq = q.to(dtype).requires_grad_()
        if forced == "triton" and alpha != 1:  # the kernels themselves (on CPU: TRITON_INTERPRET=1)
            from plugin.kernels.triton_entmax import triton_entmax_attention

            out = triton_entmax_attention(qq, k.to(dtype), v.to(dtype), alpha, scale=scale, block_m=16, block_n=16)
        else:
            with plugin.use_path(forced):
                out = plugin.attention(qq, k.to(dtype), v.to(dtype), spec, scale=scale)
        (dq,) = torch.autograd.grad(out, qq, dout.to(dtype))
        results.append((out.double(), dq.double()))
    (o64, g64), (o, dq) = results
    return float((o - o64).abs().max().detach()), float((dq - g64).abs().max().detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton", action="store_true", help="the Triton kernels only (TRITON_INTERPRET=1 on CPU)")
    args = parser.parse_args()
    paths = ["triton"] if args.triton else ["reference", "cpu_chunked", "cpu_chunked_torch"]
    print("| alpha - 1 | " + " | ".join(f"{p} out / dq" for p in paths) + " |")
    print("|---|" + "---|" * len(paths))
    for alpha in ALPHAS:
        cells = []
        for path in paths:
            try:
                eo, eg = errors(path, alpha)
                cells.append(f"{eo:.1e} / {eg:.1e}")
            except ValueError as exc:  # a path that cannot run here (no compiler, no triton)
                cells.append(f"n/a ({str(exc)[:40]})")
        label = "0" if alpha == 1 else f"{alpha - 1:.0e}"
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
