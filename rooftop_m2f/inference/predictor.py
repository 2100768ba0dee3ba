"""``RooftopPredictor``: detectron2's ``DefaultPredictor`` for RGB arrays and class scores."""
import logging

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model

from .. import modeling  # noqa: F401  registers RooftopMaskFormer and its decoders (build_model)
from ..checkpoint.loading import load_model_weights
from ..data.transforms import inference_image_tensor

logger = logging.getLogger(__name__)


class RooftopPredictor(DefaultPredictor):
    """Builds the model from ``cfg``, loads ``cfg.MODEL.WEIGHTS`` and predicts one RGB image.

    Unlike ``DefaultPredictor`` it takes RGB (what :func:`rooftop_m2f.data.capetown.read_image`
    returns) and resizes only as the training configuration did: to ``ROOFTOP.INPUT_SIZE``
    squared when that is set (the 320 px variant), else not at all. Outputs are at the input's
    size.
    """

    def __init__(self, cfg):
        # DefaultPredictor.__init__, except that MODEL.WEIGHTS goes through load_model_weights
        # (model zoo / converted Hugging Face weights: class head re-initialised when the class
        # count differs, a short report, an error for weights that do not fit).
        self.cfg = cfg.clone()
        self.model = build_model(self.cfg)
        self.model.eval()
        if len(cfg.DATASETS.TEST):
            self.metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0])
        load_model_weights(self.model, self.cfg)
        self.input_format = cfg.INPUT.FORMAT
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT must be 'RGB' or 'BGR', got {self.input_format!r}")
        self.resize = int(cfg.ROOFTOP.INPUT_SIZE)
        self.num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES

    @torch.no_grad()
    def scores(self, image_rgb: np.ndarray) -> torch.Tensor:
        """Per-class scores (K, H, W) on the CPU for an (H, W, 3) uint8 RGB image."""
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {image_rgb.shape} "
                             f"{image_rgb.dtype}")
        return self.model([self._model_input(image_rgb)])[0]["sem_seg"].float().cpu()

    @torch.no_grad()
    def scores_batch(self, images_rgb):
        """:meth:`scores` of several (H, W, 3) uint8 RGB images in one forward pass (a list)."""
        for image in images_rgb:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected (H, W, 3) uint8 RGB images, got {image.shape} "
                                 f"{image.dtype}")
        outputs = self.model([self._model_input(image) for image in images_rgb])
        return [o["sem_seg"].float().cpu() for o in outputs]

    def _model_input(self, image_rgb):
        height, width = image_rgb.shape[:2]
        # the mapper's test-time preprocessing, so evaluation and prediction agree
        tensor = inference_image_tensor(image_rgb, self.input_format, self.resize)
        return {"image": tensor.to(self.cfg.MODEL.DEVICE), "height": height, "width": width}

    def __call__(self, image_rgb: np.ndarray) -> np.ndarray:
        """Class-index mask (H, W) uint8."""
        return self.scores(image_rgb).argmax(0).numpy().astype(np.uint8)
