#!/usr/bin/env python
"""Check a Cape Town dataset split: every problem at once, class statistics, suggested weights.

    python tools/check_dataset.py --root datasets/capetown --split all --output-dir output/check
    python tools/check_dataset.py --config-file configs/capetown_swinS_1024.yaml --split train --full-stats

Reads <root>/<split>/{images,masks}; the mask-name rule and the default root come from the
config (ROOFTOP.MASK_STEM_PATTERN/REPLACEMENT, ROOFTOP.DATASET_ROOT), else the defaults.
Writes <output-dir>/dataset_check.json and class_shares.png. Exit status: 0 usable (warnings
allowed), 1 unusable (errors; all are listed), 2 bad arguments. The checks, their severity and
the weight formula are documented in rooftop_m2f/data/checks.py.
"""
import argparse
import sys

from rooftop_m2f.data.capetown import SPLITS, default_root
from rooftop_m2f.data.checks import format_report, run_check


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", help="dataset root holding train/ val/ test/ (default: the config's, "
                                   "else $DETECTRON2_DATASETS/capetown)")
    p.add_argument("--config-file", help="take the root and the mask-name rule from this config")
    p.add_argument("--split", default="all", choices=[*SPLITS, "all"],
                   help="split to check; 'all' checks those that exist (default)")
    p.add_argument("--output-dir", default="output/check_dataset", help="where the report and chart go")
    p.add_argument("--full-stats", action="store_true",
                   help="also connected-component size distributions per class")
    p.add_argument("--workers", type=int, default=None, help="decoding threads (default: up to 8)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    pattern, replacement, root = r"^(.*)$", r"\1", None
    if args.config_file:
        from rooftop_m2f.engine import build_cfg

        cfg = build_cfg(args.config_file, args.opts)
        pattern, replacement = cfg.ROOFTOP.MASK_STEM_PATTERN, cfg.ROOFTOP.MASK_STEM_REPLACEMENT
        root = cfg.ROOFTOP.DATASET_ROOT or None
    elif args.opts:
        parser.error(f"config overrides {args.opts} need --config-file")
    root = args.root or root or default_root()
    splits = list(SPLITS) if args.split == "all" else [args.split]
    reports, report, files = run_check(root, splits, pattern, replacement, output_dir=args.output_dir,
                                       full_stats=args.full_stats, workers=args.workers,
                                       required=args.split != "all")
    print(format_report(reports, report))
    for what, path in files.items():
        print(f"{what}: {path}")
    return 0 if report["usable"] else 1


if __name__ == "__main__":
    sys.exit(main())
