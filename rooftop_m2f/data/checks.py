"""Dataset checker: every problem of a split in one pass, class statistics, suggested class
weights. ``tools/check_dataset.py`` is its command line (JSON report, bar chart);
:func:`check_datasets` runs the same check on the registered splits before training
(``ROOFTOP.CHECK_DATASET``). The problems it reports: :class:`Problem` and README, "Dataset
layout" (COCO: datasets/README.md).
"""
import json
import logging
import math
import os
import struct
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from tqdm import tqdm

from ..fileio import atomic_path, write_text_atomic
from .capetown import (
    CLASS_NAMES,
    FOREGROUND_CLASSES,
    IGNORE_LABEL,
    IMAGE_EXTENSIONS,
    PALETTE,
    SPLITS,
    DatasetError,
    mask_path_for,
    read_mask,
)

logger = logging.getLogger(__name__)

ERROR_KINDS = frozenset({
    "missing_directory", "empty_split", "unreadable_image", "truncated_image", "missing_mask",
    "duplicate_stem", "shared_mask", "unreadable_mask", "bad_mask_values", "bad_mask_colors",
    "size_mismatch", "dataset_load",
    # COCO format (rooftop_m2f/data/coco.py)
    "bad_json", "outside_root", "unknown_category", "missing_image", "unknown_image", "duplicate_image",
    "polygon_outside", "degenerate_polygon", "bad_segmentation",
})
WARNING_KINDS = frozenset({
    "image_mode", "image_bit_depth", "orphan_mask", "ignored_file", "unlabelled_mask",
    "absent_class", "unlisted_image",
})
MASK_EXTENSION = ".png"
REPORT_FILE = "dataset_check.json"
CHART_FILE = "class_shares.png"
WEIGHT_FORMULA = ("w(c) = f(c)^(-1/2) normalised to mean 1 over the classes present, f(c) = "
                  "fraction of the split's images whose mask contains class c")
SMALL_COMPONENT_PIXELS = 10
_MODE_NOTES = {
    "L": "grayscale, replicated to 3 channels",
    "LA": "grayscale with alpha: alpha dropped, gray replicated to 3 channels",
    "RGBA": "RGBA: the alpha channel is dropped",
    "P": "palette image: converted to RGB through its palette",
    "PA": "palette image with alpha: converted to RGB, alpha dropped",
    "CMYK": "CMYK: converted to RGB without a colour profile",
    "YCbCr": "YCbCr: converted to RGB",
    "1": "1-bit black and white: converted to RGB",
    "I": "32-bit integer grayscale: scaled to 8 bits and replicated",
    "F": "32-bit float grayscale: converted to 8 bits (clipped) and replicated",
}


