#!/usr/bin/env python3
"""Check a city's installations layer (tools/predict_city.py's installations.gpkg): accuracy
over a labelled area, reconciliation with a registry, change between two flights, and the
installations to review.

    .venv/bin/python tools/city_report.py accuracy --layer city/installations.gpkg \\
        --reference labels.gpkg --area labelled_area.gpkg --output-dir report/
    .venv/bin/python tools/city_report.py registry --layer city/installations.gpkg \\
        --registry sseg_registry.csv --output-dir report/
    .venv/bin/python tools/city_report.py change --before city2023/installations.gpkg \\
        --after city2024/installations.gpkg --zones suburbs.gpkg --output-dir change/
    .venv/bin/python tools/city_report.py review --layer city/installations.gpkg \\
        --output-dir review/

Vector inputs are any file GDAL reads (a layer of a multi-layer file as path|layername=NAME);
inputs in another CRS than the layer are reprojected to it. Every bad input is one line before
anything is written; an output folder holding an earlier report of the same kind is refused
(nothing is overwritten). Each report writes a CSV, a JSON (written last), a GeoPackage 1.2
whose layers carry a default QGIS style, and a PNG map. docs/CITY.md, "Check the layer".
"""
import argparse
import sys

try:
    from rooftop_m2f import cli
    from rooftop_m2f.reports import capacity, review
except ImportError:  # not the project's Python
    sys.exit(f"run it with the project's environment: .venv/bin/python {sys.argv[0]} (make setup)")

REVIEW_FILE = "installations_review.gpkg"


def _zones(parser):
    parser.add_argument("--zones", default=None, metavar="FILE",
                        help="zones (suburbs, wards): any vector file; figures per zone")
    parser.add_argument("--zone-field", default=None, metavar="NAME",
                        help="the zones' name field (default: their first text field)")


def _kwp(parser):
    parser.add_argument("--kwp-per-m2", type=float, default=capacity.KWP_PER_M2,
                        help=f"kWp per m² of panel footprint (default {capacity.KWP_PER_M2}: "
                             "~20 %% efficient modules)")
    parser.add_argument("--kwp-per-m2-low", type=float, default=capacity.KWP_PER_M2_LOW,
                        help=f"low bound (default {capacity.KWP_PER_M2_LOW}: ~16 %% modules)")
    parser.add_argument("--kwp-per-m2-high", type=float, default=capacity.KWP_PER_M2_HIGH,
                        help=f"high bound (default {capacity.KWP_PER_M2_HIGH}: ~22 %% modules on "
                             "a pitched roof)")


