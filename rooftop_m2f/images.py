"""Reading image files as (H, W, 3) uint8 RGB, and the error that names a bad file.

Light (numpy and PIL, no detectron2 or torch), so that prediction can read images without the
training stack; :mod:`rooftop_m2f.data.capetown` re-exports these names.
"""
import numpy as np
from PIL import Image

from .cli import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class DatasetError(UserError, ValueError):
    """A problem with a dataset file; the message names the file and the problem."""


def read_image(path: str) -> np.ndarray:
    """Read an image as (H, W, 3) uint8 RGB. Grayscale is replicated, alpha dropped and 16-bit
    scaled to 8-bit; anything unreadable raises :class:`DatasetError` naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                array = np.array(im).astype(np.float64)
                peak = 65535.0 if array.max() > 255 else 255.0
                array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
                return np.repeat(array[..., None], 3, axis=2)
            return np.array(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"{path}: cannot read image ({e})") from e
