"""The maths of plugin.kernels.maths, and the C and Triton kernels that mirror it, held to one tolerance.

The same scores go to the Python functions, the C row kernel (``entmax_rows.c``) and the Triton
kernels (under Triton's interpreter, ``TRITON_INTERPRET=1``, in a subprocess: Triton reads the
variable when the module is imported). q and k hold multiples of 1/4 in [-2, 2], so every
score is exact in float32 and all three see bit-identical scores. Compared: the row
statistics (threshold and normalizer), the output, and every gradient (q, k, v, alpha). The
Python functions are themselves checked against independent references: the ``entmax``
package's bisection and autograd through it.
"""

import sys

import entmax as entmax_pkg
import pytest
import torch

from plugin.kernels import constants, maths
from tests.triton_interpreter import case_result, print_case_results
from tests.triton_interpreter import interpreter_results as run_interpreter_worker

# one tolerance for C and Triton against Python (and for Python against the references)
TOL = {"t": 1e-6, "inv": 1e-5, "out": 2e-6, "grad": 1e-5}

# name -> (kind, per-head alpha, masking)
CASES = {
    "sparsemax": (constants.SPARSEMAX, (2.0, 2.0), "none"),
    "entmax15-padding": (constants.ENTMAX15, (1.5, 1.5), "padding"),
    "general-per-head": (constants.GENERAL, (1.3, 1.75), "none"),
    "general-near-softmax-masked-row": (constants.GENERAL, (1.05, 1.2), "masked_row"),
}
B, H, LQ, LK, D = 1, 2, 20, 37, 16


def _inputs(masking, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randint(-8, 9, (B, H, n, D), generator=g).float() / 4 for n in (LQ, LK))
    v = torch.randn(B, H, LK, D, generator=g)
    dout = torch.randn(B, H, LQ, D, generator=g)
    mask = torch.ones(B, H, LQ, LK, dtype=torch.bool)
    if masking == "padding":
        mask[..., LK - 9:] = False
    elif masking == "masked_row":
        mask[0, 1, 3] = False
    return q, k, v, dout, mask


