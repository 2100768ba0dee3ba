"""Oversampling of images that contain rare classes (``ROOFTOP.REPEAT_THRESHOLD``).

detectron2's ``RepeatFactorTrainingSampler`` (LVIS, Gupta et al. 2019) repeats each image
``r`` times per epoch, with the fractional part of ``r`` drawn at random each epoch. Its own
repeat factors come from instance annotations; here they come from the semantic masks:

* ``f(c)``: the fraction of training images whose mask has at least one pixel of class ``c``;
* ``r(c) = max(1, sqrt(t / f(c)))`` for the threshold ``t`` (classes in no image are skipped);
* an image's factor is the largest ``r(c)`` over the classes present in it (1 if none).

Which classes each image holds is read from the masks once, at start-up, on the main process
(other processes receive it), and cached in ``<OUTPUT_DIR>/class_presence_cache.json`` keyed by
mask path, size and modification time, so a resumed run reads only changed masks.
"""
import json
import logging
import os
import time

import numpy as np
import torch
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.utils import comm

from ..fileio import write_text_atomic
from .capetown import CLASS_NAMES, IGNORE_LABEL, read_mask, read_sem_seg

logger = logging.getLogger(__name__)

CACHE_FILE = "class_presence_cache.json"
_CACHE_VERSION = 1


def classes_in_mask(mask, num_classes=len(CLASS_NAMES)):
    """Sorted class indices with at least one pixel in ``mask`` (the ignore label is not a class)."""
    counts = np.bincount(mask[mask != IGNORE_LABEL].ravel(), minlength=num_classes)
    return [int(c) for c in np.flatnonzero(counts[:num_classes])]


def _load_cache(path, num_classes):
    if not path or not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        logger.warning("Ignoring unreadable class-presence cache %s (%s): reading every mask", path, e)
        return {}
    if data.get("version") != _CACHE_VERSION or data.get("num_classes") != num_classes:
        return {}
    return data.get("masks", {})


def image_class_presence(dataset_dicts, num_classes=len(CLASS_NAMES), cache_file=None):
    """``(N, num_classes)`` bool array: does image ``i``'s mask contain class ``c``.

    With ``cache_file``, masks whose size and modification time match the cache are not read
    again, and the cache is rewritten (atomically) when anything changed.
    """
    start = time.perf_counter()
    cache = _load_cache(cache_file, num_classes)
    presence = np.zeros((len(dataset_dicts), num_classes), dtype=bool)
    new_cache, read = {}, 0
    for i, d in enumerate(dataset_dicts):
        if "sem_seg_coco" in d:  # COCO objects: rasterised again (fast), not cached
            presence[i, classes_in_mask(read_sem_seg(d), num_classes)] = True
            read += 1
            continue
        path = d["sem_seg_file_name"]
        st = os.stat(path)
        entry = cache.get(path)
        if not entry or entry["size"] != st.st_size or entry["mtime_ns"] != st.st_mtime_ns:
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                     "classes": classes_in_mask(read_mask(path), num_classes)}
            read += 1
        new_cache[path] = entry
        presence[i, entry["classes"]] = True
    if cache_file and (read or set(new_cache) != set(cache)):
        write_text_atomic(cache_file, json.dumps(
            {"version": _CACHE_VERSION, "num_classes": num_classes, "masks": new_cache}) + "\n")
    logger.info("Class presence of %d training images: %d masks read, %d from the cache, %.2f s",
                len(dataset_dicts), read, len(dataset_dicts) - read, time.perf_counter() - start)
    return presence


def repeat_factors_from_presence(presence, threshold):
    """Per-image repeat factors (float array) and per-class ``(f(c), r(c))`` (see module doc).

    ``r(c)`` is NaN for a class in no image."""
    if threshold <= 0:
        raise ValueError(f"repeat threshold must be > 0, got {threshold}")
    presence = np.asarray(presence, dtype=bool)
    if presence.ndim != 2 or presence.shape[0] == 0:
        raise ValueError(f"presence must be a non-empty (images, classes) array, got {presence.shape}")
    freq = presence.mean(axis=0)
    class_r = np.full(freq.shape, np.nan)
    seen = freq > 0
    class_r[seen] = np.maximum(1.0, np.sqrt(threshold / freq[seen]))
    image_r = np.where(presence, np.nan_to_num(class_r, nan=1.0), 1.0).max(axis=1)
    return image_r, freq, class_r


def build_repeat_factor_sampler(cfg, dataset_dicts, class_names=CLASS_NAMES):
    """detectron2's ``RepeatFactorTrainingSampler`` with semantic repeat factors; logs them."""
    cache = os.path.join(cfg.OUTPUT_DIR, CACHE_FILE) if cfg.OUTPUT_DIR else None
    presence = None
    if comm.is_main_process():
        presence = image_class_presence(dataset_dicts, len(class_names), cache)
    if comm.get_world_size() > 1:
        presence = comm.all_gather(presence)[0]
    image_r, freq, class_r = repeat_factors_from_presence(presence, cfg.ROOFTOP.REPEAT_THRESHOLD)
    logger.info(
        "ROOFTOP.REPEAT_THRESHOLD=%g: %s; %d of %d images repeated, an epoch is %.1f images",
        cfg.ROOFTOP.REPEAT_THRESHOLD,
        ", ".join(f"{n} in {f:.1%} of images r={r:.2f}" for n, f, r in zip(class_names, freq, class_r)),
        int((image_r > 1).sum()), len(image_r), float(image_r.sum()),
    )
    seed = cfg.SEED if cfg.SEED >= 0 else None
    return RepeatFactorTrainingSampler(torch.tensor(image_r, dtype=torch.float32), seed=seed)
