"""Hooks that make a run stop loudly or cleanly, never silently or half-way: NaN/inf checks of
every forward pass (:class:`FiniteLossCheck`), AMP's skipped steps counted
(:class:`AMPSkippedStepCounter`), a checkpoint and a clean stop on a signal
(:class:`StopOnSignal`), and data-loader workers that survive that signal
(:class:`IgnoreSignalsInLoaderWorkers`)."""
import logging
import math
import multiprocessing
import os
import signal
from collections.abc import Mapping

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..cli import UserError

logger = logging.getLogger(__name__)


class NonFiniteLossError(UserError, FloatingPointError):
    """A loss term or a model output was NaN or infinite; the message names the iteration."""


class TrainingInterrupted(SystemExit):
    """Raised on every process after a stop signal, once the checkpoint is saved; its exit
    status is 128 + the signal number, as for a process killed by that signal."""

    def __init__(self, signum, iteration, checkpoint):
        super().__init__(128 + int(signum))
        self.signum, self.iteration, self.checkpoint = int(signum), iteration, checkpoint

    def __str__(self):
        return (f"training stopped by {signal.Signals(self.signum).name} after iteration "
                f"{self.iteration}; checkpoint {self.checkpoint}; continue it with --resume")


def parse_signals(names):
    """``["SIGTERM", "SIGUSR1"]`` -> signal numbers; an unknown name is a clear error."""
    out = []
    for name in names:
        try:
            out.append(signal.Signals[str(name).upper()])
        except KeyError:
            raise ValueError(f"ROOFTOP.STOP_SIGNALS: unknown signal {name!r} "
                             f"(expected names like 'SIGTERM', 'SIGUSR1')") from None
        if out[-1] in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"ROOFTOP.STOP_SIGNALS: {name} cannot be caught")
    return out


def _where(iteration, rank):
    return f"iteration {iteration}" + (f" on rank {rank}" if rank is not None else "")


def check_finite_losses(loss_dict, iteration, rank=None):
    """Raise :class:`NonFiniteLossError` if a value of ``loss_dict`` is NaN or infinite."""
    if not loss_dict:
        return
    tensors = [torch.as_tensor(v).detach().float().reshape(()) for v in loss_dict.values()]
    values = torch.stack([t.to(tensors[0].device) for t in tensors])
    if bool(torch.isfinite(values).all()):  # one device synchronisation per iteration
        return
    pairs = list(zip(loss_dict, values.tolist()))
    bad = [f"{k}={v}" for k, v in pairs if not math.isfinite(v)]
    good = [f"{k}={v:.4g}" for k, v in pairs if math.isfinite(v)]
    raise NonFiniteLossError(
        f"Non-finite loss at {_where(iteration, rank)}: {', '.join(bad)} ({len(bad)} of "
        f"{len(pairs)} loss terms); finite terms: {', '.join(good) or 'none'}. Training stopped "
        "before this iteration's backward pass and optimizer step; no checkpoint was written for it.")


def _float_tensors(outputs, prefix=""):
    if isinstance(outputs, torch.Tensor):
        if outputs.is_floating_point():
            yield prefix, outputs
    elif isinstance(outputs, Mapping):
        for k, v in outputs.items():
            yield from _float_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(outputs, (list, tuple)):
        for i, v in enumerate(outputs):
            yield from _float_tensors(v, f"{prefix}[{i}]")


def check_finite_outputs(outputs, iteration, rank=None):
    """Raise :class:`NonFiniteLossError` if a tensor of the model's outputs is NaN or infinite
    (before the criterion, whose Hungarian matching would fail with an obscure SciPy error)."""
    named = list(_float_tensors(outputs))
    if not named:
        return
    finite = torch.stack([t.detach().isfinite().all() for _, t in named])
    if bool(finite.all()):
        return
    bad = [f"{name} ({int((~t.detach().isfinite()).sum())} of {t.numel()} values)"
           for (name, t), ok in zip(named, finite.tolist()) if not ok]
    raise NonFiniteLossError(
        f"Non-finite model outputs at {_where(iteration, rank)}, so the loss terms cannot be "
        f"computed: NaN/inf in {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}. Training "
        "stopped before this iteration's loss, backward pass and optimizer step; no checkpoint "
        "was written for it.")


