"""tools/city_report.py on a synthetic mosaic's truth, polygonised the way the city layer is
(rooftop_m2f.inference.vector_layer) and written the way tools/predict_city.py writes it:
accuracy (the truth scores 1; a degraded prediction scores what the rasters say, and its pixel
IoU is eval_from_png's), registry reconciliation, change between two flights, review flags,
the GeoPackages (version 1.2, default QGIS styles; ogrinfo and QGIS where installed), and bad
inputs as one line with nothing written."""
import csv
import json
import os
import runpy
import shutil
import sqlite3
import subprocess

import numpy as np
import pytest

from conftest import REPO, run_tool

from rooftop_m2f.cli import UsageError, UserError
from rooftop_m2f.classes import CLASS_NAMES, FOREGROUND_CLASSES, PALETTE

SIZE = 384
CRS = "EPSG:32734"
TOOL = runpy.run_path(str(REPO / "tools" / "city_report.py"), run_name="city_report")


def city_report(*argv):
    return TOOL["main"]([str(a) for a in argv])


# --------------------------------------------------------------------------------------------
# synthetic data
# --------------------------------------------------------------------------------------------
def truth_mask():
    from capetown_synthetic.mosaic import render_canvas

    return render_canvas(SIZE, SIZE, seed=5)[1]


def layer_of(mask, simplify_m=0.0, rectangle_classes=(), confidence=230):
    """The city layer of a class raster: the polygonisation, merge and finish of predict_city."""
    from capetown_synthetic.mosaic import mosaic_transform

    from rooftop_m2f.inference.vector_layer import finish_layer, unit_features

    features = unit_features(mask, np.full(mask.shape, confidence, np.uint8), mosaic_transform(),
                             CRS, "mosaic")
    # one unit covering one tile: nothing to merge across units
    merged = features.drop(columns=["at_border", "part"]).assign(sources="mosaic.tif",
                                                                 num_tiles=1)
    return finish_layer(merged, (0, 0, 0, 0), simplify_m, rectangle_classes)


def write_layer(layer, path):
    from rooftop_m2f.inference.vector_layer import write_layer as write

    write(layer, str(path))
    return path


def extent():
    from capetown_synthetic.mosaic import ORIGIN, PIXEL
    from shapely.geometry import box

    x0, y1 = ORIGIN
    return box(x0, y1 - SIZE * PIXEL, x0 + SIZE * PIXEL, y1)


def write_polygons(path, geoms, crs=CRS, **fields):
    import geopandas as gpd

    gpd.GeoDataFrame(fields, geometry=list(geoms), crs=crs).to_file(path, engine="pyogrio")
    return path


def components(mask):
    """(class, pixel set as a boolean raster) of each 4-connected component."""
    from scipy import ndimage

    out = []
    for c in FOREGROUND_CLASSES:
        labels, n = ndimage.label(mask == c)
        out += [(c, labels == k) for k in range(1, n + 1)]
    return out


