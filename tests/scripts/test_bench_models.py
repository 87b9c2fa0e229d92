"""scripts/bench_models.py at its --quick size: every section prints its table of ratios (no timing is checked)."""

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_models  # noqa: E402


def _table(text: str, header: str) -> list[list[str]]:
    """The rows of the Markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


RATIO = re.compile(r"^\d+\.\d\d$")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert bench_models.main(["--quick", "--sections", *bench_models.SECTIONS, "--json", str(out)]) == 0
    return buf.getvalue(), json.loads(out.read_text())


def test_every_section_prints_one_row_per_mechanism_with_a_ratio(quick_run):
    text, results = quick_run
    assert [s["section"] for s in results["sections"]] == list(bench_models.SECTIONS)
    train = _table(text, "| mechanism | s per step")
    assert [r[0] for r in train] == bench_models.TRAIN_SPECS
    assert train[0][2] == "1.00" and all(RATIO.match(r[2]) for r in train)
    generate = _table(text, "| model | mechanism | tokens/s")
    assert len(generate) == 2 * len(bench_models.GENERATE_SPECS)
    assert [r[3] for r in generate if r[1] == "sdpa"] == ["1.00", "1.00"] and all(RATIO.match(r[3]) for r in generate)
    fairseq = _table(text, "| beam | mechanism")
    assert sorted({r[0] for r in fairseq}) == ["1", "5"] and len(fairseq) == 2 * len(bench_models.FAIRSEQ_SPECS)
    assert all(RATIO.match(r[3]) for r in fairseq)


def test_the_long_cache_table_has_every_length_and_mechanism_with_peak_memory(quick_run):
    text, _ = quick_run
    specs, notes = bench_models.long_specs()
    rows = _table(text, "| L | mechanism")
    assert [(int(r[0]), r[1]) for r in rows] == [(L, s) for L in (256, 512) for s in specs]
    assert all(RATIO.match(r[3]) and r[4].isdigit() for r in rows)
    for note in notes:  # a scalable variant the registry lacks is named, not silently left out
        assert f"note: {note}" in text


def test_the_machine_and_the_load_are_printed(quick_run):
    text, results = quick_run
    assert "| torch |" in text and "| transformers |" in text and "| clock | process CPU time |" in text
    assert "load average (1, 5, 15 min) at the start" in text and results["load_end"]
