"""Memory-efficient CPU attention for fusedmax and oscarmax.

The queries are processed in chunks (:mod:`plugin.kernels.chunks`, shared with
:mod:`plugin.kernels.chunked`, whose sparsemax row kernel this module reuses). Per chunk of
queries:

    S = scale q k^T + bias            (-inf where masked; ``scale`` and ``bias`` divided by gamma)
    y, groups = prox_{lam g}(S)       (exact, compiled C: ``plugin.kernels.cpu.structured_prox``)
    P = sparsemax(y)                  (over the allowed keys)
    out = P V

with ``g`` the total variation over consecutive allowed keys (fusedmax, ``kind="tv"``) or
the ordered OSCAR sum (oscarmax, ``kind="oscar_ordered"``). Only a chunk of the (Lq, Lk)
score matrix exists at a time.

Backward. The Jacobian of ``sparsemax o prox`` is closed form: with ``dP = dO V^T``,

    gs = dP - mean_{supp P}(dP)  on the support of P, 0 elsewhere   (sparsemax)
    dS = group mean of gs within the prox's groups                   (prox; 0 at masked keys)
    dV = P^T dO,   dQ = scale dS K,   dK = scale dS^T Q,   dbias = dS

the product of the backward passes of :class:`plugin.normalizers.sparsemax.SparsemaxFunction`
and :class:`plugin.normalizers.structured.GroupedProxFunction` (both Jacobians symmetric).
A prox group lies entirely inside or outside the support (P is constant on it), so each
chunk's backward takes one of three forms, chosen by the forward pass:

- sparse (at most ``SPARSE_MAX_DENSITY`` nonzeros, the usual case for fusedmax): the
  forward keeps P in CSR form with the prox group of each nonzero, and the backward sums over
  the nonzeros only (no prox, no dense product);
- uniform rows (every row of the chunk is either sparse or one prox group covering all its
  allowed keys, the usual case for oscarmax, whose OSCAR weights grow with the number of
  keys): such a row has ``P = 1 / n`` on its keys and ``dS = 0``, so only ``dV`` needs it;
- otherwise recomputed flash style: scores from q and k, prox, sparsemax from the per-query
  statistics saved by the forward pass, then the formulas above with dense products.

The kept forms take at most :func:`plugin.kernels.chunks.kept_budget` bytes; chunks beyond
that are recomputed. Nothing of size Lq x Lk is kept.

float32 (and float16 / bfloat16, computed in float32) uses the C sparsemax row kernel of
:mod:`plugin.kernels.chunked`; float64 is computed in float64, with the sparsemax threshold
of :mod:`plugin.normalizers.sparsemax`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..inputs import check_qkv
from .cbuild import CompileError
from .chunked import rows_backward, rows_forward, sparse_matmul, sparse_rows
from .chunks import Chunk, ChunkedAttentionFunction, Chunks, Pool, dense_chunk_grads, kept_budget
from .constants import SPARSEMAX
from .maths import sparsemax_backward

__all__ = [
    "KINDS",
    "run_structured_chunked",
    "structured_chunked_attention",
    "structured_chunked_available",
]

# prox kind of each normalizer: fusedmax -> total variation, oscarmax -> ordered OSCAR sum
KINDS = ("tv", "oscar_ordered")
# a float32 chunk whose probabilities have at most this fraction of nonzeros is multiplied with V
# sparsely and, when a backward pass will follow, kept in sparse form for it: the backward pass
# of such a chunk needs neither the prox nor a dense product (see _sparse_backward)
SPARSE_MAX_DENSITY = 0.1


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def structured_chunked_available() -> bool:
    """True when both compiled kernels (the prox and the sparsemax rows) build here."""
    from .chunked import c_kernel_available
    from .cpu import structured_prox

    if not c_kernel_available():
        return False
    try:
        structured_prox("tv", torch.zeros(1, 2), None, 0.0)
    except (CompileError, RuntimeError, OSError):
        return False
    return True


# ----------------------------------------------------------------------------- per chunk


_ONE = torch.ones(1, dtype=torch.float32)  # alpha - 1 of sparsemax, for the C row kernel


def _prox_chunk(
    chunks: Chunks,
    ch: Chunk,
    qs: Tensor,
    kT: Tensor,
    bias: Tensor | None,
    allowed: Tensor | None,
    kind: str,
    lam: float,
    masked: bool,
) -> tuple[Tensor, Tensor]:
    """The chunk's prox ``y`` (rows, kend), ``-inf`` at masked keys, and its groups (int32, -1 at masked keys)."""
    from .cpu import structured_prox

    S = chunks.scores(qs, kT, bias, allowed, ch)
    chunks.mask_causal(S, ch)
    S2 = S.view(ch.rows, ch.kend)
    # masked keys are -inf in the scores (a bool mask, causality, or -inf in the bias, as the
    # reference's `scores != -inf`); the kernel leaves them out and writes -inf there. The
    # ordered prox's per-row shift beyond the pooling point is dropped: sparsemax follows.
    return structured_prox(kind, S2, None, lam, drop_row_shift=True, neg_inf_masked=masked)


