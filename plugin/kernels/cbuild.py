"""Build a small C source into a shared library on first use and load it with :mod:`ctypes`.

The library is compiled once with the system C compiler (``$CC`` when set, else ``gcc``,
else ``cc``) into a cache directory: ``$SPARSE_ATTENTION_CACHE``, else
``$XDG_CACHE_HOME/sparse_attention``, else ``~/.cache/sparse_attention`` (the temporary
directory when that is not writable). The file name holds a hash of the source, the
compiler, the flags and, for ``-march=native`` builds, the CPU's feature flags, so an edited
source or another machine sharing the cache gets its own build. Concurrent first uses are
safe: each compiles to a temporary file and renames it into place.

Flag sets are tried in order (for example with and without ``-march=native`` and OpenMP);
the first that compiles is used. OpenMP, when present, is GCC's ``libgomp``, the runtime
that PyTorch's own wheels load, so one runtime serves both.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

__all__ = ["CompileError", "cache_dir", "load_c_library"]

_LOADED: dict[tuple[str, str], ctypes.CDLL] = {}
_LOCK = threading.Lock()


class CompileError(RuntimeError):
    """No C compiler, or the source did not compile with any of the flag sets."""


def cache_dir() -> Path:
    """Where compiled kernels are kept (created on first use)."""
    explicit = os.environ.get("SPARSE_ATTENTION_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "sparse_attention"


def _compiler() -> str:
    """``$CC`` when set (an error when it is not found: it was asked for), else gcc, else cc."""
    explicit = os.environ.get("CC")
    if explicit:
        path = shutil.which(explicit)
        if path is None:
            raise CompileError(f"the C compiler CC={explicit!r} was not found on PATH")
        return path
    for name in ("gcc", "cc"):
        path = shutil.which(name)
        if path:
            return path
    raise CompileError("no C compiler found (tried gcc and cc; set CC to choose one)")


def _cpu_signature() -> str:
    """The CPU's feature flags (what ``-march=native`` compiles for)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _target(directory: Path, stem: str, source: Path, compiler: str, flags: Sequence[str]) -> Path:
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    digest.update("\0".join((compiler, *flags)).encode())
    if "-march=native" in flags:
        digest.update(_cpu_signature().encode())
    return directory / f"{stem}-{digest.hexdigest()[:20]}.so"


def _compile(compiler: str, source: Path, flags: Sequence[str], target: Path) -> str | None:
    """Compile into ``target``; return None on success, else the compiler's message."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *flags, "-o", tmp, str(source), "-lm"], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            return result.stderr.strip() or f"exit status {result.returncode}"
        os.replace(tmp, target)
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_c_library(source: Path, flag_sets: Sequence[Sequence[str]]) -> ctypes.CDLL:
    """Compile ``source`` (once per source, compiler and flags) and load it.

    Parameters
    ----------
    source : path of a C file.
    flag_sets : compiler flag lists tried in order; the first that compiles is used.

    Raises
    ------
    CompileError
        If no C compiler is found or no flag set compiles.
    """
    compiler = _compiler()
    key = (str(source), compiler, str(cache_dir()))
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        errors = []
        for flags in flag_sets:
            for directory in (cache_dir(), Path(tempfile.gettempdir()) / "sparse_attention"):
                target = _target(directory, source.stem, source, compiler, flags)
                try:
                    if not target.exists():
                        message = _compile(compiler, source, flags, target)
                        if message is not None:
                            errors.append(f"{compiler} {' '.join(flags)}: {message}")
                            break  # the flags are at fault, not the directory
                    lib = ctypes.CDLL(str(target))
                except OSError as exc:  # cache not writable, or the library does not load
                    errors.append(f"{target}: {exc}")
                    continue
                _LOADED[key] = lib
                return lib
        raise CompileError(f"could not build {source.name}:\n" + "\n".join(errors))
