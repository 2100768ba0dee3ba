"""Prediction outputs, each written atomically (temporary name, then rename), and
:data:`OUTPUTS`, the registry of ``tools/predict.py``'s outputs: each registered where it is
written (light: no torch, so that ``predict.py --help`` lists them at once).

Per image: class-index PNG ({class_indices}); colour PNG ({palette}; ignore and no data
{ignore}); overlay PNG; the reference's JSON of predicted pixel coordinates; a GeoJSON of
polygons, one Feature per 4-connected component (one valid polygon each, holes kept); a uint8
class-index GeoTIFF with the input's CRS and transform.

Per folder, merged with the earlier predictions' (an image predicted again, known by its file
stem like its outputs, replaces its own entries; a file that cannot be merged is refused before
anything is predicted): ``summary.csv`` (:class:`SummaryCsv`) and the COCO results
(:class:`CocoResults`).
"""
import csv
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from ..classes import (CLASS_NAMES, FOREGROUND_CLASSES, IGNORE_COLOR, IGNORE_LABEL, PALETTE,
                       class_indices_prose, color_name, palette_prose)
from ..cli import UserError
from ..fileio import atomic_path

__doc__ = __doc__.format(class_indices=class_indices_prose(), palette=palette_prose(with_rgb=True),
                         ignore=color_name(IGNORE_COLOR))
logger = logging.getLogger(__name__)

SUMMARY_FILE, COCO_RESULTS_FILE, COCO_IMAGES_FILE = "summary.csv", "coco_results.json", "coco_images.json"
SUMMARY_COLUMNS = ("image", "class_id", "class_name", "components", "pixels", "area_m2")
DEFAULT_OUTPUTS = ("index", "color", "overlay", "json", "geojson", "geotiff")


@dataclass
class ImagePrediction:
    """What a per-image writer gets."""

    path: str                       # the input file
    mask: np.ndarray                # (H, W) uint8 class indices (255: no data)
    source: object = None           # its :class:`~.sources.ImageSource` (to read it again)
    georef: object = None           # its :class:`~.sources.GeoReference`, or None
    gsd: float = 0.08               # metres per pixel when there is no georeference
    confidence: Optional[np.ndarray] = None  # (H, W) float32, when an output needs it

    @property
    def image_name(self) -> str:
        return os.path.basename(self.path)


@dataclass(frozen=True)
class Output:
    suffix: str                     # <stem><suffix>; "" for a per-folder output
    help: str
    write: Optional[Callable]       # write(ImagePrediction, path); None: per folder


OUTPUTS: Dict[str, Output] = {}


def output(name, suffix, help):
    """Registers the decorated ``write(prediction, path)`` as the output ``name``."""
    def register(write):
        OUTPUTS[name] = Output(suffix, help, write)
        return write
    return register


def describe_outputs():
    """One line per output (name, file name, what it holds): ``predict.py --help``."""
    return "\n".join(f"  {name:8s} {'<stem>' + o.suffix if o.suffix else '':24s} {o.help}"
                     for name, o in OUTPUTS.items())


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


def _dump_json(payload, path):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(payload, f, separators=(",", ":"))
            f.write("\n")


@output("index", "_index.png", f"class-index PNG ({class_indices_prose()})")
def write_index_png(p: ImagePrediction, path):
    save_png(p.mask.astype(np.uint8), path)


@output("color", "_color.png", f"RGB PNG: {palette_prose()}")
def write_color_png(p: ImagePrediction, path):
    save_png(colorize(p.mask), path)


@output("overlay", "_overlay.png", "the classes' colours blended over the image")
def write_overlay_png(p: ImagePrediction, path):
    save_png(overlay(p.source.read_all(), p.mask), path)


@output("json", "_coords.json", 'reference JSON {"image_name", "predicted_coords": {"class_1": '
                                '[[row, col], ...], ...}}')
def write_coords_json(p: ImagePrediction, path):
    """``{"image_name": ..., "predicted_coords": {"class_1": [[row, col], ...], ...}}`` in
    ``numpy.argwhere`` order (background not listed), as the reference pipeline writes it."""
    _dump_json({"image_name": p.image_name, "predicted_coords": {
        f"class_{c}": np.argwhere(p.mask == c).tolist() for c in FOREGROUND_CLASSES}}, path)


