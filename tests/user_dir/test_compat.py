"""Canaries: every part of fairseq that user_dir.compat relies on, checked against the installed version.

An upgrade of fairseq that moves, renames or changes one of them fails here, in a test named
for it, rather than inside training or generation.
"""

from __future__ import annotations

import argparse
import inspect

import pytest
import torch

import user_dir  # noqa: F401  (the registrations and the checkpoint loader wrapping)
from user_dir import compat
from user_dir.checkpoint_globals import allow_fairseq_checkpoint_globals
from user_dir.models.sparse_transformer import (
    SparseTransformerDecoder,
    SparseTransformerEncoder,
    sparse_transformer_tiny,
)
from user_dir.modules import PluggableMultiheadAttention

E, H = 16, 4


def _cfg(*, checkpoint_activations: bool = False):
    args = argparse.Namespace(encoder_attn="sparsemax", checkpoint_activations=checkpoint_activations)
    sparse_transformer_tiny(args)
    return compat.transformer_config(args)


def _signature(function) -> list[str]:
    return list(inspect.signature(function).parameters)


def test_transformer_config_keeps_the_attention_flags_and_has_the_fields_the_layers_read():
    cfg = _cfg()
    assert cfg.encoder_attn == "sparsemax", "TransformerConfig.from_namespace drops unknown namespace entries"
    for name in ("checkpoint_activations", "offload_activations", "min_params_to_wrap", "attention_dropout",
                 "cross_self_attention", "no_cross_attention"):
        assert hasattr(cfg, name), f"TransformerConfig.{name} is gone"
    for side in ("encoder", "decoder"):
        part = getattr(cfg, side)
        for name in ("attention_heads", "embed_dim", "xformers_att_config"):
            assert hasattr(part, name), f"TransformerConfig.{side}.{name} is gone"
        assert compat.xformers_config(cfg, side) is None


def test_wrap_layer_leaves_a_layer_alone_without_checkpointing_or_fsdp():
    layer = torch.nn.Linear(2, 2)
    assert compat.wrap_layer(layer, _cfg()) is layer


def test_wrap_layer_checkpoints_activations_as_fairseq_does():
    layer = torch.nn.Linear(2, 2)
    wrapped = compat.wrap_layer(layer, _cfg(checkpoint_activations=True))
    assert hasattr(wrapped, "precheckpoint_forward"), "fairseq's checkpoint_wrapper no longer patches forward"
    x = torch.randn(3, 2, requires_grad=True)
    assert torch.equal(wrapped(x), wrapped.precheckpoint_forward(x))


def test_layer_hooks_build_pluggable_attention_in_every_role():
    cfg = _cfg()
    from fairseq.data import Dictionary

    dictionary = Dictionary()
    embed = torch.nn.Embedding(len(dictionary), cfg.encoder.embed_dim, padding_idx=dictionary.pad())
    encoder = SparseTransformerEncoder(cfg, dictionary, embed, attention_spec="sparsemax")
    decoder = SparseTransformerDecoder(cfg, dictionary, embed, self_attention_spec="entmax15",
                                       cross_attention_spec="fusedmax:lam=0.5")
    assert [layer.self_attn.spec for layer in encoder.layers] == ["sparsemax"] * cfg.encoder.layers
    assert {(layer.self_attn.spec, layer.encoder_attn.spec) for layer in decoder.layers} == {
        ("entmax15", "fusedmax:lam=0.5")
    }, "TransformerDecoderLayerBase no longer builds attention through build_self_attention/build_encoder_attention"
    for layer in [*encoder.layers, *decoder.layers]:
        assert isinstance(layer.self_attn, PluggableMultiheadAttention)
        assert set(compat.quant_noise_args(layer)) == {"q_noise", "qn_block_size"}
    assert encoder.dropout_module.module_name == "TransformerEncoder"
    assert encoder.layers[0].dropout_module.module_name == "TransformerEncoderLayerBase"
    assert decoder.layers[0].activation_dropout_module.module_name == "TransformerDecoderLayerBase"


def test_hook_signatures_are_those_the_layers_override():
    from fairseq.models.transformer import TransformerDecoderBase, TransformerEncoderBase
    from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase

    assert _signature(TransformerEncoderLayerBase.build_self_attention) == ["self", "embed_dim", "cfg"]
    assert _signature(TransformerDecoderLayerBase.build_self_attention) == [
        "self", "embed_dim", "cfg", "add_bias_kv", "add_zero_attn"]
    assert _signature(TransformerDecoderLayerBase.build_encoder_attention) == ["self", "embed_dim", "cfg"]
    assert _signature(TransformerEncoderBase.build_encoder_layer) == ["self", "cfg"]
    assert _signature(TransformerDecoderBase.build_decoder_layer) == ["self", "cfg", "no_encoder_attn"]


def test_named_dropouts_are_what_retain_dropout_modules_matches():
    from fairseq.modules.fairseq_dropout import FairseqDropout

    holder = torch.nn.Module()
    holder.dropout_module = FairseqDropout(0.1)
    compat.name_dropouts(holder, "TransformerEncoderLayerBase")
    holder.dropout_module.make_generation_fast_("x", retain_dropout=True,
                                                retain_dropout_modules=["TransformerEncoderLayerBase"])
    assert holder.dropout_module.apply_during_inference, "FairseqDropout no longer matches module_name"


def test_attention_dropout_p_follows_training_and_retained_dropout():
    attention = PluggableMultiheadAttention(E, H, dropout=0.25, self_attention=True)
    assert compat.attention_dropout_p(attention.train()) == 0.25
    assert compat.attention_dropout_p(attention.eval()) == 0.0
    attention.dropout_module.apply_during_inference = True
    assert compat.attention_dropout_p(attention) == 0.25


