#!/usr/bin/env python
"""Convert between COCO-format annotations and the Cape Town PNG layout.

    # COCO JSON + images -> <out>/<split>/{images,masks}/ (PNG layout)
    python tools/convert_coco.py to-png --json export/instances.json --image-root export/images \\
        --split train --output-dir datasets/capetown
    python tools/convert_coco.py to-png --root datasets/capetown_coco --output-dir datasets/capetown

    # PNG layout -> <out>/<split>/annotations.json and <out>/<split>/images/ (COCO layout)
    python tools/convert_coco.py to-coco --root datasets/capetown --output-dir datasets/capetown_coco \\
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rooftop_m2f.data.capetown import SPLITS, DatasetError, default_root, load_split  # noqa: E402
from rooftop_m2f.data.coco import CROWD_MODES, parse_extra_names, split_paths  # noqa: E402
from rooftop_m2f.data.coco_convert import (  # noqa: E402
    SEGMENTATION_MODES,
    coco_split_to_png,
    png_split_to_coco,
)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", help="input dataset root (default: the config's, else "
                                       "$DETECTRON2_DATASETS/capetown)")
    common.add_argument("--config-file", help="take root, mask-name rule and COCO keys from this config")
    common.add_argument("--split", default="all", choices=[*SPLITS, "all"],
                        help="split to convert; 'all': those that exist (default)")
    common.add_argument("--output-dir", required=True, help="output root (<output-dir>/<split>/...)")
    common.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
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
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = None
    if args.config_file:
        from rooftop_m2f.engine.setup import load_cfg

        cfg = load_cfg(args.config_file, args.opts)
    elif args.opts:
        parser.error(f"config overrides {args.opts} need --config-file")
    root = args.root or (cfg.ROOFTOP.DATASET_ROOT if cfg is not None else "") or default_root()
    splits = list(SPLITS) if args.split == "all" else [args.split]
    try:
        if args.command == "to-png":
            done = run_to_png(parser, args, cfg, root, splits)
        else:
            done = run_to_coco(args, cfg, root, splits)
    except DatasetError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    if not done:
        print(f"ERROR: no split of {', '.join(splits)} found under {root}", file=sys.stderr)
        return 1
    for line in done:
        print(line)
    return 0


def run_to_png(parser, args, cfg, root, splits):
    if bool(args.json) != bool(args.image_root):
        parser.error("--json and --image-root go together")
    if args.json and args.split == "all":
        parser.error("--json converts one split: name it with --split train|val|test")
    crowd = args.crowd or (cfg.ROOFTOP.COCO.CROWD if cfg is not None else "ignore")
    extra = parse_extra_names(cfg.ROOFTOP.COCO.CATEGORY_NAMES) if cfg is not None else {}
    done = []
    for split in splits:
        if args.json:
            json_file, image_root = args.json, args.image_root
        elif cfg is not None:
            json_file, image_root = split_paths(cfg, root, split)
        else:
            json_file = os.path.join(root, split, "annotations.json")
            image_root = os.path.join(root, split, "images")
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
    pattern, replacement = r"^(.*)$", r"\1"
    if cfg is not None:
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
    sys.exit(main())
