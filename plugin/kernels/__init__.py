"""Fast paths for plugin.attention: selected automatically, each tested against the reference path.

Paths (the name is what :func:`plugin.record_calls` reports as ``CallRecord.path``):

``"reference"``
    plain PyTorch: the full (Lq, Lk) score matrix, the normalizer, ``weights @ v``.
``"sdpa"``
    softmax (with or without a temperature; also alpha-entmax at alpha = 1, which is softmax,
    so a schedule starting at softmax never takes the reference path), any device and dtype:
    ``torch.nn.functional.scaled_dot_product_attention`` (its fused kernels), with the
    masks combined into one, bottom-right causality, grouped-query attention, dropout, and
    rows without an allowed key set to zeros.
``"cpu_chunked"``
    CPU, sparsemax / entmax-1.5 / alpha-entmax (fixed or learned alpha): queries in chunks,
    a compiled C row kernel (sort-free exact thresholds); chunks with few nonzeros are
    multiplied sparsely and kept in sparse form for a backward pass without dense products,
    the others are recomputed flash-style; no (Lq, Lk) matrix is kept
    (:mod:`plugin.kernels.chunked`). Computed in float32.
    fusedmax / oscarmax: the same chunking with the exact C prox before the sparsemax rows
    and a closed-form backward (:mod:`plugin.kernels.structured_chunked`).
``"cpu_chunked_torch"``
    the same chunking with the row work done by the PyTorch normalizers; chosen only when
    no C compiler is available and the score matrix would be large (> 2^24 entries).
``"triton"``
    CUDA, sparsemax / alpha-entmax: Triton flash-style kernels (:mod:`plugin.kernels.triton_entmax`).

Selection is automatic: the fast path for the tensors' device and dtype when the call is
one it computes exactly (a supported normalizer, bool and/or additive masks, no dropout
except for softmax, no returned weights), else the reference. For the sparse normalizers
``float64`` stays on the reference path.

``PLUGIN_ATTENTION_PATH`` in the environment (or the :func:`use_path` / :func:`reference_path`
context managers) forces a path: ``reference`` everywhere, or one of the fast paths for every
call it implements (the other calls keep the reference); a forced path that cannot run here
(no CUDA for ``triton``, no compiler for ``cpu_chunked``) raises ``ValueError``. The context
managers hold in the current thread / context only (a :class:`contextvars.ContextVar`, read
by :func:`current_path_override`); the environment variable holds for the process.

Calls reach these paths after the checks of :mod:`plugin.inputs` (non-empty, finite q/k/v,
float masks without NaN or ``+inf``, scores that cannot overflow), so no kernel sees a NaN.

Under ``torch.compile`` the choice is made when a call is traced (the forced path and the
kernels' availability are read then, :func:`forced_path` being a trace-time constant) and the
compiled graph calls the kernels as the ``torch.library`` custom ops of
:mod:`plugin.kernels.ops` (and of :mod:`plugin.kernels.triton_entmax`). Compiled, the bound on
score overflow is not checked (it needs the input magnitudes on the host).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PATHS",
    "current_path_override",
    "entmax_config",
    "forced_path",
    "reference_forced",
    "reference_path",
    "select_path",
    "softmax_gamma",
    "use_path",
]

PATHS = ("reference", "sdpa", "cpu_chunked", "cpu_chunked_torch", "triton")
# the torch-only chunked path pays off (in memory) when the score matrix would be this large
_TORCH_CHUNKED_MIN_SCORES = 1 << 24

# The forced path is context-local (a thread or asyncio task sees only its own): a stack of
# (entry, name) pairs, each entry removed by identity when its block ends, so blocks that end
# in any order leave nothing behind.
_FORCED: contextvars.ContextVar[tuple[tuple[object, str | None], ...]] = contextvars.ContextVar(
    "plugin_forced_attention_path", default=()
)


@contextlib.contextmanager
def use_path(name: str | None) -> Iterator[None]:
    """Force attention path ``name`` (one of :data:`PATHS`; None = automatic) inside the block.

    The choice holds in the current thread (context) only, and blocks nest.
    """
    if name is not None and name not in PATHS:
        raise ValueError(f"use_path: name must be one of {', '.join(PATHS)} or None, got {name!r}")
    entry = object()
    _FORCED.set((*_FORCED.get(), (entry, name)))
    try:
        yield
    finally:
        _FORCED.set(tuple(e for e in _FORCED.get() if e[0] is not entry))


@contextlib.contextmanager
def reference_path() -> Iterator[None]:
    """Force the reference (materialized scores, plain PyTorch) path inside the block (this thread only)."""
    with use_path("reference"):
        yield


def current_path_override() -> str | None:
    """The path forced by the innermost open :func:`use_path` block of this context, or None."""
    stack = _FORCED.get()
    return stack[-1][1] if stack else None


@torch.compiler.assume_constant_result
def forced_path() -> str | None:
    """The forced path name (context manager first, then ``PLUGIN_ATTENTION_PATH``), or None.

    Under ``torch.compile`` it is read once, when a call is traced, and the path chosen then is
    compiled into the graph (a later :func:`use_path` block does not change a compiled function;
    compile it again, e.g. after ``torch._dynamo.reset()``).
    """
    override = current_path_override()
    if override is not None:
        return override
    env = os.environ.get("PLUGIN_ATTENTION_PATH", "").strip().lower()
    if env in ("", "auto"):
        return None
    if env not in PATHS:
        raise ValueError(f"PLUGIN_ATTENTION_PATH must be one of auto, {', '.join(PATHS)}; got {env!r}")
    return env


def reference_forced() -> bool:
    return forced_path() == "reference"


@dataclass(frozen=True)
class EntmaxConfig:
    """What a fast path needs to know about an entmax-family normalizer.

    ``alpha`` is 2.0 (sparsemax), 1.5, another float in (1, 2), or None with ``learned``
    the :class:`plugin.normalizers.LearnableAlpha` module (alpha per head, with gradient).
    Scores are divided by ``gamma`` first (sparsemax's temperature).
    """

    alpha: float | None
    gamma: float = 1.0
    learned: Any = None

    def alpha_value(self) -> float | Tensor:
        return self.learned() if self.learned is not None else float(self.alpha)  # type: ignore[arg-type]


def entmax_config(normalizer: Any) -> EntmaxConfig | None:
    """The :class:`EntmaxConfig` of a built-in sparsemax / entmax15 / entmax normalizer, else None."""
    from ..normalizers.base import Normalizer
    from ..normalizers.entmax import EntmaxNormalizer, entmax, entmax15
    from ..normalizers.sparsemax import sparsemax

    if isinstance(normalizer, EntmaxNormalizer):
        alpha = normalizer.fixed_alpha()
        if alpha is None:
            return EntmaxConfig(alpha=None, learned=normalizer.learned)
        return EntmaxConfig(alpha=alpha) if 1 < alpha <= 2 else None
    if isinstance(normalizer, Normalizer):
        params = dict(normalizer.params)
        if normalizer.function is sparsemax and set(params) <= {"gamma"}:
            return EntmaxConfig(alpha=2.0, gamma=float(params.get("gamma", 1.0)))
        if normalizer.function is entmax15 and not params:
            return EntmaxConfig(alpha=1.5)
        if normalizer.function is entmax and set(params) <= {"alpha"}:
            alpha = params.get("alpha", 1.5)
            if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 1 < alpha <= 2:
                return EntmaxConfig(alpha=float(alpha))
    return None


def softmax_gamma(normalizer: Any) -> float | None:
    """The temperature of a built-in softmax normalizer (entmax with alpha = 1 included), else None."""
    from ..normalizers.base import Normalizer
    from ..normalizers.entmax import EntmaxNormalizer, entmax
    from ..normalizers.softmax import softmax

    if isinstance(normalizer, Normalizer) and normalizer.function is softmax and set(normalizer.params) <= {"gamma"}:
        return float(normalizer.params.get("gamma", 1.0))
    # alpha-entmax at alpha = 1 is softmax: it takes softmax's fast path (a schedule that starts
    # at softmax never drops to the reference path)
    if isinstance(normalizer, EntmaxNormalizer) and normalizer.fixed_alpha() == 1:
        return 1.0
    if isinstance(normalizer, Normalizer) and normalizer.function is entmax and normalizer.params == {"alpha": 1}:
        return 1.0
    return None


def _run_sdpa(gamma: float, dropout_p: float) -> Callable[..., Tensor]:
    import torch.nn.functional as F

    def run(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None, causal: bool,
            scale: float) -> Tensor:
        if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
            # torch's CPU SDPA backward is 4-5x slower in half precision than in float32 (measured,
            # torch 2.13): compute in float32 (also more precise), return in q's dtype
            return run(q.float(), k.float(), v.float(), mask, bias, causal, scale).to(q.dtype)
        Lq, Lk = q.shape[2], k.shape[2]
        is_causal = causal and mask is None and bias is None and Lq == Lk
        if causal and not is_causal:  # SDPA's is_causal is aligned top-left; ours bottom-right
            i = torch.arange(Lq, device=q.device).unsqueeze(-1)
            allowed_causal = torch.arange(Lk, device=q.device) <= i + (Lk - Lq)
            mask = allowed_causal if mask is None else mask & allowed_causal
        attn_mask = mask
        if bias is not None:  # softmax((q.k scale + bias) / gamma)
            bias = (bias if gamma == 1.0 else bias / gamma).to(q.dtype)
            attn_mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        valid = None
        if attn_mask is not None:
            # rows without an allowed key: attend everywhere (finite), then give zeros
            valid = attn_mask.any(-1, keepdim=True) if attn_mask.dtype == torch.bool else (
                attn_mask > float("-inf")).any(-1, keepdim=True)
            # compiled, rows are fixed up unconditionally (no host sync in the graph)
            if not torch.compiler.is_compiling() and bool(valid.all()):
                valid = None
            elif attn_mask.dtype == torch.bool:
                attn_mask = attn_mask | ~valid
            else:
                attn_mask = attn_mask.masked_fill(~valid, 0.0)
        # the fused kernels want one head size for q, k and v: zero columns change nothing
        Dq, Dv = q.shape[-1], v.shape[-1]
        if Dq < Dv:
            q, k = F.pad(q, (0, Dv - Dq)), F.pad(k, (0, Dv - Dq))
        elif Dv < Dq:
            v = F.pad(v, (0, Dq - Dv))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale / gamma,
            enable_gqa=k.shape[1] != q.shape[1],
        )[..., :Dv]
        return out if valid is None else out * valid.to(out.dtype)

    return run


def _run_chunked(config: EntmaxConfig, backend: str) -> Callable[..., Tensor]:
    from .chunked import chunked_entmax_attention

    def run(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None, causal: bool,
            scale: float) -> Tensor:
        if config.gamma != 1.0:
            scale = scale / config.gamma
            bias = bias / config.gamma if bias is not None else None
        return chunked_entmax_attention(q, k, v, config.alpha_value(), mask=mask, bias=bias, causal=causal,
                                        scale=scale, backend=backend)

    return run


def _run_triton(config: EntmaxConfig) -> Callable[..., Tensor]:
    from .triton_entmax import triton_entmax_attention

    def run(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None, causal: bool,
            scale: float) -> Tensor:
        if config.gamma != 1.0:
            scale = scale / config.gamma
            bias = bias / config.gamma if bias is not None else None
        return triton_entmax_attention(q, k, v, config.alpha_value(), mask=mask, bias=bias, causal=causal,
                                       scale=scale)

    return run


_NO_PATH: Any = object()
_STRUCTURED_BUILT: list[bool] = []


@torch.compiler.assume_constant_result
def _structured_kernels_built() -> bool:
    """True when the fusedmax / oscarmax kernels build here (checked once; a constant when compiling)."""
    from .structured_chunked import structured_chunked_available

    if not _STRUCTURED_BUILT:
        _STRUCTURED_BUILT.append(structured_chunked_available())
    return _STRUCTURED_BUILT[0]


def _structured_path(mechanism: Any, q: Tensor, forced: str | None) -> Any:
    """fusedmax / oscarmax: ``(name, fn)``, ``_NO_PATH`` (keep the reference), or None (not structured)."""
    from .structured_chunked import structured_chunked_attention, structured_config

    config = structured_config(getattr(mechanism, "normalizer", None))
    if config is None:
        return None
    if forced not in (None, "cpu_chunked") or q.device.type != "cpu" or (forced is None and q.dtype == torch.float64):
        return _NO_PATH
    if not _structured_kernels_built():
        if forced == "cpu_chunked":
            from .chunked import c_kernel_error

            raise ValueError(f"the 'cpu_chunked' attention path needs its C kernels, which could not be built: "
                             f"{c_kernel_error() or 'the structured-prox library did not build'}")
        return _NO_PATH

    def run(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None, causal: bool,
            scale: float) -> Tensor:
        return structured_chunked_attention(q, k, v, config.kind, config.lam, mask=mask, bias=bias, causal=causal,
                                            scale=scale, gamma=config.gamma)

    return "cpu_chunked", run


def _triton_unavailable_reason(q: Tensor, v: Tensor, bias: Tensor | None) -> str | None:
    if q.device.type != "cuda":
        return f"tensors are on {q.device.type}, the Triton kernels need CUDA"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (the Triton kernels take float16, bfloat16, float32)"
    if q.shape[-1] > 256:
        return f"head dimension {q.shape[-1]} > 256"
    if v.shape[-1] != q.shape[-1]:
        return f"value dimension {v.shape[-1]} differs from the query/key dimension {q.shape[-1]}"
    if bias is not None and bias.requires_grad:
        return "an additive mask that requires a gradient"
    from .triton_entmax import triton_available

    if not triton_available():
        return "triton is not installed"
    return None


def select_path(
    mechanism: Any,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    causal: bool,
    dropout_p: float,
    return_weights: bool,
    bias: Tensor | None = None,
) -> tuple[str, Callable[..., Tensor]] | None:
    """Return ``(path_name, fn)`` of a fast path that computes exactly this call, or None (reference).

    Parameters
    ----------
    mechanism : the :class:`plugin.AttentionMechanism` (its ``normalizer`` decides).
    q : (B, H, Lq, D); k, v : (B, Hkv, Lk, D), not repeated to H heads.
    mask : None or a bool tensor broadcastable to (B, H, Lq, Lk), True = attend (without
        causality, which ``causal`` carries).
    bias : None or a float tensor broadcastable to (B, H, Lq, Lk) added to the scores.

    ``fn(q, k, v, mask, bias, causal, scale)`` returns the (B, H, Lq, D) output.
    """
    forced = forced_path()
    if forced == "reference" or return_weights:
        return None
    gamma = softmax_gamma(getattr(mechanism, "normalizer", None))
    if gamma is not None:
        if forced in (None, "sdpa"):
            return "sdpa", _run_sdpa(gamma, dropout_p)
        return None
    if dropout_p > 0 or forced == "sdpa":
        return None
    structured = _structured_path(mechanism, q, forced)
    if structured is not None:
        return None if structured is _NO_PATH else structured
    config = entmax_config(getattr(mechanism, "normalizer", None))
    if config is None:
        return None
    if config.learned is not None and config.learned.num_heads != q.shape[1]:
        return None  # the reference path raises the error about the head count
    if forced == "triton" or (forced is None and q.device.type == "cuda"):
        reason = _triton_unavailable_reason(q, v, bias)
        if reason is None:
            return "triton", _run_triton(config)
        if forced == "triton":
            raise ValueError(f"PLUGIN_ATTENTION_PATH / use_path: the 'triton' path cannot run this call: {reason}")
        return None
    if q.device.type != "cpu":
        if forced is not None:
            raise ValueError(f"the {forced!r} attention path runs on CPU tensors, got {q.device.type}")
        return None
    if forced == "cpu_chunked_torch":
        return "cpu_chunked_torch", _run_chunked(config, "torch")
    from .chunked import c_kernel_available

    if forced == "cpu_chunked":
        if not c_kernel_available():
            from .chunked import c_kernel_error

            raise ValueError(f"the 'cpu_chunked' attention path needs its C row kernel, which could not be built: "
                             f"{c_kernel_error() or 'no C compiler built it'}")
        return "cpu_chunked", _run_chunked(config, "c")
    if q.dtype == torch.float64:
        return None
    if c_kernel_available():
        return "cpu_chunked", _run_chunked(config, "c")
    B, H, Lq = q.shape[:3]
    if B * H * Lq * k.shape[2] >= _TORCH_CHUNKED_MIN_SCORES:
        return "cpu_chunked_torch", _run_chunked(config, "torch")
    return None
