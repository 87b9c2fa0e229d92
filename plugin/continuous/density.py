"""Continuous alpha-entmax densities on the line and the plane (Martins et al. 2020, section 3).

With sufficient statistics ``phi(t) = (t, t t^T)`` and canonical parameters
``theta = (Sigma^-1 mu, -1/2 Sigma^-1)`` (1-D: ``(mu / sigma^2, -1 / (2 sigma^2))``),
continuous alpha-entmax is ``p(t) = [(alpha - 1) theta.phi(t) - tau]_+ ^ (1 / (alpha - 1))``
normalized over the whole line / plane (not truncated to [0, 1] or the unit square: this
is the paper's convention, and the one under which its closed forms hold).

Written with ``x = t - mu`` and the Mahalanobis radius ``q = x^T Sigma^-1 x`` (1-D:
``q = x^2 / sigma^2``) the three supported members are

=========  ==========================  ====================================  ===========================
alpha      name                        density                               support
=========  ==========================  ====================================  ===========================
1          continuous softmax          ``N(t; mu, Sigma)``                   everything
2          continuous sparsemax        ``(r^2 - q)_+ / 2``                   ``q <= r^2``
1.5        continuous entmax-1.5       ``(r^2 - q)_+^2 / 16``                ``q <= r^2``
=========  ==========================  ====================================  ===========================

Here ``sigma^2`` / ``Sigma`` is the *canonical* scale, which is the variance only for
alpha = 1. The radius ``r`` makes the density integrate to one. In the whitened frame
``x = Sigma^(1/2) u`` the density is radial, ``dx = sqrt(det Sigma) du``, and
``int (r^2 - |u|^2)_+^k du`` is elementary, which gives (with ``a = r sigma`` the 1-D
half-width of the support):

- 1-D, alpha = 2: ``int_{-a}^{a} (a^2 - x^2) / (2 sigma^2) dx = 2 a^3 / (3 sigma^2) = 1``, so
  ``a = (3 sigma^2 / 2)^(1/3)``; variance ``a^2 / 5``.
- 1-D, alpha = 1.5 (biweight): ``int (a^2 - x^2)^2 / (16 sigma^4) dx = a^5 / (15 sigma^4) = 1``,
  so ``a = (15 sigma^4)^(1/5)``; variance ``a^2 / 7``.
- 2-D, alpha = 2: ``sqrt(det Sigma) * pi r^4 / 4 = 1``, so ``r^4 = 4 / (pi sqrt(det Sigma))``;
  covariance ``r^2 Sigma / 6``.
- 2-D, alpha = 1.5: ``sqrt(det Sigma) * pi r^6 / 48 = 1``, so ``r^6 = 48 / (pi sqrt(det Sigma))``;
  covariance ``r^2 Sigma / 8``.

Inverting the last column gives the canonical scale that has a prescribed variance /
covariance (used when the moments of a discrete attention distribution place the density):
1-D alpha = 2: ``sigma^2 = 2 (5 v)^(3/2) / 3``; alpha = 1.5: ``sigma^2 = sqrt((7 v)^(5/2) / 15)``;
2-D alpha = 2: ``Sigma = 9 pi sqrt(det C) C``; alpha = 1.5: ``Sigma = 8 C sqrt(pi sqrt(det C) / 6)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ALPHAS",
    "check_alpha",
    "check_parameters",
    "pdf",
    "scale_from_variance",
    "support_radius",
    "variance_from_scale",
]

ALPHAS = (1.0, 1.5, 2.0)
_ALPHA_NAMES = "1 (continuous softmax), 1.5 (continuous entmax-1.5) or 2 (continuous sparsemax)"


def check_alpha(alpha: Any) -> float:
    """Return ``alpha`` as a float if it is 1, 1.5 or 2, else raise ValueError."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or float(alpha) not in ALPHAS:
        raise ValueError(f"alpha must be {_ALPHA_NAMES}, got {alpha!r}")
    return float(alpha)


def _ndim_of(mu: Tensor, sigma_sq: Tensor) -> int:
    if mu.shape == sigma_sq.shape:
        return 1
    if mu.dim() >= 1 and mu.shape[-1] == 2 and sigma_sq.shape == mu.shape + (2,):
        return 2
    raise ValueError(
        f"mu {tuple(mu.shape)} and sigma_sq {tuple(sigma_sq.shape)} do not match: expected mu (...) with "
        f"sigma_sq (...) for 1-D, or mu (..., 2) with sigma_sq (..., 2, 2) for 2-D"
    )


def check_parameters(mu: Tensor, sigma_sq: Tensor, where: str = "continuous attention") -> int:
    """Validate a density's parameters; return its dimension (1 or 2).

    1-D: ``mu`` and ``sigma_sq`` of the same shape, ``sigma_sq > 0``. 2-D: ``mu`` (..., 2),
    ``sigma_sq`` (..., 2, 2) symmetric (up to 1e-3 relative) positive definite. Everything finite.
    """
    for name, t in (("mu", mu), ("sigma_sq", sigma_sq)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{where}: {name} must be a floating-point tensor, got {got}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {name} must be finite")
    ndim = _ndim_of(mu, sigma_sq)
    if ndim == 1:
        if not bool((sigma_sq > 0).all()):
            raise ValueError(f"{where}: sigma_sq must be > 0 (a variance scale), got min {sigma_sq.min().item():.3g}")
        return 1
    s = sigma_sq.detach()
    scale = (s[..., 0, 0].abs() + s[..., 1, 1].abs()) / 2
    if not bool(((s[..., 0, 1] - s[..., 1, 0]).abs() <= 1e-3 * scale).all()):
        raise ValueError(f"{where}: sigma_sq must be a symmetric (..., 2, 2) covariance matrix")
    det = s[..., 0, 0] * s[..., 1, 1] - s[..., 0, 1] * s[..., 1, 0]
    if not bool(((s[..., 0, 0] > 0) & (det > 0)).all()):
        raise ValueError(f"{where}: sigma_sq must be positive definite (SPD covariance), got a matrix with det <= 0")
    return 2


def det2(m: Tensor) -> Tensor:
    """Determinant of (..., 2, 2) matrices."""
    return m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]


