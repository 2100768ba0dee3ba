"""The CSV epoch logs of a run (``train_epoch.csv``, ``valid_epoch.csv``,
``metrics_epoch_per_class.csv``) and the trim of detectron2's ``metrics.json`` on ``--resume``.
Their columns, the iteration/epoch numbering and the resume rule: README, "What lands in
OUTPUT_DIR". Only the main process writes; the hooks are inert on the others.
"""
import csv
import json
import logging
import math
import os
import re
from typing import Dict, List, Optional, Sequence

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..fileio import atomic_path
from .eval_watcher import EvalWatcher

logger = logging.getLogger(__name__)

TRAIN_CSV = "train_epoch.csv"
VALID_CSV = "valid_epoch.csv"
PER_CLASS_CSV = "metrics_epoch_per_class.csv"

VALID_METRICS = ("mIoU", "macro_fg_mIoU", "pAcc", "fwIoU")
PER_CLASS_METRICS = ("IoU", "precision", "recall", "F1")
TRAIN_EXTRA = ("lr", "data_time", "time")
# scalars of a training iteration in detectron2's metrics.json (besides the loss_* terms)
TRAINING_KEYS = ("total_loss", "lr", "data_time", "time", "eta_seconds", "rank_data_time")


def _fmt(value) -> str:
    if value is None:
        return ""
    value = float(value)
    return "" if not math.isfinite(value) else f"{value:.6g}"


def _loss_order(name: str):
    """total_loss, then the final layer's terms, then each auxiliary layer's (loss_ce_0, ...)."""
    match = re.fullmatch(r"(.*)_(\d+)", name)
    if name == "total_loss":
        return (-2, "")
    if match:
        return (int(match.group(2)), match.group(1))
    return (-1, name)


class CSVTable:
    """A small CSV file that is rewritten whole (temporary file, fsync, rename) on each change,
    so a reader or a kill never sees a half-written row.

    Columns are the union of the existing header and the new rows' keys, in first-seen order;
    a value a row lacks is an empty cell.
    """

    def __init__(self, path: str):
        self.path = path

    def read(self) -> List[Dict[str, str]]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def _header(self) -> List[str]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline="") as f:
            return next(csv.reader(f), [])

    def write(self, rows: Sequence[Dict], columns: Sequence[str]) -> None:
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
                writer.writeheader()
                writer.writerows(rows)
                f.flush()
                os.fsync(f.fileno())

    def append(self, new_rows: Sequence[Dict]) -> None:
        columns = self._header()
        for row in new_rows:
            columns += [k for k in row if k not in columns]
        self.write(self.read() + list(new_rows), columns)

    def drop_where(self, predicate) -> List[Dict[str, str]]:
        """Remove the rows for which ``predicate(row)`` is true; return them."""
        rows = self.read()
        if not rows:
            return []
        dropped = [r for r in rows if predicate(r)]
        if dropped:
            self.write([r for r in rows if not predicate(r)], self._header())
        return dropped


def _int(row, key, default=-1) -> int:
    try:
        return int(float(row.get(key, "")))
    except ValueError:
        return default


class EpochClock:
    """Which epoch an iteration (0-based index) falls in: epochs of ``iters_per_epoch``
    iterations counted from ``(origin_iter, origin_epoch)``. A fresh run has origin ``(0, 0)``;
    a resume with another epoch length (a grown training split, another
    ``SOLVER.IMS_PER_BATCH``) moves the origin to the resume iteration: if the checkpoint's
    epoch ``e`` was unfinished, its row is final with ``complete`` 0 and epoch ``e + 1`` starts
    there; at an epoch boundary epoch ``e`` starts there. The origin is checkpointed, so later
    resumes keep it, and the evaluation rows count epochs with the same clock."""

    def __init__(self, iters_per_epoch: int, origin_iter: int = 0, origin_epoch: int = 0):
        self.iters_per_epoch = int(iters_per_epoch)
        self.origin_iter = int(origin_iter)
        self.origin_epoch = int(origin_epoch)

    def set_origin(self, origin_iter: int, origin_epoch: int) -> None:
        self.origin_iter = int(origin_iter)
        self.origin_epoch = int(origin_epoch)

    def epoch_of(self, it: int) -> int:
        return self.origin_epoch + (int(it) - self.origin_iter) // self.iters_per_epoch

    def ends_epoch(self, it: int) -> bool:
        return (int(it) + 1 - self.origin_iter) % self.iters_per_epoch == 0


