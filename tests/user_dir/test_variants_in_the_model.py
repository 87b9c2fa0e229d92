"""Every variant in the sparse_transformer: incremental decoding, beam search and padding agree with
a full teacher-forced forward."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import plugin

from .helpers import (
    NO_DROPOUT,
    PAIRS,
    build_model,
    make_batch,
    sharpen,
)

TOL = {"rtol": 1e-5, "atol": 2e-5}

# (encoder, decoder, cross) specs; each discrete variant in all three roles, continuous ones in the cross-attention
CONFIGS = [
    ("softmax", "softmax", "softmax"),
    ("sparsemax", "sparsemax", "sparsemax"),
    ("entmax15", "entmax15", "entmax15"),
    ("entmax:alpha=1.3", "entmax:alpha=1.3", "entmax:alpha=1.3"),
    ("entmax:alpha=learned", "entmax:alpha=learned", "entmax:alpha=learned"),
    ("fusedmax:lam=0.5", "fusedmax:lam=0.5", "fusedmax:lam=0.5"),
    ("oscarmax:lam=0.1", "oscarmax:lam=0.1", "oscarmax:lam=0.1"),
    ("sparsemax", "entmax15", "continuous_softmax"),
    ("softmax", "sparsemax", "continuous_sparsemax"),
    ("entmax15", "softmax", "sparsemax+continuous_softmax"),
    ("oscarmax:lam=0.1", "entmax:alpha=learned", "continuous_entmax15"),
]


def _param(config):
    return pytest.param(config, id="/".join(config))


PARAMS = [_param(c) for c in CONFIGS]


def build(data_bin, config):
    enc, dec, cross = config
    model, task = build_model(
        data_bin, "sparse_transformer_tiny", *NO_DROPOUT,
        "--encoder-attn", enc, "--decoder-attn", dec, "--cross-attn", cross,
    )
    sharpen(model)
    return model.eval(), task


@pytest.fixture(scope="module")
def model_for(data_bin):
    cache = {}

    def get(config):
        if config not in cache:
            cache[config] = build(data_bin, config)
        return cache[config]

    return get


def _full(model, batch):
    enc = model.encoder(batch.src_tokens, src_lengths=batch.src_lengths)
    logits, extra = model.decoder(batch.prev_output_tokens, encoder_out=enc)
    return logits.log_softmax(-1), extra["attn"][0]


def check_incremental_equals_full(model, task, config):
    batch = make_batch(task, PAIRS)
    with torch.no_grad(), plugin.record_calls() as calls:
        full, full_attn = _full(model, batch)
        enc = model.encoder(batch.src_tokens, src_lengths=batch.src_lengths)
        state: dict = {}
        steps, attns = [], []
        for t in range(batch.prev_output_tokens.size(1)):
            out, extra = model.decoder(batch.prev_output_tokens[:, : t + 1], encoder_out=enc, incremental_state=state)
            steps.append(out.log_softmax(-1))
            attns.append(extra["attn"][0])
    inc, inc_attn = torch.cat(steps, 1), torch.cat(attns, 1)
    real = batch.prev_output_tokens.ne(batch.pad)  # positions after the end are padding
    assert_close(inc[real], full[real], **TOL)
    assert_close(inc_attn[real], full_attn[real], **TOL)
    specs = dict(zip(("encoder", "decoder", "cross"), (plugin.canonical_spec(s) for s in config)))
    assert {(c.role, c.spec) for c in calls} == set(specs.items())
    return full_attn, batch


def check_padding_invariance(model, task):
    batch = make_batch(task, PAIRS)
    with torch.no_grad():
        together, _ = _full(model, batch)
        for i, pair in enumerate(PAIRS):
            alone, _ = _full(model, make_batch(task, [pair]))
            n = alone.size(1)
            assert_close(together[i, :n], alone[0], **TOL)


def check_beam_search_scores(model, task):
    from fairseq.sequence_generator import SequenceGenerator

    batch = make_batch(task, PAIRS)
    sample = {"net_input": {"src_tokens": batch.src_tokens, "src_lengths": batch.src_lengths}}
    gen = SequenceGenerator([model], task.target_dictionary, beam_size=3, max_len_b=10)
    with torch.no_grad():
        hypos = gen.generate([model], sample)
        for i, (src, _) in enumerate(PAIRS):
            for hypo in hypos[i]:
                tgt = task.target_dictionary.string(hypo["tokens"][:-1]) or ""
                one = make_batch(task, [(src, tgt)])
                assert torch.equal(one.target[0], hypo["tokens"])
                lprobs, _ = _full(model, one)
                scores = lprobs[0].gather(-1, one.target[0][:, None]).squeeze(-1)
                assert_close(hypo["positional_scores"], scores, **TOL)


@pytest.mark.parametrize("config", PARAMS)
def test_incremental_decoding_equals_full_forward(model_for, config):
    model, task = model_for(config)
    cross_weights, batch = check_incremental_equals_full(model, task, config)
    if "softmax" not in config[2]:  # a discrete sparse cross-attention: exact zeros in its weights
        assert bool((cross_weights[batch.prev_output_tokens.ne(batch.pad)] == 0).any())


@pytest.mark.parametrize("config", PARAMS)
def test_padding_does_not_change_a_sentence(model_for, config):
    """Each sentence of a padded batch (sources left-padded) scores as when it is alone."""
    check_padding_invariance(*model_for(config))


@pytest.mark.parametrize("config", PARAMS)
def test_beam_search_scores_equal_teacher_forced_scores(model_for, config):
    """Beam search (incremental, beam-shared encoder states, reordering) scores each token as a
    full forward of the finished hypothesis does."""
    check_beam_search_scores(*model_for(config))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_training_step(data_bin, dtype):
    """The model in bfloat16 / float16 (as --bf16 / --fp16 make it): finite loss and gradients, alpha included."""
    model, task = build_model(data_bin, "sparse_transformer_tiny", "--encoder-attn", "sparsemax",
                              "--decoder-attn", "entmax:alpha=learned", "--cross-attn", "entmax15")
    model = model.to(dtype).train()
    batch = make_batch(task, PAIRS)
    logits, _ = model(batch.src_tokens, batch.src_lengths, batch.prev_output_tokens)
    assert logits.dtype == dtype
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch.target.flatten(),
                                             ignore_index=batch.pad)
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
