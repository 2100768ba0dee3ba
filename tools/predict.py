#!/usr/bin/env python3
"""Predict rooftop solar classes for images (files, folders, list files or globs).

    .venv/bin/python tools/predict.py --config-file configs/capetown_swinS_1024.yaml \\
        --input tiles/ ortho.tif "more/*.png" --output-dir preds/ \\
        MODEL.WEIGHTS output/capetown_swinS_1024/model_best.pth

Trailing KEY VALUE pairs override the config (--opts KEY VALUE ... is accepted too); the first
config key after --input ends the inputs. Weights are required: MODEL.WEIGHTS, or
--random-weights for an untrained model on purpose.

An exported model (tools/export_onnx.py) is predicted on ONNX Runtime, without torch, detectron2
or Mask2Former: --model exported/model.onnx in place of --config-file (the config is the
export's config.yaml; trailing KEY VALUE pairs still override it).

Outputs per image (--outputs, comma-separated; default: all but coco):
{outputs}
and <output-dir>/summary.csv: image, class_id, class_name, components, pixels, area_m2, for every
prediction in the folder (earlier runs' rows are kept; an image predicted again replaces its own).

Georeferenced GeoTIFF inputs (CRS and transform): the mask GeoTIFF keeps both, polygons are in
that CRS and areas come from its pixel size. Other inputs: polygons in pixel coordinates
(x = column, y = row) and areas from --gsd (default ROOFTOP.GSD, 0.08 m); a TIFF without a CRS
is reported as a warning naming the file and gets no GeoTIFF mask.

Large images are predicted in overlapping windows whose class scores are blended (no seams):
ROOFTOP.TILE.SIZE (image pixels), ROOFTOP.TILE.OVERLAP, ROOFTOP.TILE.MODE (auto | never); TIFFs
are read one row of windows at a time. --tta hflip,vflip,rot90 averages the scores of flipped /
rotated views (ROOFTOP.TTA). Pixels without data (a TIFF's nodata value, alpha band or mask) get
class 255 (white in the colour PNG); windows without any data are not predicted.

Inputs: PNG, JPEG, TIFF; grayscale is replicated to RGB, alpha dropped, 16-bit scaled to 8-bit.
A path that does not exist is a usage error before the model loads (exit status 2). A file that
cannot be read or predicted (a decompression bomb over ROOFTOP.MAX_IMAGE_PIXELS, a truncated
file, an unsupported pixel type) is named on stderr and the others are still predicted (exit
status 1 when any failed, 0 when every image was predicted); summary.csv (and the COCO files)
hold every image predicted. An output folder that cannot be created or written is one line
before the model loads; a write that fails later (a full disk) ends the run in one line, every
file written before it complete.
"""
import argparse
import sys

try:
    from rooftop_m2f import cli
except ImportError:  # not the project's Python
    sys.exit(f"run it with the project's environment: .venv/bin/python {sys.argv[0]} (make setup)")
from rooftop_m2f.inference.writers import DEFAULT_OUTPUTS, OUTPUTS, describe_outputs


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.format(outputs=describe_outputs()),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_file_argument(parser, required=False)
    cli.add_model_argument(parser)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="image files, folders, list files (.txt) or globs")
    cli.add_output_dir_argument(parser)
    parser.add_argument("--outputs", default=",".join(DEFAULT_OUTPUTS),
                        help=f"comma-separated, from {','.join(OUTPUTS)} "
                             f"(default: {','.join(DEFAULT_OUTPUTS)})")
    parser.add_argument("--gsd", type=float, default=None,
                        help="metres per pixel for areas of non-georeferenced images "
                             "(default ROOFTOP.GSD)")
    parser.add_argument("--tta", default=None,
                        help="test-time augmentation views, comma-separated from hflip,vflip,rot90 "
                             "(default ROOFTOP.TTA)")
    cli.add_random_weights_argument(parser)
    cli.add_debug_argument(parser)
    parser.add_argument("--opts", dest="opts_flag", nargs=argparse.REMAINDER, default=[],
                        metavar="KEY VALUE", help="config overrides (the same as trailing ones)")
    cli.add_overrides_argument(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    inputs, trailing = cli.split_trailing_overrides(args.input)
    opts = [*trailing, *args.opts, *args.opts_flag]
    outputs = [o for o in args.outputs.split(",") if o]
    unknown = [o for o in outputs if o not in OUTPUTS]
    if unknown:
        raise cli.UsageError(f"--outputs: unknown {','.join(unknown)}; choose from "
                             f"{','.join(OUTPUTS)}")
    if args.gsd is not None:
        if not args.gsd > 0:
            raise cli.UsageError(f"--gsd {args.gsd}: must be > 0 (metres per pixel)")
        opts += ["ROOFTOP.GSD", str(args.gsd)]
    if args.tta is not None:
        opts += ["ROOFTOP.TTA", str(cli.parse_tta(args.tta))]
    if not inputs:
        raise cli.UsageError("--input: no image paths before the config overrides")
    cli.check_model_choice(args)

    from rooftop_m2f.fileio import check_output_folder
    from rooftop_m2f.images import IMAGE_EXTENSIONS
    from rooftop_m2f.inference.batch import predict_files
    from rooftop_m2f.inference.sources import expand_inputs
    from rooftop_m2f.inference.tiling import TiledPredictor
    from rooftop_m2f.inference.writers import folder_outputs

    if args.model:  # ONNX Runtime: no torch, detectron2 or Mask2Former
        from rooftop_m2f.export.onnx_runtime import OnnxPredictor, load_export_config

        logger = cli.setup_plain_logging()
        cfg = load_export_config(args.model, opts)
    else:
        from detectron2.utils.logger import setup_logger  # torch, detectron2: after the checks

        from rooftop_m2f.engine import build_cfg

        logger = setup_logger(name="rooftop_m2f")
        setup_logger(name="detectron2")
        cfg = build_cfg(args.config_file, opts)
        cli.check_weights(cfg.MODEL.WEIGHTS, allow_random=args.random_weights, what="predict.py")
    paths, missing = expand_inputs(inputs, IMAGE_EXTENSIONS)
    if missing:
        raise cli.UsageError("--input: " + "; ".join(missing))
    check_output_folder(args.output_dir)  # writable, or one line before the model is built
    image_ids = None
    if "coco" in outputs and cfg.ROOFTOP.COCO.PREDICTION_IMAGE_IDS:
        from rooftop_m2f.data.coco import image_ids_by_name

        image_ids = image_ids_by_name(cfg.ROOFTOP.COCO.PREDICTION_IMAGE_IDS)
    folder = folder_outputs(args.output_dir, outputs, image_ids)  # earlier files: mergeable
    predictor = TiledPredictor.from_config(cfg, OnnxPredictor.from_config(cfg) if args.model
                                           else None)
    warnings = cli.WarningCount()
    failures = predict_files(predictor, paths, args.output_dir, outputs, gsd=cfg.ROOFTOP.GSD,
                             folder=folder)
    logger.info("Predicted %d of %d images into %s%s", len(paths) - len(failures), len(paths),
                args.output_dir, warnings)
    if failures:
        print(f"{len(failures)} input(s) failed:", *failures, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