def components(mask: np.ndarray, class_id: int):
    """4-connected components of ``mask == class_id``: (labels int32 (H, W), pixel counts
    indexed by label, number of components); label 0 is everything else."""
    from scipy import ndimage

    labels, count = ndimage.label(mask == class_id)  # default structure: 4-connectivity
    labels = labels.astype(np.int32, copy=False)
    return labels, np.bincount(labels.ravel(), minlength=count + 1), count


def coordinate_decimals(transform) -> int:
    """Decimals that keep 1/1000 of a pixel of ``transform``: shared edges stay equal."""
    size = math.sqrt(abs(transform.a * transform.e - transform.b * transform.d))
    return max(0, int(math.ceil(-math.log10(size))) + 3) if size > 0 else 6


def _pixel_area_m2(georef, gsd: float) -> float:
    return georef.pixel_area_m2 if georef is not None and georef.metres else float(gsd) ** 2


def mask_features(mask: np.ndarray, georef=None, gsd: float = 0.08, simplify_px: float = 1.0,
                  classes: Sequence[int] = FOREGROUND_CLASSES) -> List[Dict]:
    """GeoJSON Features, one per 4-connected component of each foreground class: outlines along
    pixel edges (holes kept), simplified within ``simplify_px`` pixels (topology preserved), in
    pixel coordinates (x = column, y = row) or, with ``georef``, in its CRS; properties
    ``class_id``, ``class_name``, ``pixel_count`` and ``area_m2`` (pixels x the pixel's area:
    the georeference's when its CRS is in metres, else ``gsd`` squared)."""
    import shapely
    from rasterio import features as rio_features
    from shapely import affinity
    from shapely.geometry import mapping, shape

    pixel_area, out = _pixel_area_m2(georef, gsd), []
    for class_id in classes:
        labels, counts, count = components(mask, class_id)
        for geom, value in rio_features.shapes(labels, mask=labels > 0, connectivity=4) if count else ():
            polygon = shape(geom).simplify(simplify_px, preserve_topology=True) if simplify_px > 0 \
                else shape(geom)
            if georef is not None:
                t, decimals = georef.transform, coordinate_decimals(georef.transform)
                polygon = shapely.transform(affinity.affine_transform(
                    polygon, [t.a, t.b, t.d, t.e, t.c, t.f]), lambda xy: np.round(xy, decimals))
            n = int(counts[int(value)])
            out.append({"type": "Feature", "geometry": mapping(polygon), "properties": {
                "class_id": int(class_id), "class_name": CLASS_NAMES[class_id],
                "pixel_count": n, "area_m2": round(n * pixel_area, 4)}})
    return out


@output("geojson", "_polygons.geojson", "one polygon per connected component with class_id, "
                                        "class_name, pixel_count, area_m2 (CRS coordinates when "
                                        "georeferenced, else pixels)")
def write_geojson(p: ImagePrediction, path, simplify_px: float = 1.0):
    """A FeatureCollection of :func:`mask_features` with ``image_name`` and, when
    georeferenced, the CRS in GeoJSON's (pre-RFC 7946) ``crs`` member that GDAL and QGIS read;
    otherwise ``"coordinates": "pixel"`` (x = column, y = row) and ``gsd_m``."""
    payload = {"type": "FeatureCollection", "image_name": p.image_name}
    if p.georef is not None:
        epsg = p.georef.crs.to_epsg()
        name = f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else p.georef.crs.to_wkt()
        payload["crs"] = {"type": "name", "properties": {"name": name}}
    else:
        payload.update(coordinates="pixel", gsd_m=float(p.gsd))
    payload["features"] = mask_features(p.mask, p.georef, p.gsd, simplify_px)
    _dump_json(payload, path)


