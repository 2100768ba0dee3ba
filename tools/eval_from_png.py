#!/usr/bin/env python3
"""Pixel-level evaluation of class-index PNG predictions against ground-truth masks.

    .venv/bin/python tools/eval_from_png.py --pred-dir P --gt-dir G [--output-dir O] [--pred-suffix _index]

Files are matched by file name: ``P/<stem><suffix>.png`` vs ``G/<stem>.png`` (no suffix by
default; ``--pred-suffix _index`` evaluates the class-index PNGs written by tools/predict.py).
If any mask has no prediction, any prediction has no mask, or a pair differs in size, every
such file is listed and the tool exits with status 2 without writing anything: a partial set is
never evaluated (there is no option to evaluate one).
Predictions that are not a class (e.g. 255) count as wrong predictions.

With ``--output-dir`` it writes (each atomically) ``O/metrics.json`` (``per_class`` by class
name with ``IoU``/``precision``/``recall``/``F1``, ``mIoU``, ``macro_fg_mIoU``,
``pixel_accuracy``, ``fwIoU``, ``confusion_matrix`` rows = ground truth, columns = prediction
plus a last ``invalid_prediction`` column; rates are fractions in [0, 1], ``null`` = undefined),
``O/per_class.csv`` and ``O/confusion_matrix.png``. A summary table is always printed.
The metric code is :mod:`rooftop_m2f.evaluation.metrics`, shared with the training evaluator.
"""
import argparse
import logging
import os
import sys

try:
    from rooftop_m2f import cli
except ImportError:  # not the project's Python
    sys.exit(f"run it with the project's environment: .venv/bin/python {sys.argv[0]} (make setup)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pred-dir", required=True, help="folder of class-index prediction PNGs")
    parser.add_argument("--gt-dir", required=True, help="folder of ground-truth mask PNGs")
    cli.add_output_dir_argument(parser, required=False,
                                help="where to write metrics.json, per_class.csv and confusion_matrix.png")
    parser.add_argument("--pred-suffix", default="",
                        help="prediction file = <gt stem><suffix>.png, e.g. _index for tools/predict.py "
                             "outputs (other files in --pred-dir are then not looked at); default none")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli.add_debug_argument(parser)
    args = parser.parse_args(argv)
    from rooftop_m2f.data.capetown import DatasetError  # detectron2: after parsing
    from rooftop_m2f.evaluation import png_eval
    from rooftop_m2f.fileio import check_output_folder

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("rooftop_m2f").setLevel(logging.INFO)
    if args.output_dir:
        check_output_folder(args.output_dir)  # writable, before any file is read
    try:
        metrics = png_eval.evaluate_png_dirs(args.pred_dir, args.gt_dir, args.pred_suffix,
                                             progress=not args.no_progress)
    except DatasetError as e:
        print(f"eval_from_png: error: {e}", file=sys.stderr)
        return 2
    print(png_eval.format_summary(metrics))
    if args.output_dir:
        paths = png_eval.write_outputs(metrics, args.output_dir, extra={
            "pred_dir": os.path.abspath(args.pred_dir), "gt_dir": os.path.abspath(args.gt_dir),
            "pred_suffix": args.pred_suffix})
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
