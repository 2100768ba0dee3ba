"""End-to-end fault tolerance of tools/train_net.py (real subprocesses): SIGKILL mid-training then
--resume, SIGTERM (single process and 2-process DDP) then --resume, a NaN loss."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import REPO, TINY_CONFIG, run_tool

# 8 training images at 2 per batch: 4 iterations per epoch; 8 iterations = 2 epochs.
RUN = [
    "--config-file", TINY_CONFIG,
    "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256", "INPUT.CROP.SIZE", "(64, 64)",
    "ROOFTOP.CHECK_DATASET", "False", "ROOFTOP.BEST_CHECKPOINT_TOPK", "0",
    "SOLVER.MAX_ITER", "8", "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "4",
]


def start(out, datasets_root, flags=(), opts=()):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), OMP_NUM_THREADS="2")
    log = open(out.parent / f"{out.name}.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "train_net.py"), *flags, *RUN,
                             *opts, "OUTPUT_DIR", str(out)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log.name
    return proc


def wait_for_tag(proc, out, name, timeout=300):
    """Poll until last_checkpoint names ``name`` (the checkpoint is complete by then)."""
    deadline = time.time() + timeout
    tag = out / "last_checkpoint"
    while time.time() < deadline:
        if tag.is_file() and tag.read_text().strip() == name:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended ({proc.returncode}) before {name}:\n"
                                 + open(proc.log_path).read()[-3000:])
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no {name} within {timeout} s")


def finish(proc, timeout=300):
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return open(proc.log_path).read()


def tagged_iteration(out):
    name = (out / "last_checkpoint").read_text().strip()
    data = torch.load(out / name, map_location="cpu", weights_only=True)  # complete and loadable
    assert name == f"model_{data['iteration']:07d}.pth"
    return data["iteration"]


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def check_complete_run(out):
    """model_final after 8 iterations; CSVs with each epoch and evaluation exactly once."""
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 7
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    train = rows(out / "train_epoch.csv")
    assert [(r["epoch"], r["iter_start"], r["iter_end"], r["num_iters"], r["complete"]) for r in train] \
        == [("0", "0", "4", "4", "1"), ("1", "4", "8", "4", "1")], train
    assert all(r["total_loss"] for r in train)
    valid = rows(out / "valid_epoch.csv")
    assert [r["iteration"] for r in valid] == ["4", "8"], valid
    # detectron2's metrics.json: each training iteration logged once, in order, even after a kill
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    train_iters = [r["iteration"] for r in records if "total_loss" in r]
    assert train_iters == sorted(set(train_iters)) and train_iters[-1] == 7, train_iters
    assert not [p for p in os.listdir(out) if p.startswith(".")], "temporary files left"


def resume_to_the_end(out, datasets_root, last):
    """--resume a run whose last checkpoint holds iteration ``last``: it continues from the next
    one and ends as a complete run."""
    resumed = start(out, datasets_root, ["--resume"])
    log = finish(resumed)
    assert resumed.returncode == 0, log[-3000:]
    assert f"Starting training from iteration {last + 1}" in log
    check_complete_run(out)


def test_sigkill_mid_training_then_resume(tiny_datasets_root, tmp_path):
    out = tmp_path / "killed"
    proc = start(out, tiny_datasets_root)
    wait_for_tag(proc, out, "model_0000001.pth")
    os.killpg(proc.pid, signal.SIGKILL)  # no clean-up of any kind
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model_final.pth").exists()
    last = tagged_iteration(out)
    assert last in (1, 3, 5)

    resume_to_the_end(out, tiny_datasets_root, last)


def test_sigterm_saves_then_resume_continues(tiny_datasets_root, tmp_path):
    out = tmp_path / "term"
    proc = start(out, tiny_datasets_root, opts=["DATALOADER.NUM_WORKERS", "1"])
    wait_for_tag(proc, out, "model_0000001.pth")
    # to the whole process group, data-loader worker included, as a scheduler does
    os.killpg(proc.pid, signal.SIGTERM)
    log = finish(proc)
    assert proc.returncode == 143, log[-3000:]
    assert "SIGTERM received" in log and "Traceback" not in log and "DataLoader worker" not in log
    stopped = tagged_iteration(out)
    assert 1 <= stopped < 7
    assert f"training stopped by SIGTERM after iteration {stopped}" in log
    # the partial epoch is marked incomplete until the resumed run completes it
    assert not (out / "model_final.pth").exists()

    resume_to_the_end(out, tiny_datasets_root, stopped)


def test_sigterm_to_the_ddp_launcher_stops_both_workers(tiny_datasets_root, tmp_path):
    out = tmp_path / "ddp"
    proc = start(out, tiny_datasets_root, ["--num-gpus", "2"],
                 ["TEST.EVAL_PERIOD", "0", "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", "40"])
    wait_for_tag(proc, out, "model_0000001.pth", timeout=400)
    proc.send_signal(signal.SIGTERM)  # the launcher only, as some schedulers do
    log = finish(proc)
    assert proc.returncode == 143, log[-3000:]
    stopped = tagged_iteration(out)
    for rank_log in (out / "log.txt", out / "log.txt.rank1"):
        assert f"training stopped by SIGTERM after iteration {stopped}" in rank_log.read_text(), rank_log


def test_nan_stops_the_run_naming_iteration_and_tensors(tiny_datasets_root, tmp_path):
    out = tmp_path / "nan"
    # A zero pixel std is a real misconfiguration: the normalised images are infinite.
    result = run_tool("train_net.py", *RUN, "MODEL.PIXEL_STD", "[0.0, 0.0, 0.0]", "OUTPUT_DIR", out,
                      datasets_root=tiny_datasets_root, check=False)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("train_net.py: error: Non-finite model outputs at iteration 0"), last_line
    assert "pred_logits" in last_line and "pred_masks" in last_line
    assert not list(out.glob("*.pth")) and not (out / "last_checkpoint").exists()
