"""hf_models.sparsify: per-module mechanisms, learned alpha and schedules for any AttentionInterface model."""

from __future__ import annotations

import json

import entmax
import pytest
import torch
from transformers import (
    AttentionInterface,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    Trainer,
    TrainingArguments,
)
from transformers.masking_utils import AttentionMaskInterface, eager_mask

import hf_models
import plugin

from .tiny import STOCK, config_kwargs, model_inputs, output_of, stock_model, token_batch

LEARNED = "entmax:alpha=learned"


def _names(model):
    return sorted(name for name, _, _ in hf_models.attention_modules(model))


def _alphas(model):
    return {name: mech.normalizer.learned.weight.detach().clone()
            for name, mech in hf_models.attention_mechanisms(model).items()
            if getattr(mech.normalizer, "learned", None) is not None}


def _perturb_alphas(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mech in hf_models.attention_mechanisms(model).values():
            if getattr(mech.normalizer, "learned", None) is not None:
                weight = mech.normalizer.learned.weight
                weight.add_(torch.randn(weight.shape, generator=g))


# ----------------------------------------------------------------------------- a reference computed elsewhere


def _entmax15_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager attention with the entmax package's entmax15: additive eager mask, grouped-query heads repeated."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = (query @ key.transpose(-1, -2)) * scale
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    weights = entmax.entmax15(scores.double(), dim=-1).to(query.dtype)
    return (weights @ value).transpose(1, 2).contiguous(), None


AttentionInterface.register("test_entmax15_package", _entmax15_reference)
AttentionMaskInterface.register("test_entmax15_package", eager_mask)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_softmax_equals_stock_sdpa_and_runs_in_every_module(family):
    stock = stock_model(family, "sdpa")
    ours = hf_models.sparsify(stock_model(family, "sdpa"), "softmax")
    assert ours.config._attn_implementation == hf_models.PER_MODULE
    batch = model_inputs(family)
    with plugin.record_calls() as calls:
        out = output_of(ours, batch)
    assert len(calls) == len(_names(ours)) == 2
    assert {c.spec for c in calls} == {"softmax"}
    torch.testing.assert_close(out, output_of(stock, batch), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_entmax15_equals_the_entmax_package_and_learned_alpha_starts_there(family):
    reference = stock_model(family, "test_entmax15_package").double()
    fixed = hf_models.sparsify(stock_model(family, "sdpa").double(), "entmax:alpha=1.5")
    learned = hf_models.sparsify(stock_model(family, "sdpa").double(), LEARNED)
    batch = model_inputs(family)

    def real(model):  # the padded positions of a decoder (left padding) attend to nothing: left out
        out = output_of(model, batch)
        return out if family == "bert" else out[batch["attention_mask"].bool()]

    expected = real(reference)
    torch.testing.assert_close(real(fixed), expected, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(real(learned), expected, atol=1e-9, rtol=1e-7)
    assert not torch.allclose(real(stock_model(family, "sdpa").double()), expected, atol=1e-3)


def test_roles_of_a_stock_seq2seq_model_take_the_specs_of_a_dict():
    model = hf_models.sparsify(stock_model("bart", "sdpa"), {"decoder": "sparsemax", "cross": LEARNED})
    with plugin.record_calls() as calls:
        output_of(model, model_inputs("bart"))
    assert {(c.role, c.spec) for c in calls} == {("encoder", "softmax"), ("decoder", "sparsemax"), ("cross", LEARNED)}
    assert model.config.sparse_attention == {"spec": {"decoder": "sparsemax", "cross": LEARNED}, "schedule": None}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_learned_alpha_gets_gradients_and_moves_in_training(family):
    model = hf_models.sparsify(stock_model(family, "sdpa"), LEARNED).train()
    batch = model_inputs(family)
    labels = torch.tensor([0, 2]) if family == "bert" else batch["input_ids"]
    before = _alphas(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    with plugin.record_calls() as calls:
        for _ in range(3):
            loss = model(**batch, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            for name, mech in hf_models.attention_mechanisms(model).items():
                grad = mech.normalizer.learned.weight.grad
                assert grad is not None and grad.abs().max() > 0, name  # a head all one-hot has none
            optimizer.step()
    assert {c.role for c in calls if c.training} == {"encoder" if family == "bert" else "decoder"}
    assert len([c for c in calls if c.training]) == 3 * len(before)
    for name, weight in _alphas(model).items():
        assert (weight - before[name]).abs().max() > 1e-2, name


@pytest.mark.parametrize(
    "family, auto_classes",
    [("bert", (AutoModelForSequenceClassification, AutoModel)), ("llama", (AutoModelForCausalLM, AutoModel))],
)
def test_save_and_load_restore_mechanisms_learned_alphas_and_the_schedule_step(family, auto_classes, tmp_path):
    model = hf_models.sparsify(stock_model(family, "sdpa"), LEARNED, schedule="linear:start=1,end=1.3,steps=4")
    _perturb_alphas(model)
    hf_models.set_schedule_step(model, 2)  # alpha = 1.15 for every head, the learned alphas wait
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["sparse_attention"] == {"spec": LEARNED, "schedule": "linear:param=alpha,start=1,end=1.3,steps=4"}
    batch = model_inputs(family)
    for auto in auto_classes:
        loaded = auto.from_pretrained(tmp_path)
        prefix = "" if auto is not AutoModel else ("bert." if family == "bert" else "model.")
        mechanisms = hf_models.attention_mechanisms(loaded)
        assert sorted(prefix + name for name in mechanisms) == _names(model)
        for name, weight in _alphas(loaded).items():
            assert torch.equal(weight, _alphas(model)[prefix + name]), name
        assert {m.schedule_step_value for m in mechanisms.values()} == {2}
        assert {m.current_spec() for m in mechanisms.values()} == {"entmax:alpha=1.15"}
        if auto is not AutoModel:
            torch.testing.assert_close(output_of(loaded, batch), output_of(model.eval(), batch), atol=0, rtol=0)
            hf_models.set_schedule_step(loaded, 4)  # the learned alphas take over, as saved
            hf_models.set_schedule_step(model, 4)
            torch.testing.assert_close(output_of(loaded, batch), output_of(model, batch), atol=0, rtol=0)
            hf_models.set_schedule_step(model, 2)


def test_a_stock_checkpoint_loads_exactly_as_before(tmp_path):
    stock = stock_model("bert", "sdpa")
    stock.save_pretrained(tmp_path)
    assert "sparse_attention" not in json.loads((tmp_path / "config.json").read_text())
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert loaded.config._attn_implementation == "sdpa"
    assert hf_models.attention_mechanisms(loaded) == {}
    batch = model_inputs("bert")
    with plugin.record_calls() as calls:
        torch.testing.assert_close(output_of(loaded, batch), output_of(stock, batch), atol=0, rtol=0)
    assert calls == []


def test_attn_implementation_with_a_learned_spec_sparsifies(tmp_path):
    stock_model("llama", "sdpa").save_pretrained(tmp_path / "stock")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "stock", attn_implementation=LEARNED)
    assert model.config.sparse_attention == {"spec": LEARNED, "schedule": None}
    values = hf_models.attention_parameter_values(model)
    assert sorted(values) == _names(model) and all(v == [1.5] * 4 for v in values.values())
    config_class, model_class = STOCK["bert"]
    built = model_class(config_class(**config_kwargs("bert"), attn_implementation=LEARNED))
    assert sorted(hf_models.attention_mechanisms(built)) == _names(built)
    switched = stock_model("bert", "sdpa")
    switched.set_attn_implementation(LEARNED)
    assert sorted(hf_models.attention_mechanisms(switched)) == _names(switched)
    with plugin.record_calls() as calls:
        output_of(switched, model_inputs("bert"))
    assert [c.spec for c in calls] == [LEARNED, LEARNED]


def test_generation_with_the_kv_cache_runs_the_mechanisms_and_matches_uncached(tmp_path):
    model = hf_models.sparsify(stock_model("llama", "sdpa"), LEARNED)
    _perturb_alphas(model, seed=3)
    model.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids, mask = token_batch((5, 3))
    ids, mask = ids[:, :3], mask[:, :3]
    with plugin.record_calls() as calls:
        cached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                pad_token_id=1)
    uncached = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                              pad_token_id=1, use_cache=False)
    assert torch.equal(cached, uncached)
    assert {c.spec for c in calls} == {LEARNED} and {c.role for c in calls} == {"decoder"}
    assert len(calls) == 6 * 2  # every step, both layers


def test_a_schedule_moves_alpha_with_set_schedule_step_and_the_trainer_callback(tmp_path):
    model = hf_models.sparsify(stock_model("bert", "sdpa"), "entmax:alpha=2", schedule="linear:start=1,steps=4")
    assert set(map(tuple, hf_models.attention_parameter_values(model).values())) == {(1.0, 1.0)}
    assert hf_models.set_schedule_step(model, 2) == 2
    assert set(map(tuple, hf_models.attention_parameter_values(model).values())) == {(1.5, 1.5)}
    hf_models.set_schedule_step(model, 0)

    ids, mask = token_batch(tuple(4 + i % 3 for i in range(16)), seed=1)
    data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": torch.tensor(i % 3)} for i in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )
    with plugin.record_calls() as calls:
        Trainer(model=model.train(), args=args, train_dataset=data,
                callbacks=[hf_models.AttentionScheduleCallback()]).train()
    training = [c.spec for c in calls if c.training]
    assert training == [s for s in ("entmax:alpha=1", "entmax:alpha=1.25", "entmax:alpha=1.5", "entmax:alpha=1.75",
                                    "entmax:alpha=2") for _ in range(2)]
    hf_models.finish_schedules(model)
    assert set(map(tuple, hf_models.attention_parameter_values(model).values())) == {(2.0, 2.0)}


def test_mechanisms_follow_the_module_dtype_and_the_sparse_classes_are_listed_too():
    model = hf_models.sparsify(stock_model("llama", "sdpa").to(torch.bfloat16), LEARNED)
    assert {m.normalizer.learned.weight.dtype for m in hf_models.attention_mechanisms(model).values()} == {
        torch.bfloat16}
    sparse = hf_models.SparseBartForConditionalGeneration(hf_models.SparseBartConfig(**config_kwargs("bart")))
    assert hf_models.attention_mechanisms(sparse) == sparse.attention_mechanisms()
    hf_models.sparsify(sparse, {"cross": LEARNED})
    assert sparse.config.cross_attn == LEARNED and sparse.config.encoder_attn == "softmax"


@pytest.mark.parametrize(
    "spec, schedule, words",
    [
        ("nosuchmax", None, ["spec", "nosuchmax", "valid"]),
        ("entmax:alpha=3", None, ["spec", "alpha", "[1, 2]"]),
        ({"encoderr": "sparsemax"}, None, ["spec", "encoderr", "encoder, decoder, cross"]),
        ({"cross": "sparsemax"}, None, ["cross", "valid choices for this model: encoder"]),
        (3, None, ["spec", "string or a dict"]),
        ("entmax15", "linear:start=1,steps=4", ["schedule", "valid choices: (none)"]),
        ("entmax:alpha=2", "linear:start=1,end=1.5,steps=4", ["schedule", "end=1.5"]),
        ("entmax:alpha=2", "sigmoid:start=1,steps=4", ["schedule", "linear, cosine, step"]),
        ({"encoder": "sparsemax"}, {"decoder": "linear:start=1,steps=4"}, ["schedule", "decoder"]),
    ],
)
def test_bad_arguments_raise_naming_the_argument_and_the_valid_choices(spec, schedule, words):
    model = stock_model("bert", "sdpa")
    with pytest.raises(ValueError) as err:
        hf_models.sparsify(model, spec, schedule=schedule)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    assert model.config._attn_implementation == "sdpa" and hf_models.attention_mechanisms(model) == {}


def test_models_without_the_interface_and_conflicting_requests_raise(tmp_path):
    from transformers import OpenAIGPTConfig, OpenAIGPTModel

    with pytest.raises(ValueError, match="does not route its attention"):
        hf_models.sparsify(OpenAIGPTModel(OpenAIGPTConfig(vocab_size=40, n_embd=16, n_layer=1, n_head=2)), LEARNED)
    with pytest.raises(ValueError, match="does not route its attention"):
        OpenAIGPTModel(OpenAIGPTConfig(vocab_size=40, n_embd=16, n_layer=1, n_head=2, attn_implementation=LEARNED))
    hf_models.sparsify(stock_model("bert", "sdpa"), LEARNED).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="sparse_attention"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path, attn_implementation="sdpa")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"sparse_attention": "entmax"}))
    with pytest.raises(ValueError, match="sparse_attention"):
        AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_seq2seq_stock_checkpoint_round_trip_through_the_auto_class(tmp_path):
    model = hf_models.sparsify(stock_model("t5", "sdpa"), {"encoder": LEARNED, "cross": "sparsemax"})
    _perturb_alphas(model, seed=5)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    for name, weight in _alphas(model).items():
        assert torch.equal(_alphas(loaded)[name], weight)
    batch = model_inputs("t5")
    torch.testing.assert_close(output_of(loaded, batch), output_of(model.eval(), batch), atol=0, rtol=0)