def _sparsemax_rows_torch(y: Tensor) -> Tensor:
    """Sparsemax of the rows of ``y`` (-inf = masked; a row with no allowed entry gives zeros)."""
    from ..normalizers.sparsemax import simplex_threshold

    m = y.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    # max at 0; masked entries at -2, below any threshold (which lies in [-1, 0))
    x = (y - m).clamp_(min=-2.0)
    tau = simplex_threshold(x)
    return (x - tau).clamp_(min=0.0)


def _uniform_rows(groups: Tensor, counts: Tensor, masked: bool) -> Tensor:
    """Per row (bool): the row is one prox group and its support is every allowed key.

    Such a row has ``P = 1 / n`` on its n allowed keys, and the gradient with respect to its
    scores is 0 (the group mean of a gradient centred on the support). Rows with no allowed
    key count as uniform (their P and gradient are 0).
    """
    one_group = groups.amax(-1) <= 0  # group ids start at 0; -1 exactly at masked keys
    allowed_count = (groups >= 0).sum(-1, dtype=torch.int32) if masked else groups.shape[1]
    return one_group & (counts == allowed_count)


def _uniform_probs(S: Tensor, chunks: Chunks, ch: Chunk, masked: bool) -> None:
    """Overwrite the chunk's scores ``S`` (-inf = masked) with ``1 / n`` on each row's n allowed keys."""
    S3 = S.view(ch.heads, ch.c, ch.kend)
    if not masked:
        S3.fill_(1.0 / ch.kend)
        return
    chunks.mask_causal(S, ch)
    keep = S3 != float("-inf")
    n = keep.sum(-1, keepdim=True, dtype=S.dtype).clamp_(min=1)
    torch.div(keep, n, out=S3)


