"""The query-chunk machinery of the chunked CPU paths (package-internal).

Shared by :mod:`plugin.kernels.chunked` (sparsemax / entmax) and
:mod:`plugin.kernels.structured_chunked` (fusedmax / oscarmax). The interface:

- :class:`Chunks` splits an attention call (q (B, H, Lq, D), k (B, Hkv, Lk, D)) into
  :class:`Chunk` s, computes a chunk's scaled, masked scores into a reusable buffer, and
  views per-query tensors as a chunk's rows; forward and backward iterate the same chunks, so
  they see identical scores.
- :func:`dense_chunk_grads` adds a chunk's share to dq, dk, dv and the bias gradient from its
  probabilities and score gradients (the recomputing backward).
- :func:`kept_budget` is how many bytes the sparse forms kept for the backward pass may take,
  and :class:`Pool` is one allocation that holds them.
- :class:`ChunkedAttentionFunction` is the eager autograd of a chunked path: the forward's
  kept chunks (Python objects of data-dependent size) go to its backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "CHUNK_ELEMENTS",
    "SPARSE_BUDGET_FACTOR",
    "SPARSE_MIN_BUDGET",
    "Chunk",
    "ChunkedAttentionFunction",
    "Chunks",
    "Pool",
    "dense_chunk_grads",
    "kept_budget",
    "register_stats_autograd",
    "slice4",
]

# score elements per chunk (float32): 2^21 = 8 MiB, a few of them live at once
CHUNK_ELEMENTS = 1 << 21
# the sparse forms kept for the backward pass take at most this many bytes ...
SPARSE_MIN_BUDGET = 64 << 20
# ... or this many times the bytes of q, k, v and the output, whichever is larger
SPARSE_BUDGET_FACTOR = 2.0


def kept_budget(*tensors: Tensor) -> float:
    """Bytes the kept sparse forms may take: ``max(SPARSE_MIN_BUDGET, SPARSE_BUDGET_FACTOR x 4 x elements)``.

    ``tensors`` are q, k, v and the output (counted as float32).
    """
    return max(SPARSE_MIN_BUDGET, SPARSE_BUDGET_FACTOR * 4 * sum(t.numel() for t in tensors))


def slice4(t: Tensor | None, ch: Chunk) -> Tensor | None:
    """The chunk's block (batch b0:b1, heads h0:h1, queries i0:i1, keys :kend) of a 4-D tensor broadcastable
    to (B, H, Lq, Lk), still 4-D (size 1 where ``t`` broadcasts)."""
    if t is None:
        return None
    return t[
        slice(ch.b0, ch.b1) if t.shape[0] != 1 else slice(None),
        slice(ch.h0, ch.h1) if t.shape[1] != 1 else slice(None),
        slice(ch.i0, ch.i1) if t.shape[2] != 1 else slice(None),
        slice(0, ch.kend) if t.shape[3] != 1 else slice(None),
    ]


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``grad`` over the dimensions where ``shape`` broadcasts (size 1)."""
    dims = [d for d in range(grad.dim()) if shape[d] == 1 and grad.shape[d] != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


class Chunk:
    """Queries i0:i1 of the query heads of key/value heads hk0:hk1 of batch elements b0:b1, against keys :kend.

    A chunk spans several batch elements only when it holds all their heads and queries (short
    sequences: one chunk per batch element would spend its time in per-chunk overhead). Its rows
    are laid out (batch element, key/value head, query head in the group, query): ``groups =
    nb * (hk1 - hk0)`` blocks of ``G * c`` rows, contiguous in the flattened (B * Hkv) keys from
    ``bk0`` to ``bk1``.
    """

    __slots__ = ("b0", "b1", "bk0", "bk1", "c", "groups", "h0", "h1", "hk0", "hk1", "i0", "i1", "kend", "lead",
                 "nb", "region", "rows")

    def __init__(self, b0: int, b1: int, hk0: int, hk1: int, G: int, Hkv: int, i0: int, i1: int, kend: int) -> None:
        self.b0, self.b1, self.hk0, self.hk1, self.i0, self.i1, self.kend = b0, b1, hk0, hk1, i0, i1, kend
        self.nb = b1 - b0
        self.h0, self.h1 = hk0 * G, hk1 * G
        self.bk0, self.bk1 = b0 * Hkv + hk0, (b1 - 1) * Hkv + hk1
        self.c = i1 - i0
        self.groups = self.nb * (hk1 - hk0)
        self.rows = self.nb * (self.h1 - self.h0) * self.c
        # the chunk's block of a (B, H, Lq, X) tensor, and its leading shape (nb, heads, c)
        self.region = (slice(b0, b1), slice(self.h0, self.h1), slice(i0, i1))
        self.lead = (self.nb, self.h1 - self.h0, self.c)

    @property
    def key(self) -> tuple[int, int, int]:
        """The chunk's identity ``(b0, hk0, i0)``, the same in the forward and the backward pass."""
        return self.b0, self.hk0, self.i0

    @property
    def heads(self) -> int:
        """(batch element, query head) pairs of the chunk: its rows are ``heads`` blocks of ``c`` queries."""
        return self.nb * (self.h1 - self.h0)

    def head_values(self, per_head: Tensor) -> Tensor:
        """A per-head tensor (H, ...) -> one entry per (batch element, head) pair of the chunk."""
        part = per_head[self.h0:self.h1]
        return part.repeat(self.nb, *([1] * (part.dim() - 1))) if self.nb > 1 else part

    def head_sum(self, per_row: Tensor) -> Tensor:
        """Per-row values (rows,) summed per query head -> (h1 - h0,)."""
        return per_row.view(self.lead).sum((0, 2))


class Chunks:
    """The chunks of an attention call, shared by forward and backward (identical scores in both).

    A chunk holds about ``CHUNK_ELEMENTS`` scores: at least 128 queries per head (fewer when
    Lq is smaller), and as many key/value heads (with their query heads) as fit; when a whole
    batch element fits, as many batch elements as fit. Its rows are
    laid out (key/value head, query head in the group, query), so one batched product per
    key/value head gives the scores. Score buffers are allocated once and reused (repeated
    large allocations interleaved with the small kept ones fragment the heap).
    """

    def __init__(self, q: Tensor, k: Tensor, causal: bool, chunk_rows: int | None) -> None:
        B, H, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        self.B, self.H, self.Lq, self.D, self.Hkv, self.Lk = B, H, Lq, D, Hkv, Lk
        self.G = H // Hkv
        self.causal = causal
        self.off = Lk - Lq  # causal alignment: query i sees keys j <= i + off
        budget = max(1, CHUNK_ELEMENTS // max(1, self.G * Lk))
        self.c = max(1, min(Lq, chunk_rows if chunk_rows is not None else max(128, budget)))
        self.heads = max(1, min(Hkv, budget // self.c))
        # batch elements per chunk: several only when one chunk holds all of an element's heads and queries
        whole = self.c >= Lq and self.heads >= Hkv
        self.nb = max(1, min(B, budget // max(1, Hkv * Lq))) if whole else 1
        self.dtype = q.dtype
        self._buffers: dict[str, Tensor] = {}

    def __iter__(self) -> Iterator[Chunk]:
        for b0 in range(0, self.B, self.nb):
            b1 = min(self.B, b0 + self.nb)
            for hk0 in range(0, self.Hkv, self.heads):
                hk1 = min(self.Hkv, hk0 + self.heads)
                for i0 in range(0, self.Lq, self.c):
                    i1 = min(self.Lq, i0 + self.c)
                    kend = min(self.Lk, i1 + self.off) if self.causal else self.Lk
                    yield Chunk(b0, b1, hk0, hk1, self.G, self.Hkv, i0, i1, max(kend, 0))

    def operands(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """``(qs, kr, vr)``: the scaled queries, and keys / values as (B * Hkv, Lk, D / Dv) batches."""
        B, Lk = self.B, self.Lk
        return q * scale, k.reshape(B * self.Hkv, Lk, k.shape[-1]), v.reshape(B * self.Hkv, Lk, v.shape[-1])

    def buffer(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """A reusable buffer (q's dtype) viewed as ``shape`` (its contents are garbage)."""
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, self.nb * self.heads * self.G * self.c * self.Lk), dtype=self.dtype)
            self._buffers[name] = buf
        return buf[:numel].view(shape)

    def rows_of(self, t: Tensor, ch: Chunk) -> Tensor:
        """(B, H, Lq, X) -> the chunk's rows as (groups, G * c, X)."""
        return t[ch.region].reshape(ch.groups, self.G * ch.c, t.shape[-1])

    def scores(self, qs: Tensor, kT: Tensor, bias: Tensor | None, allowed: Tensor | None, ch: Chunk) -> Tensor:
        """Scaled scores of the chunk, (groups, G * c, kend), -inf where masked."""
        S = self.buffer("scores", (ch.groups, self.G * ch.c, ch.kend))
        torch.bmm(self.rows_of(qs, ch), kT[ch.bk0:ch.bk1, :, :ch.kend], out=S)
        S4 = S.view(*ch.lead, ch.kend)
        bias_chunk = slice4(bias, ch)
        if bias_chunk is not None:
            S4.add_(bias_chunk)
        allowed_chunk = slice4(allowed, ch)
        if allowed_chunk is not None:
            S4.masked_fill_(~allowed_chunk, float("-inf"))
        return S

    def causal_blocked(self, ch: Chunk, device: torch.device) -> Tensor:
        """(c, kend) bool: True where the chunk's query may not see the key (causal)."""
        i = torch.arange(ch.i0, ch.i1, device=device).unsqueeze(-1)
        return torch.arange(ch.kend, device=device) > i + self.off

    def mask_causal(self, S: Tensor, ch: Chunk) -> None:
        """Write -inf into the chunk's scores ``S`` where causality hides the key (a no-op unless causal)."""
        if self.causal:
            S.view(ch.heads, ch.c, ch.kend).masked_fill_(self.causal_blocked(ch, S.device), float("-inf"))


def dense_chunk_grads(chunks: Chunks, ch: Chunk, P: Tensor, dS: Tensor, dO: Tensor, kr: Tensor, qs: Tensor,
                      scale: float, grads: tuple[Tensor | None, ...], needed: tuple[bool, ...]) -> None:
    """Add one chunk's share to ``grads = (dq, dk, dv, dbias)`` (those flagged in ``needed``).

    ``P`` and ``dS`` are the chunk's probabilities and score gradients as (groups, G * c, kend).
    """
    dq, dk, dv, dbias = grads
    need_q, need_k, need_v, need_bias = needed
    D = kr.shape[-1]
    if need_bias and dbias is not None:
        target = slice4(dbias, ch)
        assert target is not None
        target += _reduce_to(dS.reshape(*ch.lead, ch.kend), target.shape)
    if need_v and dv is not None:
        dv[ch.bk0:ch.bk1, :ch.kend].baddbmm_(P.transpose(1, 2), dO)
    if need_q and dq is not None:
        dq[ch.region] = torch.bmm(dS, kr[ch.bk0:ch.bk1, :ch.kend]).view(*ch.lead, D) * scale
    if need_k and dk is not None:
        dk[ch.bk0:ch.bk1, :ch.kend].baddbmm_(dS.transpose(1, 2), chunks.rows_of(qs, ch))


class Pool:
    """Room for the kept sparse forms: one allocation of ``nbytes``, handed out in pieces.

    The per-chunk temporaries (several MiB each) are allocated and freed chunk after chunk;
    small long-lived tensors allocated between them would fill the freed space and fragment
    the heap (the process would grow by about a chunk's temporaries per chunk). The pool is one
    large allocation whose pages only become resident when written.
    """

    def __init__(self, nbytes: float) -> None:
        self.buf = torch.empty(int(nbytes), dtype=torch.uint8)
        self.used = 0

    @staticmethod
    def _size(t: Tensor) -> int:
        return (t.numel() * t.element_size() + 63) // 64 * 64

    def fits(self, tensors: tuple[Tensor, ...]) -> bool:
        return self.used + sum(self._size(t) for t in tensors) <= self.buf.numel()

    def put(self, t: Tensor) -> Tensor:
        """A copy of ``t`` inside the pool (the caller checked :meth:`fits`)."""
        n = t.numel() * t.element_size()
        piece = self.buf[self.used:self.used + n].view(t.dtype).view(t.shape)
        piece.copy_(t)
        self.used += self._size(t)
        return piece


class ChunkedAttentionFunction(torch.autograd.Function):
    """Eager autograd of a chunked path; the chunks kept by the forward pass go to the backward pass.

    ``apply(run_forward, run_backward, n, *tensors, *config, keep_sparse)`` with ``n`` tensors
    (the differentiable ones, then the bool mask):
    ``run_forward(*tensors, *config, keep_sparse) -> (out, stats, kept)`` and
    ``run_backward(dout, *tensors, stats, kept, *config, needs) -> grads`` (one gradient per
    differentiable tensor; ``needs`` says which are wanted).
    """

    @staticmethod
    def forward(ctx, run_forward: Callable[..., tuple[Tensor, Tensor | None, dict]],
                run_backward: Callable[..., tuple], n: int, *args: Any) -> Tensor:
        out, stats, kept = run_forward(*args)
        ctx.save_for_backward(*args[:n], stats)
        ctx.kept = kept
        ctx.config = args[n:-1]
        ctx.run_backward = run_backward
        ctx.n = n
        return out

    @staticmethod
    def backward(ctx, dout: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: the kernels' backward is not differentiable
            raise RuntimeError(
                "the chunked attention paths compute first derivatives only (create_graph=True asks for a "
                "second); take the reference path for higher derivatives: with plugin.use_path('reference')"
            )
        return ChunkedAttentionFunction._backward(ctx, dout)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def _backward(ctx: Any, dout: Tensor) -> tuple[Tensor | None, ...]:
        *tensors, stats = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[3:3 + ctx.n - 1])
        grads = ctx.run_backward(dout, *tensors, stats, ctx.kept, *ctx.config, needs)
        return (None, None, None, *grads, None, *([None] * (len(ctx.config) + 1)))


def register_stats_autograd(forward_op: Any, backward_op: Callable[..., tuple], n: int, optional: int) -> None:
    """Join a ``torch.library`` forward op ``(*tensors, *config) -> (out, stats)`` to its backward op.

    The forward op takes ``n`` tensors, then its configuration. The backward op takes
    ``(dout, *tensors, stats, *config, *needs)``, ``needs`` one flag for each of the ``optional``
    inputs after q, k, v (their gradients are computed only when wanted), and returns the
    gradients of q, k, v and of those inputs (the others get none).
    """

    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        ctx.save_for_backward(*inputs[:n], output[1])
        ctx.config = inputs[n:]

    def backward(ctx: Any, dout: Tensor, _dstats: Tensor) -> tuple[Tensor | None, ...]:
        *tensors, stats = ctx.saved_tensors
        needs = [bool(ctx.needs_input_grad[3 + i]) for i in range(optional)]
        grads = backward_op(dout, *tensors, stats, *ctx.config, *needs)
        wanted = [g if need else None for g, need in zip(grads[3:], needs)]
        return (*grads[:3], *wanted, *([None] * (n + len(ctx.config) - 3 - optional)))

    forward_op.register_autograd(backward, setup_context=setup_context)
