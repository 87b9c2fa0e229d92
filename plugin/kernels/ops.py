"""The compiled CPU kernels as ``torch.library`` custom ops, so that ``torch.compile`` traces through them.

Dynamo cannot trace a :mod:`ctypes` call, nor the Python loops over query chunks around it.
Each op below is opaque to the compiler: a fake (meta) implementation gives the shapes and
dtypes of its outputs, and ``register_autograd`` joins a forward op to its backward op, so
``torch.compile(..., fullgraph=True)`` captures attention, forward and backward, as one graph
that calls them. Every op checks device, dtype, layout and shapes of its tensors before any
pointer goes to C (``ValueError`` otherwise).

Ops (namespace ``sparse_attention``):

``chunked_entmax_fwd`` / ``chunked_entmax_bwd``
    the ``cpu_chunked`` path of sparsemax / entmax-1.5 / alpha-entmax
    (:func:`plugin.kernels.chunked.chunked_forward` / ``chunked_backward``).
``structured_chunked_fwd`` / ``structured_chunked_bwd``
    the ``cpu_chunked`` path of fusedmax / oscarmax (:mod:`plugin.kernels.structured_chunked`).
``structured_prox``, ``group_mean``
    the exact prox of the structured normalizers and its Jacobian (group means), which
    :func:`plugin.fusedmax` and :func:`plugin.oscarmax` call (:mod:`plugin.kernels.cpu`).

The Triton kernels are registered the same way in :mod:`plugin.kernels.triton_entmax`
(``triton_entmax_fwd`` / ``triton_entmax_bwd``).

The chunked paths keep the sparse chunks of their forward pass (the probabilities in CSR
form, a data-dependent size) for the backward pass, which then works on the nonzeros only.
Eager calls hold them in Python; the forward ops return them packed into two tensors whose
sizes depend on the shapes only (a directory, one row per kept chunk, and one byte buffer as
large as the kept budget, allocated but written only where chunks are kept; see
:func:`pack_kept`), which the compiled graph saves for the backward op like any residual. So a
compiled backward recomputes exactly the chunks an eager one does (the dense ones, and those
beyond the kept budget), never the sparse ones.
"""

# no `from __future__ import annotations`: torch.library reads the op schemas from the annotations

import torch
from torch import Tensor

from .chunked import chunked_backward, chunked_forward
from .chunks import SPARSE_BUDGET_FACTOR, SPARSE_MIN_BUDGET
from .constants import KIND_NAMES
from .structured_chunked import KINDS, structured_backward, structured_forward

__all__ = [
    "checked_alpha",
    "chunked_entmax_bwd",
    "chunked_entmax_fwd",
    "group_mean",
    "kept_capacity",
    "pack_kept",
    "structured_chunked_bwd",
    "structured_chunked_fwd",
    "structured_prox",
    "unpack_kept",
]

def _check(name: str, t: Tensor, dtypes: tuple, dim: int | None = None, contiguous: bool = True) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be a CPU tensor, got device {t.device}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_attention(op: str, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, mask: Tensor | None,
                     dtypes: tuple) -> None:
    for label, t in (("q", q), ("k", k), ("v", v)):
        _check(f"{op}: {label}", t, dtypes, 4)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{op}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D or tuple(v.shape[:3]) != (B, Hkv, Lk) or Hkv == 0 or H % Hkv:
        raise ValueError(f"{op}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be (B, H, Lq, D), "
                         f"(B, Hkv, Lk, D), (B, Hkv, Lk, Dv) with Hkv dividing H")
    target = torch.Size((B, H, Lq, Lk))
    for label, extra, types in (("mask", mask, (torch.bool,)), ("bias", bias, (q.dtype,))):
        if extra is None:
            continue
        t = extra
        _check(f"{op}: {label}", t, types, 4, contiguous=False)
        if torch.broadcast_shapes(t.shape, target) != target:
            raise ValueError(f"{op}: {label} {tuple(t.shape)} is not broadcastable to (B, H, Lq, Lk) = {tuple(target)}")


# ----------------------------------------------------------------------------- kept chunks as tensors

