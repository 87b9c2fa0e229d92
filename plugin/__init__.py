"""Sparse, structured and continuous attention: the core (pure PyTorch).

Normalizers (scores -> probabilities): :func:`softmax`, :func:`sparsemax`, :func:`entmax15`,
:func:`entmax`, :func:`fusedmax`, :func:`oscarmax`. One attention function,
:func:`attention`, and its module form :class:`AttentionMechanism`. Every variant lives in
the registry (:func:`get_normalizer`, :func:`available_normalizers`,
:func:`register_normalizer`) and is named by a spec string such as ``"entmax:alpha=1.3"``;
it declares its fast paths (:mod:`plugin.paths`), which :mod:`plugin.dispatch` chooses from
(:func:`explain_path` tells which and why). See ``docs/architecture.md``.
"""

from __future__ import annotations

from typing import Any

from . import (
    builtins,  # noqa: F401  (registers the built-in variants)
    continuous,
    paths,
    recording,
)
from .attention import AttentionMechanism, attention, explain_path
from .continuous import ContinuousAttention
from .kernels import reference_path, use_path
from .normalizers import (
    LearnableAlpha,
    LengthScaledNormalizer,
    Normalizer,
    build_normalizer,
    entmax,
    entmax15,
    scalable_entmax,
    scalable_softmax,
    softmax,
    sparsemax,
)
from .normalizers.contract import check_normalizers
from .normalizers.structured import fusedmax, oscarmax
from .recording import CallRecord, record_calls
from .registry import (
    Param,
    available_normalizers,
    canonical_spec,
    parse_spec,
    register_continuous,
    register_normalizer,
    unregister,
    variants,
)
from .schedule import (
    STRATEGIES,
    Schedule,
    finish_schedules,
    parse_schedule,
    schedule_state,
    set_schedule_step,
)

__version__ = "0.1.0"


def get_normalizer(spec: str, num_heads: int | None = None) -> Any:
    """The normalizer module of a discrete spec, e.g. ``get_normalizer("entmax:alpha=1.3")``.

    The result is called as ``f(scores, dim=-1, mask=None)``. ``num_heads`` is needed for
    learned parameters (``"entmax:alpha=learned"``). Continuous specs are not normalizers:
    use :class:`AttentionMechanism` or :func:`attention` for them.
    """
    parts = parse_spec(spec)
    if len(parts) != 1 or parts[0].kind != "discrete":
        raise ValueError(
            f"get_normalizer: {spec!r} is not a discrete normalizer; valid choices: "
            f"{', '.join(sorted(variants('discrete')))} (continuous and combined specs go to "
            f"plugin.attention / plugin.AttentionMechanism)"
        )
    p = parts[0]
    return build_normalizer(p.variant, num_heads, p.params)


__all__ = [
    "AttentionMechanism",
    "CallRecord",
    "ContinuousAttention",
    "LearnableAlpha",
    "LengthScaledNormalizer",
    "Normalizer",
    "Param",
    "STRATEGIES",
    "Schedule",
    "attention",
    "available_normalizers",
    "canonical_spec",
    "check_normalizers",
    "continuous",
    "entmax",
    "entmax15",
    "explain_path",
    "finish_schedules",
    "fusedmax",
    "get_normalizer",
    "oscarmax",
    "parse_schedule",
    "parse_spec",
    "paths",
    "record_calls",
    "recording",
    "reference_path",
    "register_continuous",
    "register_normalizer",
    "scalable_entmax",
    "scalable_softmax",
    "schedule_state",
    "set_schedule_step",
    "softmax",
    "sparsemax",
    "unregister",
    "use_path",
    "variants",
]
