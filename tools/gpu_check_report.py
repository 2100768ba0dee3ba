#!/usr/bin/env python
"""Helpers of tools/gpu_check.sh (one command each; they print one JSON object):

    gpu_check_report.py geotiff PATH --size 4096          a georeferenced synthetic GeoTIFF
    gpu_check_report.py train-summary OUTPUT_DIR [--warmup 10]
        seconds per iteration after warm-up, peak GPU memory, loss finite and falling, AMP skipped
        steps, evaluations and checkpoints, from detectron2's metrics.json / log.txt
    gpu_check_report.py tiled-rate --config-file C --input TIF [--opts K V ...]
        tiled prediction of one image, timed after a warm-up window: windows per second
    gpu_check_report.py summary STEPS_TSV OUT_JSON        the steps' table as JSON
"""
import argparse
import glob
import json
import math
import os
import re
import statistics
import sys
import time
from pathlib import Path


def cmd_geotiff(args):
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    from capetown_synthetic import render_image

    tile = min(1024, args.size)
    n = math.ceil(args.size / tile)
    image = np.zeros((n * tile, n * tile, 3), np.uint8)
    for i in range(n):  # a mosaic of synthetic tiles (rendering one huge scene is slow)
        for j in range(n):
            rgb, _ = render_image(seed=5, split="test", index=i * n + j, size=tile)
            image[i * tile:(i + 1) * tile, j * tile:(j + 1) * tile] = rgb
    image = image[:args.size, :args.size]
    with rasterio.open(args.path, "w", driver="GTiff", width=args.size, height=args.size,
                       count=3, dtype="uint8", crs="EPSG:32734", tiled=True,
                       transform=from_origin(260000.0, 6240000.0, 0.08, 0.08)) as dst:
        dst.write(image.transpose(2, 0, 1))
    print(json.dumps({"geotiff": args.path, "size": args.size, "tiles": n * n}))


def _metrics(output_dir):
    rows = []
    path = Path(output_dir) / "metrics.json"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def cmd_train_summary(args):
    rows = _metrics(args.output_dir)
    train = [r for r in rows if "total_loss" in r]
    log = ""
    for name in ("log.txt",):
        p = Path(args.output_dir) / name
        if p.exists():
            log = p.read_text(errors="replace")
    times = [r["time"] for r in train if "time" in r and r.get("iteration", 0) >= args.warmup]
    losses = [(r["iteration"], r["total_loss"]) for r in train]
    finite = all(math.isfinite(v) for _, v in losses)
    k = max(1, len(losses) // 3)
    first = statistics.mean(v for _, v in losses[:k]) if losses else None
    last = statistics.mean(v for _, v in losses[-k:]) if losses else None
    max_mem = [int(m) for m in re.findall(r"max_mem: (\d+)M", log)]
    skipped = [r["amp/skipped_steps"] for r in train if "amp/skipped_steps" in r]
    evals = [r for r in rows if any(key.startswith("sem_seg/") for key in r)]
    out = {
        "output_dir": str(args.output_dir),
        "logged_iterations": [i for i, _ in losses],
        "seconds_per_iter_after_warmup": statistics.median(times) if times else None,
        "warmup_iterations": args.warmup,
        "peak_gpu_memory_mb": max(max_mem) if max_mem else None,
        "loss_finite": finite,
        "loss_first_third_mean": first, "loss_last_third_mean": last,
        "loss_falling": (last < first) if losses and finite and len(losses) > 1 else None,
        "amp_skipped_steps": skipped[-1] if skipped else None,
        "amp_loss_scale": next((r["amp/loss_scale"] for r in reversed(train)
                                if "amp/loss_scale" in r), None),
        "evaluations": [{k: v for k, v in r.items() if k in ("iteration", "sem_seg/mIoU",
                                                              "sem_seg/macro_fg_mIoU")}
                        for r in evals],
        "checkpoints": sorted(os.path.basename(p) for p in
                              glob.glob(os.path.join(args.output_dir, "model_*.pth"))),
    }
    print(json.dumps(out, indent=1))
    return 0 if finite and losses else 1


def cmd_tiled_rate(args):
    import torch

    from rooftop_m2f.engine import build_cfg
    from rooftop_m2f.inference.sources import open_image
    from rooftop_m2f.inference.tiling import TiledPredictor

    cfg = build_cfg(args.config_file, args.opts)
    predictor = TiledPredictor.from_config(cfg)
    with open_image(args.input) as source:
        rgb = source.read_all()
    h, w = rgb.shape[:2]
    ys, xs, th, tw = predictor.layout(h, w)
    predictor.window_scores(rgb[:th, :tw])  # warm-up (cudnn, allocator)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    with open_image(args.input) as source:
        mask = predictor.predict_source(source)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    windows = len(ys) * len(xs)
    print(json.dumps({"image": args.input, "size": [h, w], "windows": windows,
                      "window": [th, tw], "seconds": seconds,
                      "windows_per_s": windows / seconds,
                      "classes_predicted": sorted(int(c) for c in set(mask.ravel().tolist()))
                      if mask.size <= 2 ** 22 else None}))


def cmd_summary(args):
    steps = []
    for line in Path(args.steps).read_text().splitlines():
        stage, name, status, rc, seconds, limit, log = line.split("\t")
        steps.append({"stage": stage, "step": name, "status": status,
                      "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                      "seconds": float(seconds), "limit_s": int(limit), "log": log})
    extra = {}
    for path in sorted(Path(args.steps).parent.glob("*.json")):
        if path.resolve() == Path(args.out).resolve():
            continue
        try:
            extra[path.stem] = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            pass
    result = {"ok": all(s["status"] in ("passed", "skipped") for s in steps), "steps": steps,
              "results": extra}
    Path(args.out).write_text(json.dumps(result, indent=1))
    width = max((len(s["step"]) for s in steps), default=4)
    for s in steps:
        print(f"  {s['stage']:<6}{s['step']:<{width + 2}}{s['status']:<9}{s['seconds']:>7.1f} s")
    print(f"gpu_check: {'OK' if result['ok'] else 'FAILED'}; summary {args.out}")
    return 0 if result["ok"] else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("geotiff")
    p.add_argument("path")
    p.add_argument("--size", type=int, default=4096)
    p = sub.add_parser("train-summary")
    p.add_argument("output_dir")
    p.add_argument("--warmup", type=int, default=10)
    p = sub.add_parser("tiled-rate")
    p.add_argument("--config-file", required=True)
    p.add_argument("--input", required=True)
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[])
    p = sub.add_parser("summary")
    p.add_argument("steps")
    p.add_argument("out")
    args = ap.parse_args(argv)
    return {"geotiff": cmd_geotiff, "train-summary": cmd_train_summary,
            "tiled-rate": cmd_tiled_rate, "summary": cmd_summary}[args.cmd](args) or 0


if __name__ == "__main__":
    sys.exit(main())
