"""tools/eval_from_png.py (run as a subprocess) and rooftop_m2f.evaluation.png_eval."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rooftop_m2f.data.capetown import CLASS_NAMES, PALETTE, DatasetError
from rooftop_m2f.evaluation import RooftopSemSegEvaluator
from rooftop_m2f.evaluation.png_eval import PngEvalError, match_files, read_prediction

REPO = Path(__file__).resolve().parents[1]


def run_eval(*args):
    """The tool, the way users run it (never imported: detectron2 ships a ``tools`` package)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "tools/eval_from_png.py", "--no-progress", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def strict_json(path):
    return json.loads(Path(path).read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))


def test_hand_built_case(tmp_path):
    gt_dir, pred_dir, out = tmp_path / "gt", tmp_path / "pred", tmp_path / "out"
    # a.png gt -> pred: 0->0, 0->0, 1->1, 1->0, 255->1 (ignored), 1->255 (invalid prediction)
    save(gt_dir / "a.png", [[0, 0, 1], [1, 255, 1]])
    save(pred_dir / "a.png", [[0, 0, 1], [0, 1, 255]])
    # b.png: an image without foreground, all right: 0->0 x4
    save(gt_dir / "b.png", np.zeros((2, 2)))
    save(pred_dir / "b.png", np.zeros((2, 2)))
    result = run_eval("--pred-dir", pred_dir, "--gt-dir", gt_dir, "--output-dir", out)
    assert result.returncode == 0, result.stderr
    m = strict_json(out / "metrics.json")

    # background: TP 6, FP 1 (the 1->0 pixel), FN 0; solar_panel: TP 1, FP 0, FN 2 (1->0, 1->255)
    # solar_water_heater, solar_pool_heater: absent everywhere -> undefined (null), not averaged
    iou_bg, iou_sp = 6 / 7, 1 / 3
    pc = m["per_class"]
    assert pc["background"]["IoU"] == pytest.approx(iou_bg)
    assert pc["background"]["precision"] == pytest.approx(6 / 7)
    assert pc["background"]["recall"] == pytest.approx(1.0)
    assert pc["solar_panel"]["IoU"] == pytest.approx(iou_sp)
    assert pc["solar_panel"]["precision"] == pytest.approx(1.0)
    assert pc["solar_panel"]["recall"] == pytest.approx(1 / 3)
    assert pc["solar_panel"]["F1"] == pytest.approx(2 * 1 / (2 * 1 + 0 + 2))
    for cls in ("solar_water_heater", "solar_pool_heater"):
        assert all(pc[cls][k] is None for k in ("IoU", "precision", "recall", "F1"))
    assert m["undefined_classes"] == ["solar_water_heater", "solar_pool_heater"]
    assert m["mIoU"] == pytest.approx((iou_bg + iou_sp) / 2)
    assert m["macro_fg_mIoU"] == pytest.approx(iou_sp)
    assert m["pixel_accuracy"] == pytest.approx(7 / 9)
    assert m["fwIoU"] == pytest.approx(6 / 9 * iou_bg + 3 / 9 * iou_sp)
    assert m["invalid_prediction_pixels"] == 1
    expected_cm = np.zeros((4, 5), dtype=int)
    expected_cm[0, 0], expected_cm[1, 0], expected_cm[1, 1], expected_cm[1, 4] = 6, 1, 1, 1
    np.testing.assert_array_equal(m["confusion_matrix"], expected_cm)
    assert m["confusion_matrix_columns"][-1] == "invalid_prediction"

    rows = list(csv.DictReader((out / "per_class.csv").open()))
    assert [r["class"] for r in rows] == list(CLASS_NAMES)
    assert float(rows[1]["IoU"]) == pytest.approx(iou_sp)
    assert rows[2]["IoU"] == ""  # undefined
    with Image.open(out / "confusion_matrix.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    assert sorted(os.listdir(out)) == ["confusion_matrix.png", "metrics.json", "per_class.csv"]
    assert "solar_panel" in result.stdout and "macro_fg_mIoU" in result.stdout


def test_mismatched_sets_fail_naming_every_file(tmp_path):
    gt_dir, pred_dir, out = tmp_path / "gt", tmp_path / "pred", tmp_path / "out"
    for name in ("a", "b", "c"):
        save(gt_dir / f"{name}.png", np.zeros((4, 4)))
    save(pred_dir / "a.png", np.zeros((4, 4)))       # fine
    save(pred_dir / "b.png", np.zeros((4, 5)))       # size mismatch
    save(pred_dir / "zzz_extra.png", np.zeros((4, 4)))  # no ground truth; c.png has no prediction
    result = run_eval("--pred-dir", pred_dir, "--gt-dir", gt_dir, "--output-dir", out)
    assert result.returncode != 0
    err = result.stderr
    assert "missing prediction" in err and str(gt_dir / "c.png") in err
    assert "extra prediction" in err and str(pred_dir / "zzz_extra.png") in err
    assert "size mismatch" in err and str(pred_dir / "b.png") in err
    assert "nothing was evaluated" in err
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("problem", ["missing", "extra", "size"])
def test_match_files_each_problem(tmp_path, problem):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    for name in ("a", "b"):
        save(gt_dir / f"{name}.png", np.zeros((3, 3)))
        save(pred_dir / f"{name}.png", np.zeros((3, 3)))
    assert [p.name for p, _ in match_files(pred_dir, gt_dir)] == ["a.png", "b.png"]
    if problem == "missing":
        (pred_dir / "b.png").unlink()
    elif problem == "extra":
        save(pred_dir / "c.png", np.zeros((3, 3)))
    else:
        save(pred_dir / "b.png", np.zeros((3, 2)))
    with pytest.raises(PngEvalError) as info:
        match_files(pred_dir, gt_dir)
    assert len(info.value.problems) == 1
    assert ("c.png" if problem == "extra" else "b.png") in info.value.problems[0]


def test_match_files_suffix_and_bad_dirs(tmp_path):
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    save(gt_dir / "roof1.png", np.zeros((3, 3)))
    for suffix in ("_index", "_color", "_overlay"):  # what tools/predict.py writes
        save(pred_dir / f"roof1{suffix}.png", np.zeros((3, 3)))
    pairs = match_files(pred_dir, gt_dir, pred_suffix="_index")
    assert [(p.name, g.name) for p, g in pairs] == [("roof1_index.png", "roof1.png")]
    with pytest.raises(PngEvalError, match="--pred-suffix _index"):
        match_files(pred_dir, gt_dir)
    with pytest.raises(PngEvalError, match="does not exist"):
        match_files(tmp_path / "nope", gt_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PngEvalError, match="no ground-truth"):
        match_files(pred_dir, tmp_path / "empty")


def test_read_prediction_formats(tmp_path):
    idx = np.array([[0, 1], [2, 3]])
    save(tmp_path / "idx.png", idx)
    np.testing.assert_array_equal(read_prediction(tmp_path / "idx.png"), idx)
    rgb = np.array(PALETTE, dtype=np.uint8)[idx]
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(read_prediction(tmp_path / "rgb.png"), idx)
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="junk.png"):
        read_prediction(tmp_path / "junk.png")


