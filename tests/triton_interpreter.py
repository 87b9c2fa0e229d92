"""Run a test module's Triton cases under Triton's interpreter, in a subprocess.

Triton reads ``TRITON_INTERPRET=1`` when a kernel is decorated (when its module is imported), so
the cases run in a fresh process started with the variable set: the test module itself, called
as ``python <module> --worker``, prints one JSON object per case (with its name under ``"case"``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def interpreter_results(test_file: str) -> dict[str, dict]:
    """The per-case results of ``test_file``'s worker, by case name (skips without triton)."""
    pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, test_file, "--worker"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600, check=False)
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            results[row.pop("case")] = row
    if not results:
        raise AssertionError(f"the interpreter worker produced no results:\n{done.stderr[-3000:]}")
    return results
