"""COCO-format annotations (polygons, RLE) as semantic masks of the four rooftop classes: the
split layout, the category names (:data:`CATEGORY_NAMES`), reading and checking the JSON, and
rasterising the objects (:func:`rasterize`). The format and its rules, for users:
datasets/README.md, "The COCO layout".
"""
import json
import logging
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..fileio import OutsideRootError, confined_path
from .capetown import CLASS_NAMES, IGNORE_LABEL, PALETTE, DatasetError

logger = logging.getLogger(__name__)

DEFAULT_JSON = "annotations.json"
CROWD_MODES = ("ignore", "class")
# Tolerance for polygon vertices outside the image, pixels (annotation tools snap to the border).
OUTSIDE_TOLERANCE = 1.0

_SYNONYMS = {
    0: ("background", "bg"),
    1: ("solar panel", "solar pv", "pv", "pv panel", "pv module", "pv array", "photovoltaic",
        "photovoltaic panel", "photovoltaic module", "solar module", "solar pv panel"),
    2: ("solar water heater", "water heater", "swh", "solar geyser", "solar water heating",
        "solar thermal collector"),
    3: ("solar pool heater", "pool heater", "pool heating", "solar pool heating", "sph",
        "pool heater mat", "solar pool mat"),
    IGNORE_LABEL: ("ignore", "void", "unlabelled", "unlabeled", "dont care", "don't care"),
}
# normalised category name -> class index (255 = ignore)
CATEGORY_NAMES: Dict[str, int] = {name: c for c, names in _SYNONYMS.items() for name in names}


