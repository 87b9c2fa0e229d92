"""scripts/finetune.py with attention schedules: the --*-attn-schedule flags."""

from __future__ import annotations

import json
import sys

import pytest

from .test_finetune import SCRIPT, _finetune_module, _run

PAIRS = [("one two", "two one"), ("three four five", "five four three"), ("six seven", "seven six")]


def _data(path):
    for split, n in (("train", 24), ("valid", 6)):
        with open(path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                src, tgt = PAIRS[i % len(PAIRS)]
                f.write(json.dumps({"en": src, "rev": tgt}) + "\n")
    return ["--task", "seq2seq", "--train-file", str(path / "train.jsonl"), "--valid-file", str(path / "valid.jsonl"),
            "--source-column", "en", "--target-column", "rev", "--batch-size", "8", "--eval-batch-size", "6",
            "--max-new-tokens", "6", "--threads", "1", "--from-config", "--arch", "bart", "--d-model", "32",
            "--heads", "2", "--ffn-dim", "64"]


def test_finetune_drives_the_schedule_and_saves_where_it_stands(tmp_path):
    out = tmp_path / "out"
    metrics = _run([sys.executable, str(SCRIPT), *_data(tmp_path), "--output-dir", str(out), "--max-steps", "3",
                    "--cross-attn", "entmax:alpha=2", "--cross-attn-schedule", "linear:start=1,steps=4"])
    assert metrics["attention"]["cross_attn_schedule"] == "linear:param=alpha,start=1,end=2,steps=4"
    config = json.loads((out / "config.json").read_text())
    # 3 updates: the last one ran at step 2 (alpha 1.5); evaluation after it ran the same value
    assert config["attn_schedule_state"] == {"cross": {"step": 2, "value": 1.5, "spec": "entmax:alpha=1.5"}}
    assert "cross:entmax:alpha=1.5" in metrics["mechanisms_seen"]


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--cross-attn", "entmax:alpha=2", "--cross-attn-schedule", "linear:start=1,end=3,steps=4"],
         ["--cross-attn-schedule", "end", "[1, 2]"]),
        (["--cross-attn", "entmax:alpha=2", "--cross-attn-schedule", "warp:start=1,steps=4"],
         ["--cross-attn-schedule", "linear, cosine, step"]),
        (["--decoder-attn-schedule", "linear:start=1,steps=-1"], ["--decoder-attn-schedule", "integer >= 0"]),
        (["--attn", "sparsemax", "--encoder-attn-schedule", "linear:start=1,steps=2"], ["--attn"]),
    ],
)
def test_bad_schedule_flags_are_refused_while_parsing(extra, words, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _finetune_module().parse_args([*_data(tmp_path), "--output-dir", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)
