"""Length-scaled normalizers: the scores of a query row are multiplied by a factor that grows with
``n``, the number of keys that row may attend to, before softmax or alpha-entmax.

**Scalable-Softmax** (SSMax; Nakanishi 2025, "Scalable-Softmax Is Superior for Attention",
arXiv:2501.19399, Sec. 2, the definition of SSMax)::

    z_i  ->  n^(s z_i) / sum_j n^(s z_j)  =  softmax((s log n) z)_i

with ``s`` a scaling parameter learned per head (per layer). ``scalable_softmax`` computes
``softmax(s log(n) x)``; ``s`` is learned per head (``s=learned``, starting at ``s_init``) or fixed
(``s=0.43``). At ``n = 1`` the factor is 0 and the one allowed key gets weight 1.

**Adaptive-Scalable Entmax** (ASEntmax; Vasylenko, Pitorro, Martins & Treviso, "Long-Context
Generalization with Sparse Attention", ICLR 2026, arXiv:2506.16640, Sec. "Adaptive-Scalable
Entmax"), in the per-head form of the authors' code (deep-spin/asentmax, the ``learn`` length
scaling of ``sparse_gemma.py``)::

    p = alpha-entmax(theta(n) z),   theta(n) = delta + beta (log(n + 1))^gamma

with ``beta`` and ``gamma`` learned per head (or fixed) and ``delta`` a fixed offset. The code
evaluates the logarithm at ``n + 1`` (its comment: "avoids log(0) = -inf and log(1) = 0", which a
negative ``gamma`` would turn into an infinite factor); this module does the same. The paper's
query-adaptive form computes ``beta`` and ``gamma`` from each token's hidden state; an attention
normalizer sees the scores only, so here they are parameters per head (the form the code calls
``learn``). ``alpha`` is fixed (1 = softmax, 2 = sparsemax) or learned per head as in
:class:`plugin.LearnableAlpha`.

Both are linear in the scores, so ``theta(n_i) (q_i . k_j) = (theta(n_i) q_i) . k_j``: the fast
paths scale each query row and run the base variant's path (:func:`plugin.paths.length_scaled`).
``n`` counts the allowed keys of the row: those the mask allows, that causality allows (with a
cache, the cached keys included) and whose score is not ``-inf``. A row with no allowed key gives
zeros, whatever its factor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..registry import LEARNED, Param
from .base import check_param, compute_dtype, prepare
from .entmax import LearnableAlpha, entmax
from .softmax import softmax

__all__ = [
    "LengthScaledNormalizer",
    "asentmax_factor",
    "scalable_entmax",
    "scalable_entmax_factory",
    "scalable_softmax",
    "scalable_softmax_factory",
    "ssmax_factor",
]

# the registered parameters (plugin/builtins.py registers the variants with them)
S = Param("s", LEARNED, float, low=0, choices=(LEARNED,))
S_INIT = Param("s_init", 1.0, float, low=0)
ALPHA = Param("alpha", 1.5, float, low=1, high=2, choices=(LEARNED,))
BETA = Param("beta", LEARNED, float, low=0, choices=(LEARNED,))
BETA_INIT = Param("beta_init", 0.5, float, low=0)
GAMMA_EXP = Param("gamma", LEARNED, float, low=-4, high=4, choices=(LEARNED,))
GAMMA_INIT = Param("gamma_init", 0.0, float, low=-4, high=4)
DELTA = Param("delta", 1.0, float, low=0)


def _positive(n: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(max(n, 1), n > 0)`` with the counts in ``dtype``: rows without a key get a finite factor (and zeros)."""
    has = n > 0
    return torch.clamp(n, min=1).to(dtype), has


def ssmax_factor(n: Tensor, s: Tensor | float, dtype: torch.dtype = torch.float32) -> Tensor:
    """SSMax's factor ``s log n`` for the key counts ``n`` (0 where a row has no key)."""
    m, has = _positive(n, dtype)
    factor = s * torch.log(m)
    return torch.where(has, factor, torch.zeros_like(factor))


