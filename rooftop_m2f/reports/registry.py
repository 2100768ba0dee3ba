"""The layer against a registry of installations (``city_report.py registry``).

The registry is a point layer (any vector file) or a CSV with coordinate columns (``lon``/``lat``
in WGS84 by default, or ``x``/``y`` in ``--registry-crs``) and a capacity column in kWp. A
malformed row (a coordinate or capacity that is not a number, a latitude beyond 90°, a negative
capacity, a feature without a point) is named by its line (CSV; the header is line 1) or
feature id, skipped, and listed in ``registry.json``; the other rows are used.

Only solar panels are compared (registries list generation, not water heating). A panel
installation with no registered point within ``distance`` metres (point to outline) is likely
unregistered; a registered point with no panel installation within ``distance`` was not seen,
with what to check (``check``). Matching is by distance, not one-to-one: two registered systems
on one roof, or one system of several arrays, are each accounted for.
"""
import csv
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import List

from ..cli import UsageError, UserError
from ..fileio import write_text_atomic
from . import capacity, inputs
from .outputs import write_csv

logger = logging.getLogger(__name__)

CSV_FILE, GPKG_FILE, PNG_FILE, JSON_FILE = ("registry_summary.csv", "registry.gpkg",
                                            "registry.png", "registry.json")
OUTPUTS = (CSV_FILE, GPKG_FILE, PNG_FILE, JSON_FILE)
ALL = "ALL"
X_NAMES = ("lon", "longitude", "lng", "long", "x", "easting")
Y_NAMES = ("lat", "latitude", "y", "northing")
GEOGRAPHIC_NAMES = ("lon", "longitude", "lng", "long", "lat", "latitude")
CAPACITY_NAMES = ("capacity_kwp", "kwp", "capacity", "size_kwp", "kw")
COLUMNS = ("zone", "registered", "registered_kwp", "registered_seen", "not_seen", "not_seen_kwp",
           "detected", "detected_kwp", "detected_kwp_low", "detected_kwp_high",
           "detected_registered", "unregistered", "unregistered_kwp", "unregistered_kwp_low",
           "unregistered_kwp_high", "detected_to_registered_kwp")
LOGGED_ROWS = 20  # malformed rows named one by one in the log; all are in registry.json


@dataclass
class Registry:
    points: object                  # GeoDataFrame: registry_row, registry_id, capacity_kwp
    skipped: List[dict] = field(default_factory=list)
    source: str = ""
    fields: dict = field(default_factory=dict)


def _pick(columns, given, names, what):
    if given is not None:
        if given not in columns:
            raise UsageError(f"{what} {given}: not a column of the registry (columns: "
                             f"{', '.join(columns)})")
        return given
    lower = {c.lower(): c for c in columns}
    return next((lower[n] for n in names if n in lower), None)


def read_registry(source, crs, capacity_field=None, x_field=None, y_field=None,
                  registry_crs=None, id_field=None):
    """The registry's usable points in ``crs`` and its skipped rows (see the module docstring)."""
    path = inputs.split_source(source)[0]
    if path.lower().endswith(".csv"):
        if not os.path.exists(path):
            raise UsageError(f"--registry {path}: no such file")
        reg = _read_csv(path, capacity_field, x_field, y_field, registry_crs, id_field)
    else:
        reg = _read_points(source, capacity_field, id_field)
    if len(reg.points) == 0:
        raise UserError(f"--registry {path}: no usable row ({len(reg.skipped)} malformed, e.g. "
                        + (reg.skipped[0]["where"] + ": " + reg.skipped[0]["problem"]
                           if reg.skipped else "it is empty") + ")")
    for row in reg.skipped[:LOGGED_ROWS]:
        logger.warning("--registry %s %s: %s; row skipped", path, row["where"], row["problem"])
    if len(reg.skipped) > LOGGED_ROWS:
        logger.warning("--registry %s: %d more malformed row(s) skipped (all are listed in %s)",
                       path, len(reg.skipped) - LOGGED_ROWS, JSON_FILE)
    reg.points = inputs.reproject(reg.points, crs, "--registry", source)
    reg.source = str(source)
    return reg


