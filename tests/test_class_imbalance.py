"""Class-imbalance options: ROOFTOP.LOSS.PER_CLASS_WEIGHTS in the classification loss and the
rare-class repeat-factor sampler (ROOFTOP.REPEAT_THRESHOLD)."""
import logging
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data.samplers import RepeatFactorTrainingSampler
from PIL import Image

from conftest import TINY_CONFIG
from rooftop_m2f.data.sampler import (
    CACHE_FILE,
    build_repeat_factor_sampler,
    image_class_presence,
    repeat_factors_from_presence,
)
from rooftop_m2f.engine.setup import build_cfg
from rooftop_m2f.modeling.meta_arch import build_criterion

WEIGHTS = [0.5, 1.0, 2.0, 4.0]


def cfg_with(*opts):
    return build_cfg(TINY_CONFIG, ["ROOFTOP.MSDEFORM_ATTN_IMPL", "pytorch", *opts])


# --- class weights --------------------------------------------------------------------------
def label_loss(criterion, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, 5, generator=g)  # 2 images, 6 queries, 4 classes + no-object
    targets = [{"labels": torch.tensor([0, 3])}, {"labels": torch.tensor([0, 1, 2])}]
    indices = [(torch.tensor([4, 1]), torch.tensor([0, 1])), (torch.tensor([0, 2, 5]), torch.tensor([0, 1, 2]))]
    loss = criterion.loss_labels({"pred_logits": logits}, targets, indices, num_masks=5)["loss_ce"]
    target_classes = torch.full((2, 6), 4)
    target_classes[0, 4], target_classes[0, 1] = 0, 3
    target_classes[1, 0], target_classes[1, 2], target_classes[1, 5] = 0, 1, 2
    return loss, logits, target_classes


def test_class_weights_set_the_criterion_weights_and_change_the_loss():
    plain = build_criterion(cfg_with(), 4)
    weighted = build_criterion(cfg_with("ROOFTOP.LOSS.PER_CLASS_WEIGHTS", str(WEIGHTS)), 4)
    assert plain.empty_weight.tolist() == pytest.approx([1, 1, 1, 1, 0.1])
    assert weighted.empty_weight.tolist() == pytest.approx(WEIGHTS + [0.1])

    loss_plain, logits, target = label_loss(plain)
    loss_weighted, _, _ = label_loss(weighted)
    expected = F.cross_entropy(logits.transpose(1, 2), target, torch.tensor(WEIGHTS + [0.1]))
    assert loss_weighted.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss_plain.item() == pytest.approx(
        F.cross_entropy(logits.transpose(1, 2), target, torch.tensor([1, 1, 1, 1, 0.1])).item(), rel=1e-6)
    assert abs(loss_weighted.item() - loss_plain.item()) > 1e-3


def test_class_weights_survive_loading_a_checkpoint_with_other_weights(caplog):
    weighted = build_criterion(cfg_with("ROOFTOP.LOSS.PER_CLASS_WEIGHTS", str(WEIGHTS)), 4)
    state = build_criterion(cfg_with(), 4).state_dict()  # e.g. --resume of a run without weights
    assert "empty_weight" in state
    with caplog.at_level(logging.WARNING):
        weighted.load_state_dict(state)
    assert weighted.empty_weight.tolist() == pytest.approx(WEIGHTS + [0.1])
    assert "replaced by the config's" in caplog.text


@pytest.mark.parametrize("bad", ["[1.0, 1.0, 1.0]", "[1.0, -1.0, 1.0, 1.0]", "[0.0, 0.0, 0.0, 0.0]"])
def test_bad_class_weights_are_clear_errors(bad):
    from rooftop_m2f.cli import ConfigError

    with pytest.raises((ConfigError, ValueError), match="ROOFTOP.LOSS.PER_CLASS_WEIGHTS"):
        build_criterion(cfg_with("ROOFTOP.LOSS.PER_CLASS_WEIGHTS", bad), 4)


# --- repeat factors -------------------------------------------------------------------------
PRESENCE = np.array([
    [1, 0, 0, 0],
    [1, 1, 0, 0],
    [1, 1, 1, 0],
    [1, 1, 0, 1],   # the only pool heater
    [1, 0, 0, 0],
], dtype=bool)


def test_repeat_factors_formula():
    image_r, freq, class_r = repeat_factors_from_presence(PRESENCE, 0.5)
    assert freq.tolist() == pytest.approx([1.0, 0.6, 0.2, 0.2])
    # r(c) = max(1, sqrt(t / f(c)))
    assert class_r.tolist() == pytest.approx([1.0, 1.0, 0.5 ** 0.5 / 0.2 ** 0.5, 0.5 ** 0.5 / 0.2 ** 0.5])
    assert image_r.tolist() == pytest.approx([1.0, 1.0, 2.5 ** 0.5, 2.5 ** 0.5, 1.0])
    none = PRESENCE.copy()
    none[:, 3] = False
    image_r, _, class_r = repeat_factors_from_presence(none, 0.5)
    assert np.isnan(class_r[3]) and image_r[3] == 1.0
    with pytest.raises(ValueError):
        repeat_factors_from_presence(PRESENCE, 0)


