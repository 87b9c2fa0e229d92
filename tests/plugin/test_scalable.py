"""Length-scaled variants: scalable_softmax (SSMax) and scalable_entmax (ASEntmax).

The factor at known key counts (causal, padding, cached decoding), the key counts the fast paths
compute against a brute-force count, gradients of the length parameters against finite differences
and against the reference path, and the parameter checks. Every declared path is also held to the
reference on every case of ``cases.CASES`` by ``test_paths_table.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

import plugin
from plugin import kernels
from plugin.paths import keys_per_row


def _qkv(B=2, H=3, Lq=7, Lk=7, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g, dtype=dtype)
    k = torch.randn(B, H, Lk, D, generator=g, dtype=dtype)
    v = torch.randn(B, H, Lk, D, generator=g, dtype=dtype)
    return q, k, v


def _scores(q, k):
    return q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])


# ----------------------------------------------------------------------------- the factor at known lengths


def test_ssmax_scales_each_causal_row_by_s_log_of_its_position():
    q, k, v = _qkv()
    s = 0.43
    with kernels.reference_path():
        out = plugin.attention(q, k, v, f"scalable_softmax:s={s}", causal=True)
    z = _scores(q, k)
    L = q.shape[2]
    n = torch.arange(1, L + 1, dtype=torch.float64)  # row i sees i + 1 keys
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    expected = torch.softmax(((s * torch.log(n)).view(L, 1) * z).masked_fill(~causal, -math.inf), -1) @ v
    torch.testing.assert_close(out, expected)


def test_asentmax_factor_with_padding_counts_the_allowed_keys_of_each_row():
    q, k, v = _qkv(Lq=5, Lk=9)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., 6:] = False  # 6 keys in the first element, 9 in the second
    beta, gamma, delta, alpha = 0.7, 0.5, 0.2, 1.5
    spec = f"scalable_entmax:alpha={alpha},beta={beta},gamma={gamma},delta={delta}"
    out = plugin.attention(q, k, v, spec, mask=mask)
    z = _scores(q, k)
    for b, n in ((0, 6), (1, 9)):
        theta = delta + beta * math.log(n + 1) ** gamma
        p = plugin.entmax(theta * z[b], alpha=alpha, mask=mask[b])
        torch.testing.assert_close(out[b], p @ v[b], atol=1e-6, rtol=1e-6)  # out: the cpu_chunked path (float32)


def test_the_factor_of_a_learned_parameter_is_per_head():
    H = 3
    mech = plugin.AttentionMechanism("scalable_softmax", num_heads=H)
    with torch.no_grad():
        mech.normalizer.s.weight.copy_(torch.tensor([0.2, 0.5, 1.0]))
    n = torch.tensor([[[1, 4, 16]]])
    factor = mech.normalizer.factor(n, torch.float64)
    expected = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64).view(3, 1) * torch.log(n.double())
    torch.testing.assert_close(factor, expected)


@pytest.mark.parametrize("spec", ["scalable_softmax", "scalable_entmax", "scalable_entmax:alpha=learned"])
def test_cached_decoding_step_by_step_equals_the_full_causal_forward(spec):
    """Each decoding step (one query over the growing cache) sees n = cache length, as the full forward's row."""
    B, H, L = 2, 3, 11
    q, k, v = _qkv(B, H, L, L, dtype=torch.float32)
    mech = plugin.AttentionMechanism(spec, num_heads=H)
    with torch.no_grad():
        for name, w in mech.normalizer.named_parameters():
            w.copy_(torch.linspace(-0.4, 0.6, H) if "gamma" in name else torch.linspace(0.3, 1.1, H))
    with plugin.record_calls() as calls:
        full = mech(q, k, v, causal=True)
        steps = [mech(q[:, :, t:t + 1], k[:, :, :t + 1], v[:, :, :t + 1], causal=True) for t in range(L)]
    assert all(c.path != "reference" for c in calls), [c.path for c in calls]
    torch.testing.assert_close(torch.cat(steps, dim=2), full, atol=2e-6, rtol=2e-6)
    with kernels.reference_path():
        torch.testing.assert_close(mech(q, k, v, causal=True), full, atol=2e-6, rtol=2e-6)


