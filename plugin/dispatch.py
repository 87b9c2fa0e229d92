"""The one dispatcher: which path computes an attention call, and why the others did not.

A mechanism's discrete variant declares its paths (:mod:`plugin.paths`); :func:`choose` tries
them in order and takes the first whose ``supports(call)`` returns None. A forced path
(:func:`plugin.use_path`, ``PLUGIN_ATTENTION_PATH``) is the only candidate tried: ``reference``
skips them all, a declared path that refuses with :class:`plugin.paths.Unavailable` raises
``ValueError``, any other refusal (or a path the variant does not declare) leaves the call on
the reference path. The reasons are kept in :attr:`Choice.refused` and reported by
:func:`plugin.record_calls` (``CallRecord.refused``) and :func:`plugin.explain_path`.

Continuous specs take ``<discrete path>+continuous`` when the continuous context implements
the moment protocol of :mod:`plugin.continuous.fast_path`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .kernels import forced_path
from .paths import Call, Path, Runner, Unavailable

__all__ = ["Choice", "choose", "select"]


@dataclass(frozen=True)
class Choice:
    """The chosen path (``runner`` is None for ``"reference"``) and why the candidates before it were refused."""

    name: str
    runner: Runner | None = None
    refused: dict[str, str] = field(default_factory=dict)


def choose(paths: Sequence[Path], call: Call) -> Choice:
    """The first of ``paths`` that supports ``call`` (honouring ``call.forced``), else the reference."""
    forced = call.forced
    if forced == "reference":
        return Choice("reference", None, {"*": "the reference path is forced"})
    refused: dict[str, str] = {}
    for path in paths:
        if forced is not None and path.name != forced:
            continue
        reason = path.supports(call)
        if reason is None:
            return Choice(path.name, path.build(call), refused)
        if forced is not None and isinstance(reason, Unavailable):
            raise ValueError(
                f"PLUGIN_ATTENTION_PATH / use_path: the {forced!r} attention path cannot run this call: {reason}"
            )
        refused[path.name] = str(reason)
    if forced is not None and forced not in refused:
        refused[forced] = "forced, but not a path of this variant"
    if not paths:
        refused["*"] = "the variant declares no fast path"
    return Choice("reference", None, refused)


def _call(mechanism: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None,
          causal: bool, dropout_p: float, return_weights: bool) -> Call:
    return Call.of(q, k, v, mask, bias, causal, dropout_p, return_weights, mechanism.normalizer,
                   mechanism.path_params(), forced_path())


def select(mechanism: Any, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, dropout_p: float,
           return_weights: bool, bias: Tensor | None = None) -> Choice:
    """The path of a call of ``mechanism`` (an :class:`plugin.AttentionMechanism`) after the boundary checks.

    ``q`` is (B, H, Lq, D); ``k``, ``v`` are (B, Hkv, Lk, D) (not repeated to H heads); ``mask``
    None or bool broadcastable to (B, H, Lq, Lk), without causality (``causal`` carries it);
    ``bias`` None or an additive float mask. The runner is called as
    ``runner(q, k, v, mask, bias, causal, scale)``.
    """
    call = _call(mechanism, q, k, v, mask, bias, causal, dropout_p, return_weights)
    if mechanism.continuous is None:
        return choose(mechanism.paths, call)
    if call.forced == "reference":
        return Choice("reference", None, {"*": "the reference path is forced"})
    reason = (call.return_weights and "the weights are returned") or (call.dropout_p > 0 and "dropout") or (
        call.causal and "causality (a mask per query)") or (call.bias and "an additive mask")
    if reason:
        return Choice("reference", None, {"+continuous": f"continuous fast paths take per-key masks only: {reason}"})
    from .continuous.fast_path import continuous_fast_path

    def discrete(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Choice:
        return choose(mechanism.paths, _call(mechanism, q, k, v, mask, None, False, 0.0, False))

    return Choice(*continuous_fast_path(mechanism.continuous, mechanism.discrete_context, q, k, v, mask, discrete))

