"""scripts/finetune.py on open-vocabulary text: tokenizers built from the data, metrics against the raw
references of the data file, --test-file, --predictions-file, progress lines in logs."""

from __future__ import annotations

import io
import itertools
import json

import pytest
import torch

from .test_finetune import _finetune_module

SUBJECTS = ["The cat", "My brother", "Our teacher", "A small dog", "The old man", "Her friend"]
VERBS = ["sees", "likes", "finds", "wants"]
OBJECTS = ["the red ball", "a new book", "the green door", "an apple", "the garden"]
# every word of these is in the training sentences except "xylophone"
UNSEEN = ["The cat sees the xylophone.", "My brother likes a new book, and the xylophone!"]
SEEN = ["The cat sees the garden.", "My brother likes a new book, and the garden!"]


@pytest.fixture(scope="module")
def finetune():
    return _finetune_module()


def _train_sentences() -> list[str]:
    triples = list(itertools.product(SUBJECTS, VERBS, OBJECTS))[::3]
    # 40 sentences, every other one with a comma and an exclamation mark
    return [f"{s} {v} {o}{'.' if k % 2 else ', and ' + OBJECTS[k % 5] + '!'}" for k, (s, v, o) in enumerate(triples)]


def _write(path, sentences):
    path.write_text("".join(json.dumps({"en": s, "copy": s}) + "\n" for s in sentences), encoding="utf-8")


def test_tokenizers_restore_the_raw_text(finetune):
    texts = _train_sentences()
    sentence = "Our teacher finds an apple, and the garden!"
    for kind in ("unigram", "bpe"):
        tok = finetune.build_tokenizer(texts, "seq2seq", kind, 200)
        for text in (sentence, *UNSEEN, "A  tab\there:   (quoted) \"words\"; 42?"):
            ids = tok(text)["input_ids"]
            assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids, (kind, text)
            assert tok.decode(ids, skip_special_tokens=True) == " ".join(text.split()), (kind, text)
        assert len(tok) <= 200
    word = finetune.build_tokenizer(texts, "seq2seq", "word")
    assert word.decode(word(sentence)["input_ids"], skip_special_tokens=True) == sentence  # not "apple , and"
    ids = word(UNSEEN[0])["input_ids"]
    assert ids.count(word.unk_token_id) == 1
    assert word.decode(ids, skip_special_tokens=True) == "The cat sees the."  # the unseen word is lost
    classifier = finetune.build_tokenizer(texts, "classification", "unigram", 200)
    ids = classifier(sentence)["input_ids"]
    assert ids[0] == classifier.bos_token_id and ids[-1] == classifier.eos_token_id


def test_bad_tokenizer_choices_are_refused_by_name(finetune, tmp_path, capsys):
    with pytest.raises(ValueError, match="tokenizer must be one of unigram, bpe, word, got 'spm'"):
        finetune.build_tokenizer(["a b"], "seq2seq", "spm")
    base = ["--task", "seq2seq", "--train-file", "t.jsonl", "--valid-file", "v.jsonl", "--output-dir", "o"]
    with pytest.raises(SystemExit):
        finetune.parse_args([*base, "--from-config", "--arch", "marian", "--tokenizer", "spm"])
    assert "--tokenizer: invalid choice: 'spm'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.parse_args([*base, "--from-config", "--arch", "marian", "--vocab-size", "3"])
    assert "--vocab-size must be at least 5" in capsys.readouterr().err
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(SystemExit):
        finetune.parse_args([*base, "--model-dir", str(tmp_path), "--tokenizer", "word"])
    assert "has its own tokenizer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        finetune.parse_args([*base, "--from-config", "--arch", "marian", "--test-file", "t.csv"])
    assert "--test-file must have the format of --train-file" in capsys.readouterr().err


def test_text_metrics_score_detokenized_text_against_the_raw_reference(finetune):
    ref = ["Ich wurde zur Pünktlichkeit erzogen.", "Das ist nicht gut."]
    perfect = finetune.text_metrics(ref, ref)
    assert perfect["bleu"] == pytest.approx(100) and perfect["chrf"] == pytest.approx(100)
    assert perfect["exact_match"] == 1.0 and "tok:13a" in perfect["bleu_signature"]
    # a prediction that cannot spell the rare word scores below the perfect one (and is no exact match)
    lost = finetune.text_metrics(["Ich wurde zur erzogen.", "Das ist nicht gut."], ref)
    assert lost["bleu"] < 90 and lost["chrf"] < 90 and lost["exact_match"] == 0.5
    assert finetune.text_metrics([" Das ist nicht gut. "], ["Das ist nicht gut."])["exact_match"] == 1.0


