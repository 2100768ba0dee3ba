"""Runs never lose history (real subprocesses of tools/train_net.py and tools/predict.py):
extending a run (larger SOLVER.MAX_ITER, larger ROOFTOP.EPOCHS over a grown training split), a
shorter one refused, a second run into a run's folder refused or archived, two predictions into
one folder, a failing write."""
import csv
import hashlib
import json
import os
import shutil
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_CONFIG, run_tool

# 8 training images, 4 per batch: 2 iterations per epoch. Evaluations only at the end of a run.
BASE = [
    "--config-file", TINY_CONFIG,
    "SOLVER.IMS_PER_BATCH", "4", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256", "INPUT.CROP.SIZE", "(64, 64)",
    "ROOFTOP.CHECK_DATASET", "False", "ROOFTOP.BEST_CHECKPOINT_TOPK", "0",
    "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0",
]


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]


def snapshot(folder):
    """Every file under ``folder`` with its size, mtime and content hash."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            stat = os.lstat(path)
            digest = (hashlib.sha1(open(path, "rb").read()).hexdigest()
                      if not os.path.islink(path) else os.readlink(path))
            found[os.path.relpath(path, folder)] = (stat.st_size, stat.st_mtime_ns, digest)
    return found


def last_line(result):
    return result.stderr.strip().splitlines()[-1]


def train(out, root, *opts, flags=(), check=True):
    return run_tool("train_net.py", *flags, *BASE, *opts, "OUTPUT_DIR", out, datasets_root=root,
                    check=check)


def poly_lr(iteration, max_iter, base=3e-4, warmup=20, power=0.9):
    """The tiny config's WarmupPolyLR (linear warm-up from 0.001 over 20 iterations)."""
    alpha = iteration / warmup
    factor = 0.001 * (1 - alpha) + alpha if iteration < warmup else 1.0
    return base * factor * (1 - iteration / max_iter) ** power


def grow_split(root, extra):
    """Add ``extra`` training images (copies under new names) to the dataset at ``root``."""
    train = root / "capetown" / "train"
    sources = sorted((train / "images").iterdir())
    for i in range(extra):
        src = sources[i % len(sources)]
        name = f"i_2023_RGB_8cm_SYN_GROWN{i:02d}_0_0.png"
        shutil.copy(src, train / "images" / name)
        shutil.copy(train / "masks" / src.name, train / "masks" / name)


def test_resume_extends_a_run_by_max_iter_then_by_epochs_over_a_grown_split(tiny_datasets_root,
                                                                             tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_datasets_root, root)
    out = tmp_path / "run"
    train(out, root, "SOLVER.MAX_ITER", "4")
    assert (out / "last_checkpoint").read_text() == "model_final.pth"

    # a shorter run than the checkpoint cannot be honoured: one line, nothing touched
    before = snapshot(out)
    result = train(out, root, "SOLVER.MAX_ITER", "3", flags=["--resume"], check=False)
    assert result.returncode == 1
    assert last_line(result) == (
        f"train_net.py: error: {out}/model_final.pth holds 4 completed iterations but SOLVER.MAX_ITER is 3: a "
        "run can be extended, not shortened; set SOLVER.MAX_ITER (or ROOFTOP.EPOCHS) to at least "
        "that, or train into another OUTPUT_DIR (nothing was changed)")
    assert "Traceback" not in result.stderr
    assert snapshot(out) == before

    # 1. a larger SOLVER.MAX_ITER continues the finished run (it crashed one step past the old
    # end with "math domain error": the scheduler kept the checkpoint's length)
    result = train(out, root, "SOLVER.MAX_ITER", "6", flags=["--resume"])
    log = result.stdout + result.stderr
    assert "Starting training from iteration 4" in log
    assert "WarmupPolyLR follows the schedule over 6 iterations" in log
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 5
    train_rows = rows(out / "train_epoch.csv")
    assert [(r["epoch"], r["iter_start"], r["iter_end"], r["complete"]) for r in train_rows] == \
        [("0", "0", "2", "1"), ("1", "2", "4", "1"), ("2", "4", "6", "1")]
    # the schedule rule: the configured poly schedule over the new length, at each iteration
    assert float(train_rows[2]["lr"]) == pytest.approx(poly_lr(5, 6), rel=1e-4)
    assert float(train_rows[1]["lr"]) == pytest.approx(poly_lr(3, 4), rel=1e-4), "history kept"
    assert [r["iteration"] for r in rows(out / "valid_epoch.csv")] == ["4", "6"]
    records = metrics(out)
    evals = [r["iteration"] for r in records if "sem_seg/mIoU" in r]
    assert evals == [4, 6], "the first run's last evaluation is kept, the new one added"
    trained = [r["iteration"] for r in records if "total_loss" in r]
    assert trained == sorted(set(trained)) and trained[-1] == 5, trained

    # 2. the split grows by 4 images (12: 3 iterations per epoch) and the run is given in epochs:
    # ROOFTOP.EPOCHS=3 -> ceil(3 * 3) = 9 iterations; epochs 0-2 keep their 2-iteration rows,
    # epoch 3 starts at the resume iteration with the new length
    grow_split(root, 4)
    result = train(out, root, "ROOFTOP.EPOCHS", "3.0", flags=["--resume"])
    log = result.stdout + result.stderr
    assert "SOLVER.MAX_ITER=9" in log and "Starting training from iteration 6" in log
    train_rows = rows(out / "train_epoch.csv")
    assert [(r["epoch"], r["iter_start"], r["iter_end"], r["num_iters"], r["complete"])
            for r in train_rows] == [("0", "0", "2", "2", "1"), ("1", "2", "4", "2", "1"),
                                     ("2", "4", "6", "2", "1"), ("3", "6", "9", "3", "1")]
    assert float(train_rows[3]["lr"]) == pytest.approx(poly_lr(8, 9), rel=1e-4)
    valid = rows(out / "valid_epoch.csv")
    assert [(r["epoch"], r["iteration"]) for r in valid] == [("1", "4"), ("2", "6"), ("3", "9")]
    records = metrics(out)
    assert [r["iteration"] for r in records if "sem_seg/mIoU" in r] == [4, 6, 9]
    trained = [r["iteration"] for r in records if "total_loss" in r]
    assert trained == sorted(set(trained)) and trained[-1] == 8, trained
    assert not [p for p in os.listdir(out) if p.startswith(".")], "temporary files left"


