"""CSV epoch logs, top-K best checkpoints and the metrics.json trim, with a fake trainer (a
real run: test_train_net.py)."""
import csv
import errno
import json
import os

import pytest
from detectron2.utils.events import EventStorage

from rooftop_m2f.engine.best_checkpoint import (BEST_JSON, BEST_LINK, BEST_NAME_RE,
                                                TopKBestCheckpointer, best_checkpoint_name)
from rooftop_m2f.engine.csv_logs import CSVLog, EpochClock, EpochCSVWriter, EvalCSVWriter, trim_metrics_json
from rooftop_m2f.fileio import OutputWriteError


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class FakeTrainer:
    def __init__(self, start_iter=0, max_iter=100):
        self.start_iter = start_iter
        self.iter = start_iter
        self.max_iter = max_iter
        self.storage = EventStorage(start_iter)


def run_steps(trainer, hooks, iters, losses):
    """Drive hooks through iterations the way detectron2's loop does; losses(i) -> dict."""
    for i in iters:
        trainer.iter = trainer.storage.iter = i
        for key, value in losses(i).items():
            trainer.storage.put_scalar(key, value, smoothing_hint=False)
        for h in hooks:
            h.after_step()


# --- train_epoch.csv ---------------------------------------------------------------------------

def losses_of(i):
    return {"loss_ce": float(i), "loss_ce_0": 2.0 * i, "total_loss": 3.0 * i, "lr": 0.1 * i,
            "data_time": 0.5, **({"time": 1.0} if i % 2 else {})}


def test_epoch_rows_are_exact_means_and_survive_a_resume(tmp_path):
    out = str(tmp_path)
    hook = EpochCSVWriter(out, iters_per_epoch=4)
    trainer = FakeTrainer(0, max_iter=10)
    hook.trainer = trainer
    hook.before_train()
    run_steps(trainer, [hook], range(0, 6), losses_of)
    state = hook.state_dict()  # a checkpoint after iteration 5: two iterations into epoch 1
    assert state["num_iters"] == 2 and state["epoch"] == 1
    run_steps(trainer, [hook], range(6, 8), losses_of)  # the killed run goes on: epoch 1 row
    rows = read_csv(tmp_path / "train_epoch.csv")
    assert [r["epoch"] for r in rows] == ["0", "1"]
    first = rows[0]
    assert first["iter_start"] == "0" and first["iter_end"] == "4" and first["complete"] == "1"
    assert float(first["loss_ce"]) == pytest.approx(1.5)       # mean of 0, 1, 2, 3
    assert float(first["loss_ce_0"]) == pytest.approx(3.0)
    assert float(first["total_loss"]) == pytest.approx(4.5)
    assert float(first["lr"]) == pytest.approx(0.3)            # the epoch's last iteration
    assert float(first["time"]) == pytest.approx(1.0)          # only iterations that have one
    header = list(rows[0].keys())
    assert header.index("total_loss") < header.index("loss_ce") < header.index("loss_ce_0")

    # resume from the checkpoint after iteration 5: the epoch-1 row written after it is dropped
    # and rewritten from the checkpointed sums plus the redone iterations
    resumed = EpochCSVWriter(out, iters_per_epoch=4)
    trainer = FakeTrainer(6, max_iter=10)
    resumed.trainer = trainer
    resumed.load_state_dict(state)
    resumed.before_train()
    assert [r["epoch"] for r in read_csv(tmp_path / "train_epoch.csv")] == ["0"]
    run_steps(trainer, [resumed], range(6, 10), lambda i: {**losses_of(i), "loss_ce": 10.0 * i})
    trainer.iter = 10
    resumed.after_train()
    rows = read_csv(tmp_path / "train_epoch.csv")
    assert [(r["epoch"], r["complete"], r["num_iters"]) for r in rows] == \
        [("0", "1", "4"), ("1", "1", "4"), ("2", "0", "2")]
    assert rows[0] == first, "a row covered by the checkpoint is kept as it was"
    assert float(rows[1]["loss_ce"]) == pytest.approx((4 + 5 + 60 + 70) / 4)
    assert float(rows[2]["loss_ce"]) == pytest.approx((80 + 90) / 2)

    # resuming from model_final (after iteration 9) drops the partial row; the restored sums
    # rewrite it at the end
    final_state = resumed.state_dict()
    again = EpochCSVWriter(out, iters_per_epoch=4)
    trainer = FakeTrainer(10, max_iter=10)
    again.trainer = trainer
    again.load_state_dict(final_state)
    again.before_train()
    assert [r["epoch"] for r in read_csv(tmp_path / "train_epoch.csv")] == ["0", "1"]
    again.after_train()
    assert read_csv(tmp_path / "train_epoch.csv") == rows


