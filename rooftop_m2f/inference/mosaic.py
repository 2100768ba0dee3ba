"""A set of GeoTIFF tiles and/or VRTs on one pixel grid, read as one mosaic.

``scan_inputs(paths)`` opens each header once (no pixels read) and sorts the inputs into the
mosaic's tiles and those refused, each with a one-line reason naming the file: missing,
unreadable (corrupt), not 1-4 bands of 8- or 16-bit integers, without a CRS or geotransform, in
a CRS other than most inputs' (refused, not reprojected), or on another pixel grid than most
inputs in that CRS (another pixel size, a rotated transform, or an origin off the grid by more
than 1/1000 of a pixel; refused, not resampled). Ties go to the first input in order.

The mosaic spans the tiles' bounding box, and a window is read from every tile it touches
(:meth:`Mosaic.open`), so a prediction does not depend on how the mosaic was cut into tiles.
Pixels that no tile covers have no data, as have a tile's own nodata / alpha / masked pixels.
Where tiles overlap, a pixel comes from the first tile in input order that has data there.
16-bit tiles are scaled by their significant bits (:class:`~.sources.RasterioSource`).
"""
import os
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Dict, List, Optional

import numpy as np

from ..images import DatasetError
from .sources import GeoReference, ImageSource, RasterioSource


@dataclass(frozen=True)
class Tile:
    """An input raster and its place in the mosaic (pixel offset of its top-left corner)."""

    path: str
    row: int
    col: int
    height: int
    width: int


@dataclass
class Mosaic:
    """The tiles on one grid: ``transform`` maps mosaic pixels to the CRS (``crs_wkt``)."""

    tiles: List[Tile]
    crs_wkt: str
    transform: object  # affine.Affine of mosaic pixel (0, 0)
    height: int
    width: int

    @property
    def georef(self) -> GeoReference:
        from rasterio.crs import CRS

        return GeoReference(CRS.from_wkt(self.crs_wkt), self.transform)

    def tile_georef(self, tile: Tile) -> GeoReference:
        from affine import Affine

        return GeoReference(self.georef.crs, self.transform @ Affine.translation(tile.col, tile.row))

    @cached_property
    def _boxes(self):
        return np.array([(t.row, t.row + t.height, t.col, t.col + t.width) for t in self.tiles])

    def tiles_in(self, r0, r1, c0, c1) -> List[Tile]:
        """The tiles that have pixels in rows r0..r1, columns c0..c1, in input order."""
        boxes = self._boxes
        hit = (boxes[:, 0] < r1) & (boxes[:, 1] > r0) & (boxes[:, 2] < c1) & (boxes[:, 3] > c0)
        return [self.tiles[i] for i in np.flatnonzero(hit)]

    def open(self, extent=None) -> "MosaicSource":
        """A source over the whole mosaic that reads only the tiles in ``extent`` = (row0, row1,
        col0, col1) (default: all), each opened when a read first needs it."""
        return MosaicSource(self, self.tiles_in(*(extent or (0, self.height, 0, self.width))))


class MosaicSource(ImageSource):
    """Windows of a :class:`Mosaic` in mosaic pixel coordinates, across tile borders."""

    def __init__(self, mosaic: Mosaic, tiles: List[Tile]):
        self.path = f"mosaic of {len(mosaic.tiles)} tile(s)"
        self.height, self.width = mosaic.height, mosaic.width
        self.georef = mosaic.georef
        self._tiles, self._open = tiles, {}

    def read(self, y0, y1, x0, x1):
        rgb = np.zeros((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        valid = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        for t in self._tiles:
            a0, a1 = max(y0, t.row), min(y1, t.row + t.height)
            b0, b1 = max(x0, t.col), min(x1, t.col + t.width)
            if a0 >= a1 or b0 >= b1:
                continue
            target = valid[a0 - y0:a1 - y0, b0 - x0:b1 - x0]
            if target.all():  # covered by earlier tiles
                continue
            if t.path not in self._open:
                self._open[t.path] = RasterioSource(t.path)
            data, ok = self._open[t.path].read(a0 - t.row, a1 - t.row, b0 - t.col, b1 - t.col)
            take = ~target if ok is None else ok & ~target
            rgb[a0 - y0:a1 - y0, b0 - x0:b1 - x0][take] = data[take]
            target |= take
        return rgb, valid

    def close(self):
        for source in self._open.values():
            source.close()
        self._open.clear()


@dataclass
class ScanResult:
    mosaic: Optional[Mosaic] = None                         # None: no input can be predicted
    refused: Dict[str, str] = field(default_factory=dict)   # path -> one-line reason


def _crs_name(crs):
    epsg = crs.to_epsg() if crs is not None else None
    return f"EPSG:{epsg}" if epsg else (crs.to_string() if crs is not None else "none")


def _grid(t):
    """Pixel size and the origin's phase on that grid (1/1000 px): equal for tiles on one grid."""
    return (round(t.a, 9), round(t.e, 9), round(t.c / t.a % 1, 3) % 1, round(t.f / t.e % 1, 3) % 1)


def _first_of_most_common(keys):
    counts = Counter(keys)
    return max(counts, key=counts.get), counts  # max keeps the first of equal counts


def scan_inputs(paths) -> ScanResult:
    """The mosaic of ``paths`` and the inputs refused (see the module docstring)."""
    from affine import Affine

    result, readable = ScanResult(), []
    for path in paths:
        try:
            with RasterioSource(path) as source:  # the header only
                header = (path, source.height, source.width, source.georef)
                problem = source.georef_problem
        except DatasetError as e:
            result.refused[path] = str(e) if os.path.exists(path) else f"{path}: no such file"
            continue
        if problem:
            result.refused[path] = f"{path}: {problem} (a georeferenced mosaic is needed)"
        elif header[3].transform.b or header[3].transform.d:
            result.refused[path] = f"{path}: rotated geotransform; the mosaic needs north-up tiles"
        else:
            readable.append(header)
    if not readable:
        return result
    crs_name, counts = _first_of_most_common(_crs_name(h[3].crs) for h in readable)
    on_crs = []
    for h in readable:
        if _crs_name(h[3].crs) == crs_name:
            on_crs.append(h)
        else:
            result.refused[h[0]] = (f"{h[0]}: CRS {_crs_name(h[3].crs)} differs from the mosaic's "
                                    f"{crs_name} ({counts[crs_name]} input(s)); refused, not "
                                    "reprojected")
    grid, _ = _first_of_most_common(_grid(h[3].transform) for h in on_crs)
    ref = next(h for h in on_crs if _grid(h[3].transform) == grid)
    a, e, c, f = (getattr(ref[3].transform, k) for k in "aecf")
    placed = []
    for path, height, width, georef in on_crs:
        t = georef.transform
        if _grid(t) != grid:
            result.refused[path] = (
                f"{path}: pixel grid {t.a:g} x {t.e:g} with origin ({t.c:.3f}, {t.f:.3f}) is not "
                f"the mosaic's ({a:g} x {e:g}, on the grid of {ref[0]}); refused, not resampled")
        else:
            placed.append((path, round((t.f - f) / e), round((t.c - c) / a), height, width))
    r_min, c_min = min(p[1] for p in placed), min(p[2] for p in placed)
    tiles = [Tile(p, r - r_min, col - c_min, h, w) for p, r, col, h, w in placed]
    result.mosaic = Mosaic(tiles, ref[3].crs.to_wkt(), Affine(a, 0.0, c + c_min * a, 0.0, e, f + r_min * e),
                           max(t.row + t.height for t in tiles), max(t.col + t.width for t in tiles))
    return result
