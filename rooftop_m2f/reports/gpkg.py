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
"""
import datetime
import os
from dataclasses import dataclass

from ..fileio import atomic_path
from .inputs import STYLES_TABLE
from .styles import Style

GPKG_VERSION = "1.2"
GEOMETRY_COLUMN = "geom"


@dataclass(frozen=True)
class Layer:
    name: str
    frame: object   # GeoDataFrame
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
            frame = layer.frame
            pyogrio.write_dataframe(
                frame, tmp, layer=layer.name, driver="GPKG",
                geometry_type=None if len(frame) else _multi(layer.style.geometry_type),
                promote_to_multi=layer.style.geometry_type == "Polygon" or None,
                dataset_options={"VERSION": GPKG_VERSION} if k == 0 else None,
                layer_options={"GEOMETRY_NAME": GEOMETRY_COLUMN})
            rows.append({"f_table_catalog": "", "f_table_schema": "", "f_table_name": layer.name,
                         "f_geometry_column": GEOMETRY_COLUMN, "styleName": layer.name,
                         "styleQML": layer.style.qml, "styleSLD": "", "useAsDefault": True,
                         "description": layer.style.description, "owner": "", "ui": "",
                         "update_time": now})
        pyogrio.write_dataframe(pd.DataFrame(rows), tmp, layer=STYLES_TABLE, driver="GPKG",
                                layer_options={"FID": "id"})
    return path


def _multi(geometry_type):
    return "MultiPolygon" if geometry_type == "Polygon" else geometry_type


def read_styles(path):
    """The ``layer_styles`` table of a GeoPackage (a DataFrame), as QGIS reads it."""
    import pyogrio

    return pyogrio.read_dataframe(path, layer=STYLES_TABLE)


def write_installations(path, layer):
    """An installations layer (layer ``installations``) with its default style: classes in the
    palette's colours, and the installations to review outlined when it has a ``review``
    field (:func:`.review.with_review`)."""
    from .inputs import INSTALLATIONS_LAYER
    from .styles import installations_style

    return write_gpkg(path, [Layer(INSTALLATIONS_LAYER, layer,
                                   installations_style(review="review" in layer.columns))])
