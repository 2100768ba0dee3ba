"""``RooftopSemanticDatasetMapper``: Cape Town dataset dicts -> Mask2Former semantic inputs.

Training output (what ``MaskFormer`` consumes)::

    image      uint8 tensor (3, H, W), channels in ``image_format`` order
    sem_seg    int64 tensor (H, W), class indices and 255 (ignore)
    instances  Instances with gt_classes (int64, the classes present, background included)
               and gt_masks (bool tensor (K, H, W), gt_masks[i] == (sem_seg == gt_classes[i]))

Inference output: ``image`` (resized to ``ROOFTOP.INPUT_SIZE`` when > 0), the original
``height``/``width`` (MaskFormer resizes its prediction back to them), ``file_name`` and the
dict's other keys (``sem_seg_file_name`` included); the mask is not read.
"""
import copy
import logging

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import transforms as T
from detectron2.structures import Instances

from . import capetown
from .transforms import build_train_augmentations, image_tensor, inference_image_tensor

__all__ = ["RooftopSemanticDatasetMapper", "instances_from_sem_seg"]

logger = logging.getLogger(__name__)


def instances_from_sem_seg(sem_seg: torch.Tensor, ignore_label: int = capetown.IGNORE_LABEL) -> Instances:
    """One binary mask per class present in ``sem_seg`` (an (H, W) non-negative integer
    tensor), ignoring ``ignore_label``; with no class present, empty (0,) classes and
    (0, H, W) masks."""
    h, w = sem_seg.shape
    # bincount (one pass over the mask) rather than torch.unique (a sort).
    classes = torch.nonzero(torch.bincount(sem_seg.flatten().to(torch.int64))).flatten()
    classes = classes[classes != ignore_label]
    instances = Instances((h, w))
    instances.gt_classes = classes
    if len(classes):
        instances.gt_masks = sem_seg[None] == classes[:, None, None]
    else:
        instances.gt_masks = torch.zeros((0, h, w), dtype=torch.bool)
    return instances


class RooftopSemanticDatasetMapper:
    """Callable on a dataset dict with ``file_name``, ``sem_seg_file_name`` (or COCO objects,
    ``sem_seg_coco``, see :mod:`rooftop_m2f.data.coco`), ``height`` and ``width`` (see :mod:`rooftop_m2f.data.capetown`). See the module docstring for the output."""

    @configurable
    def __init__(self, is_train=True, *, augmentations, image_format="RGB",
                 ignore_label=capetown.IGNORE_LABEL, resize=0):
        """
        Args:
            is_train: training (augment, read the mask, build instances) or inference.
            augmentations: list of detectron2 Augmentations, used in training only.
            image_format: "RGB" (as read) or "BGR" (channels reversed).
            ignore_label: mask value the loss ignores.
            resize: inference only: resize the image to resize x resize when > 0 (in training
                the augmentation list does it).
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.ignore_label = ignore_label
        self.resize = int(resize)
        mode = "training" if is_train else "inference"
        logger.info(f"[RooftopSemanticDatasetMapper] {mode} augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train=True):
        return {
            "is_train": is_train,
            "augmentations": build_train_augmentations(cfg) if is_train else [],
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": capetown.IGNORE_LABEL,
            "resize": cfg.ROOFTOP.INPUT_SIZE,
        }

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = capetown.read_image(dataset_dict["file_name"])
        if not self.is_train:
            h, w = image.shape[:2]
            # The prediction is resized back to these (the dict's, else the file's, size).
            dataset_dict.setdefault("height", h)
            dataset_dict.setdefault("width", w)
            dataset_dict["image"] = inference_image_tensor(image, self.image_format, self.resize)
            return dataset_dict

        mask = capetown.read_sem_seg(dataset_dict)  # a mask PNG, or COCO objects rasterised
        if image.shape[:2] != mask.shape:
            raise capetown.DatasetError(
                f"image and mask sizes differ: {dataset_dict['file_name']} is "
                f"{image.shape[1]}x{image.shape[0]} (WxH), {capetown.sem_seg_source(dataset_dict)} "
                f"is {mask.shape[1]}x{mask.shape[0]}"
            )
        aug_input = T.AugInput(image, sem_seg=mask)
        self.augmentations(aug_input)
        image, mask = aug_input.image, aug_input.sem_seg

        sem_seg = torch.as_tensor(mask.astype(np.int64))
        dataset_dict["image"] = image_tensor(image, self.image_format)
        dataset_dict["sem_seg"] = sem_seg
        dataset_dict["instances"] = instances_from_sem_seg(sem_seg, self.ignore_label)
        return dataset_dict
