"""The training options of docs/ADVANCED.md, "Training options", each off by default: the EMA of the
weights (:class:`ModelEMA`, :class:`EMAHook`), early stopping (:class:`EarlyStopping`),
gradient accumulation (:class:`AccumulatingTrainer`, :class:`AccumulatingAMPTrainer`),
profiling (:class:`ProfileIterations`), and the check of their values."""
import contextlib
import logging
import os
import time

import torch
from detectron2.engine import AMPTrainer, HookBase, SimpleTrainer
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..cli import ConfigError
from ..fileio import write_text_atomic
from .csv_logs import evaluated

logger = logging.getLogger(__name__)

# detectron2's schedulers (deeplab's build_lr_scheduler adds WarmupPolyLR)
LR_SCHEDULERS = ("WarmupPolyLR", "WarmupCosineLR", "WarmupMultiStepLR", "WarmupStepWithFixedGammaLR")


def check_training_options(cfg):
    """Raise a one-line :class:`ConfigError` for training options that do not fit together
    (the range of each value is :func:`rooftop_m2f.config.validate`'s)."""
    s, stop = cfg.SOLVER, cfg.ROOFTOP.EARLY_STOP
    rules = [
        (stop.PATIENCE > 0 and (cfg.TEST.EVAL_PERIOD <= 0 or not cfg.DATASETS.TEST),
         "ROOFTOP.EARLY_STOP.PATIENCE > 0 needs evaluations during training: set "
         "TEST.EVAL_PERIOD (or ROOFTOP.EVAL_EVERY_EPOCHS) and DATASETS.TEST"),
        (s.LR_SCHEDULER_NAME not in LR_SCHEDULERS, f"SOLVER.LR_SCHEDULER_NAME={s.LR_SCHEDULER_NAME!r}: "
                                                   f"expected one of {', '.join(LR_SCHEDULERS)}"),
        (s.LR_SCHEDULER_NAME == "WarmupCosineLR" and not 0.0 <= s.BASE_LR_END <= s.BASE_LR,
         f"SOLVER.BASE_LR_END={s.BASE_LR_END}: the cosine schedule's final LR must be in "
         f"[0, SOLVER.BASE_LR={s.BASE_LR}]"),
        (cfg.TEST.PRECISE_BN.ENABLED, "TEST.PRECISE_BN.ENABLED: not supported (the model has no "
                                      "batch norm to recompute)"),
    ]
    for bad, message in rules:
        if bad:
            raise ConfigError(message)


class ModelEMA:
    """Exponential moving average of every entry of ``model.state_dict()`` (floating-point
    entries averaged, the others copied), a detectron2 checkpointable (``"ema"``: ``updates``,
    ``decay``, ``weights``), updated with ``decay_t = min(DECAY, (1 + t) / (10 + t))``."""

    def __init__(self, model, decay: float):
        self.model = model.module if isinstance(model, DistributedDataParallel) else model
        self.decay, self.loaded = float(decay), False  # loaded: from a checkpoint
        self.reset()

    def decay_at(self, t: int) -> float:
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
            e.mul_(d).add_(v.to(e.dtype), alpha=1.0 - d) if e.is_floating_point() else e.copy_(v)
        self.updates += 1

    def state_dict(self):
        return {"updates": int(self.updates), "decay": float(self.decay), "weights": dict(self.weights)}

    @torch.no_grad()
    def load_state_dict(self, state):
        weights = state.get("weights") or {}
        if set(weights) != set(self.weights):
            raise ValueError(f"the checkpoint's EMA weights do not fit the model: missing "
                             f"{sorted(set(self.weights) - set(weights))[:5]}, unexpected "
                             f"{sorted(set(weights) - set(self.weights))[:5]}")
        for k, v in weights.items():
            self.weights[k].copy_(v)
        self.updates, self.loaded = int(state["updates"]), True

    @contextlib.contextmanager
    def swapped_in(self):
        """The model holds the EMA weights inside the block, its own ones again after it."""
        current = self.model.state_dict()  # the model's own tensors: copied into in place
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
    """Updates the :class:`ModelEMA` after every optimizer step; without an EMA state from the
    checkpoint the average starts from the weights training starts with."""

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


class EarlyStopped(BaseException):
    """Ends detectron2's training loop after :class:`EarlyStopping` saved ``model_final``
    (not an ``Exception``: detectron2 does not log it as an error)."""