class EpochCSVWriter(HookBase):
    """``train_epoch.csv``: per-epoch means of the training scalars in the EventStorage.

    Reads ``total_loss``, every ``loss_*``, ``lr``, ``data_time`` and ``time`` that the current
    iteration put into the storage. Place it after detectron2's ``IterationTimer`` and
    ``LRScheduler`` (they put ``time`` and ``lr``) and before the ``PeriodicCheckpointer`` (so a
    checkpoint holds the running sums up to and including its own iteration).
    Columns: epoch, iter_start, iter_end, num_iters, complete, total_loss, loss_*, lr,
    data_time, time (the means of data_time and time are over the iterations that have them:
    detectron2 does not time the first iterations after a start).

    The running sums of the unfinished epoch are part of the checkpoint (this hook's
    ``state_dict``, saved by detectron2 with the trainer state), so the first row after a resume
    averages over the whole epoch, not only over the iterations since the resume. On resume at
    ``s``, rows with ``iter_end > s`` and the partial (``complete`` 0) rows of the epoch the run
    continues and later ones are dropped: the resumed run redoes those iterations.
    """

    def __init__(self, output_dir: str, iters_per_epoch: int):
        self.table = CSVTable(os.path.join(output_dir, TRAIN_CSV))
        self.clock = EpochClock(iters_per_epoch)
        self._enabled = comm.is_main_process()
        self._previous = None  # the checkpoint's state, when it counted another epoch length
        self._reset()

    @property
    def iters_per_epoch(self) -> int:
        return self.clock.iters_per_epoch

    def _reset(self, epoch: Optional[int] = None):
        self._epoch = epoch
        self._iter_start = None
        self._last_iter = None
        self._num_iters = 0
        self._sums: Dict[str, float] = {}
        self._counts: Dict[str, int] = {}
        self._lr = None

    # -- checkpointed state: the epoch origin and the running sums of the unfinished epoch ------
    def state_dict(self):
        if not self._enabled:
            return {}
        return {"iters_per_epoch": self.iters_per_epoch, "origin_iter": self.clock.origin_iter,
                "origin_epoch": self.clock.origin_epoch, "epoch": self._epoch,
                "iter_start": self._iter_start, "last_iter": self._last_iter,
                "num_iters": self._num_iters, "sums": dict(self._sums),
                "counts": dict(self._counts), "lr": self._lr}

    def _load_sums(self, state):
        self._epoch = state["epoch"]
        self._iter_start = state["iter_start"]
        self._last_iter = state["last_iter"]
        self._num_iters = int(state["num_iters"])
        self._sums = dict(state["sums"])
        self._counts = dict(state["counts"])
        self._lr = state["lr"]

    def load_state_dict(self, state):
        if not self._enabled or not state:
            return
        if state.get("iters_per_epoch") != self.iters_per_epoch:
            # another epoch length from the resume iteration on: before_train closes the
            # checkpoint's unfinished epoch and starts the next one there
            logger.info("train_epoch.csv: the checkpoint counted %s iterations per epoch, this run "
                        "counts %d", state.get("iters_per_epoch"), self.iters_per_epoch)
            self._previous = dict(state)
            return
        self.clock.set_origin(state.get("origin_iter", 0), state.get("origin_epoch", 0))
        self._load_sums(state)

    # -- hook ----------------------------------------------------------------------------------
    def _change_epoch_length(self, start: int):
        """Resume at ``start`` with another epoch length than the checkpoint's (:class:`EpochClock`)."""
        old = self._previous
        self._previous = None
        old_clock = EpochClock(old["iters_per_epoch"], old.get("origin_iter", 0),
                               old.get("origin_epoch", 0))
        if start == 0:
            return
        epoch = old_clock.epoch_of(start)
        if (start - old_clock.origin_iter) % old_clock.iters_per_epoch == 0:
            self.clock.set_origin(start, epoch)
            return
        # the checkpoint's epoch is unfinished: it ends here, as a final row with complete 0
        self.clock.set_origin(start, epoch + 1)
        if old.get("num_iters") and old.get("last_iter") == start - 1:
            self._load_sums(old)
            self.table.drop_where(lambda r: _int(r, "epoch") == epoch)
            self._write_row(complete=False)
        logger.warning("train_epoch.csv: epoch %d ends at iteration %d unfinished (complete 0); "
                       "from there on an epoch is %d iterations (was %d), epoch %d starts at "
                       "iteration %d", epoch, start, self.iters_per_epoch,
                       old_clock.iters_per_epoch, epoch + 1, start)
        self._reset()

    def before_train(self):
        if not self._enabled:
            return
        start = self.trainer.start_iter
        if self._previous is not None:
            self._change_epoch_length(start)
        current = self.clock.epoch_of(start)
        dropped = self.table.drop_where(
            lambda r: _int(r, "iter_end") > start
            or (_int(r, "complete", 0) != 1 and _int(r, "epoch") >= current))
        if dropped:
            logger.info("%s: dropped %d row(s) not covered by the checkpoint at iteration %d "
                        "(partial rows of epoch %d on, or iter_end > %d); they are redone",
                        self.table.path, len(dropped), start, current, start)
        if self._last_iter is not None and self._last_iter != start - 1:
            logger.warning("train_epoch.csv: running sums end at iteration %d but training starts "
                           "at %d; they are discarded", self._last_iter, start)
            self._reset()

    def after_step(self):
        if not self._enabled:
            return
        it = self.trainer.iter
        epoch = self.clock.epoch_of(it)
        if self._epoch != epoch:
            if self._num_iters:
                logger.warning("train_epoch.csv: epoch %s was not completed before epoch %d; its "
                               "%d iteration(s) are written as a partial row", self._epoch, epoch,
                               self._num_iters)
                self._write_row(complete=False)
            self._reset(epoch)
        self._absorb(it)
        if self.clock.ends_epoch(it):
            self._write_row(complete=True)
            self._reset(epoch + 1)

    def after_train(self):
        if self._enabled and self._num_iters:
            self._write_row(complete=False)  # the sums stay: model_final holds them for a resume

    def _absorb(self, it: int):
        for key, (value, value_iter) in self.trainer.storage.latest().items():
            if value_iter != it:
                continue
            if key == "total_loss" or key.startswith("loss_") or key in ("data_time", "time"):
                self._sums[key] = self._sums.get(key, 0.0) + float(value)
                self._counts[key] = self._counts.get(key, 0) + 1
            elif key == "lr":
                self._lr = float(value)
        if self._iter_start is None:
            self._iter_start = it
        self._last_iter = it
        self._num_iters += 1

    def _write_row(self, complete: bool):
        losses = sorted((k for k in self._sums if k not in TRAIN_EXTRA), key=_loss_order)
        row = {"epoch": self._epoch, "iter_start": self._iter_start, "iter_end": self._last_iter + 1,
               "num_iters": self._num_iters, "complete": int(complete)}
        for key in losses + ["data_time", "time"]:
            if key in self._sums:
                row[key] = _fmt(self._sums[key] / self._counts[key])
        row["lr"] = _fmt(self._lr)
        order = ["epoch", "iter_start", "iter_end", "num_iters", "complete", *losses, "lr",
                 "data_time", "time"]
        self.table.append([{k: row.get(k, "") for k in order}])