def test_a_second_run_never_overwrites_the_first(tiny_datasets_root, tmp_path):
    out = tmp_path / "run"
    train(out, tiny_datasets_root, "SOLVER.MAX_ITER", "2")
    first = snapshot(out)

    result = train(out, tiny_datasets_root, "SOLVER.MAX_ITER", "2", check=False)
    assert result.returncode == 1
    line = last_line(result)
    assert line.startswith(f"train_net.py: error: a new run (no --resume), but OUTPUT_DIR {out} already holds a "
                           "run (last_checkpoint, metrics.json"), line
    for way in ("--resume", "another OUTPUT_DIR", "--archive-old-run"):
        assert way in line
    assert "Traceback" not in result.stderr
    assert snapshot(out) == first, "nothing may change, not even config.yaml or log.txt"

    # --resume of a run without a checkpoint but with logs (killed before its first checkpoint)
    # would start at 0 and mix two runs: refused too
    other = tmp_path / "no_checkpoint"
    other.mkdir()
    (other / "metrics.json").write_text('{"iteration": 0, "total_loss": 1.0}\n')
    result = train(other, tiny_datasets_root, "SOLVER.MAX_ITER", "2", flags=["--resume"],
                   check=False)
    assert result.returncode == 1 and "no last_checkpoint" in last_line(result)
    assert sorted(os.listdir(other)) == ["metrics.json"]

    result = train(out, tiny_datasets_root, "SOLVER.MAX_ITER", "2", flags=["--archive-old-run"])
    archives = list((out / "previous_runs").iterdir())
    assert len(archives) == 1
    assert f"the previous run's files are now in {archives[0]}" in result.stderr
    moved = snapshot(archives[0])
    for name, (size, _, digest) in first.items():  # every file of the first run, unchanged
        assert moved[name][0] == size and moved[name][2] == digest, name
    assert len(metrics(out)) < len(metrics(archives[0])) + 5
    assert all(r["iteration"] <= 2 for r in metrics(out))
    assert [r["epoch"] for r in rows(out / "train_epoch.csv")] == ["0"]
    assert (out / "last_checkpoint").read_text() == "model_final.pth"


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


# --- a failing write --------------------------------------------------------------------------------

SITECUSTOMIZE = textwrap.dedent("""
    # test hook: os.fsync of files whose name matches FAIL_FSYNC_MATCH fails with ENOSPC from
    # the (FAIL_FSYNC_AFTER + 1)-th on, as on a disk that filled up
    import errno, fnmatch, os
    _pattern = os.environ.get("FAIL_FSYNC_MATCH")
    if _pattern:
        _after, _seen, _real = int(os.environ.get("FAIL_FSYNC_AFTER", "0")), [0], os.fsync

        def _fsync(fd):
            try:
                name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                name = ""
            if fnmatch.fnmatch(name, _pattern):
                _seen[0] += 1
                if _seen[0] > _after:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return _real(fd)

        os.fsync = _fsync
""")


