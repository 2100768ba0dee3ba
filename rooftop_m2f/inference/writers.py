"""Prediction outputs, each written atomically (temporary name, then rename), and
:data:`OUTPUTS`, the registry of ``tools/predict.py``'s outputs (names and help in
:mod:`.outputs`, light for ``--help``; each name's writer here):

* class-index PNG: {class_indices};
* colour PNG (:data:`~rooftop_m2f.classes.PALETTE`; ignore {ignore}): {palette};
* overlay PNG (the colours blended over the image);
* the reference's per-image JSON of predicted pixel coordinates;
* a per-image GeoJSON of polygons, one Feature per connected component;
* a single-band uint8 GeoTIFF of the mask with the input's CRS and transform;
* per run, COCO results (one RLE per connected component, with a score) and their image list;
* the folder's summary CSV (per image and class: components, pixels, area), merged with the
  rows already there: it describes every prediction in the folder.

Connected components are 4-connected (pixels sharing an edge), so each is one valid polygon
(holes kept) and counts agree between the GeoJSON and the summary.
"""
import csv
import json
import math
import os
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image

from ..classes import (
    CLASS_NAMES,
    FOREGROUND_CLASSES,
    IGNORE_COLOR,
    IGNORE_LABEL,
    PALETTE,
    class_indices_prose,
    color_name,
    palette_prose,
)
from ..cli import UserError
from ..fileio import atomic_path
from .outputs import OUTPUT_FILES

__doc__ = __doc__.format(class_indices=class_indices_prose(), palette=palette_prose(with_rgb=True),
                         ignore=color_name(IGNORE_COLOR))

SUMMARY_COLUMNS = ("image", "class_id", "class_name", "components", "pixels", "area_m2")


def colorize(mask: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 RGB with :data:`PALETTE` (ignore is white)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(PALETTE)] = PALETTE
    lut[IGNORE_LABEL] = IGNORE_COLOR
    return lut[mask]


