"""fairseq's transformer layers with :class:`PluggableMultiheadAttention` in every attention.

Only the documented hooks are overridden (``build_self_attention``,
``build_encoder_attention``); everything else is fairseq's layer.
"""

from __future__ import annotations

from typing import Any

from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from torch import nn

from ..compat import name_dropouts, quant_noise_args, xformers_config
from .multihead_attention import PluggableMultiheadAttention


def _attention(
    layer: nn.Module, cfg: Any, embed_dim: int, *, heads: int, side: str, spec: str, role: str,
    schedule: str | None, **kwargs: Any,
) -> PluggableMultiheadAttention:
    """A :class:`PluggableMultiheadAttention` built as fairseq's layer builds its attention.

    ``side`` (``"encoder"`` / ``"decoder"``) is the part of ``cfg`` whose xformers option would
    replace the mechanism: a set one is refused, naming the flag. ``kwargs`` go to the module.
    """
    config = xformers_config(cfg, side)
    if config:
        raise ValueError(
            f"--{side}-xformers-att-config is set ({config!r}): xformers attention would replace the plugin's "
            f"mechanism with softmax; leave it unset with the sparse_transformer architectures"
        )
    return PluggableMultiheadAttention(embed_dim, heads, spec=spec, role=role, schedule=schedule,
                                       dropout=cfg.attention_dropout, **quant_noise_args(layer), **kwargs)


class SparseTransformerEncoderLayer(TransformerEncoderLayerBase):
    """An encoder layer whose self-attention uses ``attention_spec`` (role ``"encoder"``)."""

    def __init__(self, cfg, attention_spec: str = "softmax", return_fc: bool = False,
                 attention_schedule: str | None = None) -> None:
        # read by build_self_attention, which the base constructor calls
        self.attention_spec = attention_spec
        self.attention_schedule = attention_schedule
        super().__init__(cfg, return_fc=return_fc)
        name_dropouts(self, "TransformerEncoderLayerBase")

    def build_self_attention(self, embed_dim: int, cfg) -> PluggableMultiheadAttention:
        return _attention(self, cfg, embed_dim, heads=cfg.encoder.attention_heads, side="encoder",
                          spec=self.attention_spec, role="encoder", schedule=self.attention_schedule,
                          self_attention=True)


class SparseTransformerDecoderLayer(TransformerDecoderLayerBase):
    """A decoder layer: self-attention with ``self_attention_spec`` (role ``"decoder"``),
    encoder-decoder attention with ``cross_attention_spec`` (role ``"cross"``)."""

    def __init__(
        self,
        cfg,
        self_attention_spec: str = "softmax",
        cross_attention_spec: str = "softmax",
        no_encoder_attn: bool = False,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        self_attention_schedule: str | None = None,
        cross_attention_schedule: str | None = None,
    ) -> None:
        self.self_attention_spec = self_attention_spec
        self.cross_attention_spec = cross_attention_spec
        self.self_attention_schedule = self_attention_schedule
        self.cross_attention_schedule = cross_attention_schedule
        super().__init__(cfg, no_encoder_attn=no_encoder_attn, add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
        name_dropouts(self, "TransformerDecoderLayerBase")

    def build_self_attention(
        self, embed_dim: int, cfg, add_bias_kv: bool = False, add_zero_attn: bool = False
    ) -> PluggableMultiheadAttention:
        return _attention(
            self, cfg, embed_dim, heads=cfg.decoder.attention_heads, side="decoder", spec=self.self_attention_spec,
            role="decoder", schedule=self.self_attention_schedule, add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn, self_attention=not cfg.cross_self_attention,
        )

    def build_encoder_attention(self, embed_dim: int, cfg) -> PluggableMultiheadAttention:
        return _attention(
            self, cfg, embed_dim, heads=cfg.decoder.attention_heads, side="encoder", spec=self.cross_attention_spec,
            role="cross", schedule=self.cross_attention_schedule, kdim=cfg.encoder.embed_dim,
            vdim=cfg.encoder.embed_dim, encoder_decoder_attention=True,
        )