@dataclass
class Problem:
    """One problem of a split: its ``kind``, the file it names and a message.

    An **error** (:data:`ERROR_KINDS`) makes the split unusable (training refuses to start, the
    tool exits 1):

    ==================  =======================================================================
    missing_directory   ``images/`` or ``masks/`` (or the split directory) does not exist
    empty_split         no image file in ``images/``
    unreadable_image    the image cannot be opened or decoded (not an image, unsupported format)
    truncated_image     the image file ends before its pixel data does
    missing_mask        an image without its mask
    duplicate_stem      several image files with one stem (``a.png`` and ``a.jpg``)
    shared_mask         several image stems that the mask-name rule maps to the same mask
    unreadable_mask     the mask cannot be opened or decoded (truncated too)
    bad_mask_values     class-index mask values that are neither a class (0-3) nor 255 (ignore)
    bad_mask_colors     RGB mask colours outside the palette (``capetown.PALETTE``, white = ignore)
    size_mismatch       the mask and its image differ in width or height (COCO: the image file
                        and the JSON's ``width``/``height``)
    dataset_load        a registered split without a folder whose loader failed
    ==================  =======================================================================

    COCO-format splits (:func:`check_coco`) have these errors instead of the mask ones, each
    naming the JSON, the annotation id and its image:

    ==================  =======================================================================
    bad_json            not JSON, or not COCO (no ``images``/``categories`` list, entries
                        without their required keys)
    unknown_category    a category whose name maps to no class, or an annotation whose
                        ``category_id`` is not among the categories
    outside_root        an ``images`` entry whose ``file_name`` is absolute or climbs out of
                        the image folder with ``..`` (never opened)
    missing_image       an ``images`` entry whose file does not exist
    unknown_image       an annotation whose ``image_id`` is not among the images
    duplicate_image     an image id, or an image file, listed twice
    polygon_outside     a polygon vertex more than 1 px outside the image
    degenerate_polygon  a polygon with fewer than 3 points, an odd coordinate count or zero area
    bad_segmentation    neither polygons nor RLE, or an RLE of another size than its image
    ==================  =======================================================================

    A **warning** (:data:`WARNING_KINDS`) leaves the split usable, because ``read_image``
    converts the file to the 8-bit RGB the model is trained on:

    ==================  =======================================================================
    image_mode          not RGB: grayscale (replicated), RGBA (alpha dropped), palette, CMYK, ...
    image_bit_depth     not 8 bits per channel (16-bit PNG/TIFF): scaled to 8 bits
    orphan_mask         a mask that no image maps to (it is not used)
    ignored_file        a file in ``images/`` or ``masks/`` whose extension is not read (hidden
                        files, names starting with ``.``, are skipped silently)
    unlabelled_mask     every pixel of the mask is the ignore label: the image teaches nothing
    absent_class        a class in no mask of the split (training: never learnt; evaluation:
                        its IoU is undefined and left out of the means)
    unlisted_image      (COCO) a file in the image folder that the JSON does not list
    ==================  =======================================================================
    """

    kind: str
    file: str
    message: str

    @property
    def severity(self):
        return "error" if self.kind in ERROR_KINDS else "warning"

    def __str__(self):
        return f"{self.file}: {self.message}"

    def to_dict(self):
        return {"severity": self.severity, "kind": self.kind, "file": self.file,
                "message": self.message}


@dataclass
class SplitReport:
    """Result of checking one split: every :class:`Problem`, and per class the labelled
    (non-ignore) pixels and the images that contain it, the images without any foreground; with
    ``full_stats`` also the sizes of the connected components (8-connectivity) of each class
    per image."""

    name: str
    split_dir: str
    class_names: List[str]
    num_images: int = 0
    num_pairs: int = 0
    problems: List[Problem] = field(default_factory=list)
    pixel_counts: np.ndarray = None            # (K,) int64, labelled pixels per class
    ignore_pixels: int = 0
    images_with_class: np.ndarray = None       # (K,) int64
    images_without_foreground: int = 0
    masks_decoded: int = 0
    component_sizes: Optional[Dict[int, List[int]]] = None  # full stats only
    seconds: float = 0.0

    def __post_init__(self):
        k = len(self.class_names)
        if self.pixel_counts is None:
            self.pixel_counts = np.zeros(k, dtype=np.int64)
        if self.images_with_class is None:
            self.images_with_class = np.zeros(k, dtype=np.int64)

    @property
    def errors(self):
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self):
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def usable(self):
        return not self.errors

    def pixel_shares(self):
        total = int(self.pixel_counts.sum())
        return self.pixel_counts / total if total else np.full(len(self.class_names), np.nan)

    def image_fractions(self):
        if not self.masks_decoded:
            return np.full(len(self.class_names), np.nan)
        return self.images_with_class / self.masks_decoded

    def suggested_class_weights(self):
        """``ROOFTOP.LOSS.PER_CLASS_WEIGHTS`` suggestion (:func:`suggest_class_weights`); ``None``
        without decoded masks."""
        return suggest_class_weights(self.images_with_class, self.masks_decoded)

    def to_dict(self):
        shares = self.pixel_shares()
        fractions = self.image_fractions()
        classes = []
        for c, name in enumerate(self.class_names):
            entry = {
                "index": c, "name": name, "pixels": int(self.pixel_counts[c]),
                "pixel_share": _num(shares[c]), "images": int(self.images_with_class[c]),
                "image_fraction": _num(fractions[c]),
            }
            if self.component_sizes is not None:
                entry["components"] = component_summary(self.component_sizes.get(c, []))
            classes.append(entry)
        weights = self.suggested_class_weights()
        return {
            "name": self.name, "split_dir": self.split_dir, "usable": self.usable,
            "num_images": self.num_images, "num_pairs": self.num_pairs,
            "masks_decoded": self.masks_decoded,
            "num_errors": len(self.errors), "num_warnings": len(self.warnings),
            "errors": [p.to_dict() for p in self.errors],
            "warnings": [p.to_dict() for p in self.warnings],
            "ignore_pixels": int(self.ignore_pixels),
            "images_without_foreground": int(self.images_without_foreground),
            "classes": classes,
            "suggested_class_weights": weights,
            "seconds": round(self.seconds, 3),
        }


