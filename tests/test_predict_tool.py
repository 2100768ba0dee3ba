"""tools/predict.py end to end (subprocess) with a randomly initialised tiny model on a mixed
folder: good, truncated, 16-bit, grayscale, RGBA, a georeferenced GeoTIFF larger than the tile
(tiled), a GeoTIFF without CRS and a name clash."""
import csv
import json

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from conftest import TINY_CONFIG, run_tool

PNG_OUTPUTS = ("_index.png", "_color.png", "_overlay.png", "_coords.json", "_polygons.geojson")
TRANSFORM = from_origin(261000.0, 6245000.0, 0.08, 0.08)


def make_inputs(folder):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (72, 88, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "good.png")
    data = (folder / "good.png").read_bytes()
    (folder / "a_truncated.png").write_bytes(data[: len(data) // 2])  # sorted first
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "sixteen.png")
    Image.fromarray(rgb[:40, :50, 1]).save(folder / "gray.png")                  # another size
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 9, np.uint8)])).save(folder / "rgba.png")
    big = rng.integers(0, 256, (3, 112, 160), dtype=np.uint8)                      # 2 x 3 tiles
    with rasterio.open(folder / "ortho.tif", "w", driver="GTiff", height=112, width=160, count=3,
                       dtype="uint8", crs="EPSG:32734", transform=TRANSFORM) as ds:
        ds.write(big)
    with rasterio.open(folder / "nocrs.tif", "w", driver="GTiff", height=64, width=64, count=3,
                       dtype="uint8", transform=TRANSFORM) as ds:
        ds.write(big[:, :64, :64])
    (folder / "clash").mkdir()
    Image.fromarray(rgb).save(folder / "clash" / "good.png")
    return {"good": (72, 88), "sixteen": (72, 88), "gray": (40, 50), "rgba": (72, 88),
            "ortho": (112, 160), "nocrs": (64, 64)}


@pytest.mark.slow
def test_predict_tool_writes_every_output_and_counts_failures(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    sizes = make_inputs(inputs)
    out = tmp_path / "out"
    result = run_tool("predict.py", "--config-file", TINY_CONFIG, "--input", inputs,
                      inputs / "clash" / "good.png", "--output-dir", out, "--tta", "hflip",
                      "--random-weights", "ROOFTOP.TILE.SIZE", "64",
                      "ROOFTOP.TILE.OVERLAP", "16", check=False)
    log = result.stdout + result.stderr
    assert result.returncode == 1, log[-3000:]
    assert "2 input(s) failed" in result.stderr
    assert "a_truncated.png: cannot read image" in result.stderr
    assert "clash/good.png: outputs would overwrite those of" in result.stderr
    assert "nocrs.tif has a geotransform but no CRS" in log
    assert "ortho.tif: 160x112 px, 6 windows of 64x64 (overlap 16), TTA hflip" in log
    # every warning and error logged is counted in the final line
    final = next(line for line in log.splitlines() if "Predicted " in line)
    logged = sum(line.startswith(("WARNING [", "ERROR [")) for line in log.splitlines())
    assert final.endswith(f"({logged} warning(s) above)") and logged >= 3, log[-3000:]

    for stem, (h, w) in sizes.items():
        for suffix in PNG_OUTPUTS:
            assert (out / (stem + suffix)).is_file(), stem + suffix
        index = np.array(Image.open(out / f"{stem}_index.png"))
        assert index.shape == (h, w) and index.max() <= 3
        coords = json.loads((out / f"{stem}_coords.json").read_text())
        assert coords["image_name"] == next(p.name for p in inputs.iterdir() if p.stem == stem)
        for c in (1, 2, 3):
            assert coords["predicted_coords"][f"class_{c}"] == np.argwhere(index == c).tolist()
        features = json.loads((out / f"{stem}_polygons.geojson").read_text())["features"]
        for c in (1, 2, 3):
            assert sum(f["properties"]["pixel_count"] for f in features
                       if f["properties"]["class_id"] == c) == int((index == c).sum())
    assert not (out / "a_truncated_index.png").exists()
    assert sorted(p.name for p in out.glob("*.tif")) == ["ortho_mask.tif"], \
        "a GeoTIFF mask only for the georeferenced input"
    with rasterio.open(out / "ortho_mask.tif") as ds:
        assert ds.crs.to_epsg() == 32734 and ds.transform.almost_equals(TRANSFORM)
        assert np.array_equal(ds.read(1), np.array(Image.open(out / "ortho_index.png")))
    geo = json.loads((out / "ortho_polygons.geojson").read_text())
    assert geo["crs"]["properties"]["name"].endswith("32734")
    assert json.loads((out / "nocrs_polygons.geojson").read_text())["coordinates"] == "pixel"

    with open(out / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert sorted({r["image"] for r in summary}) == sorted(
        next(p.name for p in inputs.iterdir() if p.stem == s) for s in sizes)
    assert len(summary) == 3 * len(sizes)
    for r in summary:
        stem = r["image"].rsplit(".", 1)[0]
        index = np.array(Image.open(out / f"{stem}_index.png"))
        assert int(r["pixels"]) == int((index == int(r["class_id"])).sum())
        assert float(r["area_m2"]) == round(int(r["pixels"]) * 0.08 ** 2, 4)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no temporary files left"
