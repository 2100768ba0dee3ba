"""Conversions between the Cape Town PNG layout and COCO JSON (``tools/convert_coco.py``):
:func:`png_split_to_coco` (one annotation per connected component, RLE exact, polygons without
holes) and :func:`coco_split_to_png` (rasterised as the training data are). The rules and what
a round trip keeps: datasets/README.md, "The COCO layout".
"""
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..fileio import atomic_path, write_text_atomic
from .capetown import CLASS_NAMES, FOREGROUND_CLASSES, IGNORE_LABEL, IMAGE_EXTENSIONS, DatasetError
from .coco import DEFAULT_JSON, load_coco_json, rasterize_record

logger = logging.getLogger(__name__)

SEGMENTATION_MODES = ("rle", "polygon")
IGNORE_CATEGORY = {"id": IGNORE_LABEL, "name": "ignore", "supercategory": "ignore"}


def categories(with_ignore=False) -> List[Dict]:
    cats = [{"id": c, "name": CLASS_NAMES[c], "supercategory": "solar"} for c in FOREGROUND_CLASSES]
    return cats + ([dict(IGNORE_CATEGORY)] if with_ignore else [])


def label_components(binary: np.ndarray, connectivity: int = 4):
    """``(labels int32, count)`` of the 4- or 8-connected components of a boolean mask."""
    from scipy import ndimage

    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    labels, count = ndimage.label(binary, structure=structure)
    return labels.astype(np.int32, copy=False), count


def encode_rle(binary: np.ndarray) -> dict:
    """Compressed COCO RLE (``counts`` a str) of an (H, W) boolean mask."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(binary.astype(np.uint8)))
    return {"size": [int(binary.shape[0]), int(binary.shape[1])], "counts": rle["counts"].decode()}


def component_rle(labels: np.ndarray, label: int, box) -> dict:
    """Compressed RLE of ``labels == label`` from the component's bounding box ``box`` (a pair of
    slices, as ``scipy.ndimage.find_objects`` gives): the column-major runs are found in the box
    only, so the cost is the box's area, not the image's (large predicted orthophotos)."""
    from pycocotools import mask as mask_utils

    height, width = labels.shape
    cols, rows = np.nonzero((labels[box] == label).T)  # column-major order, as COCO RLE
    pos = (cols + box[1].start).astype(np.int64) * height + rows + box[0].start
    breaks = np.flatnonzero(np.diff(pos) != 1)
    starts = np.concatenate([pos[:1], pos[breaks + 1]])
    ends = np.concatenate([pos[breaks], pos[-1:]]) + 1
    counts = np.empty(2 * len(starts) + 1, dtype=np.int64)
    counts[0:-1:2] = starts - np.concatenate([[0], ends[:-1]])  # zeros before each run
    counts[1::2] = ends - starts
    counts[-1] = height * width - ends[-1]
    if counts[-1] == 0:  # no zeros after the last run: left out, as pycocotools' encode does
        counts = counts[:-1]
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": counts.tolist()}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode()}


def component_polygons(labels: np.ndarray, connectivity: int = 4) -> Dict[int, List[List[float]]]:
    """{label: [polygon, ...]}: the outer rings along pixel edges of each labelled component,
    each ``[x1, y1, x2, y2, ...]`` (not closed: the last point is not the first again)."""
    from rasterio import features

    out: Dict[int, List[List[float]]] = {}
    for geom, value in features.shapes(labels, mask=labels > 0, connectivity=connectivity):
        ring = geom["coordinates"][0][:-1]
        out.setdefault(int(value), []).append([float(v) for xy in ring for v in xy])
    return out


def mask_annotations(mask: np.ndarray, image_id, first_id: int = 1, segmentation: str = "rle",
                     connectivity: int = 4, scores: np.ndarray = None) -> List[Dict]:
    """COCO annotations of a class-index mask, one per connected component of each foreground
    class (and ignore regions as ``iscrowd`` annotations of category 255, always RLE), ids from
    ``first_id``. With ``scores`` ((H, W) float confidences), results-format entries instead:
    ``image_id``, ``category_id``, RLE ``segmentation`` and ``score`` = the mean confidence over
    the component's pixels (no ignore entries)."""
    from pycocotools import mask as mask_utils
    from scipy import ndimage

    if segmentation not in SEGMENTATION_MODES:
        raise ValueError(f"segmentation must be one of {SEGMENTATION_MODES}, got {segmentation!r}")
    anns = []
    classes = list(FOREGROUND_CLASSES) + ([] if scores is not None else [IGNORE_LABEL])
    for class_id in classes:
        labels, count = label_components(mask == class_id, connectivity)
        if count == 0:
            continue
        polygons = component_polygons(labels, connectivity) \
            if segmentation == "polygon" and class_id != IGNORE_LABEL and scores is None else None
        pixels = np.bincount(labels.ravel(), minlength=count + 1)
        if scores is not None:
            sums = np.bincount(labels.ravel(), weights=scores.ravel().astype(np.float64),
                               minlength=count + 1)
        boxes = ndimage.find_objects(labels)
        for label in range(1, count + 1):
            rle = component_rle(labels, label, boxes[label - 1])
            if scores is not None:
                anns.append({"image_id": image_id, "category_id": int(class_id), "segmentation": rle,
                             "score": round(float(sums[label] / pixels[label]), 6)})
                continue
            bbox = mask_utils.toBbox({"size": rle["size"], "counts": rle["counts"].encode()})
            anns.append({
                "id": first_id + len(anns), "image_id": image_id, "category_id": int(class_id),
                "segmentation": polygons[label] if polygons is not None else rle,
                "area": int(pixels[label]), "bbox": [float(v) for v in bbox],
                "iscrowd": int(class_id == IGNORE_LABEL),
            })
    return anns


