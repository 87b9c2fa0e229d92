"""alpha-entmax just above alpha = 1, where a schedule leaving softmax passes: finite and accurate on every CPU path."""

import pytest
import torch

import plugin
from plugin.kernels import maths
from plugin.kernels.constants import GENERAL

NEAR_ONE = [1 + 3e-9, 1 + 2e-8, 1 + 7e-7, 1 + 5e-5, 1 + 3e-3]


def _attention(path, alpha, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(1, 2, 24, 8, generator=g, dtype=torch.float64) for _ in range(4))
    mask = torch.ones(1, 1, 1, 24, dtype=torch.bool)
    mask[..., 17:] = False
    qq = q.to(dtype).requires_grad_()
    with plugin.use_path(path):
        out = plugin.attention(qq, k.to(dtype), v.to(dtype), f"entmax:alpha={alpha!r}", mask=mask, scale=1.0)
    (dq,) = torch.autograd.grad(out, qq, dout.to(dtype))
    return out.detach().double(), dq.double()


@pytest.mark.parametrize("path", ["reference", "cpu_chunked", "cpu_chunked_torch"])
@pytest.mark.parametrize("alpha", NEAR_ONE)
def test_float32_attention_near_alpha_one_matches_float64(path, alpha):
    out, dq = _attention(path, alpha, torch.float32)
    ref, dq_ref = _attention("reference", alpha, torch.float64)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all()
    assert (out - ref).abs().max() < 1e-5
    assert (dq - dq_ref).abs().max() < 2e-5


@pytest.mark.parametrize("alpha", NEAR_ONE)
def test_float64_reference_near_alpha_one_tends_to_softmax(alpha):
    z = torch.randn(20, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2
    p = plugin.entmax(z, alpha=alpha)
    # entmax_{1+a} - softmax = O(a) (about a * var(z) here)
    assert (p - torch.softmax(z, -1)).abs().max() < 30 * (alpha - 1) + 1e-12


@pytest.mark.parametrize("alpha", NEAR_ONE)
def test_newton_threshold_near_alpha_one_keeps_its_digits(alpha):
    z = torch.randn(20, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 2
    z[0, 7:] = float("-inf")
    am1 = torch.full((20, 1), alpha - 1)
    p = maths.entmax_from_stats(z.float(), am1, maths.newton_threshold(z.float(), am1, GENERAL), GENERAL)
    ref = plugin.entmax(z, alpha=torch.tensor(alpha, dtype=torch.float64))
    assert (p.double() - ref).abs().max() < 2e-6


def test_a_cosine_schedule_from_softmax_is_finite_in_its_first_steps():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g) for _ in range(3))
    mech = plugin.AttentionMechanism("entmax:alpha=1.5", num_heads=2, schedule="cosine:start=1,steps=7000")
    for path in ("cpu_chunked", "cpu_chunked_torch", "reference"):
        for step in range(4):
            mech.set_schedule_step(step)
            qq = q.clone().requires_grad_()
            with plugin.use_path(path):
                out = mech(qq, k, v)
            (dq,) = torch.autograd.grad(out.sum(), qq)
            assert torch.isfinite(out).all() and torch.isfinite(dq).all(), (path, step)


@pytest.mark.parametrize("am1", [2e-9, 4e-8])
def test_newton_threshold_solves_for_s_below_float32_resolution(am1):
    """The threshold statistic s = t + 1 itself (Python mirror and C row kernel): near alpha = 1 it
    is about (alpha - 1) logsumexp(z - m); the Newton step must not cancel to 0 (or overshoot)."""
    from plugin.kernels import chunked

    g = torch.Generator().manual_seed(11)
    z = torch.randn(6, 40, generator=g) * 3
    z[2, 25:] = float("-inf")
    zd = z.double()
    m = zd.amax(-1, keepdim=True)
    # float64 solution of sum_j (1 + a (z_j - m) - s)^(1 / a) = 1: bisection in s on [0, 1)
    a = torch.tensor(am1, dtype=torch.float64)
    lo, hi = torch.zeros_like(m), torch.full_like(m, 1e-3)
    for _ in range(200):
        mid = (lo + hi) / 2
        u = a * (zd - m) - mid
        f = torch.where(u > -1, torch.exp(torch.log1p(u.clamp(min=-1 + 1e-300)) / a), 0).sum(-1, keepdim=True)
        lo, hi = torch.where(f >= 1, mid, lo), torch.where(f >= 1, hi, mid)
    s_true = lo.squeeze(-1)
    am1_rows = torch.full((6, 1), am1, dtype=torch.float32)
    s_py = maths.newton_threshold(z, am1_rows, GENERAL)[:, 1].double()
    s_c = chunked.rows_forward(z.clone(), am1_rows.view(-1).contiguous(), GENERAL)[:, 1].double()
    for s in (s_py, s_c):
        assert ((s - s_true).abs() / s_true).max() < 1e-4, (s, s_true)
