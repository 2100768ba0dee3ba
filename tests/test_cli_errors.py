"""A user's mistakes get one line on stderr naming the file or key, the right exit status (2 for
usage, 1 for a failed run) and no traceback, before any model is built; --debug shows the
traceback. The tools answer --help without importing torch."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, TINY_CONFIG, run_tool, tool_in_process

from rooftop_m2f import cli

TOOLS = ["tools/train_net.py", "tools/predict.py", "tools/check_dataset.py",
         "tools/eval_from_png.py", "tools/convert_hf_to_d2.py", "tools/convert_coco.py",
         "benchmarks/benchmark.py", "benchmarks/benchmark_tiling.py", "tools/predict_city.py",
         "tools/city_report.py"]


def one_line_error(result, code, *fragments):
    err = result.stderr.strip()
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    lines = err.splitlines()
    assert len(lines) == 1, lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    # nothing heavy happened first: the model was never built
    assert "MSDeformAttn:" not in result.stdout + err
    return lines[0]


def in_process_error(capsys, code, *args):
    """train_net.py's one line for a mistake found before any model is built (in this process)."""
    status, err = tool_in_process("train_net.py", *args, capsys=capsys)
    assert status == code and len(err.strip().splitlines()) == 1, (status, err[-2000:])
    return err.strip()


@pytest.mark.slow
def test_misspelt_key_is_answered_with_the_closest_key():
    result = run_tool("train_net.py", "--config-file", TINY_CONFIG, "SOLVER.MAX_ITERS", "5",
                      check=False)
    one_line_error(result, 2, "SOLVER.MAX_ITERS is not a config key", "did you mean SOLVER.MAX_ITER?")


def test_config_mistakes_are_one_line_naming_the_file_or_key(capsys):
    line = in_process_error(capsys, 2, "--config-file", "configs/capetown_tiny.yaml")
    assert "configs/capetown_tiny.yaml: no such file" in line
    assert "did you mean configs/capetown_tiny_cpu.yaml" in line
    line = in_process_error(capsys, 2, "--config-file", TINY_CONFIG, "SOLVER.MAX_ITER", "many")
    assert "SOLVER.MAX_ITER many: wrong type" in line


def test_debug_shows_the_traceback(capsys):
    from rooftop_m2f.cli import ConfigError

    with pytest.raises(ConfigError):
        tool_in_process("train_net.py", "--config-file", "nope.yaml", "--debug", capsys=capsys)


