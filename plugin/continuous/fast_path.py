"""The continuous fast path, and the protocol a continuous context implements to get it.

A continuous context whose density is placed by the mean and variance of the key positions
under the discrete attention implements :class:`MomentContext`:

``reduce_mask(mask, shape, device)``
    the bool mask (True = key exists, or None) as a 4-D tensor whose batch / head / query
    dimensions are kept only where it varies (size 1 elsewhere);
``key_positions(allowed, dtype)``
    the position of every key on the context's domain (zeros at the keys that do not exist);
``context_from_moments(mean, var, v, allowed)``
    the (B, H, Lq, D) context from the (B, H, Lq) mean and variance of the positions, the
    (B, Hkv, Lk, D) values and a per-key mask (b, 1 or Hkv, 1, Lk).

:class:`plugin.continuous.ContinuousContext` implements it. With a per-key mask (padding, no
causality, no additive mask, no dropout, no returned weights), :func:`continuous_fast_path`
appends the positions ``t - 1/2`` and ``(t - 1/2)^2`` to the values as two more columns: the
discrete variant's own fast path (SDPA for softmax, the chunked kernels for sparsemax/entmax)
then returns both moments along with the discrete context, and no (Lq, Lk) matrix is formed.
Without the discrete context (a continuous-only spec) only the two position columns are
attended (through SDPA, padded with zero columns to the query's head size).
A context without the protocol (or a mask that varies per query) keeps the reference path, and
the refusal says why (``CallRecord.refused``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["MomentContext", "continuous_fast_path"]


@runtime_checkable
class MomentContext(Protocol):
    """A continuous context computed from the first two moments of the key positions (see the module)."""

    def reduce_mask(self, mask: Tensor | None, shape: tuple[int, int, int, int], device: Any) -> Tensor: ...

    def key_positions(self, allowed: Tensor, dtype: torch.dtype) -> Tensor: ...

    def context_from_moments(self, mean: Tensor, var: Tensor, v: Tensor, allowed: Tensor) -> Tensor: ...


def continuous_fast_path(
    context: Any,
    discrete_context: bool,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    allowed: Tensor | None,
    discrete: Callable[[Tensor, Tensor, Tensor, Tensor | None], Any],
) -> tuple[str, Callable[..., Tensor] | None, dict[str, str]]:
    """``(name, runner, refused)`` for a continuous call with a per-key mask; ``runner`` None = reference.

    ``discrete(q, k, v, mask)`` chooses the discrete variant's path (a :class:`plugin.dispatch.Choice`);
    ``discrete_context`` adds the discrete attention's own context to the result.
    """
    if not isinstance(context, MomentContext):
        return "reference", None, {"+continuous": (
            f"the continuous context {type(context).__name__} does not implement reduce_mask / key_positions / "
            f"context_from_moments (plugin.continuous.MomentContext)")}
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    keys = context.reduce_mask(allowed, (B, H, Lq, Lk), q.device)
    if keys.shape[2] != 1 or keys.shape[1] not in (1, Hkv):
        return "reference", None, {"+continuous": "the mask varies per query (or per query head in a group)"}
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    # centred positions (less cancellation in the variance), zero at the keys that do not exist
    t = torch.where(keys, context.key_positions(keys, work) - 0.5, 0.0)
    t = t.squeeze(2).expand(B, Hkv, Lk).unsqueeze(-1)
    Dv = v.shape[-1]
    probe = torch.empty(B, Hkv, Lk, Dv + 2 if discrete_context else 2, dtype=work, device=v.device)
    choice = discrete(q.to(work), k.to(work), probe, allowed)
    refused = {f"{name}+continuous": reason for name, reason in choice.refused.items()}
    if choice.runner is None:
        return "reference", None, refused
    fast = choice.runner
    # SDPA's fused kernels want one head size for q, k and v: alone, the two position columns
    # are padded to q's (zero columns cost what the values would, where D + 2 columns would
    # pad q and k as well); the chunked kernels pay per column and take them as they are
    width = max(D, 2) if choice.name == "sdpa" and not discrete_context else 2

    def run(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor | None, additive: Tensor | None, causal: bool,
            scale: float) -> Tensor:
        values = v.to(work)
        moments = torch.cat([t, t * t], -1)
        if discrete_context:
            moments = torch.cat([values, moments], -1)
        elif width > 2:
            moments = torch.nn.functional.pad(moments, (0, width - 2))
        out = fast(q.to(work), k.to(work), moments, allowed, None, False, scale)
        at = Dv if discrete_context else 0
        mean = out[..., at]
        var = out[..., at + 1] - mean * mean
        result = context.context_from_moments(mean + 0.5, var, values, keys)
        if discrete_context:
            result = result + out[..., :Dv]
        return result.to(q.dtype)

    return f"{choice.name}+continuous", run, refused
