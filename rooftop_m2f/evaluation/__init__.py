"""Evaluation: one metric implementation (:mod:`.metrics`), the training-time evaluator
(:class:`RooftopSemSegEvaluator`) and PNG-folder evaluation (:mod:`.png_eval`)."""
from .. import compat as _compat

_compat.apply()  # before detectron2 / Mask2Former modules are imported

from .metrics import (
    INVALID_COLUMN_NAME,
    ConfusionMatrix,
    SegmentationMetrics,
    compute_metrics,
    confusion_counts,
    detectron2_scalars,
    json_ready,
)
from .sem_seg_evaluator import RooftopSemSegEvaluator

__all__ = [
    "INVALID_COLUMN_NAME",
    "ConfusionMatrix",
    "SegmentationMetrics",
    "compute_metrics",
    "confusion_counts",
    "detectron2_scalars",
    "json_ready",
    "RooftopSemSegEvaluator",
]