@pytest.mark.slow
def test_a_bad_dataset_stops_training_before_the_model_is_built(tiny_datasets_root, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(tiny_datasets_root, root)
    mask = sorted((root / "capetown" / "train" / "masks").iterdir())[0]
    mask.unlink()
    result = run_tool("train_net.py", "--config-file", TINY_CONFIG, "OUTPUT_DIR", tmp_path / "out",
                      datasets_root=root, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"[missing_mask] {root}/capetown/train/images/{mask.name}: no mask" in result.stderr
    assert "MSDeformAttn:" not in result.stdout + result.stderr, "no model was built"
    assert not list((tmp_path / "out").glob("*.pth"))


@pytest.mark.slow
def test_an_option_after_the_overrides_is_explained(tmp_path):
    result = run_tool("check_dataset.py", "--split", "train", "ROOFTOP.DATASET_ROOT", tmp_path,
                      "--output-dir", tmp_path / "o", check=False)
    one_line_error(result, 2, "--output-dir comes after the config overrides")


def test_debug_shows_the_traceback():
    result = run_tool("train_net.py", "--config-file", "nope.yaml", "--debug", check=False)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


@pytest.mark.slow
def test_predict_without_weights_refuses_and_says_how(tmp_path):
    (tmp_path / "in.png").write_bytes(b"")
    result = run_tool("predict.py", "--config-file", TINY_CONFIG, "--input", tmp_path / "in.png",
                      "--output-dir", tmp_path / "out", check=False)
    one_line_error(result, 2, "needs weights", "MODEL.WEIGHTS", "--random-weights")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_predict_trailing_weights_are_an_override_not_an_input(tmp_path):
    (tmp_path / "in.png").write_bytes(b"")
    result = run_tool("predict.py", "--config-file", TINY_CONFIG, "--input", tmp_path / "in.png",
                      "--output-dir", tmp_path / "out", "MODEL.WEIGHTS", tmp_path / "none.pth",
                      check=False)
    one_line_error(result, 1, f"MODEL.WEIGHTS {tmp_path / 'none.pth'}: no such file")
    # the same with the weights right after the inputs (train_net's convention inside --input)
    result = run_tool("predict.py", "--config-file", TINY_CONFIG, "--output-dir", tmp_path / "out",
                      "--input", tmp_path / "in.png", "MODEL.WEIGHTS", tmp_path / "none.pth",
                      check=False)
    one_line_error(result, 1, "none.pth: no such file")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_predict_bad_tta_and_missing_inputs_before_the_model_loads(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"PK\x03\x04")
    common = ["--config-file", TINY_CONFIG, "--output-dir", tmp_path / "out"]
    result = run_tool("predict.py", *common, "--input", tmp_path, "--tta", "flip", check=False)
    one_line_error(result, 2, "--tta flip: unknown view(s) flip", "hflip,vflip,rot90")
    result = run_tool("predict.py", *common, "--input", tmp_path / "nothere.png",
                      "MODEL.WEIGHTS", tmp_path / "w.pth", check=False)
    one_line_error(result, 2, "nothere.png: no such file")
    result = run_tool("predict.py", *common, "--input", tmp_path, "--outputs", "index,kml",
                      check=False)
    one_line_error(result, 2, "--outputs: unknown kml")
    assert not (tmp_path / "out").exists()


def test_eval_only_needs_weights_that_are_a_checkpoint(tmp_path, capsys):
    common = ["--config-file", TINY_CONFIG, "--eval-only", "OUTPUT_DIR", tmp_path / "run"]
    line = in_process_error(capsys, 2, *common)
    assert "--eval-only needs weights" in line and "--random-weights" in line
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    assert f"MODEL.WEIGHTS {text}: not a checkpoint" in in_process_error(capsys, 1, *common, "MODEL.WEIGHTS", text)
    assert "gone.pth: no such file" in in_process_error(capsys, 1, *common, "MODEL.WEIGHTS", tmp_path / "gone.pth")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_check_dataset_says_nothing_about_devices(tiny_datasets_root, tmp_path):
    result = run_tool("check_dataset.py", "--config-file",
                      REPO / "configs" / "capetown_swinS_1024.yaml", "--split", "val",
                      "--output-dir", tmp_path, "ROOFTOP.DATASET_ROOT",
                      tiny_datasets_root / "capetown")
    out = result.stdout + result.stderr
    assert "Dataset usable" in out
    for noise in ("MODEL.DEVICE", "CUDA", "AMP", "Warning"):
        assert noise not in out, out[-2000:]


@pytest.mark.parametrize("tool", TOOLS)
def test_help_needs_no_torch(tool):
    # as `python SCRIPT` does: the script's folder first on sys.path (its sibling modules)
    code = ("import runpy, sys\n"
            f"sys.argv = [{tool!r}, '--help']\n"
            f"sys.path.insert(0, {str((REPO / tool).parent)!r})\n"
            "try:\n"
            f"    runpy.run_path({str(REPO / tool)!r}, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert e.code in (0, None), e.code\n"
            "heavy = sorted(m for m in ('torch', 'detectron2', 'mask2former') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
    assert "HEAVY []" in result.stdout, result.stdout[-500:]


def test_split_trailing_overrides(tmp_path):
    assert cli.split_trailing_overrides(["a.tif", "b/", "MODEL.WEIGHTS", "w.pth"]) == (
        ["a.tif", "b/"], ["MODEL.WEIGHTS", "w.pth"])
    assert cli.split_trailing_overrides(["OUTPUT_DIR", "x"]) == ([], ["OUTPUT_DIR", "x"])
    existing = tmp_path / "TILES"
    existing.mkdir()
    os.chdir(tmp_path)
    try:  # an existing path that happens to look like a key stays an input
        assert cli.split_trailing_overrides(["TILES", "SEED", "1"]) == (["TILES"], ["SEED", "1"])
    finally:
        os.chdir(REPO)


def test_known_warnings_are_filtered_by_message_not_all():
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        cli.quiet_third_party_warnings()
        warnings.warn_explicit("`torch.jit.script` is deprecated. Please switch", FutureWarning,
                               "x.py", 1, module="torch.jit._script")
        warnings.warn_explicit("something else is deprecated", FutureWarning, "x.py", 1,
                               module="torch.jit._script")
    assert [str(w.message) for w in caught] == ["something else is deprecated"]


def test_a_failed_setup_names_its_step_and_what_to_try(tmp_path):
    env = dict(os.environ, VENV=str(tmp_path / "venv"), PYTHON=str(tmp_path / "no-python"))
    result = subprocess.run(["bash", str(REPO / "tools" / "setup_env.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-3:]
    assert last[0] == f"[setup] FAILED at step: create the virtual environment with {env['PYTHON']}"
    assert last[1].startswith("[setup] try: install Python 3.11")
    assert not list((tmp_path / "venv").glob(".rooftop-setup-*")), "nothing may be marked done"


def test_an_up_to_date_setup_still_writes_the_checkout_pth(tmp_path):
    """An environment whose stamp is current gets the checkout's .pth written anyway (a path
    added to it needs no reinstall), and nothing else runs."""
    import hashlib

    venv, site = tmp_path / "venv", tmp_path / "site"
    (venv / "bin").mkdir(parents=True)
    site.mkdir()
    python = venv / "bin" / "python"  # answers the purelib question, and nothing else
    python.write_text(f"#!/bin/sh\necho {site}\n")
    python.chmod(0o755)
    hashed = ("requirements.txt", "requirements-dev.txt", "tools/setup_env.sh")
    digest = hashlib.sha256(b"".join((REPO / f).read_bytes() for f in hashed)).hexdigest()[:16]
    (venv / f".rooftop-setup-{digest}-pypi").touch()
    env = dict(os.environ, VENV=str(venv), DETECTRON2_SOURCE="pypi")
    result = subprocess.run(["bash", str(REPO / "tools" / "setup_env.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    lines = (site / "rooftop_m2f_checkout.pth").read_text().splitlines()
    assert lines == [str(REPO), str(REPO / "ops"), str(REPO / "datasets")]


def test_light_copies_of_package_constants_match():
    """Tools keep a few choices as plain data, so that --help needs no torch: they must match."""
    import runpy

    from rooftop_m2f.data import capetown, coco, coco_convert

    for tool in ("check_dataset.py", "convert_coco.py"):
        names = runpy.run_path(str(REPO / "tools" / tool), run_name="not_main")
        assert tuple(names["SPLITS"]) == tuple(capetown.SPLITS)
    names = runpy.run_path(str(REPO / "tools" / "convert_coco.py"), run_name="not_main")
    assert tuple(names["CROWD_MODES"]) == tuple(coco.CROWD_MODES)
    assert tuple(names["SEGMENTATION_MODES"]) == tuple(coco_convert.SEGMENTATION_MODES)


def test_weights_url_offline_is_one_line_before_the_model_is_built(tmp_path, monkeypatch, capsys):
    # a closed port on this machine stands for the model zoo on a machine without internet
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    line = in_process_error(capsys, 1, "--config-file", TINY_CONFIG, "--eval-only",
                            "OUTPUT_DIR", tmp_path / "run", "MODEL.WEIGHTS",
                            "http://127.0.0.1:9/zoo/model_final_011c6d.pkl")
    for fragment in ("cannot download model_final_011c6d.pkl",
                     "download http://127.0.0.1:9/zoo/model_final_011c6d.pkl elsewhere",
                     "MODEL.WEIGHTS /path/to/model_final_011c6d.pkl"):
        assert fragment in line
    assert not list((tmp_path / "cache").rglob("*.pkl")), "nothing cached"


@pytest.mark.parametrize("key, value, fragment", [
    ("ROOFTOP.CITY.KWP_PER_M2_LOW", "0.3", "ROOFTOP.CITY.KWP_PER_M2_LOW 0.3"),
    ("ROOFTOP.CITY.REVIEW_MIN_CONFIDENCE", "1.5", "ROOFTOP.CITY.REVIEW_MIN_CONFIDENCE 1.5"),
    ("ROOFTOP.CITY.REVIEW_MAX_AREA_M2", "[0, 5000, 12]", "ROOFTOP.CITY.REVIEW_MAX_AREA_M2"),
    ("ROOFTOP.CITY.REVIEW_MIN_AREA_M2", "[0, 1, 20, 2]", "the minimum must be below the maximum"),
])
def test_predict_city_names_a_bad_layer_key_before_any_work(tmp_path, key, value, fragment):
    import numpy as np

    from capetown_synthetic import mosaic_transform, write_tile

    write_tile(str(tmp_path / "t.tif"), np.zeros((32, 32, 3), np.uint8), mosaic_transform())
    result = run_tool("predict_city.py", "--config-file", TINY_CONFIG, "--random-weights",
                      "--input", tmp_path / "t.tif", "--output-dir", tmp_path / "out", key, value,
                      check=False)
    one_line_error(result, 2, fragment)
    assert not (tmp_path / "out" / "run.json").exists()
