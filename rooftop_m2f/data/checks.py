"""The dataset check: every problem of registered splits in one pass, class statistics and
suggested class weights (:func:`check_datasets`; ``tools/check_dataset.py`` is its command
line, training runs it first with ``ROOFTOP.CHECK_DATASET``). Each problem kind and its
severity: datasets/README.md, "Problems"."""
import json
import logging
import math
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from tqdm import tqdm

from ..fileio import atomic_path, write_text_atomic
from .capetown import (CLASS_NAMES, FOREGROUND_CLASSES, IGNORE_LABEL, IMAGE_EXTENSIONS, PALETTE,
                       DatasetError, pair_split, read_mask)

logger = logging.getLogger(__name__)

ERROR_KINDS = frozenset({
    "missing_directory", "empty_split", "unreadable_image", "truncated_image", "missing_mask",
    "duplicate_stem", "shared_mask", "unreadable_mask", "bad_mask_values", "bad_mask_colors",
    "size_mismatch", "dataset_load", "bad_json", "unknown_category", "missing_image",
    "unknown_image", "duplicate_image", "polygon_outside", "degenerate_polygon", "bad_segmentation",
})
WARNING_KINDS = frozenset({"image_mode", "image_bit_depth", "orphan_mask", "ignored_file",
                           "unlabelled_mask", "absent_class", "unlisted_image"})
REPORT_FILE = "dataset_check.json"
CHART_FILE = "class_shares.png"
WEIGHT_FORMULA = ("w(c) = f(c)^(-1/2) normalised to mean 1 over the classes present, f(c) = "
                  "fraction of the split's images whose mask contains class c")
SMALL_COMPONENT_PIXELS = 10


@dataclass
class Problem:
    """One problem: its ``kind`` (an error of :data:`ERROR_KINDS` makes the split unusable),
    the file it names and a message."""

    kind: str
    file: str
    message: str

    @property
    def severity(self):
        return "error" if self.kind in ERROR_KINDS else "warning"

    def __str__(self):
        return f"{self.file}: {self.message}"

    def to_dict(self):
        return {"severity": self.severity, "kind": self.kind, "file": self.file, "message": self.message}


@dataclass
class SplitReport:
    """One split: its problems; per class the labelled pixels and the images containing it;
    with ``full_stats`` the connected-component sizes (8-connectivity) per class."""

    name: str
    split_dir: str
    class_names: List[str]
    num_images: int = 0
    problems: List[Problem] = field(default_factory=list)
    pixel_counts: np.ndarray = None
    images_with_class: np.ndarray = None
    ignore_pixels: int = 0
    images_without_foreground: int = 0
    masks_decoded: int = 0
    component_sizes: Optional[Dict[int, List[int]]] = None
    seconds: float = 0.0

    def __post_init__(self):
        self.pixel_counts = np.zeros(len(self.class_names), np.int64)
        self.images_with_class = np.zeros(len(self.class_names), np.int64)

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
        n = self.masks_decoded
        return self.images_with_class / n if n else np.full(len(self.class_names), np.nan)

    def suggested_class_weights(self):
        """``ROOFTOP.LOSS.PER_CLASS_WEIGHTS``: ``w(c) = f(c)^(-1/2)`` (the classification loss
        sees one target per class present in an image), normalised to mean 1 over the classes
        present; 1.0 for an absent class; None without decoded masks."""
        present = self.images_with_class > 0
        if not self.masks_decoded or not present.any():
            return None
        raw = np.ones(len(self.class_names))
        raw[present] = (self.images_with_class[present] / self.masks_decoded) ** -0.5
        raw[present] /= raw[present].mean()
        return [round(float(w), 3) for w in raw]

    def to_dict(self):
        shares, fractions = self.pixel_shares(), self.image_fractions()
        classes = []
        for c, name in enumerate(self.class_names):
            entry = {"index": c, "name": name, "pixels": int(self.pixel_counts[c]),
                     "pixel_share": _num(shares[c]), "images": int(self.images_with_class[c]),
                     "image_fraction": _num(fractions[c])}
            if self.component_sizes is not None:
                entry["components"] = component_summary(self.component_sizes.get(c, []))
            classes.append(entry)
        return {"name": self.name, "split_dir": self.split_dir, "usable": self.usable,
                "num_images": self.num_images, "masks_decoded": self.masks_decoded,
                "num_errors": len(self.errors), "num_warnings": len(self.warnings),
                "errors": [p.to_dict() for p in self.errors],
                "warnings": [p.to_dict() for p in self.warnings],
                "ignore_pixels": int(self.ignore_pixels),
                "images_without_foreground": int(self.images_without_foreground),
                "classes": classes, "suggested_class_weights": self.suggested_class_weights(),
                "seconds": round(self.seconds, 3)}


