"""tools/train_net.py end to end on the tiny config: what a run writes, a resume after a kill,
extending a run, a second run into the same folder, --eval-only. One short run is shared."""
import json
import os
import shutil

import pytest
import torch

from conftest import TINY_CONFIG, TINY_RUN, rows, run_tool, snapshot, tool_in_process, train

pytestmark = pytest.mark.slow

# 8 training images, 4 per batch: 2 iterations per epoch; evaluations after 2 and 4.
RUN = ["SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "2", "ROOFTOP.BEST_CHECKPOINT_TOPK", "1"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]


def trained_iterations(out):
    return [r["iteration"] for r in metrics(out) if "total_loss" in r]


def epochs(out):
    return [(r["epoch"], r["iter_start"], r["iter_end"], r["complete"])
            for r in rows(out / "train_epoch.csv")]


def poly_lr(iteration, max_iter, base=3e-4, warmup=20, power=0.9):
    """The tiny config's WarmupPolyLR (linear warm-up from 0.001 over 20 iterations)."""
    alpha = iteration / warmup
    return base * (0.001 * (1 - alpha) + alpha) * (1 - iteration / max_iter) ** power


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_datasets_root):
    """A finished 4-iteration run and its console output."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    result = train(out, tiny_datasets_root, *RUN)
    return out, result.stdout + result.stderr


def refused(out, root, capsys, monkeypatch, *args):
    """train_net.py in this process, for a run refused before anything happens."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    flags = [a for a in args if a.startswith("--")]
    opts = [a for a in args if not a.startswith("--")]
    return tool_in_process("train_net.py", *flags, "--config-file", TINY_CONFIG, *TINY_RUN, *RUN,
                           *opts, "OUTPUT_DIR", out, capsys=capsys)


def copy(run, tmp_path, name="run"):
    shutil.copytree(run, tmp_path / name, symlinks=True)
    return tmp_path / name


