"""The attention module and the transformer layers that use it."""

from .multihead_attention import PluggableMultiheadAttention
from .transformer_layer import (
    SparseTransformerDecoderLayer,
    SparseTransformerEncoderLayer,
)

__all__ = ["PluggableMultiheadAttention", "SparseTransformerDecoderLayer", "SparseTransformerEncoderLayer"]
