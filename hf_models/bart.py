"""BART with per-role sparse attention: ``SparseBartConfig`` and the ``SparseBart*`` models."""

from __future__ import annotations

from transformers import BartConfig, BartForConditionalGeneration, BartForSequenceClassification, BartModel

from .compat import ATTENTION_MODULE_CLASSES
from .sparse import SparseAttentionConfigMixin, SparseAttentionModelMixin


class SparseBartConfig(SparseAttentionConfigMixin, BartConfig):
    """:class:`transformers.BartConfig` with the spec of each attention role.

    ``encoder_attn`` (encoder self-attention), ``decoder_attn`` (causal decoder
    self-attention), ``cross_attn`` (decoder -> encoder): spec strings of the core registry
    such as ``"sparsemax"``, ``"entmax:alpha=learned"`` or ``"fusedmax:lam=0.1"``.
    """

    model_type = "sparse_bart"


class _SparseBart(SparseAttentionModelMixin):
    config_class = SparseBartConfig
    _attention_module_classes = (ATTENTION_MODULE_CLASSES["bart"],)


class SparseBartModel(_SparseBart, BartModel):
    pass


class SparseBartForConditionalGeneration(_SparseBart, BartForConditionalGeneration):
    pass


class SparseBartForSequenceClassification(_SparseBart, BartForSequenceClassification):
    pass
