"""Parameter schedules (plugin.schedule): values, validation, state, and the mechanism on the way."""

import math

import pytest
import torch

import plugin
from plugin.schedule import parse_schedule


@pytest.mark.parametrize(
    "text, spec, expected",
    [
        # linear 1 -> 1.5 over 10 steps
        ("linear:start=1,steps=10", "entmax:alpha=1.5", {0: 1.0, 1: 1.05, 4: 1.2, 10: 1.5, 50: 1.5}),
        # cosine 1 -> 2 over 10 steps after 2 warm-up steps: (1 - cos(pi t / 10)) / 2
        ("cosine:start=1,steps=10,warmup=2", "entmax:alpha=2",
         {0: 1.0, 2: 1.0, 3: 1 + (1 - math.cos(math.pi / 10)) / 2, 7: 1.5, 12: 2.0}),
        # step: plateaus of 2 steps: 1, 1, 1.25, 1.25, 1.5, ...
        ("step:start=1,steps=8,hold=2", "entmax:alpha=2", {0: 1.0, 1: 1.0, 2: 1.25, 5: 1.5, 7: 1.75, 8: 2.0}),
        # step without hold: four plateaus
        ("step:param=lam,start=0,steps=100", "fusedmax:lam=0.4", {0: 0.0, 24: 0.0, 25: 0.1, 99: 0.3, 100: 0.4}),
        # steps=0: an abrupt switch at the end of the warm-up
        ("linear:start=1,steps=0,warmup=5", "entmax:alpha=2", {0: 1.0, 4: 1.0, 5: 2.0}),
        # gamma of sparsemax, the variant's only parameter
        ("linear:start=4,steps=4", "sparsemax", {0: 4.0, 2: 2.5, 4: 1.0}),
    ],
)
def test_strategy_values_at_chosen_steps(text, spec, expected):
    schedule = parse_schedule(text, spec)
    for step, value in expected.items():
        assert schedule.value(step) == pytest.approx(value, abs=1e-12), step


def test_schedule_string_round_trips():
    schedule = parse_schedule("cosine:param=alpha,start=1,steps=30,warmup=4", "entmax:alpha=2")
    assert str(schedule) == "cosine:param=alpha,start=1,end=2,steps=30,warmup=4"
    assert parse_schedule(str(schedule), "entmax:alpha=2") == schedule


@pytest.mark.parametrize(
    "text, spec, words",
    [
        ("exponential:start=1,steps=5", "entmax:alpha=2", ["unknown strategy", "linear, cosine, step"]),
        ("linear:start=1,end=2.5,steps=5", "entmax:alpha=2", ["end", "alpha", "[1, 2]"]),
        ("linear:start=0.5,steps=5", "entmax:alpha=2", ["start", "alpha", "[1, 2]"]),
        ("linear:start=1,steps=-3", "entmax:alpha=2", ["steps", "integer >= 0"]),
        ("linear:start=1,steps=3,warmup=-1", "entmax:alpha=2", ["warmup", "integer >= 0"]),
        ("linear:start=1,steps=2.5", "entmax:alpha=2", ["steps", "integer >= 0"]),
        ("linear:start=1", "entmax:alpha=2", ["steps=", "required"]),
        ("linear:steps=4", "entmax:alpha=2", ["start=", "required"]),
        ("linear:start=1,end=1.5,steps=4", "entmax:alpha=2", ["end=1.5", "alpha=2"]),
        ("linear:start=1,steps=4,speed=2", "entmax:alpha=2", ["speed", "param, start, end, steps, warmup, hold"]),
        ("linear:start=1,steps=4,hold=2", "entmax:alpha=2", ["hold", "step"]),
        ("linear:param=beta,start=1,steps=4", "entmax:alpha=2", ["beta", "valid choices: alpha"]),
        ("linear:start=1,steps=4", "fusedmax:lam=0.5", ["param=", "lam, gamma"]),
        ("linear:start=1,steps=4", "entmax15", ["param=", "(none)"]),
        ("linear:start=-1,steps=4", "fusedmax:lam=0.5", ["param=", "lam, gamma"]),
        ("linear:param=lam,start=-1,steps=4", "fusedmax:lam=0.5", ["start", "lam", ">= 0"]),
        ("linear:start=1,end=1.005,steps=4", "entmax:alpha=learned", ["end", "(1.01, 2.0)"]),
        ("linear:start=1,end=learned,steps=4", "entmax:alpha=learned", ["end", "not a number"]),
        ("", "entmax:alpha=2", ["linear, cosine, step"]),
    ],
)
def test_bad_schedules_name_the_field_and_the_valid_choices(text, spec, words):
    with pytest.raises(ValueError) as err:
        parse_schedule(text, spec, name="--cross-attn-schedule")
    message = str(err.value)
    assert message.startswith("--cross-attn-schedule: ")
    for word in words:
        assert word in message, (word, message)


def test_a_schedule_needs_a_nonnegative_integer_step():
    mech = plugin.AttentionMechanism("entmax:alpha=2", num_heads=2, schedule="linear:start=1,steps=4")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="integer >= 0"):
            mech.set_schedule_step(bad)


