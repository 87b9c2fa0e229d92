"""Tiny data, models and command-line runners for the fairseq user-dir tests."""

from __future__ import annotations

import contextlib
import importlib
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[2]
USER_DIR = ROOT / "user_dir"
BIN = Path(sys.executable).parent

# the same tiny dimensions as sparse_transformer_tiny, spelled out so the stock transformer matches
TINY_DIMS = [
    "--encoder-embed-dim", "64", "--encoder-ffn-embed-dim", "128", "--encoder-layers", "2",
    "--encoder-attention-heads", "4", "--decoder-embed-dim", "64", "--decoder-ffn-embed-dim", "128",
    "--decoder-layers", "2", "--decoder-attention-heads", "4",
]
NO_DROPOUT = ["--dropout", "0", "--attention-dropout", "0", "--activation-dropout", "0"]


# ----------------------------------------------------------------------------- data


def write_corpus(folder: Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A toy translation task: the target is the source reversed, word by word renamed.

    ``s7 s2 s9`` -> ``t9 t2 t7``. Sentences of 3 to 9 words over 16 words, so batches are
    padded and the alignment is the anti-diagonal.
    """
    sizes = sizes or {"train": 160, "valid": 16, "test": 8}
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        src_lines, tgt_lines = [], []
        for _ in range(n):
            words = [f"s{rng.randrange(16)}" for _ in range(rng.randint(3, 9))]
            src_lines.append(" ".join(words))
            tgt_lines.append(" ".join("t" + w[1:] for w in reversed(words)))
        (folder / f"{split}.src").write_text("\n".join(src_lines) + "\n")
        (folder / f"{split}.tgt").write_text("\n".join(tgt_lines) + "\n")
    return folder


def preprocess(corpus: Path, dest: Path) -> Path:
    """fairseq-preprocess, in-process."""
    from fairseq import options
    from fairseq_cli import preprocess as fairseq_preprocess

    parser = options.get_preprocessing_parser()
    args = parser.parse_args([
        "--source-lang", "src", "--target-lang", "tgt", "--trainpref", str(corpus / "train"),
        "--validpref", str(corpus / "valid"), "--testpref", str(corpus / "test"), "--destdir", str(dest),
        "--workers", "1",
    ])
    fairseq_preprocess.main(args)
    return dest


# ----------------------------------------------------------------------------- command lines


@contextlib.contextmanager
def _argv(argv: Sequence[str]) -> Iterator[None]:
    old = sys.argv
    sys.argv = [str(a) for a in argv]
    try:
        yield
    finally:
        sys.argv = old


def run_cli(tool: str, argv: Sequence[str]) -> None:
    """Run ``fairseq-<tool>`` in this process (``fairseq_cli.<tool>.cli_main`` with sys.argv set)."""
    module = importlib.import_module(f"fairseq_cli.{tool}")
    with _argv([f"fairseq-{tool}", *argv]):
        module.cli_main()


# fairseq drops the last batch of every split when its size is not a multiple of
# --required-batch-size-multiple (default 8; fairseq issues 5036, 5351): the tests ask for 1.


def train_argv(data: Path, save_dir: Path, *extra: str, arch: str = "sparse_transformer_tiny") -> list[str]:
    return [
        str(data), "--user-dir", str(USER_DIR), "--arch", arch, "--cpu", "--num-workers", "0",
        "--optimizer", "adam", "--lr", "0.003", "--max-tokens", "300", "--seed", "3",
        "--save-dir", str(save_dir), "--no-progress-bar", "--log-interval", "1", "--no-epoch-checkpoints",
        "--required-batch-size-multiple", "1", *extra,
    ]


def generate_argv(data: Path, checkpoint: Path, *extra: str) -> list[str]:
    return [
        str(data), "--user-dir", str(USER_DIR), "--path", str(checkpoint), "--cpu", "--num-workers", "0",
        "--beam", "3", "--batch-size", "4", "--required-batch-size-multiple", "1", "--max-len-b", "15", *extra,
    ]


def parse_generate_output(text: str) -> dict[str, dict[int, str]]:
    """fairseq-generate's lines by kind: ``{"H": {id: text}, "A": {...}, "S": ..., "P": ...}``."""
    out: dict[str, dict[int, str]] = {}
    for line in text.splitlines():
        head, sep, rest = line.partition("\t")
        if not sep or "-" not in head or head[0] not in "SHTDPA" or not head[2:].isdigit():
            continue
        out.setdefault(head[0], {})[int(head[2:])] = rest
    return out


# ----------------------------------------------------------------------------- models and batches


def build_model(data: Path, arch: str, *extra: str):
    """A model and its translation task, from command-line style arguments (not trained)."""
    from fairseq import options, tasks

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, input_args=[str(data), "--user-dir", str(USER_DIR), "--arch", arch, "--cpu", *extra]
    )
    task = tasks.setup_task(args)
    torch.manual_seed(0)
    model = task.build_model(args)
    return model, task


def make_batch(task, pairs: Sequence[tuple[str, str]]) -> SimpleNamespace:
    """Collate (source, target) sentences as fairseq does: sources left-padded, targets right-padded."""
    from fairseq.data import data_utils

    src_dict, tgt_dict = task.source_dictionary, task.target_dictionary
    src = [src_dict.encode_line(s, add_if_not_exist=False, append_eos=True).long() for s, _ in pairs]
    tgt = [tgt_dict.encode_line(t, add_if_not_exist=False, append_eos=True).long() for _, t in pairs]
    pad, eos = src_dict.pad(), src_dict.eos()
    return SimpleNamespace(
        src_tokens=data_utils.collate_tokens(src, pad, eos, left_pad=True),
        src_lengths=torch.tensor([len(s) for s in src]),
        prev_output_tokens=data_utils.collate_tokens(tgt, pad, eos, left_pad=False, move_eos_to_beginning=True),
        target=data_utils.collate_tokens(tgt, pad, eos, left_pad=False),
        pad=pad,
    )


PAIRS = [
    ("s1 s2 s3 s4 s5 s6 s7", "t7 t6 t5 t4 t3 t2 t1"),
    ("s8 s9 s10", "t10 t9 t8"),
    ("s11 s3 s12 s5 s0", "t0 t5 t12 t3 t11"),
]


def sharpen(model, factor: float = 4.0, seed: int = 0) -> None:
    """Scale the query projections (sharper attention, so sparse mechanisms give exact zeros) and
    give every learned alpha a different value per head."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("q_proj.weight"):
                param.mul_(factor)
            elif name.endswith("learned.weight"):
                param.copy_(torch.randn(param.shape, generator=gen))


def attention_modules(model) -> dict[str, object]:
    from user_dir.modules import PluggableMultiheadAttention

    return {n: m for n, m in model.named_modules() if isinstance(m, PluggableMultiheadAttention)}