def _sparse_backward(
    kept: tuple[Tensor, Tensor, Tensor, Tensor],
    chunks: Chunks,
    ch: Chunk,
    qs: Tensor,
    kr: Tensor,
    vr: Tensor,
    dout: Tensor,
    grads: tuple[Tensor | None, Tensor | None, Tensor | None],
    scale: float,
) -> None:
    """Backward of a chunk kept in sparse form: every sum runs over the support of P only.

    A prox group lies entirely inside or entirely outside the support (P is constant on it),
    so the group means of the sparsemax gradient need the support entries only.
    """
    offsets, idx, val, grp = kept
    dq, dk, dv = grads
    idx, grp = idx.long(), grp.long()
    rows, kend, Lk = ch.rows, ch.kend, chunks.Lk
    D, Dv = kr.shape[-1], vr.shape[-1]
    counts = offsets.diff()
    row = torch.repeat_interleave(torch.arange(rows), counts)  # row of each nonzero
    key = (ch.bk0 + row // (chunks.G * ch.c)) * Lk + idx  # its key in the (B * Hkv * Lk) keys
    dO = chunks.rows_of(dout, ch).reshape(rows, Dv)
    dO_e = dO[row]
    dp = (dO_e * vr.reshape(-1, Dv)[key]).sum(-1)
    # sparsemax backward: dp minus its mean over the support of the row
    row_sum = torch.zeros(rows, dtype=dp.dtype).index_add_(0, row, dp)
    gs = dp - (row_sum / counts.clamp(min=1).to(dp.dtype))[row]
    # prox backward: the mean within each (row, group)
    _, member = torch.unique(row * kend + grp, return_inverse=True)
    size = int(member.max()) + 1 if member.numel() else 0
    group_sum = torch.zeros(size, dtype=gs.dtype).index_add_(0, member, gs)
    group_count = torch.bincount(member, minlength=size).to(gs.dtype)
    dS = (group_sum / group_count)[member].unsqueeze(-1)
    if dq is not None:
        dq_rows = torch.zeros(rows, D, dtype=dq.dtype).index_add_(0, row, dS * kr.reshape(-1, D)[key])
        dq[ch.region] = dq_rows.view(*ch.lead, D) * scale
    if dk is not None:
        dk.view(-1, D).index_add_(0, key, dS * chunks.rows_of(qs, ch).reshape(rows, D)[row])
    if dv is not None:
        dv.view(-1, Dv).index_add_(0, key, val.unsqueeze(-1) * dO_e)


def structured_forward(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, allowed: Tensor | None, kind: str,
                       lam: float, causal: bool, scale: float, chunk_rows: int | None, masked: bool,
                       keep_sparse: bool) -> tuple[Tensor, Tensor | None, dict]:
    """The forward pass: ``(out, stats, kept)`` (``stats`` None for float64; ``kept`` per kept chunk:
    P in CSR form, the prox group of each nonzero, and which rows are uniform over their allowed keys)."""
    chunks = Chunks(q, k, causal, chunk_rows)
    B, H, Lq, D = q.shape
    Dv = v.shape[-1]
    use_c = q.dtype == torch.float32
    qs, kr, vr = chunks.operands(q, k, v, scale)
    kT = kr.transpose(1, 2)
    out = q.new_zeros(B, H, Lq, Dv)
    stats = torch.full((B, H, Lq, 3), float("inf"), dtype=torch.float32) if use_c else None
    budget = kept_budget(q, k, v, out)
    kept: dict[tuple[int, int, int], tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]] = {}
    pool = Pool(budget) if keep_sparse and use_c else None
    for ch in chunks:
        if ch.kend == 0:
            continue  # every key is in the future of every query of the chunk: zeros
        y = groups = None  # free the last chunk's temporaries before this chunk allocates its own
        y, groups = _prox_chunk(chunks, ch, qs, kT, bias, allowed, kind, lam, masked)
        if not use_c:
            P3 = _sparsemax_rows_torch(y).view(ch.groups, chunks.G * ch.c, ch.kend)
            out[ch.region] = torch.bmm(P3, vr[ch.bk0:ch.bk1, :ch.kend]).view(*ch.lead, Dv)
            continue
        assert stats is not None  # float32: the C rows
        counts = torch.empty(ch.rows, dtype=torch.int32)
        st = rows_forward(y, _ONE, SPARSEMAX, counts=counts)  # y -> P in place
        stats[ch.region] = st.view(*ch.lead, 3)
        limit = SPARSE_MAX_DENSITY * ch.rows * ch.kend
        uniform = None
        if int(counts.sum()) <= limit:
            csr = sparse_rows(y, counts)
            result = sparse_matmul(csr, vr[ch.bk0:ch.bk1], chunks.G * ch.c)
            out[ch.region] = result.view(*ch.lead, Dv)
        else:
            P3 = y.view(ch.groups, chunks.G * ch.c, ch.kend)
            out[ch.region] = torch.bmm(P3, vr[ch.bk0:ch.bk1, :ch.kend]).view(*ch.lead, Dv)
            if not keep_sparse:
                continue
            # rows that are one group over all their allowed keys (oscarmax with a large lam, or
            # fusedmax's large-lam limit) need nothing kept; the others may still be sparse
            uniform = _uniform_rows(groups, counts, masked)
            rest = counts.masked_fill(uniform, 0)
            if not bool(uniform.any()) or int(rest.sum()) > limit:
                continue
            y.masked_fill_(uniform.unsqueeze(-1), 0.0)
            csr = sparse_rows(y, rest)
            counts = rest
        offsets, idx, val = csr
        # the groups of the nonzeros take as much room as idx (int32)
        if pool is not None and pool.fits((offsets, idx, val, idx) + ((uniform,) if uniform is not None else ())):
            row = torch.repeat_interleave(torch.arange(ch.rows), offsets.diff())
            grp = groups.view(-1)[row * ch.kend + idx]
            kept[ch.key] = (pool.put(offsets), pool.put(idx), pool.put(val), pool.put(grp),
                                           pool.put(uniform) if uniform is not None else None)
    return out, stats, kept


