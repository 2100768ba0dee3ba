#!/usr/bin/env python
"""Train or evaluate the rooftop Mask2Former (detectron2's standard command line).

    python tools/train_net.py --config-file configs/capetown_swinS_1024.yaml --num-gpus 8
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file ... --resume        # continue the last checkpoint

On SIGTERM (ROOFTOP.STOP_SIGNALS) training saves model_<iter>.pth at the end of the iteration and
exits with status 143; --resume continues it. A NaN/inf loss stops it with status 1 and a message
naming the iteration and the loss terms.
"""
import sys

from detectron2.engine import default_argument_parser, launch
from detectron2.utils import comm
from torch.multiprocessing import ProcessExitedException

from rooftop_m2f.data.capetown import DatasetError
from rooftop_m2f.data.checks import check_datasets
from rooftop_m2f.engine import Trainer, build_cfg, setup_cfg
from rooftop_m2f.modeling.checkpoint_loading import load_model_weights
from rooftop_m2f.weights_io import SafeDetectionCheckpointer, WeightsError
from rooftop_m2f.engine.fault_tolerance import (
    NonFiniteLossError,
    TrainingInterrupted,
    exit_worker_now,
    forward_signals_to_workers,
    parse_signals,
)


def main(args):
    cfg = setup_cfg(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = SafeDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)  # data only
        if args.resume and checkpointer.has_checkpoint():  # the run's last checkpoint
            checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=True)
        else:  # MODEL.WEIGHTS, through the same loader as training and prediction
            load_model_weights(model, cfg)
        return Trainer.test(cfg, model)
    if cfg.ROOFTOP.CHECK_DATASET:
        if comm.is_main_process():  # decodes every file once; the other processes wait
            check_datasets(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
        comm.synchronize()
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    try:
        return trainer.train()
    except TrainingInterrupted as stop:
        if args.num_gpus * args.num_machines > 1:  # a spawned worker: see exit_worker_now
            exit_worker_now(stop.code)
        raise


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    stop_signals = []
    if args.num_gpus * args.num_machines > 1 and not args.eval_only:
        # The workers save and stop on these; this launcher passes them on instead of dying.
        stop_signals = parse_signals(build_cfg(args.config_file, args.opts).ROOFTOP.STOP_SIGNALS)
        forward_signals_to_workers(stop_signals)
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except (DatasetError, NonFiniteLossError, WeightsError) as e:  # one line, no traceback
        sys.exit(f"ERROR: {e}")
    except ProcessExitedException as e:  # a worker stopped on a signal after saving: pass it on
        if e.exit_code in [128 + s for s in stop_signals]:
            sys.exit(e.exit_code)
        raise
