"""The Cape Town rooftop-solar dataset: classes, palette, mask decoding and registration.

Layout (the reference layout)::

    <root>/{train,val,test}/images/<stem>.<png|jpg|jpeg|tif|tiff>
    <root>/{train,val,test}/masks/<mask stem>.png

Masks are single-channel class-index PNGs (the indices of :data:`CLASS_NAMES`, 255 ignore). RGB
masks coloured with :data:`PALETTE` are decoded to the same indices. The classes and palette
are defined in :mod:`rooftop_m2f.classes` (light, for the tools' help). Registered names: ``capetown_sem_seg_{train,val,test}``.
"""
import logging
import os
import re
import struct
from pathlib import Path

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from ..classes import (  # noqa: F401  (a light module, no detectron2; re-exported here)
    CLASS_NAMES, FOREGROUND_CLASSES, IGNORE_COLOR, IGNORE_LABEL, PALETTE)
from ..images import (  # noqa: F401  (light, for prediction without detectron2; re-exported here)
    IMAGE_EXTENSIONS, DatasetError, bit_depth, png_significant_bits, read_image, to_uint8)

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DATASET_PREFIX = "capetown_sem_seg"


def default_root() -> str:
    return os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "capetown")


def decode_mask(array: np.ndarray, path: str = "<array>") -> np.ndarray:
    """Class-index mask (H, W) uint8 from a decoded mask image array.

    Accepts a 2-D array of class indices (any integer dtype) or an (H, W, 3/4) RGB(A) array
    coloured with :data:`PALETTE` (white is ignore). Raises :class:`DatasetError` naming
    ``path`` for values that are neither a class nor the ignore label, or unknown colours.
    """
    if array.ndim == 3:
        rgb = array[..., :3].astype(np.int64)
        codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        out = np.full(codes.shape, IGNORE_LABEL, dtype=np.uint8)
        known = np.zeros(codes.shape, dtype=bool)
        for index, color in list(enumerate(PALETTE)) + [(IGNORE_LABEL, IGNORE_COLOR)]:
            hit = codes == ((color[0] << 16) | (color[1] << 8) | color[2])
            out[hit] = index
            known |= hit
        if not known.all():
            bad = np.unique(codes[~known])[:5]
            colors = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in bad.tolist()]
            raise DatasetError(
                f"{path}: RGB mask has {int((~known).sum())} pixels with colours outside the "
                f"palette, e.g. {colors}; palette: {dict(zip(CLASS_NAMES, PALETTE))}, ignore {IGNORE_COLOR}"
            )
        return out
    if array.ndim != 2:
        raise DatasetError(f"{path}: mask must be 2-D (class indices) or RGB, got shape {array.shape}")
    values = np.unique(array)
    valid = np.isin(values, list(range(len(CLASS_NAMES))) + [IGNORE_LABEL])
    if not valid.all():
        raise DatasetError(
            f"{path}: mask values {values[~valid][:10].tolist()} are neither a class "
            f"(0..{len(CLASS_NAMES) - 1}) nor the ignore label {IGNORE_LABEL}"
        )
    return array.astype(np.uint8)


def read_mask(path: str) -> np.ndarray:
    """Read a mask file into an (H, W) uint8 class-index array (see :func:`decode_mask`)."""
    try:
        with Image.open(path) as im:
            if im.mode == "P":  # palette PNG: the indices are the classes
                array = np.array(im)
            elif im.mode in ("RGB", "RGBA"):
                array = np.array(im.convert("RGB"))
            else:  # L, I;16, I, ...
                array = np.array(im)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read mask ({e})") from e
    return decode_mask(array, path)


def read_sem_seg(dataset_dict) -> np.ndarray:
    """The (H, W) uint8 class-index mask of a dataset dict: its ``sem_seg_file_name`` (PNG
    layout) or its COCO objects rasterised (``sem_seg_coco``, :mod:`rooftop_m2f.data.coco`)."""
    if "sem_seg_coco" in dataset_dict:
        from .coco import rasterize_record

        return rasterize_record(dataset_dict)
    return read_mask(dataset_dict["sem_seg_file_name"])


def sem_seg_source(dataset_dict) -> str:
    """Where a dataset dict's mask comes from, for messages: the mask file or the COCO JSON."""
    if "sem_seg_coco" in dataset_dict:
        return f"{dataset_dict['sem_seg_coco']['json']} (annotations of {dataset_dict['file_name']})"
    return dataset_dict["sem_seg_file_name"]


def mask_path_for(image_path: Path, mask_dir: Path, pattern: str, replacement: str) -> Path:
    return mask_dir / (re.sub(pattern, replacement, image_path.stem) + ".png")


PAIRING_WARNINGS = ("ignored_file", "orphan_mask")  # the other pairing problems are errors


