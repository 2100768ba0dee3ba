"""The one GeoPackage writer: every GeoPackage the project writes goes through :func:`write_gpkg`.

* GeoPackage **1.2** (GDAL's ``VERSION`` creation option): GDAL 3.6 and the readers of the last
  years open it without the "user_version ... may only be partially supported" warning that
  GDAL's default, 1.4, gives them.
* Each layer's default QGIS style (:mod:`.styles`) in the ``layer_styles`` table, with QGIS's
  own schema (``f_table_catalog, f_table_schema, f_table_name, f_geometry_column, styleName,
  styleQML, styleSLD, useAsDefault, description, owner, ui, update_time``, FID ``id``). The
  table is created through GDAL, as QGIS creates it, so it is registered in ``gpkg_contents``
  as an attributes table; QGIS applies the style when it opens the layer.
* Atomic: all layers are written to a temporary file renamed to ``path`` at the end; a failure
  leaves no file, or the previous one untouched.
* Streamed: a layer's frame may be given as its chunks (an iterable of GeoDataFrames with the
  same columns), appended one after the other, so memory holds one chunk.
"""
import datetime
import itertools
import os
from dataclasses import dataclass

from ..fileio import atomic_path
from .inputs import STYLES_TABLE
from .styles import Style

GPKG_VERSION = "1.2"
GEOMETRY_COLUMN = "geom"


INSTALLATIONS_LAYER = "installations"  # tools/predict_city.py's layer in installations.gpkg


@dataclass(frozen=True)
class Layer:
    name: str
    frame: object   # a GeoDataFrame, or an iterable of GeoDataFrames (its chunks, in order)
    style: Style


def write_gpkg(path, layers):
    """Write ``layers`` (:class:`Layer`, in order) into one GeoPackage at ``path``."""
    import pandas as pd
    import pyogrio

    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    rows = []
    with atomic_path(path) as tmp:
        os.remove(tmp)  # GDAL creates the file (an empty one is not a GeoPackage)
        for k, layer in enumerate(layers):
            first, rest = _chunks(layer.frame)
            options = dict(layer=layer.name, driver="GPKG",
                           promote_to_multi=layer.style.geometry_type == "Polygon" or None)
            pyogrio.write_dataframe(
                first, tmp, **options,
                geometry_type=None if len(first) and rest is None else
                _multi(layer.style.geometry_type),
                dataset_options={"VERSION": GPKG_VERSION} if k == 0 else None,
                layer_options={"GEOMETRY_NAME": GEOMETRY_COLUMN})
            for chunk in rest or ():
                if len(chunk):
                    pyogrio.write_dataframe(chunk, tmp, **options, append=True)
            rows.append({"f_table_catalog": "", "f_table_schema": "", "f_table_name": layer.name,
                         "f_geometry_column": GEOMETRY_COLUMN, "styleName": layer.name,
                         "styleQML": layer.style.qml, "styleSLD": "", "useAsDefault": True,
                         "description": layer.style.description, "owner": "", "ui": "",
                         "update_time": now})
        pyogrio.write_dataframe(pd.DataFrame(rows), tmp, layer=STYLES_TABLE, driver="GPKG",
                                layer_options={"FID": "id"})
    return path


def _chunks(frame):
    """(the first chunk, an iterator over the others, or None for a single frame)."""
    import geopandas as gpd

    if isinstance(frame, gpd.GeoDataFrame):
        return frame, None
    chunks = iter(frame)
    first = next(chunks, None)
    if first is None:
        raise ValueError("a layer given as chunks needs at least one (it makes the layer)")
    return first, chunks


def _multi(geometry_type):
    return "MultiPolygon" if geometry_type == "Polygon" else geometry_type


def read_styles(path):
    """The ``layer_styles`` table of a GeoPackage (a DataFrame), as QGIS reads it."""
    import pyogrio

    return pyogrio.read_dataframe(path, layer=STYLES_TABLE)


def write_installations(path, layer):
    """An installations layer (layer ``installations``; a GeoDataFrame or its chunks) with its
    default style: classes in the palette's colours, and the installations to review outlined
    when it has a ``review`` field (:func:`.review.with_review`)."""
    from .styles import installations_style

    first, rest = _chunks(layer)
    frame = first if rest is None else itertools.chain([first], rest)
    return write_gpkg(path, [Layer(INSTALLATIONS_LAYER, frame,
                                   installations_style(review="review" in first.columns))])
