"""End-to-end: tools/train_net.py trains, checkpoints, resumes, evaluates; 2-process DDP."""
import json
import os

import pytest
import torch

from conftest import TINY_CONFIG, run_tool

FAST = [
    "SOLVER.IMS_PER_BATCH", "2",
    "DATALOADER.NUM_WORKERS", "0",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "1024",
    "ROOFTOP.CHECK_DATASET", "False",
]


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_train_checkpoint_resume_and_eval_only(tiny_datasets_root, tmp_path):
    out = tmp_path / "run"
    common = ["--config-file", TINY_CONFIG, *FAST, "OUTPUT_DIR", out, "SOLVER.MAX_ITER", "6",
              "SOLVER.CHECKPOINT_PERIOD", "4", "TEST.EVAL_PERIOD", "6"]
    first = run_tool("train_net.py", *common, datasets_root=tiny_datasets_root)
    assert (out / "model_final.pth").is_file()
    # A quiet console: no third-party warnings, the start-up dumps only in log.txt (no ANSI codes)
    console = first.stdout + first.stderr
    assert "Warning" not in console, console[-3000:]
    assert "Model:" not in console and "Environment info" not in console
    assert f"Environment, full config and model are in {out / 'log.txt'}" in console
    log = (out / "log.txt").read_text()
    assert "Environment info" in log and "Model:" in log and "Running with full config" in log
    assert "\x1b[" not in log
    assert (out / "model_0000003.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    records = read_metrics(out)
    evals = [r for r in records if "sem_seg/macro_fg_mIoU" in r]
    assert evals, "the evaluation at the last iteration must reach metrics.json"
    assert 0.0 <= evals[-1]["sem_seg/macro_fg_mIoU"] <= 1.0
    assert max(r["iteration"] for r in records if "total_loss" in r) == 5
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 5

    # As if the run had been killed after its checkpoint at iteration 3: --resume continues
    # from iteration 4 with the saved model, optimizer and scheduler, and reaches the end.
    (out / "model_final.pth").unlink()
    (out / "last_checkpoint").write_text("model_0000003.pth")
    result = run_tool("train_net.py", "--resume", *common, datasets_root=tiny_datasets_root)
    assert "Starting training from iteration 4" in result.stdout + result.stderr
    resumed = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert resumed["iteration"] == 5
    mid = torch.load(out / "model_0000003.pth", map_location="cpu", weights_only=True)["model"]
    assert any(not torch.equal(mid[k], resumed["model"][k]) for k in mid), \
        "the resumed iterations must update the weights"

    # --eval-only on the saved checkpoint, on the test split
    eval_dir = tmp_path / "eval"
    result = run_tool("train_net.py", "--config-file", TINY_CONFIG, "--eval-only", *FAST,
                      "MODEL.WEIGHTS", out / "model_final.pth", "OUTPUT_DIR", eval_dir,
                      "DATASETS.TEST", "('capetown_sem_seg_test',)",
                      datasets_root=tiny_datasets_root)
    report = eval_dir / "inference" / "capetown_sem_seg_test" / "sem_seg_evaluation.json"
    assert report.is_file(), result.stdout[-2000:]
    assert "macro_fg_mIoU" in result.stdout + result.stderr


def test_two_process_ddp_on_cpu(tiny_datasets_root, tmp_path):
    out = tmp_path / "ddp"
    result = run_tool("train_net.py", "--config-file", TINY_CONFIG, "--num-gpus", "2", *FAST,
                      "SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", out,
                      datasets_root=tiny_datasets_root)
    assert (out / "log.txt.rank1").is_file(), "a second process must have run"
    assert "Rank of current process: 1. World size: 2" in (out / "log.txt.rank1").read_text()
    assert (out / "model_final.pth").is_file()


def test_bad_dataset_fails_before_training_naming_the_file(tiny_datasets_root, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(tiny_datasets_root, root)
    masks = sorted((root / "capetown" / "train" / "masks").iterdir())
    masks[0].unlink()
    result = run_tool("train_net.py", "--config-file", TINY_CONFIG, *FAST, "SOLVER.MAX_ITER", "2",
                      "OUTPUT_DIR", tmp_path / "out", datasets_root=root, check=False)
    assert result.returncode != 0
    assert masks[0].stem in result.stderr and "no mask" in result.stderr
    assert not (tmp_path / "out" / "model_final.pth").exists()
