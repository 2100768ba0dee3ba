"""rooftop_m2f.evaluation.metrics: hand-computed cases, edge cases and detectron2 compatibility."""
import json
import logging
import math

import numpy as np
import pytest

from rooftop_m2f.evaluation.metrics import (
    ConfusionMatrix,
    compute_metrics,
    confusion_counts,
    detectron2_scalars,
)

NAMES = ["background", "solar_panel", "solar_water_heater", "solar_pool_heater"]
FG = [1, 2, 3]


def hand_case():
    """Two rows of 4 pixels. Pixel by pixel (gt -> pred):
    row 0: 0->0 (TP0), 0->1 (FN0, FP1), 1->1 (TP1), 1->1 (TP1)
    row 1: 2->2 (TP2), 2->0 (FN2, FP0), 3->255 (FN3, invalid), 255->3 (ignored)
    """
    gt = np.array([[0, 0, 1, 1], [2, 2, 3, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1], [2, 0, 255, 3]], dtype=np.uint8)
    tp = {0: 1, 1: 2, 2: 1, 3: 0}
    fp = {0: 1, 1: 1, 2: 0, 3: 0}
    fn = {0: 1, 1: 0, 2: 1, 3: 1}
    return gt, pred, tp, fp, fn


def test_hand_computed_confusion_matrix_and_metrics():
    gt, pred, tp, fp, fn = hand_case()
    conf = ConfusionMatrix(4)
    conf.update(gt, pred)
    expected = np.zeros((4, 5), dtype=np.int64)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 1] = 2
    expected[2, 2] = 1
    expected[2, 0] = 1
    expected[3, 4] = 1  # gt 3 predicted 255: the invalid-prediction column
    np.testing.assert_array_equal(conf.matrix, expected)

    m = compute_metrics(conf, NAMES, FG)
    for c in range(4):
        union = tp[c] + fp[c] + fn[c]
        assert m.iou[c] == pytest.approx(tp[c] / union)
        assert m.f1[c] == pytest.approx(2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]))
        assert m.recall[c] == pytest.approx(tp[c] / (tp[c] + fn[c]))
        if tp[c] + fp[c]:
            assert m.precision[c] == pytest.approx(tp[c] / (tp[c] + fp[c]))
        else:
            assert math.isnan(m.precision[c])  # class 3 never predicted: precision undefined
    ious = [1 / 3, 2 / 3, 1 / 2, 0.0]
    assert m.mIoU == pytest.approx(sum(ious) / 4)
    assert m.macro_fg_mIoU == pytest.approx(sum(ious[1:]) / 3)
    assert m.valid_pixels == 7  # the gt-255 pixel is not counted
    assert m.pixel_accuracy == pytest.approx(4 / 7)
    gt_counts = [2, 2, 2, 1]
    assert m.fwIoU == pytest.approx(sum(g / 7 * i for g, i in zip(gt_counts, ious)))
    assert m.invalid_prediction_pixels == 1
    assert m.undefined_classes == []
    np.testing.assert_array_equal(m.gt_pixels, gt_counts)
    np.testing.assert_array_equal(m.pred_pixels, [2, 3, 1, 0])


def test_invalid_predictions_count_as_false_negatives_not_dropped():
    gt = np.array([1, 1, 1, 1, 0])
    pred = np.array([1, 255, -1, 4, 0])  # 3 non-class predictions for gt 1
    m = compute_metrics(confusion_counts(gt, pred, 4), NAMES, FG)
    assert m.invalid_prediction_pixels == 3
    assert m.recall[1] == pytest.approx(1 / 4)
    assert m.iou[1] == pytest.approx(1 / 4)
    assert m.precision[1] == pytest.approx(1.0)
    assert m.pixel_accuracy == pytest.approx(2 / 5)
    assert m.per_class()["solar_panel"]["invalid_prediction_pixels"] == 3


def test_ignore_pixels_are_not_counted_whatever_the_prediction():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, (20, 20))
    gt[rng.random((20, 20)) < 0.3] = 255
    pred = rng.integers(0, 4, (20, 20))
    other = pred.copy()
    other[gt == 255] = rng.integers(0, 256, int((gt == 255).sum()))
    a = confusion_counts(gt, pred, 4)
    np.testing.assert_array_equal(a, confusion_counts(gt, other, 4))
    assert a.sum() == (gt != 255).sum()


def test_class_absent_everywhere_is_nan_excluded_and_reported(caplog):
    gt = np.array([0, 0, 1, 1, 3])
    pred = np.array([0, 1, 1, 1, 3])  # class 2 neither in gt nor predicted
    with caplog.at_level(logging.WARNING, logger="rooftop_m2f.evaluation.metrics"):
        m = compute_metrics(confusion_counts(gt, pred, 4), NAMES, FG)
    for arr in (m.iou, m.precision, m.recall, m.f1):
        assert math.isnan(arr[2])
    assert m.undefined_classes == ["solar_water_heater"]
    assert "solar_water_heater" in caplog.text
    iou0, iou1, iou3 = 1 / 2, 2 / 3, 1.0  # class 0: TP 1, FN 1; class 1: TP 2, FP 1
    assert m.iou[[0, 1, 3]] == pytest.approx([iou0, iou1, iou3])
    assert m.mIoU == pytest.approx((iou0 + iou1 + iou3) / 3)
    assert m.macro_fg_mIoU == pytest.approx((iou1 + iou3) / 2)
    assert m.to_dict()["per_class"]["solar_water_heater"]["IoU"] is None


