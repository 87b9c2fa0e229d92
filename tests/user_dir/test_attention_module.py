"""PluggableMultiheadAttention computes the requested normalizer, with fairseq's masks and caches."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import plugin
from user_dir.modules import PluggableMultiheadAttention

E, H = 16, 4
DISCRETE = [
    "softmax",
    "sparsemax",
    "entmax15",
    "entmax:alpha=1.3",
    "fusedmax:lam=0.5",
    "oscarmax:lam=0.1",
]


def _module(spec: str, role: str, seed: int = 0) -> PluggableMultiheadAttention:
    torch.manual_seed(seed)
    kind = {"cross": {"encoder_decoder_attention": True, "kdim": E, "vdim": E}}.get(role, {"self_attention": True})
    m = PluggableMultiheadAttention(E, H, spec=spec, role=role, **kind)
    with torch.no_grad():
        m.q_proj.weight.mul_(4.0)  # sharper scores: sparse mechanisms give exact zeros
    return m.eval()


def _inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    T, S, B = 5, 7, 3
    query = torch.randn(T, B, E, generator=g)
    key = torch.randn(S, B, E, generator=g)
    padding = torch.zeros(B, S, dtype=torch.bool)
    padding[1, :2] = True  # left padding, as fairseq pads sources
    padding[2, :4] = True
    return query, key, padding


def _reference(m: PluggableMultiheadAttention, spec: str, query, key, allowed, additive=None):
    """Projections, scores, the normalizer from the registry, context: written out independently."""
    T, B, _ = query.shape
    S = key.shape[0]
    D = E // H

    def heads(x, L):
        return x.view(L, B, H, D).permute(1, 2, 0, 3)

    q, k, v = heads(m.q_proj(query), T), heads(m.k_proj(key), S), heads(m.v_proj(key), S)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)
    if additive is not None:
        scores = scores + additive
    p = plugin.get_normalizer(spec)(scores, dim=-1, mask=allowed)
    out = (p @ v).permute(2, 0, 1, 3).reshape(T, B, E)
    return m.out_proj(out), p


@pytest.mark.parametrize("spec", DISCRETE)
def test_cross_attention_computes_the_requested_normalizer(spec):
    m = _module(spec, "cross")
    query, key, padding = _inputs()
    with plugin.record_calls() as calls:
        out, weights = m(query, key, key, key_padding_mask=padding, static_kv=True, need_head_weights=True)
    ref_out, ref_p = _reference(m, spec, query, key, ~padding[:, None, None, :])
    assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert_close(weights, ref_p.transpose(0, 1), rtol=1e-5, atol=1e-6)  # (H, B, T, S), fairseq's layout
    assert [(c.role, c.spec) for c in calls] == [("cross", plugin.canonical_spec(spec))]
    assert bool((weights[:, 1, :, :2] == 0).all()) and bool((weights[:, 2, :, :4] == 0).all())  # padding
    if spec != "softmax":
        # exact zeros beyond the padding: this fails if softmax ran instead
        assert bool((weights[:, 0] == 0).any())
        softmax_out, _ = _reference(m, "softmax", query, key, ~padding[:, None, None, :])
        assert not torch.allclose(out, softmax_out, atol=1e-3)


@pytest.mark.parametrize("spec", DISCRETE)
@pytest.mark.parametrize("role", ["encoder", "decoder"])
def test_self_attention_computes_the_requested_normalizer(spec, role):
    m = _module(spec, role).train()  # training mode: fairseq's fast path would be taken here
    query, _, padding = _inputs()
    padding = padding[:, : query.shape[0]]
    T = query.shape[0]
    future = torch.triu(torch.full((T, T), float("-inf")), 1) if role == "decoder" else None
    with plugin.record_calls() as calls:
        out, _ = m(query, query, query, key_padding_mask=padding, attn_mask=future, need_weights=False)
    allowed = ~padding[:, None, None, :]
    if future is not None:
        allowed = allowed & (future == 0)
    ref_out, _ = _reference(m, spec, query, query, allowed)
    assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert [(c.role, c.spec, c.training) for c in calls] == [(role, plugin.canonical_spec(spec), True)]


def test_learned_alpha_is_a_trained_parameter_of_the_layer():
    m = _module("entmax:alpha=learned", "encoder").train()
    names = [n for n, _ in m.named_parameters()]
    assert "mechanism.normalizer.learned.weight" in names
    query, _, _ = _inputs()
    out, _ = m(query, query, query, need_weights=False)
    out.square().sum().backward()
    grad = m.mechanism.normalizer.learned.weight.grad
    assert grad is not None and bool((grad != 0).all())


def test_additive_float_mask_is_added_to_the_scores():
    """A float attn_mask other than 0/-inf (a position bias) is added, with padding still masked."""
    m = _module("sparsemax", "encoder")
    query, _, padding = _inputs()
    T = query.shape[0]
    padding = padding[:, :T]
    bias = -0.3 * (torch.arange(T)[:, None] - torch.arange(T)[None, :]).abs().float()
    out, _ = m(query, query, query, key_padding_mask=padding, attn_mask=bias, need_weights=False)
    ref_out, _ = _reference(m, "sparsemax", query, query, ~padding[:, None, None, :], additive=bias)
    assert_close(out, ref_out, rtol=1e-5, atol=1e-6)


def test_bool_attn_mask_follows_pytorch_convention():
    m = _module("entmax15", "encoder")
    query, _, _ = _inputs()
    T = query.shape[0]
    blocked = torch.rand(T, T, generator=torch.Generator().manual_seed(5)) > 0.6
    blocked.fill_diagonal_(False)
    out, _ = m(query, query, query, attn_mask=blocked, need_weights=False)
    ref_out, _ = _reference(m, "entmax15", query, query, ~blocked)
    assert_close(out, ref_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spec", ["sparsemax", "entmax:alpha=learned"])
def test_beam_shared_cache_equals_repeated_encoder_states(spec):
    """With set_beam_size, the encoder keys are cached once per sentence; results are unchanged."""
    _query, key, padding = _inputs()
    beam = 2
    key_rep = key.repeat_interleave(beam, dim=1)
    padding_rep = padding.repeat_interleave(beam, dim=0)
    steps = torch.randn(3, 1, key.shape[1] * beam, E, generator=torch.Generator().manual_seed(2))
    outputs = []
    for share in (False, True):
        m = _module(spec, "cross")
        if share:
            m.set_beam_size(beam)
        state: dict = {}
        outs = []
        for t in range(steps.shape[0]):
            out, w = m(steps[t], key_rep, key_rep, key_padding_mask=padding_rep, incremental_state=state,
                       static_kv=True, need_head_weights=True)
            outs.append((out, w))
        cached = m._get_input_buffer(state)["prev_key"]
        assert cached.shape[0] == (key.shape[1] if share else key.shape[1] * beam)
        outputs.append(outs)
    for (a, wa), (b, wb) in zip(*outputs):
        assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert_close(wa, wb, rtol=1e-6, atol=1e-6)


def test_before_softmax_is_refused():
    m = _module("sparsemax", "encoder")
    query, _, _ = _inputs()
    with pytest.raises(ValueError, match="before_softmax"):
        m(query, query, query, before_softmax=True)


def test_xformers_is_refused():
    with pytest.raises(ValueError, match="xformers"):
        PluggableMultiheadAttention(E, H, spec="sparsemax", self_attention=True,
                                    xformers_att_config='{"name": "scaled_dot_product"}')


def test_unknown_spec_lists_the_variants():
    with pytest.raises(ValueError, match="valid choices:.*sparsemax"):
        PluggableMultiheadAttention(E, H, spec="nosuchmax", self_attention=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_follows_float32(dtype):
    m = _module("entmax15", "cross")
    query, key, padding = _inputs()
    out32, w32 = m(query, key, key, key_padding_mask=padding, static_kv=True)
    m_half = m.to(dtype)
    out16, w16 = m_half(query.to(dtype), key.to(dtype), key.to(dtype), key_padding_mask=padding, static_kv=True)
    assert out16.dtype == dtype and torch.isfinite(out16).all()
    assert_close(out16.float(), out32, rtol=0.05, atol=0.05)
    assert_close(w16.float(), w32, rtol=0.05, atol=0.02)


def test_attention_dropout_follows_fairseq_dropout_rules():
    """Dropout on the weights in training, none in evaluation unless fairseq retains it (--retain-dropout)."""
    torch.manual_seed(0)
    m = PluggableMultiheadAttention(E, H, spec="sparsemax", role="encoder", self_attention=True, dropout=0.5)
    query, _, _ = _inputs()

    def twice():
        return [m(query, query, query, need_weights=False)[0] for _ in range(2)]

    m.train()
    a, b = twice()
    assert not torch.equal(a, b)
    m.eval()
    a, b = twice()
    assert torch.equal(a, b)
    m.dropout_module.apply_during_inference = True
    a, b = twice()
    assert not torch.equal(a, b)
