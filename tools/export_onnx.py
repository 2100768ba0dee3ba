#!/usr/bin/env python3
"""Export the trained model's semantic segmentation to ONNX, for ONNX Runtime (or any ONNX
runtime) without torch, detectron2, Mask2Former or the compiled op.

    .venv/bin/python tools/export_onnx.py --config-file configs/capetown_swinS_1024.yaml \\
        --output-dir exported/ MODEL.WEIGHTS output/capetown_swinS_1024/model_best.pth

Writes into --output-dir:
  model.onnx   the graph: (B, 3, S, S) float32 normalised windows in, (B, K, S, S) float32
               per-class scores out (their argmax is the class map). S is ROOFTOP.INPUT_SIZE
               when set (windows are resized to it first), else the window size
               ROOFTOP.TILE.SIZE; B is ROOFTOP.TILE.BATCH_SIZE. Opset 17; the deformable
               attention in standard operators (GridSample).
  model.json   classes, palette, normalisation (pixel mean/std, channel order), window and
               input size, opset, output kind, the source config and the weights' sha256.
  config.yaml  the full config the model was built from.
The graph passes onnx.checker and is run once with ONNX Runtime, whose scores must agree with
PyTorch's. Earlier exported files are kept unless --overwrite; on an error nothing is written.

Weights are required: MODEL.WEIGHTS, or --random-weights for an untrained model on purpose
(seeded with SEED, 0 when negative). Trailing KEY VALUE pairs override the config.
In Python, without torch: rooftop_m2f.export.onnx_runtime.OnnxPredictor("exported/model.onnx")
.scores(window) gives a window's (K, h, w) scores with the same preprocessing as tools/predict.py.
"""
import argparse
import sys

try:
    from rooftop_m2f import cli
except ImportError:  # not the project's Python
    sys.exit(f"run it with the project's environment: .venv/bin/python {sys.argv[0]} (make setup)")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_file_argument(parser)
    cli.add_output_dir_argument(parser, help="folder for model.onnx, model.json and config.yaml")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in --output-dir")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17, >= 16)")
    cli.add_random_weights_argument(parser)
    cli.add_debug_argument(parser)
    cli.add_overrides_argument(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.opset < 16:
        raise cli.UsageError(f"--opset {args.opset}: GridSample needs opset 16 or later")
    cli.check_config_file(args.config_file)
    cli.check_overrides(args.opts)

    from detectron2.utils.logger import setup_logger  # torch, detectron2: after the checks above

    from rooftop_m2f.engine import build_cfg
    from rooftop_m2f.export.onnx_export import check_exportable, export_onnx

    logger = setup_logger(name="rooftop_m2f")
    setup_logger(name="detectron2")
    cfg = build_cfg(args.config_file, args.opts)
    cli.check_weights(cfg.MODEL.WEIGHTS, allow_random=args.random_weights, what="export_onnx.py")
    check_exportable(cfg)
    written = export_onnx(cfg, args.output_dir, random_weights=args.random_weights,
                          overwrite=args.overwrite, opset=args.opset,
                          config_file=args.config_file, overrides=args.opts)
    logger.info("Wrote %s, %s and %s", written["model"], written["meta"], written["config"])
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
