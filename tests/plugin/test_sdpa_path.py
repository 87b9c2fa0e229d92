"""softmax's fast path ("sdpa": torch's fused scaled_dot_product_attention) against the reference path."""

import pytest
import torch

import plugin
from plugin import kernels


def _case(masking, B=2, H=4, Hkv=4, Lq=9, Lk=13, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=dtype) * 1.5
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype) * 1.5
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=dtype)
    kw = {}
    if masking == "padding":  # right padding in one batch element, left in the other
        mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        mask[0, ..., Lk - 4:] = False
        mask[1, ..., :3] = False
        kw["mask"] = mask
    elif masking == "causal":
        kw["causal"] = True
    elif masking == "arbitrary+causal":
        kw["mask"] = torch.rand(B, H, Lq, Lk, generator=g) > 0.3
        kw["causal"] = True
    elif masking == "additive":
        bias = torch.randn(B, 1, Lq, Lk, generator=g, dtype=dtype)
        bias[..., 3] = float("-inf")
        kw["mask"] = bias
    elif masking == "fully_masked_rows":
        mask = torch.ones(B, 1, Lq, Lk, dtype=torch.bool)
        mask[0, :, 2] = False
        mask[1, :, :3] = False
        kw["mask"] = mask
    elif masking == "fully_masked_additive":
        bias = torch.zeros(B, 1, Lq, Lk, dtype=dtype)
        bias[1, :, 4] = float("-inf")
        kw["mask"] = bias
    return q, k, v, kw


def _run(spec, q, k, v, kw, dtype, path):
    mech = plugin.AttentionMechanism(spec, num_heads=q.shape[1])
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    kw = {key: (val.to(dtype) if isinstance(val, torch.Tensor) and val.is_floating_point() else val)
          for key, val in kw.items()}
    with kernels.use_path(path), plugin.record_calls() as calls:
        out = mech(*leaves, **kw)
    weight = torch.linspace(-1, 2, out.numel(), dtype=torch.float64).view_as(out)
    grads = torch.autograd.grad((out.double() * weight).sum(), leaves)
    return out.double(), [g.double() for g in grads], calls[0].path


MASKINGS = ["none", "padding", "causal", "arbitrary+causal", "additive", "fully_masked_rows", "fully_masked_additive"]


@pytest.mark.parametrize("masking", MASKINGS)
@pytest.mark.parametrize("spec", ["softmax", "softmax:gamma=0.5"])
def test_sdpa_path_equals_the_reference_path(spec, masking):
    q, k, v, kw = _case(masking)
    out, grads, path = _run(spec, q, k, v, kw, torch.float64, None)
    ref, ref_grads, ref_path = _run(spec, q, k, v, kw, torch.float64, "reference")
    assert (path, ref_path) == ("sdpa", "reference")
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)
    if masking == "fully_masked_rows":
        assert (out[0, :, 2] == 0).all() and (out[1, :, :3] == 0).all()


@pytest.mark.parametrize("masking", ["none", "causal", "padding"])
def test_sdpa_path_with_grouped_query_attention_and_decoding(masking):
    q, k, v, kw = _case(masking, H=6, Hkv=2, Lq=1 if masking == "causal" else 9)
    out, grads, path = _run("softmax", q, k, v, kw, torch.float64, None)
    ref, ref_grads, _ = _run("softmax", q, k, v, kw, torch.float64, "reference")
    assert path == "sdpa"
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sdpa_path_in_lower_precision(dtype):
    q, k, v, kw = _case("padding", Lq=40, Lk=70, D=16)
    q = q * 30  # large scores: no overflow in half precision
    q, k, v = (t.to(dtype).double() for t in (q, k, v))  # the reference sees the same rounded inputs
    out, grads, path = _run("softmax", q, k, v, kw, dtype, None)
    ref, ref_grads, _ = _run("softmax", q, k, v, kw, torch.float64, "reference")
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    assert path == "sdpa" and all(bool(torch.isfinite(g).all()) for g in grads)
    torch.testing.assert_close(out, ref, atol=tol * 4, rtol=tol * 4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=tol * 30 * max(1.0, float(r.abs().max())), rtol=0)


def test_sdpa_path_bias_gradient_and_dropout():
    q, k, v, _ = _case("none", dtype=torch.float32)
    bias = torch.randn(2, 1, 9, 13, requires_grad=True)
    grads = {}
    for path in (None, "reference"):
        with kernels.use_path(path):
            out = plugin.attention(q, k, v, mask=bias)
        grads[path] = torch.autograd.grad(out.square().sum(), bias)[0]
    torch.testing.assert_close(grads[None], grads["reference"], atol=1e-5, rtol=1e-4)
    # dropout stays on the fused path: the expected output is unchanged, individual runs are not
    with plugin.record_calls() as calls:
        outs = torch.stack([plugin.attention(q, k, v, dropout_p=0.5) for _ in range(400)])
    assert {c.path for c in calls} == {"sdpa"}
    assert not torch.equal(outs[0], outs[1])
    error = (outs.mean(0) - plugin.attention(q, k, v)).abs()
    assert float(error.mean()) < 0.05 and float(error.max()) < 0.4, (float(error.mean()), float(error.max()))


def test_forcing_another_fast_path_keeps_softmax_on_the_reference(monkeypatch):
    q, k, v, _ = _case("none", dtype=torch.float32)
    with kernels.use_path("cpu_chunked"), plugin.record_calls() as calls:
        plugin.attention(q, k, v)
    assert calls[0].path == "reference"
    monkeypatch.setenv("PLUGIN_ATTENTION_PATH", "sdpa")
    with plugin.record_calls() as calls:
        plugin.attention(q, k, v)
        plugin.attention(q, k, v, "sparsemax")
    assert [c.path for c in calls] == ["sdpa", "reference"]
