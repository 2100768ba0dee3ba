"""City-scale prediction (rooftop_m2f/inference/{mosaic,city,vector_layer,planner}.py and
tools/predict_city.py).

In-process tests use a colour-coded scorer (a pixel of the class palette colour is that class)
on tiles painted with the truth, so the merged layer can be checked against the truth exactly;
the same layer from any tiling is checked with that scorer blurred (its scores then depend on
each window's content) and the same pixels with the tiny model's seeded random weights; the
tool is run end to end (subprocess) with those weights."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, TINY_CONFIG, run_tool

from capetown_synthetic import (
    make_synthetic_mosaic,
    mosaic_transform,
    render_canvas,
    write_tile,
)
from rooftop_m2f.classes import CLASS_NAMES
from rooftop_m2f.data.capetown import PALETTE

GRAY = (90, 90, 90)
PIXEL_AREA = 0.08 * 0.08


class ColourPredictor:
    """scores(image) -> (4, h, w): one-hot of the palette colour of each pixel (else background)."""

    def scores(self, image):
        out = np.zeros((4,) + image.shape[:2], dtype=np.float32)
        out[0] = 1.0
        for c in (1, 2, 3):
            hit = np.all(image == np.array(PALETTE[c], dtype=np.uint8), axis=-1)
            out[c][hit] = 1.0
            out[0][hit] = 0.0
        return out


class BlurredColourPredictor(ColourPredictor):
    """The colour scores box-filtered over 5 px with zero padding: a window's scores near its
    edges depend on where the window is."""

    def scores(self, image):
        from scipy import ndimage

        return ndimage.uniform_filter(super().scores(image), (1, 5, 5), mode="constant")


def city_config(**values):
    """The default ``ROOFTOP.CITY`` config with ``values``."""
    from rooftop_m2f.config import get_rooftop_cfg

    node = get_rooftop_cfg().ROOFTOP.CITY
    node.update(values)
    return node


def paint(mask):
    rgb = np.empty(mask.shape + (3,), dtype=np.uint8)
    rgb[:] = GRAY
    for c in (1, 2, 3):
        rgb[mask == c] = PALETTE[c]
    return rgb


def make_plan(paths, out, tile=64, overlap=16, part_size=0, zones=None):
    from rooftop_m2f.inference import city
    from rooftop_m2f.inference.mosaic import scan_inputs

    scan = scan_inputs([str(p) for p in paths])
    assert not scan.refused, scan.refused
    os.makedirs(os.path.join(out, "tiles"), exist_ok=True)
    os.makedirs(os.path.join(out, "units"), exist_ok=True)
    units = city.plan_units(scan.mosaic, tile, overlap, "auto", part_size)
    return city.CityPlan("x", [], str(out), scan.mosaic, units, zones=zones)


def tiler_factory(scorer_class=ColourPredictor, tile=64, overlap=16, batch_size=1):
    from rooftop_m2f.inference.tiling import TiledPredictor

    return lambda: TiledPredictor(scorer_class(), tile, overlap, batch_size=batch_size)


def predict_tiles(paths, out, tile=64, overlap=16, batch_size=1, part_size=0,
                  scorer_class=ColourPredictor):
    """(merged features, manifest records) of a one-process run over ``paths``."""
    from rooftop_m2f.inference import city
    from rooftop_m2f.inference.vector_layer import merge_features, read_features

    plan = make_plan(paths, out, tile, overlap, part_size)
    city.run_shard(plan, 0, 1, tiler_factory(scorer_class, tile, overlap, batch_size))
    city.cut_tiles(plan)
    records = city.read_manifests(out, plan.units)
    paths = [os.path.join(out, r["outputs"]["features"]) for r in records.values()
             if r["status"] == "ok"]
    return merge_features(read_features(paths, plan.mosaic.georef.crs), plan.mosaic), records


def write_two_tiles(folder, mask):
    """The class mask (128 x 256) painted as two 128 px GeoTIFF tiles side by side."""
    paths = []
    for c in (0, 1):
        path = str(folder / f"t{c}.tif")
        write_tile(path, paint(mask[:, c * 128:(c + 1) * 128]), mosaic_transform(0, c, 128))
        paths.append(path)
    return paths


def write_tiling(folder, rgb, row_cuts, col_cuts):
    """``rgb`` cut at the given rows and columns into GeoTIFF tiles of the mosaic's grid."""
    from rasterio.transform import from_origin

    from capetown_synthetic.mosaic import ORIGIN, PIXEL

    folder.mkdir(parents=True, exist_ok=True)
    rows, cols = [0, *row_cuts, rgb.shape[0]], [0, *col_cuts, rgb.shape[1]]
    paths = []
    for r0, r1 in zip(rows[:-1], rows[1:]):
        for c0, c1 in zip(cols[:-1], cols[1:]):
            path = str(folder / f"tile_r{r0}_c{c0}.tif")
            write_tile(path, rgb[r0:r1, c0:c1],
                       from_origin(ORIGIN[0] + c0 * PIXEL, ORIGIN[1] - r0 * PIXEL, PIXEL, PIXEL))
            paths.append(path)
    return paths


