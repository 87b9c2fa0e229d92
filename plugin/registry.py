"""The variant registry and spec strings.

A *spec string* names an attention mechanism and its parameters::

    "sparsemax"
    "entmax:alpha=1.3"
    "fusedmax:lam=0.5,gamma=1"
    "continuous_sparsemax:basis=64"
    "sparsemax+continuous_softmax"          # discrete + continuous context, summed

Every variant is registered exactly once, with its parameters, their defaults and valid
ranges, and the fast paths that compute it (the built-ins in ``plugin/builtins.py``, through
the same functions a user calls). The fairseq flags, the transformers attention names, the
docs table and the tests all enumerate this registry. This module imports nothing else of the
plugin: it holds names and values only.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Param",
    "Variant",
    "ParsedSpec",
    "register_normalizer",
    "register_continuous",
    "unregister",
    "parse_spec",
    "canonical_spec",
    "get_variant",
    "available_normalizers",
    "variants",
]

LEARNED = "learned"


@dataclass(frozen=True)
class Param:
    """One parameter of a variant.

    ``kind`` is ``float``, ``int`` or ``str``. Numeric parameters may have bounds
    (``low``/``high``, inclusive or not); ``choices`` lists string values that are
    accepted besides numbers (for example ``"learned"`` for entmax's alpha).
    """

    name: str
    default: Any
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    choices: tuple[str, ...] = ()
    # for string parameters: a function that raises ValueError on an invalid value, and the
    # description of the valid values shown in errors and in the docs table
    check: Callable[[str], Any] | None = field(default=None, compare=False)
    expected: str = ""

    def valid_range(self) -> str:
        if self.expected:
            return self.expected
        parts = []
        if self.kind in (float, int):
            if self.low is not None and self.high is not None:
                lb = "[" if self.low_inclusive else "("
                hb = "]" if self.high_inclusive else ")"
                parts.append(f"a number in {lb}{_fmt(self.low)}, {_fmt(self.high)}{hb}")
            elif self.low is not None:
                op = ">=" if self.low_inclusive else ">"
                parts.append(f"a{'n integer' if self.kind is int else ' number'} {op} {_fmt(self.low)}")
            elif self.high is not None:
                op = "<=" if self.high_inclusive else "<"
                parts.append(f"a number {op} {_fmt(self.high)}")
            else:
                parts.append("an integer" if self.kind is int else "a number")
        for c in self.choices:
            parts.append(repr(c))
        return " or ".join(parts) if parts else "a string"

    def validate(self, value: Any, variant: str) -> Any:
        """Convert ``value`` (a string from a spec, or a Python value) and check its range."""
        where = f"parameter {self.name!r} of {variant!r}"
        if isinstance(value, str):
            text = value.strip()
            if text in self.choices:
                return text
            if self.kind is str:
                if self.check is not None:
                    try:
                        self.check(text)
                    except ValueError:
                        raise ValueError(
                            f"{where}: {value!r} is not valid; expected {self.valid_range()}"
                        ) from None
                return text
            try:
                number = float(text)
            except ValueError:
                raise ValueError(
                    f"{where}: {value!r} is not valid; expected {self.valid_range()}"
                ) from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: {value!r} is not valid; expected {self.valid_range()}")
        else:
            number = float(value)
        if self.kind is str:
            raise ValueError(f"{where}: {value!r} is not valid; expected {self.valid_range()}")
        if not math.isfinite(number):
            raise ValueError(f"{where}: {value!r} is not finite; expected {self.valid_range()}")
        if self.kind is int:
            if number != int(number):
                raise ValueError(f"{where}: {value!r} is not an integer; expected {self.valid_range()}")
            number = int(number)
        ok = True
        if self.low is not None:
            ok &= number >= self.low if self.low_inclusive else number > self.low
        if self.high is not None:
            ok &= number <= self.high if self.high_inclusive else number < self.high
        if not ok:
            raise ValueError(f"{where}: {value!r} is out of range; expected {self.valid_range()}")
        return number


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Variant:
    """A registered mechanism.

    ``kind`` is ``"discrete"`` (a normalizer: scores -> probabilities over keys) or
    ``"continuous"`` (a context over a continuous domain, see ``plugin.continuous``).
    ``factory(num_heads=..., **params)`` builds the ``nn.Module`` that computes it; a discrete
    variant without a factory is its plain ``function`` wrapped in a :class:`plugin.Normalizer`
    (:func:`plugin.normalizers.build_normalizer`). A mechanism built from that function gets
    the variant's ``paths``: its fast paths in the order they are tried (:mod:`plugin.paths`;
    none = the reference path only).
    """

    name: str
    kind: str
    factory: Callable[..., Any] | None
    params: tuple[Param, ...] = ()
    formula: str = ""
    summary: str = ""
    function: Callable[..., Any] | None = field(default=None, compare=False)
    paths: tuple[Any, ...] = field(default=(), compare=False)
    # checks the parameters together (for example basis against widths); raises ValueError
    check: Callable[[dict[str, Any]], None] | None = field(default=None, compare=False)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise ValueError(
            f"unknown parameter {name!r} for {self.name!r}; valid parameters: "
            f"{', '.join(p.name for p in self.params) or '(none)'}"
        )

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


@dataclass(frozen=True)
class ParsedSpec:
    """One component of a spec string: a variant and its validated parameters (defaults filled)."""

    variant: Variant
    params: dict[str, Any]
    given: tuple[str, ...]  # names of the parameters the spec set explicitly

    @property
    def name(self) -> str:
        return self.variant.name

    @property
    def kind(self) -> str:
        return self.variant.kind

    def __str__(self) -> str:
        if not self.given:
            return self.name
        return self.name + ":" + ",".join(f"{k}={_fmt_value(self.params[k])}" for k in self.given)


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return _fmt(v) if v.is_integer() else repr(v)
    return str(v)


_REGISTRY: dict[str, Variant] = {}
_LOCK = threading.Lock()


def _check_name(name: str) -> None:
    if not name or not all(c.isalnum() or c == "_" for c in name) or not name[0].isalpha():
        raise ValueError(
            f"variant name {name!r} is not valid: use letters, digits and underscores, starting with a letter"
        )


def _check_params(
    caller: str, name: str, params: Sequence[Param], check: Callable[[dict[str, Any]], None] | None = None
) -> None:
    """Each parameter a :class:`Param` with a unique name and a default that its own declaration accepts.

    A default outside its range (or of another type than ``kind``) would otherwise be used by every spec
    that does not set the parameter, unchecked; ``check`` (the joint check) must accept the defaults too.
    """
    seen: set[str] = set()
    for p in params:
        if not isinstance(p, Param):
            raise ValueError(f"{caller}({name!r}): params must hold plugin.Param values, got {p!r}")
        if p.name in seen:
            raise ValueError(f"{caller}({name!r}): parameter {p.name!r} is declared twice")
        seen.add(p.name)
        try:
            p.validate(p.default, name)
        except ValueError as exc:  # names the variant, the parameter, the default and the range
            raise ValueError(f"{caller}: invalid default: {exc}") from None
    if check is not None:
        try:
            check({p.name: p.default for p in params})
        except ValueError as exc:
            raise ValueError(f"{caller}({name!r}): the defaults are not valid together: {exc}") from None


def register_normalizer(
    name: str,
    function: Callable[..., Any] | None = None,
    *,
    params: Sequence[Param] = (),
    formula: str = "",
    summary: str = "",
    factory: Callable[..., Any] | None = None,
    paths: Sequence[Any] = (),
    replace: bool = False,
) -> Variant:
    """Register a discrete normalizer.

    ``function(scores, dim=-1, mask=None, **params) -> probs`` (wrapped in a
    :class:`plugin.Normalizer` module), and/or ``factory(num_heads=None, **params) -> nn.Module``
    whose ``forward(scores, dim=-1, mask=None)`` returns probabilities (use a factory when the
    variant has learnable state; the function is then the variant's plain-function form).

    ``paths`` lists the fast paths that compute the variant exactly (:mod:`plugin.paths`, e.g.
    ``plugin.paths.threshold_family(alpha=2.0, gamma="t")`` for a variant of the sparsemax /
    entmax family), tried in order; without paths every call takes the reference path.

    Each parameter's default must satisfy its own declaration (type, range or choices), else
    ``ValueError`` here. What the function must return (the contract that
    :func:`plugin.check_normalizers` checks): a tensor of the shape of ``scores``, nonnegative,
    exactly 0 on masked entries (``mask`` False or score ``-inf``), each row summing to 1 over
    its allowed entries, or all zeros when nothing is allowed.
    """
    _check_name(name)
    if function is None and factory is None:
        raise ValueError("register_normalizer needs 'function' or 'factory'")
    for path in paths:
        if not (isinstance(getattr(path, "name", None), str) and callable(getattr(path, "supports", None))
                and callable(getattr(path, "build", None))):
            raise ValueError(f"register_normalizer: paths must hold plugin.paths.Path values (from the factories of "
                             f"plugin.paths: sdpa_softmax, threshold_family, structured_chunked, length_scaled), "
                             f"got {path!r}")
    _check_params("register_normalizer", name, params)
    variant = Variant(name, "discrete", factory, tuple(params), formula, summary, function, tuple(paths))
    _add(variant, replace)
    return variant


def register_continuous(
    name: str,
    factory: Callable[..., Any],
    *,
    params: Sequence[Param] = (),
    formula: str = "",
    summary: str = "",
    replace: bool = False,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> Variant:
    """Register a continuous-attention context.

    ``factory(num_heads=None, **params)`` returns an ``nn.Module`` with
    ``forward(probs, v, mask) -> (context, weights)``: ``probs`` (B, H, Lq, Lk) are the
    discrete attention probabilities whose moments place the density, ``v`` (B, H, Lk, D)
    the values, ``mask`` a bool tensor broadcastable to ``probs`` (True = key exists) or
    None; ``context`` is (B, H, Lq, D) and ``weights`` (B, H, Lq, Lk) or None.
    """
    _check_name(name)
    _check_params("register_continuous", name, params, check)
    variant = Variant(name, "continuous", factory, tuple(params), formula, summary, check=check)
    _add(variant, replace)
    return variant


def _add(variant: Variant, replace: bool) -> None:
    with _LOCK:
        if variant.name in _REGISTRY and not replace:
            raise ValueError(f"variant {variant.name!r} is already registered (pass replace=True to override)")
        _REGISTRY[variant.name] = variant


def unregister(name: str) -> Variant:
    """Remove the variant ``name`` from the registry and return it (for example a variant a test added)."""
    with _LOCK:
        if name not in _REGISTRY:
            raise ValueError(f"unregister: {name!r} is not registered; valid choices: {', '.join(sorted(_REGISTRY))}")
        return _REGISTRY.pop(name)


def variant_of_function(function: Any) -> Variant | None:
    """The discrete variant registered with ``function`` as its plain function, or None."""
    return next((v for v in _REGISTRY.values() if v.function is not None and v.function is function), None)


def variants(kind: str | None = None) -> dict[str, Variant]:
    """All registered variants (optionally only ``kind`` 'discrete' or 'continuous'), by name."""
    return {n: v for n, v in _REGISTRY.items() if kind is None or v.kind == kind}


def available_normalizers(kind: str | None = None) -> dict[str, dict[str, Any]]:
    """Names of the registered variants with their parameters and defaults.

    >>> available_normalizers()["entmax"]
    {'alpha': 1.5}
    """
    return {n: v.defaults() for n, v in variants(kind).items()}


def get_variant(name: str) -> Variant:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown attention variant {name!r}; valid choices: {', '.join(sorted(_REGISTRY))}"
        ) from None


def parse_spec(spec: str) -> list[ParsedSpec]:
    """Parse and validate a spec string into its components.

    Grammar: ``component ('+' component)*`` with ``component = name [':' key '=' value (',' key '=' value)*]``.
    A combination holds at most one discrete and at most one continuous component.
    """
    if not isinstance(spec, str):
        raise ValueError(
            f"attention spec must be a string such as 'sparsemax' or 'entmax:alpha=1.3', got "
            f"{type(spec).__name__} {spec!r}; valid choices: {', '.join(sorted(variants()))}"
        )
    text = spec.strip()
    if not text:
        raise ValueError(f"attention spec is empty; valid choices: {', '.join(sorted(variants()))}")
    parts = [p.strip() for p in text.split("+")]
    parsed = [_parse_component(p, spec) for p in parts]
    kinds = [p.kind for p in parsed]
    if kinds.count("discrete") > 1 or kinds.count("continuous") > 1:
        raise ValueError(
            f"attention spec {spec!r}: a combination holds at most one discrete and one continuous "
            f"variant (for example 'sparsemax+continuous_softmax')"
        )
    parsed.sort(key=lambda p: 0 if p.kind == "discrete" else 1)
    return parsed


def _parse_component(part: str, spec: str) -> ParsedSpec:
    if not part:
        raise ValueError(f"attention spec {spec!r} has an empty component")
    name, _, arg_text = part.partition(":")
    variant = get_variant(name.strip())
    params = variant.defaults()
    given: list[str] = []
    if arg_text.strip():
        for item in arg_text.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise ValueError(
                    f"attention spec {spec!r}: {item!r} is not of the form key=value; parameters of "
                    f"{variant.name!r}: {', '.join(p.name for p in variant.params) or '(none)'}"
                )
            p = variant.param(key)
            if key in given:
                raise ValueError(f"attention spec {spec!r}: parameter {key!r} given twice")
            params[key] = p.validate(value, variant.name)
            given.append(key)
    if variant.check is not None:
        try:
            variant.check(params)
        except ValueError as exc:
            raise ValueError(f"attention spec {spec!r}: {exc}") from None
    return ParsedSpec(variant, params, tuple(given))


def canonical_spec(spec: str) -> str:
    """The normalized form of a spec (validates it)."""
    return "+".join(str(p) for p in parse_spec(spec))