@pytest.mark.parametrize("target, match, epochs", [
    # 2 iterations per epoch, a checkpoint every 2: each fails from its second write on
    ("model_0000003.pth", ".model_*.tmp.pth", ["0", "1"]),      # the second checkpoint
    ("train_epoch.csv", ".train_epoch.*.tmp.csv", ["0"]),       # the second epoch's row
])
def test_a_failing_write_stops_with_one_line_and_keeps_the_last_good_state(
        tiny_datasets_root, tmp_path, monkeypatch, target, match, epochs):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAIL_FSYNC_MATCH", match)
    monkeypatch.setenv("FAIL_FSYNC_AFTER", "1")
    out = tmp_path / "run"
    result = train(out, tiny_datasets_root, "SOLVER.MAX_ITER", "6", check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    line = last_line(result)
    assert line.startswith(f"train_net.py: error: cannot write {out}/{target}: No space left on device"), line
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # the last good checkpoint is complete and named; nothing half-written is left
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert torch.load(out / "model_0000001.pth", map_location="cpu",
                      weights_only=True)["iteration"] == 1
    assert not (out / "model_final.pth").exists()
    assert not [p for p in os.listdir(out) if p.startswith(".")], "temporary files left"
    assert [r["epoch"] for r in rows(out / "train_epoch.csv")] == epochs  # those written before
    assert all(json.loads(line) for line in (out / "metrics.json").read_text().splitlines())
    assert "cannot write" in (out / "log.txt").read_text()
    if target.endswith(".pth"):
        assert "last_checkpoint still names model_0000001.pth" in line


# --- the OUTPUT_DIR decision, without a training run ------------------------------------------------

def fake_cfg(out, max_iter=10):
    from types import SimpleNamespace

    return SimpleNamespace(OUTPUT_DIR=str(out), SOLVER=SimpleNamespace(MAX_ITER=max_iter),
                           ROOFTOP=SimpleNamespace(EPOCHS=0.0,
                                                   EARLY_STOP=SimpleNamespace(PATIENCE=0)))


def test_output_dir_decisions(tmp_path):
    from rooftop_m2f.engine.run_dir import ResumeError, RunDirError, check_output_dir

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
    with pytest.raises(ResumeError, match="holds 5 completed iterations but SOLVER.MAX_ITER is 4"):
        check_output_dir(fake_cfg(out, max_iter=4), resume=True)
    with pytest.raises(RunDirError, match="contradict"):
        check_output_dir(fake_cfg(out), resume=True, archive_old_run=True)
    (out / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(ResumeError, match="names 'model_0000009.pth', which does not exist"):
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


def test_one_epoch_definition(tiny_datasets_root, monkeypatch):
    """10 images at 4 per batch: 3 iterations per epoch; 100 epochs = 300 iterations, the same
    epochs as the CSVs count (EpochClock), and the periods from the same number."""
    from rooftop_m2f.engine.epochs import (epochs_to_iters, epochs_to_period, iters_per_epoch_for,
                                           resolve_epochs)
    from rooftop_m2f.engine.csv_logs import EpochClock
    from rooftop_m2f.engine.setup import build_cfg

    ipe = iters_per_epoch_for(10, 4)
    assert ipe == 3 and epochs_to_iters(100, ipe) == 300 and epochs_to_iters(0.5, ipe) == 2
    assert epochs_to_period(1, ipe) == 3 and epochs_to_period(0.1, ipe) == 1
    clock = EpochClock(ipe)
    assert {clock.epoch_of(i) for i in range(300)} == set(range(100))
    assert sum(clock.ends_epoch(i) for i in range(300)) == 100

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tiny_datasets_root))  # 8 training images
    cfg = build_cfg(TINY_CONFIG, ["SOLVER.IMS_PER_BATCH", "3", "ROOFTOP.EPOCHS", "10.0",
                                  "ROOFTOP.EVAL_EVERY_EPOCHS", "2.0",
                                  "ROOFTOP.CHECKPOINT_EVERY_EPOCHS", "5.0"], freeze=False)
    assert resolve_epochs(cfg) == 3
    assert (cfg.SOLVER.MAX_ITER, cfg.TEST.EVAL_PERIOD, cfg.SOLVER.CHECKPOINT_PERIOD) == (30, 6, 15)
