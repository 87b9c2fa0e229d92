"""Expectations of Gaussian basis functions under continuous alpha-entmax, and their gradients.

``expected_basis`` returns ``E_p[psi_j(t)]`` for Gaussian RBFs ``psi_j(t) = N(t; m_j, s_j^2 I)``
under the density ``p`` of :mod:`plugin.continuous.density` (on the whole line / plane).

Forward
-------
- alpha = 1 (1-D and 2-D): ``N(mu; m_j, Sigma + s_j^2 I)`` (a Gaussian convolution).
- 1-D, alpha = 2 and 1.5: ``p`` is a polynomial in ``x = t - mu`` on ``[-a, a]``, so the
  expectation is a combination of the Gaussian moments ``int_{-a}^{a} x^n N(x; m_j - mu, s_j^2) dx``
  (n <= 4), each a closed form in the normal cdf and pdf.
- 2-D, alpha = 2 and 1.5: polar coordinates in the whitened frame ``x = L u`` (``L L^T = Sigma``),
  where the support is the disk ``|u| <= r`` and the density is radial. Along each ray
  ``x = rho L e_w`` the integrand is a polynomial in ``rho`` times a Gaussian in ``rho``, so the
  radial integral over ``[0, r]`` is again closed form; the angular integral is the periodic
  trapezoid rule over ``num_angles`` directions, which converges exponentially for this
  analytic periodic integrand (the 2020 code averages a radial closed form over 100 angles).
  The error is governed by the ratio of the support's largest semi-axis to the narrowest basis
  width: with the default 128 angles it is below 1e-9 up to a ratio of about 20 and about 1e-6
  at 28 (measured; 64 angles give 1e-4 at 20). The tests check < 1e-6 against scipy at a ratio
  of 21 with a condition number of 100. The number of angles needed grows in proportion to the
  ratio.

Backward
--------
In closed form (Martins et al. 2020, Proposition 3): with ``w = p^(2 - alpha)``,
``dE[psi] / dtheta = int w phi psi - (int w phi)(int w psi) / int w``. Writing the statistics
centred at ``mu`` (``x = t - mu``; ``int w x = 0`` by symmetry) and chaining through
``theta = (Sigma^-1 mu, -Sigma^-1 / 2)`` gives

    dE/dmu    = Sigma^-1 K1,                   K1 = int w x psi
    dE/dSigma = 1/2 Sigma^-1 K2 Sigma^-1,      K2 = int w x x^T psi - (int w x x^T)(int w psi) / int w

(1-D: ``dE/dmu = K1 / sigma^2``, ``dE/dsigma^2 = K2 / (2 sigma^4)``). ``w`` is ``p`` for alpha = 1,
the indicator of the support for alpha = 2, and ``p^(1/2)`` (a parabola) for alpha = 1.5, so
``K1``, ``K2`` use the same moments as the forward: in 1-D the forward computes them and keeps
``dE/dmu``, ``dE/dsigma^2`` per entry, and the backward is two weighted sums.

Precision: 1-D float32 inputs are computed in float32 except where the interval moments cancel
(a support narrow next to a basis width: ``a < FLOAT32_MIN_RATIO[alpha] * s``), which is
computed in float64; float64 inputs and the 2-D quadrature are computed in float64. The
measured errors are in docs/continuous.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .density import check_alpha, check_parameters, det2, inv2, support_radius

__all__ = ["DEFAULT_NUM_ANGLES", "evaluate_basis", "expected_basis"]

DEFAULT_NUM_ANGLES = 128
_CHUNK_ELEMENTS = 1 << 18  # rows x basis x angles per chunk of the 2-D quadrature (2 MB per float64 temporary)
_SQRT_2PI = math.sqrt(2 * math.pi)


def evaluate_basis(t: Tensor, basis_mu: Tensor, basis_sigma: Tensor) -> Tensor:
    """Gaussian basis functions at points ``t``.

    1-D: ``t`` (...), ``basis_mu`` (J,), ``basis_sigma`` (J,) -> (..., J) with ``N(t; m_j, s_j^2)``.
    2-D: ``t`` (..., 2), ``basis_mu`` (J, 2), ``basis_sigma`` (J,) -> (..., J) with ``N(t; m_j, s_j^2 I)``.
    """
    s2 = basis_sigma * basis_sigma
    if basis_mu.dim() == 1:
        d = t[..., None] - basis_mu
        return torch.exp(-0.5 * d * d / s2) / (_SQRT_2PI * basis_sigma)
    d = t[..., None, :] - basis_mu
    return torch.exp(-0.5 * (d * d).sum(-1) / s2) / (2 * math.pi * s2)


# ----------------------------------------------------------------------------- Gaussian interval moments


def _interval_moments(lo: Tensor | None, hi: Tensor, mean: Tensor, std: Tensor, order: int) -> list[Tensor]:
    """``J_n = int_lo^hi x^n N(x; mean, std^2) dx`` for n = 0..order (broadcasting; ``lo=None`` means 0).

    ``J_0`` is a difference of normal cdfs, taken in the tail where it does not cancel; then,
    integrating ``x^(n-1) (x - mean) N = -std^2 x^(n-1) N'`` by parts,
    ``J_n = mean J_(n-1) + (n-1) std^2 J_(n-2) + std (lo^(n-1) phi(z_lo) - hi^(n-1) phi(z_hi))``.
    """
    z_lo = -mean / std if lo is None else (lo - mean) / std
    z_hi = (hi - mean) / std
    # Phi(z_hi) - Phi(z_lo), or Phi(-z_lo) - Phi(-z_hi) when both are in the upper tail
    flip = torch.where(z_lo > 0, -1.0, 1.0).to(z_lo.dtype)
    j0 = flip * (torch.special.ndtr(flip * z_hi) - torch.special.ndtr(flip * z_lo))
    phi_lo = torch.exp(-0.5 * z_lo * z_lo) * (1 / _SQRT_2PI)
    phi_hi = torch.exp(-0.5 * z_hi * z_hi) * (1 / _SQRT_2PI)
    moments = [j0]
    if order >= 1:
        moments.append(mean * j0 + std * (phi_lo - phi_hi))
    var = std * std
    edge_lo, edge_hi = std * phi_lo, std * phi_hi
    for n in range(2, order + 1):
        edge_hi = edge_hi * hi
        term = mean * moments[n - 1] + (n - 1) * var * moments[n - 2] - edge_hi
        if lo is not None:
            edge_lo = edge_lo * lo
            term = term + edge_lo
        moments.append(term)
    return moments


# ----------------------------------------------------------------------------- 1-D


def _closed_form_1d(mu: Tensor, s2: Tensor, bmu: Tensor, bsig: Tensor, alpha: float,
                    grads: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``E_p[psi]`` and, when ``grads``, the factors ``dE/dmu``, ``dE/dsigma^2``, in the inputs' dtype.

    ``mu``, ``s2`` and ``bmu``, ``bsig`` broadcast against each other ((N, 1) and (J,) give (N, J)
    tables; equal 1-D shapes give one entry per element). The backward is then ``grad_mu = (grad * dE/dmu).sum(-1)``.
    The moments are those of :func:`_interval_moments` on the symmetric interval ``[-a, a]``, where
    the boundary terms pair up: with ``S-+ = s (phi(z_lo) -+ phi(z_hi))``,
    ``J1 = d J0 + S-``, ``J2 = d J1 + s^2 J0 - a S+``, ``J3 = d J2 + 2 s^2 J1 + a^2 S-``,
    ``J4 = d J3 + 3 s^2 J2 - a^3 S+`` (``d`` the basis centre relative to ``mu``).
    """
    d = bmu - mu
    inv_s2 = 1 / s2
    if alpha == 1.0:
        inv_var = 1 / (s2 + bsig * bsig)
        e = torch.exp(-0.5 * d * d * inv_var) * torch.sqrt(inv_var * (1 / (2 * math.pi)))
        if not grads:
            return e, None, None
        ed = e * d * inv_var
        return e, ed, 0.5 * (ed * d - e) * inv_var
    a = support_radius(s2, alpha)
    inv_s = 1 / bsig
    z_lo = (-a - d) * inv_s
    z_hi = (a - d) * inv_s
    # Phi(z_hi) - Phi(z_lo), or Phi(-z_lo) - Phi(-z_hi) when both are in the upper tail
    flip = torch.where(z_lo > 0, -1.0, 1.0).to(d.dtype)
    j0 = flip * (torch.special.ndtr(flip * z_hi) - torch.special.ndtr(flip * z_lo))
    phi_lo = torch.exp(-0.5 * z_lo * z_lo)
    phi_hi = torch.exp(-0.5 * z_hi * z_hi)
    s_pdf = bsig * (1 / _SQRT_2PI)
    s_minus = (phi_lo - phi_hi) * s_pdf
    s_plus = (phi_lo + phi_hi) * s_pdf
    var = bsig * bsig
    a2 = a * a
    j1 = d * j0 + s_minus
    j2 = d * j1 + var * j0 - a * s_plus
    if alpha == 2.0:
        e = (a2 * j0 - j2) * (0.5 * inv_s2)
        if not grads:
            return e, None, None
        # w = 1 on [-a, a]; int w = 2a, int w x^2 = 2 a^3 / 3
        return e, j1 * inv_s2, (j2 - a2 / 3 * j0) * (0.5 * inv_s2 * inv_s2)
    j3 = d * j2 + 2 * var * j1 + a2 * s_minus
    j4 = d * j3 + 3 * var * j2 - a2 * a * s_plus
    inner = a2 * j0 - j2  # int (a^2 - x^2) psi
    e = (a2 * inner - (a2 * j2 - j4)) * (inv_s2 * inv_s2 / 16)
    if not grads:
        return e, None, None
    # w = (a^2 - x^2) / (4 sigma^2); int w x^2 / int w = a^2 / 5
    c = inv_s2 / 4
    k1 = (a2 * j1 - j3) * c
    k2 = ((a2 * j2 - j4) - a2 / 5 * inner) * c
    return e, k1 * inv_s2, k2 * (0.5 * inv_s2 * inv_s2)


