"""Images to predict, read by windows as RGB uint8 with the mask of the pixels that have data:
TIFF/VRT through rasterio (an orthophoto never has to be in memory at once, its georeference
kept), other formats through PIL (decoded at once); :mod:`.mosaic` reads a tile set as one such
source. Problems raise :class:`~rooftop_m2f.images.DatasetError` naming the file. Conversions
are :func:`~rooftop_m2f.images.read_image`'s: gray replicated, alpha dropped, 16-bit samples
scaled by their significant bits (a GeoTIFF's ``NBITS``, else 16: by 255/65535). Pixels without
data (a raster's nodata value, alpha band or mask: rasterio's dataset mask) read as black; PNG
and JPEG have data everywhere.
"""
import glob
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..fileio import OutsideRootError, confined_path
from ..images import DatasetError, read_image, to_uint8

logger = logging.getLogger(__name__)

RASTER_EXTENSIONS = (".tif", ".tiff", ".vrt")
LIST_EXTENSIONS = (".txt", ".lst", ".list")

# Projections (PROJ names) whose planar areas are true near the data: Transverse Mercator (UTM,
# South Africa's Lo zones) and the equal-area ones. Others in metres, e.g. Web Mercator ("merc":
# areas x1.45 at Cape Town), are corrected by the projection's areal scale.
_AREA_TRUE_PROJECTIONS = ("utm", "tmerc", "etmerc", "aea", "laea", "cea", "moll", "sinu")


def has_true_areas(crs) -> bool:
    """Whether ``crs`` (pyproj or rasterio) is projected with planar areas true near the data."""
    with warnings.catch_warnings():  # to_dict goes through a PROJ string, which may lose detail
        warnings.simplefilter("ignore")
        return crs.to_dict().get("proj") in _AREA_TRUE_PROJECTIONS


@dataclass(frozen=True)
class GeoReference:
    """A raster's coordinate reference system and pixel -> CRS affine transform."""

    crs: object        # rasterio.crs.CRS
    transform: object  # affine.Affine

    @property
    def pixel_area(self) -> float:
        """Area of one pixel in CRS units squared."""
        t = self.transform
        return abs(t.a * t.e - t.b * t.d)

    @property
    def metres(self) -> bool:
        """Whether CRS units are metres (a projected CRS such as EPSG:32734)."""
        try:
            units = (self.crs.linear_units or "").lower()
        except Exception:  # noqa: BLE001 - an exotic CRS without linear units
            return False
        return bool(self.crs.is_projected) and units in ("metre", "meter", "metres", "meters", "m")

    @property
    def pixel_area_m2(self) -> float:
        """Ground area of one pixel, m² (for a CRS in metres): :attr:`pixel_area`, divided by the
        projection's areal scale at the raster's first pixel where planar areas are not true
        (:func:`has_true_areas`; e.g. Web Mercator)."""
        if has_true_areas(self.crs):
            return self.pixel_area
        from pyproj import CRS, Proj, Transformer

        crs = CRS.from_user_input(self.crs.to_wkt())
        x, y = self.transform @ (0.5, 0.5)
        lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
        return self.pixel_area / Proj(crs).get_factors(lon, lat).areal_scale


