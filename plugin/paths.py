"""Fast paths as values: what a variant declares with ``register_normalizer(..., paths=...)``.

A :class:`Path` is a name (one of :data:`plugin.kernels.PATHS`), ``supports(call)`` and
``build(call)``. ``supports`` reads a :class:`Call` (a frozen description of one attention call:
shapes, dtype, device, mask kinds, the normalizer and its current parameters, the forced path)
and returns None when the path computes this call exactly, else the reason why not; a reason
of type :class:`Unavailable` means "cannot run here" (no CUDA, no compiler), and a call that
forces the path then raises ``ValueError`` instead of taking the reference path. ``build``
returns the runner ``fn(q, k, v, mask, bias, causal, scale) -> out``.

The built-in variants declare their paths with the factories below, exactly as a user's
variant does (see ``plugin/builtins.py``):

- :func:`sdpa_softmax`: softmax (with a temperature) through torch's fused
  ``scaled_dot_product_attention`` (path ``"sdpa"``);
- :func:`threshold_family`: the alpha-entmax family (sparsemax, entmax-1.5, any alpha in
  (1, 2], a learned alpha per head) with a temperature: the paths ``"triton"``,
  ``"cpu_chunked"`` and ``"cpu_chunked_torch"``;
- :func:`structured_chunked`: fusedmax / oscarmax (``sparsemax(prox(scores / gamma))``) on
  ``"cpu_chunked"``;
- :func:`length_scaled`: any of these paths with the scores of each query row multiplied by a
  factor of ``n``, the number of keys the row may attend to (scalable softmax / entmax): the
  queries are scaled, which is exact because the scores are linear in them.

Their arguments are numbers, names of the variant's parameters (read from the normalizer
at each call, so schedules are followed), or functions of the :class:`Call`. The dispatcher
(:mod:`plugin.dispatch`) tries a variant's paths in the order given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from .kernels import PATHS, availability  # read through the module at each call (tests replace its checks)

__all__ = [
    "Call",
    "Path",
    "Runner",
    "Unavailable",
    "keys_per_row",
    "length_scaled",
    "sdpa_softmax",
    "structured_chunked",
    "threshold_family",
]

Runner = Callable[[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, bool, float], Tensor]
# a path argument: a number, the name of a parameter of the variant, or a function of the call
Value = float | str | Callable[["Call"], Any]


class Unavailable(str):
    """A refusal that means the path cannot run here (environment, device): forcing it raises."""


@dataclass(frozen=True)
class Call:
    """One attention call as the paths see it (after the boundary checks of :mod:`plugin.inputs`).

    ``k_shape`` / ``v_shape`` have ``Hkv`` heads (not repeated to ``H``); ``mask`` and ``bias``
    say whether a bool mask / an additive float mask is present (causality is ``causal``);
    ``params`` are the normalizer's current parameters (the variant's defaults overridden by
    the normalizer's ``params``); ``forced`` is the path forced by :func:`plugin.use_path` or
    ``PLUGIN_ATTENTION_PATH`` (None = automatic).
    """

    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    dtype: torch.dtype
    device: str
    mask: bool = False
    bias: bool = False
    bias_grad: bool = False
    causal: bool = False
    dropout_p: float = 0.0
    return_weights: bool = False
    normalizer: Any = field(default=None, compare=False)
    params: Mapping[str, Any] = field(default_factory=dict, compare=False)
    forced: str | None = None

    @classmethod
    def of(cls, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None, causal: bool,
           dropout_p: float, return_weights: bool, normalizer: Any, params: Mapping[str, Any],
           forced: str | None) -> Call:
        return cls(tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, q.device.type, mask is not None,
                   bias is not None, bias is not None and bias.requires_grad, causal, dropout_p, return_weights,
                   normalizer, params, forced)


@dataclass(frozen=True)
class Path:
    """One fast path of a variant: ``supports(call) -> None | reason``, ``build(call) -> runner``."""

    name: str
    supports: Callable[[Call], str | None]
    build: Callable[[Call], Runner]

    def __post_init__(self) -> None:
        names = [n for n in PATHS if n != "reference"]
        if self.name not in names:
            raise ValueError(f"Path: name must be one of {', '.join(names)}, got {self.name!r}")


def _value(spec: Value, call: Call) -> Any:
    if callable(spec):
        return spec(call)
    if isinstance(spec, str):
        return call.params.get(spec)
    return spec


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fused_only(call: Call) -> str | None:
    """Refusals common to every path that does not form the (Lq, Lk) weights."""
    if call.return_weights:
        return "the weights are returned (only the reference path forms them)"
    if call.dropout_p > 0:
        return "dropout on the weights"
    return None


def _on_cpu(call: Call, name: str) -> str | None:
    if call.device != "cpu":
        return Unavailable(f"the {name!r} path runs on CPU tensors, got {call.device}")
    return None


# ----------------------------------------------------------------------------- sdpa


def sdpa_softmax(gamma: Value = 1.0, when: Callable[[Call], str | None] | None = None) -> tuple[Path, ...]:
    """The ``"sdpa"`` path for ``softmax(scores / gamma)``: torch's fused attention, any device and dtype.

    ``when(call)`` (optional) returns None when the variant computes softmax in this call, else
    the reason why not (alpha-entmax declares it for alpha = 1).
    """

    def supports(call: Call) -> str | None:
        if call.return_weights:
            return "the weights are returned (only the reference path forms them)"
        if when is not None and (reason := when(call)) is not None:
            return reason
        g = _value(gamma, call)
        return None if _number(g) and g > 0 else f"gamma={g!r} is not a number > 0"

    def build(call: Call) -> Runner:
        from .kernels.sdpa import sdpa_runner

        return sdpa_runner(float(_value(gamma, call)), call.dropout_p)

    return (Path("sdpa", supports, build),)


# ----------------------------------------------------------------------------- alpha-entmax family


@dataclass(frozen=True)
class _Threshold:
    alpha: Any  # a float in (1, 2], or a module returning one alpha per head (a learned alpha)
    gamma: float

    def alpha_value(self) -> float | Tensor:
        return self.alpha() if isinstance(self.alpha, torch.nn.Module) else float(self.alpha)


def _threshold(alpha: Value, gamma: Value, call: Call) -> _Threshold | str:
    reason = _fused_only(call)
    if reason is not None:
        return reason
    a, g = _value(alpha, call), _value(gamma, call)
    if not (_number(g) and g > 0):
        return f"gamma={g!r} is not a number > 0"
    if isinstance(a, torch.nn.Module):
        heads = getattr(a, "num_heads", None)
        if heads != call.q_shape[1]:  # the reference path raises the error about the head count
            return f"the learned alpha has {heads} heads, the call {call.q_shape[1]}"
        return _Threshold(a, float(g))
    if not (_number(a) and 1 < a <= 2):
        return f"alpha={a!r} is outside (1, 2]"
    return _Threshold(float(a), float(g))


def _scaled_runner(run: Callable[..., Tensor], config: _Threshold, **extra: Any) -> Runner:
    def runner(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None, causal: bool,
               scale: float) -> Tensor:
        if config.gamma != 1.0:
            scale = scale / config.gamma
            bias = bias / config.gamma if bias is not None else None
        return run(q, k, v, config.alpha_value(), mask=mask, bias=bias, causal=causal, scale=scale, **extra)

    return runner


def threshold_family(alpha: Value = 2.0, gamma: Value = 1.0) -> tuple[Path, ...]:
    """The paths of ``entmax_alpha(scores / gamma)``: ``"triton"``, ``"cpu_chunked"``, ``"cpu_chunked_torch"``.

    ``alpha`` is 2 (sparsemax), 1.5, any number in (1, 2], or a module returning one alpha per
    head, shape (H, 1) (:class:`plugin.LearnableAlpha`); ``gamma > 0`` divides the scores. Each
    is a number, the name of one of the variant's parameters, or a function of the :class:`Call`.
    """

    def config(call: Call) -> _Threshold:
        result = _threshold(alpha, gamma, call)
        assert isinstance(result, _Threshold)
        return result

    def triton_supports(call: Call) -> str | None:
        result = _threshold(alpha, gamma, call)
        if isinstance(result, str):
            return result
        reason = availability.triton_unavailable_reason(call.device, call.dtype, call.q_shape[-1], call.v_shape[-1],
                                           call.bias_grad)
        return None if reason is None else Unavailable(reason)

    def triton_build(call: Call) -> Runner:
        from .kernels.triton_entmax import triton_entmax_attention

        return _scaled_runner(triton_entmax_attention, config(call))

    def chunked_supports(call: Call) -> str | None:
        result = _threshold(alpha, gamma, call)
        if isinstance(result, str):
            return result
        reason = _on_cpu(call, "cpu_chunked")
        if reason is None and not availability.c_kernel_available():
            reason = Unavailable(f"the 'cpu_chunked' path needs its C row kernel, which could not be built: "
                                 f"{availability.c_kernel_error() or 'no C compiler built it'}")
        if reason is None and call.forced is None and call.dtype == torch.float64:
            reason = "float64 stays on the reference path (the kernel computes in float32)"
        return reason

    def chunked_build(call: Call) -> Runner:
        from .kernels.chunked import run_chunked_entmax

        return _scaled_runner(run_chunked_entmax, config(call), backend="c")

    def torch_supports(call: Call) -> str | None:
        result = _threshold(alpha, gamma, call)
        if isinstance(result, str):
            return result
        reason = _on_cpu(call, "cpu_chunked_torch")
        if reason is not None or call.forced is not None:
            return reason
        B, H, Lq = call.q_shape[:3]
        if call.dtype == torch.float64:
            return "float64 stays on the reference path"
        if availability.c_kernel_available():
            return "taken only without a C compiler ('cpu_chunked' runs here)"
        if B * H * Lq * call.k_shape[2] < availability.TORCH_CHUNKED_MIN_SCORES:
            return f"fewer than {availability.TORCH_CHUNKED_MIN_SCORES} scores: the reference path is as good"
        return None

    def torch_build(call: Call) -> Runner:
        from .kernels.chunked import run_chunked_entmax

        return _scaled_runner(run_chunked_entmax, config(call), backend="torch")

    return (
        Path("triton", triton_supports, triton_build),
        Path("cpu_chunked", chunked_supports, chunked_build),
        Path("cpu_chunked_torch", torch_supports, torch_build),
    )


# ----------------------------------------------------------------------------- fusedmax / oscarmax


def structured_chunked(kind: str, lam: Value = "lam", gamma: Value = "gamma") -> tuple[Path, ...]:
    """The ``"cpu_chunked"`` path of ``sparsemax(prox_{lam g}(scores / gamma))``.

    ``kind`` is ``"tv"`` (fusedmax: total variation over consecutive allowed keys) or
    ``"oscar_ordered"`` (oscarmax); ``lam >= 0`` and ``gamma > 0`` as in :func:`threshold_family`.
    """
    from .kernels.structured_chunked import KINDS

    if kind not in KINDS:
        raise ValueError(f"structured_chunked: kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")

    def supports(call: Call) -> str | None:
        reason = _fused_only(call)
        if reason is not None:
            return reason
        lam_, gamma_ = _value(lam, call), _value(gamma, call)
        if not (_number(lam_) and lam_ >= 0 and _number(gamma_) and gamma_ > 0):
            return f"lam={lam_!r} / gamma={gamma_!r} are not numbers >= 0 / > 0"
        if call.device != "cpu":
            return f"the structured kernels run on CPU tensors, got {call.device}"
        if call.forced is None and call.dtype == torch.float64:
            return "float64 stays on the reference path"
        if not availability.structured_kernels_built():
            return Unavailable(f"the 'cpu_chunked' path needs its C kernels, which could not be built: "
                               f"{availability.c_kernel_error() or 'the structured-prox library did not build'}")
        return None

    def build(call: Call) -> Runner:
        from .kernels.structured_chunked import run_structured_chunked

        lam_, gamma_ = float(_value(lam, call)), float(_value(gamma, call))

        def runner(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None, causal: bool,
                   scale: float) -> Tensor:
            return run_structured_chunked(q, k, v, kind, lam_, mask=mask, bias=bias, causal=causal, scale=scale,
                                          gamma=gamma_)

        return runner

    return (Path("cpu_chunked", supports, build),)


# ----------------------------------------------------------------------------- length-scaled variants


def keys_per_row(mask: Tensor | None, bias: Tensor | None, causal: bool, Lq: int, Lk: int,
                 device: torch.device | str) -> Tensor:
    """The number of keys each query row may attend to, as the runners see a call: int64, shape
    broadcastable to (B, H, Lq) (the sizes of ``mask`` / ``bias`` where they are 1 stay 1).

    A key is allowed where ``mask`` (bool, broadcastable to (B, H, Lq, Lk)) is True, ``bias`` (an
    additive float mask) is not ``-inf`` and causality (aligned bottom-right: query ``i`` sees keys
    ``j <= i + Lk - Lq``, the cached keys of decoding included) allows it. Without a mask per query
    (the mask's Lq size is 1) causal counts come from a cumulative sum over the keys: nothing of
    size (Lq, Lk) is formed.
    """
    allowed = mask
    if bias is not None:
        finite = bias != float("-inf")
        allowed = finite if allowed is None else allowed & finite
    offset = Lk - Lq
    rows = torch.arange(Lq, device=device)
    if allowed is None:
        n = (rows + offset + 1).clamp(0, Lk) if causal else torch.full((Lq,), Lk, device=device)
        return n.view(1, 1, Lq)
    allowed = allowed.reshape((1,) * (4 - allowed.dim()) + tuple(allowed.shape))
    if not causal:
        return allowed.sum(-1, dtype=torch.int64)
    if allowed.shape[-2] == 1:  # one key mask for every query: count its allowed keys up to each query's last
        counts = allowed.cumsum(-1, dtype=torch.int64)[..., 0, :]  # (b, h, Lk)
        last = rows + offset
        n = counts[..., last.clamp(0, Lk - 1)]
        return torch.where(last >= 0, n, torch.zeros_like(n))
    causal_allowed = torch.arange(Lk, device=device) <= (rows + offset).unsqueeze(-1)
    return (allowed & causal_allowed).sum(-1, dtype=torch.int64)


def length_scaled(paths: tuple[Path, ...],
                  factor: Callable[[Call], Callable[[Tensor, torch.dtype], Tensor] | None]) -> tuple[Path, ...]:
    """``paths`` (of a base variant) for the scores of each query row multiplied by ``factor(n)``.

    ``factor(call)`` returns the function ``(n, dtype) -> factor`` of the call's normalizer, ``n`` the
    key counts of :func:`keys_per_row`, or None when the normalizer has none (the call is refused and
    takes the reference path). Each path keeps its name and refusals; its runner multiplies
    query row ``i`` (and an additive mask's row ``i``, its ``-inf`` entries kept) by ``factor(n_i)``
    and runs the base path. Exact: ``f (q . k) scale + f b = ((f q) . k) scale + f b``. Gradients
    reach the factor's parameters through the scaled queries (and the scaled additive mask: a base
    path that takes no gradient for the mask refuses such a call while the factor is learned).
    """

    def supports(path: Path) -> Callable[[Call], str | None]:
        def check(call: Call) -> str | None:
            if factor(call) is None:
                return f"the normalizer {type(call.normalizer).__name__} gives no per-row length factor"
            # an additive mask is scaled too: it carries the gradient of a learned factor
            if call.bias and not call.bias_grad and torch.is_grad_enabled() and any(
                    p.requires_grad for p in getattr(call.normalizer, "parameters", tuple)()):
                call = replace(call, bias_grad=True)
            return path.supports(call)

        return check

    def wrap(path: Path) -> Path:
        def build(call: Call) -> Runner:
            run = path.build(call)
            of_n = factor(call)
            assert of_n is not None  # supports() refused the call otherwise

            def runner(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None, causal: bool,
                       scale: float) -> Tensor:
                work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
                f = of_n(keys_per_row(mask, bias, causal, q.shape[2], k.shape[2], q.device), work).unsqueeze(-1)
                q_scaled = (q.to(work) * f).to(q.dtype)
                if bias is not None:  # -inf kept, and kept out of the product (its gradient to f is NaN)
                    masked = bias == float("-inf")
                    scaled = (torch.where(masked, torch.zeros_like(bias), bias).to(work) * f).to(bias.dtype)
                    bias = torch.where(masked, bias, scaled)
                return run(q_scaled, k, v, mask, bias, causal, scale)

            return runner

        return Path(path.name, supports(path), build)

    return tuple(wrap(p) for p in paths)
