"""``Trainer``: detectron2's ``DefaultTrainer`` with our data, evaluator, optimizer, atomic
checkpoints, training options and the hooks of a run, in the order of :meth:`build_hooks`."""
import contextlib
import logging
import os
import weakref

from detectron2.data import (MetadataCatalog, build_detection_test_loader,
                             build_detection_train_loader, get_detection_dataset_dicts)
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine import hooks as d2_hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.projects.deeplab import build_lr_scheduler
from detectron2.utils import comm

from .. import modeling  # noqa: F401  registers RooftopMaskFormer and its decoders
from ..checkpoint.loading import load_model_weights
from ..checkpoint.safe_io import SafeDetectionCheckpointer
from ..checkpoint.saving import EMA_KEY, AtomicDetectionCheckpointer
from ..data.mapper import RooftopSemanticDatasetMapper
from ..data.sampler import build_repeat_factor_sampler
from ..evaluation.sem_seg_evaluator import RooftopSemSegEvaluator
from .best_checkpoint import TopKBestCheckpointer
from .csv_logs import EpochCSVWriter, EvalCSVWriter
from .epochs import iters_per_epoch
from .fault_tolerance import (AMPSkippedStepCounter, FiniteLossCheck, IgnoreSignalsInLoaderWorkers,
                              StopOnSignal, parse_signals)
from .launch import one_line_message
from .optimizer import build_optimizer
from .training_options import (AccumulatingAMPTrainer, AccumulatingTrainer, EarlyStopped,
                               EarlyStopping, EMAHook, ModelEMA, ProfileIterations)

logger = logging.getLogger(__name__)


def continue_schedule(scheduler, position):
    """Put a freshly built LR scheduler at ``position`` (its ``last_epoch``), the optimizer's
    learning rates with it: the configured schedule, evaluated there."""
    scheduler.last_epoch = int(position) - 1
    scheduler.step()


