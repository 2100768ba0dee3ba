"""The synthetic Cape Town rooftop-solar data: scenes (:mod:`.scenes`), the dataset written to
disk (:mod:`.writer`, run by ``datasets/make_synthetic_capetown.py``) and georeferenced GeoTIFF
mosaics of scenes for the demo, the tests and the benchmarks (:mod:`.mosaic`).

Not library code: it lives beside its script. Importable as ``capetown_synthetic`` through the
virtualenv's .pth (tools/setup_env.sh puts ``datasets/`` on the path) or ``pip install -e .``.
Light: numpy and OpenCV (rasterio only when a GeoTIFF is written), no torch, no detectron2.
"""
from .mosaic import (make_synthetic_geotiff, make_synthetic_mosaic, mosaic_transform,
                     render_canvas, render_scenes, write_tile)
from .scenes import BACKGROUND, CLASS_NAMES, POOL_HEATER, PV, SPLITS, SWH, render_image
from .writer import MARKER_NAME, image_name, make_synthetic_capetown

__all__ = ["BACKGROUND", "CLASS_NAMES", "MARKER_NAME", "POOL_HEATER", "PV", "SPLITS", "SWH",
           "image_name", "make_synthetic_capetown", "make_synthetic_geotiff",
           "make_synthetic_mosaic", "mosaic_transform", "render_canvas", "render_image",
           "render_scenes", "write_tile"]
