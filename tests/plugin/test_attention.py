"""plugin.attention: SDPA parity, masks, causality, grouped-query attention, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

import plugin

SPECS = ["softmax", "sparsemax", "entmax15", "entmax:alpha=1.3", "fusedmax:lam=0.3", "oscarmax:lam=0.1"]


def _qkv(B=2, H=4, Lq=6, Lk=9, D=8, Hkv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv or H, Lk, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv or H, Lk, D, generator=g, dtype=dtype)
    return q, k, v


@pytest.fixture(autouse=True)
def _reference_path():
    # the softmax checks against SDPA are meaningful only on the reference path (softmax's
    # fast path is SDPA itself; tests/plugin/test_sdpa_path.py compares it with the reference)
    with plugin.reference_path():
        yield


def test_softmax_attention_equals_sdpa():
    q, k, v = _qkv()
    torch.testing.assert_close(plugin.attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_softmax_attention_equals_sdpa_with_bool_mask_scale_and_causal():
    q, k, v = _qkv(Lq=7, Lk=7)
    mask = torch.rand(2, 1, 7, 7) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(
        plugin.attention(q, k, v, mask=mask, scale=0.3),
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3),
    )
    torch.testing.assert_close(
        plugin.attention(q, k, v, causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True)
    )


def test_softmax_attention_equals_sdpa_with_additive_float_mask():
    q, k, v = _qkv()
    add = torch.randn(2, 1, 6, 9)
    add[0, 0, :, 3] = float("-inf")
    torch.testing.assert_close(
        plugin.attention(q, k, v, mask=add), F.scaled_dot_product_attention(q, k, v, attn_mask=add)
    )


def test_grouped_query_attention_equals_sdpa_gqa():
    q, k, v = _qkv(H=6, Hkv=2)
    torch.testing.assert_close(plugin.attention(q, k, v), F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


@pytest.mark.parametrize("spec", SPECS)
def test_grouped_query_attention_matches_explicitly_repeated_heads(spec):
    q, k, v = _qkv(H=6, Hkv=3)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    torch.testing.assert_close(plugin.attention(q, k, v, spec), plugin.attention(q, kr, vr, spec))


@pytest.mark.parametrize("spec", SPECS)
def test_attention_is_weights_times_values_of_the_normalizer(spec):
    q, k, v = _qkv(dtype=torch.float64)
    out, w = plugin.attention(q, k, v, spec, return_weights=True)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    torch.testing.assert_close(w, plugin.get_normalizer(spec)(scores))
    torch.testing.assert_close(out, w @ v)


@pytest.mark.parametrize("spec", SPECS)
def test_causal_weights_are_zero_above_the_diagonal(spec):
    q, k, v = _qkv(Lq=8, Lk=8)
    _, w = plugin.attention(q, k, v, spec, causal=True, return_weights=True)
    upper = torch.ones(8, 8, dtype=torch.bool).triu(1)
    assert (w[..., upper] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 8))


@pytest.mark.parametrize("spec", SPECS)
def test_causal_with_fewer_queries_aligns_the_last_query_with_the_last_key(spec):
    q, k, v = _qkv(Lq=8, Lk=8)
    full = plugin.attention(q, k, v, spec, causal=True)
    last = plugin.attention(q[:, :, -3:], k, v, spec, causal=True)
    torch.testing.assert_close(last, full[:, :, -3:])


@pytest.mark.parametrize("spec", SPECS)
def test_fully_masked_query_rows_give_zero_output_without_nan(spec):
    q, k, v = _qkv()
    q.requires_grad_()
    mask = torch.ones(2, 1, 6, 9, dtype=torch.bool)
    mask[1, :, 2] = False
    out = plugin.attention(q, k, v, spec, mask=mask)
    assert (out[1, :, 2] == 0).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("spec", SPECS)
def test_padding_does_not_change_the_output(spec):
    q, k, v = _qkv(B=1, Lk=9)
    pad = torch.ones(1, 1, 1, 12, dtype=torch.bool)
    pad[..., 9:] = False
    kp = torch.cat([k, torch.randn(1, 4, 3, 8)], 2)
    vp = torch.cat([v, torch.randn(1, 4, 3, 8)], 2)
    torch.testing.assert_close(plugin.attention(q, kp, vp, spec, mask=pad), plugin.attention(q, k, v, spec))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", ["sparsemax", "entmax15"])
def test_half_precision_attention_stays_finite_with_large_scores(dtype, spec):
    q, k, v = _qkv(dtype=dtype)
    out = plugin.attention(q * 300, k * 300, v, spec)
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_learned_alpha_trains_through_attention_mechanism():
    mech = plugin.AttentionMechanism("entmax:alpha=learned", num_heads=4)
    q, k, v = _qkv()
    mech(q, k, v).pow(2).sum().backward()
    assert mech.normalizer.learned.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="num_heads|trainable"):
        plugin.attention(q, k, v, "entmax:alpha=learned")


def test_dropout_on_weights_is_applied():
    torch.manual_seed(0)
    q, k, v = _qkv()
    a = plugin.attention(q, k, v, "sparsemax", dropout_p=0.5)
    assert not torch.allclose(a, plugin.attention(q, k, v, "sparsemax"))
    with pytest.raises(ValueError, match="dropout_p"):
        plugin.attention(q, k, v, dropout_p=1.5)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(q=torch.randn(2, 4, 6)), "q"),
        (dict(k=torch.randn(2, 3, 9, 8), v=torch.randn(2, 3, 9, 8)), "multiple"),
        (dict(k=torch.randn(2, 4, 9, 5)), "last dimension"),
        (dict(v=torch.randn(2, 4, 8, 8)), "Lk"),
        (dict(mask=torch.ones(3, 1, 6, 9, dtype=torch.bool)), "mask"),
        (dict(mask=torch.ones(2, 1, 6, 9, dtype=torch.int64)), "mask"),
        (dict(normalizer="bogus"), "bogus"),
        (dict(normalizer=3), "normalizer"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, word):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v)
    args.update(kwargs)
    with pytest.raises(ValueError, match=word):
        plugin.attention(**args)
