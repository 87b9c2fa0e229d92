"""Discrete normalizers: scores -> probabilities over keys (registered in ``plugin/builtins.py``)."""

from .base import Normalizer, build_normalizer
from .entmax import EntmaxNormalizer, LearnableAlpha, entmax, entmax15
from .scalable import LengthScaledNormalizer, scalable_entmax, scalable_softmax
from .softmax import softmax
from .sparsemax import sparsemax

__all__ = [
    "EntmaxNormalizer",
    "LearnableAlpha",
    "LengthScaledNormalizer",
    "Normalizer",
    "build_normalizer",
    "entmax",
    "entmax15",
    "scalable_entmax",
    "scalable_softmax",
    "softmax",
    "sparsemax",
]