def _num(x):
    return None if math.isnan(float(x)) else float(x)


def component_summary(sizes):
    """Count and size distribution (pixels) of connected components."""
    if not sizes:
        return {"count": 0}
    a = np.asarray(sizes)
    return {"count": int(a.size), "min": int(a.min()), "p10": float(np.percentile(a, 10)),
            "median": float(np.median(a)), "p90": float(np.percentile(a, 90)), "max": int(a.max()),
            "mean": float(a.mean()), f"below_{SMALL_COMPONENT_PIXELS}_pixels":
                int((a < SMALL_COMPONENT_PIXELS).sum()),
            "log2_histogram": np.bincount(np.floor(np.log2(a)).astype(int)).tolist()}


def _bit_depth(path, im):
    """Bits per channel where the header says more than PIL's mode does."""
    if im.format == "PNG":
        with open(path, "rb") as f:
            head = f.read(26)
        return struct.unpack(">B", head[24:25])[0] if head[12:16] == b"IHDR" else 8
    if im.format == "TIFF" and im.tag_v2.get(258):
        bits = im.tag_v2.get(258)
        return max(bits) if isinstance(bits, tuple) else int(bits)
    return 8


def inspect_image(path):
    """``((height, width) or None, [Problem])``: the whole image decoded, its mode and depth."""
    path = str(path)
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
    problems = []
    if mode.startswith("I;16"):
        problems.append(Problem("image_mode", path, "16-bit grayscale: scaled to 8 bits and "
                                                    "replicated to 3 channels"))
    elif mode != "RGB":
        problems.append(Problem("image_mode", path, f"not RGB ({mode}): converted to RGB "
                                                    "(alpha dropped, gray replicated)"))
    elif depth != 8:
        problems.append(Problem("image_bit_depth", path, f"{depth} bits per channel: read as 8 "
                                                         "bits (check the radiometry matches)"))
    return (height, width), problems


@dataclass
class _Result:
    problems: List[Problem]
    counts: Optional[np.ndarray] = None  # labelled pixels per class; None: no mask decoded
    ignore: int = 0
    components: Optional[Dict[int, List[int]]] = None


def _mask_stats(mask, name, problems, num_classes, full_stats):
    labelled = mask[mask != IGNORE_LABEL]
    counts = np.bincount(labelled.ravel(), minlength=num_classes)[:num_classes].astype(np.int64)
    if labelled.size == 0:
        problems.append(Problem("unlabelled_mask", name, f"every pixel is the ignore label {IGNORE_LABEL}"))
    components = None
    if full_stats:
        components = {int(c): cv2.connectedComponentsWithStats((mask == c).astype(np.uint8),
                                                               connectivity=8)[2][1:, cv2.CC_STAT_AREA].tolist()
                      for c in np.flatnonzero(counts)}
    return _Result(problems, counts, int(mask.size - labelled.size), components)


def _check_pair(pair, num_classes, full_stats):
    image_path, mask_path = map(str, pair)
    size, problems = inspect_image(image_path)
    try:
        mask = read_mask(mask_path)
    except DatasetError as e:  # a decoding failure chains the reader's exception
        text = str(e)[len(mask_path) + 2:] if str(e).startswith(mask_path + ": ") else str(e)
        kind = "unreadable_mask" if e.__cause__ is not None else \
            "bad_mask_colors" if "palette" in text else "bad_mask_values"
        return _Result(problems + [Problem(kind, mask_path, text)])
    except Exception as e:  # noqa: BLE001  e.g. PIL's DecompressionBombError
        return _Result(problems + [Problem("unreadable_mask", mask_path,
                                           f"cannot read mask ({type(e).__name__}: {e})")])
    if size is not None and mask.shape != size:
        problems.append(Problem("size_mismatch", mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} "
                                f"(WxH) but its image {image_path} is {size[1]}x{size[0]}"))
    return _mask_stats(mask, mask_path, problems, num_classes, full_stats)


def _check_coco_record(record, num_classes, full_stats):
    from .coco import rasterize_record

    problems, source = [], f"{record['sem_seg_coco']['json']} (annotations of {record['file_name']})"
    if os.path.isfile(record["file_name"]):  # a missing file is reported by parse_coco
        size, problems = inspect_image(record["file_name"])
        declared = (record["height"], record["width"])
        if size is not None and size != declared:
            problems.append(Problem("size_mismatch", record["file_name"],
                                    f"image is {size[1]}x{size[0]} (WxH) but {record['sem_seg_coco']['json']} "
                                    f"says {declared[1]}x{declared[0]}"))
    return _mask_stats(rasterize_record(record), source, problems, num_classes, full_stats)


