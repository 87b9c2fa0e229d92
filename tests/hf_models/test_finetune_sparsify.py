"""scripts/finetune.py with --attn through hf_models.sparsify: learned alpha, --attn-schedule, the alpha log."""

from __future__ import annotations

import pytest
from transformers import AutoModelForSequenceClassification

import hf_models

from .test_finetune import _finetune_module
from .tiny import stock_model

SENTENCES = [("one two three", "yes"), ("four five", "no"), ("six one", "yes"), ("seven eight nine", "no")]


@pytest.fixture
def classification(tmp_path, monkeypatch):
    for key in ("MASTER_ADDR", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(key, raising=False)
    for split, n in (("train", 16), ("valid", 4)):
        lines = ["text,label"] + [",".join(SENTENCES[i % len(SENTENCES)]) for i in range(n)]
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return ["--task", "classification", "--train-file", str(tmp_path / "train.csv"),
            "--valid-file", str(tmp_path / "valid.csv"), "--batch-size", "4", "--threads", "1",
            "--attention-dropout", "0"]


def test_a_stock_model_dir_with_a_schedule_logs_alpha_every_update(classification, tmp_path):
    stock_model("bert").save_pretrained(tmp_path / "stock")
    out = tmp_path / "out"
    metrics = _finetune_module().main([
        *classification, "--model-dir", str(tmp_path / "stock"), "--output-dir", str(out), "--max-steps", "3",
        "--attn", "entmax:alpha=1.5", "--attn-schedule", "linear:start=1,steps=4", "--log-attention-every", "1",
    ])
    assert metrics["attention"] == {
        "attn_implementation": hf_models.PER_MODULE,
        "sparse_attention": {"spec": "entmax:alpha=1.5", "schedule": "linear:param=alpha,start=1,end=1.5,steps=4"},
    }
    log = metrics["attention_parameters"]
    assert [entry["step"] for entry in log] == [0, 1, 2, 3]
    modules = ["bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"]
    for entry, alpha in zip(log, (1.0, 1.125, 1.25, 1.375)):
        assert entry["values"] == {m: [alpha, alpha] for m in modules}
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert {m.schedule_step_value for m in hf_models.attention_mechanisms(loaded).values()} == {2}


def test_from_config_bert_with_a_learned_alpha_logs_it_at_each_evaluation(classification, tmp_path):
    out = tmp_path / "out"
    metrics = _finetune_module().main([
        *classification, "--from-config", "--arch", "bert", "--d-model", "16", "--heads", "2", "--ffn-dim", "32",
        "--output-dir", str(out), "--epochs", "2", "--eval-every-epoch", "--lr", "0.05",
        "--attn", "entmax:alpha=learned",
    ])
    log = metrics["attention_parameters"]
    assert [entry["step"] for entry in log] == [4, 8]
    first, last = log[0]["values"], log[1]["values"]
    assert sorted(first) == ["bert.encoder.layer.0.attention.self", "bert.encoder.layer.1.attention.self"]
    assert all(len(v) == 2 for v in last.values())
    assert first != last and all(v != [1.5, 1.5] for v in first.values()), "the learned alphas did not move"
    assert metrics["mechanisms_seen"] == ["encoder:entmax:alpha=learned"]
    loaded = AutoModelForSequenceClassification.from_pretrained(out)
    assert hf_models.attention_parameter_values(loaded) == last


def test_off_means_no_log(classification, tmp_path):
    stock_model("bert").save_pretrained(tmp_path / "stock")
    metrics = _finetune_module().main([
        *classification, "--model-dir", str(tmp_path / "stock"), "--output-dir", str(tmp_path / "out"),
        "--max-steps", "1", "--attn", "entmax:alpha=learned", "--log-attention-every", "0",
    ])
    assert "attention_parameters" not in metrics


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--attn-schedule", "linear:start=1,steps=4"], ["--attn-schedule", "give --attn a spec"]),
        (["--attn", "sdpa", "--attn-schedule", "linear:start=1,steps=4"], ["--attn-schedule", "'entmax:alpha=1.5'"]),
        (["--attn", "entmax15", "--attn-schedule", "linear:start=1,steps=4"], ["--attn-schedule", "(none)"]),
        (["--attn", "entmax:alpha=2", "--attn-schedule", "linear:start=1,end=3,steps=4"],
         ["--attn-schedule", "end", "[1, 2]"]),
        (["--attn", "nosuchmax"], ["--attn", "nosuchmax", "eager"]),
        (["--attn", "sparsemax", "--log-attention-every", "-1"], ["--log-attention-every", ">= 0"]),
    ],
)
def test_bad_flags_are_refused_while_parsing(extra, words, classification, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _finetune_module().parse_args([*classification, "--model-dir", str(tmp_path), "--output-dir",
                                       str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)


def test_attention_lr_gives_the_learned_alphas_their_own_group_without_decay():
    import argparse

    finetune = _finetune_module()
    model = hf_models.sparsify(stock_model("bert"), "entmax:alpha=learned")
    alphas = {id(p) for m in hf_models.attention_mechanisms(model).values() for p in m.parameters()}
    assert alphas
    args = argparse.Namespace(lr=1e-4, weight_decay=0.01, attention_lr=0.02)
    groups = finetune.parameter_groups(model, args)
    assert [{id(p) for p in g["params"]} == alphas for g in groups] == [False, False, True]
    assert groups[-1]["lr"] == 0.02 and groups[-1]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # without the flag the alphas train like any weight (as before the flag existed)
    plain = finetune.parameter_groups(model, argparse.Namespace(lr=1e-4, weight_decay=0.01, attention_lr=None))
    assert len(plain) == 2 and alphas <= {id(p) for p in plain[0]["params"]}
    with pytest.raises(SystemExit):
        finetune.parse_args(["--task", "classification", "--train-file", "a.csv", "--valid-file", "b.csv",
                             "--from-config", "--arch", "bert", "--output-dir", "o", "--attention-lr", "0"])
