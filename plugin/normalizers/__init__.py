"""Discrete normalizers: scores -> probabilities over keys. Importing this registers them."""

from ..registry import Param, register_normalizer
from .base import GAMMA, Normalizer
from .entmax import EntmaxNormalizer, LearnableAlpha, entmax, entmax15, entmax_factory
from .softmax import softmax
from .sparsemax import sparsemax

__all__ = ["EntmaxNormalizer", "LearnableAlpha", "Normalizer", "entmax", "entmax15", "softmax", "sparsemax"]

register_normalizer(
    "softmax",
    softmax,
    params=(GAMMA,),
    formula="softmax(x / gamma)",
    summary="dense; the standard attention",
)
register_normalizer(
    "sparsemax",
    sparsemax,
    params=(GAMMA,),
    formula="argmin_{y in simplex} ||y - x / gamma||^2 = [x / gamma - tau]_+",
    summary="sparse: Euclidean projection onto the simplex",
)
register_normalizer(
    "entmax15",
    entmax15,
    formula="[x / 2 - tau]_+^2 (exact threshold)",
    summary="sparse, smoother than sparsemax: alpha-entmax with alpha = 1.5",
)
register_normalizer(
    "entmax",
    factory=entmax_factory,
    params=(
        Param(
            "alpha",
            1.5,
            float,
            low=1,
            high=2,
            choices=("learned",),
            doc="1 <= alpha <= 2 (1 = softmax, 2 = sparsemax), or 'learned' for one learned alpha per head",
        ),
    ),
    formula="[(alpha - 1) x - tau]_+^(1 / (alpha - 1))",
    summary="alpha-entmax (1 = softmax, 2 = sparsemax); alpha fixed, learned per head, or scheduled",
)

from . import structured  # noqa: E402,F401  (registers fusedmax, oscarmax after the others)
