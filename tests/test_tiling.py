"""Tiled inference: window layout, blending weights, equality with one-pass prediction, TTA
inverses, bounded memory, and the real (tiny, randomly initialised) model.

Why not simply "tiled == one pass" with the real model: Mask2Former's queries attend to the
whole input, so a window's scores depend on everything in the window, not on a local
neighbourhood; no tiling reproduces a one-pass prediction of a larger image exactly (with the
tiny model the scores differ by ~10-20 % everywhere). What tiling must guarantee, and what is
tested here, is:

* with a model whose output at a pixel depends only on that pixel, tiled == one pass
  everywhere (up to float32 rounding, 1e-3 on scores of magnitude ~255);
* with a model of receptive-field radius r (a 5x5 box filter, r = 2, zero padding), tiled ==
  one pass exactly wherever every window covering the pixel has it at least r pixels inside
  its inner edges; elsewhere (the blending band) only a bounded difference;
* with the real model, a pixel covered by one window only gets exactly (bit for bit) the
  one-pass prediction of that window's content, and a pixel in an overlap gets a convex
  combination of the one-pass predictions of the windows covering it (no seams).
"""
import numpy as np
import pytest
import torch
from scipy import ndimage

from conftest import TINY_CONFIG
from rooftop_m2f.inference.sources import ArraySource
from rooftop_m2f.inference.tiling import TiledPredictor, ramp, window_starts


class PixelModel:
    """Scores that depend on the pixel only (equivariant to flips and rotations)."""

    def scores(self, image):
        f = image.astype(np.float32)
        return np.stack([f[..., 0], f[..., 1], f[..., 2], f.mean(-1)])


class BoxModel:
    """5x5 mean filter with zero padding: receptive-field radius 2."""

    radius = 2

    def scores(self, image):
        f = image.astype(np.float32)
        return np.stack([ndimage.uniform_filter(f[..., c], 5, mode="constant") for c in range(3)])


class ColumnModel:
    """Scores = the column index inside the window (not flip-equivariant)."""

    def scores(self, image):
        h, w = image.shape[:2]
        return np.broadcast_to(np.arange(w, dtype=np.float32), (1, h, w)).copy()


def blended(tiled, image):
    """(K, H, W) blended scores of an in-memory image, assembled from the accumulator's bands."""
    bands = list(tiled.bands(ArraySource(image)))
    assert all(valid.all() for _, _, valid in bands)
    return np.concatenate([band for _, band, _ in bands], axis=1)


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("length,tile,overlap", [(1000, 256, 64), (257, 256, 64), (256, 256, 64),
                                                 (100, 256, 64), (300, 128, 0), (1024, 128, 127)])
def test_windows_cover_the_side_inside_the_image_with_at_least_the_overlap(length, tile, overlap):
    starts = window_starts(length, tile, tile - overlap)
    size = min(tile, length)
    assert starts[0] == 0 and starts[-1] + size == length
    assert all(0 <= s <= length - size for s in starts)
    gaps = np.diff(starts)
    assert (gaps > 0).all() and (size - gaps >= overlap).all()


def test_ramps_are_positive_and_sum_to_one_across_an_overlap():
    tile, overlap = 64, 16
    left, right = ramp(tile, overlap, False, True), ramp(tile, overlap, True, False)
    assert (left > 0).all() and (right > 0).all()
    np.testing.assert_allclose(left[-overlap:] + right[:overlap], 1.0, atol=1e-6)
    assert (ramp(tile, overlap, False, False) == 1).all(), "image borders are not tapered"


@pytest.mark.parametrize("shape", [(300, 450), (97, 500), (128, 128), (60, 70)])
@pytest.mark.parametrize("tta", [(), ("hflip", "vflip", "rot90")])
def test_pixel_model_tiled_equals_one_pass(shape, tta):
    image = random_image(*shape)
    tiled = TiledPredictor(PixelModel(), tile_size=128, overlap=32, tta=tta)
    np.testing.assert_allclose(blended(tiled, image), PixelModel().scores(image), rtol=0, atol=1e-3)
    assert np.array_equal(tiled.predict(ArraySource(image)).mask, PixelModel().scores(image).argmax(0))


