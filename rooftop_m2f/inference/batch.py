"""Predict many files (``tools/predict.py``): each one predicted, then written by the chosen
outputs (:data:`~.writers.OUTPUTS`); the folder's summary.csv (and COCO results) at the end,
merged with the folder's earlier ones.

A file that cannot be read or predicted is reported with its name and the reason, the others are
still processed, and the caller gets the failures. Georeference: a TIFF with a CRS and a
geotransform gives a GeoTIFF mask with the same CRS and transform, GeoJSON polygons in that CRS
and areas from its pixel size. Other inputs (PNG, JPEG, a TIFF without CRS or transform) give
GeoJSON in pixel coordinates, areas from the ground sampling distance ``gsd``, and no GeoTIFF;
for a TIFF this is logged as a warning naming the file, for the others counted in one line.
"""
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from ..fileio import check_output_folder
from ..images import DatasetError
from .sources import open_image
from .writers import DEFAULT_OUTPUTS, OUTPUTS, ImagePrediction, folder_outputs

logger = logging.getLogger(__name__)


def predict_files(predictor, paths, output_dir, outputs=DEFAULT_OUTPUTS, gsd: float = 0.08,
                  coco_image_ids: Optional[dict] = None, folder=None):
    """Predict each path with ``predictor`` (a :class:`~.tiling.TiledPredictor`, whatever its
    scorer) and write ``<output_dir>/<stem><suffix>`` for every chosen output, then the folder
    outputs (``folder``, when the caller opened them with :func:`~.writers.folder_outputs`
    already). Returns one ``"path: reason"`` per failed file."""
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {sorted(OUTPUTS)}")
    if not gsd > 0:
        raise ValueError(f"the ground sampling distance must be > 0 metres, got {gsd}")
    check_output_folder(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    if folder is None:  # each reads the folder's earlier file: refused before any work
        folder = folder_outputs(output_dir, outputs, coco_image_ids)
    failures, stems, not_georeferenced = [], {}, 0
    try:
        for path in tqdm(paths, desc="predict", unit="img"):
            stem = Path(path).stem
            refusal = next((r for r in (f.refuse(path) for f in folder) if r), None)
            if stem in stems:
                refusal = (f"{path}: outputs would overwrite those of {stems[stem]} (same name "
                           "stem); predict it into another folder")
            stems.setdefault(stem, path)
            if refusal:
                failures.append(refusal)
                logger.error("%s", refusal)
                continue
            try:
                not_georeferenced += _predict_one(predictor, path, output_dir, outputs, gsd, folder)
            except DatasetError as e:
                failures.append(str(e))
                logger.error("%s", e)
            except (RuntimeError, ValueError, OSError, MemoryError) as e:
                failures.append(f"{path}: prediction failed ({type(e).__name__}: {e})")
                logger.error("%s", failures[-1])
    finally:  # the folder outputs hold what was predicted, even when a write ended the run
        if not_georeferenced:
            logger.info("geotiff: not written for %d input(s) without a georeference (not TIFFs)",
                        not_georeferenced)
        for f in folder:
            f.close()
    return failures


def _predict_one(predictor, path, output_dir, outputs, gsd, folder) -> bool:
    """Predict ``path``, write its outputs and add it to the folder outputs; returns whether its
    GeoTIFF mask was skipped for want of a georeference (a PNG or JPEG)."""
    stem, skipped = Path(path).stem, False
    with open_image(path) as source:
        if source.georef_problem:
            logger.warning("%s %s: GeoJSON in pixel coordinates, areas from GSD %g m, no "
                           "GeoTIFF mask", path, source.georef_problem, gsd)
        elif source.georef is not None and not source.georef.metres:
            logger.warning("%s: CRS %s is not in metres: polygons in that CRS, but areas "
                           "from GSD %g m", path, source.georef.crs, gsd)
        result = predictor.predict(source, confidence=np.float32 if "coco" in outputs else None)
        prediction = ImagePrediction(path, result.mask, source, source.georef, gsd,
                                     result.confidence)
        for name in outputs:
            if name == "geotiff" and source.georef is None:
                skipped = source.georef_problem is None
            elif OUTPUTS[name].write is not None:
                OUTPUTS[name].write(prediction, os.path.join(output_dir, stem + OUTPUTS[name].suffix))
        for f in folder:
            f.add(prediction)
    return skipped
