"""The C kernels' functions, each declared once, and the one way to call them.

A C function reads raw memory: a tensor of the wrong dtype, a non-contiguous view, a tensor
on another device or one too small for the sizes passed with it would be read or written out
of bounds, silently. So every function the Python side calls is declared here once, with each
argument's name and kind (a float32 / float64 / int32 / int64 / uint8 tensor, or a C
``int64_t``, ``int``, ``double``), the number of elements each tensor must hold (from the
other arguments) and the lower bound of each size. :meth:`CFunction.__call__` takes the
arguments by name and checks all of them before any pointer is passed; anything wrong raises
``ValueError`` naming the function, the argument and what it must be.

:class:`CLibrary` builds a C source on first use (:func:`plugin.kernels.cbuild.load_c_library`),
sets every declared function's ``argtypes`` / ``restype`` from the table, and keeps the loaded
library (and, optionally, the build error) for the process.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .cbuild import CompileError, load_c_library

__all__ = ["Arg", "CFunction", "CLibrary", "Sizes", "tensor_kinds"]

# tensor kinds: the dtype a pointer argument must have
_TENSOR_DTYPES = {
    "f32": torch.float32,
    "f64": torch.float64,
    "i32": torch.int32,
    "i64": torch.int64,
    "u8": torch.uint8,
}
# scalar kinds: the C type
_SCALAR_CTYPES: dict[str, Any] = {"int64": ctypes.c_int64, "int": ctypes.c_int, "double": ctypes.c_double}
_RESTYPES: dict[str | None, Any] = {None: None, "int": ctypes.c_int}


def tensor_kinds() -> dict[str, torch.dtype]:
    """The tensor kinds of :class:`Arg` and their dtypes."""
    return dict(_TENSOR_DTYPES)


Sizes = Mapping[str, Any]


@dataclass(frozen=True)
class Arg:
    """One argument of a C function.

    ``kind`` is a tensor kind (``"f32"``, ``"f64"``, ``"i32"``, ``"i64"``, ``"u8"``: a pointer to
    a contiguous CPU tensor of that dtype) or a scalar kind (``"int64"``, ``"int"``,
    ``"double"``). ``optional`` lets a tensor be None (a NULL pointer). ``numel`` gives, from the
    call's arguments, how many elements the tensor must hold at least; ``low`` is the smallest
    value a scalar may take.
    """

    name: str
    kind: str
    optional: bool = False
    numel: Callable[[Sizes], int] | None = None
    low: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in _TENSOR_DTYPES and self.kind not in _SCALAR_CTYPES:
            raise ValueError(f"Arg {self.name}: kind must be one of "
                             f"{', '.join([*_TENSOR_DTYPES, *_SCALAR_CTYPES])}, got {self.kind!r}")

    @property
    def is_tensor(self) -> bool:
        return self.kind in _TENSOR_DTYPES

    def ctype(self) -> Any:
        return ctypes.c_void_p if self.is_tensor else _SCALAR_CTYPES[self.kind]


@dataclass(frozen=True)
class CFunction:
    """A C function: its name, its arguments in order, and its return type (``"int"`` or None)."""

    name: str
    args: tuple[Arg, ...]
    restype: str | None = None

    @functools.cached_property
    def _layout(self) -> tuple[frozenset[str], tuple[Arg, ...], tuple[Arg, ...]]:
        """The argument names, the scalar arguments and the tensor arguments (built once per function)."""
        return (frozenset(a.name for a in self.args), tuple(a for a in self.args if not a.is_tensor),
                tuple(a for a in self.args if a.is_tensor))

    def checked(self, values: Mapping[str, Any]) -> list[Any]:
        """The arguments of the C call for ``values`` (by name, Python ints and pointers, converted by the
        function's ``argtypes``), after checking every one of them."""
        where = f"C kernel {self.name}"
        names, scalars, tensors = self._layout
        if values.keys() != names:
            ordered = [a.name for a in self.args]
            missing = [n for n in ordered if n not in values]
            extra = [n for n in values if n not in names]
            raise ValueError(f"{where}: takes the arguments {', '.join(ordered)}; "
                             + "; ".join(part for part in (f"missing {', '.join(missing)}" if missing else "",
                                                           f"unknown {', '.join(extra)}" if extra else "") if part))
        for arg in scalars:  # every scalar first: the tensors' sizes are computed from them
            value = values[arg.name]
            if type(value) is not int and not (arg.kind == "double" and type(value) is float):
                ok = isinstance(value, (int, float) if arg.kind == "double" else int)
                if isinstance(value, bool) or not ok:
                    raise ValueError(f"{where}: argument {arg.name} must be a Python "
                                     f"{'float' if arg.kind == 'double' else 'int'}, got {value!r}")
            if arg.low is not None and value < arg.low:
                raise ValueError(f"{where}: argument {arg.name} must be >= {arg.low}, got {value}")
        pointers: dict[str, Any] = {}
        for arg in tensors:
            value = values[arg.name]
            if value is None:
                if not arg.optional:
                    raise ValueError(f"C kernel argument {arg.name} of {self.name}: a tensor is required, got None")
                pointers[arg.name] = None
                continue
            _check_tensor(self.name, arg, value)
            if arg.numel is not None:
                need = int(arg.numel(values))
                if value.numel() < need:
                    raise ValueError(f"C kernel argument {arg.name} of {self.name}: must hold at least {need} "
                                     f"elements, got {value.numel()}")
            pointers[arg.name] = value.data_ptr() if value.numel() else None
        # the function's argtypes (set when the library is loaded) convert the Python values
        return [pointers[a.name] if a.is_tensor else values[a.name] for a in self.args]


def _check_tensor(function: str, arg: Arg, t: Any) -> None:
    dtype = _TENSOR_DTYPES[arg.kind]
    if not isinstance(t, Tensor):
        raise ValueError(f"C kernel argument {arg.name} of {function}: must be a tensor, got {type(t).__name__}")
    if not t.is_cpu or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(
            f"C kernel argument {arg.name} of {function}: must be a contiguous CPU tensor of {dtype}, got {t.dtype} "
            f"on {t.device}{'' if t.is_contiguous() else ' (not contiguous)'}"
        )


class CLibrary:
    """A C source built on first use, with its functions declared by :class:`CFunction`.

    ``remember_failure`` keeps a build error for the process (the next calls raise it again
    without trying to compile); otherwise every call after a failure tries again.
    """

    def __init__(self, source: Path, flag_sets: Callable[[], Sequence[Sequence[str]]],
                 functions: Sequence[CFunction], remember_failure: bool = False) -> None:
        self.source = source
        self.flag_sets = flag_sets
        self.functions = {f.name: f for f in functions}
        self.remember_failure = remember_failure
        self._lib: ctypes.CDLL | None = None
        self._error: str = ""
        self._lock = threading.Lock()

    @property
    def error(self) -> str:
        """Why the library could not be built (empty when it was built or not tried yet)."""
        return self._error

    def load(self) -> ctypes.CDLL:
        """The loaded library (built now if needed); :class:`CompileError` when it cannot be built."""
        lib = self._lib
        if lib is not None:
            return lib
        with self._lock:
            if self._lib is not None:
                return self._lib
            if self._error and self.remember_failure:
                raise CompileError(self._error)
            try:
                lib = load_c_library(self.source, self.flag_sets())
            except CompileError as exc:
                self._error = str(exc)
                raise
            for fn in self.functions.values():
                handle = getattr(lib, fn.name)
                handle.argtypes = [a.ctype() for a in fn.args]
                handle.restype = _RESTYPES[fn.restype]
            self._error = ""
            self._lib = lib
            return lib

    def reset(self) -> None:
        """Forget the loaded library and any build error (the next call builds or loads again)."""
        with self._lock:
            self._lib = None
            self._error = ""

    def call(self, name: str, **values: Any) -> Any:
        """Call the declared function ``name`` with its arguments by name, each checked first."""
        fn = self.functions.get(name)
        if fn is None:
            raise ValueError(f"{self.source.name} declares no function {name!r}; declared: "
                             f"{', '.join(self.functions)}")
        args = fn.checked(values)
        return getattr(self.load(), name)(*args)
