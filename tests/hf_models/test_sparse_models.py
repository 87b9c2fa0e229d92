"""The Sparse* classes: per-role mechanisms, conversion from stock checkpoints, save/load, generation."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

import hf_models
import plugin

from .tiny import (
    EOS,
    SEQ2SEQ,
    assert_padding_invariant,
    config_kwargs,
    model_inputs,
    output_of,
    stock_model,
    token_batch,
)

ROLE_SPECS = {"encoder_attn": "sparsemax", "decoder_attn": "entmax:alpha=1.3", "cross_attn": "entmax15"}
HAS_FUSEDMAX = "fusedmax" in plugin.variants()
HAS_CONTINUOUS = "continuous_softmax" in plugin.variants()


def sparse_model(family: str, seed: int = 0, **specs: str) -> torch.nn.Module:
    """A tiny Sparse* seq2seq model of ``family`` with the given per-role specs."""
    classes = hf_models.SPARSE_FAMILIES[family]
    torch.manual_seed(seed)
    return classes["seq2seq"](classes["config"](**config_kwargs(family), **specs)).eval()


def _stock_dir(family, tmp_path):
    stock = stock_model(family)
    stock.save_pretrained(tmp_path / "stock")
    return stock, tmp_path / "stock"


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_padded_batch_equals_each_sequence_alone_in_all_three_roles(family):
    assert_padding_invariant(sparse_model(family, **ROLE_SPECS), family)


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_each_role_runs_its_own_mechanism(family):
    model = sparse_model(family, **ROLE_SPECS)
    with plugin.record_calls() as calls:
        output_of(model, model_inputs(family))
    expected = {(field[: -len("_attn")], spec) for field, spec in ROLE_SPECS.items()}
    assert {(c.role, c.spec) for c in calls} == expected
    layers = model.config.num_hidden_layers
    assert len(calls) == 3 * layers if family != "t5" else len(calls) == 3 * model.config.num_layers


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_all_softmax_equals_the_stock_model(family, tmp_path):
    stock, path = _stock_dir(family, tmp_path)
    ours = hf_models.sparse_model_class(family).from_pretrained(path).eval()
    assert ours.config.model_type == f"sparse_{family}"
    batch = model_inputs(family)
    for implementation in ("eager", "sdpa"):
        stock.set_attn_implementation(implementation)
        torch.testing.assert_close(output_of(ours, batch), output_of(stock, batch), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_output_attentions_returns_sparse_weights_in_every_role(family):
    model = sparse_model(family, encoder_attn="sparsemax", decoder_attn="sparsemax", cross_attn="sparsemax")
    with torch.no_grad():
        out = model(**model_inputs(family), output_attentions=True)
    for name in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        weights = getattr(out, name)
        assert len(weights) == 2 and all(w is not None for w in weights), name
        w = weights[0]
        assert (w >= 0).all()
        # every real query row sums to one, and sparsemax leaves exact zeros that softmax never would
        assert ((w.sum(-1) - 1).abs() < 1e-5).any()
        assert (w == 0).sum() > w.numel() // 4, name


def test_converting_a_stock_checkpoint_reuses_weights_and_initializes_new_parameters(tmp_path):
    stock, path = _stock_dir("bart", tmp_path)
    model, info = hf_models.SparseBartForConditionalGeneration.from_pretrained(
        path, encoder_attn="entmax:alpha=learned", cross_attn="sparsemax", output_loading_info=True
    )
    stock_state = stock.state_dict()
    for key, value in model.state_dict().items():
        if "attention_mechanism" not in key:
            torch.testing.assert_close(value, stock_state[key], rtol=0, atol=0)
    learned = {k for k in model.state_dict() if "attention_mechanism" in k}
    assert learned and set(info["missing_keys"]) == learned  # reported as newly initialized
    for mech in model.attention_mechanisms().values():
        if mech.role == "encoder":
            torch.testing.assert_close(mech.normalizer.current_alpha(), torch.full((2,), 1.5))
        assert mech.spec == {"encoder": "entmax:alpha=learned", "decoder": "softmax", "cross": "sparsemax"}[mech.role]


@pytest.mark.skipif(not HAS_FUSEDMAX, reason="the structured variants (fusedmax) are not registered in plugin")
def test_converting_with_a_structured_cross_attention(tmp_path):
    _, path = _stock_dir("marian", tmp_path)
    model = hf_models.SparseMarianMTModel.from_pretrained(path, cross_attn="fusedmax:lam=0.1").eval()
    assert model.config.cross_attn == "fusedmax:lam=0.1"
    with plugin.record_calls() as calls:
        output_of(model, model_inputs("marian"))
    assert {c.spec for c in calls if c.role == "cross"} == {"fusedmax:lam=0.1"}
    assert_padding_invariant(model, "marian")


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_save_and_load_round_trip_keeps_mechanisms_and_learned_parameters(family, tmp_path):
    model = sparse_model(family, encoder_attn="entmax:alpha=learned", cross_attn="sparsemax")
    with torch.no_grad():
        for mech in model.attention_mechanisms().values():
            for p in mech.parameters():
                p.uniform_(-2, 2)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").exists()
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == f"sparse_{family}"
    assert (saved["encoder_attn"], saved["decoder_attn"], saved["cross_attn"]) == (
        "entmax:alpha=learned", "softmax", "sparsemax")
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "saved").eval()
    assert type(loaded) is type(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    batch = model_inputs(family)
    torch.testing.assert_close(output_of(loaded, batch), output_of(model, batch), rtol=0, atol=0)


@pytest.mark.parametrize(("family", "num_beams"), [("bart", 1), ("bart", 3), ("marian", 1), ("t5", 3)])
def test_generate_with_cache_equals_recomputing_without(family, num_beams):
    model = sparse_model(family, **ROLE_SPECS)
    ids, mask = token_batch((7, 4), seed=2)
    kwargs = {"attention_mask": mask, "max_new_tokens": 8, "do_sample": False, "num_beams": num_beams,
              "eos_token_id": EOS}
    with torch.no_grad(), plugin.record_calls() as calls:
        cached = model.generate(ids, use_cache=True, **kwargs)
    with torch.no_grad():
        recomputed = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)
    assert any(c.role == "decoder" and c.query_shape[2] == 1 and c.key_shape[2] > 1 for c in calls), "no cached step"


def test_learned_alpha_trains_and_moves():
    model = sparse_model("bart", encoder_attn="entmax:alpha=learned", decoder_attn="entmax:alpha=learned")
    model.train()
    mechs = [m for m in model.attention_mechanisms().values() if m.learnable]
    assert len(mechs) == 4
    before = [m.normalizer.current_alpha().clone() for m in mechs]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = model_inputs("bart")
    labels = batch["decoder_input_ids"].masked_fill(batch["decoder_attention_mask"] == 0, -100)
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in mechs for p in m.parameters())
    optimizer.step()
    after = [m.normalizer.current_alpha() for m in mechs]
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(after, before))


def test_set_attention_specs_rebuilds_one_role():
    model = sparse_model("bart")
    model.set_attention_specs(cross_attn="sparsemax")
    assert model.config.cross_attn == "sparsemax"
    assert {m.spec for m in model.attention_mechanisms().values() if m.role == "cross"} == {"sparsemax"}
    assert {m.spec for m in model.attention_mechanisms().values() if m.role == "encoder"} == {"softmax"}
    with pytest.raises(ValueError, match="valid"):
        model.set_attention_specs(self_attn="sparsemax")


def test_invalid_specs_raise_naming_the_field():
    with pytest.raises(ValueError, match="cross_attn"):
        hf_models.SparseBartConfig(**config_kwargs("bart"), cross_attn="nosuchmax")
    with pytest.raises(ValueError, match="encoder_attn.*alpha"):
        hf_models.SparseT5Config(**config_kwargs("t5"), encoder_attn="entmax:alpha=7")


def test_other_attn_implementations_are_refused(tmp_path):
    _, path = _stock_dir("bart", tmp_path)
    with pytest.raises(ValueError, match="per-role mechanisms"):
        hf_models.SparseBartForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa")
    model = sparse_model("bart")
    with pytest.raises(ValueError, match="per-role mechanisms"):
        model.set_attn_implementation("eager")
    with pytest.raises(TypeError, match="SparseBartConfig"):
        hf_models.SparseBartForConditionalGeneration(stock_model("bart").config)


def test_auto_classes_know_the_sparse_types():
    for family, classes in hf_models.SPARSE_FAMILIES.items():
        config = AutoConfig.for_model(f"sparse_{family}")
        assert type(config) is classes["config"]
    config = AutoConfig.for_model("sparse_bart", **config_kwargs("bart"), encoder_attn="sparsemax")
    assert type(AutoModel.from_config(config)) is hf_models.SparseBartModel
    assert type(AutoModelForSeq2SeqLM.from_config(config)) is hf_models.SparseBartForConditionalGeneration
    config = AutoConfig.for_model("sparse_bart", **config_kwargs("bart") | {"num_labels": 3})
    assert type(AutoModelForSequenceClassification.from_config(config)) is hf_models.SparseBartForSequenceClassification


def test_sparse_classifier_and_encoder_only_models():
    torch.manual_seed(0)
    config = hf_models.SparseBartConfig(**config_kwargs("bart"), encoder_attn="sparsemax", decoder_attn="sparsemax",
                                        cross_attn="sparsemax")
    classifier = hf_models.SparseBartForSequenceClassification(config).eval()
    ids, mask = token_batch((6, 6), seed=1)
    ids[:, -1] = EOS  # BART classifies from the last eos
    with plugin.record_calls() as calls:
        logits = classifier(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == (2, 3) and {c.role for c in calls} == {"encoder", "decoder", "cross"}
    encoder = hf_models.SparseT5EncoderModel(hf_models.SparseT5Config(**config_kwargs("t5"), encoder_attn="entmax15"))
    with plugin.record_calls() as calls:
        encoder(input_ids=ids, attention_mask=mask)
    assert {(c.role, c.spec) for c in calls} == {("encoder", "entmax15")}


def test_sparse_model_class_lookup():
    assert hf_models.sparse_model_class("sparse_t5") is hf_models.SparseT5ForConditionalGeneration
    assert hf_models.sparse_model_class("marian", "base") is hf_models.SparseMarianModel
    with pytest.raises(ValueError, match="valid choices"):
        hf_models.sparse_model_class("gpt2")
    with pytest.raises(ValueError, match="valid choices"):
        hf_models.sparse_model_class("marian", "classification")


@pytest.mark.skipif(not HAS_CONTINUOUS, reason="the continuous variants are not registered in plugin yet")
@pytest.mark.parametrize("spec", ["continuous_softmax", "continuous_sparsemax", "sparsemax+continuous_softmax"])
def test_continuous_cross_attention(spec, tmp_path):
    if spec.split("+")[-1] not in plugin.variants():
        pytest.skip(f"{spec} is not registered in plugin")
    model = sparse_model("bart", encoder_attn="sparsemax", cross_attn=spec)
    with plugin.record_calls() as calls:
        output_of(model, model_inputs("bart"))
    assert {c.spec for c in calls if c.role == "cross"} == {plugin.canonical_spec(spec)}
    assert_padding_invariant(model, "bart")
    model.float()
    ids, mask = token_batch((7, 4), seed=2)
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "num_beams": 2, "eos_token_id": EOS}
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        assert torch.equal(cached, model.generate(ids, use_cache=False, **kwargs))
    model.save_pretrained(tmp_path / "continuous")
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "continuous").eval()
    batch = model_inputs("bart")
    torch.testing.assert_close(output_of(loaded, batch), output_of(model, batch), rtol=0, atol=0)
