"""The training options of README "Training options", each off by default (config keys in
``rooftop_m2f/config.py``, section "training options"): EMA weights (:class:`ModelEMA`,
:class:`EMAHook`), early stopping (:class:`EarlyStopping`), gradient accumulation
(:func:`with_grad_accumulation`), profiling (:class:`ProfileIterations`), and the check of
their values (:func:`check_training_options`: one line naming the key).
"""
import contextlib
import logging
import math
import os
import re
import time

import torch
from detectron2.engine import AMPTrainer, HookBase, SimpleTrainer
from detectron2.engine import hooks as d2_hooks
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..cli import ConfigError
from ..fileio import atomic_path

logger = logging.getLogger(__name__)

# detectron2's schedulers (deeplab's build_lr_scheduler adds WarmupPolyLR to detectron2's own)
LR_SCHEDULERS = ("WarmupPolyLR", "WarmupCosineLR", "WarmupMultiStepLR",
                 "WarmupStepWithFixedGammaLR")


def check_training_options(cfg):
    """Raise a one-line :class:`ConfigError` naming the key of a bad training-option value."""
    r = cfg.ROOFTOP
    if r.EMA.ENABLED and not 0.0 < r.EMA.DECAY < 1.0:
        raise ConfigError(f"ROOFTOP.EMA.DECAY={r.EMA.DECAY}: must be in (0, 1), e.g. 0.9998")
    if int(r.EARLY_STOP.PATIENCE) != r.EARLY_STOP.PATIENCE or r.EARLY_STOP.PATIENCE < 0:
        raise ConfigError(f"ROOFTOP.EARLY_STOP.PATIENCE={r.EARLY_STOP.PATIENCE}: a number of "
                          "evaluations >= 0 (0: off)")
    if not (math.isfinite(r.EARLY_STOP.MIN_DELTA) and r.EARLY_STOP.MIN_DELTA >= 0):
        raise ConfigError(f"ROOFTOP.EARLY_STOP.MIN_DELTA={r.EARLY_STOP.MIN_DELTA}: must be >= 0")
    if r.EARLY_STOP.PATIENCE > 0 and (cfg.TEST.EVAL_PERIOD <= 0 or not cfg.DATASETS.TEST):
        raise ConfigError("ROOFTOP.EARLY_STOP.PATIENCE > 0 needs evaluations during training: "
                          "set TEST.EVAL_PERIOD (or ROOFTOP.EVAL_EVERY_EPOCHS) and DATASETS.TEST")
    if int(r.GRAD_ACCUM_STEPS) != r.GRAD_ACCUM_STEPS or r.GRAD_ACCUM_STEPS < 1:
        raise ConfigError(f"ROOFTOP.GRAD_ACCUM_STEPS={r.GRAD_ACCUM_STEPS}: an integer >= 1 "
                          "(1: off)")
    if not 0.0 <= r.LABEL_SMOOTHING < 1.0:
        raise ConfigError(f"ROOFTOP.LABEL_SMOOTHING={r.LABEL_SMOOTHING}: must be in [0, 1)")
    if not 0.0 < r.LAYER_DECAY <= 1.0:
        raise ConfigError(f"ROOFTOP.LAYER_DECAY={r.LAYER_DECAY}: must be in (0, 1] (1: off)")
    if r.PROFILE.ENABLED and (r.PROFILE.START_ITER < 0 or r.PROFILE.NUM_ITERS < 1):
        raise ConfigError(f"ROOFTOP.PROFILE.START_ITER={r.PROFILE.START_ITER} / NUM_ITERS="
                          f"{r.PROFILE.NUM_ITERS}: START_ITER >= 0 and NUM_ITERS >= 1")
    name = cfg.SOLVER.LR_SCHEDULER_NAME
    if name not in LR_SCHEDULERS:
        raise ConfigError(f"SOLVER.LR_SCHEDULER_NAME={name!r}: expected one of "
                          f"{', '.join(LR_SCHEDULERS)}")
    if name == "WarmupCosineLR" and not 0.0 <= cfg.SOLVER.BASE_LR_END <= cfg.SOLVER.BASE_LR:
        raise ConfigError(f"SOLVER.BASE_LR_END={cfg.SOLVER.BASE_LR_END}: the cosine schedule's "
                          f"final LR must be in [0, SOLVER.BASE_LR={cfg.SOLVER.BASE_LR}]")


def _unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