def _num(x):
    x = float(x)
    return None if math.isnan(x) else x


def suggest_class_weights(images_with_class, num_images):
    """Suggested ``ROOFTOP.LOSS.PER_CLASS_WEIGHTS`` (weights of Mask2Former's classification loss).

    That loss sees one target per class present in an image, so the weights come from the
    fraction ``f(c)`` of images that contain class ``c``: ``w(c) = f(c)^(-1/2)``, normalised to
    mean 1 over the classes present; a class in no image gets 1.0 (and an ``absent_class``
    warning). The square root damps the correction, as in detectron2's repeat factors."""
    counts = np.asarray(images_with_class, dtype=np.float64)
    if not num_images:
        return None
    present = counts > 0
    if not present.any():
        return None
    raw = np.ones_like(counts)
    raw[present] = (counts[present] / num_images) ** -0.5
    raw[present] /= raw[present].mean()
    return [round(float(w), 3) for w in raw]


def component_summary(sizes):
    """Count and size distribution (pixels) of connected components."""
    if not sizes:
        return {"count": 0}
    a = np.asarray(sizes)
    return {
        "count": int(a.size), "min": int(a.min()), "p10": float(np.percentile(a, 10)),
        "median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "max": int(a.max()),
        "mean": float(a.mean()), f"below_{SMALL_COMPONENT_PIXELS}_pixels": int((a < SMALL_COMPONENT_PIXELS).sum()),
        # histogram over powers of two: [1, 2), [2, 4), [4, 8), ...
        "log2_histogram": np.bincount(np.floor(np.log2(a)).astype(int)).tolist(),
    }


# --------------------------------------------------------------------------------------------
# one file
# --------------------------------------------------------------------------------------------
def _png_bit_depth(path):
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) == 26 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return struct.unpack(">B", head[24:25])[0]
    return None


def _bit_depth(path, im):
    """Bits per channel where the header says more than PIL's mode does."""
    if im.mode.startswith("I;16"):
        return 16
    if im.format == "PNG":
        return _png_bit_depth(path)
    if im.format == "TIFF":
        bits = im.tag_v2.get(258)
        if bits:
            return max(bits) if isinstance(bits, tuple) else int(bits)
    return 8


def inspect_image(path):
    """``((height, width) or None, [Problem])``: decode the whole image, note its mode and depth."""
    path = str(path)
    problems = []
    try:
        with Image.open(path) as im:
            width, height = im.size
            mode, depth = im.mode, _bit_depth(path, im)
            im.load()  # the whole pixel data: truncation shows here
    except Exception as e:  # noqa: BLE001  any failure to decode is this file's problem
        text = str(e) or type(e).__name__
        kind = "truncated_image" if "truncated" in text.lower() else "unreadable_image"
        what = "truncated image" if kind == "truncated_image" else "cannot read image"
        return None, [Problem(kind, path, f"{what} ({type(e).__name__}: {text})")]
    if mode != "RGB" and not mode.startswith("I;16"):
        note = _MODE_NOTES.get(mode, f"mode {mode}: converted to RGB by PIL")
        problems.append(Problem("image_mode", path, f"not RGB: {note}"))
    if mode.startswith("I;16"):
        problems.append(Problem("image_mode", path, "16-bit grayscale: scaled to 8 bits and "
                                                    "replicated to 3 channels"))
    elif depth and depth != 8:
        problems.append(Problem("image_bit_depth", path, f"{depth} bits per channel: read as 8 bits "
                                                         "(check the radiometry matches the others)"))
    return (height, width), problems


