"""Every prediction output parsed back and checked against the mask it came from; image sources
(grayscale, RGBA, 16-bit, truncated, GeoTIFF with and without CRS)."""
import csv
import json
import math

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.features import rasterize
from rasterio.transform import from_origin
from shapely.geometry import shape

from rooftop_m2f.data.capetown import PALETTE, decode_mask
from rooftop_m2f.images import DatasetError, read_image
from rooftop_m2f.inference import writers
from rooftop_m2f.inference.sources import GeoReference, open_image

GSD = 0.08
ORIGIN = (261000.0, 6245000.0)  # UTM 34S (EPSG:32734), Cape Town


@pytest.fixture(scope="module")
def mask():
    """Shapes with known pixel counts: a rectangle, a donut (hole kept), a disk, two blobs
    touching only at a corner (two 4-connected components)."""
    m = np.zeros((96, 128), dtype=np.uint8)
    m[5:15, 5:25] = 1                                   # 200 px
    m[30:45, 10:25] = 2                                 # donut: 225 - 25 = 200 px
    m[35:40, 15:20] = 0
    yy, xx = np.mgrid[:96, :128]
    m[(yy - 60) ** 2 + (xx - 80) ** 2 <= 15 ** 2] = 1   # disk
    m[70:74, 10:14] = 3
    m[74:78, 14:18] = 3                                 # diagonal neighbour: separate component
    m[85:90, 100:128] = 3                               # touches the image border
    return m


def by_class(features, class_id):
    return [f for f in features if f["properties"]["class_id"] == class_id]


def test_index_and_color_png_round_trip(mask, tmp_path):
    writers.write_index_png(writers.ImagePrediction("i.png", mask), tmp_path / "i.png")
    writers.write_color_png(writers.ImagePrediction("c.png", mask), tmp_path / "c.png")
    assert np.array_equal(np.array(Image.open(tmp_path / "i.png")), mask)
    color = np.array(Image.open(tmp_path / "c.png"))
    for class_id, rgb in enumerate(PALETTE):
        assert (color[mask == class_id] == rgb).all()
    assert np.array_equal(decode_mask(color), mask)
    assert not list(tmp_path.glob(".*")), "no temporary files left"


def test_coords_json_is_argwhere_per_class(mask, tmp_path):
    writers.write_coords_json(writers.ImagePrediction("in/tile_7.png", mask), tmp_path / "c.json")
    payload = json.loads((tmp_path / "c.json").read_text())
    assert payload["image_name"] == "tile_7.png"
    assert sorted(payload["predicted_coords"]) == ["class_1", "class_2", "class_3"]
    for c in (1, 2, 3):
        coords = payload["predicted_coords"][f"class_{c}"]
        assert coords == np.argwhere(mask == c).tolist()
        rebuilt = np.zeros_like(mask)
        rebuilt[tuple(np.array(coords).T)] = 1
        assert np.array_equal(rebuilt == 1, mask == c)


def test_geojson_polygons_in_pixels_match_pixel_counts_and_holes(mask, tmp_path):
    exact = writers.mask_features(mask, gsd=GSD, simplify_px=0)
    assert [len(by_class(exact, c)) for c in (1, 2, 3)] == [2, 1, 3]
    for f in exact:
        polygon = shape(f["geometry"])
        assert polygon.is_valid
        assert polygon.area == f["properties"]["pixel_count"]
        assert f["properties"]["area_m2"] == pytest.approx(polygon.area * GSD ** 2)
    donut = shape(by_class(exact, 2)[0]["geometry"])
    assert len(donut.interiors) == 1 and donut.area == 200
    # the polygons cover exactly the class pixels (x = column, y = row)
    for c in (1, 2, 3):
        burnt = rasterize([(f["geometry"], 1) for f in by_class(exact, c)], out_shape=mask.shape)
        assert np.array_equal(burnt == 1, mask == c)

    writers.write_geojson(writers.ImagePrediction("tile.png", mask, gsd=0.1), tmp_path / "p.geojson")
    payload = json.loads((tmp_path / "p.geojson").read_text())
    assert payload["coordinates"] == "pixel" and payload["image_name"] == "tile.png"
    simplified = payload["features"]
    assert [f["properties"]["pixel_count"] for f in simplified] == \
        [f["properties"]["pixel_count"] for f in exact]
    for f in simplified:
        polygon = shape(f["geometry"])
        n = f["properties"]["pixel_count"]
        assert f["properties"]["area_m2"] == pytest.approx(n * 0.01)
        # simplified within 1 px: the area moves by at most the outline length x 1 px
        assert abs(polygon.area - n) <= polygon.exterior.length + sum(r.length for r in polygon.interiors)
    disk = max(by_class(simplified, 1), key=lambda f: f["properties"]["pixel_count"])
    exact_disk = max(by_class(exact, 1), key=lambda f: f["properties"]["pixel_count"])
    assert abs(shape(disk["geometry"]).area / disk["properties"]["pixel_count"] - 1) < 0.05
    assert len(disk["geometry"]["coordinates"][0]) < len(exact_disk["geometry"]["coordinates"][0]) / 2, \
        "simplification must drop the staircase vertices"
    assert len(shape(by_class(simplified, 2)[0]["geometry"]).interiors) == 1


