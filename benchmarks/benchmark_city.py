#!/usr/bin/env python3
"""City-scale prediction throughput on a synthetic georeferenced mosaic, and the hours it
projects for the Cape Town metro.

    .venv/bin/python benchmarks/benchmark_city.py --config-file configs/capetown_tiny_cpu.yaml \\
        --tiles 16 --tile-size 512 --rounds 4 --output-dir output/benchmark_city --random-weights

A mosaic of --tiles GeoTIFF tiles of --tile-size px (EPSG:32734, 8 cm; synthetic scenes laid
across the tile borders) is predicted in two ways, side by side in one process with one model,
in alternating rounds (--rounds): "tile set", the mosaic's windows read across tile borders, unit
by unit (--part-size, ROOFTOP.CITY.PART_SIZE), as tools/predict_city.py predicts; and "per
tile", every tile on its own with its own windows, each window read from one file. Reported per way: windows,
seconds, windows/s and pixels/s, the seconds the model waited for data, the ratio of the two
ways' windows/s in each round and its median (steadier than the totals on a loaded machine), and
the share of pixels whose class the two ways agree on (they differ near tile borders, where a tile alone lacks the
pixels across them). Then tools/predict_city.py itself, each variant in fresh processes from
scratch (--restart): one process with batch 1, --processes processes (GLOO / NCCL through
detectron2's launch) with batch 1, and one process with --batch-size windows per forward pass:
windows, wall seconds (the slowest rank), windows/s, data wait, the peak memory of each process
(MiB), and whether the outputs (class rasters and merged layer) are identical to the
one-process run's; the hours projected for --city-pixels (Cape Town 2023, 8 cm: ~2,446 km^2,
~3.8e11 px) with the configured window size and overlap at the best measured windows/s, and the
mosaic truth's component sizes against ROOFTOP.CITY.MIN_AREA_M2 (what its defaults rest on).
Trailing KEY VALUE pairs are passed to every run (e.g. MODEL.WEIGHTS, ROOFTOP.TILE.SIZE); results
in <output-dir>/benchmark_city.json.
"""
import argparse
import json
import os
import subprocess
import sys

try:
    from rooftop_m2f import cli
except ImportError:  # not the project's Python
    sys.exit(f"run it with the project's environment: .venv/bin/python {sys.argv[0]} (make setup)")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPE_TOWN_PIXELS = 3.8e11  # ~2,446 km^2 at 0.08 m: 2.446e9 m^2 / 0.0064 m^2


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_file_argument(parser)
    cli.add_output_dir_argument(parser, required=False, default="output/benchmark_city")
    parser.add_argument("--tiles", type=int, default=16, help="tiles in the mosaic (a square "
                        "number gives a square mosaic)")
    parser.add_argument("--tile-size", type=int, default=1024, help="tile side, pixels")
    parser.add_argument("--processes", type=int, default=2, help="processes of the parallel run")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass of "
                        "the batched run")
    parser.add_argument("--city-pixels", type=float, default=CAPE_TOWN_PIXELS,
                        help="pixels of the city to project the hours for (default Cape Town)")
    parser.add_argument("--part-size", type=int, default=1024, help="ROOFTOP.CITY.PART_SIZE of "
                        "every run: units of work of about this side, shared among the processes")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the tile-set "
                        "and per-tile ways")
    parser.add_argument("--machine", default=None, help="what to call this machine in the report "
                        "(default: the CPU model and core count)")
    cli.add_random_weights_argument(parser)
    cli.add_debug_argument(parser)
    cli.add_overrides_argument(parser)
    return parser


def _grid(tiles):
    rows = int(tiles ** 0.5)
    while tiles % rows:
        rows -= 1
    return rows, tiles // rows


