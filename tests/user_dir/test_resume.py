"""What holds when fairseq training is resumed at an epoch boundary (docs/fairseq.md states it).

Within an epoch a resumed run is bit-identical (test_command_line.py). At an epoch boundary
fairseq builds the restarted run's batches from another seed, so the weights drift, stock
fairseq alike; with --update-epoch-batch-itr True both runs build each epoch's batches alike
and the resumed run is bit-identical.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .helpers import TINY_DIMS, run_cli, train_argv

ROOT = Path(__file__).resolve().parents[2]
SPARSE = ["--encoder-attn", "sparsemax", "--decoder-attn", "entmax:alpha=learned", "--cross-attn", "entmax15"]
COMMON = ["--dropout", "0.1", "--attention-dropout", "0.1", "--disable-validation"]


def _largest_difference(data_bin, tmp_path, arch, *extra) -> float:
    straight, resumed = tmp_path / f"{arch}-straight", tmp_path / f"{arch}-resumed"
    run_cli("train", train_argv(data_bin, straight, *COMMON, *extra, "--max-epoch", "2", arch=arch))
    run_cli("train", train_argv(data_bin, resumed, *COMMON, *extra, "--max-epoch", "1", arch=arch))
    run_cli("train", train_argv(data_bin, resumed, *COMMON, *extra, "--max-epoch", "2", "--restore-file",
                                str(resumed / "checkpoint_last.pt"), arch=arch))
    a = torch.load(straight / "checkpoint_last.pt")
    b = torch.load(resumed / "checkpoint_last.pt")
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"]
    return max(float((a["model"][n] - b["model"][n]).abs().max()) for n in a["model"])


def test_resume_at_an_epoch_boundary_is_exact_with_update_epoch_batch_itr(data_bin, tmp_path):
    assert _largest_difference(data_bin, tmp_path, "sparse_transformer_tiny", *SPARSE,
                               "--update-epoch-batch-itr", "True") == 0.0


def test_without_it_the_sparse_model_and_stock_fairseq_drift_alike(data_bin, tmp_path):
    sparse = _largest_difference(data_bin, tmp_path, "sparse_transformer_tiny", *SPARSE)
    stock = _largest_difference(data_bin, tmp_path, "transformer", *TINY_DIMS)
    assert sparse > 1e-4 and stock > 1e-4  # the limitation the docs state is real ...
    assert 0.1 < sparse / stock < 10  # ... and of the same size for stock fairseq


def test_the_docs_state_what_holds_for_resuming():
    text = " ".join((ROOT / "docs" / "fairseq.md").read_text().split())
    assert not re.search(r"--restore-file` is bit-identical\.", text)
    assert "bit-identical within an epoch" in text and "--update-epoch-batch-itr True" in text
