"""Every code block of README.md and docs/*.md runs as written.

The blocks are collected from the Markdown files when the tests are collected, so a block added
later is tested without any change here. Each fenced block must name its language:

- ``python`` blocks run as a script with this interpreter;
- ``bash`` / ``sh`` / ``shell`` blocks run with ``bash -e -o pipefail``;
- any other language (``text``, ``json``, ...) is output or a listing and is not run;
- a block without a language fails :func:`test_every_block_names_its_language`.

A block runs in a fresh temporary folder that looks like a clone of the repository: ``plugin``,
``user_dir``, ``hf_models``, ``scripts`` and ``.venv`` (this interpreter's environment) are links
to the real ones, the environment's ``bin`` is first on ``PATH`` and ``OMP_NUM_THREADS=1``.
Nothing is downloaded (``HF_HUB_OFFLINE=1``).

Directives: HTML comments on the lines right before a block's opening fence (invisible on a
rendered page), one directive per comment:

``<!-- doc-test: setup NAME [NAME ...] -->``
    Put the named fixture(s) in the folder first (see ``SETUPS``): data files, a trained
    checkpoint, local model folders standing in for the ``path/to/...`` of an example.
``<!-- doc-test: replace 'OLD' 'NEW' -->``
    Run the block with OLD replaced by NEW (shell quoting): how long-running examples run at
    tiny sizes (``--max-epoch 40`` -> ``--max-epoch 1``). OLD must occur in the block.
``<!-- doc-test: continue -->``
    The block carries on from the previous runnable block of the same file: that block (with
    its own directives, recursively) runs first in the same folder, and consecutive Python
    blocks share one interpreter, so their variables carry over.
``<!-- doc-test: skip REASON -->``
    Not run; the test is reported as skipped with REASON.
"""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
RUN_LANGUAGES = {"python": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
LINKED = ("plugin", "user_dir", "hf_models", "scripts")
TIMEOUT = 900
PORT_RETRIES = 3  # data-parallel examples use the launchers' default port, which a concurrent run may hold

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>```+|~~~+)(?P<info>[^`\n]*)$")
DIRECTIVE = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<body>.*?)\s*-->\s*$")


@dataclass
class Block:
    path: str
    line: int  # line of the opening fence, 1-based
    language: str
    code: str
    setups: list[str] = field(default_factory=list)
    replacements: list[tuple[str, str]] = field(default_factory=list)
    skip: str | None = None
    cont: bool = False
    previous: Block | None = None  # the previous runnable block of the same file
    errors: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.language in RUN_LANGUAGES

    def source(self) -> str:
        code = self.code
        for old, new in self.replacements:
            code = code.replace(old, new)
        return code


def parse_blocks(path: str, text: str) -> list[Block]:
    """The fenced blocks of a Markdown text, with the directives of the comments right above them."""
    lines = text.splitlines()
    blocks: list[Block] = []
    previous_runnable: Block | None = None
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group("fence"), m.group("info").strip()
        start = i
        i += 1
        body = []
        while i < len(lines) and not (lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][len(m.group("indent")):])
            i += 1
        i += 1  # the closing fence
        block = Block(path, start + 1, info.split()[0].lower() if info else "", "\n".join(body) + "\n")
        j = start - 1
        directives = []
        while j >= 0 and DIRECTIVE.match(lines[j]):
            directives.insert(0, DIRECTIVE.match(lines[j]).group("body"))
            j -= 1
        for d in directives:
            _apply_directive(block, d)
        if block.runnable:
            block.previous = previous_runnable
            previous_runnable = block
        if block.cont and block.previous is None:
            block.errors.append("'continue' but no runnable block comes before it in this file")
        blocks.append(block)
    return blocks


def _apply_directive(block: Block, directive: str) -> None:
    name, _, rest = directive.partition(" ")
    try:
        args = shlex.split(rest)
    except ValueError as err:
        block.errors.append(f"directive {directive!r}: {err}")
        return
    if name == "setup" and args:
        unknown = [a for a in args if a not in SETUPS]
        if unknown:
            block.errors.append(f"unknown setup {unknown}; valid: {', '.join(sorted(SETUPS))}")
        block.setups += args
    elif name == "replace" and len(args) == 2:
        if args[0] not in block.code:
            block.errors.append(f"replace: {args[0]!r} does not occur in the block")
        block.replacements.append((args[0], args[1]))
    elif name == "continue" and not args:
        block.cont = True
    elif name == "skip" and args:
        block.skip = rest.strip()
    else:
        block.errors.append(
            f"bad directive {directive!r}; valid: setup NAME..., replace 'OLD' 'NEW', continue, skip REASON"
        )


def all_blocks() -> list[Block]:
    blocks = []
    for name in DOC_FILES:
        blocks += parse_blocks(name, (ROOT / name).read_text(encoding="utf-8"))
    return blocks


# ----------------------------------------------------------------------------- set-ups

SETUPS: dict[str, Callable[[Path, Path], None]] = {}
"""name -> function(folder of the block, session cache folder) that puts the fixture in the folder."""


