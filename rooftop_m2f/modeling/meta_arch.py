"""``RooftopMaskFormer``: Mask2Former's ``MaskFormer`` built from our config.

We subclass instead of using ``MaskFormer.from_config`` because (a) the criterion's constructor
differs between the PyPI and git releases of Mask2Former (see ``compat.criterion_kwargs``),
(b) we add per-class weights to the classification loss (and, under
``ROOFTOP.PIXEL_DECODER_AUTOCAST``, compute it in float32: ``precision.py``), and (c) inference
computes the semantic scores a few queries at a time (``semantic_inference.semantic_scores``:
same values, less than half the time and a fraction of the memory of upsampling all 100 masks at
once). Training is Mask2Former's forward unchanged. The pixel decoder is whatever the config
names (ours: ``pixel_decoder.RooftopMSDeformAttnPixelDecoder``).
"""
import functools
import logging
import math

import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.structures import ImageList
from detectron2.utils.memory import retry_if_cuda_oom
from mask2former.maskformer_model import MaskFormer
from mask2former.modeling.criterion import SetCriterion
from mask2former.modeling.matcher import HungarianMatcher

from .. import compat
from .label_smoothing import LabelSmoothingSetCriterion
from .pixel_decoder import RooftopMSDeformAttnPixelDecoder
from .precision import float32_criterion_class
from .semantic_inference import semantic_scores

logger = logging.getLogger(__name__)


def build_criterion(cfg, num_classes):
    mf = cfg.MODEL.MASK_FORMER
    matcher = HungarianMatcher(
        cost_class=mf.CLASS_WEIGHT,
        cost_mask=mf.MASK_WEIGHT,
        cost_dice=mf.DICE_WEIGHT,
        num_points=mf.TRAIN_NUM_POINTS,
    )
    # ROOFTOP.LABEL_SMOOTHING > 0: the matched queries' classification targets are smoothed
    smoothing = float(cfg.ROOFTOP.LABEL_SMOOTHING)
    criterion_cls = LabelSmoothingSetCriterion if smoothing > 0 else SetCriterion
    if cfg.ROOFTOP.PIXEL_DECODER_AUTOCAST:  # the loss on float32 outputs, autocast off
        criterion_cls = float32_criterion_class(criterion_cls)
    if smoothing > 0:
        criterion_cls = functools.partial(criterion_cls, label_smoothing=smoothing)
    criterion = criterion_cls(
        num_classes,
        matcher=matcher,
        eos_coef=mf.NO_OBJECT_WEIGHT,
        losses=["labels", "masks"],
        num_points=mf.TRAIN_NUM_POINTS,
        oversample_ratio=mf.OVERSAMPLE_RATIO,
        importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
        **compat.criterion_kwargs(
            mf.CLASS_WEIGHT, mf.MASK_WEIGHT, mf.DICE_WEIGHT, mf.DEC_LAYERS, mf.DEEP_SUPERVISION
        ),
    )
    class_weights = list(cfg.ROOFTOP.LOSS.PER_CLASS_WEIGHTS)
    if class_weights:
        if len(class_weights) != num_classes:
            raise ValueError(
                f"ROOFTOP.LOSS.PER_CLASS_WEIGHTS has {len(class_weights)} values, "
                f"but the model has {num_classes} classes"
            )
        if not all(math.isfinite(w) and w >= 0 for w in class_weights) or not any(class_weights):
            raise ValueError(f"ROOFTOP.LOSS.PER_CLASS_WEIGHTS {class_weights}: weights must be "
                             "finite, >= 0 and not all 0")
        # The criterion's classification loss is a weighted cross-entropy over num_classes + 1
        # outputs whose weight vector is ``empty_weight`` (ones, then the no-object weight).
        with torch.no_grad():
            criterion.empty_weight[:num_classes] = torch.tensor(class_weights, dtype=torch.float32)
        logger.info("Classification loss class weights: %s (no-object %.3g)",
                    class_weights, mf.NO_OBJECT_WEIGHT)
    # ``empty_weight`` is a buffer, saved with every checkpoint: loading one (e.g. --resume
    # after a change of PER_CLASS_WEIGHTS) must not replace the weights this config asks for.
    configured = criterion.empty_weight.detach().clone()

    def keep_configured_weights(module, incompatible_keys):
        if not torch.equal(module.empty_weight.cpu(), configured):
            logger.warning("The checkpoint's classification-loss weights %s are replaced by the "
                           "config's %s", module.empty_weight.tolist(), configured.tolist())
            with torch.no_grad():
                module.empty_weight.copy_(configured)

    criterion.register_load_state_dict_post_hook(keep_configured_weights)
    return criterion


@META_ARCH_REGISTRY.register()
class RooftopMaskFormer(MaskFormer):
    @configurable
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        decoder = getattr(self.sem_seg_head, "pixel_decoder", None)
        if not isinstance(decoder, RooftopMSDeformAttnPixelDecoder):
            logger.info("Pixel decoder %s (MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME) runs as its "
                        "library ships it: ROOFTOP.MSDEFORM_ATTN_IMPL and the lean encoder layers "
                        "apply only to RooftopMSDeformAttnPixelDecoder",
                        type(decoder).__name__)

    @classmethod
    def from_config(cls, cfg):
        backbone = build_backbone(cfg)
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        mf = cfg.MODEL.MASK_FORMER
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": build_criterion(cfg, sem_seg_head.num_classes),
            "num_queries": mf.NUM_OBJECT_QUERIES,
            "object_mask_threshold": mf.TEST.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": mf.TEST.OVERLAP_THRESHOLD,
            "metadata": MetadataCatalog.get(cfg.DATASETS.TRAIN[0]),
            "size_divisibility": mf.SIZE_DIVISIBILITY,
            "sem_seg_postprocess_before_inference": mf.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "semantic_on": True,
            "instance_on": False,
            "panoptic_on": False,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
        }

    def forward(self, batched_inputs):
        """Training: Mask2Former's forward (a dict of losses). Inference: a list of
        ``{"sem_seg": (K, height, width) scores}``, one per input, as Mask2Former returns them."""
        if self.training:
            return super().forward(batched_inputs)
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std
                  for x in batched_inputs]
        images = ImageList.from_tensors(images, self.size_divisibility)
        outputs = self.sem_seg_head(self.backbone(images.tensor))
        padded_size = tuple(images.tensor.shape[-2:])
        results = []
        for class_logits, mask_logits, inputs, image_size in zip(
                outputs["pred_logits"], outputs["pred_masks"], batched_inputs, images.image_sizes):
            output_size = (inputs.get("height", image_size[0]), inputs.get("width", image_size[1]))
            results.append({"sem_seg": retry_if_cuda_oom(semantic_scores)(
                class_logits, mask_logits, padded_size, tuple(image_size), output_size,
                self.sem_seg_postprocess_before_inference)})
        return results
