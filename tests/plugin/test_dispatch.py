"""The extension point: a variant declares its paths, the dispatcher chooses and says why."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import plugin
from plugin import kernels
from plugin.kernels.chunked import c_kernel_available


def _qkv(seed=0, B=2, H=2, L=12, D=8):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=g) for _ in range(3))


def scaled_sparsemax(scores, dim=-1, mask=None, t=1.0):
    """A user's variant: sparsemax of ``scores / t`` written on its own (not plugin.sparsemax's gamma)."""
    z = scores / t
    return plugin.sparsemax(z, dim=dim, mask=mask)


@pytest.fixture
def user_variant():
    plugin.register_normalizer(
        "scaled_sparsemax", scaled_sparsemax,
        params=[plugin.Param("t", 1.0, float, low=0, low_inclusive=False)],
        paths=plugin.paths.threshold_family(alpha=2.0, gamma="t"),
    )
    yield "scaled_sparsemax"
    plugin.unregister("scaled_sparsemax")


@pytest.mark.skipif(not c_kernel_available(), reason="no C compiler for the row kernel")
def test_a_user_threshold_variant_gets_the_chunked_path_and_equals_its_reference(user_variant):
    q, k, v = _qkv()
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :4] = False
    results = {}
    for path in (None, "reference"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        with kernels.use_path(path), plugin.record_calls() as calls:
            out = plugin.attention(*leaves, "scaled_sparsemax:t=0.7", mask=mask)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), leaves)
        results[calls[0].path] = (out.detach(), grads)
    assert set(results) == {"cpu_chunked", "reference"}
    (out, grads), (ref, ref_grads) = results["cpu_chunked"], results["reference"]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-3)
    # the same maths as the built-in temperature of sparsemax
    torch.testing.assert_close(out, plugin.attention(q, k, v, "sparsemax:gamma=0.7", mask=mask), atol=2e-5, rtol=1e-4)


def test_a_variant_without_paths_takes_the_reference_path_and_says_why():
    plugin.register_normalizer("plain_sparsemax", scaled_sparsemax)
    try:
        q, k, v = _qkv()
        with plugin.record_calls() as calls:
            plugin.attention(q, k, v, "plain_sparsemax")
        assert calls[0].path == "reference"
        assert calls[0].refused == {"*": "the variant declares no fast path"}
    finally:
        plugin.unregister("plain_sparsemax")
    assert "plain_sparsemax" not in plugin.variants()
    with pytest.raises(ValueError, match="not registered"):
        plugin.unregister("plain_sparsemax")


def test_refusals_are_recorded_by_path():
    q, k, v = _qkv()
    choice = plugin.explain_path(q, k, v, "sparsemax", return_weights=True)
    assert choice.name == "reference"
    assert set(choice.refused) == {"triton", "cpu_chunked", "cpu_chunked_torch"}
    assert all("weights" in reason for reason in choice.refused.values())
    choice = plugin.explain_path(q.double(), k.double(), v.double(), "entmax:alpha=1.3")
    assert choice.name == "reference" and "float64" in choice.refused["cpu_chunked"]
    assert "not 1" in choice.refused["sdpa"]
    with kernels.use_path("sdpa"):  # a forced path the variant does not declare keeps the reference
        assert plugin.explain_path(q, k, v, "sparsemax").refused == {"sdpa": "forced, but not a path of this variant"}
    with kernels.reference_path():
        assert plugin.explain_path(q, k, v, "softmax").name == "reference"


def test_a_forced_path_that_cannot_run_here_raises():
    q, k, v = _qkv()
    with kernels.use_path("triton"), pytest.raises(ValueError, match="'triton' attention path cannot run.*CUDA"):
        plugin.explain_path(q, k, v, "entmax15")


class ThirdPartyContinuous(nn.Module):
    """A continuous context without the moment protocol: uniform weights over the existing keys."""

    def forward(self, probs, v, mask):
        w = torch.ones_like(probs) if mask is None else mask.expand_as(probs).to(probs.dtype)
        w = w / w.sum(-1, keepdim=True).clamp(min=1)
        return w @ v, w


def test_a_continuous_variant_without_the_protocol_takes_the_reference_path_and_says_why():
    plugin.register_continuous("third_party_continuous", lambda num_heads=None: ThirdPartyContinuous())
    try:
        q, k, v = _qkv()
        with plugin.record_calls() as calls:
            out = plugin.attention(q, k, v, "sparsemax+third_party_continuous")
        assert calls[0].path == "reference"
        assert "MomentContext" in calls[0].refused["+continuous"]
        torch.testing.assert_close(out, plugin.attention(q, k, v, "sparsemax") + v.mean(2, keepdim=True).expand_as(out))
    finally:
        plugin.unregister("third_party_continuous")
    assert isinstance(plugin.AttentionMechanism("continuous_softmax").continuous, plugin.continuous.MomentContext)


def test_the_plain_function_of_a_variant_keeps_its_paths():
    q, k, v = _qkv()
    assert plugin.explain_path(q, k, v, plugin.AttentionMechanism(plugin.sparsemax)).name == (
        "cpu_chunked" if c_kernel_available() else "reference")
    assert plugin.explain_path(q, k, v, plugin.AttentionMechanism(plugin.softmax)).name == "sdpa"
    assert plugin.explain_path(q, k, v, plugin.AttentionMechanism(lambda s, dim=-1, mask=None: s)).name == "reference"


@pytest.mark.parametrize("alpha", [1.3, "learned"])
def test_an_entmax_module_handed_in_keeps_the_entmax_paths(alpha):
    q, k, v = _qkv()
    module = plugin.normalizers.EntmaxNormalizer(alpha, num_heads=q.shape[1])
    mech = plugin.AttentionMechanism(module)
    assert plugin.explain_path(q, k, v, mech).name == ("cpu_chunked" if c_kernel_available() else "reference")
    with kernels.use_path("reference"):
        ref = mech(q, k, v)
    torch.testing.assert_close(mech(q, k, v), ref, atol=2e-5, rtol=1e-4)


def test_declared_paths_are_checked():
    with pytest.raises(ValueError, match="paths must hold plugin.paths.Path"):
        plugin.register_normalizer("bad_paths", scaled_sparsemax, paths=["cpu_chunked"])
    assert "bad_paths" not in plugin.variants()
    with pytest.raises(ValueError, match="name must be one of sdpa, cpu_chunked"):
        plugin.paths.Path("fastest", lambda call: None, lambda call: None)
    with pytest.raises(ValueError, match="kind must be one of"):
        plugin.paths.structured_chunked("oscar")