class EvalCSVWriter(EvalWatcher):
    """``valid_epoch.csv`` and ``metrics_epoch_per_class.csv`` from the ``<prefix>sem_seg/...``
    scalars of each evaluation (prefix empty for one test dataset, ``<dataset>/`` for several,
    as ``DefaultTrainer.test`` nests them). ``iteration`` counts completed iterations (an
    evaluation after 1000 iterations: 1000, epoch ``(1000 - 1) // iters_per_epoch``); undefined
    metrics (NaN) are empty cells. On resume at ``s``, rows with ``iteration > s`` are dropped.
    Known gap, from detectron2's semantics: a run killed after its checkpoint at ``s`` but before
    the evaluation at ``s`` finished is not re-evaluated at ``s`` when resumed."""

    def __init__(self, output_dir: str, iters_per_epoch, datasets: Dict[str, str],
                 class_names: Sequence[str], weights: str = "raw"):
        self.datasets = dict(datasets)  # dataset name -> storage key prefix
        self.weights = weights  # "ema" when ROOFTOP.EMA evaluates the EMA weights, else "raw"
        self.class_names = list(class_names)
        keys = [p + m for p in self.datasets.values() for m in VALID_METRICS]
        keys += [f"{p}{m}-{c}" for p in self.datasets.values() for m in PER_CLASS_METRICS
                 for c in self.class_names]
        super().__init__(keys)
        # an EpochClock (shared with the EpochCSVWriter, so an epoch origin moved by a resume
        # applies here too) or a number of iterations per epoch
        self.clock = iters_per_epoch if isinstance(iters_per_epoch, EpochClock) \
            else EpochClock(iters_per_epoch)
        self.valid = CSVTable(os.path.join(output_dir, VALID_CSV))
        self.per_class = CSVTable(os.path.join(output_dir, PER_CLASS_CSV))

    def before_train(self):
        if not self._enabled:
            return
        start = self.trainer.start_iter
        for table in (self.valid, self.per_class):
            dropped = table.drop_where(lambda r: _int(r, "iteration") > start)
            if dropped:
                logger.info("%s: dropped %d row(s) of evaluations after iteration %d (not covered "
                            "by the checkpoint); they are redone", table.path, len(dropped), start)

    def on_eval(self, iteration: int):
        latest = self.trainer.storage.latest()
        storage_iter = self.trainer.iter

        def get(key):
            value = latest.get(key)
            return _fmt(value[0]) if value is not None and value[1] == storage_iter else ""

        epoch = self.clock.epoch_of(iteration - 1)
        valid_rows, class_rows = [], []
        for dataset, prefix in self.datasets.items():
            base = {"epoch": epoch, "iteration": iteration, "dataset": dataset,
                    "weights": self.weights}
            valid_rows.append({**base, **{m: get(prefix + m) for m in VALID_METRICS}})
            for class_id, name in enumerate(self.class_names):
                class_rows.append({**base, "class_id": class_id, "class_name": name,
                                   **{m: get(f"{prefix}{m}-{name}") for m in PER_CLASS_METRICS}})
        # the same iteration evaluated again (a resume from model_final) replaces its rows
        self.valid.drop_where(lambda r: _int(r, "iteration") == iteration)
        self.per_class.drop_where(lambda r: _int(r, "iteration") == iteration)
        self.valid.append(valid_rows)
        self.per_class.append(class_rows)