def asentmax_factor(n: Tensor, beta: Tensor | float, gamma: Tensor | float, delta: float,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """ASEntmax's factor ``delta + beta log(n + 1)^gamma`` for the key counts ``n`` (1 where a row has no key)."""
    m, has = _positive(n, dtype)
    factor = delta + beta * torch.log1p(m) ** gamma
    return torch.where(has, factor, torch.ones_like(factor))


def _scaled(scores: Tensor, mask: Tensor | None, factor_of: Any) -> Tensor:
    """``scores`` times the factor of each row (last dim normalized); ``-inf`` entries kept."""
    z = scores.to(compute_dtype(scores.dtype))
    allowed = z != float("-inf")
    if mask is not None:
        allowed = allowed & mask
    factor = factor_of(allowed.sum(-1), z.dtype).unsqueeze(-1)
    masked = z == float("-inf")  # kept -inf, and no -inf in the product (its gradient to the factor is NaN)
    return torch.where(masked, z, torch.where(masked, torch.zeros_like(z), z) * factor)


def _check_number(param: Param, value: Any, variant: str) -> Any:
    if isinstance(value, Tensor):
        return value
    return check_param(param, value, variant)


def scalable_softmax(scores: Tensor, dim: int = -1, mask: Tensor | None = None, s: float | Tensor = 1.0) -> Tensor:
    """Scalable-Softmax along ``dim``: ``softmax(s log(n) scores)``, n the allowed keys of each row.

    ``s`` is a number >= 0, or a tensor broadcastable to ``scores`` with ``dim`` dropped (one ``s`` per
    head: shape (H, 1) for scores (B, H, Lq, Lk)). Mask semantics as :func:`plugin.softmax`.
    """
    s = _check_number(S, s, "scalable_softmax")
    _, _, d, _ = prepare(scores, dim, mask, "scalable_softmax")  # the checks (dim, dtype, mask shape)
    zm = scores.movedim(d, -1)
    m = None if mask is None else torch.broadcast_to(mask, scores.shape).movedim(d, -1)
    x = _scaled(zm, m, lambda n, dtype: ssmax_factor(n, s, dtype))
    return softmax(x, dim=-1, mask=m).movedim(-1, d).to(scores.dtype)


def scalable_entmax(scores: Tensor, dim: int = -1, mask: Tensor | None = None, alpha: float | Tensor = 1.5,
                    beta: float | Tensor = 0.5, gamma: float | Tensor = 0.0, delta: float = 1.0) -> Tensor:
    """Adaptive-Scalable entmax along ``dim``: ``entmax_alpha((delta + beta log(n + 1)^gamma) scores)``.

    ``alpha`` in [1, 2] (or a tensor in (1, 2] as in :func:`plugin.entmax`), ``beta >= 0``, ``gamma``
    in [-4, 4], ``delta >= 0``; ``beta``/``gamma`` may be tensors of one value per head (shape (H, 1)
    for scores (B, H, Lq, Lk)). Mask semantics as :func:`plugin.softmax`.
    """
    beta = _check_number(BETA, beta, "scalable_entmax")
    gamma = _check_number(GAMMA_EXP, gamma, "scalable_entmax")
    delta = check_param(DELTA, delta, "scalable_entmax")
    if not isinstance(alpha, Tensor):
        alpha = check_param(ALPHA, alpha, "scalable_entmax")
    _, _, d, _ = prepare(scores, dim, mask, "scalable_entmax")
    zm = scores.movedim(d, -1)
    m = None if mask is None else torch.broadcast_to(mask, scores.shape).movedim(d, -1)
    x = _scaled(zm, m, lambda n, dtype: asentmax_factor(n, beta, gamma, delta, dtype))
    return entmax(x, alpha=alpha, dim=-1, mask=m).movedim(-1, d).to(scores.dtype)


class _PerHead(nn.Module):
    """One learned value per head: ``forward()`` returns shape (num_heads, 1)."""

    def __init__(self, num_heads: int, init: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.weight = nn.Parameter(torch.full((num_heads,), float(init)))

    def forward(self) -> Tensor:
        return self.weight.unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


class LengthScaledNormalizer(nn.Module):
    """``scalable_softmax`` / ``scalable_entmax`` with fixed or learned (per head) parameters.

    ``forward(scores, dim=-1, mask=None)`` is the reference computation; :meth:`factor` gives the
    per-row factor from the key counts, which the fast paths use to scale the queries. With a
    learned parameter, scores are laid out ``(..., num_heads, Lq, Lk)`` and normalized over the last
    dimension. A learned alpha is the submodule ``learned`` (:class:`plugin.LearnableAlpha`), as in
    ``entmax:alpha=learned``; learned ``s``, ``beta``, ``gamma`` are submodules of the same names
    (``<name>.weight``, one value per head).
    """

    def __init__(self, kind: str, num_heads: int | None = None, **params: Any) -> None:
        super().__init__()
        if kind not in ("softmax", "entmax"):
            raise ValueError(f"LengthScaledNormalizer: kind must be 'softmax' or 'entmax', got {kind!r}")
        self.kind = kind
        self.name = f"scalable_{kind}"
        self.function = scalable_softmax if kind == "softmax" else scalable_entmax
        self.num_heads = num_heads
        self.fixed: dict[str, float] = {}
        self.learned: LearnableAlpha | None = None
        self.warmup_alpha: float | None = None  # a schedule's alpha, in place of a learned one while set
        learnable = ("s",) if kind == "softmax" else ("beta", "gamma")
        for name in learnable:
            value = params[name]
            if value == LEARNED:
                if num_heads is None:
                    raise ValueError(f"{self.name}: {name}='learned' needs num_heads (one {name} per attention head)")
                self.add_module(name, _PerHead(num_heads, params[f"{name}_init"]))
            else:
                self.fixed[name] = float(value)
        if kind == "entmax":
            self.fixed["delta"] = float(params["delta"])
            alpha = params["alpha"]
            if alpha == LEARNED:
                if num_heads is None:
                    raise ValueError(f"{self.name}: alpha='learned' needs num_heads (one alpha per attention head)")
                self.learned = LearnableAlpha(num_heads, init=1.5)
            else:
                self.fixed["alpha"] = float(alpha)
        self.inits = {k: float(v) for k, v in params.items() if k.endswith("_init")}

    # -- parameters

    def _value(self, name: str) -> Tensor | float:
        module = self._modules.get(name)
        return module() if module is not None else self.fixed[name]

    @property
    def params(self) -> dict[str, Any]:
        """The current parameters, as the fast paths read them (a learned alpha is its module)."""
        out: dict[str, Any] = {}
        for name in (("s",) if self.kind == "softmax" else ("alpha", "beta", "gamma", "delta")):
            if name == "alpha":
                alpha = self._fixed_alpha()
                out[name] = self.learned if alpha is None else alpha
            else:
                out[name] = self._modules[name] if name in self._modules else self.fixed[name]
        return out

    def _fixed_alpha(self) -> float | None:
        """The float alpha computed with now, or None while a learned alpha runs."""
        return self.fixed["alpha"] if self.learned is None else self.warmup_alpha

    def set_param(self, name: str, value: float | None) -> None:
        """Set a fixed parameter (a schedule's current value; None leaves it unchanged).

        For a learned alpha the value replaces it until None hands over to it (a scheduled warm-up,
        as for ``entmax:alpha=learned``).
        """
        if name == "alpha" and self.learned is not None:
            self.warmup_alpha = None if value is None else float(value)
            return
        if name not in self.fixed:
            movable = sorted(self.fixed) + (["alpha"] if self.learned is not None else [])
            what = "is learned" if name in self._modules else "is not a parameter"
            raise ValueError(f"{self.name}: {name!r} {what}; a schedule moves a fixed parameter or a learned "
                             f"alpha (valid choices: {', '.join(movable) or '(none)'})")
        if value is not None:
            self.fixed[name] = float(value)

    def factor(self, n: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """The factor of rows with ``n`` allowed keys; ``n`` is (..., H, Lq) when a parameter is learned.

        Learned parameters broadcast as (H, 1) against ``n``; the result has the broadcast shape.
        """
        if self.kind == "softmax":
            return ssmax_factor(n, self._cast(self._value("s"), dtype), dtype)
        return asentmax_factor(n, self._cast(self._value("beta"), dtype), self._cast(self._value("gamma"), dtype),
                               self.fixed["delta"], dtype)

    @staticmethod
    def _cast(value: Tensor | float, dtype: torch.dtype) -> Tensor | float:
        return value.to(dtype) if isinstance(value, Tensor) else value

    def _check_layout(self, scores: Tensor, dim: int) -> None:
        heads = self.num_heads
        if dim % scores.dim() != scores.dim() - 1 or scores.dim() < 3 or scores.shape[-3] != heads:
            raise ValueError(
                f"{self.name} with learned parameters expects scores (..., num_heads={heads}, Lq, Lk) normalized "
                f"over dim=-1; got shape {tuple(scores.shape)} and dim={dim}"
            )

    def forward(self, scores: Tensor, dim: int = -1, mask: Tensor | None = None) -> Tensor:
        if len(self._modules) or self.learned is not None:
            self._check_layout(scores, dim)
        zm = scores.movedim(dim, -1)
        m = None if mask is None else torch.broadcast_to(mask, scores.shape).movedim(dim, -1)
        x = _scaled(zm, m, self.factor)
        if self.kind == "softmax":
            p = softmax(x, dim=-1, mask=m)
        else:
            fixed = self._fixed_alpha()
            alpha: Tensor | float
            if fixed is None:
                assert self.learned is not None  # no float alpha only while a learned alpha runs
                alpha = self.learned().to(x.dtype)
            else:
                alpha = fixed
            p = entmax(x, alpha=alpha, dim=-1, mask=m)
        return p.movedim(-1, dim).to(scores.dtype)

    def current(self) -> dict[str, Any]:
        """The parameters now: floats, or a list per head for learned ones (for logs)."""
        out: dict[str, Any] = {}
        for name, value in self.params.items():
            if isinstance(value, nn.Module):
                out[name] = [float(x) for x in value().detach().reshape(-1)]
            else:
                out[name] = value
        return out

    def extra_repr(self) -> str:
        return ", ".join([self.name] + [f"{k}={v}" for k, v in self.fixed.items()])


def scalable_softmax_factory(num_heads: int | None = None, s: Any = LEARNED, s_init: float = 1.0
                             ) -> LengthScaledNormalizer:
    return LengthScaledNormalizer("softmax", num_heads, s=s, s_init=s_init)


def scalable_entmax_factory(num_heads: int | None = None, alpha: Any = 1.5, beta: Any = LEARNED,
                            gamma: Any = LEARNED, delta: float = 1.0, beta_init: float = 0.5,
                            gamma_init: float = 0.0) -> LengthScaledNormalizer:
    return LengthScaledNormalizer("entmax", num_heads, alpha=alpha, beta=beta, gamma=gamma, delta=delta,
                                  beta_init=beta_init, gamma_init=gamma_init)

