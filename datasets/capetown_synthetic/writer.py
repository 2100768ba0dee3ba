"""Writing the synthetic Cape Town dataset to disk: the split folders, file names, the
completeness marker and idempotence (:func:`make_synthetic_capetown`)::

    <root>/{train,val,test}/images/i_2023_RGB_8cm_SYN_<tile>_<row>_<col>.png   (RGB)
    <root>/{train,val,test}/masks/i_2023_RGB_8cm_SYN_<tile>_<row>_<col>.png    (mode "L")

Each image and mask is :func:`.scenes.render_image` of ``(seed, split, index)``. Imports only
numpy, OpenCV and light modules of the package (no torch, no detectron2).
"""
import hashlib
import json
import re
import time
from pathlib import Path

import cv2
import numpy as np

from rooftop_m2f.classes import CLASS_NAMES
from rooftop_m2f.fileio import atomic_path

from .scenes import SPLITS, render_image

MARKER_NAME = ".synthetic_complete.json"
GENERATOR_VERSION = 1
NAME_PREFIX = "i_2023_RGB_8cm_SYN_"
_SPLIT_NAME_CODE = {"train": "TR", "val": "VA", "test": "TE"}
_NAME_RE = re.compile(r"^" + re.escape(NAME_PREFIX) + r"[A-Z]{2}\d+_\d+_\d+\.png$")
# the temporary files an interrupted run leaves: fileio.atomic_path's (.tmp.png) and .partial ones
_LEFTOVER_RE = re.compile(r"^\.(" + re.escape(NAME_PREFIX) + r".*\.tmp\.png|.*\.partial)$")
# the code whose digest the marker records: a dataset made by other generator code is made again
_GENERATOR_FILES = ("scenes.py", "writer.py")


def image_name(split, index):
    """File name of image ``index`` of ``split`` (the mask has the same name)."""
    code = _SPLIT_NAME_CODE[split]
    return f"{NAME_PREFIX}{code}{index // 16:02d}_{(index % 16) // 4}_{index % 4}.png"


