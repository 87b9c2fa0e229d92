"""What a normalizer returns is checked where it is first used: the shape always, the values on demand."""

from __future__ import annotations

import contextlib

import pytest
import torch
from cases import CASES

import plugin
from plugin.normalizers import contract
from plugin.normalizers.contract import check_output


def _masked_softmax(scores, mask):
    allowed = scores != float("-inf")
    if mask is not None:
        allowed = allowed & mask
    w = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    return torch.where(allowed, w, torch.zeros_like(w))  # rows with nothing allowed: zeros


def one_key_short(scores, dim=-1, mask=None):
    return _masked_softmax(scores, mask)[..., :-1]


def one_head(scores, dim=-1, mask=None):  # broadcasts in a matmul: silently wrong without the check
    return _masked_softmax(scores, mask)[:, :1]


def transposed(scores, dim=-1, mask=None):
    return _masked_softmax(scores, mask).transpose(-1, -2)


def not_a_tensor(scores, dim=-1, mask=None):
    return _masked_softmax(scores, mask).tolist()


def nan_weights(scores, dim=-1, mask=None):
    w = _masked_softmax(scores, mask).clone()
    w[..., 0, 0] = float("nan")
    return w


def unnormalized(scores, dim=-1, mask=None):
    w = torch.exp(scores)  # 0 where the score is -inf
    return w if mask is None else w * mask


def negative(scores, dim=-1, mask=None):  # rows still sum to 1
    w = _masked_softmax(scores, mask).clone()
    w[..., 0] += 0.5
    w[..., 1] -= 0.5
    return w


def ignores_mask(scores, dim=-1, mask=None):
    return torch.softmax(scores, -1)


def uniform_everywhere(scores, dim=-1, mask=None):  # also on rows with nothing allowed
    return torch.full_like(scores, 1 / scores.shape[-1])


@pytest.fixture
def variant(request):
    name = f"test_{request.param.__name__}"
    plugin.register_normalizer(name, request.param)
    yield name
    plugin.unregister(name)


def _qkv(B=2, H=3, Lq=4, Lk=6, D=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, Lq, D, generator=g), torch.randn(B, H, Lk, D, generator=g),
            torch.randn(B, H, Lk, D, generator=g))


@pytest.mark.parametrize("variant, got", [
    (one_key_short, "(2, 3, 4, 5)"), (one_head, "(2, 1, 4, 6)"), (transposed, "(2, 3, 6, 4)"),
], indirect=["variant"])
@pytest.mark.parametrize("spec", ["{}", "{}+continuous_softmax"])
@pytest.mark.parametrize("return_weights", [False, True])
def test_a_normalizer_of_the_wrong_shape_raises_naming_the_variant_and_both_shapes(variant, got, spec,
                                                                                    return_weights):
    q, k, v = _qkv()
    with pytest.raises(ValueError) as err:
        plugin.attention(q, k, v, spec.format(variant), return_weights=return_weights)
    for words in (repr(variant), f"shape {got}", "(2, 3, 4, 6)"):
        assert words in str(err.value)


@pytest.mark.parametrize("variant", [not_a_tensor], indirect=True)
def test_a_normalizer_that_returns_no_tensor_raises_naming_the_variant(variant):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=f"{variant}.*returned list.*(2, 3, 4, 6)"):
        plugin.attention(q, k, v, variant)


def test_an_unregistered_callable_of_the_wrong_shape_is_named_too():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"'one_head' returned weights of shape \(2, 1, 4, 6\)"):
        plugin.attention(q, k, v, one_head)
    with pytest.raises(ValueError, match=r"'one_head' returned weights of shape \(2, 1, 4, 6\)"):
        plugin.AttentionMechanism(one_head)(q, k, v)


@pytest.mark.parametrize("variant", [one_head], indirect=True)
def test_continuous_attention_checks_the_shape_of_its_discrete_normalizer(variant):
    module = plugin.ContinuousAttention(query_dim=8, value_dim=8, location="attention", normalizer=variant)
    query, values = torch.randn(2, 4, 8), torch.randn(2, 6, 8)
    with pytest.raises(ValueError, match=rf"{variant}.*shape \(2, 1, 6\).*\(2, 4, 6\)"):
        module(query, values)


