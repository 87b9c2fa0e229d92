"""Synthetic tasks for length extrapolation, as Vasylenko et al. (2026) define them.

"Long-Context Generalization with Sparse Attention" (ICLR 2026, arXiv 2506.16640) trains on
short sequences and tests on much longer ones. Each generator here draws one example as
``(source, target)`` lists of integer tokens, with exact answers:

- ``copy``: the target is the source (tokens in ``[0, vocab_size)``).
- ``reverse``: the target is the source reversed.
- ``flip_flop``: pairs (command, bit); commands ``WRITE`` (2), ``IGNORE`` (3), a final ``READ`` (4);
  the first command is a write, the others write with probability ``write_prob``; the source is
  the pairs without the read's bit, the target the bit of the last write.
- ``mqmtar`` (multi-query multi-token associative recall): ``num_kv`` key-value pairs (keys of
  ``k_len`` tokens, values of ``v_len``, drawn from a fixed table of ``vocab_size`` pairs over an
  alphabet of ``abc_size`` tokens) spread over a background of ``SPACE`` tokens; then ``num_q``
  queries, each ``Q_SEP`` and a key; the target is ``Q_SEP`` and the value for each query.
- ``local_count``: blocks of one repeated token (2 to ``max_reps`` times, neighbouring blocks
  differ); the target at each position is how many times its token repeated before it in its
  block (0-based). This is a labeling task: one target per source token.

``layout(task)`` says which: ``"seq2seq"`` (the target follows the source) or ``"labeling"``.
``vocab(task, **params)`` gives the number of source/target token ids. Lengths follow the paper:
the source length is drawn uniformly from ``[seq_len - vary_len, seq_len + vary_len]``
(``vary_len=0`` for the fixed test lengths).

Where this differs from the paper's generator: in ``mqmtar`` the offset of a pair inside its
slot of ``seq_len // num_kv`` tokens is uniform (the paper deletes random background tokens
around a centred pair), and ``local_count``'s block count is chosen so the source has exactly
``seq_len`` tokens at most (the paper's is about that).
"""

from __future__ import annotations

from typing import Any

import numpy as np

WRITE, IGNORE, READ = 2, 3, 4
SPACE, KV_SEP, Q_SEP, FIRST_SYMBOL = 0, 1, 2, 3

TASKS = ("copy", "reverse", "flip_flop", "mqmtar", "local_count")

DEFAULTS: dict[str, dict[str, Any]] = {
    "copy": {"vocab_size": 32},
    "reverse": {"vocab_size": 32},
    "flip_flop": {"write_prob": 0.1},
    "mqmtar": {"abc_size": 256, "vocab_size": 10000, "k_len": 2, "v_len": 2, "num_kv": 0.8, "num_q": 4},
    "local_count": {"vocab_size": 16, "max_reps": 12},
}
"""The paper's parameters for each task (its data-generation commands)."""


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not a task; valid choices: {', '.join(TASKS)}")
    return task


def layout(task: str) -> str:
    """``"labeling"`` (one target per source token) or ``"seq2seq"`` (the target follows the source)."""
    return "labeling" if check_task(task) == "local_count" else "seq2seq"


def params_of(task: str, **params: Any) -> dict[str, Any]:
    """The task's parameters: the paper's defaults overridden by ``params`` (unknown names raise)."""
    defaults = DEFAULTS[check_task(task)]
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"{task}: unknown parameter(s) {', '.join(sorted(unknown))}; valid: {', '.join(defaults)}")
    return {**defaults, **params}


def vocab(task: str, **params: Any) -> int:
    """How many token ids the source and target of ``task`` use (ids are ``0 .. vocab - 1``)."""
    p = params_of(task, **params)
    if task in ("copy", "reverse"):
        return p["vocab_size"]
    if task == "flip_flop":
        return 5
    if task == "mqmtar":
        return FIRST_SYMBOL + p["abc_size"]
    return max(p["vocab_size"], p["max_reps"])


def sample_length(rng: np.random.Generator, seq_len: int, vary_len: int) -> int:
    if not 0 <= vary_len < seq_len:
        raise ValueError(f"vary_len must be in [0, seq_len), got vary_len={vary_len}, seq_len={seq_len}")
    return int(rng.integers(seq_len - vary_len, seq_len + vary_len + 1))


