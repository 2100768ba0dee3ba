"""Training hooks that make a run stop loudly or cleanly, never silently or half-way: a NaN/inf
check of every forward pass (:class:`FiniteLossCheck`), the count of AMP's skipped steps
(:class:`AMPSkippedStepCounter`), a checkpoint and a clean stop on a signal
(:class:`StopOnSignal`), and data-loader workers that survive that signal
(:class:`IgnoreSignalsInLoaderWorkers`). How the launching process ends: :mod:`.launching`.
"""
import logging
import math
import multiprocessing
import os
import signal
from collections.abc import Mapping

import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss term was NaN or infinite; the message names the iteration and the terms."""


class TrainingInterrupted(SystemExit):
    """Raised on every process after a stop signal, once the checkpoint is saved. Its exit
    status (``code``) is 128 + the signal number, as for a process killed by that signal."""

    def __init__(self, signum, iteration, checkpoint):
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.iteration = iteration
        self.checkpoint = checkpoint

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


def check_finite_losses(loss_dict, iteration, rank=None):
    """Raise :class:`NonFiniteLossError` if any value of ``loss_dict`` is NaN or infinite."""
    if not loss_dict:
        return
    names = list(loss_dict)
    tensors = [v.detach().float().reshape(()) if isinstance(v, torch.Tensor)
               else torch.tensor(float(v)) for v in loss_dict.values()]
    values = torch.stack([t.to(tensors[0].device) for t in tensors])
    if bool(torch.isfinite(values).all()):  # one device synchronisation per iteration
        return
    values = values.tolist()
    bad = [f"{k}={v}" for k, v in zip(names, values) if not math.isfinite(v)]
    good = [f"{k}={v:.4g}" for k, v in zip(names, values) if math.isfinite(v)]
    where = f" on rank {rank}" if rank is not None else ""
    raise NonFiniteLossError(
        f"Non-finite loss at iteration {iteration}{where}: {', '.join(bad)} "
        f"({len(bad)} of {len(names)} loss terms); finite terms: {', '.join(good) or 'none'}. "
        "Training stopped before this iteration's backward pass and optimizer step; "
        "no checkpoint was written for it."
    )


def _output_tensors(outputs, prefix=""):
    """``(name, tensor)`` for the floating-point tensors of a (nested) model-output dict."""
    if isinstance(outputs, torch.Tensor):
        if outputs.is_floating_point():
            yield prefix, outputs
    elif isinstance(outputs, Mapping):
        for k, v in outputs.items():
            yield from _output_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(outputs, (list, tuple)):
        for i, v in enumerate(outputs):
            yield from _output_tensors(v, f"{prefix}[{i}]")


def check_finite_outputs(outputs, iteration, rank=None):
    """Raise :class:`NonFiniteLossError` if a tensor of the model's outputs is NaN or infinite
    (before the criterion: its Hungarian matching would fail with an obscure SciPy error)."""
    named = list(_output_tensors(outputs))
    if not named:
        return
    finite = torch.stack([t.detach().isfinite().all() for _, t in named])
    if bool(finite.all()):
        return
    bad = [f"{name} ({int((~t.detach().isfinite()).sum())} of {t.numel()} values)"
           for (name, t), ok in zip(named, finite.tolist()) if not ok]
    where = f" on rank {rank}" if rank is not None else ""
    raise NonFiniteLossError(
        f"Non-finite model outputs at iteration {iteration}{where}, so the loss terms cannot be "
        f"computed: NaN/inf in {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''}. Training "
        "stopped before this iteration's loss, backward pass and optimizer step; no checkpoint "
        "was written for it."
    )


class FiniteLossCheck(HookBase):
    """Checks every training forward pass: the model's outputs as they enter its ``criterion``
    (when it has one, as Mask2Former does) and the returned loss dict (forward hooks).

    It runs on every process; a NaN or infinite value stops the run *before* its backward pass
    and optimizer step with :class:`NonFiniteLossError` naming the iteration and the non-finite
    outputs or loss terms (with the finite ones). detectron2's own check runs later, on the main
    process only, with the averaged dict; and NaN outputs of a diverged model would first break
    Mask2Former's Hungarian matching with a SciPy ValueError."""

    def __init__(self, model):
        self._module = model.module if hasattr(model, "module") else model  # DDP-wrapped or not
        self._handles = []

    def _where(self):
        return self.trainer.iter, (comm.get_rank() if comm.get_world_size() > 1 else None)

    def _on_forward(self, module, inputs, output):
        if module.training and isinstance(output, Mapping):
            check_finite_losses(output, *self._where())

    def _on_criterion_input(self, module, args):
        if self._module.training and args:
            check_finite_outputs(args[0], *self._where())

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
    """Counts the optimizer steps that a ``GradScaler`` skipped.

    Under AMP, ``GradScaler`` silently skips an optimizer step whose gradients overflowed and
    halves its scale. A step is skipped exactly when the scale decreased across it; the hook logs
    each one and puts the running total into the event storage as ``amp/skipped_steps`` (so it
    reaches metrics.json). The count is part of the checkpoint and survives ``--resume``.

    ``grad_scaler`` needs ``get_scale()`` and ``is_enabled()`` (torch's GradScaler has both),
    so the hook can be tested without CUDA.
    """

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
        storage = self.trainer.storage
        storage.put_scalar("amp/skipped_steps", float(self.skipped_steps), smoothing_hint=False)
        storage.put_scalar("amp/loss_scale", float(scale), smoothing_hint=False)

    def after_train(self):
        if self._scale_before is not None or self.skipped_steps:
            logger.info("AMP: %d optimizer step(s) skipped in total (including earlier runs of this "
                        "output directory)", self.skipped_steps)

    def state_dict(self):
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict):
        self.skipped_steps = int(state_dict["skipped_steps"])