def _number(text):
    try:
        value = float(str(text).strip().replace(",", "."))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _read_csv(path, capacity_field, x_field, y_field, registry_crs, id_field):
    import geopandas as gpd

    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            raise UserError(f"--registry {path}: empty file (no header line)")
        header = [h.strip() for h in header]
        x = _pick(header, x_field, X_NAMES, "--x-field")
        y = _pick(header, y_field, Y_NAMES, "--y-field")
        if x is None or y is None:
            raise UserError(f"--registry {path}: no coordinates (columns lon/lat, longitude/"
                            "latitude or x/y; name them with --x-field and --y-field; columns: "
                            f"{', '.join(header)})")
        cap = _pick(header, capacity_field, CAPACITY_NAMES, "--capacity-field")
        if cap is None:
            raise UserError(f"--registry {path}: no capacity column ({', '.join(CAPACITY_NAMES)} "
                            f"in kWp; name it with --capacity-field; columns: {', '.join(header)})")
        ident = _pick(header, id_field, (), "--id-field")
        geographic = x.lower() in GEOGRAPHIC_NAMES and y.lower() in GEOGRAPHIC_NAMES
        if registry_crs is None and not geographic:
            raise UsageError(f"--registry {path}: coordinates {x}/{y} need their CRS: add "
                             "--registry-crs (e.g. EPSG:32734); lon/lat columns are WGS84")
        crs = registry_crs or "EPSG:4326"
        ix, iy, ic = header.index(x), header.index(y), header.index(cap)
        iid = header.index(ident) if ident else None
        rows, xs, ys, skipped = [], [], [], []
        for values in reader:
            line = reader.line_num
            if not any(v.strip() for v in values):
                continue
            where = f"line {line}"
            if len(values) != len(header):
                skipped.append({"where": where, "problem": f"{len(values)} fields, the header has "
                                                           f"{len(header)}"})
                continue
            vx, vy, vc = _number(values[ix]), _number(values[iy]), _number(values[ic])
            problem = _row_problem(values, (ix, iy, ic), (x, y, cap), (vx, vy, vc),
                                   geographic and registry_crs is None)
            if problem:
                skipped.append({"where": where, "problem": problem})
                continue
            rows.append({"registry_row": line, "registry_id": values[iid] if iid is not None
                         else str(line), "capacity_kwp": vc})
            xs.append(vx)
            ys.append(vy)
    try:
        points = gpd.GeoDataFrame(rows, geometry=gpd.points_from_xy(xs, ys), crs=crs)
    except Exception as e:  # noqa: BLE001 - pyproj's message about the CRS
        raise UsageError(f"--registry-crs {crs}: not a CRS ({inputs._one_line(e)})") from e
    if not rows:
        points = gpd.GeoDataFrame({"registry_row": [], "registry_id": [], "capacity_kwp": []},
                                  geometry=gpd.GeoSeries([], crs=crs), crs=crs)
    return Registry(points, skipped, fields={"x": x, "y": y, "capacity": cap, "id": ident,
                                             "crs": str(crs)})


def _row_problem(values, idx, names, numbers, geographic):
    for i, name, v in zip(idx, names, numbers):
        if v is None:
            return f"{name} {values[i]!r} is not a number"
    vx, vy, vc = numbers
    if geographic and not (-180 <= vx <= 180 and -90 <= vy <= 90):
        return f"{names[0]}/{names[1]} {vx}/{vy} is not a longitude/latitude"
    if vc < 0:
        return f"{names[2]} {vc} is negative"
    return None


