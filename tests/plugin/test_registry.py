"""Spec strings and the registry."""

import pytest
import torch

import plugin
from plugin.registry import Param


def test_available_normalizers_lists_every_builtin_with_defaults():
    names = plugin.available_normalizers()
    for name in ["softmax", "sparsemax", "entmax15", "entmax", "fusedmax", "oscarmax"]:
        assert name in names
    assert names["entmax"] == {"alpha": 1.5}
    assert names["fusedmax"] == {"lam": 1.0, "gamma": 1.0}


def test_get_normalizer_binds_parameters():
    torch.manual_seed(0)
    x = torch.randn(4, 9)
    torch.testing.assert_close(plugin.get_normalizer("entmax:alpha=1.3")(x), plugin.entmax(x, alpha=1.3))
    torch.testing.assert_close(plugin.get_normalizer("sparsemax:gamma=0.5")(x), plugin.sparsemax(x, gamma=0.5))
    torch.testing.assert_close(
        plugin.get_normalizer("fusedmax:lam=0.5, gamma=2")(x), plugin.fusedmax(x, lam=0.5, gamma=2.0)
    )


def test_canonical_spec_normalizes_spacing_and_numbers():
    assert plugin.canonical_spec(" entmax : alpha = 1.30 ") == "entmax:alpha=1.3"
    assert plugin.canonical_spec("fusedmax:gamma=1,lam=0.5") == "fusedmax:gamma=1,lam=0.5"
    assert plugin.canonical_spec("sparsemax") == "sparsemax"


@pytest.mark.parametrize(
    "spec, words",
    [
        ("nosuchmax", ["nosuchmax", "sparsemax", "entmax"]),
        ("", ["empty"]),
        ("entmax:beta=2", ["beta", "alpha"]),
        ("entmax:alpha=0.99", ["alpha", "[1, 2]"]),
        ("entmax:alpha=0.5", ["alpha"]),
        ("entmax:alpha=abc", ["alpha", "learned"]),
        ("fusedmax:lam=-1", ["lam", ">= 0"]),
        ("sparsemax:gamma=0", ["gamma", ">= 1e-06"]),
        ("sparsemax:gamma=inf", ["gamma"]),
        ("sparsemax:gamma", ["key=value"]),
        ("sparsemax:gamma=1,gamma=2", ["twice"]),
        ("sparsemax+entmax15", ["at most one discrete"]),
    ],
)
def test_bad_specs_raise_value_error_naming_the_problem(spec, words):
    with pytest.raises(ValueError) as err:
        plugin.canonical_spec(spec)
    for w in words:
        assert w in str(err.value)


def test_non_string_spec_raises():
    with pytest.raises(ValueError, match="string"):
        plugin.parse_spec(3)


def test_continuous_spec_is_not_a_normalizer():
    if "continuous_softmax" not in plugin.variants():
        pytest.fail("continuous variants are not registered")
    with pytest.raises(ValueError, match="not a discrete normalizer"):
        plugin.get_normalizer("continuous_softmax")


def test_register_a_user_variant_and_use_it_everywhere():
    def top1(scores, dim=-1, mask=None, temperature=1.0):
        return plugin.sparsemax(scores, dim=dim, mask=mask, gamma=temperature * 1e-3)

    plugin.register_normalizer(
        "test_hardmax",
        top1,
        params=(Param("temperature", 1.0, float, low=0, low_inclusive=False),),
        formula="argmax as a one-hot",
        replace=True,
    )
    assert plugin.available_normalizers()["test_hardmax"] == {"temperature": 1.0}
    q = torch.randn(1, 1, 3, 4)
    k = torch.randn(1, 1, 5, 4)
    v = torch.randn(1, 1, 5, 4)
    out, w = plugin.attention(q, k, v, "test_hardmax:temperature=2", return_weights=True)
    assert ((w == 0) | (w == 1)).all()
    with pytest.raises(ValueError, match="temperature"):
        plugin.get_normalizer("test_hardmax:temperature=-1")
    with pytest.raises(ValueError, match="already registered"):
        plugin.register_normalizer("test_hardmax", top1)


def test_register_rejects_bad_names():
    with pytest.raises(ValueError, match="name"):
        plugin.register_normalizer("bad name", lambda s, dim=-1, mask=None: s)


def test_record_calls_reports_spec_and_role():
    mech = plugin.AttentionMechanism("sparsemax:gamma=0.5", role="encoder")
    q = torch.randn(1, 2, 3, 4)
    with plugin.record_calls() as calls:
        mech(q, q, q)
    assert [(c.spec, c.role) for c in calls] == [("sparsemax:gamma=0.5", "encoder")]
    mech(q, q, q)
    assert len(calls) == 1  # recording stopped with the block


def _only_a(text):
    if text != "a":
        raise ValueError(text)


@pytest.mark.parametrize(
    "param, words",
    [
        (Param("x", 5.0, float, low=0, high=1), ["'x'", "5.0", "[0, 1]", "out of range"]),
        (Param("x", 0.0, float, low=0, low_inclusive=False), ["'x'", "0.0", "> 0"]),
        (Param("n", 2.5, int, low=1), ["'n'", "2.5", "integer"]),
        (Param("x", "abc", float), ["'x'", "'abc'", "a number"]),
        (Param("x", float("nan"), float), ["'x'", "nan", "finite"]),
        (Param("x", True, float), ["'x'", "True"]),
        (Param("s", 3, str), ["'s'", "3", "a string"]),
        (Param("s", "b", str, check=_only_a, expected="'a'"), ["'s'", "'b'", "'a'"]),
    ],
)
def test_a_default_its_own_declaration_refuses_is_refused_at_registration(param, words):
    for register in (
        lambda: plugin.register_normalizer("test_bad_default", plugin.sparsemax, params=(param,)),
        lambda: plugin.register_continuous("test_bad_default", lambda num_heads=None, **p: None, params=(param,)),
    ):
        with pytest.raises(ValueError, match="invalid default") as err:
            register()
        for w in ["test_bad_default", *words]:
            assert w in str(err.value)
        assert "test_bad_default" not in plugin.variants()


def test_defaults_in_range_and_choices_are_accepted_at_registration():
    try:
        plugin.register_normalizer("test_good_default", plugin.sparsemax, params=(
            Param("x", "learned", float, low=0, high=1, choices=("learned",)),
            Param("n", 3, int, low=1, high=3),
            Param("y", 0, float, low=0),
        ))
        assert plugin.available_normalizers()["test_good_default"] == {"x": "learned", "n": 3, "y": 0}
    finally:
        plugin.unregister("test_good_default")


def test_registration_refuses_duplicate_parameters_and_defaults_the_joint_check_refuses():
    with pytest.raises(ValueError, match="'x' is declared twice"):
        plugin.register_normalizer("test_bad_params", plugin.sparsemax, params=(Param("x", 1.0), Param("x", 2.0)))

    def even(params):
        if params["n"] % 2:
            raise ValueError(f"n must be even, got {params['n']}")

    with pytest.raises(ValueError, match="test_bad_params.*n must be even, got 3"):
        plugin.register_continuous("test_bad_params", lambda num_heads=None, **p: None,
                                   params=(Param("n", 3, int),), check=even)
    assert "test_bad_params" not in plugin.variants()
