"""Training on a COCO-format copy of the synthetic set sees the same data as the PNG route:
same dataset dicts (images, order, masks), same first batch from the train loader and the same
first-iteration loss with a fixed seed; the evaluator reads COCO ground truth too."""
import random

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIG
from rooftop_m2f.cli import UserError
from rooftop_m2f.data import capetown
from rooftop_m2f.data.capetown import load_split, read_sem_seg
from rooftop_m2f.data.coco_convert import png_split_to_coco


@pytest.fixture()
def coco_root(tiny_datasets_root, tmp_path):
    png_root = tiny_datasets_root / "capetown"
    for split in ("train", "test"):
        png_split_to_coco(load_split(png_root / split), tmp_path / "coco" / split, progress=False)
    yield png_root, tmp_path / "coco"
    capetown.register_capetown()  # the default registration, for the tests that follow


def _cfg(root, fmt):
    from rooftop_m2f.engine.setup import build_cfg

    return build_cfg(TINY_CONFIG, [
        "ROOFTOP.DATASET_ROOT", str(root), "ROOFTOP.DATASET_FORMAT", fmt, "SEED", "3",
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "1024", "ROOFTOP.CHECK_DATASET", "False",
    ])


def _first_batch(cfg):
    from rooftop_m2f.engine.trainer import Trainer

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    return next(iter(Trainer.build_train_loader(cfg)))


def test_coco_copy_gives_the_png_route_dicts_batches_and_loss(coco_root):
    from detectron2.data import DatasetCatalog

    from rooftop_m2f.engine.trainer import Trainer

    png_root, root = coco_root
    batches, dicts = {}, {}
    for fmt, r in (("png", png_root), ("coco", root)):
        cfg = _cfg(r, fmt)
        dicts[fmt] = DatasetCatalog.get("capetown_sem_seg_train")
        batches[fmt] = _first_batch(cfg)
    assert "sem_seg_coco" in dicts["coco"][0] and "sem_seg_file_name" in dicts["png"][0]
    assert [d["file_name"].split("/")[-1] for d in dicts["coco"]] == \
        [d["file_name"].split("/")[-1] for d in dicts["png"]]
    for a, b in zip(dicts["png"], dicts["coco"]):
        np.testing.assert_array_equal(read_sem_seg(a), read_sem_seg(b))
    assert any(read_sem_seg(d).any() for d in dicts["coco"]), "the set must have foreground"

    for a, b in zip(batches["png"], batches["coco"]):
        assert torch.equal(a["image"], b["image"])
        assert torch.equal(a["sem_seg"], b["sem_seg"])
        assert torch.equal(a["instances"].gt_classes, b["instances"].gt_classes)
        assert torch.equal(a["instances"].gt_masks, b["instances"].gt_masks)

    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    model.train()
    losses = {}
    for fmt, batch in batches.items():
        torch.manual_seed(1)  # the loss samples points at random
        with torch.no_grad():
            losses[fmt] = {k: float(v) for k, v in model(batch).items()}
    assert losses["png"] == losses["coco"]
    assert np.isfinite(sum(losses["png"].values())) and sum(losses["png"].values()) > 0


def test_evaluator_reads_coco_ground_truth(coco_root):
    from detectron2.data import DatasetCatalog

    from rooftop_m2f.evaluation.sem_seg_evaluator import RooftopSemSegEvaluator

    _, root = coco_root
    _cfg(root, "coco")
    dicts = DatasetCatalog.get("capetown_sem_seg_test")
    evaluator = RooftopSemSegEvaluator("capetown_sem_seg_test", distributed=False)
    evaluator.reset()
    for d in dicts:  # a perfect prediction; the input has only file_name (found in the catalog)
        gt = torch.as_tensor(read_sem_seg(d).astype(np.int64))
        evaluator.process([{"file_name": d["file_name"]}], [{"sem_seg": gt}])
    metrics = evaluator.evaluate()["sem_seg"]
    assert metrics["mIoU"] == pytest.approx(1.0)


def test_check_before_training_understands_coco_splits(coco_root, tmp_path):
    import json

    from rooftop_m2f.data.capetown import DatasetError
    from rooftop_m2f.data.checks import check_datasets

    _, root = coco_root
    _cfg(root, "coco")
    reports = check_datasets(["capetown_sem_seg_train", "capetown_sem_seg_test"])
    assert [r.num_images for r in reports] == [8, 4] and all(r.masks_decoded for r in reports)
    train = root / "train" / "annotations.json"
    data = json.loads(train.read_text())
    data["annotations"][0]["segmentation"] = [[0, 0, 1, 1]]
    train.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"\[degenerate_polygon\].*annotation 1 "):
        check_datasets(["capetown_sem_seg_train"])
    with pytest.raises(UserError, match="ROOFTOP.DATASET_FORMAT 'tif': must be one of png, coco"):
        _cfg(root, "tif")
    with pytest.raises(UserError, match="ROOFTOP.COCO.CROWD"):
        from rooftop_m2f.engine.setup import build_cfg

        build_cfg(TINY_CONFIG, ["ROOFTOP.DATASET_FORMAT", "coco", "ROOFTOP.COCO.CROWD", "drop"])


def test_train_net_on_the_coco_copy_same_first_loss_as_png(coco_root, tmp_path):
    import json

    from conftest import run_tool

    png_root, root = coco_root
    common = ["--config-file", TINY_CONFIG, "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
              "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "1024", "SOLVER.MAX_ITER", "1", "SEED", "5",
              "DATASETS.TEST", "('capetown_sem_seg_test',)"]
    losses = {}
    for fmt, r, extra in (("png", png_root, ["TEST.EVAL_PERIOD", "0", "ROOFTOP.CHECK_DATASET", "False"]),
                          ("coco", root, ["TEST.EVAL_PERIOD", "1"])):  # the COCO run checks and evaluates
        out = tmp_path / fmt
        result = run_tool("train_net.py", *common, *extra, "ROOFTOP.DATASET_FORMAT", fmt,
                          "ROOFTOP.DATASET_ROOT", r, "OUTPUT_DIR", out)
        records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line]
        losses[fmt] = next(rec["total_loss"] for rec in records if "total_loss" in rec)
        assert (out / "model_final.pth").is_file()
    assert losses["coco"] == losses["png"]
    assert "macro_fg_mIoU" in result.stdout + result.stderr


def test_rare_class_sampler_reads_coco_objects(coco_root, tmp_path):
    from rooftop_m2f.data.coco import load_coco_json
    from rooftop_m2f.data.sampler import image_class_presence

    png_root, root = coco_root
    png = image_class_presence(load_split(png_root / "train"), cache_file=str(tmp_path / "c.json"))
    from_coco = image_class_presence(load_coco_json(root / "train" / "annotations.json",
                                                    root / "train" / "images"))
    np.testing.assert_array_equal(png, from_coco)
    assert from_coco[:, 1:].any()
