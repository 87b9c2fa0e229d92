"""One input policy on every attention path (see plugin/inputs.py and docs/core.md, "Inputs and errors").

Every path is run, forced with ``plugin.use_path``, on the same adversarial inputs (NaN and
infinities in q, k, v and in float masks, 0-D/1-D/key-padding masks, empty dimensions, huge
and tiny values, bad arguments), and each must behave as the reference path does: the same
error with the same message, or the same shapes, the same NaN positions and the same values.
The Triton path runs the same table under Triton's interpreter in a subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import plugin
from plugin import kernels

ROOT = Path(__file__).resolve().parents[2]
B, H, HKV, LQ, LK, D = 2, 2, 1, 5, 6, 16
NAN, INF = float("nan"), float("inf")

PATHS = {
    "softmax": ("sdpa",),
    "sparsemax": ("cpu_chunked", "cpu_chunked_torch"),
    "entmax15": ("cpu_chunked", "cpu_chunked_torch"),
    "entmax:alpha=1.3": ("cpu_chunked", "cpu_chunked_torch"),
    "fusedmax:lam=0.3": ("cpu_chunked",),
    "oscarmax:lam=0.1": ("cpu_chunked",),
    "sparsemax+continuous_softmax": ("cpu_chunked",),
    "continuous_sparsemax": ("sdpa",),
}
TRITON_SPECS = ("sparsemax", "entmax15", "entmax:alpha=1.3")
# continuous specs take their fast path with per-key bool masks only (see AttentionMechanism)
CONTINUOUS_ON_REFERENCE = {"nan_in_float_mask", "pos_inf_in_float_mask", "neg_inf_float_mask_row", "float_mask_0d",
                           "float_mask_1d", "mask_lq_lk", "causal_with_padding"}


def _qkv(b=B, h=H, hkv=HKV, lq=LQ, lk=LK, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, lq, d, generator=g), torch.randn(b, hkv, lk, d, generator=g),
            torch.randn(b, hkv, lk, d, generator=g))


def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


def _float_mask(index=None, value=None, shape=(B, 1, LQ, LK)):
    m = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return _with(m, index, value) if index is not None else m


def _cases():
    """name -> (kwargs of plugin.attention, whether a fast path is expected to run)."""
    q, k, v = _qkv()
    padding = torch.ones(B, LK, dtype=torch.bool)
    padding[1, 4:] = False
    one_d = torch.tensor([True, False, True, True, False, True])
    return {
        "plain": (dict(q=q, k=k, v=v), True),
        "nan_in_q": (dict(q=_with(q, (0, 1, 2, 0), NAN), k=k, v=v), True),
        "inf_in_k": (dict(q=q, k=_with(k, (1, 0, 3, 1), INF), v=v), True),
        "neg_inf_in_v": (dict(q=q, k=k, v=_with(v, (0, 0, 0, 0), -INF)), True),
        "nan_in_float_mask": (dict(q=q, k=k, v=v, mask=_float_mask((0, 0, 1, 2), NAN)), True),
        "pos_inf_in_float_mask": (dict(q=q, k=k, v=v, mask=_float_mask((1, 0, 2, 3), INF)), True),
        "neg_inf_float_mask_row": (dict(q=q, k=k, v=v, mask=_float_mask((0, 0, 3), -INF)), True),
        "bool_mask_0d_false": (dict(q=q, k=k, v=v, mask=torch.tensor(False)), True),
        "bool_mask_0d_true": (dict(q=q, k=k, v=v, mask=torch.tensor(True)), True),
        "float_mask_0d": (dict(q=q, k=k, v=v, mask=torch.tensor(0.5)), True),
        "bool_mask_1d": (dict(q=q, k=k, v=v, mask=one_d), True),
        "float_mask_1d": (dict(q=q, k=k, v=v, mask=torch.where(one_d, 0.0, -INF)), True),
        "key_padding_mask_b_lk": (dict(q=q, k=k, v=v, mask=padding), True),
        "mask_lq_lk": (dict(q=q, k=k, v=v, mask=torch.rand(LQ, LK, generator=torch.Generator().manual_seed(2)) > 0.4),
                       True),
        "causal_with_padding": (dict(q=q, k=k, v=v, mask=padding, causal=True), True),
        "huge": (dict(q=q * 1e15, k=k * 1e15, v=v), True),
        "huge_overflowing": (dict(q=q * 1e20, k=k * 1e20, v=v), False),
        "tiny": (dict(q=q * 1e-30, k=k * 1e-30, v=v * 1e-30), True),
        "scale_zero": (dict(q=q, k=k, v=v, scale=0), True),
        "scale_nan": (dict(q=q, k=k, v=v, scale=NAN), False),
        "scale_inf": (dict(q=q, k=k, v=v, scale=INF), False),
        "scale_text": (dict(q=q, k=k, v=v, scale="0.5"), False),
        "dropout_text": (dict(q=q, k=k, v=v, dropout_p="0"), False),
        "causal_text": (dict(q=q, k=k, v=v, causal="yes"), False),
        "mixed_dtypes": (dict(q=q, k=k.double(), v=v), False),
        "head_size_zero": (dict(q=q[..., :0], k=k[..., :0], v=v), False),
        "no_heads": (dict(q=q[:, :0], k=k, v=v), False),
        "ambiguous_2d_mask": (dict(q=q[:, :, :2], k=k, v=v, mask=padding), False),
        "mask_of_ints": (dict(q=q, k=k, v=v, mask=padding.int()), False),
        "no_queries": (dict(q=q[:, :, :0], k=k, v=v), False),
        "no_batch": (dict(q=q[:0], k=k[:0], v=v[:0]), False),
        "no_keys": (dict(q=q, k=k[:, :, :0], v=v[:, :, :0]), False),
        "no_keys_with_mask": (dict(q=q, k=k[:, :, :0], v=v[:, :, :0], mask=padding[:, :0]), False),
    }


def _run(spec, kwargs, path, return_weights=False):
    """('error', type, message) or ('ok', out, weights, recorded path)."""
    try:
        with plugin.record_calls() as calls, kernels.use_path(path):
            result = plugin.attention(normalizer=spec, return_weights=return_weights, **kwargs)
    except Exception as exc:
        return ("error", type(exc).__name__, str(exc))
    out, weights = result if return_weights else (result, None)
    return ("ok", out, weights, calls[0].path)


def _same(got, want, where):
    assert got[0] == want[0], f"{where}: {got[:3]} vs {want[:3]}"
    if want[0] == "error":
        assert got[1:] == want[1:], where
        return
    out, ref = got[1], want[1]
    assert out.shape == ref.shape and out.dtype == ref.dtype, where
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), f"{where}: NaN positions differ"
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4, equal_nan=True, msg=where)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spec", list(PATHS))
@pytest.mark.parametrize("case", list(_cases()))
def test_every_path_follows_the_same_input_policy(spec, case, dtype):
    kwargs, fast = _cases()[case]
    if dtype == torch.float64 and case != "mixed_dtypes":
        kwargs = {n: t.double() if n in "qkv" and t.dtype == torch.float32 else t for n, t in kwargs.items()}
    fast = fast and not ("continuous" in spec and case in CONTINUOUS_ON_REFERENCE)
    reference = _run(spec, kwargs, "reference")
    with_weights = _run(spec, kwargs, "reference", return_weights=True)
    _same(with_weights, reference, f"{spec} {case} reference with weights")
    for path in PATHS[spec]:
        got = _run(spec, kwargs, path)
        _same(got, reference, f"{spec} {case} {path}")
        if got[0] == "ok" and case.startswith("no_"):
            assert got[3] == "empty"
        elif got[0] == "ok":  # the path under test ran (else the comparison would be empty)
            assert got[3].split("+")[0] == (path if fast else "reference"), (case, got[3])


def test_the_policy_itself():
    """What the table above compares, stated once on the reference path."""
    q, k, v = _qkv()
    cases = _cases()

    def ref(case, **extra):
        return _run("sparsemax", {**cases[case][0], **extra}, "reference", return_weights=True)

    _, out, w, _ = ref("nan_in_q")
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[1]).all() and torch.isfinite(out[0, 0]).all()
    assert torch.isnan(w[0, 1]).all()
    _, out, _, _ = ref("inf_in_k")  # k/v slices reach every query head of their group
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()
    _, out, _, _ = ref("pos_inf_in_float_mask")
    assert torch.isnan(out[1, :, 2]).all() and torch.isfinite(out[1, :, :2]).all()
    _, out, w, _ = ref("neg_inf_float_mask_row")
    assert (out[0, :, 3] == 0).all() and (w[0, :, 3] == 0).all()
    _, out, _, _ = ref("bool_mask_0d_false")
    assert (out == 0).all()
    _, out, w, path = ref("no_keys")
    assert out.shape == (B, H, LQ, D) and (out == 0).all() and w.shape == (B, H, LQ, 0) and path == "empty"
    _, out, w, _ = ref("no_queries")
    assert out.shape == (B, H, 0, D) and w.shape == (B, H, 0, LK)
    for case, name in [("scale_nan", "scale"), ("dropout_text", "dropout_p"), ("mixed_dtypes", "dtype"),
                       ("head_size_zero", "D = 0"), ("no_heads", "H = 0"), ("causal_text", "causal"),
                       ("ambiguous_2d_mask", "ambiguous")]:
        kind, exc, message = ref(case)
        assert (kind, exc) == ("error", "ValueError") and name in message, (case, message)
    # a (B, Lk) key-padding mask means the same as (B, 1, 1, Lk)
    padding = cases["key_padding_mask_b_lk"][0]["mask"]
    torch.testing.assert_close(plugin.attention(q, k, v, "sparsemax", mask=padding),
                               plugin.attention(q, k, v, "sparsemax", mask=padding[:, None, None, :]))


def test_empty_inputs_have_gradients_of_their_shape():
    q, k, v = (t.requires_grad_() for t in _qkv(lk=0))
    out = plugin.attention(q, k, v, "sparsemax")
    out.sum().backward()
    assert v.grad is not None and v.grad.shape == v.shape


def test_continuous_specs_with_an_empty_batch():
    q, k, v = _qkv(b=0)
    for spec in ("continuous_softmax", "sparsemax+continuous_sparsemax"):
        assert plugin.attention(q, k, v, spec).shape == (0, H, LQ, D)
    mech = plugin.ContinuousAttention(query_dim=D, alpha=2.0)
    res = mech(torch.randn(0, 3, D), torch.randn(0, 7, D))
    assert res.context.shape[0] == 0


# ----------------------------------------------------------------------------- the Triton path


def _triton_worker() -> None:
    """Run the table on the Triton path (interpreter, CPU tensors) and on the reference; print mismatches."""
    from plugin.kernels import availability

    availability.triton_unavailable_reason = lambda *args: None  # CPU tensors run under the interpreter
    failures = []
    for spec in TRITON_SPECS:
        for case, (kwargs, fast) in _cases().items():
            want = _run(spec, kwargs, "reference")
            got = _run(spec, kwargs, "triton")
            try:
                _same(got, want, f"{spec} {case} triton")
                if got[0] == "ok" and not case.startswith("no_"):
                    assert got[3] == ("triton" if fast else "reference"), (case, got[3])
            except AssertionError as exc:
                failures.append(str(exc)[:300])
    print(json.dumps(failures))


def test_the_triton_path_follows_the_same_policy():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, "--triton-worker"], capture_output=True, text=True, env=env,
                          timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert failures == []


if __name__ == "__main__" and sys.argv[1:] == ["--triton-worker"]:
    _triton_worker()


# ----------------------------------------------------------------------------- the normalizers


NORMALIZER_SPECS = ("softmax", "sparsemax", "sparsemax:gamma=0.5", "entmax15", "entmax:alpha=1.3", "fusedmax:lam=0.3",
                    "oscarmax:lam=0.1", "scalable_softmax:s=0.5", "scalable_entmax:beta=0.5,gamma=-0.5")


@pytest.mark.parametrize("spec", NORMALIZER_SPECS)
def test_every_normalizer_follows_the_same_row_policy(spec):
    f = plugin.get_normalizer(spec)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    x[0, 1] = NAN  # NaN among the allowed scores: NaN row
    x[1, 2] = INF  # +inf: NaN row
    x[2, 3] = -INF  # -inf: masked
    x[3] = -INF  # nothing allowed: zeros
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[4, 0] = False
    x[4, 0] = NAN  # a NaN at a masked position is never read
    p = f(x, mask=mask)
    assert torch.isnan(p[:2]).all()
    assert torch.isfinite(p[2:]).all() and p[2, 3] == 0 and (p[3] == 0).all() and p[4, 0] == 0
    torch.testing.assert_close(p[[2, 4]].sum(-1), torch.ones(2))
    assert f(torch.randn(3, 0)).shape == (3, 0) and f(torch.randn(0, 4)).shape == (0, 4)