def test_fresh_run_starts_the_csv_afresh(tmp_path):
    hook = EpochCSVWriter(str(tmp_path), iters_per_epoch=2)
    trainer = FakeTrainer(0, max_iter=4)
    hook.trainer = trainer
    hook.before_train()
    run_steps(trainer, [hook], range(0, 3), losses_of)
    assert len(read_csv(tmp_path / "train_epoch.csv")) == 1
    fresh = EpochCSVWriter(str(tmp_path), iters_per_epoch=3)
    fresh.trainer = FakeTrainer(0, max_iter=4)
    fresh.before_train()
    assert read_csv(tmp_path / "train_epoch.csv") == []


def test_another_epoch_length_on_resume_closes_the_unfinished_epoch_and_counts_on(tmp_path):
    """A grown split (or another IMS_PER_BATCH) between runs: the checkpoint's unfinished epoch
    ends at the resume iteration as a final row with complete 0, the next epoch starts there
    with the new length; no epoch number is repeated or skipped, and a later resume keeps it."""
    hook = EpochCSVWriter(str(tmp_path), iters_per_epoch=2)
    trainer = FakeTrainer(0, max_iter=5)
    hook.trainer = trainer
    hook.before_train()
    run_steps(trainer, [hook], range(0, 5), losses_of)  # epochs 0, 1 and iteration 4 of epoch 2
    trainer.iter = 5
    hook.after_train()
    state = hook.state_dict()

    grown = EpochCSVWriter(str(tmp_path), iters_per_epoch=3)
    trainer = FakeTrainer(5, max_iter=11)
    grown.trainer = trainer
    grown.load_state_dict(state)
    grown.before_train()
    run_steps(trainer, [grown], range(5, 9), losses_of)
    state = grown.state_dict()  # a checkpoint after iteration 8, one iteration into epoch 4
    run_steps(trainer, [grown], range(9, 11), losses_of)
    expected = [("0", "0", "2", "1"), ("1", "2", "4", "1"), ("2", "4", "5", "0"),
                ("3", "5", "8", "1"), ("4", "8", "11", "1")]
    table = [(r["epoch"], r["iter_start"], r["iter_end"], r["complete"])
             for r in read_csv(tmp_path / "train_epoch.csv")]
    assert table == expected
    assert float(read_csv(tmp_path / "train_epoch.csv")[2]["loss_ce"]) == pytest.approx(4.0)

    # a later resume with the same length keeps the moved origin (it is in the checkpoint) and
    # the closed epoch 2; it redoes epoch 4 only
    again = EpochCSVWriter(str(tmp_path), iters_per_epoch=3)
    trainer = FakeTrainer(9, max_iter=11)
    again.trainer = trainer
    again.load_state_dict(state)
    again.before_train()
    assert [r["epoch"] for r in read_csv(tmp_path / "train_epoch.csv")] == ["0", "1", "2", "3"]
    run_steps(trainer, [again], range(9, 11), losses_of)
    assert [(r["epoch"], r["iter_start"], r["iter_end"], r["complete"])
            for r in read_csv(tmp_path / "train_epoch.csv")] == expected

    # the evaluations count epochs with the same clock
    evals = EvalCSVWriter(str(tmp_path), again.clock, {"capetown_sem_seg_val": "sem_seg/"}, CLASSES)
    evals.trainer = FakeTrainer(11, max_iter=11)
    put_eval(evals.trainer, 10, 0.5)
    evals.trainer.iter = 10
    evals.after_step()
    assert [(r["epoch"], r["iteration"]) for r in read_csv(tmp_path / "valid_epoch.csv")] == \
        [("4", "11")]


# --- valid_epoch.csv and metrics_epoch_per_class.csv -----------------------------------------

CLASSES = ["background", "solar_panel", "solar_water_heater", "solar_pool_heater"]


def put_eval(trainer, storage_iter, miou):
    trainer.storage.iter = storage_iter
    scalars = {"sem_seg/mIoU": miou, "sem_seg/macro_fg_mIoU": miou / 2, "sem_seg/pAcc": 0.9,
               "sem_seg/fwIoU": 0.8}
    for c in CLASSES[:3]:  # solar_pool_heater undefined (NaN values are left out by the evaluator)
        scalars.update({f"sem_seg/{m}-{c}": miou for m in ("IoU", "precision", "recall", "F1")})
    trainer.storage.put_scalars(**scalars, smoothing_hint=False)


