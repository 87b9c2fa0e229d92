"""The discrete normalizers against independent references (the entmax package, gradcheck)."""

import entmax as entmax_pkg
import pytest
import torch

import plugin

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _call(name, x, **kw):
    if name == "entmax13":
        return plugin.entmax(x, alpha=1.3, **kw)
    return getattr(plugin, name)(x, **kw)


ALL = ["softmax", "sparsemax", "entmax15", "entmax13"]


@pytest.mark.parametrize("shape", [(7,), (4, 9), (2, 3, 17)])
def test_sparsemax_matches_entmax_package(shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 3
    torch.testing.assert_close(plugin.sparsemax(x), entmax_pkg.sparsemax(x, dim=-1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_entmax15_matches_entmax_package_along_any_dim(dim):
    torch.manual_seed(1)
    x = torch.randn(5, 6, 7, dtype=torch.float64) * 2
    torch.testing.assert_close(plugin.entmax15(x, dim=dim), entmax_pkg.entmax15(x, dim=dim), rtol=0, atol=1e-12)


@pytest.mark.parametrize("alpha", [1.1, 1.3, 1.5, 1.75, 2.0])
def test_entmax_matches_entmax_bisect(alpha):
    torch.manual_seed(2)
    x = torch.randn(6, 11, dtype=torch.float64) * 2
    ref = entmax_pkg.entmax_bisect(x, alpha, dim=-1, n_iter=80)
    torch.testing.assert_close(plugin.entmax(x, alpha=alpha), ref, rtol=0, atol=1e-9)


def test_entmax_with_tensor_alpha_per_row_matches_rowwise_reference():
    torch.manual_seed(3)
    x = torch.randn(4, 3, 9, dtype=torch.float64)
    alpha = torch.tensor([1.2, 1.5, 1.9], dtype=torch.float64)  # one per middle index: dim reduced -> (4, 3)
    out = plugin.entmax(x, alpha=alpha.view(1, 3), dim=-1)
    for j, a in enumerate(alpha.tolist()):
        torch.testing.assert_close(
            out[:, j], entmax_pkg.entmax_bisect(x[:, j], a, dim=-1, n_iter=80), atol=1e-9, rtol=0
        )


def test_entmax_alpha_gradient_matches_entmax_package():
    torch.manual_seed(4)
    x = torch.randn(5, 8, dtype=torch.float64)
    g = torch.randn(5, 8, dtype=torch.float64)
    a1 = torch.full((5, 1), 1.4, dtype=torch.float64, requires_grad=True)
    a2 = a1.detach().clone().requires_grad_()
    (entmax_pkg.entmax_bisect(x, a1, dim=-1, n_iter=80) * g).sum().backward()
    (plugin.entmax(x, alpha=a2) * g).sum().backward()
    torch.testing.assert_close(a2.grad, a1.grad, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_gradcheck_float64(name):
    torch.manual_seed(5)
    x = (torch.randn(3, 6, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _call(name, t), (x,))


@pytest.mark.parametrize("name", ["softmax", "sparsemax"])
def test_gradcheck_with_gamma(name):
    torch.manual_seed(6)
    x = (torch.randn(3, 6, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _call(name, t, gamma=0.6), (x,))


def test_gradcheck_entmax_with_respect_to_alpha_and_scores():
    torch.manual_seed(7)
    x = torch.randn(3, 2, 6, dtype=torch.float64).requires_grad_()
    a = torch.tensor([[1.3], [1.7]], dtype=torch.float64, requires_grad=True)  # per middle index
    assert torch.autograd.gradcheck(lambda t, al: plugin.entmax(t, alpha=al), (x, a))


@pytest.mark.parametrize("name", ALL)
def test_gradcheck_with_mask(name):
    torch.manual_seed(8)
    x = (torch.randn(4, 7, dtype=torch.float64) * 2).requires_grad_()
    mask = torch.rand(4, 7) > 0.3
    mask[:, 0] = True
    assert torch.autograd.gradcheck(lambda t: _call(name, t, mask=mask), (x,))


@pytest.mark.parametrize("name", ALL)
def test_outputs_lie_on_the_simplex(name):
    torch.manual_seed(9)
    p = _call(name, torch.randn(20, 13, dtype=torch.float64) * 4)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(20, dtype=torch.float64))


@pytest.mark.parametrize("name", ["sparsemax", "entmax15", "entmax13"])
def test_sparse_normalizers_give_exact_zeros(name):
    torch.manual_seed(10)
    p = _call(name, torch.randn(50, 40) * 5)
    assert (p == 0).float().mean() > 0.3


@pytest.mark.parametrize("name", ALL)
def test_masked_entries_are_exactly_zero_and_match_the_compressed_row(name):
    torch.manual_seed(11)
    x = torch.randn(6, 10, dtype=torch.float64)
    mask = torch.rand(6, 10) > 0.4
    mask[:, 3] = True
    x.requires_grad_()
    p = _call(name, x, mask=mask)
    assert (p[~mask] == 0).all()
    for r in range(6):
        torch.testing.assert_close(p[r, mask[r]], _call(name, x[r, mask[r]].detach()), atol=1e-9, rtol=0)
    (p * torch.randn_like(p)).sum().backward()
    assert (x.grad[~mask] == 0).all()


@pytest.mark.parametrize("name", ALL)
def test_padding_and_causal_masks_broadcast(name):
    torch.manual_seed(12)
    scores = torch.randn(2, 3, 5, 5)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    pad = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None, :]
    p = _call(name, scores, mask=causal & pad)
    assert (p[..., ~causal] == 0).all()
    assert (p[0, ..., 4] == 0).all() and (p[1, ..., 0] == 0).all()
    assert (p[1, :, 0] == 0).all()  # row 0 of the second sequence has no allowed key: zeros


@pytest.mark.parametrize("name", ALL)
def test_fully_masked_rows_give_zeros_and_no_nan_gradients(name):
    x = torch.randn(3, 5, requires_grad=True)
    mask = torch.tensor([[True] * 5, [False] * 5, [True, False, True, False, False]])
    p = _call(name, x, mask=mask)
    assert (p[1] == 0).all() and not torch.isnan(p).any()
    p.sum().backward()
    assert not torch.isnan(x.grad).any() and (x.grad[1] == 0).all()


@pytest.mark.parametrize("name", ALL)
def test_minus_inf_scores_behave_like_masked_entries(name):
    torch.manual_seed(13)
    x = torch.randn(4, 6)
    mask = torch.rand(4, 6) > 0.5
    mask[0] = False
    mask[1:, 2] = True
    xi = x.masked_fill(~mask, float("-inf")).requires_grad_()
    p = _call(name, xi)
    torch.testing.assert_close(p, _call(name, x, mask=mask))
    p.sum().backward()
    assert not torch.isnan(xi.grad).any()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_are_computed_in_float32_and_returned_in_the_input_dtype(name, dtype):
    torch.manual_seed(14)
    x = torch.randn(4, 16) * 3
    p = _call(name, x.to(dtype))
    assert p.dtype == dtype
    ref = _call(name, x.to(dtype).to(torch.float32))
    torch.testing.assert_close(p.to(torch.float32), ref, atol=4e-3, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_large_half_precision_scores_do_not_overflow(name):
    x = torch.tensor([[1e4, -1e4, 3.0, 9.99e3], [6e4, 6e4, -6e4, 0.0]], dtype=torch.float16)
    p = _call(name, x)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.float().sum(-1), torch.ones(2), atol=1e-3, rtol=0)
    assert p[0, 1] == 0 and p[1, 2] == 0


def test_gamma_scales_scores_like_a_temperature():
    torch.manual_seed(15)
    x = torch.randn(3, 8)
    torch.testing.assert_close(plugin.sparsemax(x, gamma=2.0), plugin.sparsemax(x / 2.0))
    torch.testing.assert_close(plugin.softmax(x, gamma=0.5), torch.softmax(x * 2, -1))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), "a", True])
def test_bad_gamma_raises(bad):
    with pytest.raises(ValueError, match="gamma"):
        plugin.sparsemax(torch.randn(3), gamma=bad)


@pytest.mark.parametrize("bad", [0.999, 0.5, 2.5, "x", None])
def test_bad_alpha_raises(bad):
    with pytest.raises(ValueError, match="alpha"):
        plugin.entmax(torch.randn(3), alpha=bad)


def test_bad_alpha_tensor_shape_raises():
    with pytest.raises(ValueError, match="alpha"):
        plugin.entmax(torch.randn(4, 5), alpha=torch.full((3,), 1.5))


def test_bad_mask_raises():
    with pytest.raises(ValueError, match="mask"):
        plugin.sparsemax(torch.randn(4, 5), mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        plugin.sparsemax(torch.randn(4, 5), mask=torch.ones(4, 5))


def test_learnable_alpha_stays_in_range_and_learns():
    mod = plugin.LearnableAlpha(3, init=1.5)
    torch.testing.assert_close(mod(), torch.full((3, 1), 1.5))
    with torch.no_grad():
        mod.weight.copy_(torch.tensor([-50.0, 0.0, 50.0]))
    a = mod()
    assert (a > 1).all() and (a <= 2).all()
    with pytest.raises(ValueError, match="init"):
        plugin.LearnableAlpha(2, init=0.9)
    with pytest.raises(ValueError, match="num_heads"):
        plugin.LearnableAlpha(0)


def test_learned_alpha_normalizer_gets_gradient_per_head():
    norm = plugin.get_normalizer("entmax:alpha=learned", num_heads=3)
    scores = torch.randn(2, 3, 4, 6)
    target = torch.zeros(2, 3, 4, 6)
    target[..., 0] = 1
    loss = ((norm(scores) - target) ** 2).sum()
    loss.backward()
    grad = norm.learned.weight.grad
    assert grad is not None and grad.shape == (3,) and (grad != 0).all()
    with pytest.raises(ValueError, match="num_heads"):
        norm(torch.randn(2, 5, 4, 6))


@pytest.mark.parametrize("scale", [1e-3, 1.0, 10.0, 1e3])
def test_sort_free_thresholds_equal_the_sort_based_ones_with_ties_and_masked_fill(scale):
    from plugin.normalizers.entmax import entmax15_threshold, entmax15_threshold_sorted
    from plugin.normalizers.sparsemax import simplex_threshold, simplex_threshold_sorted

    torch.manual_seed(16)
    x = torch.randn(200, 33, dtype=torch.float64) * scale
    x[::3, 4:9] = x[::3, 4:5]  # ties
    x = x - x.amax(-1, keepdim=True)
    x[::5, 12:] = torch.where(x[::5, 12:] < 0, -2.0, 0.0)  # the fill used for masked entries
    torch.testing.assert_close(simplex_threshold(x), simplex_threshold_sorted(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(entmax15_threshold(x / 2), entmax15_threshold_sorted(x / 2), atol=1e-12, rtol=0)