def _python(q, k, v, dout, mask, kind, alpha):
    """Output, row statistics and gradients by the functions of plugin.kernels.maths (dense)."""
    a = torch.tensor(alpha).view(1, H, 1, 1).expand(B, H, LQ, 1)
    S = (q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf"))
    rows = S.reshape(-1, LK)
    am1 = (a - 1).reshape(-1, 1)
    stats = maths.newton_threshold(rows, am1, kind)
    P = maths.entmax_from_stats(rows, am1, stats, kind).view(B, H, LQ, LK)
    dP = dout @ v.transpose(-1, -2)
    dS = maths.entmax_backward(P, dP, 2.0 if kind == constants.SPARSEMAX else a)
    zs = S - stats[:, 0].view(B, H, LQ, 1)
    dalpha = maths.entmax_alpha_grad(P, dP, zs, a).sum((0, 2, 3))
    grads = {"dq": dS @ k, "dk": dS.transpose(-1, -2) @ q, "dv": P.transpose(-1, -2) @ dout, "dalpha": dalpha}
    return stats.view(B, H, LQ, 3), P @ v, grads


def _c(q, k, v, dout, mask, kind, alpha):
    """The same by the C row kernel."""
    from plugin.kernels import chunked

    am1 = torch.tensor(alpha) - 1
    S = (q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf")).reshape(-1, LK).contiguous()
    stats = chunked.rows_forward(S, am1, kind, c=LQ)
    P = S.view(B, H, LQ, LK).clone()
    dP = (dout @ v.transpose(-1, -2)).reshape(-1, LK).contiguous()
    S = (q @ k.transpose(-1, -2)).masked_fill(~mask, float("-inf")).reshape(-1, LK).contiguous()
    da = chunked.rows_backward(S, dP, stats, am1, kind, c=LQ, want_dalpha=True)
    dS = dP.view(B, H, LQ, LK)
    grads = {"dq": dS @ k, "dk": dS.transpose(-1, -2) @ q, "dv": P.transpose(-1, -2) @ dout,
             "dalpha": da.view(B, H, LQ).sum((0, 2))}
    return stats.view(B, H, LQ, 3), P @ v, grads


def _triton(q, k, v, dout, mask, kind, alpha):
    """The same by the Triton kernels (scale 1, so the scores are q k^T)."""
    from plugin.kernels.triton_entmax import triton_backward, triton_forward

    a = torch.tensor(alpha)
    out, stats = triton_forward(q, k, v, a, mask, None, kind, False, 1.0, 16, 16)
    dq, dk, dv, dalpha = triton_backward(dout, q, k, v, a, mask, None, stats, kind, False, 1.0, 16, 16, True)
    return stats, out, {"dq": dq, "dk": dk, "dv": dv, "dalpha": dalpha}


def _differences(ref, got):
    stats, out, grads = ref
    g_stats, g_out, g_grads = got
    alive = torch.isfinite(stats[..., 0])
    result = {
        "m_equal": bool(torch.equal(torch.isfinite(g_stats[..., 0]), alive))
        and bool(torch.equal(g_stats[..., 0][alive], stats[..., 0][alive])),
        "t": float((g_stats[..., 1] - stats[..., 1])[alive].abs().max()),
        "inv": float(((g_stats[..., 2] - stats[..., 2]) / stats[..., 2])[alive].abs().max()),
        "out": float((g_out - out).abs().max()),
    }
    for name, want in grads.items():
        result[name] = float((g_grads[name] - want).abs().max() / max(1.0, float(want.abs().max())))
    return result


def _compare(name, implementation):
    kind, alpha, masking = CASES[name]
    inputs = _inputs(masking)
    ref, got = _python(*inputs, kind, alpha), implementation(*inputs, kind, alpha)
    if kind != constants.GENERAL:  # a fixed alpha of 2 or 1.5: the kernels compute no alpha gradient
        del ref[2]["dalpha"], got[2]["dalpha"]
    return _differences(ref, got)


def _assert_within_tolerance(diff):
    assert diff["m_equal"], diff
    for key in ("t", "inv", "out"):
        assert diff[key] < TOL[key], (key, diff)
    for key in ("dq", "dk", "dv", "dalpha"):
        if key in diff:
            assert diff[key] < TOL["grad"], (key, diff)


# ----------------------------------------------------------------------------- Python against references


@pytest.mark.parametrize("alpha", [2.0, 1.5, 1.3, 1.05])
def test_newton_threshold_gives_the_entmax_of_the_bisection_reference(alpha):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(50, 30, generator=g, dtype=torch.float64) * 3
    z[0, 5:] = float("-inf")
    kind = maths.kind_of_alpha(alpha)
    p = maths.entmax_from_stats(z.float(), torch.full((50, 1), alpha - 1), maths.newton_threshold(
        z.float(), torch.full((50, 1), alpha - 1), kind), kind)
    ref = entmax_pkg.entmax_bisect(z, alpha=alpha, dim=-1, n_iter=100)
    torch.testing.assert_close(p.double(), ref, atol=TOL["out"], rtol=0)


def test_a_row_without_an_allowed_entry_has_the_statistics_of_the_kernels():
    z = torch.full((1, 4), float("-inf"))
    stats = maths.newton_threshold(z, torch.ones(1, 1), constants.SPARSEMAX)
    assert stats.tolist() == [[float("inf"), 0.0, 0.0]]
    assert maths.entmax_from_stats(z, torch.ones(1, 1), stats, constants.SPARSEMAX).tolist() == [[0.0] * 4]


@pytest.mark.parametrize("alpha", [2.0, 1.5, 1.3])
def test_backward_and_alpha_gradient_match_autograd_through_the_reference(alpha):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, 9, generator=g, dtype=torch.float64) * 2
    a = torch.full((6, 1), alpha, dtype=torch.float64, requires_grad=True)
    zr = z.clone().requires_grad_()
    p = entmax_pkg.entmax_bisect(zr, alpha=a, dim=-1, n_iter=200)
    grad = torch.randn(6, 9, generator=g, dtype=torch.float64)
    dz_ref, da_ref = torch.autograd.grad((p * grad).sum(), (zr, a))
    p = p.detach()
    torch.testing.assert_close(maths.entmax_backward(p, grad, alpha), dz_ref, atol=1e-8, rtol=1e-6)
    if alpha != 2.0:  # alpha = 2 is the end of the range: the bisection reference's alpha gradient is one-sided
        zs = z - z.amax(-1, keepdim=True)
        da = maths.entmax_alpha_grad(p, grad, zs, a.detach())
        torch.testing.assert_close(da, da_ref, atol=1e-6, rtol=1e-5)


def test_sparsemax_backward_is_the_support_centred_gradient():
    p = torch.tensor([[0.5, 0.0, 0.5, 0.0]])
    grad = torch.tensor([[1.0, 5.0, 3.0, -2.0]])
    assert maths.sparsemax_backward(p, grad).tolist() == [[-1.0, 0.0, 1.0, 0.0]]


# ----------------------------------------------------------------------------- C against Python


@pytest.mark.parametrize("name", list(CASES))
def test_c_row_kernel_matches_the_python_maths(name):
    from plugin.kernels import chunked

    if not chunked.c_kernel_available():
        pytest.skip(f"no C compiler: {chunked.c_kernel_error()}")
    _assert_within_tolerance(_compare(name, _c))


def test_the_c_build_takes_the_constants_as_defines_and_a_change_rebuilds(tmp_path, monkeypatch):
    from plugin.kernels import cbuild, chunked

    flags = chunked._flag_sets()
    assert all(f"-DNEWTON_MAX_ITERS={constants.NEWTON_MAX_ITERS}" in fs for fs in flags)
    assert all(any(flag.startswith("-DNEWTON_TOL=") for flag in fs) for fs in flags)
    before = cbuild._target(tmp_path, "entmax_rows", chunked._SOURCE, "cc", flags[-1])
    monkeypatch.setattr(constants, "NEWTON_TOL", constants.NEWTON_TOL * 2)
    after = cbuild._target(tmp_path, "entmax_rows", chunked._SOURCE, "cc", chunked._flag_sets()[-1])
    assert before != after  # another cache entry: the library is built again with the new constant


# ----------------------------------------------------------------------------- Triton against Python


def _worker():
    print_case_results(lambda name: {"triton": _compare(name, _triton), "c": _compare(name, _c)}, CASES)


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreter_worker(__file__)


@pytest.mark.parametrize("name", list(CASES))
def test_triton_kernels_match_the_python_maths_and_the_c_kernel(interpreter_results, name):
    res = case_result(interpreter_results, name)
    _assert_within_tolerance(res["triton"])
    _assert_within_tolerance(res["c"])


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
