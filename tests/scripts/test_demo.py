"""The main job's pipeline (scripts/demo.py) end to end at a micro size."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import demo  # noqa: E402
import demo_tasks  # noqa: E402
from number_corpus import make_corpus, split_german, words  # noqa: E402

MICRO = dict(train=60, valid=10, test=10, fairseq_epochs=1, hf_epochs=1, digits_steps=3, digits_train=100)


def test_german_number_words_are_split_into_morphemes():
    assert split_german("dreiundzwanzig") == ["drei", "und", "zwanzig"]
    assert split_german("siebzehn") == ["sieb", "zehn"]
    assert words(1234, "de") == "ein tausend zwei hundert vier und dreißig"
    assert words(1234, "en") == "one thousand two hundred and thirty four"
    with pytest.raises(ValueError, match="segment"):
        split_german("dreixyz")


def test_corpus_splits_use_disjoint_numbers(tmp_path):
    sizes = make_corpus(tmp_path, 50, 10, 10, seed=3)
    assert sizes == {"train": 50, "valid": 10, "test": 10}
    nums = {s: set((tmp_path / f"{s}.num").read_text().split()) for s in sizes}
    assert not (nums["train"] & nums["test"]) and not (nums["train"] & nums["valid"])
    assert len((tmp_path / "test.de").read_text().splitlines()) == 10


def test_demo_pipeline_runs_every_task_and_writes_the_report(tmp_path, monkeypatch):
    monkeypatch.setitem(demo.SIZES, "micro", MICRO)
    monkeypatch.setattr(demo, "FAIRSEQ_MECHANISMS", [("softmax", "softmax"),
                                                     ("continuous sparsemax", "sparsemax+continuous_sparsemax")])
    monkeypatch.setattr(demo_tasks, "HF_MECHANISMS", [("sparsemax", "sparsemax")])
    monkeypatch.setattr(demo_tasks, "DIGIT_MECHANISMS", [("discrete sparsemax", "sparsemax"),
                                                         ("continuous sparsemax", "continuous_sparsemax")])
    out = tmp_path / "demo"
    assert demo.main(["--size", "micro", "--out", str(out)]) == 0

    results = json.loads((out / "results.json").read_text())
    fs = results["fairseq"]["rows"]
    assert [r["spec"] for r in fs] == ["softmax", "sparsemax+continuous_sparsemax"]
    assert fs[0]["support_fraction"] == 1.0  # softmax attends everywhere
    assert fs[1]["support_fraction"] < 1.0  # the sparse cross-attention has exact zeros
    assert all(0 <= r["bleu"] <= 100 and r["train_seconds"] > 0 for r in fs)
    assert results["hf"]["rows"][0]["spec"] == "sparsemax"
    digits = results["digits"]["rows"]
    assert all(0 <= r["accuracy"] <= 1 for r in digits)
    assert digits[1]["attended_area"] < 1.0

    report = (out / "report.md").read_text()
    for heading in ["Translation with fairseq", "HuggingFace", "2-D attention over 8x8 digit images"]:
        assert heading in report
    for png in ["fairseq_attention_heatmaps.png", "fairseq_training_curves.png", "fairseq_continuous_densities.png",
                "digits_attention.png", "digits_training_curves.png"]:
        assert (out / png).stat().st_size > 1000
        if png.startswith(("fairseq", "digits")) and "training" not in png:
            assert png in report


def test_demo_rejects_unknown_tasks():
    with pytest.raises(SystemExit):
        demo.main(["--only", "nosuchtask"])