def test_a_panel_array_straddling_two_tiles_is_one_polygon_with_the_area_of_its_pixels(tmp_path):
    from rooftop_m2f.inference.vector_layer import finish_layer

    mask = np.zeros((128, 256), dtype=np.uint8)
    mask[40:61, 100:171] = 1      # 21 x 71 panel array across the border at x = 128
    mask[90:95, 20:30] = 2        # a water heater inside the left tile
    paths = write_two_tiles(tmp_path, mask)
    merged, _ = predict_tiles(paths, tmp_path / "out")
    layer = finish_layer(merged, (0, 0, 0, 0), simplify_m=0.08)
    panels = layer[layer["class_id"] == 1]
    assert len(panels) == 1, panels
    panel = panels.iloc[0]
    assert panel["pixel_count"] == 21 * 71
    assert panel["area_m2"] == pytest.approx(21 * 71 * PIXEL_AREA, rel=1e-9)
    assert panel["num_tiles"] == 2 and panel["sources"] == "t0.tif;t1.tif"
    assert panel["shape"] == "rectangle"
    assert panel.geometry.area == pytest.approx(21 * 71 * PIXEL_AREA, rel=1e-6)
    assert panel["confidence"] == pytest.approx(1.0)
    heaters = layer[layer["class_id"] == 2]
    assert len(heaters) == 1 and heaters.iloc[0]["num_tiles"] == 1


def test_the_merged_layer_of_a_synthetic_mosaic_matches_its_truth(tmp_path):
    """Every truth component (4-connected, over the whole mosaic) is one installation with its
    pixel count, merged across unit borders; the GeoPackage opens with geopandas and its areas
    agree with pixel counts."""
    import geopandas as gpd
    from scipy import ndimage

    from rooftop_m2f.inference.vector_layer import finish_layer, write_layer

    _, truth = render_canvas(256, 384, seed=5)
    paths = []
    for r in range(2):
        for c in range(3):
            path = str(tmp_path / f"tile_{r}_{c}.tif")
            write_tile(path, paint(truth[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128]),
                       mosaic_transform(r, c, 128))
            paths.append(path)
    merged, records = predict_tiles(paths, tmp_path / "out", batch_size=4, part_size=100)
    assert len(records) == 3 * 4  # units of ~100 px (96 at window starts), whatever the tiles
    layer = finish_layer(merged, (0, 0, 0, 0), simplify_m=0.04)  # ROOFTOP.CITY.SIMPLIFY_M
    write_layer([layer.iloc[:3], layer.iloc[3:]], tmp_path / "layer.gpkg", tmp_path / "layer.geojson")
    read = gpd.read_file(tmp_path / "layer.gpkg", layer="installations")
    assert read.crs.to_epsg() == 32734 and len(read) == len(layer)
    crossing, shapes = 0, {}
    for c in (1, 2, 3):
        labels, count = ndimage.label(truth == c)
        sizes = sorted(np.bincount(labels.ravel())[1:].tolist())
        mine = read[read["class_id"] == c]
        assert len(mine) == count, (c, len(mine), count)
        assert sorted(mine["pixel_count"].tolist()) == sizes
        crossing += int((mine["num_tiles"] > 1).sum())
        np.testing.assert_allclose(mine["area_m2"], mine["pixel_count"] * PIXEL_AREA, rtol=1e-6)
        # the published outlines: simplified ones within 1 % of the pixel area; rectangles cover
        # the pixels and exceed them by at most 1 - ROOFTOP.CITY.RECTANGLE_MIN_FILL of their area
        outline = (mine["shape"] == "outline").to_numpy()
        np.testing.assert_allclose(mine.geometry.area[outline], mine["area_m2"][outline], rtol=0.01)
        ratio = mine["area_m2"][~outline] / mine.geometry.area[~outline]
        assert ((ratio >= 0.9 - 1e-9) & (ratio <= 1 + 1e-9)).all()
        shapes[c] = mine["shape"].value_counts().to_dict()
    assert crossing > 0, "the mosaic has objects across tile borders"
    assert shapes[1].get("rectangle", 0) > 0 and not shapes[2].get("rectangle")
    wgs = gpd.read_file(tmp_path / "layer.geojson")
    assert wgs.crs.to_epsg() == 4326 and len(wgs) == len(read)
    assert np.allclose(read.geometry.centroid.to_crs("EPSG:4326").x, wgs["lon"], atol=1e-6)


@pytest.fixture(scope="module")
def tiny_tiler():
    import torch

    from rooftop_m2f.engine import build_cfg
    from rooftop_m2f.inference.tiling import TiledPredictor

    cfg = build_cfg(TINY_CONFIG, ["MODEL.WEIGHTS", "", "ROOFTOP.TILE.SIZE", "64",
                                  "ROOFTOP.TILE.OVERLAP", "16"])
    torch.manual_seed(0)
    return TiledPredictor.from_config(cfg, batch_size=2)


@pytest.mark.slow
def test_every_tiling_of_the_same_pixels_gets_the_same_prediction(tmp_path, tiny_tiler):
    """1 image, 2 tiles, 2 x 2 tiles and 3 x 1 tiles of different sizes: the classes and the
    blended scores' confidence are the same, pixel for pixel (the tiny model, seeded weights)."""
    from rooftop_m2f.inference.mosaic import scan_inputs

    rgb, _ = render_canvas(160, 200, seed=5)
    results = []
    for name, rows, cols in (("one", [], []), ("two", [], [90]), ("four", [70], [120]),
                             ("three", [40, 100], [])):
        scan = scan_inputs(write_tiling(tmp_path / name, rgb, rows, cols))
        assert not scan.refused and (scan.mosaic.height, scan.mosaic.width) == (160, 200)
        with scan.mosaic.open() as source:
            results.append(tiny_tiler.predict(source, confidence=np.float32))
    for other in results[1:]:
        assert np.array_equal(other.mask, results[0].mask)
        assert np.array_equal(other.confidence, results[0].confidence)
    assert results[0].windows == 3 * 4 and (results[0].mask != 255).all()


