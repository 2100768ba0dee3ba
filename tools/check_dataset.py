#!/usr/bin/env python3
"""Check a Cape Town dataset split: every problem at once, class statistics, suggested weights.

    .venv/bin/python tools/check_dataset.py --root datasets/capetown --split all --output-dir output/check
    .venv/bin/python tools/check_dataset.py --config-file configs/capetown_swinS_1024.yaml --split train --full-stats
    .venv/bin/python tools/check_dataset.py --split all ROOFTOP.DATASET_ROOT /data/ct_2023

Reads <root>/<split>/{images,masks}; the mask-name rule and the default root come from the
config (ROOFTOP.MASK_STEM_PATTERN/REPLACEMENT, ROOFTOP.DATASET_ROOT): --config-file and/or
trailing KEY VALUE overrides of the project's defaults.
Writes <output-dir>/dataset_check.json and class_shares.png. Exit status: 0 usable (warnings
allowed), 1 unusable (errors; all are listed), 2 bad arguments. The checks, their severity and
the weight formula are documented in rooftop_m2f/data/checks.py.
"""
import argparse
import sys

try:
    from rooftop_m2f import cli
except ImportError:  # not the project's Python
    sys.exit(f"run it with the project's environment: .venv/bin/python {sys.argv[0]} (make setup)")

SPLITS = ("train", "val", "test")  # rooftop_m2f.data.capetown.SPLITS (a test keeps them equal)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="dataset root holding train/ val/ test/ (default: the config's, "
                                   "else $DETECTRON2_DATASETS/capetown)")
    cli.add_config_file_argument(p, required=False)
    p.add_argument("--split", default="all", choices=[*SPLITS, "all"],
                   help="split to check; 'all' checks those that exist (default)")
    cli.add_output_dir_argument(p, required=False, default="output/check_dataset",
                                help="where the report and chart go (default: %(default)s)")
    p.add_argument("--full-stats", action="store_true",
                   help="also connected-component size distributions per class")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: up to 8)")
    cli.add_debug_argument(p)
    cli.add_overrides_argument(p)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from rooftop_m2f.data.capetown import default_root  # detectron2: after parsing
    from rooftop_m2f.data.checks import format_report, run_check
    from rooftop_m2f.engine.setup import load_cfg

    cfg = load_cfg(args.config_file, args.opts)  # the project's defaults without --config-file
    pattern, replacement = cfg.ROOFTOP.MASK_STEM_PATTERN, cfg.ROOFTOP.MASK_STEM_REPLACEMENT
    root = args.root or cfg.ROOFTOP.DATASET_ROOT or default_root()
    splits = list(SPLITS) if args.split == "all" else [args.split]
    reports, report, files = run_check(root, splits, pattern, replacement, output_dir=args.output_dir,
                                       full_stats=args.full_stats, workers=args.workers,
                                       required=args.split != "all")
    print(format_report(reports, report))
    for what, path in files.items():
        print(f"{what}: {path}")
    return 0 if report["usable"] else 1


if __name__ == "__main__":
    sys.exit(cli.run(main))
