"""The jobs of the real-data run (scripts/real.py): a pretrained BERT made sparse, and real translation.

1. **Sentiment, a pretrained model made sparse.** MiniLM (a pretrained 6-layer BERT) gets a
   classification head and is fine-tuned on Rotten Tomatoes snippets through scripts/finetune.py,
   with softmax (the control), 1.5-entmax and sparsemax switched abruptly or annealed from softmax
   with a schedule, and a learned alpha per head. Each saved model is loaded back with
   ``from_pretrained`` and measured on held-out movies: accuracy, and the share of nonzero attention
   weights per layer.
2. **Translation of real verses.** World English Bible -> Elberfelder 1905, split by book, with a
   subword vocabulary trained on the training split; fairseq (its own preprocessing of the subword
   text, ``fairseq-train --user-dir user_dir --cross-attn ...``) and transformers (a Marian-style
   model through scripts/finetune.py) with several cross-attention mechanisms; sacreBLEU and chrF of
   detokenized output against the raw reference verses.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import demo_tasks
import real_data
import torch
from demo_tasks import PY, USER_DIR, run, slug

#: the subword marker of the translation vocabulary (as sentencepiece writes it)
SPACE = "\u2581"


# ----------------------------------------------------------------------------- subword vocabulary


def train_subword(texts: list[str], vocab_size: int, path: Path | None = None) -> Any:
    """A Unigram subword model (tokenizers library) over ``texts``, with sentencepiece's word marker.

    Trained on the training split only; ``path`` saves it (``tokenizer.json``)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<unk>"], unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if path is not None:
        tok.save(str(path))
    return tok


def to_pieces(tok: Any, text: str) -> str:
    return " ".join(tok.encode(text).tokens)


def from_pieces(pieces: str) -> str:
    """Detokenize space-separated pieces: the word marker becomes a space, the rest is joined."""
    return "".join(pieces.split()).replace(SPACE, " ").strip()


def translation_scores(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """sacreBLEU (13a) and chrF of detokenized hypotheses against the raw references."""
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score, "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score,
            "exact": sum(h.strip() == r.strip() for h, r in zip(hyps, refs)) / max(len(refs), 1)}


def make_translation_data(data_dir: Path, size: dict[str, Any], bible: Path | None = None) -> dict[str, Any]:
    """Verse pairs split by book, the subword vocabulary, fairseq's binarized copy and jsonl files."""
    data_dir.mkdir(parents=True, exist_ok=True)
    splits = real_data.load_bible_pairs(bible, real_data.VerseFilter(max_words=size["max_words"]))
    if size.get("max_train"):
        splits["train"] = splits["train"][: size["max_train"]]  # canonical order: whole books first
    if size.get("max_test"):
        splits["test"] = splits["test"][: size["max_test"]]
    if not all(splits.values()):
        raise ValueError(f"a split is empty: { {k: len(v) for k, v in splits.items()} }")
    tok = train_subword([r["source"] for r in splits["train"]] + [r["target"] for r in splits["train"]],
                        size["vocab"], data_dir / "subword.json")
    names = {"train": "train", "validation": "valid", "test": "test"}
    lengths: dict[str, float] = {}
    for split, rows in splits.items():
        name = names[split]
        real_data.write_jsonl(data_dir / f"{name}.jsonl", rows)
        for side, lang in (("source", "en"), ("target", "de")):
            pieces = [to_pieces(tok, r[side]) for r in rows]
            (data_dir / f"{name}.{lang}").write_text("\n".join(pieces) + "\n", encoding="utf-8")
            if split == "train":
                lengths[lang] = statistics.fmean(len(p.split()) for p in pieces)
    bin_dir = data_dir / "data-bin"
    shutil.rmtree(bin_dir, ignore_errors=True)
    run([PY, "-m", "fairseq_cli.preprocess", "--source-lang", "en", "--target-lang", "de", "--joined-dictionary",
         "--trainpref", str(data_dir / "train"), "--validpref", str(data_dir / "valid"),
         "--testpref", str(data_dir / "test"), "--destdir", str(bin_dir), "--workers", "1"],
        data_dir / "preprocess.log")
    # a floor for the scores: the English source copied as the "translation" (names and numbers match)
    copy = translation_scores([r["source"] for r in splits["test"]], [r["target"] for r in splits["test"]])
    return {"pairs": {k: len(v) for k, v in splits.items()}, "vocab": tok.get_vocab_size(), "copy_source": copy,
            "train_pieces_per_verse": lengths,
            "test_books": list(real_data.BIBLE_TEST_BOOKS.values()),
            "valid_books": list(real_data.BIBLE_VALID_BOOKS.values()),
            "max_words": size["max_words"]}


