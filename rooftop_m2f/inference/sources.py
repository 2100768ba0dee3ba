"""Images to predict, read as RGB uint8 rows: whole-file formats through PIL, TIFF/GeoTIFF
through rasterio in row strips (so an orthophoto never has to be in memory at once), with its
georeference when it has one.

``open_image(path)`` returns an :class:`ImageSource`; every problem raises
:class:`~rooftop_m2f.data.capetown.DatasetError` naming the file. Conversions match
:func:`rooftop_m2f.data.capetown.read_image`: grayscale is replicated to RGB, alpha dropped,
16-bit scaled to 8-bit by the image's peak (65535 when any value exceeds 255, else 255; for a
TIFF the peak is found in a first strip-by-strip pass, so every strip is scaled alike).
"""
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..data.capetown import DatasetError, read_image

logger = logging.getLogger(__name__)

TIFF_EXTENSIONS = (".tif", ".tiff")
STRIP_ROWS = 512  # rows per read in the peak-finding pass


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
    """An image of ``height`` x ``width`` pixels read as (rows, width, 3) uint8 RGB."""

    path: str
    height: int
    width: int
    georef: Optional[GeoReference] = None
    #: why a TIFF is not georeferenced, e.g. "has no CRS" (None for georeferenced or non-TIFF)
    georef_problem: Optional[str] = None

    def read_rows(self, y0: int, y1: int) -> np.ndarray:
        raise NotImplementedError

    def read_all(self) -> np.ndarray:
        return self.read_rows(0, self.height)

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

    def read_rows(self, y0, y1):
        return self.image[y0:y1]


class RasterioSource(ImageSource):
    """A TIFF read strip by strip with rasterio; bands 1-3 (or band 1 replicated)."""

    def __init__(self, path: str):
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioError

        self.path = path
        self._errors = (RasterioError, OSError, ValueError)
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
            self._scale = None
            if dtype == np.uint16:
                self._scale = 255.0 / (65535.0 if self._peak() > 255 else 255.0)
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

    def _read(self, y0, y1, bands):
        from rasterio.windows import Window

        try:
            return self._ds.read(bands, window=Window(0, y0, self.width, y1 - y0))
        except self._errors as e:
            raise DatasetError(f"{self.path}: cannot read rows {y0}-{y1} ({e})") from e

    def _peak(self):
        peak = 0
        for y0 in range(0, self.height, STRIP_ROWS):
            peak = max(peak, int(self._read(y0, min(self.height, y0 + STRIP_ROWS), sorted(set(self._bands))).max()))
        return peak

    def read_rows(self, y0, y1):
        data = self._read(y0, y1, self._bands)  # (3, rows, width)
        if self._scale is not None:
            data = np.clip(data.astype(np.float32) * self._scale + 0.5, 0, 255)
        return np.ascontiguousarray(data.transpose(1, 2, 0).astype(np.uint8, copy=False))

    def close(self):
        self._ds.close()


def open_image(path: str) -> ImageSource:
    """The right :class:`ImageSource` for ``path`` (TIFF: rasterio, strips; others: PIL, whole)."""
    if not os.path.isfile(path):
        raise DatasetError(f"{path}: no such file")
    if path.lower().endswith(TIFF_EXTENSIONS):
        return RasterioSource(path)
    return ArraySource(read_image(path), path)
