"""Positions as attention biases: ALiBi (Press et al., 2022), and the names of the positional schemes.

ALiBi adds ``-m_h * (i - j)`` to the score of query ``i`` and key ``j`` in head ``h``
(causal self-attention; ``-m_h * |i - j|`` for a bidirectional encoder) and uses no position
embedding at all. The slopes ``m_h`` are the geometric sequence of the ALiBi paper: for
``n`` heads, a power of two, ``m_h = 2 ** (-8 h / n)``, ``h = 1..n``; otherwise the slopes of
the largest power of two ``p < n``, followed by every other slope of ``2 p`` heads for the
``n - p`` remaining heads.

:class:`ALiBiAttentionMechanism` is an :class:`plugin.AttentionMechanism` that adds this bias
to every call, so any mechanism (sparse or dense) runs with ALiBi, through every path that
takes an additive mask. The bias depends only on the query and key counts: queries are the
last ``Lq`` of the ``Lk`` positions (cached decoding, as :func:`plugin.attention` aligns
``causal``), so a cache gives the same scores as the full sequence.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .attention import AttentionMechanism

POSITIONS = ("sinusoidal", "learned", "rope", "nope", "alibi")
"""Positional schemes the adapters offer by name (each adapter states which of them it takes)."""


def check_positions(value: Any, choices: tuple[str, ...] = POSITIONS, name: str = "positions") -> str:
    """``value`` if it is one of ``choices``; ValueError naming ``name`` and the choices otherwise."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}={value!r} is not a positional scheme; valid choices: {', '.join(choices)}")
    return value


def alibi_slopes(num_heads: int) -> Tensor:
    """The ALiBi slope of each head, float64 of shape (num_heads,), largest first (ALiBi paper, section 3)."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads must be an integer >= 1, got {num_heads!r}")

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = power_of_two(p)
    if p < num_heads:
        slopes += power_of_two(2 * p)[0::2][: num_heads - p]
    return torch.tensor(slopes, dtype=torch.float64)


def alibi_bias(slopes: Tensor, q_len: int, k_len: int, symmetric: bool = False,
               dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
    """The ALiBi bias (1, H, q_len, k_len) for queries at the last ``q_len`` of ``k_len`` positions.

    ``bias[0, h, i, j] = -slopes[h] * d`` with ``d = (k_len - q_len + i) - j`` (causal; keys after
    the query get a positive ``d`` of the other sign, which a causal mask removes) or ``|d|``
    (``symmetric=True``, a bidirectional encoder).
    """
    if q_len > k_len:
        raise ValueError(f"alibi_bias: q_len ({q_len}) must not exceed k_len ({k_len})")
    i = torch.arange(k_len - q_len, k_len, device=device, dtype=torch.float32)
    j = torch.arange(k_len, device=device, dtype=torch.float32)
    d = i[:, None] - j[None, :]
    if symmetric:
        d = d.abs()
    return (-slopes.to(device=device, dtype=torch.float32)[:, None, None] * d).unsqueeze(0).to(dtype)


def with_bias(mask: Tensor | None, bias: Tensor) -> Tensor:
    """``mask`` (None, bool: True = attend, or additive float) combined with an additive ``bias``."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return bias.masked_fill(~mask, float("-inf"))
    return mask.to(bias.dtype) + bias


class ALiBiAttentionMechanism(AttentionMechanism):
    """An :class:`plugin.AttentionMechanism` with the ALiBi bias added to its scores.

    ``ALiBiAttentionMechanism("entmax:alpha=1.5", num_heads=8)``; ``symmetric=True`` for a
    bidirectional encoder (``-m |i - j|``). The slopes follow from ``num_heads`` and are neither
    parameters nor buffers (so they survive meta-device construction, as in transformers'
    ``from_pretrained``): the state dict is that of the plain mechanism. ``forward`` has the
    signature of :func:`plugin.attention`; the bias is added to ``mask`` (bool or additive), and
    ``causal`` is applied as usual.
    """

    def __init__(self, spec: Any, num_heads: int, role: str | None = None, schedule: str | None = None,
                 symmetric: bool = False) -> None:
        super().__init__(spec, num_heads=num_heads, role=role, schedule=schedule)
        self.symmetric = bool(symmetric)
        self.slope_values = tuple(alibi_slopes(num_heads).tolist())

    @property
    def slopes(self) -> Tensor:
        """The slope of each head, float32 (H,)."""
        return torch.tensor(self.slope_values, dtype=torch.float32)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", positions='alibi'{', symmetric=True' if self.symmetric else ''}"

    def position_bias(self, q_len: int, k_len: int, dtype: torch.dtype = torch.float32, device: Any = None) -> Tensor:
        """The ALiBi bias (1, H, q_len, k_len) this mechanism adds."""
        return alibi_bias(self.slopes, q_len, k_len, self.symmetric, dtype, device)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False,
                scale: float | None = None, dropout_p: float = 0.0,
                return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
        if q.dim() != 4 or k.dim() != 4 or q.shape[1] != len(self.slope_values):
            raise ValueError(f"ALiBiAttentionMechanism: q must be (B, H, Lq, D) with H = {len(self.slope_values)} "
                             f"heads and k (B, Hkv, Lk, D); got q {tuple(q.shape)}, k {tuple(k.shape)}")
        work = q.dtype if q.dtype == torch.float64 else torch.float32
        B, _, Lq, _ = q.shape
        Lk = k.shape[2]
        if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[0] == B != 1 and mask.shape[1] in (1, Lk):
            if B == Lq:
                raise ValueError(f"attention: a 2-D mask of shape {tuple(mask.shape)} is ambiguous when B = Lq = "
                                 f"{B}: it could be (B, Lk) key padding or (Lq, Lk); pass it as (B, 1, 1, Lk) or "
                                 f"(1, 1, Lq, Lk)")
            mask = mask[:, None, None, :]  # (B, Lk) key padding, as plugin.attention reads it
        bias = self.position_bias(Lq, Lk, work, q.device)
        return super().forward(q, k, v, mask=with_bias(mask, bias), causal=causal, scale=scale,
                               dropout_p=dropout_p, return_weights=return_weights)
