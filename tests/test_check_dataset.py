"""Dataset checker: each problem planted in a tiny on-disk split is caught with the right kind,
severity and file; statistics, suggested weights, JSON report, chart and the CLI exit status."""
import itertools
import json
import shutil

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import run_tool
from rooftop_m2f.data import checks
from rooftop_m2f.data.capetown import DatasetError, register_capetown

H = W = 16
_names = itertools.count()


def check(split_dir, **options):
    """The report of one split folder, registered under a name of its own."""
    prefix = f"checked{next(_names)}"
    register_capetown(str(split_dir.parent), prefix=prefix)
    return checks.check_datasets([f"{prefix}_{split_dir.name}"], progress=False,
                                 raise_errors=False, **options)[0]


def rgb(seed=0, size=(H, W)):
    return (np.random.default_rng(seed).random((*size, 3)) * 255).astype(np.uint8)


def two_class_mask(size=(H, W)):
    mask = np.zeros(size, np.uint8)
    mask[2:6, 2:6] = 1        # one 16-px panel
    mask[10:12, 10:12] = 1    # another, 4 px
    return mask


def save_png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def make_good_split(split_dir, n=3):
    for i in range(n):
        save_png(split_dir / "images" / f"good{i}.png", rgb(i))
        mask = two_class_mask()
        if i == 0:
            mask[12:16, 0:4] = 3  # one pool heater
        if i == 2:
            mask[:] = 0           # no foreground
        save_png(split_dir / "masks" / f"good{i}.png", mask)


@pytest.fixture
def broken_split(tmp_path):
    """A split with every problem the checker knows, one file each, plus three good pairs."""
    s = tmp_path / "capetown" / "train"
    make_good_split(s)
    img, msk = s / "images", s / "masks"
    # errors
    save_png(img / "trunc.png", rgb(1, (64, 64)))
    truncate(img / "trunc.png")
    save_png(msk / "trunc.png", np.zeros((64, 64), np.uint8))
    (img / "notimage.png").write_bytes(b"this is not a png")
    save_png(msk / "notimage.png", two_class_mask())
    save_png(img / "nomask.png", rgb(2))
    save_png(img / "size.png", rgb(3))
    save_png(msk / "size.png", np.zeros((8, 12), np.uint8))
    save_png(img / "badval.png", rgb(4))
    bad = two_class_mask()
    bad[0, 0] = 7
    save_png(msk / "badval.png", bad)
    save_png(img / "badcolour.png", rgb(5))
    colour = np.zeros((H, W, 3), np.uint8)
    colour[1:3, 1:3] = (10, 20, 30)
    save_png(msk / "badcolour.png", colour)
    save_png(img / "dup.png", rgb(6))
    Image.fromarray(rgb(6)).save(img / "dup.jpg")
    save_png(msk / "dup.png", two_class_mask())
    save_png(img / "truncmask.png", rgb(7, (64, 64)))
    save_png(msk / "truncmask.png", (np.random.default_rng(0).random((64, 64)) * 4).astype(np.uint8))
    truncate(msk / "truncmask.png")
    # warnings
    save_png(msk / "orphan.png", two_class_mask())
    save_png(img / "gray.png", rgb(8)[..., 0], mode="L")
    save_png(msk / "gray.png", two_class_mask())
    Image.fromarray(np.dstack([rgb(9), np.full((H, W), 255, np.uint8)]), mode="RGBA").save(img / "rgba.png")
    save_png(msk / "rgba.png", two_class_mask())
    cv2.imwrite(str(img / "deep.png"), (np.random.default_rng(10).random((H, W, 3)) * 65535).astype(np.uint16))
    save_png(msk / "deep.png", two_class_mask())
    (img / "notes.txt").write_text("ignored")
    save_png(img / "unlabelled.png", rgb(11))
    save_png(msk / "unlabelled.png", np.full((H, W), 255, np.uint8))
    # a valid RGB-palette mask is fine
    save_png(img / "palette.png", rgb(12))
    pal = np.zeros((H, W, 3), np.uint8)
    pal[4:8, 4:8] = (0, 255, 0)
    save_png(msk / "palette.png", pal)
    return s


EXPECTED = {  # kind -> file name that must be named
    "truncated_image": "images/trunc.png",
    "unreadable_image": "images/notimage.png",
    "missing_mask": "images/nomask.png",
    "size_mismatch": "masks/size.png",
    "bad_mask_values": "masks/badval.png",
    "bad_mask_colors": "masks/badcolour.png",
    "duplicate_stem": "images/dup.",
    "unreadable_mask": "masks/truncmask.png",
    "orphan_mask": "masks/orphan.png",
    "image_mode": "images/gray.png",
    "image_bit_depth": "images/deep.png",
    "ignored_file": "images/notes.txt",
    "unlabelled_mask": "masks/unlabelled.png",
}


