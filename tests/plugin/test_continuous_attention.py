"""Continuous attention modules: a per-row reference, masks, padding, the registry path, errors."""

import math

import pytest
import torch

import plugin
from plugin.continuous import (
    ContinuousAttention,
    ContinuousContext,
    variance_from_scale,
)

F64 = torch.float64


VARIANTS = {"continuous_softmax": 1.0, "continuous_entmax15": 1.5, "continuous_sparsemax": 2.0}
SMALL = "basis=16,widths=0.1/0.3"


def _reference_scale(var, alpha):
    if alpha == 1.0:
        return var
    if alpha == 2.0:
        return 2 / 3 * (5 * var) ** 1.5
    return math.sqrt((7 * var) ** 2.5 / 15)


def _reference_expectations(mu, s2, bm, bs, alpha, points=4001):
    """E_p[psi_j] by a dense trapezoid rule over the support (or +-12 std for the Gaussian)."""
    if alpha == 1.0:
        half = 12 * math.sqrt(s2)
    else:
        half = (1.5 * s2) ** (1 / 3) if alpha == 2.0 else (15 * s2 * s2) ** 0.2
    t = torch.linspace(mu - half, mu + half, points, dtype=F64)
    x = t - mu
    if alpha == 1.0:
        p = torch.exp(-0.5 * x * x / s2) / math.sqrt(2 * math.pi * s2)
    elif alpha == 2.0:
        p = (half**2 - x * x).clamp(min=0) / (2 * s2)
    else:
        p = (half**2 - x * x).clamp(min=0) ** 2 / (16 * s2 * s2)
    psi = torch.exp(-0.5 * ((t[:, None] - bm) / bs) ** 2) / (math.sqrt(2 * math.pi) * bs)
    return torch.trapezoid(p[:, None] * psi, t, dim=0)


def _reference_context(probs, v, mask, alpha, bm, bs, penalty=0.01, min_var=1e-4):
    """Row by row: positions of the allowed keys, moments, explicit ridge regression, quadrature."""
    B, H, Lq, Lk = probs.shape
    mask = torch.ones(B, H, Lq, Lk, dtype=torch.bool) if mask is None else mask.expand(B, H, Lq, Lk)
    out = torch.zeros(B, H, Lq, v.shape[-1], dtype=F64)
    for b in range(B):
        for h in range(H):
            for i in range(Lq):
                idx = mask[b, h, i].nonzero().squeeze(1)
                n = idx.numel()
                if n == 0:
                    continue
                t = (torch.arange(n, dtype=F64) + 0.5) / n
                p = probs[b, h, i, idx].double()
                mu = float((p * t).sum() / p.sum())
                var = max(float((p * (t - mu) ** 2).sum() / p.sum()), min_var)
                s2 = _reference_scale(var, alpha)
                F = torch.exp(-0.5 * ((t[None, :] - bm[:, None]) / bs[:, None]) ** 2) / (
                    math.sqrt(2 * math.pi) * bs[:, None])
                gram = F @ F.T + penalty * torch.eye(bm.shape[0], dtype=F64)
                coef = torch.linalg.solve(gram, F @ v[b, h, idx].double())
                out[b, h, i] = _reference_expectations(mu, s2, bm, bs, alpha) @ coef
    return out


def _probs(B, H, Lq, Lk, mask=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, H, Lq, Lk, generator=g, dtype=F64) * 2
    return plugin.softmax(scores, mask=mask)


def _mechanism(spec):
    return plugin.AttentionMechanism(spec)


