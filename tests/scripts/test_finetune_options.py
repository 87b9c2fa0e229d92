"""scripts/finetune.py: --help shows the defaults; the automatic thread count."""

from __future__ import annotations

import os
import re

import pytest


def test_help_shows_the_defaults(finetune, capsys):
    with pytest.raises(SystemExit):
        finetune.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "    python scripts/finetune.py --task seq2seq" in out  # the description is kept as written
    entries = {}  # the help of each option, after usage and description
    for entry in re.split(r"\n  (?=-)", out[out.index("options:"):])[1:]:
        entries[entry.split()[0]] = " ".join(entry.split("\n\n")[0].split())  # without the next group's title
    for option, default in (("--epochs", "1"), ("--lr", "0.0005"), ("--batch-size", "16"), ("--num-beams", "1"),
                            ("--threads", "0"), ("--seed", "0"), ("--max-grad-norm", "1.0"),
                            ("--vocab-size", "8000")):
        assert entries[option].endswith(f"(default: {default})"), entries[option]
    assert not any("(default: None)" in e or "(default: False)" in e for e in entries.values())


@pytest.mark.parametrize(
    ("requested", "omp", "cores", "local_processes", "expected"),
    [
        (3, "2", 16, None, 3),      # --threads N wins
        (0, "2", 16, None, 2),      # then OMP_NUM_THREADS
        (0, None, 2, None, 1),      # a small machine: one thread
        (0, None, 4, None, 1),
        (0, None, 16, None, 16),    # a large one: its cores
        (0, None, 16, "4", 1),      # 4 cores for each of 4 local processes
        (0, None, 32, "2", 16),
    ],
)
def test_threads_are_chosen_from_the_machine(finetune, monkeypatch, requested, omp, cores, local_processes,
                                             expected):
    for name, value in (("OMP_NUM_THREADS", omp), ("LOCAL_WORLD_SIZE", local_processes)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert finetune.choose_threads(requested) == expected


class _Tokenizer:
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return 40


_BASE = ["--task", "seq2seq", "--train-file", "t.jsonl", "--valid-file", "v.jsonl", "--output-dir", "out",
         "--from-config"]


@pytest.mark.parametrize("arch", ["marian", "bart"])
def test_attention_dropout_defaults_to_dropout_and_can_be_set_apart(finetune, arch):
    args = finetune.parse_args([*_BASE, "--arch", arch, "--dropout", "0.2", "--cross-attn", "sparsemax"])
    config = finetune.tiny_config(args, _Tokenizer(), None)
    assert (config.dropout, config.attention_dropout) == (0.2, 0.2)
    args = finetune.parse_args([*_BASE, "--arch", arch, "--dropout", "0.2", "--attention-dropout", "0"])
    config = finetune.tiny_config(args, _Tokenizer(), None)
    assert (config.dropout, config.attention_dropout) == (0.2, 0.0)


def test_attention_dropout_of_a_classifier(finetune):
    args = finetune.parse_args(["--task", "classification", "--train-file", "t.jsonl", "--valid-file", "v.jsonl",
                                "--output-dir", "out", "--from-config", "--arch", "bert", "--attention-dropout",
                                "0.05"])
    config = finetune.tiny_config(args, _Tokenizer(), 3)
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob) == (0.1, 0.05)


@pytest.mark.parametrize(("extra", "message"), [
    (["--arch", "marian", "--attention-dropout", "1.0"], "--attention-dropout must be in [0, 1), got 1.0"),
    (["--arch", "marian", "--dropout", "-0.1"], "--dropout must be in [0, 1), got -0.1"),
    (["--arch", "t5", "--attention-dropout", "0"], "t5 drops its attention weights with its one dropout rate"),
])
def test_bad_dropout_values_are_refused_by_name(finetune, capsys, extra, message):
    with pytest.raises(SystemExit):
        finetune.parse_args([*_BASE, *extra])
    assert message in capsys.readouterr().err
