"""The attn_implementation route: any family that uses transformers' AttentionInterface runs any variant by name."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
)
from transformers.masking_utils import AttentionMaskInterface

import hf_models
import plugin

from .tiny import (
    DECODERS,
    ENCODERS,
    EOS,
    PAD,
    SEQ2SEQ,
    STOCK,
    assert_padding_invariant,
    config_kwargs,
    left_pad,
    model_inputs,
    output_of,
    stock_model,
    token_batch,
)

FAMILIES = SEQ2SEQ + ENCODERS + DECODERS
EXPECTED_ROLES = {f: {"encoder", "decoder", "cross"} for f in SEQ2SEQ} | {f: {"encoder"} for f in ENCODERS} | {
    f: {"decoder"} for f in DECODERS
}


def test_every_core_variant_is_registered_in_both_interfaces():
    for name in plugin.variants():
        if plugin.AttentionMechanism(name, num_heads=2).learnable:
            continue
        assert name in hf_models.registered_names()
        assert AttentionInterface._global_mapping[name] is hf_models.sparse_attention_forward
        # without a mask function transformers would pass attention_mask=None: padding attended
        assert AttentionMaskInterface._global_mapping[name] is hf_models.sparse_attention_mask


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_each_sequence_alone(family):
    assert_padding_invariant(stock_model(family, "sparsemax"), family)


@pytest.mark.parametrize("family", ["bart", "t5", "roberta", "llama"])
def test_padded_batch_equals_each_sequence_alone_with_entmax(family):
    assert_padding_invariant(stock_model(family, "entmax:alpha=1.3"), family)


@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_equals_stock_eager_and_sdpa(family):
    model = stock_model(family, "softmax")
    batch = model_inputs(family)
    # left-padded decoders: a pad query sees no key; we give it zeros, transformers a uniform row
    real = batch["attention_mask"].bool() if family in DECODERS else slice(None)
    ours = output_of(model, batch)[real]
    for stock in ("eager", "sdpa"):
        model.set_attn_implementation(stock)
        torch.testing.assert_close(ours, output_of(model, batch)[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_mechanism_runs_in_every_role(family):
    model = stock_model(family, "sparsemax")
    with plugin.record_calls() as calls:
        output_of(model, model_inputs(family))
    assert {c.role for c in calls} == EXPECTED_ROLES[family]
    assert {c.spec for c in calls} == {"sparsemax"}
    assert all(not c.training for c in calls)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_outputs_differ_from_softmax(family):
    model = stock_model(family, "sparsemax")
    batch = model_inputs(family)
    sparse = output_of(model, batch)
    model.set_attn_implementation("eager")
    assert (sparse - output_of(model, batch)).abs().max() > 1e-3


def _attention_tensors(out, family):
    if family in SEQ2SEQ:
        return {"encoder": out.encoder_attentions, "decoder": out.decoder_attentions, "cross": out.cross_attentions}
    return {"encoder" if family in ENCODERS else "decoder": out.attentions}


@pytest.mark.parametrize("family", FAMILIES)
def test_output_attentions_returns_the_sparse_weights(family):
    model = stock_model(family, "sparsemax")
    batch = model_inputs(family)
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    for role, weights in _attention_tensors(out, family).items():
        assert weights and all(w is not None for w in weights), role
        w = weights[0]
        # rows of real queries sum to one; a softmax would have no exact zeros among allowed keys
        target = batch.get("decoder_attention_mask", batch["attention_mask"])
        keys = batch["attention_mask"] if role in ("encoder", "cross") else target
        queries = batch["attention_mask"] if role == "encoder" else target
        allowed = keys[:, None, None, :].bool().expand_as(w).clone()
        if role == "decoder":
            allowed &= torch.ones(w.shape[-2], w.shape[-1], dtype=torch.bool).tril()
        real_rows = queries[:, None, :].bool().expand(w.shape[:3])
        torch.testing.assert_close(w.sum(-1)[real_rows], torch.ones(int(real_rows.sum())))
        assert (w[~allowed] == 0).all(), role
        assert (w[allowed & real_rows[..., None]] == 0).any(), f"{role}: no exact zeros among allowed keys"


def test_t5_position_bias_reaches_the_mechanism():
    model = stock_model("t5", "softmax")
    batch = model_inputs("t5")
    ours = output_of(model, batch)
    bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
    with torch.no_grad():
        bias.weight.add_(torch.randn_like(bias.weight) * 3)
    changed = output_of(model, batch)
    assert (ours - changed).abs().max() > 1e-3
    model.set_attn_implementation("eager")
    torch.testing.assert_close(changed, output_of(model, batch), atol=1e-4, rtol=1e-4)


def test_t5_scaling_one_is_honoured():
    # T5 does not scale scores (scaling=1.0); the default 1/sqrt(d_kv) would change the outputs
    model = stock_model("t5", "sparsemax")
    batch = model_inputs("t5")
    calls = []

    def spy(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        calls.append(scaling)
        return hf_models.sparse_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)

    import hf_models.attention as adapter

    AttentionInterface.register("sparsemax", spy)
    try:
        output_of(model, batch)
    finally:
        AttentionInterface.register("sparsemax", adapter.sparse_attention_forward)
    assert calls and set(calls) == {1.0}


def test_llama_grouped_query_attention_matches_eager():
    model = stock_model("llama", "softmax")
    attn = model.model.layers[0].self_attn
    assert attn.config.num_key_value_heads < attn.config.num_attention_heads
    batch = model_inputs("llama")
    real = batch["attention_mask"].bool()
    ours = output_of(model, batch)[real]
    model.set_attn_implementation("eager")
    torch.testing.assert_close(ours, output_of(model, batch)[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("num_beams", [1, 2])
def test_decoder_generation_with_cache_equals_without(family, num_beams):
    model = stock_model(family, "entmax:alpha=1.3")
    ids, mask = left_pad(*token_batch((6, 3), seed=3))
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "num_beams": num_beams,
              "pad_token_id": PAD, "eos_token_id": None}
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        recomputed = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)
    assert cached.shape[1] == ids.shape[1] + 6


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_seq2seq_generation_with_cache_equals_without(family):
    model = stock_model(family, "sparsemax")
    ids, mask = token_batch((6, 4), seed=5)
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "do_sample": False, "num_beams": 2, "eos_token_id": EOS}
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        assert torch.equal(cached, model.generate(ids, use_cache=False, **kwargs))


def test_from_pretrained_with_a_parameterized_spec(tmp_path):
    stock_model("roberta", "eager").save_pretrained(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="entmax:alpha=1.25").eval()
    assert model.config._attn_implementation == "entmax:alpha=1.25"
    with plugin.record_calls() as calls:
        output_of(model, model_inputs("roberta"))
    assert {c.spec for c in calls} == {"entmax:alpha=1.25"}


def test_register_spec_returns_the_canonical_name():
    assert hf_models.register_spec(" entmax : alpha = 1.30 ") == "entmax:alpha=1.3"
    assert "entmax:alpha=1.3" in hf_models.registered_names()


def test_learned_parameters_sparsify_the_model_instead_of_sharing_one_mechanism(tmp_path):
    stock_model("gpt2", "eager").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="entmax:alpha=learned")
    assert model.config._attn_implementation == hf_models.PER_MODULE
    mechanisms = hf_models.attention_mechanisms(model)
    assert len(mechanisms) == 2 and all(m.learnable for m in mechanisms.values())
    assert len({id(m) for m in mechanisms.values()}) == 2, "each module holds its own parameters"
    with pytest.raises(ValueError, match="hf_models.sparsify"):
        hf_models.register_spec("entmax:alpha=learned")


@pytest.mark.parametrize("name", ["nosuchmax", "entmax:alpha=3", "sparsemax:beta=1"])
def test_unknown_names_and_bad_specs_raise_a_clear_error(name):
    config_class, model_class = STOCK["bert"]
    with pytest.raises(ValueError, match="valid|expected"):
        model_class(config_class(**config_kwargs("bert"), attn_implementation=name))


def test_a_family_without_the_attention_interface_raises():
    from transformers import OpenAIGPTConfig, OpenAIGPTModel

    config = OpenAIGPTConfig(vocab_size=40, n_embd=16, n_layer=1, n_head=2, attn_implementation="sparsemax")
    with pytest.raises(ValueError, match="does not route its attention"):
        OpenAIGPTModel(config)
    assert not hf_models.supports_attention_interface(OpenAIGPTModel)
    assert all(hf_models.supports_attention_interface(STOCK[f][1]) for f in FAMILIES)


def test_names_transformers_reserves_are_refused():
    with pytest.raises(ValueError):
        hf_models.register_spec("sdpa")


def test_per_module_name_needs_the_sparse_classes():
    model = stock_model("bert", hf_models.PER_MODULE)
    with pytest.raises(ValueError, match="attention_mechanism"):
        output_of(model, model_inputs("bert"))


def test_training_dropout_and_gradients_reach_the_projections():
    config_class, model_class = STOCK["bert"]
    kwargs = config_kwargs("bert") | {"attention_probs_dropout_prob": 0.1}
    torch.manual_seed(0)
    model = model_class(config_class(**kwargs, attn_implementation="sparsemax")).train()
    batch = model_inputs("bert")
    with plugin.record_calls() as calls:
        loss = model(**batch, labels=torch.tensor([0, 2])).loss
    loss.backward()
    assert all(c.training for c in calls)
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["bert", "t5"])
def test_a_chosen_spec_is_written_to_config_json_and_reloaded(family, tmp_path):
    import json

    from transformers import AutoModel

    stock_model(family, "entmax:alpha=1.3").save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["attention_spec"] == "entmax:alpha=1.3"
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation == "entmax:alpha=1.3"
    assert {m.config._attn_implementation for m in reloaded.modules() if hasattr(m, "config")} == {"entmax:alpha=1.3"}
    explicit = AutoModel.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert explicit.config._attn_implementation == "sdpa" and explicit.config.attention_spec is None


@pytest.mark.parametrize("lengths", [(6,), (6, 3)])
def test_llama_static_cache_generation_equals_recomputing(lengths):
    model = stock_model("llama", "sparsemax")
    ids, mask = left_pad(*token_batch(lengths, seed=4))
    kwargs = {"attention_mask": mask, "max_new_tokens": 5, "do_sample": False, "pad_token_id": PAD,
              "eos_token_id": None}
    with torch.no_grad():
        static = model.generate(ids, cache_implementation="static", **kwargs)
        recomputed = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(static, recomputed)


def test_bfloat16_model_runs_and_stays_finite():
    model = stock_model("bert", "entmax15").to(torch.bfloat16)
    with torch.no_grad():
        logits = model(**model_inputs("bert")).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


@pytest.mark.skipif("continuous_sparsemax" not in plugin.variants(),
                    reason="the continuous variants are not registered in plugin yet")
def test_a_parameterized_continuous_spec_loads_on_demand(tmp_path):
    # registered while from_pretrained builds the model on the meta device
    from transformers import AutoModelForSeq2SeqLM

    stock_model("bart", "eager").save_pretrained(tmp_path)
    spec = "sparsemax+continuous_sparsemax:basis=32"
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path, attn_implementation=spec).eval()
    with plugin.record_calls() as calls:
        output_of(model, model_inputs("bart"))
    assert {c.spec for c in calls} == {spec} and {c.role for c in calls} == {"encoder", "decoder", "cross"}
    assert_padding_invariant(model, "bart")