def empty_box(mask, h, w, west=True):
    """(row, col) of an h x w window of background with a 2 px margin, in the west (east) half."""
    cols = range(2, SIZE // 2 - w - 2, 4) if west else range(SIZE // 2 + 2, SIZE - w - 2, 4)
    for r in range(2, SIZE - h - 2, 4):
        for c in cols:
            if not mask[r - 2:r + h + 2, c - 2:c + w + 2].any():
                return r, c
    raise AssertionError("no empty window")


def degraded(truth):
    """A stand-in for a model's prediction: some objects dropped, one relabelled, one shifted by
    3 px, one grown by dilation, one false object added."""
    from scipy import ndimage

    pred = truth.copy()
    comps = components(truth)
    big = sorted(comps, key=lambda cm: -cm[1].sum())
    for _, m in big[1:4]:               # three dropped (false negatives)
        pred[m] = 0
    c, m = big[5]                       # relabelled: a false negative and a false positive
    pred[m] = 3 if c != 3 else 1
    c, m = big[6]                       # shifted by 3 px
    pred[m] = 0
    pred[np.roll(m, 3, axis=1) & (pred == 0)] = c
    c, m = big[7]                       # grown
    pred[ndimage.binary_dilation(m, iterations=2) & (pred == 0)] = c
    r, c = empty_box(pred, 20, 30)
    pred[r:r + 20, c:c + 30] = 2        # added
    return pred


def pixel_matches(truth, pred, threshold=0.5):
    """Installation-level TP/FP/FN per class from the rasters alone: components matched when
    their pixel IoU is at least ``threshold`` (unique above 0.5 for non-overlapping components)."""
    out = {}
    for c in FOREGROUND_CLASSES:
        t, p = [m for k, m in components(truth) if k == c], [m for k, m in components(pred) if k == c]
        tp = sum(1 for a in t if any((a & b).sum() / (a | b).sum() >= threshold for b in p))
        out[c] = (tp, len(p) - tp, len(t) - tp)
    return out


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    root = tmp_path_factory.mktemp("city_report")
    truth = truth_mask()
    layer = layer_of(truth)
    area = write_polygons(root / "area.gpkg", [extent()], name=["labelled"])
    x0, y0, x1, y1 = extent().bounds
    from shapely.geometry import box

    zones = write_polygons(root / "zones.gpkg", [box(x0, y0, (x0 + x1) / 2, y1),
                                                 box((x0 + x1) / 2, y0, x1, y1)],
                           name=["west", "east"])
    return {"root": root, "truth": truth, "layer": layer,
            "layer_path": write_layer(layer, root / "truth" / "installations.gpkg"),
            "area": area, "zones": zones}


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# accuracy
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("outline", ["pixels", "published"])
def test_the_truth_against_itself_scores_one(mosaic, tmp_path, outline):
    """Pixel outlines, and the published ones (ROOFTOP.CITY.SIMPLIFY_M 0.04 m, panel arrays as
    rectangles)."""
    path = mosaic["layer_path"]
    if outline == "published":
        path = write_layer(layer_of(mosaic["truth"], 0.04, (1,)), tmp_path / "published.gpkg")
        tmp_path = tmp_path / "report"
    assert city_report("accuracy", "--layer", path, "--reference", path, "--area", mosaic["area"],
                       "--zones", mosaic["zones"], "--output-dir", tmp_path) == 0
    figures = read_json(tmp_path / "accuracy.json")["figures"]
    assert set(figures) == {"ALL", "west", "east"}
    n = {c: int((mosaic["layer"]["class_id"] == c).sum()) for c in FOREGROUND_CLASSES}
    assert all(n.values())
    for zone in figures.values():
        for name, f in zone.items():
            if f["reference"] == 0:
                continue
            assert f["precision"] == f["recall"] == f["f1"] == 1.0, (name, f)
            assert f["area_error_rel"] == 0.0 and f["count_error"] == 0
            assert f["pixel_iou"] == pytest.approx(1.0, abs=1e-12)
    for c in FOREGROUND_CLASSES:
        assert figures["ALL"][CLASS_NAMES[c]]["reference"] == n[c]
    # every installation counted once over the zones (a match in its reference's zone)
    assert sum(figures[z]["all"]["true_positives"] for z in ("west", "east")) == sum(n.values())
    import pyogrio

    assert len(pyogrio.read_dataframe(tmp_path / "accuracy.gpkg", layer="false_positives")) == 0
    assert len(pyogrio.read_dataframe(tmp_path / "accuracy.gpkg", layer="true_positives")) == \
        sum(n.values())
    rows = read_csv(tmp_path / "accuracy.csv")
    assert rows[0].keys() >= {"precision", "recall", "f1", "area_error_rel", "pixel_iou",
                              "est_kwp", "est_kwp_low", "est_kwp_high"}
    assert (tmp_path / "accuracy.png").stat().st_size > 10_000


def _eval_from_png(truth, pred, folder):
    from PIL import Image

    from rooftop_m2f.evaluation import png_eval

    for sub, mask in (("gt", truth), ("pred", pred)):
        (folder / sub).mkdir(parents=True)
        Image.fromarray(mask).save(folder / sub / "mosaic.png")
    return png_eval.evaluate_png_dirs(folder / "pred", folder / "gt", progress=False)


@pytest.mark.parametrize("outline", ["pixels", "published"])
def test_a_degraded_prediction_scores_what_its_rasters_say(mosaic, tmp_path, outline):
    """Installation-level counts equal those found on the rasters; pixel IoU over the area equals
    eval_from_png's on the same pixels: exactly (to the report's 6 decimals) with pixel
    outlines, within 0.02 with the
    published outlines (ROOFTOP.CITY.SIMPLIFY_M 0.04 m, panel rectangles)."""
    from rooftop_m2f.reports import accuracy

    truth = mosaic["truth"]
    pred = degraded(truth)
    options = {"pixels": {}, "published": {"simplify_m": 0.04, "rectangle_classes": (1,)}}[outline]
    pred_path = write_layer(layer_of(pred, **options), tmp_path / "pred" / "installations.gpkg")
    data = accuracy.load(pred_path, mosaic["layer_path"], mosaic["area"])
    rows, frames, _ = accuracy.evaluate(data)
    by_class = {r["class_id"]: r for r in rows if r["zone"] == "ALL"}
    metrics = _eval_from_png(truth, pred, tmp_path / "png")
    tolerance = 1e-6 if outline == "pixels" else 0.02
    for c in FOREGROUND_CLASSES:
        assert by_class[c]["pixel_iou"] == pytest.approx(metrics.iou[c], abs=tolerance), c
    assert by_class[""]["pixel_iou"] == pytest.approx(metrics.macro_fg_mIoU, abs=tolerance)
    if outline == "pixels":
        expected = pixel_matches(truth, pred)
        for c, (tp, fp, fn) in expected.items():
            got = by_class[c]
            assert (got["true_positives"], got["false_positives"], got["false_negatives"]) == \
                (tp, fp, fn), c
        assert sum(fn for _, _, fn in expected.values()) >= 4  # the degradations are visible
        assert sum(fp for _, fp, _ in expected.values()) >= 2
        assert len(frames["false_negatives"]) == sum(fn for *_, fn in expected.values())
        # the grown object matches with a positive area error
        assert (frames["true_positives"]["area_error_rel"] > 0.2).any()


def test_a_reference_in_another_crs_is_reprojected(mosaic, tmp_path):
    from rooftop_m2f.reports import accuracy

    ref = mosaic["layer"].to_crs("EPSG:4326")
    ref_path = tmp_path / "labels_wgs84.gpkg"
    ref[["class_name", "geometry"]].to_file(ref_path, engine="pyogrio")
    area = write_polygons(tmp_path / "area_wgs84.gpkg", [extent()]).with_suffix(".gpkg")
    data = accuracy.load(mosaic["layer_path"], ref_path, area)
    assert data.reference.crs == mosaic["layer"].crs
    rows, _, _ = accuracy.evaluate(data)
    total = next(r for r in rows if r["zone"] == "ALL" and r["class_name"] == "all")
    assert total["precision"] == total["recall"] == 1.0
    assert abs(total["area_error_rel"]) < 1e-6


def test_matching_is_one_to_one_with_the_most_matches():
    """Overlapping candidates at a threshold below 0.5: greedy by IoU would match a0-b0 and
    leave two unmatched; the assignment finds two matches."""
    from rooftop_m2f.reports.matching import one_to_one

    ia, jb = one_to_one(np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([0.45, 0.40, 0.35]),
                        2, 2, threshold=0.3)
    assert sorted(zip(ia.tolist(), jb.tolist())) == [(0, 1), (1, 0)]
    ia, _ = one_to_one(np.array([0, 0, 1]), np.array([0, 1, 0]), np.array([0.45, 0.40, 0.35]),
                       2, 2, threshold=0.5)
    assert len(ia) == 0


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
def _registry_points(layer, step=2):
    """WGS84 points on every ``step``-th panel installation, and one far from all of them."""
    panels = layer[layer["class_id"] == 1].reset_index(drop=True)
    on = panels.iloc[::step]
    pts = on.geometry.representative_point().to_crs("EPSG:4326")
    far = extent().centroid
    import geopandas as gpd

    far = gpd.GeoSeries([far], crs=CRS).translate(5000, 0).to_crs("EPSG:4326").iloc[0]
    return panels, on, list(zip(pts.x, pts.y)) + [(far.x, far.y)]


def test_registry_points_on_some_installations(mosaic, tmp_path, caplog):
    panels, on, points = _registry_points(mosaic["layer"])
    lines = ["system_id,longitude,latitude,capacity_kwp"]
    lines += [f"R{k},{x:.8f},{y:.8f},{5 + k}" for k, (x, y) in enumerate(points)]
    lines.insert(3, "BAD1,18.4,not-a-number,3")   # line 4
    lines.insert(5, "BAD2,18.4,95.0,3")           # line 6
    lines.insert(6, "BAD3,18.4")                  # line 7
    path = tmp_path / "registry.csv"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert city_report("registry", "--layer", mosaic["layer_path"], "--registry", path,
                       "--id-field", "system_id", "--distance", "0.5", "--zones", mosaic["zones"],
                       "--output-dir", out) == 0
    report = read_json(out / "registry.json")
    assert [r["where"] for r in report["skipped_rows"]] == ["line 4", "line 6", "line 7"]
    assert f"--registry {path} line 4: latitude 'not-a-number' is not a number; row skipped" \
        in caplog.text
    assert "line 6: longitude/latitude 18.4/95.0 is not a longitude/latitude" in caplog.text
    import pyogrio

    unreg = pyogrio.read_dataframe(out / "registry.gpkg", layer="unregistered")
    not_seen = pyogrio.read_dataframe(out / "registry.gpkg", layer="not_seen")
    expected_unreg = set(panels["installation_id"]) - set(on["installation_id"])
    assert set(unreg["installation_id"]) == expected_unreg
    assert list(not_seen["registry_id"]) == [f"R{len(points) - 1}"]
    assert "coordinates off" in not_seen["check"][0]
    total = read_csv(out / "registry_summary.csv")[0]
    assert total["zone"] == "ALL"
    assert int(total["registered"]) == len(points)
    assert float(total["registered_kwp"]) == sum(5 + k for k in range(len(points)))
    assert int(total["detected"]) == len(panels)
    assert int(total["unregistered"]) == len(expected_unreg)
    assert float(total["detected_kwp_low"]) < float(total["detected_kwp"]) < \
        float(total["detected_kwp_high"])
    zone_rows = read_csv(out / "registry_summary.csv")[1:]
    assert sum(int(r["detected"]) for r in zone_rows) == len(panels)

    # with the imagery's footprint, the far point is outside the imagery
    out_cov = tmp_path / "out_coverage"
    assert city_report("registry", "--layer", mosaic["layer_path"], "--registry", path,
                       "--distance", "0.5", "--coverage", mosaic["area"], "--output-dir",
                       out_cov) == 0
    checks = pyogrio.read_dataframe(out_cov / "registry.gpkg", layer="not_seen")["check"]
    assert list(checks) == ["outside the imagery"]

    # the same registry as x/y in UTM with --registry-crs, and as a point layer: same result
    import geopandas as gpd

    utm = gpd.GeoSeries(gpd.points_from_xy(*zip(*points)), crs="EPSG:4326").to_crs(CRS)
    path2 = tmp_path / "registry_utm.csv"
    path2.write_text("x,y,kwp\n" + "".join(f"{p.x},{p.y},{5 + k}\n" for k, p in enumerate(utm)))
    gpkg = tmp_path / "registry.gpkg"
    gpd.GeoDataFrame({"kwp": [5.0 + k for k in range(len(points))]}, geometry=utm.values,
                     crs=CRS).to_file(gpkg, engine="pyogrio")
    for source, extra in ((path2, ["--registry-crs", CRS]), (gpkg, [])):
        out2 = tmp_path / f"out_{source.stem}"
        assert city_report("registry", "--layer", mosaic["layer_path"], "--registry", source,
                           "--distance", "0.5", "--output-dir", out2, *extra) == 0
        again = read_csv(out2 / "registry_summary.csv")[0]
        assert (again["unregistered"], again["not_seen"]) == (total["unregistered"],
                                                             total["not_seen"])


# --------------------------------------------------------------------------------------------
# change
# --------------------------------------------------------------------------------------------
def test_change_between_two_flights(mosaic, tmp_path):
    from scipy import ndimage

    truth = mosaic["truth"]
    comps = sorted(components(truth), key=lambda cm: -cm[1].sum())
    after = truth.copy()
    removed_cls, removed = comps[2]
    after[removed] = 0
    grown_cls, grown = next((c, m) for c, m in comps[3:] if c == 1)
    after[ndimage.binary_dilation(grown, iterations=6) & (after == 0)] = grown_cls
    shrunk_cls, shrunk = next((c, m) for c, m in comps[3:] if c != 1)
    after[shrunk & ~ndimage.binary_erosion(shrunk, iterations=5)] = 0
    r, c = empty_box(after, 30, 40, west=True)
    after[r:r + 30, c:c + 40] = 1       # new, in the west zone
    after_path = write_layer(layer_of(after), tmp_path / "after" / "installations.gpkg")
    out = tmp_path / "out"
    assert city_report("change", "--before", mosaic["layer_path"], "--after", after_path,
                       "--zones", mosaic["zones"], "--output-dir", out) == 0
    rows = read_csv(out / "change_summary.csv")
    total = {int(r["class_id"]): r for r in rows if r["zone"] == "ALL"}
    assert sum(int(r["removed"]) for r in total.values()) == 1
    assert int(total[removed_cls]["removed"]) == 1
    assert [int(total[c]["new"]) for c in FOREGROUND_CLASSES] == [1, 0, 0]
    assert [int(total[c]["grown"]) for c in FOREGROUND_CLASSES] == [1, 0, 0]
    assert [int(total[c]["shrunk"]) for c in FOREGROUND_CLASSES] == \
        [int(c == shrunk_cls) for c in FOREGROUND_CLASSES]
    for r in total.values():
        assert int(r["after"]) - int(r["before"]) == int(r["new"]) - int(r["removed"])
    # net change = after - before areas; kWp = net area x the density, for panels
    before_area = mosaic["layer"].groupby("class_id")["area_m2"].sum()
    import pyogrio

    after_area = pyogrio.read_dataframe(after_path, layer="installations").groupby("class_id")["area_m2"].sum()
    for c in FOREGROUND_CLASSES:
        assert float(total[c]["net_area_m2"]) == pytest.approx(after_area[c] - before_area[c],
                                                             abs=1e-3)
    assert float(total[1]["net_kwp"]) == pytest.approx(float(total[1]["net_area_m2"]) * 0.2,
                                                       abs=1e-3)
    assert float(total[1]["net_kwp_low"]) < float(total[1]["net_kwp"]) < float(total[1]["net_kwp_high"])
    # per zone: the added object is in the west half (columns 10..60), and zones add up
    zones = {(r["zone"], int(r["class_id"])): r for r in rows}
    assert int(zones[("west", 1)]["new"]) == 1
    for c in FOREGROUND_CLASSES:
        for key in ("new", "removed", "grown", "shrunk"):
            assert int(zones[("west", c)][key]) + int(zones[("east", c)][key]) == \
                int(total[c][key]), (c, key)
    new = pyogrio.read_dataframe(out / "change.gpkg", layer="new")
    changed = pyogrio.read_dataframe(out / "change.gpkg", layer="changed")
    assert len(new) == sum(int(r["new"]) for r in total.values())
    assert sorted(changed["change"]) == ["grown", "shrunk"]
    assert (changed["area_change_rel"].abs() >= 0.2).all()
    assert "zone" in changed.columns


# --------------------------------------------------------------------------------------------
# review flags and the GeoPackages
# --------------------------------------------------------------------------------------------
def test_review_flags_low_confidence_and_implausible_sizes():
    from rooftop_m2f.reports.review import review_flags

    flags, reasons = review_flags([2, 1, 3, 1], [40.0, 10.0, 30.0, 0.5], [0.9, 0.4, 0.8, 0.9])
    assert flags.tolist() == [True, True, False, True]
    assert "40.0 m² > 12 m² for solar_water_heater" in reasons[0]
    assert "confidence 0.40 < 0.5" in reasons[1]
    assert reasons[2] == ""
    assert "< 1 m² for solar_panel" in reasons[3]


def _gpkg_version(path):
    with sqlite3.connect(path) as db:
        return (db.execute("pragma application_id").fetchone()[0],
                db.execute("pragma user_version").fetchone()[0])


def test_geopackages_are_version_1_2_with_default_styles(mosaic, tmp_path):
    import xml.etree.ElementTree as ET

    import pyogrio

    from rooftop_m2f.reports.gpkg import read_styles

    path = mosaic["layer_path"]
    assert city_report("review", "--layer", path, "--min-confidence", "0.95", "--output-dir",
                       tmp_path / "review") == 0
    assert city_report("accuracy", "--layer", path, "--reference", path, "--area", mosaic["area"],
                       "--output-dir", tmp_path / "acc") == 0
    reviewed = tmp_path / "review" / "installations_review.gpkg"
    for gpkg in (reviewed, tmp_path / "acc" / "accuracy.gpkg"):
        assert _gpkg_version(gpkg) == (0x47504B47, 10200)  # "GPKG", 1.2.0
        styles = read_styles(gpkg)
        layers = [str(n) for n, _ in pyogrio.list_layers(gpkg) if n != "layer_styles"]
        assert sorted(styles["f_table_name"]) == sorted(layers)
        assert styles["useAsDefault"].all() and (styles["f_geometry_column"] == "geom").all()
        with sqlite3.connect(gpkg) as db:
            kinds = dict(db.execute("select table_name, data_type from gpkg_contents"))
        assert kinds["layer_styles"] == "attributes"
    layer = pyogrio.read_dataframe(reviewed, layer="installations")
    assert layer["review"].all()  # every confidence (0.9) is below 0.95
    qml = read_styles(reviewed)["styleQML"][0]
    root = ET.fromstring(qml.split("\n", 1)[1])
    renderer = root.find("renderer-v2")
    assert renderer.get("type") == "categorizedSymbol" and "class_id" in renderer.get("attr")
    colours = {}
    for cat in renderer.find("categories"):
        symbol = renderer.find(f"symbols/symbol[@name='{cat.get('symbol')}']")
        props = {p.get("k"): p.get("v") for p in symbol.iter("prop")}
        colours[cat.get("value")] = (props["color"], props["outline_color"], props["outline_width"])
    labels = {cat.get("value"): cat.get("label") for cat in renderer.find("categories")}
    for c in FOREGROUND_CLASSES:
        rgb = ",".join(map(str, PALETTE[c]))
        assert colours[str(c)][0].startswith(rgb)
        assert labels[str(c)] == CLASS_NAMES[c].replace("_", " ")
        assert colours[f"{c} review"][1] == "255,0,255,255"  # outlined in magenta
        assert float(colours[f"{c} review"][2]) > float(colours[str(c)][2])


@pytest.mark.skipif(shutil.which("ogrinfo") is None,
                    reason="GDAL's ogrinfo is not installed (Debian: apt-get install gdal-bin)")
def test_ogrinfo_opens_the_reports_without_a_warning(mosaic, tmp_path):
    path = mosaic["layer_path"]
    assert city_report("accuracy", "--layer", path, "--reference", path, "--area", mosaic["area"],
                       "--output-dir", tmp_path) == 0
    assert city_report("review", "--layer", path, "--output-dir", tmp_path) == 0
    for gpkg in ("accuracy.gpkg", "installations_review.gpkg"):
        result = subprocess.run(["ogrinfo", "-ro", "-so", "-al", str(tmp_path / gpkg)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "Warning" not in result.stderr and "ERROR" not in result.stderr, result.stderr
        assert "Layer name: layer_styles" in result.stdout


QGIS_CHECK = r'''
import json, sys
from qgis.core import (QgsApplication, QgsExpressionContext, QgsExpressionContextUtils,
                       QgsRenderContext, QgsVectorLayer)
app = QgsApplication([], False)
app.initQgis()
layer = QgsVectorLayer(sys.argv[1] + "|layername=installations", "installations", "ogr")
renderer = layer.renderer()
ctx = QgsRenderContext()
ctx.setExpressionContext(QgsExpressionContext(QgsExpressionContextUtils.globalProjectLayerScopes(layer)))
renderer.startRender(ctx, layer.fields())
drawn = []
for f in layer.getFeatures():
    ctx.expressionContext().setFeature(f)
    s = renderer.symbolForFeature(f, ctx)
    drawn.append([f["class_id"], bool(f["review"]), s.color().name(),
                  s.symbolLayer(0).strokeColor().name()])
renderer.stopRender(ctx)
print("QGIS " + json.dumps({"valid": layer.isValid(), "renderer": renderer.type(), "drawn": drawn}))
'''


def _qgis_python():
    python = shutil.which("python3", path="/usr/bin")
    if python is None:
        return None
    probe = subprocess.run([python, "-c", "import qgis.core"], capture_output=True, timeout=60)
    return python if probe.returncode == 0 else None


@pytest.mark.skipif(_qgis_python() is None,
                    reason="QGIS's Python bindings are not installed (Debian: apt-get install "
                           "python3-qgis)")
def test_qgis_opens_the_layer_with_its_default_style(mosaic, tmp_path):
    from rooftop_m2f.reports import gpkg
    from rooftop_m2f.reports.review import with_review

    layer = with_review(mosaic["layer"].assign(confidence=np.where(
        np.arange(len(mosaic["layer"])) % 3 == 0, 0.3, 0.9)))
    path = gpkg.write_installations(tmp_path / "installations.gpkg", layer)
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen",
           "XDG_RUNTIME_DIR": str(tmp_path / "xdg")}
    result = subprocess.run([_qgis_python(), "-c", QGIS_CHECK, str(path)], capture_output=True,
                            text=True, timeout=120, env=env)
    line = next(x for x in result.stdout.splitlines() if x.startswith("QGIS "))
    report = json.loads(line[5:])
    assert report["valid"] and report["renderer"] == "categorizedSymbol"
    assert len(report["drawn"]) == len(layer)
    for class_id, to_review, fill, stroke in report["drawn"]:
        assert fill == "#%02x%02x%02x" % PALETTE[class_id]
        assert (stroke == "#ff00ff") == to_review


# --------------------------------------------------------------------------------------------
# bad inputs: one line, before anything is written
# --------------------------------------------------------------------------------------------
def test_bad_inputs_are_one_line_and_write_nothing(mosaic, tmp_path):
    import geopandas as gpd

    layer, area = mosaic["layer_path"], mosaic["area"]
    no_class = write_polygons(tmp_path / "no_class.gpkg", [extent()], kind=["pv"])
    empty_area = tmp_path / "empty_area.gpkg"
    gpd.GeoDataFrame({"name": []}, geometry=gpd.GeoSeries([], crs=CRS), crs=CRS).to_file(
        empty_area, engine="pyogrio")
    no_crs = tmp_path / "no_crs.gpkg"
    with pytest.warns(UserWarning):
        gpd.GeoDataFrame({"class_id": [1]}, geometry=[extent()]).to_file(no_crs, engine="pyogrio")
    bad_class = write_polygons(tmp_path / "bad_class.gpkg", [extent()], class_id=[7])
    no_coords = tmp_path / "no_coords.csv"
    no_coords.write_text("id,address,kwp\n1,Main Rd,5\n")
    no_area = tmp_path / "no_area.gpkg"
    mosaic["layer"].drop(columns=["area_m2"]).to_file(no_area, layer="installations",
                                                      engine="pyogrio")
    out = tmp_path / "out"
    cases = [
        (["accuracy", "--layer", layer, "--reference", no_class, "--area", area],
         f"--reference {no_class}: no field class_id, class_name or class"),
        (["accuracy", "--layer", layer, "--reference", layer, "--area", empty_area],
         f"--area {empty_area}: the labelled area is empty"),
        (["accuracy", "--layer", layer, "--reference", no_crs, "--area", area],
         f"--reference {no_crs}: has no CRS, so it cannot be reprojected"),
        (["accuracy", "--layer", layer, "--reference", bad_class, "--area", area],
         "field class_id has 1 value(s) that are not a foreground class: '7' (1)"),
        (["registry", "--layer", layer, "--registry", no_coords],
         f"--registry {no_coords}: no coordinates"),
        (["registry", "--layer", no_area, "--registry", no_coords],
         f"--layer {no_area}: no field area_m2"),
        (["change", "--before", layer, "--after", tmp_path / "gone.gpkg"],
         "--after " + str(tmp_path / "gone.gpkg") + ": no such file"),
        (["accuracy", "--layer", layer, "--reference", layer, "--area", area, "--iou", "0"],
         "--iou 0.0: must be in (0, 1]"),
    ]
    for argv, message in cases:
        with pytest.raises(UserError) as e:
            city_report(*argv, "--output-dir", out)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert not out.exists() or not os.listdir(out), os.listdir(out)


def test_an_earlier_report_is_not_overwritten(mosaic, tmp_path):
    path = mosaic["layer_path"]
    argv = ["accuracy", "--layer", path, "--reference", path, "--area", mosaic["area"],
            "--output-dir", tmp_path]
    assert city_report(*argv) == 0
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    with pytest.raises(UsageError, match="holds an earlier report"):
        city_report(*argv)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    # another kind of report may share the folder
    assert city_report("review", "--layer", path, "--output-dir", tmp_path) == 0


def test_the_tool_reports_a_bad_input_in_one_line(mosaic, tmp_path):
    no_class = write_polygons(tmp_path / "no_class.gpkg", [extent()], kind=["pv"])
    result = run_tool("city_report.py", "accuracy", "--layer", mosaic["layer_path"],
                      "--reference", no_class, "--area", mosaic["area"], "--output-dir",
                      tmp_path / "out", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("city_report.py: error: --reference") and "class" in lines[0]
    assert not (tmp_path / "out").exists()
