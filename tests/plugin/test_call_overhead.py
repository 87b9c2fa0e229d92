"""What one attention call costs beyond its arithmetic: the work that real models' per-step calls avoid.

Cached decoding calls attention once per layer and token with a single query, so every fixed
cost of a call shows. These tests pin the cheap routes (and their results against the reference
path): no keys or values copied to every query head, no nonzero gathering or autograd
bookkeeping for a small chunk when no gradient follows, no copy of a clean additive mask.
"""

import importlib

import pytest
import torch

import plugin
from plugin.kernels import chunked
from plugin.kernels import sdpa as sdpa_module

attention_module = importlib.import_module("plugin.attention")  # the module (plugin.attention is the function)

B, H, HKV, D, LK = 3, 8, 2, 16, 11


def _decoding_step(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=g, dtype=dtype)
    k = torch.randn(B, HKV, LK, D, generator=g, dtype=dtype)
    v = torch.randn(B, HKV, LK, D, generator=g, dtype=dtype)
    return q, k, v


def _masks():
    g = torch.Generator().manual_seed(1)
    padding = torch.ones(B, LK, dtype=torch.bool)
    padding[0, :4] = False  # a left-padded row
    per_head = torch.rand(B, H, 1, LK, generator=g) > 0.3
    per_head[1, 2] = False  # a (batch, head) whose query sees no key: zeros
    return {
        "none": None,
        "padding (B, Lk)": padding,
        "padding (B, 1, 1, Lk)": padding[:, None, None, :],
        "per head (B, H, 1, Lk)": per_head,
        "additive per head": torch.randn(B, H, 1, LK, generator=g, dtype=torch.float64),
        "additive with -inf": torch.randn(B, 1, 1, LK, generator=g, dtype=torch.float64).masked_fill(
            ~padding[:, None, None], float("-inf")),
    }


@pytest.mark.parametrize("mask_kind", list(_masks()))
def test_one_query_with_grouped_heads_reaches_sdpa_as_rows_of_its_key_value_head(monkeypatch, mask_kind):
    q, k, v = _decoding_step()
    mask = _masks()[mask_kind]
    with plugin.reference_path():
        want = plugin.attention(q, k, v, "softmax", mask=mask)
    seen = []
    real = sdpa_module.F.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        seen.append((tuple(query.shape), tuple(key.shape), kwargs.get("enable_gqa", False)))
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(sdpa_module.F, "scaled_dot_product_attention", spy)
    with plugin.record_calls() as calls:
        got = plugin.attention(q, k, v, "softmax", mask=mask)
    assert calls[0].path == "sdpa"
    # the G = H / Hkv query heads of a group are G query rows of one key/value head: k and v as given
    assert seen == [((B, HKV, H // HKV, D), (B, HKV, LK, D), False)]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", ["sparsemax", "entmax15", "entmax:alpha=1.3"])
def test_the_reference_path_reads_grouped_keys_without_repeating_them(monkeypatch, spec):
    q, k, v = _decoding_step()
    mask = _masks()["padding (B, Lk)"]
    repeated_k, repeated_v = (t.repeat_interleave(H // HKV, dim=1) for t in (k, v))
    with plugin.reference_path():
        want, want_w = plugin.attention(q, repeated_k, repeated_v, spec, mask=mask, return_weights=True)

    def no_repeat(*args):
        raise AssertionError("keys and values were repeated to every query head")

    monkeypatch.setattr(attention_module, "_repeat_kv", no_repeat)
    with plugin.reference_path():
        got, got_w = plugin.attention(q, k, v, spec, mask=mask, return_weights=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_w, want_w, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not chunked.c_kernel_available(), reason="no C compiler for the kernels")
@pytest.mark.parametrize("spec", ["sparsemax", "entmax15"])
def test_a_decoding_step_without_gradients_runs_one_c_call_and_no_autograd_function(monkeypatch, spec):
    q, k, v = _decoding_step(torch.float32)
    mask = _masks()["padding (B, 1, 1, Lk)"]
    with plugin.reference_path():
        want = plugin.attention(q, k, v, spec, mask=mask)
    names = []
    real_call = chunked.ENTMAX_ROWS.call

    def counting(name, **values):
        names.append(name)
        return real_call(name, **values)

    def no_autograd(*args, **kwargs):
        raise AssertionError("the autograd function ran without any input needing a gradient")

    monkeypatch.setattr(chunked.ENTMAX_ROWS, "call", counting)
    monkeypatch.setattr(chunked.ChunkedAttentionFunction, "apply", no_autograd)
    with torch.no_grad(), plugin.record_calls() as calls:
        got = plugin.attention(q, k, v, spec, mask=mask)
    assert calls[0].path == "cpu_chunked"
    # a small chunk whose sparse form is not kept: the row kernel only (no count sum, gather or sparse product)
    assert names == ["entmax_rows_forward"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # with gradients the same step keeps its sparse form for a backward pass over the nonzeros
    q, k, v = _decoding_step(torch.float32)
    q = q * 8  # sharp scores: a few keys in each support, so the chunk is sparse
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    names.clear()
    monkeypatch.undo()
    monkeypatch.setattr(chunked.ENTMAX_ROWS, "call", counting)
    out = plugin.attention(q, k, v, spec)
    out.sum().backward()
    assert "entmax_rows_gather" in names and "entmax_sparse_backward" in names
    with plugin.reference_path():
        qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
        plugin.attention(qr, kr, vr, spec).sum().backward()
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_clean_additive_mask_reaches_the_path_without_a_copy(monkeypatch):
    q, k, v = _decoding_step()
    bias = _masks()["additive with -inf"]
    seen = []
    real = sdpa_module.sdpa_runner

    def runner(gamma, dropout_p):
        run = real(gamma, dropout_p)

        def spy(q, k, v, mask, b, causal, scale):
            seen.append(b)
            return run(q, k, v, mask, b, causal, scale)

        return spy

    monkeypatch.setattr(sdpa_module, "sdpa_runner", runner)
    plugin.attention(q, k, v, "softmax", mask=bias)
    assert seen[0] is bias
    with_nan = bias.clone()
    with_nan[0, 0, 0, 5] = float("nan")  # the rule for NaN in a mask still holds: that row becomes NaN
    out = plugin.attention(q, k, v, "softmax", mask=with_nan)
    assert torch.isnan(out[0]).all() and not torch.isnan(out[1:]).any()
