"""Pegasus with per-role sparse attention: ``SparsePegasusConfig`` and the ``SparsePegasus*`` models."""

from __future__ import annotations

from transformers import PegasusConfig, PegasusForConditionalGeneration, PegasusModel
from transformers.models.pegasus.modeling_pegasus import PegasusAttention

from .positions import FixedPositionTablesMixin
from .sparse import SparseAttentionConfigMixin, SparseAttentionModelMixin


class SparsePegasusConfig(SparseAttentionConfigMixin, PegasusConfig):
    """:class:`transformers.PegasusConfig` with the spec of each attention role.

    ``encoder_attn``, ``decoder_attn`` (causal), ``cross_attn``: spec strings of the core registry.
    """

    model_type = "sparse_pegasus"
    encoder_attn: str = "softmax"
    decoder_attn: str = "softmax"
    cross_attn: str = "softmax"
    encoder_attn_schedule: str | None = None
    decoder_attn_schedule: str | None = None
    cross_attn_schedule: str | None = None


class SparsePegasusModel(FixedPositionTablesMixin, SparseAttentionModelMixin, PegasusModel):
    """:class:`transformers.PegasusModel` whose attention runs ``config.<role>_attn``.

    Its sinusoidal position tables stay frozen, so a trained, saved and reloaded model is identical.
    """

    config_class = SparsePegasusConfig
    _attention_module_classes = (PegasusAttention,)


class SparsePegasusForConditionalGeneration(
    FixedPositionTablesMixin, SparseAttentionModelMixin, PegasusForConditionalGeneration
):
    """:class:`transformers.PegasusForConditionalGeneration` whose attention runs ``config.<role>_attn``.

    Its sinusoidal position tables stay frozen, so a trained, saved and reloaded model is identical.
    """

    config_class = SparsePegasusConfig
    _attention_module_classes = (PegasusAttention,)