def test_decoding_over_a_long_cache_stays_on_a_fast_path():
    B, H, Lk, D = 1, 2, 4096, 16
    q = torch.randn(B, H, 1, D)
    k, v = torch.randn(B, H, Lk, D), torch.randn(B, H, Lk, D)
    for spec in ("scalable_softmax:s=0.5", "scalable_entmax:beta=0.5,gamma=0.3"):
        choice = plugin.explain_path(q, k, v, spec, causal=True)
        assert choice.name in ("sdpa", "cpu_chunked", "cpu_chunked_torch"), choice


def test_a_fixed_factor_of_one_is_the_base_variant():
    q, k, v = _qkv(dtype=torch.float32)
    out = plugin.attention(q, k, v, "scalable_entmax:alpha=1.3,beta=0,gamma=1,delta=1", causal=True)
    torch.testing.assert_close(out, plugin.attention(q, k, v, "entmax:alpha=1.3", causal=True))


# ----------------------------------------------------------------------------- key counts of the fast paths


def _brute_count(mask, bias, causal, B, H, Lq, Lk):
    allowed = torch.ones(B, H, Lq, Lk, dtype=torch.bool)
    if mask is not None:
        allowed = allowed & mask
    if bias is not None:
        allowed = allowed & (bias != -math.inf)
    if causal:
        allowed = allowed & (torch.arange(Lk) <= torch.arange(Lq).unsqueeze(-1) + Lk - Lq)
    return allowed.sum(-1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Lq,Lk", [(6, 6), (3, 9), (1, 9), (8, 5)])
@pytest.mark.parametrize("kind", ["none", "keys", "per_head_keys", "per_query", "bias", "keys+bias"])
def test_keys_per_row_counts_what_the_reference_allows(kind, Lq, Lk, causal):
    B, H = 2, 3
    g = torch.Generator().manual_seed(1)
    mask = bias = None
    if kind in ("keys", "keys+bias"):
        mask = torch.rand(B, 1, 1, Lk, generator=g) > 0.4
    elif kind == "per_head_keys":
        mask = torch.rand(B, H, 1, Lk, generator=g) > 0.4
    elif kind == "per_query":
        mask = torch.rand(B, 1, Lq, Lk, generator=g) > 0.4
    if "bias" in kind:
        bias = torch.randn(1, H, Lq, Lk, generator=g).masked_fill(torch.rand(1, H, Lq, Lk, generator=g) > 0.6,
                                                                 -math.inf)
    n = keys_per_row(mask, bias, causal, Lq, Lk, "cpu")
    assert torch.equal(n.expand(B, H, Lq), _brute_count(mask, bias, causal, B, H, Lq, Lk))


# ----------------------------------------------------------------------------- gradients


def _learned(spec, H, dtype=torch.float64):
    mech = plugin.AttentionMechanism(spec, num_heads=H).to(dtype)
    with torch.no_grad():
        for name, w in mech.normalizer.named_parameters():
            low, high = {"learned.weight": (-1.0, 1.0), "gamma.weight": (-0.5, 0.7)}.get(name, (0.3, 1.2))
            w.copy_(torch.linspace(low, high, H))
    return mech


@pytest.mark.parametrize("spec", ["scalable_softmax", "scalable_entmax", "scalable_entmax:alpha=learned",
                                  "scalable_entmax:alpha=2"])
@pytest.mark.parametrize("masking", ["causal", "padding"])
def test_length_parameters_gradcheck_on_the_reference_path(spec, masking):
    """float64 finite differences for s / beta / gamma (and a learned alpha) and the inputs."""
    H = 2
    q, k, v = _qkv(B=2, H=H, Lq=5, Lk=5, D=4)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1, ..., :2] = False
    kw = {"causal": True} if masking == "causal" else {"mask": mask}
    mech = _learned(spec, H)
    names = [n for n, _ in mech.named_parameters()]

    def run(q_, *weights):
        return torch.func.functional_call(mech, dict(zip(names, weights)), (q_, k, v), kw)

    leaves = [q.clone().requires_grad_()] + [p.detach().clone().requires_grad_() for p in mech.parameters()]
    with kernels.reference_path():
        assert torch.autograd.gradcheck(run, tuple(leaves), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["cpu_chunked", "cpu_chunked_torch"])