# ----------------------------------------------------------------------------- fairseq translation

#: the translation models of both routes: encoder-decoder, 2 + 2 layers, 4 heads, d 128, ffn 256
MODEL = {"dim": 128, "ffn": 256, "layers": 2, "heads": 4}
FAIRSEQ_LR, FAIRSEQ_WARMUP = 0.003, 100
MAX_LEN_A, MAX_LEN_B, BEAM = 1.2, 10, 5


def fairseq_argv(bin_dir: Path, save_dir: Path, spec: str, epochs: int, seed: int) -> list[str]:
    return [
        str(bin_dir), "--user-dir", str(USER_DIR), "--arch", "sparse_transformer_tiny",
        "--encoder-embed-dim", str(MODEL["dim"]), "--encoder-ffn-embed-dim", str(MODEL["ffn"]),
        "--encoder-layers", str(MODEL["layers"]), "--decoder-layers", str(MODEL["layers"]),
        "--encoder-attention-heads", str(MODEL["heads"]), "--decoder-attention-heads", str(MODEL["heads"]),
        "--share-all-embeddings", "--cross-attn", spec,
        "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(FAIRSEQ_LR), "--lr-scheduler",
        "inverse_sqrt", "--warmup-updates", str(FAIRSEQ_WARMUP), "--clip-norm", "1.0", "--dropout", "0.1",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--max-tokens", "1024", "--max-epoch", str(epochs), "--save-dir", str(save_dir),
        "--no-save-optimizer-state", "--log-format", "json", "--log-interval", "50", "--seed", str(seed),
        "--cpu", "--num-workers", "0", "--required-batch-size-multiple", "1",
        *([] if "learned" in spec else ["--no-epoch-checkpoints"]),
    ]


def decode_fairseq(models: list[Any], task: Any, data_dir: Path) -> dict[str, Any]:
    """Greedy and beam 5 (the optimal stopping rule of user_dir/beam_search.py) on the test verses,
    detokenized and scored against the raw references."""
    from fairseq.sequence_generator import SequenceGenerator

    from user_dir.beam_search import OptimalStopBeamSearch

    tgt = task.target_dictionary
    refs = [r["target"] for r in real_data.read_jsonl(data_dir / "test.jsonl")]
    task.load_dataset("test")
    itr = task.get_batch_iterator(dataset=task.dataset("test"), max_sentences=64, required_batch_size_multiple=1,
                                  seed=1).next_epoch_itr(shuffle=False)
    searches = {
        "greedy": SequenceGenerator(models, tgt, beam_size=1, max_len_a=MAX_LEN_A, max_len_b=MAX_LEN_B),
        "beam": OptimalStopBeamSearch(tgt, beam_size=BEAM, max_len_a=MAX_LEN_A, max_len_b=MAX_LEN_B),
    }
    hyps: dict[str, dict[int, str]] = {k: {} for k in searches}
    with torch.no_grad():
        for sample in itr:
            for name, search in searches.items():
                for sid, nbest in zip(sample["id"].tolist(), search.generate(models, sample)):
                    hyps[name][sid] = from_pieces(tgt.string(nbest[0]["tokens"]))
    ids = sorted(hyps["greedy"])
    out: dict[str, Any] = {}
    for name in searches:
        scores = translation_scores([hyps[name][i] for i in ids], [refs[i] for i in ids])
        out |= {f"{name}_{k}": v for k, v in scores.items()}
    out |= {f"{name}_distinct": distinct_share([hyps[name][i] for i in ids]) for name in searches}
    out["samples"] = [{"reference": refs[i], "greedy": hyps["greedy"][i]} for i in ids[:3]]
    out["test_verses"] = len(ids)
    return out


