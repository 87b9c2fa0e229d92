"""Memory-efficient CPU attention for sparsemax, entmax-1.5 and alpha-entmax (fixed or learned alpha).

The queries are processed in chunks: scores of a chunk -> threshold per query -> probabilities
-> probabilities @ values. Only a chunk of the (Lq, Lk) score matrix exists at a time. The
backward pass recomputes each chunk's scores from ``q``, ``k`` and the per-query statistics
saved by the forward pass (flash-attention style: nothing of size Lq x Lk is kept):

    p = [(alpha - 1)(s - m) - t]_+^(1 / (alpha - 1)) / norm         (per query: m, t, norm)
    dP = dO V^T,   g = p^(2 - alpha),   dS = g (dP - sum(g dP) / sum(g))
    dV = P^T dO,   dQ = scale dS K,     dK = scale dS^T Q

and, for a learned alpha, ``d out / d alpha`` per head (Correia et al. 2019).

Sparse chunks. When a chunk's probabilities have few nonzeros (at most
``SPARSE_MAX_DENSITY`` of its entries, the usual case for sparsemax and entmax-1.5), the
product with V is done over the nonzeros only, and the nonzeros are kept (CSR: key index
and value) for the backward pass, which then needs no dense product at all: ``dP`` is
evaluated on the support only, and ``dQ``, ``dK``, ``dV`` are sums over it. The kept forms
are limited to ``max(SPARSE_MIN_BUDGET, SPARSE_BUDGET_FACTOR x bytes of q, k, v, out)``;
chunks beyond that, and dense chunks, are recomputed in the backward pass.

Two implementations of the row work (threshold, probabilities, row backward):
``backend="c"`` is the C kernel ``entmax_rows.c`` (sort-free Newton iterations with an exact
closed-form finish for alpha = 2 and 1.5, OpenMP over rows), compiled on first use;
``backend="torch"`` uses the normalizers of :mod:`plugin.normalizers` on each chunk (no
compiler needed, any float dtype, slower).
"""

from __future__ import annotations

import ctypes
import math
import threading
from pathlib import Path

import torch
from torch import Tensor

from .cbuild import CompileError, load_c_library

__all__ = ["c_kernel_available", "c_kernel_error", "chunked_entmax_attention", "rows_backward", "rows_forward",
           "run_chunked_entmax"]

SPARSEMAX, ENTMAX15, GENERAL = 0, 1, 2
# score elements per chunk (float32): 2^21 = 8 MiB, a few of them live at once
CHUNK_ELEMENTS = 1 << 21
# a chunk whose probabilities have at most this fraction of nonzeros is multiplied with V
# sparsely and, when a backward pass will follow, kept in sparse form (CSR) for it
# (measured break-even with the dense products: about 25% nonzeros at L = 1024, D = 64)
SPARSE_MAX_DENSITY = 0.2
# the sparse forms kept for the backward pass take at most this many bytes ...
SPARSE_MIN_BUDGET = 64 << 20
# ... or this many times the bytes of q, k, v and the output, whichever is larger
SPARSE_BUDGET_FACTOR = 2.0

_SOURCE = Path(__file__).with_name("entmax_rows.c")
# -ffp-contract=off: the forward and the backward evaluate p with the same roundings;
# -fno-trapping-math lets the compiler vectorize the branch-free selects (no FP traps are used)
_COMMON = ("-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-shared", "-fPIC", "-std=c99")
_FLAG_SETS = (
    _COMMON + ("-march=native", "-fopenmp"),
    _COMMON + ("-fopenmp",),
    _COMMON + ("-fopenmp-simd",),
    _COMMON,
)
_LIB: list[ctypes.CDLL] = []
_LIB_ERROR: list[str] = []
_LOCK = threading.Lock()


