"""The compiled-kernel cache loads only what this user built, from a private directory, and intact."""

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from plugin.kernels import cbuild

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                                reason="needs a C compiler")

FLAGS = (("-O1", "-shared", "-fPIC"),)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def source(tmp_path):
    src = tmp_path / "src" / "answer.c"
    src.parent.mkdir()
    src.write_text("int answer(void) { return 42; }\n")
    return src


@pytest.fixture()
def fresh(monkeypatch, tmp_path):
    """A clean in-process cache of loaded libraries and a private cache directory."""
    monkeypatch.setattr(cbuild, "_LOADED", {})
    monkeypatch.delenv("CC", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SPARSE_ATTENTION_CACHE", str(cache))
    return cache


def _build_without_loading(cache: Path, source: Path) -> Path:
    """Build into the cache as a first use would, without mapping the object into this process
    (changing a mapped file in place would crash the test itself)."""
    cbuild._private_dir(cache)
    target = cbuild._target(cache, source.stem, source, cbuild._compiler(), FLAGS[0])
    assert cbuild._compile(cbuild._compiler(), source, FLAGS[0], target) is None
    return target


def _planted_library(tmp_path, marker: Path) -> bytes:
    """A shared object whose constructor writes ``marker`` (what an attacker would plant)."""
    src = tmp_path / "evil.c"
    src.write_text(textwrap.dedent(f"""
        #include <stdio.h>
        __attribute__((constructor)) static void planted(void) {{
            FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("ran", f); fclose(f); }}
        }}
        int answer(void) {{ return 666; }}
    """))
    out = tmp_path / "evil.so"
    subprocess.run([cbuild._compiler(), "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    return out.read_bytes()


def test_cache_directory_is_created_private(fresh, source):
    lib = cbuild.load_c_library(source, FLAGS)
    assert lib.answer() == 42
    info = os.stat(fresh)
    assert stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == os.getuid()
    (obj,) = fresh.glob("answer-*.so")
    assert (fresh / (obj.name + ".sha256")).read_text().strip() == cbuild._sha256(obj)


def test_an_existing_own_cache_directory_is_closed_to_others(fresh, source):
    fresh.mkdir(mode=0o777)
    os.chmod(fresh, 0o777)
    cbuild.load_c_library(source, FLAGS)
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o700


def test_unusable_cache_never_falls_back_to_the_shared_temporary_directory(fresh, source, tmp_path, monkeypatch):
    shared = tmp_path / "shared_tmp"
    shared.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cache = blocker / "cache"  # cannot be created: its parent is a file
    monkeypatch.setenv("SPARSE_ATTENTION_CACHE", str(cache))
    # another user plants a library under the predictable name in the shared location
    marker = tmp_path / "marker"
    planted_dir = Path(tempfile.gettempdir()) / "sparse_attention"
    planted_dir.mkdir()
    target = cbuild._target(planted_dir, source.stem, source, cbuild._compiler(), FLAGS[0])
    target.write_bytes(_planted_library(tmp_path, marker))
    with pytest.raises(cbuild.CacheError, match=str(cache)):
        cbuild.load_c_library(source, FLAGS)
    assert not marker.exists()


def test_unwritable_cache_error_names_the_directory_not_the_compiler(fresh, source, monkeypatch):
    fresh.mkdir(mode=0o700)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == fresh else real_access(p, mode))
    with pytest.raises(cbuild.CacheError) as info:
        cbuild.load_c_library(source, FLAGS)
    message = str(info.value)
    assert str(fresh) in message and "not writable" in message
    assert "compiler" not in message


def test_cache_directory_of_another_user_is_refused(fresh, source, tmp_path, monkeypatch):
    if os.getuid() == 0:
        fresh.mkdir(mode=0o700)
        os.chown(fresh, 12345, 12345)
        foreign = fresh
    else:
        foreign = Path("/")  # owned by root
        monkeypatch.setenv("SPARSE_ATTENTION_CACHE", str(foreign))
    with pytest.raises(cbuild.CacheError, match="belongs to another user"):
        cbuild.load_c_library(source, FLAGS)


@pytest.mark.skipif(os.getuid() != 0, reason="planting a file owned by another user needs root")
def test_a_library_planted_by_another_user_in_the_cache_is_not_loaded(fresh, source, tmp_path):
    fresh.mkdir(mode=0o700)
    marker = tmp_path / "marker"
    target = cbuild._target(fresh, source.stem, source, cbuild._compiler(), FLAGS[0])
    data = _planted_library(tmp_path, marker)
    target.write_bytes(data)
    digest = target.with_name(target.name + ".sha256")
    digest.write_text(cbuild._sha256(target))  # even with a matching digest
    for path in (target, digest):
        os.chown(path, 12345, 12345)
    lib = cbuild.load_c_library(source, FLAGS)
    assert lib.answer() == 42
    assert not marker.exists()
    assert os.stat(target).st_uid == os.getuid()


def test_a_library_writable_by_others_is_rebuilt(fresh, source, tmp_path):
    cbuild.load_c_library(source, FLAGS)
    (obj,) = fresh.glob("answer-*.so")
    os.chmod(obj, 0o777)
    cbuild._LOADED.clear()
    cbuild.load_c_library(source, FLAGS)
    assert stat.S_IMODE(os.stat(obj).st_mode) & 0o022 == 0


def test_truncated_cached_library_is_rebuilt_not_loaded(fresh, source):
    obj = _build_without_loading(fresh, source)
    size = obj.stat().st_size
    with open(obj, "r+b") as f:  # a partial copy / a full disk
        f.truncate(size // 3)
    # in a new process, as a later run would; loading a truncated object can kill it with SIGBUS
    code = textwrap.dedent(f"""
        from pathlib import Path
        from plugin.kernels import cbuild
        lib = cbuild.load_c_library(Path({str(source)!r}), {FLAGS!r})
        assert lib.answer() == 42
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), SPARSE_ATTENTION_CACHE=str(fresh))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert obj.stat().st_size == size
    assert (fresh / (obj.name + ".sha256")).read_text().strip() == cbuild._sha256(obj)


def test_a_library_without_its_digest_is_rebuilt(fresh, source):
    obj = _build_without_loading(fresh, source)
    (fresh / (obj.name + ".sha256")).unlink()  # as after a build interrupted before the digest
    obj.write_bytes(obj.read_bytes()[:100])
    assert cbuild.load_c_library(source, FLAGS).answer() == 42


def test_a_compiler_that_writes_nothing_gives_an_error_naming_that_cause(fresh, source, monkeypatch):
    monkeypatch.setenv("CC", "/bin/true")
    with pytest.raises(cbuild.CompileError) as info:
        cbuild.load_c_library(source, FLAGS)
    message = str(info.value)
    assert "/bin/true" in message and "wrote no library" in message
    assert "no C compiler" not in message
    assert not [p for p in fresh.iterdir() if p.suffix == ".so"]  # no empty objects left in the cache


def test_fusedmax_with_an_unusable_cache_names_the_directory(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = textwrap.dedent("""
        import torch, plugin
        try:
            plugin.fusedmax(torch.randn(2, 5))
        except RuntimeError as exc:
            print(exc)
        else:
            print("NO ERROR")
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO), SPARSE_ATTENTION_CACHE=str(blocker / "cache"))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert str(blocker / "cache") in result.stdout, result.stdout + result.stderr
    assert "no C compiler" not in result.stdout

