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
are limited to :func:`plugin.kernels.chunks.kept_budget` bytes;
chunks beyond that, and dense chunks, are recomputed in the backward pass.

Two implementations of the row work (threshold, probabilities, row backward):
``backend="c"`` is the C kernel ``entmax_rows.c`` (sort-free Newton iterations with an exact
closed-form finish for alpha = 2 and 1.5, OpenMP over rows; it mirrors the functions of
:mod:`plugin.kernels.maths` and takes its constants from :mod:`plugin.kernels.constants`),
compiled on first use and called through the typed table of :mod:`plugin.kernels.cbinding`;
``backend="torch"`` uses the normalizers of :mod:`plugin.normalizers` on each chunk (no
compiler needed, any float dtype, slower). The chunking itself is :mod:`plugin.kernels.chunks`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from .cbinding import Arg, CFunction, CLibrary, Sizes
from .cbuild import CompileError
from .chunks import ChunkedAttentionFunction, Chunks, dense_chunk_grads, kept_budget
from .constants import ENTMAX15, GENERAL, SPARSEMAX, c_defines
from .maths import entmax_alpha_grad, entmax_backward, head_alphas

__all__ = ["c_kernel_available", "c_kernel_error", "chunked_entmax_attention", "rows_backward", "rows_forward",
           "run_chunked_entmax"]

__all__ += ["ENTMAX15", "GENERAL", "SPARSEMAX"]  # the row kinds, from plugin.kernels.constants

# a chunk whose probabilities have at most this fraction of nonzeros is multiplied with V
# sparsely and, when a backward pass will follow, kept in sparse form (CSR) for it
# (measured break-even with the dense products: about 25% nonzeros at L = 1024, D = 64)
SPARSE_MAX_DENSITY = 0.2
# ... unless the chunk is so small (rows x keys x Dv multiply-adds) that the dense product is cheaper
# than the calls that find and gather the nonzeros, and no backward pass keeps them
SMALL_CHUNK_PRODUCT = 1 << 18

_SOURCE = Path(__file__).with_name("entmax_rows.c")
# -ffp-contract=off: the forward and the backward evaluate p with the same roundings;
# -fno-trapping-math lets the compiler vectorize the branch-free selects (no FP traps are used)
_COMMON = ("-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno", "-shared", "-fPIC", "-std=c99")


def _flag_sets() -> tuple[tuple[str, ...], ...]:
    """Compiler flags tried in order; the constants of :mod:`plugin.kernels.constants` as ``-D``
    defines (read at build time: the cache key digests the flags, so new constants rebuild)."""
    common = _COMMON + c_defines()
    return (
        common + ("-march=native", "-fopenmp"),
        common + ("-fopenmp",),
        common + ("-fopenmp-simd",),
        common,
    )


