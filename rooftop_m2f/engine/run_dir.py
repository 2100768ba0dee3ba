"""What a training run may do with its ``OUTPUT_DIR``, decided before anything is written there
(:func:`check_output_dir`, in the launcher): a second run never overwrites the first, and a
resume that cannot be honoured is refused in one line.
"""
import fnmatch
import logging
import os
import time

logger = logging.getLogger(__name__)

# Files whose presence means "a training run lives here".
RUN_MARKERS = ("last_checkpoint", "model_*.pth", "metrics.json", "train_epoch.csv",
               "valid_epoch.csv", "metrics_epoch_per_class.csv", "best_checkpoints.json")
# Moved by --archive-old-run, besides the markers: everything else a training run writes.
RUN_FILES = RUN_MARKERS + ("model_best.pth", "config.yaml", "log.txt", "log.txt.rank*",
                           "events.out.tfevents.*", "metrics.json.trim", "inference",
                           ".*.tmp", ".*.tmp.*")
ARCHIVE_DIR = "previous_runs"


class RunDirError(ValueError):
    """OUTPUT_DIR cannot be used as asked; the message names the files and the ways on."""


class ResumeError(RunDirError):
    """``--resume`` cannot honour the configuration (e.g. a shorter run than the checkpoint)."""


def _matching(output_dir, patterns):
    if not os.path.isdir(output_dir):
        return []
    names = sorted(os.listdir(output_dir))
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def run_files(output_dir):
    """The files in ``output_dir`` that show a training run lives there (sorted names)."""
    return _matching(output_dir, RUN_MARKERS)


def _listing(names, limit=6):
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _read_checkpoint(path):
    """A checkpoint's dict read as data only (``weights_only``: a crafted file is refused,
    nothing in it runs), its tensors memory-mapped where the format allows."""
    from ..checkpoint.safe_io import read_torch

    return read_torch(path, mmap=True)


def checkpoint_iteration(path, data=None):
    """The ``iteration`` a detectron2 checkpoint records (the last completed iteration's index),
    read without loading the tensors into memory where the format allows."""
    if data is None:
        data = _read_checkpoint(path)
    if not isinstance(data, dict) or "iteration" not in data:
        raise ResumeError(f"{path}: not a training checkpoint (no 'iteration'); --resume needs a "
                          "model_*.pth written by a training run")
    return int(data["iteration"])


def archive_run(output_dir, now=None):
    """Move the run's files (:data:`RUN_FILES`) of ``output_dir`` into
    ``<output_dir>/previous_runs/<UTC YYYYmmdd-HHMMSS>/`` (renames: nothing is copied or
    deleted) and return that folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    target = os.path.join(output_dir, ARCHIVE_DIR, stamp)
    n = 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(output_dir, ARCHIVE_DIR, f"{stamp}-{n}")
    os.makedirs(target)
    names = _matching(output_dir, RUN_FILES)
    for name in names:
        os.replace(os.path.join(output_dir, name), os.path.join(target, name))
    logger.info("--archive-old-run: moved %d file(s) of the previous run (%s) to %s",
                   len(names), _listing(names), target)
    return target


def check_output_dir(cfg, resume, archive_old_run=False):
    """Decide, before anything is written, whether training into ``cfg.OUTPUT_DIR`` may start;
    with ``archive_old_run`` move the old run away first. ``cfg`` has its epochs resolved
    (``SOLVER.MAX_ITER`` final). Returns the archive folder or None. It runs before detectron2's
    set-up writes ``config.yaml`` and ``log.txt`` and before any worker starts.

    * A run **without** ``--resume`` into a folder that holds a run (:data:`RUN_MARKERS`:
      ``last_checkpoint``, ``model_*.pth``, ``metrics.json``, the CSV logs, ``best_checkpoints.json``)
      is refused with one line naming those files and the three ways on: ``--resume`` (continue
      it), another ``OUTPUT_DIR``, or ``--archive-old-run`` (first move the old run's files, see
      :data:`ARCHIVE_DIR`, into ``previous_runs/<UTC date-time>/`` inside ``OUTPUT_DIR``; nothing is
      deleted).
    * ``--resume`` with a ``last_checkpoint``: the checkpoint must exist and hold at most
      ``SOLVER.MAX_ITER`` completed iterations (a run can be extended, by ``SOLVER.MAX_ITER``,
      ``ROOFTOP.EPOCHS`` or a grown training split, never shortened).
    * ``--resume`` without a ``last_checkpoint`` but with other files of a run (one killed before
      its first checkpoint) is refused as well: continuing would start at iteration 0 and mix two
      runs' logs.

    Every refusal is a :class:`RunDirError` (a :class:`ResumeError` for the checkpoint checks)
    whose message is the whole story, for a one-line ``ERROR:``.
    """
    out = cfg.OUTPUT_DIR
    found = run_files(out)
    tag = os.path.join(out, "last_checkpoint")
    if resume and os.path.isfile(tag):
        if archive_old_run:
            raise RunDirError(f"--resume and --archive-old-run contradict each other: {out} holds "
                              "a run to continue; drop one of them")
        with open(tag) as f:
            name = f.read().strip()
        path = os.path.join(out, name)
        if not name or not os.path.isfile(path):
            raise ResumeError(f"{tag} names {name!r}, which does not exist in {out}; point it at "
                              "an existing model_*.pth to --resume")
        data = _read_checkpoint(path)
        done = checkpoint_iteration(path, data) + 1
        if cfg.ROOFTOP.EARLY_STOP.PATIENCE > 0:
            from .training_options import RunEndedByEarlyStopping, stopped_run_message

            message = stopped_run_message(data, path)
            if message:
                raise RunEndedByEarlyStopping(message)
        if done > cfg.SOLVER.MAX_ITER:
            epochs = (f" (from ROOFTOP.EPOCHS={cfg.ROOFTOP.EPOCHS:g})"
                      if cfg.ROOFTOP.EPOCHS > 0 else "")
            raise ResumeError(
                f"{path} holds {done} completed iterations but SOLVER.MAX_ITER is "
                f"{cfg.SOLVER.MAX_ITER}{epochs}: a run can be extended, not shortened; set "
                f"SOLVER.MAX_ITER (or ROOFTOP.EPOCHS) to at least that, or train into another "
                "OUTPUT_DIR (nothing was changed)")
        return None
    if not found:
        return None
    if archive_old_run:
        return archive_run(out)
    if resume:
        raise RunDirError(
            f"--resume, but OUTPUT_DIR {out} has no last_checkpoint to continue from while it "
            f"holds files of a run ({_listing(found)}): resuming would start at iteration 0 and "
            "mix two runs; nothing was changed. Choose another OUTPUT_DIR, or pass "
            f"--archive-old-run to move those files into "
            f"{out}/{ARCHIVE_DIR}/<date>/ first")
    raise RunDirError(
        f"a new run (no --resume), but OUTPUT_DIR {out} already holds a run ({_listing(found)}); "
        "nothing was changed. Continue it with --resume, choose another OUTPUT_DIR, or pass "
        f"--archive-old-run to move its files into {out}/{ARCHIVE_DIR}/<date>/ first")