@pytest.mark.parametrize("spec", ["scalable_entmax", "scalable_entmax:alpha=learned"])
def test_fast_path_gradients_of_the_length_parameters_equal_the_reference(spec, path):
    H = 3
    q, k, v = _qkv(B=2, H=H, Lq=9, Lk=9, D=8, dtype=torch.float32)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[0, ..., 7:] = False
    mech = _learned(spec, H, torch.float32)

    def grads(p):
        with kernels.use_path(p), plugin.record_calls() as calls:
            out = mech(q, k, v, mask=mask, causal=True)
        assert calls[0].path == p
        return torch.autograd.grad((out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum(),
                                   list(mech.parameters()))

    for g, r in zip(grads(path), grads("reference")):
        torch.testing.assert_close(g, r, atol=2e-5, rtol=2e-4)


def test_sdpa_path_gradient_of_s_equals_the_reference():
    H = 3
    q, k, v = _qkv(B=2, H=H, Lq=6, Lk=10, D=8, dtype=torch.float32)
    mech = _learned("scalable_softmax", H, torch.float32)

    def grads(p):
        with kernels.use_path(p), plugin.record_calls() as calls:
            out = mech(q, k, v, causal=True)
        assert calls[0].path == p
        weight = torch.linspace(-1, 2, out.numel()).view_as(out)
        return torch.autograd.grad((out * weight).sum(), [mech.normalizer.s.weight])

    torch.testing.assert_close(grads("sdpa")[0], grads("reference")[0], atol=2e-5, rtol=2e-4)


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("spec,words", [
    ("scalable_softmax:s=-1", ["'s'", "scalable_softmax", ">= 0", "'learned'"]),
    ("scalable_softmax:s=abc", ["'s'", "'learned'"]),
    ("scalable_entmax:alpha=0.5", ["'alpha'", "[1, 2]"]),
    ("scalable_entmax:beta=-0.1", ["'beta'", ">= 0"]),
    ("scalable_entmax:gamma=9", ["'gamma'", "[-4, 4]"]),
    ("scalable_entmax:delta=-1", ["'delta'"]),
    ("scalable_entmax:s=1", ["'s'", "alpha", "beta", "gamma", "delta"]),
])
def test_invalid_parameters_raise_naming_the_parameter(spec, words):
    with pytest.raises(ValueError) as err:
        plugin.AttentionMechanism(spec, num_heads=2)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_learned_parameters_need_the_number_of_heads():
    with pytest.raises(ValueError, match="num_heads"):
        plugin.get_normalizer("scalable_softmax")
    with pytest.raises(ValueError, match="num_heads"):
        plugin.attention(*_qkv(), "scalable_entmax")
    plugin.attention(*_qkv(), "scalable_entmax:beta=0.5,gamma=0")  # fixed values: no parameters


def test_learned_parameters_are_per_head_state():
    mech = plugin.AttentionMechanism("scalable_entmax:alpha=learned", num_heads=4)
    names = {n: tuple(p.shape) for n, p in mech.named_parameters()}
    assert names == {"normalizer.learned.weight": (4,), "normalizer.beta.weight": (4,),
                     "normalizer.gamma.weight": (4,)}
    mech2 = plugin.AttentionMechanism("scalable_softmax:s_init=0.3", num_heads=4)
    assert torch.equal(mech2.normalizer.s.weight.detach(), torch.full((4,), 0.3))


def test_plain_functions_equal_the_modules():
    z = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    torch.testing.assert_close(plugin.scalable_softmax(z, mask=mask, s=0.6),
                               plugin.get_normalizer("scalable_softmax:s=0.6")(z, mask=mask))
    torch.testing.assert_close(plugin.scalable_entmax(z, mask=mask, alpha=1.3, beta=0.4, gamma=0.5, delta=0.5),
                               plugin.get_normalizer("scalable_entmax:alpha=1.3,beta=0.4,gamma=0.5,delta=0.5")(
                                   z, mask=mask))


def test_a_schedule_moves_alpha_then_hands_over_to_the_learned_alpha():
    H = 2
    q, k, v = _qkv(B=1, H=H, Lq=6, Lk=6, dtype=torch.float32)
    mech = plugin.AttentionMechanism("scalable_entmax:alpha=learned", num_heads=H,
                                     schedule="linear:param=alpha,start=1,end=1.5,steps=4")
    seen = []
    for step in (0, 2, 4):
        mech.set_schedule_step(step)
        with plugin.record_calls() as calls:
            out = mech(q, k, v, causal=True)
        with kernels.reference_path():
            torch.testing.assert_close(out, mech(q, k, v, causal=True), atol=2e-6, rtol=2e-6)
        seen.append((calls[0].spec, calls[0].path))
    assert seen == [("scalable_entmax:alpha=1", "sdpa"), ("scalable_entmax:alpha=1.25", "cpu_chunked"),
                    ("scalable_entmax:alpha=learned", "cpu_chunked")]
    fixed = plugin.AttentionMechanism("scalable_softmax:s=0.5", schedule="linear:param=s,start=0,end=0.5,steps=2")
    with plugin.record_calls() as calls:  # s = 0 at step 0: a factor of 0, uniform weights
        torch.testing.assert_close(fixed(q, k, v), v.mean(2, keepdim=True).expand_as(q))
    assert calls[0].spec == "scalable_softmax:s=0"


def test_a_schedule_of_a_learned_length_parameter_is_refused_naming_it():
    with pytest.raises(ValueError, match="'beta' is learned.*alpha, delta"):
        plugin.AttentionMechanism("scalable_entmax", num_heads=2, schedule="linear:param=beta,start=0,end=1.5,steps=4")


@pytest.mark.parametrize("spec,path", [("scalable_softmax", "sdpa"), ("scalable_entmax:alpha=1", "sdpa"),
                                       ("scalable_entmax", "cpu_chunked_torch"),
                                       ("scalable_entmax:alpha=learned", "cpu_chunked_torch")])
def test_length_parameters_gradcheck_on_the_fast_path_in_float64(spec, path):
    """float64 finite differences through the declared fast path itself (queries scaled, base path run)."""
    H = 2
    q, k, v = _qkv(B=2, H=H, Lq=4, Lk=6, D=4)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., 4:] = False
    mech = _learned(spec, H)
    names = [n for n, _ in mech.named_parameters()]

    def run(q_, *weights):
        return torch.func.functional_call(mech, dict(zip(names, weights)), (q_, k, v), {"mask": mask, "causal": True})

    leaves = [q.clone().requires_grad_()] + [p.detach().clone().requires_grad_() for p in mech.parameters()]
    with kernels.use_path(path), plugin.record_calls() as calls:
        assert torch.autograd.gradcheck(run, tuple(leaves), eps=1e-6, atol=1e-6)
    assert {c.path for c in calls} == {path}


