"""Training-time semantic-segmentation evaluator for ``evaluator_type == "rooftop_sem_seg"``.

It accumulates the confusion matrix of :mod:`rooftop_m2f.evaluation.metrics` (the single metric
implementation) and reports, under ``"sem_seg"``, flat float scalars as **fractions in [0, 1]**
(detectron2's own ``SemSegEvaluator`` reports percentages 0-100)::

    mIoU, macro_fg_mIoU, pAcc, fwIoU, num_undefined_classes,
    IoU-<class>, precision-<class>, recall-<class>, F1-<class>

Undefined values (NaN, e.g. the IoU of a class absent from both ground truth and predictions)
are left out of this flat dict so detectron2's ``metrics.json`` stays strict JSON; the full
structured result (all values, ``null`` where undefined, the list of undefined classes and the
confusion matrix) is in :attr:`RooftopSemSegEvaluator.last_metrics` and, with ``output_dir``,
in ``<output_dir>/sem_seg_evaluation.json``. Nothing is registered globally here; the trainer
builds this evaluator for datasets whose metadata has ``evaluator_type == "rooftop_sem_seg"``.
"""
import json
import logging
import os
from collections import OrderedDict

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..data.capetown import IGNORE_LABEL, read_mask, read_sem_seg, sem_seg_source
from ..fileio import write_text_atomic
from .metrics import ConfusionMatrix, compute_metrics, detectron2_scalars

logger = logging.getLogger(__name__)

RESULT_FILE = "sem_seg_evaluation.json"


class RooftopSemSegEvaluator(DatasetEvaluator):
    """Confusion-matrix evaluator (see the module doc for the reported keys).

    Ground truth of each input, in order of preference: ``input["sem_seg_file_name"]`` read with
    :func:`rooftop_m2f.data.capetown.read_mask`; the input's COCO objects (``sem_seg_coco``); the
    ``sem_seg_file_name`` (or COCO objects) that the registered
    dataset gives for ``input["file_name"]`` (detectron2's test mapper drops the key); an
    ``input["sem_seg"]`` tensor, if it has the prediction's shape. ``outputs[i]["sem_seg"]`` is a
    ``(C, H, W)`` score tensor (argmax over C) or an ``(H, W)`` tensor of class indices.

    Class names come from the metadata's ``stuff_classes``, the ignore label from
    ``ignore_label`` (default 255) and the foreground classes from ``foreground_classes`` if the
    metadata has it, else every class not named ``"background"``.
    """

    def __init__(self, dataset_name, distributed=True, output_dir=None):
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        meta = MetadataCatalog.get(dataset_name)
        class_names = meta.get("stuff_classes", None)
        if not class_names:
            raise ValueError(f"dataset {dataset_name!r}: metadata has no 'stuff_classes'; cannot evaluate")
        self._class_names = list(class_names)
        self._ignore_label = int(meta.get("ignore_label", IGNORE_LABEL))
        fg = meta.get("foreground_classes", None)
        if fg is None:
            fg = [i for i, n in enumerate(self._class_names) if n != "background"]
        self._foreground = [int(c) for c in fg]
        self._gt_files = None  # file_name -> dataset dict, loaded on first need
        self.last_metrics = None
        self.reset()

    def reset(self):
        self._conf = ConfusionMatrix(len(self._class_names), self._ignore_label)

    def _gt_record_for(self, file_name):
        if self._gt_files is None:
            self._gt_files = {}
            if self._dataset_name in DatasetCatalog.list():
                self._gt_files = {
                    d["file_name"]: d for d in DatasetCatalog.get(self._dataset_name)
                    if "file_name" in d and ("sem_seg_file_name" in d or "sem_seg_coco" in d)
                }
        return self._gt_files.get(file_name)

    def _ground_truth(self, inp, pred_shape):
        if inp.get("sem_seg_file_name"):
            return read_mask(inp["sem_seg_file_name"]), inp["sem_seg_file_name"]
        record = inp if "sem_seg_coco" in inp else (
            self._gt_record_for(inp["file_name"]) if "file_name" in inp else None)
        if record:  # a mask file, or COCO objects rasterised (rooftop_m2f/data/coco.py)
            return read_sem_seg(record), sem_seg_source(record)
        name = inp.get("file_name", f"image {inp.get('image_id', '?')}")
        if "sem_seg" in inp:
            gt = inp["sem_seg"]
            gt = gt.cpu().numpy() if isinstance(gt, torch.Tensor) else np.asarray(gt)
            if gt.shape != tuple(pred_shape):
                raise ValueError(
                    f"{name}: input 'sem_seg' has shape {gt.shape} but the prediction {tuple(pred_shape)} "
                    "(resized by the test mapper?); give 'sem_seg_file_name' for full-size ground truth")
            return gt, name
        raise ValueError(
            f"{name}: no ground truth: the input has neither 'sem_seg_file_name' nor 'sem_seg', and "
            f"dataset {self._dataset_name!r} has no mask for its file_name")

    def process(self, inputs, outputs):
        for inp, out in zip(inputs, outputs):
            scores = out["sem_seg"] if isinstance(out, dict) else out
            if scores.dim() == 3:
                pred = scores.argmax(dim=0)
            elif scores.dim() == 2:
                pred = scores
            else:
                raise ValueError(f"{inp.get('file_name', '?')}: output 'sem_seg' must be (C, H, W) "
                                 f"scores or (H, W) classes, got shape {tuple(scores.shape)}")
            pred = pred.to("cpu", torch.int64).numpy()
            gt, name = self._ground_truth(inp, pred.shape)
            if gt.shape != pred.shape:
                raise ValueError(f"{name}: ground truth {gt.shape} and prediction {pred.shape} differ "
                                 "in size")
            self._conf.update(gt, pred, name=name)

    def evaluate(self):
        """On the main process: ``OrderedDict({"sem_seg": {key: float}})`` (empty if no image
        was processed); on the other processes ``None`` (detectron2's convention)."""
        conf = self._conf
        if self._distributed and comm.get_world_size() > 1:
            parts = comm.gather((self._conf.matrix, self._conf.num_images), dst=0)
            if not comm.is_main_process():
                return None
            conf = ConfusionMatrix(len(self._class_names), self._ignore_label)
            for matrix, num_images in parts:
                conf.merge(ConfusionMatrix.from_matrix(matrix, self._ignore_label, num_images))
        if conf.num_images == 0:
            logger.warning("RooftopSemSegEvaluator on %s: no image was processed", self._dataset_name)
            return OrderedDict()
        metrics = compute_metrics(conf, self._class_names, self._foreground)
        self.last_metrics = metrics
        scalars = detectron2_scalars(metrics)
        logger.info("Evaluation on %s (%d images, rates as fractions): %s",
                    self._dataset_name, conf.num_images,
                    ", ".join(f"{k}={v:.4f}" for k, v in scalars.items()))
        if self._output_dir:
            structured = metrics.to_dict()
            structured["dataset"] = self._dataset_name
            structured["scalars"] = scalars
            write_text_atomic(os.path.join(self._output_dir, RESULT_FILE),
                              json.dumps(structured, indent=2, allow_nan=False) + "\n")
        return OrderedDict({"sem_seg": scalars})
