"""sparsemax (Martins & Astudillo 2016; Niculae & Blondel 2017, Omega = 1/2 ||y||^2).

``sparsemax(x) = argmin_{y in simplex} ||y - x / gamma||^2``: the Euclidean projection
onto the simplex, ``y = max(x / gamma - tau, 0)`` with ``sum y = 1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GAMMA, check_param, finish, prepare, scaled_by_gamma, shift_by_max


def simplex_threshold(x: Tensor) -> Tensor:
    """Exact threshold ``tau`` (keepdim) of the simplex projection of the rows of ``x``.

    ``x`` has its maximum at 0 in every row, so ``tau`` lies in [-1, 0): entries below
    -1 are never in the support, which is how masked entries are kept out (the caller
    fills them with -2). Sort-free (Michelot 1986): starting from a lower bound of tau,
    ``tau <- (sum_{x > tau} x - 1) / |{x > tau}|`` increases monotonically and stops,
    exactly, when the set ``{x > tau}`` no longer changes (at most d rounds; a handful in
    practice). Under ``torch.compile`` the sort-based :func:`simplex_threshold_sorted` is used
    instead (the loop's exit test is a host synchronization).
    """
    if torch.compiler.is_compiling():
        return simplex_threshold_sorted(x)
    d = x.shape[-1]
    tau = torch.clamp((x.sum(-1, keepdim=True) - 1) / d, min=-1.0)
    count = torch.full_like(tau, -1.0)
    for _ in range(d + 1):
        support = x > tau
        new_count = support.sum(-1, keepdim=True).to(x.dtype)
        if torch.equal(new_count, count):
            break
        count = new_count
        tau = torch.maximum(tau, (torch.where(support, x, 0).sum(-1, keepdim=True) - 1) / count)
    return tau


def simplex_threshold_sorted(x: Tensor) -> Tensor:
    """Sort-based reference for :func:`simplex_threshold` (same contract).

    The support is the longest prefix of the sorted row with ``1 + k x_(k) > sum_{j<=k} x_(j)``.
    """
    xs = torch.sort(x, dim=-1, descending=True).values
    k = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    cumsum = xs.cumsum(-1) - 1
    support_size = (xs * k > cumsum).sum(-1, keepdim=True)
    return cumsum.gather(-1, support_size - 1) / support_size.to(x.dtype)


class SparsemaxFunction(torch.autograd.Function):
    """Forward by the sort-free :func:`simplex_threshold`; backward in closed form.

    On the support S, ``dx = dy - mean_S(dy)``.
    """

    @staticmethod
    def forward(ctx, z: Tensor, allowed: Tensor) -> Tensor:  # type: ignore[override]
        x, any_allowed = shift_by_max(z, allowed)
        x = torch.where(allowed, x, torch.full_like(x, -2.0))
        tau = simplex_threshold(x)
        p = torch.clamp(x - tau, min=0)
        p = torch.where(allowed, p, torch.zeros_like(p))
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (p,) = ctx.saved_tensors
        support = (p > 0).to(grad.dtype)
        size = support.sum(-1, keepdim=True).clamp(min=1)
        mean = (grad * support).sum(-1, keepdim=True) / size
        return support * (grad - mean), None


def sparsemax(scores: Tensor, dim: int = -1, mask: Tensor | None = None, gamma: float = 1.0) -> Tensor:
    """Sparsemax of ``scores / gamma`` along ``dim``: the Euclidean projection onto the simplex.

    Same arguments and mask semantics as :func:`plugin.softmax`; the output has exact zeros.
    """
    gamma = check_param(GAMMA, gamma, "sparsemax")
    z, allowed, dim, invalid = prepare(scores, dim, mask, "sparsemax")
    p = SparsemaxFunction.apply(scaled_by_gamma(z, allowed, gamma), allowed)
    return finish(p, dim, scores.dtype, invalid)