class _WithoutOneLineErrors(logging.Filter):
    """Drops detectron2's traceback of an error that is reported in one line
    (:func:`.launch.one_line_message`); :meth:`Trainer.train` logs that line."""

    def filter(self, record):
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, Exception) and one_line_message(error) is not None)


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        """detectron2's construction, with our choices: the accumulating ``SimpleTrainer`` /
        ``AMPTrainer`` for ``ROOFTOP.GRAD_ACCUM_STEPS`` > 1, the atomic checkpointer holding the
        EMA (``ROOFTOP.EMA``), and the hooks of :meth:`build_hooks`."""
        TrainerBase.__init__(self)
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        amp, steps = cfg.SOLVER.AMP.ENABLED, int(cfg.ROOFTOP.GRAD_ACCUM_STEPS)
        if steps > 1:
            inner = (AccumulatingAMPTrainer if amp else AccumulatingTrainer)(
                model, data_loader, optimizer, accum_steps=steps)
        else:
            inner = (AMPTrainer if amp else SimpleTrainer)(model, data_loader, optimizer)
        self._trainer = inner
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.ema = ModelEMA(model, cfg.ROOFTOP.EMA.DECAY) if cfg.ROOFTOP.EMA.ENABLED else None
        self.checkpointer = AtomicDetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self), **({EMA_KEY: self.ema} if self.ema else {}))
        self.start_iter, self.max_iter, self.cfg = 0, cfg.SOLVER.MAX_ITER, cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_train_loader(cls, cfg):
        mapper = _shielded(RooftopSemanticDatasetMapper(cfg, True), cfg)
        kwargs = {"mapper": mapper, **_loader_timeout(cfg)}
        if cfg.ROOFTOP.REPEAT_THRESHOLD > 0:  # oversample images with rare classes
            kwargs["dataset"] = get_detection_dataset_dicts(
                cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
            kwargs["sampler"] = build_repeat_factor_sampler(cfg, kwargs["dataset"])
        return build_detection_train_loader(cfg, **kwargs)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        mapper = _shielded(RooftopSemanticDatasetMapper(cfg, False), cfg)
        loader = build_detection_test_loader(cfg, dataset_name, mapper=mapper)
        loader.timeout = _loader_timeout(cfg).get("timeout", 0)  # read by its iterators
        return loader

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
        if evaluator_type != "rooftop_sem_seg":
            raise NotImplementedError(
                f"{dataset_name}: evaluator_type {evaluator_type!r} is not 'rooftop_sem_seg'")
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
        """The model ``--eval-only`` evaluates: with ``--resume`` the run's last checkpoint when
        there is one, else MODEL.WEIGHTS through the loader of training and prediction."""
        model = cls.build_model(cfg)
        checkpointer = SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        if resume and checkpointer.has_checkpoint():
            checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=True)
        else:
            load_model_weights(model, cfg)
        return model

    def build_hooks(self):
        """In this order: the profiler (its ``after_step`` closes a trace), detectron2's timer
        and LR scheduler, the EMA update, the NaN check, AMP's skipped steps, the training CSV
        (it reads the timer's and scheduler's scalars of the iteration), the evaluation (on the
        EMA weights with EMA on), its CSVs and best checkpoints, early stopping, the periodic
        checkpoint (it holds all their state of the iteration), the writers, the stop signal."""
        cfg, main, r = self.cfg, comm.is_main_process(), self.cfg.ROOFTOP
        tests = list(cfg.DATASETS.TEST)
        metric = f"{tests[0]}/{r.BEST_CHECKPOINT_METRIC}" if len(tests) > 1 else r.BEST_CHECKPOINT_METRIC
        epochs = EpochCSVWriter(cfg.OUTPUT_DIR, iters_per_epoch(cfg)) if r.CSV_LOGS else None
        signals = parse_signals(r.STOP_SIGNALS)
        names = (MetadataCatalog.get(tests[0]).get("stuff_classes", None) or []) if tests else []
        prefixes = {n: ("" if len(tests) == 1 else f"{n}/") + "sem_seg/" for n in tests}
        hooks = [
            ProfileIterations(r.PROFILE.START_ITER, r.PROFILE.NUM_ITERS, cfg.OUTPUT_DIR) if r.PROFILE.ENABLED else None,
            d2_hooks.IterationTimer(),
            d2_hooks.LRScheduler(),
            EMAHook(self.ema) if self.ema else None,
            FiniteLossCheck(self.model),
            AMPSkippedStepCounter(self._trainer.grad_scaler) if isinstance(self._trainer, AMPTrainer) else None,
            epochs,
            d2_hooks.EvalHook(cfg.TEST.EVAL_PERIOD, self._evaluate),
            EvalCSVWriter(cfg.OUTPUT_DIR, epochs.clock, prefixes, names, "ema" if self.ema else "raw")
            if tests and epochs else None,  # the training CSV's clock: one epoch numbering
            TopKBestCheckpointer(self.checkpointer, cfg.OUTPUT_DIR, metric, r.BEST_CHECKPOINT_TOPK)
            if tests and main and r.BEST_CHECKPOINT_TOPK > 0 else None,
            EarlyStopping(self.checkpointer, metric, r.EARLY_STOP.PATIENCE, r.EARLY_STOP.MIN_DELTA,
                          cfg.TEST.EVAL_PERIOD) if r.EARLY_STOP.PATIENCE > 0 else None,
            d2_hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD) if main else None,
            d2_hooks.PeriodicWriter(self.build_writers(), period=20) if main else None,
            StopOnSignal(self.checkpointer, signals) if signals else None,
        ]
        return [h for h in hooks if h is not None]

    def _evaluate(self):
        with self.ema.swapped_in() if self.ema else contextlib.nullcontext():
            self._last_eval_results = self.test(self.cfg, self.model)
        return self._last_eval_results

    def resume_or_load(self, resume=True):
        """``--resume`` with a checkpoint in OUTPUT_DIR: the full training state; otherwise
        MODEL.WEIGHTS through :func:`.load_model_weights` (a class head of another class
        count re-initialised, ``ROOFTOP.LOAD_BACKBONE_ONLY``, a short report)."""
        if resume and self.checkpointer.has_checkpoint():
            return super().resume_or_load(resume=True)
        load_model_weights(self.model, self.cfg)
        return None

    def train(self):
        """detectron2's loop; an error reported in one line is logged as that line."""
        train_loop, quiet = logging.getLogger("detectron2.engine.train_loop"), _WithoutOneLineErrors()
        train_loop.addFilter(quiet)
        try:
            return super().train()
        except EarlyStopped:  # model_final saved, the reason logged
            return getattr(self, "_last_eval_results", None)
        except Exception as e:
            if one_line_message(e) is not None:
                logger.error("Training stopped: %s", one_line_message(e))
            raise
        finally:
            train_loop.removeFilter(quiet)

    def state_dict(self):
        # the run's length: a resume knows by how much the run is extended
        return {**super().state_dict(), "max_iter": self.max_iter}

    def load_state_dict(self, state_dict):
        """The checkpoint's state, except the LR schedule: only its position is taken, the
        schedule is the one the config defines over ``[0, SOLVER.MAX_ITER)`` (a run extended
        by a larger ``SOLVER.MAX_ITER`` follows the longer schedule from there)."""
        hooks = dict(state_dict.get("hooks", {}))
        schedule = hooks.pop("LRScheduler", None)
        super().load_state_dict({**state_dict, "hooks": hooks})
        if schedule is None:
            return
        continue_schedule(self.scheduler, schedule["last_epoch"])
        if state_dict.get("max_iter") not in (None, self.max_iter):
            logger.info("Resuming at iteration %d with SOLVER.MAX_ITER=%d (the checkpoint's run had "
                        "%d): %s follows the schedule over %d iterations; LR now %.4g",
                        schedule["last_epoch"], self.max_iter, state_dict["max_iter"],
                        self.cfg.SOLVER.LR_SCHEDULER_NAME, self.max_iter,
                        self.optimizer.param_groups[0]["lr"])


def _shielded(mapper, cfg):
    """Data-loader workers ignore ROOFTOP.STOP_SIGNALS: the training process saves and stops."""
    signals = parse_signals(cfg.ROOFTOP.STOP_SIGNALS)
    return IgnoreSignalsInLoaderWorkers(mapper, signals) if signals else mapper


def _loader_timeout(cfg):
    """DataLoader's ``timeout`` (ROOFTOP.LOADER_TIMEOUT_S); PyTorch allows it with workers only."""
    if cfg.DATALOADER.NUM_WORKERS > 0 and cfg.ROOFTOP.LOADER_TIMEOUT_S > 0:
        return {"timeout": float(cfg.ROOFTOP.LOADER_TIMEOUT_S)}
    return {}
