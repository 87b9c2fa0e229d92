"""The known-harmless warnings of fairseq commands are silenced by the user dir, narrowly: the same
message from another module, other messages of the same modules and the user's own warning options
still apply. Also: `import user_dir` without fairseq says what to install."""

from __future__ import annotations

import os
import subprocess
import sys

from .helpers import BIN, ROOT, train_argv

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
ENV.pop("PYTHONWARNINGS", None)

# one harmless message per filter, with the module fairseq's run attributes it to
HARMLESS = [
    ("hydra.experimental.initialize() is no longer experimental. Use hydra.initialize()", "UserWarning",
     "hydra.experimental.initialize"),
    ("\nThe version_base parameter is not specified.\nHydra will assume defaults for version 1.1.", "UserWarning",
     "hydra.experimental.initialize"),
    ("hydra.experimental.compose() is no longer experimental. Use hydra.compose()", "UserWarning",
     "hydra.experimental.compose"),
    ("In 'config': Usage of deprecated keyword in package header '# @package _group_'.", "UserWarning",
     "hydra.core.default_element"),
    ("\n'config' is validated against ConfigStore schema with the same name.\n", "UserWarning", "sys"),
    ("\nThe strict flag in the compose API is deprecated.\n", "UserWarning", "hydra.compose"),
    ("'pin_memory' argument is set as true but no accelerator is found, then device pinned memory won't be used.",
     "UserWarning", "torch.utils.data.dataloader"),
    ("`torch.cuda.amp.autocast(args...)` is deprecated. Please use `torch.amp.autocast('cuda', args...)` instead.",
     "FutureWarning", "fairseq.tasks.fairseq_task"),
]
# real warnings: a harmless message from the user's code, another message of a silenced module,
# another category
REAL = [
    ("'pin_memory' argument is set as true but no accelerator is found (REAL-1)", "UserWarning", "mycode.loader"),
    ("'config' is validated against ConfigStore schema with the same name (REAL-2)", "UserWarning", "sysconfig"),
    ("something is really wrong (REAL-3)", "UserWarning", "hydra.experimental.initialize"),
    ("torch.cuda.amp.autocast(args...) is deprecated (REAL-4)", "RuntimeWarning", "fairseq.trainer"),
]


def _emit(cases, *python_options: str) -> str:
    """stderr of a fresh interpreter that imports user_dir and issues ``cases`` as warnings."""
    code = (
        "import user_dir, warnings\n"
        f"for i, (msg, cat, mod) in enumerate({cases!r}):\n"
        "    warnings.warn_explicit(msg, getattr(__builtins__, cat), f'{mod}.py', i + 1, module=mod)\n"
        "print('emitted')\n"
    )
    proc = subprocess.run([sys.executable, *python_options, "-c", code], capture_output=True, text=True, env=ENV,
                          timeout=300)
    assert proc.returncode == 0 and "emitted" in proc.stdout, proc.stderr[-3000:]
    return proc.stderr


def test_known_harmless_warnings_are_silenced_and_real_ones_shown():
    stderr = _emit(HARMLESS + REAL)
    for msg, _, _ in HARMLESS:
        assert msg.strip().splitlines()[0] not in stderr
    for msg, _, _ in REAL:
        assert msg in stderr
    assert "tensorboardX" not in stderr  # fairseq's log line on import, dropped when user_dir imports fairseq


def test_the_users_warning_options_win():
    stderr = _emit(HARMLESS[:1], "-W", "default")
    assert HARMLESS[0][0] in stderr


def test_a_fairseq_command_starts_quietly(data_bin, tmp_path):
    """fairseq-train with --user-dir: none of the known messages; the stock model without the user
    dir, same run, prints them (so the filters are what silences them)."""

    def run(*argv: str) -> str:
        proc = subprocess.run([str(BIN / "fairseq-train"), *argv], capture_output=True, text=True, env=ENV,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    ours = run(*train_argv(data_bin, tmp_path / "ours", "--max-update", "1"))
    stock_argv = train_argv(data_bin, tmp_path / "stock", "--max-update", "1", arch="transformer")
    i = stock_argv.index("--user-dir")
    stock = run(*(stock_argv[:i] + stock_argv[i + 2:]))
    for text in ("no longer experimental", "version_base", "@package _group_", "ConfigStore schema",
                 "strict flag", "pin_memory", "torch.cuda.amp.autocast"):
        assert text in stock
        assert text not in ours
    assert "Warning" not in ours, ours


def test_import_without_fairseq_says_what_to_install():
    code = "import sys\nsys.modules['fairseq'] = None  # as if fairseq were not installed\nimport user_dir\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: user_dir is a fairseq user directory and needs fairseq")
    for command in ("pip install -r requirements/build.txt",
                    "pip install --no-deps --no-build-isolation fairseq-fixed==0.12.3.1",
                    "pip install -r requirements/fairseq.txt"):
        assert command in last
