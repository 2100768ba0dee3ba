"""The dataset check, :func:`check_datasets`: every problem of registered splits in one pass,
class statistics and suggested class weights. ``tools/check_dataset.py`` is its command line
(:func:`build_report`, :func:`write_report`, :func:`format_report` present its result); training
runs it first (``ROOFTOP.CHECK_DATASET``). Each problem kind and its severity: datasets/README.md,
"Problems"."""
import json
import logging
import math
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from tqdm import tqdm

from ..fileio import atomic_path, write_text_atomic
from .capetown import (CLASS_NAMES, FOREGROUND_CLASSES, IGNORE_LABEL, IMAGE_EXTENSIONS, DatasetError,
                       pair_split, read_sem_seg, sem_seg_source)

logger = logging.getLogger(__name__)

# Every other kind is an error: the split is unusable.
WARNING_KINDS = frozenset({"image_mode", "image_bit_depth", "orphan_mask", "ignored_file",
                           "unlabelled_mask", "absent_class", "unlisted_image"})
REPORT_FILE, CHART_FILE = "dataset_check.json", "class_shares.png"
WEIGHT_FORMULA = ("w(c) = f(c)^(-1/2) normalised to mean 1 over the classes present, f(c) = "
                  "fraction of the split's images whose mask contains class c")
SMALL_COMPONENT_PIXELS = 10


class Problem(NamedTuple):
    """One problem: its ``kind``, the file it names and a message."""

    kind: str
    file: str
    message: str

    @property
    def severity(self):
        return "warning" if self.kind in WARNING_KINDS else "error"

    def __str__(self):
        return f"[{self.kind}] {self.file}: {self.message}"


@dataclass
class SplitReport:
    """One split: its problems; per class the labelled pixels and the images containing it;
    with ``full_stats`` the connected-component sizes (8-connectivity) per class."""

    name: str
    split_dir: str
    class_names: List[str]
    num_images: int = 0
    problems: List[Problem] = field(default_factory=list)
    ignore_pixels: int = 0
    images_without_foreground: int = 0
    masks_decoded: int = 0
    component_sizes: Optional[Dict[int, List[int]]] = None
    seconds: float = 0.0

    def __post_init__(self):
        self.pixel_counts = np.zeros(len(self.class_names), np.int64)
        self.images_with_class = np.zeros(len(self.class_names), np.int64)

    errors = property(lambda self: [p for p in self.problems if p.severity == "error"])
    warnings = property(lambda self: [p for p in self.problems if p.severity == "warning"])
    usable = property(lambda self: not self.errors)

    def pixel_shares(self):
        total = int(self.pixel_counts.sum())
        return self.pixel_counts / total if total else np.full(len(self.class_names), np.nan)

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
        shares, n = self.pixel_shares(), self.masks_decoded
        classes = [{"index": c, "name": name, "pixels": int(self.pixel_counts[c]),
                    "pixel_share": _number(shares[c]), "images": int(self.images_with_class[c]),
                    "image_fraction": _number(self.images_with_class[c] / n if n else math.nan),
                    **({"components": component_summary(self.component_sizes.get(c, []))}
                       if self.component_sizes is not None else {})}
                   for c, name in enumerate(self.class_names)]
        return {"name": self.name, "split_dir": self.split_dir, "usable": self.usable,
                "num_images": self.num_images, "masks_decoded": n,
                "num_errors": len(self.errors), "num_warnings": len(self.warnings),
                **{what: [{"severity": p.severity, **p._asdict()} for p in problems]
                   for what, problems in (("errors", self.errors), ("warnings", self.warnings))},
                "ignore_pixels": int(self.ignore_pixels),
                "images_without_foreground": int(self.images_without_foreground),
                "classes": classes, "suggested_class_weights": self.suggested_class_weights(),
                "seconds": round(self.seconds, 3)}


def _number(x):
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
    bits = im.tag_v2.get(258) if im.format == "TIFF" else None
    return (max(bits) if isinstance(bits, tuple) else int(bits)) if bits else 8