class ImageSource:
    """An image of ``height`` x ``width`` pixels read by windows."""

    path: str
    height: int
    width: int
    georef: Optional[GeoReference] = None
    #: why a TIFF is not georeferenced, e.g. "has no CRS" (None for georeferenced or non-TIFF)
    georef_problem: Optional[str] = None

    def read(self, y0: int, y1: int, x0: int, x1: int):
        """Rows y0..y1, columns x0..x1: ((h, w, 3) uint8 RGB, (h, w) bool pixels with data or
        None: all)."""
        raise NotImplementedError

    def read_all(self) -> np.ndarray:
        return self.read(0, self.height, 0, self.width)[0]

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArraySource(ImageSource):
    """An image already in memory (PNG, JPEG, ...: the whole file is decoded at once)."""

    def __init__(self, image: np.ndarray, path: str = "<array>"):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DatasetError(f"{path}: expected (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        self.path = path
        self.image = image
        self.height, self.width = image.shape[:2]

    def read(self, y0, y1, x0, x1):
        return self.image[y0:y1, x0:x1], None


class RasterioSource(ImageSource):
    """A TIFF or VRT read by windows with rasterio; bands 1-3 (or band 1 replicated)."""

    def __init__(self, path: str):
        import rasterio
        from rasterio.enums import MaskFlags
        from rasterio.errors import NotGeoreferencedWarning, RasterioError

        self.path = path
        self._errors = (RasterioError, OSError, ValueError)
        if str(path).lower().endswith(".vrt"):
            check_vrt_sources(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._ds = rasterio.open(path)
        except self._errors as e:
            raise DatasetError(f"{path}: cannot read image ({e})") from e
        ds = self._ds
        try:
            self.height, self.width = ds.height, ds.width
            if ds.count not in (1, 2, 3, 4):
                raise DatasetError(f"{path}: {ds.count} bands; expected 1 (gray), 2 (gray + alpha), "
                                   "3 (RGB) or 4 (RGBA)")
            self._bands = [1, 1, 1] if ds.count in (1, 2) else [1, 2, 3]
            dtype = np.dtype(ds.dtypes[0])
            if dtype not in (np.uint8, np.uint16):
                raise DatasetError(f"{path}: pixel type {dtype} is not supported (8- or 16-bit "
                                   "unsigned integers)")
            nbits = int(ds.tags(1, ns="IMAGE_STRUCTURE").get("NBITS") or 16)
            self.bits = 8 if dtype == np.uint8 else min(nbits, 16)  # significant bits
            self._all_valid = all(MaskFlags.all_valid in flags for flags in ds.mask_flag_enums)
            self.georef, self.georef_problem = None, None
            has_transform = not ds.transform.is_identity
            if ds.crs is None:
                self.georef_problem = ("has a geotransform but no CRS" if has_transform
                                       else "has no CRS and no geotransform")
            elif not has_transform:
                self.georef_problem = f"has a CRS ({ds.crs}) but no geotransform"
            else:
                self.georef = GeoReference(ds.crs, ds.transform)
        except BaseException:
            ds.close()
            raise

    def _read(self, y0, y1, x0, x1, bands=None):
        from rasterio.windows import Window

        window = Window(x0, y0, x1 - x0, y1 - y0)
        try:
            if bands is None:
                return self._ds.dataset_mask(window=window) > 0
            return self._ds.read(bands, window=window)
        except self._errors as e:
            raise DatasetError(f"{self.path}: cannot read rows {y0}-{y1}, columns {x0}-{x1} "
                               f"({e})") from e

    def read(self, y0, y1, x0, x1):
        data = self._read(y0, y1, x0, x1, self._bands)  # (3, rows, columns)
        if self.bits != 8:
            data = to_uint8(data, self.bits)
        rgb = np.ascontiguousarray(data.transpose(1, 2, 0).astype(np.uint8, copy=False))
        if self._all_valid:
            return rgb, None
        valid = self._read(y0, y1, x0, x1)
        rgb[~valid] = 0
        return rgb, valid

    def close(self):
        self._ds.close()


def open_image(path: str) -> ImageSource:
    """The right :class:`ImageSource` for ``path`` (TIFF/VRT: rasterio, windows; others: PIL)."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such file")
    if path.lower().endswith(RASTER_EXTENSIONS):
        source = RasterioSource(path)
        if source.bits != 8:
            logger.warning("%s: %d significant bits (16-bit samples%s), scaled to 8 bits by 255/%d",
                           path, source.bits, ", NBITS" if source.bits < 16 else "",
                           2 ** source.bits - 1)
        return source
    return ArraySource(read_image(path), path)


def check_vrt_sources(path):
    """A VRT's sources are files relative to its folder and inside it (``relativeToVRT="1"``,
    :func:`~rooftop_m2f.fileio.confined_path`), as a list file's entries are; a source that is
    absolute, climbs out with ``..`` or names a GDAL virtual file system (``/vsicurl/...``) is a
    :class:`DatasetError` naming the VRT and the source, before GDAL opens anything."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DatasetError(f"{path}: cannot read VRT ({e})") from None
    base = os.path.dirname(os.path.abspath(path))
    for element in root.iter("SourceFilename"):
        entry = (element.text or "").strip()
        try:
            if element.get("relativeToVRT", "0") != "1" or entry.startswith("/vsi"):
                raise OutsideRootError(f"{entry!r} is not relative to the VRT (relativeToVRT=\"1\")")
            confined_path(base, entry)
        except OutsideRootError as e:
            raise DatasetError(f"{path}: source {e}; a VRT's sources must be files in its "
                               "folder or below") from None


def _list_file_paths(path):
    """The paths a list file names, relative to its folder and confined to it
    (:func:`~rooftop_m2f.fileio.confined_path`), and one problem per entry that is absolute or
    climbs out of it."""
    base = os.path.dirname(os.path.abspath(path))
    paths, problems = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            try:
                paths.append(confined_path(base, entry))
            except OutsideRootError as e:
                problems.append(f"{path}, line {number}: {e}")
    return paths, problems


def expand_inputs(items, extensions, what="images"):
    """Files, folders (their files with ``extensions``, sorted), list files (.txt/.lst/.list: one
    path a line, ``#`` comments, relative to the list file's folder and inside it: an absolute
    path or one that climbs out with ``..`` is a problem) and glob patterns -> (paths, problems).
    A command-line item that matches nothing is a problem (a typo); a path named in a list file
    that does not exist is kept, to be reported as missing when it is opened."""
    paths, problems = [], []
    for item in map(str, items):
        if os.path.isdir(item):
            found = sorted(str(p) for p in Path(item).iterdir()
                           if p.suffix.lower() in extensions and p.is_file())
            if not found:
                problems.append(f"{item}: folder has no {what} ({', '.join(extensions)})")
            paths.extend(found)
        elif os.path.isfile(item) and item.lower().endswith(LIST_EXTENSIONS):
            listed, outside = _list_file_paths(item)
            problems.extend(outside)
            if not listed and not outside:
                problems.append(f"{item}: list file names no {what}")
            paths.extend(listed)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            matches = sorted(m for m in glob.glob(item, recursive=True) if os.path.isfile(m))
            if not matches:
                problems.append(f"{item}: no such file, folder or matching pattern")
            paths.extend(matches)
    return list(dict.fromkeys(os.path.normpath(p) for p in paths)), problems
