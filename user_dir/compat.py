"""Every private or version-fragile part of fairseq that the user directory relies on, in one place.

The user directory subclasses fairseq's transformer at its documented hooks, but a few places
reach further: ``MultiheadAttention``'s private cache and bias helpers, the layer wrapping
(activation checkpointing, FSDP) that fairseq's encoder and decoder apply in their own
``build_*_layer``, the attributes the layers read from the config, the dropout modules' names,
and the checkpoint loader that the allow-list wraps. Each lives here behind a small function
whose docstring names what it relies on; the other modules import them from here.
``tests/user_dir/test_compat.py`` checks each of them against the installed fairseq, so an
upgrade that moves one fails there, with a message naming it, and not deep inside training.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from fairseq import checkpoint_utils
from fairseq.distributed import fsdp_wrap
from fairseq.models.transformer import TransformerConfig
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.fairseq_dropout import FairseqDropout
from fairseq.modules.multihead_attention import MultiheadAttention
from fairseq.sequence_generator import EnsembleModel
from torch import Tensor, nn

IncrementalState = dict[str, dict[str, Tensor | None]]
"""fairseq's incremental-decoding cache: one buffer (name -> tensor) per module instance."""

# ----------------------------------------------------------------------------- configuration and layers


def transformer_config(args: Any) -> TransformerConfig:
    """fairseq's ``TransformerConfig.from_namespace``.

    Relies on it keeping namespace entries it does not know (``--encoder-attn`` stays readable
    as ``cfg.encoder_attn``). A fresh ``TransformerConfig()`` is unusable in fairseq-fixed
    (its sub-configs are class objects), so configs are always built from a namespace.
    """
    return TransformerConfig.from_namespace(args)


def wrap_layer(layer: nn.Module, cfg: Any) -> nn.Module:
    """Activation checkpointing and FSDP wrapping of a transformer layer, as fairseq's encoder and decoder do.

    Relies on ``fairseq.modules.checkpoint_activations.checkpoint_wrapper``,
    ``fairseq.distributed.fsdp_wrap`` and the config fields ``checkpoint_activations``,
    ``offload_activations`` and ``min_params_to_wrap``. With checkpointing, FSDP always wraps
    the checkpointed layer (fairseq's rule).
    """
    checkpoint = cfg.checkpoint_activations
    if checkpoint:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    min_params_to_wrap = cfg.min_params_to_wrap if not checkpoint else 0
    return fsdp_wrap(layer, min_num_params=min_params_to_wrap)


def name_dropouts(module: nn.Module, name: str) -> None:
    """Name the module's own dropouts ``name``, so ``--retain-dropout-modules`` takes fairseq's names.

    Relies on ``FairseqDropout.module_name`` and on fairseq's attributes ``dropout_module`` and
    ``activation_dropout_module``.
    """
    for attr in ("dropout_module", "activation_dropout_module"):
        dropout = getattr(module, attr, None)
        if isinstance(dropout, FairseqDropout):
            dropout.module_name = name


def xformers_config(cfg: Any, side: str) -> str | None:
    """``cfg.<side>.xformers_att_config`` (``side``: ``"encoder"`` / ``"decoder"``); when set, xformers runs softmax."""
    return getattr(getattr(cfg, side), "xformers_att_config", None)


def quant_noise_args(layer: nn.Module) -> dict[str, Any]:
    """The quantization-noise arguments a fairseq layer passes to its attention (``q_noise``, ``qn_block_size``).

    Relies on the layer attributes ``quant_noise`` and ``quant_noise_block_size`` that
    ``TransformerEncoderLayerBase`` / ``TransformerDecoderLayerBase`` set before building attention.
    """
    return {"q_noise": layer.quant_noise, "qn_block_size": layer.quant_noise_block_size}


# ----------------------------------------------------------------------------- MultiheadAttention internals


def attention_dropout_p(attention: MultiheadAttention) -> float:
    """The dropout probability on the attention weights now: ``p`` in training or with ``apply_during_inference``.

    Relies on ``attention.dropout_module`` being a ``FairseqDropout`` (``p``, ``apply_during_inference``).
    """
    dropout = attention.dropout_module
    return float(dropout.p) if (attention.training or dropout.apply_during_inference) else 0.0


def input_buffer(attention: MultiheadAttention, state: IncrementalState) -> dict[str, Tensor | None]:
    """This module's cache in ``state`` (``prev_key``, ``prev_value``, ``prev_key_padding_mask``).

    Relies on the private ``MultiheadAttention._get_input_buffer``.
    """
    return attention._get_input_buffer(state)


def set_input_buffer(
    attention: MultiheadAttention, state: IncrementalState, buffer: dict[str, Tensor | None]
) -> IncrementalState:
    """Store this module's cache in ``state`` (private ``_set_input_buffer``); returns the state."""
    return attention._set_input_buffer(state, buffer)


def add_bias_kv(
    attention: MultiheadAttention, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
    attn_mask: Tensor | None, bsz: int,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Append the learned ``bias_k`` / ``bias_v`` key and value (private ``_add_bias``, time-first tensors)."""
    return attention._add_bias(k, v, key_padding_mask, attn_mask, bsz)


def append_zero_attn(
    attention: MultiheadAttention, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, attn_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Append an all-zero key and value (``add_zero_attn``), private ``_append_zero_attn``.

    Relies on it padding the second-to-last dimension of (batch, heads, length, head_dim) tensors.
    """
    return attention._append_zero_attn(k=k, v=v, key_padding_mask=key_padding_mask, attn_mask=attn_mask)


def append_prev_key_padding_mask(
    key_padding_mask: Tensor | None, prev_key_padding_mask: Tensor | None, batch_size: int, src_len: int,
    static_kv: bool,
) -> Tensor | None:
    """The padding mask of the cached keys followed by the new ones.

    Relies on the private static method ``MultiheadAttention._append_prev_key_padding_mask``.
    """
    return MultiheadAttention._append_prev_key_padding_mask(
        key_padding_mask=key_padding_mask,
        prev_key_padding_mask=prev_key_padding_mask,
        batch_size=batch_size,
        src_len=src_len,
        static_kv=static_kv,
    )


# ----------------------------------------------------------------------------- checkpoints and generation


def run_before_checkpoint_loads(prepare: Callable[[], None]) -> None:
    """Make ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` call ``prepare()`` first (idempotent per ``prepare``).

    Relies on fairseq's loaders (``load_model_ensemble_and_task``, the trainer's
    ``load_checkpoint``) looking the function up in ``checkpoint_utils`` at each call, so that
    replacing the module attribute reaches them.
    """
    load = checkpoint_utils.load_checkpoint_to_cpu
    if getattr(load, "runs_first", None) is prepare:
        return

    @functools.wraps(load)
    def load_checkpoint_to_cpu(*args: Any, **kwargs: Any) -> Any:
        prepare()
        return load(*args, **kwargs)

    setattr(load_checkpoint_to_cpu, "runs_first", prepare)  # noqa: B010 (an attribute on a function)
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu


def ensemble(models: list[nn.Module]) -> EnsembleModel:
    """fairseq's ``sequence_generator.EnsembleModel`` over ``models``.

    Relies on its methods ``set_decoder_beam_size``, ``forward_encoder``, ``reorder_encoder_out``,
    ``forward_decoder``, ``reorder_incremental_state``, ``max_decoder_positions`` and the
    attribute ``models_size``.
    """
    return EnsembleModel(models)
