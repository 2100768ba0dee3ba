"""tools/train_net.py stops cleanly or loudly, never half-way: SIGTERM saves and exits 143 (one
process with a data-loader worker, and 2-process DDP), --resume then finishes the run with its
CSV history whole; a NaN and a failing write are one line each."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import REPO, TINY_CONFIG, TINY_RUN, rows, train

pytestmark = pytest.mark.slow

RUN = ["SOLVER.MAX_ITER", "6", "TEST.EVAL_PERIOD", "4"]


def start(out, datasets_root, *opts, flags=()):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), OMP_NUM_THREADS="1",
               OMP_WAIT_POLICY="PASSIVE")
    log = open(f"{out}.log", "w")
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "train_net.py"), *flags,
                             "--config-file", TINY_CONFIG, *TINY_RUN, *RUN, *opts, "OUTPUT_DIR", str(out)], cwd=REPO,
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log.name
    return proc


def wait_for_checkpoint(proc, out, name="model_0000001.pth", timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "last_checkpoint").is_file() and (out / "last_checkpoint").read_text() == name:
            return
        if proc.poll() is not None:
            raise AssertionError(f"ended ({proc.returncode}) before {name}:\n"
                                 + open(proc.log_path).read()[-3000:])
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no {name} within {timeout} s")


def stopped_at(out):
    name = (out / "last_checkpoint").read_text()
    iteration = torch.load(out / name, map_location="cpu", weights_only=True)["iteration"]
    assert name == f"model_{iteration:07d}.pth"
    return iteration


def test_sigterm_saves_exits_143_and_resume_finishes_with_the_history_whole(tiny_datasets_root,
                                                                            tmp_path):
    out = tmp_path / "term"
    proc = start(out, tiny_datasets_root, "DATALOADER.NUM_WORKERS", "1")
    wait_for_checkpoint(proc, out)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole group, loader worker included, as schedulers do
    proc.wait(120)
    log = open(proc.log_path).read()
    assert proc.returncode == 143, log[-3000:]
    assert "Traceback" not in log and "DataLoader worker" not in log
    stopped = stopped_at(out)
    assert 1 <= stopped < 5 and f"training stopped by SIGTERM after iteration {stopped}" in log
    assert not (out / "model_final.pth").exists()

    result = train(out, tiny_datasets_root, *RUN, flags=["--resume"])
    assert f"Starting training from iteration {stopped + 1}" in result.stdout + result.stderr
    assert [(r["epoch"], r["iter_end"], r["complete"]) for r in rows(out / "train_epoch.csv")] == \
        [("0", "2", "1"), ("1", "4", "1"), ("2", "6", "1")]
    assert [r["iteration"] for r in rows(out / "valid_epoch.csv")] == ["4", "6"]


def test_sigterm_to_the_ddp_launcher_stops_both_processes_after_one_iteration(tiny_datasets_root,
                                                                               tmp_path):
    out = tmp_path / "ddp"
    proc = start(out, tiny_datasets_root, "SOLVER.MAX_ITER", "40", flags=["--num-gpus", "2"])
    wait_for_checkpoint(proc, out, timeout=400)
    proc.send_signal(signal.SIGTERM)  # the launching process only, as some schedulers do
    proc.wait(120)
    assert proc.returncode == 143, open(proc.log_path).read()[-3000:]
    stopped = stopped_at(out)
    for log in (out / "log.txt", out / "log.txt.rank1"):
        assert f"training stopped by SIGTERM after iteration {stopped}" in log.read_text(), log


def test_nan_stops_the_run_in_one_line_naming_iteration_and_tensors(tiny_datasets_root, tmp_path):
    out = tmp_path / "nan"
    # a zero pixel std is a real misconfiguration: the normalised images are infinite
    result = train(out, tiny_datasets_root, "MODEL.PIXEL_STD", "[0.0, 0.0, 0.0]", check=False)
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1
    assert line.startswith("train_net.py: error: Non-finite model outputs at iteration 0"), line
    assert "pred_logits" in line and "pred_masks" in line and "Traceback" not in result.stdout
    assert not list(out.glob("*.pth")) and not (out / "last_checkpoint").exists()


FAILING_FSYNC = textwrap.dedent("""
    # test hook: an append to train_epoch.csv (the first row is written whole, under a temporary
    # name) fails with ENOSPC when flushed to disk, as on a disk that filled up
    import errno, os
    _real = os.fsync

    def _fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/train_epoch.csv"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _real(fd)

    os.fsync = _fsync
""")


def test_a_failing_write_is_one_line_and_takes_back_the_row(tiny_datasets_root, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(FAILING_FSYNC)
    out = tmp_path / "run"
    result = train(out, tiny_datasets_root, *RUN, check=False,
                   env={"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])})
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1, result.stderr[-3000:]
    assert line.startswith(f"train_net.py: error: cannot write {out}/train_epoch.csv: No space left "
                           "on device"), line
    assert "Traceback" not in result.stdout + result.stderr
    assert [r["epoch"] for r in rows(out / "train_epoch.csv")] == ["0"]  # the failed row taken back
    assert (out / "train_epoch.csv").read_text().count("\n") == 2
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
