"""Parameters are validated where they are parsed, and every accepted value computes."""

import math

import pytest
import torch

import plugin
from plugin.normalizers.structured import oscar_ordered_prox, oscar_prox, tv_prox


@pytest.mark.parametrize("spec, field", [
    ("continuous_softmax:widths=abc", "widths"),
    ("continuous_softmax:basis=3", "basis"),
    ("continuous_sparsemax:basis=1", "basis"),  # the default widths are two: 1 never worked
    ("continuous_softmax:min_var=1e300", "min_var"),
    ("continuous_entmax15:widths=1e-300", "widths"),
    ("continuous_softmax:basis=1000000", "basis"),
    ("sparsemax:gamma=1e-45", "gamma"),
    ("softmax:gamma=1e-45", "gamma"),
    ("fusedmax:lam=inf", "lam"),
    ("oscarmax:lam=nan", "lam"),
    ("fusedmax:gamma=1e-300", "gamma"),
])
def test_values_that_cannot_compute_are_refused_when_the_spec_is_parsed(spec, field):
    with pytest.raises(ValueError, match=field):
        plugin.parse_spec(spec)


@pytest.mark.parametrize("spec", [
    "continuous_softmax:widths=0.1,basis=1",
    "continuous_sparsemax:basis=4096",
    "continuous_entmax15:min_var=1",
    "continuous_softmax:widths=0.0001/10000,basis=2",
    "sparsemax+continuous_softmax:penalty=1000000",
])
def test_accepted_continuous_parameters_compute(spec):
    q = torch.randn(2, 2, 7, 4)
    out = plugin.attention(q, q, q, spec)
    assert torch.isfinite(out).all()


def test_fairseq_parse_time_check_refuses_them():
    pytest.importorskip("fairseq")
    import argparse

    from user_dir.options import attention_spec

    for spec, field in (("continuous_softmax:widths=abc", "widths"), ("continuous_softmax:basis=3", "basis"),
                        ("sparsemax:gamma=1e-45", "gamma"), ("continuous_softmax:min_var=1e300", "min_var")):
        with pytest.raises(argparse.ArgumentTypeError, match=field):
            attention_spec(spec)


@pytest.mark.parametrize("fn, kwargs, name", [
    (plugin.sparsemax, {"gamma": 1e-45}, "gamma"),
    (plugin.softmax, {"gamma": float("nan")}, "gamma"),
    (plugin.fusedmax, {"lam": float("inf")}, "lam"),
    (plugin.oscarmax, {"lam": float("inf")}, "lam"),
    (plugin.fusedmax, {"gamma": float("inf")}, "gamma"),
    (tv_prox, {"lam": float("inf")}, "lam"),
    (oscar_prox, {"lam": float("nan")}, "lam"),
    (plugin.sparsemax, {"dim": "last"}, "dim"),
])
def test_the_function_api_refuses_the_same_values(fn, kwargs, name):
    with pytest.raises(ValueError, match=name):
        fn(torch.randn(3, 5), **kwargs)


@pytest.mark.parametrize("lam", [1e6, 1e16, 1e38, 1e300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_very_large_lam_gives_the_uniform_limit(lam, dtype):
    x = torch.randn(4, 7, dtype=dtype)
    for fn in (plugin.fusedmax, plugin.oscarmax):
        torch.testing.assert_close(fn(x, lam=lam), torch.full_like(x, 1 / 7))
        with plugin.use_path("cpu_chunked"):
            q = torch.randn(1, 2, 5, 4, dtype=dtype)
            out = plugin.attention(q, q, q, f"{fn.__name__}:lam={lam!r}".replace("e+", "e"))
        torch.testing.assert_close(out, q.mean(-2, keepdim=True).expand_as(q), atol=1e-5, rtol=1e-5)


def test_tv_prox_is_exact_for_a_huge_lam_in_float64():
    x = torch.randn(5, 9, dtype=torch.float64)
    y = tv_prox(x, 1e16)  # one group per row: the row mean
    torch.testing.assert_close(y, x.mean(-1, keepdim=True).expand_as(x), rtol=0, atol=1e-12)
    z = oscar_ordered_prox(x, 1e16)  # one group, moved by -lam (d - 1) / 2
    torch.testing.assert_close(z, (x.mean(-1, keepdim=True) - 1e16 * 4).expand_as(x), rtol=1e-15, atol=0)
    assert oscar_prox(x, 1e16).abs().max() == 0


def test_huge_lam_keeps_the_prox_jacobian_of_one_group():
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    (tv_prox(x, 1e30) * torch.arange(6.0, dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.5))


@pytest.mark.parametrize("name", ["softmax", "sparsemax", "fusedmax", "oscarmax"])
def test_gamma_divides_after_the_row_maximum_is_subtracted(name):
    # float32 scores near 1e4 with gamma = 3: dividing first rounds at 1e4 / 3 (1.2e-4 off)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 9, generator=g, dtype=torch.float64) * 3 + 1e4).float()
    kwargs = {"gamma": 3.0} if name in ("softmax", "sparsemax") else {"gamma": 3.0, "lam": 0.01}
    fn = getattr(plugin, name)
    error = (fn(x, **kwargs).double() - fn(x.double(), **kwargs)).abs().max().item()
    assert error < 1e-6, error


def test_the_smallest_gamma_still_trains():
    x = torch.randn(4, 6, requires_grad=True)
    p = plugin.sparsemax(x, gamma=1e-6)
    (p * torch.randn(4, 6)).sum().backward()
    assert torch.isfinite(p).all() and torch.isfinite(x.grad).all()
    assert math.isclose(float(p.detach().sum()), 4.0, rel_tol=1e-6)


def test_the_continuous_context_module_refuses_a_variance_floor_that_overflows():
    from plugin.continuous import ContinuousContext

    with pytest.raises(ValueError, match="min_var"):
        ContinuousContext(alpha=2.0, min_var=1e300)
    assert ContinuousContext(alpha=2.0, min_var=1.0).min_var == 1.0