def test_gaps_overlaps_and_tiles_on_another_grid(tmp_path):
    """A gap between tiles has no data; where tiles overlap the first with data gives the
    pixels; a tile off the grid or with another pixel size is refused in one line naming it."""
    from rasterio.transform import from_origin

    from capetown_synthetic.mosaic import ORIGIN, PIXEL
    from rooftop_m2f.inference.mosaic import scan_inputs

    rng = np.random.default_rng(0)
    a, b = (rng.integers(1, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2))
    b_with_hole = b.copy()
    b_with_hole[:8] = 0  # nodata: the first rows of b come from a under it
    x0, y0 = ORIGIN
    write_tile(str(tmp_path / "b.tif"), b_with_hole, from_origin(x0, y0, PIXEL, PIXEL), nodata=0)
    write_tile(str(tmp_path / "a.tif"), a, from_origin(x0 + 32 * PIXEL, y0, PIXEL, PIXEL))
    write_tile(str(tmp_path / "c.tif"), a, from_origin(x0 + 128 * PIXEL, y0, PIXEL, PIXEL))
    write_tile(str(tmp_path / "half.tif"), a, from_origin(x0 + 0.5 * PIXEL, y0, PIXEL, PIXEL))
    write_tile(str(tmp_path / "coarse.tif"), a, from_origin(x0, y0, 2 * PIXEL, 2 * PIXEL))
    scan = scan_inputs([str(tmp_path / n) for n in ("b.tif", "a.tif", "c.tif", "half.tif",
                                                    "coarse.tif")])
    assert sorted(os.path.basename(p) for p in scan.refused) == ["coarse.tif", "half.tif"]
    for message in scan.refused.values():
        assert "is not the mosaic's" in message and "refused, not resampled" in message
    mosaic = scan.mosaic
    assert (mosaic.height, mosaic.width) == (64, 192)
    with mosaic.open() as source:
        rgb, valid = source.read(0, 64, 0, 192)
    assert np.array_equal(rgb[8:, :64], b[8:]) and np.array_equal(rgb[:8, 32:64], a[:8, :32])
    assert not valid[:8, :32].any() and (rgb[:8, :32] == 0).all()  # in no tile's data
    assert np.array_equal(rgb[:, 64:96], a[:, 32:]) and valid[:, :96][8:].all()
    assert not valid[:, 96:128].any() and (rgb[:, 96:128] == 0).all()  # the gap
    assert np.array_equal(rgb[:, 128:], a)


@pytest.mark.slow
def test_the_layer_and_summary_are_the_same_for_1_2_and_4_tiles(tmp_path):
    """The same pixels as 1, 2 and 4 tiles, predicted in units of ~100 px: every column of the
    layer but the tiles it lies on (``sources``, ``num_tiles``) is identical, installation ids
    included, and so is the planner's summary."""
    import geopandas as gpd

    from rooftop_m2f.inference import city

    _, truth = render_canvas(256, 384, seed=5)
    rgb = paint(truth)
    city_cfg = city_config()
    layers, summaries = [], []
    for name, rows, cols in (("one", [], []), ("two", [], [192]), ("four", [128], [200])):
        out = tmp_path / name / "out"
        plan = make_plan(write_tiling(tmp_path / name, rgb, rows, cols), out, part_size=100)
        city.run_shard(plan, 0, 1, tiler_factory(BlurredColourPredictor))
        city.cut_tiles(plan)
        city.merge_run(plan, city_cfg)
        layers.append(read_layer(out))
        summaries.append((out / "city_summary.csv").read_text())
    assert len(layers[0]) > 5 and (layers[2]["num_tiles"] > 1).any()
    for layer, summary in zip(layers[1:], summaries[1:]):
        assert layer.drop(columns=["sources", "num_tiles"]).equals(
            layers[0].drop(columns=["sources", "num_tiles"]))
        assert summary == summaries[0]