def structured_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, allowed: Tensor | None,
                        stats: Tensor | None, kept: dict, kind: str, lam: float, causal: bool, scale: float,
                        chunk_rows: int | None, masked: bool, needs: tuple[bool, ...]) -> tuple:
    """The backward pass of :func:`structured_forward`: ``(dq, dk, dv, dbias)``, None where not in ``needs``."""
    from .cpu import group_mean_cpu

    need_q, need_k, need_v, need_bias = needs
    chunks = Chunks(q, k, causal, chunk_rows)
    B, H, _, D = q.shape
    Hkv, Lk, Dv = chunks.Hkv, chunks.Lk, v.shape[-1]
    qs, kr, vr = chunks.operands(q, k, v, scale)
    kT, vT = kr.transpose(1, 2), vr.transpose(1, 2)
    dout = dout.to(q.dtype).contiguous()
    dq = torch.zeros_like(q) if need_q else None
    dk = torch.zeros(B * Hkv, Lk, D, dtype=k.dtype) if need_k else None
    dv = torch.zeros(B * Hkv, Lk, Dv, dtype=v.dtype) if need_v else None
    dbias = torch.zeros(bias.shape, dtype=bias.dtype) if need_bias and bias is not None else None
    for ch in chunks:
        if ch.kend == 0:
            continue
        c, nkv = ch.c, ch.groups
        dO = chunks.rows_of(dout, ch)
        entry = kept.get(ch.key)
        if entry is not None:
            uniform = entry[4]
            if uniform is not None and dv is not None:
                # P = 1 / n on the n allowed keys of the uniform rows (their dS is 0)
                if masked:  # the scores only tell which keys are masked
                    P = chunks.scores(qs, kT, bias, allowed, ch)
                else:
                    P = chunks.buffer("scores", (nkv, chunks.G * c, ch.kend))
                _uniform_probs(P, chunks, ch, masked)
                P.view(ch.rows, ch.kend).mul_(uniform.unsqueeze(-1))
                dv[ch.bk0:ch.bk1, :ch.kend].baddbmm_(P.transpose(1, 2), dO)
            _sparse_backward(entry[:4], chunks, ch, qs, kr, vr, dout, (dq, dk, dv), scale)
            continue
        y, groups = _prox_chunk(chunks, ch, qs, kT, bias, allowed, kind, lam, masked)
        dP = chunks.buffer("grad", (nkv, chunks.G * c, ch.kend))
        torch.bmm(dO, vT[ch.bk0:ch.bk1, :, :ch.kend], out=dP)
        dP2 = dP.view(ch.rows, ch.kend)
        if stats is not None:
            st = stats[ch.region].reshape(-1, 3).contiguous()  # C reads it flat
            rows_backward(y, dP2, st, _ONE, SPARSEMAX)  # y -> P, dP -> sparsemax backward, in place
            P = y
        else:
            P = _sparsemax_rows_torch(y)
            dP2.copy_(sparsemax_backward(P, dP2))
        # prox backward: the group mean (masked keys have group -1 and get 0)
        dS = group_mean_cpu(dP2, groups).view(nkv, chunks.G * c, ch.kend)
        dense_chunk_grads(chunks, ch, P.view(nkv, chunks.G * c, ch.kend), dS, dO, kr, qs, scale,
                           (dq, dk, dv, dbias), (need_q, need_k, need_v, need_bias))
    return (
        dq,
        dk.view(k.shape) if dk is not None else None,
        dv.view(v.shape) if dv is not None else None,
        dbias,
    )


def _as4d(t: Tensor) -> Tensor:
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def structured_chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kind: str,
    lam: float,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    causal: bool = False,
    scale: float,
    gamma: float = 1.0,
    chunk_rows: int | None = None,
) -> Tensor:
    """fusedmax / oscarmax attention without an (Lq, Lk) matrix: ``Pi(scale q k^T + bias) v``.

    ``Pi(x) = sparsemax(prox_{lam g}(x / gamma))`` over the allowed keys of each query: the
    normalizer :func:`plugin.normalizers.fusedmax` (``kind="tv"``) or
    :func:`plugin.normalizers.oscarmax` (``kind="oscar_ordered"``), with the same definition
    (masked keys take no part in the prox; total-variation neighbours are consecutive allowed
    keys).

    Parameters
    ----------
    q : (B, H, Lq, D) queries; k, v : (B, Hkv, Lk, D) and (B, Hkv, Lk, Dv) CPU tensors, ``Hkv``
        divides ``H`` (query head h reads key/value head ``h // (H // Hkv)``). float16,
        bfloat16 and float32 are computed in float32, float64 in float64; the output is in q's
        dtype.
    kind : ``"tv"`` (fusedmax) or ``"oscar_ordered"`` (oscarmax).
    lam : float >= 0, the structure strength (0 gives sparsemax).
    mask : bool tensor broadcastable to (B, H, Lq, Lk), True where attending is allowed.
    bias : float tensor broadcastable to (B, H, Lq, Lk) added to the scaled scores
        (``-inf`` = masked); it receives a gradient when it requires one.
    causal : query i sees keys ``j <= i + Lk - Lq`` (aligned bottom-right).
    scale : score scale (for example ``1 / sqrt(D)``).
    gamma : float > 0, temperature: scores (and bias) are divided by gamma.
    chunk_rows : queries per chunk (default: about 2^21 score elements per chunk).

    Returns
    -------
    (B, H, Lq, Dv) tensor, differentiable with respect to q, k, v and bias; a query with no
    allowed key gives zeros (and zero gradients). The arguments are checked (``ValueError``);
    the attention path calls :func:`run_structured_chunked`, which trusts them.
    """
    _check_scalars(kind, lam, scale, gamma, chunk_rows)
    _check_tensors(q, k, v, mask, bias)
    return run_structured_chunked(q, k, v, kind, lam, mask=mask, bias=bias, causal=causal, scale=scale, gamma=gamma,
                                  chunk_rows=chunk_rows)