def _encode_png(array, rgb):
    ok, buf = cv2.imencode(".png", cv2.cvtColor(array, cv2.COLOR_RGB2BGR) if rgb else array,
                           [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:  # pragma: no cover
        raise OSError("PNG encoding failed")
    return buf.tobytes()


def _atomic_write(path, data):
    """Write the bytes ``data`` to ``path`` atomically (:func:`rooftop_m2f.fileio.atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def _generator_digest():
    """Digest of the generator's code (:data:`_GENERATOR_FILES`)."""
    digest = hashlib.sha256()
    try:
        for name in _GENERATOR_FILES:
            digest.update((Path(__file__).parent / name).read_bytes())
    except OSError:  # pragma: no cover - frozen/zipped installs
        return "unknown"
    return digest.hexdigest()[:16]


def _params(num_train, num_val, num_test, size, seed):
    return {"generator_version": GENERATOR_VERSION, "generator_digest": _generator_digest(),
            "num_train": int(num_train), "num_val": int(num_val), "num_test": int(num_test),
            "size": int(size), "seed": int(seed)}


def _read_marker(root):
    try:
        with open(Path(root) / MARKER_NAME) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _complete(root, params, marker):
    if not marker or marker.get("params") != params:
        return False
    counts = {"train": params["num_train"], "val": params["num_val"], "test": params["num_test"]}
    for split, n in counts.items():
        for i in range(n):
            name = image_name(split, i)
            for sub in ("images", "masks"):
                if not (Path(root) / split / sub / name).is_file():
                    return False
    return True


def _prepare_dirs(root, wanted):
    """Create the split folders; remove stale synthetic files and leftovers of interrupted runs.

    Refuses (FileExistsError) to write into folders that hold files that are not ours.
    """
    for split in SPLITS:
        for sub in ("images", "masks"):
            d = Path(root) / split / sub
            d.mkdir(parents=True, exist_ok=True)
            foreign = []
            for p in d.iterdir():
                if _LEFTOVER_RE.match(p.name):
                    p.unlink()
                elif _NAME_RE.match(p.name):
                    if p.name not in wanted[split]:
                        p.unlink()
                elif not p.name.startswith("."):
                    foreign.append(p.name)
            if foreign:
                raise FileExistsError(
                    f"{d} holds files that are not synthetic ({', '.join(sorted(foreign)[:3])}, ...); "
                    "choose an empty --root for the synthetic dataset"
                )


def make_synthetic_capetown(root, num_train=48, num_val=12, num_test=12, size=256, seed=0,
                            overwrite=False, progress=None):
    """Write the synthetic dataset to ``<root>/{train,val,test}/{images,masks}``.

    Idempotent: when ``<root>/.synthetic_complete.json`` records the same parameters and every
    file is there, nothing is written (unless ``overwrite``). Otherwise the marker is removed,
    all files are written atomically, synthetic files left from other parameters are deleted,
    and the marker is written last. ``progress(done, total)`` is called after each image.

    Returns a summary dict: ``root``, ``params``, ``generated`` (False when it was already
    complete), ``seconds``, ``splits`` ({split: {"images", "empty_images", "images_with",
    "pixel_share"}}) and ``pixel_share`` over all splits ({class name: fraction}).
    """
    root = Path(root)
    params = _params(num_train, num_val, num_test, size, seed)
    for key in ("num_train", "num_val", "num_test"):
        if params[key] < 0:
            raise ValueError(f"{key} must be >= 0, got {params[key]}")
    if size < 64:
        raise ValueError(f"size must be at least 64 pixels, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    marker = _read_marker(root)
    if not overwrite and _complete(root, params, marker):
        summary = dict(marker["summary"])
        summary.update(root=str(root), generated=False, seconds=0.0)
        return summary

    start = time.perf_counter()
    counts = {"train": num_train, "val": num_val, "test": num_test}
    wanted = {s: {image_name(s, i) for i in range(n)} for s, n in counts.items()}
    root.mkdir(parents=True, exist_ok=True)
    try:
        (root / MARKER_NAME).unlink()
    except FileNotFoundError:
        pass
    _prepare_dirs(root, wanted)

    total = sum(counts.values())
    done = 0
    ncls = len(CLASS_NAMES)
    splits, all_pixels = {}, np.zeros(ncls, np.int64)
    for split in SPLITS:
        pixels = np.zeros(ncls, np.int64)
        with_class = np.zeros(ncls, np.int64)
        empty = 0
        for i in range(counts[split]):
            img, mask = render_image(seed, split, i, size)
            name = image_name(split, i)
            _atomic_write(root / split / "images" / name, _encode_png(img, rgb=True))
            _atomic_write(root / split / "masks" / name, _encode_png(mask, rgb=False))
            c = np.bincount(mask.ravel(), minlength=ncls)[:ncls]
            pixels += c
            with_class += c > 0
            empty += int(c[1:].sum() == 0)
            done += 1
            if progress is not None:
                progress(done, total)
        tot = max(int(pixels.sum()), 1)
        splits[split] = {
            "images": counts[split],
            "empty_images": empty,
            "images_with": {CLASS_NAMES[k]: int(with_class[k]) for k in range(1, ncls)},
            "pixel_share": {CLASS_NAMES[k]: round(float(pixels[k]) / tot, 6) for k in range(ncls)},
        }
        all_pixels += pixels
    tot = max(int(all_pixels.sum()), 1)
    summary = {
        "root": str(root),
        "params": params,
        "generated": True,
        "seconds": round(time.perf_counter() - start, 3),
        "splits": splits,
        "pixel_share": {CLASS_NAMES[k]: round(float(all_pixels[k]) / tot, 6) for k in range(ncls)},
    }
    _atomic_write(root / MARKER_NAME, json.dumps({"params": params, "summary": summary}, indent=1).encode())
    return summary
