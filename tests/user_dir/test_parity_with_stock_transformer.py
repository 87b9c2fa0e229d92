"""With softmax in every role, the plugin's model computes what fairseq's stock transformer computes."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import plugin

from .helpers import (
    NO_DROPOUT,
    PAIRS,
    TINY_DIMS,
    attention_modules,
    build_model,
    make_batch,
    sharpen,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def models(data_bin):
    stock, task = build_model(data_bin, "transformer", *TINY_DIMS, *NO_DROPOUT)
    ours, _ = build_model(data_bin, "sparse_transformer", *TINY_DIMS, *NO_DROPOUT)
    sharpen(stock)
    with torch.no_grad():  # a likelier end of sentence: beam search finishes sentences at different steps
        stock.decoder.output_projection.weight[task.target_dictionary.eos()] *= 3
    ours.load_state_dict(stock.state_dict())  # strict: the parameter names are fairseq's
    return stock, ours, task


def _fast_path_called(*args, **kwargs):
    raise AssertionError("F.multi_head_attention_forward was called")


def _forward(model, batch):
    logits, extra = model(batch.src_tokens, batch.src_lengths, batch.prev_output_tokens)
    return logits, extra["attn"][0]


def test_parameter_names_are_stock_fairseq(models):
    stock, ours, _ = models
    assert list(stock.state_dict()) == list(ours.state_dict())
    assert len(attention_modules(ours)) == 2 + 2 * 2  # encoder self, decoder self, cross


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_outputs_and_gradients_match_stock(models, mode, monkeypatch):
    stock, ours, task = models
    batch = make_batch(task, PAIRS)
    for m in (stock, ours):
        m.train(mode == "train")
        m.zero_grad()
    with monkeypatch.context() as patch, plugin.record_calls() as calls:
        # the fast path fairseq's own attention takes in training must never run in the plugin's model
        patch.setattr(torch.nn.functional, "multi_head_attention_forward", _fast_path_called)
        ours_logits, ours_attn = _forward(ours, batch)
    stock_logits, stock_attn = _forward(stock, batch)
    assert_close(ours_logits, stock_logits, **TOL)
    assert_close(ours_attn, stock_attn, **TOL)
    # the plugin computed all three roles (fairseq's fast path would have bypassed it)
    assert {(c.role, c.spec, c.training) for c in calls} == {
        (role, "softmax", mode == "train") for role in ("encoder", "decoder", "cross")
    }
    if mode == "train":
        ours_logits.log_softmax(-1).sum().backward()
        stock_logits.log_softmax(-1).sum().backward()
        ours_grads = dict(ours.named_parameters())
        for name, p in stock.named_parameters():
            scale = max(1.0, p.grad.abs().max().item())  # gradients reach ~70: compare relative to their size
            assert_close(ours_grads[name].grad, p.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def _incremental(model, batch):
    """Decode step by step with fairseq's incremental state (teacher-forced tokens)."""
    enc = model.encoder(batch.src_tokens, src_lengths=batch.src_lengths)
    state: dict = {}
    steps, attns = [], []
    for t in range(batch.prev_output_tokens.size(1)):
        out, extra = model.decoder(batch.prev_output_tokens[:, : t + 1], encoder_out=enc, incremental_state=state)
        steps.append(out)
        attns.append(extra["attn"][0])
    return torch.cat(steps, 1), torch.cat(attns, 1)


def test_incremental_decoding_matches_stock(models):
    stock, ours, task = models
    batch = make_batch(task, PAIRS)
    stock.eval()
    ours.eval()
    with torch.no_grad():
        ours_out, ours_attn = _incremental(ours, batch)
        stock_out, stock_attn = _incremental(stock, batch)
    assert_close(ours_out, stock_out, **TOL)
    assert_close(ours_attn, stock_attn, **TOL)


