"""mBART with per-role sparse attention: ``SparseMBartConfig`` and the ``SparseMBart*`` models."""

from __future__ import annotations

from transformers import MBartConfig, MBartForConditionalGeneration, MBartForSequenceClassification, MBartModel

from .compat import ATTENTION_MODULE_CLASSES
from .sparse import SparseAttentionConfigMixin, SparseAttentionModelMixin


class SparseMBartConfig(SparseAttentionConfigMixin, MBartConfig):
    """:class:`transformers.MBartConfig` with the spec of each attention role.

    ``encoder_attn`` (encoder self-attention), ``decoder_attn`` (causal decoder
    self-attention), ``cross_attn`` (decoder -> encoder): spec strings of the core registry
    such as ``"sparsemax"``, ``"entmax:alpha=learned"`` or ``"fusedmax:lam=0.1"``.
    """

    model_type = "sparse_mbart"


class _SparseMBart(SparseAttentionModelMixin):
    config_class = SparseMBartConfig
    _attention_module_classes = (ATTENTION_MODULE_CLASSES["mbart"],)


class SparseMBartModel(_SparseMBart, MBartModel):
    pass


class SparseMBartForConditionalGeneration(_SparseMBart, MBartForConditionalGeneration):
    pass


class SparseMBartForSequenceClassification(_SparseMBart, MBartForSequenceClassification):
    pass