# a / s (support half-width over basis width) from which the float32 closed form keeps its
# digits: below it, the moments cancel (measured against float64, docs/continuous.md)
FLOAT32_MIN_RATIO = {2.0: 1.0, 1.5: 2.0}
_BLOCK_ELEMENTS = 1 << 16  # entries per block of rows (the temporaries stay in the cache)


def _expected_basis_1d(mu: Tensor, s2: Tensor, bmu: Tensor, bsig: Tensor, alpha: float,
                       grads: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`_closed_form_1d` for ``mu``, ``s2`` (N,) and the basis (J,): (N, J) tables in ``mu``'s dtype.

    float64 inputs are computed in float64. float32 inputs are computed in float32, except the
    entries of a sparse density (alpha = 1.5, 2) whose support is narrow next to the basis
    function (``a < FLOAT32_MIN_RATIO[alpha] * s``), which are computed again in float64. On the
    CPU the rows go in blocks of about ``_BLOCK_ELEMENTS`` entries, so that the thirty-odd
    elementwise passes run in the cache. A compiled graph cannot gather a data-dependent set of entries
    (and fuses the passes itself): there both precisions are computed for every entry, in one
    block, and the same entries as in eager mode are taken from float64.
    """
    dtype, f64 = mu.dtype, torch.float64
    if torch.compiler.is_compiling():
        res = _closed_form_1d(mu[:, None], s2[:, None], bmu, bsig, alpha, grads)
        if alpha == 1.0 or dtype == f64:
            return res
        exact = _closed_form_1d(mu.to(f64)[:, None], s2.to(f64)[:, None], bmu.to(f64), bsig.to(f64), alpha, grads)
        narrow = support_radius(s2, alpha)[:, None] < bsig * FLOAT32_MIN_RATIO[alpha]
        merged = [None if t is None or x is None else torch.where(narrow, x.to(dtype), t) for t, x in zip(res, exact)]
        return merged[0], merged[1], merged[2]  # type: ignore[return-value]  # the value is never None
    N, J = mu.shape[0], bmu.shape[0]
    tables = [torch.empty(N, J, dtype=dtype, device=mu.device) for _ in range(3 if grads else 1)]
    groups = []  # (width, its columns: a slice when they are contiguous, as in the default bases)
    if alpha != 1.0 and dtype != f64:
        widths, group = torch.unique(bsig, return_inverse=True)
        for g, width in enumerate(widths.tolist()):
            cols = (group == g).nonzero().squeeze(1)
            c0, c1 = int(cols[0]), int(cols[-1]) + 1
            groups.append((FLOAT32_MIN_RATIO[alpha] * width, slice(c0, c1) if c1 - c0 == cols.numel() else cols))
        a = support_radius(s2, alpha)
        bmu64, bsig64 = bmu.to(f64), bsig.to(f64)
    # blocks pay off on the CPU (cache); elsewhere each block's launches and syncs would cost more
    step = max(1, _BLOCK_ELEMENTS // max(J, 1)) if mu.device.type == "cpu" else max(N, 1)
    for i in range(0, N, step):
        block = slice(i, min(i + step, N))
        part = _closed_form_1d(mu[block, None], s2[block, None], bmu, bsig, alpha, grads)
        for table, values in zip(tables, part):
            if values is not None:
                table[block] = values
        for bound, span in groups:
            rows = (a[block] < bound).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            rows += i
            fixed = _closed_form_1d(mu[rows, None].to(f64), s2[rows, None].to(f64), bmu64[span], bsig64[span],
                                    alpha, grads)
            for table, values in zip(tables, fixed):
                if values is None:
                    continue
                if isinstance(span, slice):
                    table[:, span].index_copy_(0, rows, values.to(dtype))
                else:
                    table[rows[:, None], span] = values.to(dtype)
    if grads:
        return tables[0], tables[1], tables[2]
    return tables[0], None, None


# ----------------------------------------------------------------------------- 2-D


def _chol2(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    l00 = sigma[:, 0, 0].sqrt()
    l10 = sigma[:, 1, 0] / l00
    l11 = (sigma[:, 1, 1] - l10 * l10).sqrt()
    return l00, l10, l11


def _radial_moments(mu: Tensor, sigma: Tensor, bmu: Tensor, bsig: Tensor, alpha: float, num_angles: int, orders):
    """Per-direction radial integrals of the 2-D quadrature.

    Returns ``(R, v, weight)``: ``R[n]`` (N, J, K) is ``int_0^r rho^n psi_j(mu + rho v_k) drho`` for
    each requested ``n``; ``v`` (N, K, 2) the ray directions ``L e_k``; ``weight`` (N, 1) the
    quadrature weight ``sqrt(det Sigma) 2 pi / K`` (the Jacobian ``rho`` is part of ``n``).
    """
    angles = torch.arange(num_angles, dtype=mu.dtype, device=mu.device) * (2 * math.pi / num_angles)
    cos, sin = torch.cos(angles), torch.sin(angles)
    l00, l10, l11 = _chol2(sigma)
    v0 = l00[:, None] * cos  # (N, K)
    v1 = l10[:, None] * cos + l11[:, None] * sin
    vv = (v0 * v0 + v1 * v1)[:, None, :]  # (N, 1, K)
    d = bmu - mu[:, None, :]  # (N, J, 2)
    d0, d1 = d[..., 0:1], d[..., 1:2]  # (N, J, 1)
    s = bsig[:, None]  # (J, 1)
    along = (d0 * v0[:, None, :] + d1 * v1[:, None, :]) / vv  # closest point of the ray line, in rho units
    cross = d0 * v1[:, None, :] - d1 * v0[:, None, :]
    std = s / vv.sqrt()  # std of the basis Gaussian along the ray, in rho units
    # psi_j(mu + rho v) = exp(-|d_perp|^2 / 2 s^2) N(rho; along, std^2) * sqrt(2 pi) std / (2 pi s^2)
    pref = torch.exp(-0.5 * cross * cross / (vv * s * s)) * (_SQRT_2PI * std / (2 * math.pi * s * s))
    r = support_radius(sigma, alpha, 2)[:, None, None]
    moments = _interval_moments(None, r, along, std, max(orders))
    radial = {n: pref * moments[n] for n in orders}
    v = torch.stack([v0, v1], -1)
    weight = (det2(sigma).sqrt() * (2 * math.pi / num_angles))[:, None]
    return radial, v, weight


def _forward_2d(mu: Tensor, sigma: Tensor, bmu: Tensor, bsig: Tensor, alpha: float, num_angles: int) -> Tensor:
    if alpha == 1.0:
        return _gaussian_2d(mu, sigma, bmu, bsig)[0]
    out = []
    for sl in _row_chunks(mu.shape[0], bmu.shape[0] * num_angles):
        m, sg = mu[sl], sigma[sl]
        r2 = (support_radius(sg, alpha, 2) ** 2)[:, None, None]
        if alpha == 2.0:  # p = (r^2 - rho^2) / 2, times the Jacobian rho
            rad, _, weight = _radial_moments(m, sg, bmu, bsig, alpha, num_angles, (1, 3))
            f = (r2 * rad[1] - rad[3]) / 2
        else:  # p = (r^2 - rho^2)^2 / 16
            rad, _, weight = _radial_moments(m, sg, bmu, bsig, alpha, num_angles, (1, 3, 5))
            f = (r2 * r2 * rad[1] - 2 * r2 * rad[3] + rad[5]) / 16
        out.append(weight * f.sum(-1))
    return torch.cat(out, 0)


def _backward_2d(grad: Tensor, mu: Tensor, sigma: Tensor, bmu: Tensor, bsig: Tensor, alpha: float,
                 num_angles: int) -> tuple[Tensor, Tensor]:
    if alpha == 1.0:
        e, prec_d, prec = _gaussian_2d(mu, sigma, bmu, bsig)
        ge = grad * e  # (N, J)
        grad_mu = (ge[..., None] * prec_d).sum(1)
        outer = prec_d[..., :, None] * prec_d[..., None, :] - prec
        grad_sigma = 0.5 * (ge[..., None, None] * outer).sum(1)
        return grad_mu, grad_sigma
    gk1, gk2 = [], []
    for sl in _row_chunks(mu.shape[0], bmu.shape[0] * num_angles):
        m, sg, g = mu[sl], sigma[sl], grad[sl][..., None]  # g (n, J, 1)
        r2 = (support_radius(sg, alpha, 2) ** 2)[:, None]
        if alpha == 2.0:  # w = 1 on the ellipse; int w x x^T / int w = r^2 Sigma / 4
            rad, v, weight = _radial_moments(m, sg, bmu, bsig, alpha, num_angles, (1, 2, 3))
            first = (g * rad[2]).sum(1)  # (n, K): sum_j g_j int w rho psi_j (times rho Jacobian)
            second = (g * rad[3]).sum(1)
            mass = (g * rad[1]).sum(1)
            ratio = r2 / 4
        else:  # w = (r^2 - rho^2) / 4; ratio r^2 Sigma / 6
            rad, v, weight = _radial_moments(m, sg, bmu, bsig, alpha, num_angles, (1, 2, 3, 4, 5))
            r2j = r2[..., None]
            first = (g * (r2j * rad[2] - rad[4])).sum(1) / 4
            second = (g * (r2j * rad[3] - rad[5])).sum(1) / 4
            mass = (g * (r2j * rad[1] - rad[3])).sum(1) / 4
            ratio = r2 / 6
        k1 = weight * (first[..., None] * v).sum(1)  # (n, 2)
        k2 = weight[..., None] * (second[..., None, None] * v[..., :, None] * v[..., None, :]).sum(1)
        k2 = k2 - (ratio * weight * mass.sum(-1, keepdim=True))[..., None] * sg
        gk1.append(k1)
        gk2.append(k2)
    k1, k2 = torch.cat(gk1, 0), torch.cat(gk2, 0)
    prec = inv2(sigma)
    grad_mu = (prec @ k1[..., None])[..., 0]
    grad_sigma = 0.5 * prec @ k2 @ prec
    return grad_mu, grad_sigma


def _gaussian_2d(mu: Tensor, sigma: Tensor, bmu: Tensor, bsig: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``N(mu; m_j, Sigma + s_j^2 I)`` (N, J), ``S_j^-1 d_j`` (N, J, 2) and ``S_j^-1`` (N, J, 2, 2)."""
    eye = torch.eye(2, dtype=mu.dtype, device=mu.device)
    cov = sigma[:, None] + (bsig * bsig)[:, None, None] * eye  # (N, J, 2, 2)
    prec = inv2(cov)
    d = bmu - mu[:, None, :]
    prec_d = (prec @ d[..., None])[..., 0]
    quad = (d * prec_d).sum(-1)
    e = torch.exp(-0.5 * quad) / (2 * math.pi * det2(cov).sqrt())
    return e, prec_d, prec


def _row_chunks(rows: int, per_row: int):
    step = max(1, _CHUNK_ELEMENTS // max(per_row, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)] or [slice(0, 0)]


# ----------------------------------------------------------------------------- autograd


class ExpectedBasisFunction(torch.autograd.Function):
    """``E_p[psi]`` with the closed-form generalized-covariance backward (see the module docstring).

    Inputs are flattened: 1-D ``mu``, ``sigma_sq`` (N,); 2-D ``mu`` (N, 2), ``sigma_sq`` (N, 2, 2)
    (symmetric). The basis (``basis_mu`` (J,) or (J, 2), ``basis_sigma`` (J,)) is a constant.
    """

    @staticmethod
    def forward(ctx: Any, mu: Tensor, sigma_sq: Tensor, basis_mu: Tensor, basis_sigma: Tensor, alpha: float,
                num_angles: int) -> Tensor:
        ctx.alpha, ctx.num_angles = alpha, num_angles
        if basis_mu.dim() == 1:  # the backward's factors come with the forward's moments
            e, d_mu, d_s2 = _expected_basis_1d(mu, sigma_sq, basis_mu, basis_sigma, alpha,
                                               ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
            ctx.save_for_backward(mu, sigma_sq, basis_mu, basis_sigma, d_mu, d_s2)
            return e
        ctx.save_for_backward(mu, sigma_sq, basis_mu, basis_sigma)
        f64 = torch.float64
        out = _forward_2d(mu.to(f64), sigma_sq.to(f64), basis_mu.to(f64), basis_sigma.to(f64), alpha, num_angles)
        return out.to(mu.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        mu, sigma_sq, basis_mu, basis_sigma, *factors = ctx.saved_tensors
        if factors:
            if torch.is_grad_enabled():  # create_graph: the factors again, as a differentiable function of mu, sigma^2
                f64 = torch.float64
                _, d_mu, d_s2 = _closed_form_1d(mu.to(f64)[:, None], sigma_sq.to(f64)[:, None], basis_mu.to(f64),
                                                basis_sigma.to(f64), ctx.alpha, True)
                grad = grad.to(f64)
            else:
                d_mu, d_s2 = factors
            assert d_mu is not None and d_s2 is not None  # the forward kept them: a gradient was needed
            return ((grad * d_mu).sum(-1).to(mu.dtype), (grad * d_s2).sum(-1).to(sigma_sq.dtype), None, None, None,
                    None)
        f64 = torch.float64
        args = (grad.to(f64), mu.to(f64), sigma_sq.to(f64), basis_mu.to(f64), basis_sigma.to(f64), ctx.alpha)
        grad_mu, grad_s2 = _backward_2d(*args, ctx.num_angles)
        return grad_mu.to(mu.dtype), grad_s2.to(sigma_sq.dtype), None, None, None, None


def _check_basis(basis_mu: Tensor, basis_sigma: Tensor) -> int:
    for name, t in (("basis_mu", basis_mu), ("basis_sigma", basis_sigma)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"expected_basis: {name} must be a floating-point tensor, got {got}")
    if basis_sigma.dim() != 1 or basis_mu.shape[0] != basis_sigma.shape[0] or basis_mu.dim() not in (1, 2) or (
        basis_mu.dim() == 2 and basis_mu.shape[1] != 2
    ):
        raise ValueError(
            f"expected_basis: basis_mu {tuple(basis_mu.shape)} / basis_sigma {tuple(basis_sigma.shape)} must be "
            f"(J,) / (J,) in 1-D or (J, 2) / (J,) in 2-D"
        )
    if not bool((basis_sigma > 0).all()) or not bool(torch.isfinite(basis_mu).all()):
        raise ValueError("expected_basis: basis_sigma must be > 0 and basis_mu finite")
    return basis_mu.dim()


def expected_basis(
    mu: Tensor,
    sigma_sq: Tensor,
    basis_mu: Tensor,
    basis_sigma: Tensor,
    alpha: float = 1.0,
    num_angles: int = DEFAULT_NUM_ANGLES,
    validate: bool = True,
) -> Tensor:
    """``E_p[psi_j(t)]`` for Gaussian RBFs under continuous alpha-entmax (Martins et al. 2020).

    Parameters
    ----------
    mu : 1-D: (...) location; 2-D: (..., 2).
    sigma_sq : 1-D: (...) canonical variance scale > 0; 2-D: (..., 2, 2) SPD covariance scale
        (only its symmetric part is used). For alpha = 1 this is the variance; for alpha = 2 / 1.5
        see :func:`plugin.continuous.density.scale_from_variance`.
    basis_mu : (J,) centres in 1-D, (J, 2) in 2-D.
    basis_sigma : (J,) standard deviations (isotropic in 2-D): ``psi_j(t) = N(t; m_j, s_j^2 I)``.
    alpha : 1 (Gaussian), 1.5 (biweight / its 2-D analogue) or 2 (truncated parabola / paraboloid).
    num_angles : angular nodes of the 2-D quadrature for alpha = 1.5, 2 (ignored otherwise).
    validate : check the arguments (costs a device synchronization; internal callers that
        build valid parameters pass False).

    Returns
    -------
    (..., J) in the dtype of ``mu``; differentiable with respect to ``mu`` and ``sigma_sq``
    (closed-form backward); the basis is treated as a constant.
    """
    alpha = check_alpha(alpha)
    if validate:
        ndim = _check_basis(basis_mu, basis_sigma)
        got = check_parameters(mu, sigma_sq, "expected_basis")
        if got != ndim:
            raise ValueError(
                f"expected_basis: basis_mu {tuple(basis_mu.shape)} is {ndim}-D but mu {tuple(mu.shape)} / sigma_sq "
                f"{tuple(sigma_sq.shape)} describe a {got}-D density"
            )
        if isinstance(num_angles, bool) or not isinstance(num_angles, int) or num_angles < 8:
            raise ValueError(f"expected_basis: num_angles must be an integer >= 8, got {num_angles!r}")
    dtype = torch.promote_types(mu.dtype, torch.float32)
    basis_mu = basis_mu.detach().to(device=mu.device, dtype=dtype)
    basis_sigma = basis_sigma.detach().to(device=mu.device, dtype=dtype)
    if basis_mu.dim() == 1:
        batch = mu.shape
        out = ExpectedBasisFunction.apply(
            mu.to(dtype).reshape(-1), sigma_sq.to(dtype).reshape(-1), basis_mu, basis_sigma, alpha, num_angles
        )
    else:
        batch = mu.shape[:-1]
        sym = 0.5 * (sigma_sq + sigma_sq.transpose(-1, -2))
        out = ExpectedBasisFunction.apply(
            mu.to(dtype).reshape(-1, 2), sym.to(dtype).reshape(-1, 2, 2), basis_mu, basis_sigma, alpha, num_angles
        )
    return out.reshape(*batch, basis_mu.shape[0]).to(mu.dtype)
