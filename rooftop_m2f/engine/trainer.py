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
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase
from detectron2.engine import hooks as d2_hooks
from detectron2.projects.deeplab import build_lr_scheduler

from .. import modeling  # noqa: F401  registers RooftopMaskFormer and its decoders (build_model)
from ..checkpoint.loading import load_model_weights
from ..checkpoint.safe_io import SafeDetectionCheckpointer
from ..checkpoint.saving import EMA_KEY, AtomicDetectionCheckpointer
from ..data.mapper import RooftopSemanticDatasetMapper
from ..data.sampler import build_repeat_factor_sampler
from ..evaluation.sem_seg_evaluator import RooftopSemSegEvaluator
from .activity import StallForTests, activity, set_activity
from .fault_tolerance import (
    AMPSkippedStepCounter,
    FiniteLossCheck,
    IgnoreSignalsInLoaderWorkers,
    StopOnSignal,
    parse_signals,
)
from .best_checkpoint import TopKBestCheckpointer
from .csv_logs import EvalCSVWriter
from .hooks import add_output_hooks
from .launching import is_one_line
from .optimizer import build_optimizer
from .run_dir import ResumeError
from .training_options import (
    EarlyStopped,
    EarlyStopping,
    EMAHook,
    ModelEMA,
    ProfileIterations,
    check_training_options,
    evaluate_with_ema,
    with_grad_accumulation,
)

logger = logging.getLogger(__name__)


