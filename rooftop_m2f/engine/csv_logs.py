"""The CSV epoch logs of a run (``train_epoch.csv``, ``valid_epoch.csv``,
``metrics_epoch_per_class.csv``; columns and numbering: GETTING_STARTED.md, "What lands in OUTPUT_DIR"),
appended a row at a time by the main process, and the trim of detectron2's ``metrics.json`` on
``--resume``. On a resume at ``s`` the rows the checkpoint does not cover are dropped (one
rewrite of each file) and redone."""
import copy
import csv
import json
import logging
import math
import os
import re

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..fileio import WRITE_ERRNOS, OutputWriteError, atomic_path

logger = logging.getLogger(__name__)

VALID_METRICS = ("mIoU", "macro_fg_mIoU", "pAcc", "fwIoU")
PER_CLASS_METRICS = ("IoU", "precision", "recall", "F1")
TIMES = ("data_time", "time")


def _fmt(value) -> str:
    return "" if value is None or not math.isfinite(float(value)) else f"{float(value):.6g}"


def _int(row, key, default=-1) -> int:
    try:
        return int(float(row.get(key) or ""))
    except ValueError:
        return default


def evaluated(trainer, key):
    """The finite value of ``key`` that an evaluation stored at this iteration, or None."""
    value = trainer.storage.latest().get(key)
    if value is None or value[1] != trainer.iter or not math.isfinite(float(value[0])):
        return None
    return float(value[0])


class CSVLog:
    """A CSV file that grows by appended rows, each flushed to disk. A row that cannot be
    written is taken back (the file keeps its previous rows); a torn last row (a kill) is not
    read. Columns are fixed by the header; a row with a new column rewrites the file once."""

    def __init__(self, path: str):
        self.path = path

    def _read(self):
        if not os.path.exists(self.path):
            return [], []
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if None not in r.values() and None not in r]
            return list(reader.fieldnames or []), rows

    def rows(self):
        return self._read()[1]

    def rewrite(self, rows, columns):
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
                writer.writeheader()
                writer.writerows(rows)
                f.flush()
                os.fsync(f.fileno())

    def append(self, rows):
        columns, old = self._read()
        new = list(dict.fromkeys(k for row in rows for k in row if k not in columns))
        if not columns or new:
            return self.rewrite(old + list(rows), columns + new)
        with open(self.path, "a", newline="") as f:
            size = f.tell()
            try:
                csv.DictWriter(f, fieldnames=columns, restval="").writerows(rows)
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                f.truncate(size)
                if e.errno in WRITE_ERRNOS:
                    raise OutputWriteError(self.path, e) from e
                raise

    def drop(self, predicate):
        """Remove the rows for which ``predicate(row)`` holds (one rewrite)."""
        columns, rows = self._read()
        kept = [r for r in rows if not predicate(r)]
        if len(kept) < len(rows):
            self.rewrite(kept, columns)
            logger.info("%s: dropped %d row(s) that the checkpoint does not cover; they are redone",
                        self.path, len(rows) - len(kept))


class EpochClock:
    """The epoch of an iteration (0-based index): epochs of ``iters_per_epoch`` iterations from
    ``(origin_iter, origin_epoch)``; a resume with another epoch length moves the origin to the
    resume iteration (checkpointed, so later resumes keep it)."""

    def __init__(self, iters_per_epoch: int, origin_iter: int = 0, origin_epoch: int = 0):
        self.iters_per_epoch = int(iters_per_epoch)
        self.move(origin_iter, origin_epoch)

    def move(self, origin_iter: int, origin_epoch: int):
        self.origin_iter, self.origin_epoch = int(origin_iter), int(origin_epoch)

    def epoch_of(self, it: int) -> int:
        return self.origin_epoch + (int(it) - self.origin_iter) // self.iters_per_epoch

    def ends_epoch(self, it: int) -> bool:
        return (int(it) + 1 - self.origin_iter) % self.iters_per_epoch == 0


def _loss_order(name: str):
    """total_loss, then the final layer's terms, then each auxiliary layer's (loss_ce_0, ...)."""
    match = re.fullmatch(r"(.*)_(\d+)", name)
    return (-2, "") if name == "total_loss" else (int(match.group(2)), match.group(1)) if match \
        else (-1, name)


