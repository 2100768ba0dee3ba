#!/usr/bin/env python
"""Train or evaluate the rooftop Mask2Former (detectron2's standard command line).

    python tools/train_net.py --config-file configs/capetown_swinS_1024.yaml --num-gpus 8
    python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python tools/train_net.py --config-file ... --resume        # continue the last checkpoint
"""
import sys

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, launch

from rooftop_m2f.data.capetown import DatasetError
from rooftop_m2f.data.checks import check_datasets
from rooftop_m2f.engine import Trainer, setup_cfg


def main(args):
    cfg = setup_cfg(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    if cfg.ROOFTOP.CHECK_DATASET:
        check_datasets(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except DatasetError as e:  # bad data: the message names the files, no traceback needed
        sys.exit(f"ERROR: {e}")
