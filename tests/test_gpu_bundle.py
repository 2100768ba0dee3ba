"""tools/gpu_bundle.py (`make gpu-bundle`) keeps the GPU machine's bundle in step with
requirements*.txt, and tools/gpu_check.sh's helpers work without a GPU (fast: no bundle is
downloaded or installed here)."""
import importlib.util
import json
import subprocess

import pytest

from conftest import REPO, run_tool


def _bundle_module():
    # tools/ is not a package (detectron2's wheel installs a top-level ``tools``): load by path
    spec = importlib.util.spec_from_file_location("gpu_bundle", REPO / "tools" / "gpu_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_required_package_is_bundled_or_on_the_gpu_machine():
    gb = _bundle_module()
    assert gb.unbundled() == [], ("requirements*.txt packages neither in BUNDLE nor in "
                                  "GPU_MACHINE_HAS of tools/gpu_bundle.py")
    assert not set(gb.BUNDLE) & set(gb.GPU_MACHINE_HAS)


def test_a_new_requirement_is_caught(tmp_path):
    gb = _bundle_module()
    req = tmp_path / "requirements.txt"
    req.write_text((REPO / "requirements.txt").read_text() + "\nsome-new-package==1.0\n"
                   "Fvcore==0.1.5.post20221221  # case and separators do not matter\n")
    assert gb.unbundled([req]) == ["some-new-package"]


def test_bundle_versions_follow_requirements():
    gb = _bundle_module()
    pins = gb.requirements()
    bundle = dict(gb.bundle_pins())
    assert set(bundle) == set(gb.BUNDLE)
    for name, version in bundle.items():
        if name in pins:
            assert version == pins[name], name
    assert "rasterio" not in dict(gb.bundle_pins(with_rasterio=False))


def test_stub_wheels_stand_for_the_gpu_machine(tmp_path):
    import zipfile

    gb = _bundle_module()
    path = gb.stub_wheel(tmp_path, "typing-extensions", "4.14.0")
    assert path.name == "typing_extensions-4.14.0-py3-none-any.whl"
    with zipfile.ZipFile(path) as z:
        assert "Name: typing-extensions" in z.read(
            "typing_extensions-4.14.0.dist-info/METADATA").decode()


def test_existing_bundle_installs_on_the_gpu_machine():
    """The pip --dry-run check of a gathered bundle (skipped when `make gpu-bundle` has not run)."""
    if not (REPO / ".whl" / "cp310").is_dir():
        pytest.skip("no .whl/ bundle here (make gpu-bundle)")
    result = run_tool("gpu_bundle.py", "--check")
    assert "gpu_bundle --check: OK" in result.stdout


def test_gpu_check_arguments():
    script = REPO / "tools" / "gpu_check.sh"
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "op" in usage.stdout and "train" in usage.stdout
    bad = subprocess.run(["bash", str(script), "nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument" in bad.stderr


def test_gpu_check_summary_and_train_summary(tmp_path):
    steps = tmp_path / "steps.tsv"
    steps.write_text("op\top_tests\tpassed\t0\t12.5\t300\top_tests.log\n"
                     "op\tmemcheck\tskipped\t\t0\t0\tno GPU\n")
    (tmp_path / "op_bench.json").write_text('{"results": []}')
    out = tmp_path / "summary.json"
    result = run_tool("gpu_check_report.py", "summary", steps, out)
    summary = json.loads(out.read_text())
    assert summary["ok"] and [s["status"] for s in summary["steps"]] == ["passed", "skipped"]
    assert summary["results"]["op_bench"] == {"results": []}
    assert "gpu_check: OK" in result.stdout
    steps.write_text("train\ttrain\ttimeout\t124\t420.0\t420\ttrain.log\n")
    assert run_tool("gpu_check_report.py", "summary", steps, out, check=False).returncode == 1

    run = tmp_path / "run"
    run.mkdir()
    rows = [{"iteration": i, "total_loss": 10.0 - i * 0.1, "time": 0.5 if i > 4 else 2.0,
             "amp/skipped_steps": 1.0 if i > 2 else 0.0, "amp/loss_scale": 32768.0}
            for i in range(0, 20, 2)]
    rows.insert(5, {"iteration": 9, "sem_seg/mIoU": 12.0})
    (run / "metrics.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run / "log.txt").write_text("eta: 0:00:01  iter: 19  total_loss: 8.1  max_mem: 9876M\n")
    (run / "model_0000009.pth").write_bytes(b"")
    result = run_tool("gpu_check_report.py", "train-summary", run, "--warmup", "5")
    s = json.loads(result.stdout)
    assert s["seconds_per_iter_after_warmup"] == 0.5 and s["peak_gpu_memory_mb"] == 9876
    assert s["loss_finite"] and s["loss_falling"] and s["amp_skipped_steps"] == 1.0
    assert s["evaluations"] == [{"iteration": 9, "sem_seg/mIoU": 12.0}]
    assert s["checkpoints"] == ["model_0000009.pth"]


def test_gpu_check_op_stage_dry_run_passes_on_the_cpu(tmp_path):
    """The op stage as `make gpu-check` calls it (PY relative to the repo), on the CPU: the
    imports, the (incremental) op build, the op tests and the op benchmark all pass."""
    import os
    import sys

    python = os.path.relpath(sys.executable, REPO)
    if os.path.isabs(python) or not (REPO / python).is_file():
        pytest.skip("the tests' Python is not inside this checkout")
    env = dict(os.environ, OUT=str(tmp_path / "check"), PY=python)
    result = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", "op"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path / "check" / "summary.json").read_text())
    failed = [s["step"] for s in summary["steps"] if s["status"] not in ("passed", "skipped")]
    assert result.returncode == 0 and not failed, (failed, result.stdout[-3000:])
    passed = {s["step"] for s in summary["steps"] if s["status"] == "passed"}
    assert {"imports", "op_tests", "op_bench"} <= passed
