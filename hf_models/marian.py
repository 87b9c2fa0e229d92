"""Marian with per-role sparse attention: ``SparseMarianConfig`` and the ``SparseMarian*`` models."""

from __future__ import annotations

from transformers import MarianConfig, MarianModel, MarianMTModel
from transformers.models.marian.modeling_marian import MarianAttention

from .positions import FixedPositionTablesMixin
from .sparse import SparseAttentionConfigMixin, SparseAttentionModelMixin


class SparseMarianConfig(SparseAttentionConfigMixin, MarianConfig):
    """:class:`transformers.MarianConfig` with the spec of each attention role.

    ``encoder_attn``, ``decoder_attn`` (causal), ``cross_attn``: spec strings of the core registry.
    """

    model_type = "sparse_marian"
    encoder_attn: str = "softmax"
    decoder_attn: str = "softmax"
    cross_attn: str = "softmax"
    encoder_attn_schedule: str | None = None
    decoder_attn_schedule: str | None = None
    cross_attn_schedule: str | None = None


class SparseMarianModel(FixedPositionTablesMixin, SparseAttentionModelMixin, MarianModel):
    """:class:`transformers.MarianModel` whose attention runs ``config.<role>_attn``.

    Its sinusoidal position tables stay frozen, so a trained, saved and reloaded model is identical.
    """

    config_class = SparseMarianConfig
    _attention_module_classes = (MarianAttention,)


class SparseMarianMTModel(FixedPositionTablesMixin, SparseAttentionModelMixin, MarianMTModel):
    """:class:`transformers.MarianMTModel` whose attention runs ``config.<role>_attn``.

    Its sinusoidal position tables stay frozen, so a trained, saved and reloaded model is identical.
    """

    config_class = SparseMarianConfig
    _attention_module_classes = (MarianAttention,)