def test_zone_totals_equal_a_hand_computation(tmp_path):
    import geopandas as gpd
    from shapely.geometry import box

    from rooftop_m2f.inference.planner import Summary
    from rooftop_m2f.inference.vector_layer import finish_layer

    mask = np.zeros((128, 256), dtype=np.uint8)
    mask[10:20, 10:30] = 1      # 200 px, west
    mask[50:60, 110:150] = 1    # 400 px across the zone border (x = 128 px), centroid west
    mask[100:110, 200:220] = 1  # 200 px, east
    mask[30:35, 160:170] = 2    # 50 px, east
    mask[80:90, 60:70] = 3      # 100 px, west
    paths = write_two_tiles(tmp_path, mask)
    merged, _ = predict_tiles(paths, tmp_path / "out")
    layer = finish_layer(merged, (0, 0, 0, 0), simplify_m=0.0)
    x0, y0 = 260000.0, 6240000.0
    border_x = x0 + 128 * 0.08 + 0.4  # zones split 5 px east of the tile border
    zones = gpd.GeoDataFrame({"suburb": ["West", "East"]},
                             geometry=[box(x0 - 10, y0 - 20, border_x, y0 + 10),
                                       box(border_x, y0 - 20, x0 + 40, y0 + 10)],
                             crs="EPSG:32734").to_crs("EPSG:4326")
    zones.to_file(tmp_path / "zones.geojson", driver="GeoJSON")
    summary = Summary(str(tmp_path), str(tmp_path / "zones.geojson"), crs=layer.crs)
    summary.add(layer.iloc[:2])  # in two chunks, as a run's merge gives it
    summary.add(layer.iloc[2:])
    summary.close()
    with open(tmp_path / "city_summary.csv", newline="") as f:
        rows = {(r["zone"], int(r["class_id"])): r for r in csv.DictReader(f)}
    a = PIXEL_AREA
    expected = {("ALL", 1): (3, 800 * a), ("ALL", 2): (1, 50 * a), ("ALL", 3): (1, 100 * a),
                ("West", 1): (2, 600 * a), ("West", 2): (0, 0.0), ("West", 3): (1, 100 * a),
                ("East", 1): (1, 200 * a), ("East", 2): (1, 50 * a), ("East", 3): (0, 0.0)}
    assert set(rows) == set(expected)
    for key, (count, area) in expected.items():
        assert int(rows[key]["installations"]) == count, key
        assert float(rows[key]["area_m2"]) == pytest.approx(area, abs=0.01), key
    assert float(rows[("ALL", 1)]["est_kwp"]) == pytest.approx(800 * a * 0.2, abs=0.01)
    assert float(rows[("West", 1)]["est_kwp"]) == pytest.approx(600 * a * 0.2, abs=0.01)
    for name in ("city_overview.png", "city_summary.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_a_geographic_mosaic_gets_its_areas_in_utm(tmp_path):
    import math

    import rasterio

    from rooftop_m2f.inference.vector_layer import finish_layer, metric_crs

    lat = -33.9
    dy = 0.08 / 110_900.0                                    # ~8 cm in degrees of latitude
    dx = 0.08 / (111_320.0 * math.cos(math.radians(lat)))    # and of longitude
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[10:30, 5:35] = 1
    path = str(tmp_path / "wgs.tif")
    write_tile(path, paint(mask), rasterio.transform.from_origin(18.4, lat, dx, dy),
               crs="EPSG:4326")
    merged, _ = predict_tiles([path], tmp_path / "out")
    assert metric_crs(merged).to_epsg() == 32734  # UTM 34S for Cape Town
    layer = finish_layer(merged, (0, 0, 0, 0), simplify_m=0.04)
    assert layer.crs.to_epsg() == 4326 and len(layer) == 1
    assert layer.iloc[0]["area_m2"] == pytest.approx(600 * PIXEL_AREA, rel=0.01)


@pytest.mark.slow
def test_batched_windows_predict_what_single_windows_do(tmp_path, tiny_tiler):
    from rooftop_m2f.inference.mosaic import scan_inputs
    from rooftop_m2f.inference.tiling import TiledPredictor

    paths, _, _ = make_synthetic_mosaic(tmp_path, rows=1, cols=1, tile=192)
    results = []
    for batch in (1, 4):
        tiler = TiledPredictor(tiny_tiler.scorer, 64, 16, batch_size=batch)
        with scan_inputs(paths).mosaic.open() as source:
            results.append(tiler.predict(source, confidence=np.uint8))
    one, four = results
    assert one.windows == four.windows == 16
    assert (one.mask == four.mask).mean() > 0.999
    assert np.abs(one.confidence.astype(int) - four.confidence.astype(int)).max() <= 1


@pytest.mark.slow
def test_parts_of_a_mosaic_are_exactly_its_whole_prediction(tmp_path, tiny_tiler):
    from rooftop_m2f.inference import city
    from rooftop_m2f.inference.mosaic import scan_inputs

    paths, _, _ = make_synthetic_mosaic(tmp_path, rows=1, cols=2, tile=100)
    mosaic = scan_inputs(paths).mosaic
    with mosaic.open() as source:
        whole = tiny_tiler.predict(source, confidence=np.uint8)
    units = city.plan_units(mosaic, 64, 16, "auto", part_size=48)
    assert len(units) == 2 * 4  # window starts 0 36 (rows) and 0 48 96 136 (columns)
    mask = np.full_like(whole.mask, 7)
    conf = np.zeros_like(whole.confidence)
    windows = 0
    for unit in units:
        r0, r1, c0, c1 = unit.region
        with mosaic.open(unit.extent) as source:
            part = tiny_tiler.predict(source, unit.region, confidence=np.uint8)
        mask[r0:r1, c0:c1] = part.mask
        conf[r0:r1, c0:c1] = part.confidence
        windows += part.windows
    assert np.array_equal(mask, whole.mask) and np.array_equal(conf, whole.confidence)
    assert windows > whole.windows  # windows across part borders are predicted twice


def test_objects_across_parts_are_merged_like_objects_across_tiles(tmp_path):
    from rooftop_m2f.inference.vector_layer import finish_layer

    _, truth = render_canvas(256, 256, seed=5)
    path = str(tmp_path / "big.tif")
    write_tile(path, paint(truth), mosaic_transform())
    layers = []
    for part_size in (0, 100):
        merged, records = predict_tiles([path], tmp_path / f"p{part_size}", part_size=part_size)
        assert len(records) == (1 if part_size == 0 else 9)
        layers.append(finish_layer(merged, (0, 0, 0, 0), 0.0, (), 0.9))
    whole, parts = layers
    assert len(whole) == len(parts) > 5
    cols = ["class_id", "pixel_count", "area_m2", "sources", "num_tiles"]
    assert whole[cols].equals(parts[cols])
    assert whole.geometry.geom_equals(parts.geometry).all()


# --------------------------------------------------------------------------------------------
# the tool, end to end
# --------------------------------------------------------------------------------------------
TOOL_ARGS = ("--config-file", TINY_CONFIG, "--random-weights")
# units of ~100 px: the 384 x 256 px mosaic is 4 x 3 units, whatever its 6 tiles
OVERRIDES = ("ROOFTOP.TILE.SIZE", "64", "ROOFTOP.TILE.OVERLAP", "16", "ROOFTOP.CITY.PART_SIZE", "100")


def read_layer(folder):
    import geopandas as gpd

    return gpd.read_file(os.path.join(folder, "installations.gpkg"), layer="installations")


def assert_same_layer(a, b):
    import geopandas as gpd

    la, lb = read_layer(a), read_layer(b)
    assert len(la) == len(lb)
    assert la.drop(columns="geometry").equals(lb.drop(columns="geometry"))
    assert gpd.GeoSeries(la.geometry).geom_equals_exact(gpd.GeoSeries(lb.geometry), 0).all()
    import rasterio

    for name in sorted(os.listdir(os.path.join(a, "tiles"))):
        if name.endswith("_class.tif"):
            with rasterio.open(os.path.join(a, "tiles", name)) as x, \
                    rasterio.open(os.path.join(b, "tiles", name)) as y:
                assert np.array_equal(x.read(), y.read()), name


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    import geopandas as gpd
    from shapely.geometry import box

    folder = tmp_path_factory.mktemp("mosaic")
    make_synthetic_mosaic(folder / "in", rows=2, cols=3, tile=128)
    x0, y0 = 260000.0, 6240000.0  # the mosaic is 384 x 256 px of 8 cm: split at x + 15 m
    gpd.GeoDataFrame({"ward": ["West", "East"]},
                     geometry=[box(x0, y0 - 20.48, x0 + 15, y0), box(x0 + 15, y0 - 20.48, x0 + 30.72, y0)],
                     crs="EPSG:32734").to_file(folder / "wards.gpkg")
    out = folder / "one"
    run_tool("predict_city.py", *TOOL_ARGS, "--input", folder / "in", "--output-dir", out,
             "--zones", folder / "wards.gpkg", *OVERRIDES)
    return folder


@pytest.mark.slow
def test_one_run_writes_the_layer_summary_and_tile_outputs(mosaic):
    out = mosaic / "one"
    for name in ("installations.gpkg", "installations_wgs84.geojson", "city_summary.csv",
                 "city_overview.png", "city_summary.png", "run.json", "manifest-rank0.jsonl"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "manifest-rank0.jsonl").read_text().splitlines()]
    assert len(records) == 12 and all(r["status"] == "ok" for r in records)
    assert len(list((out / "units").glob("*_class.tif"))) == 12
    import rasterio

    assert len(list((out / "tiles").glob("*_class.tif"))) == 6
    with rasterio.open(out / "tiles" / "tile_0_1_class.tif") as ds:
        assert ds.crs.to_epsg() == 32734 and ds.nodata == 255 and ds.compression is not None
        assert ds.transform.almost_equals(mosaic_transform(0, 1, 128)) and ds.shape == (128, 128)
        assert (ds.read(1) != 255).all()
    assert not [p for p in out.rglob(".*")], "no temporary files left"
    with open(out / "city_summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["zone"] for r in rows[::3]][:3] == ["ALL", "West", "East"]
    for c in ("1", "2", "3"):  # every installation counted once, in one zone
        per_class = [r for r in rows if r["class_id"] == c]
        assert sum(int(r["installations"]) for r in per_class[1:]) == int(per_class[0]["installations"])
        assert sum(float(r["area_m2"]) for r in per_class[1:]) == pytest.approx(
            float(per_class[0]["area_m2"]), abs=0.05)


@pytest.mark.slow
def test_a_rerun_skips_finished_units_and_a_changed_config_is_refused(mosaic, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(mosaic / "one", out)
    again = run_tool("predict_city.py", *TOOL_ARGS, "--input", mosaic / "in", "--output-dir",
                     out, "--zones", mosaic / "wards.gpkg", *OVERRIDES)
    assert "12 of its 12 unit(s) already finished: skipped" in again.stdout + again.stderr
    assert_same_layer(mosaic / "one", out)
    changed = run_tool("predict_city.py", *TOOL_ARGS, "--input", mosaic / "in", "--output-dir",
                       out, *OVERRIDES, "ROOFTOP.TILE.SIZE", "96", check=False)
    assert changed.returncode == 1
    lines = changed.stderr.strip().splitlines()
    assert len(lines) == 1 and "made with another config or model (the config changed" in lines[0]
    assert "--restart" in lines[0]
    restarted = run_tool("predict_city.py", *TOOL_ARGS, "--input", mosaic / "in", "--output-dir",
                         out, "--restart", *OVERRIDES, "ROOFTOP.TILE.SIZE", "96")
    assert "already finished" not in restarted.stdout + restarted.stderr


@pytest.mark.slow
def test_the_layer_has_kwp_bounds_and_review_flags_and_opens_as_geopackage_1_2_styled(mosaic):
    """The layer's est_kwp (panels: area x 0.2, its bounds 0.15 and 0.25; other classes 0) and
    review flags (confidence below 0.5, areas outside the class's range) are those of the
    documented defaults, the summary adds them up, and the GeoPackage is version 1.2 with the
    default QGIS style (read with pyogrio; opened by GDAL's ogrinfo without a warning)."""
    import shutil
    import sqlite3

    from rooftop_m2f.reports.gpkg import read_styles

    out = mosaic / "one"
    layer = read_layer(out)
    assert len(layer) > 0
    panel = (layer["class_id"] == 1).to_numpy()
    area = layer["area_m2"].to_numpy()
    for name, density in (("est_kwp", 0.2), ("est_kwp_low", 0.15), ("est_kwp_high", 0.25)):
        np.testing.assert_allclose(layer[name], np.where(panel, area * density, 0), atol=6e-4)
    bounds = {1: (1, 5000), 2: (0.8, 12), 3: (2, 150)}
    lo, hi = (np.array([bounds[c][k] for c in layer["class_id"]]) for k in (0, 1))
    expected = (layer["confidence"].to_numpy() < 0.5) | (area < lo) | (area > hi)
    assert layer["review"].dtype == bool and (layer["review"].to_numpy() == expected).all()
    assert ((layer["review_reason"] != "") == layer["review"]).all()
    with open(out / "city_summary.csv", newline="") as f:
        rows = {(r["zone"], r["class_id"]): r for r in csv.DictReader(f)}
    for c in ("1", "2", "3"):
        mine = layer[layer["class_id"] == int(c)]
        assert int(rows[("ALL", c)]["to_review"]) == int(mine["review"].sum())
    for name in ("est_kwp", "est_kwp_low", "est_kwp_high"):
        assert float(rows[("ALL", "1")][name]) == pytest.approx(layer[name].sum(), abs=0.01)
        assert rows[("ALL", "2")][name] == ""
    with sqlite3.connect(out / "installations.gpkg") as db:
        assert db.execute("pragma user_version").fetchone()[0] == 10200  # GeoPackage 1.2.0
    styles = read_styles(out / "installations.gpkg")
    assert list(styles["f_table_name"]) == ["installations"] and styles["useAsDefault"].all()
    assert "review" in styles["styleQML"][0]  # installations to review outlined
    if shutil.which("ogrinfo") is None:
        pytest.skip("GDAL's ogrinfo is not installed (Debian: apt-get install gdal-bin)")
    info = subprocess.run(["ogrinfo", "-ro", "-so", str(out / "installations.gpkg"),
                           "installations"], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0 and not info.stderr.strip(), info.stderr
    for field in ("est_kwp_low: Real", "est_kwp_high: Real", "review: Integer(Boolean)",
                  "review_reason: String"):
        assert field in info.stdout, info.stdout


@pytest.mark.slow
def test_city_report_accuracy_on_the_runs_layer_agrees_with_eval_from_png(mosaic, tmp_path):
    """The seeded model's layer, merged again with pixel outlines (no speckle dropped, no
    simplification, no rectangles: keys that only shape the layer, so the finished units are
    reused, not refused), through city_report.py accuracy against the mosaic's truth: its pixel
    IoU per class is eval_from_png's on the run's class rasters and the truth. The review and kWp
    keys change the published columns on that rerun."""
    import shutil

    import geopandas as gpd
    import rasterio
    from PIL import Image
    from shapely.geometry import box

    from capetown_synthetic.mosaic import ORIGIN, PIXEL
    from rooftop_m2f.evaluation import png_eval
    from rooftop_m2f.inference.vector_layer import unit_features

    out = tmp_path / "pixels"
    shutil.copytree(mosaic / "one", out)
    rerun = run_tool("predict_city.py", *TOOL_ARGS, "--input", mosaic / "in", "--output-dir", out,
                     *OVERRIDES, "ROOFTOP.CITY.MIN_AREA_M2", "[0, 0, 0, 0]",
                     "ROOFTOP.CITY.SIMPLIFY_M", "0.0", "ROOFTOP.CITY.RECTANGLE_CLASSES", "[]",
                     "ROOFTOP.CITY.REVIEW_MIN_CONFIDENCE", "0.99",
                     "ROOFTOP.CITY.KWP_PER_M2_HIGH", "0.3")
    assert "12 of its 12 unit(s) already finished: skipped" in rerun.stdout + rerun.stderr
    layer = read_layer(out)
    assert layer["review"].all()  # the model's confidences are below 0.99
    panel = (layer["class_id"] == 1).to_numpy()
    np.testing.assert_allclose(layer["est_kwp_high"], np.where(panel, layer["area_m2"] * 0.3, 0),
                               atol=6e-4)
    truth = render_canvas(256, 384, 128, 5)[1]  # the fixture's mosaic: 2 x 3 tiles of 128 px
    pred = np.zeros_like(truth)
    for r in range(2):
        for c in range(3):
            with rasterio.open(out / "tiles" / f"tile_{r}_{c}_class.tif") as ds:
                pred[r * 128:(r + 1) * 128, c * 128:(c + 1) * 128] = ds.read(1)
    assert len(np.unique(pred)) > 1
    x0, y1 = ORIGIN
    reference = unit_features(truth, np.full(truth.shape, 255, np.uint8), mosaic_transform(),
                              "EPSG:32734", "truth")
    reference[["class_id", "geometry"]].to_file(tmp_path / "truth.gpkg", engine="pyogrio")
    gpd.GeoDataFrame({"name": ["mosaic"]},
                     geometry=[box(x0, y1 - 256 * PIXEL, x0 + 384 * PIXEL, y1)], crs="EPSG:32734").to_file(tmp_path / "area.gpkg", engine="pyogrio")
    for layer_dir, report in ((out, "report"), (mosaic / "one", "published")):
        run_tool("city_report.py", "accuracy", "--layer", layer_dir / "installations.gpkg",
                 "--reference", tmp_path / "truth.gpkg", "--area", tmp_path / "area.gpkg",
                 "--output-dir", tmp_path / report)
    with open(tmp_path / "report" / "accuracy.json") as f:
        figures = json.load(f)["figures"]["ALL"]
    for sub, mask in (("gt", truth), ("pred", pred)):
        (tmp_path / sub).mkdir()
        Image.fromarray(mask).save(tmp_path / sub / "mosaic.png")
    metrics = png_eval.evaluate_png_dirs(tmp_path / "pred", tmp_path / "gt", progress=False)
    compared = 0
    for c in (1, 2, 3):
        got = figures[CLASS_NAMES[c]]["pixel_iou"]
        if np.isnan(metrics.iou[c]):
            assert got is None, c
            continue
        assert got == pytest.approx(metrics.iou[c], abs=1e-6), c
        compared += 1
    assert compared > 0
    assert (tmp_path / "published" / "accuracy.json").is_file()  # the published layer reads too


@pytest.mark.slow
def test_two_processes_give_the_outputs_of_one(mosaic):
    out = mosaic / "two"
    run_tool("predict_city.py", *TOOL_ARGS, "--input", mosaic / "in", "--output-dir", out,
             "--num-gpus", "2", "--zones", mosaic / "wards.gpkg", *OVERRIDES)
    assert (out / "manifest-rank1.jsonl").is_file()
    assert_same_layer(mosaic / "one", out)
    assert (out / "city_summary.csv").read_text() == (mosaic / "one" / "city_summary.csv").read_text()


@pytest.mark.slow
def test_two_processes_on_other_units_give_the_layer_of_one(mosaic):
    out = mosaic / "parts"
    run_tool("predict_city.py", *TOOL_ARGS, "--input", mosaic / "in", "--output-dir", out,
             "--num-gpus", "2", *OVERRIDES, "ROOFTOP.CITY.PART_SIZE", "200")
    assert len(list((out / "units").glob("*_class.tif"))) == 2 * 2  # windows start 0, 192
    # the same installations; their ids follow the rows of units, which differ
    one, parts = (read_layer(f).sort_values(["class_id", "lat", "lon"], ignore_index=True)
                  for f in (mosaic / "one", out))
    assert one.drop(columns=["installation_id", "confidence", "geometry"]).equals(
        parts.drop(columns=["installation_id", "confidence", "geometry"]))
    np.testing.assert_allclose(one["confidence"], parts["confidence"], atol=2e-4)
    assert one.geometry.geom_equals(parts.geometry).all()


@pytest.mark.slow
def test_a_sigkilled_run_resumes_to_the_layer_of_an_uninterrupted_run(mosaic):
    out = mosaic / "killed"
    cmd = [sys.executable, str(REPO / "tools" / "predict_city.py"), *TOOL_ARGS, "--input",
           str(mosaic / "in"), "--output-dir", str(out), "--zones", str(mosaic / "wards.gpkg"),
           *OVERRIDES]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    manifest = out / "manifest-rank0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if manifest.is_file() and manifest.read_text().count("\n") >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = manifest.read_text().count("\n")
    assert 2 <= done_before < 12 and not (out / "installations.gpkg").exists()
    resumed = run_tool("predict_city.py", *TOOL_ARGS, "--input", mosaic / "in", "--output-dir",
                       out, "--zones", mosaic / "wards.gpkg", *OVERRIDES)
    assert f"{done_before} of its 12 unit(s) already finished: skipped" in \
        resumed.stdout + resumed.stderr
    assert_same_layer(mosaic / "one", out)


@pytest.mark.slow
def test_refused_missing_nodata_only_and_corrupt_tiles_are_named_and_the_others_predicted(
        mosaic, tmp_path):
    """Another CRS, another grid, missing: refused before the work; a corrupt tile (its header
    reads, its pixels do not) fails the units that read it, naming it, and nothing else; gaps,
    nodata and alpha have no data."""
    import rasterio
    import rasterio.shutil
    from rasterio.transform import from_origin

    folder = tmp_path / "in"
    folder.mkdir()
    good = [folder / "tile_0_0.tif", folder / "tile_0_1.tif"]
    for p in good:
        (p).write_bytes((mosaic / "in" / p.name).read_bytes())
    rgb, _ = render_canvas(128, 128, seed=9)
    write_tile(str(folder / "wgs84.tif"), rgb, from_origin(18.4, -33.9, 1e-6, 1e-6), crs="EPSG:4326")
    t = mosaic_transform(0, 2, 128)
    write_tile(str(folder / "shifted.tif"), rgb, from_origin(t.c + 0.04, t.f, 0.08, 0.08))
    write_tile(str(folder / "empty.tif"), np.zeros((128, 128, 3), np.uint8),
               mosaic_transform(1, 0, 128), nodata=0)
    half = rgb.copy()
    half[:, 64:] = 0  # the east half without data: those windows are skipped
    write_tile(str(folder / "half.tif"), half, mosaic_transform(1, 1, 128), nodata=0)
    with rasterio.open(folder / "alpha.tif", "w", driver="GTiff", height=128, width=128, count=4,
                       dtype="uint8", crs="EPSG:32734", transform=mosaic_transform(1, 2, 128),
                       photometric="RGB", alpha="YES") as ds:
        alpha = np.full((128, 128), 255, np.uint8)
        alpha[64:] = 0  # the south half transparent: no data
        ds.write(np.concatenate([rgb.transpose(2, 0, 1), alpha[None]]))
    write_tile(str(tmp_path / "whole.tif"), rgb, mosaic_transform(3, 0, 128))  # row 2: a gap
    data = (tmp_path / "whole.tif").read_bytes()
    (folder / "corrupt.tif").write_bytes(data[: len(data) // 3])
    rasterio.shutil.copy(str(good[1]), str(folder / "mosaic.vrt"), driver="VRT")  # an overlap
    listing = tmp_path / "tiles.txt"
    listing.write_text("# the mosaic\nin/tile_0_0.tif\nin/missing.tif\n")
    out = tmp_path / "out"
    result = run_tool("predict_city.py", *TOOL_ARGS, "--input", folder, listing, "--output-dir",
                      out, *OVERRIDES, check=False)
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-3000:]
    assert "missing.tif: no such file" in result.stderr
    assert "wgs84.tif: CRS EPSG:4326 differs from the mosaic's EPSG:32734" in result.stderr
    assert "refused, not reprojected" in result.stderr
    assert "shifted.tif: pixel grid" in result.stderr and "refused, not resampled" in result.stderr
    assert "empty.tif: no data" in log
    records = [json.loads(line) for line in (out / "manifest-rank0.jsonl").read_text().splitlines()]
    failed = [r for r in records if r["status"] == "failed"]
    assert failed and all("corrupt.tif: cannot read" in r["message"] for r in failed)
    assert all(r["region"][0] >= 3 * 128 - 64 for r in failed)  # only units that read it
    assert "corrupt.tif: cannot read" in result.stderr
    assert not any(r["region"][0] in range(256, 384 - 64) for r in records)  # the gap: no units
    assert sum(r.get("skipped_windows", 0) for r in records) > 0
    with rasterio.open(out / "tiles" / "half_class.tif") as ds:
        cls = ds.read(1)
        assert (cls[:, 64:] == 255).all() and (cls[:, :64] != 255).all()
    with rasterio.open(out / "tiles" / "alpha_class.tif") as ds:
        cls = ds.read(1)
        assert (cls[64:] == 255).all() and (cls[:64] != 255).all()
    with rasterio.open(out / "tiles" / "empty_class.tif") as ds:
        assert (ds.read(1) == 255).all()
    with rasterio.open(out / "tiles" / "mosaic_class.tif") as x, \
            rasterio.open(out / "tiles" / "tile_0_1_class.tif") as y:
        assert np.array_equal(x.read(), y.read())  # cut from the same mosaic pixels
    assert not (out / "tiles" / "corrupt_class.tif").exists()  # its units failed
    assert (out / "installations.gpkg").is_file()


def test_predict_city_under_torchrun_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    result = run_tool("predict_city.py", *TOOL_ARGS, "--input", tmp_path, "--output-dir",
                      tmp_path / "out", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "WORLD_SIZE=2 (torchrun)" in lines[0] and "--num-gpus" in lines[0]
    assert not (tmp_path / "out").exists()


class _FailingPredictor(ColourPredictor):
    def scores(self, image):
        raise RuntimeError("CUDA out of memory (a transient failure)")


def test_a_unit_failed_on_another_rank_and_redone_on_resume_counts_as_finished(tmp_path):
    """Run on 2 processes, rank 1 fails its unit; the resume on 1 process redoes it: the unit is
    finished and in the layer, whatever order the ranks' manifests are read in."""

    from rooftop_m2f.inference import city

    mask = np.zeros((128, 256), dtype=np.uint8)
    mask[10:20, 10:30] = 1
    mask[10:20, 138:158] = 1
    out = tmp_path / "out"
    plan = make_plan(write_two_tiles(tmp_path, mask), out, part_size=128)
    assert [u.name for u in plan.units] == ["r0_c0", "r0_c144"]
    city.run_shard(plan, 0, 2, tiler_factory())
    city.run_shard(plan, 1, 2, tiler_factory(_FailingPredictor))
    assert city.read_manifests(out, plan.units)["r0_c144"]["status"] == "failed"
    city.cut_tiles(plan)
    assert os.listdir(out / "tiles") == ["t0_class.tif"]  # t1's unit failed: not cut
    city.run_shard(plan, 0, 1, tiler_factory())  # the resume on one process
    records = city.read_manifests(out, plan.units)
    assert sorted(city.finished(out, records)) == ["r0_c0", "r0_c144"]
    city.cut_tiles(plan)
    assert sorted(os.listdir(out / "tiles")) == ["t0_class.tif", "t1_class.tif"]
    city.merge_run(plan, city_config(MIN_AREA_M2=[0, 0, 0, 0], SIMPLIFY_M=0.0,
                                     RECTANGLE_CLASSES=[]))
    assert sorted(read_layer(out)["sources"]) == ["t0.tif", "t1.tif"]


def test_a_record_of_another_mosaic_or_part_plan_is_not_the_units(tmp_path):
    """Resume matches a unit's record by its key (region, grid, tiles read), not only by name;
    PART_SIZE, which decides the units, is fingerprinted."""
    from rooftop_m2f.engine import build_cfg
    from rooftop_m2f.inference import city

    mask = np.zeros((200, 200), dtype=np.uint8)
    mask[150:170, 150:190] = 1
    path = str(tmp_path / "big.tif")
    write_tile(path, paint(mask), mosaic_transform())
    out = tmp_path / "out"
    city.run_shard(make_plan([path], out, part_size=48), 0, 1, tiler_factory())
    plan = make_plan([path], out, part_size=100)
    assert [u.name for u in plan.units if u.name in city.read_manifests(out)]  # same names
    assert city.finished(out, city.read_manifests(out, plan.units)) == {}  # but not their records
    other = tmp_path / "other"
    other.mkdir()
    write_tile(str(other / "big.tif"), paint(mask), mosaic_transform())
    assert city.finished(out, city.read_manifests(out, make_plan([str(other / "big.tif")], out,
                                                                 part_size=48).units)) == {}
    assert city.fingerprint(build_cfg(TINY_CONFIG, ["ROOFTOP.CITY.PART_SIZE", "48"]), True) != \
        city.fingerprint(build_cfg(TINY_CONFIG, ["ROOFTOP.CITY.PART_SIZE", "100"]), True)
    assert city.fingerprint(build_cfg(TINY_CONFIG, ["ROOFTOP.CITY.MIN_AREA_M2", "[0, 1, 1, 1]"]),
                            True) == city.fingerprint(build_cfg(TINY_CONFIG, []), True)


def test_web_mercator_areas_are_measured_in_utm(tmp_path):
    """Web Mercator is in metres but its areas are 1.45x at Cape Town: areas come from UTM."""
    import geopandas as gpd
    from shapely.geometry import box

    from rooftop_m2f.inference.vector_layer import metric_crs

    utm = box(260000.0, 6245000.0, 260010.0, 6245010.0)  # 100 m² in UTM 34S, at Cape Town
    frame = gpd.GeoDataFrame(geometry=[utm], crs="EPSG:32734").to_crs("EPSG:3857")
    assert frame.area.iloc[0] > 140  # what a planar area in Web Mercator would say
    assert metric_crs(frame).to_epsg() == 32734
    assert frame.to_crs(metric_crs(frame)).area.iloc[0] == pytest.approx(100.0, rel=1e-3)
    lo19 = gpd.GeoDataFrame(geometry=[utm], crs="EPSG:32734").to_crs("EPSG:22279")
    assert metric_crs(lo19).to_epsg() == 22279  # Transverse Mercator: kept
