"""T5 with per-role sparse attention: ``SparseT5Config`` and the ``SparseT5*`` models.

T5 adds a learned relative position bias to the scores and does not scale them
(``scaling=1.0``); both reach the mechanism unchanged (the bias as an additive mask).
"""

from __future__ import annotations

from transformers import (
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
    T5ForSequenceClassification,
    T5Model,
)
from transformers.models.t5.modeling_t5 import T5Attention

from .sparse import SparseAttentionConfigMixin, SparseAttentionModelMixin


class SparseT5Config(SparseAttentionConfigMixin, T5Config):
    """:class:`transformers.T5Config` with the spec of each attention role.

    ``encoder_attn``, ``decoder_attn`` (causal), ``cross_attn``: spec strings of the core registry.
    """

    model_type = "sparse_t5"
    encoder_attn: str = "softmax"
    decoder_attn: str = "softmax"
    cross_attn: str = "softmax"
    encoder_attn_schedule: str | None = None
    decoder_attn_schedule: str | None = None
    cross_attn_schedule: str | None = None


class SparseT5Model(SparseAttentionModelMixin, T5Model):
    """:class:`transformers.T5Model` whose attention runs ``config.<role>_attn``."""

    config_class = SparseT5Config
    _attention_module_classes = (T5Attention,)


class SparseT5ForConditionalGeneration(SparseAttentionModelMixin, T5ForConditionalGeneration):
    """:class:`transformers.T5ForConditionalGeneration` whose attention runs ``config.<role>_attn``."""

    config_class = SparseT5Config
    _attention_module_classes = (T5Attention,)


class SparseT5EncoderModel(SparseAttentionModelMixin, T5EncoderModel):
    """:class:`transformers.T5EncoderModel` whose self-attention runs ``config.encoder_attn``."""

    config_class = SparseT5Config
    _attention_module_classes = (T5Attention,)


class SparseT5ForSequenceClassification(SparseAttentionModelMixin, T5ForSequenceClassification):
    """:class:`transformers.T5ForSequenceClassification` whose attention runs ``config.<role>_attn``."""

    config_class = SparseT5Config
    _attention_module_classes = (T5Attention,)
