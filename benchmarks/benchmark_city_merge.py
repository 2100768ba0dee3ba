#!/usr/bin/env python3
"""The city layer's merge at scale: time and peak memory of ``city.merge_run`` (read every
unit's features, merge across unit borders, finish the layer, write installations.gpkg and its
WGS84 GeoJSON, the summary and its plots) for growing numbers of units, without a model.

    .venv/bin/python benchmarks/benchmark_city_merge.py --units 1000 4000 16000 \\
        --output-dir output/benchmark_city_merge

Each run's per-unit outputs are synthetic: a square grid of --unit-size px units (EPSG:32734,
8 cm), in each about --objects rectangles of the three classes (2-40 px a side) placed at random,
many across a unit border, vectorised and written by the run's own code
(``vector_layer.unit_features``, the unit's class GeoTIFF, its manifest record); input tiles of
2 x 2 units. They are made once and kept under --output-dir. Each merge runs in a fresh process:
reported are its seconds and its peak memory over the process once the libraries are imported
(VmHWM reset), and the exponents of least-squares fits of log(seconds) and log(memory growth)
against log(units). One more run of the smallest size with 16 x the objects separates the costs
per feature from those per unit (reading a file, its manifest record), and with them the merge
is projected to --city-pixels (Cape Town at 8 cm: ~3.8e11 px) in units of --part-size
(ROOFTOP.CITY.PART_SIZE) at the benchmark's density of features (every synthetic roof has
panels or heaters: an upper bound). Results in <output-dir>/benchmark_city_merge.json.
"""
import argparse
import json
import os
import subprocess
import sys
import time

try:
    from rooftop_m2f import cli
except ImportError:  # not the project's Python
    sys.exit(f"run it with the project's environment: .venv/bin/python {sys.argv[0]} (make setup)")

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))
CAPE_TOWN_PIXELS = 3.8e11


def _plan(folder, units_per_side, size):
    from affine import Affine
    from rasterio.crs import CRS

    from capetown_synthetic.mosaic import ORIGIN, PIXEL
    from rooftop_m2f.inference import city
    from rooftop_m2f.inference.mosaic import Mosaic, Tile

    side = units_per_side * size
    tiles = [Tile(os.path.join(folder, f"tile_{r}_{c}.tif"), r, c, 2 * size, 2 * size)
             for r in range(0, side, 2 * size) for c in range(0, side, 2 * size)]
    mosaic = Mosaic(tiles, CRS.from_epsg(32734).to_wkt(),
                    Affine(PIXEL, 0, ORIGIN[0], 0, -PIXEL, ORIGIN[1]), side, side)
    units = [city.Unit(f"r{r}_c{c}", (r, r + size, c, c + size), (r, r + size, c, c + size),
                       f"{r}-{c}") for r in range(0, side, size) for c in range(0, side, size)]
    return city.CityPlan("synthetic", [], folder, mosaic, units)


def make_units(folder, n, size, objects, seed=0):
    """The plan of about ``n`` units (a square grid), their synthetic outputs written once."""
    import numpy as np
    from affine import Affine

    from rooftop_m2f.inference import city
    from rooftop_m2f.inference.sources import GeoReference
    from rooftop_m2f.inference.vector_layer import unit_features, write_features
    from rooftop_m2f.inference.writers import write_geotiff

    per_side = int(round(n ** 0.5))
    plan = _plan(folder, per_side, size)
    if os.path.isfile(os.path.join(folder, "complete.json")):
        return plan
    os.makedirs(os.path.join(folder, city.UNITS_DIR), exist_ok=True)
    for name in os.listdir(folder):  # an interrupted preparation: start again
        if city.MANIFEST_GLOB.match(name):
            os.remove(os.path.join(folder, name))
    rng = np.random.default_rng(seed)
    side = per_side * size
    rects = []  # row0, row1, col0, col1, class
    for cell, k in enumerate(rng.poisson(objects, per_side * per_side)):
        r, c = divmod(cell, per_side)
        for _ in range(k):
            h, w = rng.integers(2, 41, 2)
            y, x = r * size + int(rng.integers(0, size)), c * size + int(rng.integers(0, size))
            rects.append((y, min(side, y + h), x, min(side, x + w), int(rng.integers(1, 4))))
    rects = np.array(rects).reshape(-1, 5)
    crs, features = plan.mosaic.georef.crs, 0
    for unit in plan.units:
        r0, r1, c0, c1 = unit.region
        mask = np.zeros((size, size), np.uint8)
        near = rects[(rects[:, 0] < r1) & (rects[:, 1] > r0) & (rects[:, 2] < c1) & (rects[:, 3] > c0)]
        for a0, a1, b0, b1, cls in near:
            mask[max(a0, r0) - r0:min(a1, r1) - r0, max(b0, c0) - c0:min(b1, c1) - c0] = cls
        transform = plan.mosaic.transform @ Affine.translation(c0, r0)
        outputs = {"class": os.path.join(city.UNITS_DIR, f"{unit.name}_class.tif"),
                   "features": os.path.join(city.UNITS_DIR, f"{unit.name}_features.gpkg")}
        write_geotiff(mask, os.path.join(folder, outputs["class"]), GeoReference(crs, transform), 255)
        frame = unit_features(mask, np.full(mask.shape, 230, np.uint8), transform, crs, unit.name)
        write_features(frame, os.path.join(folder, outputs["features"]))
        features += len(frame)
        city.append_record(folder, 0, {"unit": unit.name, "key": unit.key, "status": "ok",
                                       "region": list(unit.region), "outputs": outputs,
                                       "features": len(frame)})
    with open(os.path.join(folder, "complete.json"), "w") as f:
        json.dump({"units": len(plan.units), "objects": len(rects), "features": features}, f)
    return plan