def setup(name: str) -> Callable:
    def register(fn: Callable[[Path, Path], None]) -> Callable[[Path, Path], None]:
        SETUPS[name] = fn
        return fn

    return register


def _cached(cache: Path, name: str, build: Callable[[Path], None]) -> Path:
    """``build(folder)`` once per test session; the folder it filled."""
    folder = cache / name
    if not (folder / ".done").exists():
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        build(folder)
        (folder / ".done").touch()
    return folder


def _copy_into(src: Path, dest: Path) -> None:
    for item in src.iterdir():
        if item.name == ".done":
            continue
        target = dest / item.name
        if item.is_dir():
            shutil.copytree(item, target, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(item, target)


@setup("toy-corpus")
def _toy_corpus(folder: Path, cache: Path) -> None:
    """``corpus/{train,valid,test}.{src,tgt}``: the reversal toy task of tests/user_dir (``s1 s2`` -> ``t2 t1``)."""
    from tests.user_dir.helpers import write_corpus

    write_corpus(folder / "corpus")


@setup("fairseq-checkpoint")
def _fairseq_checkpoint(folder: Path, cache: Path) -> None:
    """``data-bin/`` (the toy corpus binarized), ``checkpoints/checkpoint_best.pt``: a
    ``sparse_transformer_tiny`` (sparsemax encoder, learned-alpha decoder, fusedmax cross-attention)
    trained for 2 epochs by fairseq-train, and ``softmax/checkpoint_last.pt``: the same with softmax."""

    def build(out: Path) -> None:
        from tests.user_dir.helpers import write_corpus

        corpus = write_corpus(out / "corpus")
        bin_dir = Path(sys.executable).parent
        _check([str(bin_dir / "fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt",
                "--trainpref", str(corpus / "train"), "--validpref", str(corpus / "valid"),
                "--testpref", str(corpus / "test"), "--destdir", str(out / "data-bin"), "--workers", "1"], out)
        for save, specs in (("checkpoints", ["sparsemax", "entmax:alpha=learned", "fusedmax:lam=0.5"]),
                            ("softmax", ["softmax"] * 3)):
            _check([str(bin_dir / "fairseq-train"), str(out / "data-bin"), "--user-dir", str(ROOT / "user_dir"),
                    "--arch", "sparse_transformer_tiny", "--encoder-attn", specs[0], "--decoder-attn", specs[1],
                    "--cross-attn", specs[2], "--optimizer", "adam", "--lr", "0.003", "--max-tokens", "1000",
                    "--max-epoch", "2", "--required-batch-size-multiple", "1", "--save-dir", str(out / save),
                    "--no-epoch-checkpoints", "--no-progress-bar", "--num-workers", "0", "--cpu"], out)
        shutil.rmtree(corpus)

    _copy_into(_cached(cache, "fairseq-checkpoint", build), folder)


@setup("finetune-data")
def _finetune_data(folder: Path, cache: Path) -> None:
    """Tiny local data for scripts/finetune.py: English -> German number words as
    ``{train,valid}.jsonl`` and ``data/{train,valid}.jsonl`` (columns ``en``, ``de`` and the same as
    ``source``, ``target``), and a
    sentence classification set ``{train,valid}.csv`` (columns ``sentence``, ``label``)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from number_corpus import words
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    rng = random.Random(0)
    for split, n in (("train", 24), ("valid", 6)):
        numbers = rng.sample(range(1, 100), n)
        pairs = [(words(x, "en"), words(x, "de")) for x in numbers]
        lines = "".join(json.dumps({"en": en, "de": de, "source": en, "target": de}, ensure_ascii=False) + "\n"
                        for en, de in pairs)
        for name in (f"{split}.jsonl", f"data/{split}.jsonl"):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(lines, encoding="utf-8")
        rows = ["sentence,label"] + [f"{words(x, 'en')},{'big' if x >= 50 else 'small'}" for x in numbers]
        (folder / f"{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")


@setup("hf-models")
def _hf_models(folder: Path, cache: Path) -> None:
    """Tiny stock models, each with a word-level tokenizer, saved where the examples load them:
    ``path/to/roberta`` (sequence classification), ``path/to/llama``, ``path/to/stock-bart`` and
    ``path/to/bart``,
    ``path/to/marian`` and ``path/to/opus-mt-en-de`` (Marian)."""

    def build(out: Path) -> None:
        import torch
        from tokenizers import Tokenizer, models, pre_tokenizers, processors
        from transformers import PreTrainedTokenizerFast

        from tests.hf_models.tiny import BOS, EOS, PAD, STOCK, VOCAB, config_kwargs

        specials = {"<s>": BOS, "<pad>": PAD, "</s>": EOS, "<unk>": 3}
        english = "zero one two three four five six seven eight nine ten twenty cats dogs a the and".split()
        vocab = dict(specials)
        for word in english + [f"w{i}" for i in range(VOCAB)]:
            if len(vocab) < VOCAB:
                vocab.setdefault(word, len(vocab))

        def tokenizer(template: str | None) -> PreTrainedTokenizerFast:
            tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
            tok.pre_tokenizer = pre_tokenizers.Whitespace()
            if template:
                tok.post_processor = processors.TemplateProcessing(
                    single=template, special_tokens=[("<s>", BOS), ("</s>", EOS)])
            return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                           eos_token="</s>", unk_token="<unk>",
                                           model_input_names=["input_ids", "attention_mask"])

        for name, family, template in (("roberta", "roberta", "<s> $A </s>"), ("llama", "llama", None),
                                       ("stock-bart", "bart", "<s> $A </s>"), ("bart", "bart", "<s> $A </s>"),
                                       ("marian", "marian", "$A </s>"),
                                       ("opus-mt-en-de", "marian", "$A </s>")):
            config_class, model_class = STOCK[family]
            torch.manual_seed(0)
            model = model_class(config_class(**config_kwargs(family)))
            model.save_pretrained(out / "path" / "to" / name)
            tokenizer(template).save_pretrained(out / "path" / "to" / name)

    _copy_into(_cached(cache, "hf-models", build), folder)


def _check(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


# ----------------------------------------------------------------------------- running


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""), PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    env.pop("MASTER_ADDR", None)
    return env


def _chain(block: Block) -> list[Block]:
    chain = [block]
    while chain[0].cont:
        chain.insert(0, chain[0].previous)
    return chain


def _scripts(chain: list[Block]) -> list[tuple[str, str]]:
    """(language, source) to run in order: consecutive blocks of one language in one script."""
    scripts: list[tuple[str, str]] = []
    for b in chain:
        lang = RUN_LANGUAGES[b.language]
        if scripts and scripts[-1][0] == lang:
            scripts[-1] = (lang, scripts[-1][1] + "\n" + b.source())
        else:
            scripts.append((lang, b.source()))
    return scripts


@pytest.fixture(scope="session")
def setup_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("doc_setups")


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "clone"
    folder.mkdir()
    for name in LINKED:
        (folder / name).symlink_to(ROOT / name, target_is_directory=True)
    (folder / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    return folder


BLOCKS = all_blocks()


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.runnable], ids=lambda b: b.id)
def test_block_runs_as_written(block: Block, tmp_path: Path, setup_cache: Path) -> None:
    chain = _chain(block)
    errors = [f"{b.id}: {e}" for b in chain for e in b.errors]
    assert not errors, "\n".join(errors)
    if block.skip:
        pytest.skip(block.skip)
    folder = _folder(tmp_path)
    for name in dict.fromkeys(s for b in chain for s in b.setups):
        SETUPS[name](folder, setup_cache)
    for n, (lang, source) in enumerate(_scripts(chain)):
        script = folder / f".doc_block_{n}.{'py' if lang == 'python' else 'sh'}"
        script.write_text(source, encoding="utf-8")
        cmd = [sys.executable, script.name] if lang == "python" else ["bash", "-e", "-o", "pipefail", script.name]
        for attempt in range(PORT_RETRIES + 1):
            proc = subprocess.run(cmd, cwd=folder, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
            if proc.returncode == 0 or "EADDRINUSE" not in proc.stdout + proc.stderr or attempt == PORT_RETRIES:
                break
            time.sleep(30)  # another data-parallel run on this machine holds the default port 29500
        assert proc.returncode == 0, (
            f"{block.id} failed (exit {proc.returncode}) running:\n{source}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )


def test_every_block_names_its_language() -> None:
    unnamed = [b.id for b in BLOCKS if not b.language]
    assert not unnamed, (
        f"fenced blocks without a language: {unnamed}; name it (```python, ```bash: run by this test; "
        f"```text, ```json: not run)"
    )


def test_directives_are_valid() -> None:
    errors = [f"{b.id}: {e}" for b in BLOCKS for e in b.errors]
    assert not errors, "\n".join(errors)


def test_the_collector_sees_directives_and_languages() -> None:
    text = (
        "intro\n\n<!-- doc-test: setup toy-corpus -->\n<!-- doc-test: replace 'epoch 40' 'epoch 1' -->\n"
        "```bash\nfairseq-train --max-epoch 40\n```\n\n```\nno language\n```\n"
        "<!-- doc-test: continue -->\n```python\nx = 1\n```\n<!-- doc-test: skip needs a GPU -->\n"
        "```python\ny = 2\n```\n<!-- doc-test: replace 'absent' 'x' -->\n```text\nout\n```\n"
    )
    a, b, c, d, e = parse_blocks("x.md", text)
    assert (a.language, a.setups, a.source(), a.line) == ("bash", ["toy-corpus"], "fairseq-train --max-epoch 1\n", 5)
    assert b.language == "" and not b.runnable
    assert c.cont and c.previous is a and _chain(c) == [a, c]
    assert _scripts(_chain(c)) == [("bash", a.source()), ("python", "x = 1\n")]
    assert d.skip == "needs a GPU" and d.previous is c
    assert e.errors and "does not occur" in e.errors[0]