def test_progress_writes_plain_lines_without_a_terminal(finetune):
    stream = io.StringIO()
    progress = finetune.Progress(95, stream=stream)
    for step in range(95):
        progress.update(1.0 / (step + 1))
    progress.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 10 and lines[0].startswith("training: step 10/95 (11%), loss 0.1000, ")
    assert lines[-1].startswith("training: step 95/95 (100%)") and lines[-1].endswith(" s")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    progress = finetune.Progress(5, stream=tty)
    for _ in range(5):
        progress.update(0.5)
    progress.close()
    assert "\r" in tty.getvalue() and "loss=0.500" in tty.getvalue()  # a tqdm bar
    silent = io.StringIO()
    progress = finetune.Progress(5, enabled=False, stream=silent)
    progress.update(0.5)
    assert silent.getvalue() == ""


def _copying(finetune, monkeypatch):
    """build_model's model, whose generate() copies the tokenized source: the best a model that can only
    write its tokenizer's vocabulary can do on a copy task."""
    build = finetune.build_model

    def build_copying(args, tokenizer, label2id):
        model = build(args, tokenizer, label2id)

        def generate(input_ids, attention_mask=None, **kwargs):
            start = torch.full_like(input_ids[:, :1], model.config.decoder_start_token_id)
            return torch.cat([start, input_ids], 1)

        model.generate = generate
        return model

    monkeypatch.setattr(finetune, "build_model", build_copying)
    for key in ("MASTER_ADDR", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(key, raising=False)


def _main(finetune, tmp_path, name, *extra):
    from accelerate.state import AcceleratorState, GradientState

    try:
        return finetune.main([
            "--task", "seq2seq", "--train-file", str(tmp_path / "train.jsonl"), "--valid-file",
            str(tmp_path / "valid.jsonl"), "--source-column", "en", "--target-column", "copy", "--from-config",
            "--arch", "marian", "--d-model", "16", "--layers", "1", "--heads", "2", "--ffn-dim", "16",
            "--max-steps", "1", "--batch-size", "8", "--threads", "1", "--output-dir", str(tmp_path / name), *extra,
        ])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_a_reference_word_the_tokenizer_cannot_write_costs_score(finetune, tmp_path, monkeypatch, capfd):
    """Copying the tokenized source: with the word-level tokenizer the unseen word becomes <unk> and is
    lost from the prediction; the reference is the data file's text, so it keeps the word and the copy
    scores below 100, while the same sentences without the unseen word (the test file) score 100. The
    subword tokenizer spells the unseen word and copies it."""
    _write(tmp_path / "train.jsonl", _train_sentences())
    _write(tmp_path / "valid.jsonl", UNSEEN)
    _write(tmp_path / "test.jsonl", SEEN)
    _copying(finetune, monkeypatch)
    capfd.readouterr()
    predictions = tmp_path / "predictions.jsonl"
    metrics = _main(finetune, tmp_path, "word", "--tokenizer", "word", "--test-file", str(tmp_path / "test.jsonl"),
                    "--predictions-file", str(predictions))
    assert metrics["valid_examples"] == 2 and metrics["test_examples"] == 2
    assert metrics["test_bleu"] == pytest.approx(100) and metrics["test_chrf"] == pytest.approx(100)
    assert metrics["test_exact_match"] == 1.0 and metrics["test_target_unk_rate"] == 0.0
    assert metrics["bleu"] < 75 and metrics["chrf"] < 90 and metrics["exact_match"] == 0.0
    assert metrics["target_unk_rate"] == pytest.approx(2 / 17)  # 2 of 6 + 11 word and punctuation tokens
    assert {"test_loss", "valid_loss"} <= set(metrics)
    rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    assert [r["split"] for r in rows] == ["valid", "valid", "test", "test"]
    assert rows[0] == {"split": "valid", "source": UNSEEN[0], "prediction": "The cat sees the.",
                       "reference": UNSEEN[0]}
    assert [r["reference"] for r in rows[2:]] == SEEN == [r["prediction"] for r in rows[2:]]
    err = capfd.readouterr().err
    assert "\r" not in err and "training: step 1/1 (100%)" in err  # no progress bars in a pipe

    metrics = _main(finetune, tmp_path, "unigram")  # the default tokenizer
    assert metrics["bleu"] == pytest.approx(100) and metrics["exact_match"] == 1.0
    assert metrics["target_unk_rate"] == 0.0 and "test_bleu" not in metrics
    assert metrics["examples"][0] == {"source": UNSEEN[0], "prediction": UNSEEN[0], "reference": UNSEEN[0]}