class KeyValueTable:
    """The fixed table of ``vocab_size`` (key, value) pairs of ``mqmtar``: distinct keys, distinct values."""

    def __init__(self, rng: np.random.Generator, abc_size: int, vocab_size: int, k_len: int, v_len: int) -> None:
        if abc_size ** min(k_len, v_len) < vocab_size:
            raise ValueError(f"mqmtar: vocab_size={vocab_size} exceeds abc_size ** min(k_len, v_len) = "
                             f"{abc_size ** min(k_len, v_len)} distinct keys or values")
        self.keys = self._distinct(rng, abc_size, vocab_size, k_len)
        self.values = self._distinct(rng, abc_size, vocab_size, v_len)

    @staticmethod
    def _distinct(rng: np.random.Generator, abc_size: int, count: int, length: int) -> np.ndarray:
        codes = rng.choice(abc_size ** length, size=count, replace=False)
        digits = (codes[:, None] // abc_size ** np.arange(length - 1, -1, -1)[None, :]) % abc_size
        return digits + FIRST_SYMBOL


def sample(task: str, rng: np.random.Generator, seq_len: int, vary_len: int = 0,
           table: KeyValueTable | None = None, **params: Any) -> tuple[list[int], list[int]]:
    """One ``(source, target)`` example of ``task`` (see the module docstring)."""
    p = params_of(task, **params)
    n = sample_length(rng, seq_len, vary_len)
    if task in ("copy", "reverse"):
        src = rng.integers(0, p["vocab_size"], n).tolist()
        return src, (src if task == "copy" else src[::-1])
    if task == "flip_flop":
        return _flip_flop(rng, n, p["write_prob"])
    if task == "mqmtar":
        if table is None:
            raise ValueError("mqmtar: pass the pair table (KeyValueTable) shared by the whole data set")
        return _mqmtar(rng, n, table, p)
    return _local_count(rng, n, p["vocab_size"], p["max_reps"])


def _flip_flop(rng: np.random.Generator, n: int, write_prob: float) -> tuple[list[int], list[int]]:
    if not 0 < write_prob < 1:
        raise ValueError(f"flip_flop: write_prob must be in (0, 1), got {write_prob}")
    pairs = n // 2
    if pairs < 2:
        raise ValueError(f"flip_flop: the length must be at least 4, got {n}")
    bits = rng.integers(0, 2, pairs)
    middle = np.where(rng.random(pairs - 2) < write_prob, WRITE, IGNORE)
    commands = np.concatenate([[WRITE], middle, [READ]])
    last_write = int(np.flatnonzero(commands == WRITE)[-1])
    source = np.stack([commands, bits], axis=1).reshape(-1)[:-1]
    return source.tolist(), [int(bits[last_write])]


def _mqmtar(rng: np.random.Generator, n: int, table: KeyValueTable, p: dict[str, Any]) -> tuple[list[int], list[int]]:
    unit = p["k_len"] + p["v_len"] + 2  # key, separator, value, one background token
    num_kv = min(int(n * p["num_kv"] // unit), len(table.keys))
    if num_kv < p["num_q"] or n // max(num_kv, 1) < unit:
        raise ValueError(f"mqmtar: length {n} holds {num_kv} pairs, fewer than num_q={p['num_q']} or too dense")
    width = n // num_kv
    chosen = rng.choice(len(table.keys), size=num_kv, replace=False)
    source = np.full(num_kv * width, SPACE, dtype=np.int64)
    for slot, pair in enumerate(chosen):
        offset = slot * width + int(rng.integers(0, width - unit + 1))  # a background token follows
        kv = np.concatenate([table.keys[pair], [KV_SEP], table.values[pair]])
        source[offset:offset + len(kv)] = kv
    asked = rng.integers(0, num_kv, p["num_q"])
    queries, answers = [], []
    for q in asked:
        queries += [Q_SEP, *table.keys[chosen[q]].tolist()]
        answers += [Q_SEP, *table.values[chosen[q]].tolist()]
    return source.tolist() + queries, answers


def _local_count(rng: np.random.Generator, n: int, vocab_size: int, max_reps: int) -> tuple[list[int], list[int]]:
    if max_reps < 2 or vocab_size < 2:
        raise ValueError(f"local_count: max_reps and vocab_size must be >= 2, got {max_reps}, {vocab_size}")
    source: list[int] = []
    target: list[int] = []
    previous = -1
    while True:
        reps = int(rng.integers(2, max_reps + 1))
        if len(source) + reps > n:
            break
        token = int(rng.integers(0, vocab_size - 1))
        token += token >= previous >= 0  # a token different from the previous block's
        source += [token] * reps
        target += list(range(reps))
        previous = token
    return source, target


def answer(task: str, source: list[int], **params: Any) -> list[int]:
    """The target of ``source``, computed a second way (a direct scan), for checking the generators.

    ``mqmtar`` reads the pairs from the source itself (each key followed by ``KV_SEP`` and its value).
    """
    p = params_of(task, **params)
    if task == "copy":
        return list(source)
    if task == "reverse":
        return list(reversed(source))
    if task == "flip_flop":
        bit = None
        for pos in range(0, len(source) - 1, 2):
            if source[pos] == WRITE:
                bit = source[pos + 1]
        assert source[-1] == READ
        return [bit]
    if task == "local_count":
        out = []
        for pos, token in enumerate(source):
            out.append(out[-1] + 1 if pos and source[pos - 1] == token else 0)
        return out
    k, v = p["k_len"], p["v_len"]
    first_query = len(source) - p["num_q"] * (k + 1)
    memory = {}
    for pos in range(first_query - k - v):
        key = tuple(source[pos:pos + k])
        if source[pos + k] == KV_SEP and SPACE not in key and KV_SEP not in key:
            memory[key] = source[pos + k + 1:pos + k + 1 + v]
    out = []
    for start in range(first_query, len(source), k + 1):
        out += [Q_SEP, *memory[tuple(source[start + 1:start + 1 + k])]]
    return out