def example_verse(data_dir: Path, low: int = 8, high: int = 14) -> int:
    """Index of the first test verse with ``low`` to ``high`` source words (for the attention plots)."""
    rows = real_data.read_jsonl(data_dir / "test.jsonl")
    return next((i for i, r in enumerate(rows) if low <= len(r["source"].split()) <= high), 0)


def run_fairseq_job(label: str, spec: str, seed: int, epochs: int, data_dir: Path, work: Path,
                    keep_models: bool = False) -> dict[str, Any]:
    """Train one fairseq model on the verses (in this process), decode the test books, analyse its attention."""
    from fairseq import checkpoint_utils, utils

    save = work / f"{slug(label)}_seed{seed}"
    save.mkdir(parents=True, exist_ok=True)
    train_s = demo_tasks._train_fairseq_in_process(fairseq_argv(data_dir / "data-bin", save, spec, epochs, seed),
                                                   save / "train.log")
    utils.import_user_module(__import__("argparse").Namespace(user_dir=str(USER_DIR)))
    t0 = time.time()
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(save / "checkpoint_last.pt")], arg_overrides={"data": str(data_dir / "data-bin")})
    for m in models:
        m.eval()
    decoded = decode_fairseq(models, task, data_dir)
    analysis = demo_tasks.analyse_fairseq_model(models[0], task, data_dir, 64, example_verse(data_dir))
    curve = demo_tasks.parse_fairseq_log(save / "train.log")
    trajectory = demo_tasks.alpha_trajectory(save) if "learned" in spec else []
    (save / "checkpoint_best.pt").unlink(missing_ok=True)
    if not keep_models:
        (save / "checkpoint_last.pt").unlink(missing_ok=True)
    return {
        "route": "fairseq", "mechanism": label, "spec": spec, "seed": seed, "train_seconds": train_s,
        "eval_seconds": time.time() - t0, "curve": curve, "alpha_trajectory": trajectory,
        "updates": int(curve[-1].get("train_num_updates", 0)) if curve else 0,
        "valid_loss": curve[-1].get("valid_loss", math.nan) if curve else math.nan,
        "train_wps": _fairseq_train_wps(save / "train.log"), **decoded, **analysis,
    }


def _fairseq_train_wps(log: Path) -> float:
    """fairseq's training speed (target tokens per second, ``train_wps``), averaged over the epochs."""
    speeds = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        start = line.find("{")
        if start < 0 or '"train_wps"' not in line:
            continue
        try:
            speeds.append(float(json.loads(line[start:])["train_wps"]))
        except (json.JSONDecodeError, KeyError, ValueError):
            continue
    return statistics.fmean(speeds) if speeds else math.nan


# ----------------------------------------------------------------------------- transformers translation

#: the transformers route trains as the fairseq route does: peak lr, inverse-sqrt decay after the warm-up,
#: batches of similar length of at most MAX_TOKENS padded tokens, label smoothing 0.1
HF_LR, HF_WARMUP, MAX_TOKENS, LABEL_SMOOTHING = FAIRSEQ_LR, FAIRSEQ_WARMUP, 1024, 0.1


def distinct_share(texts: list[str]) -> float:
    """The share of distinct texts among ``texts``: near 1 when each input gets its own translation, near 0
    when a model writes one sentence whatever the input."""
    return len(set(texts)) / max(len(texts), 1)


def hf_translation_argv(spec: str, seed: int, epochs: int, vocab: int, data_dir: Path, save: Path) -> list[str]:
    return [
        "--task", "seq2seq", "--train-file", str(data_dir / "train.jsonl"),
        "--valid-file", str(data_dir / "valid.jsonl"), "--test-file", str(data_dir / "test.jsonl"),
        "--source-column", "source", "--target-column", "target", "--from-config", "--arch", "marian",
        "--d-model", str(MODEL["dim"]), "--layers", str(MODEL["layers"]), "--heads", str(MODEL["heads"]),
        "--ffn-dim", str(MODEL["ffn"]), "--cross-attn", spec, "--tokenizer", "unigram", "--vocab-size", str(vocab),
        "--output-dir", str(save), "--epochs", str(epochs), "--max-tokens", str(MAX_TOKENS), "--batch-size", "256",
        "--lr", str(HF_LR), "--lr-scheduler", "inverse_sqrt", "--warmup-steps", str(HF_WARMUP),
        "--label-smoothing", str(LABEL_SMOOTHING), "--seed", str(seed), "--cpu", "--threads", "1",
        "--dropout", "0.1", "--attention-dropout", "0", "--max-new-tokens", "60",
        "--predictions-file", str(save / "predictions.jsonl"),
        *(["--attention-lr", str(HF_LR)] if "learned" in spec else []),
    ]


