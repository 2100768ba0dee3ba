"""Pixel-level semantic-segmentation metrics: the project's single implementation.

Everything that scores a segmentation (the training-time evaluator
:class:`~rooftop_m2f.evaluation.sem_seg_evaluator.RooftopSemSegEvaluator` and
``tools/eval_from_png.py``) accumulates a :class:`ConfusionMatrix` and calls
:func:`compute_metrics` on it.
"""
import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

INVALID_COLUMN_NAME = "invalid_prediction"
DEFAULT_IGNORE_LABEL = 255


class ConfusionMatrix:
    """Accumulates a ``(num_classes, num_classes + 1)`` confusion matrix.

    ``K`` classes give a ``(K, K + 1)`` int64 matrix: row ``g`` is the ground-truth class, column
    ``p`` the predicted class, and the extra last column (index ``K``, :data:`INVALID_COLUMN_NAME`)
    counts pixels with a valid ground truth whose prediction is *not* a class: the ignore label
    255, a negative number, or any value ``>= K``. Such a prediction is a wrong prediction: it is a
    false negative for the ground-truth class (it lowers recall, IoU and pixel accuracy) but a false
    positive for no class. The count is reported separately (``invalid_prediction_pixels``).
    Pixels whose ground truth is the ignore label are not counted at all, whatever was predicted.
    A ground-truth value that is neither a class nor the ignore label is an error.
    """

    def __init__(self, num_classes: int, ignore_label: int = DEFAULT_IGNORE_LABEL):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_label < num_classes:
            raise ValueError(f"ignore_label {ignore_label} must not be a class index (0..{num_classes - 1})")
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.matrix = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)
        self.num_images = 0

    def reset(self) -> None:
        self.matrix[...] = 0
        self.num_images = 0

    def update(self, gt, pred, name: str = "<array>") -> None:
        """Add one image. ``gt`` and ``pred`` are integer arrays of the same shape (numpy or
        anything ``np.asarray`` accepts, e.g. CPU tensors). ``name`` (a file name) is used in
        error messages."""
        self.matrix += confusion_counts(gt, pred, self.num_classes, self.ignore_label, name)
        self.num_images += 1

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another accumulator's counts (e.g. from another process) into this one."""
        if other.matrix.shape != self.matrix.shape:
            raise ValueError(f"cannot merge confusion matrices of shapes {other.matrix.shape} and "
                             f"{self.matrix.shape}")
        self.matrix += other.matrix
        self.num_images += other.num_images
        return self

    @classmethod
    def from_matrix(cls, matrix, ignore_label: int = DEFAULT_IGNORE_LABEL, num_images: int = 0):
        matrix = np.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[1] != matrix.shape[0] + 1:
            raise ValueError(f"confusion matrix must have shape (K, K + 1), got {matrix.shape}")
        if (matrix < 0).any():
            raise ValueError("confusion matrix has negative counts")
        out = cls(matrix.shape[0], ignore_label)
        out.matrix[...] = matrix
        out.num_images = int(num_images)
        return out