def _library() -> ctypes.CDLL:
    if _LIB:
        return _LIB[0]
    with _LOCK:
        if _LIB:
            return _LIB[0]
        if _LIB_ERROR:
            raise CompileError(_LIB_ERROR[0])
        try:
            lib = load_c_library(_SOURCE, _FLAG_SETS)
        except CompileError as exc:
            _LIB_ERROR.append(str(exc))
            raise
        i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        lib.entmax_rows_forward.restype = cint
        lib.entmax_rows_forward.argtypes = [ptr, i64, i64, ptr, i64, cint, cint, i64, i64, i64, ptr, ptr, cint]
        lib.entmax_rows_backward.restype = cint
        lib.entmax_rows_backward.argtypes = [ptr, ptr, i64, i64, ptr, i64, cint, cint, i64, i64, i64, ptr, ptr, cint]
        lib.entmax_rows_gather.restype = None
        lib.entmax_rows_gather.argtypes = [ptr, i64, i64, ptr, ptr, ptr, cint]
        lib.entmax_sparse_matmul.restype = None
        lib.entmax_sparse_matmul.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr, cint]
        lib.entmax_sparse_backward.restype = None
        lib.entmax_sparse_backward.argtypes = [ptr] * 9 + [i64, cint, i64, i64, i64, i64, i64, i64] + [ptr] * 5 + [cint]
        _LIB.append(lib)
        return lib


def c_kernel_error() -> str:
    """Why the C row kernel could not be built (empty when it was built or not tried yet)."""
    return _LIB_ERROR[0] if _LIB_ERROR else ""


@torch.compiler.assume_constant_result
def c_kernel_available() -> bool:
    """True when the C row kernel is built (building it now if needed)."""
    try:
        _library()
    except CompileError:
        return False
    return True


