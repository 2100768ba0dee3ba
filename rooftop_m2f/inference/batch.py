"""Predict many files: expand inputs, run the (tiled) predictor, write the chosen outputs and the
folder's summary (every prediction in the folder, earlier runs included).

A file that cannot be read or predicted is reported with its name and the reason, the others
are still processed, and the caller gets the failures (the command line turns them into a
non-zero exit code). Every output is written to a temporary name and renamed.

Georeference: a TIFF with a CRS and a geotransform gives a GeoTIFF mask with the same CRS and
transform, GeoJSON polygons in that CRS and areas from its pixel size. Any other input (PNG,
JPEG, a TIFF without CRS or transform) gives GeoJSON in pixel coordinates, areas from the ground
sampling distance ``gsd``, and no GeoTIFF; for a TIFF this is logged as a warning naming the
file, for the others counted in one line at the end.
"""
import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from ..data.capetown import IMAGE_EXTENSIONS, DatasetError
from . import writers
from .outputs import COCO_IMAGES_FILE, COCO_RESULTS_FILE, DEFAULT_OUTPUTS
from .writers import OUTPUTS
from .sources import GeoReference, ImageSource, open_image

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.csv"


@dataclass
class Prediction:
    path: str                 # the input file
    mask: np.ndarray          # (H, W) uint8 class indices
    source: ImageSource       # to read the image again (overlay)
    georef: Optional[GeoReference]
    gsd: float                # metres per pixel when there is no georeference
    confidence: Optional[np.ndarray] = None  # (H, W) float32, only when a run output needs it

    @property
    def image_name(self) -> str:
        return os.path.basename(self.path)




