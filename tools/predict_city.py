#!/usr/bin/env python3
"""Predict a whole orthophoto mosaic (a city) into one layer of solar installations and a
planner's summary; resumable, on every GPU of one or many machines.

    .venv/bin/python tools/predict_city.py --config-file configs/capetown_swinS_1024.yaml \\
        --input ortho2023/ --output-dir city/ --num-gpus 8 \\
        MODEL.WEIGHTS output/capetown_swinS_1024/model_best.pth

Inputs (--input): folders (their .tif/.tiff/.vrt), list files (.txt/.lst: one path a line),
globs, GeoTIFF tiles and GDAL VRT mosaics. The inputs are one mosaic: windows are laid on its
pixel grid and read across tile borders, so the layer is the same however the imagery is tiled.
Inputs in another CRS than most, or on another pixel grid (pixel size, origin off the grid), are
refused (named; not reprojected or resampled), as are missing, unreadable (corrupt) and
non-georeferenced files; the others are predicted (exit status 1 when any input was refused or
any unit failed). Pixels no tile covers, and nodata / alpha / masked pixels, have no data;
windows without data are not predicted; where tiles overlap, the first input with data wins.

Output folder: units/<unit>_class.tif (uint8 classes, 255 = no data) and
units/<unit>_features.gpkg per unit of work (a block of the mosaic); tiles/<name>_class.tif per
input, cut from the units'; manifest-rank<R>.jsonl (one line per finished unit); run.json (the
config and weights fingerprint); throughput-rank<R>.json (windows/s, seconds the model waited
for data, peak memory); installations.gpkg (one feature per installation, merged across unit
borders: class_id, class_name, area_m2, pixel_count, confidence, sources, num_tiles, lon, lat,
shape, est_kwp, est_kwp_low, est_kwp_high, review, review_reason; GeoPackage 1.2 with a default
QGIS style); installations_wgs84.geojson; city_summary.csv, city_overview.png, city_summary.png
(per class and, with --zones, per zone).

Running the same command again skips the finished units and merges again; a run with another
config or model is refused unless --restart. Several machines: the same command on each, with
--num-machines, --machine-rank and a --dist-url reachable from all, and an output folder on a
shared file system; units are sharded across all processes and rank 0 merges. The tool starts
its processes itself (detectron2's launch): it refuses to run under torchrun (WORLD_SIZE > 1).

An exported model (tools/export_onnx.py): --model exported/model.onnx in place of
--config-file; predicted on ONNX Runtime (all of this machine's cores, CUDA where
onnxruntime-gpu has it) in one process, without torch, detectron2 or Mask2Former.

Knobs: ROOFTOP.TILE.SIZE/OVERLAP/BATCH_SIZE, ROOFTOP.CITY.MIN_AREA_M2 (per class),
ROOFTOP.CITY.SIMPLIFY_M, ROOFTOP.CITY.RECTANGLE_CLASSES/RECTANGLE_MIN_FILL,
ROOFTOP.CITY.KWP_PER_M2 (and _LOW, _HIGH), ROOFTOP.CITY.REVIEW_MIN_CONFIDENCE,
ROOFTOP.CITY.REVIEW_MIN_AREA_M2/REVIEW_MAX_AREA_M2 (per class), ROOFTOP.CITY.PART_SIZE (the size
of the units of work shared among the processes; see rooftop_m2f/config.py).
"""
import argparse
import os
import sys

try:
    from rooftop_m2f import cli