def inv2(m: Tensor) -> Tensor:
    """Inverse of symmetric (..., 2, 2) matrices (closed form)."""
    det = det2(m)
    row0 = torch.stack([m[..., 1, 1], -m[..., 0, 1]], -1)
    row1 = torch.stack([-m[..., 1, 0], m[..., 0, 0]], -1)
    return torch.stack([row0, row1], -2) / det[..., None, None]


def support_radius(sigma_sq: Tensor, alpha: float, ndim: int = 1) -> Tensor:
    """Size of the support of continuous alpha-entmax (``inf`` for alpha = 1).

    Parameters
    ----------
    sigma_sq : (...) canonical variance scale (1-D) or (..., 2, 2) covariance scale (2-D).
    alpha : 1, 1.5 or 2.
    ndim : 1 or 2.

    Returns
    -------
    (...) tensor. 1-D: the half-width ``a`` (support ``[mu - a, mu + a]``):
    ``(3 sigma^2 / 2)^(1/3)`` for alpha = 2, ``(15 sigma^4)^(1/5)`` for alpha = 1.5.
    2-D: the Mahalanobis radius ``r`` (support ``(t - mu)^T Sigma^-1 (t - mu) <= r^2``):
    ``(4 / (pi sqrt(det Sigma)))^(1/4)`` for alpha = 2, ``(48 / (pi sqrt(det Sigma)))^(1/6)``
    for alpha = 1.5.
    """
    alpha = check_alpha(alpha)
    if ndim == 1:
        if alpha == 1.0:
            return torch.full_like(sigma_sq, math.inf)
        if alpha == 2.0:
            return (1.5 * sigma_sq) ** (1.0 / 3.0)
        return (15.0 * sigma_sq * sigma_sq) ** 0.2
    if ndim != 2:
        raise ValueError(f"ndim must be 1 or 2, got {ndim!r}")
    root_det = det2(sigma_sq).sqrt()
    if alpha == 1.0:
        return torch.full_like(root_det, math.inf)
    if alpha == 2.0:
        return (4.0 / (math.pi * root_det)) ** 0.25
    return (48.0 / (math.pi * root_det)) ** (1.0 / 6.0)


def variance_from_scale(sigma_sq: Tensor, alpha: float, ndim: int = 1) -> Tensor:
    """Variance (1-D, shape (...)) or covariance (2-D, (..., 2, 2)) of the density with scale ``sigma_sq``."""
    alpha = check_alpha(alpha)
    if alpha == 1.0:
        return sigma_sq
    r = support_radius(sigma_sq, alpha, ndim)
    if ndim == 1:  # r is the half-width a
        return r * r / (5.0 if alpha == 2.0 else 7.0)
    factor = r * r / (6.0 if alpha == 2.0 else 8.0)
    return factor[..., None, None] * sigma_sq


def scale_from_variance(variance: Tensor, alpha: float, ndim: int = 1) -> Tensor:
    """Canonical scale whose density has the given variance / covariance (inverse of :func:`variance_from_scale`).

    1-D: ``variance`` (...) > 0. 2-D: ``variance`` (..., 2, 2) SPD covariance.
    """
    alpha = check_alpha(alpha)
    if alpha == 1.0:
        return variance
    if ndim == 1:
        if alpha == 2.0:
            a = (5.0 * variance).sqrt()
            return a * a * a * (2.0 / 3.0)
        a = (7.0 * variance).sqrt()
        return (a**5 / 15.0).sqrt()
    root_det = det2(variance).sqrt()
    if alpha == 2.0:
        factor = 9.0 * math.pi * root_det
    else:
        factor = 8.0 * (math.pi * root_det / 6.0).sqrt()
    return factor[..., None, None] * variance


def pdf(t: Tensor, mu: Tensor, sigma_sq: Tensor, alpha: float) -> Tensor:
    """Density of continuous alpha-entmax at points ``t``.

    Parameters
    ----------
    t : 1-D: (..., P) points; 2-D: (..., P, 2) points. Broadcast against the parameters.
    mu, sigma_sq : 1-D: (...) and (...); 2-D: (..., 2) and (..., 2, 2) (canonical scale).
    alpha : 1, 1.5 or 2.

    Returns
    -------
    (..., P) density values (exact zeros outside the support for alpha = 1.5, 2).
    """
    alpha = check_alpha(alpha)
    ndim = _ndim_of(mu, sigma_sq)
    if ndim == 1:
        x = t - mu[..., None]
        s2 = sigma_sq[..., None]
        if alpha == 1.0:
            return torch.exp(-0.5 * x * x / s2) / torch.sqrt(2 * math.pi * s2)
        a = support_radius(s2, alpha)
        gap = torch.clamp(a * a - x * x, min=0)
        return gap / (2 * s2) if alpha == 2.0 else gap * gap / (16 * s2 * s2)
    x = t - mu[..., None, :]
    prec = inv2(sigma_sq)[..., None, :, :]
    q = (x[..., None, :] @ prec @ x[..., :, None])[..., 0, 0]
    if alpha == 1.0:
        return torch.exp(-0.5 * q) / (2 * math.pi * det2(sigma_sq).sqrt()[..., None])
    r = support_radius(sigma_sq, alpha, 2)[..., None]
    gap = torch.clamp(r * r - q, min=0)
    return gap / 2 if alpha == 2.0 else gap * gap / 16