def _classify_mask_error(path, error):
    """Problem kind of a ``read_mask`` error: it chains the reader's exception when the file
    cannot be decoded; otherwise the decoded values or colours were wrong."""
    text = str(error)
    text = text[len(path) + 2:] if text.startswith(path + ": ") else text
    if error.__cause__ is not None:
        kind = "unreadable_mask"
    else:
        kind = "bad_mask_colors" if "palette" in text else "bad_mask_values"
    return Problem(kind, path, text)


@dataclass
class _PairResult:
    problems: List[Problem]
    counts: Optional[np.ndarray] = None   # (K,) labelled pixels per class; None if no mask decoded
    ignore: int = 0
    components: Optional[Dict[int, List[int]]] = None


def check_pair(image_path, mask_path, num_classes=len(CLASS_NAMES), full_stats=False):
    """Check one image and its mask; class pixel counts (and component sizes) of the mask."""
    image_path, mask_path = str(image_path), str(mask_path)
    size, problems = inspect_image(image_path)
    try:
        mask = read_mask(mask_path)
    except DatasetError as e:
        problems.append(_classify_mask_error(mask_path, e))
        return _PairResult(problems)
    except Exception as e:  # noqa: BLE001  e.g. PIL's DecompressionBombError
        problems.append(Problem("unreadable_mask", mask_path, f"cannot read mask ({type(e).__name__}: {e})"))
        return _PairResult(problems)
    if size is not None and mask.shape != size:
        problems.append(Problem(
            "size_mismatch", mask_path,
            f"mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image {image_path} is "
            f"{size[1]}x{size[0]}"))
    return _mask_stats(mask, mask_path, problems, num_classes, full_stats)


def _mask_stats(mask, mask_name, problems, num_classes, full_stats):
    labelled = mask[mask != IGNORE_LABEL]
    counts = np.bincount(labelled.ravel(), minlength=num_classes)[:num_classes].astype(np.int64)
    if labelled.size == 0:
        problems.append(Problem("unlabelled_mask", mask_name, "every pixel is the ignore label "
                                                              f"{IGNORE_LABEL}"))
    components = None
    if full_stats:
        components = {}
        for c in np.flatnonzero(counts):
            n, _, stats, _ = cv2.connectedComponentsWithStats((mask == c).astype(np.uint8), connectivity=8)
            components[int(c)] = stats[1:, cv2.CC_STAT_AREA].astype(int).tolist()
    return _PairResult(problems, counts, int(mask.size - labelled.size), components)


# --------------------------------------------------------------------------------------------
# one split
# --------------------------------------------------------------------------------------------
def _visible_files(directory):
    return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))


def list_split(split_dir, pattern=r"^(.*)$", replacement=r"\1"):
    """``([(image, mask)], num_images, [Problem])`` from the folder listing alone."""
    split_dir = Path(split_dir)
    image_dir, mask_dir = split_dir / "images", split_dir / "masks"
    problems = []
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            problems.append(Problem("missing_directory", str(d), "directory does not exist"))
    if not image_dir.is_dir():
        return [], 0, problems
    images = []
    for p in _visible_files(image_dir):
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(p)
        else:
            problems.append(Problem("ignored_file", str(p), "not read: extension not one of "
                                                           f"{', '.join(IMAGE_EXTENSIONS)}"))
    if not images:
        problems.append(Problem("empty_split", str(image_dir),
                                f"no image ({', '.join(IMAGE_EXTENSIONS)}) in the split"))
        return [], 0, problems
    masks = set()
    if mask_dir.is_dir():
        for p in _visible_files(mask_dir):
            if p.suffix == MASK_EXTENSION:
                masks.add(p)
            else:
                problems.append(Problem("ignored_file", str(p), f"not read: masks are {MASK_EXTENSION} files"))
    by_mask = defaultdict(list)
    for p in images:
        by_mask[mask_path_for(p, mask_dir, pattern, replacement)].append(p)
    pairs = []
    for mask, imgs in sorted(by_mask.items()):
        if len(imgs) > 1:
            names = ", ".join(str(p) for p in imgs)
            if len({p.stem for p in imgs}) == 1:
                problems.append(Problem("duplicate_stem", str(imgs[0]),
                                        f"{len(imgs)} image files share the stem {imgs[0].stem!r} "
                                        f"({names}); one mask {mask.name}: keep one"))
            else:
                problems.append(Problem("shared_mask", str(imgs[0]),
                                        f"images {names} all map to the mask {mask} under the "
                                        f"mask-name rule {pattern!r} -> {replacement!r}"))
        for img in imgs:
            if mask in masks:
                pairs.append((img, mask))
            else:
                problems.append(Problem("missing_mask", str(img), f"no mask (expected {mask})"))
    for mask in sorted(masks - set(by_mask)):
        problems.append(Problem("orphan_mask", str(mask), "mask without an image (no image maps "
                                                          f"to it under {pattern!r} -> {replacement!r})"))
    return pairs, len(images), problems