def overlay(image_rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Foreground classes blended over the image; background pixels left as they are."""
    out = image_rgb.astype(np.float32)
    fg = (mask > 0) & (mask != IGNORE_LABEL)
    out[fg] = (1 - alpha) * out[fg] + alpha * colorize(mask)[fg]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_index_png(mask, path):
    save_png(mask.astype(np.uint8), path)


def write_color_png(mask, path):
    save_png(colorize(mask), path)


def write_overlay_png(image_rgb, mask, path):
    save_png(overlay(image_rgb, mask), path)


def _dump_json(payload, path):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(payload, f, separators=(",", ":"))
            f.write("\n")


# --- the reference's coordinate JSON --------------------------------------------------------

def predicted_coords(mask: np.ndarray, classes: Sequence[int] = FOREGROUND_CLASSES) -> Dict:
    """``{"class_1": [[row, col], ...], ...}`` in ``numpy.argwhere`` order (row-major)."""
    return {f"class_{c}": np.argwhere(mask == c).tolist() for c in classes}


def write_coords_json(mask: np.ndarray, image_name: str, path) -> None:
    """``{"image_name": ..., "predicted_coords": {"class_1": [[row, col], ...], "class_2": ...,
    "class_3": ...}}`` (background not listed), as the reference pipeline writes it."""
    _dump_json({"image_name": image_name, "predicted_coords": predicted_coords(mask)}, path)


# --- connected components and polygons ------------------------------------------------------

def components(mask: np.ndarray, class_id: int):
    """4-connected components of ``mask == class_id``: (labels int32 (H, W), pixel counts
    indexed by label, number of components); label 0 is everything else."""
    from scipy import ndimage

    labels, count = ndimage.label(mask == class_id)  # default structure: 4-connectivity
    labels = labels.astype(np.int32, copy=False)
    return labels, np.bincount(labels.ravel(), minlength=count + 1), count


def _round_coords(geometry, decimals):
    import shapely

    return shapely.transform(geometry, lambda xy: np.round(xy, decimals))


def mask_features(mask: np.ndarray, georef=None, gsd: float = 0.08, simplify_px: float = 1.0,
                  classes: Sequence[int] = FOREGROUND_CLASSES) -> List[Dict]:
    """GeoJSON Features, one per 4-connected component of each foreground class.

    Geometry: polygon outlines along pixel edges (holes kept), simplified with Douglas-Peucker
    (topology preserved) within ``simplify_px`` pixels, in pixel coordinates (x = column,
    y = row, the image's top-left corner at (0, 0)) or, with ``georef``
    (:class:`~.sources.GeoReference`), in its CRS. Properties: ``class_id``, ``class_name``,
    ``pixel_count`` (pixels of the component) and ``area_m2`` (``pixel_count`` times the area of
    a pixel: from the georeference when its CRS is in metres, else ``gsd`` squared).
    """
    from rasterio import features as rio_features
    from shapely import affinity
    from shapely.geometry import mapping, shape

    pixel_area, decimals = _pixel_area_m2(georef, gsd), None
    if georef is not None:
        t = georef.transform
        size = math.sqrt(georef.pixel_area)
        decimals = max(0, int(math.ceil(-math.log10(size))) + 3) if size > 0 else 6
        matrix = [t.a, t.b, t.d, t.e, t.c, t.f]
    out = []
    for class_id in classes:
        labels, counts, count = components(mask, class_id)
        if count == 0:
            continue
        for geom, value in rio_features.shapes(labels, mask=labels > 0, connectivity=4):
            polygon = shape(geom)
            if simplify_px > 0:
                polygon = polygon.simplify(simplify_px, preserve_topology=True)
            if georef is not None:
                polygon = _round_coords(affinity.affine_transform(polygon, matrix), decimals)
            label = int(value)
            out.append({
                "type": "Feature",
                "properties": {"class_id": int(class_id), "class_name": CLASS_NAMES[class_id],
                               "pixel_count": int(counts[label]),
                               "area_m2": round(float(counts[label]) * pixel_area, 4)},
                "geometry": mapping(polygon),
            })
    return out


def _pixel_area_m2(georef, gsd: float) -> float:
    if georef is not None and georef.metres:
        return georef.pixel_area_m2
    return float(gsd) ** 2


def write_geojson(mask: np.ndarray, image_name: str, path, georef=None, gsd: float = 0.08,
                  simplify_px: float = 1.0) -> None:
    """A FeatureCollection of :func:`mask_features` with ``image_name`` and, when
    georeferenced, the CRS in GeoJSON's (pre-RFC 7946) ``crs`` member that GDAL and QGIS read;
    otherwise ``"coordinates": "pixel"`` (x = column, y = row)."""
    payload = {"type": "FeatureCollection", "image_name": image_name}
    if georef is not None:
        epsg = georef.crs.to_epsg()
        name = f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else georef.crs.to_wkt()
        payload["crs"] = {"type": "name", "properties": {"name": name}}
    else:
        payload["coordinates"] = "pixel"
        payload["gsd_m"] = float(gsd)
    payload["features"] = mask_features(mask, georef, gsd, simplify_px)
    _dump_json(payload, path)


# --- GeoTIFF --------------------------------------------------------------------------------

def write_geotiff(mask: np.ndarray, path, georef=None) -> None:
    """Single-band uint8 class-index GeoTIFF (deflate), with the palette as its colour map and,
    given ``georef``, the input's CRS and transform."""
    import rasterio

    height, width = mask.shape
    profile = {"driver": "GTiff", "height": height, "width": width, "count": 1, "dtype": "uint8",
               "compress": "deflate"}
    if height >= 256 and width >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    if georef is not None:
        profile.update(crs=georef.crs, transform=georef.transform)
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            # the colour map first: GDAL cannot change the photometric tag after data is written
            dst.write_colormap(1, {i: tuple(c) + (255,) for i, c in enumerate(PALETTE)})
            dst.write(mask.astype(np.uint8, copy=False), 1)


# --- COCO results -----------------------------------------------------------------------------

def coco_results(mask: np.ndarray, confidence: np.ndarray, image_id: int) -> List[Dict]:
    """COCO results entries of one image: one compressed RLE per 4-connected component of each
    foreground class, ``category_id`` = class index, ``score`` = the mean of ``confidence``
    (:func:`~.tiling.confidence_of`) over the component's pixels."""
    from ..data.coco_convert import mask_annotations

    return mask_annotations(mask, image_id, connectivity=4, scores=confidence)


def read_coco_results(results_path, images_path):
    """``(results, images)`` of earlier predictions into a folder (``([], [])`` when there are
    none); files this tool cannot merge (one without the other, not JSON, not its layout) are a
    :class:`SummaryError` naming the file, so that nothing is overwritten."""
    present = [os.path.exists(results_path), os.path.exists(images_path)]
    if not any(present):
        return [], []
    if not all(present):
        there, missing = (results_path, images_path) if present[0] else (images_path, results_path)
        raise SummaryError(f"{there}: earlier COCO results without {os.path.basename(missing)} "
                           "beside them; move it away or predict into another folder")
    loaded = []
    for path in (results_path, images_path):
        try:
            with open(path) as f:
                loaded.append(json.load(f))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise SummaryError(f"{path}: cannot read the earlier COCO output ({e}); move it "
                               "away or predict into another folder") from e
    results, images = loaded
    images = images.get("images") if isinstance(images, dict) else None
    if not (isinstance(results, list) and all(isinstance(r, dict) and "image_id" in r
                                              for r in results)):
        raise SummaryError(f"{results_path}: not a COCO results list of this tool; move it away "
                           "or predict into another folder")
    if not (isinstance(images, list) and all(isinstance(i, dict) and {"id", "file_name"} <= set(i)
                                              for i in images)):
        raise SummaryError(f"{images_path}: not the COCO image list of this tool; move it away "
                           "or predict into another folder")
    return results, images


def coco_stem(image: Dict) -> str:
    """The output-file stem of a COCO ``images`` entry (its outputs' names, as summary.csv's)."""
    return _stem(os.path.basename(str(image["file_name"])))


def merge_coco_results(existing, new):
    """``existing`` and ``new`` ``(results, images)``: the earlier images not predicted again
    (by file stem, as the summary), with their results, then the new ones; images by id."""
    new_results, new_images = new
    replaced = {coco_stem(i) for i in new_images}
    kept_images = [i for i in existing[1] if coco_stem(i) not in replaced]
    kept_ids = {i["id"] for i in kept_images}
    results = [r for r in existing[0] if r["image_id"] in kept_ids] + list(new_results)
    return results, sorted(kept_images + list(new_images), key=lambda i: i["id"])


def write_coco_results(results: Sequence[Dict], images: Sequence[Dict], results_path,
                       images_path) -> None:
    """The run's COCO results list (``[{"image_id", "category_id", "segmentation", "score"}]``,
    what ``COCO.loadRes`` reads) and its companion: a COCO file with the ``images`` (id,
    file_name, height, width) and ``categories`` the ids refer to, no annotations."""
    from ..data.coco_convert import categories

    _dump_json({"info": {"description": f"images of {os.path.basename(str(results_path))}"},
                "images": list(images), "annotations": [], "categories": categories()},
               images_path)
    _dump_json(list(results), results_path)


# --- summary ----------------------------------------------------------------------------------

def class_summary(mask: np.ndarray, image_name: str, georef=None, gsd: float = 0.08,
                  classes: Sequence[int] = FOREGROUND_CLASSES) -> List[Dict]:
    """Per foreground class: number of 4-connected components, pixels and area in m²."""
    pixel_area = _pixel_area_m2(georef, gsd)
    rows = []
    for class_id in classes:
        _, counts, count = components(mask, class_id)
        pixels = int(counts[1:].sum())
        rows.append({"image": image_name, "class_id": class_id, "class_name": CLASS_NAMES[class_id],
                     "components": int(count), "pixels": pixels,
                     "area_m2": round(pixels * pixel_area, 4)})
    return rows


class SummaryError(UserError, ValueError):
    """An existing summary.csv that cannot be merged; the message names it."""


def read_summary_csv(path) -> List[Dict]:
    """The rows of an existing summary CSV (none when there is no file); a file that is not
    one (another header) is a :class:`SummaryError`, so that nothing is overwritten."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = tuple(reader.fieldnames or ())
            rows = list(reader)
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SummaryError(f"{path}: cannot read the existing summary ({e}); move it away") from e
    if header != SUMMARY_COLUMNS:
        raise SummaryError(f"{path}: not a prediction summary (header {','.join(header) or 'empty'}"
                           f", expected {','.join(SUMMARY_COLUMNS)}); move it away or predict "
                           "into another folder")
    return rows


def _stem(image_name: str) -> str:
    return image_name.rsplit(".", 1)[0] if "." in image_name else image_name


def merge_summary_rows(existing: Sequence[Dict], new: Sequence[Dict]) -> List[Dict]:
    """``existing`` rows of images not in ``new`` (by file stem: a re-predicted image's outputs,
    named by stem, replace the earlier ones, and so do its rows), then ``new``; sorted by image
    and class."""
    replaced = {_stem(str(r["image"])) for r in new}
    rows = [dict(r) for r in existing if _stem(str(r["image"])) not in replaced] + \
        [dict(r) for r in new]
    return sorted(rows, key=lambda r: (str(r["image"]), int(r["class_id"])))


def write_summary_csv(rows: Sequence[Dict], path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


# The registry of tools/predict.py's outputs, name: (file suffix, writer, help). A writer takes
# the prediction (``batch.Prediction``: mask, source, image_name, georef, gsd) and the output
# path; None for the per-run outputs that ``batch.predict_files`` writes once at the end.
_WRITERS = {
    "index": lambda p, out: write_index_png(p.mask, out),
    "color": lambda p, out: write_color_png(p.mask, out),
    "overlay": lambda p, out: write_overlay_png(p.source.read_all(), p.mask, out),
    "json": lambda p, out: write_coords_json(p.mask, p.image_name, out),
    "geojson": lambda p, out: write_geojson(p.mask, p.image_name, out, p.georef, p.gsd),
    "geotiff": lambda p, out: write_geotiff(p.mask, out, p.georef),
    "coco": None,  # per run: write_coco_results, from predict_files
}
OUTPUTS = {name: (suffix, _WRITERS[name], text) for name, (suffix, text) in OUTPUT_FILES.items()}
