"""scripts/sparsify_pretrained.py end to end at its tiny size (fairseq and transformers)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sparsify")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sparsify_pretrained.py"), "--out", str(out),
                           "--size", "tiny"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text())


def test_every_run_is_reported_with_its_curve_bleu_and_support(results):
    out, res = results
    assert (out / "report.md").exists() and (out / "sparsify.png").stat().st_size > 0
    for eco in ("fairseq", "hf"):
        runs = res["seeds"][0][eco]["runs"]
        assert set(runs) == {"softmax (control)", "entmax-1.5 abrupt", "entmax-1.5 annealed", "sparsemax abrupt",
                             "sparsemax annealed"}
        for run in runs.values():
            assert [p["step"] for p in run["curve"]] == [0, 4, 8]
            assert 0 <= run["bleu"] <= 100 and set(run["support"]) == {"encoder", "decoder", "cross"}
        assert runs["softmax (control)"]["support"] == {"encoder": 1.0, "decoder": 1.0, "cross": 1.0}
        assert runs["sparsemax abrupt"]["support"]["cross"] < 1.0


def test_an_annealed_run_starts_exactly_at_the_softmax_model(results):
    """Step 0 of an annealed run is alpha = 1, i.e. the pretrained softmax model: the same validation loss."""
    _, res = results
    for eco in ("fairseq", "hf"):
        runs = res["seeds"][0][eco]["runs"]
        control = runs["softmax (control)"]["curve"][0]["valid_loss"]
        for name in ("entmax-1.5", "sparsemax"):
            assert runs[f"{name} annealed"]["curve"][0]["valid_loss"] == pytest.approx(control, abs=1e-4)
