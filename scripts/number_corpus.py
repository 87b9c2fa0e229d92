"""An offline parallel corpus: English number expressions -> German, written out as words.

Four forms, all written by num2words (no download):

- cardinals up to 999 999 ("four hundred and fifty six thousand ..."),
- ordinals up to 9 999 ("twenty third" -> "drei und zwanzig ste"),
- years 1000-2099 ("nineteen eighty four" -> "neun zehn hundert vier und achtzig"),
- euro amounts ("twelve euro fifty cents" -> "zwölf euro und fünfzig cent").

German number words are single words ("dreiundzwanzigste"); they are split into morphemes
("drei und zwanzig ste") so that a word-level model sees the reordering against English
("twenty third"): units before tens ("und" inversion), years read in hundreds, ordinal
suffixes. Magnitudes are drawn log-uniformly, so long sources are common.

Split: every item is a (form, number) pair; train, valid and test hold disjoint pairs drawn
with the seed, so each test item is an expression the model never saw in training.

    python scripts/number_corpus.py OUT_DIR --train 4000 --valid 300 --test 300
writes OUT_DIR/{train,valid,test}.{en,de,num} (``num``: form and value of each line).
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

from num2words import num2words

FORMS = ("cardinal", "ordinal", "year", "currency")
#: share of each form in every split
FORM_WEIGHTS = {"cardinal": 0.4, "ordinal": 0.2, "year": 0.2, "currency": 0.2}
MAX_CARDINAL, MAX_ORDINAL, MAX_EUROS = 999_999_999, 999_999, 999_999
FORM_CAPACITY = {"year": 2099 - 1000 + 1}  # distinct items of the forms that can run out

# longest match first; "sech"/"sieb" appear in sechzehn/siebzehn; "te"/"ste"/"e" are ordinal suffixes
_GERMAN_MORPHEMES = sorted(
    [
        "eins", "eine", "ein", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun", "zehn", "elf",
        "zwölf", "sech", "sieb", "zwanzig", "dreißig", "vierzig", "fünfzig", "sechzig", "siebzig",
        "achtzig", "neunzig", "hundert", "tausend", "million", "millionen", "und", "null",
        "erste", "dritte", "ste", "te", "e", "euro", "cent",
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


def _tokens(text: str, lang: str) -> str:
    tokens = [t for t in re.split(r"[\s,\-]+", text.lower()) if t]
    if lang == "de":
        tokens = [m for t in tokens for m in split_german(t)]
    return " ".join(tokens)


def render(form: str, value: int, lang: str) -> str:
    """The tokenized words of one item; ``value`` is in cents for ``currency``."""
    if form == "cardinal":
        text = num2words(value, lang=lang)
    elif form == "ordinal":
        text = num2words(value, lang=lang, to="ordinal")
    elif form == "year":
        text = num2words(value, lang=lang, to="year")
    elif form == "currency":
        text = num2words(value / 100, lang=lang, to="currency", currency="EUR")
    else:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    return _tokens(text, lang)


def words(number: int, lang: str) -> str:
    """Tokenized cardinal number words."""
    return render("cardinal", number, lang)


def _log_uniform(rng: random.Random, high: int) -> int:
    """1..high with the number of digits uniform, then uniform within that many digits."""
    digits = rng.randint(1, len(str(high)))
    return rng.randint(10 ** (digits - 1), min(high, 10**digits - 1))


def _draw(rng: random.Random, form: str) -> int:
    if form == "cardinal":
        return _log_uniform(rng, MAX_CARDINAL)
    if form == "ordinal":
        return _log_uniform(rng, MAX_ORDINAL)
    if form == "year":
        return rng.randint(1000, 2099)
    return _log_uniform(rng, MAX_EUROS) * 100 + rng.randint(1, 99)  # euro and cents, in cents


def form_counts(total: int) -> dict[str, int]:
    """Items per form for ``total`` items: :data:`FORM_WEIGHTS` proportions, except that a form with
    fewer distinct items (years: 1100) gives all it has and the others share the rest in their
    proportions."""
    counts = {f: int(round(total * w)) for f, w in FORM_WEIGHTS.items()}
    counts["cardinal"] += total - sum(counts.values())
    full = {f: n for f, n in FORM_CAPACITY.items() if counts[f] > n}
    if full:
        rest = {f: w for f, w in FORM_WEIGHTS.items() if f not in full}
        left = total - sum(full.values())
        counts = {**{f: int(round(left * w / sum(rest.values()))) for f, w in rest.items()}, **full}
        counts["cardinal"] += total - sum(counts.values())
    return counts


def sample_items(total: int, seed: int) -> list[tuple[str, int]]:
    """``total`` distinct (form, value) pairs in random order, forms counted by :func:`form_counts`."""
    rng = random.Random(seed)
    counts = form_counts(total)
    items: list[tuple[str, int]] = []
    for form in FORM_WEIGHTS:
        n = counts[form]
        seen: set[int] = set()
        while len(seen) < n:
            seen.add(_draw(rng, form))
        items += [(form, v) for v in sorted(seen)]
    rng.shuffle(items)
    return items


def make_corpus(
    out_dir: str | Path,
    n_train: int = 4000,
    n_valid: int = 300,
    n_test: int = 300,
    target_lang: str = "de",
    seed: int = 1,
) -> dict[str, int]:
    """Write ``{train,valid,test}.{en,<target_lang>,num}`` with disjoint items; return the split sizes."""
    if target_lang != "de":
        raise ValueError(f"make_corpus: target_lang must be 'de', got {target_lang!r}")
    for name, n in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"make_corpus: {name} must be a positive integer, got {n!r}")
    items = sample_items(n_train + n_valid + n_test, seed)
    splits = {
        "train": items[:n_train],
        "valid": items[n_train : n_train + n_valid],
        "test": items[n_train + n_valid :],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, chosen in splits.items():
        (out / f"{split}.en").write_text("".join(render(f, v, "en") + "\n" for f, v in chosen), encoding="utf-8")
        (out / f"{split}.{target_lang}").write_text(
            "".join(render(f, v, target_lang) + "\n" for f, v in chosen), encoding="utf-8"
        )
        (out / f"{split}.num").write_text("".join(f"{f} {v}\n" for f, v in chosen), encoding="utf-8")
    return {k: len(v) for k, v in splits.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--valid", type=int, default=300)
    ap.add_argument("--test", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    print(make_corpus(a.out_dir, a.train, a.valid, a.test, seed=a.seed))


if __name__ == "__main__":
    main()
