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

Each variant declares the paths that compute it (``register_normalizer(..., paths=...)`` with
the factories of :mod:`plugin.paths`); :mod:`plugin.dispatch` takes the first one whose
``supports(call)`` accepts the call, else the reference, and records why each was refused
(``CallRecord.refused``). For the sparse normalizers ``float64`` stays on the reference path.

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
from collections.abc import Iterator

import torch

__all__ = [
    "PATHS",
    "current_path_override",
    "forced_path",
    "reference_path",
    "use_path",
]

PATHS = ("reference", "sdpa", "cpu_chunked", "cpu_chunked_torch", "triton")

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
