"""fairseq-interactive --print-alignment: `hard` works with the user dir; `soft` crashes inside fairseq
for stock and sparse checkpoints alike (a documented limitation, docs/fairseq.md), and the weights
are available from Python instead."""

from __future__ import annotations

import os
import subprocess

import pytest

from .helpers import BIN, USER_DIR, run_cli, train_argv

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def checkpoints(data_bin, tmp_path_factory):
    out = {}
    for name, arch, extra in (("sparse", "sparse_transformer_tiny", ["--cross-attn", "sparsemax"]),
                              ("stock", "transformer", ["--encoder-layers", "1", "--decoder-layers", "1",
                                                        "--encoder-embed-dim", "32", "--decoder-embed-dim", "32"])):
        save = tmp_path_factory.mktemp(name)
        run_cli("train", train_argv(data_bin, save, *extra, "--max-update", "1", "--disable-validation", arch=arch))
        out[name] = save / "checkpoint_last.pt"
    return out


def _interactive(data_bin, checkpoint, alignment: str) -> subprocess.CompletedProcess:
    argv = [str(BIN / "fairseq-interactive"), str(data_bin), "--user-dir", str(USER_DIR), "--path", str(checkpoint),
            "--source-lang", "src", "--target-lang", "tgt", "--beam", "2", "--cpu", "--print-alignment", alignment]
    return subprocess.run(argv, input="s1 s2 s3 s4\n", capture_output=True, text=True, env=ENV, timeout=300)


def test_hard_alignment_prints(data_bin, checkpoints):
    proc = _interactive(data_bin, checkpoints["sparse"], "hard")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("A-0\t"))
    pairs = [p.split("-") for p in line.split("\t")[1].split()]
    assert pairs and all(0 <= int(s) <= 4 for s, _ in pairs)  # source index (4 words + </s>) - target index


@pytest.mark.parametrize("kind", ["sparse", "stock"])
def test_soft_alignment_crashes_inside_fairseq(data_bin, checkpoints, kind):
    """Upstream behaviour, documented in docs/fairseq.md's limitations; if this fails, fairseq fixed it."""
    proc = _interactive(data_bin, checkpoints[kind], "soft")
    assert proc.returncode != 0
    assert "fairseq_cli/interactive.py" in proc.stderr
    assert "ValueError: too many values to unpack (expected 2)" in proc.stderr
