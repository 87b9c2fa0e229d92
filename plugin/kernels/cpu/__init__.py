"""Compiled CPU kernels of the structured normalizers (``structured.c``).

The exact proximal operators behind fusedmax and oscarmax (Condat's direct algorithm for
1-D total variation, sort + pool-adjacent-violators for OSCAR and for the ordered weighted
sum that equals OSCAR on the simplex) are sequential per row, so they are written in plain
C, one row per loop iteration (OpenMP over rows when the compiler supports it), and called
through :mod:`ctypes`.

The library is built on first use by :func:`plugin.kernels.cbuild.load_c_library` (the
system C compiler, ``$CC`` to choose one; a cache directory, ``$SPARSE_ATTENTION_CACHE`` to
choose it). When they cannot be built (no C compiler, an unusable cache directory, ...)
these kernels raise a :class:`RuntimeError` that names the cause; nothing falls back to
another algorithm.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from ..cbinding import Arg, CFunction, CLibrary, Sizes
from ..cbuild import CompileError, cache_dir

__all__ = ["cache_dir", "group_mean_cpu", "load_library", "structured_prox"]

SOURCE = Path(__file__).with_name("structured.c")
_BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-std=c99")
# the prox kinds, in the order of structured.c's KIND_TV, KIND_OSCAR, KIND_OSCAR_ORDERED
_KINDS = ("tv", "oscar", "oscar_ordered")
# structured.c's PROX_NEG_INF_MASKED and PROX_DROP_ROW_SHIFT
_NEG_INF_MASKED, _DROP_ROW_SHIFT = 1, 2


def _flag_sets() -> tuple[tuple[str, ...], ...]:
    # OpenMP when the compiler has it; the same C code runs single-threaded without it
    return _BASE_FLAGS + ("-fopenmp",), _BASE_FLAGS


def _elements(a: Sizes) -> int:
    return a["rows"] * a["d"]


def _functions(suffix: str, real: str) -> tuple[CFunction, ...]:
    sizes = (Arg("rows", "int64", low=0), Arg("d", "int64", low=0))
    threads = Arg("threads", "int")
    return (
        CFunction(f"structured_prox_{suffix}", (
            Arg("kind", "int", low=0), Arg("x", real, numel=_elements), Arg("allowed", "u8", optional=True,
                                                                           numel=_elements),
            Arg("out", real, numel=_elements), Arg("group", "i32", numel=_elements), *sizes, Arg("lam", "double"),
            Arg("flags", "int", low=0), threads,
        ), restype="int"),
        CFunction(f"group_mean_{suffix}", (
            Arg("v", real, numel=_elements), Arg("group", "i32", numel=_elements), Arg("out", real, numel=_elements),
            *sizes, threads,
        ), restype="int"),
    )


LIBRARY = CLibrary(SOURCE, _flag_sets, _functions("f32", "f32") + _functions("f64", "f64"))


def load_library() -> ctypes.CDLL:
    """Compile (once) and load the structured-prox library.

    Raises
    ------
    RuntimeError
        If the library cannot be built (the message says why: no C compiler, a compiler
        that wrote no library, a cache directory that cannot be used).
    """
    try:
        return LIBRARY.load()
    except CompileError as error:
        raise RuntimeError(
            f"the fusedmax/oscarmax CPU kernels are C code compiled on first use, and they could not be "
            f"built: {error}\nThese normalizers have no other implementation."
        ) from error


def _suffix(dtype: torch.dtype) -> str:
    return "f32" if dtype == torch.float32 else "f64"


def structured_prox(kind: str, x: Tensor, allowed: Tensor | None, lam: float, drop_row_shift: bool = False,
                    neg_inf_masked: bool = False) -> tuple[Tensor, Tensor]:
    """Exact prox of a structure penalty over the last dim, row by row.

    Parameters
    ----------
    kind : "tv": ``lam * sum_i |y_{i+1} - y_i|``; "oscar": ``lam * sum_{i<j} max(|y_i|, |y_j|)``;
        "oscar_ordered": ``lam * sum_{i<j} max(y_i, y_j) = sum_k lam (d - k) y_[k]`` (y_[k] the
        k-th largest value; equal to OSCAR on the non-negative orthant).
    x : Tensor (..., d), float32 or float64, any device. CUDA tensors are copied to the
        CPU, solved there and copied back (there is no GPU kernel for these proxes).
    allowed : bool Tensor of the shape of ``x`` (True = the position takes part), or None.
        Masked positions are left out of the problem: total-variation neighbours are
        consecutive allowed positions, the OSCAR weights count allowed entries only.
    lam : float >= 0. Any finite value is exact: a row that ``lam`` makes one group (every
        allowed entry pooled) is recognised from its values and returned as its mean (for the
        ordered prox moved by ``-lam (n - 1) / 2``, n its allowed entries) without ``lam``
        meeting the values; a row that is not is solved with ``lam < n (max - min)``. For
        OSCAR, a ``lam`` beyond ``4 max |x|`` (where every entry is 0) is replaced by that value.
    drop_row_shift : the ordered prox of a row that is one group is returned as its mean,
        without the shift ``-lam (n - 1) / 2`` (a following sparsemax ignores it, and it only
        costs precision).
    neg_inf_masked : with ``allowed`` None, entries equal to ``-inf`` are masked, and the
        output is ``-inf`` there instead of 0 (attention scores that a sparsemax follows).

    Returns
    -------
    y : Tensor like ``x``: the prox, 0 (or ``-inf``) at masked positions.
    groups : int32 Tensor (..., d) on the device of ``x``: per row, the index (0, 1, ...) of
        the group of each position (fused run for TV, block of equal magnitude for OSCAR, of
        equal value for the ordered prox), -1 where the Jacobian row is zero (masked
        positions, OSCAR entries set to 0).
    """
    if kind not in _KINDS:
        raise ValueError(f"structured_prox: kind must be one of {_KINDS}, got {kind!r}")
    if x.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"structured_prox: x must be float32 or float64, got {x.dtype}")
    if neg_inf_masked and allowed is not None:
        raise ValueError("structured_prox: neg_inf_masked marks the masked entries itself; allowed must be None "
                         "with it")
    load_library()
    device = x.device
    d = x.shape[-1] if x.dim() else 1
    xc = x.detach().to("cpu").contiguous()
    rows = xc.numel() // d if d else 0
    ac = None
    if allowed is not None:
        ac = allowed.to("cpu").expand(x.shape).contiguous().view(torch.uint8)
    y = torch.empty_like(xc)
    groups = torch.empty(xc.shape, dtype=torch.int32)
    flags = (_NEG_INF_MASKED if neg_inf_masked else 0) | (_DROP_ROW_SHIFT if drop_row_shift else 0)
    failed = LIBRARY.call(f"structured_prox_{_suffix(xc.dtype)}", kind=_KINDS.index(kind), x=xc, allowed=ac, out=y,
                          group=groups, rows=rows, d=d, lam=float(lam), flags=flags,
                          threads=torch.get_num_threads())
    if failed:
        raise MemoryError(f"structured_prox: could not allocate scratch memory for rows of length {d}")
    if device.type != "cpu":
        return y.to(device), groups.to(device)
    return y, groups


def group_mean_cpu(values: Tensor, groups: Tensor) -> Tensor:
    """Replace each entry by the mean of its group, row by row over the last dim (compiled).

    Parameters
    ----------
    values : CPU Tensor (..., d), float32 or float64.
    groups : int32 CPU Tensor (..., d): group ids in ``[0, d)`` per row; any other id (-1)
        gives 0 and does not count.

    Returns
    -------
    Tensor like ``values``.
    """
    if values.dtype not in (torch.float32, torch.float64) or values.device.type != "cpu":
        raise ValueError(f"group_mean_cpu: values must be a float32/float64 CPU tensor, got {values.dtype} "
                         f"on {values.device}")
    if groups.shape != values.shape:
        raise ValueError(f"group_mean_cpu: groups of shape {tuple(groups.shape)} do not match values of shape "
                         f"{tuple(values.shape)}")
    load_library()
    d = values.shape[-1] if values.dim() else 1
    vc = values.contiguous()
    gc = groups.to(torch.int32).contiguous()
    out = torch.empty_like(vc)
    rows = vc.numel() // d if d else 0
    failed = LIBRARY.call(f"group_mean_{_suffix(vc.dtype)}", v=vc, group=gc, out=out, rows=rows, d=d,
                          threads=torch.get_num_threads())
    if failed:
        raise MemoryError(f"group_mean_cpu: could not allocate scratch memory for rows of length {d}")
    return out
