"""mBART with per-role sparse attention: ``SparseMBartConfig`` and the ``SparseMBart*`` models."""

from __future__ import annotations

from transformers import (
    MBartConfig,
    MBartForConditionalGeneration,
    MBartForSequenceClassification,
    MBartModel,
)
from transformers.models.mbart.modeling_mbart import MBartAttention

from .sparse import SparseAttentionConfigMixin, SparseAttentionModelMixin


class SparseMBartConfig(SparseAttentionConfigMixin, MBartConfig):
    """:class:`transformers.MBartConfig` with the spec of each attention role.

    ``encoder_attn`` (encoder self-attention), ``decoder_attn`` (causal decoder
    self-attention), ``cross_attn`` (decoder -> encoder): spec strings of the core registry
    such as ``"sparsemax"``, ``"entmax:alpha=learned"`` or ``"fusedmax:lam=0.1"``.
    """

    model_type = "sparse_mbart"
    encoder_attn: str = "softmax"
    decoder_attn: str = "softmax"
    cross_attn: str = "softmax"
    encoder_attn_schedule: str | None = None
    decoder_attn_schedule: str | None = None
    cross_attn_schedule: str | None = None


class SparseMBartModel(SparseAttentionModelMixin, MBartModel):
    """:class:`transformers.MBartModel` whose attention runs ``config.<role>_attn``."""

    config_class = SparseMBartConfig
    _attention_module_classes = (MBartAttention,)


class SparseMBartForConditionalGeneration(SparseAttentionModelMixin, MBartForConditionalGeneration):
    """:class:`transformers.MBartForConditionalGeneration` whose attention runs ``config.<role>_attn``."""

    config_class = SparseMBartConfig
    _attention_module_classes = (MBartAttention,)


class SparseMBartForSequenceClassification(SparseAttentionModelMixin, MBartForSequenceClassification):
    """:class:`transformers.MBartForSequenceClassification` whose attention runs ``config.<role>_attn``."""

    config_class = SparseMBartConfig
    _attention_module_classes = (MBartAttention,)
