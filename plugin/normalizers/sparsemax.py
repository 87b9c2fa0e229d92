"""sparsemax (Martins & Astudillo 2016; Niculae & Blondel 2017, Omega = 1/2 ||y||^2).

``sparsemax(x) = argmin_{y in simplex} ||y - x / gamma||^2``: the Euclidean projection
onto the simplex, ``y = max(x / gamma - tau, 0)`` with ``sum y = 1``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..kernels.maths import sparsemax_backward
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


def clipped_power_probs(z: Tensor, allowed: Tensor, threshold: Callable[[Tensor], Tensor], divisor: float = 1.0,
                        power: int = 1) -> Tensor:
    """``p = [x - tau]_+^power`` over the allowed entries (0 elsewhere), ``x = (z - max z) / divisor``.

    The closed-form members of the entmax family: sparsemax (``divisor = 1``, ``power = 1``,
    ``threshold = simplex_threshold``) and 1.5-entmax (``2``, ``2``, ``entmax15_threshold``).
    Masked entries are set to -2 before ``threshold`` runs: below -1, never in the support.
    """
    x, _ = shift_by_max(z, allowed)
    x = torch.where(allowed, x / divisor, torch.full_like(x, -2.0))
    p = torch.clamp(x - threshold(x), min=0)
    if power != 1:
        p = p**power
    return torch.where(allowed, p, torch.zeros_like(p))


class SparsemaxFunction(torch.autograd.Function):
    """Forward by the sort-free exact threshold; backward in closed form: on the support S, ``dx = dy - mean_S(dy)``."""

    @staticmethod
    def forward(ctx, z: Tensor, allowed: Tensor) -> Tensor:
        p = clipped_power_probs(z, allowed, simplex_threshold)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (p,) = ctx.saved_tensors
        return sparsemax_backward(p, grad), None


def sparsemax(scores: Tensor, dim: int = -1, mask: Tensor | None = None, gamma: float = 1.0) -> Tensor:
    """Sparsemax of ``scores / gamma`` along ``dim``: the Euclidean projection onto the simplex.

    Same arguments and mask semantics as :func:`plugin.softmax`; the output has exact zeros.
    """
    gamma = check_param(GAMMA, gamma, "sparsemax")
    z, allowed, dim, invalid = prepare(scores, dim, mask, "sparsemax")
    p = SparsemaxFunction.apply(scaled_by_gamma(z, allowed, gamma), allowed)
    return finish(p, dim, scores.dtype, invalid)
