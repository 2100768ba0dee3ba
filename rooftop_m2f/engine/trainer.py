"""``Trainer``: detectron2's ``DefaultTrainer`` with our data, evaluator and optimizer."""
import logging
import os
import weakref

from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import AMPTrainer, DefaultTrainer
from detectron2.projects.deeplab import build_lr_scheduler

from ..data.mapper import RooftopSemanticDatasetMapper
from ..data.sampler import build_repeat_factor_sampler
from ..evaluation.sem_seg_evaluator import RooftopSemSegEvaluator
from ..modeling.checkpoint_loading import load_model_weights
from .checkpoint import AtomicDetectionCheckpointer
from .fault_tolerance import (
    AMPSkippedStepCounter,
    FiniteLossCheck,
    IgnoreSignalsInLoaderWorkers,
    StopOnSignal,
    parse_signals,
)
from .hooks import add_output_hooks
from .optimizer import build_optimizer

logger = logging.getLogger(__name__)


def _shielded(mapper, cfg):
    """Data-loader workers ignore ROOFTOP.STOP_SIGNALS: the training process saves and stops."""
    signals = parse_signals(cfg.ROOFTOP.STOP_SIGNALS)
    return IgnoreSignalsInLoaderWorkers(mapper, signals) if signals else mapper


def align_schedule_length(scheduler, max_iter):
    """Make a resumed LR scheduler run to ``max_iter``. The schedulers save their length with
    their state (the poly schedule ``max_iters``, detectron2's ``LRMultiplier`` ``_max_iter``),
    so a run resumed with a larger SOLVER.MAX_ITER kept the old length and, past it, the poly
    schedule raised ``math domain error``. Returns the old length when it changed, else None."""
    for attr in ("max_iters", "_max_iter"):
        old = getattr(scheduler, attr, None)
        if isinstance(old, int) and old != max_iter:
            setattr(scheduler, attr, max_iter)
            return old
    return None


class Trainer(DefaultTrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        mapper = _shielded(RooftopSemanticDatasetMapper(cfg, True), cfg)
        if cfg.ROOFTOP.REPEAT_THRESHOLD > 0:  # oversample images with rare classes
            dataset = get_detection_dataset_dicts(
                cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
            sampler = build_repeat_factor_sampler(cfg, dataset)
            return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset, sampler=sampler)
        return build_detection_train_loader(cfg, mapper=mapper)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=_shielded(RooftopSemanticDatasetMapper(cfg, False), cfg)
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

    def resume_or_load(self, resume=True):
        # --resume with a checkpoint in OUTPUT_DIR: our own full training state, as detectron2
        # does. Otherwise MODEL.WEIGHTS (model zoo .pkl, converted Hugging Face weights, a run's
        # model_*.pth) goes through load_model_weights: class head re-initialised when the class
        # count differs, ROOFTOP.LOAD_BACKBONE_ONLY, a short report, errors for what does not fit.
        if resume and self.checkpointer.has_checkpoint():
            result = super().resume_or_load(resume=True)
            old = align_schedule_length(self.scheduler, self.max_iter)
            if old is not None:
                logger.warning("--resume: the checkpoint's LR schedule was for %d iterations; it "
                               "now runs to SOLVER.MAX_ITER %d", old, self.max_iter)
            return result
        load_model_weights(self.model, self.cfg)

    def build_hooks(self):
        # DefaultTrainer.__init__ created a plain DetectionCheckpointer just before calling this:
        # swap in the atomic one before any hook (periodic, best, on-signal) takes it.
        self.checkpointer = AtomicDetectionCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        hooks = super().build_hooks()
        # CSV logs (train_epoch/valid_epoch/metrics_epoch_per_class.csv) and top-K best
        # checkpoints, each inserted at its place (see rooftop_m2f/engine/hooks.py).
        add_output_hooks(self, hooks)
        # Fault tolerance (rooftop_m2f/engine/fault_tolerance.py); StopOnSignal must come last,
        # after the LR scheduler, the checkpointers and the writers of the iteration.
        hooks.append(FiniteLossCheck(self.model))
        if isinstance(self._trainer, AMPTrainer):
            hooks.append(AMPSkippedStepCounter(self._trainer.grad_scaler))
        signals = parse_signals(self.cfg.ROOFTOP.STOP_SIGNALS)
        if signals:
            hooks.append(StopOnSignal(self.checkpointer, signals))
        return hooks