def test_private_multihead_attention_helpers_have_the_signatures_used():
    from fairseq.modules.multihead_attention import MultiheadAttention

    expected = {
        "_get_input_buffer": ["self", "incremental_state"],
        "_set_input_buffer": ["self", "incremental_state", "buffer"],
        "_add_bias": ["self", "k", "v", "key_padding_mask", "attn_mask", "bsz"],
        "_append_zero_attn": ["self", "k", "v", "key_padding_mask", "attn_mask"],
        "_append_prev_key_padding_mask": ["key_padding_mask", "prev_key_padding_mask", "batch_size", "src_len",
                                          "static_kv"],
    }
    for name, params in expected.items():
        method = getattr(MultiheadAttention, name, None)
        assert method is not None, f"fairseq's MultiheadAttention.{name} is gone"
        assert _signature(method) == params, f"MultiheadAttention.{name}{_signature(method)} changed"
    attention = PluggableMultiheadAttention(E, H, self_attention=True)
    for name in ("skip_embed_dim_check", "beam_size", "scaling", "head_dim", "bias_k", "add_zero_attn"):
        assert hasattr(attention, name), f"MultiheadAttention.{name} is gone"
    for name in ("get_incremental_state", "set_incremental_state", "set_beam_size", "upgrade_state_dict_named"):
        assert callable(getattr(attention, name, None)), f"MultiheadAttention.{name} is gone"


def test_input_buffer_round_trips_through_the_incremental_state():
    attention = PluggableMultiheadAttention(E, H, self_attention=True)
    state: compat.IncrementalState = {}
    assert compat.input_buffer(attention, state) == {}
    key = torch.randn(2, H, 3, E // H)
    compat.set_input_buffer(attention, state, {"prev_key": key})
    assert compat.input_buffer(attention, state)["prev_key"] is key
    other = PluggableMultiheadAttention(E, H, self_attention=True)
    assert compat.input_buffer(other, state) == {}, "the buffer is no longer keyed by module instance"


def test_append_prev_key_padding_mask_concatenates_or_keeps_the_cached_mask():
    prev = torch.tensor([[False, True]])
    new = torch.tensor([[True]])
    joined = compat.append_prev_key_padding_mask(new, prev, batch_size=1, src_len=3, static_kv=False)
    assert joined is not None and joined.tolist() == [[False, True, True]]
    kept = compat.append_prev_key_padding_mask(new, prev, batch_size=1, src_len=2, static_kv=True)
    assert kept is not None and kept.tolist() == [[False, True]]


def test_add_bias_kv_and_append_zero_attn_add_one_key():
    attention = PluggableMultiheadAttention(E, H, self_attention=True, add_bias_kv=True, add_zero_attn=True)
    S, B = 3, 2
    k, v = torch.randn(S, B, E), torch.randn(S, B, E)
    padding = torch.zeros(B, S, dtype=torch.bool)
    k2, v2, padding2, _ = compat.add_bias_kv(attention, k, v, padding, None, B)
    assert k2.shape == v2.shape == (S + 1, B, E) and torch.equal(k2[-1], attention.bias_k[0].expand(B, E))
    assert padding2 is not None and padding2.shape == (B, S + 1)
    k4, v4 = torch.randn(B, H, S, E // H), torch.randn(B, H, S, E // H)
    k5, v5, padding5, _ = compat.append_zero_attn(attention, k4, v4, padding, None)
    assert k5.shape == (B, H, S + 1, E // H) and not k5[:, :, -1].any() and not v5[:, :, -1].any()
    assert padding5 is not None and padding5.shape == (B, S + 1)


def test_fairseq_loaders_look_up_load_checkpoint_to_cpu_at_each_call():
    from fairseq import checkpoint_utils
    from fairseq.trainer import Trainer

    loader = checkpoint_utils.load_model_ensemble_and_task
    assert loader.__globals__ is vars(checkpoint_utils)
    assert "load_checkpoint_to_cpu" in loader.__code__.co_names, (
        "load_model_ensemble_and_task no longer calls checkpoint_utils.load_checkpoint_to_cpu"
    )
    assert "checkpoint_utils" in Trainer.load_checkpoint.__code__.co_names
    assert checkpoint_utils.load_checkpoint_to_cpu.runs_first is allow_fairseq_checkpoint_globals
    assert _signature(checkpoint_utils.load_checkpoint_to_cpu) == ["path", "arg_overrides", "load_on_all_ranks"]


def test_run_before_checkpoint_loads_wraps_once():
    from fairseq import checkpoint_utils

    wrapped = checkpoint_utils.load_checkpoint_to_cpu
    compat.run_before_checkpoint_loads(allow_fairseq_checkpoint_globals)
    assert checkpoint_utils.load_checkpoint_to_cpu is wrapped


def test_run_before_checkpoint_loads_runs_the_function_first(tmp_path, monkeypatch):
    from fairseq import checkpoint_utils

    calls = []
    monkeypatch.setattr(checkpoint_utils, "load_checkpoint_to_cpu", lambda path, *a, **k: calls.append(("load", path)))
    compat.run_before_checkpoint_loads(lambda: calls.append(("prepare", None)))
    checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "x.pt"))
    assert calls == [("prepare", None), ("load", str(tmp_path / "x.pt"))]


@pytest.mark.parametrize(
    "name", ["set_decoder_beam_size", "forward_encoder", "reorder_encoder_out", "forward_decoder",
             "reorder_incremental_state", "max_decoder_positions"],
)
def test_ensemble_model_has_what_the_beam_search_calls(name):
    model = compat.ensemble([torch.nn.Linear(2, 2)])
    assert callable(getattr(model, name, None)), f"fairseq's EnsembleModel.{name} is gone"
    assert model.models_size == 1