# ----------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("name", list(VARIANTS))
def test_context_matches_a_row_by_row_reference_with_left_and_right_padding(name):
    B, H, Lq, Lk, D = 3, 1, 3, 11, 4
    mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
    mask[0, ..., 8:] = False  # right padding
    mask[1, ..., :4] = False  # left padding
    probs = _probs(B, H, Lq, Lk, mask)
    v = torch.randn(B, H, Lk, D, dtype=F64, generator=torch.Generator().manual_seed(1))
    module = ContinuousContext(VARIANTS[name], basis=16, widths="0.1/0.3")
    context, _ = module(probs, v, mask)
    ref = _reference_context(probs, v, mask, VARIANTS[name], module.basis_mu, module.basis_sigma)
    torch.testing.assert_close(context, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_context_matches_the_reference_with_a_causal_per_query_mask(name):
    B, H, L, D = 1, 2, 6, 3
    mask = torch.ones(L, L, dtype=torch.bool).tril()
    probs = _probs(B, H, L, L, mask, seed=3)
    v = torch.randn(B, H, L, D, dtype=F64, generator=torch.Generator().manual_seed(4))
    module = ContinuousContext(VARIANTS[name], basis=16, widths="0.1/0.3")
    context, _ = module(probs, v, mask)
    ref = _reference_context(probs, v, mask, VARIANTS[name], module.basis_mu, module.basis_sigma)
    torch.testing.assert_close(context, ref, rtol=1e-6, atol=1e-7)


def test_per_query_mask_path_agrees_with_the_padding_path():
    B, H, Lq, Lk, D = 2, 3, 4, 9, 5
    pad = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
    pad[1, ..., 6:] = False
    per_row = pad.expand(B, H, Lq, Lk).clone()
    per_row[0, 0, -1, 0] = False  # one differing row forces the per-row path
    probs = _probs(B, H, Lq, Lk, per_row)
    v = torch.randn(B, H, Lk, D, dtype=F64)
    module = ContinuousContext(2.0)
    a, wa = module(probs, v, pad)
    b, wb = module(probs, v, per_row)
    keep = torch.ones(B, H, Lq, dtype=torch.bool)
    keep[0, 0, -1] = False
    torch.testing.assert_close(b[keep], a[keep])
    torch.testing.assert_close(wb[keep], wa[keep])


def test_gradcheck_through_probs_and_values():
    B, H, Lq, Lk, D = 1, 2, 2, 7, 3
    mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
    mask[..., 5:] = False
    g = torch.Generator().manual_seed(5)
    probs = (torch.rand(B, H, Lq, Lk, generator=g, dtype=F64) + 0.2).requires_grad_()
    v = torch.randn(B, H, Lk, D, generator=g, dtype=F64, requires_grad=True)
    for alpha in (1.0, 1.5, 2.0):
        module = ContinuousContext(alpha, basis=8, widths="0.2/0.5")
        assert torch.autograd.gradcheck(lambda p, x, m=module: m(p, x, mask)[0], (probs, v))


# ----------------------------------------------------------------------------- through plugin.attention


def _qkv(B=2, H=2, Lq=4, Lk=8, D=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=g, dtype=dtype) for n in (Lq, Lk, Lk))


@pytest.mark.parametrize("spec", ["continuous_softmax", "continuous_sparsemax", "continuous_entmax15",
                                  "sparsemax+continuous_softmax", "entmax15+continuous_sparsemax"])
def test_padding_on_either_side_does_not_change_the_output(spec):
    q, k, v = _qkv()
    ref = plugin.attention(q, k, v, spec)
    extra_k, extra_v = torch.randn(2, 2, 3, 6), torch.randn(2, 2, 3, 6)
    right = torch.ones(2, 1, 1, 11, dtype=torch.bool)
    right[..., 8:] = False
    out = plugin.attention(q, torch.cat([k, extra_k], 2), torch.cat([v, extra_v], 2), spec, mask=right)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    left = torch.ones(2, 1, 1, 11, dtype=torch.bool)
    left[..., :3] = False
    out = plugin.attention(q, torch.cat([extra_k, k], 2), torch.cat([extra_v, v], 2), spec, mask=left)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_sequences_of_different_lengths_in_one_batch_each_use_their_own_length():
    q, k, v = _qkv(B=3, Lk=10)
    mask = torch.ones(3, 1, 1, 10, dtype=torch.bool)
    mask[1, ..., 7:] = False
    mask[2, ..., :2] = False
    batched = plugin.attention(q, k, v, "continuous_sparsemax", mask=mask)
    for b in range(3):
        keep = mask[b, 0, 0]
        alone = plugin.attention(q[b:b + 1], k[b:b + 1, :, keep], v[b:b + 1, :, keep], "continuous_sparsemax")
        torch.testing.assert_close(batched[b:b + 1], alone, rtol=1e-5, atol=1e-5)


def test_combined_spec_is_the_discrete_context_plus_the_continuous_one_placed_by_it():
    q, k, v = _qkv(dtype=F64)
    out = plugin.attention(q, k, v, "sparsemax+continuous_softmax:" + SMALL)
    p = plugin.sparsemax(q @ k.transpose(-1, -2) / math.sqrt(6))
    context, _ = ContinuousContext(1.0, basis=16, widths="0.1/0.3")(p, v, None)
    torch.testing.assert_close(out, p @ v + context)


