"""Parameter schedules: a numeric parameter of a mechanism that moves with the training step.

A pretrained softmax model is best made sparse gradually: alpha-entmax with alpha going
from 1 (softmax, exactly) to 1.5 or 2 (sparsemax) over the first steps of fine-tuning,
instead of an abrupt switch. A *schedule string* says how one parameter of the discrete
part of a spec moves::

    "linear:start=1,steps=1000"                    # alpha of "entmax:alpha=1.5": 1 -> 1.5 over 1000 steps
    "cosine:param=alpha,start=1,end=2,steps=500,warmup=100"
    "step:param=lam,start=0,end=0.5,steps=800,hold=200"   # lam of fusedmax in 4 plateaus

Strategies (:data:`STRATEGIES`), with ``t = step - warmup`` and ``f`` the fraction of the
way from ``start`` to ``end``:

- ``linear``: ``f = t / steps``;
- ``cosine``: ``f = (1 - cos(pi t / steps)) / 2`` (slow at both ends);
- ``step``:   ``f = hold floor(t / hold) / steps``: plateaus of ``hold`` steps
  (default ``steps // 4``, so four plateaus).

Before ``warmup`` the value is ``start``; from ``warmup + steps`` on it is ``end``.
``steps=0`` is an abrupt switch at step ``warmup``.

``steps``, ``warmup`` and ``hold`` are at most :data:`MAX_STEPS` (10**12) each, and a training
step at most :data:`MAX_STEP` (2**63 - 1, what the int64 buffer ``schedule_step`` holds); larger
values raise ``ValueError`` naming the schedule (or ``set_schedule_step``) and the key, before
anything is changed.

Keys: ``param`` (default: the spec's parameter when the discrete variant has exactly one,
e.g. entmax's alpha or sparsemax's gamma), ``start`` (required), ``end`` (default: the
spec's value, which it must equal when given: the spec names the mechanism the schedule
arrives at), ``steps`` (required, an integer >= 0), ``warmup`` (integer >= 0, default 0)
and ``hold`` (``step`` only). ``start`` and ``end`` are checked against the parameter's
range in the registry (alpha in [1, 2], where 1 is softmax).

With ``"entmax:alpha=learned"`` the schedule is a warm-up of the learned alpha: the
scheduled value is used until ``warmup + steps``, then the learned per-head alpha takes
over, starting from ``end``.

Where the step comes from: every scheduled :class:`plugin.AttentionMechanism` holds it in
its buffer ``schedule_step`` (saved in ``state_dict``, so a resumed model continues from the
XX
``set_num_updates`` hook, a transformers ``TrainerCallback`` or a hand-written loop do).
:func:`finish_schedules` moves every schedule to its end (inference).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from .registry import LEARNED, ParsedSpec, parse_spec

__all__ = [
    "MAX_STEP",
    "MAX_STEPS",
    "STRATEGIES",
    "Schedule",
    "check_schedule_syntax",
    "check_step",
    "finish_schedules",
    "parse_schedule",
    "schedule_state",
    "scheduled_mechanisms",
    "set_schedule_step",
]

STRATEGIES = ("linear", "cosine", "step")
KEYS = ("param", "start", "end", "steps", "warmup", "hold")
MAX_STEPS = 10**12
"""Largest ``steps``, ``warmup`` and ``hold`` of a schedule (their sum stays far inside int64)."""
MAX_STEP = 2**63 - 1
"""Largest training step: what the int64 buffer ``schedule_step`` holds."""
# LearnableAlpha keeps alpha in (1.01, 2): where a learned alpha can start after its warm-up
_LEARNED_ALPHA = (1.01, 2.0)


@dataclass(frozen=True)
class Schedule:
    """How parameter ``param`` moves from ``start`` to ``end`` (see the module docstring)."""

    param: str
    strategy: str
    start: float
    end: float
    steps: int
    warmup: int = 0
    hold: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "warmup", "hold"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STEPS:
                raise ValueError(f"schedule: {key}={value!r} is not valid; expected an integer in "
                                 f"[0, 10**12]")

    @property
    def final_step(self) -> int:
        """The first step at which the value is ``end``."""
        return self.warmup + self.steps

    def value(self, step: int) -> float:
        """The parameter's value at training step ``step`` (an integer >= 0)."""
        check_step(step)
        t = step - self.warmup
        if t < 0:
            return self.start
        if t >= self.steps:
            return self.end
        if self.strategy == "linear":
            f = t / self.steps
        elif self.strategy == "cosine":
            f = (1 - math.cos(math.pi * t / self.steps)) / 2
        else:  # step
            hold = self.hold or max(1, self.steps // 4)
            f = hold * (t // hold) / self.steps
        # rounded to 12 decimals: clean values in specs and logs (1.1, not 1.0999999999999999)
        return round(self.start + (self.end - self.start) * f, 12)

    def __str__(self) -> str:
        items = [f"param={self.param}", f"start={_num(self.start)}", f"end={_num(self.end)}",
                 f"steps={self.steps}"]
        if self.warmup:
            items.append(f"warmup={self.warmup}")
        if self.hold:
            items.append(f"hold={self.hold}")
        return f"{self.strategy}:" + ",".join(items)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _discrete(spec: str, name: str) -> ParsedSpec:
    parts = [p for p in parse_spec(spec) if p.kind == "discrete"]
    if not parts:
        raise ValueError(f"{name}: {spec!r} has no discrete part whose parameter a schedule could move")
    return parts[0]


def _numeric_params(part: ParsedSpec) -> list[str]:
    return [p.name for p in part.variant.params if p.kind in (float, int)]


def check_step(step: Any, name: str = "schedule step") -> int:
    """``step`` if it is a training step (an integer in [0, :data:`MAX_STEP`]), else ValueError naming ``name``."""
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= MAX_STEP:
        raise ValueError(f"{name} must be an integer >= 0, at most 2**63 - 1 (what the int64 buffer "
                         f"schedule_step holds), got {step!r}")
    return step


def _integer(name: str, key: str, text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value != int(value) or value < 0:
        raise ValueError(f"{name}: {key}={text!r} is not valid; expected an integer >= 0")
    if value > MAX_STEPS:
        raise ValueError(f"{name}: {key}={text!r} is too large; expected an integer in [0, 10**12]")
    return int(value)


def check_schedule_syntax(text: str, name: str = "schedule") -> tuple[str, dict[str, str]]:
    """The checks of a schedule string that need no spec: strategy, keys, step counts.

    Returns ``(strategy, {key: value text})``. Command-line parsers use it as the flag's
    ``type`` (the rest is checked against the spec by :func:`parse_schedule`).
    """
    if isinstance(text, Schedule):
        text = str(text)
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{name}: a schedule is a string '<strategy>:key=value,...'; "
                         f"valid strategies: {', '.join(STRATEGIES)}")
    strategy, _, rest = text.strip().partition(":")
    strategy = strategy.strip()
    if strategy not in STRATEGIES:
        raise ValueError(f"{name}: unknown strategy {strategy!r}; valid choices: {', '.join(STRATEGIES)}")
    items: dict[str, str] = {}
    for item in filter(None, (i.strip() for i in rest.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or key not in KEYS:
            raise ValueError(f"{name}: {item!r} is not a valid key=value; valid keys: {', '.join(KEYS)}")
        if key in items:
            raise ValueError(f"{name}: {key!r} given twice")
        items[key] = value
    for key in ("steps", "warmup", "hold"):
        if key in items:
            _integer(name, key, items[key])
    if "hold" in items:
        if strategy != "step":
            raise ValueError(f"{name}: hold=... applies to the 'step' strategy only (got {strategy!r}); "
                             f"valid choices: step")
        if _integer(name, "hold", items["hold"]) < 1:
            raise ValueError(f"{name}: hold={items['hold']!r} is not valid; expected an integer >= 1")
    if "start" not in items:
        raise ValueError(f"{name}: start=... is required (the value the schedule starts from, e.g. start=1 "
                         f"for entmax's alpha, which is softmax)")
    if "steps" not in items:
        raise ValueError(f"{name}: steps=... is required (an integer >= 0: how many steps from start to end)")
    return strategy, items


def parse_schedule(text: str, spec: str, name: str = "schedule") -> Schedule:
    """Parse and validate schedule string ``text`` for the mechanism ``spec``.

    ``name`` (a flag or config field, e.g. ``"--cross-attn-schedule"``) starts every error
    message. Raises ``ValueError`` naming the bad key and its valid choices or range.
    """
    strategy, items = check_schedule_syntax(text, name)
    part = _discrete(spec, name)
    numeric = _numeric_params(part)
    param = items.get("param")
    if param is None:
        if len(numeric) != 1:
            raise ValueError(f"{name}: say which parameter of {part.name!r} moves with param=...; "
                             f"valid choices: {', '.join(numeric) or '(none)'}")
        param = numeric[0]
    if param not in numeric:
        raise ValueError(f"{name}: {part.name!r} has no numeric parameter {param!r}; "
                         f"valid choices: {', '.join(numeric) or '(none)'}")
    declared = part.variant.param(param)
    target = part.params[param]

    def number(key: str) -> float:
        try:
            value = declared.validate(items[key], part.name)
        except ValueError as err:
            raise ValueError(f"{name}: {key}: {err}") from None
        if isinstance(value, str):  # 'learned' is a target, not a value on the way
            raise ValueError(f"{name}: {key}={value!r} is not a number; expected {declared.valid_range()}")
        return float(value)

    start = number("start")
    if target == LEARNED:
        end = number("end") if "end" in items else 1.5
        low, high = _LEARNED_ALPHA
        if not low < end < high:
            raise ValueError(f"{name}: end={_num(end)}: a learned alpha starts in ({low}, {high}); "
                             f"expected end in that range")
    else:
        end = number("end") if "end" in items else float(target)
        if end != float(target):
            raise ValueError(f"{name}: end={_num(end)} differs from {param}={_num(target)} of {spec!r}: the "
                             f"spec names the mechanism the schedule ends at; leave end out or make them equal")
    steps = _integer(name, "steps", items["steps"])
    warmup = _integer(name, "warmup", items.get("warmup", "0"))
    hold = _integer(name, "hold", items.get("hold", "0"))
    return Schedule(param, strategy, start, end, steps, warmup, hold)


def scheduled_mechanisms(module: nn.Module) -> Iterator[tuple[str, Any]]:
    """``(name, mechanism)`` of every :class:`plugin.AttentionMechanism` in ``module`` that has a schedule.

    A mechanism is recognized by its :class:`Schedule` (this module does not import the mechanism).
    """
    for name, m in module.named_modules():
        if isinstance(getattr(m, "schedule", None), Schedule):
            yield name, m


def set_schedule_step(module: nn.Module, step: int) -> int:
    """Set the training step of every scheduled mechanism in ``module``; returns how many there are.

    Call it once per optimizer update (fairseq's ``set_num_updates`` and
    :class:`hf_models.AttentionScheduleCallback` do) with the number of updates done so far.
    """
    check_step(step, "set_schedule_step: step")  # before any mechanism changes
    count = 0
    for _, mech in scheduled_mechanisms(module):
        mech.set_schedule_step(step)
        count += 1
    return count


def finish_schedules(module: nn.Module) -> int:
    """Move every schedule in ``module`` to its end value (for inference); returns how many."""
    count = 0
    for _, mech in scheduled_mechanisms(module):
        mech.set_schedule_step(max(mech.schedule_step_value, mech.schedule.final_step))
        count += 1
    return count


def schedule_state(module: nn.Module) -> dict[str, dict[str, Any]]:
    """Where each schedule in ``module`` stands: by mechanism name, its schedule, step, value and spec now."""
    return {
        name: {"schedule": str(m.schedule), "step": m.schedule_step_value, "value": m.scheduled_value(),
               "spec": m.current_spec()}
        for name, m in scheduled_mechanisms(module)
    }