def _default_workers():
    return max(1, min(8, os.cpu_count() or 1))


def check_pairs(pairs, report, full_stats=False, workers=None, progress=True, check_one=None):
    """Decode every ``(image, mask)`` pair into ``report`` (problems and statistics); with
    ``check_one(item, num_classes, full_stats)``, items of another kind (COCO records)."""
    workers = workers or _default_workers()
    k = len(report.class_names)
    if full_stats:
        report.component_sizes = {c: [] for c in range(k)}
    foreground = [c for c in FOREGROUND_CLASSES if c < k]

    def one(pair):
        if check_one is not None:
            return check_one(pair, k, full_stats)
        return check_pair(pair[0], pair[1], k, full_stats)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(one, pairs)
        for r in tqdm(results, total=len(pairs), desc=f"check {report.name}", unit="img",
                      leave=False, disable=not progress):
            report.problems.extend(r.problems)
            if r.counts is None:
                continue
            report.masks_decoded += 1
            report.pixel_counts += r.counts
            report.ignore_pixels += r.ignore
            report.images_with_class += (r.counts > 0)
            if not r.counts[foreground].any():
                report.images_without_foreground += 1
            if full_stats:
                for c, sizes in r.components.items():
                    report.component_sizes[c].extend(sizes)
    report.num_pairs += len(pairs)


def _absent_class_warnings(report):
    if not report.masks_decoded:
        return
    for c, name in enumerate(report.class_names):
        if report.images_with_class[c] == 0:
            report.problems.append(Problem(
                "absent_class", report.split_dir,
                f"class {c} ({name}) is in none of the {report.masks_decoded} masks"))


def check_split(split_dir, pattern=r"^(.*)$", replacement=r"\1", *, name=None, full_stats=False,
                workers=None, progress=True, class_names=CLASS_NAMES):
    """Check a split directory (``images/`` + ``masks/``): a :class:`SplitReport`.

    Lists both folders, pairs the files with the mask-name rule (``pattern``/``replacement``:
    ``ROOFTOP.MASK_STEM_PATTERN``/``REPLACEMENT``), then decodes every image fully (a truncated
    file fails here, not at iteration 30 000) and every mask, in parallel threads, and reports
    *all* problems at once."""
    start = time.perf_counter()
    report = SplitReport(name or Path(split_dir).name, str(split_dir), list(class_names))
    if not Path(split_dir).is_dir():
        report.problems.append(Problem("missing_directory", str(split_dir), "split directory does not exist"))
        return report
    pairs, report.num_images, report.problems = list_split(split_dir, pattern, replacement)
    check_pairs(pairs, report, full_stats, workers, progress)
    _absent_class_warnings(report)
    report.seconds = time.perf_counter() - start
    return report