def test_agrees_with_training_evaluator(tmp_path):
    rng = np.random.default_rng(3)
    gt_dir, pred_dir, out = tmp_path / "gt", tmp_path / "pred", tmp_path / "out"
    evaluator = RooftopSemSegEvaluator("capetown_sem_seg_val", distributed=False)
    evaluator.reset()
    for i in range(4):
        gt = rng.integers(0, 4, (30, 20))
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = np.where(rng.random(gt.shape) < 0.6, gt % 255, rng.integers(0, 4, gt.shape))
        save(gt_dir / f"tile{i}.png", gt)
        save(pred_dir / f"tile{i}_index.png", pred)
        scores = torch.nn.functional.one_hot(torch.as_tensor(pred), 4).permute(2, 0, 1).float()
        evaluator.process([{"file_name": f"tile{i}.jpg", "sem_seg_file_name": str(gt_dir / f"tile{i}.png")}],
                          [{"sem_seg": scores}])
    ours = evaluator.evaluate()["sem_seg"]
    result = run_eval("--pred-dir", pred_dir, "--gt-dir", gt_dir, "--output-dir", out,
                      "--pred-suffix", "_index")
    assert result.returncode == 0, result.stderr
    m = strict_json(out / "metrics.json")
    assert m["mIoU"] == pytest.approx(ours["mIoU"], abs=1e-12)
    assert m["macro_fg_mIoU"] == pytest.approx(ours["macro_fg_mIoU"], abs=1e-12)
    assert m["pixel_accuracy"] == pytest.approx(ours["pAcc"], abs=1e-12)
    assert m["fwIoU"] == pytest.approx(ours["fwIoU"], abs=1e-12)
    for name in CLASS_NAMES:
        for key in ("IoU", "precision", "recall", "F1"):
            assert m["per_class"][name][key] == pytest.approx(ours[f"{key}-{name}"], abs=1e-12)
    np.testing.assert_array_equal(m["confusion_matrix"], evaluator.last_metrics.confusion_matrix)
