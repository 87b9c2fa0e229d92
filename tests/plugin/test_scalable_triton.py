"""The ``triton`` path of ``scalable_entmax`` against the float64 reference path, gradients included.

Without a GPU the declared path's runner (``length_scaled`` around the Triton kernels) runs under
Triton's interpreter in a subprocess (``TRITON_INTERPRET=1``, read when the kernels are imported):
this module is also that subprocess's program (``python test_scalable_triton.py --worker``). The
runner is built from the variant's declared ``triton`` path, as the dispatcher builds it on CUDA
(on CPU its ``supports`` refuses, so the test builds it directly). The last test needs a CUDA GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tests.triton_interpreter import case_result, print_case_results
from tests.triton_interpreter import interpreter_results as run_interpreter_worker

ROOT = Path(__file__).resolve().parents[2]

# name -> (spec, masking, sizes (B, H, Hkv, Lq, Lk, D))
CASES = {
    "learned-length-causal": ("scalable_entmax", "causal", (1, 2, 1, 20, 20, 16)),
    "learned-alpha-padding": ("scalable_entmax:alpha=learned", "padding", (2, 2, 2, 18, 35, 16)),
    # fixed length parameters: the scaled additive mask needs no gradient (the kernels take none)
    "sparsemax-additive": ("scalable_entmax:alpha=2,beta=0.6,gamma=-0.3", "additive", (1, 2, 2, 17, 21, 16)),
    "decoding-long-cache": ("scalable_entmax:alpha=learned", "causal", (1, 2, 1, 1, 70, 16)),
    "fixed-cached-prefix": ("scalable_entmax:beta=0.8,gamma=0.5", "causal+padding", (2, 2, 2, 5, 33, 16)),
}


def _inputs(masking, sizes, seed=0):
    B, H, Hkv, Lq, Lk, D = sizes
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    mask = bias = None
    causal = "causal" in masking
    if "padding" in masking:
        mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        mask[-1, ..., Lk // 2:] = False
    if masking == "additive":
        bias = torch.randn(B, 1, Lq, Lk, generator=g, dtype=torch.float64)
        bias[..., 3] = float("-inf")
    return q, k, v, mask, bias, causal


def _run_case(spec, masking, sizes):
    import plugin
    from plugin import kernels
    from plugin.paths import Call

    q, k, v, mask, bias, causal = _inputs(masking, sizes)
    mech = plugin.AttentionMechanism(spec, num_heads=sizes[1])
    with torch.no_grad():
        for name, w in mech.normalizer.named_parameters():
            low, high = {"learned.weight": (-1.0, 1.5), "gamma.weight": (-0.5, 0.7)}.get(name, (0.4, 1.1))
            w.copy_(torch.linspace(low, high, w.numel()))
    scale = 1.0 / q.shape[-1] ** 0.5
    weight = None

    def run(fn, cast):
        nonlocal weight
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        if weight is None:
            weight = torch.linspace(-1, 2, out.numel(), dtype=torch.float64).view_as(out)
        grads = torch.autograd.grad((out.double() * weight).sum(), leaves + list(mech.parameters()))
        return out.double(), [g.double() for g in grads]

    def fast(q, k, v):
        b = bias.to(q.dtype) if bias is not None else None
        call = Call.of(q, k, v, mask, b, causal, 0.0, False, mech.normalizer, mech.path_params(), None)
        (path,) = [p for p in mech.paths if p.name == "triton"]
        return path.build(call)(q, k, v, mask, b, causal, scale)

    def reference(q, k, v):
        with kernels.reference_path():
            return mech(q, k, v, mask=bias if bias is not None else mask, causal=causal)

    out, grads = run(fast, torch.float32)
    ref, ref_grads = run(reference, torch.float64)
    return {
        "finite": bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads),
        "out": float((out - ref).abs().max()),
        "grads": [float((g - r).abs().max() / max(1.0, float(r.abs().max()))) for g, r in zip(grads, ref_grads)],
        "parameters": len(list(mech.parameters())),
    }


def _worker():
    print_case_results(lambda name: _run_case(*CASES[name]), CASES)


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreter_worker(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_path_matches_the_reference_under_the_interpreter(interpreter_results, name):
    res = case_result(interpreter_results, name)
    assert res["finite"]
    assert res["out"] < 2e-5, res
    assert len(res["grads"]) == 3 + res["parameters"]  # q, k, v and every length / alpha parameter
    assert max(res["grads"]) < 1e-4, res


def test_triton_refuses_an_additive_mask_while_the_factor_is_learned():
    """The Triton kernels take no gradient for an additive mask, which carries the learned factor's."""
    import plugin
    from plugin.paths import Call

    pytest.importorskip("triton")
    for spec, learned in (("scalable_entmax", True), ("scalable_entmax:beta=0.5,gamma=0.5", False)):
        mech = plugin.AttentionMechanism(spec, num_heads=2)
        (path,) = [p for p in mech.paths if p.name == "triton"]
        shape = (1, 2, 4, 16)
        call = Call(shape, shape, shape, torch.float32, "cuda", bias=True, normalizer=mech.normalizer,
                    params=mech.path_params())
        reason = path.supports(call)
        # (without a GPU the kernels' availability refuses afterwards: not about the gradient)
        assert learned == (reason is not None and "gradient" in reason), (spec, reason)
        with torch.no_grad():  # generation: no gradient to carry
            reason = path.supports(call)
            assert reason is None or "gradient" not in reason, reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spec", ["scalable_entmax", "scalable_entmax:alpha=learned", "scalable_softmax"])
def test_cuda_selects_a_fast_path_and_matches_the_reference(spec):
    import plugin
    from plugin import kernels

    B, H, L, D = 2, 4, 300, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device="cuda", generator=g) for _ in range(3))
    mech = plugin.AttentionMechanism(spec, num_heads=H).cuda()
    with plugin.record_calls() as calls:
        out = mech(q, k, v, causal=True)
    assert calls[0].path == ("sdpa" if spec == "scalable_softmax" else "triton")
    with kernels.reference_path():
        ref = mech(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, str(ROOT))
    _worker()
