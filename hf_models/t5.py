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

from .compat import ATTENTION_MODULE_CLASSES
from .sparse import SparseAttentionConfigMixin, SparseAttentionModelMixin


class SparseT5Config(SparseAttentionConfigMixin, T5Config):
    """:class:`transformers.T5Config` with the spec of each attention role.

    ``encoder_attn``, ``decoder_attn`` (causal), ``cross_attn``: spec strings of the core registry.
    """

    model_type = "sparse_t5"


class _SparseT5(SparseAttentionModelMixin):
    config_class = SparseT5Config
    _attention_module_classes = (ATTENTION_MODULE_CLASSES["t5"],)


class SparseT5Model(_SparseT5, T5Model):
    pass


class SparseT5ForConditionalGeneration(_SparseT5, T5ForConditionalGeneration):
    pass


class SparseT5EncoderModel(_SparseT5, T5EncoderModel):
    """:class:`transformers.T5EncoderModel` whose self-attention runs ``config.encoder_attn``."""


class SparseT5ForSequenceClassification(_SparseT5, T5ForSequenceClassification):
    pass
