"""City-scale prediction (rooftop_m2f/inference/{mosaic,city,vector_layer,planner}.py and
tools/predict_city.py).

In-process tests use a colour-coded predictor (a pixel of the class palette colour is that class)
on tiles painted with the truth, so the merged layer can be checked against the truth exactly;
the tool is run end to end (subprocess) with the tiny model's seeded random weights."""
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


def paint(mask):
    rgb = np.empty(mask.shape + (3,), dtype=np.uint8)
    rgb[:] = GRAY
    for c in (1, 2, 3):
        rgb[mask == c] = PALETTE[c]
    return rgb


def predict_tiles(paths, out, tile=64, overlap=16, batch_size=1):
    from rooftop_m2f.inference import city
    from rooftop_m2f.inference.tiling import TiledPredictor
    from rooftop_m2f.inference.vector_layer import merge_tile_features, read_features

    predictor = city.CityTilePredictor(TiledPredictor(ColourPredictor(), tile, overlap), batch_size)
    names = city.output_names(paths)
    frames, records = [], []
    for p in paths:
        record = city.predict_input(predictor, city.Unit(p, names[p]), str(out))
        records.append(record)
        if record["status"] == "ok":
            frames.append(read_features(os.path.join(out, record["outputs"]["features"])))
    return merge_tile_features(frames, "EPSG:32734"), records