def expand_inputs(items):
    """Files, folders (their images, sorted) and glob patterns -> (paths, missing items)."""
    paths, missing = [], []
    for item in items:
        if os.path.isdir(item):
            found = sorted(p for p in Path(item).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                missing.append(f"{item}: folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
            paths.extend(str(p) for p in found)
        elif os.path.isfile(item):
            paths.append(item)
        else:
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                missing.append(f"{item}: no such file, folder or matching pattern")
            paths.extend(m for m in matches if os.path.isfile(m))
    unique = list(dict.fromkeys(paths))
    return unique, missing


def predict_files(predictor, paths, output_dir, outputs=DEFAULT_OUTPUTS, gsd: float = 0.08,
                  coco_image_ids: Optional[dict] = None):
    """Predict each path with ``predictor`` (a :class:`~.tiling.TiledPredictor`) and write
    ``<output_dir>/<stem><suffix>`` for every chosen output, then ``<output_dir>/summary.csv``
    (per image and foreground class: components, pixels, area_m2), merged with the rows of
    earlier predictions into the folder: rows of an image predicted again (same file stem, so
    the same output files) are replaced, the others kept; written atomically. With the ``coco``
    output, ``coco_results.json`` and ``coco_images.json``, merged the same way with those of
    earlier predictions (image ids: ``coco_image_ids[base name]`` when given, where an input
    without an id, or with the id of an earlier image kept in the folder, is a failure; else an
    image predicted again keeps its id and a new one gets the next free id, 1, 2, ...;
    ``file_name`` the input path as given).

    Returns a list of ``"path: reason"`` strings, one per failed file.
    """
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {sorted(OUTPUTS)}")
    if not gsd > 0:
        raise ValueError(f"the ground sampling distance must be > 0 metres, got {gsd}")
    if not hasattr(predictor, "predict_source"):
        raise TypeError(f"predict_files needs a TiledPredictor, got {type(predictor).__name__}")
    os.makedirs(output_dir, exist_ok=True)
    summary_path = os.path.join(output_dir, SUMMARY_FILE)
    check_output_folder(output_dir)  # a summary.csv that cannot be merged: before the work
    failures, summary, not_georeferenced = [], [], 0
    stems = {}
    coco = "coco" in outputs
    coco_results, coco_images = [], []
    coco_paths = (os.path.join(output_dir, COCO_RESULTS_FILE),
                  os.path.join(output_dir, COCO_IMAGES_FILE))
    # earlier COCO output that cannot be merged: refused here, before the work
    earlier_coco = writers.read_coco_results(*coco_paths) if coco else ([], [])
    earlier_ids = {writers.coco_stem(i): i["id"] for i in earlier_coco[1]}
    # an earlier image's id stays its own (its re-prediction may fail and keep it)
    earlier_by_id = {i["id"]: i for i in earlier_coco[1]}
    next_id = max(earlier_by_id, default=0) + 1
    for path in tqdm(paths, desc="predict", unit="img"):
        stem = Path(path).stem
        if stem in stems:
            failures.append(f"{path}: outputs would overwrite those of {stems[stem]} (same name "
                            "stem); predict it into another folder")
            logger.error("%s", failures[-1])
            continue
        stems[stem] = path
        if coco and coco_image_ids is not None and os.path.basename(path) not in coco_image_ids:
            failures.append(f"{path}: no image named {os.path.basename(path)} in the COCO file of "
                            "ROOFTOP.COCO.PREDICTION_IMAGE_IDS: no image id for its results")
            logger.error("%s", failures[-1])
            continue
        given = coco_image_ids.get(os.path.basename(path)) if coco and coco_image_ids else None
        if given in earlier_by_id and writers.coco_stem(earlier_by_id[given]) != stem:
            failures.append(f"{path}: image id {given} is already used by "
                            f"{earlier_by_id[given]['file_name']} in {coco_paths[1]}; predict "
                            "into another folder")
            logger.error("%s", failures[-1])
            continue
        try:
            with open_image(path) as source:
                if source.georef_problem:
                    logger.warning("%s %s: GeoJSON in pixel coordinates, areas from GSD %g m, no "
                                   "GeoTIFF mask", path, source.georef_problem, gsd)
                elif source.georef is not None and not source.georef.metres:
                    logger.warning("%s: CRS %s is not in metres: polygons in that CRS, but areas "
                                   "from GSD %g m", path, source.georef.crs, gsd)
                confidence = None
                if coco:
                    mask, confidence = predictor.predict_source(source, with_confidence=True)
                else:
                    mask = predictor.predict_source(source)
                prediction = Prediction(path, mask, source, source.georef, gsd, confidence)
                for name in outputs:
                    if name == "geotiff" and source.georef is None:
                        not_georeferenced += source.georef_problem is None
                        continue
                    suffix, write, _ = OUTPUTS[name]
                    if write is not None:
                        write(prediction, os.path.join(output_dir, stem + suffix))
                if coco:  # image ids: given, or the earlier id of this image, or the next free
                    if coco_image_ids is not None:
                        image_id = coco_image_ids[os.path.basename(path)]
                    elif stem in earlier_ids:
                        image_id = earlier_ids[stem]
                    else:
                        image_id, next_id = next_id, next_id + 1
                    results = writers.coco_results(mask, confidence, image_id)
                    coco_results.extend(results)
                    coco_images.append({"id": image_id, "file_name": path,
                                        "height": int(mask.shape[0]), "width": int(mask.shape[1])})
                summary.extend(writers.class_summary(mask, prediction.image_name, source.georef, gsd))
        except DatasetError as e:
            failures.append(str(e))
            logger.error("%s", e)
        except (RuntimeError, ValueError, OSError, MemoryError) as e:
            failures.append(f"{path}: prediction failed ({type(e).__name__}: {e})")
            logger.error("%s", failures[-1])
    if not_georeferenced:
        logger.info("geotiff: not written for %d input(s) without a georeference (not TIFFs)",
                    not_georeferenced)
    # merged with the rows of earlier predictions into this folder (read again now: the
    # folder's summary describes every prediction in it; a re-predicted image replaces its rows)
    existing = writers.read_summary_csv(summary_path)
    writers.write_summary_csv(writers.merge_summary_rows(existing, summary), summary_path)
    if coco:  # merged with earlier predictions' (read again now, as the summary)
        merged = writers.merge_coco_results(writers.read_coco_results(*coco_paths),
                                            (coco_results, coco_images))
        writers.write_coco_results(*merged, *coco_paths)
        logger.info("coco: %d results for %d images in %s (%d images predicted now)",
                    len(merged[0]), len(merged[1]), coco_paths[0], len(coco_images))
    return failures


def check_output_folder(output_dir, outputs=()):
    """Before any prediction: an existing ``summary.csv`` in ``output_dir`` (and, with the
    ``coco`` output, the COCO results) must be one this tool can merge into
    (:class:`~.writers.SummaryError` otherwise, naming the file)."""
    writers.read_summary_csv(os.path.join(output_dir, SUMMARY_FILE))
    if "coco" in outputs:
        writers.read_coco_results(os.path.join(output_dir, COCO_RESULTS_FILE),
                                  os.path.join(output_dir, COCO_IMAGES_FILE))
