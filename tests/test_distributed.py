"""Several processes on the CPU (gloo): torchrun and --num-gpus train the same run, torchrun's
elastic restart of a killed worker resumes the run by itself, and a stuck process ends the run
within --dist-timeout in one line naming the rank that gave up."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import REPO, TINY_CONFIG, TINY_RUN, rows

pytestmark = pytest.mark.slow

RUN = ["SOLVER.MAX_ITER", "4", "TEST.EVAL_PERIOD", "2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # torchrun, with this Python


def command(out, *opts, launcher=(), flags=()):
    runner = [*launcher] if launcher else [sys.executable]
    return [*runner, str(REPO / "tools" / "train_net.py"), *flags, "--config-file", TINY_CONFIG,
            *TINY_RUN, *RUN, *opts, "OUTPUT_DIR", str(out)]


def environment(datasets_root, **extra):
    return dict(os.environ, DETECTRON2_DATASETS=str(datasets_root), OMP_NUM_THREADS="1",
                OMP_WAIT_POLICY="PASSIVE", **extra)


def run(cmd, datasets_root, timeout=400, **extra):
    result = subprocess.run(cmd, cwd=REPO, env=environment(datasets_root, **extra),
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def without_times(path):
    return [{k: v for k, v in r.items() if k not in ("data_time", "time")} for r in rows(path)]


def test_torchrun_and_num_gpus_train_the_same_run(tiny_datasets_root, tmp_path):
    spawned, elastic = tmp_path / "spawned", tmp_path / "torchrun"
    run(command(spawned, flags=["--num-gpus", "2"]), tiny_datasets_root)
    run(command(elastic, launcher=[*TORCHRUN, "--standalone", "--nproc-per-node", "2"]),
        tiny_datasets_root)
    for out in (spawned, elastic):  # one run of two processes, not two runs of one
        assert "Rank of current process: 1. World size: 2" in (out / "log.txt.rank1").read_text()
        assert len(list(out.glob("events.out.tfevents.*"))) == 1
    final = [torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
             for out in (spawned, elastic)]
    assert final[0]["iteration"] == final[1]["iteration"] == 3
    assert all(torch.equal(final[0]["model"][k], final[1]["model"][k]) for k in final[0]["model"])
    assert without_times(spawned / "train_epoch.csv") == without_times(elastic / "train_epoch.csv")
    assert len(rows(spawned / "train_epoch.csv")) == 2
    assert rows(spawned / "valid_epoch.csv") == rows(elastic / "valid_epoch.csv")
    assert rows(spawned / "metrics_epoch_per_class.csv") == rows(elastic / "metrics_epoch_per_class.csv")


def test_a_killed_worker_is_restarted_by_torchrun_and_the_run_resumes(tiny_datasets_root, tmp_path):
    out = tmp_path / "elastic"
    cmd = command(out, "SOLVER.MAX_ITER", "6", "TEST.EVAL_PERIOD", "4",
                  launcher=[*TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", "1"])
    log = open(tmp_path / "torchrun.log", "w")
    agent = subprocess.Popen(cmd, cwd=REPO, env=environment(tiny_datasets_root), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not ((out / "last_checkpoint").is_file()
               and (out / "last_checkpoint").read_text() == "model_0000001.pth"):
        assert agent.poll() is None and time.time() < deadline, open(log.name).read()[-3000:]
        time.sleep(0.05)
    workers = open(f"/proc/{agent.pid}/task/{agent.pid}/children").read().split()
    os.kill(int(workers[-1]), signal.SIGKILL)
    try:
        assert agent.wait(400) == 0, open(log.name).read()[-3000:]
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
    text = open(log.name).read() + (out / "log.txt").read_text()
    assert "torchrun restart 1: the run continues from its last checkpoint" in text
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 5
    assert [(r["epoch"], r["iter_start"], r["iter_end"], r["complete"])
            for r in rows(out / "train_epoch.csv")] == \
        [("0", "0", "2", "1"), ("1", "2", "4", "1"), ("2", "4", "6", "1")]
    assert [r["iteration"] for r in rows(out / "valid_epoch.csv")] == ["4", "6"]
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    trained = [r["iteration"] for r in records if "total_loss" in r]
    assert trained == sorted(set(trained)) and trained[-1] == 5, trained


STALL = textwrap.dedent("""
    # test hook: rank 1 stops in the first image its evaluation maps, as a process stuck in a
    # read would (a SIGTERM still ends it)
    import os, signal, time
    if os.environ.get("STALL_EVALUATION_OF_RANK"):
        from detectron2.utils import comm
        from rooftop_m2f.data.mapper import RooftopSemanticDatasetMapper

        _call = RooftopSemanticDatasetMapper.__call__

        def _stalled(self, dataset_dict):
            if not self.is_train and comm.get_rank() == int(os.environ["STALL_EVALUATION_OF_RANK"]):
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                time.sleep(600)
            return _call(self, dataset_dict)

        RooftopSemanticDatasetMapper.__call__ = _stalled
""")


def test_a_stuck_process_ends_the_run_within_the_timeout_in_one_line(tiny_datasets_root, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STALL)
    out = tmp_path / "stuck"
    cmd = command(out, "SOLVER.MAX_ITER", "1", "TEST.EVAL_PERIOD", "0",
                  flags=["--num-gpus", "2", "--dist-timeout", "10"])
    start = time.time()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=environment(tiny_datasets_root, STALL_EVALUATION_OF_RANK="1",
                                            PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])))
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("train_net.py: error: rank 0: gave up waiting ("), line
    assert "another process is stuck or has died" in line and "Traceback" not in result.stderr
    assert "gave up waiting" in (out / "log.txt").read_text()
    assert (out / "model_final.pth").is_file(), "the checkpoint before the evaluation is kept"
    assert time.time() - start < 120
