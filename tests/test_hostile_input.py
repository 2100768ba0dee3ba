"""Hostile and careless input (datasets/README.md, "Hostile input"): paths in data files stay
inside their root, every image decoder error is one line naming the file, and samples of more
than 8 bits are scaled by what the file declares."""
import json
import logging
import os
import re
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, TINY_CONFIG as TINY, run_tool
from rooftop_m2f.data import coco
from rooftop_m2f.data.capetown import DatasetError, load_split, read_image
from rooftop_m2f.data.checks import check_datasets
from rooftop_m2f.fileio import OutputWriteError, atomic_path


# --------------------------------------------------------------------------------------------
# paths named by a COCO file
# --------------------------------------------------------------------------------------------
def _coco_pointing_at(tmp_path, file_name):
    """A COCO file whose only image is ``file_name``, with a real PNG outside the image root."""
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(outside / "secret.png")
    images = tmp_path / "export" / "images"
    images.mkdir(parents=True)
    path = tmp_path / "export" / "instances.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": file_name, "height": 8, "width": 8}],
        "annotations": [], "categories": [{"id": 1, "name": "solar_panel"}]}))
    return path, images


@pytest.mark.parametrize("entry", ["../../outside/secret.png", "ABSOLUTE", "sub/../../../outside/secret.png"])
def test_a_coco_file_name_outside_the_image_root_is_never_opened(tmp_path, entry):
    if entry == "ABSOLUTE":
        entry = str(tmp_path / "outside" / "secret.png")
    path, images = _coco_pointing_at(tmp_path, entry)
    # training's loader
    with pytest.raises(DatasetError, match=r"\[outside_root\].*file_name"):
        coco.load_coco_json(path, images)
    # the checker names it as an error, and does not report the outside image as usable
    coco.register_coco_semseg("hostile_coco", path, images)
    report = check_datasets(["hostile_coco"], progress=False, workers=1, raise_errors=False)[0]
    outside = [p for p in report.errors if p.kind == "outside_root"]
    assert len(outside) == 1 and entry in outside[0].message and not report.usable
    # the converter refuses before copying anything
    result = run_tool("convert_coco.py", "to-png", "--json", path, "--image-root", images,
                      "--split", "train", "--output-dir", tmp_path / "out", check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert "outside_root" in last and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("out/**/*.png"))


def test_a_file_name_that_stays_inside_the_root_is_read(tmp_path):
    path, images = _coco_pointing_at(tmp_path, "sub/../roof.png")
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(images / "roof.png")
    records = coco.load_coco_json(path, images)
    assert records[0]["file_name"] == str(images / "roof.png")


# --------------------------------------------------------------------------------------------
# decoder errors
# --------------------------------------------------------------------------------------------
def _bomb(path):
    """A 1-bit PNG of 30000 x 30000 px (about 110 KB on disk)."""
    Image.fromarray(np.zeros((30000, 30000), bool)).save(path)


def test_a_decompression_bomb_is_one_error_naming_the_file_and_the_key(tmp_path):
    _bomb(tmp_path / "bomb.png")
    with pytest.raises(DatasetError, match=r"bomb\.png: refused as a possible decompression bomb.*ROOFTOP\.MAX_IMAGE_PIXELS"):
        read_image(tmp_path / "bomb.png")


