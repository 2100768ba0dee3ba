#!/usr/bin/env python
"""Predict rooftop solar classes for images (files, folders or globs).

    python tools/predict.py --config-file configs/capetown_swinS_1024.yaml \
        --input tiles/ more/*.png --output preds/ --opts MODEL.WEIGHTS output/model_final.pth

Writes <stem>_index.png (class indices), <stem>_color.png and <stem>_overlay.png per image.
Exit code: 0 when every image was predicted, 1 when any failed (each is named on stderr).
"""
import argparse
import sys

from detectron2.utils.logger import setup_logger

from rooftop_m2f.engine import build_cfg
from rooftop_m2f.inference.batch import OUTPUTS, expand_inputs, predict_files
from rooftop_m2f.inference.predictor import RooftopPredictor


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--input", nargs="+", required=True, help="image files, folders or globs")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--outputs", default="index,color,overlay",
                        help=f"comma-separated, from {','.join(OUTPUTS)}")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides, last on the line: KEY VALUE ...")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logger = setup_logger(name="rooftop_m2f")
    setup_logger(name="detectron2")
    cfg = build_cfg(args.config_file, args.opts)
    paths, missing = expand_inputs(args.input)
    for message in missing:
        logger.error("%s", message)
    predictor = RooftopPredictor(cfg)
    failures = predict_files(predictor, paths, args.output, args.outputs.split(","))
    logger.info("Predicted %d of %d images into %s", len(paths) - len(failures), len(paths),
                args.output)
    failures = missing + failures
    if failures:
        print(f"{len(failures)} input(s) failed:", *failures, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
