#!/usr/bin/env python3
"""Check a Cape Town dataset split: every problem at once, class statistics, suggested weights.

    .venv/bin/python tools/check_dataset.py --root datasets/capetown --split all --output-dir output/check
    .venv/bin/python tools/check_dataset.py --config-file configs/capetown_swinS_1024.yaml --split train --full-stats
    .venv/bin/python tools/check_dataset.py --split all ROOFTOP.DATASET_ROOT /data/ct_2023

Reads <root>/<split>/{images,masks}; the mask-name rule and the default root come from the
config (ROOFTOP.MASK_STEM_PATTERN/REPLACEMENT, ROOFTOP.DATASET_ROOT): --config-file and/or
trailing KEY VALUE overrides of the project's defaults.
COCO format: a config with ROOFTOP.DATASET_FORMAT coco checks each split's JSON and images
(ROOFTOP.COCO.*; default <root>/<split>/annotations.json), and

    .venv/bin/python tools/check_dataset.py --coco-json export/instances.json --image-root export/images

checks one COCO file (categories, images, polygons, RLE) and the images it lists.
Writes <output-dir>/dataset_check.json and class_shares.png. Exit status: 0 usable (warnings
allowed), 1 unusable (errors; all are listed), 2 bad arguments. The problems and their severity:
datasets/README.md, "Problems".
"""
import argparse
import os
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
    p.add_argument("--coco-json", help="check this COCO JSON (with --image-root) instead of a root")
    p.add_argument("--image-root", help="folder the COCO JSON's image file_names are relative to")
    p.add_argument("--crowd", choices=["ignore", "class"], default=None,
                   help="COCO iscrowd objects: ignore (255) or their class (default: the config's "
                        "ROOFTOP.COCO.CROWD, else ignore)")
    cli.add_debug_argument(p)
    cli.add_overrides_argument(p)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.coco_json) != bool(args.image_root):
        parser.error("--coco-json and --image-root go together")
    from rooftop_m2f.data.checks import build_report, check_datasets, format_report, write_report
    from rooftop_m2f.engine import setup  # detectron2: after parsing
    from rooftop_m2f.fileio import check_output_folder

    opts = list(args.opts) + (["ROOFTOP.DATASET_ROOT", args.root] if args.root else []) \
        + (["ROOFTOP.COCO.CROWD", args.crowd] if args.crowd else [])
    cfg = setup(argparse.Namespace(config_file=args.config_file, opts=opts))
    if args.output_dir:
        check_output_folder(args.output_dir)  # writable, before any file is decoded
    if args.coco_json:
        from rooftop_m2f.data.coco import parse_extra_names, register_coco_semseg

        names = [args.split if args.split != "all" else os.path.splitext(os.path.basename(args.coco_json))[0]]
        register_coco_semseg(names[0], args.coco_json, args.image_root, cfg.ROOFTOP.COCO.CROWD,
                             parse_extra_names(cfg.ROOFTOP.COCO.CATEGORY_NAMES))
    else:
        names = [f"capetown_sem_seg_{s}" for s in (SPLITS if args.split == "all" else [args.split])]
    if args.split == "all" and not args.coco_json:  # the splits that exist
        from detectron2.data import MetadataCatalog

        found = [n for n in names if os.path.exists(MetadataCatalog.get(n).get("coco_json", None)
                                                     or MetadataCatalog.get(n).split_dir)]
        for name in sorted(set(names) - set(found)):
            print(f"{name}: not found, not checked", file=sys.stderr)
        if not found:
            raise cli.UserError(f"none of the splits {', '.join(SPLITS)} exists")
        names = found
    reports = check_datasets(names, full_stats=args.full_stats, workers=args.workers,
                             raise_errors=False)
    report = build_report(reports, args.full_stats)
    files = write_report(reports, report, args.output_dir) if args.output_dir else {}
    print(format_report(reports, report))
    for what, path in files.items():
        print(f"{what}: {path}")
    return 0 if report["usable"] else 1


if __name__ == "__main__":
    sys.exit(cli.run(main))
