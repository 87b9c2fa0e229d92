"""The 2-D task of the main job: cluttered canvases and the localization metrics."""

import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import demo_canvas as dc  # noqa: E402


def _one_hot_cells(cells, grid=dc.GRID):
    w = torch.zeros(1, grid, grid, dtype=torch.float64)
    for r, c in cells:
        w[0, r, c] = 1.0
    return w / w.sum()


def test_canvases_hold_the_digit_inside_its_box():
    splits = dc.load_digit_splits(seed=0, n_test=50)
    canvases, labels, boxes = dc.make_canvases(*splits["test"], 5, torch.Generator().manual_seed(0))
    assert canvases.shape == (5, dc.CANVAS, dc.CANVAS) and labels.shape == (5,) and boxes.shape == (5, 2)
    assert int(boxes.min()) >= 0 and int(boxes.max()) <= dc.CANVAS - dc.DIGIT
    for i in range(5):
        top, left = boxes[i].tolist()
        region = canvases[i, top : top + dc.DIGIT, left : left + dc.DIGIT]
        # the digit (values up to 1) is pasted there, over faint noise (< 0.05)
        assert float(region.max()) > 0.5


def test_attention_entirely_inside_the_box_has_mass_one():
    boxes = torch.tensor([[4, 6]])  # rows 4-11, columns 6-13: cells 2-5 x 3-6 exactly
    w = _one_hot_cells([(r, c) for r in range(2, 6) for c in range(3, 7)])
    assert float(dc.mass_in_box(w, boxes)) == pytest.approx(1.0)
    assert float(dc.iou_cells(w, boxes)) == pytest.approx(1.0)  # the nonzero cells are the box


def test_mass_and_iou_for_cells_partly_inside_the_box():
    boxes = torch.tensor([[3, 2]])  # rows 3-10 (cell rows 1 and 5 half inside), columns 2-9 (cells 1-4)
    frac = dc.box_cell_fractions(boxes)[0]
    assert float(frac[1, 1]) == 0.5 and float(frac[2, 1]) == 1.0 and float(frac[5, 2]) == 0.5
    assert float(frac[0, 1]) == 0.0 and float(frac.sum()) == pytest.approx(64 / 4)  # box area in cells
    # equal weight on a half-inside cell, a full cell and an outside cell
    w = _one_hot_cells([(1, 1), (2, 1), (10, 10)])
    assert float(dc.mass_in_box(w, boxes)) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    # IoU in pixels: intersection 2 + 4 = 6, union 3 cells * 4 + 64 - 6 = 70
    assert float(dc.iou_cells(w, boxes)) == pytest.approx(6 / 70)


def test_ellipse_iou_against_its_area():
    boxes = torch.tensor([[8, 8]])  # the box spans [0.25, 0.5) x [0.25, 0.5) of the unit square
    mu = torch.tensor([[0.375, 0.375]])
    cov = torch.eye(2)[None] * 0.05**2
    iou = float(dc.iou_ellipse(mu, cov, 1.0, boxes, raster=512))  # a disc of radius 0.05, inside the box
    assert iou == pytest.approx(math.pi * 0.05**2 / 0.25**2, rel=0.02)
    far = float(dc.iou_ellipse(torch.tensor([[0.9, 0.9]]), cov, 1.0, boxes))
    assert far == 0.0
    # a disc holding the box: IoU = box area / disc area inside the canvas
    big = float(dc.iou_ellipse(mu, torch.eye(2)[None] * 0.2**2, 1.0, boxes, raster=512))
    assert big == pytest.approx(0.25**2 / (math.pi * 0.2**2), rel=0.02)


def test_localization_of_each_mechanism_kind():
    boxes = torch.tensor([[8, 8]])
    inside = {"weights": _one_hot_cells([(r, c) for r in range(4, 8) for c in range(4, 8)]).float()}
    assert dc.localization("discrete sparsemax", inside, boxes)["mass_in_box"] == pytest.approx(1.0)
    cont = {"weights": inside["weights"], "mu": torch.tensor([[0.375, 0.375]]),
            "sigma_sq": torch.eye(2)[None] * 0.01}
    soft = dc.localization("continuous softmax", cont, boxes)
    sparse = dc.localization("continuous sparsemax", cont, boxes)
    assert soft["region"] == "2-sigma ellipse" and sparse["region"] == "support ellipse"
    assert 0 < soft["iou"] <= 1 and 0 < sparse["iou"] <= 1


def test_classifier_outputs_and_bad_mechanism():
    x = torch.rand(2, dc.CANVAS, dc.CANVAS)
    for label in dc.CANVAS_MECHANISMS:
        logits, extra = dc.CanvasClassifier(label)(x)
        assert logits.shape == (2, 10)
        assert extra["weights"].shape == (2, dc.GRID, dc.GRID)
        assert torch.allclose(extra["weights"].sum((-1, -2)), torch.ones(2), atol=1e-5)
    with pytest.raises(ValueError, match="mechanism"):
        dc.CanvasClassifier("softmax")


def test_clutter_grows_from_none_to_every_fragment_over_the_ramp():
    steps = 100
    counts = [dc.clutter_at(s, steps) for s in range(1, steps + 1)]
    assert counts[0] == 0 and counts[-1] == dc.FRAGMENTS
    assert counts == sorted(counts)
    assert counts.index(dc.FRAGMENTS) <= int(dc.CLUTTER_RAMP * steps) + 1  # full clutter after the ramp
    splits = dc.load_digit_splits(seed=0, n_test=50)
    canvases, _, boxes = dc.make_canvases(*splits["test"], 4, torch.Generator().manual_seed(1), fragments=0)
    for i in range(4):  # without clutter, only faint noise lies outside the digit's box
        top, left = boxes[i].tolist()
        outside = canvases[i].clone()
        outside[top : top + dc.DIGIT, left : left + dc.DIGIT] = 0
        assert float(outside.max()) < 0.05


def test_canvas_summary_names_the_seeds_that_did_not_learn():
    sys.path.insert(0, str(ROOT / "scripts"))
    import demo_tasks

    rows = [{"mechanism": m, "seed": s, "accuracy": a, "mass_in_box": mb, "iou": 0.1}
            for m, s, a, mb in (("discrete softmax", 1, 0.9, 0.95), ("discrete softmax", 2, 0.88, 0.93),
                                ("continuous softmax", 1, 0.91, 0.9), ("continuous softmax", 2, 0.08, 0.05))]
    groups = demo_tasks.group_by_mechanism(rows, ["accuracy", "mass_in_box", "iou"])
    text = demo_tasks.canvas_summary(groups)
    assert "did not learn (test accuracy below 30%; chance is 10%): continuous softmax seed 2 (8%)." in text
    assert "accuracy -39.5 points (within the spread)" in text
    rows[3]["accuracy"] = 0.89
    assert "did not learn (test accuracy below 30%; chance is 10%): none." in demo_tasks.canvas_summary(
        demo_tasks.group_by_mechanism(rows, ["accuracy", "mass_in_box", "iou"]))