def test_a_run_writes_its_history_and_keeps_the_console_quiet(finished):
    out, console = finished
    assert "Warning" not in console and "Traceback" not in console, console[-3000:]
    assert "Model:" not in console and "Environment info" not in console
    assert f"Environment, full config and model are in {out / 'log.txt'}" in console
    log = (out / "log.txt").read_text()
    assert "Environment info" in log and "Model:" in log and "\x1b[" not in log
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)["iteration"] == 3
    assert epochs(out) == [("0", "0", "2", "1"), ("1", "2", "4", "1")]
    train_rows = rows(out / "train_epoch.csv")
    for key in ("total_loss", "loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "lr", "data_time"):
        assert all(float(r[key]) > 0 for r in train_rows), key
    header = list(train_rows[0])
    assert header.index("total_loss") < header.index("loss_ce") < header.index("loss_ce_0")
    valid = rows(out / "valid_epoch.csv")
    assert [(r["epoch"], r["iteration"], r["weights"]) for r in valid] == [("0", "2", "raw"), ("1", "4", "raw")]
    assert 0 <= float(valid[-1]["macro_fg_mIoU"]) <= 1
    per_class = rows(out / "metrics_epoch_per_class.csv")
    assert len(per_class) == 2 * 4 and {r["class_name"] for r in per_class} >= {"solar_panel"}
    best = json.loads((out / "best_checkpoints.json").read_text())
    assert len(best["checkpoints"]) == 1 and os.readlink(out / "model_best.pth") == best["best"]
    assert [e["iteration"] for e in best["checkpoints"]][0] in (2, 4)
    assert trained_iterations(out) == sorted(set(trained_iterations(out)))
    assert [r["iteration"] for r in metrics(out) if "sem_seg/mIoU" in r][-1] == 4
    assert not [p for p in os.listdir(out) if p.startswith(".")], "temporary files left"


def test_resume_after_a_kill_then_extend_by_iterations_and_by_epochs(
        finished, tiny_datasets_root, tmp_path, capsys, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(tiny_datasets_root, root)
    out = copy(finished[0], tmp_path)
    # as if killed after the checkpoint of iteration 1: later files are a future it redoes
    (out / "model_final.pth").unlink()
    (out / "model_0000003.pth").unlink()
    (out / "last_checkpoint").write_text("model_0000001.pth")
    result = train(out, root, *RUN, flags=["--resume"])
    assert "Starting training from iteration 2" in result.stdout + result.stderr
    assert epochs(out) == [("0", "0", "2", "1"), ("1", "2", "4", "1")]
    assert [r["iteration"] for r in rows(out / "valid_epoch.csv")] == ["2", "4"]
    trained = trained_iterations(out)
    assert trained == sorted(set(trained)) and trained[-1] == 3, trained
    best = json.loads((out / "best_checkpoints.json").read_text())["checkpoints"]
    assert len(best) == 1 and (out / best[0]["file"]).is_file()

    # a shorter run is refused in one line, nothing touched
    before = snapshot(out)
    status, err = refused(out, root, capsys, monkeypatch, "--resume", "SOLVER.MAX_ITER", "3")
    assert status == 1 and err.strip() == (
        f"train_net.py: error: {out}/model_final.pth holds 4 completed iterations but "
        "SOLVER.MAX_ITER is 3: a run can be extended, not shortened; set SOLVER.MAX_ITER (or "
        "ROOFTOP.EPOCHS) to at least that, or train into another OUTPUT_DIR (nothing was changed)")
    assert snapshot(out) == before

    # a larger SOLVER.MAX_ITER continues the finished run on the longer schedule
    result = train(out, root, *RUN, "SOLVER.MAX_ITER", "6", flags=["--resume"])
    assert "WarmupPolyLR follows the schedule over 6 iterations" in result.stdout + result.stderr
    assert epochs(out)[-1] == ("2", "4", "6", "1")
    assert float(rows(out / "train_epoch.csv")[2]["lr"]) == pytest.approx(poly_lr(5, 6), rel=1e-4)
    assert float(rows(out / "train_epoch.csv")[1]["lr"]) == pytest.approx(poly_lr(3, 4), rel=1e-4)
    assert [r["iteration"] for r in metrics(out) if "sem_seg/mIoU" in r][-2:] == [4, 6]

    # the split grows by 4 images (3 iterations per epoch); ROOFTOP.EPOCHS 3 is 9 iterations
    images = root / "capetown" / "train"
    for i, src in enumerate(sorted((images / "images").iterdir())[:4]):
        shutil.copy(src, images / "images" / f"grown{i}.png")
        shutil.copy(images / "masks" / src.name, images / "masks" / f"grown{i}.png")
    result = train(out, root, *RUN, "ROOFTOP.EPOCHS", "3.0", flags=["--resume"])
    assert "SOLVER.MAX_ITER=9" in result.stdout + result.stderr
    assert epochs(out) == [("0", "0", "2", "1"), ("1", "2", "4", "1"), ("2", "4", "6", "1"),
                           ("3", "6", "9", "1")]
    assert [(r["epoch"], r["iteration"]) for r in rows(out / "valid_epoch.csv")] == \
        [("0", "2"), ("1", "4"), ("2", "6"), ("3", "8"), ("3", "9")]
    trained = trained_iterations(out)
    assert trained == sorted(set(trained)) and trained[-1] == 8, trained
    assert not [p for p in os.listdir(out) if p.startswith(".")], "temporary files left"


def test_a_second_run_never_overwrites_the_first(finished, tiny_datasets_root, tmp_path, capsys,
                                                 monkeypatch):
    out = copy(finished[0], tmp_path)
    first = snapshot(out)
    status, line = refused(out, tiny_datasets_root, capsys, monkeypatch)
    assert status == 1 and line.startswith(
        f"train_net.py: error: a new run (no --resume), but OUTPUT_DIR {out} already holds a run "
        "(best_checkpoints.json, last_checkpoint, metrics.json"), line
    assert all(way in line for way in ("--resume", "another OUTPUT_DIR", "--archive-old-run"))
    assert snapshot(out) == first, "nothing may change, not even config.yaml or log.txt"
    # --resume of a folder with a run's files but no checkpoint would mix two runs: refused
    other = tmp_path / "no_checkpoint"
    other.mkdir()
    (other / "metrics.json").write_text('{"iteration": 0, "total_loss": 1.0}\n')
    status, line = refused(other, tiny_datasets_root, capsys, monkeypatch, "--resume")
    assert status == 1 and "no last_checkpoint" in line and os.listdir(other) == ["metrics.json"]

    result = train(out, tiny_datasets_root, "SOLVER.MAX_ITER", "2", flags=["--archive-old-run"])
    archive, = (out / "previous_runs").iterdir()
    assert f"the previous run's files are now in {archive}" in result.stderr
    moved = snapshot(archive)
    assert all(moved[name][::2] == (size, digest) for name, (size, _, digest) in first.items())
    assert epochs(out) == [("0", "0", "2", "1")]
    assert all(r["iteration"] <= 2 for r in metrics(out))


def test_eval_only_evaluates_the_weights_on_the_test_split(finished, tiny_datasets_root, tmp_path):
    result = run_tool("train_net.py", "--config-file", TINY_CONFIG, "--eval-only",
                      "MODEL.WEIGHTS", finished[0] / "model_final.pth", "OUTPUT_DIR", tmp_path,
                      "DATASETS.TEST", "('capetown_sem_seg_test',)", datasets_root=tiny_datasets_root)
    report = tmp_path / "inference" / "capetown_sem_seg_test" / "sem_seg_evaluation.json"
    assert report.is_file() and "macro_fg_mIoU" in result.stdout + result.stderr
