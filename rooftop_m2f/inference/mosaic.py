"""The inputs of a city-scale run: an orthophoto mosaic as many GeoTIFF tiles and/or GDAL VRT
mosaics, read by windows with rasterio.

``expand_mosaic_inputs`` turns folders, list files (a text file of paths, one a line, ``#``
comments, relative paths relative to the list file) and glob patterns into raster paths.
``scan_inputs`` opens each header once and sorts the inputs into those to predict and those
refused, each with a one-line reason naming the file: missing, unreadable (corrupt), without a
CRS or geotransform, or in a CRS other than the run's. The run's CRS is the one most inputs share
(ties: the first in order); inputs in another CRS are refused, not reprojected.

Nodata: :func:`valid_block` is rasterio's dataset mask of a window (the nodata value, an alpha
band or an internal mask; 0 = no data), so windows without data are skipped, not predicted.
"""
import glob
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

RASTER_EXTENSIONS = (".tif", ".tiff", ".vrt")
LIST_EXTENSIONS = (".txt", ".lst", ".list")


def _list_file_paths(path):
    base = os.path.dirname(os.path.abspath(path))
    out = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                out.append(line if os.path.isabs(line) else os.path.join(base, line))
    return out


def expand_mosaic_inputs(items):
    """Folders (their .tif/.tiff/.vrt files, sorted), list files, globs and files -> (paths,
    problems). A command-line item that matches nothing is a problem (a typo); a path named in
    a list file that does not exist is kept, to be reported as missing by :func:`scan_inputs`."""
    paths, problems = [], []
    for item in items:
        item = str(item)
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).iterdir()
                           if p.suffix.lower() in RASTER_EXTENSIONS and p.is_file())
            if not found:
                problems.append(f"{item}: folder has no rasters ({', '.join(RASTER_EXTENSIONS)})")
            paths.extend(found)
        elif os.path.isfile(item) and item.lower().endswith(LIST_EXTENSIONS):
            listed = _list_file_paths(item)
            if not listed:
                problems.append(f"{item}: list file names no rasters")
            paths.extend(listed)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            matches = sorted(m for m in glob.glob(item, recursive=True) if os.path.isfile(m))
            if not matches:
                problems.append(f"{item}: no such file, folder or matching pattern")
            paths.extend(matches)
    return list(dict.fromkeys(os.path.normpath(p) for p in paths)), problems


@dataclass
class MosaicInput:
    path: str
    width: int
    height: int
    crs: object
    transform: object


@dataclass
class ScanResult:
    inputs: List[MosaicInput] = field(default_factory=list)   # to predict, in order
    refused: Dict[str, str] = field(default_factory=dict)     # path -> one-line reason
    crs: Optional[object] = None                              # the run's CRS


def _crs_name(crs):
    epsg = crs.to_epsg() if crs is not None else None
    return f"EPSG:{epsg}" if epsg else (crs.to_string() if crs is not None else "none")


def scan_inputs(paths) -> ScanResult:
    """Open each header once (no pixels read); see the module docstring."""
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioError

    result = ScanResult()
    readable = []
    for path in paths:
        if not os.path.exists(path):
            result.refused[path] = f"{path}: no such file"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                with rasterio.open(path) as ds:
                    info = MosaicInput(path, ds.width, ds.height, ds.crs, ds.transform)
                    count, dtype = ds.count, ds.dtypes[0]
        except (RasterioError, OSError, ValueError) as e:
            result.refused[path] = f"{path}: cannot read raster (corrupt or not a raster: {e})"
            continue
        if count not in (1, 2, 3, 4) or dtype not in ("uint8", "uint16"):
            result.refused[path] = (f"{path}: {count} band(s) of {dtype}; expected 1-4 bands of "
                                    "8- or 16-bit unsigned integers")
        elif info.crs is None:
            result.refused[path] = f"{path}: has no CRS (a georeferenced mosaic is needed)"
        elif info.transform.is_identity:
            result.refused[path] = f"{path}: has no geotransform"
        else:
            readable.append(info)
    if readable:
        counts = Counter(_crs_name(i.crs) for i in readable)
        run_crs_name = max(counts, key=counts.get)  # the first of the most common (ordered)
        for info in readable:
            if _crs_name(info.crs) == run_crs_name:
                result.inputs.append(info)
                result.crs = result.crs or info.crs
            else:
                result.refused[info.path] = (
                    f"{info.path}: CRS {_crs_name(info.crs)} differs from the mosaic's "
                    f"{run_crs_name} ({counts[run_crs_name]} input(s)); refused, not reprojected")
    return result


def read_block(source, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """(y1 - y0, x1 - x0, 3) uint8 RGB of a :class:`~.sources.RasterioSource` block, converted as
    its ``read_rows`` converts whole rows."""
    if x0 == 0 and x1 == source.width:
        return source.read_rows(y0, y1)
    from rasterio.windows import Window

    from ..data.capetown import DatasetError

    try:
        data = source._ds.read(source._bands, window=Window(x0, y0, x1 - x0, y1 - y0))
    except source._errors as e:
        raise DatasetError(f"{source.path}: cannot read rows {y0}-{y1}, columns {x0}-{x1} "
                           f"({e})") from e
    if source._scale is not None:
        data = np.clip(data.astype(np.float32) * source._scale + 0.5, 0, 255)
    return np.ascontiguousarray(data.transpose(1, 2, 0).astype(np.uint8, copy=False))


def valid_block(source, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """(y1 - y0, x1 - x0) bool: pixels with data in a block of a
    :class:`~.sources.RasterioSource` (rasterio's dataset mask: nodata value, alpha, mask band)."""
    from rasterio.windows import Window

    from ..data.capetown import DatasetError

    try:
        return source._ds.dataset_mask(window=Window(x0, y0, x1 - x0, y1 - y0)) > 0
    except source._errors as e:
        raise DatasetError(f"{source.path}: cannot read the mask of rows {y0}-{y1}, columns "
                           f"{x0}-{x1} ({e})") from e
