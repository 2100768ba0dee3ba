"""A synthetic georeferenced orthophoto mosaic: ``rows x cols`` GeoTIFF tiles of ``tile`` pixels
(EPSG:32734, 8 cm), cut from one canvas of synthetic scenes (:func:`.scenes.render_image`)
laid out half a scene off the tile grid, so objects straddle tile borders as in a real mosaic.
Returns the tile paths and the canvas's ground-truth class mask (tests, benchmarks)."""
import os

import numpy as np

from .scenes import render_image

ORIGIN = (260000.0, 6240000.0)  # top-left corner, EPSG:32734 (Cape Town), metres
PIXEL = 0.08


def mosaic_transform(row=0, col=0, tile=0):
    from rasterio.transform import from_origin

    return from_origin(ORIGIN[0] + col * tile * PIXEL, ORIGIN[1] - row * tile * PIXEL, PIXEL, PIXEL)


def render_scenes(height, width, scene=128, seed=5, split="val"):
    """(RGB, class mask) of ``height x width`` filled with synthetic scenes side by side, row by
    row (scene i is ``render_image(seed, split, i, scene)``)."""
    image = np.zeros((height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    index = 0
    for y in range(0, height, scene):
        for x in range(0, width, scene):
            rgb, labels = render_image(seed=seed, split=split, index=index, size=scene)
            h, w = min(scene, height - y), min(scene, width - x)
            image[y:y + h, x:x + w] = rgb[:h, :w]
            mask[y:y + h, x:x + w] = labels[:h, :w]
            index += 1
    return image, mask


def render_canvas(height, width, scene=128, seed=5, split="val"):
    """:func:`render_scenes` shifted by half a scene, so objects straddle tile borders."""
    image, mask = render_scenes(height + scene, width + scene, scene, seed, split)
    o = scene // 2
    return image[o:o + height, o:o + width], mask[o:o + height, o:o + width]


def make_synthetic_geotiff(image_path, size, scene=256, seed=5, split="val", mask_path=None):
    """One ``size x size`` GeoTIFF of synthetic scenes (EPSG:32734, 8 cm), as a large orthophoto
    tile; with ``mask_path`` also its ground-truth class-index PNG. Written atomically."""
    from PIL import Image

    from rooftop_m2f.fileio import atomic_path

    image, mask = render_scenes(size, size, scene, seed, split)
    write_tile(image_path, image, mosaic_transform(), blocks=False)
    if mask_path is not None:
        with atomic_path(str(mask_path)) as tmp:
            Image.fromarray(mask).save(tmp, format="PNG")
    return image, mask


def write_tile(path, rgb, transform, crs="EPSG:32734", nodata=None, blocks=True):
    import rasterio

    from rooftop_m2f.fileio import atomic_path

    height, width = rgb.shape[:2]
    profile = {"driver": "GTiff", "height": height, "width": width, "count": 3, "dtype": "uint8",
               "crs": crs, "transform": transform}
    if nodata is not None:
        profile["nodata"] = nodata
    if blocks and height >= 256 and width >= 256 and height % 16 == 0 and width % 16 == 0:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as ds:
            ds.write(rgb.transpose(2, 0, 1))


def make_synthetic_mosaic(folder, rows=2, cols=2, tile=256, scene=128, seed=5):
    """Write ``folder/tile_<r>_<c>.tif``; returns (paths in row-major order, truth mask of the
    whole mosaic, canvas RGB)."""
    os.makedirs(folder, exist_ok=True)
    image, mask = render_canvas(rows * tile, cols * tile, scene, seed)
    paths = []
    for r in range(rows):
        for c in range(cols):
            path = os.path.join(str(folder), f"tile_{r}_{c}.tif")
            write_tile(path, image[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile],
                       mosaic_transform(r, c, tile))
            paths.append(path)
    return paths, mask, image
