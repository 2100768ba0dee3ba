"""Vector features of predicted tiles (:func:`tile_features`), and the run's one merged layer of
installations (:func:`merge_tile_features`, :func:`finish_layer`: areas in a metric CRS, speckle
dropped, outlines simplified, WGS84 centroids).
"""
import math
from typing import Sequence

import numpy as np

from ..data.capetown import CLASS_NAMES, FOREGROUND_CLASSES

TILE_LAYER = "features"
LAYER_NAME = "installations"
LAYER_COLUMNS = ("installation_id", "class_id", "class_name", "area_m2", "pixel_count",
                 "confidence", "sources", "num_tiles", "lon", "lat", "shape")


def _decimals(transform):
    size = math.sqrt(abs(transform.a * transform.e - transform.b * transform.d))
    return max(0, int(math.ceil(-math.log10(size))) + 3) if size > 0 else 6


def tile_features(mask: np.ndarray, confidence_q: np.ndarray, transform, crs, source: str,
                  classes: Sequence[int] = FOREGROUND_CLASSES, part: str = None):
    """A GeoDataFrame of the components of a tile's class mask: one polygon per 4-connected
    component of each class, along pixel edges, in the tile's CRS, with ``pixel_count``,
    ``confidence`` (mean over its pixels of the predicted class's share of the scores) and
    ``at_border`` (it touches the tile's edge, so it may continue in a neighbour). Coordinates
    are rounded to 1/1000 of a pixel, so two neighbours' shared edge is the same on both sides.

    ``confidence_q`` is the confidence quantised to 0..255 (uint8); ``part`` names the piece of
    the mosaic it covers (default ``source``; a part of a large input has its own)."""
    import geopandas as gpd
    import shapely
    from rasterio import features as rio_features
    from scipy import ndimage
    from shapely.geometry import shape

    decimals = _decimals(transform)
    rows, geoms = [], []
    for class_id in classes:
        labels, count = ndimage.label(mask == class_id)  # 4-connectivity
        if count == 0:
            continue
        labels = labels.astype(np.int32, copy=False)
        flat = labels.ravel()
        pixels = np.bincount(flat, minlength=count + 1)
        conf_sum = np.bincount(flat, weights=confidence_q.ravel(), minlength=count + 1) / 255.0
        border = np.zeros(count + 1, dtype=bool)
        for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
            border[edge] = True
        for geom, value in rio_features.shapes(labels, mask=labels > 0, connectivity=4,
                                               transform=transform):
            label = int(value)
            geoms.append(shape(geom))
            rows.append({"class_id": int(class_id), "pixel_count": int(pixels[label]),
                         "confidence": float(conf_sum[label] / pixels[label]),
                         "at_border": bool(border[label]), "source": source,
                         "part": part or source})
    geoms = shapely.transform(np.array(geoms, dtype=object), lambda xy: np.round(xy, decimals)) \
        if geoms else []
    columns = ["class_id", "pixel_count", "confidence", "at_border", "source", "part"]
    import pandas as pd

    frame = pd.DataFrame(rows, columns=columns).astype(
        {"class_id": "int32", "pixel_count": "int64", "confidence": "float64", "at_border": "bool",
         "source": "str", "part": "str"})
    return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(list(geoms), crs=crs), crs=crs)


def write_tile_features(gdf, path):
    from ..fileio import atomic_path

    with atomic_path(path) as tmp:
        gdf.to_file(tmp, driver="GPKG", layer=TILE_LAYER, engine="pyogrio")


def read_features(path):
    import geopandas as gpd

    return gpd.read_file(path, layer=TILE_LAYER, engine="pyogrio")


