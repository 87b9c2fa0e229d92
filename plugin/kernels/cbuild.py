"""Build a small C source into a shared library on first use and load it with :mod:`ctypes`.

The library is compiled once with the system C compiler (``$CC`` when set, else ``gcc``,
else ``cc``) into a cache directory: ``$SPARSE_ATTENTION_CACHE``, else
``$XDG_CACHE_HOME/sparse_attention``, else ``~/.cache/sparse_attention``. The file name holds
a hash of the source, the compiler, the flags and, for ``-march=native`` builds, the CPU's
feature flags, so an edited source or another machine sharing the cache gets its own build.

Only what this user built is ever loaded (a shared object runs code when it is loaded):

- the cache directory must belong to the current user and be closed to everyone else; it
  is created with mode 0700 (an existing one of the user's is set to 0700); one owned by
  someone else is refused. There is no fallback to a shared location such as the temporary
  directory: when the cache cannot be used, the error names the directory and the reason.
- a cached object is loaded only when it is a regular file owned by the user, writable by
  no one else, and its SHA-256 equals the digest written beside it (``<name>.so.sha256``).
  Each build compiles to a temporary file in the cache, checks that the compiler wrote a
  shared library, renames it into place and only then writes the digest (also by an
  atomic rename). So a partial copy, a truncated file (a full disk) or a build that was
  interrupted is detected before ``dlopen`` and rebuilt. Concurrent first uses are safe.

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
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

__all__ = ["CacheError", "CompileError", "cache_dir", "load_c_library"]

_LOADED: dict[tuple[str, str, str], ctypes.CDLL] = {}
_LOCK = threading.Lock()
_DIGEST_SUFFIX = ".sha256"


class CompileError(RuntimeError):
    """The C library could not be built: no compiler, a source that does not compile with
    any flag set, a compiler that wrote no library, or an unusable cache directory."""


class CacheError(CompileError):
    """The cache directory cannot be used (not writable, owned by another user, not a directory)."""


def cache_dir() -> Path:
    """Where compiled kernels are kept (created with mode 0700 on first use)."""
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


_HINT = "set SPARSE_ATTENTION_CACHE to a directory of your own"


def _private_dir(directory: Path) -> Path:
    """Create ``directory`` (mode 0700) or check an existing one: a directory of this user, closed to others.

    Raises :class:`CacheError` naming the directory when it cannot be used.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheError(f"the kernel cache directory {directory} cannot be created ({exc}); {_HINT}") from None
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise CacheError(f"the kernel cache {directory} is not a directory (a symbolic link or a file); {_HINT}")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise CacheError(
            f"the kernel cache directory {directory} belongs to another user (uid {info.st_uid}); compiled "
            f"kernels are loaded only from a directory of your own; {_HINT}"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        try:  # the user's own directory: close it to others (the files in it are checked one by one)
            os.chmod(directory, 0o700)
        except OSError as exc:
            raise CacheError(
                f"the kernel cache directory {directory} cannot be made private ({exc}); {_HINT}"
            ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CacheError(f"the kernel cache directory {directory} is not writable; {_HINT}")
    return directory


def _target(directory: Path, stem: str, source: Path, compiler: str, flags: Sequence[str]) -> Path:
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    digest.update("\0".join((compiler, *flags)).encode())
    if "-march=native" in flags:
        digest.update(_cpu_signature().encode())
    return directory / f"{stem}-{digest.hexdigest()[:20]}.so"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _owned_private_file(path: Path) -> bool:
    """A regular file (not a link) of this user that no one else can write."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode) or stat.S_IMODE(info.st_mode) & 0o022:
        return False
    return not hasattr(os, "getuid") or info.st_uid == os.getuid()


def _verified(target: Path) -> bool:
    """True when ``target`` and its digest are this user's files and the digest matches the contents."""
    digest_file = target.with_name(target.name + _DIGEST_SUFFIX)
    if not (_owned_private_file(target) and _owned_private_file(digest_file)):
        return False
    try:
        return digest_file.read_text().strip() == _sha256(target)
    except OSError:
        return False


def _looks_like_library(path: Path) -> str | None:
    """None when ``path`` starts like a shared library of this platform, else what is wrong."""
    size = path.stat().st_size
    if size == 0:
        return "it wrote no library (the output file is empty)"
    with open(path, "rb") as f:
        head = f.read(4)
    magic = {"linux": (b"\x7fELF",), "darwin": (b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe", b"\xca\xfe\xba\xbe")}
    expected = next((m for key, m in magic.items() if sys.platform.startswith(key)), None)
    if expected is not None and head not in expected:
        return f"its output ({size} bytes) is not a shared library"
    return None


def _write_atomically(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _compile(compiler: str, source: Path, flags: Sequence[str], target: Path) -> str | None:
    """Compile into ``target`` and write its digest; return None on success, else what went wrong."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    except OSError as exc:
        raise CacheError(f"the kernel cache directory {target.parent} is not writable ({exc}); {_HINT}") from None
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *flags, "-o", tmp, str(source), "-lm"], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            return result.stderr.strip() or f"exit status {result.returncode}"
        problem = _looks_like_library(Path(tmp))
        if problem is not None:
            return f"the compiler exited with status 0 but {problem}"
        os.chmod(tmp, 0o700)
        digest = _sha256(Path(tmp))
        os.replace(tmp, target)
        # the digest comes last: an object without a matching digest is never loaded
        _write_atomically(target.with_name(target.name + _DIGEST_SUFFIX), (digest + "\n").encode())
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
    CacheError
        If the cache directory cannot be used (the message names it and the reason).
    CompileError
        If no C compiler is found, no flag set compiles, or the compiler wrote no library.
    """
    compiler = _compiler()
    directory = cache_dir()
    key = (str(source), compiler, str(directory))
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        _private_dir(directory)
        errors = []
        for flags in flag_sets:
            target = _target(directory, source.stem, source, compiler, flags)
            if not _verified(target):  # missing, truncated, corrupt, or not this user's: (re)build
                message = _compile(compiler, source, flags, target)
                if message is not None:
                    errors.append(f"{compiler} {' '.join(flags)}: {message}")
                    continue
            try:
                lib = ctypes.CDLL(str(target))
            except OSError as exc:  # built, but it does not load here
                errors.append(f"{target}: {exc}")
                continue
            _LOADED[key] = lib
            return lib
        raise CompileError(f"could not build {source.name} with {compiler}:\n" + "\n".join(errors))