def test_continuous_only_spec_places_the_density_with_softmax_and_returns_density_weights():
    q, k, v = _qkv(dtype=F64)
    mask = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    mask[0, ..., 6:] = False
    out, w = plugin.attention(q, k, v, "continuous_sparsemax", mask=mask, return_weights=True)
    p = plugin.softmax(q @ k.transpose(-1, -2) / math.sqrt(6), mask=mask)
    context, weights = ContinuousContext(2.0)(p, v, mask)
    torch.testing.assert_close(out, context)
    torch.testing.assert_close(w, weights)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 4, dtype=F64))
    assert (w[0, ..., 6:] == 0).all()


def test_sparsemax_density_weights_are_exactly_zero_outside_the_support():
    L = 40
    probs = torch.zeros(1, 1, 1, L, dtype=F64)
    probs[..., 18:22] = 0.25  # mean 0.5, a narrow spread
    v = torch.randn(1, 1, L, 2, dtype=F64)
    out = ContinuousContext(2.0).density_context(probs, v)
    a = (1.5 * out.sigma_sq.item()) ** (1 / 3)
    t = (torch.arange(L, dtype=F64) + 0.5) / L
    inside = (t - out.mu.item()).abs() < a
    w = out.weights[0, 0, 0]
    assert (w[~inside] == 0).all() and (w[inside] > 0).all()
    assert 0 < inside.sum() < L
    assert out.mu.item() == pytest.approx(0.5)
    assert variance_from_scale(out.sigma_sq, 2.0).item() == pytest.approx(((t[18:22] - 0.5) ** 2).mean().item())


@pytest.mark.parametrize("spec", list(VARIANTS) + ["softmax+continuous_entmax15"])
def test_fully_masked_rows_give_zeros_and_finite_gradients(spec):
    q, k, v = _qkv()
    q.requires_grad_()
    v.requires_grad_()
    mask = torch.ones(2, 1, 4, 8, dtype=torch.bool)
    mask[1, :, 2] = False
    mask[0, :, 1, 5:] = False  # a per-query mask
    out, w = plugin.attention(q, k, v, plugin.AttentionMechanism(spec), mask=mask, return_weights=True)
    assert (out[1, :, 2] == 0).all() and (w[1, :, 2] == 0).all()
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", ["continuous_sparsemax", "sparsemax+continuous_entmax15"])
def test_half_precision_is_computed_in_float32(dtype, spec):
    q, k, v = _qkv()
    out = plugin.attention((q * 30).to(dtype), (k * 30).to(dtype), v.to(dtype), spec)
    ref = plugin.attention((q * 30).to(dtype).float(), (k * 30).to(dtype).float(), v.to(dtype).float(), spec)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_gradients_reach_queries_keys_and_values():
    q, k, v = _qkv()
    for t in (q, k, v):
        t.requires_grad_()
    plugin.attention(q, k, v, "continuous_sparsemax").pow(2).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v))


def test_calls_are_recorded_with_the_continuous_spec():
    q, k, v = _qkv()
    with plugin.record_calls() as calls:
        plugin.attention(q, k, v, "sparsemax+continuous_softmax")
    assert [c.spec for c in calls] == ["sparsemax+continuous_softmax"]


# ----------------------------------------------------------------------------- registry parameters


def test_registry_lists_the_three_continuous_variants_with_defaults():
    variants = plugin.available_normalizers("continuous")
    assert set(VARIANTS) <= set(variants)
    assert variants["continuous_softmax"] == {"basis": 64, "widths": "0.1/0.5", "penalty": 0.01, "min_var": 1e-4}


def test_spec_parameters_reach_the_module():
    mech = plugin.AttentionMechanism("continuous_entmax15:basis=30,widths=0.05/0.2/0.6,penalty=0.1,min_var=0.001")
    module = mech.continuous
    assert module.alpha == 1.5 and module.basis_mu.shape == (30,) and module.regression.penalty == 0.1
    assert sorted(set(module.basis_sigma.tolist())) == [0.05, 0.2, 0.6] and module.min_var == 0.001


@pytest.mark.parametrize(
    "spec, word",
    [
        ("continuous_softmax:basis=63", "basis"),
        ("continuous_softmax:basis=0", "basis"),
        ("continuous_softmax:widths=abc", "widths"),
        ("continuous_softmax:widths=0.1/-1", "widths"),
        ("continuous_softmax:penalty=0", "penalty"),
        ("continuous_sparsemax:min_var=-1", "min_var"),
        ("continuous_softmax:alpha=2", "alpha"),
        ("continuous_softmax+continuous_sparsemax", "at most one"),
    ],
)
def test_bad_continuous_specs_raise_value_error(spec, word):
    with pytest.raises(ValueError, match=word):
        plugin.AttentionMechanism(spec)