class EarlyStopping(HookBase):
    """After each periodic evaluation: ``metric`` better than the best by more than
    ``min_delta`` resets the count, otherwise it grows; at ``patience`` the main process decides
    to stop, ``model_final.pth`` is saved (with this hook's state, ``stopped``), a line says why
    and :class:`EarlyStopped` ends the loop. Place it after the evaluation and before the
    periodic checkpointer (a checkpoint then holds the evaluation's count)."""

    STATE = ("best", "best_iteration", "best_evaluation", "evaluations", "bad", "stopped", "reason")

    def __init__(self, checkpointer, metric: str, patience: int, min_delta: float, eval_period: int):
        self.checkpointer, self.metric = checkpointer, metric
        self.patience, self.min_delta, self.eval_period = int(patience), float(min_delta), int(eval_period)
        self.best = self.best_iteration = self.best_evaluation = None
        self.evaluations = self.bad = 0
        self.stopped, self.reason = False, ""

    def state_dict(self):
        return {key: getattr(self, key) for key in self.STATE}

    def load_state_dict(self, state):
        for key in set(self.STATE) & set(state):
            setattr(self, key, state[key])

    def observe(self, iteration: int, score: float) -> bool:
        """Count one evaluation after ``iteration`` completed iterations; True: stop."""
        self.evaluations += 1
        if self.best is None or score > self.best + self.min_delta:
            self.best, self.best_iteration, self.best_evaluation, self.bad = score, iteration, self.evaluations, 0
        else:
            self.bad += 1
        self.reason = (f"early stopping (ROOFTOP.EARLY_STOP) after evaluation {self.evaluations} "
                       f"(iteration {iteration}): {self.metric} has not improved by more than "
                       f"MIN_DELTA={self.min_delta:g} for PATIENCE={self.patience} evaluations; "
                       f"the best, {self.best:.4f}, was evaluation {self.best_evaluation} "
                       f"(iteration {self.best_iteration})")
        return self.bad >= self.patience

    def after_step(self):
        done = self.trainer.iter + 1
        if self.eval_period <= 0 or done % self.eval_period or done >= self.trainer.max_iter:
            return  # the last evaluation ends the run anyway
        stop = False
        if comm.is_main_process():
            value = evaluated(self.trainer, self.metric)
            if value is None:
                logger.warning("%s is not a number at iteration %d; not counted by early stopping",
                               self.metric, done)
            else:
                stop = self.observe(done, value)
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


class _Accumulating:
    """``run_step`` over ``accum_steps`` micro-batches: each loss divided by N, DDP's gradient
    all-reduce on the last only (``no_sync`` before), then one optimizer step (clipping and,
    under AMP, scaled backward passes and one scaler step). The logged losses are the
    micro-batches' means."""

    def __init__(self, *args, accum_steps, **kwargs):
        super().__init__(*args, **kwargs)
        self.accum_steps, self.batches = int(accum_steps), None  # the loader's iterator

    def run_step(self):
        assert self.model.training, "[accumulating trainer] model was changed to eval mode!"
        n, ddp, amp = self.accum_steps, isinstance(self.model, DistributedDataParallel), isinstance(self, AMPTrainer)
        self.batches = self.batches or iter(self.data_loader)
        self.optimizer.zero_grad()
        sums, data_time = {}, 0.0
        for k in range(n):
            start = time.perf_counter()
            data = next(self.batches)
            data_time += time.perf_counter() - start
            with self.model.no_sync() if ddp and k < n - 1 else contextlib.nullcontext():
                with torch.autocast("cuda", dtype=self.precision) if amp else contextlib.nullcontext():
                    loss_dict = self.model(data)
                loss_dict = {"total_loss": loss_dict} if isinstance(loss_dict, torch.Tensor) else loss_dict
                loss = sum(loss_dict.values()) / n
                (self.grad_scaler.scale(loss) if amp else loss).backward()
            for key, value in loss_dict.items():
                sums[key] = sums.get(key, 0.0) + value.detach() / n
        self.after_backward()
        SimpleTrainer.write_metrics(sums, data_time, self.iter)
        if amp:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()


class AccumulatingTrainer(_Accumulating, SimpleTrainer):
    """detectron2's ``SimpleTrainer``, accumulating (``ROOFTOP.GRAD_ACCUM_STEPS``)."""


class AccumulatingAMPTrainer(_Accumulating, AMPTrainer):
    """detectron2's ``AMPTrainer``, accumulating."""


class ProfileIterations(HookBase):
    """``torch.profiler`` over iterations ``[start, start + num)``: a TensorBoard trace per
    iteration in ``OUTPUT_DIR/log/profiler-tensorboard-iter<N>/`` and the 25 operators with the
    most self time in ``OUTPUT_DIR/profiler-top-ops-iter<N>.txt`` (main process)."""

    def __init__(self, start: int, num: int, output_dir: str):
        self.iterations, self.output_dir, self.profiler = range(start, start + num), output_dir, None

    def before_step(self):
        if self.trainer.iter in self.iterations:
            trace = os.path.join(self.output_dir, "log", f"profiler-tensorboard-iter{self.trainer.iter}")
            self.profiler = torch.profiler.profile(
                on_trace_ready=torch.profiler.tensorboard_trace_handler(trace, f"worker{comm.get_rank()}"),
                record_shapes=True, profile_memory=True, with_stack=True, with_flops=True)
            self.profiler.__enter__()

    def after_step(self):
        profiler, self.profiler = self.profiler, None
        if profiler is None:
            return
        profiler.__exit__(None, None, None)
        if comm.is_main_process():
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            path = os.path.join(self.output_dir, f"profiler-top-ops-iter{self.trainer.iter}.txt")
            write_text_atomic(path, profiler.key_averages().table(sort_by=sort, row_limit=25) + "\n")
            logger.info("Profiler: iteration %d traced into %s; top operators in %s",
                        self.trainer.iter, os.path.join(self.output_dir, "log"), path)
