#!/usr/bin/env python3
"""The embedded default, end to end on the CPU: make the synthetic Cape Town dataset (when
absent), train the tiny config, evaluate on the test split, predict its images, and predict a
1024 px georeferenced GeoTIFF mosaic of unseen scenes in overlapping windows (tiled), scored
against its ground truth.

    .venv/bin/python tools/demo.py [--output-dir output/demo] [--iters N]

Each step runs the real command-line tool, printed before it runs.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/capetown_tiny_cpu.yaml"


def run(cmd):
    print("\n$ " + " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=REPO, check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="output/demo")
    parser.add_argument("--iters", type=int, default=None, help="override SOLVER.MAX_ITER")
    args = parser.parse_args()
    datasets = os.environ.setdefault("DETECTRON2_DATASETS", str(REPO / "datasets"))
    root = Path(datasets) / "capetown"
    out = Path(args.output_dir)
    py = sys.executable
    start = time.time()

    run([py, "datasets/make_synthetic_capetown.py", "--root", root])

    overrides = ["OUTPUT_DIR", out]
    if args.iters:
        overrides += ["SOLVER.MAX_ITER", args.iters]
    # a demo run again: the previous demo run moves to <output-dir>/previous_runs/<date>/
    run([py, "tools/train_net.py", "--config-file", CONFIG, "--archive-old-run", *overrides])
    weights = out / "model_best.pth"  # best validation macro foreground mIoU

    eval_dir = out / "test_eval"
    run([py, "tools/train_net.py", "--config-file", CONFIG, "--eval-only",
         "MODEL.WEIGHTS", weights, "OUTPUT_DIR", eval_dir, "DATASETS.TEST", "('capetown_sem_seg_test',)"])

    predictions = out / "predictions"
    run([py, "tools/predict.py", "--config-file", CONFIG, "--input", root / "test" / "images",
         "--output-dir", predictions, "MODEL.WEIGHTS", weights])

    # A larger, georeferenced input: 4 x 4 unseen synthetic scenes in one 1024 px GeoTIFF, predicted
    # in windows of ROOFTOP.TILE.SIZE (the scale the tiny model was trained at) and scored.
    mosaic = out / "mosaic"
    (mosaic / "truth").mkdir(parents=True, exist_ok=True)
    print(f"\n# writing {mosaic}/ortho_1024.tif (16 unseen synthetic scenes) and its truth mask")
    from capetown_synthetic import make_synthetic_geotiff

    make_synthetic_geotiff(mosaic / "ortho_1024.tif", 1024, scene=256, seed=7, split="test",
                           mask_path=mosaic / "truth" / "ortho_1024.png")
    run([py, "tools/predict.py", "--config-file", CONFIG, "--input", mosaic / "ortho_1024.tif",
         "--output-dir", mosaic / "predictions", "--outputs", "index,color,geojson,geotiff",
         "MODEL.WEIGHTS", weights])
    run([py, "tools/eval_from_png.py", "--pred-dir", mosaic / "predictions", "--gt-dir",
         mosaic / "truth", "--pred-suffix", "_index", "--output-dir", mosaic / "eval", "--no-progress"])

    report = eval_dir / "inference" / "capetown_sem_seg_test" / "sem_seg_evaluation.json"
    result = json.loads(report.read_text())
    tiled = json.loads((mosaic / "eval" / "metrics.json").read_text())
    print(f"\nDemo finished in {time.time() - start:.0f} s.")
    print(f"  test macro foreground mIoU: {result['macro_fg_mIoU']:.3f} "
          f"(an all-background model scores 0.000), mIoU {result['mIoU']:.3f}")
    print(f"  training run, checkpoints, metrics.json, TensorBoard events: {out}/")
    print(f"  test evaluation: {report}")
    print(f"  predictions (index, colour and overlay PNGs, coordinate JSON, GeoJSON polygons, "
          f"summary.csv): {predictions}/")
    per_class = ", ".join(f"{name} {m['IoU']:.3f}" for name, m in tiled["per_class"].items()
                          if m["IoU"] is not None)
    print(f"  tiled 1024 px GeoTIFF: macro foreground mIoU {tiled['macro_fg_mIoU']:.3f} "
          f"(IoU {per_class}): {mosaic}/")


if __name__ == "__main__":
    main()