@pytest.mark.parametrize("variant, words", [
    (nan_weights, ["NaN or infinite", "rows whose scores are finite"]),
    (unnormalized, ["row sum", "sum to 1"]),
    (negative, ["negative weights (down to -"]),
    (ignores_mask, ["nonzero weight(s) on masked entries"]),
    (uniform_everywhere, ["nonzero weight(s) on masked entries"]),
], indirect=["variant"])
@pytest.mark.parametrize("switch", ["context", "environment"])
def test_the_check_names_the_variant_and_what_is_wrong(variant, words, switch, monkeypatch):
    monkeypatch.delenv("PLUGIN_CHECK_NORMALIZERS", raising=False)
    q, k, v = _qkv()
    mask = torch.ones(2, 1, 4, 6, dtype=torch.bool)
    mask[0, :, :, -2:] = False
    mask[1, :, 2] = False  # a row with nothing allowed
    plugin.attention(q, k, v, variant, mask=mask)  # unchecked by default: no host read on the reference path
    if switch == "environment":
        monkeypatch.setenv("PLUGIN_CHECK_NORMALIZERS", "1")
        with plugin.check_normalizers(False):  # a block turns it off whatever the environment says
            plugin.attention(q, k, v, variant, mask=mask)
        check = contextlib.nullcontext()
    else:
        check = plugin.check_normalizers()
    with check, pytest.raises(ValueError) as err:
        plugin.attention(q, k, v, variant, mask=mask)
    for w in [repr(variant), "PLUGIN_CHECK_NORMALIZERS", *words]:
        assert w in str(err.value)


def test_the_check_leaves_rows_with_nan_scores_alone_and_accepts_rounding():
    scores = torch.randn(3, 5, dtype=torch.float64)
    scores[1, 2] = float("nan")
    scores[2, :] = float("-inf")  # nothing allowed
    p = plugin.softmax(scores)
    assert p[1].isnan().all() and (p[2] == 0).all()
    with plugin.check_normalizers():
        check_output(p, scores, None, "softmax")
        check_output(p * (1 + 1e-4), scores, None, "softmax")
        with pytest.raises(ValueError, match="row sum"):
            check_output(p * 1.01, scores, None, "softmax")


def test_a_bad_environment_value_is_refused(monkeypatch):
    monkeypatch.setenv("PLUGIN_CHECK_NORMALIZERS", "maybe")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="PLUGIN_CHECK_NORMALIZERS.*'maybe'"):
        plugin.attention(q, k, v, "softmax", return_weights=True)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("spec", [
    "softmax", "sparsemax:gamma=0.5", "entmax15", "entmax:alpha=1.3", "entmax:alpha=learned", "fusedmax",
    "oscarmax:lam=0.2,gamma=2", "sparsemax+continuous_softmax", "continuous_entmax15", "scalable_softmax",
    "scalable_entmax:alpha=learned",
])
def test_every_builtin_passes_the_check_on_every_case(spec, case, monkeypatch):
    checked = []
    problems = contract._problems
    monkeypatch.setattr(contract, "_problems", lambda *a: checked.append(problems(*a)) or checked[-1])
    q, k, v, kwargs = CASES[case].tensors()
    mech = plugin.AttentionMechanism(spec, num_heads=q.shape[1])
    with plugin.reference_path(), plugin.check_normalizers():
        mech(q, k, v, return_weights=True, **kwargs)
    assert checked == [[]]


def test_a_check_block_holds_in_its_own_thread_only_and_blocks_nest(monkeypatch):
    import threading

    monkeypatch.delenv("PLUGIN_CHECK_NORMALIZERS", raising=False)
    seen = {}
    with plugin.check_normalizers():
        thread = threading.Thread(target=lambda: seen.setdefault("other", contract.checking()))
        thread.start()
        thread.join()
        with plugin.check_normalizers(False):
            seen["inner"] = contract.checking()
        seen["outer"] = contract.checking()
    assert seen == {"other": False, "inner": False, "outer": True}
    assert not contract.checking()
    with pytest.raises(ValueError, match="True or False"):
        with plugin.check_normalizers("yes"):
            pass
