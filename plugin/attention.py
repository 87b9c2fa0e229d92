"""One attention function for every mechanism: ``attention(q, k, v, normalizer=...)``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .dispatch import Choice, select
from .inputs import (
    check_flag,
    check_qkv,
    check_scalars,
    input_magnitudes,
    mark_invalid,
    nonfinite_slices,
    scores_may_overflow,
    split_mask,
)
from .normalizers.base import Normalizer, build_normalizer
from .normalizers.contract import check_output
from .recording import CallRecord, notify, recording
from .registry import ParsedSpec, Variant, canonical_spec, parse_spec, variant_of_function
from .schedule import Schedule, check_step, parse_schedule


class AttentionMechanism(nn.Module):
    """An attention mechanism built from a spec string.

    ``AttentionMechanism("entmax:alpha=learned", num_heads=8)`` holds the normalizer (and
    its learnable state), and, for continuous specs, the continuous-context module.
    ``forward`` has the signature of :func:`attention`. Adapters set ``role`` (for example
    ``"encoder"``, ``"decoder"``, ``"cross"``), which :func:`plugin.record_calls` reports.

    ``schedule`` (a schedule string, see :mod:`plugin.schedule`) moves one parameter of the
    discrete part with the training step, which the buffer ``schedule_step`` holds (set it
    with :meth:`set_schedule_step` or :func:`plugin.set_schedule_step`); the spec is where the
    schedule ends. :func:`plugin.record_calls` reports the spec computed at each call
    (:meth:`current_spec`, e.g. ``"entmax:alpha=1.25"`` half-way from softmax to 1.5-entmax).
    """

    # a module called as normalizer(scores, dim=-1, mask=None) -> probabilities (any registered variant's)
    normalizer: Any
    # the buffer holding a schedule's step (registered only with a schedule)
    schedule_step: Tensor

    def __init__(
        self,
        spec: str | nn.Module,
        num_heads: int | None = None,
        role: str | None = None,
        schedule: str | None = None,
    ) -> None:
        super().__init__()
        self.role = role
        self.num_heads = num_heads
        self.continuous: nn.Module | None = None
        self._variant: Variant | None = None  # the discrete variant, whose paths the dispatcher tries
        self.schedule: Schedule | None = None
        self.schedule_step_value = 0
        if isinstance(spec, nn.Module) or callable(spec) and not isinstance(spec, str):
            if schedule is not None:
                raise ValueError("AttentionMechanism: a schedule needs a spec string (its parameter is checked there)")
            self.spec = getattr(spec, "name", None) or type(spec).__name__
            self.normalizer = spec if isinstance(spec, nn.Module) else Normalizer(spec, name=self.spec)
            self.discrete_context = True
            self.learnable = any(True for _ in self.normalizer.parameters())
            # a registered variant's plain function (also inside a Normalizer) keeps the variant's paths
            self._variant = variant_of_function(getattr(self.normalizer, "function", None))
            return
        parts = parse_spec(spec)
        self.spec = "+".join(str(p) for p in parts)
        discrete = [p for p in parts if p.kind == "discrete"]
        continuous = [p for p in parts if p.kind == "continuous"]
        # A continuous-only spec places its density by the moments of a discrete softmax
        # over the same keys; only the continuous context is returned.
        base = discrete[0] if discrete else parse_spec("softmax")[0]
        self._variant = base.variant
        self.normalizer = build_normalizer(base.variant, num_heads, base.params)
        self.discrete_context = bool(discrete)
        if continuous:
            c = continuous[0]
            assert c.variant.factory is not None  # register_continuous requires one
            self.continuous = c.variant.factory(num_heads=num_heads, **c.params)
        self.learnable = any(True for _ in self.parameters())
        if schedule is not None:
            self.schedule = parse_schedule(schedule, self.spec)
            # the step, saved with the model: a resumed model continues with the same value
            self.register_buffer("schedule_step", torch.zeros((), dtype=torch.long))
            self._discrete_part = discrete[0]
            learned = getattr(self.normalizer, "learned", None)
            if learned is not None:  # the learned alpha takes over from the schedule's end
                learned.reset(self.schedule.end)
            self._apply_schedule()

    # -- schedules (plugin.schedule)

    def set_schedule_step(self, step: int) -> None:
        """Set the training step that the schedule reads (an integer >= 0)."""
        if self.schedule is None:
            raise ValueError(f"set_schedule_step: the mechanism {self.spec!r} has no schedule")
        check_step(step, "set_schedule_step: step")  # before the step or its buffer changes
        self.schedule_step_value = int(step)
        self.schedule_step.fill_(int(step))
        self._apply_schedule()

    def scheduled_value(self) -> float | None:
        """The scheduled parameter's value now (None without a schedule, or once a learned alpha took over)."""
        if self.schedule is None or self._learned_took_over():
            return None
        return self.schedule.value(self.schedule_step_value)

    def current_spec(self) -> str:
        """The spec this mechanism computes now: ``spec`` with a schedule's current value filled in."""
        value = self.scheduled_value()
        if value is None or self.schedule is None:
            return self.spec
        part = self._discrete_part
        name = self.schedule.param
        now = ParsedSpec(part.variant, {**part.params, name: value}, tuple(dict.fromkeys(part.given + (name,))))
        return "+".join([str(now)] + self.spec.split("+")[1:])

    def _learned_took_over(self) -> bool:
        return self.schedule is not None and getattr(self.normalizer, "learned", None) is not None and (
            self.schedule_step_value >= self.schedule.final_step
        )

    def _apply_schedule(self) -> None:
        if self.schedule is not None:
            self.normalizer.set_param(self.schedule.param, self.scheduled_value())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.schedule is not None and self.schedule_step.device.type != "meta":
            self.schedule_step_value = int(self.schedule_step)
            self._apply_schedule()

    def extra_repr(self) -> str:
        text = f"spec={self.spec!r}" + (f", role={self.role!r}" if self.role else "")
        return text + (f", schedule={str(self.schedule)!r}" if self.schedule is not None else "")

    def forward(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor | None = None,
        causal: bool = False,
        scale: float | None = None,
        dropout_p: float = 0.0,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        q, k, v, allowed, additive, causal, scale, dropout_p, return_weights, invalid_rows = _checked_call(
            q, k, v, mask, causal, scale, dropout_p, return_weights
        )
        B, H, Lq, D = q.shape
        Lk = k.shape[-2]

        if B == 0 or Lq == 0 or Lk == 0:
            choice = Choice("empty", None, {"*": "an empty input"})
            weights = q.new_zeros(B, H, Lq, Lk)  # no allowed key: zero weights
            out = torch.matmul(weights, _repeat_kv(k, v, H)[1])
            bad = None
        else:
            choice, out, weights, bad = self._compute(q, k, v, allowed, additive, causal, scale, dropout_p,
                                                    return_weights)
        out = mark_invalid(out, bad, invalid_rows)
        weights = mark_invalid(weights, bad, invalid_rows)
        if torch.compiler.is_compiling():
            _record_traced_call(self.spec, self.role, choice.name, self.training)
        elif recording():
            spec = self.current_spec()
            notify(CallRecord(spec, self.role, tuple(q.shape), (B, H, Lk, k.shape[-1]), choice.name, self.training,
                              dict(choice.refused)))
        if return_weights:
            return out, weights
        return out

    def _compute(self, q, k, v, allowed, additive, causal, scale, dropout_p, return_weights):
        """``(choice, out, weights, bad_slices)`` for a non-empty call that passed the checks."""
        B, H, Lq, D = q.shape
        Lk = k.shape[-2]
        if torch.compiler.is_compiling():
            # no host sync in a graph: the non-finite slices are found and cleared unconditionally,
            # and the magnitudes are not read (the bound for score overflow is not checked)
            bad, q, k, v = nonfinite_slices(q, k, v)
            overflow = False
        else:
            qmax, kmax, vmax = input_magnitudes(q, k, v)
            bad = None
            if not math.isfinite(qmax + kmax + vmax):  # NaN or inf: the (b, h) slices become NaN
                bad, q, k, v = nonfinite_slices(q, k, v)
                qmax, kmax, vmax = input_magnitudes(q, k, v)
            overflow = scores_may_overflow(qmax, kmax, D, scale)
        if overflow:  # the reference path computes the scores and applies the rules for +-inf scores
            choice = Choice("reference", None, {"*": "the scores could overflow float32 (see plugin.inputs)"})
        else:  # fast paths take k/v with Hkv heads and causality as a flag (no (Lq, Lk) mask built)
            choice = select(self, q, k, v, allowed, causal, dropout_p, return_weights, additive)
        if choice.runner is not None:
            return choice, choice.runner(q, k, v, allowed, additive, causal, scale), None, bad
        if self.continuous is not None:  # the continuous context reads v per query head
            k, v = _repeat_kv(k, v, H)
        if causal:
            allowed = _with_causal(allowed, Lq, Lk, q.device)
        out, weights = self._reference(q, k, v, allowed, additive, scale, dropout_p)
        return choice, out, weights, bad

    # -- fast paths (plugin.dispatch)

    @property
    def paths(self) -> tuple[Any, ...]:
        """The fast paths of the discrete variant, in the order they are tried (:mod:`plugin.paths`)."""
        return self._variant.paths if self._variant is not None else ()

    def path_params(self) -> dict[str, Any]:
        """The discrete variant's parameters now: its defaults, overridden by the normalizer's ``params``."""
        defaults = self._variant.defaults() if self._variant is not None else {}
        params = getattr(self.normalizer, "params", None)
        if params:
            defaults.update(params)
        return defaults

    def _normalizer_name(self) -> str:
        """The discrete variant's name (errors name it), or the name of a normalizer handed in unregistered."""
        if self._variant is not None:
            return self._variant.name
        return getattr(getattr(self.normalizer, "function", None), "__name__", None) or self.spec

    def _reference(self, q, k, v, allowed, additive, scale, dropout_p):
        work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        scores = _grouped_matmul(q.to(work), k.to(work).transpose(-1, -2)) * scale
        if additive is not None:
            scores = scores + additive.to(work)
        # the normalizer's output checked before its first use (the shape always, the values on demand)
        p = check_output(self.normalizer(scores, dim=-1, mask=allowed), scores, allowed, self._normalizer_name())
        p = p.to(work)
        weights = p
        out = None
        if self.discrete_context:
            pd = torch.nn.functional.dropout(p, dropout_p) if dropout_p > 0 else p
            out = _grouped_matmul(pd, v.to(work))
        if self.continuous is not None:
            key_mask = _key_validity(allowed, scores)
            context, cweights = self.continuous(p, v.to(work), key_mask)
            out = context if out is None else out + context
            if not self.discrete_context and cweights is not None:
                weights = cweights
        return out.to(q.dtype), weights.to(q.dtype)


def _key_validity(allowed: Tensor | None, scores: Tensor) -> Tensor | None:
    finite = scores != float("-inf")
    if allowed is None:
        if torch.compiler.is_compiling():  # no host sync in a graph: the mask is kept, with the same result
            return finite
        return None if bool(finite.all()) else finite
    return allowed & finite


def _checked_call(q, k, v, mask, causal, scale, dropout_p, return_weights):
    """Every argument checked once, by the rules of :mod:`plugin.inputs`; the mask split into its parts."""
    check_qkv(q, k, v)
    B, H, Lq, D = q.shape
    Lk = k.shape[-2]
    scale, dropout_p = check_scalars(scale, dropout_p, D)
    causal = check_flag("causal", causal)
    return_weights = check_flag("return_weights", return_weights)
    allowed, additive, invalid_rows = split_mask(mask, B, H, Lq, Lk)
    return q, k, v, allowed, additive, causal, scale, dropout_p, return_weights, invalid_rows


def _grouped_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for ``a`` (B, H, M, X) and ``b`` (B, Hkv, X, N), query head h reading group h // (H // Hkv).

    Grouped-query attention without copying keys or values to H heads: the G = H // Hkv query
    heads of a group are stacked into one (G * M, X) operand (a view) of one product per group.
    """
    B, H, M, X = a.shape
    Hkv = b.shape[1]
    if Hkv == H:
        return torch.matmul(a, b)
    G = H // Hkv
    return torch.matmul(a.reshape(B, Hkv, G * M, X), b).view(B, H, M, b.shape[-1])


def _repeat_kv(k: Tensor, v: Tensor, H: int) -> tuple[Tensor, Tensor]:
    Hkv = k.shape[1]
    if Hkv != H:  # grouped-query attention: query head h reads key/value head h // (H // Hkv)
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    return k, v


def _with_causal(allowed: Tensor | None, Lq: int, Lk: int, device: torch.device) -> Tensor:
    # aligned bottom-right: query i sees keys j <= i + (Lk - Lq), as in cached decoding
    i = torch.arange(Lq, device=device).unsqueeze(-1)
    j = torch.arange(Lk, device=device)
    c = j <= i + (Lk - Lq)
    return c if allowed is None else allowed & c


_MECHANISMS: dict[Any, AttentionMechanism] = {}  # spec string or id of a callable -> its mechanism
_MAX_MECHANISMS = 256


@torch.compiler.assume_constant_result
def _mechanism_key(normalizer: Any) -> Any:
    """Build (once) the parameter-free mechanism of a spec string or normalizer callable; return its key.

    The mechanism is kept in ``_MECHANISMS``. Under ``torch.compile`` this runs when the call is
    traced, outside the graph, so no module is built inside the traced function.
    """
    if isinstance(normalizer, str):
        key: Any = canonical_spec(normalizer)
    else:  # the mechanism holds the callable, so its id is not reused while the entry exists
        key = ("callable", id(normalizer))
    if key not in _MECHANISMS:
        mech = AttentionMechanism(key if isinstance(normalizer, str) else normalizer)
        if mech.learnable and isinstance(normalizer, str):
            raise ValueError(
                f"attention: spec {normalizer!r} has trainable parameters; build plugin.AttentionMechanism(spec, "
                f"num_heads=H) once, keep it in your model, and pass it as normalizer="
            )
        while len(_MECHANISMS) >= _MAX_MECHANISMS:
            del _MECHANISMS[next(iter(_MECHANISMS))]
        _MECHANISMS[key] = mech
    return key


@torch.compiler.assume_constant_result
def _record_traced_call(spec: str, role: str | None, path: str, training: bool) -> bool:
    """Under ``torch.compile``: record a call once, when it is traced (shapes are left empty)."""
    if recording():
        notify(CallRecord(spec, role, (), (), path, training))
    return True


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    normalizer: str | nn.Module | Any = "softmax",
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
) -> Tensor | tuple[Tensor, Tensor | None]:
    """Attention with any registered mechanism.

    Parameters
    ----------
    q : (B, H, Lq, D) queries.
    k, v : (B, Hkv, Lk, D) keys and values; ``Hkv`` divides ``H`` (grouped-query attention:
        query head ``h`` uses key/value head ``h // (H // Hkv)``).
    normalizer : a spec string (``"sparsemax"``, ``"entmax:alpha=1.3"``,
        ``"sparsemax+continuous_softmax"``...), an :class:`AttentionMechanism`, or a
        normalizer callable ``f(scores, dim=-1, mask=None)``.
    mask : bool tensor broadcastable to (B, H, Lq, Lk), True where attending is allowed;
        or a float tensor added to the scores (``-inf`` = masked). A 2-D ``(B, Lk)`` mask is a
        key-padding mask (read as ``(B, 1, 1, Lk)``); 0-D and ``(Lk,)`` masks broadcast.
    causal : mask keys after the query, aligned bottom-right (query ``i`` sees keys
        ``j <= i + Lk - Lq``): with ``Lq == Lk`` this is the usual causal mask, with
        ``Lq < Lk`` the queries are the last ones (cached decoding).
    scale : score scale, default ``1 / sqrt(D)``.
    dropout_p : dropout on the attention weights (applied whenever > 0, as SDPA does).
    return_weights : also return the (B, H, Lq, Lk) weights (forces the reference path).

    Returns ``out`` (B, H, Lq, D) in q's dtype, or ``(out, weights)``. A query row with no
    allowed key gives zeros. With ``normalizer="softmax"`` this equals
    ``torch.nn.functional.scaled_dot_product_attention``. NaN and infinities, empty inputs
    and the errors raised follow one policy on every path: see :mod:`plugin.inputs`.
    """
    if isinstance(normalizer, AttentionMechanism):
        mech = normalizer
    elif isinstance(normalizer, str) or callable(normalizer):
        mech = _MECHANISMS[_mechanism_key(normalizer)]
    else:
        raise ValueError(
            f"attention: normalizer must be a spec string, an AttentionMechanism or a callable, "
            f"got {type(normalizer).__name__}"
        )
    return mech(q, k, v, mask=mask, causal=causal, scale=scale, dropout_p=dropout_p, return_weights=return_weights)


def explain_path(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    normalizer: str | AttentionMechanism = "softmax",
    mask: Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    return_weights: bool = False,
) -> Choice:
    """Which path :func:`attention` takes for this call, and why the others were refused (nothing is computed).

    Arguments as in :func:`attention` (a spec string or an :class:`AttentionMechanism`), checked the
    same way. Returns a :class:`plugin.dispatch.Choice`: ``name`` (``"reference"`` when no fast path
    applies) and ``refused`` (path name -> reason). Inputs so large that the scores could overflow
    float32 take the reference path whatever this says (see :mod:`plugin.inputs`).
    """
    mech = normalizer if isinstance(normalizer, AttentionMechanism) else AttentionMechanism(normalizer)
    q, k, v, allowed, additive, causal, _, dropout_p, return_weights, _ = _checked_call(
        q, k, v, mask, causal, None, dropout_p, return_weights
    )
    return select(mech, q, k, v, allowed, causal, dropout_p, return_weights, additive)