def test_beam_search_matches_stock(models):
    """SequenceGenerator: beam-shared encoder states, cache reordering, finished sentences leaving the batch."""
    from fairseq.sequence_generator import SequenceGenerator

    stock, ours, task = models
    batch = make_batch(task, PAIRS)
    sample = {"net_input": {"src_tokens": batch.src_tokens, "src_lengths": batch.src_lengths}}
    results = []
    for model in (stock, ours):
        model.eval()
        gen = SequenceGenerator([model], task.target_dictionary, beam_size=3, max_len_b=12)
        with torch.no_grad(), plugin.record_calls() as calls:
            results.append(gen.generate([model], sample))
    # one decoder query per step; the cross-attention keys are stored once per sentence and the
    # 3 hypotheses of a sentence are its query rows (beam-shared encoder states), also after
    # finished sentences left the batch (3, then 2, then 1 sentence)
    assert {c.query_shape[2] for c in calls if c.role == "decoder"} == {1}
    assert {(c.query_shape[0], c.query_shape[2]) for c in calls if c.role == "cross"} == {(3, 3), (2, 3), (1, 3)}
    for hyps_stock, hyps_ours in zip(*results):
        assert len(hyps_stock) == len(hyps_ours) == 3
        for a, b in zip(hyps_stock, hyps_ours):
            assert torch.equal(a["tokens"], b["tokens"])
            assert_close(b["positional_scores"], a["positional_scores"], **TOL)
            assert_close(b["attention"], a["attention"], **TOL)


def test_greedy_search_after_a_beam_search_matches_stock(models):
    """fairseq never resets the beam size it set for beam search; a later beam-1 search must not share states."""
    from fairseq.sequence_generator import SequenceGenerator

    stock, ours, task = models
    # equal lengths (no padding to tell the sentences apart) and a repeated sentence
    pairs = [("s1 s2 s3", "t3 t2 t1"), ("s4 s5 s6", "t6 t5 t4"), ("s7 s8 s9", "t9 t8 t7"), ("s1 s2 s3", "t3 t2 t1")]
    batch = make_batch(task, pairs)
    sample = {"net_input": {"src_tokens": batch.src_tokens, "src_lengths": batch.src_lengths}}
    ours.set_beam_size(2)
    results = []
    for model in (stock, ours):
        model.eval()
        gen = SequenceGenerator([model], task.target_dictionary, beam_size=1, max_len_b=12)
        with torch.no_grad():
            results.append(gen.generate([model], sample))
    for hyps_stock, hyps_ours in zip(*results):
        assert torch.equal(hyps_stock[0]["tokens"], hyps_ours[0]["tokens"])
        assert_close(hyps_ours[0]["positional_scores"], hyps_stock[0]["positional_scores"], **TOL)


def test_stock_weights_load_into_a_learned_alpha_model(models, data_bin):
    """A stock checkpoint has no alpha: fairseq's load_state_dict (with its upgrade step) keeps the initial alpha."""
    stock, _, _ = models
    learned, _ = build_model(data_bin, "sparse_transformer", *TINY_DIMS, "--cross-attn", "entmax:alpha=learned")
    initial = {n: p.detach().clone() for n, p in learned.named_parameters() if "mechanism" in n}
    assert list(initial) == [f"decoder.layers.{i}.encoder_attn.mechanism.normalizer.learned.weight" for i in (0, 1)]
    learned.load_state_dict(stock.state_dict(), strict=True)
    for name, p in learned.named_parameters():
        if name in initial:
            assert torch.equal(p, initial[name])
        else:
            assert torch.equal(p, stock.state_dict()[name]), name


def test_dropout_modules_keep_stock_names(models):
    """--retain-dropout-modules takes the stock module names."""
    from fairseq.modules.fairseq_dropout import FairseqDropout

    stock, ours, _ = models
    names = [{n: m.module_name for n, m in model.named_modules() if isinstance(m, FairseqDropout)}
             for model in (stock, ours)]
    assert names[0] == names[1]


@pytest.mark.parametrize("flags", [
    ("--cross-self-attention",),
    ("--encoder-normalize-before", "--decoder-normalize-before", "--share-decoder-input-output-embed"),
], ids=["cross-self-attention", "pre-norm"])
def test_stock_flags_keep_parity(data_bin, flags):
    """Other transformer options (here: keys made of encoder and decoder states, pre-norm) go through unchanged."""
    stock, task = build_model(data_bin, "transformer", *TINY_DIMS, *NO_DROPOUT, *flags)
    ours, _ = build_model(data_bin, "sparse_transformer", *TINY_DIMS, *NO_DROPOUT, *flags)
    sharpen(stock)
    ours.load_state_dict(stock.state_dict())
    batch = make_batch(task, PAIRS)
    stock.eval()
    ours.eval()
    with torch.no_grad():
        for run in (_forward, _incremental):
            for a, b in zip(run(ours, batch), run(stock, batch)):
                assert_close(a, b, **TOL)
