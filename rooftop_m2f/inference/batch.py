"""Predict many files: expand inputs, run the predictor, write the chosen outputs.

A file that cannot be read or predicted is reported with its name and the reason, the others
are still processed, and the caller gets the failures (the command line turns them into a
non-zero exit code).
"""
import glob
import logging
import os
from pathlib import Path

from tqdm import tqdm

from ..data.capetown import IMAGE_EXTENSIONS, DatasetError, read_image
from . import writers

logger = logging.getLogger(__name__)

OUTPUTS = {
    # name: (file suffix, writer(image, mask, path))
    "index": ("_index.png", lambda image, mask, path: writers.write_index_png(mask, path)),
    "color": ("_color.png", lambda image, mask, path: writers.write_color_png(mask, path)),
    "overlay": ("_overlay.png", lambda image, mask, path: writers.write_overlay_png(image, mask, path)),
}


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


def predict_files(predictor, paths, output_dir, outputs=("index", "color", "overlay")):
    """Predict each path and write ``<output_dir>/<stem><suffix>`` for every chosen output.

    Returns a list of ``"path: reason"`` strings, one per failed file.
    """
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {sorted(OUTPUTS)}")
    os.makedirs(output_dir, exist_ok=True)
    failures = []
    for path in tqdm(paths, desc="predict", unit="img"):
        try:
            image = read_image(path)
            mask = predictor(image)
        except DatasetError as e:
            failures.append(str(e))
            logger.error("%s", e)
            continue
        except (RuntimeError, ValueError) as e:
            failures.append(f"{path}: prediction failed ({e})")
            logger.error("%s: prediction failed (%s)", path, e)
            continue
        stem = Path(path).stem
        for name in outputs:
            suffix, write = OUTPUTS[name]
            write(image, mask, os.path.join(output_dir, stem + suffix))
    return failures
