"""The input policy of :func:`plugin.attention`: checked once, at the public boundary, the same for every path.

Errors (``ValueError`` naming the argument):

- ``q``, ``k``, ``v`` not 4-D floating tensors, of different dtypes or devices, with ``H``,
  ``Hkv``, ``D`` or ``Dv`` equal to 0, with mismatched batch, key length or head size, or
  ``H`` not a multiple of ``Hkv``;
- ``scale`` not a finite real number (``None`` = ``1 / sqrt(D)``), ``dropout_p`` not a real
  number in [0, 1), ``causal`` / ``return_weights`` not booleans;
- ``mask`` not a bool or floating tensor, or of a shape that is not accepted (below).

Mask shapes: any shape that broadcasts to ``(B, H, Lq, Lk)`` (0-D, ``(Lk,)``, ``(Lq, Lk)``,
``(B, 1, Lq, Lk)``, ...), plus the key-padding mask ``(B, Lk)``, read as ``(B, 1, 1, Lk)``.
A 2-D mask whose first dimension equals both ``B`` and ``Lq`` (> 1) could be either, and is
refused: reshape it to ``(B, 1, 1, Lk)`` or ``(1, 1, Lq, Lk)``.

Values:

- bool masks: True = attend. Float masks are added to the scores; ``-inf`` masks the key;
  a ``NaN`` or ``+inf`` in a float mask makes the output NaN in the query rows it reaches;
- scores (``scale q k^T + mask``): ``-inf`` counts as masked, a query row without an allowed
  key gives zeros (weights and output);
- a NaN or an infinity anywhere in ``q``, ``k`` or ``v`` makes the output (and the weights)
  NaN for that batch element and head: for the whole ``(b, h)`` slice, whatever the masks;
  no kernel ever sees the non-finite values. Gradients do not flow into NaN outputs;
- finite inputs so large that ``scale q k^T`` could overflow float32 (bounded by
  ``max|q| max|k| D |scale|``, whatever the dtype) are computed on the reference path (in
  their own dtype), where an overflow to ``-inf`` masks the key and one to ``+inf`` (or a
  NaN) makes the row NaN, exactly as for given scores;
- empty inputs (``B``, ``Lq`` or ``Lk`` equal to 0) return empty or zero results of the
  expected shapes: out ``(B, H, Lq, Dv)``, weights ``(B, H, Lq, Lk)`` (zeros when ``Lk = 0``:
  no allowed key). Their calls are recorded with the path ``"empty"``.

Each check reads its state through a small function (:func:`check_qkv`, :func:`split_mask`,
:func:`input_magnitudes`, :func:`nonfinite_slices`, :func:`scores_may_overflow`).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, overload

import torch
from torch import Tensor

__all__ = [
    "check_flag",
    "check_qkv",
    "check_scalars",
    "input_magnitudes",
    "mark_invalid",
    "nonfinite_slices",
    "scores_may_overflow",
    "split_mask",
]

# scores are computed in float32 (half inputs) or in the input's dtype (float32, float64);
# a bound this far below the largest value leaves room for the additive mask
_OVERFLOW_MARGIN = 4.0


def check_qkv(q: Any, k: Any, v: Any) -> None:
    """Shapes, dtypes and devices of ``q`` (B, H, Lq, D), ``k`` (B, Hkv, Lk, D), ``v`` (B, Hkv, Lk, Dv)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            dtype = f" {t.dtype}" if isinstance(t, Tensor) else ""
            raise ValueError(f"attention: {name} must be a 4-D floating tensor (B, H, L, D), got {shape}{dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention: q, k and v must have one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError(f"attention: q, k and v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, _, D = q.shape
    if H == 0:
        raise ValueError("attention: q has H = 0 heads; H must be >= 1")
    if D == 0:
        raise ValueError("attention: q and k have head size D = 0; D must be >= 1")
    if k.shape[0] != B or v.shape[0] != B or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(
            f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be (B={B}, Hkv, Lk, D) with the same Hkv and Lk"
        )
    if k.shape[3] != D:
        raise ValueError(f"attention: k's last dimension {k.shape[3]} must equal q's {D}")
    Hkv = k.shape[1]
    if Hkv == 0:
        raise ValueError("attention: k and v have Hkv = 0 heads; Hkv must be >= 1")
    if v.shape[3] == 0:
        raise ValueError("attention: v has head size Dv = 0; Dv must be >= 1")
    if H % Hkv:
        raise ValueError(f"attention: query heads H={H} must be a multiple of key/value heads Hkv={Hkv}")


def _real(value: Any) -> bool:
    if type(value) is float or type(value) is int:  # the usual case, without the slower ABC check
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_scalars(scale: Any, dropout_p: Any, D: int) -> tuple[float, float]:
    """``scale`` (None = ``1 / sqrt(D)``) and ``dropout_p`` as floats, or ValueError naming them."""
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif not _real(scale) or not math.isfinite(float(scale)):
        raise ValueError(f"attention: scale must be a finite real number or None (1 / sqrt(D)), got {scale!r}")
    if not _real(dropout_p) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"attention: dropout_p must be a real number in [0, 1), got {dropout_p!r}")
    return float(scale), float(dropout_p)


def check_flag(name: str, value: Any) -> bool:
    """A boolean argument (``True``/``False``, or the integers 0 and 1)."""
    if value is True or value is False or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"attention: {name} must be True or False, got {value!r}")


