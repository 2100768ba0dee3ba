"""Vector features of predicted units (:func:`unit_features`), and the run's one layer of
installations (:func:`merge_features`, :func:`finish_layer`: areas in a metric CRS, speckle
dropped, outlines simplified, WGS84 centroids, estimated kWp with its bounds, the review flag;
:func:`write_layer`, chunk by chunk, through the reports' GeoPackage writer).

The merge costs O(n log n) in the number of features n: features at a unit border are matched
with a spatial index (an STRtree query), groups found as connected components of a sparse
graph, only groups of several features unioned; the input tiles an installation lies on come
from an STRtree of the tiles' footprints.
"""
import json
import os
from typing import Sequence

import numpy as np

from ..classes import CLASS_NAMES, FOREGROUND_CLASSES

FEATURES_LAYER = "features"
# the published layer's columns and their types (text: object)
LAYER_COLUMNS = {"installation_id": "int64", "class_id": "int32", "class_name": object,
                 "area_m2": "float64", "pixel_count": "int64", "confidence": "float64",
                 "sources": object, "num_tiles": "int32", "lon": "float64", "lat": "float64",
                 "shape": object, "est_kwp": "float64", "est_kwp_low": "float64",
                 "est_kwp_high": "float64", "review": "bool", "review_reason": object}


def unit_features(mask: np.ndarray, confidence_q: np.ndarray, transform, crs, part: str,
                  classes: Sequence[int] = FOREGROUND_CLASSES):
    """A GeoDataFrame of the components of a unit's class mask: one polygon per 4-connected
    component of each class, along pixel edges, in the mosaic's CRS, with ``pixel_count``,
    ``confidence`` (mean over its pixels of the predicted class's share of the scores;
    ``confidence_q`` is that share x 255, uint8), ``at_border`` (it touches the unit's edge, so
    it may continue in a neighbour) and ``part`` (the unit). Coordinates are rounded to 1/1000
    of a pixel, so two neighbours' shared edge is the same on both sides."""
    import geopandas as gpd
    import pandas as pd
    import shapely
    from rasterio import features as rio_features
    from shapely.geometry import shape

    from .writers import components, coordinate_decimals

    decimals = coordinate_decimals(transform)
    rows, geoms = [], []
    for class_id in classes:
        labels, pixels, count = components(mask, class_id)
        if count == 0:
            continue
        conf_sum = np.bincount(labels.ravel(), weights=confidence_q.ravel(), minlength=count + 1)
        border = np.zeros(count + 1, dtype=bool)
        for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
            border[edge] = True
        for geom, value in rio_features.shapes(labels, mask=labels > 0, connectivity=4,
                                               transform=transform):
            label = int(value)
            geoms.append(shape(geom))
            rows.append((class_id, pixels[label], conf_sum[label] / 255.0 / pixels[label],
                         border[label], part))
    geoms = shapely.transform(np.array(geoms, dtype=object), lambda xy: np.round(xy, decimals))
    frame = pd.DataFrame(rows, columns=["class_id", "pixel_count", "confidence", "at_border",
                                        "part"]).astype(
        {"class_id": "int32", "pixel_count": "int64", "confidence": "float64", "at_border": "bool",
         "part": "str"})
    return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(list(geoms), crs=crs), crs=crs)


def write_features(gdf, path):
    from ..fileio import atomic_path

    with atomic_path(path) as tmp:
        gdf.to_file(tmp, driver="GPKG", layer=FEATURES_LAYER, engine="pyogrio")


def read_features(paths, crs):
    """One GeoDataFrame of the features of ``paths``, in order (pyogrio's raw reader, the
    geometries decoded at once: reading is most of a city's merge)."""
    import geopandas as gpd
    import pandas as pd
    import shapely
    from pyogrio.raw import read

    columns, wkb = {c: [] for c in ("class_id", "pixel_count", "confidence", "at_border", "part")}, []
    for path in paths:
        meta, _, geometry, fields = read(path, layer=FEATURES_LAYER)
        wkb.append(geometry)
        for name, values in zip(meta["fields"], fields):
            columns[name].append(values)
    frame = pd.DataFrame({k: np.concatenate(v) if v else [] for k, v in columns.items()})
    geoms = shapely.from_wkb(np.concatenate(wkb)) if wkb else []
    return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(geoms, crs=crs), crs=crs)