def test_bad_module_inputs_raise_value_error():
    module = ContinuousContext(1.0)
    p = torch.rand(1, 1, 2, 5)
    with pytest.raises(ValueError, match="v must be"):
        module(p, torch.rand(1, 1, 4, 3))
    with pytest.raises(ValueError, match="mask"):
        module(p, torch.rand(1, 1, 5, 3), torch.ones(1, 1, 2, 5))
    with pytest.raises(ValueError, match="mask"):
        module(p, torch.rand(1, 1, 5, 3), torch.ones(3, 1, 2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="alpha"):
        ContinuousContext(3.0)


def test_regression_operator_is_cached_per_length_and_is_the_ridge_solution():
    module = ContinuousContext(1.0, basis=16, widths="0.1/0.3", penalty=0.05)
    op = module.regression.sequence(7, "cpu", F64)
    assert module.regression.sequence(7, "cpu", F64) is op
    t = (torch.arange(7, dtype=F64) + 0.5) / 7
    bm, bs = module.basis_mu, module.basis_sigma
    F = torch.exp(-0.5 * ((t[None] - bm[:, None]) / bs[:, None]) ** 2) / (math.sqrt(2 * math.pi) * bs[:, None])
    torch.testing.assert_close(op, torch.linalg.solve(F @ F.T + 0.05 * torch.eye(16, dtype=F64), F))


# ----------------------------------------------------------------------------- the stand-alone layer


@pytest.mark.parametrize("location", ["query", "attention"])
@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_layer_padding_on_either_side_does_not_change_the_output(location, alpha):
    torch.manual_seed(0)
    layer = ContinuousAttention(5, alpha=alpha, location=location, value_dim=4, combine=location == "attention")
    q, v = torch.randn(2, 3, 5), torch.randn(2, 7, 4)
    ref = layer(q, v)
    pad = torch.randn(2, 2, 4)
    right = layer(q, torch.cat([v, pad], 1), torch.tensor([[True] * 7 + [False] * 2] * 2))
    left = layer(q, torch.cat([pad, v], 1), torch.tensor([[False] * 2 + [True] * 7] * 2))
    for out in (right, left):
        torch.testing.assert_close(out.context, ref.context, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.mu, ref.mu)
    assert ref.context.shape == (2, 3, 4) and ref.mu.shape == (2, 3) and ref.weights.shape == (2, 3, 7)
    assert (right.weights[..., 7:] == 0).all() and (left.weights[..., :2] == 0).all()


def test_layer_attention_location_places_the_density_at_the_moments_of_the_discrete_attention():
    torch.manual_seed(1)
    layer = ContinuousAttention(5, alpha=2.0, location="attention", value_dim=4, normalizer="sparsemax")
    out = layer(torch.randn(2, 3, 5), torch.randn(2, 9, 4))
    t = (torch.arange(9) + 0.5) / 9
    mean = (out.probs * t).sum(-1)
    var = (out.probs * (t - mean[..., None]) ** 2).sum(-1).clamp(min=1e-4)
    torch.testing.assert_close(out.mu, mean)
    torch.testing.assert_close(variance_from_scale(out.sigma_sq, 2.0), var, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 1.5, 2.0])
def test_2d_layer_uses_the_moments_of_the_discrete_attention_over_cell_centres(alpha):
    torch.manual_seed(2)
    layer = ContinuousAttention(6, alpha=alpha, ndim=2, location="attention", value_dim=4, combine=True)
    q, v = torch.randn(2, 3, 6, dtype=F64), torch.randn(2, 5, 4, 4, dtype=F64)
    layer.double()
    out = layer(q, v)
    assert out.context.shape == (2, 3, 4) and out.mu.shape == (2, 3, 2) and out.sigma_sq.shape == (2, 3, 2, 2)
    assert out.weights.shape == out.probs.shape == (2, 3, 5, 4)
    rows = (torch.arange(5, dtype=F64) + 0.5) / 5
    cols = (torch.arange(4, dtype=F64) + 0.5) / 4
    pos = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)
    p = out.probs.reshape(2, 3, 20)
    mean = p @ pos
    d = pos - mean[..., None, :]
    cov = torch.einsum("bqp,bqpi,bqpj->bqij", p, d, d) + 1e-4 * torch.eye(2, dtype=F64)
    torch.testing.assert_close(out.mu, mean)
    torch.testing.assert_close(variance_from_scale(out.sigma_sq, alpha, 2), cov)
    torch.testing.assert_close(out.weights.sum((-1, -2)), torch.ones(2, 3, dtype=F64))
    # combine: continuous context + discrete context
    plain = ContinuousAttention(6, alpha=alpha, ndim=2, location="attention", value_dim=4).double()
    plain.load_state_dict(layer.state_dict())
    torch.testing.assert_close(out.context, plain(q, v).context + p @ v.reshape(2, 20, 4))