def georef():
    return GeoReference(rasterio.crs.CRS.from_epsg(32734), from_origin(*ORIGIN, GSD, GSD))


def test_geotiff_and_georeferenced_geojson_round_trip(mask, tmp_path):
    ref = georef()
    writers.write_geotiff(mask, tmp_path / "m.tif", ref)
    with rasterio.open(tmp_path / "m.tif") as ds:
        assert ds.crs.to_epsg() == 32734
        assert ds.transform.almost_equals(ref.transform)
        assert ds.dtypes[0] == "uint8" and ds.count == 1
        assert np.array_equal(ds.read(1), mask)
        assert ds.colormap(1)[1][:3] == PALETTE[1]

    writers.write_geojson(writers.ImagePrediction("ortho.tif", mask, georef=ref, gsd=99.0),
                          tmp_path / "g.geojson", simplify_px=0)
    payload = json.loads((tmp_path / "g.geojson").read_text())
    assert payload["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32734"
    for f in payload["features"]:
        polygon = shape(f["geometry"])
        n = f["properties"]["pixel_count"]
        # areas from the GeoTIFF's pixel size (0.08 m), not from the gsd argument
        assert f["properties"]["area_m2"] == pytest.approx(n * GSD ** 2)
        assert polygon.area == pytest.approx(n * GSD ** 2, rel=1e-6)
        x0, y0, x1, y1 = polygon.bounds
        assert ORIGIN[0] <= x0 and x1 <= ORIGIN[0] + 128 * GSD
        assert ORIGIN[1] - 96 * GSD <= y0 and y1 <= ORIGIN[1]
    for c in (1, 2, 3):  # back to pixels through the GeoTIFF's transform
        burnt = rasterize([(f["geometry"], 1) for f in by_class(payload["features"], c)],
                          out_shape=mask.shape, transform=ref.transform)
        assert np.array_equal(burnt == 1, mask == c)


def test_summary_counts_components_pixels_and_area(mask, tmp_path):
    rows = writers.class_summary(mask, "t.png", gsd=0.5)
    assert [(r["class_id"], r["components"], r["pixels"]) for r in rows] == \
        [(1, 2, int((mask == 1).sum())), (2, 1, 200), (3, 3, 16 + 16 + 140)]
    assert rows[1]["area_m2"] == pytest.approx(50.0)
    writers.write_summary_csv(rows + writers.class_summary(mask, "geo.tif", georef()),
                              tmp_path / "s.csv")
    with open(tmp_path / "s.csv", newline="") as f:
        back = list(csv.DictReader(f))
    assert len(back) == 6 and back[3]["image"] == "geo.tif"
    assert float(back[4]["area_m2"]) == pytest.approx(200 * GSD ** 2)
    assert int(back[2]["components"]) == 3


def test_web_mercator_pixels_get_their_ground_area(mask):
    """A Web Mercator raster (metres, areas x1/cos²(lat) at Cape Town) gets the ground area of its
    pixels, as its UTM equivalent does; a Transverse Mercator one keeps its pixel size."""
    from pyproj import Transformer

    x, y = Transformer.from_crs("EPSG:32734", "EPSG:3857", always_xy=True).transform(*ORIGIN)
    lat = Transformer.from_crs("EPSG:32734", "EPSG:4326", always_xy=True).transform(*ORIGIN)[1]
    size = GSD / math.cos(math.radians(lat))  # 8 cm on the ground, in Web Mercator metres
    mercator = GeoReference(rasterio.crs.CRS.from_epsg(3857), from_origin(x, y, size, size))
    assert mercator.pixel_area == pytest.approx(GSD ** 2 * 1.45, rel=0.02)  # the planar trap
    assert mercator.pixel_area_m2 == pytest.approx(GSD ** 2, rel=1e-4)
    rows = writers.class_summary(mask, "web.tif", mercator)
    assert rows[1]["area_m2"] == pytest.approx(200 * GSD ** 2, rel=1e-3)
    assert georef().pixel_area_m2 == georef().pixel_area == pytest.approx(GSD ** 2)


# --- sources ----------------------------------------------------------------------------------

def test_sources_convert_like_read_image(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full((40, 50), 7, np.uint8)])).save(tmp_path / "rgba.png")
    sixteen = rgb[..., 1].astype(np.uint16) * 257
    Image.fromarray(sixteen).save(tmp_path / "sixteen.png")
    assert np.array_equal(open_image(str(tmp_path / "gray.png")).read_all(),
                          np.repeat(rgb[..., :1], 3, axis=2))
    assert np.array_equal(open_image(str(tmp_path / "rgba.png")).read_all(), rgb)
    assert np.array_equal(open_image(str(tmp_path / "sixteen.png")).read_all()[..., 0], rgb[..., 1])

    # the same 16-bit data as a 1-band GeoTIFF, read in strips: same scaling as the PNG
    with rasterio.open(tmp_path / "s16.tif", "w", driver="GTiff", height=40, width=50, count=1,
                       dtype="uint16", crs="EPSG:32734", transform=from_origin(*ORIGIN, GSD, GSD)) as ds:
        ds.write(sixteen, 1)
    with open_image(str(tmp_path / "s16.tif")) as src:
        assert src.georef is not None and src.georef.metres
        assert src.georef.pixel_area == pytest.approx(GSD ** 2)
        assert np.array_equal(src.read(10, 30, 0, 50)[0], read_image(str(tmp_path / "sixteen.png"))[10:30])


