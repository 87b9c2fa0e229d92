"""Continuous alpha-entmax densities and E_p[psi]: against scipy quadrature, gradcheck, errors."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from plugin import continuous
from plugin.continuous import density, expected_basis
from plugin.continuous.density import (
    pdf,
    scale_from_variance,
    support_radius,
    variance_from_scale,
)

ALPHAS = [1.0, 1.5, 2.0]
F64 = torch.float64


def _gauss1(t, m, s):
    return math.exp(-0.5 * ((t - m) / s) ** 2) / (math.sqrt(2 * math.pi) * s)


def _gauss2(x, y, m, s):
    return math.exp(-0.5 * ((x - m[0]) ** 2 + (y - m[1]) ** 2) / s**2) / (2 * math.pi * s * s)


def _pdf1(alpha, mu, s2):
    """The 1-D density written from its definition, independently of the package."""
    if alpha == 1.0:
        return lambda t: _gauss1(t, mu, math.sqrt(s2))
    a = (1.5 * s2) ** (1 / 3) if alpha == 2.0 else (15 * s2 * s2) ** 0.2
    if alpha == 2.0:
        return lambda t: max(a * a - (t - mu) ** 2, 0.0) / (2 * s2)
    return lambda t: max(a * a - (t - mu) ** 2, 0.0) ** 2 / (16 * s2 * s2)


def _limits1(alpha, mu, s2):
    if alpha == 1.0:
        return mu - 12 * math.sqrt(s2), mu + 12 * math.sqrt(s2)
    a = (1.5 * s2) ** (1 / 3) if alpha == 2.0 else (15 * s2 * s2) ** 0.2
    return mu - a, mu + a


def _quad2(f, alpha, mu, sigma):
    """Integrate f(x, y) * p(x, y) over the plane (scipy dblquad over the ellipse in the original frame)."""
    mu = [float(m) for m in mu]
    S = np.array(sigma, dtype=float)
    P = np.linalg.inv(S)
    sq = math.sqrt(np.linalg.det(S))
    if alpha == 1.0:
        def p(x, y):
            d = np.array([x - mu[0], y - mu[1]])
            return math.exp(-0.5 * d @ P @ d) / (2 * math.pi * sq)

        h0, h1 = 8 * math.sqrt(S[0, 0]), 8 * math.sqrt(S[1, 1])  # the mass outside is below 1e-13
        val, _ = integrate.dblquad(lambda y, x: f(x, y) * p(x, y), mu[0] - h0, mu[0] + h0, mu[1] - h1, mu[1] + h1,
                                   epsabs=1e-10, epsrel=1e-9)
        return val
    r2 = (4 / (math.pi * sq)) ** 0.5 if alpha == 2.0 else (48 / (math.pi * sq)) ** (1 / 3)

    def p(x, y):
        d = np.array([x - mu[0], y - mu[1]])
        gap = max(r2 - d @ P @ d, 0.0)
        return gap / 2 if alpha == 2.0 else gap * gap / 16

    half = math.sqrt(r2 * S[0, 0])

    def y_range(x):
        dx = x - mu[0]
        disc = max(P[0, 1] ** 2 * dx * dx - P[1, 1] * (P[0, 0] * dx * dx - r2), 0.0)
        lo = (-P[0, 1] * dx - math.sqrt(disc)) / P[1, 1]
        hi = (-P[0, 1] * dx + math.sqrt(disc)) / P[1, 1]
        return mu[1] + lo, mu[1] + hi

    val, _ = integrate.dblquad(lambda y, x: f(x, y) * p(x, y), mu[0] - half, mu[0] + half,
                               lambda x: y_range(x)[0], lambda x: y_range(x)[1], epsabs=1e-11, epsrel=1e-10)
    return val


# ----------------------------------------------------------------------------- the densities


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("s2", [1e-3, 0.05, 0.7])
def test_1d_density_integrates_to_one_and_has_the_stated_variance(alpha, s2):
    mu, scale = torch.tensor(0.3, dtype=F64), torch.tensor(s2, dtype=F64)

    def f(t):
        return pdf(torch.tensor([t], dtype=F64), mu, scale, alpha).item()

    lo, hi = _limits1(alpha, 0.3, s2)
    assert integrate.quad(f, lo, hi, epsabs=1e-13)[0] == pytest.approx(1.0, abs=1e-10)
    var = integrate.quad(lambda t: f(t) * (t - 0.3) ** 2, lo, hi, epsabs=1e-14)[0]
    assert var == pytest.approx(variance_from_scale(torch.tensor(s2, dtype=F64), alpha).item(), rel=1e-9)


def test_1d_support_half_widths_are_the_closed_forms():
    s2 = torch.tensor([1e-3, 0.02, 0.4], dtype=F64)
    torch.testing.assert_close(support_radius(s2, 2.0), (3 * s2 / 2) ** (1 / 3))
    torch.testing.assert_close(support_radius(s2, 1.5), (15 * s2**2) ** (1 / 5))
    assert torch.isinf(support_radius(s2, 1.0)).all()
    for alpha in (1.5, 2.0):
        a = support_radius(s2, alpha)
        mu = torch.full_like(s2, 0.5)
        inside = pdf(torch.stack([mu - 0.999 * a, mu + 0.999 * a], -1), mu, s2, alpha)
        outside = pdf(torch.stack([mu - 1.001 * a, mu + 1.001 * a], -1), mu, s2, alpha)
        assert (inside > 0).all() and (outside == 0).all()


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_1d_density_is_alpha_entmax_of_the_canonical_parameters(alpha):
    # On its support p^(alpha-1) = (alpha-1) theta.phi(t) - tau with theta_2 = -1/(2 sigma^2):
    # a quadratic in t whose t^2 and t coefficients are (alpha-1)(-1/(2 sigma^2)) and (alpha-1) mu/sigma^2.
    mu, s2 = 0.4, 0.03
    a = support_radius(torch.tensor(s2, dtype=F64), alpha).item()
    t = torch.linspace(mu - 0.9 * a, mu + 0.9 * a, 9, dtype=F64)
    y = pdf(t, torch.tensor(mu, dtype=F64), torch.tensor(s2, dtype=F64), alpha) ** (alpha - 1)
    c2, c1, _ = np.polyfit(t.numpy(), y.numpy(), 2)
    assert c2 == pytest.approx(-(alpha - 1) / (2 * s2), rel=1e-8)
    assert c1 == pytest.approx((alpha - 1) * mu / s2, rel=1e-8)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_2d_density_integrates_to_one_and_has_the_stated_covariance(alpha):
    mu = [0.4, 0.6]
    S = [[0.03, 0.01], [0.01, 0.02]]
    tm, tS = torch.tensor(mu, dtype=F64), torch.tensor(S, dtype=F64)
    assert _quad2(lambda x, y: 1.0, alpha, mu, S) == pytest.approx(1.0, abs=1e-8)
    cov = variance_from_scale(tS, alpha, ndim=2)
    assert _quad2(lambda x, y: (x - mu[0]) * (y - mu[1]), alpha, mu, S) == pytest.approx(cov[0, 1].item(), rel=1e-6)
    assert _quad2(lambda x, y: (y - mu[1]) ** 2, alpha, mu, S) == pytest.approx(cov[1, 1].item(), rel=1e-6)
    # the package's pdf agrees with the density written here
    got = pdf(torch.tensor([[0.45, 0.62]], dtype=F64), tm, tS, alpha).item()
    d = np.array([0.05, 0.02])
    qf = d @ np.linalg.inv(np.array(S)) @ d
    if alpha == 1.0:
        want = math.exp(-qf / 2) / (2 * math.pi * math.sqrt(np.linalg.det(S)))
    else:
        r2 = (4 / (math.pi * math.sqrt(np.linalg.det(S)))) ** 0.5 if alpha == 2 else (
            48 / (math.pi * math.sqrt(np.linalg.det(S)))) ** (1 / 3)
        want = (r2 - qf) / 2 if alpha == 2 else (r2 - qf) ** 2 / 16
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_scale_from_variance_inverts_variance_from_scale(alpha):
    var = torch.tensor([1e-4, 0.01, 0.2], dtype=F64)
    torch.testing.assert_close(variance_from_scale(scale_from_variance(var, alpha), alpha), var)
    cov = torch.tensor([[[0.02, 0.005], [0.005, 0.01]], [[1e-3, 0.0], [0.0, 0.05]]], dtype=F64)
    torch.testing.assert_close(variance_from_scale(scale_from_variance(cov, alpha, 2), alpha, 2), cov)


def test_2d_sparsemax_scale_is_the_papers_9_pi_rule():
    cov = torch.tensor([[0.02, 0.005], [0.005, 0.01]], dtype=F64)
    torch.testing.assert_close(scale_from_variance(cov, 2.0, 2), 9 * math.pi * torch.linalg.det(cov).sqrt() * cov)


# ----------------------------------------------------------------------------- E_p[psi]


@pytest.mark.parametrize("alpha", ALPHAS)
def test_1d_expected_basis_matches_quadrature_including_supports_over_the_edges(alpha):
    mus = [0.02, 0.5, 0.97, 0.5]
    s2s = [0.05, 0.003, 0.08, 0.6]  # supports cross 0, stay inside, cross 1, cover the interval
    bm = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0, 0.3], dtype=F64)
    bs = torch.tensor([0.1, 0.05, 0.5, 0.1, 0.02, 0.2], dtype=F64)
    got = expected_basis(torch.tensor(mus, dtype=F64), torch.tensor(s2s, dtype=F64), bm, bs, alpha)
    for i, (mu, s2) in enumerate(zip(mus, s2s)):
        p = _pdf1(alpha, mu, s2)
        lo, hi = _limits1(alpha, mu, s2)
        for j in range(6):
            m, s = bm[j].item(), bs[j].item()
            want = integrate.quad(lambda t, p=p, m=m, s=s: p(t) * _gauss1(t, m, s), lo, hi, epsabs=1e-13, limit=200,
                                  points=[m])[0]
            assert got[i, j].item() == pytest.approx(want, abs=1e-10), (i, j)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_2d_expected_basis_matches_quadrature(alpha):
    cases = [([0.5, 0.4], [[0.02, 0.006], [0.006, 0.01]]), ([0.03, 0.95], [[0.05, -0.01], [-0.01, 0.03]])]
    bm = torch.tensor([[0.5, 0.5], [0.0, 1.0], [0.2, 0.7]], dtype=F64)
    bs = torch.tensor([0.1, 0.3, 0.05], dtype=F64)
    mu = torch.tensor([c[0] for c in cases], dtype=F64)
    S = torch.tensor([c[1] for c in cases], dtype=F64)
    got = expected_basis(mu, S, bm, bs, alpha)
    for i, (m, s) in enumerate(cases):
        for j in range(3):
            centre, width = bm[j].tolist(), bs[j].item()
            want = _quad2(lambda x, y, c=centre, w=width: _gauss2(x, y, c, w), alpha, m, s)
            assert got[i, j].item() == pytest.approx(want, abs=1e-7), (i, j)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_2d_quadrature_error_is_below_1e6_for_narrow_basis_and_elongated_support(alpha):
    # the documented regime's hard corner: basis width 0.05, condition number 100, support
    # semi-axes about 0.1 and 1 (default 128 angles)
    theta = 0.6
    rot = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=F64)
    S = rot @ torch.diag(torch.tensor([0.1, 0.001], dtype=F64)) @ rot.T
    mu = torch.tensor([0.45, 0.5], dtype=F64)
    bm = torch.tensor([[0.6, 0.62], [0.45, 0.5], [0.3, 0.62]], dtype=F64)
    bs = torch.full((3,), 0.05, dtype=F64)
    got = expected_basis(mu, S, bm, bs, alpha)
    for j in range(3):
        centre = bm[j].tolist()
        want = _quad2(lambda x, y, c=centre: _gauss2(x, y, c, 0.05), alpha, mu.tolist(), S.tolist())
        assert abs(got[j].item() - want) < 1e-6, (j, got[j].item(), want)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_1d_gradcheck(alpha):
    g = torch.Generator().manual_seed(1)
    mu = torch.tensor([0.3, 0.9, 0.5, -0.1], dtype=F64, requires_grad=True)
    s2 = torch.tensor([0.01, 0.2, 0.003, 0.05], dtype=F64, requires_grad=True)
    bm = torch.rand(6, generator=g, dtype=F64) * 1.4 - 0.2
    bs = torch.tensor([0.05, 0.1, 0.5, 0.2, 0.3, 0.1], dtype=F64)
    assert torch.autograd.gradcheck(lambda m, s: expected_basis(m, s, bm, bs, alpha), (mu, s2))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_2d_gradcheck(alpha):
    g = torch.Generator().manual_seed(2)
    mu = torch.tensor([[0.3, 0.4], [0.8, 0.1]], dtype=F64, requires_grad=True)
    S = torch.tensor([[[0.02, 0.005], [0.005, 0.01]], [[0.1, -0.03], [-0.03, 0.05]]], dtype=F64, requires_grad=True)
    bm = torch.rand(4, 2, generator=g, dtype=F64)
    bs = torch.tensor([0.05, 0.1, 0.5, 0.2], dtype=F64)
    assert torch.autograd.gradcheck(lambda m, s: expected_basis(m, s, bm, bs, alpha), (mu, S))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_float32_input_matches_float64(alpha):
    mu = torch.tensor([0.2, 0.7], dtype=F64)
    s2 = torch.tensor([0.004, 0.05], dtype=F64)
    bm = torch.linspace(0, 1, 8, dtype=F64)
    bs = torch.full((8,), 0.1, dtype=F64)
    ref = expected_basis(mu, s2, bm, bs, alpha)
    got = expected_basis(mu.float(), s2.float(), bm.float(), bs.float(), alpha)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_float32_stays_within_its_documented_error_in_every_regime(alpha):
    # float32 inputs are computed in float32 where the closed form keeps its digits and in
    # float64 where the support is narrow next to a basis width: over supports from far narrower
    # to wider than both default widths, the error stays within the bounds of docs/continuous.md
    g = torch.Generator().manual_seed(0)
    n = 2000
    bm, bs = continuous.gaussian_basis_1d(64)
    mu = torch.rand(n, generator=g, dtype=F64) * 1.2 - 0.1
    var = torch.exp(torch.rand(n, generator=g, dtype=F64) * math.log(0.25 / 1e-4)) * 1e-4
    s2 = scale_from_variance(var, alpha)
    upstream = torch.randn(n, 64, generator=g, dtype=F64)
    results = []
    for dtype in (F64, torch.float32):
        m, s = mu.to(dtype).requires_grad_(), s2.to(dtype).requires_grad_()
        e = expected_basis(m, s, bm.to(dtype), bs.to(dtype), alpha)
        results.append((e.double(), *(grad.double() for grad in torch.autograd.grad((e * upstream.to(dtype)).sum(),
                                                                                      (m, s)))))
    (e64, gm64, gs64), (e32, gm32, gs32) = results
    assert ((e32 - e64).abs() / e64.abs().amax(-1, keepdim=True)).max() < 1e-5
    assert (gm32 - gm64).abs().max() < 2e-5 * gm64.abs().max()
    assert (gs32 - gs64).abs().max() < 2e-5 * gs64.abs().max()
    # and against quadrature, on a support narrower than both widths and one wider than both
    for i in (int(var.argmin()), int(var.argmax())):
        p = _pdf1(alpha, mu[i].item(), s2[i].item())
        lo, hi = _limits1(alpha, mu[i].item(), s2[i].item())
        for j in range(0, 64, 9):
            m, w = bm[j].item(), bs[j].item()
            want = integrate.quad(lambda t, p=p, m=m, w=w: p(t) * _gauss1(t, m, w), lo, hi, epsabs=1e-13, limit=200,
                                  points=[m])[0]
            assert abs(e32[i, j].item() - want) < 1e-5 * e64[i].abs().max().item(), (i, j)


def test_expected_basis_keeps_leading_dimensions():
    mu = torch.rand(2, 3, 4, dtype=F64)
    s2 = torch.full((2, 3, 4), 0.01, dtype=F64)
    bm, bs = torch.linspace(0, 1, 5, dtype=F64), torch.full((5,), 0.1, dtype=F64)
    out = expected_basis(mu, s2, bm, bs, 2.0)
    assert out.shape == (2, 3, 4, 5)
    torch.testing.assert_close(out[1, 2], expected_basis(mu[1, 2], s2[1, 2], bm, bs, 2.0))


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"sigma_sq": torch.tensor([0.01, 0.0])}, "sigma_sq"),
        ({"sigma_sq": torch.tensor([0.01, -1.0])}, "sigma_sq"),
        ({"sigma_sq": torch.tensor([0.01])}, "sigma_sq"),
        ({"alpha": 1.2}, "alpha"),
        ({"alpha": "softmax"}, "alpha"),
        ({"basis_sigma": torch.tensor([0.1, 0.0, 0.1])}, "basis_sigma"),
        ({"basis_sigma": torch.tensor([0.1, 0.1])}, "basis_mu"),
        ({"mu": torch.tensor([0.1, float("nan")])}, "mu"),
    ],
)
def test_invalid_1d_input_raises_value_error_naming_the_parameter(kwargs, word):
    args = {"mu": torch.tensor([0.1, 0.5]), "sigma_sq": torch.tensor([0.01, 0.02]),
                "basis_mu": torch.tensor([0.0, 0.5, 1.0]), "basis_sigma": torch.tensor([0.1, 0.1, 0.1])}
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        expected_basis(**args)


@pytest.mark.parametrize(
    "sigma, word",
    [
        (torch.tensor([[0.01, 0.02], [0.02, 0.01]]), "positive definite"),
        (torch.tensor([[-0.01, 0.0], [0.0, -0.01]]), "positive definite"),
        (torch.tensor([[0.01, 0.0], [0.005, 0.01]]), "symmetric"),
        (torch.tensor([0.01, 0.01]), "sigma_sq"),
    ],
)
def test_invalid_2d_covariance_raises_value_error(sigma, word):
    with pytest.raises(ValueError, match=word):
        expected_basis(torch.tensor([0.5, 0.5]), sigma, torch.rand(4, 2), torch.full((4,), 0.1))


def test_2d_basis_with_1d_density_raises():
    with pytest.raises(ValueError, match="basis_mu"):
        expected_basis(torch.tensor([0.5]), torch.tensor([0.01]), torch.rand(4, 2), torch.full((4,), 0.1))


def test_density_helpers_reject_bad_alpha_and_ndim():
    with pytest.raises(ValueError, match="alpha"):
        support_radius(torch.tensor(0.1), 3.0)
    with pytest.raises(ValueError, match="ndim"):
        support_radius(torch.tensor(0.1), 2.0, ndim=3)
    with pytest.raises(ValueError, match="sigma_sq"):
        density.pdf(torch.zeros(3), torch.zeros(2), torch.ones(3), 1.0)
