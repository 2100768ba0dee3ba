#!/usr/bin/env python3
"""Convert between COCO-format annotations and the Cape Town PNG layout.

    # COCO JSON + images -> <out>/<split>/{images,masks}/ (PNG layout)
    .venv/bin/python tools/convert_coco.py to-png --json export/instances.json --image-root export/images \\
        --split train --output-dir datasets/capetown
    .venv/bin/python tools/convert_coco.py to-png --root datasets/capetown_coco --output-dir datasets/capetown

    # PNG layout -> <out>/<split>/annotations.json and <out>/<split>/images/ (COCO layout)
    .venv/bin/python tools/convert_coco.py to-coco --root datasets/capetown --output-dir datasets/capetown_coco \\
        [--segmentation rle|polygon] [--connectivity 4|8] [--no-images]

Layouts: PNG <root>/<split>/images/<name> + <root>/<split>/masks/<stem>.png; COCO
<root>/<split>/images/<name> + <root>/<split>/annotations.json. With --root every split that
exists is converted (--split picks one). --config-file takes the root, the mask-name rule
(ROOFTOP.MASK_STEM_PATTERN/REPLACEMENT), the COCO paths (ROOFTOP.COCO.*_JSON/_IMAGES), the crowd
rule and extra category names (ROOFTOP.COCO.CROWD, ROOFTOP.COCO.CATEGORY_NAMES) from a config,
with trailing KEY VALUE overrides.

to-coco writes one annotation per connected component (4-connected by default), category ids =
class indices; RLE is exact, polygons lose holes (details: rooftop_m2f/data/coco_convert.py).
to-png rasterises as training does: smaller objects on top, iscrowd to ignore (255) or to its
class (--crowd), categories matched by name (rooftop_m2f/data/coco.py). Exit status 0, or 1
with one line naming the file and the problem.
"""
import argparse
import logging
import os
import sys

try:
    from rooftop_m2f import cli
except ImportError:  # not the project's Python
    sys.exit(f"run it with the project's environment: .venv/bin/python {sys.argv[0]} (make setup)")

SPLITS = ("train", "val", "test")  # rooftop_m2f.data.capetown.SPLITS (a test keeps them equal)
CROWD_MODES = ("ignore", "class")  # rooftop_m2f.data.coco.CROWD_MODES
SEGMENTATION_MODES = ("rle", "polygon")  # rooftop_m2f.data.coco_convert.SEGMENTATION_MODES


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", help="input dataset root (default: the config's, else "
                                       "$DETECTRON2_DATASETS/capetown)")
    cli.add_config_file_argument(common, required=False)
    common.add_argument("--split", default="all", choices=[*SPLITS, "all"],
                        help="split to convert; 'all': those that exist (default)")
    cli.add_output_dir_argument(common, help="output root (<output-dir>/<split>/...)")
    cli.add_debug_argument(common)
    to_png = sub.add_parser("to-png", parents=[common], help="COCO JSON + images -> PNG layout")
    to_png.add_argument("--json", help="one COCO JSON (with --image-root and a --split name) "
                                       "instead of <root>/<split>/annotations.json")
    to_png.add_argument("--image-root", help="folder the JSON's file_names are relative to")
    to_png.add_argument("--crowd", choices=CROWD_MODES, default=None,
                        help="iscrowd objects: ignore (255, default) or their class")
    to_coco = sub.add_parser("to-coco", parents=[common], help="PNG layout -> COCO JSON + images")
    to_coco.add_argument("--segmentation", choices=SEGMENTATION_MODES, default="rle",
                         help="rle (exact, default) or polygon (outer rings; holes are lost)")
    to_coco.add_argument("--connectivity", type=int, choices=(4, 8), default=4,
                         help="pixels of one component share an edge (4, default) or a corner too (8)")
    to_coco.add_argument("--no-images", action="store_true",
                         help="write only the JSONs; file_names stay relative to the source images/")
    for sub_parser in (to_png, to_coco):
        cli.add_overrides_argument(sub_parser)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from rooftop_m2f.data.capetown import default_root  # detectron2: after parsing
    from rooftop_m2f.engine import setup
    from rooftop_m2f.fileio import check_output_folder

    cfg = setup(args)  # the project's defaults without --config-file
    check_output_folder(args.output_dir)  # writable, before any file is converted
    root = args.root or cfg.ROOFTOP.DATASET_ROOT or default_root()
    splits = list(SPLITS) if args.split == "all" else [args.split]
    if args.command == "to-png":
        done = run_to_png(parser, args, cfg, root, splits)
    else:
        done = run_to_coco(args, cfg, root, splits)
    if not done:
        raise cli.UserError(f"no split of {', '.join(splits)} found under {root}")
    for line in done:
        print(line)
    return 0


def run_to_png(parser, args, cfg, root, splits):
    from rooftop_m2f.data.capetown import DatasetError
    from rooftop_m2f.data.coco import parse_extra_names, split_paths
    from rooftop_m2f.data.coco_convert import coco_split_to_png

    if bool(args.json) != bool(args.image_root):
        parser.error("--json and --image-root go together")
    if args.json and args.split == "all":
        parser.error("--json converts one split: name it with --split train|val|test")
    crowd = args.crowd or cfg.ROOFTOP.COCO.CROWD
    extra = parse_extra_names(cfg.ROOFTOP.COCO.CATEGORY_NAMES)
    done = []
    for split in splits:
        if args.json:
            json_file, image_root = args.json, args.image_root
        else:
            json_file, image_root = split_paths(cfg, root, split)
        if not os.path.exists(json_file):
            if args.split != "all":
                raise DatasetError(f"{json_file}: COCO annotation file does not exist")
            continue
        out = os.path.join(args.output_dir, split)
        n = coco_split_to_png(json_file, image_root, out, crowd=crowd, extra_names=extra,
                              description=split)
        done.append(f"{split}: {n} images from {json_file} -> {out}/images, {out}/masks")
    return done


def run_to_coco(args, cfg, root, splits):
    from rooftop_m2f.data.capetown import load_split
    from rooftop_m2f.data.coco_convert import png_split_to_coco

    pattern, replacement = cfg.ROOFTOP.MASK_STEM_PATTERN, cfg.ROOFTOP.MASK_STEM_REPLACEMENT
    done = []
    for split in splits:
        split_dir = os.path.join(root, split)
        if args.split == "all" and not os.path.isdir(split_dir):
            continue
        dicts = load_split(split_dir, pattern, replacement)
        out = os.path.join(args.output_dir, split)
        path = png_split_to_coco(dicts, out, segmentation=args.segmentation,
                                 connectivity=args.connectivity, copy_images=not args.no_images,
                                 description=split)
        done.append(f"{split}: {len(dicts)} images from {split_dir} -> {path}")
    return done


if __name__ == "__main__":
    sys.exit(cli.run(main))
