"""Pegasus with per-role sparse attention: ``SparsePegasusConfig`` and the ``SparsePegasus*`` models.

Their sinusoidal position tables stay frozen (:mod:`hf_models.positions`).
"""

from __future__ import annotations

from transformers import PegasusConfig, PegasusForConditionalGeneration, PegasusModel

from .compat import ATTENTION_MODULE_CLASSES
from .positions import FixedPositionTablesMixin
from .sparse import SparseAttentionConfigMixin, SparseAttentionModelMixin


class SparsePegasusConfig(SparseAttentionConfigMixin, PegasusConfig):
    """:class:`transformers.PegasusConfig` with the spec of each attention role.

    ``encoder_attn``, ``decoder_attn`` (causal), ``cross_attn``: spec strings of the core registry.
    """

    model_type = "sparse_pegasus"


class _SparsePegasus(FixedPositionTablesMixin, SparseAttentionModelMixin):
    config_class = SparsePegasusConfig
    _attention_module_classes = (ATTENTION_MODULE_CLASSES["pegasus"],)


class SparsePegasusModel(_SparsePegasus, PegasusModel):
    pass


class SparsePegasusForConditionalGeneration(_SparsePegasus, PegasusForConditionalGeneration):
    pass
