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

Eager calls of the chunked paths keep the sparse chunks of the forward pass (CSR, a
data-dependent size held in Python) for the backward pass; the compiled forward op keeps only
the per-query statistics, and the backward op recomputes every chunk.
"""

# no `from __future__ import annotations`: torch.library reads the op schemas from the annotations

import torch
from torch import Tensor

from .chunked import chunked_backward, chunked_forward
from .chunks import register_stats_autograd
from .constants import KIND_NAMES
from .structured_chunked import KINDS, structured_backward, structured_forward

__all__ = [
    "checked_alpha",
    "chunked_entmax_bwd",
    "chunked_entmax_fwd",
    "group_mean",
    "structured_chunked_bwd",
    "structured_chunked_fwd",
    "structured_prox",
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


# ----------------------------------------------------------------------------- sparsemax / entmax, chunked


@torch.library.custom_op("sparse_attention::chunked_entmax_fwd", mutates_args=())
def chunked_entmax_fwd(q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, bias: Tensor | None, mask: Tensor | None,
                       kind: int, causal: bool, scale: float, chunk_rows: int | None,
                       backend: str) -> tuple[Tensor, Tensor]:
    """alpha-entmax attention, query chunk by chunk: ``(out (B, H, Lq, Dv), stats)``.

    ``stats`` is (B, H, Lq, 3) float32 for ``backend="c"`` (float32 tensors) and empty for
    ``"torch"``; ``alpha`` is (H,), in (1, 2]; ``kind`` one of SPARSEMAX, ENTMAX15, GENERAL.
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
    out, stats, _ = chunked_forward(q, k, v, alpha, bias, mask, kind, causal, scale, chunk_rows, backend, False)
    return out, stats if stats is not None else q.new_empty(0, dtype=torch.float32)


@chunked_entmax_fwd.register_fake
def _(q, k, v, alpha, bias, mask, kind, causal, scale, chunk_rows, backend):
    B, H, Lq, _ = q.shape
    stats_shape = (B, H, Lq, 3) if backend == "c" else (0,)
    return q.new_empty(B, H, Lq, v.shape[-1]), q.new_empty(stats_shape, dtype=torch.float32)


@torch.library.custom_op("sparse_attention::chunked_entmax_bwd", mutates_args=())
def chunked_entmax_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, alpha: Tensor, bias: Tensor | None,
                       mask: Tensor | None, stats: Tensor, kind: int, causal: bool, scale: float,
                       chunk_rows: int | None, backend: str, need_alpha: bool,
                       need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`chunked_entmax_fwd`: ``(dq, dk, dv, dalpha, dbias)``; dalpha / dbias are
    empty unless ``need_alpha`` / ``need_bias``."""
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
        dout, q, k, v, alpha, bias, mask, stats if backend == "c" else None, {}, kind, causal, scale, chunk_rows,
        backend, (True, True, True, need_alpha, need_bias),
    )
    assert dq is not None and dk is not None and dv is not None  # asked for
    return (dq, dk, dv, dalpha.to(alpha.dtype) if dalpha is not None else alpha.new_empty(0),
            dbias if dbias is not None else q.new_empty(0))


@chunked_entmax_bwd.register_fake
def _(dout, q, k, v, alpha, bias, mask, stats, kind, causal, scale, chunk_rows, backend, need_alpha, need_bias):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            torch.empty_like(alpha) if need_alpha else alpha.new_empty(0),
            bias.new_empty(bias.shape) if need_bias else q.new_empty(0))


register_stats_autograd(chunked_entmax_fwd, chunked_entmax_bwd, n=6, optional=2)


# ----------------------------------------------------------------------------- fusedmax / oscarmax, chunked


@torch.library.custom_op("sparse_attention::structured_chunked_fwd", mutates_args=())
def structured_chunked_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, mask: Tensor | None, kind: str,
                           lam: float, causal: bool, scale: float, chunk_rows: int | None,
                           masked: bool) -> tuple[Tensor, Tensor]:
    """fusedmax (``kind="tv"``) / oscarmax (``"oscar_ordered"``) attention, chunk by chunk:
    ``(out (B, H, Lq, Dv), stats)``; ``stats`` (B, H, Lq, 3) float32 for float32 inputs, empty for float64."""
    op = "structured_chunked_fwd"
    if kind not in KINDS:
        raise ValueError(f"{op}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    _check_attention(op, q, k, v, bias, mask, (torch.float32, torch.float64))
    out, stats, _ = structured_forward(q, k, v, bias, mask, kind, lam, causal, scale, chunk_rows, masked, False)
    return out, stats if stats is not None else q.new_empty(0, dtype=torch.float32)


@structured_chunked_fwd.register_fake
def _(q, k, v, bias, mask, kind, lam, causal, scale, chunk_rows, masked):
    B, H, Lq, _ = q.shape
    stats_shape = (B, H, Lq, 3) if q.dtype == torch.float32 else (0,)
    return q.new_empty(B, H, Lq, v.shape[-1]), q.new_empty(stats_shape, dtype=torch.float32)


@torch.library.custom_op("sparse_attention::structured_chunked_bwd", mutates_args=())
def structured_chunked_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
                           mask: Tensor | None, stats: Tensor, kind: str, lam: float, causal: bool, scale: float,
                           chunk_rows: int | None, masked: bool,
                           need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`structured_chunked_fwd`: ``(dq, dk, dv, dbias)``; dbias is empty unless ``need_bias``."""
    op = "structured_chunked_bwd"
    _check_attention(op, q, k, v, bias, mask, (torch.float32, torch.float64))
    _check(f"{op}: dout", dout, (q.dtype,), 4, contiguous=False)
    use_c = q.dtype == torch.float32
    if use_c:
        _check(f"{op}: stats", stats, (torch.float32,), 4)
        if stats.shape != (*q.shape[:3], 3):
            raise ValueError(f"{op}: stats {tuple(stats.shape)} must be (B, H, Lq, 3)")
    dq, dk, dv, dbias = structured_backward(dout, q, k, v, bias, mask, stats if use_c else None, {}, kind, lam,
                                            causal, scale, chunk_rows, masked, (True, True, True, need_bias))
    return dq, dk, dv, dbias if need_bias else q.new_empty(0)


@structured_chunked_bwd.register_fake
def _(dout, q, k, v, bias, mask, stats, kind, lam, causal, scale, chunk_rows, masked, need_bias):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            bias.new_empty(bias.shape) if need_bias else q.new_empty(0))


register_stats_autograd(structured_chunked_fwd, structured_chunked_bwd, n=5, optional=1)


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