def write_geotiff(mask: np.ndarray, path, georef=None, nodata=None) -> None:
    """Single-band uint8 class-index GeoTIFF (deflate, 256 px internal tiles), the palette as
    its colour map and, given ``georef``, its CRS and transform."""
    import rasterio

    height, width = mask.shape
    profile = {"driver": "GTiff", "height": height, "width": width, "count": 1, "dtype": "uint8",
               "compress": "deflate", "nodata": nodata}
    if height >= 256 and width >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    if georef is not None:
        profile.update(crs=georef.crs, transform=georef.transform)
    with atomic_path(path) as tmp:
        with rasterio.open(tmp, "w", **profile) as dst:
            # the colour map first: GDAL cannot change the photometric tag after data is written
            dst.write_colormap(1, {i: tuple(c) + (255,) for i, c in enumerate(PALETTE)})
            dst.write(mask.astype(np.uint8, copy=False), 1)


# georeferenced inputs only: predict_files does not call it for the others
output("geotiff", "_mask.tif", "uint8 class-index GeoTIFF with the input's CRS and transform "
                               "(georeferenced inputs only)")(
    lambda p, path: write_geotiff(p.mask, path, p.georef))


# --- per folder -------------------------------------------------------------------------------
class SummaryError(UserError, ValueError):
    """An earlier output in the folder that cannot be merged; the message names it."""


def _stem(file_name) -> str:
    return Path(os.path.basename(str(file_name))).stem


def class_summary(mask: np.ndarray, image_name: str, georef=None, gsd: float = 0.08,
                  classes: Sequence[int] = FOREGROUND_CLASSES) -> List[Dict]:
    """Per foreground class: number of 4-connected components, pixels and area in m²."""
    rows = []
    for class_id in classes:
        _, counts, count = components(mask, class_id)
        pixels = int(counts[1:].sum())
        rows.append({"image": image_name, "class_id": class_id, "class_name": CLASS_NAMES[class_id],
                     "components": int(count), "pixels": pixels,
                     "area_m2": round(pixels * _pixel_area_m2(georef, gsd), 4)})
    return rows


def read_summary_csv(path) -> List[Dict]:
    """The rows of an existing summary CSV (none when there is no file); another file is a
    :class:`SummaryError`, so that nothing is overwritten."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header, rows = tuple(reader.fieldnames or ()), list(reader)
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SummaryError(f"{path}: cannot read the existing summary ({e}); move it away") from e
    if header != SUMMARY_COLUMNS:
        raise SummaryError(f"{path}: not a prediction summary (header {','.join(header) or 'empty'}"
                           f", expected {','.join(SUMMARY_COLUMNS)}); move it away or predict "
                           "into another folder")
    return rows


def write_summary_csv(rows: Sequence[Dict], path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


def merge_summary_csv(path, new: Sequence[Dict]) -> None:
    """``path``'s rows of images not in ``new`` (by file stem), then ``new``, by image and class."""
    replaced = {_stem(r["image"]) for r in new}
    rows = [r for r in read_summary_csv(path) if _stem(r["image"]) not in replaced] + list(new)
    write_summary_csv(sorted(rows, key=lambda r: (str(r["image"]), int(r["class_id"]))), path)


class SummaryCsv:
    """``summary.csv``: per image and foreground class, components, pixels and area."""

    def __init__(self, output_dir):
        self.path, self.rows = os.path.join(output_dir, SUMMARY_FILE), []
        read_summary_csv(self.path)  # one that cannot be merged: refused before the work

    def refuse(self, path) -> Optional[str]:
        return None

    def add(self, p: ImagePrediction):
        self.rows += class_summary(p.mask, p.image_name, p.georef, p.gsd)

    def close(self):
        merge_summary_csv(self.path, self.rows)  # read again: the earlier rows as they are now


def read_coco_results(results_path, images_path):
    """``(results, images)`` of earlier predictions into a folder (``([], [])`` when there are
    none); files that cannot be merged (one without the other, not JSON, not this tool's layout)
    are a :class:`SummaryError` naming the file, so that nothing is overwritten."""
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
    results, images = loaded[0], loaded[1].get("images") if isinstance(loaded[1], dict) else None
    for path, ok, what in (
            (results_path, isinstance(results, list) and all(
                isinstance(r, dict) and "image_id" in r for r in results), "a COCO results list"),
            (images_path, isinstance(images, list) and all(
                isinstance(i, dict) and {"id", "file_name"} <= set(i) for i in images),
             "the COCO image list")):
        if not ok:
            raise SummaryError(f"{path}: not {what} of this tool; move it away or predict into "
                               "another folder")
    return results, images


