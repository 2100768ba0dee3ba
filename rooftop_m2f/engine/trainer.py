"""``Trainer``: detectron2's ``DefaultTrainer`` with our data, evaluator and optimizer."""
import logging
import os

from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import DefaultTrainer
from detectron2.projects.deeplab import build_lr_scheduler

from ..data.mapper import RooftopSemanticDatasetMapper
from ..evaluation.sem_seg_evaluator import RooftopSemSegEvaluator
from .hooks import add_output_hooks
from .optimizer import build_optimizer

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=RooftopSemanticDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=RooftopSemanticDatasetMapper(cfg, False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
        if evaluator_type != "rooftop_sem_seg":
            raise NotImplementedError(
                f"{dataset_name}: evaluator_type {evaluator_type!r} is not 'rooftop_sem_seg'"
            )
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return RooftopSemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    def build_hooks(self):
        hooks = super().build_hooks()
        # CSV logs (train_epoch/valid_epoch/metrics_epoch_per_class.csv) and top-K best
        # checkpoints, each inserted at its place (see rooftop_m2f/engine/hooks.py).
        add_output_hooks(self, hooks)
        return hooks