class StopOnSignal(HookBase):
    """Save a checkpoint and stop at the end of the iteration in which a signal arrived.

    ``checkpointer`` is the trainer's (atomic) checkpointer; the checkpoint is named like the
    periodic ones, ``model_<iter:07d>.pth``, and holds the same state, so ``--resume`` works.
    Install it last among the hooks, after the LR scheduler and the periodic checkpointer.

    On ``signals`` (``ROOFTOP.STOP_SIGNALS``, default SIGTERM, what cluster schedulers send before
    SIGKILL) the handler only sets a flag; at the end of the current iteration the processes
    agree to stop, the main process saves ``model_<iter>.pth`` and ``last_checkpoint``
    (atomically), and every process raises :class:`TrainingInterrupted`, a ``SystemExit`` with
    status 128 + the signal number (143 for SIGTERM: the job did not finish, and ``--resume``
    continues it at the next iteration). A signal during the last iteration lets the run finish.
    """

    def __init__(self, checkpointer, signals=(signal.SIGTERM,), file_prefix="model"):
        self.checkpointer = checkpointer
        self.signals = list(signals)
        self.file_prefix = file_prefix
        self.received = None
        self._previous = {}
        self._pid = None

    def _handler(self, signum, frame):
        # Data-loader workers are forked with this handler: only the training process stops.
        if os.getpid() == self._pid and self.received is None:
            self.received = signum

    def before_train(self):
        self._pid = os.getpid()
        TRAINING_IN_PROGRESS.set()
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        if self.signals:
            logger.info("On %s: save a checkpoint at the end of the iteration and exit",
                        "/".join(signal.Signals(s).name for s in self.signals))

    def after_train(self):
        TRAINING_IN_PROGRESS.clear()
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def _agreed_signal(self):
        received = self.received or 0
        if comm.get_world_size() > 1:  # every process must stop after the same iteration
            received = max(comm.all_gather(received))
        return received

    def after_step(self):
        signum = self._agreed_signal()
        if not signum:
            return
        it = self.trainer.iter
        name = signal.Signals(signum).name
        if it >= self.trainer.max_iter - 1:
            logger.warning("%s received during the last iteration: finishing the run", name)
            return
        basename = f"{self.file_prefix}_{it:07d}.pth"
        path = os.path.join(self.checkpointer.save_dir, basename)
        if comm.is_main_process():
            if (self.checkpointer.has_checkpoint()
                    and os.path.basename(self.checkpointer.get_checkpoint_file()) == basename):
                logger.warning("%s received: %s was just saved", name, path)
            else:
                logger.warning("%s received: saving %s", name, path)
                self.checkpointer.save(basename[:-len(".pth")], iteration=it)
        comm.synchronize()  # no process exits before the checkpoint is complete
        interrupted = TrainingInterrupted(signum, it, path)
        logger.warning("%s (exit status %d)", interrupted, interrupted.code)
        raise interrupted


# Set by StopOnSignal from before_train to after_train. Data-loader workers, forked from the
# training process, share it: while it is set they ignore the stop signals (see below).
TRAINING_IN_PROGRESS = multiprocessing.Event()


def _loader_worker_handler(signum, frame):
    if TRAINING_IN_PROGRESS.is_set():
        return  # the training process saves and stops, then shuts this worker down
    signal.signal(signum, signal.SIG_DFL)  # training is over: behave as without a handler
    os.kill(os.getpid(), signum)


class IgnoreSignalsInLoaderWorkers:
    """Wraps a dataset mapper so that data-loader worker processes survive ``signals`` while
    training is in progress.

    A scheduler usually signals every process of the job. PyTorch's data-loader workers would
    die of SIGTERM, and the training process would then fail with "DataLoader worker ... is
    killed by signal: Terminated" before it could save. The first call of the mapper in each
    worker process (any process but the one that built the wrapper) installs a handler that
    ignores the signals while :data:`TRAINING_IN_PROGRESS` is set, and otherwise ends the
    worker as the signal would (so PyTorch's and multiprocessing's shutdown of the workers,
    which sends SIGTERM, still works once training is over). Needs the "fork" start method
    (Linux's default): with "spawn" the workers do not share the event and die as before.
    """

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