class EpochCSVWriter(HookBase):
    """``train_epoch.csv``: per epoch the means of ``total_loss``, every ``loss_*``,
    ``data_time`` and ``time`` (over the iterations that have them) and the last ``lr``. Place
    it after detectron2's ``IterationTimer`` and ``LRScheduler`` and before the
    ``PeriodicCheckpointer``: the running sums of the unfinished epoch are checkpointed, so the
    first row after a resume covers the whole epoch. On a resume at ``s``, rows with
    ``iter_end > s`` and the partial rows of the epoch it continues are dropped; with another
    epoch length the checkpoint's unfinished epoch ends at ``s`` as a row with ``complete`` 0."""

    SUMS = ("epoch", "iter_start", "last_iter", "num_iters", "sums", "counts", "lr")

    def __init__(self, output_dir: str, iters_per_epoch: int):
        self.log = CSVLog(os.path.join(output_dir, "train_epoch.csv"))
        self.clock = EpochClock(iters_per_epoch)
        self._enabled = comm.is_main_process()
        self._previous = None  # the checkpoint's state, when it counted another epoch length
        self._reset()

    def _reset(self, epoch=None):
        self.epoch, self.iter_start, self.last_iter, self.num_iters = epoch, None, None, 0
        self.sums, self.counts, self.lr = {}, {}, None

    def _set(self, state):
        for key in self.SUMS:
            setattr(self, key, copy.copy(state[key]))

    def state_dict(self):
        if not self._enabled:
            return {}
        return {"iters_per_epoch": self.clock.iters_per_epoch, "origin_iter": self.clock.origin_iter,
                "origin_epoch": self.clock.origin_epoch, **{k: copy.copy(getattr(self, k)) for k in self.SUMS}}

    def load_state_dict(self, state):
        if not self._enabled or not state:
            return
        if state.get("iters_per_epoch") != self.clock.iters_per_epoch:
            self._previous = dict(state)  # before_train closes the checkpoint's epoch
            return
        self.clock.move(state["origin_iter"], state["origin_epoch"])
        self._set(state)

    def before_train(self):
        if not self._enabled:
            return
        start, old = self.trainer.start_iter, self._previous
        if old is not None and start > 0:  # another epoch length from here on
            old_clock = EpochClock(old["iters_per_epoch"], old["origin_iter"], old["origin_epoch"])
            epoch = old_clock.epoch_of(start)
            unfinished = (start - old_clock.origin_iter) % old_clock.iters_per_epoch != 0
            self.clock.move(start, epoch + unfinished)
            if unfinished:
                if old["num_iters"] and old["last_iter"] == start - 1:
                    self._set(old)
                    self.log.drop(lambda r: _int(r, "epoch") == epoch)
                    self._write_row(complete=False)
                logger.warning("train_epoch.csv: epoch %d ends at iteration %d unfinished (complete 0); "
                               "from there on an epoch is %d iterations (was %d)", epoch, start,
                               self.clock.iters_per_epoch, old_clock.iters_per_epoch)
                self._reset()
        current = self.clock.epoch_of(start)
        self.log.drop(lambda r: _int(r, "iter_end") > start
                      or (_int(r, "complete", 0) != 1 and _int(r, "epoch") >= current))
        if self.last_iter is not None and self.last_iter != start - 1:
            self._reset()  # sums of other iterations than those before the start

    def after_step(self):
        if not self._enabled:
            return
        it = self.trainer.iter
        epoch = self.clock.epoch_of(it)
        if self.epoch != epoch:
            if self.num_iters:
                self._write_row(complete=False)
            self._reset(epoch)
        for key, (value, value_iter) in self.trainer.storage.latest().items():
            if value_iter == it and (key == "total_loss" or key.startswith("loss_") or key in TIMES):
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
                self.counts[key] = self.counts.get(key, 0) + 1
            elif value_iter == it and key == "lr":
                self.lr = float(value)
        self.iter_start = it if self.iter_start is None else self.iter_start
        self.last_iter, self.num_iters = it, self.num_iters + 1
        if self.clock.ends_epoch(it):
            self._write_row(complete=True)
            self._reset(epoch + 1)

    def after_train(self):
        if self._enabled and self.num_iters:
            self._write_row(complete=False)  # the sums stay: model_final holds them

    def _write_row(self, complete: bool):
        mean = {k: _fmt(self.sums[k] / self.counts[k]) for k in self.sums}
        losses = sorted((k for k in self.sums if k not in TIMES), key=_loss_order)
        self.log.append([{"epoch": self.epoch, "iter_start": self.iter_start, "iter_end": self.last_iter + 1,
                          "num_iters": self.num_iters, "complete": int(complete),
                          **{k: mean[k] for k in losses}, "lr": _fmt(self.lr),
                          **{k: mean.get(k, "") for k in TIMES}}])