def _common(parser):
    cli.add_output_dir_argument(parser)
    cli.add_debug_argument(parser)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="report", required=True, metavar="REPORT")

    p = sub.add_parser("accuracy", help="the layer against labelled installations over an area")
    p.add_argument("--layer", required=True, metavar="FILE", help="the installations layer")
    p.add_argument("--reference", required=True, metavar="FILE",
                   help="labelled installations: polygons with a class field")
    p.add_argument("--area", required=True, metavar="FILE",
                   help="the labelled area's outline (polygons)")
    p.add_argument("--class-field", default=None, metavar="NAME",
                   help="the reference's class field: indices 1..3 or class names (default: "
                        "class_id, class_name or class)")
    p.add_argument("--iou", type=float, default=0.5,
                   help="IoU at which a prediction matches a reference installation (default 0.5)")
    _zones(p)
    _kwp(p)
    _common(p)

    p = sub.add_parser("registry", help="the layer against a registry of installations")
    p.add_argument("--layer", required=True, metavar="FILE", help="the installations layer")
    p.add_argument("--registry", required=True, metavar="FILE",
                   help="registered installations: points, or a CSV with coordinate columns")
    p.add_argument("--capacity-field", default=None, metavar="NAME",
                   help="capacity in kWp (default: capacity_kwp, kwp, capacity, size_kwp or kw)")
    p.add_argument("--x-field", default=None, metavar="NAME", help="CSV: x or longitude column")
    p.add_argument("--y-field", default=None, metavar="NAME", help="CSV: y or latitude column")
    p.add_argument("--registry-crs", default=None, metavar="CRS",
                   help="CSV: the coordinates' CRS (default EPSG:4326 for lon/lat columns)")
    p.add_argument("--id-field", default=None, metavar="NAME",
                   help="the registry's identifier, carried into the outputs")
    p.add_argument("--distance", type=float, default=30.0,
                   help="metres from a registered point to an installation's outline within "
                        "which they belong together (default 30: an address point and its roof)")
    p.add_argument("--coverage", default=None, metavar="FILE",
                   help="the imagery's footprint (e.g. gdaltindex of the tiles): registered "
                        "points outside it are 'outside the imagery'")
    _zones(p)
    _kwp(p)
    _common(p)

    p = sub.add_parser("change", help="two layers of the same area (two flights)")
    p.add_argument("--before", required=True, metavar="FILE", help="the earlier layer")
    p.add_argument("--after", required=True, metavar="FILE", help="the later layer")
    p.add_argument("--min-overlap", type=float, default=0.3,
                   help="share of the smaller installation two must overlap to be the same "
                        "(default 0.3)")
    p.add_argument("--area-change", type=float, default=0.2,
                   help="relative area change that counts as grown or shrunk (default 0.2)")
    p.add_argument("--min-area-change-m2", type=float, default=1.0,
                   help="and at least this many m² (default 1.0, about half a module)")
    _zones(p)
    _kwp(p)
    _common(p)

    p = sub.add_parser("review", help="the layer with its review flag, styled for QGIS")
    p.add_argument("--layer", required=True, metavar="FILE", help="the installations layer")
    p.add_argument("--min-confidence", type=float, default=review.MIN_CONFIDENCE,
                   help=f"flag installations below this confidence (default "
                        f"{review.MIN_CONFIDENCE})")
    p.add_argument("--review-area", default="", metavar="CLASS:MIN-MAX,...",
                   help="plausible areas in m² per class, flagged outside (default "
                        + ",".join(f"{c}:{lo:g}-{hi:g}" for c, (lo, hi) in
                                   review.AREA_BOUNDS_M2.items()) + ")")
    _common(p)
    return parser


def _check_numbers(args):
    if args.report in ("accuracy", "registry", "change"):
        capacity.check_densities(args.kwp_per_m2_low, args.kwp_per_m2, args.kwp_per_m2_high)
    checks = {"iou": (0, 1), "min_overlap": (0, 1), "min_confidence": (0, 1)}
    for name, (lo, hi) in checks.items():
        value = getattr(args, name, None)
        if value is not None and not lo < value <= hi:
            raise cli.UsageError(f"--{name.replace('_', '-')} {value}: must be in ({lo}, {hi}]")
    for name in ("distance", "area_change", "min_area_change_m2"):
        value = getattr(args, name, None)
        if value is not None and not value >= 0:
            raise cli.UsageError(f"--{name.replace('_', '-')} {value}: must be >= 0")


def main(argv=None):
    args = build_parser().parse_args(argv)
    _check_numbers(args)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    return {"accuracy": _accuracy, "registry": _registry, "change": _change,
            "review": _review}[args.report](args)


def _densities(args):
    return args.kwp_per_m2_low, args.kwp_per_m2, args.kwp_per_m2_high


def _accuracy(args):
    from rooftop_m2f.reports import accuracy, outputs

    outputs.check_output_dir(args.output_dir, accuracy.OUTPUTS)
    data = accuracy.load(args.layer, args.reference, args.area, args.class_field, args.zones,
                         args.zone_field)
    rows, frames, settings = accuracy.evaluate(data, args.iou, _densities(args))
    paths = accuracy.write(args.output_dir, rows, frames, settings, data.area)
    print(f"{'class':<20} {'ref':>5} {'pred':>5} {'prec':>6} {'recall':>6} {'F1':>6} "
          f"{'area err':>8} {'pixel IoU':>9}")
    for r in rows:
        if r["zone"] == accuracy.ALL:
            print(f"{r['class_name']:<20} {r['reference']:>5} {r['predicted']:>5} "
                  f"{_f(r['precision']):>6} {_f(r['recall']):>6} {_f(r['f1']):>6} "
                  f"{_f(r['area_error_rel']):>8} {_f(r['pixel_iou']):>9}")
    print("wrote " + ", ".join(paths))
    return 0