def _ptr(t: Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def check_c_buffer(t: Tensor | None, dtype: torch.dtype, name: str, numel: int | None = None,
                   optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``t`` is a contiguous CPU tensor of ``dtype`` (and ``numel`` elements).

    Called for every tensor before its pointer goes to the C kernel, which reads raw memory.
    """
    if t is None:
        if optional:
            return
        raise ValueError(f"C kernel argument {name}: a tensor is required, got None")
    if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(
            f"C kernel argument {name}: must be a contiguous CPU tensor of {dtype}, got {t.dtype} on {t.device}"
            f"{'' if t.is_contiguous() else ' (not contiguous)'}"
        )
    if numel is not None and t.numel() != numel:
        raise ValueError(f"C kernel argument {name}: must have {numel} elements, got {t.numel()}")


def rows_forward(
    S: Tensor,
    am1: Tensor,
    kind: int,
    causal: bool = False,
    q_start: int = 0,
    c: int = 1,
    causal_off: int = 0,
    counts: Tensor | None = None,
) -> Tensor:
    """alpha-entmax of the rows of ``S`` in place (C kernel); returns the statistics.

    Parameters
    ----------
    S : (rows, n) float32 contiguous scores, -inf where masked; overwritten with the
        probabilities. Rows are laid out (batch, head, query) with ``c`` queries per head.
    am1 : (heads,) float32 contiguous, ``alpha - 1`` per head (row r uses ``am1[(r // c) % heads]``).
    kind : SPARSEMAX (alpha = 2), ENTMAX15 or GENERAL.
    causal, q_start, c, causal_off : with ``causal``, row r (query ``q_start + r % c``) sees
        keys ``j <= q_start + r % c + causal_off``.
    counts : optional (rows,) int32 tensor that receives the support size of each row.

    Returns
    -------
    stats : (rows, 3) float32, per row ``(m, t, 1 / norm)`` (``m = inf`` for a row with no
        allowed key), which :func:`rows_backward` needs.
    """
    rows, n = S.shape
    check_c_buffer(S, torch.float32, "S")
    check_c_buffer(am1, torch.float32, "am1")
    check_c_buffer(counts, torch.int32, "counts", rows, optional=True)
    stats = torch.empty(rows, 3, dtype=torch.float32)
    failed = _library().entmax_rows_forward(
        _ptr(S), rows, n, _ptr(am1), am1.numel(), kind, int(causal), q_start, c, causal_off, _ptr(stats),
        _ptr(counts), torch.get_num_threads(),
    )
    if failed:
        raise MemoryError(f"entmax rows: could not allocate scratch memory for rows of length {n}")
    return stats


def rows_backward(
    S: Tensor,
    dP: Tensor,
    stats: Tensor,
    am1: Tensor,
    kind: int,
    causal: bool = False,
    q_start: int = 0,
    c: int = 1,
    causal_off: int = 0,
    want_dalpha: bool = False,
) -> Tensor | None:
    """Backward of :func:`rows_forward` in place: ``S`` -> p, ``dP`` -> gradient w.r.t. the scores.

    Returns the per-row ``sum_j dP_j dp_j / dalpha`` (rows,) when ``want_dalpha``, else None.
    """
    rows, n = S.shape
    check_c_buffer(S, torch.float32, "S")
    check_c_buffer(dP, torch.float32, "dP", rows * n)
    check_c_buffer(stats, torch.float32, "stats", rows * 3)
    check_c_buffer(am1, torch.float32, "am1")
    dalpha = torch.empty(rows, dtype=torch.float32) if want_dalpha else None
    failed = _library().entmax_rows_backward(
        _ptr(S), _ptr(dP), rows, n, _ptr(am1), am1.numel(), kind, int(causal), q_start, c, causal_off, _ptr(stats),
        _ptr(dalpha), torch.get_num_threads(),
    )
    if failed:
        raise MemoryError(f"entmax rows: could not allocate scratch memory for rows of length {n}")
    return dalpha


def sparse_rows(P: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The nonzeros of ``P`` (rows, n) in CSR form: ``(offsets (rows + 1,) int64, idx int32, val float32)``."""
    rows, n = P.shape
    check_c_buffer(P, torch.float32, "P")
    check_c_buffer(counts, torch.int32, "counts", rows)
    offsets = torch.zeros(rows + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    nnz = int(offsets[-1])
    idx = torch.empty(nnz, dtype=torch.int32)
    val = torch.empty(nnz, dtype=torch.float32)
    _library().entmax_rows_gather(_ptr(P), rows, n, _ptr(offsets), _ptr(idx), _ptr(val), torch.get_num_threads())
    return offsets, idx, val


def sparse_matmul(csr: tuple[Tensor, Tensor, Tensor], V: Tensor, rows_per_group: int) -> Tensor:
    """``P @ V`` for ``P`` in CSR form (rows laid out by group); ``V`` (groups, Lk, Dv) contiguous float32."""
    offsets, idx, val = csr
    rows = offsets.numel() - 1
    check_c_buffer(offsets, torch.int64, "offsets")
    check_c_buffer(idx, torch.int32, "idx")
    check_c_buffer(val, torch.float32, "val", idx.numel())
    check_c_buffer(V, torch.float32, "V")
    out = torch.empty(rows, V.shape[-1], dtype=torch.float32)
    _library().entmax_sparse_matmul(_ptr(offsets), _ptr(idx), _ptr(val), _ptr(V), rows, rows_per_group, V.shape[1],
                                    V.shape[2], _ptr(out), torch.get_num_threads())
    return out


# ----------------------------------------------------------------------------- torch row backend


def _torch_probs(S4: Tensor, kind: int, alpha: Tensor) -> Tensor:
    from ..normalizers.entmax import entmax, entmax15
    from ..normalizers.sparsemax import sparsemax

    if kind == SPARSEMAX:
        return sparsemax(S4)
    if kind == ENTMAX15:
        return entmax15(S4)
    return entmax(S4, alpha=alpha.to(S4.dtype).view(-1, 1))


def _torch_rows_backward(S4: Tensor, dP4: Tensor, kind: int, alpha: Tensor, want_dalpha: bool):
    """p, dS and per-row dalpha (or None) for a chunk (B, H, c, n) whose masked scores are -inf."""
    p = _torch_probs(S4, kind, alpha)
    support = p > 0
    a = alpha.to(S4.dtype).view(-1, 1, 1)
    tiny = torch.finfo(p.dtype).tiny
    if kind == SPARSEMAX:
        g = support.to(p.dtype)
    else:
        g = torch.where(support, p.clamp(min=tiny) ** (2 - a), 0)
    gsum = g.sum(-1, keepdim=True)
    gdp = (g * dP4).sum(-1, keepdim=True)
    delta = gdp / gsum.clamp(min=tiny)
    dS = g * (dP4 - delta)
    dalpha = None
    if want_dalpha:
        m = torch.where(support, S4, float("-inf")).amax(-1, keepdim=True)
        zs = torch.where(support, S4 - m, 0)
        plogp = torch.where(support, p * torch.log(p.clamp(min=tiny)), 0)
        tau_prime = ((g * zs).sum(-1, keepdim=True) - plogp.sum(-1, keepdim=True)) / gsum.clamp(min=tiny)
        dalpha = ((dP4 * (-plogp + g * zs)).sum(-1, keepdim=True) - tau_prime * gdp) / (a - 1)
        dalpha = dalpha.squeeze(-1)
    return p, dS, dalpha


# ----------------------------------------------------------------------------- the chunked attention


def _slice4(t: Tensor | None, b: int, h0: int, h1: int, i0: int, i1: int, kend: int) -> Tensor | None:
    """Batch b, heads h0:h1, queries i0:i1, keys :kend of a 4-D tensor broadcastable to (B, H, Lq, Lk) -> 3-D."""
    if t is None:
        return None
    return t[
        b if t.shape[0] != 1 else 0,
        slice(h0, h1) if t.shape[1] != 1 else slice(None),
        slice(i0, i1) if t.shape[2] != 1 else slice(None),
        slice(0, kend) if t.shape[3] != 1 else slice(None),
    ]


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``grad`` over the dimensions where ``shape`` broadcasts (size 1)."""
    dims = [d for d in range(grad.dim()) if shape[d] == 1 and grad.shape[d] != 1]
    return grad.sum(dims, keepdim=True) if dims else grad


class _Chunk:
    """Queries i0:i1 of the query heads of key/value heads hk0:hk1 of batch element b, against keys :kend."""

    __slots__ = ("b", "bk0", "bk1", "c", "h0", "h1", "hk0", "hk1", "i0", "i1", "kend", "rows")

    def __init__(self, b: int, hk0: int, hk1: int, G: int, Hkv: int, i0: int, i1: int, kend: int) -> None:
        self.b, self.hk0, self.hk1, self.i0, self.i1, self.kend = b, hk0, hk1, i0, i1, kend
        self.h0, self.h1 = hk0 * G, hk1 * G
        self.bk0, self.bk1 = b * Hkv + hk0, b * Hkv + hk1
        self.c = i1 - i0
        self.rows = (self.h1 - self.h0) * self.c


class _Chunks:
    """The chunks of an attention call, shared by forward and backward (identical scores in both).

    A chunk holds about ``CHUNK_ELEMENTS`` scores: at least 128 queries per head (fewer when
    Lq is smaller), and as many key/value heads (with their query heads) as fit. Its rows are
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
        self.dtype = q.dtype
        self._buffers: dict[str, Tensor] = {}

    def __iter__(self):
        for b in range(self.B):
            for hk0 in range(0, self.Hkv, self.heads):
                hk1 = min(self.Hkv, hk0 + self.heads)
                for i0 in range(0, self.Lq, self.c):
                    i1 = min(self.Lq, i0 + self.c)
                    kend = min(self.Lk, i1 + self.off) if self.causal else self.Lk
                    yield _Chunk(b, hk0, hk1, self.G, self.Hkv, i0, i1, max(kend, 0))

    def buffer(self, name: str, shape: tuple[int, ...]) -> Tensor:
        """A reusable buffer (q's dtype) viewed as ``shape`` (its contents are garbage)."""
        numel = math.prod(shape)
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, self.heads * self.G * self.c * self.Lk), dtype=self.dtype)
            self._buffers[name] = buf
        return buf[:numel].view(shape)

    def rows_of(self, t: Tensor, ch: _Chunk) -> Tensor:
        """(B, H, Lq, X) -> the chunk's rows as (key/value heads, G * c, X)."""
        return t[ch.b, ch.h0:ch.h1, ch.i0:ch.i1].reshape(ch.hk1 - ch.hk0, self.G * ch.c, t.shape[-1])

    def scores(self, qs: Tensor, kT: Tensor, bias: Tensor | None, allowed: Tensor | None, ch: _Chunk) -> Tensor:
        """Scaled scores of the chunk, (key/value heads, G * c, kend), -inf where masked."""
        S = self.buffer("scores", (ch.hk1 - ch.hk0, self.G * ch.c, ch.kend))
        torch.bmm(self.rows_of(qs, ch), kT[ch.bk0:ch.bk1, :, :ch.kend], out=S)
        S3 = S.view(ch.h1 - ch.h0, ch.c, ch.kend)
        if bias is not None:
            S3.add_(_slice4(bias, ch.b, ch.h0, ch.h1, ch.i0, ch.i1, ch.kend))
        if allowed is not None:
            S3.masked_fill_(~_slice4(allowed, ch.b, ch.h0, ch.h1, ch.i0, ch.i1, ch.kend), float("-inf"))
        return S

    def causal_blocked(self, ch: _Chunk, device: torch.device) -> Tensor:
        i = torch.arange(ch.i0, ch.i1, device=device).unsqueeze(-1)
        return torch.arange(ch.kend, device=device) > i + self.off


def _dense_chunk_grads(chunks: _Chunks, ch: _Chunk, P: Tensor, dS: Tensor, dO: Tensor, kr: Tensor, qs: Tensor,
                       scale: float, grads: tuple, needed: tuple) -> None:
    """Add one chunk's share to ``grads = (dq, dk, dv, dbias)`` (those flagged in ``needed``).

    ``P`` and ``dS`` are the chunk's probabilities and score gradients as (kv heads, G * c, kend).
    """
    dq, dk, dv, dbias = grads
    need_q, need_k, need_v, need_bias = needed
    nh, c, D = ch.h1 - ch.h0, ch.c, kr.shape[-1]
    if need_bias:
        target = _slice4(dbias, ch.b, ch.h0, ch.h1, ch.i0, ch.i1, ch.kend)
        target += _reduce_to(dS.reshape(nh, c, ch.kend), target.shape)
    if need_v:
        dv[ch.bk0:ch.bk1, :ch.kend].baddbmm_(P.transpose(1, 2), dO)
    if need_q:
        dq[ch.b, ch.h0:ch.h1, ch.i0:ch.i1] = torch.bmm(dS, kr[ch.bk0:ch.bk1, :ch.kend]).view(nh, c, D) * scale
    if need_k:
        dk[ch.bk0:ch.bk1, :ch.kend].baddbmm_(dS.transpose(1, 2), chunks.rows_of(qs, ch))


def chunked_forward(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, bias: Tensor | None, allowed: Tensor | None,
                    kind: int, causal: bool, scale: float, chunk_rows: int | None, backend: str,
                    keep_sparse: bool) -> tuple[Tensor, Tensor | None, dict]:
    """The forward pass: ``(out, stats, kept)``; ``kept`` holds the sparse chunks (CSR) when ``keep_sparse``.

    ``q`` (B, H, Lq, D), ``k``, ``v`` (B, Hkv, Lk, D / Dv) contiguous in the work dtype; ``alpha``
    (H,); ``bias`` / ``allowed`` 4-D, broadcastable to (B, H, Lq, Lk); ``stats`` (B, H, Lq, 3)
    float32 for the C backend, else None.
    """
    chunks = _Chunks(q, k, causal, chunk_rows)
    B, H, Lq, D = q.shape
    Hkv, Lk, Dv = chunks.Hkv, chunks.Lk, v.shape[-1]
    qs = q * scale
    kT = k.reshape(B * Hkv, Lk, D).transpose(1, 2)
    vr = v.reshape(B * Hkv, Lk, Dv)
    out = q.new_zeros(B, H, Lq, Dv)
    am1 = (alpha.detach().to(torch.float32) - 1).contiguous()
    stats = torch.full((B, H, Lq, 3), float("inf"), dtype=torch.float32) if backend == "c" else None
    budget = max(SPARSE_MIN_BUDGET, SPARSE_BUDGET_FACTOR * 4 * (q.numel() + k.numel() + v.numel() + out.numel()))
    kept: dict[tuple[int, int, int], tuple[Tensor, Tensor, Tensor]] = {}
    kept_bytes = 0
    for ch in chunks:
        if ch.kend == 0:
            continue  # every key is in the future of every query of the chunk: zeros
        S = chunks.scores(qs, kT, bias, allowed, ch)
        P2 = S.view(ch.rows, ch.kend)
        nh = ch.h1 - ch.h0
        if backend == "c":
            counts = torch.empty(ch.rows, dtype=torch.int32)
            am1_chunk = torch.roll(am1, -ch.h0)  # row r of the chunk is head h0 + r // c
            st = rows_forward(P2, am1_chunk, kind, causal, ch.i0, ch.c, chunks.off, counts)
            stats[ch.b, ch.h0:ch.h1, ch.i0:ch.i1] = st.view(nh, ch.c, 3)
            if int(counts.sum()) <= SPARSE_MAX_DENSITY * ch.rows * ch.kend:
                csr = sparse_rows(P2, counts)
                result = sparse_matmul(csr, vr[ch.bk0:ch.bk1], chunks.G * ch.c)
                out[ch.b, ch.h0:ch.h1, ch.i0:ch.i1] = result.view(nh, ch.c, Dv)
                size = 4 * (csr[0].numel() * 2 + csr[1].numel() + csr[2].numel())
                if keep_sparse and kept_bytes + size <= budget:
                    kept[(ch.b, ch.hk0, ch.i0)] = csr
                    kept_bytes += size
                continue
        else:
            S3 = S.view(nh, ch.c, ch.kend)
            if causal:
                S3.masked_fill_(chunks.causal_blocked(ch, S.device), float("-inf"))
            S3.copy_(_torch_probs(S3, kind, alpha[ch.h0:ch.h1]))
        out[ch.b, ch.h0:ch.h1, ch.i0:ch.i1] = torch.bmm(S, vr[ch.bk0:ch.bk1, :ch.kend]).view(nh, ch.c, Dv)
    return out, stats, kept  # kept, per chunk: the probabilities in CSR form (O(nonzeros) memory)


def chunked_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, bias: Tensor | None,
                     allowed: Tensor | None, stats: Tensor | None, kept: dict, kind: int, causal: bool, scale: float,
                     chunk_rows: int | None, backend: str, needs: tuple[bool, ...]) -> tuple:
    """The backward pass of :func:`chunked_forward`: ``(dq, dk, dv, dalpha, dbias)``, None where not in ``needs``."""
    need_q, need_k, need_v, need_alpha, need_bias = needs
    chunks = _Chunks(q, k, causal, chunk_rows)
    B, H, _, D = q.shape
    Hkv, Lk, Dv = chunks.Hkv, chunks.Lk, v.shape[-1]
    qs = q * scale
    kr = k.reshape(B * Hkv, Lk, D)
    vr = v.reshape(B * Hkv, Lk, Dv)
    kT, vT = kr.transpose(1, 2), vr.transpose(1, 2)
    dout = dout.contiguous()
    dq = torch.zeros_like(q) if need_q else None
    # the sparse backward writes dK and dV whether or not they are needed
    dk = torch.zeros(B * Hkv, Lk, D, dtype=k.dtype) if need_k or kept else None
    dv = torch.zeros(B * Hkv, Lk, Dv, dtype=v.dtype) if need_v or kept else None
    dalpha = torch.zeros(H, dtype=torch.float32) if need_alpha else None
    dbias = torch.zeros(bias.shape, dtype=bias.dtype) if need_bias else None
    am1 = (alpha.detach().to(torch.float32) - 1).contiguous()
    for ch in chunks:
        if ch.kend == 0:
            continue
        nh, c = ch.h1 - ch.h0, ch.c
        am1_chunk = torch.roll(am1, -ch.h0)
        # every buffer handed to C is held by a local name for the duration of the call
        dO = chunks.rows_of(dout, ch).contiguous()
        csr = kept.get((ch.b, ch.hk0, ch.i0))
        if csr is not None:
            offsets, idx, val = csr
            st = stats[ch.b, ch.h0:ch.h1, ch.i0:ch.i1].contiguous()
            q_c = chunks.rows_of(qs, ch).contiguous()
            dq_c = torch.empty(ch.rows, D, dtype=torch.float32)
            da = torch.empty(ch.rows, dtype=torch.float32) if need_alpha else None
            ds = torch.empty(val.numel(), dtype=torch.float32)
            for label, t, dtype in (("offsets", offsets, torch.int64), ("idx", idx, torch.int32),
                                    ("val", val, torch.float32), ("stats", st, torch.float32),
                                    ("q", q_c, torch.float32), ("k", kr, torch.float32), ("v", vr, torch.float32),
                                    ("dout", dO, torch.float32), ("dk", dk, torch.float32),
                                    ("dv", dv, torch.float32)):
                check_c_buffer(t, dtype, label)
            _library().entmax_sparse_backward(
                _ptr(offsets), _ptr(idx), _ptr(val), _ptr(st), _ptr(q_c), _ptr(kr[ch.bk0:ch.bk1]),
                _ptr(vr[ch.bk0:ch.bk1]), _ptr(dO), _ptr(am1_chunk), H, kind, c, ch.rows, chunks.G * c, Lk, D,
                Dv, _ptr(dq_c), _ptr(dk[ch.bk0:ch.bk1]), _ptr(dv[ch.bk0:ch.bk1]), _ptr(da), _ptr(ds),
                torch.get_num_threads(),
            )
            if need_q:
                dq[ch.b, ch.h0:ch.h1, ch.i0:ch.i1] = dq_c.view(nh, c, D) * scale
            if need_alpha:
                dalpha[ch.h0:ch.h1] += da.view(nh, c).sum(1)
            continue
        S = chunks.scores(qs, kT, bias, allowed, ch)
        dP = chunks.buffer("grad", S.shape)
        torch.bmm(dO, vT[ch.bk0:ch.bk1, :, :ch.kend], out=dP)
        if backend == "c":
            st = stats[ch.b, ch.h0:ch.h1, ch.i0:ch.i1].reshape(-1, 3).contiguous()
            da = rows_backward(S.view(-1, ch.kend), dP.view(-1, ch.kend), st, am1_chunk, kind, causal, ch.i0, c,
                               chunks.off, need_alpha)
            P, dS = S, dP
        else:
            S3 = S.view(nh, c, ch.kend)
            if causal:
                S3.masked_fill_(chunks.causal_blocked(ch, S.device), float("-inf"))
            P3, dS3, da = _torch_rows_backward(S3, dP.view(nh, c, ch.kend), kind, alpha.detach()[ch.h0:ch.h1],
                                               need_alpha)
            P, dS = P3.reshape_as(S), dS3.reshape_as(S)
        if need_alpha:
            dalpha[ch.h0:ch.h1] += da.view(nh, c).sum(1).to(torch.float32)
        _dense_chunk_grads(chunks, ch, P, dS, dO, kr, qs, scale, (dq, dk, dv, dbias),
                           (need_q, need_k, need_v, need_bias))
    return (
        dq,
        dk.view(k.shape) if need_k else None,
        dv.view(v.shape) if need_v else None,
        dalpha.to(alpha.dtype).view(alpha.shape) if need_alpha else None,
        dbias,
    )


class _ChunkedEntmaxAttention(torch.autograd.Function):
    """Eager autograd: the sparse chunks of the forward pass are kept for the backward pass."""

    @staticmethod
    def forward(ctx, q, k, v, alpha, bias, allowed, kind, causal, scale, chunk_rows, backend, keep_sparse):  # type: ignore[override]
        out, stats, kept = chunked_forward(q, k, v, alpha, bias, allowed, kind, causal, scale, chunk_rows, backend,
                                           keep_sparse)
        ctx.save_for_backward(q, k, v, alpha, bias, allowed, stats)
        ctx.kept = kept
        ctx.config = (kind, causal, scale, chunk_rows, backend)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, alpha, bias, allowed, stats = ctx.saved_tensors
        grads = chunked_backward(dout, q, k, v, alpha, bias, allowed, stats, ctx.kept, *ctx.config,
                                 tuple(ctx.needs_input_grad[:5]))
        return (*grads, None, None, None, None, None, None, None)


def chunked_entmax_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: float | Tensor,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
    chunk_rows: int | None = None,
    backend: str = "c",
) -> Tensor:
    """alpha-entmax attention without an (Lq, Lk) matrix: ``entmax_alpha(scale q k^T + bias) v``.

    Parameters
    ----------
    q : (B, H, Lq, D) queries; k, v : (B, Hkv, Lk, D) and (B, Hkv, Lk, Dv), ``Hkv`` divides ``H``
        (query head h reads key/value head ``h // (H // Hkv)``). Any float dtype; computed in
        float32 (float64 kept with ``backend="torch"``), returned in q's dtype.
    alpha : 2.0 (sparsemax), 1.5 (entmax-1.5), another float in (1, 2), or a tensor of
        shape (H,) or (H, 1) with one alpha per head (it receives a gradient).
    mask : bool tensor broadcastable to (B, H, Lq, Lk), True where attending is allowed.
    bias : float tensor broadcastable to (B, H, Lq, Lk) added to the scaled scores
        (``-inf`` = masked); it receives a gradient.
    causal : query i sees keys ``j <= i + Lk - Lq`` (aligned bottom-right).
    scale : score scale, default ``1 / sqrt(D)``.
    chunk_rows : queries per chunk (default: about 2^21 score elements per chunk).
    backend : ``"c"`` (compiled row kernel, float32) or ``"torch"``.

    Returns
    -------
    (B, H, Lq, Dv) tensor; a query with no allowed key gives zeros. The arguments are checked
    (``ValueError``); the attention path calls :func:`run_chunked_entmax`, which trusts them.
    """
    _check_arguments(q.shape[1], k.shape[1], alpha, backend)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else scale
    return run_chunked_entmax(q, k, v, alpha, mask, bias, causal, scale, chunk_rows, backend)


def _check_arguments(H: int, Hkv: int, alpha: float | Tensor, backend: str) -> None:
    name = "chunked_entmax_attention"
    if backend not in ("c", "torch"):
        raise ValueError(f"{name}: backend must be 'c' or 'torch', got {backend!r}")
    if H % Hkv:
        raise ValueError(f"{name}: query heads H={H} must be a multiple of key/value heads {Hkv}")
    if not isinstance(alpha, Tensor):
        if not 1 < float(alpha) <= 2:
            raise ValueError(f"{name}: alpha must lie in (1, 2], got {alpha!r}")
        return
    if alpha.numel() not in (1, H):
        raise ValueError(f"{name}: alpha must have one value per head (H={H}), got {tuple(alpha.shape)}")
    if not torch.compiler.is_compiling():  # compiled, the op checks it (no host sync in the graph)
        with torch.no_grad():
            if not bool(((alpha > 1) & (alpha <= 2)).all()):
                raise ValueError(f"{name}: alpha must lie in (1, 2]; got values outside it")


def run_chunked_entmax(q: Tensor, k: Tensor, v: Tensor, alpha: float | Tensor, mask: Tensor | None, bias: Tensor | None,
                       causal: bool, scale: float, chunk_rows: int | None = None, backend: str = "c") -> Tensor:
    """:func:`chunked_entmax_attention` for arguments already checked (by :func:`plugin.attention`'s boundary)."""
    H = q.shape[1]
    if isinstance(alpha, Tensor):
        alpha_t = alpha.reshape(-1)
        if alpha_t.numel() == 1:
            alpha_t = alpha_t.expand(H)
        kind = GENERAL
    else:
        a = float(alpha)
        kind = SPARSEMAX if a == 2 else ENTMAX15 if a == 1.5 else GENERAL
        alpha_t = torch.full((H,), a)
    work = torch.float64 if (backend == "torch" and q.dtype == torch.float64) else torch.float32
    qw, kw, vw = (t.to(work).contiguous() for t in (q, k, v))
    alpha_t = alpha_t.to(work)
    allowed = None
    if mask is not None:
        allowed = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    biasw = None
    if bias is not None:
        biasw = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).to(work)
    # the sparse form of the probabilities is kept when a backward pass can follow; an additive
    # mask that needs a gradient (dS over every entry) takes the recomputing backward
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, alpha_t, bias)
    )
    keep_sparse = backend == "c" and needs_grad and not (bias is not None and bias.requires_grad)
    if torch.compiler.is_compiling():
        from .ops import chunked_entmax_fwd

        out, _ = chunked_entmax_fwd(qw, kw, vw, alpha_t, biasw, allowed, kind, causal, float(scale), chunk_rows,
                                    backend)
    else:
        out = _ChunkedEntmaxAttention.apply(qw, kw, vw, alpha_t, biasw, allowed, kind, causal, float(scale),
                                            chunk_rows, backend, keep_sparse)
    return out.to(q.dtype)