def worker(args):
    """One merge in this process (the outputs already made): prints one JSON line."""
    from rooftop_m2f.config import get_rooftop_cfg
    from rooftop_m2f.inference import city

    plan = make_units(args.folder, args.n, args.unit_size, args.objects)
    if args.prepare:
        return 0
    with open(os.path.join(args.folder, "complete.json")) as f:
        made = json.load(f)
    city_cfg = get_rooftop_cfg().ROOFTOP.CITY  # the defaults
    import geopandas  # noqa: F401  the libraries in the baseline, not in the growth
    import matplotlib.pyplot  # noqa: F401
    import pyogrio.raw  # noqa: F401
    from measure import memory_growth_mb, memory_peak, memory_start

    memory = memory_start("cpu")
    t0 = time.perf_counter()
    counts = city.merge_run(plan, city_cfg)
    seconds = time.perf_counter() - t0
    memory_peak("cpu", memory)
    print(json.dumps({**made, "installations": counts["installations"], "seconds": round(seconds, 2),
                      "memory": memory, "growth_mb": round(memory_growth_mb(memory), 1)}))


def _fit(x, y):
    """The exponent of a least-squares fit y ~ x^k."""
    import numpy as np

    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", type=int, nargs="+", default=[1000, 4000, 16000])
    parser.add_argument("--unit-size", type=int, default=128, help="unit side, pixels")
    parser.add_argument("--objects", type=float, default=2.0, help="objects per unit (mean)")
    parser.add_argument("--city-pixels", type=float, default=CAPE_TOWN_PIXELS)
    parser.add_argument("--part-size", type=int, default=8192,
                        help="the city run's units, pixels a side (ROOFTOP.CITY.PART_SIZE)")
    cli.add_output_dir_argument(parser, required=False, default="output/benchmark_city_merge")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    cli.add_debug_argument(parser)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if min(args.units) < 1 or args.unit_size < 16 or args.objects <= 0:
        raise cli.UsageError("--units must be >= 1, --unit-size >= 16, --objects > 0")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(REPO, "datasets"), REPO, os.environ.get("PYTHONPATH", "")]))

    def run(n, objects):
        folder = os.path.join(args.output_dir, f"units_{n}_{args.unit_size}px_{objects:g}obj")
        cmd = [sys.executable, HERE, "--worker", "--folder", folder, "--n", str(n),
               "--unit-size", str(args.unit_size), "--objects", str(objects)]
        t0 = time.time()
        if not os.path.isfile(os.path.join(folder, "complete.json")):
            print(f"making {n} units' outputs in {folder} ...", flush=True)
            subprocess.run(cmd + ["--prepare"], check=True, cwd=REPO, env=env)
            print(f"  made in {time.time() - t0:.0f} s", flush=True)
        out = subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True, text=True)
        r = {**json.loads(out.stdout.strip().splitlines()[-1]), "objects_per_unit": objects}
        print(f"  {r['units']} units, {r['features']} features: {r['seconds']} s, "
              f"+{r['growth_mb']} MiB", flush=True)
        return r

    results = [run(n, args.objects) for n in args.units]
    dense = run(args.units[0], 16 * args.objects)  # the same units, 16 x the features
    print("\n| units | objects per unit | features | installations | merge seconds | peak memory growth |")
    print("|---|---|---|---|---|---|")
    for r in results + [dense]:
        print(f"| {r['units']:,} | {r['objects_per_unit']:g} | {r['features']:,} | "
              f"{r['installations']:,} | {r['seconds']} | +{r['growth_mb']:.0f} MiB |")
    report = {"results": results, "dense": dense}
    if len(results) > 1:
        units = [r["units"] for r in results]
        first, last = results[0], results[-1]
        time_exp = _fit(units, [r["seconds"] for r in results])
        mem_exp = _fit(units, [max(r["growth_mb"], 1.0) for r in results])
        # costs per feature (the dense run against the first) and per unit (the rest, largest run)
        extra = dense["features"] - first["features"]
        s_feature = max(0.0, (dense["seconds"] - first["seconds"]) / extra)
        mb_feature = max(0.0, (dense["growth_mb"] - first["growth_mb"]) / extra)
        s_unit = (last["seconds"] - s_feature * last["features"]) / last["units"]
        mb_unit = (last["growth_mb"] - first["growth_mb"]) / (last["units"] - first["units"])
        city_units = args.city_pixels / args.part_size ** 2
        city_features = last["features"] * args.city_pixels / (last["units"] * args.unit_size ** 2)
        report.update(time_exponent=time_exp, memory_exponent=mem_exp, s_per_feature=s_feature,
                      s_per_unit=s_unit, mb_per_feature=mb_feature, mb_per_unit=mb_unit,
                      city_units=city_units, city_features=city_features,
                      city_seconds=s_unit * city_units + s_feature * city_features,
                      city_growth_mb=first["growth_mb"] + mb_unit * city_units + mb_feature * city_features)
        print(f"\ngrowth with the number of units: time ~ n^{time_exp:.2f}, memory ~ n^{mem_exp:.2f}")
        print(f"costs: {1e3 * s_unit:.2f} ms and {mb_unit * 1024:.2f} KiB per unit, "
              f"{1e3 * s_feature:.3f} ms and {mb_feature * 1024:.3f} KiB per feature")
        print(f"projection for {args.city_pixels:.3g} px ({city_units:,.0f} units of "
              f"{args.part_size} px, {city_features:.3g} features at this density): merge "
              f"~{report['city_seconds'] / 3600:.1f} h, peak memory ~+"
              f"{report['city_growth_mb'] / 1024:.1f} GiB")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "benchmark_city_merge.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