def confusion_counts(gt, pred, num_classes: int, ignore_label: int = DEFAULT_IGNORE_LABEL,
                     name: str = "<array>") -> np.ndarray:
    """The ``(num_classes, num_classes + 1)`` confusion matrix of one ``(gt, pred)`` pair."""
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ValueError(f"{name}: ground truth shape {gt.shape} != prediction shape {pred.shape}")
    for what, a in (("ground truth", gt), ("prediction", pred)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise ValueError(f"{name}: {what} must be an integer array of class indices, got dtype {a.dtype}")
    gt = gt.reshape(-1).astype(np.int64, copy=False)
    pred = pred.reshape(-1).astype(np.int64, copy=False)
    valid = gt != ignore_label
    gt = gt[valid]
    pred = pred[valid]
    bad_gt = (gt < 0) | (gt >= num_classes)
    if bad_gt.any():
        values = np.unique(gt[bad_gt])[:10].tolist()
        raise ValueError(
            f"{name}: ground truth values {values} are neither a class (0..{num_classes - 1}) "
            f"nor the ignore label {ignore_label}"
        )
    pred = np.where((pred < 0) | (pred >= num_classes), num_classes, pred)
    width = num_classes + 1
    return np.bincount(gt * width + pred, minlength=num_classes * width).reshape(num_classes, width)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = num.astype(np.float64)
    den = den.astype(np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


@dataclass
class SegmentationMetrics:
    """Result of :func:`compute_metrics`. Arrays are indexed by class; rates are fractions."""

    class_names: List[str]
    foreground_classes: List[int]
    confusion_matrix: np.ndarray  # (K, K + 1) int64, rows gt, columns prediction (+ invalid)
    iou: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    gt_pixels: np.ndarray
    pred_pixels: np.ndarray
    true_positives: np.ndarray
    mIoU: float
    macro_fg_mIoU: float
    pixel_accuracy: float
    fwIoU: float
    valid_pixels: int
    invalid_prediction_pixels: int
    undefined_classes: List[str] = field(default_factory=list)
    num_images: Optional[int] = None

    def per_class(self) -> Dict[str, Dict[str, float]]:
        """``{class name: {"IoU", "precision", "recall", "F1", "gt_pixels", "pred_pixels",
        "true_positives", "invalid_prediction_pixels"}}`` (rates may be NaN)."""
        out = {}
        for i, name in enumerate(self.class_names):
            out[name] = {
                "IoU": float(self.iou[i]),
                "precision": float(self.precision[i]),
                "recall": float(self.recall[i]),
                "F1": float(self.f1[i]),
                "gt_pixels": int(self.gt_pixels[i]),
                "pred_pixels": int(self.pred_pixels[i]),
                "true_positives": int(self.true_positives[i]),
                "invalid_prediction_pixels": int(self.confusion_matrix[i, -1]),
            }
        return out

    def to_dict(self) -> dict:
        """A JSON-ready structure; undefined (NaN) values become ``None`` (JSON ``null``)."""
        return json_ready({
            "class_names": list(self.class_names),
            "foreground_classes": [int(c) for c in self.foreground_classes],
            "mIoU": self.mIoU,
            "macro_fg_mIoU": self.macro_fg_mIoU,
            "pixel_accuracy": self.pixel_accuracy,
            "fwIoU": self.fwIoU,
            "per_class": self.per_class(),
            "undefined_classes": list(self.undefined_classes),
            "valid_pixels": int(self.valid_pixels),
            "invalid_prediction_pixels": int(self.invalid_prediction_pixels),
            "num_images": self.num_images,
            "confusion_matrix": self.confusion_matrix.tolist(),
            "confusion_matrix_rows": list(self.class_names),
            "confusion_matrix_columns": list(self.class_names) + [INVALID_COLUMN_NAME],
            "notes": (
                "Rates are fractions in [0, 1]; null = undefined (class absent from ground truth "
                "and predictions, or a 0/0 rate). confusion_matrix rows are ground truth, columns "
                f"predictions; the last column '{INVALID_COLUMN_NAME}' counts pixels with a valid "
                "ground truth whose prediction is not a class (e.g. 255); they count as false "
                "negatives. Ground-truth ignore pixels (255) are not counted."
            ),
        })


def json_ready(obj):
    """Recursively convert numpy scalars/arrays to Python and NaN/inf floats to ``None``."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return None if not math.isfinite(value) else value
    return obj


def compute_metrics(conf, class_names: Optional[Sequence[str]] = None,
                    foreground_classes: Optional[Sequence[int]] = None,
                    warn: bool = True) -> SegmentationMetrics:
    """Metrics from a :class:`ConfusionMatrix` or a ``(K, K + 1)`` count matrix.

    ``class_names`` defaults to ``class_0 ...``; ``foreground_classes`` (indices) defaults to
    every class but 0. With ``warn`` a warning names the classes with undefined IoU and reports
    invalid predictions.

    All rates are fractions in [0, 1]; NaN only where undefined. For class ``c``:
    ``TP = M[c, c]``, ``gt = sum(M[c, :])`` (incl. the invalid column), ``pred = sum(M[:, c])``,
    ``FN = gt - TP``, ``FP = pred - TP``.

    * ``IoU = TP / (TP + FP + FN)``; undefined (NaN) when the class is absent from both the ground
      truth and the predictions over the whole set (``TP + FP + FN == 0``). A class predicted but
      absent from the ground truth has IoU 0.
    * ``precision = TP / pred`` (NaN when never predicted), ``recall = TP / gt`` (NaN when absent
      from the ground truth), ``F1 = 2 TP / (2 TP + FP + FN)`` (the Dice score; defined exactly
      when IoU is, so a class predicted but absent from the ground truth has F1 0).
    * ``mIoU``: mean IoU over the classes with a defined IoU; ``macro_fg_mIoU``: the same over the
      foreground classes (the model-selection metric). Undefined classes are excluded from both
      means, listed in ``undefined_classes`` and logged as a warning. A mean over no defined class
      is NaN.
    * ``pixel_accuracy = trace / sum(M)``; ``fwIoU = sum_c (gt_c / sum(M)) * IoU_c`` (NaN when
      there is no valid ground-truth pixel).
    """
    num_images = None
    if isinstance(conf, ConfusionMatrix):
        num_images = conf.num_images
        matrix = conf.matrix
    else:
        matrix = ConfusionMatrix.from_matrix(conf).matrix
    matrix = np.asarray(matrix, dtype=np.int64)
    k = matrix.shape[0]
    if matrix.shape != (k, k + 1):
        raise ValueError(f"confusion matrix must have shape (K, K + 1), got {matrix.shape}")
    class_names = [f"class_{i}" for i in range(k)] if class_names is None else [str(n) for n in class_names]
    if len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for a {k}-class confusion matrix")
    fg = list(range(1, k)) if foreground_classes is None else [int(c) for c in foreground_classes]
    if any(c < 0 or c >= k for c in fg):
        raise ValueError(f"foreground classes {fg} out of range 0..{k - 1}")

    tp = np.diagonal(matrix[:, :k]).copy()
    gt = matrix.sum(axis=1)
    pred = matrix[:, :k].sum(axis=0)
    fn = gt - tp
    fp = pred - tp
    union = tp + fp + fn
    iou = _ratio(tp, union)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    precision = _ratio(tp, pred)
    recall = _ratio(tp, gt)
    total = int(gt.sum())
    undefined = [class_names[i] for i in range(k) if union[i] == 0]
    miou = _nanmean(iou)
    fg_miou = _nanmean(iou[fg]) if fg else float("nan")
    if total > 0:
        pixel_accuracy = float(tp.sum() / total)
        defined = ~np.isnan(iou)
        fwiou = float(np.sum(gt[defined] / total * iou[defined]))
    else:
        pixel_accuracy = fwiou = float("nan")
    invalid = int(matrix[:, k].sum())

    if warn and undefined:
        logger.warning(
            "IoU undefined (class absent from ground truth and predictions) for %s; "
            "excluded from mIoU%s", undefined,
            " and macro_fg_mIoU" if any(class_names[c] in undefined for c in fg) else "")
    if warn and invalid:
        logger.warning("%d pixel(s) with valid ground truth have predictions that are not a class "
                       "(e.g. 255); counted as wrong predictions (false negatives)", invalid)

    return SegmentationMetrics(
        class_names=class_names, foreground_classes=fg, confusion_matrix=matrix.copy(),
        iou=iou, precision=precision, recall=recall, f1=f1, gt_pixels=gt, pred_pixels=pred,
        true_positives=tp, mIoU=miou, macro_fg_mIoU=fg_miou, pixel_accuracy=pixel_accuracy,
        fwIoU=fwiou, valid_pixels=total, invalid_prediction_pixels=invalid,
        undefined_classes=undefined, num_images=num_images,
    )


def detectron2_scalars(metrics: SegmentationMetrics) -> Dict[str, float]:
    """The flat ``{name: float}`` dict the evaluator returns under ``"sem_seg"``.

    Keys: ``mIoU``, ``macro_fg_mIoU``, ``pAcc``, ``fwIoU``, ``num_undefined_classes`` and, per
    class, ``IoU-<class>``, ``precision-<class>``, ``recall-<class>``, ``F1-<class>``. Values are
    fractions in [0, 1] (detectron2's own SemSegEvaluator uses percentages). Undefined (NaN)
    values are left out, so that detectron2's metrics.json stays strict JSON; the class names
    with undefined IoU are in the structured result (``undefined_classes``).
    """
    out = {
        "mIoU": metrics.mIoU,
        "macro_fg_mIoU": metrics.macro_fg_mIoU,
        "pAcc": metrics.pixel_accuracy,
        "fwIoU": metrics.fwIoU,
        "num_undefined_classes": float(len(metrics.undefined_classes)),
    }
    for i, name in enumerate(metrics.class_names):
        out[f"IoU-{name}"] = metrics.iou[i]
        out[f"precision-{name}"] = metrics.precision[i]
        out[f"recall-{name}"] = metrics.recall[i]
        out[f"F1-{name}"] = metrics.f1[i]
    return {k: float(v) for k, v in out.items() if not math.isnan(float(v))}