def test_every_planted_problem_is_caught_once_with_its_file(broken_split):
    report = check(broken_split, workers=2)
    by_kind = {}
    for p in report.problems:
        by_kind.setdefault(p.kind, []).append(p)
    assert set(by_kind) == set(EXPECTED), {k: [str(p) for p in v] for k, v in by_kind.items()}
    for kind, name in EXPECTED.items():
        assert any(name in p.file for p in by_kind[kind]), (kind, [str(p) for p in by_kind[kind]])
    assert not report.usable
    assert {p.kind for p in report.errors} == set(EXPECTED) - checks.WARNING_KINDS
    assert sorted(p.file.rsplit("/", 1)[-1] for p in by_kind["image_mode"]) == ["gray.png", "rgba.png"]
    # messages say what is wrong
    assert "no mask" in str(by_kind["missing_mask"][0])
    assert "[7]" in by_kind["bad_mask_values"][0].message
    assert "(10, 20, 30)" in by_kind["bad_mask_colors"][0].message
    assert "8" in by_kind["size_mismatch"][0].message and "16x16" in by_kind["size_mismatch"][0].message
    assert "dup.jpg" in by_kind["duplicate_stem"][0].message and "dup.png" in by_kind["duplicate_stem"][0].message
    assert "16 bits" in by_kind["image_bit_depth"][0].message
    assert "truncated" in by_kind["truncated_image"][0].message


def test_statistics_weights_components(tmp_path):
    s = tmp_path / "train"
    make_good_split(s)
    report = check(s, full_stats=True)
    assert report.usable and report.masks_decoded == 3
    # 2 images with panels (16 + 4 px each), 1 with a 16-px pool heater, 1 without foreground
    assert report.pixel_counts.tolist() == [3 * 256 - 2 * 20 - 16, 40, 0, 16]
    assert report.images_with_class.tolist() == [3, 2, 0, 1]
    assert report.images_without_foreground == 1
    assert sorted(report.component_sizes[1]) == [4, 4, 16, 16]
    assert report.component_sizes[3] == [16]
    absent = [p for p in report.problems if p.kind == "absent_class"]
    assert len(absent) == 1 and "solar_water_heater" in absent[0].message
    # w(c) = f(c)^-1/2 normalised to mean 1 over present classes; absent class -> 1.0
    raw = np.array([1.0, (2 / 3) ** -0.5, 0, (1 / 3) ** -0.5])
    expected = raw / raw[[0, 1, 3]].mean()
    weights = report.suggested_class_weights()
    assert weights[2] == 1.0
    np.testing.assert_allclose([weights[i] for i in (0, 1, 3)], expected[[0, 1, 3]], atol=1e-3)
    d = report.to_dict()
    assert d["classes"][1]["components"]["count"] == 4 and d["classes"][1]["components"]["median"] == 10.0
    assert d["classes"][2]["pixel_share"] == 0.0


def test_missing_and_empty_directories(tmp_path):
    report = check(tmp_path / "nope" / "train")
    assert [p.kind for p in report.problems] == ["missing_directory"] and not report.usable
    (tmp_path / "empty" / "train" / "images").mkdir(parents=True)
    report = check(tmp_path / "empty" / "train")
    assert {p.kind for p in report.problems} == {"missing_directory", "empty_split"}
    assert any(p.file.endswith("empty/train/masks") for p in report.problems)


def test_check_datasets_before_training_lists_every_error(broken_split, tmp_path):
    root = broken_split.parent
    make_good_split(root / "val")
    register_capetown(str(root), prefix="checktest")
    try:
        with pytest.raises(DatasetError) as e:
            checks.check_datasets(["checktest_train", "checktest_val"])
        text = str(e.value)
        for kind, name in EXPECTED.items():
            if kind not in checks.WARNING_KINDS:
                assert f"[{kind}]" in text and name in text, kind
        assert "orphan" not in text  # warnings are logged, not raised
        reports = checks.check_datasets(["checktest_val"])
        assert reports[0].usable and reports[0].masks_decoded == 3
    finally:
        from detectron2.data import DatasetCatalog, MetadataCatalog

        for split in ("train", "val", "test"):
            DatasetCatalog.remove(f"checktest_{split}")
            MetadataCatalog.remove(f"checktest_{split}")


@pytest.mark.slow
def test_cli_reports_unusable_split_with_json_and_chart(broken_split, tmp_path):
    root = broken_split.parent
    make_good_split(root / "val")  # test/ is absent: with --split all it is skipped
    out = tmp_path / "report"
    result = run_tool("check_dataset.py", "--root", root, "--split", "all", "--output-dir", out,
                      "--full-stats", check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    for kind, name in EXPECTED.items():
        assert f"[{kind}]" in result.stdout and name in result.stdout, kind
    assert "UNUSABLE" in result.stdout and "ROOFTOP.LOSS.PER_CLASS_WEIGHTS [" in result.stdout
    report = json.loads((out / checks.REPORT_FILE).read_text())
    train, val = "capetown_sem_seg_train", "capetown_sem_seg_val"
    assert report["usable"] is False and set(report["splits"]) == {train, val}
    assert report["splits"][val]["usable"] is True
    kinds = {e["kind"] for e in report["splits"][train]["errors"]}
    assert kinds == set(EXPECTED) - checks.WARNING_KINDS
    assert report["splits"][train]["classes"][1]["components"]["count"] > 0
    assert report["suggested_class_weights"]["based_on"] == train
    png = out / checks.CHART_FILE
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left

    # the same root without the broken split: usable, exit 0
    shutil.rmtree(broken_split)
    result = run_tool("check_dataset.py", "--root", root, "--split", "val", "--output-dir", out)
    assert "Dataset usable: 0 error(s)" in result.stdout
    assert json.loads((out / checks.REPORT_FILE).read_text())["usable"] is True