class MetricsJSONResumeTrim(HookBase):
    """On a resumed run, drop from detectron2's ``metrics.json`` the records of iterations the
    checkpoint does not hold (the resumed run redoes and logs them again), and a torn last line
    left by a kill. detectron2's ``JSONWriter`` only appends, so without this a run killed
    between two checkpoints has those iterations twice.

    Kept: records of iterations ``< start`` and, when the checkpoint ends a completed run
    (``model_final``, so ``start`` equals that run's ``SOLVER.MAX_ITER``, as when a run is
    extended with a larger one), the evaluation record that detectron2 stores at iteration
    ``start`` after the last training iteration (it has no training scalars). The writer keeps its append-mode handle
    open, so the file is trimmed in place; a copy of the kept lines is written first
    (``metrics.json.trim``, removed when done) so that a crash during the trim loses nothing."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, "metrics.json")

    def before_train(self):
        start = self.trainer.start_iter
        if start <= 0 or not comm.is_main_process() or not os.path.isfile(self.path):
            return
        # a checkpoint that ends a completed run (model_final): the evaluation after its last
        # iteration is stored at iteration == start and belongs to it (see the class doc)
        completed_run = getattr(self.trainer, "checkpoint_max_iter", None) == start
        with open(self.path) as f:
            lines = f.read().splitlines()
        kept, dropped, torn = [], 0, 0
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            iteration = int(record.get("iteration", -1))
            if iteration > start or (iteration == start and not (
                    completed_run and not any(k in record for k in TRAINING_KEYS)
                    and not any(k.startswith("loss_") for k in record))):
                dropped += 1
                continue
            kept.append(line)
        if not dropped and not torn:
            return
        text = "".join(line + "\n" for line in kept)
        backup = self.path + ".trim"
        with open(backup, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        with open(self.path, "r+") as f:
            f.truncate(0)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.remove(backup)
        logger.info("metrics.json: resuming at iteration %d, dropped %d record(s) of later "
                    "iterations%s", start, dropped,
                    f" and {torn} torn line(s)" if torn else "")
