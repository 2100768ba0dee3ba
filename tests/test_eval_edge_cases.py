"""Evaluation edge cases through the trainer's own test path (Trainer.test: the test loader, the
mapper, RooftopSemSegEvaluator, its JSON file and log): images with no foreground, classes absent
from the whole split, predictions of the ignore value 255."""
import json
import logging

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from conftest import TINY_CONFIG
from rooftop_m2f.data.capetown import register_capetown
from rooftop_m2f.engine import Trainer
from rooftop_m2f.engine.setup import build_cfg

H = W = 8


class FixedPredictions(torch.nn.Module):
    """Returns, for each input image, the (H, W) class map stored for its file name."""

    def __init__(self, predictions):
        super().__init__()
        self.predictions = predictions

    def forward(self, inputs):
        return [{"sem_seg": torch.as_tensor(self.predictions[x["file_name"]])} for x in inputs]


@pytest.fixture
def edge_split(tmp_path):
    split = tmp_path / "capetown" / "val"
    (split / "images").mkdir(parents=True)
    (split / "masks").mkdir()
    no_fg = np.zeros((H, W), np.uint8)                      # background only
    panel = np.zeros((H, W), np.uint8)
    panel[2:4, 2:6] = 1                                     # 8 px of solar panel
    ignored = panel.copy()
    ignored[6:, :] = 255                                    # 16 px ignored
    preds = {}
    for name, gt, pred in [
        ("nofg", no_fg, np.where(np.arange(H * W).reshape(H, W) < 4, 255, 0)),  # 4 px predicted 255
        ("panel", panel, panel.astype(np.int64)),                               # perfect
        ("ignored", ignored, np.where(ignored == 255, 3, ignored).astype(np.int64)),  # 3 only on ignore
    ]:
        Image.fromarray(np.full((H, W, 3), 90, np.uint8)).save(split / "images" / f"{name}.png")
        Image.fromarray(gt).save(split / "masks" / f"{name}.png")
        preds[str(split / "images" / f"{name}.png")] = pred
    register_capetown(str(tmp_path / "capetown"), prefix="edgecase")
    yield preds
    for s in ("train", "val", "test"):
        DatasetCatalog.remove(f"edgecase_{s}")
        MetadataCatalog.remove(f"edgecase_{s}")


def test_absent_classes_no_foreground_and_ignore_predictions(edge_split, tmp_path, caplog):
    cfg = build_cfg(TINY_CONFIG, ["DATASETS.TEST", "('edgecase_val',)", "OUTPUT_DIR", str(tmp_path / "out"),
                                  "DATALOADER.NUM_WORKERS", "0"])
    with caplog.at_level(logging.WARNING, logger="rooftop_m2f.evaluation"):
        results = Trainer.test(cfg, FixedPredictions(edge_split))
    res = results["sem_seg"]
    # valid pixels: 64 + 64 + 48 = 176; correct: 60 + 64 + 48 = 172 (4 predicted 255 are wrong)
    assert res["pAcc"] == pytest.approx(172 / 176)
    assert res["IoU-background"] == pytest.approx(156 / 160)  # 160 gt px: TP 156, FN 4 (the 255s)
    assert res["IoU-solar_panel"] == 1.0
    # water and pool heaters: in no mask and never predicted on a labelled pixel -> undefined
    assert not [k for k in res if k.endswith(("solar_water_heater", "solar_pool_heater"))]
    assert res["num_undefined_classes"] == 2.0
    assert res["macro_fg_mIoU"] == pytest.approx(1.0)  # solar_panel alone
    assert res["mIoU"] == pytest.approx((156 / 160 + 1.0) / 2)
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "IoU undefined" in messages and "'solar_water_heater', 'solar_pool_heater'" in messages
    assert "excluded from mIoU and macro_fg_mIoU" in messages
    assert "4 pixel(s) with valid ground truth have predictions that are not a class" in messages

    saved = json.loads((tmp_path / "out" / "inference" / "edgecase_val" / "sem_seg_evaluation.json").read_text())
    assert saved["undefined_classes"] == ["solar_water_heater", "solar_pool_heater"]
    assert saved["invalid_prediction_pixels"] == 4 and saved["num_images"] == 3
    per_class = saved["per_class"]
    assert per_class["solar_water_heater"]["IoU"] is None and per_class["solar_pool_heater"]["IoU"] is None
    assert per_class["background"]["invalid_prediction_pixels"] == 4
    assert saved["confusion_matrix"][0][-1] == 4  # the invalid-prediction column