def test_class_predicted_but_absent_from_gt_has_iou_zero():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])  # class 2 predicted once, never in gt
    m = compute_metrics(confusion_counts(gt, pred, 4), NAMES, FG)
    assert m.iou[2] == 0.0 and m.precision[2] == 0.0 and m.f1[2] == 0.0
    assert math.isnan(m.recall[2])
    assert m.undefined_classes == ["solar_pool_heater"]
    # mean over background (1/2), solar_panel (1) and solar_water_heater (0)
    assert m.mIoU == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert m.macro_fg_mIoU == pytest.approx((1.0 + 0.0) / 2)


def test_image_without_foreground():
    gt = np.zeros((8, 8), dtype=np.uint8)
    pred = np.zeros((8, 8), dtype=np.uint8)
    m = compute_metrics(confusion_counts(gt, pred, 4), NAMES, FG, warn=False)
    assert m.mIoU == 1.0 and m.pixel_accuracy == 1.0 and m.fwIoU == 1.0
    assert math.isnan(m.macro_fg_mIoU)  # no foreground class defined at all
    assert m.undefined_classes == NAMES[1:]
    scalars = detectron2_scalars(m)
    assert "macro_fg_mIoU" not in scalars and scalars["num_undefined_classes"] == 3.0


def test_empty_matrix_is_all_undefined():
    m = compute_metrics(ConfusionMatrix(4), NAMES, FG, warn=False)
    assert math.isnan(m.mIoU) and math.isnan(m.pixel_accuracy) and math.isnan(m.fwIoU)
    assert m.undefined_classes == NAMES


def brute_force(gt, pred, k):
    """Independent per-class implementation with boolean masks (no confusion matrix)."""
    valid = gt != 255
    out = {}
    for c in range(k):
        g, p = (gt == c) & valid, (pred == c) & valid
        inter, union = (g & p).sum(), (g | p).sum()
        out[c] = dict(iou=inter / union if union else np.nan,
                      precision=inter / p.sum() if p.sum() else np.nan,
                      recall=inter / g.sum() if g.sum() else np.nan)
    acc = ((gt == pred) & valid).sum() / valid.sum()
    return out, acc


def test_random_against_brute_force_and_additivity():
    rng = np.random.default_rng(1)
    conf = ConfusionMatrix(4)
    gts, preds = [], []
    for _ in range(3):
        gt = rng.integers(0, 4, (13, 17))
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, 4, gt.shape))
        pred[rng.random(gt.shape) < 0.05] = 255
        conf.update(gt, pred)
        gts.append(gt.ravel())
        preds.append(pred.ravel())
    gt, pred = np.concatenate(gts), np.concatenate(preds)
    np.testing.assert_array_equal(conf.matrix, confusion_counts(gt, pred, 4))
    assert conf.num_images == 3
    m = compute_metrics(conf, NAMES, FG)
    ref, acc = brute_force(gt, pred, 4)
    for c in range(4):
        assert m.iou[c] == pytest.approx(ref[c]["iou"])
        assert m.precision[c] == pytest.approx(ref[c]["precision"])
        assert m.recall[c] == pytest.approx(ref[c]["recall"])
    assert m.pixel_accuracy == pytest.approx(acc)
    for value in [m.mIoU, m.macro_fg_mIoU, m.pixel_accuracy, m.fwIoU, *m.iou, *m.f1]:
        assert 0.0 <= value <= 1.0


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"a\.png: ground truth values \[7\]"):
        confusion_counts(np.array([0, 7]), np.array([0, 0]), 4, name="a.png")
    with pytest.raises(ValueError, match=r"b\.png: ground truth shape \(2,\) != prediction shape \(3,\)"):
        confusion_counts(np.zeros(2, int), np.zeros(3, int), 4, name="b.png")
    with pytest.raises(ValueError, match="integer"):
        confusion_counts(np.zeros(2, int), np.zeros(2), 4)
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix.from_matrix(np.zeros((4, 4)))


def test_scalars_survive_detectron2_eval_hook_storage_and_json(tmp_path):
    """What detectron2's EvalHook does with the results: flatten, float(), EventStorage,
    JSONWriter (metrics.json must stay strict JSON) and print_csv_format."""
    from detectron2.evaluation.testing import flatten_results_dict, print_csv_format
    from detectron2.utils.events import EventStorage, JSONWriter

    gt = np.array([0, 0, 1, 1, 3])
    pred = np.array([0, 1, 1, 1, 3])  # class 2 undefined: NaN values must not leak out
    m = compute_metrics(confusion_counts(gt, pred, 4), NAMES, FG, warn=False)
    scalars = detectron2_scalars(m)
    assert "IoU-solar_water_heater" not in scalars and "F1-solar_water_heater" not in scalars
    assert scalars["IoU-solar_panel"] == pytest.approx(2 / 3)
    assert scalars["pAcc"] == pytest.approx(4 / 5)
    assert scalars["num_undefined_classes"] == 1.0
    assert all(isinstance(v, float) and not math.isnan(v) for v in scalars.values())

    flat = flatten_results_dict({"sem_seg": scalars})
    path = tmp_path / "metrics.json"
    with EventStorage(0) as storage:
        storage.put_scalars(**{k: float(v) for k, v in flat.items()}, smoothing_hint=False)
        writer = JSONWriter(str(path))
        writer.write()
        writer.close()
    record = json.loads(path.read_text().splitlines()[0],
                        parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert record["sem_seg/macro_fg_mIoU"] == pytest.approx(m.macro_fg_mIoU)
    print_csv_format({"sem_seg": scalars})
    json.dumps(m.to_dict(), allow_nan=False)  # structured result: NaN became null
