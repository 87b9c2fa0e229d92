"""Print the markdown table of registered attention variants (the README's table comes from here).

    python scripts/variants_table.py            # print the table
    python scripts/variants_table.py --check README.md   # exit 1 if the README's table differs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import plugin

BEGIN = "<!-- variants-table:begin -->"
END = "<!-- variants-table:end -->"


def table() -> str:
    rows = ["| spec name | kind | formula | parameters (default; valid) | what it gives |", "|---|---|---|---|---|"]
    ordered = sorted(plugin.variants().items(), key=lambda item: item[1].kind != "discrete")  # discrete first
    for name, v in ordered:
        params = "; ".join(f"`{p.name}`={p.default} ({p.valid_range()})" for p in v.params) or "none"
        formula = v.formula.replace("|", "\\|")
        rows.append(f"| `{name}` | {v.kind} | `{formula}` | {params} | {v.summary} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", metavar="FILE", help="compare with the table between the markers in FILE")
    ap.add_argument("--write", metavar="FILE", help="replace the table between the markers in FILE")
    a = ap.parse_args()
    t = table()
    for path in filter(None, [a.check, a.write]):
        text = Path(path).read_text(encoding="utf-8")
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        if a.check:
            if text[start:end].strip() != t:
                print(f"{path}: the variants table is out of date; run scripts/variants_table.py --write {path}")
                return 1
        else:
            Path(path).write_text(text[:start] + "\n" + t + "\n" + text[end:], encoding="utf-8")
    if not (a.check or a.write):
        print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