def test_2d_layer_with_a_query_head_is_differentiable():
    torch.manual_seed(3)
    layer = ContinuousAttention(6, alpha=2.0, ndim=2)
    out = layer(torch.randn(2, 3, 6), torch.randn(2, 6, 6, 4))
    out.context.sum().backward()
    assert layer.location_head.weight.grad.abs().sum() > 0
    assert out.weights.shape == (2, 3, 6, 6) and (out.weights == 0).any()


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"alpha": 0.5}, "alpha"),
        ({"ndim": 3}, "ndim"),
        ({"location": "keys"}, "location"),
        ({"combine": True}, "combine"),
        ({"location": "attention"}, "value_dim"),
        ({"location": "attention", "value_dim": 4, "normalizer": "continuous_softmax"}, "normalizer"),
        ({"ndim": 2, "basis": 50}, "basis"),
        ({"basis": 63}, "basis"),
        ({"penalty": -1.0}, "penalty"),
        ({"min_var": 0.0}, "min_var"),
        ({"ndim": 2, "num_angles": 4}, "num_angles"),
    ],
)
def test_layer_rejects_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ContinuousAttention(5, **kwargs)


@pytest.mark.parametrize("ndim, location", [(1, "query"), (1, "attention"), (2, "attention"), (2, "query")])
def test_layer_in_bfloat16_computes_the_density_in_float32(ndim, location):
    torch.manual_seed(4)
    layer = ContinuousAttention(5, alpha=2.0, ndim=ndim, location=location, value_dim=4)
    q = torch.randn(2, 3, 5)
    v = torch.randn(2, 7, 4) if ndim == 1 else torch.randn(2, 3, 4, 4)
    ref = layer(q, v)
    out = layer.to(torch.bfloat16)(q.bfloat16(), v.bfloat16())
    assert out.context.dtype == torch.bfloat16 and out.mu.dtype == torch.float32
    torch.testing.assert_close(out.context.float(), ref.context, rtol=0.05, atol=0.05)


def test_layer_rejects_bad_inputs():
    layer = ContinuousAttention(5)
    with pytest.raises(ValueError, match="values"):
        layer(torch.randn(2, 3, 5), torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="mask"):
        layer(torch.randn(2, 3, 5), torch.randn(2, 7, 4), torch.ones(2, 7))
    with pytest.raises(ValueError, match="mask"):
        grid_layer = ContinuousAttention(5, ndim=2)
        grid_layer(torch.randn(2, 3, 5), torch.randn(2, 3, 3, 4), torch.ones(2, 9, dtype=torch.bool))


@pytest.mark.parametrize("penalty", [4e-17, 3e-15, 2e-9])
def test_every_documented_ridge_penalty_gives_the_ridge_operator(penalty):
    """A penalty below the rounding of F F^T (J = 64 > n keys: F F^T is singular, and its
    Cholesky factorization failed) still gives (F F^T + penalty I)^-1 F, checked against the same
    operator in 40-digit arithmetic (as F (F^T F + penalty I)^-1, from the same float64 F)."""
    mpmath = pytest.importorskip("mpmath")
    from plugin.continuous.basis import sequence_positions
    from plugin.continuous.expectations import evaluate_basis

    mech = plugin.AttentionMechanism(f"continuous_softmax:penalty={penalty!r}", num_heads=2)
    reg = mech.continuous.regression
    n = 23
    f = evaluate_basis(sequence_positions(n, device="cpu"), reg.basis_mu, reg.basis_sigma).T.double()
    with mpmath.workdps(40):
        fm = mpmath.matrix(f.tolist())
        exact = fm * mpmath.inverse(fm.T * fm + mpmath.mpf(penalty) * mpmath.eye(n))
        exact = torch.tensor([[float(exact[i, j]) for j in range(n)] for i in range(f.shape[0])], dtype=torch.float64)
    op = reg.sequence(n, "cpu", torch.float64)
    assert torch.isfinite(op).all()
    assert (op - exact).abs().max() < 1e-6 * exact.abs().max()
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for _ in range(3))
    assert torch.isfinite(mech(q, k, v)).all()