class FiniteLossCheck(HookBase):
    """On every process, every training forward pass: the model's outputs as they enter its
    ``criterion`` (when it has one) and the returned loss dict; a NaN or infinity stops the run
    before the backward pass (:class:`NonFiniteLossError`)."""

    def __init__(self, model):
        self._module = model.module if hasattr(model, "module") else model  # DDP or not
        self._handles = []

    def _args(self):
        return self.trainer.iter, (comm.get_rank() if comm.get_world_size() > 1 else None)

    def _on_forward(self, module, inputs, output):
        if module.training and isinstance(output, Mapping):
            check_finite_losses(output, *self._args())

    def _on_criterion_input(self, module, args):
        if self._module.training and args:
            check_finite_outputs(args[0], *self._args())

    def before_train(self):
        self._handles.append(self._module.register_forward_hook(self._on_forward))
        criterion = getattr(self._module, "criterion", None)
        if isinstance(criterion, torch.nn.Module):
            self._handles.append(criterion.register_forward_pre_hook(self._on_criterion_input))

    def after_train(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []


class AMPSkippedStepCounter(HookBase):
    """Counts the optimizer steps a ``GradScaler`` skipped (its scale dropped across the step:
    inf/NaN gradients), logs each and stores ``amp/skipped_steps`` and ``amp/loss_scale``; the
    count is checkpointed."""

    def __init__(self, grad_scaler):
        self.grad_scaler = grad_scaler
        self.skipped_steps = 0
        self._scale_before = None

    def before_step(self):
        self._scale_before = self.grad_scaler.get_scale() if self.grad_scaler.is_enabled() else None

    def after_step(self):
        if self._scale_before is None:
            return
        scale = self.grad_scaler.get_scale()
        if scale < self._scale_before:
            self.skipped_steps += 1
            logger.warning("AMP: optimizer step of iteration %d skipped (inf/NaN gradients), loss "
                           "scale %g -> %g; %d step(s) skipped so far", self.trainer.iter,
                           self._scale_before, scale, self.skipped_steps)
        self.trainer.storage.put_scalars(**{"amp/skipped_steps": float(self.skipped_steps),
                                            "amp/loss_scale": float(scale)}, smoothing_hint=False)

    def state_dict(self):
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict):
        self.skipped_steps = int(state_dict["skipped_steps"])


# Set from StopOnSignal.before_train to after_train; data-loader workers, forked from the
# training process, share it and ignore the stop signals while it is set.
TRAINING_IN_PROGRESS = multiprocessing.Event()


class StopOnSignal(HookBase):
    """On ``signals`` (``ROOFTOP.STOP_SIGNALS``) the handler only sets a flag; at the end of the
    iteration the processes agree to stop, the main process saves ``model_<iter>.pth`` and
    ``last_checkpoint`` (atomically, like a periodic checkpoint), and every process raises
    :class:`TrainingInterrupted` (status 143 for SIGTERM). A signal during the last iteration
    lets the run finish. Place it last."""

    def __init__(self, checkpointer, signals=(signal.SIGTERM,)):
        self.checkpointer = checkpointer
        self.signals = list(signals)
        self.received = None
        self._previous = {}
        self._pid = None

    def _handler(self, signum, frame):
        if os.getpid() == self._pid and self.received is None:  # not in a loader worker
            self.received = signum

    def before_train(self):
        self._pid = os.getpid()
        TRAINING_IN_PROGRESS.set()
        self._previous = {s: signal.signal(s, self._handler) for s in self.signals}

    def after_train(self):
        TRAINING_IN_PROGRESS.clear()
        for s, previous in self._previous.items():
            signal.signal(s, previous)

    def after_step(self):
        signum = self.received or 0
        if comm.get_world_size() > 1:  # every process stops after the same iteration
            signum = max(comm.all_gather(signum))
        if not signum:
            return
        it, name = self.trainer.iter, signal.Signals(signum).name
        if it >= self.trainer.max_iter - 1:
            logger.warning("%s received during the last iteration: finishing the run", name)
            return
        basename = f"model_{it:07d}.pth"
        if comm.is_main_process():
            if os.path.basename(self.checkpointer.get_checkpoint_file() or "") == basename:
                logger.warning("%s received: %s was just saved", name, basename)
            else:
                logger.warning("%s received: saving %s", name, basename)
                self.checkpointer.save(basename[:-len(".pth")], iteration=it)
        comm.synchronize()  # no process exits before the checkpoint is complete
        interrupted = TrainingInterrupted(signum, it, os.path.join(self.checkpointer.save_dir, basename))
        logger.warning("%s (exit status %d)", interrupted, interrupted.code)
        raise interrupted


def _loader_worker_handler(signum, frame):
    if TRAINING_IN_PROGRESS.is_set():
        return  # the training process saves and stops, then shuts this worker down
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


class IgnoreSignalsInLoaderWorkers:
    """A dataset mapper whose data-loader worker processes survive ``signals`` while training
    is in progress (a scheduler signals every process of the job; a worker killed by it would
    fail the training process before it saves). Needs the "fork" start method."""

    def __init__(self, mapper, signals):
        self.mapper = mapper
        self.signals = list(signals)
        self._owner = os.getpid()
        self._installed_in = None

    def __call__(self, dataset_dict):
        pid = os.getpid()
        if pid != self._owner and self._installed_in != pid:
            for s in self.signals:
                signal.signal(s, _loader_worker_handler)
            self._installed_in = pid
        return self.mapper(dataset_dict)
