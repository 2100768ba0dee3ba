"""Pixel-level evaluation of class-index PNG predictions against ground-truth masks
(the logic behind ``tools/eval_from_png.py``).

Predictions and masks are matched by file name: ``<pred_dir>/<stem><pred_suffix>.png`` is scored
against ``<gt_dir>/<stem>.png`` (exact names; ``pred_suffix`` is empty by default, ``_index`` for
the index PNGs of ``tools/predict.py``; files not ending in ``.png``, in any case, are ignored).
The whole set is checked before anything is computed: any ground-truth mask without a
prediction, prediction without a mask, or pair whose sizes differ is an error that lists every
such file; a partial set is never evaluated.

Ground truth is read with :func:`rooftop_m2f.data.capetown.read_mask` (class indices, 255
ignore, or palette-coloured RGB). A prediction is a single-channel (``L``/``P``/``I``) PNG of
class indices, or an RGB PNG coloured with the dataset palette; a prediction value that is not a
class (e.g. 255) is counted as a wrong prediction (see :mod:`.metrics`). The metrics are those of
:mod:`rooftop_m2f.evaluation.metrics`, the implementation the training evaluator uses.
"""
import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..data.capetown import (CLASS_NAMES, FOREGROUND_CLASSES, IGNORE_LABEL, DatasetError, decode_mask,
                             read_mask)
from ..fileio import atomic_path, write_text_atomic
from .metrics import INVALID_COLUMN_NAME, ConfusionMatrix, SegmentationMetrics, compute_metrics

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PER_CLASS_CSV = "per_class.csv"
CONFUSION_PNG = "confusion_matrix.png"


class PngEvalError(DatasetError):
    """The prediction and ground-truth sets do not match; ``problems`` lists each one."""

    def __init__(self, problems: Sequence[str], header: str = ""):
        self.problems = list(problems)
        super().__init__((header or f"{len(self.problems)} problem(s); nothing was evaluated:")
                         + "\n  " + "\n  ".join(self.problems))


def _png_files(directory: Path) -> dict:
    return {p.name: p for p in sorted(directory.iterdir()) if p.is_file() and p.suffix.lower() == ".png"}


def _image_size(path: Path):
    try:
        with Image.open(path) as im:
            return im.size  # (width, height)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read image ({e})") from e


def match_files(pred_dir, gt_dir, pred_suffix: str = "") -> List[Tuple[Path, Path]]:
    """``[(prediction, ground truth), ...]`` sorted by name; raises :class:`PngEvalError`
    listing every missing prediction, extra prediction, unreadable file and size mismatch.

    The prediction for ``<gt_dir>/<stem>.png`` is ``<pred_dir>/<stem><pred_suffix>.png``. With a
    non-empty ``pred_suffix`` (e.g. ``_index`` for ``tools/predict.py`` outputs) only the PNGs
    whose name ends with ``<pred_suffix>.png`` are predictions; other files are not looked at.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    problems = [f"{d}: {what} directory does not exist"
                for d, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")) if not d.is_dir()]
    if problems:
        raise PngEvalError(problems)
    gts = {Path(name).stem: p for name, p in _png_files(gt_dir).items()}
    if not gts:
        raise PngEvalError([f"{gt_dir}: no ground-truth .png masks"])
    preds = {}
    for name, p in _png_files(pred_dir).items():
        stem = Path(name).stem
        if pred_suffix:
            if not stem.endswith(pred_suffix):
                continue
            stem = stem[: -len(pred_suffix)]
        preds[stem] = p
    missing = [f"missing prediction: {gts[k]} has no prediction {pred_dir / (k + pred_suffix + '.png')}"
               for k in sorted(gts.keys() - preds.keys())]
    extra = [f"extra prediction: {preds[k]} has no ground truth {gt_dir / (k + '.png')}"
             for k in sorted(preds.keys() - gts.keys())]
    pairs, mismatched = [], []
    for key in sorted(gts.keys() & preds.keys()):
        pred, gt = preds[key], gts[key]
        try:
            pred_size, gt_size = _image_size(pred), _image_size(gt)
        except DatasetError as e:
            mismatched.append(f"unreadable: {e}")
            continue
        if pred_size != gt_size:
            mismatched.append(f"size mismatch: {pred} is {pred_size[0]}x{pred_size[1]} (WxH) but "
                              f"{gt} is {gt_size[0]}x{gt_size[1]}")
        pairs.append((pred, gt))
    problems = missing + extra + mismatched
    if problems:
        hint = ""
        if not pred_suffix and any(p.stem.endswith(("_index", "_color", "_overlay")) for p in preds.values()):
            hint = " (tools/predict.py outputs? evaluate the index PNGs with --pred-suffix _index)"
        raise PngEvalError(problems, header=(
            f"prediction set {pred_dir} does not match ground truth {gt_dir}: {len(missing)} missing, "
            f"{len(extra)} extra, {len(mismatched)} unreadable or size-mismatched file(s); nothing was "
            f"evaluated (a partial set is never scored){hint}:"))
    return pairs


def read_prediction(path) -> np.ndarray:
    """An (H, W) int64 array of predicted class indices from a PNG (see module doc)."""
    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA"):
                array = np.array(im.convert("RGB"))
            elif im.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                array = np.array(im)
            else:
                raise DatasetError(f"{path}: unsupported prediction image mode {im.mode!r}; "
                                   "expected a single-channel class-index PNG")
    except (OSError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{path}: cannot read prediction ({e})") from e
    if array.ndim == 3:  # palette-coloured RGB prediction
        array = decode_mask(array, str(path))
    return array.astype(np.int64)


def evaluate_pairs(pairs: Sequence[Tuple[Path, Path]], class_names: Sequence[str] = CLASS_NAMES,
                   foreground_classes: Sequence[int] = FOREGROUND_CLASSES,
                   ignore_label: int = IGNORE_LABEL, progress: bool = True) -> SegmentationMetrics:
    """Accumulate the confusion matrix over ``(prediction, ground truth)`` pairs."""
    from tqdm import tqdm

    conf = ConfusionMatrix(len(class_names), ignore_label)
    for pred_path, gt_path in tqdm(pairs, desc="eval", unit="img", disable=not progress):
        gt = read_mask(str(gt_path))
        pred = read_prediction(pred_path)
        if gt.shape != pred.shape:
            raise DatasetError(f"size mismatch: {pred_path} is {pred.shape} but {gt_path} is {gt.shape} "
                               "(HxW)")
        conf.update(gt, pred, name=str(pred_path))
    return compute_metrics(conf, class_names, foreground_classes)


def evaluate_png_dirs(pred_dir, gt_dir, pred_suffix: str = "", progress: bool = True,
                      **kwargs) -> SegmentationMetrics:
    """Check the sets match (:func:`match_files`) and score all pairs (:func:`evaluate_pairs`)."""
    return evaluate_pairs(match_files(pred_dir, gt_dir, pred_suffix), progress=progress, **kwargs)


def _cell(value: float) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else repr(float(value))


def per_class_csv(metrics: SegmentationMetrics) -> str:
    """CSV text, one row per class; an undefined rate is an empty cell."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    columns = ["IoU", "precision", "recall", "F1"]
    counts = ["gt_pixels", "pred_pixels", "true_positives", "invalid_prediction_pixels"]
    writer.writerow(["class_index", "class"] + columns + counts)
    for i, (name, row) in enumerate(metrics.per_class().items()):
        writer.writerow([i, name] + [_cell(row[c]) for c in columns] + [row[c] for c in counts])
    return buf.getvalue()