def test_modernbert_with_local_attention_layers(tmp_path):
    """ModernBERT alternates global and sliding-window layers: their masks reach the mechanisms."""
    from transformers import ModernBertConfig, ModernBertForSequenceClassification

    kwargs = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                  max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, cls_token_id=0,
                  sep_token_id=2, local_attention=4, global_attn_every_n_layers=2, initializer_range=0.5,
                  num_labels=3, attention_dropout=0.0, embedding_dropout=0.0, mlp_dropout=0.0)
    torch.manual_seed(0)
    stock = ModernBertForSequenceClassification(ModernBertConfig(**kwargs, attn_implementation="sdpa")).eval()
    ours = ModernBertForSequenceClassification(ModernBertConfig(**kwargs, attn_implementation="sdpa")).eval()
    ours.load_state_dict(stock.state_dict())
    ids, mask = token_batch((12, 7))
    batch = {"input_ids": ids, "attention_mask": mask}
    with plugin.record_calls() as calls:
        out = output_of(hf_models.sparsify(ours, "softmax"), batch)
    assert len(calls) == 3
    torch.testing.assert_close(out, output_of(stock, batch), atol=1e-6, rtol=1e-6)
    hf_models.sparsify(ours, LEARNED, schedule="cosine:start=1,steps=10")
    hf_models.set_schedule_step(ours, 3)
    ours.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert hf_models.schedule_state(loaded) == hf_models.schedule_state(ours)
    torch.testing.assert_close(output_of(loaded, batch), output_of(ours, batch), atol=0, rtol=0)


def test_parameter_values_report_learned_length_parameters():
    model = hf_models.sparsify(stock_model("bert", "sdpa"), "scalable_entmax:alpha=learned,beta=learned,gamma=learned")
    heads = next(iter(hf_models.attention_mechanisms(model).values())).num_heads
    betas = [0.25 * (h + 1) for h in range(heads)]
    for mech in hf_models.attention_mechanisms(model).values():
        with torch.no_grad():
            mech.normalizer.beta.weight.copy_(torch.tensor(betas))
    values = hf_models.attention_parameter_values(model)
    names = _names(model)
    assert sorted(values) == sorted([n for n in names] + [f"{n}.beta" for n in names] + [f"{n}.gamma" for n in names])
    for n in names:
        assert values[n] == [1.5] * heads
        assert values[f"{n}.beta"] == betas
        assert values[f"{n}.gamma"] == [0.0] * heads
    softmax = hf_models.sparsify(stock_model("bert", "sdpa"), "scalable_softmax:s=learned")
    assert sorted(hf_models.attention_parameter_values(softmax)) == [f"{n}.s" for n in _names(softmax)]
