import csv
import hashlib
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

# As the Makefile: OpenMP threads that spin while waiting make CPU training many times slower
# on shared cores; set before torch is imported (its OpenMP runtime reads it once).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from rooftop_m2f import compat  # noqa: E402

# The compatibility shims for the installed detectron2 / Mask2Former, before any test module
# imports mask2former (the package applies them itself when it imports it).
compat.apply()

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "capetown_tiny_cpu.yaml")


@pytest.fixture(scope="session")
def tiny_datasets_root(tmp_path_factory):
    """A small synthetic dataset in the Cape Town layout: <root>/capetown/{train,val,test}."""
    from capetown_synthetic import make_synthetic_capetown

    root = tmp_path_factory.mktemp("d2datasets")
    make_synthetic_capetown(root / "capetown", num_train=8, num_val=4, num_test=4, size=128, seed=1)
    return root


def run_tool(script, *args, datasets_root=None, timeout=600, check=True, env=None):
    """Run tools/<script> (or <script> relative to the repo when it names a folder, e.g.
    ``benchmarks/benchmark.py``) as a separate process, the way users run it, and return the
    result (``env``: variables added to the environment).

    Tools are never imported: detectron2's wheel installs a top-level ``tools`` package.
    """
    env = {**os.environ, **(env or {})}
    if datasets_root is not None:
        env["DETECTRON2_DATASETS"] = str(datasets_root)
    env.setdefault("OMP_NUM_THREADS", "2")
    path = REPO / script if "/" in script else REPO / "tools" / script
    cmd = [sys.executable, str(path), *map(str, args)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
            f"\n--- stderr\n{result.stderr[-6000:]}"
        )
    return result


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~5 s (make test-fast leaves it out)")


# A tiny training run: 64 px crops, few points; with 8 training images at 4 per batch an epoch
# is 2 iterations.
TINY_RUN = [
    "SOLVER.IMS_PER_BATCH", "4", "DATALOADER.NUM_WORKERS", "0", "SEED", "0",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256", "INPUT.CROP.SIZE", "(64, 64)",
    "ROOFTOP.CHECK_DATASET", "False", "ROOFTOP.BEST_CHECKPOINT_TOPK", "0",
    "SOLVER.CHECKPOINT_PERIOD", "2", "TEST.EVAL_PERIOD", "0",
]


def train(out, datasets_root, *opts, flags=(), check=True, env=None, timeout=600):
    """tools/train_net.py on the tiny config and TINY_RUN (then ``opts``) into ``out``."""
    return run_tool("train_net.py", *flags, "--config-file", TINY_CONFIG, *TINY_RUN, *opts,
                    "OUTPUT_DIR", out, datasets_root=datasets_root, check=check, timeout=timeout,
                    env=env)



def tool_in_process(script, *args, capsys):
    """``(exit status, stderr)`` of tools/<script> called in this process the way its
    ``__main__`` does (for errors that end a tool before any heavy work)."""
    names = runpy.run_path(str(REPO / "tools" / script), run_name="tool_under_test")
    status = names["cli"].run(names.get("run") or names["main"], [str(a) for a in args], prog=script)
    return status, capsys.readouterr().err


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def snapshot(folder):
    """Every file under ``folder`` with its size, mtime and content hash (a link: its target)."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            stat = os.lstat(path)
            digest = (os.readlink(path) if os.path.islink(path)
                      else hashlib.sha1(open(path, "rb").read()).hexdigest())
            found[os.path.relpath(path, folder)] = (stat.st_size, stat.st_mtime_ns, digest)
    return found