def test_a_bomb_in_a_training_split_is_a_dataset_error_not_a_traceback(tmp_path):
    split = tmp_path / "train"
    (split / "images").mkdir(parents=True)
    (split / "masks").mkdir()
    _bomb(split / "images" / "bomb.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(split / "masks" / "bomb.png")
    with pytest.raises(DatasetError, match="bomb.png"):
        load_split(split)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_samples_are_refused_in_one_line(tmp_path, mode):
    dtype = np.int32 if mode == "I" else np.float32
    Image.fromarray(np.full((8, 8), 70000, dtype), mode=mode).save(tmp_path / "deep.tif")
    with pytest.raises(DatasetError, match=r"deep\.tif: .* not supported"):
        read_image(tmp_path / "deep.tif")


# --------------------------------------------------------------------------------------------
# bit depth
# --------------------------------------------------------------------------------------------
def _with_sbit(path, bits, channels):
    """Insert an sBIT chunk after IHDR (what a 12-bit camera pipeline writes)."""
    data = path.read_bytes()
    at = data.index(b"IHDR") + 4 + 13 + 4
    body = b"sBIT" + bytes([bits] * channels)
    path.write_bytes(data[:at] + struct.pack(">I", channels) + body
                     + struct.pack(">I", zlib.crc32(body)) + data[at:])


def _twelve_bit_rgb(seed=0):
    return (np.random.default_rng(seed).random((6, 7, 3)) * 4095).astype(np.uint16)


def test_twelve_bit_rgb_with_sbit_is_scaled_by_4095_channels_in_order(tmp_path):
    rgb = _twelve_bit_rgb()
    path = tmp_path / "twelve.png"
    cv2.imwrite(str(path), rgb[..., ::-1])  # OpenCV writes BGR
    _with_sbit(path, 12, 3)
    expected = np.clip(rgb.astype(np.float64) * 255 / 4095 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(read_image(path), expected)


def test_sixteen_bit_without_sbit_is_scaled_by_65535_and_says_so_once(tmp_path, caplog):
    rgb = _twelve_bit_rgb(1)
    path = tmp_path / "undeclared.png"
    cv2.imwrite(str(path), rgb[..., ::-1])
    with caplog.at_level(logging.WARNING, logger="rooftop_m2f.data.capetown"):
        first = read_image(path)
        again = read_image(path)
    expected = np.clip(rgb.astype(np.float64) * 255 / 65535 + 0.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(again, expected)
    lines = [r.getMessage() for r in caplog.records if "undeclared.png" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "255/65535" in lines[0] and "largest value is" in lines[0] and "sBIT" in lines[0]


def test_sixteen_bit_grayscale_is_replicated_and_scaled(tmp_path):
    gray = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1365)
    Image.fromarray(gray).save(tmp_path / "gray16.png")
    out = read_image(tmp_path / "gray16.png")
    assert out.shape == (6, 8, 3)
    np.testing.assert_array_equal(out[..., 0], np.clip(gray * 255.0 / 65535 + 0.5, 0, 255).astype(np.uint8))
    assert (out[..., 0] == out[..., 2]).all()


# --------------------------------------------------------------------------------------------
# failing writes
# --------------------------------------------------------------------------------------------
def test_a_write_under_a_file_is_one_line_naming_the_path(tmp_path):
    (tmp_path / "plain").write_text("not a folder")
    with pytest.raises(OutputWriteError, match=r"cannot write .*plain/out/x\.txt: .*errno"):
        with atomic_path(tmp_path / "plain" / "out" / "x.txt") as tmp:
            open(tmp, "w").close()


# --------------------------------------------------------------------------------------------
# config values
# --------------------------------------------------------------------------------------------
def _outside(rule, value):
    """A value that breaks ``rule`` (of rooftop_m2f.config.VALUE_RULES), of ``value``'s type."""
    if isinstance(rule, tuple):
        return "nonsense" if isinstance(value, str) else max(rule) + 1
    if rule.startswith("in "):
        bad = float(rule[4:-1].split(",")[1]) + 1  # above the interval
    else:
        op, bound = rule.split()
        bad = float(bound) - 1 if op.startswith(">") else float(bound) + 1
    element = value[0] if isinstance(value, (list, tuple)) and value else value
    bad = type(element)(bad) if isinstance(element, (int, float)) else bad
    return [bad] * max(len(value), 1) if isinstance(value, (list, tuple)) else bad


def _override(value):
    return str(list(value)) if isinstance(value, (list, tuple)) else str(value)


def test_every_rule_refuses_a_value_outside_it_naming_the_key():
    from rooftop_m2f.cli import ConfigError
    from rooftop_m2f.config import VALUE_RULES, _get
    from rooftop_m2f.engine import build_cfg as load_cfg

    defaults = load_cfg(TINY)
    for key, rule in VALUE_RULES:
        bad = _outside(rule, _get(defaults, key))
        with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')} .*: must be "):
            load_cfg(TINY, [key, _override(bad)])


@pytest.mark.parametrize("key, value, message", [
    ("ROOFTOP.TILE.OVERLAP", "256", "must be < ROOFTOP.TILE.SIZE (256)"),
    ("ROOFTOP.CITY.MIN_AREA_M2", "[0.0, 1.0]", "one value per class, 4"),
    ("ROOFTOP.LOSS.PER_CLASS_WEIGHTS", "[1.0, 2.0, 3.0]", "one value per class, 4"),
    ("DATASETS.TRAIN", '("capetown_sem_seg_trian",)', "did you mean capetown_sem_seg_train?"),
    ("DATASETS.TEST", '("cape_town_val",)', "not a registered dataset"),
])
def test_cross_key_and_dataset_mistakes_are_named(key, value, message):
    from rooftop_m2f.cli import ConfigError
    from rooftop_m2f.engine import build_cfg as load_cfg

    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_cfg(TINY, [key, value])
    assert str(info.value).startswith(key)


def test_every_shipped_config_passes_and_an_integer_is_read_as_the_float_it_means(tmp_path):
    from rooftop_m2f.cli import ConfigError
    from rooftop_m2f.engine import build_cfg

    for path in sorted((REPO / "configs").glob("*.yaml")):
        build_cfg(str(path))
    cfg = build_cfg(TINY, ["SOLVER.BASE_LR", "1", "ROOFTOP.GSD", "2"])
    assert cfg.SOLVER.BASE_LR == 1.0 and isinstance(cfg.SOLVER.BASE_LR, float)
    assert cfg.ROOFTOP.GSD == 2.0
    (tmp_path / "int.yaml").write_text(f"_BASE_: {TINY}\nSOLVER:\n  BASE_LR: 1\n")
    assert isinstance(build_cfg(str(tmp_path / "int.yaml")).SOLVER.BASE_LR, float)
    with pytest.raises(ConfigError, match="SOLVER.BASE_LR") as info:
        build_cfg(TINY, ["SOLVER.BASE_LR", "'fast'"])
    assert "\n" not in str(info.value)


def test_a_misspelt_dataset_name_is_one_line_before_training(tmp_path):
    result = run_tool("train_net.py", "--config-file", TINY, "DATASETS.TRAIN",
                      '("capetown_sem_seg_trian",)', "OUTPUT_DIR", tmp_path / "run", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "DATASETS.TRAIN" in lines[0] and "did you mean capetown_sem_seg_train?" in lines[0]


def test_max_image_pixels_is_applied_to_pil_and_zero_lifts_the_limit(tmp_path):
    from rooftop_m2f.config import PIL_MAX_IMAGE_PIXELS
    from rooftop_m2f.engine import build_cfg as load_cfg

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "big.png")
    try:
        load_cfg(TINY, ["ROOFTOP.MAX_IMAGE_PIXELS", "700"])  # bomb error above 2 x the limit
        with pytest.raises(DatasetError, match=r"big\.png: .*decompression bomb.*ROOFTOP\.MAX_IMAGE_PIXELS"):
            read_image(tmp_path / "big.png")
        load_cfg(TINY, ["ROOFTOP.MAX_IMAGE_PIXELS", "0"])
        assert Image.MAX_IMAGE_PIXELS is None
        assert read_image(tmp_path / "big.png").shape == (40, 40, 3)
    finally:
        load_cfg(TINY)
    assert Image.MAX_IMAGE_PIXELS == PIL_MAX_IMAGE_PIXELS


# --------------------------------------------------------------------------------------------
# the tools, with hostile inputs and outputs
# --------------------------------------------------------------------------------------------
def _one_line(result, code, *fragments):
    err = result.stderr.strip()
    assert result.returncode == code, (result.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    line = err.splitlines()[-1]
    for fragment in fragments:
        assert fragment in line, line
    return line


@pytest.mark.slow
def test_predict_names_each_bad_image_predicts_the_others_and_writes_the_folder_files(tmp_path):
    rgb = (np.random.default_rng(0).random((48, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a_good.png")
    _bomb(tmp_path / "b_bomb.png")
    Image.fromarray(rgb).save(tmp_path / "c_good.png")
    data = (tmp_path / "a_good.png").read_bytes()
    (tmp_path / "d_truncated.png").write_bytes(data[:len(data) // 2])
    Image.fromarray(np.full((8, 8), 7, np.int32), mode="I").save(tmp_path / "e_deep.tif")
    out = tmp_path / "out"
    result = run_tool("predict.py", "--config-file", TINY, "--input",
                      *(tmp_path / n for n in ("a_good.png", "b_bomb.png", "c_good.png",
                                               "d_truncated.png", "e_deep.tif")),
                      "--output-dir", out, "--outputs", "index,coco", "--random-weights",
                      "ROOFTOP.TILE.SIZE", "64", "ROOFTOP.TILE.OVERLAP", "16", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "3 input(s) failed" in result.stderr
    for line in ("b_bomb.png: refused as a possible decompression bomb",
                 "ROOFTOP.MAX_IMAGE_PIXELS", "d_truncated.png: cannot read image",
                 "e_deep.tif: pixel type int32 is not supported"):
        assert line in result.stderr
    assert sorted(p.name for p in out.glob("*_index.png")) == ["a_good_index.png", "c_good_index.png"]
    with open(out / "summary.csv") as f:
        assert {row.split(",")[0] for row in list(f)[1:]} == {"a_good.png", "c_good.png"}
    images = json.loads((out / "coco_images.json").read_text())["images"]
    assert sorted(i["file_name"].rsplit("/", 1)[-1] for i in images) == ["a_good.png", "c_good.png"]


def _geotiff(path):
    import rasterio
    from rasterio.transform import from_origin

    with rasterio.open(path, "w", driver="GTiff", height=32, width=32, count=3, dtype="uint8",
                       crs="EPSG:32734", transform=from_origin(260000, 6240000, 0.08, 0.08)) as ds:
        ds.write(np.zeros((3, 32, 32), np.uint8))


def _tool_commands(tmp_path, out):
    """One command of each tool that writes a folder, every input fine, the output ``out``."""
    from capetown_synthetic import make_synthetic_capetown

    root = tmp_path / "capetown"
    make_synthetic_capetown(root, num_train=1, num_val=1, num_test=1, size=64, seed=3)
    masks = root / "train" / "masks"
    _geotiff(tmp_path / "ortho.tif")
    return {
        "predict.py": ["--config-file", TINY, "--input", next((root / "train" / "images").iterdir()),
                       "--output-dir", out, "--random-weights"],
        "predict_city.py": ["--config-file", TINY, "--input", tmp_path / "ortho.tif",
                            "--output-dir", out, "--random-weights"],
        "check_dataset.py": ["--root", root, "--split", "train", "--output-dir", out],
        "convert_coco.py": ["to-coco", "--root", root, "--output-dir", out],
        "eval_from_png.py": ["--pred-dir", masks, "--gt-dir", masks, "--output-dir", out],
        "city_report.py": ["review", "--layer", tmp_path / "no_layer.gpkg", "--output-dir", out],
    }


@pytest.mark.parametrize("tool", ["predict.py", "predict_city.py", "check_dataset.py",
                                  "convert_coco.py", "eval_from_png.py", "city_report.py"])
def test_an_output_folder_under_a_file_is_one_line_before_any_work(tmp_path, tool):
    (tmp_path / "plain").write_text("a file, not a folder")
    out = tmp_path / "plain" / "out"
    result = run_tool(tool, *_tool_commands(tmp_path, out)[tool], check=False)
    _one_line(result, 1, f"cannot write {out}: Not a directory (errno 20)",
              f"{tmp_path / 'plain'} is a file", "nothing was written")
    assert "MSDeformAttn:" not in result.stdout + result.stderr  # no model was built
    assert (tmp_path / "plain").read_text() == "a file, not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_one_line_and_stays_empty(tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    out.chmod(0o555)
    try:
        result = run_tool("check_dataset.py", *_tool_commands(tmp_path, out)["check_dataset.py"],
                          check=False)
        _one_line(result, 1, f"cannot write {out}", "not writable", "nothing was written")
        assert not list(out.iterdir())
    finally:
        out.chmod(0o755)


# --------------------------------------------------------------------------------------------
# list files and zones files
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["../outside/secret.png", "ABSOLUTE", "a/../../outside/secret.png"])
def test_a_list_file_entry_outside_its_folder_is_one_line_before_the_model(tmp_path, entry):
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(outside / "secret.png")
    if entry == "ABSOLUTE":
        entry = str(outside / "secret.png")
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tiles / "roof.png")
    (tiles / "list.txt").write_text(f"# tiles\nroof.png\n{entry}\n")
    result = run_tool("predict.py", "--config-file", TINY, "--input", tiles / "list.txt",
                      "--output-dir", tmp_path / "out", "--random-weights", check=False)
    line = _one_line(result, 2, f"{tiles / 'list.txt'}, line 3: {entry!r}", "inside it")
    assert "MSDeformAttn:" not in result.stdout + result.stderr, line
    assert not (tmp_path / "out").exists()


def test_list_file_entries_inside_its_folder_are_read_relative_to_it(tmp_path):
    from rooftop_m2f.inference.sources import expand_inputs

    (tmp_path / "tiles" / "a").mkdir(parents=True)
    (tmp_path / "tiles" / "list.txt").write_text("a/one.png  # first\nb/../two.png\n\n")
    paths, problems = expand_inputs([tmp_path / "tiles" / "list.txt"], (".png",))
    assert problems == []
    assert paths == [str(tmp_path / "tiles" / "a" / "one.png"), str(tmp_path / "tiles" / "two.png")]


@pytest.mark.parametrize("where", ["outside", "absolute", "vsi"])
def test_a_vrt_source_outside_its_folder_is_refused_naming_the_vrt(tmp_path, where):
    import rasterio.shutil
    from capetown_synthetic.mosaic import mosaic_transform, write_tile

    (tmp_path / "outside").mkdir()
    (tmp_path / "ortho").mkdir()
    write_tile(str(tmp_path / "outside" / "secret.tif"), np.zeros((64, 64, 3), np.uint8),
               mosaic_transform())
    write_tile(str(tmp_path / "ortho" / "roof.tif"), np.zeros((64, 64, 3), np.uint8),
               mosaic_transform(0, 1, 64))
    vrt = tmp_path / "ortho" / "mosaic.vrt"
    rasterio.shutil.copy(str(tmp_path / "ortho" / "roof.tif"), str(vrt), driver="VRT")
    source = {"outside": '<SourceFilename relativeToVRT="1">../outside/secret.tif',
              "absolute": f'<SourceFilename relativeToVRT="0">{tmp_path / "outside" / "secret.tif"}',
              "vsi": '<SourceFilename relativeToVRT="0">/vsicurl/http://example.org/secret.tif'}
    vrt.write_text(vrt.read_text().replace('<SourceFilename relativeToVRT="1">roof.tif',
                                           source[where]))
    result = run_tool("predict_city.py", "--config-file", TINY, "--input", vrt, tmp_path / "ortho" / "roof.tif",
                      "--output-dir", tmp_path / "city", "--random-weights", "ROOFTOP.TILE.SIZE", "64",
                      "ROOFTOP.TILE.OVERLAP", "16", check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    refused = [line for line in result.stderr.splitlines() if "mosaic.vrt: source" in line]
    assert refused and "secret.tif" in refused[0] and "Traceback" not in result.stderr
    # the good tile is predicted
    assert (tmp_path / "city" / "tiles" / "roof_class.tif").is_file()


def test_zones_without_a_text_field_are_named_with_a_warning_naming_the_file(tmp_path, caplog):
    import geopandas as gpd
    from shapely.geometry import box

    from rooftop_m2f.inference.planner import load_zones

    path = tmp_path / "wards.gpkg"
    gpd.GeoDataFrame({"ward_no": [7, 9]}, geometry=[box(0, 0, 1, 1), box(1, 0, 2, 1)],
                     crs="EPSG:32734").to_file(path, engine="pyogrio")
    with caplog.at_level(logging.WARNING, logger="rooftop_m2f.inference.planner"):
        zones, field = load_zones(str(path), None, "EPSG:32734")
    assert field is None and list(zones["zone"]) == ["zone 1", "zone 2"]
    warned = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert len(warned) == 1 and "no text field" in warned[0] and "--zone-field" in warned[0]


def test_a_link_inside_the_image_root_is_followed(tmp_path):
    path, images = _coco_pointing_at(tmp_path, "linked.png")
    (images / "linked.png").symlink_to(tmp_path / "outside" / "secret.png")
    records = coco.load_coco_json(path, images)
    assert records[0]["file_name"] == str(images / "linked.png")
    assert read_image(records[0]["file_name"]).shape == (8, 8, 3)