def _read_points(source, capacity_field, id_field):
    import numpy as np

    gdf = inputs.read_vector(source, "--registry")
    path = inputs.split_source(source)[0]
    columns = [c for c in gdf.columns if c != gdf.geometry.name]
    kinds = set(gdf.geometry.dropna().geom_type)
    if gdf.geometry.notna().sum() == 0 or kinds - {"Point"}:
        what = "no geometry" if not kinds else ", ".join(sorted(kinds - {"Point"})) + " geometries"
        raise UserError(f"--registry {path}: {what}; a registry is points (or a CSV with "
                        "coordinate columns)")
    cap = _pick(columns, capacity_field, CAPACITY_NAMES, "--capacity-field")
    if cap is None:
        raise UserError(f"--registry {path}: no capacity field ({', '.join(CAPACITY_NAMES)} in "
                        f"kWp; name it with --capacity-field; fields: {', '.join(columns)})")
    ident = _pick(columns, id_field, (), "--id-field")
    skipped, keep = [], []
    for fid, geom, value in zip(gdf.index, gdf.geometry, gdf[cap]):
        where = f"feature {fid}"
        number = _number(value) if value is not None else None
        if geom is None or geom.is_empty:
            skipped.append({"where": where, "problem": "no point"})
        elif number is None:
            skipped.append({"where": where, "problem": f"{cap} {value!r} is not a number"})
        elif number < 0:
            skipped.append({"where": where, "problem": f"{cap} {number} is negative"})
        else:
            keep.append((fid, number))
    fids = [k for k, _ in keep]
    points = gdf.loc[fids, [gdf.geometry.name]].copy()
    points.insert(0, "registry_row", np.array(fids, dtype=np.int64))
    points.insert(1, "registry_id", gdf.loc[fids, ident].astype(str).to_numpy() if ident
                  else [str(f) for f in fids])
    points.insert(2, "capacity_kwp", np.array([v for _, v in keep], dtype=float))
    return Registry(points.reset_index(drop=True), skipped,
                    fields={"capacity": cap, "id": ident, "crs": gdf.crs.to_string()
                            if gdf.crs is not None else None})


def compare(layer, registry: Registry, distance=30.0, zones=None, coverage=None,
            kwp=(capacity.KWP_PER_M2_LOW, capacity.KWP_PER_M2, capacity.KWP_PER_M2_HIGH)):
    """(summary rows of :data:`COLUMNS`, {unregistered, not_seen} frames in the layer's CRS)."""
    import geopandas as gpd
    import numpy as np

    from ..inference.planner import OUTSIDE, assign_zones
    from ..inference.vector_layer import metric_crs

    metric = metric_crs(layer)
    panels = layer[layer["class_id"] == capacity.PANEL_CLASS].reset_index(drop=True)
    points = registry.points.reset_index(drop=True)
    pm = gpd.GeoDataFrame({"p": np.arange(len(panels))},
                          geometry=panels.geometry.to_crs(metric).values, crs=metric)
    rm = gpd.GeoDataFrame({"r": np.arange(len(points))},
                          geometry=points.geometry.to_crs(metric).values, crs=metric)
    near = gpd.sjoin(rm, pm, predicate="dwithin", distance=distance) if len(pm) and len(rm) \
        else None
    seen = np.zeros(len(points), bool)
    registered = np.zeros(len(panels), bool)
    if near is not None and len(near):
        seen[near["r"].to_numpy()] = True
        registered[near["p"].to_numpy()] = True
    nearest_inst = _nearest(rm, pm)
    nearest_reg = _nearest(pm, rm)
    kw = capacity.kwp_columns(panels["area_m2"], panels["class_id"], *kwp)
    unreg = panels[~registered].copy()
    for k, v in kw.items():
        unreg[k] = v[~registered]
    unreg["nearest_registry_m"] = _finite(np.round(nearest_reg[~registered], 1))
    inside = np.ones(len(points), bool) if coverage is None else \
        points.geometry.intersects(coverage).to_numpy()
    not_seen = points[~seen].copy()
    not_seen["nearest_installation_m"] = _finite(np.round(nearest_inst[~seen], 1))
    not_seen["check"] = [_check(ok, d, distance, coverage is not None)
                         for ok, d in zip(inside[~seen], nearest_inst[~seen])]
    pz = assign_zones(panels, zones) if zones is not None and len(panels) else \
        np.full(len(panels), ALL, dtype=object)
    rz = assign_zones(points, zones) if zones is not None and len(points) else \
        np.full(len(points), ALL, dtype=object)
    unreg["zone"], not_seen["zone"] = pz[~registered], rz[~seen]
    names = [ALL]
    if zones is not None:
        names += list(dict.fromkeys(zones["zone"]))
        if (pz == OUTSIDE).any() or (rz == OUTSIDE).any():
            names.append(OUTSIDE)
    cap = points["capacity_kwp"].to_numpy(dtype=float)
    rows = []
    for zone in names:
        wp = np.ones(len(panels), bool) if zone == ALL else pz == zone
        wr = np.ones(len(points), bool) if zone == ALL else rz == zone
        det_kwp = float(kw["est_kwp"][wp].sum())
        reg_kwp = float(cap[wr].sum())
        rows.append({
            "zone": zone, "registered": int(wr.sum()), "registered_kwp": round(reg_kwp, 2),
            "registered_seen": int((wr & seen).sum()), "not_seen": int((wr & ~seen).sum()),
            "not_seen_kwp": round(float(cap[wr & ~seen].sum()), 2),
            "detected": int(wp.sum()), "detected_kwp": round(det_kwp, 2),
            "detected_kwp_low": round(float(kw["est_kwp_low"][wp].sum()), 2),
            "detected_kwp_high": round(float(kw["est_kwp_high"][wp].sum()), 2),
            "detected_registered": int((wp & registered).sum()),
            "unregistered": int((wp & ~registered).sum()),
            "unregistered_kwp": round(float(kw["est_kwp"][wp & ~registered].sum()), 2),
            "unregistered_kwp_low": round(float(kw["est_kwp_low"][wp & ~registered].sum()), 2),
            "unregistered_kwp_high": round(float(kw["est_kwp_high"][wp & ~registered].sum()), 2),
            "detected_to_registered_kwp": round(det_kwp / reg_kwp, 4) if reg_kwp > 0 else None})
    keep = [c for c in ("installation_id", "class_id", "class_name", "area_m2", "confidence")
            if c in unreg.columns] + list(kw) + ["nearest_registry_m"] + (["zone"] if zones
                                                                          is not None else [])
    if zones is None:
        not_seen = not_seen.drop(columns="zone")
    frames = {"unregistered": unreg[keep + [unreg.geometry.name]].reset_index(drop=True),
              "not_seen": not_seen.reset_index(drop=True)}
    return rows, frames