# ----------------------------------------------------------------------------- alpha = 1 is softmax


def _qkv(seed=0, B=2, H=2, Lq=7, Lk=9, D=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=g, dtype=dtype) for L in (Lq, Lk, Lk))


def test_entmax_at_alpha_one_is_softmax_with_masks():
    x = torch.randn(3, 5, 11, dtype=torch.float64)
    mask = torch.rand(3, 5, 11) > 0.3
    mask[0, 0] = False  # a row with nothing allowed gives zeros
    expected = torch.softmax(x.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    torch.testing.assert_close(plugin.entmax(x, alpha=1.0, mask=mask), expected)
    torch.testing.assert_close(plugin.get_normalizer("entmax:alpha=1")(x), torch.softmax(x, -1))
    assert plugin.canonical_spec("entmax:alpha=1") == "entmax:alpha=1"


@pytest.mark.parametrize("path", [None, "reference", "sdpa", "cpu_chunked", "cpu_chunked_torch"])
@pytest.mark.parametrize("how", ["spec", "schedule"])
def test_alpha_one_equals_softmax_on_every_path(path, how):
    q, k, v = _qkv()
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 6:] = False
    if how == "spec":
        mech = plugin.AttentionMechanism("entmax:alpha=1", num_heads=2)
    else:
        mech = plugin.AttentionMechanism("entmax:alpha=1.5", num_heads=2, schedule="linear:start=1,steps=10")
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with plugin.kernels.use_path(path), plugin.record_calls() as calls:
        out = mech(q, k, v, mask=mask, causal=False)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)
    assert calls[0].spec == "entmax:alpha=1"
    # alpha = 1 takes softmax's fused path unless another path is forced (which keeps the reference)
    assert calls[0].path == ("sdpa" if path in (None, "sdpa") else "reference")


def test_alpha_one_causal_and_gradients_match_softmax():
    q, k, v = (t.requires_grad_() for t in _qkv(Lq=9))
    out = plugin.attention(q, k, v, "entmax:alpha=1", causal=True)
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q2, k2, v2, is_causal=True)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad)


def test_near_one_alpha_approaches_softmax_on_the_fast_path():
    """Continuity at alpha = 1: the chunked path at alpha = 1 + eps is within O(eps) of softmax."""
    q, k, v = _qkv(Lq=32, Lk=32, D=16)
    softmax_out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    gaps = []
    for eps in (1e-1, 1e-2, 1e-3):
        with plugin.record_calls() as calls:
            out = plugin.attention(q, k, v, f"entmax:alpha={1 + eps}")
        assert calls[0].path == "cpu_chunked"
        gaps.append(float((out - softmax_out).abs().max()))
    assert gaps[0] > 5 * gaps[1] > 25 * gaps[2] > 0


# ----------------------------------------------------------------------------- the mechanism on the way


@pytest.mark.parametrize(
    "spec, schedule, param",
    [
        ("entmax:alpha=2", "linear:start=1,steps=6", "alpha"),
        ("entmax:alpha=1.5", "cosine:start=1,steps=6", "alpha"),
        ("sparsemax", "step:start=3,steps=6,hold=2", "gamma"),
        ("fusedmax:lam=0.3", "linear:param=lam,start=0,steps=6", "lam"),
    ],
)
def test_every_value_on_the_way_takes_a_fast_path_and_equals_the_reference(spec, schedule, param):
    q, k, v = _qkv(Lq=12, Lk=12)
    mech = plugin.AttentionMechanism(spec, num_heads=2, schedule=schedule)
    plan = parse_schedule(schedule, spec)
    for step in range(8):
        mech.set_schedule_step(step)
        value = plan.value(step)
        with plugin.record_calls() as calls:
            out = mech(q, k, v, causal=True)
        assert calls[0].path != "reference", (step, calls[0])
        fixed = plugin.parse_spec(calls[0].spec)[0]
        assert fixed.params[param] == pytest.approx(value)
        with plugin.reference_path():
            expected = plugin.attention(q, k, v, calls[0].spec, causal=True)
        torch.testing.assert_close(out, expected, atol=3e-5, rtol=1e-4)


def test_the_step_is_saved_with_the_model_and_a_resumed_mechanism_continues_from_the_same_value():
    spec, schedule = "entmax:alpha=2", "cosine:start=1,steps=20,warmup=3"
    model = torch.nn.Sequential(plugin.AttentionMechanism(spec, num_heads=2, schedule=schedule))
    plugin.set_schedule_step(model, 11)
    state = model.state_dict()
    assert int(state["0.schedule_step"]) == 11
    resumed = torch.nn.Sequential(plugin.AttentionMechanism(spec, num_heads=2, schedule=schedule))
    assert resumed[0].scheduled_value() == 1.0
    resumed.load_state_dict(state)
    assert resumed[0].scheduled_value() == model[0].scheduled_value() == parse_schedule(schedule, spec).value(11)
    q, k, v = _qkv()
    torch.testing.assert_close(resumed[0](q, k, v), model[0](q, k, v))
    assert plugin.schedule_state(resumed)["0"]["step"] == 11
    plugin.set_schedule_step(model, 12)
    plugin.set_schedule_step(resumed, 12)
    assert resumed[0].current_spec() == model[0].current_spec()


