"""The sliding-window accumulator: blended class scores of windows over an image of any size
(``tools/predict.py``), a mosaic of tiles, or a region of either (``tools/predict_city.py``).

Windows of ``tile_size`` pixels step by ``tile_size - overlap``; the last of a row or column is
moved back to end at the border, so every window is inside the image and full size. Each
window's class scores (averaged over the TTA views) are weighted by a separable raised-cosine
ramp over ``overlap`` pixels on each side that has a neighbour, summed, and divided by the summed
weights: neighbouring ramps add up to one, so there are no seams and a pixel covered by one
window gets exactly that window's scores. A window without any pixel with data is not
predicted; pixels without data get :data:`NODATA`. A region is predicted from the windows that
touch it, with the whole image's layout and weights: its pixels are exactly the whole image's.

The scorer: any object with ``scores_batch(windows) -> [(K, h, w), ...]`` or
``scores(window) -> (K, h, w)`` (float32 arrays or CPU tensors) for (h, w, 3) uint8 RGB windows,
e.g. :class:`~.predictor.RooftopPredictor`; ``batch_size`` windows go to one ``scores_batch``.
Memory: one row of windows' scores and weights; the next row is read in a background thread.
"""
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from .sources import ImageSource

logger = logging.getLogger(__name__)

NODATA = 255  # class of pixels without data (not predicted)
TTA_VIEWS = ("hflip", "vflip", "rot90")
MODES = ("auto", "never")


def confidence_of(scores: np.ndarray) -> np.ndarray:
    """(H, W) float32 in [0, 1]: the top class score over the sum of the class scores (Mask2Former's
    semantic scores are non-negative but not normalised); 0 where every score is 0."""
    scores = np.maximum(scores, 0)
    total = scores.sum(0)
    return np.divide(scores.max(0), total, out=np.zeros_like(total), where=total > 0).astype(np.float32)