except ImportError:  # not the project's Python
    sys.exit(f"run it with the project's environment: .venv/bin/python {sys.argv[0]} (make setup)")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_file_argument(parser, required=False)
    cli.add_model_argument(parser)
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH",
                        help="GeoTIFF/VRT files, folders, list files (.txt) or globs")
    cli.add_output_dir_argument(parser)
    parser.add_argument("--zones", default=None, metavar="FILE",
                        help="zones (suburbs, wards): any vector file; summary per zone")
    parser.add_argument("--zone-field", default=None, metavar="NAME",
                        help="the zones' name field (default: their first text field)")
    parser.add_argument("--restart", action="store_true",
                        help="remove this folder's previous run and predict everything again")
    parser.add_argument("--num-gpus", type=int, default=1, help="processes per machine")
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0, help="this machine's rank")
    parser.add_argument("--dist-url", default="auto",
                        help="tcp://HOST:PORT of machine 0 (auto: a free local port)")
    cli.add_random_weights_argument(parser)
    cli.add_debug_argument(parser)
    cli.add_overrides_argument(parser)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    inputs, opts = cli.split_trailing_overrides(args.input)
    opts += args.opts
    world_env = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_env > 1:  # torchrun: N copies of this tool would each run a whole world of their own
        raise cli.UsageError(f"WORLD_SIZE={world_env} (torchrun): predict_city.py starts its own "
                             "processes; run it once per machine, with --num-gpus (and "
                             "--num-machines, --machine-rank, --dist-url)")
    if not inputs:
        raise cli.UsageError("--input: no paths before the config overrides")
    for name in ("num_gpus", "num_machines"):
        if getattr(args, name) < 1:
            raise cli.UsageError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.machine_rank < args.num_machines:
        raise cli.UsageError(f"--machine-rank {args.machine_rank}: must be in [0, "
                             f"{args.num_machines})")
    cli.check_model_choice(args)
    if args.model and (args.num_gpus, args.num_machines) != (1, 1):
        raise cli.UsageError("--model: an exported model is predicted in one process on ONNX "
                             "Runtime, which uses every core; --num-gpus and --num-machines are "
                             "for the PyTorch model (--config-file)")
    if args.num_machines > 1 and args.dist_url == "auto":
        raise cli.UsageError("--num-machines > 1 needs --dist-url tcp://<machine 0>:<port>")

    from rooftop_m2f.inference.sources import RASTER_EXTENSIONS, expand_inputs

    paths, problems = expand_inputs(inputs, RASTER_EXTENSIONS, "rasters")
    if problems:
        raise cli.UsageError("--input: " + "; ".join(problems))

    from rooftop_m2f.fileio import check_output_folder
    from rooftop_m2f.inference import city
    from rooftop_m2f.inference.mosaic import scan_inputs

    cli.quiet_third_party_warnings()
    check_output_folder(args.output_dir)  # writable, or one line before anything is read
    if args.model:  # ONNX Runtime: no torch, detectron2 or Mask2Former
        from rooftop_m2f.export.onnx_runtime import load_export_config

        logger = cli.setup_plain_logging(os.path.join(args.output_dir, "log.txt"))
        cfg = load_export_config(args.model, opts)
    else:
        from rooftop_m2f.engine import build_cfg  # torch, detectron2: after the checks above

        logger = city.setup_city_logging(args.output_dir)
        cfg = build_cfg(args.config_file, opts)
        cli.check_weights(cfg.MODEL.WEIGHTS, allow_random=args.random_weights,
                          what="predict_city.py")
    city.check_city_config(cfg.ROOFTOP.CITY)
    if int(cfg.ROOFTOP.TILE.BATCH_SIZE) < 1:
        raise cli.UsageError(f"ROOFTOP.TILE.BATCH_SIZE {cfg.ROOFTOP.TILE.BATCH_SIZE}: must be >= 1")
    warnings = cli.WarningCount()
    scan = scan_inputs(paths)
    for message in scan.refused.values():
        logger.error("%s", message)
    mosaic = scan.mosaic
    if mosaic is None:
        raise cli.UserError(f"--input: none of the {len(paths)} input(s) can be predicted "
                            "(see above)")
    if args.zones:
        from rooftop_m2f.inference.planner import load_zones

        load_zones(args.zones, args.zone_field, mosaic.georef.crs)  # a bad file: before any work
    city.check_or_start_run(args.output_dir, city.fingerprint(cfg, args.random_weights),
                            restart=args.restart and args.machine_rank == 0)
    tile = cfg.ROOFTOP.TILE
    units = city.plan_units(mosaic, tile.SIZE, tile.OVERLAP, tile.MODE,
                            int(cfg.ROOFTOP.CITY.PART_SIZE))
    plan = city.CityPlan(args.config_file, opts, args.output_dir, mosaic, units,
                         random_weights=args.random_weights, zones=args.zones,
                         zone_field=args.zone_field, num_processes_per_machine=args.num_gpus)
    logger.info("%d input(s) as one mosaic of %dx%d px in %s (%d refused); %d unit(s) of work on "
                "%d process(es) -> %s", len(mosaic.tiles), mosaic.width, mosaic.height,
                mosaic.georef.crs.to_string(), len(scan.refused), len(units),
                args.num_gpus * args.num_machines, args.output_dir)
    if args.model:
        city.onnx_city(plan, cfg)
    else:
        import datetime

        from detectron2.engine import launch

        launch(city.city_worker, args.num_gpus, num_machines=args.num_machines,
               machine_rank=args.machine_rank, dist_url=args.dist_url, args=(plan,),
               timeout=datetime.timedelta(days=7))  # ranks wait for the slowest shard
    if args.machine_rank != 0:
        return 0
    records = city.read_manifests(args.output_dir, units)
    statuses = [records.get(u.name, {}).get("status") for u in units]
    failed = [records[u.name]["message"] for u, st in zip(units, statuses) if st == "failed"]
    logger.info("%d of %d unit(s) predicted (%d without data, %d failed) into %s%s",
                statuses.count("ok"), len(units), statuses.count("nodata"), len(failed),
                args.output_dir, warnings)
    problems = list(scan.refused.values()) + failed
    if problems:
        print(f"{len(problems)} input(s) or unit(s) refused or failed:", *problems, sep="\n  ",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
