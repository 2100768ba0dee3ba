"""No silent hangs (real 2-process CPU DDP runs of tools/train_net.py): one worker stalls in the
final evaluation's data loading (test hook ROOFTOP_TEST_STALL, see rooftop_m2f/engine/activity.py).
The other gives up after ROOFTOP.DIST_TIMEOUT_S and the run ends with one line naming both ranks
and what they were doing; a SIGTERM to the launcher ends it within ROOFTOP.STOP_GRACE_S."""
import os
import signal
import subprocess
import sys
import time

from conftest import REPO, TINY_CONFIG

RUN = [
    "--num-gpus", "2", "--config-file", TINY_CONFIG,
    "SOLVER.IMS_PER_BATCH", "4", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256", "INPUT.CROP.SIZE", "(64, 64)",
    "ROOFTOP.CHECK_DATASET", "False", "ROOFTOP.BEST_CHECKPOINT_TOPK", "0",
    "SOLVER.MAX_ITER", "1", "TEST.EVAL_PERIOD", "0", "ROOFTOP.STOP_GRACE_S", "3.0",
]
STALL_LINE = "ROOFTOP_TEST_STALL: rank 1 stalls"


def start(out, datasets_root, *opts):
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), OMP_NUM_THREADS="1",
               ROOFTOP_TEST_STALL="1:600")
    proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "train_net.py"), *RUN, *opts,
                             "OUTPUT_DIR", str(out)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc


def wait_for_stall(proc, out, timeout=400):
    """The time at which rank 1 started to stall (polls its log)."""
    log = out / "log.txt.rank1"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.is_file() and STALL_LINE in log.read_text():
            return time.time()
        if proc.poll() is not None:
            raise AssertionError(f"ended ({proc.returncode}) before the stall:\n"
                                 + proc.stderr.read()[-3000:])
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("rank 1 never reached its evaluation")


def finish(proc, timeout):
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running {timeout} s later") from None
    return stderr


def test_a_stalled_worker_ends_the_run_within_the_timeout_naming_it(tiny_datasets_root, tmp_path):
    out = tmp_path / "stall"
    proc = start(out, tiny_datasets_root, "ROOFTOP.DIST_TIMEOUT_S", "20.0")
    stalled_at = wait_for_stall(proc, out)
    # rank 0 gives up 20 s after it started waiting; the launcher then gives rank 1 3 s, SIGTERM,
    # 3 s, SIGKILL
    stderr = finish(proc, timeout=20 + 6 + 30)
    elapsed = time.time() - stalled_at
    assert proc.returncode == 1, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("train_net.py: error: rank 0: gave up after waiting 20 s (ROOFTOP.DIST_TIMEOUT_S) for "
                           "the other processes while waiting for the other processes' evaluation "
                           "results (gather); the others: rank 1: evaluating capetown_sem_seg_val "
                           "(for "), line
    assert "Stopped by the launcher: rank 1: evaluating capetown_sem_seg_val" in line
    assert "Traceback" not in stderr, stderr[-3000:]
    assert elapsed < 20 + 6 + 20, elapsed
    assert "gave up after waiting 20 s" in (out / "log.txt").read_text()
    assert (out / "model_final.pth").is_file(), "the checkpoint before the evaluation is kept"


def test_sigterm_to_the_launcher_ends_a_stuck_run_within_the_grace(tiny_datasets_root, tmp_path):
    out = tmp_path / "term"
    proc = start(out, tiny_datasets_root, "ROOFTOP.DIST_TIMEOUT_S", "600.0")
    wait_for_stall(proc, out)
    time.sleep(1)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)  # the launcher only, as some schedulers do
    stderr = finish(proc, timeout=3 + 30)
    assert time.time() - sent < 3 + 10
    assert proc.returncode == 143, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("train_net.py: error: SIGTERM: 2 process(es) had not stopped 3 s later "
                           "(ROOFTOP.STOP_GRACE_S) and were killed: rank 0: "), line
    assert "rank 1: evaluating capetown_sem_seg_val (for " in line
    assert "Traceback" not in stderr, stderr[-3000:]
