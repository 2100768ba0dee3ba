"""Hostile and careless input (datasets/README.md, "Hostile input"): paths in data files stay
inside their root, every image decoder error is one line naming the file, and samples of more
than 8 bits are scaled by what the file declares."""
import json
import logging
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
from rooftop_m2f.data.checks import check_coco
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
    report = check_coco(path, images, progress=False, workers=1)
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
    from rooftop_m2f.engine.setup import load_cfg

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
    from rooftop_m2f.engine.setup import load_cfg

    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_cfg(TINY, [key, value])
    assert str(info.value).startswith(key)


def test_every_shipped_config_passes_and_an_integer_is_read_as_the_float_it_means():
    from rooftop_m2f.engine.setup import load_cfg

    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_cfg(str(path))
    cfg = load_cfg(TINY, ["SOLVER.BASE_LR", "1", "ROOFTOP.GSD", "2"])
    assert cfg.SOLVER.BASE_LR == 1.0 and isinstance(cfg.SOLVER.BASE_LR, float)
    assert cfg.ROOFTOP.GSD == 2.0


def test_a_misspelt_dataset_name_is_one_line_before_training(tmp_path):
    result = run_tool("train_net.py", "--config-file", TINY, "DATASETS.TRAIN",
                      '("capetown_sem_seg_trian",)', "OUTPUT_DIR", tmp_path / "run", check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "DATASETS.TRAIN" in lines[0] and "did you mean capetown_sem_seg_train?" in lines[0]


def test_max_image_pixels_is_applied_to_pil_and_zero_lifts_the_limit(tmp_path):
    from rooftop_m2f.config import PIL_MAX_IMAGE_PIXELS
    from rooftop_m2f.engine.setup import load_cfg

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