def pair_split(split_dir, pattern=r"^(.*)$", replacement=r"\1"):
    """The ``(image, mask)`` pairs of a split directory by the mask-name rule, from the folder
    listing alone: ``(pairs, number of images, problems)``, each problem ``(kind, path,
    message)`` (kinds: datasets/README.md, "Problems"; hidden files are skipped)."""
    split_dir = Path(split_dir)
    image_dir, mask_dir = split_dir / "images", split_dir / "masks"
    problems = [("missing_directory", str(d), "directory does not exist")
                for d in (image_dir, mask_dir) if not d.is_dir()]
    if not image_dir.is_dir():
        return [], 0, problems

    def visible(directory):
        return sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))

    images = []
    for p in visible(image_dir):
        if p.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(p)
        else:
            problems.append(("ignored_file", str(p), f"not read: extension not one of {', '.join(IMAGE_EXTENSIONS)}"))
    if not images:
        return [], 0, problems + [("empty_split", str(image_dir),
                                   f"no image ({', '.join(IMAGE_EXTENSIONS)}) in the split")]
    masks = set()
    for p in visible(mask_dir) if mask_dir.is_dir() else []:
        if p.suffix == ".png":
            masks.add(p)
        else:
            problems.append(("ignored_file", str(p), "not read: masks are .png files"))
    by_mask = {}
    for p in images:
        by_mask.setdefault(mask_path_for(p, mask_dir, pattern, replacement), []).append(p)
    rule = f"the mask-name rule {pattern!r} -> {replacement!r}"
    for mask, imgs in sorted(by_mask.items()):
        names = ", ".join(str(p) for p in imgs)
        if len(imgs) > 1 and len({p.stem for p in imgs}) == 1:
            problems.append(("duplicate_stem", str(imgs[0]), f"{len(imgs)} image files share the "
                             f"stem {imgs[0].stem!r} ({names}); one mask {mask.name}: keep one"))
        elif len(imgs) > 1:
            problems.append(("shared_mask", str(imgs[0]), f"images {names} all map to the mask "
                             f"{mask} under {rule}"))
    pairs = []
    for img in images:
        mask = mask_path_for(img, mask_dir, pattern, replacement)
        if mask in masks:
            pairs.append((img, mask))
        else:
            problems.append(("missing_mask", str(img), f"no mask (expected {mask})"))
    problems += [("orphan_mask", str(m), f"mask without an image (none maps to it under {rule})")
                 for m in sorted(masks - set(by_mask))]
    return pairs, len(images), problems


def load_split(split_dir, pattern=r"^(.*)$", replacement=r"\1"):
    """Dataset dicts for one split directory (``images/`` and ``masks/`` inside), paired by
    :func:`pair_split`; all its errors are reported in one :class:`DatasetError`."""
    pairs, _, found = pair_split(split_dir, pattern, replacement)
    problems = [f"{path}: {message}" for kind, path, message in found if kind not in PAIRING_WARNINGS]
    dicts = []
    for image_path, mask_path in pairs if not problems else []:
        try:
            with Image.open(image_path) as im:
                width, height = im.size
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            problems.append(f"{image_path}: cannot read image ({e})")
            continue
        dicts.append({
            "file_name": str(image_path),
            "sem_seg_file_name": str(mask_path),
            "height": height,
            "width": width,
            "image_id": image_path.stem,
        })
    if problems:
        raise DatasetError(f"{len(problems)} problem(s) in {split_dir}:\n  " + "\n  ".join(problems))
    return dicts


def register_capetown(root=None, pattern=r"^(.*)$", replacement=r"\1", prefix=DATASET_PREFIX):
    """Register ``<prefix>_{train,val,test}`` (replacing earlier registrations of the names)."""
    root = root or default_root()
    for split in SPLITS:
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        split_dir = os.path.join(root, split)
        DatasetCatalog.register(
            name, lambda d=split_dir: load_split(d, pattern, replacement)
        )
        MetadataCatalog.get(name).set(
            stuff_classes=list(CLASS_NAMES),
            stuff_colors=[list(c) for c in PALETTE],
            ignore_label=IGNORE_LABEL,
            evaluator_type="rooftop_sem_seg",
            image_root=os.path.join(split_dir, "images"),
            sem_seg_root=os.path.join(split_dir, "masks"),
            dataset_root=root,
            split_dir=split_dir,
            mask_stem_pattern=pattern,  # the mask-name rule, for rooftop_m2f.data.checks
            mask_stem_replacement=replacement,
        )


def register_from_cfg(cfg):
    """Register the splits from the config's ``ROOFTOP`` keys: the root and, with
    ``ROOFTOP.DATASET_FORMAT png``, the mask-name rule; with ``coco``, each split's COCO JSON and
    image folder (:func:`rooftop_m2f.data.coco.split_paths`)."""
    fmt = cfg.ROOFTOP.DATASET_FORMAT
    if fmt == "coco":
        from .coco import parse_extra_names, register_coco_semseg, split_paths

        root = cfg.ROOFTOP.DATASET_ROOT or default_root()
        extra = parse_extra_names(cfg.ROOFTOP.COCO.CATEGORY_NAMES)
        for split in SPLITS:
            json_file, image_root = split_paths(cfg, root, split)
            register_coco_semseg(f"{DATASET_PREFIX}_{split}", json_file, image_root,
                                 cfg.ROOFTOP.COCO.CROWD, extra, dataset_root=root)
        return
    if fmt != "png":
        raise DatasetError(f"ROOFTOP.DATASET_FORMAT must be 'png' or 'coco', got {fmt!r}")
    register_capetown(
        cfg.ROOFTOP.DATASET_ROOT or None,
        cfg.ROOFTOP.MASK_STEM_PATTERN,
        cfg.ROOFTOP.MASK_STEM_REPLACEMENT,
    )


register_capetown()
