"""Attention schedules in transformers: config fields, conversion, Trainer callback, save/load, resume."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Trainer, TrainingArguments

import hf_models
import plugin

from ..recorded_specs import training_specs
from .tiny import SEQ2SEQ, config_kwargs, model_inputs, output_of, stock_model, token_batch

CROSS = {"cross_attn": "entmax:alpha=2", "cross_attn_schedule": "linear:start=1,steps=4"}



@pytest.mark.parametrize("family", SEQ2SEQ)
def test_converted_stock_model_at_step_zero_is_the_stock_model(family, tmp_path):
    """alpha = 1 is softmax: a stock checkpoint with an alpha schedule starts exactly where it was."""
    stock = stock_model(family)
    stock.save_pretrained(tmp_path / "stock")
    cls = hf_models.sparse_model_class(family)
    ours = cls.from_pretrained(tmp_path / "stock", **CROSS, decoder_attn="entmax:alpha=1.5",
                               decoder_attn_schedule="cosine:start=1,steps=10").eval()
    batch = model_inputs(family)
    with plugin.record_calls() as calls:
        out = output_of(ours, batch)
    assert {(c.role, c.spec) for c in calls} == {
        ("encoder", "softmax"), ("decoder", "entmax:alpha=1"), ("cross", "entmax:alpha=1")
    }
    torch.testing.assert_close(out, output_of(stock, batch), atol=1e-5, rtol=1e-5)
    plugin.set_schedule_step(ours, 10)
    assert not torch.allclose(output_of(ours, batch), output_of(stock, batch), atol=1e-3)


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"cross_attn": "entmax:alpha=2", "cross_attn_schedule": "sigmoid:start=1,steps=4"},
         ["cross_attn_schedule", "unknown strategy", "linear, cosine, step"]),
        ({"cross_attn": "entmax:alpha=2", "cross_attn_schedule": "linear:start=1,end=3,steps=4"},
         ["cross_attn_schedule", "end", "[1, 2]"]),
        ({"decoder_attn": "entmax:alpha=2", "decoder_attn_schedule": "linear:start=1,steps=-2"},
         ["decoder_attn_schedule", "steps", "integer >= 0"]),
        ({"encoder_attn": "entmax15", "encoder_attn_schedule": "linear:start=1,steps=2"},
         ["encoder_attn_schedule", "valid choices: (none)"]),
    ],
)
def test_bad_schedules_in_the_config_raise_naming_the_field(fields, words):
    with pytest.raises(ValueError) as err:
        hf_models.SparseBartConfig(**config_kwargs("bart"), **fields)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_the_config_stores_the_canonical_schedule():
    config = hf_models.SparseBartConfig(**config_kwargs("bart"), **CROSS)
    assert config.cross_attn_schedule == "linear:param=alpha,start=1,end=2,steps=4"
    assert config.encoder_attn_schedule is None and config.role_schedule("cross") == config.cross_attn_schedule


def _model(seed=0, **fields):
    torch.manual_seed(seed)
    return hf_models.SparseBartForConditionalGeneration(
        hf_models.SparseBartConfig(**config_kwargs("bart"), **fields)
    )


def test_save_pretrained_records_where_the_schedule_stands_and_loading_continues_there(tmp_path):
    model = _model(**CROSS).eval()
    hf_models.set_schedule_step(model, 3)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["cross_attn_schedule"] == "linear:param=alpha,start=1,end=2,steps=4"
    assert config["attn_schedule_state"] == {"cross": {"step": 3, "value": 1.75, "spec": "entmax:alpha=1.75"}}
    loaded = hf_models.SparseBartForConditionalGeneration.from_pretrained(tmp_path / "m").eval()
    assert {m.current_spec() for _, m in plugin.schedule.scheduled_mechanisms(loaded)} == {"entmax:alpha=1.75"}
    batch = model_inputs("bart")
    torch.testing.assert_close(output_of(loaded, batch), output_of(model, batch))
    hf_models.finish_schedules(loaded)
    assert {m.current_spec() for _, m in plugin.schedule.scheduled_mechanisms(loaded)} == {"entmax:alpha=2"}


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, n=16):
        src, src_mask = token_batch(tuple(5 + i % 3 for i in range(n)), seed=1)
        tgt, _ = token_batch(tuple(4 + i % 2 for i in range(n)), seed=2)
        self.items = [{"input_ids": src[i], "attention_mask": src_mask[i], "labels": tgt[i]} for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _trainer(model, out, max_steps, save_steps=None):
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_strategy="no", save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=_Pairs(), callbacks=[hf_models.AttentionScheduleCallback()])


def test_trainer_callback_moves_the_parameter_with_the_update_count(tmp_path):
    model = _model(**CROSS)
    with plugin.record_calls() as calls:
        _trainer(model, tmp_path / "run", max_steps=6).train()
    assert training_specs(calls) == [
        "entmax:alpha=1", "entmax:alpha=1.25", "entmax:alpha=1.5", "entmax:alpha=1.75", "entmax:alpha=2"
    ]
    paths = {(c.spec, c.path) for c in calls if c.role == "cross" and c.training}
    assert ("entmax:alpha=1", "sdpa") in paths and ("entmax:alpha=1.5", "cpu_chunked") in paths
    assert "reference" not in {p for _, p in paths}


def test_trainer_resume_in_the_middle_of_a_schedule_continues_from_the_same_value(tmp_path):
    with plugin.record_calls() as straight:
        _trainer(_model(**CROSS), tmp_path / "straight", max_steps=4).train()
    _trainer(_model(**CROSS), tmp_path / "resumed", max_steps=2, save_steps=2).train()
    checkpoint = tmp_path / "resumed" / "checkpoint-2"
    saved = json.loads((checkpoint / "config.json").read_text())["attn_schedule_state"]
    assert saved == {"cross": {"step": 1, "value": 1.25, "spec": "entmax:alpha=1.25"}}  # the last update's step
    with plugin.record_calls() as resumed:
        _trainer(_model(seed=1, **CROSS), tmp_path / "resumed", max_steps=4).train(
            resume_from_checkpoint=str(checkpoint)
        )
    assert training_specs(resumed) == ["entmax:alpha=1.5", "entmax:alpha=1.75"]
    assert training_specs(straight)[2:] == training_specs(resumed)


def test_a_hand_written_loop_drives_the_schedule():
    model = _model(**CROSS).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = _Pairs(4)
    inputs = {k: torch.stack([b[k] for b in batch.items]) for k in batch.items[0]}
    seen = []
    for step in range(5):
        hf_models.set_schedule_step(model, step)
        with plugin.record_calls() as calls:
            model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seen.append(calls[-1].spec)
    assert seen == ["entmax:alpha=1", "entmax:alpha=1.25", "entmax:alpha=1.5", "entmax:alpha=1.75", "entmax:alpha=2"]
    state = hf_models.schedule_state(model)
    assert {s["step"] for s in state.values()} == {4} and len(state) == 2  # one cross-attention per decoder layer


@pytest.mark.parametrize("fields, words", [
    ({"cross_attn": "entmax:alpha=2", "cross_attn_schedule": "linear:start=1,steps=4e15"},
     ["cross_attn_schedule", "steps", "10**12"]),
    ({"cross_attn": "entmax:alpha=2", "cross_attn_schedule": "linear:start=1,steps=4", "attn_schedule_state": "x"},
     ["attn_schedule_state", "encoder, decoder, cross"]),
    ({"attn_schedule_state": {"middle": {"step": 1}}}, ["attn_schedule_state", "middle", "encoder, decoder, cross"]),
    ({"attn_schedule_state": {"cross": {"step": 2**64, "value": 1.5, "spec": "entmax:alpha=1.5"}}},
     ["attn_schedule_state['cross']['step']", "2**63 - 1"]),
    ({"attn_schedule_state": {"cross": {"step": 3, "value": "fast", "spec": "entmax:alpha=1.5"}}},
     ["attn_schedule_state['cross']['value']", "finite number"]),
])
def test_out_of_range_steps_and_a_malformed_schedule_state_raise_naming_the_field(fields, words):
    with pytest.raises(ValueError) as err:
        hf_models.SparseBartConfig(**config_kwargs("bart"), **fields)
    for word in words:
        assert word in str(err.value), (word, str(err.value))
