"""What a normalizer must return, checked where its output is consumed.

A normalizer called as ``f(scores, dim=-1, mask=None)`` returns weights that

- have the shape of ``scores``;
- are finite and nonnegative on every row whose allowed scores are finite;
- are exactly 0 on masked entries (``mask`` False, or a score of ``-inf``);
- sum to 1 over the allowed entries of each row, and are all zeros on a row with nothing allowed.

(A row with a NaN or ``+inf`` among its allowed scores is not checked: the built-ins give NaN there.)

:func:`check_output` is called by the reference path of :class:`plugin.AttentionMechanism` and by
:class:`plugin.ContinuousAttention` on the normalizer's output before anything else uses it. The
shape is always checked (no cost). The values are checked only when asked for, because it reads a
few numbers back to the host: inside a :func:`check_normalizers` block (this thread / context
only) or with ``PLUGIN_CHECK_NORMALIZERS=1`` in the environment (the process); never under
``torch.compile``. Both raise ``ValueError`` naming the variant and what is wrong.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["ENV", "TOLERANCE", "check_normalizers", "check_output", "checking"]

ENV = "PLUGIN_CHECK_NORMALIZERS"
# largest accepted |row sum - 1| and the most negative accepted weight: the check is for outputs
# that are not probabilities at all, not for rounding (float32 sums over 1e5 keys stay far below)
TOLERANCE = 1e-3

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")

# stack of (entry, enabled) pairs, each removed by identity when its block ends (as plugin.use_path)
_CHECKING: contextvars.ContextVar[tuple[tuple[object, bool], ...]] = contextvars.ContextVar(
    "plugin_check_normalizers", default=()
)


@contextlib.contextmanager
def check_normalizers(enabled: bool = True) -> Iterator[None]:
    """Check the values every normalizer returns inside the block (this thread / context only; blocks nest).

    ``enabled=False`` turns the check off inside the block, whatever ``PLUGIN_CHECK_NORMALIZERS`` says.
    """
    if not isinstance(enabled, bool):
        raise ValueError(f"check_normalizers: enabled must be True or False, got {enabled!r}")
    entry = object()
    _CHECKING.set((*_CHECKING.get(), (entry, enabled)))
    try:
        yield
    finally:
        _CHECKING.set(tuple(e for e in _CHECKING.get() if e[0] is not entry))


def checking() -> bool:
    """Whether normalizer outputs are checked now: the innermost :func:`check_normalizers` block, else ``ENV``."""
    if torch.compiler.is_compiling():
        return False
    stack = _CHECKING.get()
    if stack:
        return stack[-1][1]
    env = os.environ.get(ENV, "").strip().lower()
    if env in _TRUE:
        return True
    if env in _FALSE:
        return False
    raise ValueError(f"{ENV} must be one of {', '.join(_TRUE)} or {', '.join(repr(f) for f in _FALSE)}; got {env!r}")


def check_output(p: object, scores: Tensor, mask: Tensor | None, name: str) -> Tensor:
    """``p``, the output of normalizer ``name`` for ``scores`` along the last dim, checked against the contract.

    ``mask`` is the bool mask the normalizer was given (broadcastable to ``scores``) or None.
    The shape always; the values when :func:`checking`.
    """
    if not isinstance(p, Tensor):
        raise ValueError(
            f"normalizer {name!r} returned {type(p).__name__}; expected a tensor of the shape of the scores, "
            f"{tuple(scores.shape)}"
        )
    if p.shape != scores.shape:
        raise ValueError(
            f"normalizer {name!r} returned weights of shape {tuple(p.shape)}; expected the shape of the scores, "
            f"{tuple(scores.shape)}"
        )
    if checking():
        problems = _problems(p, scores, mask)
        if problems:
            raise ValueError(f"normalizer {name!r} broke its contract ({ENV}): {'; '.join(problems)}")
    return p


def _problems(p: Tensor, scores: Tensor, mask: Tensor | None) -> list[str]:
    if p.numel() == 0:
        return []
    with torch.no_grad():
        p = p.detach()
        allowed = scores != float("-inf")
        if mask is not None:
            allowed = allowed & mask
        checked = ~(allowed & ~(scores < float("inf"))).any(-1, keepdim=True)  # rows with finite allowed scores
        has_key = allowed.any(-1, keepdim=True)
        work = p.to(torch.promote_types(p.dtype, torch.float32)) if p.is_floating_point() else p.double()
        nonfinite = checked & ~torch.isfinite(work)
        finite = torch.where(checked & ~nonfinite, work, torch.zeros_like(work))
        masked = torch.where(~allowed, finite.abs(), torch.zeros_like(work))
        sums = torch.where(allowed, finite, torch.zeros_like(work)).sum(-1, keepdim=True)
        summed = checked & has_key & ~nonfinite.any(-1, keepdim=True)  # a NaN is reported once, as a NaN
        sum_error = torch.where(summed, (sums - 1).abs(), torch.zeros_like(sums))
        n_nonfinite, lowest, n_masked, worst_masked, n_off, worst_sum = torch.stack([
            nonfinite.sum().to(work.dtype),
            finite.amin(),
            (masked != 0).sum().to(work.dtype),
            masked.amax(),
            (sum_error > TOLERANCE).sum().to(work.dtype),
            sum_error.amax(),
        ]).tolist()
    problems = []
    if n_nonfinite:
        problems.append(f"{int(n_nonfinite)} NaN or infinite weight(s) on rows whose scores are finite")
    if lowest < -TOLERANCE:
        problems.append(f"negative weights (down to {lowest:.3g})")
    if n_masked:
        problems.append(f"{int(n_masked)} nonzero weight(s) on masked entries (up to {worst_masked:.3g})")
    if n_off:
        problems.append(
            f"{int(n_off)} row sum(s) off by more than {TOLERANCE:g} (up to {worst_sum:.3g}); each row must sum to 1 "
            f"over its allowed entries (0 with nothing allowed)"
        )
    return problems
