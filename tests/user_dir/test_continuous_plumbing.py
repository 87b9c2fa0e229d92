"""The adapter is generic over continuous mechanisms: a stand-in continuous context registered for
these tests only goes through training, incremental decoding, beam search and padding like any
variant. (The real continuous variants run through the same tests in test_variants_in_the_model.py.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import plugin

from .helpers import run_cli, train_argv
from .test_variants_in_the_model import (
    build,
    check_beam_search_scores,
    check_incremental_equals_full,
    check_padding_invariance,
)

NAME = "standin_continuous"


class StandinContinuous(nn.Module):
    """A Gaussian kernel over the positions of the existing keys, centred at the mean position
    under the discrete probabilities: enough structure for the plumbing (positions depend on the
    key mask, as for continuous attention), nothing of the 2020 paper's value regression."""

    def forward(self, probs, v, mask):
        valid = (mask if mask is not None else torch.ones_like(probs, dtype=torch.bool)).expand_as(probs)
        count = valid.sum(-1, keepdim=True).clamp(min=1)
        t = (valid.cumsum(-1) - 0.5) / count  # (l + 1/2) / L over the existing keys
        mu = (probs * t).sum(-1, keepdim=True)
        w = torch.exp(-0.5 * ((t - mu) / 0.2) ** 2) * valid
        w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
        return w @ v, w


@pytest.fixture(scope="module", autouse=True)
def standin():
    assert NAME not in plugin.variants()
    plugin.register_continuous(NAME, lambda num_heads=None: StandinContinuous())
    yield
    plugin.unregister(NAME)  # leave the registry as the other tests expect it


CONFIGS = [("sparsemax", "entmax15", NAME), ("softmax", "sparsemax", f"entmax15+{NAME}")]


@pytest.mark.parametrize("config", CONFIGS, ids=["continuous", "discrete+continuous"])
def test_standin_continuous_cross_attention(data_bin, config):
    model, task = build(data_bin, config)
    weights, batch = check_incremental_equals_full(model, task, config)
    if config[2] == NAME:  # the returned weights are the stand-in's kernel: positive on every existing key
        existing = batch.src_tokens.ne(batch.pad)[:, None, :].expand_as(weights)
        assert torch.equal(weights > 0, existing)
    check_padding_invariance(model, task)
    check_beam_search_scores(model, task)


def test_standin_continuous_trains_from_the_command_line(data_bin, tmp_path):
    with plugin.record_calls() as calls:
        run_cli("train", train_argv(data_bin, tmp_path, "--cross-attn", NAME, "--max-update", "1",
                                    "--disable-validation"))
    assert ("cross", NAME, True) in {(c.role, c.spec, c.training) for c in calls}