def merge_features(df, mosaic):
    """One GeoDataFrame of installations from the units' features (:func:`read_features`):
    columns class_id, pixel_count, confidence, sources, num_tiles, geometry, in the mosaic's CRS.

    Polygons of one class from different units that share an edge (or overlap) are one
    installation: their union, pixel counts summed, confidence pixel-weighted. ``sources``: the
    input tiles (base names, sorted, ``;``-separated) whose footprint has at least half a pixel
    of the installation."""
    import geopandas as gpd
    import shapely
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    crs = mosaic.georef.crs
    geoms = np.asarray(df.geometry.values, dtype=object)
    group = np.arange(len(df))
    border = np.flatnonzero(df["at_border"].to_numpy(dtype=bool))
    if len(border) > 1:
        bgeoms = geoms[border]
        i, j = shapely.STRtree(bgeoms).query(bgeoms, predicate="intersects")
        cls, part = df["class_id"].to_numpy()[border], df["part"].to_numpy()[border]
        keep = (i < j) & (cls[i] == cls[j]) & (part[i] != part[j])
        i, j = i[keep], j[keep]
        shared = shapely.intersection(bgeoms[i], bgeoms[j])
        # an edge in common (length) or an overlap (area); a corner alone is not enough
        keep = (shapely.length(shared) > 0) | (shapely.area(shared) > 0)
        graph = coo_matrix((np.ones(keep.sum()), (i[keep], j[keep])), shape=(len(border),) * 2)
        _, comp = connected_components(graph, directed=False)
        first = np.full(comp.max() + 1, len(df))
        np.minimum.at(first, comp, border)  # a group is named by its first (lowest) row
        group[border] = first[comp]
    groups, inverse, counts = np.unique(group, return_inverse=True, return_counts=True)
    px = df["pixel_count"].to_numpy(dtype=float)
    pixels = np.bincount(inverse, weights=px).astype(float)
    conf_px = np.bincount(inverse, weights=df["confidence"].to_numpy(dtype=float) * px).astype(float)
    out_geoms = geoms[groups]
    order, starts = np.argsort(inverse, kind="stable"), np.cumsum(counts) - counts
    for g in np.flatnonzero(counts > 1):
        out_geoms[g] = shapely.union_all(geoms[order[starts[g]:starts[g] + counts[g]]])
    merged = gpd.GeoDataFrame(
        {"class_id": df["class_id"].to_numpy(dtype="int32")[groups],
         "pixel_count": pixels.astype("int64"),
         "confidence": np.divide(conf_px, pixels, out=np.zeros_like(conf_px), where=pixels > 0)},
        geometry=gpd.GeoSeries(list(out_geoms), crs=crs), crs=crs)
    merged["sources"], merged["num_tiles"] = _tile_sources(out_geoms, mosaic)
    return merged


def _tile_sources(geoms, mosaic):
    """(sorted ``;``-joined base names, count) of the tiles that hold at least half a pixel of
    each geometry."""
    import shapely

    t = mosaic.transform
    names = np.array([os.path.basename(tile.path) for tile in mosaic.tiles], dtype=object)
    corners = np.array([(tile.col, tile.row, tile.col + tile.width, tile.row + tile.height)
                        for tile in mosaic.tiles], dtype=float)
    xs, ys = t.c + corners[:, [0, 2]] * t.a, t.f + corners[:, [1, 3]] * t.e
    boxes = shapely.box(xs.min(1), ys.min(1), xs.max(1), ys.max(1))
    i, j = shapely.STRtree(boxes).query(geoms, predicate="intersects") if len(geoms) else ([], [])
    keep = shapely.area(shapely.intersection(geoms[i], boxes[j])) >= 0.5 * abs(t.a * t.e)
    found = [[] for _ in geoms]
    for a, b in zip(np.asarray(i)[keep], np.asarray(j)[keep]):
        found[a].append(names[b])
    sources = [";".join(sorted(set(f))) for f in found]
    return sources, np.array([len(set(f)) for f in found], dtype="int32")


