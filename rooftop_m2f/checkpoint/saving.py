"""Checkpoints that a kill can never corrupt: :class:`AtomicDetectionCheckpointer`, the
trainer's checkpointer, writes every checkpoint and ``last_checkpoint`` atomically and saves only
finite weights and plain data.
"""
import contextlib
import os
import re
from collections import OrderedDict

import torch

from ..fileio import WRITE_ERRNOS, OutputWriteError, atomic_path
from .safe_io import SafeDetectionCheckpointer

LAST_CHECKPOINT_FILE = "last_checkpoint"
# ROOFTOP.EMA (engine/training_options.py): the EMA's key in a checkpoint, and the key of the raw
# weights in a checkpoint whose "model" holds the EMA's
EMA_KEY = "ema"
RAW_MODEL_KEY = "model_raw"
# Names fileio.atomic_path gives its temporary files for "<stem><ext>": ".<stem>.<random>.tmp<ext>"
_TEMPORARY = re.compile(r"^\..+\.tmp(\.pth)?$")


def _fsync_directory(directory):
    """Make a rename in ``directory`` durable (best effort where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def exports_ema(name: str) -> bool:
    """The checkpoints whose ``"model"`` holds the EMA weights when EMA is on (the weights
    users take away); periodic ``model_<iter>.pth`` keep the raw ones there."""
    return name == "model_final" or name.startswith("model_best")


def non_finite_entries(state_dict):
    """Names of floating-point tensors in ``state_dict`` that hold a NaN or an infinity."""
    return [k for k, v in state_dict.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


# Exact types: numpy.float64 is a float subclass, yet torch's weights-only reader refuses it.
_PLAIN = {bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device}


def non_plain_entries(obj, where="", depth=0):
    """Paths (``trainer/hooks/X/value``) of what ``torch.load(weights_only=True)`` would refuse:
    anything but tensors, numbers, strings, None and lists, tuples and dicts of them."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN:
        return []
    if type(obj) in (dict, OrderedDict) and depth < 32:
        return [p for k, v in obj.items()
                for p in (non_plain_entries(k, f"{where}/<key {k!r}>", depth + 1) +
                          non_plain_entries(v, f"{where}/{k}", depth + 1))]
    if type(obj) in (list, tuple, torch.Size) and depth < 32:
        return [p for i, v in enumerate(obj)
                for p in non_plain_entries(v, f"{where}[{i}]", depth + 1)]
    return [f"{where.lstrip('/')} ({type(obj).__module__}.{type(obj).__qualname__})"]


class AtomicDetectionCheckpointer(SafeDetectionCheckpointer):
    """``DetectionCheckpointer`` whose ``save`` and ``tag_last_checkpoint`` are atomic and whose
    loading reads weights as data only (``torch.load`` with ``weights_only=True``, see
    :mod:`rooftop_m2f.checkpoint.safe_io`). ``save_dir`` must be a local directory.

    Same loading, file names and ``last_checkpoint`` file as detectron2's. A checkpoint is
    written to a hidden temporary file in the output directory, flushed to disk (``fsync``) and
    renamed over its final name; ``last_checkpoint`` is then rewritten the same way. A process
    killed at any moment (SIGKILL, power loss) therefore leaves either the previous complete
    state or the new one, never a truncated ``model_*.pth`` and never a ``last_checkpoint``
    naming a file that is not complete. Temporary files left by a killed save
    (``.<name>.<random>.tmp.pth``) are never taken for checkpoints and are removed, with a log
    line, when the next run resumes. :meth:`save` refuses a model with NaN or infinite weights
    (that run has diverged; ``last_checkpoint`` keeps naming the last good checkpoint) and,
    before writing, anything but tensors and plain data (numbers, strings, lists, dicts), so
    ``--resume`` reads it back with ``weights_only=True``.
    """

    def save(self, name, **kwargs):
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        if isinstance(data.get(EMA_KEY), dict) and exports_ema(name):
            # ROOFTOP.EMA: the weights users take away are the EMA's (training_options doc)
            data[RAW_MODEL_KEY] = data["model"]
            data["model"] = data[EMA_KEY].pop("weights")
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        bad = non_finite_entries(data["model"])
        if bad:
            raise FloatingPointError(
                f"Not saving {path}: the model has NaN or infinite values in {len(bad)} tensor(s), "
                f"e.g. {bad[:5]}; {self._last_good_message()}"
            )
        not_plain = non_plain_entries(data)
        if not_plain:  # --resume reads checkpoints with weights_only=True: it would refuse these
            raise TypeError(f"Not saving {path}: entries that are not tensors or plain data: "
                            f"{not_plain[:5]}; save plain types in their state_dict")
        self.logger.info("Saving checkpoint to %s", path)
        try:
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as f:
                    torch.save(data, f)
                    f.flush()
                    os.fsync(f.fileno())
            _fsync_directory(self.save_dir)
            self.tag_last_checkpoint(basename)
        except OutputWriteError as e:
            raise OutputWriteError(e.path, e.error, self._last_good_message()) from e.error
        except RuntimeError as e:  # torch.save reports a failed write as a RuntimeError
            cause = e.__cause__ or e.__context__
            if isinstance(cause, OSError) and cause.errno in WRITE_ERRNOS:
                raise OutputWriteError(path, cause, self._last_good_message()) from e
            raise

    def _load_model(self, checkpoint):
        # a checkpoint whose "model" holds the EMA weights (ROOFTOP.EMA, model_final / best):
        # training continues from the raw weights, the EMA gets its own back
        if RAW_MODEL_KEY in checkpoint:
            ema_weights = checkpoint.pop("model")
            checkpoint["model"] = checkpoint.pop(RAW_MODEL_KEY)
            if isinstance(checkpoint.get(EMA_KEY), dict):
                checkpoint[EMA_KEY]["weights"] = ema_weights
        return super()._load_model(checkpoint)

    def tag_last_checkpoint(self, last_filename_basename):
        path = os.path.join(self.save_dir, LAST_CHECKPOINT_FILE)
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.write(last_filename_basename)
                f.flush()
                os.fsync(f.fileno())
        _fsync_directory(self.save_dir)

    def get_all_checkpoint_files(self):
        """Complete ``*.pth`` checkpoints only: temporary files of unfinished saves are hidden."""
        return [p for p in super().get_all_checkpoint_files()
                if not _TEMPORARY.match(os.path.basename(p))]

    def remove_stale_temporaries(self):
        """Delete the temporary files that a killed save left behind; return their paths."""
        if not self.save_dir or not self.save_to_disk or not os.path.isdir(self.save_dir):
            return []
        removed = []
        for entry in sorted(os.listdir(self.save_dir)):
            stem = entry[1:].split(".", 1)[0]
            if _TEMPORARY.match(entry) and (entry.endswith(".pth") or stem == LAST_CHECKPOINT_FILE):
                path = os.path.join(self.save_dir, entry)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                    removed.append(path)
                    self.logger.warning("Removed %s, left by a save that was interrupted", path)
        return removed

    def resume_or_load(self, path, *, resume=True):
        if resume:
            self.remove_stale_temporaries()
        return super().resume_or_load(path, resume=resume)

    def _last_good_message(self):
        if self.has_checkpoint():
            return f"{LAST_CHECKPOINT_FILE} still names {os.path.basename(self.get_checkpoint_file())}"
        return "no checkpoint was written before"
