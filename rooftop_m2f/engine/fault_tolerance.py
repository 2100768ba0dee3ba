"""Hooks that stop a run loudly or cleanly, never silently or half-way: NaN/inf in the model's
outputs or losses (:class:`FiniteLossCheck`), AMP's skipped steps (:class:`AMPSkippedStepCounter`),
a checkpoint and a clean stop on a signal (:class:`StopOnSignal`), and data-loader workers that
ignore that signal (:class:`IgnoreSignalsInLoaderWorkers`)."""
import logging
import os
import signal
import threading
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
        self.message = (f"training stopped by {signal.Signals(signum).name} after iteration "
                        f"{iteration}; checkpoint {checkpoint}; continue it with --resume")

    def __str__(self):
        return self.message


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


def check_finite(values, iteration, rank=None, losses=True):
    """Raise :class:`NonFiniteLossError` naming every NaN or infinite entry of ``values``: the
    loss dict (``losses``) or the model's outputs as they enter the criterion (whose Hungarian
    matching would fail with an obscure SciPy error). One device synchronisation."""
    named = [(k, torch.as_tensor(v)) for k, v in (values.items() if losses else _float_tensors(values))]
    if not named:
        return
    finite = torch.stack([t.detach().isfinite().all().to(named[0][1].device) for _, t in named])
    if bool(finite.all()):
        return
    where = f"iteration {iteration}" + (f" on rank {rank}" if rank is not None else "")
    bad = [(k, t) for (k, t), ok in zip(named, finite.tolist()) if not ok]
    if losses:
        good = ", ".join(f"{k}={float(t):.4g}" for (k, t), ok in zip(named, finite.tolist()) if ok)
        message = (f"Non-finite loss at {where}: {', '.join(f'{k}={float(t)}' for k, t in bad)} "
                   f"({len(bad)} of {len(named)} loss terms); finite terms: {good or 'none'}. "
                   "Training stopped before this iteration's backward pass")
    else:
        listed = ", ".join(f"{k} ({int((~t.detach().isfinite()).sum())} of {t.numel()} values)"
                           for k, t in bad[:6])
        message = (f"Non-finite model outputs at {where}, so the loss terms cannot be computed: "
                   f"NaN/inf in {listed}{' ...' if len(bad) > 6 else ''}. Training stopped before "
                   "this iteration's loss, backward pass")
    raise NonFiniteLossError(message + " and optimizer step; no checkpoint was written for it.")


class FiniteLossCheck(HookBase):
    """On every process, every training forward pass: the model's outputs as they enter its
    ``criterion`` (when it has one) and the returned loss dict; a NaN or infinity stops the run
    before the backward pass (:class:`NonFiniteLossError`)."""

    def __init__(self, model):
        self._module = model.module if hasattr(model, "module") else model  # DDP or not
        self._handles = []

    def _check(self, values, losses):
        check_finite(values, self.trainer.iter, comm.get_rank() if comm.get_world_size() > 1 else None,
                     losses)

    def before_train(self):
        def on_forward(module, inputs, output):
            if module.training and isinstance(output, Mapping):
                self._check(output, True)

        def on_criterion_input(module, args):
            if self._module.training and args:
                self._check(args[0], False)

        self._handles.append(self._module.register_forward_hook(on_forward))
        criterion = getattr(self._module, "criterion", None)
        if isinstance(criterion, torch.nn.Module):
            self._handles.append(criterion.register_forward_pre_hook(on_criterion_input))

    def after_train(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []


class AMPSkippedStepCounter(HookBase):
    """Counts the optimizer steps a ``GradScaler`` skipped (its scale dropped across the step:
    inf/NaN gradients), logs each and stores ``amp/skipped_steps`` and ``amp/loss_scale``; the
    count is checkpointed."""

    def __init__(self, grad_scaler):
        self.grad_scaler, self.skipped_steps, self._scale_before = grad_scaler, 0, None

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


class StopOnSignal(HookBase):
    """On ``signals`` (``ROOFTOP.STOP_SIGNALS``) the handler only sets a flag; at the end of the
    iteration the processes agree to stop, the main process saves ``model_<iter>.pth`` and
    ``last_checkpoint`` (atomically, like a periodic checkpoint), and every process raises
    :class:`TrainingInterrupted` (status 143 for SIGTERM). A signal during the last iteration
    lets the run finish. Place it last."""

    def __init__(self, checkpointer, signals=(signal.SIGTERM,)):
        self.checkpointer, self.signals = checkpointer, list(signals)
        self.received, self._previous = None, {}

    def _handler(self, signum, frame):
        self.received = self.received or signum

    def before_train(self):
        self._previous = {s: signal.signal(s, self._handler) for s in self.signals}

    def after_train(self):
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


class IgnoreSignalsInLoaderWorkers:
    """A dataset mapper whose data-loader worker processes ignore ``signals`` from anyone but
    their training process: a scheduler signals every process of the job, and a worker killed
    by it would fail the training process before it saves; the training process itself ends
    its workers with SIGTERM when it exits (multiprocessing), and that one they obey. The
    signals are blocked in the worker and read by a thread (``sigwaitinfo``, which names the
    sender)."""

    def __init__(self, mapper, signals):
        self.mapper, self.signals, self._owner = mapper, set(signals), os.getpid()
        self._shielded = False

    def __call__(self, dataset_dict):
        if os.getpid() != self._owner and not self._shielded:  # the first call in a worker
            self._shielded = True
            parent = os.getppid()
            signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)  # threads started later too

            def obey_the_parent_only():
                while True:
                    if signal.sigwaitinfo(self.signals).si_pid == parent:
                        os._exit(0)

            threading.Thread(target=obey_the_parent_only, daemon=True).start()
        return self.mapper(dataset_dict)
