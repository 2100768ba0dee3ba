#!/usr/bin/env python
"""Train or evaluate the rooftop Mask2Former (detectron2's standard command line).

    python tools/train_net.py --config-file configs/capetown_swinS_1024.yaml --num-gpus 8
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file ... --resume        # continue the last checkpoint
    python tools/train_net.py --config-file ... --archive-old-run  # new run; old one moved aside

On SIGTERM (ROOFTOP.STOP_SIGNALS) training saves model_<iter>.pth at the end of the iteration and
exits with status 143; --resume continues it. A NaN/inf loss stops it with status 1 and a message
naming the iteration and the loss terms.
"""
import sys

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

from rooftop_m2f.data.checks import check_datasets
from rooftop_m2f.engine import Trainer, setup_cfg
from rooftop_m2f.modeling.checkpoint_loading import load_model_weights
from rooftop_m2f.engine.fault_tolerance import TrainingInterrupted, exit_worker_now
from rooftop_m2f.engine.launching import run_training, training_argument_parser


def main(args):
    cfg = setup_cfg(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
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
    # rooftop_m2f/engine/launching.py: OUTPUT_DIR checks before anything is written
    # (--archive-old-run), bounded waits, stop signals passed on, one-line errors.
    sys.exit(run_training(main, training_argument_parser().parse_args()))