def split_mask(mask: Any, B: int, H: int, Lq: int, Lk: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(allowed, additive, invalid_rows)`` of ``mask``, each 4-D (broadcastable to (B, H, Lq, Lk)) or None.

    ``allowed`` is a bool mask (True = attend); ``additive`` a float mask with its NaN and
    ``+inf`` entries replaced by 0; ``invalid_rows`` (..., 1) marks the query rows such an
    entry reaches (their output becomes NaN, see :func:`mark_invalid`).
    """
    if mask is None:
        return None, None, None
    if not isinstance(mask, Tensor):
        raise ValueError(f"attention: mask must be a tensor (bool: True = attend, or float: added), got "
                         f"{type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"attention: mask must be bool (True = attend) or float (additive), got {mask.dtype}")
    target = (B, H, Lq, Lk)
    accepted = "shapes broadcastable to (B, H, Lq, Lk), or (B, Lk) for key padding"
    if mask.dim() > 4:
        raise ValueError(
            f"attention: mask of shape {tuple(mask.shape)} has more than 4 dimensions; accepted: {accepted}"
        )
    if mask.dim() == 2 and mask.shape[0] == B and mask.shape[0] != 1 and mask.shape[1] in (1, Lk):
        if mask.shape[0] == Lq:
            raise ValueError(
                f"attention: a 2-D mask of shape {tuple(mask.shape)} is ambiguous when B = Lq = {B}: it could be "
                f"(B, Lk) key padding or (Lq, Lk); pass it as (B, 1, 1, Lk) or (1, 1, Lq, Lk)"
            )
        mask = mask[:, None, None, :]  # (B, Lk) key padding
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    if mask.dim() != 4:
        mask = mask.reshape(shape)
    # broadcastable to the target and no larger (an O(1) check on the shapes, no tensor op)
    if not all(m == t or m == 1 for m, t in zip(shape, target)):
        raise ValueError(f"attention: mask of shape {shape} does not fit (B, H, Lq, Lk) = {target}; "
                         f"accepted: {accepted}")
    if mask.dtype == torch.bool:
        return mask, None, None
    bad = ~(mask < float("inf"))  # NaN and +inf (a NaN compares False)
    if mask.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(bad.any()):
        return None, mask, None  # the usual case, kept without a copy (the host reads the flag at no cost)
    return None, mask.masked_fill(bad, 0.0), bad.any(-1, keepdim=True)


def input_magnitudes(q: Tensor, k: Tensor, v: Tensor) -> tuple[float, float, float]:
    """``max |q|``, ``max |k|``, ``max |v|`` (NaN or inf when a tensor holds a non-finite value); one host sync."""
    # aminmax reads each tensor once without a temporary (|t| would be one) and propagates NaN;
    # the six extremes reach the host in one stack and one transfer
    lo_q, hi_q, lo_k, hi_k, lo_v, hi_v = torch.stack(
        [*torch.aminmax(q.detach()), *torch.aminmax(k.detach()), *torch.aminmax(v.detach())]
    ).tolist()
    return _largest(lo_q, hi_q), _largest(lo_k, hi_k), _largest(lo_v, hi_v)


def _largest(low: float, high: float) -> float:
    """``max(|low|, |high|)``, NaN when either is NaN (Python's ``max`` would drop a NaN)."""
    if low != low or high != high:
        return math.nan
    return max(-low, high)


def nonfinite_slices(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The (B, H) slices reached by a non-finite value of q, k or v, and q, k, v with those values set to 0.

    Returns ``(bad, q, k, v)``; ``bad`` is (B, H, 1, 1) bool.
    """
    bad_q = ~torch.isfinite(q).flatten(2).all(-1)
    bad_k = ~torch.isfinite(k).flatten(2).all(-1)
    bad_v = ~torch.isfinite(v).flatten(2).all(-1)
    H, Hkv = q.shape[1], k.shape[1]
    bad = bad_q | (bad_k | bad_v).repeat_interleave(H // Hkv, dim=1)
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    q = torch.where(torch.isfinite(q), q, zero)
    k = torch.where(torch.isfinite(k), k, zero)
    v = torch.where(torch.isfinite(v), v, zero)
    return bad[..., None, None], q, k, v


def scores_may_overflow(qmax: float, kmax: float, D: int, scale: float) -> bool:
    """True when ``scale q k^T`` could overflow float32.

    float32 whatever the input dtype: the compiled kernels compute float64 inputs in float32
    too, and the reference path keeps float64, so such calls go there.
    """
    return qmax * kmax * D * abs(scale) >= torch.finfo(torch.float32).max / _OVERFLOW_MARGIN


@overload
def mark_invalid(t: Tensor, bad_slices: Tensor | None, invalid_rows: Tensor | None) -> Tensor: ...
@overload
def mark_invalid(t: None, bad_slices: Tensor | None, invalid_rows: Tensor | None) -> None: ...
def mark_invalid(t: Tensor | None, bad_slices: Tensor | None, invalid_rows: Tensor | None) -> Tensor | None:
    """``t`` (out or weights, (B, H, Lq, X)) with NaN on the bad (b, h) slices and the invalid query rows."""
    if t is None:
        return None
    for bad in (bad_slices, invalid_rows):
        if bad is not None:
            t = torch.where(bad, torch.full((), float("nan"), dtype=t.dtype, device=t.device), t)
    return t
