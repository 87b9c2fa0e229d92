"""BART with per-role sparse attention: ``SparseBartConfig`` and the ``SparseBart*`` models."""

from __future__ import annotations

from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BartForSequenceClassification,
    BartModel,
)
from transformers.models.bart.modeling_bart import BartAttention

from .sparse import SparseAttentionConfigMixin, SparseAttentionModelMixin


class SparseBartConfig(SparseAttentionConfigMixin, BartConfig):
    """:class:`transformers.BartConfig` with the spec of each attention role.

    ``encoder_attn`` (encoder self-attention), ``decoder_attn`` (causal decoder
    self-attention), ``cross_attn`` (decoder -> encoder): spec strings of the core registry
    such as ``"sparsemax"``, ``"entmax:alpha=learned"`` or ``"fusedmax:lam=0.1"``.
    """

    model_type = "sparse_bart"
    encoder_attn: str = "softmax"
    decoder_attn: str = "softmax"
    cross_attn: str = "softmax"
    encoder_attn_schedule: str | None = None
    decoder_attn_schedule: str | None = None
    cross_attn_schedule: str | None = None


class SparseBartModel(SparseAttentionModelMixin, BartModel):
    """:class:`transformers.BartModel` whose attention runs ``config.<role>_attn``."""

    config_class = SparseBartConfig
    _attention_module_classes = (BartAttention,)


class SparseBartForConditionalGeneration(SparseAttentionModelMixin, BartForConditionalGeneration):
    """:class:`transformers.BartForConditionalGeneration` whose attention runs ``config.<role>_attn``."""

    config_class = SparseBartConfig
    _attention_module_classes = (BartAttention,)


class SparseBartForSequenceClassification(SparseAttentionModelMixin, BartForSequenceClassification):
    """:class:`transformers.BartForSequenceClassification` whose attention runs ``config.<role>_attn``."""

    config_class = SparseBartConfig
    _attention_module_classes = (BartAttention,)
