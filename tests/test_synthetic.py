"""The synthetic Cape Town dataset: determinism, layout, class coverage, idempotence, atomicity."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import capetown_synthetic as synthetic
from rooftop_m2f import fileio
from rooftop_m2f.data import capetown

SIZE = 96
SMALL = dict(num_train=4, num_val=2, num_test=2, size=SIZE, seed=3)
TINY = dict(num_train=2, num_val=1, num_test=1, size=64, seed=3)  # for the bookkeeping tests
REPO = Path(__file__).resolve().parents[1]


def _files(root):
    root = Path(root)
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def _mtimes(root):
    return {p: os.stat(Path(root) / p).st_mtime_ns for p in _files(root)}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    summary = synthetic.make_synthetic_capetown(root, **SMALL)
    return root, summary


def test_classes_agree_with_capetown():
    assert synthetic.CLASS_NAMES == capetown.CLASS_NAMES
    assert (synthetic.PV, synthetic.SWH, synthetic.POOL_HEATER) == capetown.FOREGROUND_CLASSES


def test_names_follow_the_reference_style():
    names = [synthetic.image_name(s, i) for s in synthetic.SPLITS for i in range(40)]
    assert len(set(names)) == len(names)
    for name in names:
        assert re.fullmatch(r"i_2023_RGB_8cm_SYN_[A-Z]{2}\d{2}_\d_\d\.png", name), name


def test_render_is_deterministic_and_seed_dependent():
    img_a, mask_a = synthetic.render_image(7, "train", 2, SIZE)
    img_b, mask_b = synthetic.render_image(7, "train", 2, SIZE)
    assert img_a.shape == (SIZE, SIZE, 3) and img_a.dtype == np.uint8
    assert mask_a.shape == (SIZE, SIZE) and mask_a.dtype == np.uint8
    assert np.array_equal(img_a, img_b) and np.array_equal(mask_a, mask_b)
    img_c, _ = synthetic.render_image(8, "train", 2, SIZE)
    assert not np.array_equal(img_a, img_c)
    img_d, _ = synthetic.render_image(7, "val", 2, SIZE)  # splits draw different scenes
    assert not np.array_equal(img_a, img_d)


def test_files_are_identical_for_the_same_seed_and_differ_for_another(tmp_path, small_set):
    root_a, _ = small_set
    root_b, root_c = tmp_path / "b", tmp_path / "c"
    synthetic.make_synthetic_capetown(root_b, **SMALL)
    synthetic.make_synthetic_capetown(root_c, **{**SMALL, "seed": SMALL["seed"] + 1})
    data = [f for f in _files(root_a) if f.suffix == ".png"]
    assert data and data == [f for f in _files(root_b) if f.suffix == ".png"]
    for f in data:
        assert (root_a / f).read_bytes() == (root_b / f).read_bytes(), f
    images = [f for f in data if f.parent.name == "images"]
    assert all((root_a / f).read_bytes() != (root_c / f).read_bytes() for f in images)


def test_an_image_does_not_depend_on_the_split_sizes(tmp_path, small_set):
    root_a, _ = small_set
    root_b = tmp_path / "more"
    synthetic.make_synthetic_capetown(root_b, **{**SMALL, "num_train": 5, "num_val": 1})
    for split, n in (("train", 4), ("val", 1), ("test", 2)):
        for i in range(n):
            name = synthetic.image_name(split, i)
            for sub in ("images", "masks"):
                assert (root_a / split / sub / name).read_bytes() == (root_b / split / sub / name).read_bytes()


def test_layout_loads_through_capetown(small_set):
    root, summary = small_set
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        dicts = capetown.load_split(root / split)
        assert len(dicts) == n == summary["splits"][split]["images"]
        for d in dicts:
            assert Path(d["sem_seg_file_name"]).name == Path(d["file_name"]).name
            assert Path(d["file_name"]).parent == root / split / "images"
            with Image.open(d["sem_seg_file_name"]) as im:
                assert im.mode == "L"
            image = capetown.read_image(d["file_name"])
            mask = capetown.read_mask(d["sem_seg_file_name"])
            assert image.shape == (SIZE, SIZE, 3) == (d["height"], d["width"], 3)
            assert mask.shape == image.shape[:2]
            assert set(np.unique(mask).tolist()) <= {0, 1, 2, 3}


def test_every_class_in_train_and_pool_heaters_in_every_split(small_set):
    root, summary = small_set
    seen = {split: set() for split in synthetic.SPLITS}
    for split in synthetic.SPLITS:
        for d in capetown.load_split(root / split):
            seen[split] |= set(np.unique(capetown.read_mask(d["sem_seg_file_name"])).tolist())
    assert seen["train"] == {0, 1, 2, 3}
    for split in synthetic.SPLITS:
        assert 3 in seen[split], split
    shares = summary["splits"]["train"]["pixel_share"]
    assert all(shares[name] > 0 for name in capetown.CLASS_NAMES)
    assert shares["background"] > 0.5
    assert abs(sum(shares.values()) - 1.0) < 1e-4


def test_some_images_have_no_foreground():
    _, mask = synthetic.render_image(0, "train", 5, SIZE)  # slot 5 of every 8 is empty
    assert not mask.any()


def test_second_call_writes_nothing(tmp_path):
    root = tmp_path / "idem"
    first = synthetic.make_synthetic_capetown(root, **TINY)
    assert first["generated"]
    marker = json.loads((root / synthetic.MARKER_NAME).read_text())
    assert marker["params"]["seed"] == TINY["seed"] and marker["params"]["size"] == TINY["size"]
    before = _mtimes(root)
    second = synthetic.make_synthetic_capetown(root, **TINY)
    assert not second["generated"]
    assert second["splits"] == first["splits"]
    assert _mtimes(root) == before

    again = synthetic.make_synthetic_capetown(root, **TINY, overwrite=True)
    assert again["generated"]
    assert _files(root) == sorted(before)


def test_other_parameters_regenerate_and_drop_stale_files(tmp_path):
    root = tmp_path / "params"
    synthetic.make_synthetic_capetown(root, **TINY)
    summary = synthetic.make_synthetic_capetown(root, **{**TINY, "num_train": 1})
    assert summary["generated"]
    assert len(list((root / "train" / "images").iterdir())) == 1
    assert len(list((root / "train" / "masks").iterdir())) == 1
    assert len(capetown.load_split(root / "train")) == 1


def test_missing_file_is_made_again(tmp_path):
    root = tmp_path / "hole"
    synthetic.make_synthetic_capetown(root, **TINY)
    victim = root / "val" / "masks" / synthetic.image_name("val", 0)
    expected = victim.read_bytes()
    victim.unlink()
    assert synthetic.make_synthetic_capetown(root, **TINY)["generated"]
    assert victim.read_bytes() == expected


class _InterruptingOs:
    """Stands in for the os module inside rooftop_m2f.fileio (the generator's atomic writes):
    the n-th os.replace is interrupted."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, src, dst):
        self.calls += 1
        if self.calls == self.n:
            assert Path(src).is_file()  # the temporary file was written completely
            raise KeyboardInterrupt
        os.replace(src, dst)


def test_interrupted_run_leaves_no_partial_files(tmp_path, monkeypatch):
    root = tmp_path / "interrupted"
    monkeypatch.setattr(fileio, "os", _InterruptingOs(5))
    with pytest.raises(KeyboardInterrupt):
        synthetic.make_synthetic_capetown(root, **TINY)
    assert not (root / synthetic.MARKER_NAME).exists()
    written = [p for p in root.rglob("*") if p.is_file()]
    assert len(written) == 4
    assert all(p.name.startswith("i_2023_RGB_8cm_SYN_") for p in written), written
    for p in written:  # whatever was written is a complete PNG
        with Image.open(p) as im:
            im.load()

    monkeypatch.setattr(fileio, "os", os)
    assert synthetic.make_synthetic_capetown(root, **TINY)["generated"]
    assert (root / synthetic.MARKER_NAME).exists()
    assert len(capetown.load_split(root / "train")) == 2


def test_refuses_folders_with_other_data(tmp_path):
    root = tmp_path / "real"
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "images" / "i_2023_RGB_8cm_W16C_20_4_4.png").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="not synthetic"):
        synthetic.make_synthetic_capetown(root, **SMALL)
    assert (root / "train" / "images" / "i_2023_RGB_8cm_W16C_20_4_4.png").read_bytes() == b"not ours"


@pytest.mark.parametrize("bad", [dict(size=32), dict(seed=-1), dict(num_val=-1)])
def test_bad_parameters(tmp_path, bad):
    with pytest.raises(ValueError):
        synthetic.make_synthetic_capetown(tmp_path / "bad", **{**SMALL, **bad})


def test_cli(tmp_path):
    root = tmp_path / "cli"
    cmd = [sys.executable, str(REPO / "datasets" / "make_synthetic_capetown.py"), "--root", str(root),
           "--num-train", "2", "--num-val", "2", "--num-test", "1", "--size", "64", "--seed", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "solar_pool_heater" in out.stdout and "wrote" in out.stdout
    assert len(capetown.load_split(root / "val")) == 2
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "nothing written" in again.stdout