def _registry(args):
    from rooftop_m2f.reports import inputs, outputs, registry

    outputs.check_output_dir(args.output_dir, registry.OUTPUTS)
    layer = inputs.read_installations(args.layer, "--layer", ("class_id", "area_m2"))
    reg = registry.read_registry(args.registry, layer.crs, args.capacity_field, args.x_field,
                                 args.y_field, args.registry_crs, args.id_field)
    coverage = inputs.read_area(args.coverage, layer.crs, "--coverage") if args.coverage else None
    zones = inputs.read_zones(args.zones, args.zone_field, layer.crs)
    rows, frames = registry.compare(layer, reg, args.distance, zones, coverage, _densities(args))
    settings = {"layer": args.layer, "registry": args.registry, **reg.fields,
                "distance_m": args.distance, "coverage": args.coverage, "zones": args.zones,
                "kwp_per_m2": dict(zip(("low", "central", "high"), _densities(args))),
                "registry_rows_used": int(len(reg.points)),
                "registry_rows_skipped": len(reg.skipped)}
    paths = registry.write(args.output_dir, rows, frames, settings, reg.skipped)
    t = rows[0]
    print(f"registered {t['registered']} ({t['registered_kwp']:g} kWp), {t['not_seen']} not seen; "
          f"detected {t['detected']} panel installations ({t['detected_kwp']:g} kWp, "
          f"{t['detected_kwp_low']:g}-{t['detected_kwp_high']:g}), {t['unregistered']} with no "
          f"registered point within {args.distance:g} m; {len(reg.skipped)} registry row(s) "
          "skipped")
    print("wrote " + ", ".join(paths))
    return 0


def _change(args):
    from rooftop_m2f.reports import change, outputs

    outputs.check_output_dir(args.output_dir, change.OUTPUTS)
    before, after, zones = change.load(args.before, args.after, args.zones, args.zone_field)
    rows, frames = change.compare(before, after, zones, args.min_overlap, args.area_change,
                                  args.min_area_change_m2, _densities(args))
    settings = {"before": args.before, "after": args.after, "zones": args.zones,
                "min_overlap": args.min_overlap, "area_change": args.area_change,
                "min_area_change_m2": args.min_area_change_m2,
                "kwp_per_m2": dict(zip(("low", "central", "high"), _densities(args)))}
    paths = change.write(args.output_dir, rows, frames, settings)
    for r in rows:
        if r["zone"] == change.ALL:
            print(f"{r['class_name']:<20} before {r['before']}, after {r['after']}: {r['new']} new, "
                  f"{r['removed']} removed, {r['grown']} grown, {r['shrunk']} shrunk; net "
                  f"{r['net_area_m2']:+g} m²" + (f", {r['net_kwp']:+g} kWp" if r["net_kwp"]
                                                is not None else ""))
    print("wrote " + ", ".join(paths))
    return 0


def _review(args):
    import os

    from rooftop_m2f.reports import gpkg, inputs, outputs

    outputs.check_output_dir(args.output_dir, (REVIEW_FILE,))
    bounds = review.parse_area_bounds(args.review_area)
    layer = inputs.read_installations(args.layer, "--layer", ("class_id", "area_m2", "confidence"))
    layer = review.with_review(layer, args.min_confidence, bounds)
    if "class_name" not in layer.columns:
        from rooftop_m2f.classes import CLASS_NAMES

        layer["class_name"] = [CLASS_NAMES[c] for c in layer["class_id"]]
    path = gpkg.write_installations(os.path.join(args.output_dir, REVIEW_FILE), layer)
    print(f"{int(layer['review'].sum())} of {len(layer)} installation(s) to review; wrote {path}")
    return 0


def _f(v):
    return "n/a" if v is None else f"{v:.3f}"


if __name__ == "__main__":
    sys.exit(cli.run(main))