def _groups(a: Sizes) -> int:
    """Key/value groups of the sparse kernels' rows (``rows / rows_per_group``, rounded up)."""
    return -(-a["rows"] // a["rows_per_group"])


def _nnz(a: Sizes) -> int:
    return int(a["offsets"][a["rows"]]) if a["offsets"].numel() > a["rows"] else 0


# the functions of entmax_rows.c, each argument declared once (checked before every call)
_THREADS = Arg("nthreads", "int")
_ROWS = (Arg("rows", "int64", low=0), Arg("n", "int64", low=0))
_ROW_LAYOUT = (
    Arg("am1", "f32", numel=lambda a: a["heads"]), Arg("heads", "int64", low=1), Arg("kind", "int", low=0),
    Arg("causal", "int", low=0), Arg("q_start", "int64"), Arg("c", "int64", low=1), Arg("causal_off", "int64"),
)
_CSR = (
    Arg("offsets", "i64", numel=lambda a: a["rows"] + 1),
    Arg("idx", "i32", numel=_nnz),
    Arg("val", "f32", numel=_nnz),
)
_ROWS_FUNCTIONS = (
    CFunction("entmax_rows_forward", (
        Arg("S", "f32", numel=lambda a: a["rows"] * a["n"]), *_ROWS, *_ROW_LAYOUT,
        Arg("stats", "f32", numel=lambda a: a["rows"] * 3),
        Arg("counts", "i32", optional=True, numel=lambda a: a["rows"]), _THREADS,
    ), restype="int"),
    CFunction("entmax_rows_backward", (
        Arg("S", "f32", numel=lambda a: a["rows"] * a["n"]), Arg("dP", "f32", numel=lambda a: a["rows"] * a["n"]),
        *_ROWS, *_ROW_LAYOUT, Arg("stats", "f32", numel=lambda a: a["rows"] * 3),
        Arg("dalpha", "f32", optional=True, numel=lambda a: a["rows"]), _THREADS,
    ), restype="int"),
    CFunction("entmax_rows_gather", (
        Arg("P", "f32", numel=lambda a: a["rows"] * a["n"]), *_ROWS, *_CSR, _THREADS,
    )),
    CFunction("entmax_sparse_matmul", (
        *_CSR, Arg("V", "f32", numel=lambda a: _groups(a) * a["Lk"] * a["Dv"]), Arg("rows", "int64", low=0),
        Arg("rows_per_group", "int64", low=1), Arg("Lk", "int64", low=0), Arg("Dv", "int64", low=0),
        Arg("out", "f32", numel=lambda a: a["rows"] * a["Dv"]), _THREADS,
    )),
    CFunction("entmax_sparse_backward", (
        *_CSR, Arg("stats", "f32", numel=lambda a: a["rows"] * 3),
        Arg("Qs", "f32", numel=lambda a: a["rows"] * a["D"]),
        Arg("K", "f32", numel=lambda a: _groups(a) * a["Lk"] * a["D"]),
        Arg("V", "f32", numel=lambda a: _groups(a) * a["Lk"] * a["Dv"]),
        Arg("dO", "f32", numel=lambda a: a["rows"] * a["Dv"]),
        Arg("am1", "f32", numel=lambda a: a["heads"]), Arg("heads", "int64", low=1), Arg("kind", "int", low=0),
        Arg("c", "int64", low=1), Arg("rows", "int64", low=0), Arg("rows_per_group", "int64", low=1),
        Arg("Lk", "int64", low=0), Arg("D", "int64", low=0), Arg("Dv", "int64", low=0),
        Arg("dQ", "f32", numel=lambda a: a["rows"] * a["D"]),
        Arg("dK", "f32", numel=lambda a: _groups(a) * a["Lk"] * a["D"]),
        Arg("dV", "f32", numel=lambda a: _groups(a) * a["Lk"] * a["Dv"]),
        Arg("dalpha", "f32", optional=True, numel=lambda a: a["rows"]), Arg("ds", "f32", numel=_nnz), _THREADS,
    )),
)
ENTMAX_ROWS = CLibrary(_SOURCE, _flag_sets, _ROWS_FUNCTIONS, remember_failure=True)


def c_kernel_error() -> str:
    """Why the C row kernel could not be built (empty when it was built or not tried yet)."""
    return ENTMAX_ROWS.error


@torch.compiler.assume_constant_result
def c_kernel_available() -> bool:
    """True when the C row kernel is built (building it now if needed)."""
    try:
        ENTMAX_ROWS.load()
    except CompileError:
        return False
    return True


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

    The C mirror of :func:`plugin.kernels.maths.newton_threshold` and
    :func:`plugin.kernels.maths.entmax_from_stats`.

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
    stats = torch.empty(rows, 3, dtype=torch.float32)
    failed = ENTMAX_ROWS.call(
        "entmax_rows_forward", S=S, rows=rows, n=n, am1=am1, heads=am1.numel(), kind=kind, causal=int(causal),
        q_start=q_start, c=c, causal_off=causal_off, stats=stats, counts=counts, nthreads=torch.get_num_threads(),
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

    The C mirror of :func:`plugin.kernels.maths.entmax_backward` and
    :func:`plugin.kernels.maths.entmax_alpha_grad`. Returns the per-row
    ``sum_j dP_j dp_j / dalpha`` (rows,) when ``want_dalpha``, else None.
    """
    rows, n = S.shape
    dalpha = torch.empty(rows, dtype=torch.float32) if want_dalpha else None
    failed = ENTMAX_ROWS.call(
        "entmax_rows_backward", S=S, dP=dP, rows=rows, n=n, am1=am1, heads=am1.numel(), kind=kind,
        causal=int(causal), q_start=q_start, c=c, causal_off=causal_off, stats=stats, dalpha=dalpha,
        nthreads=torch.get_num_threads(),
    )
    if failed:
        raise MemoryError(f"entmax rows: could not allocate scratch memory for rows of length {n}")
    return dalpha


def sparse_rows(P: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The nonzeros of ``P`` (rows, n) in CSR form: ``(offsets (rows + 1,) int64, idx int32, val float32)``."""
    rows, n = P.shape
    if counts.dtype != torch.int32 or counts.numel() != rows:
        raise ValueError(f"sparse_rows: counts must be an int32 tensor of {rows} elements, got {counts.dtype} "
                         f"{tuple(counts.shape)}")
    offsets = torch.zeros(rows + 1, dtype=torch.int64)
    torch.cumsum(counts, 0, out=offsets[1:])
    nnz = int(offsets[-1])
    idx = torch.empty(nnz, dtype=torch.int32)
    val = torch.empty(nnz, dtype=torch.float32)
    ENTMAX_ROWS.call("entmax_rows_gather", P=P, rows=rows, n=n, offsets=offsets, idx=idx, val=val,
                     nthreads=torch.get_num_threads())
    return offsets, idx, val


def sparse_matmul(csr: tuple[Tensor, Tensor, Tensor], V: Tensor, rows_per_group: int) -> Tensor:
    """``P @ V`` for ``P`` in CSR form (rows laid out by group); ``V`` (groups, Lk, Dv) contiguous float32."""
    offsets, idx, val = csr
    rows = offsets.numel() - 1
    out = torch.empty(rows, V.shape[-1], dtype=torch.float32)
    ENTMAX_ROWS.call("entmax_sparse_matmul", offsets=offsets, idx=idx, val=val, V=V, rows=rows,
                     rows_per_group=rows_per_group, Lk=V.shape[1], Dv=V.shape[2], out=out,
                     nthreads=torch.get_num_threads())
    return out


# ----------------------------------------------------------------------------- torch row backend


def _torch_probs(S4: Tensor, kind: int, alpha: Tensor) -> Tensor:
    from ..normalizers.entmax import entmax, entmax15
    from ..normalizers.sparsemax import sparsemax

    if kind == SPARSEMAX:
        return sparsemax(S4)
    if kind == ENTMAX15:
        return entmax15(S4)
    return entmax(S4, alpha=alpha.view(-1, 1))


def _torch_rows_backward(S4: Tensor, dP4: Tensor, kind: int, alpha: Tensor,
                         want_dalpha: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """p, dS and per-row dalpha (or None) for a chunk (B, H, c, n) whose masked scores are -inf."""
    p = _torch_probs(S4, kind, alpha)
    a = alpha.view(-1, 1, 1)
    dS = entmax_backward(p, dP4, 2.0 if kind == SPARSEMAX else a)
    dalpha = None
    if want_dalpha:
        zs = S4 - S4.amax(-1, keepdim=True)  # the row maximum is in the support (other rows: no support)
        dalpha = entmax_alpha_grad(p, dP4, zs, a).squeeze(-1)
    return p, dS, dalpha


# ----------------------------------------------------------------------------- the chunked attention


def chunked_forward(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, bias: Tensor | None, allowed: Tensor | None,
                    kind: int, causal: bool, scale: float, chunk_rows: int | None, backend: str,
                    keep_sparse: bool) -> tuple[Tensor, Tensor | None, dict]:
    """The forward pass: ``(out, stats, kept)``; ``kept`` holds the sparse chunks (CSR) when ``keep_sparse``.

    ``q`` (B, H, Lq, D), ``k``, ``v`` (B, Hkv, Lk, D / Dv) contiguous in the work dtype; ``alpha``
    (H,); ``bias`` / ``allowed`` 4-D, broadcastable to (B, H, Lq, Lk); ``stats`` (B, H, Lq, 3)
    float32 for the C backend, else None.
    """
    chunks = Chunks(q, k, causal, chunk_rows)
    B, H, Lq, D = q.shape
    Dv = v.shape[-1]
    qs, kr, vr = chunks.operands(q, k, v, scale)
    kT = kr.transpose(1, 2)
    out = q.new_zeros(B, H, Lq, Dv)
    am1 = (alpha.detach().to(torch.float64) - 1).to(torch.float32).contiguous()  # digits kept near 1
    stats = torch.full((B, H, Lq, 3), float("inf"), dtype=torch.float32) if backend == "c" else None
    budget = kept_budget(q, k, v, out)
    kept: dict[tuple[int, int, int], tuple[Tensor, Tensor, Tensor]] = {}
    kept_bytes = 0
    for ch in chunks:
        if ch.kend == 0:
            continue  # every key is in the future of every query of the chunk: zeros
        S = chunks.scores(qs, kT, bias, allowed, ch)
        P2 = S.view(ch.rows, ch.kend)
        if stats is not None:
            # a small chunk whose sparse form is not kept: the dense product costs less than finding
            # the nonzeros (no counts, no host sync, two C calls fewer; cached decoding, short rows)
            small = not keep_sparse and ch.rows * ch.kend * Dv <= SMALL_CHUNK_PRODUCT
            counts = None if small else torch.empty(ch.rows, dtype=torch.int32)
            am1_chunk = am1 if ch.h0 == 0 else torch.roll(am1, -ch.h0)  # row r of the chunk is head h0 + r // c
            st = rows_forward(P2, am1_chunk, kind, causal, ch.i0, ch.c, chunks.off, counts)
            stats[ch.region] = st.view(*ch.lead, 3)
            if counts is not None and int(counts.sum()) <= SPARSE_MAX_DENSITY * ch.rows * ch.kend:
                csr = sparse_rows(P2, counts)
                result = sparse_matmul(csr, vr[ch.bk0:ch.bk1], chunks.G * ch.c)
                out[ch.region] = result.view(*ch.lead, Dv)
                size = 4 * (csr[0].numel() * 2 + csr[1].numel() + csr[2].numel())
                if keep_sparse and kept_bytes + size <= budget:
                    kept[ch.key] = csr
                    kept_bytes += size
                continue
        else:
            chunks.mask_causal(S, ch)
            S3 = S.view(ch.heads, ch.c, ch.kend)
            S3.copy_(_torch_probs(S3, kind, ch.head_values(alpha)))
        out[ch.region] = torch.bmm(S, vr[ch.bk0:ch.bk1, :ch.kend]).view(*ch.lead, Dv)
    return out, stats, kept  # kept, per chunk: the probabilities in CSR form (O(nonzeros) memory)


def chunked_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, bias: Tensor | None,
                     allowed: Tensor | None, stats: Tensor | None, kept: dict, kind: int, causal: bool, scale: float,
                     chunk_rows: int | None, backend: str,
                     needs: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """The backward pass of :func:`chunked_forward`: ``(dq, dk, dv, dalpha, dbias)``, None where not in ``needs``."""
    need_q, need_k, need_v, need_alpha, need_bias = needs
    chunks = Chunks(q, k, causal, chunk_rows)
    B, H, _, D = q.shape
    Hkv, Lk, Dv = chunks.Hkv, chunks.Lk, v.shape[-1]
    qs, kr, vr = chunks.operands(q, k, v, scale)
    kT, vT = kr.transpose(1, 2), vr.transpose(1, 2)
    dout = dout.contiguous()
    dq = torch.zeros_like(q) if need_q else None
    # the sparse backward writes dK and dV whether or not they are needed
    dk = torch.zeros(B * Hkv, Lk, D, dtype=k.dtype) if need_k or kept else None
    dv = torch.zeros(B * Hkv, Lk, Dv, dtype=v.dtype) if need_v or kept else None
    dalpha = torch.zeros(H, dtype=torch.float32) if need_alpha else None
    dbias = torch.zeros(bias.shape, dtype=bias.dtype) if need_bias and bias is not None else None
    am1 = (alpha.detach().to(torch.float64) - 1).to(torch.float32).contiguous()  # digits kept near 1
    for ch in chunks:
        if ch.kend == 0:
            continue
        c = ch.c
        am1_chunk = torch.roll(am1, -ch.h0)
        # every buffer handed to C is held by a local name for the duration of the call
        dO = chunks.rows_of(dout, ch).contiguous()
        csr = kept.get(ch.key)
        if csr is not None and stats is not None and dk is not None and dv is not None:
            offsets, idx, val = csr
            da = torch.empty(ch.rows, dtype=torch.float32) if need_alpha else None
            dq_c = torch.empty(ch.rows, D, dtype=torch.float32)
            ENTMAX_ROWS.call(
                "entmax_sparse_backward", offsets=offsets, idx=idx, val=val,
                stats=stats[ch.region].contiguous(), Qs=chunks.rows_of(qs, ch).contiguous(),
                K=kr[ch.bk0:ch.bk1], V=vr[ch.bk0:ch.bk1], dO=dO, am1=am1_chunk, heads=H, kind=kind, c=c,
                rows=ch.rows, rows_per_group=chunks.G * c, Lk=Lk, D=D, Dv=Dv, dQ=dq_c, dK=dk[ch.bk0:ch.bk1],
                dV=dv[ch.bk0:ch.bk1], dalpha=da, ds=torch.empty(val.numel(), dtype=torch.float32),
                nthreads=torch.get_num_threads(),
            )
            if dq is not None:
                dq[ch.region] = dq_c.view(*ch.lead, D) * scale
            if dalpha is not None and da is not None:
                dalpha[ch.h0:ch.h1] += ch.head_sum(da)
            continue
        S = chunks.scores(qs, kT, bias, allowed, ch)
        dP = chunks.buffer("grad", S.shape)
        torch.bmm(dO, vT[ch.bk0:ch.bk1, :, :ch.kend], out=dP)
        if stats is not None:
            st = stats[ch.region].reshape(-1, 3).contiguous()
            da = rows_backward(S.view(-1, ch.kend), dP.view(-1, ch.kend), st, am1_chunk, kind, causal, ch.i0, c,
                               chunks.off, need_alpha)
            P, dS = S, dP
        else:
            chunks.mask_causal(S, ch)
            P3, dS3, da = _torch_rows_backward(S.view(ch.heads, c, ch.kend), dP.view(ch.heads, c, ch.kend), kind,
                                               ch.head_values(alpha.detach()), need_alpha)
            P, dS = P3.reshape_as(S), dS3.reshape_as(S)
        if dalpha is not None and da is not None:
            dalpha[ch.h0:ch.h1] += ch.head_sum(da).to(torch.float32)
        dense_chunk_grads(chunks, ch, P, dS, dO, kr, qs, scale, (dq, dk, dv, dbias),
                          (need_q, need_k, need_v, need_bias))
    return (
        dq,
        dk.view(k.shape) if need_k and dk is not None else None,
        dv.view(v.shape) if need_v and dv is not None else None,
        dalpha.to(alpha.dtype).view(alpha.shape) if dalpha is not None else None,
        dbias,
    )


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
    _, alpha_t = head_alphas(alpha, H, name)
    if isinstance(alpha, Tensor) and not torch.compiler.is_compiling():  # compiled, the op checks it (no host sync)
        with torch.no_grad():
            if not bool(((alpha_t > 1) & (alpha_t <= 2)).all()):
                raise ValueError(f"{name}: alpha must lie in (1, 2]; got values outside it")


def run_chunked_entmax(q: Tensor, k: Tensor, v: Tensor, alpha: float | Tensor, mask: Tensor | None, bias: Tensor | None,
                       causal: bool, scale: float, chunk_rows: int | None = None, backend: str = "c") -> Tensor:
    """:func:`chunked_entmax_attention` for arguments already checked (by :func:`plugin.attention`'s boundary)."""
    kind, alpha_t = head_alphas(alpha, q.shape[1], "chunked_entmax_attention")
    work = torch.float64 if (backend == "torch" and q.dtype == torch.float64) else torch.float32
    qw, kw, vw = (t.to(work).contiguous() for t in (q, k, v))
    alpha_t = alpha_t if alpha_t.dtype == torch.float64 else alpha_t.to(work)  # float64 keeps alpha - 1
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

        out = chunked_entmax_fwd(qw, kw, vw, alpha_t, biasw, allowed, kind, causal, float(scale), chunk_rows,
                                 backend, keep_sparse)[0]
    elif not needs_grad:  # no graph to record (inference, cached decoding): the forward alone
        out = chunked_forward(qw, kw, vw, alpha_t, biasw, allowed, kind, causal, float(scale), chunk_rows, backend,
                              False)[0]
    else:
        out = ChunkedAttentionFunction.apply(chunked_forward, chunked_backward, 6, qw, kw, vw, alpha_t, biasw,
                                             allowed, kind, causal, float(scale), chunk_rows, backend, keep_sparse)
    return out.to(q.dtype)