def metric_crs(gdf):
    """The layer's CRS when it is projected in metres with true planar areas near the layer
    (:func:`~.sources.has_true_areas`: Transverse Mercator, equal-area), else the UTM zone of
    its extent."""
    from .sources import has_true_areas

    crs = gdf.crs
    units = [a.unit_name.lower() for a in crs.axis_info] if crs is not None else []
    if crs is not None and crs.is_projected and units and all(u in ("metre", "meter") for u in units) \
            and has_true_areas(crs):
        return crs
    return gdf.estimate_utm_crs()


def layer_options(city_cfg):
    """:func:`finish_layer`'s options from a ``ROOFTOP.CITY`` config node."""
    lo, hi = city_cfg.REVIEW_MIN_AREA_M2, city_cfg.REVIEW_MAX_AREA_M2
    return dict(min_area_m2=[float(v) for v in city_cfg.MIN_AREA_M2],
                simplify_m=float(city_cfg.SIMPLIFY_M),
                rectangle_classes=tuple(city_cfg.RECTANGLE_CLASSES),
                rectangle_min_fill=float(city_cfg.RECTANGLE_MIN_FILL),
                kwp_per_m2=(float(city_cfg.KWP_PER_M2_LOW), float(city_cfg.KWP_PER_M2),
                            float(city_cfg.KWP_PER_M2_HIGH)),
                review_min_confidence=float(city_cfg.REVIEW_MIN_CONFIDENCE),
                review_area_bounds={c: (float(lo[c]), float(hi[c])) for c in FOREGROUND_CLASSES})


