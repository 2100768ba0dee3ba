"""Prediction outputs: class-index PNG, colour PNG and overlay (each written atomically)."""
import numpy as np
from PIL import Image

from ..data.capetown import IGNORE_COLOR, IGNORE_LABEL, PALETTE
from ..fileio import atomic_path


def colorize(mask: np.ndarray) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 RGB with :data:`PALETTE` (ignore is white)."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(PALETTE)] = PALETTE
    lut[IGNORE_LABEL] = IGNORE_COLOR
    return lut[mask]


def overlay(image_rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Foreground classes blended over the image; background pixels left as they are."""
    out = image_rgb.astype(np.float32)
    fg = (mask > 0) & (mask != IGNORE_LABEL)
    out[fg] = (1 - alpha) * out[fg] + alpha * colorize(mask)[fg]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def write_index_png(mask, path):
    save_png(mask.astype(np.uint8), path)


def write_color_png(mask, path):
    save_png(colorize(mask), path)


def write_overlay_png(image_rgb, mask, path):
    save_png(overlay(image_rgb, mask), path)