def test_sixteen_bit_geotiffs_are_scaled_by_their_significant_bits(tmp_path, caplog):
    """A GeoTIFF declaring 12 significant bits (NBITS) is scaled by 255/4095, one without by
    255/65535, as read_image scales 16-bit PNGs; predict.py says so in a warning."""
    import logging

    twelve = (np.random.default_rng(1).random((20, 30)) * 4095).astype(np.uint16)
    for name, options in (("nbits12.tif", {"nbits": 12}), ("plain16.tif", {})):
        with rasterio.open(tmp_path / name, "w", driver="GTiff", height=20, width=30, count=1,
                           dtype="uint16", **options) as ds:
            ds.write(twelve, 1)
    with caplog.at_level(logging.WARNING):
        for name, peak in (("nbits12.tif", 4095), ("plain16.tif", 65535)):
            with open_image(str(tmp_path / name)) as src:
                expected = np.clip(twelve * 255.0 / peak + 0.5, 0, 255).astype(np.uint8)
                assert np.array_equal(src.read_all()[..., 2], expected), name
    assert "nbits12.tif: 12 significant bits" in caplog.text and "255/4095" in caplog.text
    assert "plain16.tif: 16 significant bits" in caplog.text


def test_bad_sources_are_refused_naming_the_file(tmp_path):
    rgb = np.zeros((30, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.tif").write_bytes(b"II*\x00garbage")
    with rasterio.open(tmp_path / "float.tif", "w", driver="GTiff", height=8, width=8, count=1,
                       dtype="float32") as ds:
        ds.write(np.zeros((8, 8), np.float32), 1)
    for name in ("trunc.png", "junk.tif", "float.tif", "missing.png"):
        with pytest.raises(DatasetError, match=name):
            open_image(str(tmp_path / name)).read_all()

    # a GeoTIFF with a transform but no CRS: read, but not georeferenced, and it says why
    with rasterio.open(tmp_path / "nocrs.tif", "w", driver="GTiff", height=30, width=30, count=3,
                       dtype="uint8", transform=from_origin(*ORIGIN, GSD, GSD)) as ds:
        ds.write(rgb.transpose(2, 0, 1))
    with open_image(str(tmp_path / "nocrs.tif")) as src:
        assert src.georef is None and "no CRS" in src.georef_problem


def test_output_registry_is_next_to_its_writers_and_its_help_follows_the_classes():
    from rooftop_m2f import classes

    assert set(writers.DEFAULT_OUTPUTS) <= set(writers.OUTPUTS)
    for name, output in writers.OUTPUTS.items():
        assert callable(output.write) == bool(output.suffix)  # coco: per folder, no writer
    help_text = writers.describe_outputs()
    for index, (name, rgb) in enumerate(zip(classes.CLASS_NAMES, classes.PALETTE)):
        assert f"{index} {name}" in help_text and f"{name} {classes.color_name(rgb)}" in help_text
        assert f"{name} {classes.color_name(rgb)} {tuple(rgb)}" in writers.__doc__