def write_two_tiles(folder, mask):
    """The class mask (128 x 256) painted as two 128 px GeoTIFF tiles side by side."""
    paths = []
    for c in (0, 1):
        path = str(folder / f"t{c}.tif")
        write_tile(path, paint(mask[:, c * 128:(c + 1) * 128]), mosaic_transform(0, c, 128))
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
    pixel count; the GeoPackage opens with geopandas and its areas agree with pixel counts."""
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
    merged, _ = predict_tiles(paths, tmp_path / "out", tile=64, overlap=16, batch_size=4)
    layer = finish_layer(merged, (0, 0, 0, 0), simplify_m=0.04)  # ROOFTOP.CITY.SIMPLIFY_M
    write_layer(layer, tmp_path / "layer.gpkg", tmp_path / "layer.geojson")
    read = gpd.read_file(tmp_path / "layer.gpkg")
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


def test_zone_totals_equal_a_hand_computation(tmp_path):
    import geopandas as gpd
    from shapely.geometry import box

    from rooftop_m2f.inference.planner import write_summary
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
    write_summary(layer, str(tmp_path), 0.2, str(tmp_path / "zones.geojson"))
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
    from rooftop_m2f.inference import city
    from rooftop_m2f.inference.tiling import TiledPredictor
    from rooftop_m2f.inference.vector_layer import merge_tile_features, read_features

    predictor = city.CityTilePredictor(TiledPredictor(ColourPredictor(), 64, 16))
    record = city.predict_input(predictor, city.Unit(path, "wgs"), str(tmp_path))
    merged = merge_tile_features([read_features(tmp_path / record["outputs"]["features"])],
                                 "EPSG:4326")
    assert metric_crs(merged).to_epsg() == 32734  # UTM 34S for Cape Town
    layer = finish_layer(merged, (0, 0, 0, 0), simplify_m=0.04)
    assert layer.crs.to_epsg() == 4326 and len(layer) == 1
    assert layer.iloc[0]["area_m2"] == pytest.approx(600 * PIXEL_AREA, rel=0.01)


def test_batched_windows_predict_what_single_windows_do(tmp_path):
    import torch

    from rooftop_m2f.engine import build_cfg
    from rooftop_m2f.inference import city
    from rooftop_m2f.inference.sources import RasterioSource
    from rooftop_m2f.inference.tiling import TiledPredictor

    paths, _, _ = make_synthetic_mosaic(tmp_path, rows=1, cols=1, tile=192)
    cfg = build_cfg(TINY_CONFIG, ["ROOFTOP.TILE.SIZE", "64", "ROOFTOP.TILE.OVERLAP", "16"])
    torch.manual_seed(0)
    tiler = TiledPredictor.from_config(cfg)
    results = []
    for batch in (1, 4):
        with RasterioSource(paths[0]) as source:
            results.append(city.CityTilePredictor(tiler, batch).predict(source))
    one, four = results
    assert one.stats.windows == four.stats.windows == 16
    assert (one.mask == four.mask).mean() > 0.999
    assert np.abs(one.confidence_q.astype(int) - four.confidence_q.astype(int)).max() <= 1


def test_parts_of_a_large_input_are_exactly_its_whole_prediction(tmp_path):
    import torch

    from rooftop_m2f.engine import build_cfg
    from rooftop_m2f.inference import city
    from rooftop_m2f.inference.mosaic import scan_inputs
    from rooftop_m2f.inference.sources import RasterioSource
    from rooftop_m2f.inference.tiling import TiledPredictor

    paths, _, _ = make_synthetic_mosaic(tmp_path, rows=1, cols=1, tile=200)
    cfg = build_cfg(TINY_CONFIG, ["ROOFTOP.TILE.SIZE", "64", "ROOFTOP.TILE.OVERLAP", "16"])
    torch.manual_seed(0)
    predictor = city.CityTilePredictor(TiledPredictor.from_config(cfg), 2)
    with RasterioSource(paths[0]) as source:
        whole = predictor.predict(source)
        units = city.plan_units(scan_inputs(paths).inputs, 64, 16, "auto", part_size=48)
        assert len(units) == 16 and all(u.region for u in units)  # window starts 0 48 96 136
        mask = np.full_like(whole.mask, 7)
        conf = np.zeros_like(whole.confidence_q)
        windows = 0
        for unit in units:
            r0, r1, c0, c1 = unit.region
            part = predictor.predict(source, region=unit.region)
            mask[r0:r1, c0:c1] = part.mask
            conf[r0:r1, c0:c1] = part.confidence_q
            windows += part.stats.windows
    assert np.array_equal(mask, whole.mask) and np.array_equal(conf, whole.confidence_q)
    assert windows > whole.stats.windows  # windows across part borders are predicted twice


def test_objects_across_parts_are_merged_like_objects_across_tiles(tmp_path):
    from rooftop_m2f.inference import city
    from rooftop_m2f.inference.mosaic import scan_inputs
    from rooftop_m2f.inference.tiling import TiledPredictor
    from rooftop_m2f.inference.vector_layer import finish_layer, merge_tile_features, read_features

    _, truth = render_canvas(256, 256, seed=5)
    path = str(tmp_path / "big.tif")
    write_tile(path, paint(truth), mosaic_transform())
    predictor = city.CityTilePredictor(TiledPredictor(ColourPredictor(), 64, 16))
    layers = []
    for part_size in (0, 100):
        units = city.plan_units(scan_inputs([path]).inputs, 64, 16, "auto", part_size)
        frames = []
        for unit in units:
            record = city.predict_input(predictor, unit, str(tmp_path / f"p{part_size}"))
            frames.append(read_features(tmp_path / f"p{part_size}" / record["outputs"]["features"]))
        layers.append(finish_layer(merge_tile_features(frames, "EPSG:32734"), (0, 0, 0, 0), 0.0,
                                   (), 0.9))
    whole, parts = layers
    assert len(whole) == len(parts) > 5
    cols = ["class_id", "pixel_count", "area_m2", "sources", "num_tiles"]
    assert whole[cols].equals(parts[cols])
    assert whole.geometry.geom_equals(parts.geometry).all()


# --------------------------------------------------------------------------------------------
# the tool, end to end
# --------------------------------------------------------------------------------------------
TOOL_ARGS = ("--config-file", TINY_CONFIG, "--random-weights")
OVERRIDES = ("ROOFTOP.TILE.SIZE", "64", "ROOFTOP.TILE.OVERLAP", "16")


def read_layer(folder):
    import geopandas as gpd

    return gpd.read_file(os.path.join(folder, "installations.gpkg"))


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


def test_one_run_writes_the_layer_summary_and_tile_outputs(mosaic):
    out = mosaic / "one"
    for name in ("installations.gpkg", "installations_wgs84.geojson", "city_summary.csv",
                 "city_overview.png", "city_summary.png", "run.json", "manifest-rank0.jsonl"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "manifest-rank0.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["status"] == "ok" for r in records)
    import rasterio

    with rasterio.open(out / "tiles" / "tile_0_1_class.tif") as ds:
        assert ds.crs.to_epsg() == 32734 and ds.nodata == 255 and ds.compression is not None
        assert ds.transform.almost_equals(mosaic_transform(0, 1, 128))
    assert not [p for p in out.rglob(".*")], "no temporary files left"
    with open(out / "city_summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["zone"] for r in rows[::3]][:3] == ["ALL", "West", "East"]
    for c in ("1", "2", "3"):  # every installation counted once, in one zone
        per_class = [r for r in rows if r["class_id"] == c]
        assert sum(int(r["installations"]) for r in per_class[1:]) == int(per_class[0]["installations"])
        assert sum(float(r["area_m2"]) for r in per_class[1:]) == pytest.approx(
            float(per_class[0]["area_m2"]), abs=0.05)


def test_a_rerun_skips_finished_inputs_and_a_changed_config_is_refused(mosaic, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(mosaic / "one", out)
    again = run_tool("predict_city.py", *TOOL_ARGS, "--input", mosaic / "in", "--output-dir",
                     out, *OVERRIDES)
    assert "6 of its 6 input(s) already finished: skipped" in again.stdout + again.stderr
    assert_same_layer(mosaic / "one", out)
    changed = run_tool("predict_city.py", *TOOL_ARGS, "--input", mosaic / "in", "--output-dir",
                       out, "ROOFTOP.TILE.SIZE", "96", "ROOFTOP.TILE.OVERLAP", "16", check=False)
    assert changed.returncode == 1
    lines = changed.stderr.strip().splitlines()
    assert len(lines) == 1 and "made with another config or model (the config changed" in lines[0]
    assert "--restart" in lines[0]
    restarted = run_tool("predict_city.py", *TOOL_ARGS, "--input", mosaic / "in", "--output-dir",
                         out, "--restart", "ROOFTOP.TILE.SIZE", "96", "ROOFTOP.TILE.OVERLAP",
                         "16")
    assert "already finished" not in restarted.stdout + restarted.stderr


def test_two_processes_give_the_outputs_of_one(mosaic):
    out = mosaic / "two"
    run_tool("predict_city.py", *TOOL_ARGS, "--input", mosaic / "in", "--output-dir", out,
             "--num-gpus", "2", "--zones", mosaic / "wards.gpkg", *OVERRIDES)
    assert (out / "manifest-rank1.jsonl").is_file()
    assert_same_layer(mosaic / "one", out)
    assert (out / "city_summary.csv").read_text() == (mosaic / "one" / "city_summary.csv").read_text()


def test_two_processes_on_parts_of_the_tiles_give_the_layer_of_one(mosaic):
    out = mosaic / "parts"
    run_tool("predict_city.py", *TOOL_ARGS, "--input", mosaic / "in", "--output-dir", out,
             "--num-gpus", "2", *OVERRIDES, "ROOFTOP.CITY.PART_SIZE", "100")
    assert len(list((out / "tiles").glob("*_class.tif"))) == 6 * 4  # windows start 0, 48, 64
    one, parts = read_layer(mosaic / "one"), read_layer(out)
    cols = ["class_id", "class_name", "pixel_count", "area_m2", "sources", "num_tiles"]
    assert len(one) == len(parts) and one[cols].equals(parts[cols])
    np.testing.assert_allclose(one["confidence"], parts["confidence"], atol=2e-4)
    assert one.geometry.geom_equals(parts.geometry).all()


def test_a_sigkilled_run_resumes_to_the_layer_of_an_uninterrupted_run(mosaic):
    out = mosaic / "killed"
    cmd = [sys.executable, str(REPO / "tools" / "predict_city.py"), *TOOL_ARGS, "--input",
           str(mosaic / "in"), "--output-dir", str(out), *OVERRIDES]
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
    assert 2 <= done_before < 6 and not (out / "installations.gpkg").exists()
    resumed = run_tool("predict_city.py", *TOOL_ARGS, "--input", mosaic / "in", "--output-dir",
                       out, *OVERRIDES)
    assert f"{done_before} of its 6 input(s) already finished: skipped" in \
        resumed.stdout + resumed.stderr
    assert_same_layer(mosaic / "one", out)


def test_mixed_crs_missing_nodata_only_and_corrupt_tiles_are_named_and_the_others_predicted(
        mosaic, tmp_path):
    import rasterio
    import rasterio.shutil

    folder = tmp_path / "in"
    folder.mkdir()
    good = [folder / "tile_0_0.tif", folder / "tile_0_1.tif"]
    for p in good:
        (p).write_bytes((mosaic / "in" / p.name).read_bytes())
    rgb, _ = render_canvas(128, 128, seed=9)
    write_tile(str(folder / "wgs84.tif"), rgb, rasterio.transform.from_origin(18.4, -33.9, 1e-6, 1e-6),
               crs="EPSG:4326")
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
    data = good[0].read_bytes()
    (folder / "corrupt.tif").write_bytes(data[: len(data) // 3])
    rasterio.shutil.copy(str(good[1]), str(folder / "mosaic.vrt"), driver="VRT")
    listing = tmp_path / "tiles.txt"
    listing.write_text("# the mosaic\nin/tile_0_0.tif\nin/missing.tif\n")
    out = tmp_path / "out"
    result = run_tool("predict_city.py", *TOOL_ARGS, "--input", folder, listing, "--output-dir",
                      out, *OVERRIDES, check=False)
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-3000:]
    assert "missing.tif: no such file" in result.stderr
    assert "corrupt.tif: cannot read" in result.stderr
    assert "wgs84.tif: CRS EPSG:4326 differs from the mosaic's EPSG:32734" in result.stderr
    assert "refused, not reprojected" in result.stderr
    assert "empty.tif: no data" in log
    records = {}
    for line in (out / "manifest-rank0.jsonl").read_text().splitlines():
        r = json.loads(line)
        records[os.path.basename(r["input"])] = r
    assert {k: r["status"] for k, r in records.items()} == {
        "tile_0_0.tif": "ok", "tile_0_1.tif": "ok", "half.tif": "ok", "mosaic.vrt": "ok",
        "empty.tif": "nodata", "corrupt.tif": "failed",  # its header reads, its pixels do not
        "alpha.tif": "ok"}
    assert records["alpha.tif"]["nodata_pixels"] == 128 * 64
    assert records["half.tif"]["skipped_windows"] > 0
    assert records["half.tif"]["nodata_pixels"] == 128 * 64
    assert records["empty.tif"]["windows"] == 0
    with rasterio.open(out / "tiles" / "half_class.tif") as ds:
        cls = ds.read(1)
        assert (cls[:, 64:] == 255).all() and (cls[:, :64] != 255).all()
    assert (out / "installations.gpkg").is_file()


class _FailingPredictor(ColourPredictor):
    def scores(self, image):
        raise RuntimeError("CUDA out of memory (a transient failure)")


def _plan(paths, out, part_size=0):
    from rooftop_m2f.inference import city
    from rooftop_m2f.inference.mosaic import scan_inputs

    scan = scan_inputs(paths)
    units = city.plan_units(scan.inputs, 64, 16, "auto", part_size)
    return city.CityPlan("x", [], str(out), paths, scan.crs.to_wkt(), units=units)


def _factory(predictor_class=ColourPredictor):
    from rooftop_m2f.inference import city
    from rooftop_m2f.inference.tiling import TiledPredictor

    return lambda: city.CityTilePredictor(TiledPredictor(predictor_class(), 64, 16))


def test_a_unit_failed_on_another_rank_and_redone_on_resume_counts_as_finished(tmp_path):
    """Run on 2 processes, rank 1 fails its unit; the resume on 1 process redoes it: the unit is
    finished and in the layer, whatever order the ranks' manifests are read in."""
    from types import SimpleNamespace

    from rooftop_m2f.inference import city

    mask = np.zeros((128, 256), dtype=np.uint8)
    mask[10:20, 10:30] = 1
    mask[10:20, 138:158] = 1
    paths = write_two_tiles(tmp_path, mask)
    out = tmp_path / "out"
    out.mkdir()
    plan = _plan(paths, out)
    city.run_shard(plan, 0, 2, _factory())
    city.run_shard(plan, 1, 2, _factory(_FailingPredictor))
    assert city.read_manifests(out, plan.units)["t1"]["status"] == "failed"
    city.run_shard(plan, 0, 1, _factory())  # the resume on one process
    records = city.read_manifests(out, plan.units)
    assert sorted(city.finished(out, records)) == ["t0", "t1"]
    layer = city.merge_run(plan, SimpleNamespace(MIN_AREA_M2=[0, 0, 0, 0], SIMPLIFY_M=0.0,
                                                 RECTANGLE_CLASSES=(), RECTANGLE_MIN_FILL=0.9), 0.2)
    assert sorted(layer["sources"]) == ["t0.tif", "t1.tif"]


def test_a_record_of_another_input_or_part_plan_is_not_the_units(tmp_path):
    """Resume matches a unit's record by its input and region, not only by name; PART_SIZE, which
    decides the units, is fingerprinted."""
    from rooftop_m2f.engine import build_cfg
    from rooftop_m2f.inference import city

    mask = np.zeros((200, 200), dtype=np.uint8)
    mask[150:170, 150:190] = 1
    path = str(tmp_path / "big.tif")
    write_tile(path, paint(mask), mosaic_transform())
    out = tmp_path / "out"
    out.mkdir()
    city.run_shard(_plan([path], out, part_size=48), 0, 1, _factory())
    plan = _plan([path], out, part_size=100)
    assert [u.name for u in plan.units if u.name in city.read_manifests(out)]  # same names
    assert city.finished(out, city.read_manifests(out, plan.units)) == {}  # but not their records
    other = tmp_path / "other"
    other.mkdir()
    write_tile(str(other / "big.tif"), paint(mask), mosaic_transform())
    assert city.finished(out, city.read_manifests(out, _plan([str(other / "big.tif")], out,
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
