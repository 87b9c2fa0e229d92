"""Call recording: which attention mechanism ran, in which role, on which path.

The recorders live in a :class:`contextvars.ContextVar`, so they are local to a thread (and
to an asyncio task): a thread sees only the calls it makes itself, and recorders nest (every
recorder that is open in the current context receives each call). A recorder is removed by
identity when its block ends, so blocks that end in any order leave nothing behind.

The state is read only through :func:`active_recorders` and :func:`recording`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["CallRecord", "active_recorders", "notify", "record_calls", "recording"]


@dataclass
class CallRecord:
    """One call of an attention mechanism, seen by :func:`record_calls`."""

    spec: str
    role: str | None
    query_shape: tuple[int, ...]
    key_shape: tuple[int, ...]
    path: str
    training: bool
    # why the paths tried before ``path`` were refused, by path name ("*": the call as a whole)
    refused: dict[str, str] = field(default_factory=dict)


_RECORDERS: contextvars.ContextVar[tuple[list[CallRecord], ...]] = contextvars.ContextVar(
    "plugin_call_recorders", default=()
)


def active_recorders() -> tuple[list[CallRecord], ...]:
    """The lists of the recorders open in the current context (innermost last)."""
    return _RECORDERS.get()


def recording() -> bool:
    """True when at least one recorder is open in the current context."""
    return bool(_RECORDERS.get())


def notify(record: CallRecord) -> None:
    """Append ``record`` to every recorder open in the current context."""
    for calls in _RECORDERS.get():
        calls.append(record)


@contextlib.contextmanager
def record_calls() -> Iterator[list[CallRecord]]:
    """Record every attention-mechanism call made inside the block, in this thread / context.

    Adapters label their mechanisms with a ``role`` ("encoder", "decoder", "cross", ...),
    so tests and users can check which mechanism ran where::

        with plugin.record_calls() as calls:
            model(**batch)
        assert {(c.role, c.spec) for c in calls} == {...}

    Recorders nest (an outer recorder also sees the calls of an inner block); calls made by
    other threads are not recorded.
    """
    calls: list[CallRecord] = []
    _RECORDERS.set((*_RECORDERS.get(), calls))
    try:
        yield calls
    finally:
        _RECORDERS.set(tuple(r for r in _RECORDERS.get() if r is not calls))
