"""sparse_attention_forward on its own: shapes, masks, causality, position bias, against plugin.attention."""

from __future__ import annotations

import types

import pytest
import torch

import hf_models
import plugin


def _module(implementation="sparsemax", is_causal=False, **attrs):
    module = torch.nn.Module()
    module.config = types.SimpleNamespace(_attn_implementation=implementation)
    module.is_causal = is_causal
    for key, value in attrs.items():
        setattr(module, key, value)
    return module.eval()


def _qkv(B=2, H=4, Lq=5, Lk=5, D=8, Hkv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g) * 2
    k = torch.randn(B, Hkv or H, Lk, D, generator=g) * 2
    v = torch.randn(B, Hkv or H, Lk, D, generator=g)
    return q, k, v


def test_output_is_batch_length_heads_dim_and_equals_the_core():
    q, k, v = _qkv(Hkv=2)
    out, weights = hf_models.sparse_attention_forward(_module(), q, k, v, None, scaling=0.5)
    assert out.shape == (2, 5, 4, 8) and out.is_contiguous() and weights is None
    torch.testing.assert_close(out, plugin.attention(q, k, v, "sparsemax", scale=0.5).transpose(1, 2))


def test_causality_from_the_module_when_no_mask_is_given():
    q, k, v = _qkv()
    out, _ = hf_models.sparse_attention_forward(_module(is_causal=True), q, k, v, None)
    explicit = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(out, plugin.attention(q, k, v, "sparsemax", mask=explicit).transpose(1, 2))


def test_a_single_query_row_sees_every_cached_key():
    q, k, v = _qkv(Lq=1, Lk=6)
    out, _ = hf_models.sparse_attention_forward(_module(is_causal=True), q, k, v, None)
    torch.testing.assert_close(out, plugin.attention(q, k, v, "sparsemax").transpose(1, 2))


def test_static_cache_prefill_attends_to_the_filled_slots_only():
    # sdpa_mask gives no mask at the prefill of a static cache: keys past the queries are empty slots
    q, k, v = _qkv(Lq=4, Lk=9)
    out, _ = hf_models.sparse_attention_forward(_module(is_causal=True), q, k, v, None)
    expected = plugin.attention(q, k[:, :, :4], v[:, :, :4], "sparsemax", causal=True)
    torch.testing.assert_close(out, expected.transpose(1, 2))


def test_an_explicit_mask_is_used_as_is_and_not_combined_with_causality():
    q, k, v = _qkv()
    mask = torch.rand(2, 1, 5, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True
    out, _ = hf_models.sparse_attention_forward(_module(is_causal=True), q, k, v, mask)
    torch.testing.assert_close(out, plugin.attention(q, k, v, "sparsemax", mask=mask).transpose(1, 2))


def test_eager_style_float_masks_mask_and_fully_masked_rows_give_zeros():
    q, k, v = _qkv()
    allowed = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    allowed[0, :, :, 3:] = False
    allowed[1, :, 2, :] = False  # a query row with no key
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out, _ = hf_models.sparse_attention_forward(_module(), q, k, v, additive)
    torch.testing.assert_close(out, plugin.attention(q, k, v, "sparsemax", mask=allowed).transpose(1, 2))
    assert (out[1, 2] == 0).all()


def test_position_bias_is_added_to_the_allowed_scores():
    q, k, v = _qkv()
    bias = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(2))
    allowed = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    allowed[1, ..., 4] = False
    out, _ = hf_models.sparse_attention_forward(_module(), q, k, v, allowed, scaling=1.0, position_bias=bias)
    scores = q @ k.transpose(-1, -2) + bias
    probs = plugin.sparsemax(scores, mask=allowed.expand(2, 4, 5, 5))
    torch.testing.assert_close(out, (probs @ v).transpose(1, 2))


def test_weights_are_returned_when_attentions_are_requested():
    q, k, v = _qkv()
    _out, weights = hf_models.sparse_attention_forward(_module(), q, k, v, None, output_attentions=True)
    _expected_out, expected_w = plugin.attention(q, k, v, "sparsemax", return_weights=True)
    torch.testing.assert_close(weights, expected_w)
    assert (weights == 0).any()


def test_roles_read_from_module_attributes():
    assert hf_models.infer_role(_module()) == "encoder"
    assert hf_models.infer_role(_module(is_causal=True)) == "decoder"
    assert hf_models.infer_role(_module(is_decoder=True)) == "cross"
    assert hf_models.infer_role(_module(is_causal=False, is_cross_attention=True)) == "cross"


def test_half_precision_runs_in_float32_and_returns_the_input_dtype():
    q, k, v = (t.to(torch.bfloat16) for t in _qkv())
    out, _ = hf_models.sparse_attention_forward(_module(), q, k, v, None)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_an_unregistered_implementation_on_the_module_raises():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="not a registered spec"):
        hf_models.sparse_attention_forward(_module("nosuchmax"), q, k, v, None)
