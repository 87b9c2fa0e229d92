"""Attention schedules in fairseq: the --*-attn-schedule flags, set_num_updates, checkpoints, resume, generate."""

from __future__ import annotations

import pytest
import torch

import plugin

from ..recorded_specs import training_specs
from .helpers import USER_DIR, generate_argv, run_cli, train_argv

CROSS = ["--cross-attn", "entmax:alpha=2", "--cross-attn-schedule", "linear:start=1,steps=4"]
STEP_BUFFER = "decoder.layers.0.encoder_attn.mechanism.schedule_step"


def _parse(data_bin, *extra):
    from fairseq import options

    parser = options.get_training_parser()
    return options.parse_args_and_arch(
        parser, input_args=[str(data_bin), "--user-dir", str(USER_DIR), "--arch", "sparse_transformer_tiny", *extra]
    )



@pytest.mark.parametrize(
    "flag, value, words",
    [
        ("--cross-attn-schedule", "exponential:start=1,steps=4", ["unknown strategy", "linear, cosine, step"]),
        ("--decoder-attn-schedule", "linear:start=1,steps=-4", ["steps", "integer >= 0"]),
        ("--encoder-attn-schedule", "linear:start=1,steps=4,warmup=-1", ["warmup", "integer >= 0"]),
        ("--cross-attn-schedule", "linear:start=1,steps=4,rate=3", ["rate", "param, start, end, steps"]),
    ],
)
def test_schedule_syntax_errors_fail_at_argument_parsing(flag, value, words, data_bin, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parse(data_bin, flag, value)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err
    for word in words:
        assert word in err, (word, err)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--cross-attn", "entmax:alpha=2", "--cross-attn-schedule", "linear:start=1,end=3,steps=4"],
         ["--cross-attn-schedule", "end", "alpha", "[1, 2]"]),
        (["--decoder-attn", "entmax:alpha=1.5", "--decoder-attn-schedule", "linear:start=0.5,steps=4"],
         ["--decoder-attn-schedule", "start", "[1, 2]"]),
        (["--encoder-attn", "fusedmax:lam=0.5", "--encoder-attn-schedule", "linear:param=alpha,start=0,steps=4"],
         ["--encoder-attn-schedule", "'alpha'", "valid choices: lam, gamma"]),
        (["--cross-attn-schedule", "linear:start=1,end=2,steps=4"],  # the cross spec is softmax (gamma = 1)
         ["--cross-attn-schedule", "end=2", "gamma=1"]),
    ],
)
def test_schedules_that_do_not_fit_their_spec_fail_while_parsing(extra, words, data_bin):
    with pytest.raises(ValueError) as err:
        _parse(data_bin, *extra)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_schedule_flags_reach_the_attention_modules(data_bin):
    args = _parse(data_bin, *CROSS, "--decoder-attn", "entmax:alpha=1.5", "--decoder-attn-schedule",
                  "cosine:start=1,steps=10,warmup=2")
    assert args.encoder_attn_schedule is None
    from fairseq import tasks

    model = tasks.setup_task(args).build_model(args)
    schedules = {name: str(m.schedule) for name, m in plugin.schedule.scheduled_mechanisms(model)}
    assert schedules == {
        **{f"decoder.layers.{i}.encoder_attn.mechanism": "linear:param=alpha,start=1,end=2,steps=4" for i in (0, 1)},
        **{f"decoder.layers.{i}.self_attn.mechanism": "cosine:param=alpha,start=1,end=1.5,steps=10,warmup=2"
           for i in (0, 1)},
    }
    model.set_num_updates(7)  # fairseq's hook, as the trainer calls it
    assert {m.schedule_step_value for _, m in plugin.schedule.scheduled_mechanisms(model)} == {7}


@pytest.fixture(scope="module")
def scheduled_run(data_bin, tmp_path_factory):
    """6 updates: alpha of the cross-attention 1 -> 2 over the first 4, recorded per forward."""
    save = tmp_path_factory.mktemp("scheduled")
    with plugin.record_calls() as calls:
        run_cli("train", train_argv(data_bin, save, *CROSS, "--max-update", "6", "--disable-validation"))
    return save, list(calls)


def test_the_parameter_moves_with_the_update_count_during_training(scheduled_run):
    _, calls = scheduled_run
    assert training_specs(calls) == [
        "entmax:alpha=1", "entmax:alpha=1.25", "entmax:alpha=1.5", "entmax:alpha=1.75", "entmax:alpha=2"
    ]
    # alpha = 1 is softmax and takes its fused path; the others the chunked entmax path (fairseq
    # asks the last layer for its weights, which only the reference path returns)
    paths = {(c.spec, c.path) for c in calls if c.role == "cross" and c.training and c.path != "reference"}
    assert paths == {("entmax:alpha=1", "sdpa")} | {
        (f"entmax:alpha={a}", "cpu_chunked") for a in ("1.25", "1.5", "1.75", "2")
    }


def test_the_checkpoint_holds_the_schedule_and_its_step(scheduled_run):
    save, _ = scheduled_run
    state = torch.load(save / "checkpoint_last.pt")
    assert state["cfg"]["model"].cross_attn_schedule == "linear:start=1,steps=4"
    assert state["cfg"]["model"].cross_attn == "entmax:alpha=2"
    assert int(state["model"][STEP_BUFFER]) == 5  # the step of the last update (5 updates done before it)


def test_generate_uses_the_end_value(data_bin, tmp_path, capsys):
    """A checkpoint saved half-way through the schedule: fairseq-generate runs alpha = 2."""
    save = tmp_path / "half"
    run_cli("train", train_argv(data_bin, save, *CROSS, "--max-update", "2", "--disable-validation"))
    assert int(torch.load(save / "checkpoint_last.pt")["model"][STEP_BUFFER]) == 1
    with plugin.record_calls() as calls:
        run_cli("generate", generate_argv(data_bin, save / "checkpoint_last.pt"))
    assert {c.spec for c in calls if c.role == "cross"} == {"entmax:alpha=2"}
    assert "H-0" in capsys.readouterr().out


def test_resume_in_the_middle_of_a_schedule_continues_from_the_same_value(data_bin, tmp_path):
    """4 updates straight == 2 updates, then --restore-file and 2 more; the value continues at step 2."""
    common = [*CROSS, "--decoder-attn", "entmax:alpha=learned", "--decoder-attn-schedule",
              "cosine:start=1,end=1.4,steps=3", "--disable-validation"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with plugin.record_calls() as straight_calls:
        run_cli("train", train_argv(data_bin, straight, *common, "--max-update", "4"))
    run_cli("train", train_argv(data_bin, resumed, *common, "--max-update", "2"))
    with plugin.record_calls() as resumed_calls:
        run_cli("train", train_argv(data_bin, resumed, *common, "--max-update", "4",
                                    "--restore-file", str(resumed / "checkpoint_last.pt")))
    assert training_specs(resumed_calls) == ["entmax:alpha=1.5", "entmax:alpha=1.75"]
    assert training_specs(straight_calls)[2:] == training_specs(resumed_calls)
    # the learned decoder alpha: scheduled warm-up (cosine 1 -> 1.4 over 3 updates), then learned
    assert training_specs(straight_calls, "decoder") == [
        "entmax:alpha=1", "entmax:alpha=1.1", "entmax:alpha=1.3", "entmax:alpha=learned"
    ]
    a = torch.load(straight / "checkpoint_last.pt")["model"]
    b = torch.load(resumed / "checkpoint_last.pt")["model"]
    assert list(a) == list(b)
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=0, atol=0, msg=name)
    assert int(b[STEP_BUFFER]) == 3
