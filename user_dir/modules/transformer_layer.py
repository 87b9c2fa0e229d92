"""fairseq's transformer layers with :class:`PluggableMultiheadAttention` in every attention.

Only the documented hooks are overridden (``build_self_attention``,
``build_encoder_attention``); everything else is fairseq's layer.
"""

from __future__ import annotations

from fairseq.modules.fairseq_dropout import FairseqDropout
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)

from .multihead_attention import PluggableMultiheadAttention


def use_stock_dropout_names(module, name: str) -> None:
    """Name the module's own dropouts as in the stock model, so ``--retain-dropout-modules``
    takes fairseq's names (``TransformerEncoderLayerBase``, ``TransformerDecoder``...)."""
    for attr in ("dropout_module", "activation_dropout_module"):
        dropout = getattr(module, attr, None)
        if isinstance(dropout, FairseqDropout):
            dropout.module_name = name


def _refuse_xformers(config: str | None, where: str) -> None:
    if config:
        raise ValueError(
            f"--{where}-xformers-att-config is set ({config!r}): xformers attention would replace the plugin's "
            f"mechanism with softmax; leave it unset with the sparse_transformer architectures"
        )


class SparseTransformerEncoderLayer(TransformerEncoderLayerBase):
    """An encoder layer whose self-attention uses ``attention_spec`` (role ``"encoder"``)."""

    def __init__(self, cfg, attention_spec: str = "softmax", return_fc: bool = False,
                 attention_schedule: str | None = None) -> None:
        # read by build_self_attention, which the base constructor calls
        self.attention_spec = attention_spec
        self.attention_schedule = attention_schedule
        super().__init__(cfg, return_fc=return_fc)
        use_stock_dropout_names(self, "TransformerEncoderLayerBase")

    def build_self_attention(self, embed_dim: int, cfg) -> PluggableMultiheadAttention:
        _refuse_xformers(cfg.encoder.xformers_att_config, "encoder")
        return PluggableMultiheadAttention(
            embed_dim,
            cfg.encoder.attention_heads,
            spec=self.attention_spec,
            role="encoder",
            schedule=self.attention_schedule,
            dropout=cfg.attention_dropout,
            self_attention=True,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
        )


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
        use_stock_dropout_names(self, "TransformerDecoderLayerBase")

    def build_self_attention(
        self, embed_dim: int, cfg, add_bias_kv: bool = False, add_zero_attn: bool = False
    ) -> PluggableMultiheadAttention:
        _refuse_xformers(cfg.decoder.xformers_att_config, "decoder")
        return PluggableMultiheadAttention(
            embed_dim,
            cfg.decoder.attention_heads,
            spec=self.self_attention_spec,
            role="decoder",
            schedule=self.self_attention_schedule,
            dropout=cfg.attention_dropout,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            self_attention=not cfg.cross_self_attention,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
        )

    def build_encoder_attention(self, embed_dim: int, cfg) -> PluggableMultiheadAttention:
        _refuse_xformers(cfg.encoder.xformers_att_config, "encoder")
        return PluggableMultiheadAttention(
            embed_dim,
            cfg.decoder.attention_heads,
            spec=self.cross_attention_spec,
            role="cross",
            schedule=self.cross_attention_schedule,
            kdim=cfg.encoder.embed_dim,
            vdim=cfg.encoder.embed_dim,
            dropout=cfg.attention_dropout,
            encoder_decoder_attention=True,
            q_noise=self.quant_noise,
            qn_block_size=self.quant_noise_block_size,
        )