def _finite(values):
    """inf (nothing to be near) as NaN, a null in the GeoPackage."""
    import numpy as np

    return np.where(np.isfinite(values), values, np.nan)


def _nearest(a, b):
    """Distance from each row of ``a`` to the nearest of ``b`` (inf when ``b`` is empty)."""
    import geopandas as gpd
    import numpy as np

    out = np.full(len(a), np.inf)
    if len(a) and len(b):
        j = gpd.sjoin_nearest(a, b, distance_col="_d")
        first = j.reset_index().drop_duplicates("index")
        out[first["index"].to_numpy()] = first["_d"].to_numpy()
    return out


def _check(in_imagery, nearest, distance, coverage_known):
    if not in_imagery:
        return "outside the imagery"
    where = "" if coverage_known else "outside the imagery (no --coverage given), or "
    if math.isfinite(nearest) and nearest <= 3 * distance:
        return (f"{where}coordinates off (nearest panel installation {nearest:.0f} m away), or "
                "ground-mounted, shaded or not installed")
    return f"{where}ground-mounted, shaded or not installed, or coordinates off"


def write(output_dir, rows, frames, settings, skipped):
    from . import maps, styles
    from .gpkg import Layer, write_gpkg

    os.makedirs(output_dir, exist_ok=True)
    write_csv(os.path.join(output_dir, CSV_FILE), rows, COLUMNS)
    write_gpkg(os.path.join(output_dir, GPKG_FILE), [
        Layer("unregistered", frames["unregistered"], styles.polygons_style(
            maps.FP_RGB, f"panel installations with no registered point within "
                         f"{settings['distance_m']:g} m")),
        Layer("not_seen", frames["not_seen"], styles.points_style(
            maps.FN_RGB, f"registered points with no panel installation within "
                         f"{settings['distance_m']:g} m"))])
    total = rows[0]
    maps.write_map(os.path.join(output_dir, PNG_FILE), [
        maps.MapLayer(frames["unregistered"], maps.FP_RGB, "panel installation, not registered"),
        maps.MapLayer(frames["not_seen"], maps.FN_RGB, "registered, not seen", kind="point")],
        f"registry: {total['registered']} registered ({total['registered_kwp']:g} kWp), "
        f"{total['detected']} detected ({total['detected_kwp']:g} kWp)")
    write_text_atomic(os.path.join(output_dir, JSON_FILE), json.dumps(
        {"settings": settings, "zones": rows, "skipped_rows": skipped}, indent=1,
        allow_nan=False) + "\n")
    return [os.path.join(output_dir, n) for n in OUTPUTS]