def normalize_name(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", str(name)).strip().lower()


def parse_extra_names(entries: Sequence[str]) -> Dict[str, int]:
    """``["roof: background", ...]`` (``ROOFTOP.COCO.CATEGORY_NAMES``) -> {normalised: class}."""
    out = {}
    for entry in entries:
        name, sep, cls = str(entry).rpartition(":")
        target = normalize_name(cls)
        index = next((i for i, n in enumerate(CLASS_NAMES) if normalize_name(n) == target), None)
        if target == "ignore":
            index = IGNORE_LABEL
        if not sep or not name.strip() or index is None:
            raise DatasetError(f"ROOFTOP.COCO.CATEGORY_NAMES entry {entry!r} must be 'category name: "
                             f"class' with class one of {', '.join(CLASS_NAMES)}, ignore")
        out[normalize_name(name)] = index
    return out


def class_for_category(name: str, extra: Optional[Dict[str, int]] = None) -> Optional[int]:
    """Class index (or 255) of a COCO category name, ``None`` when it maps to none."""
    table = dict(CATEGORY_NAMES, **(extra or {}))
    key = normalize_name(name)
    if key in table:
        return table[key]
    if key.endswith("s") and key[:-1] in table:
        return table[key[:-1]]
    return None


def _mask_utils():
    from pycocotools import mask as mask_utils

    return mask_utils


# --------------------------------------------------------------------------------------------
# one segmentation
# --------------------------------------------------------------------------------------------
def polygon_area(coords: Sequence[float]) -> float:
    xy = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def segmentation_problems(seg, height: int, width: int) -> List[Tuple[str, str]]:
    """``[(kind, message)]`` for one annotation's ``segmentation`` at the image's size.

    Kinds: ``degenerate_polygon`` (fewer than 3 points, an odd number of coordinates, zero
    area), ``polygon_outside`` (a vertex more than :data:`OUTSIDE_TOLERANCE` px outside the
    image), ``bad_segmentation`` (neither polygons nor RLE, or RLE of another size)."""
    problems = []
    if isinstance(seg, list):
        if not seg:
            return [("degenerate_polygon", "empty polygon list")]
        for i, poly in enumerate(seg):
            if not isinstance(poly, list) or not all(isinstance(v, (int, float)) for v in poly):
                problems.append(("bad_segmentation", f"polygon {i} is not a list of numbers"))
                continue
            if len(poly) % 2 or len(poly) < 6:
                problems.append(("degenerate_polygon", f"polygon {i} has {len(poly)} coordinates "
                                                       "(needs an even number, at least 3 points)"))
                continue
            if polygon_area(poly) <= 0:
                problems.append(("degenerate_polygon", f"polygon {i} has zero area"))
                continue
            xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
            t = OUTSIDE_TOLERANCE
            out = ((xy[:, 0] < -t) | (xy[:, 0] > width + t) | (xy[:, 1] < -t) | (xy[:, 1] > height + t))
            if out.any():
                x, y = xy[np.argmax(out)]
                problems.append(("polygon_outside", f"polygon {i} has {int(out.sum())} of {len(xy)} "
                                                    f"points outside the {width}x{height} image, e.g. "
                                                    f"({x:g}, {y:g})"))
        return problems
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = list(seg["size"])
        if size != [height, width]:
            return [("bad_segmentation", f"RLE size {size} (height, width) is not the image's "
                                         f"[{height}, {width}]")]
        counts = seg["counts"]
        if isinstance(counts, list):
            if sum(counts) != height * width or any(c < 0 for c in counts):
                return [("bad_segmentation", f"uncompressed RLE counts sum to {sum(counts)}, "
                                             f"not height x width = {height * width}")]
        elif not isinstance(counts, (str, bytes)):
            return [("bad_segmentation", "RLE counts must be a string or a list of integers")]
        else:
            runs = compressed_runs(counts)
            if runs is None or sum(runs) != height * width:
                total = "unreadable" if runs is None else f"sum to {sum(runs)}"
                return [("bad_segmentation", f"compressed RLE counts {total}, not height x width "
                                             f"= {height * width}")]
        return []
    return [("bad_segmentation", "segmentation is neither a list of polygons nor an RLE dict "
                                 "with 'size' and 'counts'")]


def compressed_runs(counts) -> Optional[List[int]]:
    """The run lengths of a compressed RLE string, or ``None`` when it is malformed. (pycocotools
    decodes a malformed or short string without complaint, into uninitialised memory, so the
    loader checks that the runs cover the image first.) Format: each run is a signed
    little-endian base-32 number, 5 bits per character (offset 48), bit 6 meaning "more
    characters follow"; from the third run on, the value is a difference to the run two back."""
    text = counts.decode() if isinstance(counts, bytes) else counts
    runs, pos = [], 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                return None
            char = ord(text[pos]) - 48
            if not 0 <= char < 64:
                return None
            value |= (char & 0x1F) << shift
            more = bool(char & 0x20)
            pos += 1
            shift += 5
            if not more and char & 0x10:  # sign bit of the last 5-bit group
                value -= 1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
    return runs


def to_rle(seg, height: int, width: int) -> dict:
    """Compressed RLE (``counts`` a str) of a valid segmentation (polygons or RLE)."""
    mu = _mask_utils()
    if isinstance(seg, list):
        rle = mu.merge(mu.frPyObjects([list(map(float, p)) for p in seg], height, width))
    elif isinstance(seg["counts"], list):
        rle = mu.frPyObjects(seg, height, width)
    else:
        counts = seg["counts"]
        rle = {"size": [height, width], "counts": counts.encode() if isinstance(counts, str) else counts}
    counts = rle["counts"]
    return {"size": [height, width], "counts": counts.decode() if isinstance(counts, bytes) else counts}


def decode_rle(rle: dict) -> np.ndarray:
    """(H, W) bool mask of a compressed RLE whose counts is a str."""
    mu = _mask_utils()
    return mu.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def rasterize(objects: Sequence[dict], height: int, width: int) -> np.ndarray:
    """(H, W) uint8 semantic mask: background, then each object's ``label`` over its ``rle``
    in the given order (:func:`paint_order`: larger first, so the smaller is on top).

    Dataset dicts keep the objects as compressed RLE strings in paint order (key
    ``sem_seg_coco``), so they are small, picklable (detectron2 serialises them once for all
    workers) and decoded per image by this function in the mapper, the sampler and the
    evaluator."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for obj in objects:
        mask[decode_rle(obj["rle"])] = obj["label"]
    return mask


def paint_order(objects: List[dict]) -> List[dict]:
    """Larger objects first (the smaller is on top); equal areas keep the file order."""
    return sorted(objects, key=lambda o: -o["area"])  # sorted() is stable


def rasterize_record(record: dict) -> np.ndarray:
    """The semantic mask of a dataset dict made by :func:`load_coco_json`."""
    info = record["sem_seg_coco"]
    return rasterize(info["objects"], record["height"], record["width"])


# --------------------------------------------------------------------------------------------
# one JSON file
# --------------------------------------------------------------------------------------------
def read_coco_json(json_path) -> dict:
    """The parsed JSON; :class:`DatasetError` naming the file when it is not a COCO file."""
    json_path = str(json_path)
    try:
        with open(json_path) as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise DatasetError(f"{json_path}: COCO annotation file does not exist") from e
    except (OSError, ValueError) as e:
        raise DatasetError(f"{json_path}: cannot read COCO JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("categories"), list):
        raise DatasetError(f"{json_path}: not a COCO file (needs 'images' and 'categories' lists)")
    if not isinstance(data.get("annotations", []), list):
        raise DatasetError(f"{json_path}: 'annotations' must be a list")
    return data


def parse_coco(json_path, image_root, crowd: str = "ignore", extra_names=None, data=None):
    """``(records, problems)`` of a COCO file: dataset dicts in the images' order and
    ``[(kind, where, message)]``, every problem of the file at once (see :mod:`.checks`).

    Records are made for the images even when there are problems; a record's objects leave out
    the annotations with problems."""
    if crowd not in CROWD_MODES:
        raise ValueError(f"crowd mode must be one of {CROWD_MODES}, got {crowd!r}")
    json_path, image_root = str(json_path), str(image_root)
    data = read_coco_json(json_path) if data is None else data
    problems = []
    categories = {}
    unknown = []
    for cat in data["categories"]:
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            problems.append(("bad_json", json_path, f"category {cat!r} needs 'id' and 'name'"))
            continue
        cls = class_for_category(cat["name"], extra_names)
        if cls is None:
            unknown.append(f"{cat['name']!r} (id {cat['id']})")
        else:
            categories[cat["id"]] = cls
    if unknown:
        problems.append(("unknown_category", json_path,
                         f"categories {', '.join(unknown)} map to none of the classes "
                         f"{', '.join(CLASS_NAMES)} (names and synonyms: rooftop_m2f/data/coco.py "
                         "CATEGORY_NAMES; add others with ROOFTOP.COCO.CATEGORY_NAMES)"))
    images, seen_files = {}, {}
    for img in data["images"]:
        if not isinstance(img, dict) or not {"id", "file_name", "height", "width"} <= set(img):
            problems.append(("bad_json", json_path, f"image entry {str(img)[:80]} needs 'id', "
                                                    "'file_name', 'height' and 'width'"))
            continue
        try:
            path = confined_path(image_root, str(img["file_name"]))
        except OutsideRootError as e:
            problems.append(("outside_root", json_path, f"image {img['id']}: file_name {e}"))
            continue
        if img["id"] in images:
            problems.append(("duplicate_image", json_path, f"image id {img['id']} is used twice"))
            continue
        if path in seen_files:
            problems.append(("duplicate_image", path, f"listed twice (image ids {seen_files[path]} "
                                                      f"and {img['id']})"))
            continue
        seen_files[path] = img["id"]
        if not os.path.isfile(path):
            problems.append(("missing_image", path, f"image {img['id']} of {json_path} does not exist"))
        images[img["id"]] = {"file_name": path, "height": int(img["height"]),
                             "width": int(img["width"]), "image_id": img["id"], "objects": []}
    for i, ann in enumerate(data.get("annotations", [])):
        where = f"{json_path} annotation {ann.get('id', f'#{i}') if isinstance(ann, dict) else f'#{i}'}"
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann \
                or "segmentation" not in ann:
            problems.append(("bad_json", where, "needs 'image_id', 'category_id' and 'segmentation'"))
            continue
        image = images.get(ann["image_id"])
        if image is None:
            problems.append(("unknown_image", where, f"its image_id {ann['image_id']} is not in "
                                                     "'images'"))
            continue
        where = f"{where} (image {image['file_name']})"
        if ann["category_id"] not in categories:
            known = any(isinstance(c, dict) and c.get("id") == ann["category_id"] for c in data["categories"])
            if not known:
                problems.append(("unknown_category", where, f"category_id {ann['category_id']} is "
                                                            "not in 'categories'"))
            continue  # a category that maps to no class is reported once, above
        seg_problems = segmentation_problems(ann["segmentation"], image["height"], image["width"])
        for kind, message in seg_problems:
            problems.append((kind, where, message))
        if seg_problems:
            continue
        rle = to_rle(ann["segmentation"], image["height"], image["width"])
        cls = categories[ann["category_id"]]
        crowd_obj = bool(ann.get("iscrowd", 0))
        label = IGNORE_LABEL if crowd_obj and crowd == "ignore" else cls
        area = int(_mask_utils().area({"size": rle["size"], "counts": rle["counts"].encode()}))
        image["objects"].append({"label": int(label), "rle": rle, "area": area,
                                 "iscrowd": crowd_obj, "id": ann.get("id", i)})
    records = []
    for image in images.values():
        records.append({
            "file_name": image["file_name"], "height": image["height"], "width": image["width"],
            "image_id": image["image_id"],
            "sem_seg_coco": {"json": json_path, "objects": paint_order(image["objects"])},
        })
    return records, problems


def load_coco_json(json_path, image_root, crowd: str = "ignore", extra_names=None):
    """Dataset dicts of a COCO file (datasets/README.md, "The COCO layout"). Any problem raises
    one :class:`DatasetError` naming the file, the count and the first problem;
    ``tools/check_dataset.py`` lists them all."""
    records, problems = parse_coco(json_path, image_root, crowd, extra_names)
    if problems:
        kind, where, message = problems[0]
        more = f" (and {len(problems) - 1} more; tools/check_dataset.py lists them all)" \
            if len(problems) > 1 else ""
        raise DatasetError(f"{where}: [{kind}] {message}{more}")
    if not records:
        raise DatasetError(f"{json_path}: empty split, no images")
    logger.info("Loaded %d images, %d objects from %s", len(records),
                sum(len(r["sem_seg_coco"]["objects"]) for r in records), json_path)
    return records


def image_ids_by_name(json_path) -> Dict[str, object]:
    """{file base name: image id} of a COCO file's images (``ROOFTOP.COCO.PREDICTION_IMAGE_IDS``:
    predictions written with the ids of a ground-truth file); two images with one base name
    are an error naming it."""
    data = read_coco_json(json_path)
    ids: Dict[str, object] = {}
    for img in data["images"]:
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            raise DatasetError(f"{json_path}: image entry {str(img)[:80]} needs 'id' and 'file_name'")
        name = os.path.basename(str(img["file_name"]))
        if name in ids:
            raise DatasetError(f"{json_path}: two images named {name} (ids {ids[name]} and "
                               f"{img['id']}): predictions cannot be matched by file name")
        ids[name] = img["id"]
    return ids


def register_coco_semseg(name, json_file, image_root, crowd="ignore", extra_names=None, **metadata):
    """Register a COCO-format split as a semantic-segmentation dataset ``name`` with the
    rooftop classes (replacing an earlier registration of the name); the counterpart of
    detectron2's ``register_coco_instances`` for this project."""
    if crowd not in CROWD_MODES:
        raise DatasetError(f"{name}: the crowd mode (ROOFTOP.COCO.CROWD) must be one of "
                           f"{', '.join(CROWD_MODES)}, got {crowd!r}")
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_coco_json(json_file, image_root, crowd, extra_names))
    MetadataCatalog.get(name).set(
        stuff_classes=list(CLASS_NAMES),
        stuff_colors=[list(c) for c in PALETTE],
        ignore_label=IGNORE_LABEL,
        evaluator_type="rooftop_sem_seg",
        image_root=str(image_root),
        coco_json=str(json_file),
        coco_crowd=crowd,
        coco_extra_names=dict(extra_names or {}),
        dataset_format="coco",
        **metadata,
    )


def split_paths(cfg, root, split):
    """``(json, image_root)`` of a split from ``ROOFTOP.COCO.<SPLIT>_JSON`` / ``_IMAGES``
    (empty: ``<root>/<split>/annotations.json`` and ``<root>/<split>/images``)."""
    key = split.upper()
    json_file = cfg.ROOFTOP.COCO.get(f"{key}_JSON") or os.path.join(root, split, DEFAULT_JSON)
    images = cfg.ROOFTOP.COCO.get(f"{key}_IMAGES") or os.path.join(root, split, "images")
    return json_file, images
