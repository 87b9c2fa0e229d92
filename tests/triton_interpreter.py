"""Run a test module's Triton cases under Triton's interpreter, in a subprocess.

Triton reads ``TRITON_INTERPRET=1`` when a kernel is decorated (when its module is imported), so
the cases run in a fresh process started with the variable set: the test module itself, called
as ``python <module> --worker``, prints one JSON object per case (with its name under ``"case"``).
"""

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
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


def print_case_results(run_case: Callable[[str], dict], names: Iterable[str]) -> None:
    """The worker's side: one JSON line per case; an exception is reported as that case's error."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    for name in names:
        try:
            res = run_case(name)
        except Exception as exc:  # reported per case by the parent test
            res = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps({"case": name, **res}), flush=True)


def case_result(results: dict[str, dict], name: str) -> dict:
    """The result of case ``name``: skipped when the worker skipped it, failed when it did not run."""
    res = results.get(name)
    assert res is not None, f"case {name} did not run"
    if "skip" in res:
        pytest.skip(res["skip"])
    assert "error" not in res, res.get("error")
    return res
