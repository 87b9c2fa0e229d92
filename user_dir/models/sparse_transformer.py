"""The ``sparse_transformer`` model: fairseq's transformer with a chosen attention per role.

``--encoder-attn``, ``--decoder-attn`` and ``--cross-attn`` take spec strings of the core
registry; each defaults to softmax. ``--encoder-attn-schedule`` (and the decoder and cross
ones) move a parameter of that spec with the update count (``plugin.schedule``): fairseq's
``set_num_updates`` hook sets the step, the step is saved with the model, and inference
(``prepare_for_inference_``: fairseq-generate, -interactive) uses the end value. Every
other flag of fairseq's ``transformer`` works unchanged, and the parameter names are
fairseq's, so a stock ``transformer`` checkpoint loads into it (mechanism parameters such as
a learned alpha keep their initial values).
"""

from __future__ import annotations

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import (
    TransformerDecoderBase,
    TransformerEncoderBase,
    TransformerModel,
    base_architecture,
    transformer_iwslt_de_en,
)

import plugin

from ..compat import name_dropouts, transformer_config, wrap_layer
from ..modules.transformer_layer import SparseTransformerDecoderLayer, SparseTransformerEncoderLayer
from ..options import DEFAULT_SPEC, add_attention_args, fill_attention_defaults


class SparseTransformerEncoder(TransformerEncoderBase):
    """fairseq's transformer encoder; its self-attention uses ``attention_spec``."""

    def __init__(self, cfg, dictionary, embed_tokens, attention_spec: str = DEFAULT_SPEC, return_fc: bool = False,
                 attention_schedule: str | None = None):
        self.attention_spec = attention_spec  # read by build_encoder_layer in the base constructor
        self.attention_schedule = attention_schedule
        super().__init__(cfg, dictionary, embed_tokens, return_fc=return_fc)
        name_dropouts(self, "TransformerEncoder")

    def build_encoder_layer(self, cfg):
        layer = SparseTransformerEncoderLayer(cfg, attention_spec=self.attention_spec, return_fc=self.return_fc,
                                              attention_schedule=self.attention_schedule)
        return wrap_layer(layer, cfg)


class SparseTransformerDecoder(TransformerDecoderBase):
    """fairseq's transformer decoder; self-attention uses ``self_attention_spec``,
    encoder-decoder attention ``cross_attention_spec``."""

    def __init__(
        self,
        cfg,
        dictionary,
        embed_tokens,
        no_encoder_attn: bool = False,
        output_projection=None,
        self_attention_spec: str = DEFAULT_SPEC,
        cross_attention_spec: str = DEFAULT_SPEC,
        self_attention_schedule: str | None = None,
        cross_attention_schedule: str | None = None,
    ):
        self.self_attention_spec = self_attention_spec
        self.cross_attention_spec = cross_attention_spec
        self.self_attention_schedule = self_attention_schedule
        self.cross_attention_schedule = cross_attention_schedule
        super().__init__(
            cfg, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn, output_projection=output_projection
        )
        name_dropouts(self, "TransformerDecoder")

    def build_decoder_layer(self, cfg, no_encoder_attn: bool = False):
        layer = SparseTransformerDecoderLayer(
            cfg,
            self_attention_spec=self.self_attention_spec,
            cross_attention_spec=self.cross_attention_spec,
            no_encoder_attn=no_encoder_attn,
            self_attention_schedule=self.self_attention_schedule,
            cross_attention_schedule=self.cross_attention_schedule,
        )
        return wrap_layer(layer, cfg)


def _spec(cfg, name: str) -> str:
    # TransformerConfig keeps unknown namespace entries (``encoder_attn`` lands in cfg.encoder.attn)
    return getattr(cfg, name, None) or DEFAULT_SPEC


def _schedule(cfg, name: str) -> str | None:
    return getattr(cfg, name, None) or None


@register_model("sparse_transformer")
class SparseTransformerModel(TransformerModel):
    """fairseq's ``transformer`` with sparse, structured or continuous attention per role.

    ``--encoder-attn SPEC`` (encoder self-attention), ``--decoder-attn SPEC`` (decoder
    self-attention), ``--cross-attn SPEC`` (encoder-decoder attention); see
    ``plugin.variants()`` for the names and ``docs/fairseq.md`` for usage.
    """

    @classmethod
    def hub_models(cls):
        return {}

    def set_beam_size(self, beam_size: int) -> None:
        """Called by fairseq's SequenceGenerator for beam search: the encoder-decoder attention
        then computes and caches the encoder keys and values once per sentence instead of once
        per hypothesis (fairseq's beam-shared encoder states; the results are unchanged)."""
        self.decoder.set_beam_size(beam_size)

    def prepare_for_inference_(self, cfg) -> None:
        """fairseq-generate / -interactive / from_pretrained: every schedule at its end value."""
        plugin.finish_schedules(self)
        super().prepare_for_inference_(cfg)

    @classmethod
    def add_args(cls, parser):
        TransformerModel.add_args(parser)
        add_attention_args(parser)

    @classmethod
    def build_model(cls, args, task):
        sparse_transformer(args)
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        cfg = transformer_config(cfg)
        return SparseTransformerEncoder(cfg, src_dict, embed_tokens, attention_spec=_spec(cfg, "encoder_attn"),
                                        attention_schedule=_schedule(cfg, "encoder_attn_schedule"))

    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens):
        cfg = transformer_config(cfg)
        return SparseTransformerDecoder(
            cfg,
            tgt_dict,
            embed_tokens,
            no_encoder_attn=cfg.no_cross_attention,
            self_attention_spec=_spec(cfg, "decoder_attn"),
            cross_attention_spec=_spec(cfg, "cross_attn"),
            self_attention_schedule=_schedule(cfg, "decoder_attn_schedule"),
            cross_attention_schedule=_schedule(cfg, "cross_attn_schedule"),
        )


@register_model_architecture("sparse_transformer", "sparse_transformer")
def sparse_transformer(args):
    """fairseq's ``transformer`` defaults; softmax in every role unless a flag says otherwise."""
    fill_attention_defaults(args)
    base_architecture(args)


@register_model_architecture("sparse_transformer", "sparse_transformer_iwslt_de_en")
def sparse_transformer_iwslt_de_en(args):
    """fairseq's ``transformer_iwslt_de_en`` (512 / 1024, 4 heads, 6 + 6 layers)."""
    fill_attention_defaults(args)
    transformer_iwslt_de_en(args)


@register_model_architecture("sparse_transformer", "sparse_transformer_tiny")
def sparse_transformer_tiny(args):
    """A small model for CPU demos and tests: 64-dim embeddings, 128-dim FFN, 2 + 2 layers, 4 heads."""
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 128)
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 4)
    args.decoder_embed_dim = getattr(args, "decoder_embed_dim", args.encoder_embed_dim)
    args.decoder_ffn_embed_dim = getattr(args, "decoder_ffn_embed_dim", args.encoder_ffn_embed_dim)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 4)
    sparse_transformer(args)