# the dtypes a kept chunk's tensors may have, by code (the directory stores the code)
_KEPT_DTYPES = (torch.int64, torch.int32, torch.float32, torch.float64, torch.bool, torch.uint8)
_ALIGN = 8  # bytes: every tensor starts at a multiple of the largest element size


def kept_capacity(q: Tensor, k: Tensor, v: Tensor, parts: int) -> tuple:
    """``(rows, nbytes)`` of the packed kept chunks of an attention call: fixed by the shapes.

    ``rows`` bounds the number of chunks (one per query row at most), plus a first row for the
    count; ``nbytes`` is the budget of :func:`plugin.kernels.chunks.kept_budget` (integer
    arithmetic, so that the fake implementations compute it on symbolic shapes) plus room for
    the alignment of every tensor. The buffers are allocated, not written: only the pages that
    receive kept chunks become resident.
    """
    B, H, Lq = q.shape[0], q.shape[1], q.shape[2]
    chunks = B * H * Lq
    elements = q.numel() + k.numel() + v.numel() + chunks * v.shape[-1]
    budget = torch.sym_max(SPARSE_MIN_BUDGET, int(SPARSE_BUDGET_FACTOR * 4) * elements)
    return chunks + 1, budget + chunks * parts * _ALIGN


def pack_kept(kept: dict, parts: int, capacity: tuple) -> tuple[Tensor, Tensor]:
    """The kept chunks of a forward pass as ``(directory, blob)``, for a compiled graph to save.

    ``kept`` maps a chunk's key ``(b0, hk0, i0)`` to a tuple of ``parts`` 1-D CPU tensors (or
    None); ``capacity`` is :func:`kept_capacity`. ``directory`` is int64 (rows, 3 + 3 * parts):
    ``directory[0, 0]`` is the number of chunks, then one row per chunk: its key, and per tensor
    its byte offset in ``blob``, its length and its dtype code (-1 for None); ``blob`` is uint8,
    the tensors' bytes. Both sizes depend on the shapes only (a graph with data-dependent shapes
    would break where it is not compiled whole); a chunk that does not fit is left out, and the
    backward pass recomputes it.
    """
    rows, nbytes = capacity
    directory = torch.empty(rows, 3 + 3 * parts, dtype=torch.int64)
    blob = torch.empty(nbytes, dtype=torch.uint8)
    count, total = 0, 0
    for key, tensors in kept.items():
        sizes = [0 if t is None else -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN for t in tensors]
        if count + 1 >= rows or total + sum(sizes) > nbytes:
            continue
        entry = list(key)
        for t, size in zip(tensors, sizes):
            if t is None:
                entry += [0, 0, -1]
                continue
            blob[total:total + t.numel() * t.element_size()].copy_(t.reshape(-1).view(torch.uint8))
            entry += [total, t.numel(), _KEPT_DTYPES.index(t.dtype)]
            total += size
        count += 1
        directory[count] = torch.tensor(entry)
    directory[0, 0] = count
    return directory, blob


def unpack_kept(directory: Tensor, blob: Tensor) -> dict:
    """The inverse of :func:`pack_kept`: the kept chunks as views into ``blob``."""
    kept: dict = {}
    if directory.numel() == 0:
        return kept
    for row in directory[1:1 + int(directory[0, 0])].tolist():
        tensors: list[Tensor | None] = []
        for j in range(3, len(row), 3):
            start, numel, code = row[j:j + 3]
            if code < 0:
                tensors.append(None)
                continue
            dtype = _KEPT_DTYPES[code]
            size = torch.empty(0, dtype=dtype).element_size()
            tensors.append(blob[start:start + numel * size].view(dtype))
        kept[tuple(row[:3])] = tuple(tensors)
    return kept


def _no_kept(q: Tensor, parts: int) -> tuple[Tensor, Tensor]:
    return q.new_empty(0, 3 + 3 * parts, dtype=torch.int64), q.new_empty(0, dtype=torch.uint8)


def _fake_kept(q: Tensor, k: Tensor, v: Tensor, parts: int, keeps: bool) -> tuple[Tensor, Tensor]:
    """The fake ``(directory, blob)``: sized by :func:`kept_capacity` when the op keeps chunks, else empty."""
    if not keeps:
        return _no_kept(q, parts)
    rows, nbytes = kept_capacity(q, k, v, parts)
    return q.new_empty(rows, 3 + 3 * parts, dtype=torch.int64), q.new_empty(nbytes, dtype=torch.uint8)


