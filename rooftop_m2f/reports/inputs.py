"""The reports' inputs, read and checked before anything is written: every problem is one line
(:class:`~rooftop_m2f.cli.UserError`) naming the option, the file and the problem.

A vector input is any file pyogrio reads; a file with several layers names one GDAL's and
QGIS's way, ``path|layername=NAME``. Inputs in another CRS than the installations layer are
reprojected to it; one without a CRS, or whose coordinates cannot be reprojected, is refused.
"""
import os

import numpy as np

from ..classes import CLASS_NAMES, FOREGROUND_CLASSES
from ..cli import UsageError, UserError

STYLES_TABLE = "layer_styles"


def split_source(source):
    """``path|layername=NAME`` -> (path, NAME); a plain path -> (path, None)."""
    path, sep, rest = str(source).partition("|layername=")
    return path, (rest or None) if sep else None


def read_vector(source, what, default_layer=None):
    """The GeoDataFrame of ``source`` (``what`` is the option that named it, for messages).
    A file with several layers needs ``|layername=`` unless one is called ``default_layer``."""
    import geopandas as gpd
    import pyogrio

    path, layer = split_source(source)
    if not os.path.exists(path):
        raise UsageError(f"{what} {path}: no such file")
    try:
        names = [str(n) for n, _ in pyogrio.list_layers(path) if n != STYLES_TABLE]
    except Exception as e:  # noqa: BLE001 - GDAL's message, on one line
        raise UserError(f"{what} {path}: cannot read a vector file ({_one_line(e)})") from e
    if layer is None:
        if default_layer in names:
            layer = default_layer
        elif len(names) == 1:
            layer = names[0]
        else:
            raise UsageError(f"{what} {path}: {len(names)} layers ({', '.join(names)}); name one "
                             f"as {path}|layername=NAME")
    elif layer not in names:
        raise UsageError(f"{what} {path}: no layer {layer!r} (layers: {', '.join(names)})")
    try:
        return gpd.read_file(path, layer=layer, engine="pyogrio", fid_as_index=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{what} {path}: cannot read layer {layer} ({_one_line(e)})") from e


def _one_line(error):
    return " ".join(str(error).split())


def require_fields(gdf, fields, what, source):
    missing = [f for f in fields if f not in gdf.columns]
    if missing:
        have = [c for c in gdf.columns if c != gdf.geometry.name]
        raise UserError(f"{what} {split_source(source)[0]}: no field {', '.join(missing)} "
                        f"(fields: {', '.join(have) or 'none'})")


def polygons_only(gdf, what, source):
    """Rows with a polygon geometry (the index, the features' ids, kept); null and empty
    geometries dropped; other types refused."""
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    kinds = set(gdf.geometry.geom_type) - {"Polygon", "MultiPolygon"}
    if kinds:
        raise UserError(f"{what} {split_source(source)[0]}: {', '.join(sorted(kinds))} "
                        "geometries; polygons expected")
    return gdf


def reproject(gdf, crs, what, source):
    """``gdf`` in ``crs`` (a copy when it was in another)."""
    path = split_source(source)[0]
    if gdf.crs is None:
        raise UserError(f"{what} {path}: has no CRS, so it cannot be reprojected to the layer's "
                        f"{crs_name(crs)}; assign its CRS first (e.g. ogr2ogr -a_srs EPSG:...)")
    if gdf.crs == crs:
        return gdf
    try:
        out = gdf.to_crs(crs)
        bounds = out.total_bounds if len(out) else np.zeros(4)
    except Exception as e:  # noqa: BLE001 - pyproj's message, on one line
        raise UserError(f"{what} {path}: cannot be reprojected from {crs_name(gdf.crs)} to "
                        f"{crs_name(crs)} ({_one_line(e)})") from e
    if not np.isfinite(bounds).all():
        raise UserError(f"{what} {path}: its coordinates cannot be reprojected from "
                        f"{crs_name(gdf.crs)} to the layer's {crs_name(crs)} (outside the area of "
                        "use of one of them?)")
    return out


def crs_name(crs):
    return crs.to_string() if crs is not None else "no CRS"


def read_installations(source, what, fields=("class_id",)):
    """An installations layer (``tools/predict_city.py``'s ``installations.gpkg``): its polygons
    with the ``fields`` the report needs (a missing one is refused)."""
    from .gpkg import INSTALLATIONS_LAYER

    gdf = read_vector(source, what, default_layer=INSTALLATIONS_LAYER)
    if gdf.crs is None:
        raise UserError(f"{what} {split_source(source)[0]}: has no CRS")
    require_fields(gdf, fields, what, source)
    gdf = polygons_only(gdf, what, source)
    if "class_id" in gdf:
        gdf["class_id"] = class_ids(gdf["class_id"], what, source, "class_id")
    return gdf


def class_ids(values, what, source, field):
    """Class indices (1..3) from a field of indices or class names (``solar_panel``, or with
    spaces, any case); anything else is refused, naming the values."""
    import pandas as pd

    by_name = {n: i for i, n in enumerate(CLASS_NAMES)}
    by_name.update({str(i): i for i in range(len(CLASS_NAMES))})

    def one(v):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return -1
        if isinstance(v, (int, np.integer)) or (isinstance(v, float) and float(v).is_integer()):
            return int(v)
        return by_name.get(str(v).strip().lower().replace(" ", "_"), -1)

    ids = np.array([one(v) for v in values], dtype=np.int64)
    bad = ~np.isin(ids, FOREGROUND_CLASSES)
    if bad.any():
        shown = pd.Series(list(values))[bad].astype(str).value_counts()
        listing = ", ".join(f"{v!r} ({n})" for v, n in shown.head(5).items())
        raise UserError(f"{what} {split_source(source)[0]}: field {field} has {int(bad.sum())} "
                        f"value(s) that are not a foreground class: {listing}; expected "
                        + ", ".join(f"{c} or {CLASS_NAMES[c]}" for c in FOREGROUND_CLASSES))
    return ids


def read_area(source, crs, what="--area"):
    """The labelled area: the union of a polygon layer's features, in ``crs``."""
    import shapely

    gdf = reproject(polygons_only(read_vector(source, what), what, source), crs, what, source)
    area = shapely.union_all(gdf.geometry.values) if len(gdf) else None
    if area is None or area.is_empty or area.area <= 0:
        raise UserError(f"{what} {split_source(source)[0]}: the labelled area is empty (no polygon "
                        "with an area)")
    return area


def read_zones(source, zone_field, crs):
    """Zones (suburbs, wards) in ``crs`` with their ``zone`` name, as the city summary reads
    them; None without ``source``."""
    if not source:
        return None
    from ..inference.planner import load_zones

    return load_zones(source, zone_field, crs)[0]


def polygonal(geoms):
    """The polygon parts of each geometry (an intersection may add lines or points); empty
    where there are none."""
    import shapely

    geoms = np.asarray(geoms, dtype=object)
    kinds = shapely.get_type_id(geoms)
    mixed = np.flatnonzero(kinds == 7)  # GeometryCollection
    for k in mixed:
        parts = [p for p in shapely.get_parts(geoms[k]) if p.geom_type in ("Polygon", "MultiPolygon")]
        geoms[k] = shapely.union_all(parts) if parts else shapely.Polygon()
    other = ~np.isin(shapely.get_type_id(geoms), (3, 6))  # not (Multi)Polygon
    geoms[other] = shapely.Polygon()
    return geoms