def finish_layer(merged, min_area_m2=(0.0, 0.0, 0.0, 0.0), simplify_m=0.0,
                 rectangle_classes=(1,), rectangle_min_fill=0.9, metric=None, first_id=1,
                 kwp_per_m2=None, review_min_confidence=None, review_area_bounds=None):
    """The published layer (see the module docstring) in the mosaic's CRS, columns
    :data:`LAYER_COLUMNS` and geometry, sorted by class then position (north to south, west to
    east) and numbered from ``first_id``; areas in ``metric`` (default :func:`metric_crs`).
    ``est_kwp, est_kwp_low, est_kwp_high``: :func:`~rooftop_m2f.reports.capacity.kwp_columns`
    at the densities ``kwp_per_m2`` (low, central, high); ``review, review_reason``:
    :func:`~rooftop_m2f.reports.review.review_flags` (defaults: those modules')."""
    import geopandas as gpd
    import shapely

    from ..reports import capacity, review

    if merged.crs is None:
        raise ValueError("the merged layer has no CRS")
    gdf = merged.copy()
    if len(gdf) == 0:
        for col, dtype in LAYER_COLUMNS.items():
            gdf[col] = np.zeros(0, dtype)
        return gdf[list(LAYER_COLUMNS) + ["geometry"]]
    metric = metric or metric_crs(gdf)
    in_metric = gdf.geometry.to_crs(metric) if metric != gdf.crs else gdf.geometry
    gdf["area_m2"] = in_metric.area.round(4).to_numpy()
    thresholds = np.array([min_area_m2[c] if c < len(min_area_m2) else 0.0
                           for c in gdf["class_id"]], dtype=float)
    keep = gdf["area_m2"].to_numpy() >= thresholds
    gdf, shapes = gdf[keep].copy(), np.asarray(in_metric[keep].values)
    kinds = np.full(len(gdf), "outline", dtype=object)
    fit = np.flatnonzero(np.isin(gdf["class_id"].to_numpy(), list(rectangle_classes)) &
                         (shapely.area(shapes) > 0))
    rects = shapely.minimum_rotated_rectangle(shapes[fit])
    rect_area = shapely.area(rects)
    good = (rect_area > 0) & (shapely.area(shapes[fit]) >= rectangle_min_fill * rect_area)
    centroids = gpd.GeoSeries(shapely.centroid(shapes), crs=metric).to_crs("EPSG:4326")
    shapes[fit[good]], kinds[fit[good]] = rects[good], "rectangle"
    if simplify_m > 0:
        outline = kinds == "outline"
        shapes[outline] = shapely.simplify(shapes[outline], simplify_m, preserve_topology=True)
    gdf["lon"] = np.round(centroids.x.to_numpy(), 7)
    gdf["lat"] = np.round(centroids.y.to_numpy(), 7)
    gdf["shape"] = kinds
    out = gpd.GeoSeries(shapes, crs=metric)
    gdf = gdf.set_geometry(out.to_crs(merged.crs).values if metric != merged.crs else out.values,
                           crs=merged.crs)
    gdf["class_name"] = [CLASS_NAMES[c] for c in gdf["class_id"]]
    gdf["confidence"] = gdf["confidence"].round(4)
    gdf = gdf.sort_values(["class_id", "lat", "lon"], kind="stable",
                          ascending=[True, False, True]).reset_index(drop=True)
    gdf["installation_id"] = np.arange(first_id, first_id + len(gdf))
    low, central, high = kwp_per_m2 or (capacity.KWP_PER_M2_LOW, capacity.KWP_PER_M2,
                                        capacity.KWP_PER_M2_HIGH)
    for name, values in capacity.kwp_columns(gdf["area_m2"], gdf["class_id"], low, central,
                                             high).items():
        gdf[name] = values
    gdf["review"], gdf["review_reason"] = review.review_flags(
        gdf["class_id"], gdf["area_m2"], gdf["confidence"],
        review.MIN_CONFIDENCE if review_min_confidence is None else review_min_confidence,
        review_area_bounds)
    return gdf[list(LAYER_COLUMNS) + ["geometry"]]


def write_layer(chunks, gpkg_path, geojson_path=None):
    """A layer (a GeoDataFrame of :data:`LAYER_COLUMNS` in the mosaic's CRS, or its chunks, one
    after the other) into one GeoPackage (:func:`rooftop_m2f.reports.gpkg.write_installations`:
    layer ``installations``, GeoPackage 1.2, its default QGIS style) and, given
    ``geojson_path``, its WGS84 GeoJSON copy (coordinates to 1e-7 degree), each written to a
    temporary name and renamed: memory holds one chunk. Returns the number of installations
    written."""
    import contextlib

    import geopandas as gpd
    import shapely

    from ..fileio import atomic_path
    from ..reports.gpkg import INSTALLATIONS_LAYER, write_installations

    written = 0
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(stack.enter_context(atomic_path(geojson_path)), "w")) \
            if geojson_path else None

        def passing():  # each chunk into the GeoJSON on its way to the GeoPackage
            nonlocal written
            sep = ""
            if out:
                out.write(f'{{"type": "FeatureCollection", "name": "{INSTALLATIONS_LAYER}", '
                          '"features": [\n')
            for chunk in [chunks] if isinstance(chunks, gpd.GeoDataFrame) else chunks:
                if out:
                    wgs = chunk.to_crs("EPSG:4326")
                    geoms = shapely.to_geojson(shapely.transform(wgs.geometry.values,
                                                                 lambda xy: np.round(xy, 7)))
                    for props, geom in zip(wgs.drop(columns="geometry").to_dict("records"),
                                           geoms):
                        out.write(sep + '{"type": "Feature", "properties": '
                                  + json.dumps(props)
                                  + ', "geometry": ' + geom + "}")
                        sep = ",\n"
                written += len(chunk)
                yield chunk
            if out:
                out.write("\n]}\n")

        write_installations(gpkg_path, passing())
    return written

