#!/usr/bin/env python
"""Predict rooftop solar classes for images (files, folders or globs).

    python tools/predict.py --config-file configs/capetown_swinS_1024.yaml \\
        --input tiles/ ortho.tif more/*.png --output preds/ \\
        --opts MODEL.WEIGHTS output/capetown_swinS_1024/model_best.pth

Outputs per image (--outputs, comma-separated; default: all):
{outputs}
and <output>/summary.csv: image, class_id, class_name, components, pixels, area_m2, for every
prediction in the folder (earlier runs' rows are kept; an image predicted again replaces its own).

Classes: 0 background, 1 solar_panel, 2 solar_water_heater, 3 solar_pool_heater. Colour PNG
palette: background (0,0,0), solar_panel (255,0,0), solar_water_heater (0,255,0),
solar_pool_heater (0,0,255).

Georeferenced GeoTIFF inputs (CRS and transform): the mask GeoTIFF keeps both, polygons are in
that CRS and areas come from its pixel size. Other inputs: polygons in pixel coordinates
(x = column, y = row) and areas from --gsd (default ROOFTOP.GSD, 0.08 m); a TIFF without a CRS
is reported as a warning naming the file and gets no GeoTIFF mask.

Large images are predicted in overlapping windows whose class scores are blended (no seams):
ROOFTOP.TILE.SIZE (1024, image pixels), ROOFTOP.TILE.OVERLAP (256), ROOFTOP.TILE.MODE
(auto | never); TIFFs are read strip by strip. --tta hflip,vflip,rot90 averages the scores of
flipped / rotated views (ROOFTOP.TILE.TTA).

Inputs: PNG, JPEG, TIFF; grayscale is replicated to RGB, alpha dropped, 16-bit scaled to 8-bit.
A file that cannot be read or predicted is named on stderr and the others are still predicted.
Exit code: 0 when every image was predicted, 1 when any failed.
"""
import argparse
import sys

from detectron2.utils.logger import setup_logger

from rooftop_m2f.engine import build_cfg
from rooftop_m2f.inference.batch import (DEFAULT_OUTPUTS, OUTPUTS, check_output_folder,
                                         expand_inputs, predict_files)
from rooftop_m2f.inference.writers import SummaryError
from rooftop_m2f.inference.tiling import TiledPredictor

DOC = __doc__.format(outputs="\n".join(f"  {name:8s} <stem>{suffix:18s} {text}"
                                       for name, (suffix, _, text) in OUTPUTS.items()))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="+", required=True, help="image files, folders or globs")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--outputs", default=",".join(DEFAULT_OUTPUTS),
                        help=f"comma-separated, from {','.join(OUTPUTS)} (default: all)")
    parser.add_argument("--gsd", type=float, default=None,
                        help="metres per pixel for areas of non-georeferenced images "
                             "(default ROOFTOP.GSD)")
    parser.add_argument("--tta", default=None,
                        help="test-time augmentation views, comma-separated from hflip,vflip,rot90 "
                             "(default ROOFTOP.TILE.TTA)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides, last on the line: KEY VALUE ...")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logger = setup_logger(name="rooftop_m2f")
    setup_logger(name="detectron2")
    opts = list(args.opts)
    if args.gsd is not None:
        opts += ["ROOFTOP.GSD", str(args.gsd)]
    if args.tta is not None:
        opts += ["ROOFTOP.TILE.TTA", str([v for v in args.tta.split(",") if v])]
    cfg = build_cfg(args.config_file, opts)
    outputs = [o for o in args.outputs.split(",") if o]
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown:
        sys.exit(f"ERROR: unknown --outputs {unknown}; choose from {','.join(OUTPUTS)}")
    paths, missing = expand_inputs(args.input)
    for message in missing:
        logger.error("%s", message)
    try:
        check_output_folder(args.output)  # an existing summary.csv must be mergeable
    except SummaryError as e:
        sys.exit(f"ERROR: {e}")
    predictor = TiledPredictor.from_config(cfg)
    failures = predict_files(predictor, paths, args.output, outputs, gsd=cfg.ROOFTOP.GSD)
    logger.info("Predicted %d of %d images into %s", len(paths) - len(failures), len(paths),
                args.output)
    failures = missing + failures
    if failures:
        print(f"{len(failures)} input(s) failed:", *failures, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
