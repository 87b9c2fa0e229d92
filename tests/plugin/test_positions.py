"""ALiBi (plugin.positions): slopes and bias against tables written out by hand, and the mechanism."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import plugin
from plugin.positions import ALiBiAttentionMechanism, alibi_bias, alibi_slopes, check_positions

# the ALiBi paper (Press et al., 2022, section 3): 8 heads -> 1/2, 1/4, ..., 1/256
HAND_SLOPES = {
    1: [2 ** -8],
    2: [2 ** -4, 2 ** -8],
    4: [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8],
    8: [2 ** -1, 2 ** -2, 2 ** -3, 2 ** -4, 2 ** -5, 2 ** -6, 2 ** -7, 2 ** -8],
    # not a power of two: the 4 slopes of 4 heads, then every other slope of 8 heads (1/2, 1/8)
    6: [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3],
    # 12 heads: the 8 slopes of 8 heads, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 (16 heads' odd ones)
    12: [2 ** -k for k in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5],
}


@pytest.mark.parametrize("heads", sorted(HAND_SLOPES))
def test_slopes_are_the_alibi_papers(heads):
    assert alibi_slopes(heads).tolist() == pytest.approx(HAND_SLOPES[heads], rel=1e-12)


def test_causal_bias_is_minus_slope_times_distance():
    bias = alibi_bias(alibi_slopes(2), 3, 3)
    m0, m1 = 2 ** -4, 2 ** -8
    hand = torch.tensor([
        [[0, m0, 2 * m0], [-m0, 0, m0], [-2 * m0, -m0, 0]],
        [[0, m1, 2 * m1], [-m1, 0, m1], [-2 * m1, -m1, 0]],
    ])
    # row i, column j: -m (i - j); the entries above the diagonal are removed by the causal mask
    assert bias.shape == (1, 2, 3, 3)
    assert_close(bias[0], hand, rtol=0, atol=1e-7)


def test_symmetric_bias_uses_the_absolute_distance():
    bias = alibi_bias(alibi_slopes(1), 3, 3, symmetric=True)
    m = 2 ** -8
    assert_close(bias[0, 0], -m * torch.tensor([[0.0, 1, 2], [1, 0, 1], [2, 1, 0]]), rtol=0, atol=1e-9)


def test_fewer_queries_are_the_last_rows():
    full = alibi_bias(alibi_slopes(4), 7, 7)
    assert_close(alibi_bias(alibi_slopes(4), 2, 7), full[:, :, -2:])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(0)
    with pytest.raises(ValueError, match="q_len"):
        alibi_bias(alibi_slopes(2), 4, 3)
    with pytest.raises(ValueError, match="positions='rotary'.*valid choices: sinusoidal, learned, rope, nope, alibi"):
        check_positions("rotary")


@pytest.mark.parametrize("spec", ["softmax", "entmax:alpha=1.5", "sparsemax", "entmax:alpha=learned"])
def test_mechanism_equals_reference_scores_plus_bias(spec):
    torch.manual_seed(0)
    B, H, L, D = 2, 4, 9, 8
    q, k, v = (torch.randn(B, H, L, D) * 2 for _ in range(3))
    mech = ALiBiAttentionMechanism(spec, num_heads=H)
    out, weights = mech(q, k, v, causal=True, return_weights=True)
    # independent: scores + the hand-written bias, the causal mask, the normalizer on each row
    i, j = torch.arange(L)[:, None], torch.arange(L)[None, :]
    bias = -torch.tensor(HAND_SLOPES[H])[:, None, None] * (i - j).float()
    scores = (q @ k.transpose(-1, -2)) / D ** 0.5 + bias
    scores = scores.masked_fill(j > i, float("-inf"))
    normalizer = mech.normalizer
    expected = normalizer(scores, dim=-1)
    assert_close(weights, expected, rtol=1e-5, atol=1e-6)
    assert_close(out, expected @ v, rtol=1e-5, atol=1e-5)
    fast = mech(q, k, v, causal=True)  # the automatic path (a fast one where it takes a bias)
    assert_close(fast, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", ["entmax:alpha=1.5", "scalable_softmax", "scalable_entmax:alpha=1.5"])
def test_cached_queries_equal_the_full_sequence(spec):
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 4, 6, 8) for _ in range(3))
    mech = ALiBiAttentionMechanism(spec, num_heads=4)
    full = mech(q, k, v, causal=True)
    for t in range(6):
        step = mech(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1])
        assert_close(step[:, :, 0], full[:, :, t], rtol=1e-5, atol=1e-6)


def test_bias_joins_a_padding_mask():
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    pad = torch.tensor([[True] * 5, [True, True, True, False, False]])  # (B, Lk), True = real key
    mech = ALiBiAttentionMechanism("sparsemax", num_heads=2)
    _, w = mech(q, k, v, mask=pad, causal=True, return_weights=True)
    assert (w[1, :, :, 3:] == 0).all()
    assert_close(w.sum(-1), torch.ones(2, 2, 5))


def test_state_dict_is_that_of_the_plain_mechanism():
    plain = plugin.AttentionMechanism("entmax:alpha=learned", num_heads=4)
    alibi = ALiBiAttentionMechanism("entmax:alpha=learned", num_heads=4)
    assert set(alibi.state_dict()) == set(plain.state_dict())
    alibi.load_state_dict(plain.state_dict())


def test_wrong_head_count_raises():
    mech = ALiBiAttentionMechanism("softmax", num_heads=4)
    with pytest.raises(ValueError, match="H = 4"):
        mech(*(torch.randn(1, 2, 3, 4) for _ in range(3)))
