"""The length-extrapolation tasks: answers checked by a second computation, lengths and formats."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import long_context_tasks as tasks

MQ = dict(abc_size=16, vocab_size=40, k_len=2, v_len=2, num_kv=0.8, num_q=4)


def _draw(task, n, seq_len, vary_len=0, seed=0, **params):
    rng = np.random.default_rng(seed)
    table = None
    if task == "mqmtar":
        p = tasks.params_of(task, **params)
        table = tasks.KeyValueTable(np.random.default_rng(99), p["abc_size"], p["vocab_size"], p["k_len"], p["v_len"])
    return [tasks.sample(task, rng, seq_len, vary_len, table=table, **params) for _ in range(n)], table


@pytest.mark.parametrize("task, params", [
    ("copy", {}), ("reverse", {}), ("flip_flop", {}), ("flip_flop", {"write_prob": 0.8}),
    ("local_count", {}), ("local_count", {"max_reps": 3}), ("mqmtar", MQ),
    ("mqmtar", dict(MQ, abc_size=64, k_len=1, v_len=1)),
])
@pytest.mark.parametrize("seq_len", [48, 512])
def test_targets_equal_a_direct_scan_of_the_source(task, params, seq_len):
    rows, _ = _draw(task, 30, seq_len, **params)
    for src, tgt in rows:
        assert tgt == tasks.answer(task, src, **params)
        assert all(0 <= t < tasks.vocab(task, **params) for t in src + tgt)


def test_hand_written_examples():
    # flip-flop: write 1, ignore 0, write 0, ignore 1, read -> 0
    assert tasks.answer("flip_flop", [2, 1, 3, 0, 2, 0, 3, 1, 4]) == [0]
    assert tasks.answer("local_count", [5, 5, 5, 2, 2, 5]) == [0, 1, 2, 0, 1, 0]
    assert tasks.answer("reverse", [1, 2, 3]) == [3, 2, 1]
    # mqmtar, one-token keys and values: pairs (7 -> 9), (8 -> 4); queries 8, 7
    src = [0, 7, 1, 9, 0, 0, 8, 1, 4, 0, 2, 8, 2, 7]
    assert tasks.answer("mqmtar", src, k_len=1, v_len=1, num_q=2) == [2, 4, 2, 9]


def test_lengths_follow_seq_len_and_vary_len():
    rng = np.random.default_rng(0)
    lengths = {len(tasks.sample("copy", rng, 48, 16)[0]) for _ in range(400)}
    assert min(lengths) == 32 and max(lengths) == 64
    rows, _ = _draw("flip_flop", 5, 4096)
    assert all(len(src) == 4095 and src[-1] == tasks.READ for src, _ in rows)  # 2048 pairs, the read's bit left out
    rows, _ = _draw("local_count", 20, 1024)
    assert all(1024 - 12 < len(src) <= 1024 for src, _ in rows)


def test_flip_flop_first_command_writes_and_write_rate():
    rows, _ = _draw("flip_flop", 200, 256, write_prob=0.1)
    commands = np.array([src[0:-1:2] for src, _ in rows])
    assert (commands[:, 0] == tasks.WRITE).all()
    assert abs((commands[:, 1:] == tasks.WRITE).mean() - 0.1) < 0.02


def test_local_count_blocks_differ_and_respect_max_reps():
    rows, _ = _draw("local_count", 50, 300, max_reps=5)
    for src, tgt in rows:
        assert max(tgt) <= 4 and min(tgt) == 0
        starts = [i for i, c in enumerate(tgt) if c == 0]
        assert all(src[i] != src[i - 1] for i in starts[1:])
        lengths = np.diff(starts + [len(src)])
        assert lengths.min() >= 2


def test_mqmtar_keys_are_unique_and_queries_ask_present_pairs():
    rows, table = _draw("mqmtar", 20, 512, **MQ)
    assert len({tuple(k) for k in table.keys}) == len(table.keys) == 40
    assert len({tuple(v) for v in table.values}) == 40
    for src, tgt in rows:
        assert len(tgt) == 4 * 3 and tgt[0::3] == [tasks.Q_SEP] * 4
        # at 512 tokens: min(512 * 0.8 // 6, 40) = 40 pairs, every one of the table's once
        assert src.count(tasks.KV_SEP) == 40


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="task='sorting'.*valid choices"):
        tasks.check_task("sorting")
    with pytest.raises(ValueError, match="unknown parameter.*max_reps"):
        tasks.params_of("copy", max_reps=3)
    with pytest.raises(ValueError, match="write_prob"):
        _draw("flip_flop", 1, 48, write_prob=1.5)
    with pytest.raises(ValueError, match="vary_len"):
        _draw("copy", 1, 48, vary_len=48)
    with pytest.raises(ValueError, match="vocab_size=300 exceeds"):
        _draw("mqmtar", 1, 48, **dict(MQ, vocab_size=300))