def test_ssmax_keeps_the_focus_that_softmax_loses_as_n_grows():
    """The SSMax paper's Figure 1 input (-2 everywhere, +3 on one key, s = 0.43): the top weight is
    1 / (1 + (n - 1) n^(-5 s)), towards 1 as n grows, where softmax's 1 / (1 + (n - 1) e^(-5)) fades."""
    s = 0.43
    tops, soft = [], []
    for n in (10, 100, 1000, 10000):
        x = torch.full((n,), -2.0, dtype=torch.float64)
        x[-1] = 3.0
        top = float(plugin.scalable_softmax(x, s=s)[-1])
        assert top == pytest.approx(1 / (1 + (n - 1) * n ** (-5 * s)), rel=1e-12)
        tops.append(top)
        soft.append(float(torch.softmax(x, -1)[-1]))
    assert tops == sorted(tops) and tops[-1] > 0.999
    assert soft == sorted(soft, reverse=True) and soft[-1] < 0.02


def test_the_plain_function_as_a_normalizer_takes_the_reference_path_and_says_why():
    q, k, v = _qkv(dtype=torch.float32)
    with plugin.record_calls() as calls:
        out = plugin.attention(q, k, v, plugin.scalable_softmax, causal=True)
    assert calls[0].path == "reference" and "length factor" in calls[0].refused["sdpa"]
    torch.testing.assert_close(out, plugin.attention(q, k, v, "scalable_softmax:s=1", causal=True))