def _register_kept_autograd(forward_op, backward_op, n: int, optional: int) -> None:
    """Join a forward op ``(*tensors, *config) -> (out, stats, directory, blob)`` to its backward op.

    The forward op takes ``n`` tensors, then its configuration. The backward op takes
    ``(dout, *tensors, stats, directory, blob, *config, *needs)``, ``needs`` one flag for each of
    the ``optional`` inputs after q, k, v, and returns the gradients of q, k, v and of those inputs.
    """

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:n], *output[1:])
        ctx.config = inputs[n:]

    def backward(ctx, dout, *_):
        *tensors, stats, directory, blob = ctx.saved_tensors
        needs = [bool(ctx.needs_input_grad[3 + i]) for i in range(optional)]
        grads = backward_op(dout, *tensors, stats, directory, blob, *ctx.config, *needs)
        wanted = [g if need else None for g, need in zip(grads[3:], needs)]
        return (*grads[:3], *wanted, *([None] * (n + len(ctx.config) - 3 - optional)))

    forward_op.register_autograd(backward, setup_context=setup_context)


# ----------------------------------------------------------------------------- sparsemax / entmax, chunked


@torch.library.custom_op("sparse_attention::chunked_entmax_fwd", mutates_args=())
def chunked_entmax_fwd(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, bias: Tensor | None, mask: Tensor | None,
                       kind: int, causal: bool, scale: float, chunk_rows: int | None,
                       backend: str, keep_sparse: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """alpha-entmax attention, query chunk by chunk: ``(out (B, H, Lq, Dv), stats, directory, blob)``.

    ``stats`` is (B, H, Lq, 3) float32 for ``backend="c"`` (float32 tensors) and empty for
    ``"torch"``; ``alpha`` is (H,), in (1, 2]; ``kind`` one of SPARSEMAX, ENTMAX15, GENERAL.
    With ``keep_sparse`` (and the C backend) the sparse chunks are kept for the backward op
    (:func:`pack_kept`); otherwise ``directory`` and ``blob`` are empty.
    """
    op = "chunked_entmax_fwd"
    if backend not in ("c", "torch"):
        raise ValueError(f"{op}: backend must be 'c' or 'torch', got {backend!r}")
    if kind not in KIND_NAMES:
        raise ValueError(f"{op}: kind must be one of {sorted(KIND_NAMES)}, got {kind!r}")
    _check_attention(op, q, k, v, bias, mask, (torch.float32,) if backend == "c" else (torch.float32, torch.float64))
    _check(f"{op}: alpha", alpha, (q.dtype, torch.float64), 1)  # float64 keeps alpha - 1 near 1
    if alpha.numel() != q.shape[1]:
        raise ValueError(f"{op}: alpha must have one value per head (H={q.shape[1]}), got {alpha.numel()}")
    if not bool(((alpha > 1) & (alpha <= 2)).all()):
        raise ValueError(f"{op}: alpha must lie in (1, 2]; got values outside it")
    out, stats, kept = chunked_forward(q, k, v, alpha, bias, mask, kind, causal, scale, chunk_rows, backend,
                                       keep_sparse and backend == "c")
    keeps = keep_sparse and backend == "c"
    packed = pack_kept(kept, 3, kept_capacity(q, k, v, 3)) if keeps else _no_kept(q, 3)
    return (out, stats if stats is not None else q.new_empty(0, dtype=torch.float32), *packed)


@chunked_entmax_fwd.register_fake
def _(q, k, v, alpha, bias, mask, kind, causal, scale, chunk_rows, backend, keep_sparse=False):
    B, H, Lq, _ = q.shape
    stats_shape = (B, H, Lq, 3) if backend == "c" else (0,)
    return (q.new_empty(B, H, Lq, v.shape[-1]), q.new_empty(stats_shape, dtype=torch.float32),
            *_fake_kept(q, k, v, 3, keep_sparse and backend == "c"))


@torch.library.custom_op("sparse_attention::chunked_entmax_bwd", mutates_args=())
def chunked_entmax_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, bias: Tensor | None,
                       mask: Tensor | None, stats: Tensor, directory: Tensor, blob: Tensor, kind: int,
                       causal: bool, scale: float, chunk_rows: int | None, backend: str, keep_sparse: bool,
                       need_alpha: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`chunked_entmax_fwd`: ``(dq, dk, dv, dalpha, dbias)``; dalpha / dbias are
    empty unless ``need_alpha`` / ``need_bias``. The kept chunks (``directory``, ``blob``) are
    differentiated over their nonzeros, the others recomputed."""
    op = "chunked_entmax_bwd"
    _check_attention(op, q, k, v, bias, mask, (torch.float32,) if backend == "c" else (torch.float32, torch.float64))
    _check(f"{op}: dout", dout, (q.dtype,), 4, contiguous=False)
    if dout.shape != (*q.shape[:3], v.shape[-1]):
        raise ValueError(f"{op}: dout {tuple(dout.shape)} must have the output's shape")
    if backend == "c":
        _check(f"{op}: stats", stats, (torch.float32,), 4)
        if stats.shape != (*q.shape[:3], 3):
            raise ValueError(f"{op}: stats {tuple(stats.shape)} must be (B, H, Lq, 3)")
    dq, dk, dv, dalpha, dbias = chunked_backward(
        dout, q, k, v, alpha, bias, mask, stats if backend == "c" else None, unpack_kept(directory, blob), kind,
        causal, scale, chunk_rows, backend, (True, True, True, need_alpha, need_bias),
    )
    assert dq is not None and dk is not None and dv is not None  # asked for
    return (dq, dk, dv, dalpha.to(alpha.dtype) if dalpha is not None else alpha.new_empty(0),
            dbias if dbias is not None else q.new_empty(0))


@chunked_entmax_bwd.register_fake
def _(dout, q, k, v, alpha, bias, mask, stats, directory, blob, kind, causal, scale, chunk_rows, backend, keep_sparse,
      need_alpha, need_bias):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(alpha) if need_alpha else alpha.new_empty(0),
            bias.new_empty(bias.shape) if need_bias else q.new_empty(0))


_register_kept_autograd(chunked_entmax_fwd, chunked_entmax_bwd, n=6, optional=2)


# ----------------------------------------------------------------------------- fusedmax / oscarmax, chunked


@torch.library.custom_op("sparse_attention::structured_chunked_fwd", mutates_args=())
def structured_chunked_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, mask: Tensor | None, kind: str,
                           lam: float, causal: bool, scale: float, chunk_rows: int | None,
                           masked: bool, keep_sparse: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """fusedmax (``kind="tv"``) / oscarmax (``"oscar_ordered"``) attention, chunk by chunk:
    ``(out (B, H, Lq, Dv), stats, directory, blob)``; ``stats`` (B, H, Lq, 3) float32 for float32
    inputs, empty for float64; the kept chunks as in :func:`chunked_entmax_fwd`."""
    op = "structured_chunked_fwd"
    if kind not in KINDS:
        raise ValueError(f"{op}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    _check_attention(op, q, k, v, bias, mask, (torch.float32, torch.float64))
    out, stats, kept = structured_forward(q, k, v, bias, mask, kind, lam, causal, scale, chunk_rows, masked,
                                          keep_sparse)
    keeps = keep_sparse and q.dtype == torch.float32  # the C rows: float32
    packed = pack_kept(kept, 5, kept_capacity(q, k, v, 5)) if keeps else _no_kept(q, 5)
    return (out, stats if stats is not None else q.new_empty(0, dtype=torch.float32), *packed)


@structured_chunked_fwd.register_fake
def _(q, k, v, bias, mask, kind, lam, causal, scale, chunk_rows, masked, keep_sparse=False):
    B, H, Lq, _ = q.shape
    stats_shape = (B, H, Lq, 3) if q.dtype == torch.float32 else (0,)
    return (q.new_empty(B, H, Lq, v.shape[-1]), q.new_empty(stats_shape, dtype=torch.float32),
            *_fake_kept(q, k, v, 5, keep_sparse and q.dtype == torch.float32))


@torch.library.custom_op("sparse_attention::structured_chunked_bwd", mutates_args=())
def structured_chunked_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                           mask: Tensor | None, stats: Tensor, directory: Tensor, blob: Tensor, kind: str,
                           lam: float, causal: bool, scale: float, chunk_rows: int | None, masked: bool,
                           keep_sparse: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`structured_chunked_fwd`: ``(dq, dk, dv, dbias)``; dbias is empty unless ``need_bias``."""
    op = "structured_chunked_bwd"
    _check_attention(op, q, k, v, bias, mask, (torch.float32, torch.float64))
    _check(f"{op}: dout", dout, (q.dtype,), 4, contiguous=False)
    use_c = q.dtype == torch.float32
    if use_c:
        _check(f"{op}: stats", stats, (torch.float32,), 4)
        if stats.shape != (*q.shape[:3], 3):
            raise ValueError(f"{op}: stats {tuple(stats.shape)} must be (B, H, Lq, 3)")
    dq, dk, dv, dbias = structured_backward(dout, q, k, v, bias, mask, stats if use_c else None,
                                            unpack_kept(directory, blob), kind, lam, causal, scale, chunk_rows,
                                            masked, (True, True, True, need_bias))
    return dq, dk, dv, dbias if need_bias else q.new_empty(0)


@structured_chunked_bwd.register_fake
def _(dout, q, k, v, bias, mask, stats, directory, blob, kind, lam, causal, scale, chunk_rows, masked, keep_sparse,
      need_bias):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            bias.new_empty(bias.shape) if need_bias else q.new_empty(0))