def follow_configured_schedule(scheduler, optimizer, cfg, build_lr_scheduler, previous_max_iter):
    """After a resume: the LR schedule is the one ``cfg`` defines over ``[0, SOLVER.MAX_ITER)``,
    evaluated at the checkpoint's iteration; only the iteration comes from the checkpoint.

    detectron2 restores a scheduler's whole state, ``max_iters`` of the poly schedule included,
    so a run extended with a larger ``SOLVER.MAX_ITER`` kept the old length and failed one step
    past it (``math domain error``). Here the configuration's schedule is rebuilt and only its
    position (``last_epoch``) is taken from the checkpoint; the optimizer's learning rates are
    set to the schedule's values at that position, so the first resumed iteration already
    follows it. Extending a finished run therefore restarts from the LR the longer run would
    have at that iteration (a warm restart, not the ~0 LR the shorter run ended with).
    """
    position = scheduler.state_dict().get("last_epoch")
    fresh = build_lr_scheduler(cfg, optimizer)  # the configured schedule, same optimizer
    state = fresh.state_dict()
    state["last_epoch"] = position
    if "_step_count" in state:
        state["_step_count"] = max(1, int(position or 0) + 1)
    scheduler.load_state_dict(state)
    # detectron2's LRMultiplier (WarmupCosineLR, ...) keeps its schedule and length out of its
    # state_dict: without these, an extended cosine run would keep the old length
    for key in ("_multiplier", "_max_iter"):
        if hasattr(fresh, key):
            setattr(scheduler, key, getattr(fresh, key))
    lrs = scheduler.get_lr() if hasattr(scheduler, "get_lr") else None
    if lrs is not None:
        for group, lr in zip(optimizer.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = list(lrs)
    if previous_max_iter is not None and previous_max_iter != cfg.SOLVER.MAX_ITER:
        logger.info("Resuming at iteration %s with SOLVER.MAX_ITER=%d (the checkpoint's run had "
                    "%d): %s follows the schedule over %d iterations; LR now %s", position,
                    cfg.SOLVER.MAX_ITER, previous_max_iter, cfg.SOLVER.LR_SCHEDULER_NAME,
                    cfg.SOLVER.MAX_ITER, f"{lrs[0]:.4g}" if lrs else "unchanged")


def _shielded(mapper, cfg):
    """Data-loader workers ignore ROOFTOP.STOP_SIGNALS: the training process saves and stops."""
    signals = parse_signals(cfg.ROOFTOP.STOP_SIGNALS)
    return IgnoreSignalsInLoaderWorkers(mapper, signals) if signals else mapper


def _loader_timeout(cfg):
    """DataLoader's ``timeout`` (ROOFTOP.LOADER_TIMEOUT_S); PyTorch only allows it with workers."""
    if cfg.DATALOADER.NUM_WORKERS > 0 and cfg.ROOFTOP.LOADER_TIMEOUT_S > 0:
        return {"timeout": float(cfg.ROOFTOP.LOADER_TIMEOUT_S)}
    return {}


class _OneLineErrors(logging.Filter):
    """detectron2's training loop logs every exception with its traceback ("Exception during
    training:"); for the errors whose message says it all (launching.is_one_line) it becomes
    one line, the message."""

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and is_one_line(error):
            record.msg = f"{record.getMessage()} {type(error).__name__}: {error}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


logging.getLogger("detectron2.engine.train_loop").addFilter(_OneLineErrors())


class _RecordActivity(HookBase):
    """Keeps :mod:`.activity` up to date for the messages about stuck processes."""

    def before_train(self):
        set_activity(f"training (from iteration {self.trainer.start_iter})")

    def after_train(self):
        set_activity(f"ending the run after iteration {self.trainer.iter}")


class Trainer(DefaultTrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        mapper = _shielded(RooftopSemanticDatasetMapper(cfg, True), cfg)
        if cfg.ROOFTOP.REPEAT_THRESHOLD > 0:  # oversample images with rare classes
            dataset = get_detection_dataset_dicts(
                cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
            sampler = build_repeat_factor_sampler(cfg, dataset)
            return build_detection_train_loader(cfg, mapper=mapper, dataset=dataset,
                                                sampler=sampler, **_loader_timeout(cfg))
        return build_detection_train_loader(cfg, mapper=mapper, **_loader_timeout(cfg))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = _shielded(RooftopSemanticDatasetMapper(cfg, False), cfg)
        if StallForTests.wanted():
            mapper = StallForTests(mapper)
        loader = build_detection_test_loader(cfg, dataset_name, mapper=mapper)
        # detectron2's test loader takes no DataLoader arguments; the iterator reads this one
        loader.timeout = _loader_timeout(cfg).get("timeout", 0)
        return loader

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        with activity(f"evaluating {', '.join(cfg.DATASETS.TEST)}"):
            return super().test(cfg, model, evaluators)

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

    @classmethod
    def build_evaluation_model(cls, cfg, resume=False):
        """The model ``--eval-only`` evaluates: with ``--resume`` the run's last checkpoint in
        OUTPUT_DIR when there is one, else MODEL.WEIGHTS through the same loader as training and
        prediction."""
        model = cls.build_model(cfg)
        checkpointer = SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)  # data only
        if resume and checkpointer.has_checkpoint():
            checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=True)
        else:
            load_model_weights(model, cfg)
        return model

    def resume_or_load(self, resume=True):
        # --resume with a checkpoint in OUTPUT_DIR: our own full training state, as detectron2
        # does. Otherwise MODEL.WEIGHTS (model zoo .pkl, converted Hugging Face weights, a run's
        # model_*.pth) goes through load_model_weights: class head re-initialised when the class
        # count differs, ROOFTOP.LOAD_BACKBONE_ONLY, a short report, errors for what does not fit.
        if resume and self.checkpointer.has_checkpoint():
            super().resume_or_load(resume=True)
            if self.start_iter > self.max_iter:  # run_dir.check_output_dir says so earlier
                raise ResumeError(
                    f"{self.checkpointer.get_checkpoint_file()} holds {self.start_iter} completed "
                    f"iterations, more than SOLVER.MAX_ITER={self.max_iter}; a run cannot be "
                    "shortened: set SOLVER.MAX_ITER >= that, or train into another OUTPUT_DIR")
            if (self.checkpoint_max_iter is None and os.path.basename(
                    self.checkpointer.get_checkpoint_file()) == "model_final.pth"):
                # a checkpoint from before the run length was recorded: model_final ends a run
                self.checkpoint_max_iter = self.start_iter
            follow_configured_schedule(self.scheduler, self.optimizer, self.cfg,
                                       self.build_lr_scheduler, self.checkpoint_max_iter)
            return None
        load_model_weights(self.model, self.cfg)
        return None

    def train(self):
        try:
            return super().train()
        except EarlyStopped:  # model_final saved, the reason logged (ROOFTOP.EARLY_STOP)
            return getattr(self, "_last_eval_results", None)

    # The checkpoint also records the run's length, so a resume knows whether the checkpoint
    # ends a completed run (model_final) and by how much the run is extended.
    checkpoint_max_iter = None

    def state_dict(self):
        state = super().state_dict()
        state["max_iter"] = self.max_iter
        return state

    def load_state_dict(self, state_dict):
        self.checkpoint_max_iter = state_dict.get("max_iter")
        super().load_state_dict(state_dict)

    def build_hooks(self):
        cfg = self.cfg
        check_training_options(cfg)
        # ROOFTOP.GRAD_ACCUM_STEPS: detectron2's SimpleTrainer / AMPTrainer, accumulating
        if cfg.ROOFTOP.GRAD_ACCUM_STEPS > 1:
            self._trainer = with_grad_accumulation(self._trainer, cfg.ROOFTOP.GRAD_ACCUM_STEPS)
        # DefaultTrainer.__init__ created a plain DetectionCheckpointer just before calling this:
        # swap in the atomic one before any hook (periodic, best, on-signal) takes it.
        self.checkpointer = AtomicDetectionCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.ema = None
        if cfg.ROOFTOP.EMA.ENABLED:  # a checkpointable: every checkpoint holds it
            self.ema = ModelEMA(self.model, cfg.ROOFTOP.EMA.DECAY)
            self.checkpointer.add_checkpointable(EMA_KEY, self.ema)
        hooks = super().build_hooks()
        if self.ema is not None:
            # updated after each optimizer step, before the checkpointers and the evaluation,
            # which runs on the EMA weights
            at = next(i for i, h in enumerate(hooks) if isinstance(h, d2_hooks.LRScheduler))
            hooks.insert(at + 1, EMAHook(self.ema))
            for h in hooks:
                if isinstance(h, d2_hooks.EvalHook):
                    evaluate_with_ema(h, self.ema)
        # CSV logs (train_epoch/valid_epoch/metrics_epoch_per_class.csv) and top-K best
        # checkpoints, each inserted at its place (rooftop_m2f/engine/hooks.py).
        add_output_hooks(self, hooks)
        if cfg.ROOFTOP.EARLY_STOP.PATIENCE > 0:  # after the evaluation's CSV rows and best save
            metric = cfg.ROOFTOP.BEST_CHECKPOINT_METRIC
            if len(cfg.DATASETS.TEST) > 1:
                metric = f"{cfg.DATASETS.TEST[0]}/{metric}"
            at = max(i for i, h in enumerate(hooks) if isinstance(
                h, (d2_hooks.EvalHook, EvalCSVWriter, TopKBestCheckpointer)))
            hooks.insert(at + 1, EarlyStopping(self.checkpointer, metric,
                                               cfg.ROOFTOP.EARLY_STOP.PATIENCE,
                                               cfg.ROOFTOP.EARLY_STOP.MIN_DELTA,
                                               cfg.TEST.EVAL_PERIOD))
            # detectron2 places the periodic checkpointer before the evaluation: a checkpoint
            # on an evaluation iteration would miss that evaluation's count, and a resume from
            # it starts after the evaluation. After EarlyStopping, it holds the count.
            periodic = next(h for h in hooks if isinstance(h, d2_hooks.PeriodicCheckpointer))
            hooks.remove(periodic)
            hooks.insert(hooks.index(next(h for h in hooks if isinstance(h, EarlyStopping))) + 1,
                         periodic)
        if cfg.ROOFTOP.PROFILE.ENABLED:  # first: its after_step closes the trace
            hooks.insert(0, ProfileIterations(cfg.ROOFTOP.PROFILE.START_ITER,
                                              cfg.ROOFTOP.PROFILE.NUM_ITERS, cfg.OUTPUT_DIR))
        # Fault tolerance (rooftop_m2f/engine/fault_tolerance.py); StopOnSignal must come last,
        # after the LR scheduler, the checkpointers and the writers of the iteration.
        hooks.append(FiniteLossCheck(self.model))
        hooks.insert(0, _RecordActivity())
        if isinstance(self._trainer, AMPTrainer):
            hooks.append(AMPSkippedStepCounter(self._trainer.grad_scaler))
        signals = parse_signals(self.cfg.ROOFTOP.STOP_SIGNALS)
        if signals:
            hooks.append(StopOnSignal(self.checkpointer, signals))
        return hooks