def window_starts(length: int, tile: int, stride: int):
    """Start offsets of windows of ``tile`` along a side of ``length``: 0, stride, ..., with the
    last one moved back to end at ``length``."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, stride)) + [length - tile]


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


@dataclass
class Prediction:
    """A prediction of an image or a region of it, and what it took."""

    mask: np.ndarray                   # (h, w) uint8 classes, NODATA where no data
    confidence: Optional[np.ndarray]   # (h, w) :func:`confidence_of` (float32, or uint8 x 255)
    windows: int = 0                   # windows predicted
    skipped_windows: int = 0           # windows without data, not predicted
    predict_s: float = 0.0             # seconds in the scorer
    wait_s: float = 0.0                # seconds the scorer waited for data


class TiledPredictor:
    """Predicts images of any size with a window scorer (see the module docstring).

    ``mode``: ``"auto"`` tiles images with a side larger than ``tile_size`` and predicts the
    others in one window; ``"never"`` predicts every image in one window whatever its size
    (memory then grows with the image). ``tta``: any of ``"hflip"``, ``"vflip"``, ``"rot90"``
    (the three rotations); the scores of all views are averaged.
    """

    def __init__(self, scorer, tile_size: int = 1024, overlap: int = 256, mode: str = "auto",
                 tta: Sequence[str] = (), batch_size: int = 1):
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
        if int(batch_size) < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.scorer = scorer
        self.tile_size, self.overlap, self.mode = tile_size, overlap, mode
        self.tta = tuple(dict.fromkeys(tta))
        self.batch_size = int(batch_size)
        self._views = _views(self.tta)

    @classmethod
    def from_config(cls, cfg, scorer=None, batch_size=1):
        """From ``cfg.ROOFTOP.TILE`` (size, overlap, mode) and ``cfg.ROOFTOP.TTA``; a
        :class:`~.predictor.RooftopPredictor` of ``cfg`` unless a scorer is given."""
        if scorer is None:
            from .predictor import RooftopPredictor

            scorer = RooftopPredictor(cfg)
        tile = cfg.ROOFTOP.TILE
        return cls(scorer, tile.SIZE, tile.OVERLAP, tile.MODE, list(cfg.ROOFTOP.TTA), batch_size)

    def layout(self, height: int, width: int, region=None):
        """(row starts, column starts, window height, window width) of an image's windows, or
        of those that touch ``region`` = (row0, row1, col0, col1)."""
        r0, r1, c0, c1 = region or (0, height, 0, width)
        if self.mode == "never":
            ys, xs, th, tw = [0], [0], height, width
        else:
            stride = self.tile_size - self.overlap
            ys, xs = (window_starts(height, self.tile_size, stride),
                      window_starts(width, self.tile_size, stride))
            th, tw = min(self.tile_size, height), min(self.tile_size, width)
        return [y for y in ys if y < r1 and y + th > r0], [x for x in xs if x < c1 and x + tw > c0], th, tw

    def window_extent(self, height, width, region=None):
        """(row0, row1, col0, col1): the pixels that the windows touching ``region`` read."""
        ys, xs, th, tw = self.layout(height, width, region)
        return ys[0], ys[-1] + th, xs[0], xs[-1] + tw

    def batch_scores(self, windows):
        """(K, h, w) float32 scores of each window, averaged over the TTA views."""
        total = None
        for forward, inverse in self._views:
            views = [np.ascontiguousarray(forward(w)) for w in windows]
            if hasattr(self.scorer, "scores_batch"):
                out = self.scorer.scores_batch(views)
            else:
                out = [self.scorer.scores(v) for v in views]
            out = [inverse(np.asarray(s.numpy() if hasattr(s, "numpy") else s, dtype=np.float32))
                   for s in out]
            total = out if total is None else [t + s for t, s in zip(total, out)]
        return total if len(self._views) == 1 else [t / len(self._views) for t in total]

    def window_scores(self, window_rgb: np.ndarray) -> np.ndarray:
        """(K, h, w) float32 scores of one window, averaged over the TTA views."""
        return self.batch_scores([window_rgb])[0]

    def bands(self, source: ImageSource, region=None, stats: Optional[Prediction] = None):
        """Yield ``(y0, scores, valid)`` for the rows of ``region`` (default: the whole source),
        top to bottom, each row once: the blended (K, n, region width) float32 ``scores`` (None
        while no window was predicted) and the (n, region width) bool pixels predicted. Windows,
        waits and seconds are added to ``stats``."""
        height, width = source.height, source.width
        r0, r1, c0, c1 = region or (0, height, 0, width)
        ys, xs, th, tw = self.layout(height, width, region)
        ax0, ax1 = xs[0], xs[-1] + tw  # the accumulator's columns (image coordinates)
        col_w = {x0: ramp(tw, self.overlap, x0 > 0, x0 + tw < width) for x0 in xs}
        stats = stats if stats is not None else Prediction(None, None)
        acc, base = None, ys[0]  # base: the image row of accumulator row 0
        weights = np.zeros((th, ax1 - ax0), dtype=np.float32)
        data = np.zeros((th, ax1 - ax0), dtype=bool)

        def finish(n):  # accumulator rows 0..n, clipped to the region
            lo, hi = max(base, r0), min(base + n, r1)
            rows, cols = slice(lo - base, hi - base), slice(c0 - ax0, c1 - ax0)
            w = weights[rows, cols]
            scores = None if acc is None else acc[:, rows, cols] / np.where(w > 0, w, 1.0)
            return lo, scores, (w > 0) & data[rows, cols]

        for y0, rgb, valid in self._read_ahead(source, ys, th, ax0, ax1, stats):
            if y0 > base:  # rows base .. y0 are final: no later window covers them
                if y0 > r0:
                    yield finish(y0 - base)
                for a in [weights, data] + ([acc] if acc is not None else []):
                    a[..., :base - y0, :] = a[..., y0 - base:, :].copy()
                    a[..., base - y0:, :] = 0
                base = y0
            data[:] = True if valid is None else valid
            todo = [x0 for x0 in xs if valid is None or valid[:, x0 - ax0:x0 - ax0 + tw].any()]
            stats.skipped_windows += len(xs) - len(todo)
            row_w = ramp(th, self.overlap, y0 > 0, y0 + th < height)
            for b in range(0, len(todo), self.batch_size):
                batch = todo[b:b + self.batch_size]
                t0 = time.perf_counter()
                scores = self.batch_scores([rgb[:, x0 - ax0:x0 - ax0 + tw] for x0 in batch])
                stats.predict_s += time.perf_counter() - t0
                stats.windows += len(batch)
                for x0, s in zip(batch, scores):
                    if acc is None:
                        acc = np.zeros((s.shape[0], th, ax1 - ax0), dtype=np.float32)
                    w = row_w[:, None] * col_w[x0][None, :]
                    acc[:, :, x0 - ax0:x0 - ax0 + tw] += s * w
                    weights[:, x0 - ax0:x0 - ax0 + tw] += w
        if min(base + th, r1) > max(base, r0):
            yield finish(th)

    @staticmethod
    def _read_ahead(source, ys, th, x0, x1, stats):
        """``(y0, rgb, valid)`` of each window row, the next one read in a background thread."""
        with ThreadPoolExecutor(1) as reader:
            pending = reader.submit(source.read, ys[0], ys[0] + th, x0, x1)
            for i, y0 in enumerate(ys):
                t0 = time.perf_counter()
                rgb, valid = pending.result()
                stats.wait_s += time.perf_counter() - t0
                if i + 1 < len(ys):
                    pending = reader.submit(source.read, ys[i + 1], ys[i + 1] + th, x0, x1)
                yield y0, rgb, valid

    def predict(self, source: ImageSource, region=None, confidence=None) -> Prediction:
        """The :class:`Prediction` of ``region`` = (row0, row1, col0, col1) of a source (default:
        all of it, logged); with ``confidence`` (``np.float32``, or ``np.uint8`` for x 255) its
        confidence too."""
        r0, r1, c0, c1 = region or (0, source.height, 0, source.width)
        ys, xs, th, tw = self.layout(source.height, source.width)
        if region is None and len(ys) * len(xs) > 1:
            logger.info("%s: %dx%d px, %d windows of %dx%d (overlap %d)%s", source.path,
                        source.width, source.height, len(ys) * len(xs), tw, th, self.overlap,
                        f", TTA {'+'.join(self.tta)}" if self.tta else "")
        elif region is None and max(th, tw) > self.tile_size:
            logger.warning("%s: %dx%d px predicted in one pass (ROOFTOP.TILE.MODE never), larger "
                           "than the %d px tiles", source.path, tw, th, self.tile_size)
        out = Prediction(np.full((r1 - r0, c1 - c0), NODATA, dtype=np.uint8),
                         None if confidence is None else np.zeros((r1 - r0, c1 - c0), confidence))
        for y0, scores, valid in self.bands(source, region, out):
            if scores is not None:
                rows = slice(y0 - r0, y0 - r0 + valid.shape[0])
                out.mask[rows] = np.where(valid, scores.argmax(0), NODATA)
                if confidence is not None:
                    c = confidence_of(scores)
                    out.confidence[rows] = np.where(
                        valid, np.round(c * 255) if confidence == np.uint8 else c, 0)
        return out

    def predict_source(self, source: ImageSource) -> np.ndarray:
        """(H, W) uint8 class mask of a source (NODATA where it has no data)."""
        return self.predict(source).mask
