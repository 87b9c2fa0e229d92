"""Continuous attention (Martins et al. 2020, "Sparse and Continuous Attention Mechanisms").

Attention over a continuous domain ([0, 1] for sequences, the unit square for grids) with a
continuous alpha-entmax density: alpha = 1 (Gaussian, continuous softmax), alpha = 2 (truncated
parabola / paraboloid, continuous sparsemax), alpha = 1.5 (biweight and its 2-D analogue).

- :func:`expected_basis`: ``E_p[psi_j(t)]`` for Gaussian RBFs, closed form (and a documented
  quadrature for 2-D alpha = 1.5, 2), with the closed-form generalized-covariance backward.
- :mod:`.density`: support, pdf, and the conversion between the canonical scale and the variance.
- :class:`ContinuousContext`: the registry's variants ``continuous_softmax``,
  ``continuous_sparsemax``, ``continuous_entmax15`` (density placed by the moments of the
  discrete attention), reachable through spec strings such as ``"sparsemax+continuous_softmax"``.
- :class:`ContinuousAttention`: a stand-alone layer over sequences or grids.

Importing this package registers the three variants.
"""

from __future__ import annotations

from typing import Any

from ..registry import Param, register_continuous
from .basis import (
    ValueRegression,
    gaussian_basis_1d,
    gaussian_basis_2d,
    grid_positions,
    parse_widths,
    sequence_positions,
)
from .density import pdf, scale_from_variance, support_radius, variance_from_scale
from .expectations import evaluate_basis, expected_basis
from .modules import ContinuousAttention, ContinuousContext, ContinuousOutput

__all__ = [
    "ContinuousAttention",
    "ContinuousContext",
    "ContinuousOutput",
    "ValueRegression",
    "evaluate_basis",
    "expected_basis",
    "gaussian_basis_1d",
    "gaussian_basis_2d",
    "grid_positions",
    "pdf",
    "scale_from_variance",
    "sequence_positions",
    "support_radius",
    "variance_from_scale",
]

MAX_BASIS = 4096  # the regression solves a (basis x basis) system per layout
WIDTH_RANGE = (1e-4, 1e4)  # basis standard deviations outside it make the regression singular


def _check_widths(text: str) -> tuple[float, ...]:
    values = parse_widths(text)
    low, high = WIDTH_RANGE
    if not all(low <= w <= high for w in values):
        raise ValueError(f"widths must lie in [{low:g}, {high:g}], got {text!r}")
    return values


PARAMS = (
    Param(
        "basis", 64, int, low=1, high=MAX_BASIS,
        expected=f"an integer in [1, {MAX_BASIS}], a multiple of the number of widths",
        doc="number of Gaussian basis functions (a multiple of the number of widths)",
    ),
    Param(
        "widths", "0.1/0.5", str, check=_check_widths,
        expected=f"'/'-separated numbers in [{WIDTH_RANGE[0]:g}, {WIDTH_RANGE[1]:g}] (e.g. 0.1/0.5)",
        doc="'/'-separated standard deviations of the basis functions",
    ),
    Param("penalty", 0.01, float, low=0, low_inclusive=False, high=1e6,
          doc="ridge penalty of the value regression"),
    # the variance of a density over [0, 1] is at most 1/4: a larger floor makes every density the same
    Param("min_var", 1e-4, float, low=0, low_inclusive=False, high=1,
          doc="floor of the variance taken from the attention"),
)


def _check_basis_and_widths(params: dict[str, Any]) -> None:
    widths = parse_widths(params["widths"])
    if params["basis"] % len(widths):
        raise ValueError(
            f"parameter 'basis' must be a multiple of the number of widths ({len(widths)}: "
            f"{params['widths']}); got basis={params['basis']}, valid choices: "
            f"{', '.join(str(len(widths) * i) for i in (1, 2, 32))}, ..."
        )


def _factory(alpha: float):
    def factory(num_heads: int | None = None, **params: Any) -> ContinuousContext:
        return ContinuousContext(alpha=alpha, **params)

    return factory


register_continuous(
    "continuous_softmax",
    _factory(1.0),
    params=PARAMS,
    check=_check_basis_and_widths,
    formula="c = E_p[v(t)], p = N(mu, sigma^2) with the mean and variance of the discrete attention",
    summary="continuous attention with a Gaussian density over [0, 1]",
)
register_continuous(
    "continuous_sparsemax",
    _factory(2.0),
    params=PARAMS,
    check=_check_basis_and_widths,
    formula="c = E_p[v(t)], p = (a^2 - (t - mu)^2)_+ / (2 sigma^2), a = (3 sigma^2 / 2)^(1/3)",
    summary="continuous attention with a truncated parabola (compact support)",
)
register_continuous(
    "continuous_entmax15",
    _factory(1.5),
    params=PARAMS,
    check=_check_basis_and_widths,
    formula="c = E_p[v(t)], p = (a^2 - (t - mu)^2)_+^2 / (16 sigma^4), a = (15 sigma^4)^(1/5)",
    summary="continuous attention with a biweight density (compact support, smooth edges)",
)