_NAME = "structured_chunked_attention"


def _check_scalars(kind: Any, lam: Any, scale: Any, gamma: Any, chunk_rows: Any) -> None:
    if kind not in KINDS:
        raise ValueError(f"{_NAME}: kind must be one of {', '.join(repr(x) for x in KINDS)}, got {kind!r}")
    if not _number(lam) or lam < 0:
        raise ValueError(f"{_NAME}: lam must be a number >= 0, got {lam!r}")
    if not _number(gamma) or gamma <= 0:
        raise ValueError(f"{_NAME}: gamma must be a number > 0, got {gamma!r}")
    if not _number(scale):
        raise ValueError(f"{_NAME}: scale must be a finite number, got {scale!r}")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"{_NAME}: chunk_rows must be None or an integer >= 1, got {chunk_rows!r}")


def _check_tensors(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None) -> None:
    check_qkv(q, k, v)
    if q.device.type != "cpu":
        raise ValueError(f"{_NAME}: q, k and v must be CPU tensors, got device {q.device}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool):
        raise ValueError(f"{_NAME}: mask must be a bool tensor (True = attend), got "
                         f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
    if bias is not None and (not isinstance(bias, Tensor) or not bias.is_floating_point()):
        raise ValueError(f"{_NAME}: bias must be a floating-point tensor, got "
                         f"{bias.dtype if isinstance(bias, Tensor) else type(bias).__name__}")
    for label, t in (("mask", mask), ("bias", bias)):
        if t is not None and not _broadcasts(t, target):
            raise ValueError(f"{_NAME}: {label} of shape {tuple(t.shape)} is not broadcastable to (B, H, Lq, Lk) = "
                             f"{target}")


def _broadcasts(t: Tensor, target: tuple[int, ...]) -> bool:
    try:
        return t.dim() <= 4 and torch.broadcast_shapes(t.shape, target) == target
    except RuntimeError:
        return False


def run_structured_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kind: str,
    lam: float,
    *,
    mask: Tensor | None,
    bias: Tensor | None,
    causal: bool,
    scale: float,
    gamma: float,
    chunk_rows: int | None = None,
) -> Tensor:
    """:func:`structured_chunked_attention` for arguments already checked (by :func:`plugin.attention`'s boundary)."""
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qw, kw, vw = (t.to(work).contiguous() for t in (q, k, v))
    allowed = _as4d(mask).to("cpu") if mask is not None else None
    biasw = _as4d(bias).to(work) / gamma if bias is not None else None
    masked = mask is not None or bias is not None or causal
    # sparse forms are kept when a backward pass can follow; a bias that needs a gradient (dS
    # over every entry) takes the recomputing backward
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, bias))
    keep_sparse = needs_grad and not (bias is not None and bias.requires_grad)
    if torch.compiler.is_compiling():
        from .ops import structured_chunked_fwd

        out = structured_chunked_fwd(qw, kw, vw, biasw, allowed, kind, float(lam), bool(causal),
                                     float(scale) / gamma, chunk_rows, masked, keep_sparse)[0]
    else:
        out = ChunkedAttentionFunction.apply(structured_forward, structured_backward, 5, qw, kw, vw, biasw, allowed,
                                             kind, float(lam), bool(causal), float(scale) / gamma, chunk_rows, masked,
                                             keep_sparse)
    return out.to(q.dtype)