def _items(name, meta, report):
    """The split's items to decode and the function that checks one; the listing's problems
    go into ``report``."""
    if meta.get("coco_json", None) is not None:
        from .coco import parse_coco, read_coco_json

        report.split_dir = meta.coco_json
        try:
            records, found = parse_coco(meta.coco_json, meta.image_root, meta.get("coco_crowd", "ignore"),
                                        meta.get("coco_extra_names", None), data=read_coco_json(meta.coco_json))
        except DatasetError as e:
            report.problems.append(Problem("bad_json", meta.coco_json, str(e).split(": ", 1)[-1]))
            return [], None
        report.problems += [Problem(*p) for p in found]
        if not records:
            report.problems.append(Problem("empty_split", meta.coco_json, "no image in 'images'"))
        listed = {os.path.abspath(r["file_name"]) for r in records}
        root = meta.image_root
        for f in sorted(os.listdir(root)) if os.path.isdir(root) else []:
            path = os.path.join(root, f)
            if (os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS and not f.startswith(".")
                    and os.path.isfile(path) and os.path.abspath(path) not in listed):
                report.problems.append(Problem("unlisted_image", path, f"not in {meta.coco_json}: not used"))
        return records, _check_coco_record
    if meta.get("split_dir", None) is not None:
        report.split_dir = meta.split_dir
        if not os.path.isdir(meta.split_dir):
            report.problems.append(Problem("missing_directory", meta.split_dir, "split directory does not exist"))
            return [], None
        pairs, report.num_images, found = pair_split(meta.split_dir, meta.get("mask_stem_pattern"),
                                                     meta.get("mask_stem_replacement"))
        report.problems += [Problem(*p) for p in found]
        return pairs, _check_pair
    try:  # a dataset registered without a folder: its dicts
        dicts = DatasetCatalog.get(name)
    except DatasetError as e:
        report.problems.append(Problem("dataset_load", name, f"the dataset's loader failed: {e}"))
        return [], None
    return [(d["file_name"], d["sem_seg_file_name"]) for d in dicts], _check_pair


def _check_split(name, full_stats, workers, progress):
    start = time.perf_counter()
    meta = MetadataCatalog.get(name)
    report = SplitReport(name, "", list(meta.get("stuff_classes", CLASS_NAMES)))
    items, check_one = _items(name, meta, report)
    report.num_images = report.num_images or len(items)
    k = len(report.class_names)
    report.component_sizes = {c: [] for c in range(k)} if full_stats else None
    foreground = [c for c in FOREGROUND_CLASSES if c < k]
    with ThreadPoolExecutor(max_workers=workers or max(1, min(8, os.cpu_count() or 1))) as pool:
        results = pool.map(lambda item: check_one(item, k, full_stats), items)
        for r in tqdm(results, total=len(items), desc=f"check {name}", unit="img", leave=False,
                      disable=not progress):
            report.problems += r.problems
            if r.counts is None:
                continue
            report.masks_decoded += 1
            report.pixel_counts += r.counts
            report.ignore_pixels += r.ignore
            report.images_with_class += r.counts > 0
            report.images_without_foreground += not r.counts[foreground].any()
            for c, sizes in (r.components or {}).items():
                report.component_sizes[c] += sizes
    if report.masks_decoded:
        report.problems += [Problem("absent_class", report.split_dir, f"class {c} ({n}) is in none "
                                    f"of the {report.masks_decoded} masks")
                            for c, n in enumerate(report.class_names) if not report.images_with_class[c]]
    report.seconds = time.perf_counter() - start
    return report


def check_datasets(names, *, full_stats=False, workers=None, progress=True, raise_errors=True):
    """Check the registered splits ``names`` (PNG folders, COCO files or any dataset dicts):
    list every file, decode every image and mask (in threads) and return a
    :class:`SplitReport` per split. Warnings and statistics are logged; with ``raise_errors``
    every error of every split is raised at once in one :class:`DatasetError`."""
    reports = [_check_split(name, full_stats, workers, progress) for name in dict.fromkeys(names)]
    for r in reports:
        for p in r.warnings:
            logger.warning("[%s] %s", p.kind, p)
        if r.masks_decoded:
            logger.info("Checked %s: %d images in %.1f s; pixel shares %s; images per class %s", r.name,
                        r.num_images, r.seconds,
                        ", ".join(f"{n} {s:.3%}" for n, s in zip(r.class_names, r.pixel_shares())),
                        ", ".join(f"{n} {int(k)}" for n, k in zip(r.class_names, r.images_with_class)))
    errors = [p for r in reports for p in r.errors]
    if errors and raise_errors:
        raise DatasetError(f"{len(errors)} dataset problem(s):\n  "
                           + "\n  ".join(f"[{p.kind}] {p}" for p in errors))
    return reports