def covering_windows(tiled, height, width):
    ys, xs, th, tw = tiled.layout(height, width)
    return [(y0, x0, th, tw) for y0 in ys for x0 in xs]


def test_receptive_field_model_exact_outside_the_blending_band():
    height, width, r = 300, 450, BoxModel.radius
    image = random_image(height, width, seed=1)
    tiled = TiledPredictor(BoxModel(), tile_size=128, overlap=32)
    diff = np.abs(blended(tiled, image) - BoxModel().scores(image)).max(0)
    # pixels that some covering window has closer than r to one of its inner edges
    near_edge = np.zeros((height, width), dtype=bool)
    for y0, x0, th, tw in covering_windows(tiled, height, width):
        inner = np.zeros((th, tw), dtype=bool)
        if y0 > 0:
            inner[:r] = True
        if y0 + th < height:
            inner[-r:] = True
        if x0 > 0:
            inner[:, :r] = True
        if x0 + tw < width:
            inner[:, -r:] = True
        near_edge[y0:y0 + th, x0:x0 + tw] |= inner
    assert diff[~near_edge].max() < 1e-3
    assert (~near_edge).mean() > 0.9
    assert diff[near_edge].max() > 1e-2, "the band is where windows differ (else this test is void)"
    assert diff.max() < 0.05 * 255, "inside the band the ramp keeps edge-affected windows' weight small"


def test_tta_views_are_inverted():
    window = random_image(40, 90)
    hflip = TiledPredictor(ColumnModel(), tile_size=128, overlap=0, tta=("hflip",))
    np.testing.assert_allclose(hflip.window_scores(window), (90 - 1) / 2)
    vflip = TiledPredictor(ColumnModel(), tile_size=128, overlap=0, tta=("vflip",))
    np.testing.assert_allclose(vflip.window_scores(window)[0, 5], np.arange(90))
    rot = TiledPredictor(PixelModel(), tile_size=128, overlap=0, tta=("rot90",))
    assert len(rot._views) == 4
    np.testing.assert_allclose(rot.window_scores(window), PixelModel().scores(window), atol=1e-4)


class CountingSource(ArraySource):
    """An in-memory image that records the windows read from it."""

    def __init__(self, image):
        super().__init__(image)
        self.requested = []

    def read(self, y0, y1, x0, x1):
        self.requested.append((y0, y1, x0, x1))
        return super().read(y0, y1, x0, x1)


def test_memory_is_bounded_by_one_row_of_windows():
    """Rows are handed out once, in order, reading one row of windows at a time; the memory
    allocated while predicting does not grow with the image height."""
    import tracemalloc

    width, tile = 300, 64
    peaks = []
    for height in (200, 2000):
        source = CountingSource(random_image(height, width))
        tiled = TiledPredictor(PixelModel(), tile_size=tile, overlap=16)
        covered = []
        tracemalloc.start()
        for y0, band, valid in tiled.bands(source):
            assert band.shape[1:] == (band.shape[1], width) and band.shape[1] <= tile
            assert valid.all()
            covered.extend(range(y0, y0 + band.shape[1]))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert covered == list(range(height)), "every row handed out once, in order"
        assert {(y1 - y0, x0, x1) for y0, y1, x0, x1 in source.requested} == {(tile, 0, width)}
    assert peaks[1] < 1.2 * peaks[0] and peaks[0] < 20 * (4 + 1) * tile * width * 4


def test_invalid_settings_are_refused():
    for kwargs in ({"tile_size": 128, "overlap": 128}, {"tile_size": 16}, {"mode": "sometimes"},
                   {"tta": ("spin",)}):
        with pytest.raises(ValueError):
            TiledPredictor(PixelModel(), **kwargs)


