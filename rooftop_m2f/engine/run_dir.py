"""What a training run may do with its ``OUTPUT_DIR``, decided before anything is written there:
a second run never overwrites the first, and a resume that cannot be honoured is refused."""
import fnmatch
import logging
import os
import sys
import time

from ..cli import UserError
from .csv_logs import trim_metrics_json

logger = logging.getLogger(__name__)

# Files whose presence means "a training run lives here".
RUN_MARKERS = ("last_checkpoint", "model_*.pth", "metrics.json", "train_epoch.csv",
               "valid_epoch.csv", "metrics_epoch_per_class.csv", "best_checkpoints.json")
# Moved by --archive-old-run, besides the markers: everything else a training run writes.
RUN_FILES = RUN_MARKERS + ("model_best.pth", "config.yaml", "log.txt", "log.txt.rank*",
                           "events.out.tfevents.*", "inference", ".*.tmp", ".*.tmp.*")
ARCHIVE_DIR = "previous_runs"


class RunDirError(UserError):
    """OUTPUT_DIR cannot be used as asked; the message names the files and the ways on."""


class RunEnded(SystemExit):
    """``--resume`` of a run that early stopping ended: one line, exit status 0."""


def _matching(output_dir, patterns):
    names = sorted(os.listdir(output_dir)) if os.path.isdir(output_dir) else []
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def _listing(names, limit=6):
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def archive_run(output_dir):
    """Move the run's files (:data:`RUN_FILES`) into ``<output_dir>/previous_runs/<UTC
    YYYYmmdd-HHMMSS>/`` (renames: nothing is copied or deleted); return that folder."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target, n = os.path.join(output_dir, ARCHIVE_DIR, stamp), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(output_dir, ARCHIVE_DIR, f"{stamp}-{n}")
    os.makedirs(target)
    names = _matching(output_dir, RUN_FILES)
    for name in names:
        os.replace(os.path.join(output_dir, name), os.path.join(target, name))
    logger.info("--archive-old-run: moved %d file(s) (%s) to %s", len(names), _listing(names), target)
    return target


def _check_resume(cfg, tag):
    """``--resume`` of ``last_checkpoint``: it names a training checkpoint with at most
    ``SOLVER.MAX_ITER`` completed iterations, not the end of a run that early stopping ended;
    ``metrics.json`` then loses the records the checkpoint does not cover."""
    from ..checkpoint.safe_io import read_torch
    from .training_options import stopped_run_message

    out = cfg.OUTPUT_DIR
    with open(tag) as f:
        name = f.read().strip()
    path = os.path.join(out, name)
    if not name or not os.path.isfile(path):
        raise RunDirError(f"{tag} names {name!r}, which does not exist in {out}; point it at "
                          "an existing model_*.pth to --resume")
    data = read_torch(path, mmap=True)
    if not isinstance(data, dict) or "iteration" not in data:
        raise RunDirError(f"{path}: not a training checkpoint (no 'iteration'); --resume needs a "
                          "model_*.pth written by a training run")
    message = stopped_run_message(data, path) if cfg.ROOFTOP.EARLY_STOP.PATIENCE > 0 else None
    if message:
        print(f"{os.path.basename(sys.argv[0])}: {message}", file=sys.stderr, flush=True)
        raise RunEnded(0)
    done = int(data["iteration"]) + 1
    if done > cfg.SOLVER.MAX_ITER:
        epochs = f" (from ROOFTOP.EPOCHS={cfg.ROOFTOP.EPOCHS:g})" if cfg.ROOFTOP.EPOCHS > 0 else ""
        raise RunDirError(
            f"{path} holds {done} completed iterations but SOLVER.MAX_ITER is {cfg.SOLVER.MAX_ITER}"
            f"{epochs}: a run can be extended, not shortened; set SOLVER.MAX_ITER (or ROOFTOP.EPOCHS) "
            "to at least that, or train into another OUTPUT_DIR (nothing was changed)")
    trim_metrics_json(out, done, name == "model_final.pth")


def check_output_dir(cfg, resume, archive_old_run=False, restarted=False):
    """Whether training into ``cfg.OUTPUT_DIR`` may start (:class:`RunDirError` if not); with
    ``archive_old_run`` the old run is moved away first and its new folder returned. A folder
    holding a run (:data:`RUN_MARKERS`) needs ``--resume``, which needs ``last_checkpoint``
    (except after a torchrun restart, which starts again from iteration 0)."""
    out = cfg.OUTPUT_DIR
    tag = os.path.join(out, "last_checkpoint")
    if resume and os.path.isfile(tag):
        if archive_old_run:
            raise RunDirError(f"--resume and --archive-old-run contradict each other: {out} holds "
                              "a run to continue; drop one of them")
        return _check_resume(cfg, tag)
    if resume and restarted:
        return trim_metrics_json(out, 0, False)
    found = _matching(out, RUN_MARKERS)
    if not found:
        return None
    if archive_old_run:
        return archive_run(out)
    ways = (f"choose another OUTPUT_DIR, or pass --archive-old-run to move its files into "
            f"{out}/{ARCHIVE_DIR}/<date>/ first")
    if resume:
        raise RunDirError(
            f"--resume, but OUTPUT_DIR {out} has no last_checkpoint to continue from while it "
            f"holds files of a run ({_listing(found)}): resuming would start at iteration 0 and "
            f"mix two runs; nothing was changed. {ways[0].upper()}{ways[1:]}")
    raise RunDirError(
        f"a new run (no --resume), but OUTPUT_DIR {out} already holds a run ({_listing(found)}); "
        f"nothing was changed. Continue it with --resume, {ways}")