def check_coco_record(record, num_classes=len(CLASS_NAMES), full_stats=False):
    """Check one image of a COCO split (a :func:`~.coco.parse_coco` record): decode the image,
    compare its size with the JSON's, rasterise its objects for the statistics."""
    from .coco import rasterize_record

    problems = []
    if os.path.isfile(record["file_name"]):  # a missing file is reported by parse_coco
        size, problems = inspect_image(record["file_name"])
        declared = (record["height"], record["width"])
        if size is not None and size != declared:
            problems.append(Problem(
                "size_mismatch", record["file_name"],
                f"image is {size[1]}x{size[0]} (WxH) but {record['sem_seg_coco']['json']} says "
                f"{declared[1]}x{declared[0]}"))
    mask = rasterize_record(record)
    return _mask_stats(mask, f"{record['sem_seg_coco']['json']} (annotations of "
                             f"{record['file_name']})", problems, num_classes, full_stats)


def check_coco(json_path, image_root, *, name=None, crowd="ignore", extra_names=None,
               full_stats=False, workers=None, progress=True, class_names=CLASS_NAMES):
    """Check a COCO-format split (a JSON and its image folder): a :class:`SplitReport` with
    every problem of the JSON (:class:`Problem`) and of its images, and the class statistics of the
    rasterised masks."""
    from .coco import parse_coco, read_coco_json

    start = time.perf_counter()
    report = SplitReport(name or Path(json_path).stem, str(json_path), list(class_names))
    try:
        data = read_coco_json(json_path)
    except DatasetError as e:
        report.problems.append(Problem("bad_json", str(json_path), str(e).split(": ", 1)[-1]))
        return report
    records, found = parse_coco(json_path, image_root, crowd, extra_names, data=data)
    report.problems.extend(Problem(kind, where, message) for kind, where, message in found)
    report.num_images = len(records)
    if not records:
        report.problems.append(Problem("empty_split", str(json_path), "no image in 'images'"))
    listed = {os.path.abspath(r["file_name"]) for r in records}
    if Path(image_root).is_dir():
        for p in _visible_files(Path(image_root)):
            if p.suffix.lower() in IMAGE_EXTENSIONS and os.path.abspath(p) not in listed:
                report.problems.append(Problem("unlisted_image", str(p), f"not in {json_path}: "
                                                                         "not used"))
    check_pairs(records, report, full_stats, workers, progress, check_one=check_coco_record)
    _absent_class_warnings(report)
    report.seconds = time.perf_counter() - start
    return report


def check_dataset_dicts(dataset_dicts, name="dataset", *, full_stats=False, workers=None,
                        progress=True, class_names=CLASS_NAMES):
    """Check the ``(file_name, sem_seg_file_name)`` pairs of dataset dicts (no folder listing:
    for datasets registered without a split directory)."""
    start = time.perf_counter()
    report = SplitReport(name, "", list(class_names))
    pairs = [(d["file_name"], d["sem_seg_file_name"]) for d in dataset_dicts]
    report.num_images = len(pairs)
    check_pairs(pairs, report, full_stats, workers, progress)
    _absent_class_warnings(report)
    report.seconds = time.perf_counter() - start
    return report


def find_problems(dataset_dicts):
    """``"file: problem"`` strings for the errors of dataset dicts (kept for callers of the
    first version of this module)."""
    return [str(p) for p in check_dataset_dicts(dataset_dicts, progress=False).errors]


# --------------------------------------------------------------------------------------------
# several splits: report, chart, text
# --------------------------------------------------------------------------------------------
def check_root(root, splits=SPLITS, pattern=r"^(.*)$", replacement=r"\1", *, full_stats=False,
               workers=None, progress=True, required=True):
    """Check ``<root>/<split>`` for each split. With ``required=False`` a split directory that
    does not exist is skipped with a log line (``--split all`` on a dataset without test)."""
    reports = []
    for split in splits:
        split_dir = os.path.join(root, split)
        if not required and not os.path.isdir(split_dir):
            logger.warning("%s does not exist: split %s not checked", split_dir, split)
            continue
        reports.append(check_split(split_dir, pattern, replacement, name=split,
                                   full_stats=full_stats, workers=workers, progress=progress))
    if not reports:
        report = SplitReport("all", str(root), list(CLASS_NAMES))
        report.problems.append(Problem("missing_directory", str(root),
                                       f"none of the splits {', '.join(splits)} exists"))
        reports.append(report)
    return reports


