"""scripts/finetune.py end to end on tiny local data: python, and 2 data-parallel CPU processes (accelerate, gloo)."""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

import hf_models

from .tiny import stock_model

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "finetune.py"
BIN = Path(sys.executable).parent
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("MASTER_ADDR", None)
    return env


def _run(cmd: list[str], timeout: int = 240) -> dict:
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = [line for line in proc.stdout.splitlines() if line.startswith("{")][-1]
    return json.loads(last)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Word-reversal pairs (jsonl) and a 'does it contain one' classification set (csv)."""
    path = tmp_path_factory.mktemp("data")
    rng = random.Random(0)

    def words():
        return [rng.choice(WORDS) for _ in range(rng.randint(2, 6))]

    for split, n in (("train", 64), ("valid", 10)):
        with open(path / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                w = words()
                f.write(json.dumps({"en": " ".join(w), "rev": " ".join(reversed(w))}) + "\n")
        with open(path / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "label"])
            for _ in range(n):
                w = words()
                writer.writerow([" ".join(w), "yes" if "one" in w else "no"])
    return path


def _seq2seq_args(data: Path, out: Path) -> list[str]:
    return ["--task", "seq2seq", "--train-file", str(data / "train.jsonl"), "--valid-file", str(data / "valid.jsonl"),
            "--source-column", "en", "--target-column", "rev", "--output-dir", str(out), "--batch-size", "8",
            "--eval-batch-size", "4", "--max-new-tokens", "8", "--threads", "1"]


def test_seq2seq_single_process_from_config(data, tmp_path):
    out = tmp_path / "bart"
    metrics = _run([sys.executable, str(SCRIPT), *_seq2seq_args(data, out), "--from-config", "--arch", "bart",
                    "--d-model", "32", "--heads", "2", "--ffn-dim", "64", "--encoder-attn", "sparsemax",
                    "--cross-attn", "entmax:alpha=learned", "--max-steps", "3", "--grad-accum", "2",
                    "--num-beams", "2"])
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 1 and metrics["steps"] == 3
    assert metrics["train_examples_per_process"] == [3 * 2 * 8]  # steps x accumulation x batch
    assert metrics["attention"] == {"encoder_attn": "sparsemax", "decoder_attn": "softmax",
                                    "cross_attn": "entmax:alpha=learned"}
    assert set(metrics["mechanisms_seen"]) == {"encoder:sparsemax", "decoder:softmax", "cross:entmax:alpha=learned"}
    assert metrics["valid_examples"] == 10 and 0 <= metrics["bleu"] <= 100
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    model = AutoModelForSeq2SeqLM.from_pretrained(out)
    assert type(model) is hf_models.SparseBartForConditionalGeneration
    assert model.config.cross_attn == "entmax:alpha=learned"
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(["one two three"], return_tensors="pt")
    assert model.generate(**batch, max_new_tokens=4).shape[0] == 1


def _finetune_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import finetune
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    return finetune


def test_classification_from_a_stock_model_dir_in_process(data, tmp_path, monkeypatch):
    # main(argv) in this process (the command line is covered above), which saves starting Python again
    stock_model("bert").save_pretrained(tmp_path / "stock")  # no tokenizer: one is built from the data
    out = tmp_path / "bert"
    for key in ("MASTER_ADDR", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(key, raising=False)
    metrics = _finetune_module().main([
        "--task", "classification", "--train-file", str(data / "train.csv"), "--valid-file", str(data / "valid.csv"),
        "--text-column", "sentence", "--label-column", "label", "--model-dir", str(tmp_path / "stock"),
        "--attn", "entmax:alpha=1.3", "--output-dir", str(out), "--max-steps", "2", "--batch-size", "8",
    ])
    assert metrics == json.loads((out / "metrics.json").read_text())
    assert metrics["attention"] == {"attn_implementation": "entmax:alpha=1.3"}
    assert metrics["mechanisms_seen"] == ["encoder:entmax:alpha=1.3"]
    assert metrics["valid_examples"] == 10 and 0 <= metrics["accuracy"] <= 1
    model = AutoModelForSequenceClassification.from_pretrained(out)  # the spec comes back from config.json
    assert model.config._attn_implementation == "entmax:alpha=1.3"
    assert set(model.config.label2id) == {"yes", "no"}


def test_seq2seq_two_processes_data_parallel_on_cpu(data, tmp_path):
    """`accelerate launch --num_processes 2 --cpu`: two gloo workers, each on its own shard."""
    stock_model("marian").save_pretrained(tmp_path / "stock")
    out = tmp_path / "marian"
    metrics = _run([str(BIN / "accelerate"), "launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
                    str(SCRIPT), *_seq2seq_args(data, out),
                    "--model-dir", str(tmp_path / "stock"), "--cross-attn", "sparsemax", "--max-steps", "2"])
    assert metrics["num_processes"] == 2 and metrics["distributed_type"] == "MULTI_CPU"
    assert metrics["steps_per_process"] == [2, 2]
    assert metrics["train_examples_per_process"] == [16, 16]  # each process trained on its own shard
    assert metrics["valid_examples"] == 10  # gathered from both processes, without duplicates
    assert metrics["model_type"] == "sparse_marian" and metrics["attention"]["cross_attn"] == "sparsemax"
    assert "cross:sparsemax" in metrics["mechanisms_seen"]
    assert type(AutoModelForSeq2SeqLM.from_pretrained(out)) is hf_models.SparseMarianMTModel


def test_accelerate_cpu_launcher_without_a_process_count_is_refused(monkeypatch):
    finetune = _finetune_module()
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setattr(finetune, "_parent_num_processes", lambda: None)
    with pytest.raises(SystemExit, match="torchrun"):
        finetune.check_launch()
    monkeypatch.setenv("WORLD_SIZE", "2")
    finetune.check_launch()  # a real multi-process launch goes on


def test_word_tokenizer_round_trips_the_training_words():
    tok = _finetune_module().build_word_tokenizer(["one two three", "three two one"], "seq2seq")
    ids = tok("two one")["input_ids"]
    assert ids[-1] == tok.eos_token_id and tok.decode(ids, skip_special_tokens=True) == "two one"
    assert tok("nine")["input_ids"][0] == tok.unk_token_id
    assert torch.tensor(ids).max() < len(tok)