def run_hf_translation_job(label: str, spec: str, seed: int, epochs: int, vocab: int, data_dir: Path, work: Path,
                           keep_models: bool = False) -> dict[str, Any]:
    """A Marian-style model trained by scripts/finetune.py on the verses (greedy test scores there), loaded
    back with ``from_pretrained`` and decoded with beam 5 here; cross-attention support on the test verses."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    import hf_models

    save = work / f"{slug(label)}_seed{seed}"
    save.mkdir(parents=True, exist_ok=True)
    train_s = demo_tasks._finetune_in_process(hf_translation_argv(spec, seed, epochs, vocab, data_dir, save),
                                              save / "finetune.log")
    metrics = json.loads((save / "metrics.json").read_text(encoding="utf-8"))
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(save)
    model = AutoModelForSeq2SeqLM.from_pretrained(save).eval()
    rows = real_data.read_jsonl(data_dir / "test.jsonl")
    hyps: list[str] = []
    seen: set[str] = set()
    nonzero = total = 0.0
    example = None
    show = example_verse(data_dir)
    import plugin

    # verses of similar length decoded together: little padding, and a length cap close to each verse's own
    order = sorted(range(len(rows)), key=lambda k: len(tok(rows[k]["source"])["input_ids"]))
    rows_by_length = [rows[k] for k in order]
    hyps_by_length: list[str] = []
    show = order.index(show)
    with torch.no_grad(), plugin.record_calls() as calls:
        for i in range(0, len(rows), 32):
            chunk = rows_by_length[i: i + 32]
            batch = tok([r["source"] for r in chunk], return_tensors="pt", padding=True)
            gen = model.generate(**batch, num_beams=BEAM, early_stopping="never", do_sample=False,
                                 max_new_tokens=int(MAX_LEN_A * batch["input_ids"].shape[1] + MAX_LEN_B))
            hyps_by_length += [t.strip() for t in tok.batch_decode(gen, skip_special_tokens=True)]
            labels = tok(text_target=[r["target"] for r in chunk], return_tensors="pt", padding=True)["input_ids"]
            out = model(**batch, labels=labels.masked_fill(labels == tok.pad_token_id, -100), output_attentions=True)
            w = out.cross_attentions[-1].float()  # (B, H, T, S)
            keys = batch["attention_mask"][:, None, None, :].bool()
            queries = (labels != tok.pad_token_id)[:, None, :, None]
            allowed = keys & queries
            nonzero += float(((w > 0) & allowed).sum())
            total += float(allowed.expand_as(w).sum())
            if i <= show < i + len(chunk):
                j = show - i
                s_len, t_len = int(batch["attention_mask"][j].sum()), int(queries[j].sum())
                example = {"source": tok.convert_ids_to_tokens(batch["input_ids"][j][:s_len].tolist()),
                           "target": tok.convert_ids_to_tokens(labels[j][:t_len].tolist()),
                           "per_head": w[j, :, :t_len, :s_len].tolist()}
        seen = {f"{c.role}:{c.spec}" for c in calls}
    hyps = [""] * len(rows)
    for k, h in zip(order, hyps_by_length):
        hyps[k] = h
    beam = translation_scores(hyps, [r["target"] for r in rows])
    greedy = [p["prediction"] for p in real_data.read_jsonl(save / "predictions.jsonl") if p["split"] == "test"]
    trajectory = metrics.get("attention_parameters", [])
    if not keep_models:
        for path in save.glob("*.safetensors"):
            path.unlink()
    del hf_models
    return {
        "route": "hf", "mechanism": label, "spec": spec, "seed": seed, "train_seconds": train_s,
        "eval_seconds": time.time() - t0, "steps": int(metrics.get("steps", 0)),
        "valid_loss": float(metrics.get("valid_loss", math.nan)),
        "greedy_bleu": float(metrics["test_bleu"]), "greedy_chrf": float(metrics["test_chrf"]),
        "beam_bleu": beam["bleu"], "beam_chrf": beam["chrf"], "support_fraction": nonzero / max(total, 1.0),
        "greedy_distinct": distinct_share(greedy), "beam_distinct": distinct_share(hyps),
        "example": example, "mechanisms_seen": sorted(seen), "attention_parameters": trajectory,
        "samples": [{"reference": r["target"], "beam": h} for r, h in zip(rows[:3], hyps[:3])],
    }


# ----------------------------------------------------------------------------- sentiment (MiniLM)


def make_sentiment_data(data_dir: Path, size: dict[str, Any], csv_path: Path | None = None) -> dict[str, Any]:
    """Rotten Tomatoes snippets split by movie (real_data.load_rotten_tomatoes), as CSV files for finetune.py."""
    import csv

    data_dir.mkdir(parents=True, exist_ok=True)
    splits = real_data.load_rotten_tomatoes(csv_path)
    limits = {"train": size.get("max_train"), "validation": size.get("max_valid"), "test": size.get("max_test")}
    names = {"train": "train", "validation": "valid", "test": "test"}
    counts: dict[str, dict[str, int]] = {}
    for split, rows in splits.items():
        if limits[split]:
            rows = rows[: limits[split]]
        if not rows:
            raise ValueError(f"the {split} split of the sentiment data is empty")
        with open(data_dir / f"{names[split]}.csv", "w", encoding="utf-8", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["text", "label", "movie"])
            writer.writeheader()
            writer.writerows(rows)
        counts[split] = {lab: sum(r["label"] == lab for r in rows) for lab in real_data.SENTIMENT_LABELS}
    return {"snippets": counts, "movies": {s: len({r["movie"] for r in rows}) for s, rows in splits.items()}}


def sentiment_argv(spec: str, schedule: str | None, seed: int, size: dict[str, Any], data_dir: Path,
                   model_dir: Path, save: Path) -> list[str]:
    argv = [
        "--task", "classification", "--model-dir", str(model_dir), "--train-file", str(data_dir / "train.csv"),
        "--valid-file", str(data_dir / "valid.csv"), "--text-column", "text", "--label-column", "label",
        "--attn", spec, "--output-dir", str(save), "--max-steps", str(size["steps"]),
        "--batch-size", str(size["batch"]), "--eval-batch-size", "64", "--lr", str(size["lr"]),
        "--warmup-steps", str(size["warmup"]), "--seed", str(seed), "--cpu", "--threads", "1",
        "--max-source-length", "64", "--log-attention-every", str(max(1, size["steps"] // 10)),
    ]
    if schedule:
        argv += ["--attn-schedule", schedule]
    if "learned" in spec:
        argv += ["--attention-lr", str(size["alpha_lr"])]
    return argv


def classifier_attention(model: Any, tok: Any, rows: list[dict[str, str]], example_index: int
                         ) -> dict[str, Any]:
    """Accuracy on ``rows``, the share of nonzero attention weights per layer (allowed query-key pairs of
    real tokens), the mechanisms that ran, and one snippet's attention (every layer and head)."""
    import plugin

    label2id = model.config.label2id
    correct = 0
    nonzero: list[float] = []
    total: list[float] = []
    example = None
    with torch.no_grad(), plugin.record_calls() as calls:
        for i in range(0, len(rows), 64):
            chunk = rows[i: i + 64]
            batch = tok([r["text"] for r in chunk], return_tensors="pt", padding=True, truncation=True,
                        max_length=64)
            out = model(**batch, output_attentions=True)
            gold = torch.tensor([label2id[r["label"]] for r in chunk])
            correct += int((out.logits.argmax(-1) == gold).sum())
            m = batch["attention_mask"].bool()
            allowed = m[:, None, :, None] & m[:, None, None, :]
            if not nonzero:
                nonzero, total = [0.0] * len(out.attentions), [0.0] * len(out.attentions)
            for li, w in enumerate(out.attentions):
                nonzero[li] += float(((w > 0) & allowed).sum())
                total[li] += float(allowed.expand_as(w).sum())
            if i <= example_index < i + len(chunk):
                j = example_index - i
                n = int(m[j].sum())
                example = {"text": chunk[j]["text"], "label": chunk[j]["label"],
                           "tokens": tok.convert_ids_to_tokens(batch["input_ids"][j][:n].tolist()),
                           "layers": [w[j, :, :n, :n].tolist() for w in out.attentions]}
    return {"accuracy": correct / max(len(rows), 1), "support_per_layer": [a / max(b, 1.0) for a, b in
                                                                          zip(nonzero, total)],
            "mechanisms_seen": sorted({f"{c.role}:{c.spec}" for c in calls}), "example": example}


