"""Shared plumbing of the normalizers: argument checks, masks, dtypes, the module wrapper."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..registry import Param, Variant

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed in float32; float32/float64 as they are."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


# gamma divides the scores, so the gradient grows as 1 / gamma: below this it overflows
# float32 for ordinary scores (fairseq then stops with "gradients are Nan/Inf")
GAMMA_MIN = 1e-6
GAMMA = Param("gamma", 1.0, float, low=GAMMA_MIN)  # temperature: the scores are divided by gamma


def check_param(param: Param, value: Any, variant: str) -> float:
    """``value`` (a number) checked against a registered parameter: finite and in range, else ValueError."""
    if isinstance(value, str):
        raise ValueError(f"{variant}: {param.name} must be a number, got {value!r}; expected {param.valid_range()}")
    return param.validate(value, variant)


def scaled_by_gamma(z: Tensor, allowed: Tensor, gamma: float) -> Tensor:
    """``(z - max(z over allowed)) / gamma``: the row maximum is subtracted *before* dividing.

    All these normalizers are shift invariant, and shifting first keeps the rounding of the
    division at the size of the differences (float32 scores near 1e4 with gamma = 3: 3e-8 from
    float64, against 1.3e-4 when dividing first).
    """
    if gamma == 1.0:
        return z
    x, _ = shift_by_max(z, allowed)
    return x / gamma


def prepare(scores: Tensor, dim: int, mask: Tensor | None, variant: str) -> tuple[Tensor, Tensor, int, Tensor]:
    """Validate and bring ``scores`` to the last dimension in the compute dtype.

    Returns ``(z, allowed, dim, invalid)``: ``z`` is ``scores`` with ``dim`` moved last (float32
    for half inputs), ``allowed`` the bool tensor of the same shape that is True where
    attending is allowed (``mask`` and ``scores != -inf``), ``dim`` the normalized dim, and
    ``invalid`` (keepdim) the rows with a NaN or ``+inf`` among their allowed scores: their
    scores are replaced by zeros here (no kernel sees a NaN) and :func:`finish` makes them NaN.
    """
    if not isinstance(scores, Tensor):
        raise ValueError(f"{variant}: scores must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise ValueError(f"{variant}: scores must be a floating-point tensor, got dtype {scores.dtype}")
    if scores.dim() == 0:
        raise ValueError(f"{variant}: scores must have at least one dimension")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise ValueError(f"{variant}: dim must be an integer, got {dim!r}")
    if not -scores.dim() <= dim < scores.dim():
        raise ValueError(f"{variant}: dim={dim} is out of range for scores with {scores.dim()} dimensions")
    dim = dim % scores.dim()
    z = scores.to(compute_dtype(scores.dtype))
    allowed = z != float("-inf")
    if mask is not None:
        allowed = allowed & broadcast_mask(mask, scores.shape, variant)
    z, allowed = z.movedim(dim, -1), allowed.movedim(dim, -1)
    invalid = (allowed & ~(z < float("inf"))).any(-1, keepdim=True)  # NaN or +inf where allowed
    z = torch.where(invalid, torch.zeros_like(z), z)
    return z, allowed, dim, invalid


def broadcast_mask(mask: Tensor, shape: torch.Size, variant: str, name: str = "mask") -> Tensor:
    """Check that ``mask`` is a bool tensor broadcastable to ``shape`` and expand it."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{variant}: {name} must be a bool tensor (True = attend), got {got}")
    # broadcastable to ``shape`` and no larger, checked on the sizes (torch.broadcast_shapes costs
    # more than the normalizer on a decoding step's single row)
    fits = mask.dim() <= len(shape) and all(
        m == s or m == 1 for m, s in zip(reversed(mask.shape), reversed(shape))
    )
    if not fits:
        raise ValueError(
            f"{variant}: {name} of shape {tuple(mask.shape)} is not broadcastable to scores of shape {tuple(shape)}"
        )
    return mask.expand(shape)


def finish(p: Tensor, dim: int, dtype: torch.dtype, invalid: Tensor | None = None) -> Tensor:
    """NaN on the ``invalid`` rows (see :func:`prepare`), the normalized dimension moved back, the input dtype."""
    if invalid is not None:
        p = torch.where(invalid, torch.full_like(p, float("nan")), p)
    return p.movedim(-1, dim).to(dtype)


def shift_by_max(z: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """``z - max(z over allowed)`` and whether the row has any allowed entry (both keepdim)."""
    any_allowed = allowed.any(-1, keepdim=True)
    if z.shape[-1] == 0:  # nothing to normalize: an empty result
        return z, any_allowed
    zmax = torch.where(allowed, z, float("-inf")).amax(-1, keepdim=True)
    zmax = torch.where(any_allowed, zmax, torch.zeros_like(zmax)).detach()
    return z - zmax, any_allowed


class Normalizer(nn.Module):
    """A normalizer with its parameters bound: ``forward(scores, dim=-1, mask=None) -> probs``."""

    def __init__(self, function: Callable[..., Tensor], name: str, **params: Any) -> None:
        super().__init__()
        self.function = function
        self.name = name
        self.params = params

    def forward(self, scores: Tensor, dim: int = -1, mask: Tensor | None = None) -> Tensor:
        return self.function(scores, dim=dim, mask=mask, **self.params)

    def set_param(self, name: str, value: float | None) -> None:
        """Set parameter ``name`` (a schedule's current value; None leaves it unchanged)."""
        if name not in self.params:
            raise ValueError(
                f"{self.name} has no parameter {name!r}; valid parameters: {', '.join(self.params) or '(none)'}"
            )
        if value is not None:
            self.params[name] = float(value)

    def extra_repr(self) -> str:
        return ", ".join([self.name] + [f"{k}={v}" for k, v in self.params.items()])


def build_normalizer(variant: Variant, num_heads: int | None, params: dict[str, Any]) -> nn.Module:
    """The module of a discrete variant: its factory's, or its plain function in a :class:`Normalizer`."""
    if variant.factory is not None:
        return variant.factory(num_heads=num_heads, **params)
    assert variant.function is not None  # register_normalizer requires one of them
    return Normalizer(variant.function, name=variant.name, **params)