def build_report(reports, full_stats=False):
    """The JSON-able report of :func:`check_datasets`' reports; the weights from the training
    split (the first whose name ends in ``train``, else the first)."""
    basis = next((r for r in reports if r.name.endswith("train")), reports[0])
    weights = basis.suggested_class_weights()
    return {
        "usable": all(r.usable for r in reports),
        "num_errors": sum(len(r.errors) for r in reports),
        "num_warnings": sum(len(r.warnings) for r in reports),
        "class_names": list(reports[0].class_names), "full_stats": bool(full_stats),
        "splits": {r.name: r.to_dict() for r in reports},
        "suggested_class_weights": None if weights is None else {
            "formula": WEIGHT_FORMULA, "based_on": basis.name, "weights": weights,
            "config": "ROOFTOP.LOSS.PER_CLASS_WEIGHTS [" + ", ".join(f"{w:g}" for w in weights) + "]"},
    }


def write_report(reports, report, output_dir):
    """``dataset_check.json`` and, when masks were decoded, the ``class_shares.png`` chart of
    the pixel shares per split (log scale); returns ``{"report": path, "chart": path}``."""
    files = {}
    usable = [r for r in reports if r.masks_decoded]
    if usable:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = reports[0].class_names
        fig, ax = plt.subplots(figsize=(7, 1.0 + 0.5 * len(names) * len(usable)), dpi=100)
        height = 0.8 / len(usable)
        for i, r in enumerate(usable):
            shares = np.nan_to_num(r.pixel_shares()) * 100
            bars = ax.barh(np.arange(len(names)) + i * height, np.maximum(shares, 1e-4), height=height,
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
        files["chart"] = report["chart"] = os.path.join(output_dir, CHART_FILE)
        with atomic_path(files["chart"]) as tmp:
            fig.savefig(tmp)
        plt.close(fig)
    files["report"] = os.path.join(output_dir, REPORT_FILE)
    write_text_atomic(files["report"], json.dumps(report, indent=2, allow_nan=False) + "\n")
    return files


def format_report(reports, report):
    """Human-readable summary: every problem (errors first), statistics, suggested weights."""
    lines = []
    for r in reports:
        lines.append(f"== {r.name} ({r.split_dir}): {r.num_images} images, {r.masks_decoded} masks "
                     f"decoded, {len(r.errors)} error(s), {len(r.warnings)} warning(s) -> "
                     f"{'usable' if r.usable else 'UNUSABLE'} ({r.seconds:.1f} s)")
        lines += [f"  ERROR   [{p.kind}] {p}" for p in r.errors]
        lines += [f"  warning [{p.kind}] {p}" for p in r.warnings]
        if not r.masks_decoded:
            continue
        shares, fractions = r.pixel_shares(), r.image_fractions()
        lines.append(f"  {'class':<20} {'pixel share':>11} {'images':>8}"
                     + ("   components: count median p90 max" if r.component_sizes is not None else ""))
        for c, name in enumerate(r.class_names):
            row = f"  {name:<20} {shares[c] * 100:>10.3f}% {int(r.images_with_class[c]):>4} ({fractions[c]:>4.0%})"
            s = component_summary(r.component_sizes.get(c, [])) if r.component_sizes is not None else {}
            if s.get("count"):
                row += f"   {s['count']:>5} {s['median']:>6.0f} {s['p90']:>5.0f} {s['max']:>5}"
            lines.append(row)
        lines.append(f"  images without foreground: {r.images_without_foreground}; ignore pixels: "
                     f"{r.ignore_pixels}")
    w = report["suggested_class_weights"]
    if w:
        lines += [f"Suggested class weights (from {w['based_on']}; {w['formula']}):", f"  {w['config']}"]
    lines.append(f"Dataset {'usable' if report['usable'] else 'UNUSABLE'}: {report['num_errors']} "
                 f"error(s), {report['num_warnings']} warning(s)")
    return "\n".join(lines)
