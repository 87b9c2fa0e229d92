"""scalable_softmax / scalable_entmax through the transformers adapter: the Sparse* classes (per role),
hf_models.sparsify and attn_implementation= spec strings; training, save_pretrained / from_pretrained
of the learned length parameters, and generation with the KV cache (n = the cache length)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import hf_models
import plugin

from .tiny import EOS, assert_padding_invariant, model_inputs, output_of, stock_model, token_batch

ROLE_SPECS = {"encoder_attn": "scalable_softmax", "decoder_attn": "scalable_entmax",
              "cross_attn": "scalable_entmax:alpha=learned"}
FAST = {"sdpa", "cpu_chunked", "cpu_chunked_torch", "triton"}


def _perturb(model, seed=0):
    """A different value of every learned parameter per head (s, beta, gamma, alpha)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".normalizer." in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


def sparse_model(family, seed=0, **specs):
    classes = hf_models.SPARSE_FAMILIES[family]
    from .tiny import config_kwargs

    torch.manual_seed(seed)
    model = classes["seq2seq"](classes["config"](**config_kwargs(family), **specs)).eval()
    _perturb(model, seed)
    return model


def _length_parameters(model):
    return {k: v for k, v in model.state_dict().items() if ".normalizer." in k}


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_every_role_trains_with_its_variant_and_the_parameters_move(family):
    model = sparse_model(family, **ROLE_SPECS).train()
    before = {k: v.clone() for k, v in _length_parameters(model).items()}
    kinds = {k.split(".normalizer.")[1] for k in before}
    assert kinds == {"s.weight", "beta.weight", "gamma.weight", "learned.weight"}
    batch = model_inputs(family)
    labels = batch["decoder_input_ids"].masked_fill(batch["decoder_attention_mask"] == 0, -100)
    with plugin.record_calls() as calls:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss.backward()
    expected = {(field[: -len("_attn")], plugin.canonical_spec(spec)) for field, spec in ROLE_SPECS.items()}
    assert {(c.role, c.spec) for c in calls} == expected and all(c.training for c in calls)
    for role in ("encoder", "decoder", "cross"):
        assert {c.path for c in calls if c.role == role} <= FAST, role
    grads = {n: p.grad for n, p in model.named_parameters() if ".normalizer." in n}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    after = _length_parameters(model)
    moved = [k for k in before if (after[k] - before[k]).abs().max() > 1e-6]
    # (a head whose sparse weights are one-hot on every row has no gradient for its factor: T5's
    # first decoder layer here; the reference path gives the same zeros)
    assert len(moved) == len(before) if family == "bart" else len(moved) >= len(before) - 2, moved


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_padded_batch_equals_each_sequence_alone(family):
    assert_padding_invariant(sparse_model(family, **ROLE_SPECS), family, atol=1e-6)


def test_save_and_load_restore_the_learned_length_parameters(tmp_path):
    model = sparse_model("bart", **ROLE_SPECS)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["encoder_attn"], saved["decoder_attn"], saved["cross_attn"]) == tuple(ROLE_SPECS.values())
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    params = _length_parameters(model)
    assert params and _length_parameters(loaded).keys() == params.keys()
    for key, value in params.items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    batch = model_inputs("bart")
    torch.testing.assert_close(output_of(loaded, batch), output_of(model, batch), rtol=0, atol=0)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_with_the_cache_equals_recomputing_without(num_beams):
    model = sparse_model("bart", **ROLE_SPECS)
    ids, mask = token_batch((7, 4), seed=2)
    kwargs = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "num_beams": num_beams,
              "eos_token_id": EOS}
    with torch.no_grad(), plugin.record_calls() as calls:
        cached = model.generate(ids, use_cache=True, **kwargs)
    with torch.no_grad():
        recomputed = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)
    steps = [c for c in calls if c.role == "decoder" and c.query_shape[2] == 1 and c.key_shape[2] > 1]
    assert steps and all(c.path in FAST for c in steps)  # one query over the cache: a fast path
    assert {c.role for c in calls} == {"encoder", "decoder", "cross"} and not any(c.training for c in calls)


def test_attn_implementation_with_a_learned_spec_sparsifies_saves_and_generates(tmp_path):
    spec = "scalable_entmax:alpha=learned"
    stock_model("llama", "sdpa").save_pretrained(tmp_path / "stock")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "stock", attn_implementation=spec)
    assert model.config.sparse_attention == {"spec": spec, "schedule": None}
    _perturb(model, seed=3)
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for key, value in _length_parameters(model).items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    ids, mask = token_batch((5, 3))
    ids, mask = ids[:, :3], mask[:, :3]
    with plugin.record_calls() as calls:
        cached = loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=1)
    uncached = loaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=1,
                               use_cache=False)
    assert torch.equal(cached, uncached)
    assert {c.spec for c in calls} == {spec} and {c.role for c in calls} == {"decoder"}
    assert len(calls) == 6 * 2 and all(c.path in FAST for c in calls)


def test_a_fixed_spec_is_an_attn_implementation_name():
    spec = "scalable_softmax:s=0.5"
    name = hf_models.register_spec(spec)
    model = stock_model("llama", "sdpa")
    model.set_attn_implementation(name)
    ids, mask = token_batch((5, 3))
    with plugin.record_calls() as calls:
        model(input_ids=ids, attention_mask=mask)
    assert {c.spec for c in calls} == {spec} and {c.path for c in calls} == {"sdpa"}
    with pytest.raises(ValueError, match="trainable"):
        hf_models.register_spec("scalable_softmax")


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("spec", ["scalable_softmax", "scalable_entmax:alpha=learned"])
def test_sparsified_models_are_padding_invariant(family, spec):
    """Left-padded decoder rows (and padded encoder rows) count their real keys only."""
    model = hf_models.sparsify(stock_model(family, "sdpa"), spec)
    _perturb(model, seed=5)
    assert_padding_invariant(model, family, atol=1e-9)
