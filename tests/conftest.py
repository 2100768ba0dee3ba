import os
import subprocess
import sys
from pathlib import Path

import pytest

from rooftop_m2f import compat

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


def run_tool(script, *args, datasets_root=None, timeout=600, check=True):
    """Run tools/<script> (or <script> relative to the repo when it names a folder, e.g.
    ``benchmarks/benchmark.py``) as a separate process, the way users run it, and return the
    result.

    Tools are never imported: detectron2's wheel installs a top-level ``tools`` package.
    """
    env = dict(os.environ)
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
    config.addinivalue_line("markers", "slow: takes more than ~5 s (deselect with -m 'not slow')")
