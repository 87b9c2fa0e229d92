"""scripts/long_context.py: the tiny size end to end, the exact-match shortcut, publishing, spec handling."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import long_context as lc
import long_context_report as report


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("long")
    torch.set_num_threads(1)
    assert lc.main(["--size", "tiny", "--out", str(out), "--jobs", "1"]) == 0
    return out


def test_tiny_run_writes_results_report_and_plots(tiny_run):
    run = json.loads((tiny_run / "results.json").read_text())
    cfg = lc.SIZES["tiny"]
    specs = {spec for _, spec in lc.MECHANISMS if lc.available(spec) is None}
    assert {"softmax", "entmax:alpha=1.5"} <= specs
    assert len(run["results"]) == len(cfg["tasks"]) * len(cfg["positions"]) * len(specs) * cfg["seeds"]
    for r in run["results"]:
        assert set(r["results"]) == {str(n) for n in cfg["lengths"]}
        for v in r["results"].values():
            assert 0 <= v["exact"] <= v["token_acc"] <= 1 or v["exact"] <= 1
            assert v["support"] is None or 1 <= v["support"] <= v["keys"]
            if "greedy" in v:
                assert v["greedy"]["agree"] == 1.0
    text = (tiny_run / "report.md").read_text()
    assert "## What the numbers say" in text and "exact match" in text
    for name in report.PLOTS:
        assert (tiny_run / f"long_context_{name}.png").stat().st_size > 1000


def test_missing_scalable_specs_are_a_printed_note(tiny_run):
    run = json.loads((tiny_run / "results.json").read_text())
    missing = [spec for _, spec in lc.MECHANISMS if lc.available(spec) is not None]
    assert len(run["notes"]) == len(missing)
    assert all(spec.startswith("scalable_") for spec in missing)


def test_an_unknown_required_spec_raises(monkeypatch):
    monkeypatch.setattr(lc, "MECHANISMS", [("bogus", "bogusmax")])
    with pytest.raises(ValueError, match="bogusmax"):
        lc.plan("tiny", None, None)


def test_publish_fills_the_marked_section(tiny_run, tmp_path):
    page = tmp_path / "long_context.md"
    page.write_text(f"# Title\n\nprose\n\n{report.BEGIN}\nold\n{report.END}\n\nmore prose\n")
    report.publish(tiny_run, tmp_path)
    text = page.read_text()
    assert "old" not in text and "prose" in text and "more prose" in text
    assert "exact match" in text and (tmp_path / "long_context_accuracy.png").exists()
    page.write_text("no markers")
    with pytest.raises(ValueError, match="long-context:begin"):
        report.publish(tiny_run, tmp_path)


def test_teacher_forced_exact_match_is_greedy_exact_match():
    """The benchmark scores exact match in one teacher-forced pass; greedy decoding must agree, right or wrong."""
    torch.manual_seed(0)
    data = lc.Data("mqmtar", dict(abc_size=8, vocab_size=8, k_len=1, v_len=1, num_kv=0.8, num_q=4), seed=0)
    model = lc.build_model("entmax:alpha=1.5", "alibi", data.vocab_in, data.vocab, 16, 2, 1).eval()
    rng = np.random.default_rng(0)
    src, tgt = lc.tasks.sample("mqmtar", rng, 40, 0, table=data.table, **data.params)
    decoded = lc.greedy_decode(model, src, data.sep, len(tgt))
    # score the model against its own greedy output (right by construction) and against a corrupted copy
    with torch.no_grad():
        forced = model(torch.tensor([src + [data.sep] + decoded[:-1]])).argmax(-1)[0, len(src):].tolist()
    assert forced == decoded
    wrong = list(decoded)
    wrong[1] = (wrong[1] + 1) % data.vocab
    with torch.no_grad():
        forced = model(torch.tensor([src + [data.sep] + wrong[:-1]])).argmax(-1)[0, len(src):].tolist()
    assert forced != wrong


def test_eval_budget_shrinks_with_length():
    assert lc.eval_count(256, 64) == 64 and lc.eval_count(4096, 64) == 8
    assert lc.eval_batch(4096) == 1 and lc.eval_batch(64) == 32


@pytest.mark.parametrize("positions", ["nope", "alibi"])
def test_answer_rows_only_equal_the_full_forward(positions):
    torch.manual_seed(0)
    model = lc.build_model("entmax:alpha=1.5", positions, 12, 10, 16, 2, 2).eval()
    tokens = torch.randint(0, 12, (3, 20))
    with torch.no_grad():
        full = model(tokens)
        assert torch.allclose(model(tokens, 13), full[:, 13:], atol=1e-5)


def test_phases_merge_with_append(tmp_path):
    torch.set_num_threads(1)
    base = ["--size", "tiny", "--out", str(tmp_path), "--jobs", "1", "--only", "flip_flop"]
    assert lc.main([*base, "--mechanisms", "softmax"]) == 0
    assert lc.main([*base, "--mechanisms", "entmax:alpha=1.5", "--positions", "alibi", "--append"]) == 0
    run = json.loads((tmp_path / "results.json").read_text())
    assert sorted((r["spec"], r["positions"]) for r in run["results"]) == [
        ("entmax:alpha=1.5", "alibi"), ("softmax", "alibi"), ("softmax", "nope")]
    assert len(run["phases"]) == 2 and run["wall_s"] == pytest.approx(sum(p["wall_s"] for p in run["phases"]))
    with pytest.raises(ValueError, match="--mechanisms: sparsemax not among"):
        lc.main([*base, "--mechanisms", "sparsemax"])