def confusion_png(metrics: SegmentationMetrics, path: str, title: str = "") -> None:
    """Write the confusion matrix (rows ground truth, colour = fraction of the row, cells
    annotated with counts and row fractions) as a PNG, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matrix = metrics.confusion_matrix.astype(np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    frac = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    k = matrix.shape[0]
    fig = Figure(figsize=(2.0 + 1.6 * (k + 1), 1.5 + 1.2 * k))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="fraction of ground-truth row")
    ax.set_xticks(range(k + 1))
    ax.set_xticklabels(list(metrics.class_names) + [INVALID_COLUMN_NAME], rotation=30, ha="right")
    ax.set_yticks(range(k))
    ax.set_yticklabels(metrics.class_names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title or "confusion matrix (pixels)")
    for r in range(k):
        for c in range(k + 1):
            ax.text(c, r, f"{int(matrix[r, c])}\n{frac[r, c]:.3f}", ha="center", va="center",
                    fontsize=8, color="white" if frac[r, c] > 0.5 else "black")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def write_outputs(metrics: SegmentationMetrics, output_dir, extra: Optional[dict] = None) -> List[Path]:
    """Write ``metrics.json``, ``per_class.csv`` and ``confusion_matrix.png`` (each atomically)
    into ``output_dir``; returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    result = metrics.to_dict()
    result.update(extra or {})
    paths = [output_dir / PER_CLASS_CSV, output_dir / CONFUSION_PNG, output_dir / METRICS_FILE]
    write_text_atomic(str(paths[0]), per_class_csv(metrics))
    confusion_png(metrics, str(paths[1]))
    # metrics.json last: its presence means the other files are complete
    write_text_atomic(str(paths[2]), json.dumps(result, indent=2, allow_nan=False) + "\n")
    return paths


def format_summary(metrics: SegmentationMetrics) -> str:
    """A plain-text table of the per-class and mean metrics (fractions; 'n/a' = undefined)."""
    def fmt(v):
        return "   n/a" if math.isnan(v) else f"{v:6.4f}"

    width = max(len(n) for n in metrics.class_names)
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'prec':>6}  {'recall':>6}  {'F1':>6}"]
    for i, name in enumerate(metrics.class_names):
        lines.append(f"{name:<{width}}  {fmt(metrics.iou[i])}  {fmt(metrics.precision[i])}  "
                     f"{fmt(metrics.recall[i])}  {fmt(metrics.f1[i])}")
    lines.append(f"mIoU {fmt(metrics.mIoU)}  macro_fg_mIoU {fmt(metrics.macro_fg_mIoU)}  "
                 f"pixel_accuracy {fmt(metrics.pixel_accuracy)}  fwIoU {fmt(metrics.fwIoU)}")
    if metrics.undefined_classes:
        lines.append(f"undefined (absent from ground truth and predictions, excluded from means): "
                     f"{', '.join(metrics.undefined_classes)}")
    if metrics.invalid_prediction_pixels:
        lines.append(f"{metrics.invalid_prediction_pixels} pixel(s) predicted as a non-class value "
                     "(counted as wrong)")
    return "\n".join(lines)
