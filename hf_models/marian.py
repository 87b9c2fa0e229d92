"""Marian with per-role sparse attention: ``SparseMarianConfig`` and the ``SparseMarian*`` models.

Their sinusoidal position tables stay frozen (:mod:`hf_models.positions`).
"""

from __future__ import annotations

from transformers import MarianConfig, MarianModel, MarianMTModel

from .compat import ATTENTION_MODULE_CLASSES
from .positions import FixedPositionTablesMixin
from .sparse import SparseAttentionConfigMixin, SparseAttentionModelMixin


class SparseMarianConfig(SparseAttentionConfigMixin, MarianConfig):
    """:class:`transformers.MarianConfig` with the spec of each attention role.

    ``encoder_attn``, ``decoder_attn`` (causal), ``cross_attn``: spec strings of the core registry.
    """

    model_type = "sparse_marian"


class _SparseMarian(FixedPositionTablesMixin, SparseAttentionModelMixin):
    config_class = SparseMarianConfig
    _attention_module_classes = (ATTENTION_MODULE_CLASSES["marian"],)


class SparseMarianModel(_SparseMarian, MarianModel):
    pass


class SparseMarianMTModel(_SparseMarian, MarianMTModel):
    pass