def _machine():
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def _run_variant(args, mosaic, out, processes, batch):
    cmd = [sys.executable, os.path.join(REPO, "tools", "predict_city.py"), "--config-file",
           args.config_file, "--input", mosaic, "--output-dir", out, "--restart",
           "--num-gpus", str(processes)]
    if args.random_weights:
        cmd.append("--random-weights")
    cmd += [*args.opts, "ROOFTOP.TILE.BATCH_SIZE", str(batch)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise cli.UserError(f"predict_city.py ({processes} process(es), batch {batch}) exited "
                            f"{result.returncode}: {result.stderr.strip().splitlines()[-1:]}")
    ranks = []
    for r in range(processes):  # a rank without units writes none
        path = os.path.join(out, f"throughput-rank{r}.json")
        if os.path.isfile(path):
            with open(path) as f:
                ranks.append(json.load(f))
    seconds = max(r["seconds"] for r in ranks)
    windows = sum(r["windows"] for r in ranks)
    return {"processes": processes, "batch_size": batch, "windows": windows,
            "seconds": round(seconds, 2), "windows_per_s": round(windows / seconds, 3),
            "wait_s": round(sum(r["wait_s"] for r in ranks), 2),
            "peak_rss_mb_per_process": [r["peak_rss_mb"] for r in ranks],
            "torch_threads": [r["torch_threads"] for r in ranks], "output_dir": out}


def side_by_side(cfg, paths, rounds):
    """Tile set against per tile, alternating, in this process (see the module docstring)."""
    import time

    import numpy as np
    import torch

    from rooftop_m2f.inference import city
    from rooftop_m2f.inference.mosaic import scan_inputs
    from rooftop_m2f.inference.tiling import TiledPredictor

    torch.manual_seed(0)
    tiler = TiledPredictor.from_config(cfg, batch_size=cfg.ROOFTOP.TILE.BATCH_SIZE)
    mosaic = scan_inputs(paths).mosaic
    tile = cfg.ROOFTOP.TILE
    units = city.plan_units(mosaic, tile.SIZE, tile.OVERLAP, tile.MODE, int(cfg.ROOFTOP.CITY.PART_SIZE))
    singles = [scan_inputs([p]).mosaic for p in paths]
    ways = {"tile set": [(mosaic, u.extent, u.region) for u in units],
            "per tile": [(m, None, None) for m in singles]}
    masks = {way: np.full((mosaic.height, mosaic.width), 255, np.uint8) for way in ways}
    totals = {way: dict(windows=0, seconds=0.0, wait_s=0.0, predict_s=0.0) for way in ways}
    rates = {way: [] for way in ways}  # windows/s of each round
    tiler.window_scores(np.zeros((tile.SIZE, tile.SIZE, 3), np.uint8))  # warm-up
    for round_ in range(rounds):
        for way, work in ways.items():
            t0 = time.perf_counter()
            windows = 0
            for m, extent, region in work:
                with m.open(extent) as source:
                    result = tiler.predict(source, region)
                t, windows = totals[way], windows + result.windows
                t.update(windows=t["windows"] + result.windows, wait_s=t["wait_s"] + result.wait_s,
                         predict_s=t["predict_s"] + result.predict_s)
                if round_ == 0:  # the class of every pixel, placed in the mosaic
                    r0, c0 = (region[0], region[2]) if region else (
                        round((m.transform.f - mosaic.transform.f) / mosaic.transform.e),
                        round((m.transform.c - mosaic.transform.c) / mosaic.transform.a))
                    h, w = result.mask.shape
                    masks[way][r0:r0 + h, c0:c0 + w] = result.mask
            seconds = time.perf_counter() - t0
            totals[way]["seconds"] += seconds
            rates[way].append(windows / seconds)
            print(f"  round {round_ + 1}, {way}: {seconds:.1f} s, {windows / seconds:.3f} windows/s",
                  flush=True)
    out = []
    for way, t in totals.items():
        out.append({"way": way, "windows": t["windows"] // rounds, "seconds": round(t["seconds"], 2),
                    "windows_per_s": round(t["windows"] / t["seconds"], 3),
                    "pixels_per_s": round(rounds * mosaic.height * mosaic.width / t["seconds"]),
                    "wait_s": round(t["wait_s"], 3), "predict_s": round(t["predict_s"], 2),
                    "units": len(ways[way])})
    agree = float((masks["tile set"] == masks["per tile"]).mean())
    ratios = [a / b for a, b in zip(rates["tile set"], rates["per tile"])]
    return out, agree, ratios


def _same_outputs(a, b):
    """(class rasters identical, share of identical class pixels, merged layers identical)."""
    import geopandas as gpd
    import numpy as np
    import rasterio

    same_px = total_px = 0
    for name in sorted(os.listdir(os.path.join(a, "tiles"))):
        if name.endswith("_class.tif"):
            with rasterio.open(os.path.join(a, "tiles", name)) as x, \
                    rasterio.open(os.path.join(b, "tiles", name)) as y:
                xa, ya = x.read(1), y.read(1)
            same_px += int((xa == ya).sum())
            total_px += xa.size
    la = gpd.read_file(os.path.join(a, "installations.gpkg"), layer="installations")
    lb = gpd.read_file(os.path.join(b, "installations.gpkg"), layer="installations")
    layers = len(la) == len(lb) and la.drop(columns="geometry").equals(
        lb.drop(columns="geometry")) and bool(la.geometry.geom_equals_exact(lb.geometry, 0).all())
    return same_px == total_px, round(same_px / max(total_px, 1), 6), layers


def truth_sizes(truth, min_area, pixel_area=0.0064):
    from scipy import ndimage

    import numpy as np

    from rooftop_m2f.data.capetown import CLASS_NAMES

    out = {}
    for c in (1, 2, 3):
        labels, count = ndimage.label(truth == c)
        areas = np.bincount(labels.ravel())[1:] * pixel_area
        if count == 0:
            continue
        out[CLASS_NAMES[c]] = {
            "components": int(count), "min_m2": round(float(areas.min()), 4),
            "p1_m2": round(float(np.percentile(areas, 1)), 4),
            "p5_m2": round(float(np.percentile(areas, 5)), 4),
            "median_m2": round(float(np.median(areas)), 3), "min_area_m2": float(min_area[c]),
            "dropped": int((areas < min_area[c]).sum()),
            "largest_dropped_px": int(round(float(areas[areas < min_area[c]].max(initial=0))
                                            / pixel_area))}
    return out


def truth_summary(truth, cfg):
    """The planner's summary a perfect model would give for the mosaic: the truth mask through
    the same vectorising, area, MIN_AREA_M2 and kWp code as a run's layer."""
    import numpy as np

    from capetown_synthetic import mosaic_transform
    from rooftop_m2f.inference.mosaic import Mosaic, Tile
    from rooftop_m2f.inference.planner import Summary
    from rooftop_m2f.inference.vector_layer import (finish_layer, layer_options, merge_features,
                                                    unit_features)

    city = cfg.ROOFTOP.CITY
    features = unit_features(truth, np.full(truth.shape, 255, np.uint8), mosaic_transform(),
                             "EPSG:32734", "truth")
    mosaic = Mosaic([Tile("truth", 0, 0, *truth.shape)], features.crs.to_wkt(), mosaic_transform(),
                    *truth.shape)
    layer = finish_layer(merge_features(features, mosaic), **layer_options(city))
    summary = Summary(None)
    summary.add(layer)
    return summary.rows()


def main(argv=None):
    args = build_parser().parse_args(argv)
    cli.check_overrides(args.opts)
    args.opts = [*args.opts, "ROOFTOP.CITY.PART_SIZE", str(args.part_size)]
    if min(args.tiles, args.processes, args.batch_size, args.rounds, args.part_size) < 1 \
            or args.tile_size < 64:
        raise cli.UsageError("--tiles, --processes, --batch-size, --rounds, --part-size must be "
                             ">= 1 and --tile-size >= 64")

    import numpy as np  # after the checks above

    from capetown_synthetic import make_synthetic_mosaic
    from rooftop_m2f.engine import build_cfg

    cfg = build_cfg(args.config_file, args.opts)
    cli.check_weights(cfg.MODEL.WEIGHTS, allow_random=args.random_weights, what="benchmark_city.py")
    rows, cols = _grid(args.tiles)
    mosaic = os.path.join(args.output_dir, f"mosaic_{rows}x{cols}_{args.tile_size}")
    print(f"mosaic: {rows} x {cols} tiles of {args.tile_size} px -> {mosaic}", flush=True)
    _, truth, _ = make_synthetic_mosaic(mosaic, rows, cols, args.tile_size)

    print(f"side by side, {args.rounds} alternating round(s) in this process:", flush=True)
    ways, agreement, round_ratios = side_by_side(cfg, sorted(
        os.path.join(mosaic, n) for n in os.listdir(mosaic) if n.endswith(".tif")), args.rounds)
    variants = [(1, 1), (args.processes, 1), (1, args.batch_size)]
    results = []
    for processes, batch in variants:
        out = os.path.join(args.output_dir, f"run_p{processes}_b{batch}")
        print(f"predicting: {processes} process(es), batch {batch} ...", flush=True)
        results.append(_run_variant(args, mosaic, out, processes, batch))
    reference = results[0]["output_dir"]
    for r in results[1:]:
        identical, share, layer = _same_outputs(reference, r["output_dir"])
        r.update(class_rasters_identical=identical, class_pixels_identical=share,
                 layer_identical=layer)
    results[0].update(class_rasters_identical=True, class_pixels_identical=1.0,
                      layer_identical=True)

    ratio = ways[0]["windows_per_s"] / ways[1]["windows_per_s"]
    tile, overlap = int(cfg.ROOFTOP.TILE.SIZE), int(cfg.ROOFTOP.TILE.OVERLAP)
    stride = tile - overlap
    city_windows = args.city_pixels / float(stride * stride)
    best = max(results, key=lambda r: r["windows_per_s"])
    hours = city_windows / best["windows_per_s"] / 3600.0
    report = {
        "machine": args.machine or _machine(), "config_file": args.config_file,
        "overrides": args.opts, "mosaic": {"tiles": args.tiles, "tile_size": args.tile_size,
                                           "pixels": int(truth.size)},
        "window": {"size": tile, "overlap": overlap}, "side_by_side": ways,
        "tile_set_over_per_tile_windows_per_s": ratio, "round_ratios": round_ratios,
        "median_round_ratio": float(np.median(round_ratios)),
        "class_agreement_tile_set_vs_per_tile": agreement, "runs": results,
        "projection": {"city_pixels": args.city_pixels, "windows": round(city_windows),
                       "windows_per_s": best["windows_per_s"],
                       "variant": f"{best['processes']} process(es), batch {best['batch_size']}",
                       "hours": round(hours, 1)},
        "truth_components": truth_sizes(truth, list(cfg.ROOFTOP.CITY.MIN_AREA_M2)),
        "truth_summary": truth_summary(truth, cfg),
    }
    from rooftop_m2f.fileio import write_text_atomic

    write_text_atomic(os.path.join(args.output_dir, "benchmark_city.json"),
                      json.dumps(report, indent=1) + "\n")
    print(f"\nmachine: {report['machine']}; window {tile} px, overlap {overlap}; mosaic "
          f"{args.tiles} x {args.tile_size}^2 px")
    print("| way | units of work | windows | seconds | windows/s | pixels/s | waited for data, s |")
    print("|---|---|---|---|---|---|---|")
    for w in ways:
        print(f"| {w['way']} | {w['units']} | {w['windows']} | {w['seconds']} | "
              f"{w['windows_per_s']} | {w['pixels_per_s']:,} | {w['wait_s']} |")
    print(f"tile set / per tile: {ratio:.3f} x the windows/s, "
          f"{ways[0]['pixels_per_s'] / ways[1]['pixels_per_s']:.3f} x the pixels/s; per round "
          f"{', '.join(f'{r:.3f}' for r in round_ratios)} x the windows/s (median "
          f"{report['median_round_ratio']:.3f}); the two agree on the class of "
          f"{100 * agreement:.2f} % of the pixels\n")
    print("| processes | batch | windows | seconds | windows/s | waited for data, s | peak MiB "
          "per process | outputs = 1 process |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        same = "identical" if r["class_rasters_identical"] and r["layer_identical"] else \
            f"{100 * r['class_pixels_identical']:.4f} % of class pixels"
        print(f"| {r['processes']} | {r['batch_size']} | {r['windows']} | {r['seconds']} | "
              f"{r['windows_per_s']} | {r['wait_s']} | "
              f"{', '.join(f'{m:.0f}' for m in r['peak_rss_mb_per_process'])} | {same} |")
    p = report["projection"]
    print(f"\nprojection: {p['city_pixels']:.3g} px = {p['windows']:,} windows of {tile} px "
          f"(stride {stride}) at {p['windows_per_s']} windows/s ({p['variant']}): "
          f"{p['hours']:,} hours")
    print("\ntruth components of the mosaic vs ROOFTOP.CITY.MIN_AREA_M2:")
    for name, t in report["truth_components"].items():
        print(f"  {name}: {t['components']} components, min {t['min_m2']} m², p1 {t['p1_m2']}, "
              f"p5 {t['p5_m2']}, median {t['median_m2']}; below {t['min_area_m2']} m²: "
              f"{t['dropped']} (largest {t['largest_dropped_px']} px)")
    print("\nthe mosaic's truth as a run's summary (city_summary.csv of a perfect model):")
    for r in report["truth_summary"]:
        print(f"  {r['class_name']}: {r['installations']} installations, {r['area_m2']} m²"
              + (f", est. {r['est_kwp']} kWp" if r["est_kwp"] != "" else ""))
    print(f"\n-> {os.path.join(args.output_dir, 'benchmark_city.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
