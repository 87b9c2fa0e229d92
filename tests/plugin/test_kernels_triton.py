"""Triton kernels (plugin.kernels.triton_entmax) against the reference path.

Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, which
Triton reads when a kernel is decorated, i.e. when the module is imported). So the cases run
in one subprocess started with that variable set; this module is also that subprocess's
program (``python test_kernels_triton.py --worker``). Sizes are tiny (the interpreter runs
every program instance in Python) but span several query and key blocks. The tests at the
end need a CUDA GPU and are skipped without one.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

from tests.triton_interpreter import case_result, print_case_results
from tests.triton_interpreter import interpreter_results as run_interpreter_worker

ROOT = Path(__file__).resolve().parents[2]

# name -> (spec, masking, dtype, sizes (B, H, Hkv, Lq, Lk, D))
CASES = {
    "sparsemax-gqa": ("sparsemax", "none", "float32", (1, 2, 1, 20, 37, 16)),
    "entmax15-padding": ("entmax15", "padding", "float32", (2, 2, 2, 18, 35, 16)),
    "alpha1.3-causal": ("entmax:alpha=1.3", "causal", "float32", (1, 2, 1, 33, 33, 16)),
    "learned-arbitrary-causal": ("entmax:alpha=learned", "arbitrary+causal", "float32", (1, 2, 1, 20, 30, 16)),
    "sparsemax-additive-bias": ("sparsemax:gamma=0.5", "additive", "float32", (1, 2, 2, 17, 21, 16)),
    "entmax15-decoding": ("entmax15", "causal", "float32", (1, 2, 1, 1, 37, 16)),
    "sparsemax-single-key": ("sparsemax", "none", "float32", (1, 2, 2, 9, 1, 16)),
    "entmax15-more-queries-than-keys": ("entmax15", "causal", "float32", (1, 2, 1, 20, 7, 16)),
    "sparsemax-fully-masked-rows": ("sparsemax", "fully_masked_rows", "float32", (2, 2, 2, 18, 20, 16)),
    "entmax15-float16": ("entmax15", "padding", "float16", (1, 2, 1, 20, 37, 16)),
    "sparsemax-bfloat16": ("sparsemax", "causal", "bfloat16", (1, 2, 2, 20, 20, 16)),
    "alpha1.7-dim24": ("entmax:alpha=1.7", "none", "float32", (1, 2, 2, 17, 19, 24)),
    # near softmax, where a schedule from alpha = 1 passes (alpha = 1 itself takes the sdpa path)
    "alpha1.01-near-softmax": ("entmax:alpha=1.01", "padding", "float32", (1, 2, 2, 17, 19, 16)),
    # closer still: alpha - 1 below float32's resolution around 1 (the threshold is carried as t + 1)
    "alpha1+3e-8-near-softmax": ("entmax:alpha=1.00000003", "padding", "float32", (1, 2, 2, 17, 19, 16)),
    "alpha1+4e-5-causal": ("entmax:alpha=1.00004", "causal", "float32", (1, 2, 1, 20, 20, 16)),
    # alpha - 1 far below float32's resolution around 1, over several query and key tiles: the
    # Newton step's f - f^(1 - a) must not cancel (a rounding there overshoots and underflows a row)
    "alpha1+2e-9-padding-tiles": ("entmax:alpha=1.000000002", "padding", "float32", (2, 2, 2, 18, 35, 16)),
    "alpha1+7e-9-causal-tiles": ("entmax:alpha=1.000000007", "causal", "float32", (1, 2, 1, 33, 40, 16)),
}


def _inputs(masking, sizes, seed=0):
    B, H, Hkv, Lq, Lk, D = sizes
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64) * 1.5
    k = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64) * 1.5
    v = torch.randn(B, Hkv, Lk, D, generator=g, dtype=torch.float64)
    kw = {}
    if masking == "padding":
        mask = torch.ones(B, 1, 1, Lk, dtype=torch.bool)
        mask[-1, ..., Lk // 2:] = False
        kw["mask"] = mask
    elif masking == "causal":
        kw["causal"] = True
    elif masking == "arbitrary+causal":
        kw["mask"] = torch.rand(B, H, Lq, Lk, generator=g) > 0.3
        kw["causal"] = True
    elif masking == "additive":
        bias = torch.randn(B, 1, Lq, Lk, generator=g, dtype=torch.float64)
        bias[..., 3] = float("-inf")
        kw["mask"] = bias
    elif masking == "fully_masked_rows":
        mask = torch.ones(B, 1, Lq, Lk, dtype=torch.bool)
        mask[0, :, 5] = False
        mask[1, :, :3] = False
        kw["mask"] = mask
    return q, k, v, kw


def _run_case(spec, masking, dtype_name, sizes):
    """Max abs errors of the Triton kernels against the float64 reference path (output, grads)."""
    import plugin
    from plugin import kernels
    from plugin.kernels.triton_entmax import triton_entmax_attention

    dtype = getattr(torch, dtype_name)
    q, k, v, kw = _inputs(masking, sizes)
    mech = plugin.AttentionMechanism(spec, num_heads=sizes[1])
    if mech.normalizer.__class__.__name__ == "EntmaxNormalizer" and mech.normalizer.learned is not None:
        with torch.no_grad():
            mech.normalizer.learned.weight.copy_(torch.tensor([-1.0, 1.5]))
    params = mech.path_params()  # what the declared paths read: alpha (a float or the learned module), gamma
    alpha = {"sparsemax": 2.0, "entmax15": 1.5}.get(mech.spec.split(":")[0], params.get("alpha"))
    gamma = float(params.get("gamma", 1.0))
    weight = None

    def run(fn, cast):
        nonlocal weight
        leaves = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        if weight is None:
            weight = torch.linspace(-1, 2, out.numel(), dtype=torch.float64).view_as(out)
        params = list(mech.parameters())
        grads = torch.autograd.grad((out.double() * weight).sum(), leaves + params)
        return out.double(), [g.double() for g in grads]

    mask = kw.get("mask")
    bool_mask = mask if mask is not None and mask.dtype == torch.bool else None
    bias = mask.to(dtype) if mask is not None and mask.is_floating_point() else None

    def fast(q, k, v):
        scale = 1.0 / q.shape[-1] ** 0.5 / gamma
        b = bias / gamma if bias is not None else None
        a = alpha() if isinstance(alpha, torch.nn.Module) else float(alpha)
        return triton_entmax_attention(q, k, v, a, mask=bool_mask, bias=b,
                                       causal=kw.get("causal", False), scale=scale, block_m=16, block_n=16)

    def reference(q, k, v):
        with kernels.reference_path():
            return mech(q, k, v, **kw)

    out, grads = run(fast, dtype)
    ref, ref_grads = run(reference, torch.float64)
    finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(g).all()) for g in grads)
    result = {
        "out": float((out - ref).abs().max()),
        "grads": [float((g - r).abs().max() / max(1.0, float(r.abs().max()))) for g, r in zip(grads, ref_grads)],
        "finite": finite,
    }
    if masking == "fully_masked_rows":
        result["masked_rows_zero"] = bool((out[0, :, 5] == 0).all() and (out[1, :, :3] == 0).all())
    return result


def _interpreter_dot_is_exact(dtype):
    """Whether the interpreter's ``tl.dot`` is right for ``dtype`` tiles (Triton 3.9's is not for bfloat16)."""
    import triton
    import triton.language as tl

    @triton.jit
    def gram(X, OUT, N: tl.constexpr):
        o = tl.arange(0, N)
        x = tl.load(X + o[:, None] * N + o[None, :])
        tl.store(OUT + o[:, None] * N + o[None, :], tl.dot(x, tl.trans(x)))

    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = torch.empty(16, 16)
    gram[(1,)](x, out, N=16)
    return torch.allclose(out, x.float() @ x.float().T, atol=1e-2, rtol=1e-2)


def _worker_case(name):
    case = CASES[name]
    dtype = getattr(torch, case[2])
    if dtype != torch.float32 and not _interpreter_dot_is_exact(dtype):
        return {"skip": f"Triton's interpreter computes tl.dot of {case[2]} tiles wrongly; the GPU tests cover it"}
    return _run_case(*case)


def _worker():
    print_case_results(_worker_case, CASES)


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreter_worker(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_kernels_match_the_reference_under_the_interpreter(interpreter_results, name):
    res = case_result(interpreter_results, name)
    assert res["finite"]
    half = CASES[name][2] != "float32"
    assert res["out"] < (3e-2 if half else 2e-5), res
    assert max(res["grads"]) < (5e-2 if half else 1e-4), res
    if "masked_rows_zero" in res:
        assert res["masked_rows_zero"]


# ----------------------------------------------------------------------------- compiled for a GPU


def test_triton_kernels_compile_for_a_cuda_gpu_without_one():
    """The interpreter does not type-check like the compiler; compile the kernels for sm_80 offline."""
    triton = pytest.importorskip("triton", reason="the Triton kernels need the 'triton' package")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set in this process: the kernels are interpreted, not compiled")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from plugin.kernels import constants
    from plugin.kernels import triton_entmax as te

    def signature(fn, constexprs):
        kinds = {"Q": "*fp16", "K": "*fp16", "V": "*fp16", "OUT": "*fp16", "DO": "*fp16", "DQ": "*fp16",
                 "DK": "*fp16", "DV": "*fp16", "BIAS": "*fp16", "MASK": "*u8", "AM1": "*fp32", "STATS": "*fp32",
                 "DELTA": "*fp32", "DALPHA": "*fp32", "scale": "fp32"}
        return {n: kinds.get(n, "i32") for n in fn.arg_names if n not in constexprs}

    flags = {"KIND": 1, "CAUSAL": True, "HAS_MASK": True, "HAS_BIAS": True, "BLOCK_M": 64, "BLOCK_N": 64,
             "BLOCK_D": 64, "PREC": "tf32"}
    kernels = [(te._entmax_fwd, {"MAX_ITERS": constants.NEWTON_MAX_ITERS, "TOL": constants.NEWTON_TOL}),
               (te._entmax_bwd_dq, {"WANT_DALPHA": True}), (te._entmax_bwd_dkdv, {})]
    for fn, extra in kernels:
        constexprs = {**flags, **extra}
        try:
            compiled = triton.compile(ASTSource(fn, signature(fn, constexprs), constexprs),
                                      target=GPUTarget("cuda", 80, 32), options=dict(te._LAUNCH))
        except FileNotFoundError as exc:  # no ptxas shipped with this triton build
            pytest.skip(f"the CUDA toolchain of triton is not available: {exc}")
        assert compiled.asm.get("cubin"), fn.__name__


# ----------------------------------------------------------------------------- on a GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels on device)")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("spec", ["sparsemax", "entmax15", "entmax:alpha=1.3", "entmax:alpha=learned"])
def test_cuda_attention_selects_triton_and_matches_the_reference(spec, dtype):
    import plugin
    from plugin import kernels

    torch.manual_seed(0)
    B, H, Hkv, L, D = 2, 8, 2, 300, 64
    q = torch.randn(B, H, L, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=dtype, requires_grad=True)
    mask = torch.ones(B, 1, 1, L, dtype=torch.bool, device="cuda")
    mask[1, ..., 200:] = False
    mech = plugin.AttentionMechanism(spec, num_heads=H).cuda()
    with plugin.record_calls() as calls:
        out = mech(q, k, v, mask=mask, causal=True)
    assert calls[0].path == "triton"
    grads = torch.autograd.grad(out.float().pow(2).sum(), (q, k, v))
    with kernels.reference_path():
        ref = mech(*(t.detach().float().requires_grad_() for t in (q, k, v)), mask=mask, causal=True)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    assert all(torch.isfinite(g).all() for g in grads)


@needs_cuda
def test_cuda_long_sequence_needs_no_score_matrix():
    import plugin

    B, H, L, D = 1, 8, 16384, 64
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    plugin.attention(q, k, v, "entmax15", causal=True).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < B * H * L * L * 2 / 8  # far below one fp16 (L, L) score matrix per head


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, str(ROOT))
    _worker()
