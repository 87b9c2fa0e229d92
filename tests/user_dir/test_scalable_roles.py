"""scalable_softmax / scalable_entmax in the sparse_transformer: every role trains and generates with
them on a fast path, and the learned length parameters train and are saved in the checkpoint."""

from __future__ import annotations

import pytest
import torch

import plugin

from .helpers import generate_argv, run_cli, train_argv
from .test_variants_in_the_model import (
    build,
    check_beam_search_scores,
    check_incremental_equals_full,
    check_padding_invariance,
)

ROLES = ("encoder", "decoder", "cross")
LEARNED = ("scalable_softmax", "scalable_entmax", "scalable_entmax:alpha=learned")
FIXED = ("scalable_softmax:s=0.5", "scalable_entmax:beta=0.8,gamma=0.5", "scalable_entmax:alpha=2,beta=0.3,gamma=-0.5")
CONFIGS = [pytest.param(c, id="/".join(c)) for c in (LEARNED, FIXED)]


@pytest.fixture(scope="module")
def model_for(data_bin):
    cache = {}

    def get(config):
        if config not in cache:
            model, task = build(data_bin, config)
            with torch.no_grad():  # a different length parameter per head
                for name, p in model.named_parameters():
                    if name.endswith(("normalizer.s.weight", "normalizer.beta.weight")):
                        p.copy_(torch.linspace(0.3, 1.2, p.numel()))
                    elif name.endswith("normalizer.gamma.weight"):
                        p.copy_(torch.linspace(-0.5, 0.7, p.numel()))
            cache[config] = (model, task)
        return cache[config]

    return get


@pytest.mark.parametrize("config", CONFIGS)
def test_incremental_decoding_equals_the_full_forward(model_for, config):
    """Each decoding step sees n = the cache length, as the full forward's causal row does."""
    check_incremental_equals_full(*model_for(config), config)


@pytest.mark.parametrize("config", CONFIGS)
def test_padding_does_not_change_a_sentence(model_for, config):
    """n counts the allowed keys only: a left-padded source scores as when it is alone."""
    check_padding_invariance(*model_for(config))


@pytest.mark.parametrize("config", CONFIGS)
def test_beam_search_scores_equal_teacher_forced_scores(model_for, config):
    check_beam_search_scores(*model_for(config))


@pytest.fixture(scope="module")
def trained(data_bin, tmp_path_factory):
    save = tmp_path_factory.mktemp("scalable-run")
    enc, dec, cross = LEARNED
    with plugin.record_calls() as calls:
        run_cli("train", train_argv(data_bin, save, "--encoder-attn", enc, "--decoder-attn", dec, "--cross-attn",
                                   cross, "--max-update", "3", "--disable-validation"))
    return save, list(calls)


def test_every_role_trains_with_its_variant_on_a_fast_path(trained):
    _, calls = trained
    specs = dict(zip(ROLES, (plugin.canonical_spec(s) for s in LEARNED)))
    training = [c for c in calls if c.training]
    assert {(c.role, c.spec) for c in training} == set(specs.items())
    for role in ROLES:  # fairseq asks the last cross-attention for its weights: that call is the reference
        assert {c.path for c in training if c.role == role} - {"reference"}, role
    assert all(c.path in ("sdpa", "cpu_chunked", "cpu_chunked_torch", "reference") for c in training)


def test_the_checkpoint_holds_the_trained_length_parameters(trained):
    save, _ = trained
    state = torch.load(save / "checkpoint_last.pt")["model"]
    alpha_init = float(plugin.LearnableAlpha(1).weight.detach())  # alpha = 1.5 at the start
    expected = {
        "encoder.layers.{i}.self_attn.mechanism.normalizer.s.weight": 1.0,  # s_init
        "decoder.layers.{i}.self_attn.mechanism.normalizer.beta.weight": 0.5,  # beta_init
        "decoder.layers.{i}.self_attn.mechanism.normalizer.gamma.weight": 0.0,  # gamma_init
        "decoder.layers.{i}.encoder_attn.mechanism.normalizer.beta.weight": 0.5,
        "decoder.layers.{i}.encoder_attn.mechanism.normalizer.gamma.weight": 0.0,
        "decoder.layers.{i}.encoder_attn.mechanism.normalizer.learned.weight": alpha_init,
    }
    for pattern, init in expected.items():
        for i in (0, 1):
            value = state[pattern.format(i=i)]
            assert value.shape == (4,)
            assert not torch.allclose(value, torch.full_like(value, init)), pattern  # trained


def test_generation_runs_every_role_with_the_saved_parameters(trained, data_bin, capsys):
    save, _ = trained
    with plugin.record_calls() as calls:
        run_cli("generate", generate_argv(data_bin, save / "checkpoint_last.pt"))
    specs = dict(zip(ROLES, (plugin.canonical_spec(s) for s in LEARNED)))
    assert {(c.role, c.spec) for c in calls} == set(specs.items())
    assert not any(c.training for c in calls)
    for role in ROLES:
        assert {c.path for c in calls if c.role == role} - {"reference"}, role
    decoding = [c for c in calls if c.role == "decoder" and c.query_shape[2] == 1]
    assert decoding and all(c.path != "reference" for c in decoding)  # one query over the cache: a fast path
    assert "H-0" in capsys.readouterr().out
