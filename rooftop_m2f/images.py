"""Reading image files as (H, W, 3) uint8 RGB, and the error that names a bad file.

Light (numpy, PIL and OpenCV; no detectron2 or torch), so that prediction reads images without
the training stack; :mod:`rooftop_m2f.data.capetown` re-exports these names.
"""
import logging
import os
import struct

import numpy as np
from PIL import Image

from .cli import UserError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class DatasetError(UserError, ValueError):
    """A problem with a dataset file; the message names the file and the problem."""


_scaled_warned = set()  # paths whose scaling was reported (one warning per image)


def png_significant_bits(path) -> "int | None":
    """The largest value of a PNG's ``sBIT`` chunk (the significant bits of its samples, e.g. 12
    for 12-bit data stored in 16-bit samples), or None when it has none."""
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind == b"sBIT":
                return max(f.read(length), default=0) or None
            if kind in (b"IDAT", b"IEND"):
                return None
            f.seek(length + 4, os.SEEK_CUR)


def _tile_rawmode(im) -> str:
    """PIL's raw mode of the first tile (before ``load``): ``RGB;16B`` for 16-bit RGB PNGs, which
    PIL itself opens as 8-bit RGB by keeping the high bytes."""
    if not im.tile:
        return ""
    args = im.tile[0][3]
    return args if isinstance(args, str) else str(args[0]) if args else ""


def bit_depth(path, im) -> "tuple[int, int, str]":
    """``(bits per sample, significant bits, where the significant bits come from)`` of an
    opened (not yet loaded) PIL image: 16-bit PNG and TIFF samples have 16 bits, of which a PNG's
    ``sBIT`` chunk may declare fewer significant (12-bit sensors); everything else 8."""
    if not (im.mode.startswith("I;16") or ";16" in _tile_rawmode(im)):
        return 8, 8, "8-bit samples"
    significant = png_significant_bits(path) if im.format == "PNG" else None
    if significant and significant < 16:
        return 16, int(significant), "the PNG's sBIT chunk"
    return 16, 16, "16-bit samples, no sBIT chunk"


def to_uint8(samples: np.ndarray, significant_bits: int) -> np.ndarray:
    """Samples of ``significant_bits`` bits scaled to 0..255 (``v * 255 / (2**bits - 1)``,
    rounded; values above the declared range clip at 255)."""
    peak = float(2 ** int(significant_bits) - 1)
    return np.clip(samples.astype(np.float32) * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)


def _read_16bit(path, bits, where) -> np.ndarray:
    import cv2

    samples = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if samples is None or samples.dtype != np.uint16:
        raise DatasetError(f"{path}: cannot read its 16-bit samples")
    if samples.ndim == 3:  # OpenCV's channel order is BGR(A)
        samples = samples[..., 2::-1] if samples.shape[2] >= 3 else samples[..., :1]
    rgb = to_uint8(samples, bits)
    if rgb.ndim == 2 or rgb.shape[2] == 1:
        rgb = np.repeat(rgb.reshape(rgb.shape[0], rgb.shape[1], 1), 3, axis=2)
    if path not in _scaled_warned:
        _scaled_warned.add(path)
        peak = int(samples.max())
        hint = ""
        if bits == 16 and 255 < peak < 2 ** 14:
            used = peak.bit_length()
            hint = (f"; its largest value is {peak}: if it holds {used}-bit data, declare it with "
                    f"an sBIT chunk or convert it to 8 bits, else it looks dark")
        logger.warning("%s: %d significant bits (%s), scaled to 8 bits by 255/%d%s", path, bits,
                       where, 2 ** bits - 1, hint)
    return np.ascontiguousarray(rgb)


def read_image(path: str) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB. Grayscale is replicated and alpha dropped; 16-bit
    samples are scaled by their significant bits (:func:`bit_depth`), with one warning per
    image saying how. A file that cannot be decoded (unreadable, truncated, a decompression
    bomb over PIL's ``Image.MAX_IMAGE_PIXELS``, too large for memory, an unsupported mode)
    raises :class:`DatasetError` naming it and the reason."""
    path = str(path)
    try:
        with Image.open(path) as im:
            bits, significant, where = bit_depth(path, im)
            if bits == 16:
                return _read_16bit(path, significant, where)
            if im.mode in ("I", "F"):
                raise DatasetError(f"{path}: {'32-bit integer' if im.mode == 'I' else 'floating-point'}"
                                   " samples are not supported (8- or 16-bit images only)")
            im.load()
            return np.array(im.convert("RGB"))
    except DatasetError:
        raise
    except Image.DecompressionBombError as e:
        raise DatasetError(f"{path}: refused as a possible decompression bomb ({e}); raise "
                           "ROOFTOP.MAX_IMAGE_PIXELS if the image is genuine") from None
    except MemoryError:
        raise DatasetError(f"{path}: too large to decode in this machine's memory") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"{path}: cannot read image ({e})") from e
