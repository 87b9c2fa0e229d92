"""alpha-entmax (Peters, Niculae & Martins 2019; Correia, Niculae & Martins 2019).

``entmax_alpha(z) = argmax_{p in simplex} p.z + H^T_alpha(p)`` (Tsallis entropy), i.e.
``p_i = [(alpha - 1) z_i - tau]_+ ** (1 / (alpha - 1))`` with ``tau`` such that ``sum p = 1``.
alpha = 2 is sparsemax, alpha = 1.5 has an exact (sort-free) threshold, and alpha -> 1 tends to
softmax; ``entmax(x, alpha=1)`` computes softmax exactly, so a schedule can move alpha
continuously from softmax to a sparse mechanism (:mod:`plugin.schedule`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..kernels.maths import entmax_alpha_grad, entmax_backward
from ..kernels.ops import checked_alpha
from .base import compute_dtype, finish, prepare, shift_by_max
from .softmax import softmax
from .sparsemax import SparsemaxFunction, clipped_power_probs

ALPHA_MIN = 1.01  # LearnableAlpha's lower end; a free alpha near 1 makes 1/(alpha-1) explode


def entmax15_threshold(x: Tensor) -> Tensor:
    """Exact threshold of 1.5-entmax for rows ``x = z / 2`` whose maximum is 0 (keepdim).

    ``tau`` solves ``f(tau) = sum (x - tau)_+^2 - 1 = 0``, with ``tau`` in [-1, 0)
    (entries below -1, such as masked ones filled with -2, are never in the support).
    Sort-free: Newton steps on the convex decreasing ``f`` from the lower bound -1 approach
    tau from below; after each step the root of the quadratic on the current support
    ``S = {x > tau}``, ``tau_S = mean_S - sqrt((1 - k var_S) / k)``, is exact as soon as S is
    the true support, which is verified (``{x > tau_S} == S``) before a row is accepted.
    Under ``torch.compile`` the sort-based :func:`entmax15_threshold_sorted` is used instead (the
    loop's exit test is a host synchronization).
    """
    if torch.compiler.is_compiling():
        return entmax15_threshold_sorted(x)
    d = x.shape[-1]
    tau = torch.full_like(x[..., :1], -1.0)
    result = torch.empty_like(tau)
    done = torch.zeros_like(tau, dtype=torch.bool)
    for _ in range(d + 2):
        gap = torch.clamp(x - tau, min=0)
        f = (gap * gap).sum(-1, keepdim=True) - 1
        slope = 2 * gap.sum(-1, keepdim=True)
        tau = tau + f / slope  # slope >= 2: the row maximum (0) is always above tau
        support = x > tau
        k = support.sum(-1, keepdim=True).to(x.dtype)
        xs = torch.where(support, x, 0)
        mean = xs.sum(-1, keepdim=True) / k
        var = (xs * xs).sum(-1, keepdim=True) / k - mean * mean
        tau_s = mean - torch.sqrt(torch.clamp((1 - k * var) / k, min=0))
        exact = ((x > tau_s).sum(-1, keepdim=True).to(x.dtype) == k) & ~done
        result = torch.where(exact, tau_s, result)
        done = done | exact
        if bool(done.all()):
            return result
    # not reached for finite input (Newton identifies the support in finitely many steps);
    # kept as a guarantee of exactness
    return torch.where(done, result, entmax15_threshold_sorted(x))


def entmax15_threshold_sorted(x: Tensor) -> Tensor:
    """Sort-based reference for :func:`entmax15_threshold` (Peters et al. 2019, Algorithm 2).

    For the support of the k largest entries, ``tau_k = mean_k - sqrt((1 - k var_k) / k)``;
    the support is the largest k with ``tau_k <= x_(k)``.
    """
    xs = torch.sort(x, dim=-1, descending=True).values
    k = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    mean = xs.cumsum(-1) / k
    mean_sq = (xs * xs).cumsum(-1) / k
    delta = (1 - k * (mean_sq - mean * mean)) / k
    tau = mean - torch.sqrt(torch.clamp(delta, min=0))
    support_size = (tau <= xs).sum(-1, keepdim=True)
    return tau.gather(-1, support_size - 1)


class Entmax15Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, allowed: Tensor) -> Tensor:
        p = clipped_power_probs(z, allowed, entmax15_threshold, divisor=2.0, power=2)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (p,) = ctx.saved_tensors
        return entmax_backward(p, grad, 1.5), None


def _bisection_steps(dtype: torch.dtype) -> int:
    # the bracket has width < 1; halve it down to the dtype's resolution
    return 58 if dtype == torch.float64 else 30


class EntmaxBisectFunction(torch.autograd.Function):
    """General alpha by bisection on tau, then renormalization; closed-form gradients for z and alpha.

    The threshold is searched as ``s = tau + 1`` in [0, 1 - d^(1 - alpha)], with
    ``p_j = (1 + x_j - s)_+^(1 / (alpha - 1))`` computed as ``exp(log1p(x_j - s) / (alpha - 1))``:
    near alpha = 1 the form in ``tau = -1 + s`` would keep ``s`` only to the dtype's resolution
    around 1, an error that ``1 / (alpha - 1)`` multiplies. ``alpha`` may be float64 for a float32
    ``z`` (``alpha - 1`` is taken before rounding). The backward is differentiable (second
    derivatives, also through alpha).
    """

    @staticmethod
    def forward(ctx, z: Tensor, allowed: Tensor, alpha: Tensor) -> Tensor:
        zs, _ = shift_by_max(z, allowed)
        zs = torch.where(allowed, zs, torch.zeros_like(zs))
        am1 = (alpha - 1).to(z.dtype)
        x = zs * am1  # max over allowed entries is 0
        inv = 1.0 / am1
        count = allowed.sum(-1, keepdim=True).clamp(min=1).to(z.dtype)
        # p_max <= 1 gives s >= 0; sum p >= 1 needs s <= 1 - (1/d)^(alpha-1)
        hi = -torch.expm1(-am1 * torch.log(count))
        lo = torch.zeros_like(hi)

        def unnormalized(s: Tensor) -> Tensor:
            u = x - s
            on = allowed & (u > -1)
            return torch.where(on, torch.exp(inv * torch.log1p(torch.where(on, u, torch.zeros_like(u)))),
                               torch.zeros_like(u))

        for _ in range(_bisection_steps(z.dtype)):
            mid = (lo + hi) / 2
            too_much = unnormalized(mid).sum(-1, keepdim=True) >= 1
            lo = torch.where(too_much, mid, lo)
            hi = torch.where(too_much, hi, mid)
        p = unnormalized(lo)
        p = p / p.sum(-1, keepdim=True).clamp(min=torch.finfo(p.dtype).tiny)
        p = torch.where(allowed, p, torch.zeros_like(p))
        ctx.save_for_backward(p, z, allowed, alpha)
        return p

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, Tensor | None]:
        p, z, allowed, alpha = ctx.saved_tensors
        dz = entmax_backward(p, grad, alpha)
        dalpha = None
        if ctx.needs_input_grad[2]:
            # zs from z by differentiable ops, so that a second derivative through dalpha sees
            # z (the formula does not depend on the shift: the maximum is detached)
            m = torch.where(allowed, z, torch.full_like(z, -torch.inf)).amax(-1, keepdim=True).detach()
            zs = torch.where(allowed, z - torch.where(torch.isfinite(m), m, torch.zeros_like(m)), torch.zeros_like(z))
            dalpha = entmax_alpha_grad(p, grad, zs, alpha).to(alpha.dtype)
        return dz, None, dalpha


def _alpha_tensor(alpha: Tensor, scores: Tensor, dim: int) -> Tensor:
    """Bring a tensor alpha to the keepdim shape of ``scores`` reduced over ``dim`` (dim moved last).

    alpha must broadcast to ``scores.shape`` with ``dim`` dropped (tried first), or with
    ``dim`` kept as size 1.
    """
    reduced = scores.shape[:dim] + scores.shape[dim + 1 :]
    kept = scores.shape[:dim] + (1,) + scores.shape[dim + 1 :]
    for target in (reduced, kept):
        try:
            if len(alpha.shape) <= len(target) and torch.broadcast_shapes(alpha.shape, target) == target:
                a = alpha.expand(target)
                return (a if target is reduced else a.squeeze(dim)).unsqueeze(-1)
        except RuntimeError:
            pass
    raise ValueError(
        f"entmax: alpha of shape {tuple(alpha.shape)} is not broadcastable to scores of shape "
        f"{tuple(scores.shape)} with dim={dim} reduced, i.e. {tuple(reduced)} (or {tuple(kept)})"
    )


def entmax15(scores: Tensor, dim: int = -1, mask: Tensor | None = None) -> Tensor:
    """Exact 1.5-entmax along ``dim`` (the sort-free :func:`entmax15_threshold`).

    Mask semantics as :func:`plugin.softmax`.
    """
    z, allowed, dim, invalid = prepare(scores, dim, mask, "entmax15")
    return finish(Entmax15Function.apply(z, allowed), dim, scores.dtype, invalid)


def entmax(scores: Tensor, alpha: float | Tensor = 1.5, dim: int = -1, mask: Tensor | None = None) -> Tensor:
    """alpha-entmax along ``dim``.

    Parameters
    ----------
    scores : Tensor of any shape.
    alpha : a float in [1, 2], or a tensor in (1, 2] broadcastable to ``scores`` with ``dim``
        reduced (dropped, or kept with size 1). A tensor alpha receives a gradient (Correia et
        al. 2019), so alpha can be learned (see :class:`LearnableAlpha`). As floats, alpha = 1
        is softmax (the limit alpha -> 1), 2 and 1.5 use the exact sort-free thresholds, other
        values bisection on the threshold.
    dim, mask : as in :func:`plugin.softmax`.
    """
    if isinstance(alpha, Tensor):
        if not alpha.is_floating_point():
            raise ValueError(f"entmax: alpha must be a floating-point tensor, got {alpha.dtype}")
        alpha_t = alpha
        if torch.compiler.is_compiling():
            alpha_t = checked_alpha(alpha)  # the range check as an op: no host sync in the graph
        else:
            with torch.no_grad():
                if alpha.numel() and not bool(((alpha > 1) & (alpha <= 2)).all()):
                    raise ValueError("entmax: alpha must lie in (1, 2]; got values outside it")
        z, allowed, d, invalid = prepare(scores, dim, mask, "entmax")
        a = _alpha_tensor(alpha_t if alpha_t.dtype == torch.float64 else alpha_t.to(z.dtype), scores, d)
        p = EntmaxBisectFunction.apply(z, allowed, a)
        return finish(p, d, scores.dtype, invalid)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 1 <= alpha <= 2:
        raise ValueError(f"entmax: alpha must be a number in [1, 2] or a tensor in (1, 2], got {alpha!r}")
    if alpha == 1:
        return softmax(scores, dim=dim, mask=mask)
    z, allowed, d, invalid = prepare(scores, dim, mask, "entmax")
    if alpha == 2:
        p = SparsemaxFunction.apply(z, allowed)
    elif alpha == 1.5:
        p = Entmax15Function.apply(z, allowed)
    else:
        # float64 (where the device has it): alpha = 1 + 1e-8 is 1 in float32
        a_dtype = torch.float32 if z.device.type == "mps" else torch.float64
        a = torch.full(z.shape[:-1] + (1,), float(alpha), dtype=a_dtype, device=z.device)
        p = EntmaxBisectFunction.apply(z, allowed, a)
    return finish(p, d, scores.dtype, invalid)


class LearnableAlpha(nn.Module):
    """A learnable alpha per head, kept in (1, 2]: ``alpha = 1.01 + 0.99 * sigmoid(w)``.

    ``forward()`` returns alpha of shape ``(num_heads, 1)``, which broadcasts against
    attention scores ``(B, num_heads, Lq, Lk)`` reduced over the key dimension.
    """

    def __init__(self, num_heads: int, init: float = 1.5) -> None:
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"LearnableAlpha: num_heads must be a positive integer, got {num_heads!r}")
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not ALPHA_MIN < init < 2:
            raise ValueError(f"LearnableAlpha: init must be a number in ({ALPHA_MIN}, 2), got {init!r}")
        self.num_heads = num_heads
        self.weight = nn.Parameter(torch.empty(num_heads))
        self.reset(init)

    @torch.no_grad()
    def reset(self, value: float) -> None:
        """Set every head's alpha to ``value`` (a number in (1.01, 2))."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ALPHA_MIN < value < 2:
            raise ValueError(f"LearnableAlpha: alpha must be a number in ({ALPHA_MIN}, 2), got {value!r}")
        u = (value - ALPHA_MIN) / (2 - ALPHA_MIN)
        self.weight.fill_(math.log(u / (1 - u)))

    def forward(self) -> Tensor:
        return (ALPHA_MIN + (2 - ALPHA_MIN) * torch.sigmoid(self.weight)).unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


class EntmaxNormalizer(nn.Module):
    """entmax with a fixed alpha, or with a learned alpha per head (``alpha="learned"``).

    With a learned alpha, scores must be laid out ``(..., num_heads, Lq, Lk)`` and
    normalized over the last dimension. ``warmup_alpha`` (a float, set by a schedule through
    :meth:`set_param`) replaces the learned alpha while it is not None: a learned alpha can
    start after a scheduled warm-up.
    """

    def __init__(self, alpha: float | str = 1.5, num_heads: int | None = None, init: float = 1.5) -> None:
        super().__init__()
        self.name = "entmax"
        # the plain function it computes: an EntmaxNormalizer handed to AttentionMechanism keeps
        # the registered 'entmax' variant's fast paths (they read ``params``)
        self.function = entmax
        self.alpha = alpha
        self.learned: LearnableAlpha | None = None
        self.warmup_alpha: float | None = None
        if alpha == "learned":
            if num_heads is None:
                raise ValueError("entmax: alpha='learned' needs num_heads (one alpha per attention head)")
            self.learned = LearnableAlpha(num_heads, init=init)

    @property
    def params(self) -> dict[str, Any]:
        """The current parameters, as the fast paths read them: ``alpha`` a float or the :class:`LearnableAlpha`."""
        alpha = self.fixed_alpha()
        return {"alpha": self.learned if alpha is None else alpha}

    def fixed_alpha(self) -> float | None:
        """The float alpha this normalizer computes with now, or None when the learned alpha runs."""
        if self.learned is None:
            return float(self.alpha)
        return self.warmup_alpha

    def set_param(self, name: str, value: float | None) -> None:
        """Set ``alpha`` (a schedule's current value); for a learned alpha, None hands over to it."""
        if name != "alpha":
            raise ValueError(f"entmax has no parameter {name!r}; valid parameters: alpha")
        if self.learned is not None:
            self.warmup_alpha = None if value is None else float(value)
        elif value is not None:
            self.alpha = float(value)

    def forward(self, scores: Tensor, dim: int = -1, mask: Tensor | None = None) -> Tensor:
        alpha = self.fixed_alpha()
        if alpha is not None:
            return entmax(scores, alpha=alpha, dim=dim, mask=mask)
        learned = self.learned
        assert learned is not None  # fixed_alpha() is None only while a learned alpha runs
        heads = learned.num_heads
        if dim % scores.dim() != scores.dim() - 1 or scores.dim() < 3 or scores.shape[-3] != heads:
            raise ValueError(
                f"entmax with a learned alpha expects scores (..., num_heads={heads}, Lq, Lk) normalized "
                f"over dim=-1; got shape {tuple(scores.shape)} and dim={dim}"
            )
        return entmax(scores, alpha=learned().to(compute_dtype(scores.dtype)), dim=-1, mask=mask)

    def current_alpha(self) -> Tensor | float:
        alpha = self.fixed_alpha()
        if alpha is not None:
            return alpha
        learned = self.learned
        assert learned is not None  # fixed_alpha() is None only while a learned alpha runs
        return learned().detach().squeeze(-1)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


def entmax_factory(num_heads: int | None = None, alpha: Any = 1.5) -> EntmaxNormalizer:
    return EntmaxNormalizer(alpha=alpha, num_heads=num_heads)
