"""Sliding-window prediction for images of any size, with optional test-time augmentation.

Windows of ``tile_size`` pixels (image pixels, before the predictor's own ``ROOFTOP.INPUT_SIZE``)
step by ``tile_size - overlap``; the last window of a row or column is moved back to end at the
image border, so every window is inside the image and full size (an image side shorter than
``tile_size`` gets one window of that side). Each window's class scores (the model's
``sem_seg`` output, averaged over the TTA views) are weighted by a separable raised-cosine ramp
over ``overlap`` pixels on each side that has a neighbouring window (sides on the image border
are not tapered), summed, and divided by the summed weights. Neighbouring ramps add up to one
where windows overlap by exactly ``overlap``, so the blend is a smooth partition of unity: no
seams, and a pixel covered by one window only gets exactly that window's scores.

Memory: windows are processed one row of windows at a time; the accumulator holds
``K x tile x width`` float32 scores (plus a weight map) and rows are finished, and handed out,
as soon as no later window covers them. With a strip-reading source (TIFF through rasterio,
:mod:`.sources`) the image is read one window row at a time, so the peak memory does not
grow with the image height; the full-size output is the uint8 class mask (1 byte per pixel).
"""
import logging
from typing import Callable, Iterator, List, Sequence, Tuple

import numpy as np

from .sources import ArraySource, ImageSource

logger = logging.getLogger(__name__)

TTA_VIEWS = ("hflip", "vflip", "rot90")
MODES = ("auto", "never")


def confidence_of(scores: np.ndarray) -> np.ndarray:
    """(H, W) float32 in [0, 1]: the top class score over the sum of the class scores (Mask2Former's
    semantic scores are non-negative but not normalised); 0 where every score is 0."""
    scores = np.maximum(scores, 0)
    total = scores.sum(0)
    return np.divide(scores.max(0), total, out=np.zeros_like(total), where=total > 0).astype(np.float32)


