#!/usr/bin/env python3
"""Tiled against single-pass prediction of large images: time and peak memory, side by side.

    .venv/bin/python benchmarks/benchmark_tiling.py [--config-file configs/capetown_tiny_cpu.yaml]
        [--sizes 2048 4096] [--tile 1024] [--overlap 256] [--single-max 2048]
        [--threads 1] [--device cpu] [--json results.json] MODEL.WEIGHTS output/demo/model_final.pth

For each size S a synthetic S x S GeoTIFF (strips, with a CRS and a 8 cm geotransform; 1024 px
synthetic rooftop scenes side by side) is predicted the way ``tools/predict.py`` does it
(``TiledPredictor.predict_source`` on the file, read strip by strip), in two variants, each in a
fresh process: "single" (``ROOFTOP.TILE.MODE never``: one forward over the whole image; only up
to ``--single-max``, as it needs memory in proportion to the image) and "tiled" (windows of
``--tile`` overlapping by ``--overlap``). Reported: windows, wall time, process CPU time, peak
memory growth over the loaded model (peak RSS reset after loading, or torch's peak allocation on
a GPU), the ratios tiled / single, and the share of pixels where the two class masks agree.
Both variants load the same weights (trailing ``MODEL.WEIGHTS path``, required, or
``--random-weights`` for the same seeded random initialisation in both); with random weights
nearly every pixel gets one class, so the agreement says little then.
"""
import argparse
import json
import os
import sys
import tempfile
import time

try:
    from rooftop_m2f import cli
except ImportError:  # not the project's Python
    sys.exit(f"run it with the project's environment: .venv/bin/python {sys.argv[0]} (make setup)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)


def make_geotiff(path, size, scene=1024):
    """A size x size RGB GeoTIFF of synthetic 1024 px scenes (strips, EPSG:32734, 8 cm pixels)."""
    from capetown_synthetic import make_synthetic_geotiff

    make_synthetic_geotiff(path, size, scene=scene)


def worker(args):
    import numpy as np
    import torch

    from detectron2.utils.logger import setup_logger

    from measure import memory_growth_mb, memory_peak, memory_start, synchronize
    from rooftop_m2f.engine.setup import build_cfg
    from rooftop_m2f.inference.predictor import RooftopPredictor
    from rooftop_m2f.inference.sources import open_image
    from rooftop_m2f.inference.tiling import TiledPredictor

    setup_logger(name="rooftop_m2f")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = build_cfg(args.config_file, [*args.opts, "MODEL.DEVICE", args.device])
    torch.manual_seed(0)  # the same random initialisation in every variant
    predictor = RooftopPredictor(cfg)
    mode = "never" if args.variant == "single" else "auto"
    tiled = TiledPredictor(predictor, args.tile, args.overlap, mode)
    with open_image(args.image) as source:
        ys, xs, _, _ = tiled.layout(source.height, source.width)
        memory = memory_start(args.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        mask = tiled.predict_source(source)
        synchronize(args.device)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    memory_peak(args.device, memory)
    np.save(args.out + ".npy", mask)
    with open(args.out, "w") as f:
        json.dump({"variant": args.variant, "size": args.size, "windows": len(ys) * len(xs),
                   "wall_s": wall, "cpu_s": cpu, "memory": memory,
                   "growth_mb": memory_growth_mb(memory),
                   "classes": sorted(int(c) for c in np.unique(mask)),
                   "threads": torch.get_num_threads()}, f)


def run_variant(args, scratch, variant, size, image):
    from measure import run_json_worker

    out = os.path.join(scratch, f"{variant}_{size}.json")
    cmd = [sys.executable, HERE, "--worker", "--variant", variant, "--size", str(size),
           "--image", image, "--out", out, "--config-file", args.config_file,
           "--tile", str(args.tile), "--overlap", str(args.overlap),
           "--threads", str(args.threads), "--device", args.device, *args.opts]
    result = run_json_worker(cmd, out, REPO, f"{variant} {size}")
    print(f"  [{variant} {size}] {result['windows']} window(s), {result['wall_s']:.1f} s",
          flush=True)
    return result, out + ".npy"


def _weights(args):
    opts = dict(zip(args.opts[::2], args.opts[1::2]))
    return opts.get("MODEL.WEIGHTS", "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=os.path.join(REPO, "configs",
                                                              "capetown_tiny_cpu.yaml"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--overlap", type=int, default=256)
    parser.add_argument("--single-max", type=int, default=2048,
                        help="largest size also predicted in a single pass")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", help="also write all results to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    cli.add_random_weights_argument(parser)
    cli.add_debug_argument(parser)
    cli.add_overrides_argument(parser)
    args = parser.parse_args(argv)
    cli.check_overrides(args.opts)
    if args.worker:
        return worker(args)
    cli.check_weights(_weights(args), allow_random=args.random_weights, what="benchmark_tiling.py")

    import numpy as np

    from measure import cpu_model

    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores; "
          f"config {os.path.basename(args.config_file)}; tiles {args.tile} px, overlap "
          f"{args.overlap} px; weights {_weights(args) or 'random init (seeded)'}; "
          f"{args.threads or 'default'} torch thread(s); device {args.device}", flush=True)
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="bench_tiling_") as scratch:
        for size in args.sizes:
            image = os.path.join(scratch, f"ortho_{size}.tif")
            make_geotiff(image, size)
            single = None
            if size <= args.single_max:
                single, single_mask = run_variant(args, scratch, "single", size, image)
                results.append(single)
                rows.append(row(single, None, None))
            tiled, tiled_mask = run_variant(args, scratch, "tiled", size, image)
            agree = None
            if single is not None:
                agree = float((np.load(single_mask) == np.load(tiled_mask)).mean())
                tiled["agreement_with_single"] = agree
            results.append(tiled)
            rows.append(row(tiled, single, agree))
    print("\n| image | variant | windows | wall time | CPU time | peak memory growth | "
          "time / single | memory / single | mask agreement with single |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


def row(res, single, agree):
    size = res["size"]
    growth = res["growth_mb"]
    cells = [f"{size}x{size}", res["variant"], str(res["windows"]), f"{res['wall_s']:.1f} s",
             f"{res['cpu_s']:.1f} s", "n/a" if growth is None else f"+{growth:,.0f} MB"]
    if single is None:
        cells += ["", "", ""]
    else:
        mem = ("n/a" if growth is None or not single["growth_mb"]
               else f"{growth / single['growth_mb']:.2f}")
        cells += [f"{res['wall_s'] / single['wall_s']:.2f}", mem,
                  f"{100 * agree:.2f}% (classes {res['classes']})"]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    sys.exit(cli.run(main))
