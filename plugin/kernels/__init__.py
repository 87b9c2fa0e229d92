"""Fast paths for plugin.attention: selected automatically, each tested against the reference path.

``PLUGIN_ATTENTION_PATH=reference`` in the environment, or the :func:`reference_path`
context manager, forces the plain PyTorch reference path everywhere.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

_FORCE_REFERENCE = [False]


@contextlib.contextmanager
def reference_path() -> Iterator[None]:
    """Force the reference (materialized scores, plain PyTorch) path inside the block."""
    previous = _FORCE_REFERENCE[0]
    _FORCE_REFERENCE[0] = True
    try:
        yield
    finally:
        _FORCE_REFERENCE[0] = previous


def reference_forced() -> bool:
    return _FORCE_REFERENCE[0] or os.environ.get("PLUGIN_ATTENTION_PATH", "").lower() == "reference"


def select_path(mechanism: Any, q: Any, k: Any, v: Any, mask: Any, causal: bool, dropout_p: float,
                return_weights: bool) -> tuple[str, Callable[..., Any]] | None:
    """Return ``(path_name, fn)`` of a fast path that computes exactly this call, or None.

    ``fn(q, k, v, mask, causal, scale)`` returns the attention output. ``k``/``v`` are
    already expanded to the query heads; ``mask`` is None or a bool tensor broadcastable
    to (B, H, Lq, Lk) (True = attend).
    """
    if reference_forced():
        return None
    return None
