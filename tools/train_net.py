#!/usr/bin/env python3
"""Train or evaluate the rooftop Mask2Former (detectron2's command line).

    .venv/bin/python tools/train_net.py --config-file configs/capetown_swinS_1024.yaml --num-gpus 8
    .venv/bin/python tools/train_net.py --config-file configs/capetown_swinS_1024.yaml --eval-only \\
        MODEL.WEIGHTS output/capetown_swinS_1024/model_best.pth
    .venv/bin/python tools/train_net.py --config-file configs/capetown_swinS_1024.yaml --resume
    .venv/bin/python tools/train_net.py --config-file configs/capetown_swinS_1024.yaml --archive-old-run

Under torchrun or srun each process is one rank (drop --num-gpus): see docs/ADVANCED.md,
"Train on several machines". Trailing KEY VALUE pairs override the config. A new run into an OUTPUT_DIR that holds
one is refused (--resume continues it, --archive-old-run moves it into OUTPUT_DIR/previous_runs/
first). On SIGTERM (ROOFTOP.STOP_SIGNALS) training saves model_<iter>.pth at the end of the
iteration and exits with status 143; --resume continues it. A NaN/inf loss stops it with status 1
and a message naming the iteration and the loss terms.
Exit status: 0 done, 1 the run failed, 2 a usage mistake (one line; --debug for the traceback).
"""
import argparse
import sys

try:
    from rooftop_m2f import cli
except ImportError:  # not the project's Python
    sys.exit(f"run it with the project's environment: .venv/bin/python {sys.argv[0]} (make setup)")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_file_argument(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the last checkpoint in OUTPUT_DIR (model, optimizer, scheduler, "
                        "iteration, CSV logs)")
    p.add_argument("--archive-old-run", action="store_true",
                   help="OUTPUT_DIR holds a run and this one is not a --resume: move the old run's "
                        "files into OUTPUT_DIR/previous_runs/<UTC date-time>/ first (nothing is "
                        "deleted)")
    p.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS on DATASETS.TEST")
    cli.add_random_weights_argument(p)
    p.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0, help="the rank of this machine")
    p.add_argument("--dist-url", default="auto",
                   help="torch.distributed's address on machine 0, tcp://<host>:<port> (auto: a "
                        "free port on this machine)")
    p.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="how long a process waits for the others in a collective before the run "
                        "ends with one line naming it (default: %(default)g)")
    cli.add_debug_argument(p)
    cli.add_overrides_argument(p)
    return p


def main(args):
    """One training (or evaluation) process."""
    from rooftop_m2f.engine import Trainer, setup

    cfg = setup(args)
    if args.eval_only:
        return Trainer.test(cfg, Trainer.build_evaluation_model(cfg, resume=args.resume))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def run(argv=None):
    args = build_parser().parse_args(argv)
    from rooftop_m2f.engine import launch  # torch, detectron2: after parsing

    return launch(main, args)


if __name__ == "__main__":
    sys.exit(cli.run(run))