def test_eval_rows_per_evaluation_and_class(tmp_path):
    hook = EvalCSVWriter(str(tmp_path), EpochClock(4), {"capetown_sem_seg_val": "sem_seg/"}, CLASSES)
    trainer = FakeTrainer(0, max_iter=10)
    hook.trainer = trainer
    hook.before_train()
    for i in range(10):
        trainer.iter = trainer.storage.iter = i
        if (i + 1) % 3 == 0 and i + 1 != 10:
            put_eval(trainer, i, 0.1 * (i + 1))
        hook.after_step()
    trainer.iter = 10
    put_eval(trainer, 10, 1.0)
    hook.after_train()
    valid = read_csv(tmp_path / "valid_epoch.csv")
    assert [(r["epoch"], r["iteration"]) for r in valid] == \
        [("0", "3"), ("1", "6"), ("2", "9"), ("2", "10")]
    assert float(valid[1]["mIoU"]) == pytest.approx(0.6)
    assert float(valid[1]["macro_fg_mIoU"]) == pytest.approx(0.3)
    per_class = read_csv(tmp_path / "metrics_epoch_per_class.csv")
    assert len(per_class) == 4 * len(CLASSES)
    row = next(r for r in per_class if r["iteration"] == "9" and r["class_name"] == "solar_panel")
    assert row["class_id"] == "1" and float(row["F1"]) == pytest.approx(0.9)
    pool = [r for r in per_class if r["class_name"] == "solar_pool_heater"]
    assert all(r["IoU"] == "" for r in pool), "undefined metrics are empty cells"

    # resume at 6 drops the evaluations after it
    again = EvalCSVWriter(str(tmp_path), EpochClock(4), {"capetown_sem_seg_val": "sem_seg/"}, CLASSES)
    again.trainer = FakeTrainer(6, max_iter=10)
    again.before_train()
    assert [r["iteration"] for r in read_csv(tmp_path / "valid_epoch.csv")] == ["3", "6"]
    assert {r["iteration"] for r in read_csv(tmp_path / "metrics_epoch_per_class.csv")} == {"3", "6"}


# --- best checkpoints --------------------------------------------------------------------------