def test_the_parameter_changes_inside_the_model_during_training():
    torch.manual_seed(0)
    heads, dim = 2, 8
    mech = plugin.AttentionMechanism("entmax:alpha=2", num_heads=heads, schedule="linear:start=1,steps=4")
    proj = torch.nn.Linear(dim, dim)
    optimizer = torch.optim.SGD(proj.parameters(), lr=0.1)
    q, k, v = _qkv(D=dim)
    seen = []
    for step in range(6):
        plugin.set_schedule_step(mech, step)
        with plugin.record_calls() as calls:
            loss = mech(proj(q), k, v).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seen.append((calls[0].spec, calls[0].path))
    assert seen == [
        ("entmax:alpha=1", "sdpa"),
        ("entmax:alpha=1.25", "cpu_chunked"),
        ("entmax:alpha=1.5", "cpu_chunked"),
        ("entmax:alpha=1.75", "cpu_chunked"),
        ("entmax:alpha=2", "cpu_chunked"),
        ("entmax:alpha=2", "cpu_chunked"),
    ]


def test_finish_schedules_moves_to_the_end_value():
    model = torch.nn.ModuleList([
        plugin.AttentionMechanism("entmax:alpha=2", num_heads=2, schedule="linear:start=1,steps=100"),
        plugin.AttentionMechanism("softmax", num_heads=2),
    ])
    assert plugin.finish_schedules(model) == 1
    assert model[0].current_spec() == "entmax:alpha=2"
    assert model[0].schedule_step_value == 100


def test_a_learned_alpha_starts_after_a_scheduled_warmup():
    mech = plugin.AttentionMechanism("entmax:alpha=learned", num_heads=2,
                                     schedule="linear:start=1,end=1.3,steps=4")
    q, k, v = _qkv()
    q.requires_grad_()
    mech.set_schedule_step(2)
    with plugin.record_calls() as calls:
        mech(q, k, v).sum().backward()
    assert calls[0].spec == "entmax:alpha=1.15" and calls[0].path == "cpu_chunked"
    assert mech.normalizer.learned.weight.grad is None  # the learned alpha is not used yet
    mech.set_schedule_step(4)
    with plugin.record_calls() as calls:
        mech(q, k, v).sum().backward()
    assert calls[0].spec == "entmax:alpha=learned"
    torch.testing.assert_close(mech.normalizer.current_alpha(), torch.full((2,), 1.3))
    assert mech.normalizer.learned.weight.grad is not None


def test_a_schedule_needs_a_spec_string():
    with pytest.raises(ValueError, match="spec string"):
        plugin.AttentionMechanism(plugin.softmax, schedule="linear:start=1,steps=2")
    with pytest.raises(ValueError, match="no discrete part"):
        plugin.AttentionMechanism("continuous_softmax", schedule="linear:start=1,steps=2")


@pytest.mark.parametrize("text, key", [
    ("cosine:start=1,steps=3e25", "steps"),
    ("linear:start=1,steps=4,warmup=7000000000000", "warmup"),
    ("step:start=1,steps=8,hold=2.5e14", "hold"),
])
def test_step_counts_beyond_the_maximum_raise_when_the_schedule_is_parsed(text, key):
    with pytest.raises(ValueError) as err:
        plugin.AttentionMechanism("entmax:alpha=1.5", num_heads=2, schedule=text)
    assert "schedule" in str(err.value) and key in str(err.value) and "10**12" in str(err.value)
    # the largest accepted counts finish inside the int64 buffer
    top = plugin.schedule.MAX_STEPS
    mech = plugin.AttentionMechanism("entmax:alpha=1.5", num_heads=2,
                                     schedule=f"linear:start=1,steps={top},warmup={top}")
    plugin.finish_schedules(torch.nn.Sequential(mech))
    assert int(mech.schedule_step) == mech.schedule_step_value == 2 * top
    assert mech.current_spec() == "entmax:alpha=1.5"


@pytest.mark.parametrize("step", [2**63 + 11, 2**70, -5])
def test_a_rejected_step_leaves_the_step_and_its_buffer_unchanged(step):
    mech = plugin.AttentionMechanism("entmax:alpha=2", num_heads=2, schedule="linear:start=1,steps=10")
    model = torch.nn.Sequential(mech)
    plugin.set_schedule_step(model, 4)
    with pytest.raises(ValueError, match=r"set_schedule_step: step .*integer >= 0, at most 2\*\*63 - 1"):
        plugin.set_schedule_step(model, step)
    with pytest.raises(ValueError, match=r"set_schedule_step: step"):
        mech.set_schedule_step(step)
    assert mech.schedule_step_value == int(mech.schedule_step) == 4
    assert mech.current_spec() == "entmax:alpha=1.4"
    plugin.set_schedule_step(model, 2**63 - 1)  # the buffer's largest value is a valid step
    assert int(mech.schedule_step) == mech.schedule_step_value == 2**63 - 1