def build_report(reports, full_stats=False):
    """The JSON-able report over several :class:`SplitReport` objects."""
    basis = next((r for r in reports if r.name in ("train", "capetown_sem_seg_train")), reports[0])
    weights = basis.suggested_class_weights()
    return {
        "usable": all(r.usable for r in reports),
        "num_errors": sum(len(r.errors) for r in reports),
        "num_warnings": sum(len(r.warnings) for r in reports),
        "class_names": list(reports[0].class_names),
        "full_stats": bool(full_stats),
        "splits": {r.name: r.to_dict() for r in reports},
        "suggested_class_weights": None if weights is None else {
            "formula": WEIGHT_FORMULA, "based_on": basis.name, "weights": weights,
            "config": ("ROOFTOP.LOSS.PER_CLASS_WEIGHTS ["
                       + ", ".join(f"{w:g}" for w in weights) + "]"),
        },
    }


def write_report(report, output_dir):
    path = os.path.join(output_dir, REPORT_FILE)
    write_text_atomic(path, json.dumps(report, indent=2, allow_nan=False) + "\n")
    return path


def plot_class_shares(reports, path):
    """Horizontal bar chart of the class pixel shares per split (log scale), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = reports[0].class_names
    usable = [r for r in reports if r.masks_decoded]
    fig, ax = plt.subplots(figsize=(7, 1.0 + 0.5 * len(names) * max(1, len(usable))), dpi=100)
    height = 0.8 / max(1, len(usable))
    for i, r in enumerate(usable):
        shares = np.nan_to_num(r.pixel_shares()) * 100
        ys = np.arange(len(names)) + i * height
        bars = ax.barh(ys, np.maximum(shares, 1e-4), height=height, label=r.name,
                       color=[np.array(PALETTE[c % len(PALETTE)]) / 255 * 0.7 + 0.15 for c in range(len(names))],
                       edgecolor="black", alpha=1.0 - 0.25 * i)
        for bar, s in zip(bars, shares):
            ax.text(bar.get_width() * 1.1, bar.get_y() + bar.get_height() / 2, f"{r.name} {s:.3g}%",
                    va="center", fontsize=7)
    ax.set_yticks(np.arange(len(names)) + 0.4 - height / 2)
    ax.set_yticklabels(names)
    ax.set_xscale("log")
    ax.set_xlabel("share of labelled pixels (%, log scale)")
    ax.set_title("Class pixel shares")
    ax.invert_yaxis()
    positive = [s for r in usable for s in np.nan_to_num(r.pixel_shares()) * 100 if s > 0]
    ax.set_xlim(left=min(positive) / 3 if positive else 1e-4, right=300.0)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


def format_report(reports, report):
    """Human-readable summary: every problem (errors first), statistics, suggested weights."""
    lines = []
    for r in reports:
        lines.append(f"== {r.name} ({r.split_dir}): {r.num_images} images, {r.masks_decoded} masks "
                     f"decoded, {len(r.errors)} error(s), {len(r.warnings)} warning(s) "
                     f"-> {'usable' if r.usable else 'UNUSABLE'} ({r.seconds:.1f} s)")
        for p in r.errors:
            lines.append(f"  ERROR   [{p.kind}] {p}")
        for p in r.warnings:
            lines.append(f"  warning [{p.kind}] {p}")
        if r.masks_decoded:
            shares, fractions = r.pixel_shares(), r.image_fractions()
            lines.append(f"  {'class':<20} {'pixel share':>11} {'images':>8}"
                         + ("   components: count median p90 max" if r.component_sizes is not None else ""))
            for c, name in enumerate(r.class_names):
                row = f"  {name:<20} {shares[c] * 100:>10.3f}% {int(r.images_with_class[c]):>4} ({fractions[c]:>4.0%})"
                if r.component_sizes is not None:
                    s = component_summary(r.component_sizes.get(c, []))
                    if s["count"]:
                        row += f"   {s['count']:>5} {s['median']:>6.0f} {s['p90']:>5.0f} {s['max']:>5}"
                lines.append(row)
            lines.append(f"  images without foreground: {r.images_without_foreground}; ignore pixels: "
                         f"{r.ignore_pixels}")
    w = report["suggested_class_weights"]
    if w:
        lines.append(f"Suggested class weights (from {w['based_on']}; {w['formula']}):")
        lines.append(f"  {w['config']}")
    lines.append(f"Dataset {'usable' if report['usable'] else 'UNUSABLE'}: {report['num_errors']} "
                 f"error(s), {report['num_warnings']} warning(s)")
    return "\n".join(lines)


def run_check(root, splits, pattern=r"^(.*)$", replacement=r"\1", *, output_dir=None,
              full_stats=False, workers=None, required=True):
    """Check, then write the JSON report and the chart into ``output_dir`` (if given).
    Returns ``(reports, report dict, {"report": path, "chart": path})``."""
    reports = check_root(root, splits, pattern, replacement, full_stats=full_stats,
                         workers=workers, required=required)
    return finish_check(reports, output_dir, full_stats)


def finish_check(reports, output_dir=None, full_stats=False):
    """The report of :class:`SplitReport` objects, with the JSON report and the chart written
    into ``output_dir`` (if given): ``(reports, report dict, {"report": path, "chart": path})``."""
    report = build_report(reports, full_stats)
    files = {}
    if output_dir:
        if any(r.masks_decoded for r in reports):
            files["chart"] = plot_class_shares(reports, os.path.join(output_dir, CHART_FILE))
            report["chart"] = files["chart"]
        files["report"] = write_report(report, output_dir)
    return reports, report, files


# --------------------------------------------------------------------------------------------
# before training
# --------------------------------------------------------------------------------------------
def check_datasets(names, full_stats=False):
    """Check each registered split; log every warning and the class statistics; raise one
    :class:`DatasetError` listing every error. Returns the :class:`SplitReport` list."""
    reports = []
    for name in names:
        meta = MetadataCatalog.get(name)
        split_dir = meta.get("split_dir", None)
        if meta.get("coco_json", None) is not None:
            report = check_coco(meta.coco_json, meta.image_root, name=name,
                                crowd=meta.get("coco_crowd", "ignore"),
                                extra_names=meta.get("coco_extra_names", None),
                                full_stats=full_stats,
                                class_names=meta.get("stuff_classes", CLASS_NAMES))
        elif split_dir is not None:
            report = check_split(split_dir, meta.get("mask_stem_pattern"), meta.get("mask_stem_replacement"),
                                 name=name, full_stats=full_stats,
                                 class_names=meta.get("stuff_classes", CLASS_NAMES))
        else:
            logger.info("%s has no split_dir metadata: checking its dataset dicts", name)
            try:
                dicts = DatasetCatalog.get(name)
            except DatasetError as e:
                report = SplitReport(name, "", list(CLASS_NAMES))
                report.problems.append(Problem("dataset_load", name, f"the dataset's loader failed: {e}"))
            else:
                report = check_dataset_dicts(dicts, name, full_stats=full_stats,
                                             class_names=meta.get("stuff_classes", CLASS_NAMES))
        for p in report.warnings:
            logger.warning("[%s] %s", p.kind, p)
        if report.masks_decoded:
            logger.info("Checked %s: %d images in %.1f s; pixel shares %s; images per class %s",
                        name, report.num_images, report.seconds,
                        ", ".join(f"{n} {s:.3%}" for n, s in zip(report.class_names, report.pixel_shares())),
                        ", ".join(f"{n} {int(k)}" for n, k in zip(report.class_names, report.images_with_class)))
        reports.append(report)
    errors = [p for r in reports for p in r.errors]
    if errors:
        raise DatasetError(f"{len(errors)} dataset problem(s):\n  " + "\n  ".join(f"[{p.kind}] {p}" for p in errors))
    basis = next((r for r in reports if r.name in names[:1]), None)
    if basis is not None and basis.suggested_class_weights():
        logger.info("Suggested class weights from %s: ROOFTOP.LOSS.PER_CLASS_WEIGHTS %s (%s)",
                    basis.name, basis.suggested_class_weights(), WEIGHT_FORMULA)
    return reports