def inspect_image(path):
    """``((height, width) or None, [Problem])``: the whole image decoded, its mode and depth."""
    try:
        with Image.open(path) as im:
            (width, height), mode, depth = im.size, im.mode, _bit_depth(path, im)
            im.load()  # the whole pixel data: truncation shows here
    except Exception as e:  # noqa: BLE001  any failure to decode is this file's problem
        text = str(e) or type(e).__name__
        if "truncated" in text.lower():
            return None, [Problem("truncated_image", path, f"truncated image ({type(e).__name__}: {text})")]
        return None, [Problem("unreadable_image", path, f"cannot read image ({type(e).__name__}: {text})")]
    if mode.startswith("I;16"):
        return (height, width), [Problem("image_mode", path, "16-bit grayscale: scaled to 8 bits "
                                                             "and replicated to 3 channels")]
    if mode != "RGB":
        return (height, width), [Problem("image_mode", path, f"not RGB ({mode}): converted to RGB "
                                                             "(alpha dropped, gray replicated)")]
    if depth != 8:
        return (height, width), [Problem("image_bit_depth", path, f"{depth} bits per channel: read "
                                         "as 8 bits (check the radiometry matches)")]
    return (height, width), []


def _check_record(record, num_classes, full_stats):
    """``(problems, labelled pixels per class or None, ignore pixels, component sizes)`` of one
    dataset dict: its image decoded and inspected, its mask read (a file or COCO objects)."""
    image, source = record["file_name"], sem_seg_source(record)
    size, problems = inspect_image(image) if os.path.isfile(image) else (None, [])  # else: reported
    try:
        mask = read_sem_seg(record)
    except DatasetError as e:  # a decoding failure chains the reader's exception
        text = str(e)[len(source) + 2:] if str(e).startswith(source + ": ") else str(e)
        kind = "unreadable_mask" if e.__cause__ is not None else \
            "bad_mask_colors" if "palette" in text else "bad_mask_values"
        return problems + [Problem(kind, source, text)], None, 0, None
    except Exception as e:  # noqa: BLE001  e.g. PIL's DecompressionBombError
        return problems + [Problem("unreadable_mask", source, f"cannot read mask ({type(e).__name__}: {e})")], \
            None, 0, None
    if size is not None and mask.shape != size:
        problems.append(Problem("size_mismatch", source, f"mask is {mask.shape[1]}x{mask.shape[0]} "
                                f"(WxH) but its image {image} is {size[1]}x{size[0]}"))
    labelled = mask[mask != IGNORE_LABEL]
    counts = np.bincount(labelled.ravel(), minlength=num_classes)[:num_classes].astype(np.int64)
    if labelled.size == 0:
        problems.append(Problem("unlabelled_mask", source, f"every pixel is the ignore label {IGNORE_LABEL}"))
    components = {int(c): cv2.connectedComponentsWithStats((mask == c).astype(np.uint8), connectivity=8)
                  [2][1:, cv2.CC_STAT_AREA].tolist() for c in np.flatnonzero(counts)} if full_stats else None
    return problems, counts, int(mask.size - labelled.size), components


def _records(name, meta, report):
    """The split's dataset dicts to check; the problems of its listing go into ``report``."""
    if meta.get("coco_json", None) is not None:
        from .coco import parse_coco, read_coco_json

        report.split_dir, root = meta.coco_json, meta.image_root
        try:
            records, found = parse_coco(meta.coco_json, root, meta.get("coco_crowd", "ignore"),
                                        meta.get("coco_extra_names", None), data=read_coco_json(meta.coco_json))
        except DatasetError as e:
            report.problems.append(Problem("bad_json", meta.coco_json, str(e).split(": ", 1)[-1]))
            return []
        report.problems.extend(Problem(*p) for p in found)
        if not records:
            report.problems.append(Problem("empty_split", meta.coco_json, "no image in 'images'"))
        listed = {os.path.abspath(r["file_name"]) for r in records}
        report.problems.extend(
            Problem("unlisted_image", os.path.join(root, f), f"not in {meta.coco_json}: not used")
            for f in (sorted(os.listdir(root)) if os.path.isdir(root) else [])
            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS and not f.startswith(".")
            and os.path.isfile(os.path.join(root, f)) and os.path.abspath(os.path.join(root, f)) not in listed)
        return records
    if meta.get("split_dir", None) is not None:
        report.split_dir = meta.split_dir
        if not os.path.isdir(meta.split_dir):
            report.problems.append(Problem("missing_directory", meta.split_dir, "split directory does not exist"))
            return []
        pairs, report.num_images, found = pair_split(meta.split_dir, meta.get("mask_stem_pattern"),
                                                     meta.get("mask_stem_replacement"))
        report.problems.extend(Problem(*p) for p in found)
        return [{"file_name": str(image), "sem_seg_file_name": str(mask)} for image, mask in pairs]
    try:  # a dataset registered without a folder: its dicts
        return DatasetCatalog.get(name)
    except DatasetError as e:
        report.problems.append(Problem("dataset_load", name, f"the dataset's loader failed: {e}"))
        return []