def window_starts(length: int, tile: int, stride: int) -> List[int]:
    """Start offsets of windows of ``tile`` along a side of ``length``: 0, stride, ..., with the
    last one moved back to end at ``length``."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def ramp(length: int, overlap: int, taper_start: bool, taper_end: bool) -> np.ndarray:
    """1-D window weight: ``sin^2`` from ~0 to 1 over ``overlap`` pixels at each tapered end,
    1 elsewhere. Strictly positive, and ``ramp_end(t) + ramp_start(t) == 1`` across an overlap
    of exactly ``overlap`` pixels."""
    w = np.ones(length, dtype=np.float32)
    n = min(overlap, length)
    if n > 0:
        rise = np.sin(0.5 * np.pi * (np.arange(n, dtype=np.float64) + 0.5) / overlap) ** 2
        if taper_start:
            w[:n] = np.minimum(w[:n], rise)
        if taper_end:
            w[length - n:] = np.minimum(w[length - n:], rise[::-1])
    return w


def _views(tta: Sequence[str]):
    """(forward on an (H, W, C) image, inverse on (K, H, W) scores) pairs, identity first."""
    views = [(lambda a: a, lambda s: s)]
    if "hflip" in tta:
        views.append((lambda a: a[:, ::-1], lambda s: s[:, :, ::-1]))
    if "vflip" in tta:
        views.append((lambda a: a[::-1], lambda s: s[:, ::-1]))
    if "rot90" in tta:
        for k in (1, 2, 3):
            views.append((lambda a, k=k: np.rot90(a, k, axes=(0, 1)),
                          lambda s, k=k: np.rot90(s, -k, axes=(1, 2))))
    return views


class TiledPredictor:
    """Wraps a predictor with ``scores(image_rgb) -> (K, h, w)`` (e.g.
    :class:`~.predictor.RooftopPredictor`) to predict images of any size.

    ``mode``: ``"auto"`` tiles images with a side larger than ``tile_size`` and predicts the
    others in one window; ``"never"`` predicts every image in one window whatever its size
    (memory then grows with the image). ``tta``: any of ``"hflip"``, ``"vflip"``, ``"rot90"``
    (the three rotations); the scores of all views are averaged.
    """

    def __init__(self, predictor, tile_size: int = 1024, overlap: int = 256, mode: str = "auto",
                 tta: Sequence[str] = ()):
        tile_size, overlap = int(tile_size), int(overlap)
        if tile_size < 32:
            raise ValueError(f"tile size must be >= 32 pixels, got {tile_size}")
        if not 0 <= overlap < tile_size:
            raise ValueError(f"tile overlap must be in [0, tile size {tile_size}), got {overlap}")
        if mode not in MODES:
            raise ValueError(f"tiling mode must be one of {MODES}, got {mode!r}")
        unknown = [t for t in tta if t not in TTA_VIEWS]
        if unknown:
            raise ValueError(f"unknown TTA views {unknown}; choose from {TTA_VIEWS}")
        self.predictor = predictor
        self.tile_size = tile_size
        self.overlap = overlap
        self.mode = mode
        self.tta = tuple(dict.fromkeys(tta))
        self._views = _views(self.tta)
        self.peak_accumulator_bytes = 0  # largest accumulator allocated so far (for reports/tests)

    @classmethod
    def from_config(cls, cfg, predictor=None):
        """From ``cfg.ROOFTOP.TILE`` and ``cfg.ROOFTOP.TTA``; builds a
        :class:`~.predictor.RooftopPredictor` if none is given."""
        if predictor is None:
            from .predictor import RooftopPredictor

            predictor = RooftopPredictor(cfg)
        tile = cfg.ROOFTOP.TILE
        return cls(predictor, tile.SIZE, tile.OVERLAP, tile.MODE, list(cfg.ROOFTOP.TTA))

    # -- one window ------------------------------------------------------------------------------
    def window_scores(self, window_rgb: np.ndarray) -> np.ndarray:
        """(K, h, w) float32 scores of one window, averaged over the TTA views."""
        total = None
        for forward, inverse in self._views:
            view = np.ascontiguousarray(forward(window_rgb))
            scores = self.predictor.scores(view)
            scores = scores.numpy() if hasattr(scores, "numpy") else np.asarray(scores)
            scores = inverse(scores.astype(np.float32, copy=False))
            total = scores.copy() if total is None else total + scores
        if len(self._views) > 1:
            total /= len(self._views)
        return total

    # -- layout ----------------------------------------------------------------------------------
    def layout(self, height: int, width: int) -> Tuple[List[int], List[int], int, int]:
        """(row starts, column starts, window height, window width) for an image."""
        if self.mode == "never":
            return [0], [0], height, width
        stride = self.tile_size - self.overlap
        return (window_starts(height, self.tile_size, stride),
                window_starts(width, self.tile_size, stride),
                min(self.tile_size, height), min(self.tile_size, width))

    def uses_tiles(self, height: int, width: int) -> bool:
        ys, xs, _, _ = self.layout(height, width)
        return len(ys) * len(xs) > 1

    # -- bands -----------------------------------------------------------------------------------
    def iter_score_bands(self, read_rows: Callable[[int, int], np.ndarray], height: int,
                         width: int) -> Iterator[Tuple[int, np.ndarray]]:
        """Yield ``(y0, scores)`` with ``scores`` (K, n, width) float32, the blended scores of
        rows ``y0 .. y0 + n``, top to bottom, covering the image once. ``read_rows(a, b)``
        returns image rows ``a .. b`` as (b - a, width, 3) uint8 RGB."""
        ys, xs, th, tw = self.layout(height, width)
        col_w = {x0: ramp(tw, self.overlap, x0 > 0, x0 + tw < width) for x0 in xs}
        acc = weights = None
        base = 0  # image row of accumulator row 0
        for y0 in ys:
            if acc is not None and y0 > base:  # rows base .. y0 are final: no later window
                n = y0 - base
                yield base, acc[:, :n] / weights[:n]
                acc[:, :-n] = acc[:, n:].copy()
                acc[:, -n:] = 0
                weights[:-n] = weights[n:].copy()
                weights[-n:] = 0
                base = y0
            rows = read_rows(y0, y0 + th)
            if rows.shape[:2] != (th, width):
                raise ValueError(f"read_rows({y0}, {y0 + th}) returned {rows.shape}, expected "
                                 f"({th}, {width}, 3)")
            row_w = ramp(th, self.overlap, y0 > 0, y0 + th < height)
            for x0 in xs:
                scores = self.window_scores(rows[:, x0:x0 + tw])
                if acc is None:
                    acc = np.zeros((scores.shape[0], th, width), dtype=np.float32)
                    weights = np.zeros((th, width), dtype=np.float32)
                    self.peak_accumulator_bytes = max(self.peak_accumulator_bytes,
                                                      acc.nbytes + weights.nbytes)
                w = row_w[:, None] * col_w[x0][None, :]
                acc[:, :, x0:x0 + tw] += scores * w
                weights[:, x0:x0 + tw] += w
        yield base, acc / weights

    # -- whole images ----------------------------------------------------------------------------
    def predict_source(self, source: ImageSource, with_confidence: bool = False):
        """(H, W) uint8 class mask of a source, filled band by band (bounded memory). With
        ``with_confidence``, ``(mask, confidence)``: per pixel the predicted class's share of the
        (blended) class scores, float32 in [0, 1]."""
        height, width = source.height, source.width
        ys, xs, th, tw = self.layout(height, width)
        if len(ys) * len(xs) > 1:
            logger.info("%s: %dx%d px, %d windows of %dx%d (overlap %d)%s", source.path, width,
                        height, len(ys) * len(xs), tw, th, self.overlap,
                        f", TTA {'+'.join(self.tta)}" if self.tta else "")
        elif self.mode == "never" and max(height, width) > self.tile_size:
            logger.warning("%s: %dx%d px predicted in one pass (ROOFTOP.TILE.MODE never), larger "
                           "than the %d px tiles", source.path, width, height, self.tile_size)
        mask = np.empty((height, width), dtype=np.uint8)
        confidence = np.empty((height, width), dtype=np.float32) if with_confidence else None
        for y0, scores in self.iter_score_bands(source.read_rows, height, width):
            mask[y0:y0 + scores.shape[1]] = scores.argmax(0)
            if with_confidence:
                confidence[y0:y0 + scores.shape[1]] = confidence_of(scores)
        return (mask, confidence) if with_confidence else mask

    def scores(self, image_rgb: np.ndarray) -> np.ndarray:
        """(K, H, W) float32 blended scores of an in-memory image (the whole score map is built:
        for large images prefer :meth:`predict_source`)."""
        height, width = image_rgb.shape[:2]
        out = None
        for y0, band in self.iter_score_bands(lambda a, b: image_rgb[a:b], height, width):
            if out is None:
                out = np.empty((band.shape[0], height, width), dtype=np.float32)
            out[:, y0:y0 + band.shape[1]] = band
        return out

    def __call__(self, image_rgb: np.ndarray) -> np.ndarray:
        """(H, W) uint8 class mask of an in-memory RGB image."""
        return self.predict_source(ArraySource(image_rgb))