def merge_coco_results(results_path, images_path, new) -> None:
    """The folder's earlier images not in ``new`` = (results, images) (by file stem) with their
    results, then the new ones: the results list (``[{"image_id", "category_id",
    "segmentation", "score"}]``, what ``COCO.loadRes`` reads) and a COCO file of the images (by
    id) and the categories they refer to, no annotations."""
    from ..data.coco_convert import categories

    old_results, old_images = read_coco_results(results_path, images_path)
    replaced = {_stem(i["file_name"]) for i in new[1]}
    kept = [i for i in old_images if _stem(i["file_name"]) not in replaced]
    kept_ids = {i["id"] for i in kept}
    results = [r for r in old_results if r["image_id"] in kept_ids] + list(new[0])
    images = sorted(kept + list(new[1]), key=lambda i: i["id"])
    _dump_json({"info": {"description": f"images of {os.path.basename(str(results_path))}"},
                "images": images, "annotations": [], "categories": categories()}, images_path)
    _dump_json(results, results_path)
    logger.info("coco: %d results for %d images in %s (%d images predicted now)", len(results),
                len(images), results_path, len(new[1]))


class CocoResults:
    """``coco_results.json`` (one RLE per 4-connected component, ``category_id`` = class,
    ``score`` = mean confidence) and ``coco_images.json``. Image ids: ``image_ids[base name]``
    when given (an input without one, or with the id of an earlier image kept in the folder, is
    refused); else an image predicted again keeps its id, a new one gets the next free id."""

    def __init__(self, output_dir, image_ids: Optional[Dict[str, int]] = None):
        self.paths = (os.path.join(output_dir, COCO_RESULTS_FILE),
                      os.path.join(output_dir, COCO_IMAGES_FILE))
        earlier = read_coco_results(*self.paths)[1]  # one that cannot be merged: refused here
        self.earlier_ids = {_stem(i["file_name"]): i["id"] for i in earlier}
        self.earlier_by_id = {i["id"]: i for i in earlier}  # kept while re-predicted: reserved
        self.next_id = max(self.earlier_by_id, default=0) + 1
        self.image_ids, self.results, self.images = image_ids, [], []

    def refuse(self, path) -> Optional[str]:
        name = os.path.basename(path)
        if self.image_ids is not None and name not in self.image_ids:
            return (f"{path}: no image named {name} in the COCO file of "
                    "ROOFTOP.COCO.PREDICTION_IMAGE_IDS: no image id for its results")
        earlier = self.earlier_by_id.get((self.image_ids or {}).get(name))
        if earlier is not None and _stem(earlier["file_name"]) != _stem(path):
            return (f"{path}: image id {earlier['id']} is already used by {earlier['file_name']} "
                    f"in {self.paths[1]}; predict into another folder")
        return None

    def add(self, p: ImagePrediction):
        from ..data.coco_convert import mask_annotations

        if self.image_ids is not None:
            image_id = self.image_ids[p.image_name]
        elif _stem(p.path) in self.earlier_ids:
            image_id = self.earlier_ids[_stem(p.path)]
        else:
            image_id, self.next_id = self.next_id, self.next_id + 1
        self.results += mask_annotations(p.mask, image_id, connectivity=4, scores=p.confidence)
        self.images.append({"id": image_id, "file_name": p.path, "height": int(p.mask.shape[0]),
                            "width": int(p.mask.shape[1])})

    def close(self):
        merge_coco_results(*self.paths, (self.results, self.images))


output("coco", "", f"per folder: {COCO_RESULTS_FILE}, COCO results (one RLE per 4-connected "
                   "component, category_id = class, score = mean confidence) and "
                   f"{COCO_IMAGES_FILE}, its images (ids 1, 2, ... or those of "
                   "ROOFTOP.COCO.PREDICTION_IMAGE_IDS) and categories; earlier predictions into "
                   "the folder are kept, an image predicted again replaces its own")(None)


def folder_outputs(output_dir, outputs, coco_image_ids=None):
    """The per-folder outputs of a run (summary.csv; COCO with the ``coco`` output), each having
    read the folder's earlier file (refused when it cannot be merged)."""
    return [SummaryCsv(output_dir)] + \
        ([CocoResults(output_dir, coco_image_ids)] if "coco" in outputs else [])