def _check_split(name, full_stats, workers, progress):
    start = time.perf_counter()
    meta = MetadataCatalog.get(name)
    report = SplitReport(name, "", list(meta.get("stuff_classes", CLASS_NAMES)))
    records = _records(name, meta, report)
    report.num_images = report.num_images or len(records)
    k = len(report.class_names)
    report.component_sizes = {c: [] for c in range(k)} if full_stats else None
    foreground = [c for c in FOREGROUND_CLASSES if c < k]
    with ThreadPoolExecutor(max_workers=workers or max(1, min(8, os.cpu_count() or 1))) as pool:
        results = pool.map(lambda record: _check_record(record, k, full_stats), records)
        for problems, counts, ignore, components in tqdm(
                results, total=len(records), desc=f"check {name}", unit="img", leave=False,
                disable=not progress):
            report.problems += problems
            if counts is None:
                continue
            report.masks_decoded += 1
            report.pixel_counts += counts
            report.ignore_pixels += ignore
            report.images_with_class += counts > 0
            report.images_without_foreground += not counts[foreground].any()
            for c, sizes in (components or {}).items():
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
            logger.warning("%s", p)
        if r.masks_decoded:
            logger.info("Checked %s: %d images in %.1f s; pixel shares %s; images per class %s", r.name,
                        r.num_images, r.seconds,
                        ", ".join(f"{n} {s:.3%}" for n, s in zip(r.class_names, r.pixel_shares())),
                        ", ".join(f"{n} {int(k)}" for n, k in zip(r.class_names, r.images_with_class)))
    errors = [p for r in reports for p in r.errors]
    if errors and raise_errors:
        raise DatasetError(f"{len(errors)} dataset problem(s):\n  " + "\n  ".join(map(str, errors)))
    return reports


def build_report(reports, full_stats=False):
    """The JSON-able report of :func:`check_datasets`' reports; the weights from the training
    split (the first whose name ends in ``train``, else the first)."""
    basis = next((r for r in reports if r.name.endswith("train")), reports[0])
    weights = basis.suggested_class_weights()
    return {
        "usable": all(r.usable for r in reports), "num_errors": sum(len(r.errors) for r in reports),
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
    decoded = [r for r in reports if r.masks_decoded]
    if decoded:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names, y = reports[0].class_names, np.arange(len(reports[0].class_names))
        fig, ax = plt.subplots(figsize=(7, 1.0 + 0.5 * len(names) * len(decoded)), dpi=100)
        height = 0.8 / len(decoded)
        for i, r in enumerate(decoded):
            shares = np.nan_to_num(r.pixel_shares()) * 100
            bars = ax.barh(y + i * height, np.maximum(shares, 1e-4), height=height, label=r.name)
            ax.bar_label(bars, [f"{s:.3g}%" for s in shares], fontsize=7)
        ax.set_yticks(y + 0.4 - height / 2, names)
        ax.set(xscale="log", xlabel="share of labelled pixels (%, log scale)", title="Class pixel shares",
               xlim=(1e-4, 300.0))
        ax.invert_yaxis()
        ax.legend(fontsize=7)
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
        lines += [f"  ERROR   {p}" for p in r.errors] + [f"  warning {p}" for p in r.warnings]
        if not r.masks_decoded:
            continue
        lines.append(f"  {'class':<20} {'pixel share':>11} {'images':>8}"
                     + ("   components: count median p90 max" if r.component_sizes is not None else ""))
        for c, (name, share) in enumerate(zip(r.class_names, r.pixel_shares())):
            images = int(r.images_with_class[c])
            row = f"  {name:<20} {share * 100:>10.3f}% {images:>4} ({images / r.masks_decoded:>4.0%})"
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