def _copy_atomic(src, dst):
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def png_split_to_coco(dataset_dicts: Sequence[Dict], output_split_dir, *, segmentation="rle",
                      connectivity=4, copy_images=True, progress=True, description=""):
    """Write ``<output_split_dir>/annotations.json`` (and, with ``copy_images``, the images into
    ``<output_split_dir>/images/``) from PNG-layout dataset dicts
    (:func:`rooftop_m2f.data.capetown.load_split`). Returns the JSON's path.

    ``file_name`` is the image's name: relative to the copied ``images/`` folder, or without
    ``copy_images`` to the source image folder."""
    from .capetown import read_mask

    output_split_dir = Path(output_split_dir)
    images, annotations, has_ignore = [], [], False
    for image_id, d in enumerate(tqdm(dataset_dicts, desc=f"to-coco {description}", unit="img",
                                      disable=not progress), start=1):
        mask = read_mask(d["sem_seg_file_name"])
        if mask.shape != (d["height"], d["width"]):
            raise DatasetError(f"{d['sem_seg_file_name']}: mask is {mask.shape[1]}x{mask.shape[0]} "
                               f"(WxH) but its image {d['file_name']} is {d['width']}x{d['height']}")
        name = os.path.basename(d["file_name"])
        images.append({"id": image_id, "file_name": name, "height": int(mask.shape[0]),
                       "width": int(mask.shape[1])})
        anns = mask_annotations(mask, image_id, len(annotations) + 1, segmentation, connectivity)
        has_ignore |= any(a["category_id"] == IGNORE_LABEL for a in anns)
        annotations.extend(anns)
        if copy_images:
            _copy_atomic(d["file_name"], output_split_dir / "images" / name)
    payload = {
        "info": {"description": f"rooftop-m2f PNG masks as COCO ({segmentation}, "
                                f"{connectivity}-connected components)"},
        "licenses": [], "images": images, "annotations": annotations,
        "categories": categories(with_ignore=has_ignore),
    }
    path = output_split_dir / DEFAULT_JSON
    write_text_atomic(path, json.dumps(payload, separators=(",", ":")) + "\n")
    logger.info("%s: %d images, %d annotations", path, len(images), len(annotations))
    return str(path)


def coco_split_to_png(json_path, image_root, output_split_dir, *, crowd="ignore", extra_names=None,
                      progress=True, description=""):
    """Write ``<output_split_dir>/{images,masks}/`` (the Cape Town layout) from a COCO JSON and
    its images; any problem of the JSON raises one :class:`DatasetError` (see
    :func:`rooftop_m2f.data.coco.load_coco_json`). Returns the number of images."""
    records = load_coco_json(json_path, image_root, crowd, extra_names)
    output_split_dir = Path(output_split_dir)
    stems = {}
    for r in records:
        path = Path(r["file_name"])
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DatasetError(f"{path}: image extension {path.suffix!r} is not one the PNG layout "
                               f"reads ({', '.join(IMAGE_EXTENSIONS)})")
        if path.stem in stems:
            raise DatasetError(f"{path}: same name stem as {stems[path.stem]}: both would get the "
                               f"mask masks/{path.stem}.png")
        stems[path.stem] = path
    for r in tqdm(records, desc=f"to-png {description}", unit="img", disable=not progress):
        path = Path(r["file_name"])
        mask = rasterize_record(r)
        with atomic_path(output_split_dir / "masks" / f"{path.stem}.png") as tmp:
            Image.fromarray(mask.astype(np.uint8)).save(tmp, format="PNG")  # mode L
        _copy_atomic(path, output_split_dir / "images" / path.name)
    return len(records)