_register_kept_autograd(structured_chunked_fwd, structured_chunked_bwd, n=5, optional=1)


# ----------------------------------------------------------------------------- the structured prox


@torch.library.custom_op("sparse_attention::structured_prox", mutates_args=())
def structured_prox(kind: str, x: Tensor, allowed: Tensor | None, lam: float,
                    drop_row_shift: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`plugin.kernels.cpu.structured_prox` as an op: ``(y, groups)`` (groups int32, on x's device).

    With ``drop_row_shift`` an ordered-prox row that is one group is returned as its mean,
    without its per-row shift ``-lam (n - 1) / 2``, which a following sparsemax ignores and
    which would only cost precision (the kernel decides per row, where the op runs).
    """
    from .cpu import structured_prox as prox

    if allowed is not None and (allowed.dtype != torch.bool or allowed.shape != x.shape):
        raise ValueError(f"structured_prox: allowed must be a bool tensor of x's shape {tuple(x.shape)}, got "
                         f"{allowed.dtype} {tuple(allowed.shape)}")
    return prox(kind, x, allowed, lam, drop_row_shift)


@structured_prox.register_fake
def _(kind, x, allowed, lam, drop_row_shift=False):
    return torch.empty_like(x), torch.empty(x.shape, dtype=torch.int32, device=x.device)


@torch.library.custom_op("sparse_attention::group_mean", mutates_args=())
def group_mean(values: Tensor, groups: Tensor) -> Tensor:
    """:func:`plugin.kernels.cpu.group_mean_cpu` as an op (float32 / float64 CPU tensors, int32 groups)."""
    from .cpu import group_mean_cpu

    _check("group_mean: values", values, (torch.float32, torch.float64), contiguous=False)
    _check("group_mean: groups", groups, (torch.int32,), contiguous=False)
    return group_mean_cpu(values, groups)


@group_mean.register_fake
def _(values, groups):
    return torch.empty_like(values)


# ----------------------------------------------------------------------------- a tensor alpha's range


@torch.library.custom_op("sparse_attention::checked_alpha", mutates_args=())
def checked_alpha(alpha: Tensor) -> Tensor:
    """A copy of ``alpha`` after checking that every value lies in (1, 2] (``ValueError`` otherwise).

    The check reads the values, a host synchronization that a compiled graph cannot contain; as an
    op it runs when the graph runs.
    """
    if alpha.numel() and not bool(((alpha > 1) & (alpha <= 2)).all()):
        raise ValueError("entmax: alpha must lie in (1, 2]; got values outside it")
    return alpha.clone()


@checked_alpha.register_fake
def _(alpha):
    return torch.empty_like(alpha)


checked_alpha.register_autograd(lambda ctx, grad: grad)