class EvalWatcher(HookBase):
    """Base of the hooks that act once on each evaluation detectron2's ``EvalHook`` stored
    (place them after it): ``on_eval(iteration)`` with the completed iterations."""

    def __init__(self, keys):
        self._keys, self._enabled = list(keys), comm.is_main_process()

    def _new_eval(self) -> bool:
        latest = self.trainer.storage.latest()
        return any(latest.get(k, (None, None))[1] == self.trainer.iter for k in self._keys)

    def after_step(self):
        if self._enabled and self._new_eval():
            self.on_eval(self.trainer.iter + 1)

    def after_train(self):  # the final evaluation is stored at trainer.iter == max_iter
        if self._enabled and self.trainer.iter >= self.trainer.max_iter and self._new_eval():
            self.on_eval(self.trainer.max_iter)

    def on_eval(self, iteration: int):
        raise NotImplementedError


class EvalCSVWriter(EvalWatcher):
    """``valid_epoch.csv`` and ``metrics_epoch_per_class.csv`` from the ``<prefix>sem_seg/...``
    scalars of each evaluation (``datasets``: name -> prefix); ``weights`` is ``ema`` when the
    EMA weights were evaluated. An iteration evaluated again replaces its rows. Known gap
    (detectron2's semantics): a run killed after its checkpoint at ``s`` but before the
    evaluation at ``s`` finished is not re-evaluated at ``s`` when resumed."""

    def __init__(self, output_dir, clock: EpochClock, datasets, class_names, weights="raw"):
        self.datasets, self.class_names, self.weights = dict(datasets), list(class_names), weights
        prefixes = self.datasets.values()
        super().__init__([p + m for p in prefixes for m in VALID_METRICS] + [
            f"{p}{m}-{c}" for p in prefixes for m in PER_CLASS_METRICS for c in self.class_names])
        self.clock = clock  # the EpochCSVWriter's: a moved epoch origin applies here too
        self.valid = CSVLog(os.path.join(output_dir, "valid_epoch.csv"))
        self.per_class = CSVLog(os.path.join(output_dir, "metrics_epoch_per_class.csv"))

    def before_train(self):
        if self._enabled:
            for log in (self.valid, self.per_class):
                log.drop(lambda r: _int(r, "iteration") > self.trainer.start_iter)

    def on_eval(self, iteration: int):
        def get(key):
            return _fmt(evaluated(self.trainer, key))

        base = {"epoch": self.clock.epoch_of(iteration - 1), "iteration": iteration}
        valid, per_class = [], []
        for dataset, prefix in self.datasets.items():
            row = {**base, "dataset": dataset, "weights": self.weights}
            valid.append({**row, **{m: get(prefix + m) for m in VALID_METRICS}})
            per_class += [{**row, "class_id": c, "class_name": name,
                           **{m: get(f"{prefix}{m}-{name}") for m in PER_CLASS_METRICS}}
                          for c, name in enumerate(self.class_names)]
        for log, rows in ((self.valid, valid), (self.per_class, per_class)):
            log.drop(lambda r: _int(r, "iteration") == iteration)
            log.append(rows)


def trim_metrics_json(output_dir, start, completed_run):
    """Drop from detectron2's ``metrics.json`` the records of iterations ``>= start`` (the
    resumed run logs them again) and a torn last line, keeping the evaluation record a completed
    run (``completed_run``: the checkpoint is its ``model_final``) stored at ``start``. Call it
    before detectron2's writer opens the file (it is replaced atomically)."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                dropped += bool(line.strip())
                continue
            iteration = int(record.get("iteration", -1))
            training = "total_loss" in record or any(k.startswith("loss_") for k in record)
            if iteration < start or (iteration == start and completed_run and not training):
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        with atomic_path(path) as tmp:
            with open(tmp, "w") as f:
                f.writelines(kept)
        logger.info("metrics.json: resuming at iteration %d, dropped %d record(s) of later "
                    "iterations (or torn)", start, dropped)
