"""The built-in variants, registered in one place through the public mechanism a user calls.

Each discrete variant declares its fast paths with the factories of :mod:`plugin.paths`;
``plugin/__init__.py`` imports this module once. The docs table (``scripts/variants_table.py``)
shows the formulas and summaries given here.
"""

from __future__ import annotations

from typing import Any

from .continuous import ContinuousContext
from .continuous.basis import parse_widths
from .normalizers import entmax, entmax15, softmax, sparsemax
from .normalizers.base import GAMMA
from .normalizers.entmax import entmax_factory
from .normalizers.scalable import (
    ALPHA,
    BETA,
    BETA_INIT,
    DELTA,
    GAMMA_EXP,
    GAMMA_INIT,
    S_INIT,
    S,
    scalable_entmax,
    scalable_entmax_factory,
    scalable_softmax,
    scalable_softmax_factory,
)
from .normalizers.structured import fusedmax, oscarmax
from .paths import Call, length_scaled, sdpa_softmax, structured_chunked, threshold_family
from .registry import Param, register_continuous, register_normalizer

# ----------------------------------------------------------------------------- discrete

register_normalizer(
    "softmax",
    softmax,
    params=(GAMMA,),
    formula="softmax(x / gamma)",
    summary="dense; the standard attention",
    paths=sdpa_softmax(gamma="gamma"),
)
register_normalizer(
    "sparsemax",
    sparsemax,
    params=(GAMMA,),
    formula="argmin_{y in simplex} ||y - x / gamma||^2 = [x / gamma - tau]_+",
    summary="sparse: Euclidean projection onto the simplex",
    paths=threshold_family(alpha=2.0, gamma="gamma"),
)
register_normalizer(
    "entmax15",
    entmax15,
    formula="[x / 2 - tau]_+^2 (exact threshold)",
    summary="sparse, smoother than sparsemax: alpha-entmax with alpha = 1.5",
    paths=threshold_family(alpha=1.5),
)


def _alpha_is_one(call: Call) -> str | None:
    """alpha-entmax at alpha = 1 is softmax: it takes softmax's path (a schedule from softmax keeps a fast path)."""
    alpha = call.params.get("alpha")
    return None if alpha == 1 else f"alpha={alpha!r} is not 1 (softmax)"


register_normalizer(
    "entmax",
    entmax,
    factory=entmax_factory,
    # 1 <= alpha <= 2 (1 = softmax, 2 = sparsemax), or 'learned' for one learned alpha per head
    params=(Param("alpha", 1.5, float, low=1, high=2, choices=("learned",)),),
    formula="[(alpha - 1) x - tau]_+^(1 / (alpha - 1))",
    summary="alpha-entmax (1 = softmax, 2 = sparsemax); alpha fixed, learned per head, or scheduled",
    paths=(*sdpa_softmax(when=_alpha_is_one), *threshold_family(alpha="alpha")),
)


def _length_factor(call: Call) -> Any:
    """The per-row factor of a length-scaled normalizer (``LengthScaledNormalizer.factor``), or None.

    None for the plain functions handed in as normalizers (``plugin.attention(..., normalizer=
    plugin.scalable_softmax)``): they take the reference path.
    """
    return getattr(call.normalizer, "factor", None)


