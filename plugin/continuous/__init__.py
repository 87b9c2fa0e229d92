"""Continuous attention (Martins et al. 2020, "Sparse and Continuous Attention Mechanisms").

Attention over a continuous domain ([0, 1] for sequences, the unit square for grids) with a
continuous alpha-entmax density: alpha = 1 (Gaussian, continuous softmax), alpha = 2 (truncated
parabola / paraboloid, continuous sparsemax), alpha = 1.5 (biweight and its 2-D analogue).

- :func:`expected_basis`: ``E_p[psi_j(t)]`` for Gaussian RBFs, closed form (and a documented
  quadrature for 2-D alpha = 1.5, 2), with the closed-form generalized-covariance backward.
- :mod:`.density`: support, pdf, and the conversion between the canonical scale and the variance.
- :class:`ContinuousContext`: the registry's variants ``continuous_softmax``,
  ``continuous_sparsemax``, ``continuous_entmax15`` (density placed by the moments of the
  discrete attention, registered in ``plugin/builtins.py``), reachable through spec strings
  such as ``"sparsemax+continuous_softmax"``; its fast path and the protocol any continuous
  variant implements to get it: :mod:`.fast_path` (:class:`MomentContext`).
- :class:`ContinuousAttention`: a stand-alone layer over sequences or grids.
"""

from __future__ import annotations

from .basis import (
    ValueRegression,
    gaussian_basis_1d,
    gaussian_basis_2d,
    grid_positions,
    key_positions,
    sequence_positions,
)
from .density import pdf, scale_from_variance, support_radius, variance_from_scale
from .expectations import evaluate_basis, expected_basis
from .fast_path import MomentContext
from .modules import ContinuousAttention, ContinuousContext, ContinuousOutput

__all__ = [
    "ContinuousAttention",
    "ContinuousContext",
    "ContinuousOutput",
    "MomentContext",
    "ValueRegression",
    "evaluate_basis",
    "expected_basis",
    "gaussian_basis_1d",
    "gaussian_basis_2d",
    "grid_positions",
    "key_positions",
    "pdf",
    "scale_from_variance",
    "sequence_positions",
    "support_radius",
    "variance_from_scale",
]
