"""Canaries: every part of transformers that hf_models.compat relies on, checked against the installed version.

An upgrade of transformers that moves, renames or changes one of them fails here, in a test
named for it, rather than inside a forward pass.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from transformers import PreTrainedModel

import hf_models
import plugin
from hf_models import compat

from .tiny import SEQ2SEQ, STOCK, config_kwargs, model_inputs, stock_model


def test_attention_and_mask_registries_take_a_name_and_a_function():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for registry in (AttentionInterface, AttentionMaskInterface):
        assert callable(getattr(registry, "register", None)), f"{registry.__name__}.register is gone"
    assert "sparsemax" in AttentionInterface._global_mapping, "AttentionInterface.register no longer registers globally"
    assert "sparsemax" in AttentionMaskInterface._global_mapping, "AttentionMaskInterface lost the registration"


def test_all_attention_functions_lists_and_contains_the_registered_names():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert "sparsemax" in ALL_ATTENTION_FUNCTIONS.valid_keys()
    assert compat.is_registered_attention_name("sparsemax")
    assert compat.is_registered_attention_name("eager")
    assert compat.is_registered_attention_name("sdpa")
    assert not compat.is_registered_attention_name("no_such_attention")
    assert {"eager", "sdpa", "sparsemax"} <= set(compat.attention_names())


def test_sdpa_mask_gives_a_boolean_mask_with_padding_and_none_without():
    from transformers.masking_utils import sdpa_mask

    params = inspect.signature(sdpa_mask).parameters
    for name in ("batch_size", "q_length", "kv_length", "attention_mask"):
        assert name in params, f"transformers.masking_utils.sdpa_mask lost its argument {name!r}"
    padding = torch.tensor([[True, True, False]])
    mask = compat.boolean_mask(batch_size=1, q_length=3, kv_length=3, attention_mask=padding,
                               allow_is_causal_skip=False)
    assert mask is not None and mask.dtype == torch.bool and mask.shape == (1, 1, 3, 3)
    assert not bool(mask[..., 2].any()) and bool(mask[0, 0, 2, 0])  # padding masked, causal by default


def test_config_attn_implementation_is_the_private_attribute_every_attention_module_reads():
    config = STOCK["bart"][0](**config_kwargs("bart"))
    assert hasattr(config, "_attn_implementation"), "PretrainedConfig._attn_implementation is gone"
    compat.set_attn_implementation(config, "sparsemax")
    assert compat.attn_implementation(config) == "sparsemax"
    assert "_attn_implementation" not in config.to_dict(), "config.json now writes _attn_implementation"
    assert compat.attn_implementation(object()) is None


def test_can_set_attn_implementation_tells_interface_users_apart():
    assert hasattr(PreTrainedModel, "_can_set_attn_implementation"), (
        "PreTrainedModel._can_set_attn_implementation is gone: hf_models cannot tell which model classes honour "
        "attn_implementation"
    )
    for family in SEQ2SEQ:
        assert compat.routes_attention_through_interface(STOCK[family][1]), family
    assert not compat.routes_attention_through_interface(type("NotAModel", (), {}))


def test_get_correct_attn_implementation_has_the_signature_the_wrapper_takes():
    params = list(inspect.signature(compat.stock_implementation_check).parameters)
    stock = list(inspect.signature(compat._STOCK_IMPLEMENTATION_CHECK).parameters)
    assert stock == ["self", "requested_attention", "is_init_check"], (
        f"PreTrainedModel.get_correct_attn_implementation{stock} changed its signature"
    )
    assert len(params) == len(stock)
    # installed by hf_models, and it is what construction and set_attn_implementation call
    assert PreTrainedModel.get_correct_attn_implementation is hf_models.attention._get_correct_attn_implementation
    model = stock_model("bart")
    model.set_attn_implementation("entmax:alpha=1.25")
    assert model.config.attention_spec == "entmax:alpha=1.25", "set_attn_implementation no longer goes through it"


def test_the_stock_check_refuses_an_unregistered_name():
    model = stock_model("bart")
    with pytest.raises(ValueError):
        compat.stock_implementation_check(model, "not_registered_anywhere")
    assert compat.stock_implementation_check(model, "eager") == "eager"


def test_initialization_copy_skips_tensors_loaded_from_a_checkpoint():
    from transformers import initialization

    fresh, loaded = torch.zeros(3), torch.zeros(3)
    loaded._is_hf_initialized = True
    assert callable(initialization.copy_)
    compat.copy_unless_loaded(fresh, torch.ones(3))
    compat.copy_unless_loaded(loaded, torch.ones(3))
    assert fresh.tolist() == [1.0, 1.0, 1.0]
    assert loaded.tolist() == [0.0, 0.0, 0.0], "transformers.initialization.copy_ now overwrites loaded tensors"


def test_output_collector_is_a_context_variable_that_names_attentions_while_recording():
    from transformers.utils import output_capturing

    collector = getattr(output_capturing, "_active_collector", None)
    assert collector is not None, "transformers.utils.output_capturing._active_collector is gone"
    assert not compat.collecting_attentions()
    seen = []

    def probe(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        seen.append(compat.collecting_attentions())
        weights = torch.softmax((query @ key.transpose(-1, -2)) * scaling, dim=-1)  # (the values do not matter)
        return (weights @ value).transpose(1, 2).contiguous(), weights

    compat.register_attention("compat_probe", probe, hf_models.sparse_attention_mask)
    model = stock_model("gpt2", attn_implementation="compat_probe")
    ids = torch.tensor([[3, 4, 5]])
    model(input_ids=ids, output_attentions=True)  # GPT-2 consumes the flag: its attention function sees no kwarg
    assert seen and all(seen), "output_attentions=True no longer shows in the output collector"
    seen.clear()
    model(input_ids=ids)
    assert seen and not any(seen)


@pytest.mark.parametrize("family", SEQ2SEQ)
def test_attention_modules_carry_the_role_attributes_and_head_counts(family):
    attention_class = compat.ATTENTION_MODULE_CLASSES[family]
    model = stock_model(family)
    roles = {}
    for name, module in model.named_modules():
        if isinstance(module, attention_class):
            roles.setdefault(compat.attention_role(module), []).append(name)
            assert compat.attention_heads(module) == 2
    assert set(roles) == {"encoder", "decoder", "cross"}, f"{attention_class.__name__}: is_causal / is_decoder moved"
    assert all("encoder" in n for n in roles["encoder"])
    assert all("EncDecAttention" in n or "encoder_attn" in n for n in roles["cross"])


def test_attention_heads_names_the_module_without_a_head_count():
    with pytest.raises(ValueError, match="Linear"):
        compat.attention_heads(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("family", ["marian", "pegasus"])
def test_sinusoidal_position_tables_are_found_by_their_class_name(family):
    model = stock_model(family)
    tables = [m for m in model.modules() if compat.is_fixed_position_table(m)]
    assert len(tables) == 2, f"no *SinusoidalPositionalEmbedding modules in {type(model).__name__} any more"
    assert all(isinstance(getattr(m, "weight", None), torch.nn.Parameter) for m in tables)


def test_configs_are_dataclasses_and_take_the_mixin_fields():
    for classes in hf_models.SPARSE_FAMILIES.values():
        config_class = classes["config"]
        assert dataclasses.is_dataclass(config_class), f"{config_class.__name__} is no longer a dataclass"
        names = {f.name for f in dataclasses.fields(config_class)}
        assert set(hf_models.SPEC_FIELDS) | set(hf_models.SCHEDULE_FIELDS) <= names


def test_the_per_module_name_reaches_the_mechanism_of_each_attention_module():
    model = hf_models.SparseBartForConditionalGeneration(
        hf_models.SparseBartConfig(**config_kwargs("bart"), cross_attn="sparsemax")
    ).eval()
    assert compat.attn_implementation(model.config) == hf_models.PER_MODULE
    with torch.no_grad(), plugin.record_calls() as calls:
        model(**model_inputs("bart"))
    assert {c.role for c in calls} == {"encoder", "decoder", "cross"}


def test_attention_modules_are_found_by_their_call_of_the_interface():
    from transformers.models.bert.modeling_bert import BertAttention, BertSelfAttention
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaForCausalLM

    assert compat.calls_attention_interface(BertSelfAttention), "BertSelfAttention no longer calls get_interface("
    assert compat.calls_attention_interface(LlamaAttention)
    assert not compat.calls_attention_interface(BertAttention)  # the wrapper around BertSelfAttention
    assert not compat.calls_attention_interface(LlamaForCausalLM)  # models (PreTrainedModel's source names it)
    assert not compat.calls_attention_interface(torch.nn.Linear)
    llama = stock_model("llama")
    found = [n for n, m in llama.named_modules() if compat.calls_attention_interface(type(m))]
    assert found == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    # Llama keeps the head count in its config only
    assert not hasattr(llama.model.layers[0].self_attn, "num_heads")
    assert compat.attention_heads(llama.model.layers[0].self_attn) == 4


def test_post_init_ends_construction_and_initialize_weights_runs_after_loading(tmp_path):
    events = []
    original = (PreTrainedModel.post_init, PreTrainedModel.initialize_weights)
    try:
        compat.install_model_hooks(lambda m: events.append(("post_init", type(m).__name__)),
                                   lambda m: events.append(("initialize_weights", all(
                                       p.device.type != "meta" for p in m.parameters()))))
        stock = stock_model("llama")
        assert ("post_init", "LlamaForCausalLM") == events[-1], "post_init no longer ends the model's __init__"
        stock.save_pretrained(tmp_path)
        events.clear()
        type(stock).from_pretrained(tmp_path)
        assert ("post_init", "LlamaForCausalLM") in events
        assert events[-1] == ("initialize_weights", True), "from_pretrained no longer initializes after loading"
    finally:
        PreTrainedModel.post_init, PreTrainedModel.initialize_weights = original
    hf_models.install_hooks()  # idempotent: the installed hooks stay
    assert (PreTrainedModel.post_init, PreTrainedModel.initialize_weights) == original