def example_snippet(rows: list[dict[str, str]], low: int = 10, high: int = 16) -> int:
    return next((i for i, r in enumerate(rows) if low <= len(r["text"].split()) <= high), 0)


def run_sentiment_job(label: str, spec: str, schedule: str | None, seed: int, size: dict[str, Any], data_dir: Path,
                      model_dir: Path, work: Path, keep_models: bool = False) -> dict[str, Any]:
    """Fine-tune MiniLM with one mechanism through scripts/finetune.py, load the saved model back with
    ``from_pretrained`` and measure it on the held-out movies."""
    import csv

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import hf_models  # noqa: F401  (restores the sparsified attention of saved models)

    save = work / f"{slug(label)}_seed{seed}"
    save.mkdir(parents=True, exist_ok=True)
    train_s = demo_tasks._finetune_in_process(sentiment_argv(spec, schedule, seed, size, data_dir, model_dir, save),
                                              save / "finetune.log")
    metrics = json.loads((save / "metrics.json").read_text(encoding="utf-8"))
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(save)
    model = AutoModelForSequenceClassification.from_pretrained(save).eval()
    with open(data_dir / "test.csv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    measured = classifier_attention(model, tok, rows, example_snippet(rows))
    if not keep_models:
        for path in save.glob("*.safetensors"):
            path.unlink()
    return {
        "route": "sentiment", "mechanism": label, "spec": spec, "schedule": schedule or "", "seed": seed,
        "train_seconds": train_s, "eval_seconds": time.time() - t0, "steps": int(metrics.get("steps", 0)),
        "valid_accuracy": float(metrics["accuracy"]), "test_accuracy": measured["accuracy"],
        "support_per_layer": measured["support_per_layer"],
        "support_fraction": statistics.fmean(measured["support_per_layer"]),
        "mechanisms_seen": measured["mechanisms_seen"], "example": measured["example"],
        "attention_parameters": metrics.get("attention_parameters", []),
        "train_loss": float(metrics.get("train_loss", math.nan)),
    }


def run_throughput_job(specs: list[tuple[str, str]], size: dict[str, Any], data_dir: Path, model_dir: Path
                       ) -> dict[str, Any]:
    """Training steps of MiniLM per second, per mechanism, as a ratio to torch's SDPA, side by side.

    One process, one thread; the same batches of real snippets (``size["batch"]`` each, at most 64
    tokens) for every mechanism; the mechanisms take turns (``rounds`` rounds of ``steps`` timed steps
    after 2 untimed ones), so load on the machine falls on all of them alike. Reported: the median
    seconds per step and its ratio to SDPA's."""
    import csv

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import hf_models

    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(data_dir / "train.csv", encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))[: 4 * size["batch"]]
    batches = []
    for i in range(0, len(rows), size["batch"]):
        chunk = rows[i: i + size["batch"]]
        enc = tok([r["text"] for r in chunk], return_tensors="pt", padding=True, truncation=True, max_length=64)
        enc["labels"] = torch.tensor([int(r["label"] == "fresh") for r in chunk])
        batches.append(enc)
    models = {}
    for label, spec in specs:
        torch.manual_seed(0)
        if spec == "sdpa":
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2,
                                                                       attn_implementation="sdpa")
        else:
            model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
            hf_models.sparsify(model, spec)
        model.train()
        models[label] = (model, torch.optim.AdamW(model.parameters(), lr=1e-5))

    def step(label: str, k: int) -> float:
        model, opt = models[label]
        t = time.perf_counter()
        loss = model(**batches[k % len(batches)]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        return time.perf_counter() - t

    times: dict[str, list[float]] = {label: [] for label, _ in specs}
    for label, _ in specs:
        for k in range(2):
            step(label, k)
    for _ in range(size["tp_rounds"]):
        for label, _ in specs:
            times[label] += [step(label, k) for k in range(size["tp_steps"])]
    base = statistics.median(times[specs[0][0]])
    return {"route": "throughput", "batch": size["batch"], "tokens_per_batch": [int(b["input_ids"].numel())
                                                                                 for b in batches],
            "rows": [{"mechanism": label, "spec": spec, "seconds_per_step": statistics.median(times[label]),
                      "ratio_to_sdpa": statistics.median(times[label]) / base, "samples": len(times[label])}
                     for label, spec in specs]}


# ----------------------------------------------------------------------------- plots


def plot_sentiment(out: Path, groups: list[dict[str, Any]]) -> list[Path]:
    """The attention of one test snippet (last layer, first head; first seed of each mechanism), the share of
    nonzero weights per layer, and alpha over training (learned per head, or scheduled)."""
    plt = demo_tasks._plt()
    paths = []
    n = len(groups)
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.4 * rows), squeeze=False)
    for ax, g in zip(axes.flat, groups):
        r = g["runs"][0]
        ex = r["example"]
        demo_tasks.heatmap(ax, ex["layers"][-1][0], ex["tokens"], ex["tokens"],
                 f"{g['mechanism']} (seed {r['seed']})\n"
                 f"last layer, head 1; test accuracy {100 * r['test_accuracy']:.1f}%")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("MiniLM fine-tuned on Rotten Tomatoes: self-attention over one held-out snippet "
                 "(rows attend to columns; white = exactly zero)", fontsize=9)
    fig.tight_layout()
    paths.append(out / "sentiment_attention.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for g in groups:
        layers = [statistics.fmean(r["support_per_layer"][li] for r in g["runs"])
                  for li in range(len(g["runs"][0]["support_per_layer"]))]
        ax1.plot(range(1, len(layers) + 1), [100 * x for x in layers], marker="o", label=g["mechanism"])
    ax1.set_xlabel("layer")
    ax1.set_ylabel("nonzero attention weights (% of allowed pairs)")
    ax1.set_title("attention support per layer, test snippets (mean over seeds)", fontsize=9)
    ax1.legend(fontsize=7)
    for g in groups:
        for k, r in enumerate(g["runs"]):
            traj = r.get("attention_parameters") or []
            if not traj:
                continue
            steps = [p["step"] for p in traj]
            means = [statistics.fmean(v for vals in p["values"].values() for v in vals) for p in traj]
            ax2.plot(steps, means, marker=".", alpha=0.8, label=g["mechanism"] if k == 0 else None)
    ax2.set_xlabel("optimizer step")
    ax2.set_ylabel("alpha (mean over layers and heads)")
    ax2.set_title("alpha over training (1 = softmax, 2 = sparsemax)", fontsize=9)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "sentiment_support_alpha.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def plot_translation(out: Path, groups: dict[str, list[dict[str, Any]]]) -> Path:
    """Cross-attention of one test verse, first head of the last decoder layer, per route and mechanism."""
    plt = demo_tasks._plt()
    routes = [r for r in ("fairseq", "hf") if groups.get(r)]
    cols = max(len(groups[r]) for r in routes)
    fig, axes = plt.subplots(len(routes), cols, figsize=(4.4 * cols, 4.6 * len(routes)), squeeze=False)
    for ri, route in enumerate(routes):
        for ci in range(cols):
            ax = axes[ri][ci]
            if ci >= len(groups[route]):
                ax.axis("off")
                continue
            g = groups[route][ci]
            r = g["runs"][0]
            ex = r["example"]
            if ex is None:
                ax.axis("off")
                continue
            demo_tasks.heatmap(ax, ex["per_head"][0], ex["source"], ex["target"],
                     f"{route}: {g['mechanism']} (seed {r['seed']})\nbeam chrF {r['beam_chrf']:.1f}, "
                     f"support {100 * r['support_fraction']:.0f}%")
    fig.suptitle("Cross-attention over a held-out verse (first head, last decoder layer; white = exactly zero)",
                 fontsize=9)
    fig.tight_layout()
    path = out / "translation_attention.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
