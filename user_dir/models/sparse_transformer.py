"""The ``sparse_transformer`` model: fairseq's transformer with a chosen attention per role.

``--encoder-attn``, ``--decoder-attn`` and ``--cross-attn`` take spec strings of the core
registry; each defaults to softmax. ``--encoder-attn-schedule`` (and the decoder and cross
ones) move a parameter of that spec with the update count (``plugin.schedule``): fairseq's
``set_num_updates`` hook sets the step, the step is saved with the model, and inference
(``prepare_for_inference_``: fairseq-generate, -interactive) uses the end value. Every
other flag of fairseq's ``transformer`` works unchanged, and the parameter names are
fairseq's, so a stock ``transformer`` checkpoint loads into it (mechanism parameters such as
a learned alpha keep their initial values).

``--positions sinusoidal|learned|nope|alibi`` chooses the positional scheme of the encoder and
decoder: fairseq's sinusoidal or learned position embeddings, none at all (NoPE: a causal
decoder still tells positions apart through its mask; an encoder becomes permutation
equivariant), or no embedding and an ALiBi bias in every self-attention (``plugin.positions``;
``-m_h (i - j)`` in the causal decoder, ``-m_h |i - j|`` in the encoder, none in the
encoder-decoder attention). Without it fairseq's own flags (``--encoder-learned-pos``,
``--decoder-learned-pos``, ``--no-token-positional-embeddings``) apply as in the stock model; with
it, a contradicting one of them is an error. ALiBi adds no parameter, so the checkpoint holds
the same tensors as a NoPE model.
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
from plugin.positions import ALiBiAttentionMechanism, check_positions

from ..compat import name_dropouts, transformer_config, wrap_layer
from ..modules.transformer_layer import SparseTransformerDecoderLayer, SparseTransformerEncoderLayer
from ..options import DEFAULT_SPEC, add_attention_args, fill_attention_defaults

POSITIONS = ("sinusoidal", "learned", "nope", "alibi")
"""The values of ``--positions``."""


def use_alibi(layer, attention, symmetric: bool) -> None:
    """Give ``attention`` (a layer's self-attention) an ALiBi mechanism of the same spec, role and schedule."""
    if attention.bias_k is not None or attention.add_zero_attn:
        raise ValueError("--positions alibi: the ALiBi bias assumes one key per position; --add-bias-kv and "
                         "--add-zero-attn add keys without one")
    old = attention.mechanism
    schedule = str(old.schedule) if old.schedule is not None else None
    attention.mechanism = ALiBiAttentionMechanism(old.spec, num_heads=attention.num_heads, role=old.role,
                                                  schedule=schedule, symmetric=symmetric)


def resolve_positions(args) -> str | None:
    """Check ``--positions`` against fairseq's own position flags and set those flags from it.

    Returns the scheme (None when ``--positions`` is not given: fairseq's flags decide).
    """
    positions = getattr(args, "positions", None)
    if positions is None:
        return None
    check_positions(positions, POSITIONS, "--positions")
    learned = [f for f in ("encoder_learned_pos", "decoder_learned_pos") if getattr(args, f, False)]
    no_embeddings = bool(getattr(args, "no_token_positional_embeddings", False))
    if positions in ("nope", "alibi", "sinusoidal") and learned:
        flags = ", ".join("--" + f.replace("_", "-") for f in learned)
        raise ValueError(f"--positions {positions} contradicts {flags}; leave them out or use --positions learned")
    if positions in ("learned", "sinusoidal") and no_embeddings:
        raise ValueError(f"--positions {positions} contradicts --no-token-positional-embeddings")
    if positions == "learned":
        args.encoder_learned_pos = args.decoder_learned_pos = True
    if positions in ("nope", "alibi"):
        args.no_token_positional_embeddings = True
    return positions


class SparseTransformerEncoder(TransformerEncoderBase):
    """fairseq's transformer encoder; its self-attention uses ``attention_spec``."""

    def __init__(self, cfg, dictionary, embed_tokens, attention_spec: str = DEFAULT_SPEC, return_fc: bool = False,
                 attention_schedule: str | None = None, alibi: bool = False):
        self.attention_spec = attention_spec  # read by build_encoder_layer in the base constructor
        self.attention_schedule = attention_schedule
        self.alibi = alibi
        super().__init__(cfg, dictionary, embed_tokens, return_fc=return_fc)
        name_dropouts(self, "TransformerEncoder")

    def build_encoder_layer(self, cfg):
        layer = SparseTransformerEncoderLayer(cfg, attention_spec=self.attention_spec, return_fc=self.return_fc,
                                              attention_schedule=self.attention_schedule)
        if self.alibi:
            use_alibi(layer, layer.self_attn, symmetric=True)
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
        alibi: bool = False,
    ):
        self.alibi = alibi
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
        if self.alibi:
            use_alibi(layer, layer.self_attn, symmetric=False)
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
        parser.add_argument(
            "--positions", choices=POSITIONS, default=None,
            help="positional scheme of encoder and decoder: fairseq's sinusoidal or learned embeddings, none "
                 "(nope), or an ALiBi bias in the self-attentions (alibi); default: fairseq's own flags decide",
        )

    @classmethod
    def build_model(cls, args, task):
        sparse_transformer(args)
        resolve_positions(args)
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        cfg = transformer_config(cfg)
        return SparseTransformerEncoder(cfg, src_dict, embed_tokens, attention_spec=_spec(cfg, "encoder_attn"),
                                        attention_schedule=_schedule(cfg, "encoder_attn_schedule"),
                                        alibi=getattr(cfg, "positions", None) == "alibi")

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
            alibi=getattr(cfg, "positions", None) == "alibi",
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
