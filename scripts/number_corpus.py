"""An offline parallel corpus: numbers written as English words -> German (or French) words.

German number words are written as one word ("dreiundzwanzig"); they are split into
their morphemes ("drei und zwanzig") so that a word-level model sees the reordering
against English ("twenty three"). Train, valid and test use disjoint numbers, so the
test set measures generalization to unseen numbers.

    python scripts/number_corpus.py OUT_DIR --train 4000 --valid 300 --test 300
writes OUT_DIR/{train,valid,test}.{en,de}.
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

from num2words import num2words

# longest match first; "sech"/"sieb" appear in sechzehn/siebzehn
_GERMAN_MORPHEMES = sorted(
    [
        "eins", "ein", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun", "zehn", "elf",
        "zwölf", "sech", "sieb", "zwanzig", "dreißig", "vierzig", "fünfzig", "sechzig", "siebzig",
        "achtzig", "neunzig", "hundert", "tausend", "und",
    ],
    key=len,
    reverse=True,
)


def split_german(word: str) -> list[str]:
    """Split a German number word into morphemes by greedy longest match."""
    out, i = [], 0
    while i < len(word):
        for m in _GERMAN_MORPHEMES:
            if word.startswith(m, i):
                out.append(m)
                i += len(m)
                break
        else:
            raise ValueError(f"cannot segment German number word {word!r} at position {i}")
    return out


def words(number: int, lang: str) -> str:
    """Tokenized number words: lowercase, hyphens and commas split off as separate tokens removed."""
    text = num2words(number, lang=lang).lower()
    tokens = re.split(r"[\s,\-]+", text)
    tokens = [t for t in tokens if t]
    if lang == "de":
        tokens = [m for t in tokens for m in split_german(t)]
    return " ".join(tokens)


def make_corpus(
    out_dir: str | Path,
    n_train: int = 4000,
    n_valid: int = 300,
    n_test: int = 300,
    target_lang: str = "de",
    max_number: int = 9999,
    seed: int = 1,
) -> dict[str, int]:
    """Write ``{train,valid,test}.{en,<target_lang>}`` with disjoint numbers; return the split sizes."""
    total = n_train + n_valid + n_test
    if total > max_number:
        raise ValueError(f"make_corpus: {total} sentences need max_number >= {total}, got {max_number}")
    if target_lang not in ("de", "fr"):
        raise ValueError(f"make_corpus: target_lang must be 'de' or 'fr', got {target_lang!r}")
    rng = random.Random(seed)
    numbers = rng.sample(range(1, max_number + 1), total)
    splits = {
        "train": numbers[:n_train],
        "valid": numbers[n_train : n_train + n_valid],
        "test": numbers[n_train + n_valid :],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, nums in splits.items():
        (out / f"{split}.en").write_text("".join(words(n, "en") + "\n" for n in nums), encoding="utf-8")
        (out / f"{split}.{target_lang}").write_text(
            "".join(words(n, target_lang) + "\n" for n in nums), encoding="utf-8"
        )
        (out / f"{split}.num").write_text("".join(f"{n}\n" for n in nums), encoding="utf-8")
    return {k: len(v) for k, v in splits.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--valid", type=int, default=300)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--target-lang", default="de", choices=["de", "fr"])
    ap.add_argument("--max-number", type=int, default=9999)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    print(make_corpus(a.out_dir, a.train, a.valid, a.test, a.target_lang, a.max_number, a.seed))


if __name__ == "__main__":
    main()