# --------------------------------------------------------------------------------------------
# EMA
# --------------------------------------------------------------------------------------------
class ModelEMA:
    """Exponential moving average of every entry of ``model.state_dict()`` (floating-point
    entries averaged, the others copied), a detectron2 checkpointable (``ROOFTOP.EMA``).

    Updated after every optimizer step (:class:`EMAHook`) with ``decay_t = min(DECAY, (1 + t) /
    (10 + t))`` (``t`` = updates so far). Its checkpoint entry (``"ema"``: ``updates``, ``decay``
    and the averaged ``weights``, plain tensors) lets ``--resume`` restore it exactly. When it
    is on the evaluations run on the EMA weights (:func:`evaluate_with_ema`; the valid CSVs say
    ``weights`` = ``ema``), so the best checkpoints are chosen by them, and ``model_final.pth``
    / ``model_best*.pth`` hold the EMA weights under ``"model"`` (what ``tools/predict.py`` and
    ``--eval-only`` load) and the raw weights under ``"model_raw"``
    (:func:`rooftop_m2f.checkpoint.saving.exports_ema` and the checkpointer)."""

    def __init__(self, model, decay: float):
        self.model = _unwrap(model)
        self.decay = float(decay)
        self.updates = 0
        self.loaded = False  # set when a checkpoint's state was loaded
        self.weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def decay_at(self, t: int) -> float:
        """The decay of update ``t`` (0-based): ``min(DECAY, (1 + t) / (10 + t))``."""
        return min(self.decay, (1.0 + t) / (10.0 + t))

    def reset(self):
        """Start again from the model's current weights."""
        self.weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self):
        d = self.decay_at(self.updates)
        for k, v in self.model.state_dict().items():
            e = self.weights[k]
            if e.is_floating_point():
                e.mul_(d).add_(v.detach().to(e.dtype), alpha=1.0 - d)
            else:
                e.copy_(v)
        self.updates += 1

    def state_dict(self):
        return {"updates": int(self.updates), "decay": float(self.decay),
                "weights": dict(self.weights)}

    def load_state_dict(self, state):
        weights = state.get("weights") or {}
        missing = sorted(set(self.weights) - set(weights))
        unexpected = sorted(set(weights) - set(self.weights))
        if missing or unexpected:
            raise ValueError(f"the checkpoint's EMA weights do not fit the model: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for k, v in weights.items():
                self.weights[k].copy_(v)
        self.updates = int(state["updates"])
        self.loaded = True

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the EMA weights inside the block, its own ones again after it."""
        current = self.model.state_dict()
        raw = {k: v.detach().clone() for k, v in current.items()}
        with torch.no_grad():
            for k, v in current.items():
                v.copy_(self.weights[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in current.items():
                    v.copy_(raw[k])


class EMAHook(HookBase):
    """Updates the :class:`ModelEMA` after every optimizer step (``after_step``); a run that did
    not load an EMA state from its checkpoint starts it from the weights training starts with
    (after ``MODEL.WEIGHTS`` or a checkpoint without EMA)."""

    def __init__(self, ema: ModelEMA):
        self.ema = ema

    def before_train(self):
        if not self.ema.loaded:
            if self.trainer.start_iter > 0:
                logger.warning("ROOFTOP.EMA: the checkpoint has no EMA state; the average starts "
                               "at iteration %d from the resumed weights", self.trainer.start_iter)
            self.ema.reset()

    def after_step(self):
        self.ema.update()


def evaluate_with_ema(eval_hook, ema: ModelEMA):
    """Make detectron2's ``EvalHook`` evaluate the EMA weights."""
    func = eval_hook._func

    def evaluate_ema():
        with ema.swapped_in():
            return func()

    eval_hook._func = evaluate_ema


# --------------------------------------------------------------------------------------------
# Early stopping
# --------------------------------------------------------------------------------------------
class EarlyStopped(BaseException):
    """Ends detectron2's training loop after :class:`EarlyStopping` saved ``model_final``
    (a ``BaseException``: not an error, so detectron2 does not log it as one)."""


class EarlyStopping(HookBase):
    """After each periodic evaluation (``TEST.EVAL_PERIOD``): ``metric`` better than the best by
    more than ``min_delta`` resets the count, otherwise it grows; at ``patience`` the run stops
    (``ROOFTOP.EARLY_STOP``): ``model_final.pth`` is saved (with the hook's state, ``stopped``),
    a log line says why and where the best was, and :class:`EarlyStopped` ends the training
    loop; ``--resume`` of it says so in one line (:func:`stopped_run_message`, called by the
    launcher's preflight). Place it after the ``EvalHook`` and the best checkpointer. The
    decision is taken on the main process (which has the metric) and shared with the others."""

    def __init__(self, checkpointer, metric: str, patience: int, min_delta: float,
                 eval_period: int):
        self.checkpointer = checkpointer
        self.metric = metric
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.eval_period = int(eval_period)
        self.best = None
        self.best_iteration = None
        self.best_evaluation = None
        self.evaluations = 0
        self.bad = 0
        self.stopped = False
        self.reason = ""

    def state_dict(self):
        return {"best": self.best, "best_iteration": self.best_iteration,
                "best_evaluation": self.best_evaluation, "evaluations": self.evaluations,
                "bad": self.bad, "stopped": self.stopped, "reason": self.reason}

    def load_state_dict(self, state):
        for key in ("best", "best_iteration", "best_evaluation", "evaluations", "bad", "stopped",
                    "reason"):
            if key in state:
                setattr(self, key, state[key])

    def observe(self, iteration: int, score: float) -> bool:
        """Count one evaluation after ``iteration`` completed iterations; True: stop."""
        self.evaluations += 1
        if self.best is None or score > self.best + self.min_delta:
            self.best, self.best_iteration, self.best_evaluation = score, iteration, self.evaluations
            self.bad = 0
        else:
            self.bad += 1
        if self.bad < self.patience:
            return False
        self.reason = (f"early stopping (ROOFTOP.EARLY_STOP) after evaluation {self.evaluations} "
                       f"(iteration {iteration}): {self.metric} has not improved by more than "
                       f"MIN_DELTA={self.min_delta:g} for PATIENCE={self.patience} evaluations; "
                       f"the best, {self.best:.4f}, was evaluation {self.best_evaluation} "
                       f"(iteration {self.best_iteration})")
        return True

    def after_step(self):
        next_iter = self.trainer.iter + 1
        if (self.eval_period <= 0 or next_iter % self.eval_period != 0
                or next_iter >= self.trainer.max_iter):  # the last evaluation ends the run anyway
            return
        stop = False
        if comm.is_main_process():
            value = self.trainer.storage.latest().get(self.metric)
            if value is None or value[1] != self.trainer.iter:
                logger.warning("%s was not computed at iteration %d; not counted by early "
                               "stopping", self.metric, next_iter)
            elif not math.isfinite(float(value[0])):
                logger.warning("%s = %s at iteration %d; not counted by early stopping",
                               self.metric, value[0], next_iter)
            else:
                stop = self.observe(next_iter, float(value[0]))
        if comm.get_world_size() > 1:
            stop = any(comm.all_gather(stop))
        if stop:
            self.stopped = True
            self.checkpointer.save("model_final", iteration=self.trainer.iter)
            comm.synchronize()
            logger.info("Training stopped by %s; model_final.pth saved", self.reason)
            raise EarlyStopped(self.reason)


def stopped_run_message(checkpoint_data, path):
    """The one line for ``--resume`` of a run that early stopping ended, or None."""
    trainer = checkpoint_data.get("trainer") if isinstance(checkpoint_data, dict) else None
    state = ((trainer or {}).get("hooks") or {}).get(EarlyStopping.__qualname__) or {}
    if not state.get("stopped"):
        return None
    return (f"{path}: this run was ended by {state.get('reason') or 'early stopping'}; nothing "
            "to resume (to train on anyway: ROOFTOP.EARLY_STOP.PATIENCE 0 and --resume)")


class RunEndedByEarlyStopping(Exception):
    """``--resume`` of a run that early stopping ended: the launcher prints it and exits 0."""


# --------------------------------------------------------------------------------------------
# Gradient accumulation
# --------------------------------------------------------------------------------------------
class _Accumulating:
    """``run_step`` over ``accum_steps`` micro-batches: each loss divided by N, DDP's gradient
    all-reduce only on the last (``no_sync`` before), then one optimizer step (where the
    gradient clipping of ``SOLVER.CLIP_GRADIENTS`` and, under AMP, the unscale happen once).
    The logged losses are the means over the micro-batches; ``data_time`` their sum."""

    accum_steps = 1

    def _forward(self, data):
        return self.model(data)

    def _backward(self, loss):
        loss.backward()

    def _optimizer_step(self):
        self.optimizer.step()

    def run_step(self):
        assert self.model.training, "[accumulating trainer] model was changed to eval mode!"
        n = int(self.accum_steps)
        self.optimizer.zero_grad()
        sums, data_time = {}, 0.0
        for k in range(n):
            start = time.perf_counter()
            data = next(self._data_loader_iter)
            data_time += time.perf_counter() - start
            last = k == n - 1
            sync = contextlib.nullcontext() if last or not isinstance(
                self.model, DistributedDataParallel) else self.model.no_sync()
            with sync:
                loss_dict = self._forward(data)
                if isinstance(loss_dict, torch.Tensor):
                    loss_dict = {"total_loss": loss_dict}
                self._backward(sum(loss_dict.values()) / n)
            for key, value in loss_dict.items():
                sums[key] = sums.get(key, 0.0) + value.detach() / n
        self.after_backward()
        self._write_metrics(sums, data_time)
        self._optimizer_step()


class AccumulatingTrainer(_Accumulating, SimpleTrainer):
    def __init__(self, model, data_loader, optimizer, accum_steps):
        super().__init__(model, data_loader, optimizer)
        self.accum_steps = int(accum_steps)


class AccumulatingAMPTrainer(_Accumulating, AMPTrainer):
    def __init__(self, model, data_loader, optimizer, accum_steps, grad_scaler, precision):
        super().__init__(model, data_loader, optimizer, grad_scaler=grad_scaler,
                         precision=precision)
        self.accum_steps = int(accum_steps)

    def _forward(self, data):
        with torch.autocast("cuda", dtype=self.precision):
            return self.model(data)

    def _backward(self, loss):
        self.grad_scaler.scale(loss).backward()

    def _optimizer_step(self):
        self.grad_scaler.step(self.optimizer)  # unscales once, then the (clipping) step
        self.grad_scaler.update()


def with_grad_accumulation(trainer, accum_steps: int):
    """detectron2's ``SimpleTrainer`` / ``AMPTrainer`` ``trainer`` as its accumulating subclass
    (same model, data loader, optimizer and grad scaler)."""
    if isinstance(trainer, AMPTrainer):
        return AccumulatingAMPTrainer(trainer.model, trainer.data_loader, trainer.optimizer,
                                      accum_steps, trainer.grad_scaler, trainer.precision)
    return AccumulatingTrainer(trainer.model, trainer.data_loader, trainer.optimizer, accum_steps)


# --------------------------------------------------------------------------------------------
# Profiling
# --------------------------------------------------------------------------------------------
TOP_OPS_FILE = "profiler-top-ops-iter{}.txt"


class ProfileIterations(d2_hooks.TorchProfiler):
    """detectron2's ``TorchProfiler`` for iterations ``[start, start + num)``: a TensorBoard trace
    per iteration in ``OUTPUT_DIR/log/profiler-tensorboard-iter<N>/``, and the 25 operators with
    the most self time in ``OUTPUT_DIR/profiler-top-ops-iter<N>.txt`` (main process)."""

    def __init__(self, start: int, num: int, output_dir: str):
        super().__init__(lambda trainer: start <= trainer.iter < start + num, output_dir)
        self.output_dir = output_dir
        self._profiler = None

    def after_step(self):
        profiler = self._profiler
        super().after_step()
        if profiler is None or not comm.is_main_process():
            return
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        table = profiler.key_averages().table(sort_by=sort, row_limit=25)
        path = os.path.join(self.output_dir, TOP_OPS_FILE.format(self.trainer.iter))
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write(table + "\n")
        logger.info("Profiler: iteration %d traced into %s; top operators in %s",
                    self.trainer.iter, os.path.join(self.output_dir, "log"), path)


def layer_decay_stage(param_name: str):
    """The Swin stage of a backbone parameter for ``ROOFTOP.LAYER_DECAY``: 0 for the patch
    embedding (and absolute position embedding), ``i + 1`` for ``layers.i`` (its blocks and
    the patch merging at its end) and ``norm<i>`` (stage i's output norm); None otherwise."""
    if re.match(r"^backbone\.(patch_embed\.|absolute_pos_embed$)", param_name):
        return 0
    match = re.match(r"^backbone\.(?:layers\.(\d+)\.|norm(\d+)\.)", param_name)
    if match:
        return int(match.group(1) or match.group(2)) + 1
    return None
