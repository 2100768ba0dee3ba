"""Prediction outputs, each written atomically (temporary name, then rename), and
:data:`OUTPUTS`, the registry of ``tools/predict.py``'s outputs: each name is registered next to
its writer (light: no torch, so that ``predict.py --help`` lists them at once).

Per image: class-index PNG ({class_indices}); colour PNG (:data:`~rooftop_m2f.classes.PALETTE`;
ignore and no data {ignore}: {palette}); overlay PNG (the colours blended over the image); the
reference's JSON of predicted pixel coordinates; a GeoJSON of polygons, one Feature per
connected component; a uint8 class-index GeoTIFF with the input's CRS and transform.

Per folder, merged with the outputs of earlier predictions into the folder (an image predicted
again, known by its file stem like its outputs, replaces its own entries; files this tool cannot
merge are refused before anything is predicted, so nothing is overwritten): ``summary.csv``
(:class:`SummaryCsv`, always) and the COCO results with their image list (:class:`CocoResults`).

Connected components are 4-connected (pixels sharing an edge), so each is one valid polygon
(holes kept) and counts agree between the GeoJSON and the summary.
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

__doc__ = __doc__.format(class_indices=class_indices_prose(), palette=palette_prose(with_rgb=True),
                         ignore=color_name(IGNORE_COLOR))

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.csv"
COCO_RESULTS_FILE = "coco_results.json"
COCO_IMAGES_FILE = "coco_images.json"


@dataclass
class ImagePrediction:
    """What a per-image writer gets."""

    path: str                       # the input file
    mask: np.ndarray                # (H, W) uint8 class indices (255: no data)
    source: object                  # its :class:`~.sources.ImageSource` (to read it again)
    georef: object                  # its :class:`~.sources.GeoReference`, or None
    gsd: float                      # metres per pixel when there is no georeference
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
DEFAULT_OUTPUTS = ("index", "color", "overlay", "json", "geojson", "geotiff")


def register(name, suffix, help, write=None):
    OUTPUTS[name] = Output(suffix, help, write)


def describe_outputs():
    """One line per output (name, file name, what it holds): ``predict.py --help``."""
    return "\n".join(f"  {name:8s} {'<stem>' + o.suffix if o.suffix else '':24s} {o.help}"
                     for name, o in OUTPUTS.items())


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


register("index", "_index.png", f"class-index PNG ({class_indices_prose()})",
         lambda p, out: write_index_png(p.mask, out))


def write_color_png(mask, path):
    save_png(colorize(mask), path)


register("color", "_color.png", f"RGB PNG: {palette_prose()}",
         lambda p, out: write_color_png(p.mask, out))


def write_overlay_png(image_rgb, mask, path):
    save_png(overlay(image_rgb, mask), path)


register("overlay", "_overlay.png", "the classes' colours blended over the image",
         lambda p, out: write_overlay_png(p.source.read_all(), p.mask, out))


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


register("json", "_coords.json", 'reference JSON {"image_name", "predicted_coords": {"class_1": '
                                 '[[row, col], ...], ...}}',
         lambda p, out: write_coords_json(p.mask, p.image_name, out))


# --- connected components and polygons ------------------------------------------------------

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
    import shapely
    from rasterio import features as rio_features
    from shapely import affinity
    from shapely.geometry import mapping, shape

    pixel_area = _pixel_area_m2(georef, gsd)
    if georef is not None:
        t = georef.transform
        decimals, matrix = coordinate_decimals(t), [t.a, t.b, t.d, t.e, t.c, t.f]
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
                polygon = shapely.transform(affinity.affine_transform(polygon, matrix),
                                            lambda xy: np.round(xy, decimals))
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


register("geojson", "_polygons.geojson", "one polygon per connected component with class_id, "
                                         "class_name, pixel_count, area_m2 (CRS coordinates when "
                                         "georeferenced, else pixels)",
         lambda p, out: write_geojson(p.mask, p.image_name, out, p.georef, p.gsd))


# --- GeoTIFF --------------------------------------------------------------------------------

def write_geotiff(mask: np.ndarray, path, georef=None, nodata=None) -> None:
    """Single-band uint8 class-index GeoTIFF (deflate, 256 px internal tiles), with the palette
    as its colour map and, given ``georef``, its CRS and transform."""
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


# georeferenced inputs only: predict_files skips it for the others
register("geotiff", "_mask.tif", "uint8 class-index GeoTIFF with the input's CRS and transform "
                                 "(georeferenced inputs only)",
         lambda p, out: write_geotiff(p.mask, out, p.georef))


# --- per folder: summary.csv ------------------------------------------------------------------

class SummaryError(UserError, ValueError):
    """An earlier output in the folder that cannot be merged; the message names it."""


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


def write_summary_csv(rows: Sequence[Dict], path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


def merge_summary_csv(path, new: Sequence[Dict]) -> None:
    """The rows in ``path`` of images not in ``new`` (by file stem), then ``new``; sorted by
    image and class."""
    replaced = {_stem(str(r["image"])) for r in new}
    rows = [r for r in read_summary_csv(path) if _stem(str(r["image"])) not in replaced]
    write_summary_csv(sorted(rows + [dict(r) for r in new],
                             key=lambda r: (str(r["image"]), int(r["class_id"]))), path)


class SummaryCsv:
    """``summary.csv`` of a folder: per image and foreground class, components, pixels, area."""

    def __init__(self, output_dir):
        self.path = os.path.join(output_dir, SUMMARY_FILE)
        read_summary_csv(self.path)  # one this tool cannot merge: refused before any work
        self.rows = []

    def refuse(self, path) -> Optional[str]:
        return None

    def add(self, p: ImagePrediction):
        self.rows += class_summary(p.mask, p.image_name, p.georef, p.gsd)

    def close(self):
        merge_summary_csv(self.path, self.rows)  # read again: earlier runs' rows as they are now


# --- per folder: COCO results -----------------------------------------------------------------

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


def merge_coco_results(results_path, images_path, new) -> None:
    """The earlier images in the folder not in ``new`` = (results, images) (by file stem), with
    their results, then the new ones, images sorted by id: the results list
    (``[{"image_id", "category_id", "segmentation", "score"}]``, what ``COCO.loadRes`` reads) and
    a COCO file of the ``images`` (id, file_name, height, width) and ``categories`` the ids
    refer to, no annotations."""
    from ..data.coco_convert import categories

    old_results, old_images = read_coco_results(results_path, images_path)
    replaced = {coco_stem(i) for i in new[1]}
    kept = [i for i in old_images if coco_stem(i) not in replaced]
    kept_ids = {i["id"] for i in kept}
    results = [r for r in old_results if r["image_id"] in kept_ids] + list(new[0])
    images = sorted(kept + list(new[1]), key=lambda i: i["id"])
    _dump_json({"info": {"description": f"images of {os.path.basename(str(results_path))}"},
                "images": images, "annotations": [], "categories": categories()}, images_path)
    _dump_json(results, results_path)
    logger.info("coco: %d results for %d images in %s (%d images predicted now)", len(results),
                len(images), results_path, len(new[1]))


class CocoResults:
    """``coco_results.json`` and ``coco_images.json`` of a folder. Image ids: ``image_ids[base
    name]`` when given (an input without one, or with the id of an earlier image kept in the
    folder, is refused); else an image predicted again keeps its id and a new one gets the next
    free id, 1, 2, ...; ``file_name`` the input path as given."""

    def __init__(self, output_dir, image_ids: Optional[Dict[str, int]] = None):
        self.paths = (os.path.join(output_dir, COCO_RESULTS_FILE),
                      os.path.join(output_dir, COCO_IMAGES_FILE))
        earlier = read_coco_results(*self.paths)[1]  # one this tool cannot merge: refused here
        self.earlier_ids = {coco_stem(i): i["id"] for i in earlier}
        self.earlier_by_id = {i["id"]: i for i in earlier}  # kept while re-predicted: reserved
        self.next_id = max(self.earlier_by_id, default=0) + 1
        self.image_ids, self.results, self.images = image_ids, [], []

    def refuse(self, path) -> Optional[str]:
        name = os.path.basename(path)
        if self.image_ids is None:
            return None
        if name not in self.image_ids:
            return (f"{path}: no image named {name} in the COCO file of "
                    "ROOFTOP.COCO.PREDICTION_IMAGE_IDS: no image id for its results")
        earlier = self.earlier_by_id.get(self.image_ids[name])
        if earlier is not None and coco_stem(earlier) != Path(path).stem:
            return (f"{path}: image id {earlier['id']} is already used by {earlier['file_name']} "
                    f"in {self.paths[1]}; predict into another folder")
        return None

    def add(self, p: ImagePrediction):
        stem = Path(p.path).stem
        if self.image_ids is not None:
            image_id = self.image_ids[p.image_name]
        elif stem in self.earlier_ids:
            image_id = self.earlier_ids[stem]
        else:
            image_id, self.next_id = self.next_id, self.next_id + 1
        self.results += coco_results(p.mask, p.confidence, image_id)
        self.images.append({"id": image_id, "file_name": p.path, "height": int(p.mask.shape[0]),
                            "width": int(p.mask.shape[1])})

    def close(self):
        merge_coco_results(*self.paths, (self.results, self.images))


register("coco", "", f"per folder: {COCO_RESULTS_FILE}, COCO results (one RLE per 4-connected "
                     "component, category_id = class, score = mean confidence) and "
                     f"{COCO_IMAGES_FILE}, its images (ids 1, 2, ... or those of "
                     "ROOFTOP.COCO.PREDICTION_IMAGE_IDS) and categories; earlier predictions into "
                     "the folder are kept, an image predicted again replaces its own")


def folder_outputs(output_dir, outputs, coco_image_ids=None):
    """The per-folder outputs of a run (summary.csv, and COCO with the ``coco`` output), each
    having read the folder's earlier file (refused when it cannot be merged)."""
    return [SummaryCsv(output_dir)] + \
        ([CocoResults(output_dir, coco_image_ids)] if "coco" in outputs else [])