def test_sampler_yields_rare_class_images_more_often():
    image_r, _, _ = repeat_factors_from_presence(PRESENCE, 0.5)
    sampler = RepeatFactorTrainingSampler(torch.tensor(image_r, dtype=torch.float32), seed=0)
    it = iter(sampler)
    counts = np.bincount([next(it) for _ in range(20000)], minlength=5)
    ratio = counts / counts[0]
    assert ratio[[1, 4]] == pytest.approx([1.0, 1.0], abs=0.06)
    assert ratio[[2, 3]] == pytest.approx(image_r[[2, 3]], abs=0.08)
    assert counts[2] > 1.4 * counts[0]


def write_masks(directory, masks):
    directory.mkdir(parents=True, exist_ok=True)
    dicts = []
    for i, m in enumerate(masks):
        path = directory / f"m{i}.png"
        Image.fromarray(m.astype(np.uint8)).save(path)
        dicts.append({"file_name": str(path), "sem_seg_file_name": str(path)})
    return dicts


def test_class_presence_is_read_once_and_cached(tmp_path, caplog):
    masks = []
    for row in PRESENCE:
        m = np.full((8, 8), 255, np.uint8)
        for c in np.flatnonzero(row):
            m[c, :] = c
        masks.append(m)
    dicts = write_masks(tmp_path / "masks", masks)
    cache = tmp_path / "out" / CACHE_FILE
    with caplog.at_level(logging.INFO, logger="rooftop_m2f.data.sampler"):
        assert (image_class_presence(dicts, 4, str(cache)) == PRESENCE).all()
        assert "5 masks read, 0 from the cache" in caplog.text
        caplog.clear()
        assert (image_class_presence(dicts, 4, str(cache)) == PRESENCE).all()
        assert "0 masks read, 5 from the cache" in caplog.text
        # a changed mask is read again
        changed = masks[0].copy()
        changed[7, :] = 2
        Image.fromarray(changed).save(dicts[0]["sem_seg_file_name"])
        os.utime(dicts[0]["sem_seg_file_name"], ns=(time.time_ns(), time.time_ns() + 10 ** 9))
        caplog.clear()
        presence = image_class_presence(dicts, 4, str(cache))
        assert "1 masks read, 4 from the cache" in caplog.text
    assert presence[0].tolist() == [True, False, True, False]


def test_trainer_uses_the_sampler_when_threshold_is_set(tiny_datasets_root, tmp_path, monkeypatch):
    from rooftop_m2f.data.capetown import register_capetown
    from rooftop_m2f.engine import trainer as trainer_module

    register_capetown(str(tiny_datasets_root / "capetown"), prefix="imbtest")
    seen = {}

    def spy(cfg, **kwargs):
        seen.update(kwargs)
        return "loader"

    monkeypatch.setattr(trainer_module, "build_detection_train_loader", spy)
    common = ["DATASETS.TRAIN", "('imbtest_train',)", "OUTPUT_DIR", str(tmp_path), "SEED", "3"]
    assert trainer_module.Trainer.build_train_loader(cfg_with(*common)) == "loader"
    assert "sampler" not in seen  # off by default: detectron2's TrainingSampler

    seen.clear()
    trainer_module.Trainer.build_train_loader(cfg_with(*common, "ROOFTOP.REPEAT_THRESHOLD", "0.5"))
    sampler, dataset = seen["sampler"], seen["dataset"]
    assert isinstance(sampler, RepeatFactorTrainingSampler) and len(dataset) == 8
    assert (tmp_path / CACHE_FILE).is_file()
    factors = (sampler._int_part + sampler._frac_part).numpy()
    # synthetic plan: image 1 of every 8 has the pool heater, the rarest class (1 of 8 images)
    pool = [i for i, d in enumerate(dataset) if 3 in np.unique(np.array(Image.open(d["sem_seg_file_name"])))]
    assert pool and all(factors[i] == pytest.approx(2.0) for i in pool)
    assert factors.min() == 1.0


def test_build_repeat_factor_sampler_logs_the_factors(tmp_path, caplog):
    masks = [np.eye(4, dtype=np.uint8) for _ in range(4)]  # background and a panel in each
    masks[3][0, 3] = 3                                      # one pool heater
    dicts = write_masks(tmp_path / "m", masks)
    cfg = cfg_with("ROOFTOP.REPEAT_THRESHOLD", "1.0", "OUTPUT_DIR", str(tmp_path / "o"), "SEED", "0")
    with caplog.at_level(logging.INFO, logger="rooftop_m2f.data.sampler"):
        sampler = build_repeat_factor_sampler(cfg, dicts)
    assert "solar_pool_heater in 25.0% of images r=2.00" in caplog.text
    assert "1 of 4 images repeated, an epoch is 5.0 images" in caplog.text
    assert (sampler._int_part + sampler._frac_part).tolist() == [1.0, 1.0, 1.0, 2.0]
