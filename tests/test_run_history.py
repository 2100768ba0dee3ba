"""Runs never lose history: the OUTPUT_DIR decision of a training run, the one epoch definition,
two predictions into one folder (training runs end to end: test_train_net.py)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CONFIG, rows, run_tool, snapshot


def last_line(result):
    return result.stderr.strip().splitlines()[-1]


# --- predictions ----------------------------------------------------------------------------------

def predict(inputs, out):
    return run_tool("predict.py", "--config-file", TINY_CONFIG, "--input", *inputs, "--output-dir",
                    out, "--outputs", "index", "--random-weights", "SEED", "1")


def check_summary_matches_files(out):
    summary = rows(out / "summary.csv")
    for r in summary:
        index = np.array(Image.open(out / (r["image"].rsplit(".", 1)[0] + "_index.png")))
        assert int(r["pixels"]) == int((index == int(r["class_id"])).sum()), r
    return summary


@pytest.mark.slow
def test_predictions_into_one_folder_accumulate(tmp_path):
    rng = np.random.default_rng(0)
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(inputs / f"{name}.png")
    out = tmp_path / "out"
    predict([inputs / "a.png", inputs / "b.png"], out)
    first = rows(out / "summary.csv")
    assert sorted({r["image"] for r in first}) == ["a.png", "b.png"]

    # b is predicted again from another image, c for the first time
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(inputs / "b.png")
    predict([inputs / "b.png", inputs / "c.png"], out)
    summary = check_summary_matches_files(out)
    assert [(r["image"], r["class_id"]) for r in summary] == \
        [(n, str(c)) for n in ("a.png", "b.png", "c.png") for c in (1, 2, 3)], "one row per class"
    assert [r for r in summary if r["image"] == "a.png"] == \
        [r for r in first if r["image"] == "a.png"], "a's rows are kept as they were"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]

    # a summary.csv this tool did not write is not overwritten: one line, before predicting
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "summary.csv").write_text("id,value\n1,2\n")
    result = run_tool("predict.py", "--config-file", TINY_CONFIG, "--input", inputs / "a.png",
                      "--output-dir", foreign, "--random-weights", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert last_line(result).startswith(f"predict.py: error: {foreign}/summary.csv: not a prediction summary")
    assert sorted(os.listdir(foreign)) == ["summary.csv"]


# --- the OUTPUT_DIR decision, without a training run ------------------------------------------------

def fake_cfg(out, max_iter=10):
    from types import SimpleNamespace

    return SimpleNamespace(OUTPUT_DIR=str(out), SOLVER=SimpleNamespace(MAX_ITER=max_iter),
                           ROOFTOP=SimpleNamespace(EPOCHS=0.0,
                                                   EARLY_STOP=SimpleNamespace(PATIENCE=0)))


def test_output_dir_decisions(tmp_path):
    from rooftop_m2f.engine.run_dir import RunDirError, check_output_dir

    out = tmp_path / "run"
    assert check_output_dir(fake_cfg(out), resume=False) is None  # absent folder: a fresh run
    out.mkdir()
    (out / "log.txt").write_text("a run that failed before training\n")
    assert check_output_dir(fake_cfg(out), resume=False) is None  # no run's files: fine
    torch.save({"iteration": 4, "model": {}}, out / "model_0000004.pth")
    (out / "last_checkpoint").write_text("model_0000004.pth")
    (out / "train_epoch.csv").write_text("epoch\n0\n")
    (out / ".train_epoch.x1.tmp.csv").write_text("")
    before = snapshot(out)

    with pytest.raises(RunDirError, match="already holds a run .last_checkpoint, "
                                          "model_0000004.pth, train_epoch.csv.; nothing"):
        check_output_dir(fake_cfg(out), resume=False)
    assert check_output_dir(fake_cfg(out, max_iter=5), resume=True) is None  # 5 done, 5 asked
    with pytest.raises(RunDirError, match="holds 5 completed iterations but SOLVER.MAX_ITER is 4"):
        check_output_dir(fake_cfg(out, max_iter=4), resume=True)
    with pytest.raises(RunDirError, match="contradict"):
        check_output_dir(fake_cfg(out), resume=True, archive_old_run=True)
    (out / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(RunDirError, match="names 'model_0000009.pth', which does not exist"):
        check_output_dir(fake_cfg(out), resume=True)
    (out / "last_checkpoint").write_text("model_0000004.pth")  # (a new mtime: the test's)
    assert {k: (v[0], v[2]) for k, v in snapshot(out).items()} == \
        {k: (v[0], v[2]) for k, v in before.items()}, "a refusal changes nothing"

    target = check_output_dir(fake_cfg(out), resume=False, archive_old_run=True)
    assert os.path.dirname(target) == str(out / "previous_runs")
    assert sorted(os.listdir(out)) == ["previous_runs"]
    assert {k: v[2] for k, v in snapshot(target).items()} == {k: v[2] for k, v in before.items()}
    again = check_output_dir(fake_cfg(out), resume=False, archive_old_run=True)
    assert again is None  # nothing left to archive: a fresh run


def test_one_epoch_definition(tiny_datasets_root):
    """10 images at 4 per batch: 3 iterations per epoch; 100 epochs = 300 iterations, the same
    epochs as the CSVs count (EpochClock), and the periods from the same number."""
    from rooftop_m2f.config import get_rooftop_cfg
    from rooftop_m2f.data.capetown import register_capetown
    from rooftop_m2f.engine.csv_logs import EpochClock
    from rooftop_m2f.engine.epochs import iters_per_epoch_for, resolve_epochs

    ipe = iters_per_epoch_for(10, 4)
    assert ipe == 3
    clock = EpochClock(ipe)
    assert {clock.epoch_of(i) for i in range(300)} == set(range(100))
    assert sum(clock.ends_epoch(i) for i in range(300)) == 100

    register_capetown(str(tiny_datasets_root / "capetown"), prefix="epochs")  # 8 training images
    cfg = get_rooftop_cfg()
    cfg.merge_from_list(["DATASETS.TRAIN", "('epochs_train',)", "SOLVER.IMS_PER_BATCH", "3",
                         "ROOFTOP.EPOCHS", "10.0", "ROOFTOP.EVAL_EVERY_EPOCHS", "2.0",
                         "ROOFTOP.CHECKPOINT_EVERY_EPOCHS", "5.0"])
    assert len(resolve_epochs(cfg)) == 3
    assert (cfg.SOLVER.MAX_ITER, cfg.TEST.EVAL_PERIOD, cfg.SOLVER.CHECKPOINT_PERIOD) == (30, 6, 15)
    cfg.ROOFTOP.EPOCHS, cfg.ROOFTOP.EVAL_EVERY_EPOCHS = 0.5, 0.1  # 1.5 -> 2 iterations; period 0.3 -> 1
    resolve_epochs(cfg)
    assert (cfg.SOLVER.MAX_ITER, cfg.TEST.EVAL_PERIOD) == (2, 1)
