"""Running ``tools/train_net.py``: checks made once in the launching process, before any model
is built or worker spawned, then detectron2's ``launch``, and the exit status it ends with."""
import logging
import os
import sys

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import launch
from detectron2.utils import comm
from torch.multiprocessing import ProcessExitedException

from ..cli import UserError, check_weights
from ..data.checks import check_datasets
from .fault_tolerance import (
    TrainingInterrupted,
    exit_worker_now,
    forward_signals_to_workers,
    parse_signals,
)
from .setup import build_cfg, load_cfg, prepare_cfg, setup_cfg, setup_logging

logger = logging.getLogger(__name__)


def _has_run_checkpoint(output_dir):
    return os.path.isfile(os.path.join(output_dir, "last_checkpoint"))


def preflight(args):
    """The user's mistakes, found before heavy work: the config (file, keys, types), the
    weights (given when evaluating, an existing checkpoint file), the dataset (every file
    decoded once, on the first machine). Returns the config."""
    cfg = load_cfg(args.config_file, args.opts)
    setup_logging(cfg.OUTPUT_DIR)  # the same handlers as the first worker's (cached)
    prepare_cfg(cfg)
    resuming = args.resume and _has_run_checkpoint(cfg.OUTPUT_DIR)
    if not resuming:
        check_weights(cfg.MODEL.WEIGHTS, allow_random=args.random_weights or not args.eval_only,
                      what="--eval-only")
    if not args.eval_only and cfg.ROOFTOP.CHECK_DATASET and args.machine_rank == 0:
        check_datasets(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
    return cfg


def run_worker(args):
    """One training (or evaluation) process."""
    from .trainer import Trainer

    distributed = args.num_gpus * args.num_machines > 1
    try:
        cfg = setup_cfg(args)
        if args.eval_only:
            return Trainer.test(cfg, Trainer.build_evaluation_model(cfg, resume=args.resume))
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        return trainer.train()
    except TrainingInterrupted as stop:
        if distributed:  # a spawned worker: see exit_worker_now
            exit_worker_now(stop.code)
        raise
    except UserError as e:
        if not distributed:
            raise
        # A spawned worker: one line, then the exit status, which the launcher passes on.
        print(f"rank {comm.get_rank()}: error: {e}", file=sys.stderr, flush=True)
        exit_worker_now(e.exit_code)


def launch_training(args):
    """Preflight, then detectron2's ``launch``; returns the exit status."""
    preflight(args)
    stop_signals = []
    if args.num_gpus * args.num_machines > 1 and not args.eval_only:
        # The workers save and stop on these; this launcher passes them on instead of dying.
        stop_signals = parse_signals(build_cfg(args.config_file, args.opts).ROOFTOP.STOP_SIGNALS)
        forward_signals_to_workers(stop_signals)
    try:
        launch(run_worker, args.num_gpus, num_machines=args.num_machines,
               machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
    except ProcessExitedException as e:
        if e.exit_code in [128 + s for s in stop_signals]:  # saved and stopped on a signal
            return e.exit_code
        if e.exit_code in (1, 2):  # a worker said why, in one line, above
            return e.exit_code
        raise
    return 0