# --- the real model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_predictor():
    from rooftop_m2f.engine import build_cfg
    from rooftop_m2f.inference.predictor import RooftopPredictor

    torch.manual_seed(0)
    cfg = build_cfg(TINY_CONFIG, ["MODEL.WEIGHTS", ""])  # random initialisation
    return RooftopPredictor(cfg)


def test_real_model_one_window_is_the_one_pass_prediction(tiny_predictor):
    image = random_image(96, 120, seed=3)
    one_pass = tiny_predictor.scores(image).numpy()
    assert np.array_equal(blended(TiledPredictor(tiny_predictor, 128, 32), image), one_pass)
    big = random_image(150, 140, seed=4)
    never = TiledPredictor(tiny_predictor, 128, 32, mode="never")
    assert never.layout(150, 140)[:2] == ([0], [0])
    assert np.array_equal(blended(never, big), tiny_predictor.scores(big).numpy())


def test_real_model_tiles_equal_one_pass_windows_outside_the_band(tiny_predictor):
    height, width = 320, 224  # windows of 128 at rows 0, 96, 192 and columns 0, 96: overlaps of 32
    image = random_image(height, width, seed=5)
    tiled = TiledPredictor(tiny_predictor, tile_size=128, overlap=32)
    scores = blended(tiled, image)
    windows = covering_windows(tiled, height, width)
    assert len(windows) == 6
    count = np.zeros((height, width), dtype=int)
    low = np.full(scores.shape, np.inf, dtype=np.float32)
    high = np.full(scores.shape, -np.inf, dtype=np.float32)
    for y0, x0, th, tw in windows:
        count[y0:y0 + th, x0:x0 + tw] += 1
        crop = tiny_predictor.scores(np.ascontiguousarray(image[y0:y0 + th, x0:x0 + tw])).numpy()
        region = (slice(None), slice(y0, y0 + th), slice(x0, x0 + tw))
        low[region] = np.minimum(low[region], crop)
        high[region] = np.maximum(high[region], crop)
    single = count == 1
    assert single.mean() > 0.5
    assert np.array_equal(scores[:, single], low[:, single]), \
        "outside the band: exactly the window's one-pass scores"
    band = ~single
    assert (scores[:, band] >= low[:, band] - 1e-5).all() and (scores[:, band] <= high[:, band] + 1e-5).all()
    assert np.isfinite(scores).all()


def test_a_scorer_without_torch_predicts_files_and_the_light_modules_import_no_torch(tmp_path):
    """The tiling, sources, mosaic, writers and city layer take any scorer with
    ``scores_batch`` (e.g. an ONNX Runtime session) and import neither torch nor detectron2."""
    import subprocess
    import sys

    from PIL import Image

    from conftest import REPO

    Image.fromarray(random_image(100, 90)).save(tmp_path / "a.png")
    code = f"""
import sys
import numpy as np
from rooftop_m2f.inference import batch, city, mosaic, planner, sources, tiling, vector_layer, writers

class Scorer:
    def scores_batch(self, windows):
        return [np.stack([w[..., 0] < 128, w[..., 0] >= 128]).astype(np.float32) for w in windows]

tiler = tiling.TiledPredictor(Scorer(), 64, 16, batch_size=3)
failures = batch.predict_files(tiler, [{str(tmp_path / "a.png")!r}], {str(tmp_path / "out")!r},
                               ("index", "geojson"))
assert not failures, failures
heavy = [m for m in ("torch", "detectron2", "mask2former") if m in sys.modules]
assert not heavy, heavy
"""
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    index = np.array(Image.open(tmp_path / "out" / "a_index.png"))
    assert np.array_equal(index, (random_image(100, 90)[..., 0] >= 128).astype(np.uint8))
    assert (tmp_path / "out" / "a_polygons.geojson").is_file()
    assert (tmp_path / "out" / "summary.csv").is_file()
