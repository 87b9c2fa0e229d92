"""Build the wheel, install it into a fresh virtual environment and run the documented examples against it.

    .venv/bin/python scripts/check_wheel.py               # a temporary folder, removed at the end
    .venv/bin/python scripts/check_wheel.py --keep DIR    # build, venv and example folder kept in DIR

What a user does who installs the library rather than working in the repository:

1. ``pip wheel --no-deps --no-build-isolation`` on a copy of the tracked (and untracked, not
   ignored) files of the repository; the wheel must hold every file of ``plugin``, ``user_dir``
   and ``hf_models`` (the C kernel sources are package data, not Python modules);
2. ``python -m venv`` (no system site-packages), ``pip install torch==2.13.0``, then
   ``pip install "<wheel>[hf]"``: only the registry and the documented commands;
3. from a folder outside the repository (so the repository's sources cannot be imported): the
   imports come from the venv; the Python examples of the sections in SECTIONS (the README's
   "Core" and "HuggingFace transformers", docs/core.md's "Adding a variant", docs/continuous.md's
   "Quick example", docs/huggingface.md's "Converting a stock BART") run as written (the tiny
   local models they load are the ones tests/test_docs.py builds); the C kernels compile from
   the installed sources into a fresh cache and run; ``import user_dir`` without fairseq says
   how to install it.

It prints the time of each step and exits non-zero at the first failure. It does not run in the
test suite (a fresh venv with transformers takes minutes even with pip's cache warm).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("plugin", "user_dir", "hf_models")
TORCH = "torch==2.13.0"
#: (file, heading) of the sections whose Python examples run against the installed wheel; a section is
#: everything under its heading (of any level) down to the next heading of the same or a higher level
SECTIONS = (
    ("README.md", "Core: `plugin`"),
    ("README.md", "HuggingFace transformers"),
    ("docs/core.md", "Adding a variant"),
    ("docs/continuous.md", "Quick example"),
    ("docs/huggingface.md", "Converting a stock BART"),
)

CHECK_INSTALLED = """
import os, sys, torch, plugin, hf_models
for module in (plugin, hf_models):
    assert module.__file__.startswith(sys.prefix), f"{module.__name__} imported from {module.__file__}, not the venv"
q = torch.randn(1, 2, 16, 8)  # float32: the C kernels compute in float32
for spec in ("sparsemax", "fusedmax:lam=0.5"):
    choice = plugin.explain_path(q, q, q, spec)
    assert choice.name == "cpu_chunked", (spec, choice)
    out = plugin.attention(q, q, q, spec)
    with plugin.use_path("reference"):
        expected = plugin.attention(q, q, q, spec)
    assert torch.allclose(out, expected, atol=1e-5), spec
built = sorted(p for p in os.listdir(os.environ["SPARSE_ATTENTION_CACHE"]) if p.endswith(".so"))
assert len(built) == 2, built
try:
    import user_dir
except ModuleNotFoundError as err:
    assert "fairseq-fixed" in str(err) and err.name == "fairseq", err
else:
    raise AssertionError("import user_dir succeeded without fairseq")
print("installed from", os.path.dirname(plugin.__file__), "; C kernels built:", ", ".join(built))
"""


def step(name: str, cmd: list[str], **kwargs) -> float:
    print(f"--- {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    seconds = time.time() - t0
    if proc.returncode:
        sys.exit(f"FAILED ({proc.returncode}) after {seconds:.0f} s: {name}\n"
                 f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    for line in proc.stdout.strip().splitlines()[-3:]:
        print("   ", line)
    print(f"    ok, {seconds:.1f} s", flush=True)
    return seconds


def copy_sources(dest: Path) -> None:
    """The files git would ship: tracked and untracked-but-not-ignored (no build/, .venv, outputs)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def check_wheel_contents(wheel: Path, sources: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(sources).as_posix() for pkg in PACKAGES for p in (sources / pkg).rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
    missing = sorted(expected - names)
    if missing:
        sys.exit(f"FAILED: the wheel lacks {missing} (setup.py packages / package_data)")
    c_files = sorted(n for n in names if n.endswith(".c"))
    print(f"    the wheel holds all {len(expected)} package files, C sources: {', '.join(c_files)}")


def enclosing_headings(text: str) -> list[list[str]]:
    """For each line of a Markdown text (0-based), the titles of the headings it lies under, outermost first."""
    stack: list[tuple[int, str]] = []
    out = []
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            stack = [h for h in stack if h[0] < level] + [(level, line[level:].strip())]
        out.append([title for _, title in stack])
    return out


def doc_examples() -> list[tuple[str, str]]:
    """(id, code) of the runnable Python blocks in SECTIONS, with their doc-test replacements."""
    sys.path.insert(0, str(ROOT))
    from tests.test_docs import parse_blocks

    out = []
    for path in dict.fromkeys(p for p, _ in SECTIONS):
        text = (ROOT / path).read_text(encoding="utf-8")
        headings = enclosing_headings(text)
        wanted = {title for p, title in SECTIONS if p == path}
        found = set()
        for block in parse_blocks(path, text):
            titles = wanted.intersection(headings[block.line - 1])
            if block.language == "python" and titles and not block.skip:
                if block.cont or set(block.setups) - {"hf-models"}:
                    sys.exit(f"FAILED: {block.id} needs {block.setups or 'the block before it'}; extend this script")
                out.append((block.id, block.source()))
                found |= titles
        if wanted - found:
            sys.exit(f"FAILED: no Python example in the sections {sorted(wanted - found)} of {path}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary folder)")
    ap.add_argument("--python", default=getattr(sys, "_base_executable", sys.executable),
                    help="the interpreter of the fresh venv (default: the one behind this venv)")
    args = ap.parse_args(argv)
    work = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="check-wheel-"))
    if args.keep and work.exists() and any(work.iterdir()):
        ap.error(f"--keep: {work} exists and is not empty")
    if work.is_relative_to(ROOT):
        ap.error(f"--keep: {work} is inside the repository, whose sources must not be importable")
    started = time.time()
    try:
        sources, dist, venv, run = work / "src", work / "dist", work / "venv", work / "run"
        for d in (sources, dist, run):
            d.mkdir(parents=True)
        copy_sources(sources)
        step("wheel", [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(dist),
                       str(sources)])
        (wheel,) = dist.glob("*.whl")
        print(f"    {wheel.name}: {wheel.stat().st_size / 1e3:.0f} kB")
        check_wheel_contents(wheel, sources)

        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
        env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", SPARSE_ATTENTION_CACHE=str(work / "kernel-cache"))
        step("venv", [args.python, "-m", "venv", str(venv)], env=env)
        py = str(venv / "bin" / "python")
        step("torch", [py, "-m", "pip", "install", TORCH], env=env)
        step("wheel[hf]", [py, "-m", "pip", "install", f"{wheel}[hf]", TORCH], env=env)

        sys.path.insert(0, str(ROOT))
        from tests.test_docs import SETUPS

        SETUPS["hf-models"](run, work / "setup-cache")  # tiny local models at path/to/... (built by this venv)
        step("installed package", [py, "-c", CHECK_INSTALLED], cwd=run, env=env)
        for block_id, code in doc_examples():
            script = run / f"{block_id.replace(':', '_').replace('.', '_').replace('/', '_')}.py"
            script.write_text(code, encoding="utf-8")
            step(block_id, [py, script.name], cwd=run, env=env)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wheel check passed in {(time.time() - started) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