class FakeCheckpointer:
    """Writes a small file per save and tags last_checkpoint the way fvcore's does."""

    def __init__(self, save_dir):
        self.save_dir = save_dir
        self.saved = []

    def save(self, name, **kwargs):
        with open(os.path.join(self.save_dir, name + ".pth"), "w") as f:
            json.dump(kwargs, f)
        self.saved.append(name + ".pth")
        self.tag_last_checkpoint(name + ".pth")

    def tag_last_checkpoint(self, basename):
        with open(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.write(basename)


def best_files(directory):
    return sorted(n for n in os.listdir(directory) if BEST_NAME_RE.match(n))


def test_best_checkpoint_name_matches_the_reference():
    assert best_checkpoint_name(31000, "sem_seg/macro_fg_mIoU", 0.66204) + ".pth" == \
        "model_best_iter=0031000_valid_macro_fg_mIoU=0.6620.pth"


def test_top_k_saves_prunes_keeps_last_checkpoint_and_rebuilds_on_resume(tmp_path, caplog):
    out = str(tmp_path)
    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
    ckpt = FakeCheckpointer(out)
    hook = TopKBestCheckpointer(ckpt, out, "sem_seg/macro_fg_mIoU", top_k=2)
    trainer = FakeTrainer(0, max_iter=100)
    hook.trainer = trainer
    hook.before_train()
    scores = {10: 0.30, 20: 0.50, 30: 0.40, 40: float("nan"), 50: 0.50, 60: 0.10, 70: 0.60}
    for n, s in scores.items():
        trainer.iter = trainer.storage.iter = n - 1
        trainer.storage.put_scalar("sem_seg/macro_fg_mIoU", s, smoothing_hint=False)
        hook.after_step()
    # 0.3 in; 0.5 in; 0.4 pushes 0.3 out; NaN ignored; 0.5 at 50 pushes 0.4 out and ranks after
    # the tied 0.5 at 20 (earlier first);
    # 0.1 not saved; 0.6 pushes 0.5@50 out
    assert ckpt.saved == [best_checkpoint_name(n, "sem_seg/macro_fg_mIoU", scores[n]) + ".pth"
                          for n in (10, 20, 30, 50, 70)]
    expected = [best_checkpoint_name(70, "m/macro_fg_mIoU", 0.6) + ".pth",
                best_checkpoint_name(20, "m/macro_fg_mIoU", 0.5) + ".pth"]
    assert best_files(out) == sorted(expected)
    index = json.loads((tmp_path / BEST_JSON).read_text())
    assert [e["file"] for e in index["checkpoints"]] == expected
    assert index["checkpoints"][0]["score"] == pytest.approx(0.6)
    assert os.readlink(tmp_path / BEST_LINK) == expected[0]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth", \
        "saving a best checkpoint must not redirect --resume"
    assert json.loads((tmp_path / expected[0]).read_text())["iteration"] == 69

    # a resume from a checkpoint after iteration 40: the best from iteration 70 is deleted; with
    # the JSON gone the state comes from the file names
    (tmp_path / BEST_JSON).unlink()
    again = TopKBestCheckpointer(FakeCheckpointer(out), out, "sem_seg/macro_fg_mIoU", top_k=2)
    again.trainer = FakeTrainer(40, max_iter=100)
    again.before_train()
    assert best_files(out) == [expected[1]]
    assert [e["iteration"] for e in again.entries] == [20]
    assert json.loads((tmp_path / BEST_JSON).read_text())["best"] == expected[1]
    assert os.readlink(tmp_path / BEST_LINK) == expected[1]
    # next evaluation: a lower score still enters, as the top 2 has room
    trainer = again.trainer
    trainer.iter = trainer.storage.iter = 49
    trainer.storage.put_scalar("sem_seg/macro_fg_mIoU", 0.2, smoothing_hint=False)
    again.after_step()
    assert [e["iteration"] for e in again.entries] == [20, 50]


def test_no_last_checkpoint_before_a_best_one_leaves_none(tmp_path):
    hook = TopKBestCheckpointer(FakeCheckpointer(str(tmp_path)), str(tmp_path), "sem_seg/m", 1)
    hook.trainer = FakeTrainer(0, max_iter=5)
    hook.before_train()
    assert hook.consider(5, 0.5) is not None
    assert not (tmp_path / "last_checkpoint").exists()


# --- the CSV files themselves -----------------------------------------------------------------

def test_csv_rows_are_appended_a_torn_row_is_not_read_and_a_failed_append_is_taken_back(
        tmp_path, monkeypatch):
    log = CSVLog(str(tmp_path / "t.csv"))
    log.append([{"epoch": 0, "loss": "1.5"}])
    log.append([{"epoch": 1, "loss": "1.25"}])
    assert read_csv(tmp_path / "t.csv") == [{"epoch": "0", "loss": "1.5"}, {"epoch": "1", "loss": "1.25"}]
    log.append([{"epoch": 2, "loss": "1", "lr": "0.1"}])  # a new column: the file is rewritten once
    assert read_csv(tmp_path / "t.csv")[0] == {"epoch": "0", "loss": "1.5", "lr": ""}
    before = (tmp_path / "t.csv").read_text()
    with open(tmp_path / "t.csv", "a") as f:  # a kill in the middle of a row
        f.write("3,0.")
    assert [r["epoch"] for r in log.rows()] == ["0", "1", "2"]
    (tmp_path / "t.csv").write_text(before)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OutputWriteError, match="t.csv: No space left on device"):
        log.append([{"epoch": 3, "loss": "0.5", "lr": "0.1"}])
    assert (tmp_path / "t.csv").read_text() == before


# ---- metrics.json on resume ------------------------------------------------------------------
def write_metrics(path, iterations, torn=False):
    lines = [json.dumps({"iteration": i, "total_loss": float(i)}) for i in iterations]
    path.write_text("\n".join(lines) + "\n" + ('{"iteration": 9, "total_lo' if torn else ""))


@pytest.mark.parametrize("torn", [False, True])
def test_metrics_json_trimmed_to_the_checkpoint_on_resume(tmp_path, torn):
    path = tmp_path / "metrics.json"
    write_metrics(path, [0, 2, 4, 5, 6, 8], torn)
    trim_metrics_json(str(tmp_path), 5, completed_run=False)  # the checkpoint holds 0..4
    assert [json.loads(line)["iteration"] for line in path.read_text().splitlines()] == [0, 2, 4]
    assert sorted(os.listdir(tmp_path)) == ["metrics.json"]
    before = path.read_text()
    trim_metrics_json(str(tmp_path), 5, completed_run=False)
    assert path.read_text() == before


@pytest.mark.parametrize("completed", [True, False])
def test_metrics_json_keeps_the_final_evaluation_of_a_completed_run(tmp_path, completed):
    """Extending a finished run (start = its MAX_ITER = 6): detectron2 stored the evaluation
    after the last iteration at iteration 6; it belongs to model_final and is kept. From a
    checkpoint that is not the end of a run, records at 6 are redone: dropped."""
    path = tmp_path / "metrics.json"
    lines = [{"iteration": 4, "total_loss": 1.0, "lr": 0.1}, {"iteration": 5, "total_loss": 1.0},
             {"iteration": 6, "sem_seg/mIoU": 0.5}, {"iteration": 6, "total_loss": 2.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    trim_metrics_json(str(tmp_path), 6, completed_run=completed)
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == (lines[:3] if completed else lines[:2])