def merge_tile_features(frames, crs):
    """One GeoDataFrame of installations from the tiles' frames (in input order): columns
    class_id, pixel_count, confidence, sources, num_tiles, geometry.

    Polygons of one class from different tiles or parts that share an edge (or overlap) are one
    installation: their union, pixel counts summed, confidence pixel-weighted. Only polygons at a
    tile border are compared (an STRtree query), so the merge costs little more than the reads."""
    import geopandas as gpd
    import pandas as pd
    import shapely
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    frames = [f for f in frames if len(f)]
    if not frames:
        return gpd.GeoDataFrame({"class_id": pd.Series([], dtype="int32"),
                                 "pixel_count": pd.Series([], dtype="int64"),
                                 "confidence": pd.Series([], dtype="float64"),
                                 "sources": pd.Series([], dtype="str"),
                                 "num_tiles": pd.Series([], dtype="int32")},
                                geometry=gpd.GeoSeries([], crs=crs), crs=crs)
    df = pd.concat(frames, ignore_index=True)
    geoms = df.geometry.values
    n = len(df)
    parent = np.arange(n)
    border = np.flatnonzero(df["at_border"].to_numpy())
    if len(border) > 1:
        bgeoms = np.asarray(geoms[border])
        tree = shapely.STRtree(bgeoms)
        i, j = tree.query(bgeoms, predicate="intersects")
        keep = i < j
        i, j = i[keep], j[keep]
        cls = df["class_id"].to_numpy()[border]
        src = df["part" if "part" in df else "source"].to_numpy()[border]
        keep = (cls[i] == cls[j]) & (src[i] != src[j])
        i, j = i[keep], j[keep]
        if len(i):
            shared = shapely.intersection(bgeoms[i], bgeoms[j])
            # an edge in common (length) or an overlap (area); a corner alone is not enough
            keep = (shapely.length(shared) > 0) | (shapely.area(shared) > 0)
            i, j = i[keep], j[keep]
        if len(i):
            graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(len(border), len(border)))
            _, comp = connected_components(graph, directed=False)
            # parent of each border feature: the first (lowest) row of its group
            first = {}
            for k, c in enumerate(comp):
                first.setdefault(c, border[k])
            parent[border] = [first[c] for c in comp]
    df["group"] = parent
    df["conf_px"] = df["confidence"] * df["pixel_count"]
    out_rows, out_geoms = [], []
    for group, part in df.groupby("group", sort=True):
        pixels = int(part["pixel_count"].sum())
        sources = sorted(set(part["source"]))
        geom = part.geometry.iloc[0] if len(part) == 1 else shapely.union_all(part.geometry.values)
        out_rows.append({"class_id": int(part["class_id"].iloc[0]), "pixel_count": pixels,
                         "confidence": float(part["conf_px"].sum() / pixels),
                         "sources": ";".join(sources), "num_tiles": len(sources)})
        out_geoms.append(geom)
    return gpd.GeoDataFrame(pd.DataFrame(out_rows), geometry=gpd.GeoSeries(out_geoms, crs=crs),
                            crs=crs)


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


def finish_layer(merged, min_area_m2=(0.0, 0.0, 0.0, 0.0), simplify_m=0.0,
                 rectangle_classes=(1,), rectangle_min_fill=0.9):
    """The published layer (see the module docstring); in the mosaic's CRS, columns
    :data:`LAYER_COLUMNS` and geometry, sorted by class then source then position."""
    import geopandas as gpd
    import shapely

    if merged.crs is None:
        raise ValueError("the merged layer has no CRS")
    gdf = merged.copy()
    if len(gdf) == 0:
        for col in LAYER_COLUMNS:
            if col not in gdf:
                gdf[col] = []
        return gdf[list(LAYER_COLUMNS) + ["geometry"]]
    metric = metric_crs(gdf)
    in_metric = gdf.geometry.to_crs(metric) if metric != gdf.crs else gdf.geometry
    gdf["area_m2"] = in_metric.area.round(4).to_numpy()
    thresholds = np.array([min_area_m2[c] if c < len(min_area_m2) else 0.0
                           for c in gdf["class_id"]], dtype=float)
    keep = gdf["area_m2"].to_numpy() >= thresholds
    gdf, in_metric = gdf[keep].copy(), in_metric[keep]
    shapes_out, kinds = [], []
    for geom, class_id in zip(in_metric.values, gdf["class_id"]):
        kind = "outline"
        if class_id in rectangle_classes and geom.area > 0:
            rect = shapely.minimum_rotated_rectangle(geom)
            if rect.area > 0 and geom.area / rect.area >= rectangle_min_fill:
                geom, kind = rect, "rectangle"
        if kind == "outline" and simplify_m > 0:
            geom = shapely.simplify(geom, simplify_m, preserve_topology=True)
        shapes_out.append(geom)
        kinds.append(kind)
    centroids = gpd.GeoSeries(in_metric.centroid.values, crs=metric).to_crs("EPSG:4326")
    gdf["lon"] = np.round(centroids.x.to_numpy(), 7)
    gdf["lat"] = np.round(centroids.y.to_numpy(), 7)
    gdf["shape"] = kinds
    out = gpd.GeoSeries(shapes_out, crs=metric)
    gdf = gdf.set_geometry(out.to_crs(merged.crs).values if metric != merged.crs else out.values,
                           crs=merged.crs)
    gdf["class_name"] = [CLASS_NAMES[c] for c in gdf["class_id"]]
    gdf["confidence"] = gdf["confidence"].round(4)
    gdf = gdf.sort_values(["class_id", "sources", "lat", "lon"], kind="stable",
                          ascending=[True, True, False, True]).reset_index(drop=True)
    gdf["installation_id"] = np.arange(1, len(gdf) + 1)
    return gdf[list(LAYER_COLUMNS) + ["geometry"]]


def write_layer(gdf, gpkg_path, geojson_path=None):
    """The GeoPackage (layer ``installations``) and a WGS84 GeoJSON copy, each atomically."""
    from ..fileio import atomic_path

    with atomic_path(gpkg_path) as tmp:
        gdf.to_file(tmp, driver="GPKG", layer=LAYER_NAME, engine="pyogrio")
    if geojson_path is not None:
        with atomic_path(geojson_path) as tmp:
            gdf.to_crs("EPSG:4326").to_file(tmp, driver="GeoJSON", engine="pyogrio", layer=LAYER_NAME,
                                            layer_options={"COORDINATE_PRECISION": 7})
