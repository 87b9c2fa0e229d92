"""Continuous specs through plugin.attention: the fast path (moments from one fused call) against the reference."""

import pytest
import torch

import plugin
from plugin import kernels

SPECS = [
    "continuous_softmax",
    "continuous_sparsemax",
    "continuous_entmax15:basis=32,widths=0.05/0.2",
    "sparsemax+continuous_softmax",
    "entmax15+continuous_sparsemax",
    "softmax+continuous_entmax15",
]


def _case(masking, B=2, H=4, Hkv=4, Lq=7, Lk=40, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64) * 2
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64) * 2
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    mask = None
    if masking == "padding":  # right padding in one batch element, left padding in the other
        mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        mask[0, ..., Lk - 9:] = False
        mask[1, ..., :6] = False
    elif masking == "empty_batch_element":
        mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        mask[1] = False
    elif masking == "per_head":
        mask = torch.ones(B, H, 1, Lk, dtype=torch.bool)
        for h in range(H):
            mask[:, h, :, : 3 * h] = False
    return q, k, v, mask


def _run(mech, q, k, v, mask, dtype, reference):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    with plugin.record_calls() as calls:
        if reference:
            with kernels.reference_path():
                out = mech(*leaves, mask=mask)
        else:
            out = mech(*leaves, mask=mask)
    weight = torch.linspace(-1, 2, out.numel(), dtype=torch.float64).view_as(out)
    grads = torch.autograd.grad((out.double() * weight).sum(), leaves)
    return out.double(), [g.double() for g in grads], calls[0].path


@pytest.mark.parametrize("masking", ["none", "padding", "empty_batch_element", "per_head"])
@pytest.mark.parametrize("spec", SPECS)
def test_continuous_fast_path_equals_the_reference(spec, masking):
    q, k, v, mask = _case(masking)
    mech = plugin.AttentionMechanism(spec, num_heads=4)
    softmax_base = not spec.startswith(("sparsemax", "entmax15"))
    # float64: the sparse discrete normalizers keep their reference path in float64, softmax's is SDPA
    dtypes = [torch.float32] + ([torch.float64] if softmax_base else [])
    ref, ref_grads, ref_path = _run(mech, q, k, v, mask, torch.float64, True)
    assert ref_path == "reference"
    for dtype in dtypes:
        out, grads, path = _run(mech, q, k, v, mask, dtype, False)
        assert path == ("sdpa" if softmax_base else "cpu_chunked") + "+continuous"
        tol = 1e-7 if dtype == torch.float64 else 2e-4
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=tol * 10 * max(1.0, float(r.abs().max())), rtol=0)
    if masking == "empty_batch_element":
        assert (out[1] == 0).all() and all(bool((g[1] == 0).all()) for g in grads)


@pytest.mark.parametrize("spec", ["continuous_softmax", "sparsemax+continuous_sparsemax"])
def test_continuous_fast_path_with_grouped_query_attention(spec):
    q, k, v, mask = _case("padding", H=6, Hkv=2)
    mech = plugin.AttentionMechanism(spec, num_heads=6)
    out, grads, path = _run(mech, q, k, v, mask, torch.float32, False)
    kr, vr = k.repeat_interleave(3, 1), v.repeat_interleave(3, 1)
    ref, ref_grads, _ = _run(mech, q, kr, vr, mask, torch.float64, True)
    assert path.endswith("+continuous")
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(grads[0], ref_grads[0], atol=2e-3, rtol=0)
    # the repeated heads' key/value gradients add up to the grouped ones
    for g, r in zip(grads[1:], ref_grads[1:]):
        torch.testing.assert_close(g, r.view(2, 2, 3, 40, 8).sum(2), atol=2e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_continuous_fast_path_in_half_precision(dtype):
    q, k, v, mask = _case("padding")
    q, k, v = (t.to(dtype).double() for t in (q * 10, k, v))  # large scores; same rounded inputs for both
    mech = plugin.AttentionMechanism("sparsemax+continuous_softmax", num_heads=4)
    out, grads, path = _run(mech, q, k, v, mask, dtype, False)
    ref, _, _ = _run(mech, q, k, v, mask, torch.float64, True)
    assert path == "cpu_chunked+continuous" and all(bool(torch.isfinite(g).all()) for g in grads)
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("spec, width", [("continuous_sparsemax", 8), ("softmax+continuous_entmax15", 10)])
def test_sdpa_attends_the_positions_at_the_query_head_size_when_alone(monkeypatch, spec, width):
    # a continuous-only spec needs the moments of the positions only: two columns padded to the
    # query's head size (D = 8); with the discrete context they ride along the values (D + 2)
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[-1], v.shape[-1]))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    q, k, v, mask = _case("padding")
    out, grads, path = _run(plugin.AttentionMechanism(spec, num_heads=4), q, k, v, mask, torch.float32, False)
    assert path == "sdpa+continuous" and seen == [(width, width)]


def test_per_query_masks_weights_and_dropout_keep_the_reference_path():
    q, k, v, mask = _case("none")
    qf, kf, vf = q.float(), k.float(), v.float()
    mech = plugin.AttentionMechanism("continuous_softmax", num_heads=4)
    with plugin.record_calls() as calls:
        mech(qf, kf, vf, causal=True)
        mech(qf, kf, vf, mask=torch.rand(2, 4, 7, 40) > 0.5)
        mech(qf, kf, vf, mask=torch.zeros(2, 1, 1, 40))  # additive
        mech(qf, kf, vf, return_weights=True)
        mech(qf, kf, vf, dropout_p=0.1)
    assert [c.path for c in calls] == ["reference"] * 5