# Scalable-Softmax (arXiv:2501.19399) and Adaptive-Scalable entmax (arXiv:2506.16640): the scores of a
# row times a factor of n, its number of allowed keys; the base variant's paths with scaled queries
register_normalizer(
    "scalable_softmax",
    scalable_softmax,
    factory=scalable_softmax_factory,
    # s: 'learned' (one per head, starting at s_init) or a fixed number >= 0
    params=(S, S_INIT),
    formula="softmax(s log(n) x), n = number of allowed keys of the row",
    summary="Scalable-Softmax (SSMax): dense; sharper as the context grows; s learned per head or fixed",
    paths=length_scaled(sdpa_softmax(), _length_factor),
)
register_normalizer(
    "scalable_entmax",
    scalable_entmax,
    factory=scalable_entmax_factory,
    # alpha as entmax's; beta, gamma: 'learned' (per head, from beta_init / gamma_init) or fixed; delta fixed
    params=(ALPHA, BETA, GAMMA_EXP, DELTA, BETA_INIT, GAMMA_INIT),
    formula="entmax_alpha((delta + beta log(n + 1)^gamma) x), n = number of allowed keys of the row",
    summary="Adaptive-Scalable entmax (ASEntmax): sparse, with a learned length-dependent temperature per head",
    paths=length_scaled((*sdpa_softmax(when=_alpha_is_one), *threshold_family(alpha="alpha")), _length_factor),
)
# lam: the structure strength (>= 0): 0 gives sparsemax; large values give one segment (fusedmax) or
# one cluster (oscarmax)
for _name, _function, _kind, _formula, _summary in (
    ("fusedmax", fusedmax, "tv",
     "sparsemax(prox_{lam TV}(x / gamma)), TV = sum_i |y_{i+1} - y_i| over consecutive allowed keys",
     "sparse and structured: equal weights on contiguous segments (fused lasso)"),
    ("oscarmax", oscarmax, "oscar_ordered",
     "argmax_{y in simplex} y.x - gamma (||y||^2 / 2 + lam sum_{i<j} max(|y_i|, |y_j|)) (exact, sort + PAV)",
     "sparse and structured: equal weights on clusters of similar scores (OSCAR)"),
):
    register_normalizer(_name, _function, params=(Param("lam", 1.0, float, low=0), GAMMA), formula=_formula,
                        summary=_summary, paths=structured_chunked(_kind))

# ----------------------------------------------------------------------------- continuous

MAX_BASIS = 4096  # the regression solves a (basis x basis) system per layout
WIDTH_RANGE = (1e-4, 1e4)  # basis standard deviations outside it make the regression singular


def _check_widths(text: str) -> tuple[float, ...]:
    values = parse_widths(text)
    low, high = WIDTH_RANGE
    if not all(low <= w <= high for w in values):
        raise ValueError(f"widths must lie in [{low:g}, {high:g}], got {text!r}")
    return values


CONTINUOUS_PARAMS = (
    # number of Gaussian basis functions
    Param("basis", 64, int, low=1, high=MAX_BASIS,
          expected=f"an integer in [1, {MAX_BASIS}], a multiple of the number of widths"),
    # standard deviations of the basis functions
    Param("widths", "0.1/0.5", str, check=_check_widths,
          expected=f"'/'-separated numbers in [{WIDTH_RANGE[0]:g}, {WIDTH_RANGE[1]:g}] (e.g. 0.1/0.5)"),
    Param("penalty", 0.01, float, low=0, low_inclusive=False, high=1e6),  # ridge penalty of the value regression
    # floor of the variance taken from the attention; the variance of a density over [0, 1] is at
    # most 1/4: a larger floor makes every density the same
    Param("min_var", 1e-4, float, low=0, low_inclusive=False, high=1),
)


def _check_basis_and_widths(params: dict[str, Any]) -> None:
    widths = parse_widths(params["widths"])
    if params["basis"] % len(widths):
        raise ValueError(
            f"parameter 'basis' must be a multiple of the number of widths ({len(widths)}: "
            f"{params['widths']}); got basis={params['basis']}, valid choices: "
            f"{', '.join(str(len(widths) * i) for i in (1, 2, 32))}, ..."
        )


def _continuous(alpha: float) -> Any:
    def factory(num_heads: int | None = None, **params: Any) -> ContinuousContext:
        return ContinuousContext(alpha=alpha, **params)

    return factory


for _name, _alpha, _formula, _summary in (
    ("continuous_softmax", 1.0,
     "c = E_p[v(t)], p = N(mu, sigma^2) with the mean and variance of the discrete attention",
     "continuous attention with a Gaussian density over [0, 1]"),
    ("continuous_sparsemax", 2.0,
     "c = E_p[v(t)], p = (a^2 - (t - mu)^2)_+ / (2 sigma^2), a = (3 sigma^2 / 2)^(1/3)",
     "continuous attention with a truncated parabola (compact support)"),
    ("continuous_entmax15", 1.5,
     "c = E_p[v(t)], p = (a^2 - (t - mu)^2)_+^2 / (16 sigma^4), a = (15 sigma^4)^(1/5)",
     "continuous attention with a biweight density (compact support, smooth edges)"),
):
    register_continuous(_name, _continuous(_alpha), params=CONTINUOUS_PARAMS, check=_check_basis_and_widths,
                        formula=_formula, summary=_summary)
