"""Second derivatives of alpha-entmax through a learned (tensor) alpha."""

import pytest
import torch

import plugin


@pytest.mark.parametrize("alpha", [1.25, 1.8])
def test_gradgradcheck_through_a_tensor_alpha(alpha):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64).requires_grad_()
    al = torch.full((3,), alpha, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, a: plugin.entmax(x, alpha=a), (x, al))
    assert torch.autograd.gradgradcheck(lambda x, a: plugin.entmax(x, alpha=a), (x, al))


def test_mixed_second_derivative_matches_central_differences():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 5, generator=g, dtype=torch.float64)
    w = torch.randn(2, 5, generator=g, dtype=torch.float64)
    al = torch.tensor([1.4, 1.6], dtype=torch.float64)

    def dloss_dalpha(x):
        a = al.clone().requires_grad_()
        (da,) = torch.autograd.grad((plugin.entmax(x, alpha=a) * w).sum(), a)
        return da.sum()

    xx = x.clone().requires_grad_()
    a = al.clone().requires_grad_()
    (da,) = torch.autograd.grad((plugin.entmax(xx, alpha=a) * w).sum(), a, create_graph=True)
    (mixed,) = torch.autograd.grad(da.sum(), xx)
    h = 1e-6
    numeric = torch.zeros_like(x)
    for idx in range(x.numel()):
        e = torch.zeros(x.numel(), dtype=torch.float64)
        e[idx] = h
        e = e.view_as(x)
        numeric.view(-1)[idx] = (dloss_dalpha(x + e) - dloss_dalpha(x - e)) / (2 * h)
    torch.testing.assert_close(mixed, numeric, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("path", ["cpu_chunked", "cpu_chunked_torch"])
def test_chunked_paths_refuse_a_second_derivative_instead_of_returning_wrong_numbers(path):
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    mech = plugin.AttentionMechanism("entmax:alpha=learned", num_heads=2)
    qq = q.requires_grad_()
    with plugin.use_path(path):
        out = mech(qq, k, v)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(out.sum(), [qq, *mech.parameters()], create_graph=True)
