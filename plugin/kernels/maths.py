"""The maths of the sparsemax / alpha-entmax family, each piece once.

Every Python implementation (the normalizers of :mod:`plugin.normalizers`, the PyTorch row
backend of :mod:`plugin.kernels.chunked`, the float64 rows of
:mod:`plugin.kernels.structured_chunked`) calls these functions, and each compiled kernel
(``entmax_rows.c``, the Triton kernels of :mod:`plugin.kernels.triton_entmax`) names the one it
mirrors in a comment ``mirrors plugin.kernels.maths.<function>``. Its constants come from
:mod:`plugin.kernels.constants`. This module imports nothing else of the plugin.

Notation, per row (the last dimension): scores ``z`` (``-inf`` where masked), ``m = max z``,
``a = alpha - 1``; the probabilities are

    p_j = [a (z_j - m) - t]_+^(1 / a) / norm,      sum_j [a (z_j - m) - t]_+^(1 / a) = norm = 1

(Peters, Niculae & Martins 2019), with ``t`` the threshold.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .constants import ENTMAX15, GENERAL, NEWTON_MAX_ITERS, NEWTON_TOL, SPARSEMAX

__all__ = [
    "entmax_alpha_grad",
    "entmax_backward",
    "entmax_from_stats",
    "gradient_weights",
    "head_alphas",
    "kind_of_alpha",
    "newton_threshold",
    "sparsemax_backward",
]


def kind_of_alpha(alpha: float) -> int:
    """The row kind of a float alpha: SPARSEMAX (2), ENTMAX15 (1.5) or GENERAL."""
    return SPARSEMAX if alpha == 2 else ENTMAX15 if alpha == 1.5 else GENERAL


def gradient_weights(p: Tensor, alpha: Tensor | float) -> Tensor:
    """``g = p^(2 - alpha)`` on the support of ``p``, 0 elsewhere (1 on the support for alpha = 2).

    ``alpha`` is a float or a tensor broadcastable to ``p`` (keepdim over the last dimension).
    """
    support = p > 0
    if not isinstance(alpha, Tensor) and alpha == 2:
        return support.to(p.dtype)
    if isinstance(alpha, Tensor):
        alpha = alpha.to(p.dtype)
    return torch.where(support, p.clamp(min=torch.finfo(p.dtype).tiny) ** (2 - alpha), torch.zeros_like(p))


def entmax_backward(p: Tensor, grad: Tensor, alpha: Tensor | float) -> Tensor:
    """Closed-form backward of alpha-entmax over the last dimension (Peters et al. 2019).

    With ``g = p^(2 - alpha)`` on the support (:func:`gradient_weights`),
    ``dz = g dp - g sum(g dp) / sum(g)``; for alpha = 2 (sparsemax) ``dz = dp - mean_S(dp)``
    on the support S and 0 elsewhere.

    Parameters
    ----------
    p : (..., n) probabilities (exact zeros off the support).
    grad : (..., n) the gradient with respect to ``p``.
    alpha : a float in (1, 2] or a tensor broadcastable to ``p`` (keepdim).
    """
    g = gradient_weights(p, alpha)
    gsum = g.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)
    return g * grad - g * ((g * grad).sum(-1, keepdim=True) / gsum)


def sparsemax_backward(p: Tensor, grad: Tensor) -> Tensor:
    """Backward of sparsemax: on the support S of ``p``, ``dz = dp - mean_S(dp)``; 0 elsewhere."""
    return entmax_backward(p, grad, 2.0)


def entmax_alpha_grad(p: Tensor, grad: Tensor, zs: Tensor, alpha: Tensor) -> Tensor:
    """``sum_j grad_j dp_j / dalpha`` per row (keepdim), in closed form (Correia, Niculae & Martins 2019).

    With ``g = p^(2 - alpha)`` on the support,
    ``dp_j / dalpha = (-p_j log p_j + g_j (zs_j - tau')) / (alpha - 1)``,
    ``tau' = (sum_j g_j zs_j - sum_j p_j log p_j) / sum_j g_j``.

    Parameters
    ----------
    p : (..., n) probabilities; grad : (..., n) the gradient with respect to ``p``.
    zs : (..., n) the scores minus the row maximum, ``z - m`` (any value off the support).
    alpha : tensor broadcastable to ``p`` (keepdim), in (1, 2].
    """
    support = p > 0
    tiny = torch.finfo(p.dtype).tiny
    am1 = (alpha - 1).to(p.dtype)  # in alpha's precision first: a float64 alpha near 1 keeps its digits
    g = gradient_weights(p, alpha)
    plogp = torch.where(support, p * torch.log(p.clamp(min=tiny)), torch.zeros_like(p))
    zs = torch.where(support, zs, torch.zeros_like(zs))
    gsum = g.sum(-1, keepdim=True).clamp(min=tiny)
    tau_prime = ((g * zs).sum(-1, keepdim=True) - plogp.sum(-1, keepdim=True)) / gsum
    dp_dalpha = (-plogp + g * (zs - tau_prime)) / am1
    return (grad * dp_dalpha).sum(-1, keepdim=True)


def newton_threshold(z: Tensor, am1: Tensor, kind: int, max_iters: int = NEWTON_MAX_ITERS,
                     tol: float = NEWTON_TOL) -> Tensor:
    """The threshold of each row by the sort-free Newton iteration of the compiled kernels.

    ``phi(t) = f(t)^a - 1``, ``f(t) = sum_j [x_j - t]_+^(1/a)``, ``x = a (z - m)``, is convex and
    decreasing on [-1, 0); Newton's method from ``t = -1`` increases ``t`` monotonically to the
    root. For alpha = 2 and 1.5 each step first tries the closed-form root on the entries above
    ``t`` (``y = x - t`` over its k entries):

        alpha = 2:    d = (sum y - 1) / k
        alpha = 1.5:  the smaller root of k d^2 - 2 d sum y + sum y^2 - 1 = 0

    which is exact as soon as ``d <= min y``; otherwise the Newton step
    ``d = (f - f^(1 - a)) / f'`` is taken. A general alpha stops when ``|f(t) - 1| <= tol``; every
    row stops when a step no longer moves ``t`` (float32) or after ``max_iters`` steps.

    A general alpha works with ``s = t + 1`` instead of ``t`` (started at 0) and with
    ``u = x - s``, ``y = 1 + u``, ``y^e = exp(e log1p(u))``: near alpha = 1 (``a`` down to 1e-9,
    where a schedule leaving softmax passes) ``t = -1 + s`` in float32 would keep ``s`` only to
    6e-8, an error that ``e = 1 / a`` multiplies in ``log p``; ``s`` itself keeps every digit.

    Parameters
    ----------
    z : (rows, n) float32 scores, ``-inf`` where masked.
    am1 : (rows, 1) float32, ``alpha - 1`` per row (1 for SPARSEMAX, 0.5 for ENTMAX15).
    kind : SPARSEMAX, ENTMAX15 or GENERAL (:mod:`plugin.kernels.constants`).

    Returns
    -------
    stats : (rows, 3) float32, per row ``(m, t, 1 / norm)``, for the GENERAL kind
        ``(m, s, 1 / norm)`` with ``s = t + 1``; ``(inf, 0, 0)`` for a row with no allowed entry.
        :func:`entmax_from_stats` gives the probabilities.
    """
    m = z.amax(-1, keepdim=True)
    dead = ~torch.isfinite(m)
    m = torch.where(dead, torch.zeros_like(m), m)
    x = am1 * (z - m)
    e = 1.0 / am1
    general = kind == GENERAL
    t = torch.full_like(m, 0.0 if general else -1.0)  # for GENERAL: s = t + 1
    done = dead.clone()
    for _ in range(max_iters):
        if bool(done.all()):
            break
        y = x - t
        pos = y > 0
        yp = torch.where(pos, y, torch.zeros_like(y))
        converged = torch.zeros_like(done)
        exact = torch.zeros_like(done)
        if general:
            u = y  # x - s
            on = u > -1
            w = torch.where(on, _pow1p(u, e - 1), torch.zeros_like(u))
            fsum = torch.where(on, (1 + u) * w, torch.zeros_like(u)).sum(-1, keepdim=True)
            slope = w.sum(-1, keepdim=True)
            converged = (fsum - 1).abs() <= tol
            d = newton_gap(fsum, am1) / slope.clamp(min=1e-30)
        else:
            k = pos.sum(-1, keepdim=True).to(y.dtype)
            s1 = yp.sum(-1, keepdim=True)
            ymin = torch.where(pos, y, float("inf")).amin(-1, keepdim=True)
            if kind == SPARSEMAX:
                d = (s1 - 1) / k.clamp(min=1)
            else:
                s2 = (yp * yp).sum(-1, keepdim=True)
                disc = s1.double() ** 2 - k.double() * (s2.double() - 1)
                d = ((s1.double() - disc.clamp(min=0).sqrt()) / k.double().clamp(min=1)).to(y.dtype)
            exact = d <= ymin
            if kind == ENTMAX15:  # Newton on phi = sqrt(f) - 1
                d = torch.where(exact, d, (s2 - s2.sqrt()) / s1.clamp(min=1e-30))
        stalled = ~(d > 0) | (t + d == t)
        t = torch.where(~done & ~converged & ~stalled, t + d, t)
        done = done | converged | stalled | exact
    y = x - t
    pos = y > 0
    yp = torch.where(pos, y, torch.zeros_like(y))
    if kind == SPARSEMAX:
        terms = yp
    elif kind == ENTMAX15:
        terms = yp * yp
    else:
        terms = torch.where(y > -1, _pow1p(y, e), torch.zeros_like(y))
    norm = terms.sum(-1, keepdim=True)
    inv = torch.where(norm > 0, 1 / norm.clamp(min=torch.finfo(y.dtype).tiny), torch.zeros_like(norm))
    stats = torch.cat([m, t, inv], -1)
    return torch.where(dead, torch.tensor([float("inf"), 0.0, 0.0], dtype=z.dtype, device=z.device), stats)


def newton_gap(fsum: Tensor, am1: Tensor) -> Tensor:
    """``fsum - fsum^(1 - a)`` (the numerator of the general-alpha Newton step) as
    ``-fsum expm1(-a log fsum)``: the difference itself cancels for ``a`` below float32's
    resolution around 1 (``1 - a`` rounds to 1, or a rounding of the power makes a step 1 / a
    times too long)."""
    return -fsum * torch.expm1(-am1 * torch.log(fsum.clamp(min=1e-30)))


def entmax_from_stats(z: Tensor, am1: Tensor, stats: Tensor, kind: int) -> Tensor:
    """``p_j = [a (z_j - m) - t]_+^(1 / a) / norm`` from the statistics of :func:`newton_threshold`.

    ``z`` (rows, n) scores (``-inf`` where masked), ``am1`` (rows, 1), ``stats`` (rows, 3) of the
    row kind ``kind`` (for GENERAL, ``p_j = (1 + u_j)_+^(1 / a) / norm`` with
    ``u_j = a (z_j - m) - s``); rows with no allowed entry give zeros.
    """
    m, t, inv = stats[:, :1], stats[:, 1:2], stats[:, 2:]
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    y = am1 * (z - m) - t
    if kind == GENERAL:
        return torch.where(y > -1, _pow1p(y, 1.0 / am1), torch.zeros_like(y)) * inv
    pos = y > 0
    p = torch.where(pos, y.clamp(min=torch.finfo(y.dtype).tiny) ** (1.0 / am1), torch.zeros_like(y))
    return p * inv


def _pow1p(u: Tensor, e: Tensor | float) -> Tensor:
    """``(1 + u)^e`` for ``u > -1`` as ``exp(e log1p(u))`` (any finite value elsewhere, to be masked)."""
    return torch.exp(e * torch.log1p(torch.where(u > -1, u, torch.zeros_like(u))))


def head_alphas(alpha: float | Tensor, heads: int, op: str,
                device: torch.device | None = None) -> tuple[int, Tensor]:
    """The row kind and the per-head alpha ``(heads,)`` of an attention call's ``alpha``.

    ``alpha`` is a float in (1, 2] (its kind by :func:`kind_of_alpha`; returned in float64, so
    that ``alpha - 1`` keeps its digits near 1) or a tensor with one value per head (``(H,)``,
    ``(H, 1)``, or one value for all; kind GENERAL). ``op`` names the caller in the ``ValueError``
    raised otherwise.
    """
    if isinstance(alpha, Tensor):
        alpha_t = alpha.reshape(-1)
        if alpha_t.numel() == 1:
            alpha_t = alpha_t.expand(heads)
        if alpha_t.numel() != heads:
            raise ValueError(f"{op}: alpha must have one value per head (H={heads}), got {tuple(alpha.shape)}")
        return GENERAL, alpha_t
    a = float(alpha)
    if not 1 < a <= 2:
        raise ValueError(f"{op}: alpha must lie in (1, 2], got {alpha!r}")
    # float64: alpha = 1 + 1e-8 is 1 in float32 (the kernels take alpha - 1 from it)
    return kind_of_alpha(a), torch.full((heads,), a, dtype=torch.float64, device=device)
