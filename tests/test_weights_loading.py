"""MODEL.WEIGHTS loading: model-zoo-format .pkl (numpy arrays, detectron2 names, a 150-class
head), backbone-only, the log, bad checkpoints, and the Trainer / RooftopPredictor wiring."""
import logging
import pickle

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from conftest import TINY_CONFIG
from rooftop_m2f.engine.setup import build_cfg
from rooftop_m2f.checkpoint.loading import (
    CLASS_HEAD_KEYS,
    WeightsError,
    load_model_weights,
)

CLASS_HEAD = "sem_seg_head.predictor.class_embed."


def tiny_cfg(*opts):
    return build_cfg(TINY_CONFIG, ["ROOFTOP.MSDEFORM_ATTN_IMPL", "pytorch", *opts])


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def write_zoo_pkl(path, state, author="FAIR"):
    """The model zoo's format: pickled {"model": {name: numpy array}, "__author__": ...}."""
    payload = {"model": {k: v.detach().cpu().numpy() for k, v in state.items()},
               "__author__": author}
    with open(path, "wb") as f:
        pickle.dump(payload, f)
    return str(path)


@pytest.fixture(scope="module")
def zoo_state():
    """An ADE20K-like source: same architecture, 150 classes, its own random weights."""
    torch.manual_seed(123)
    source = build_model(tiny_cfg("MODEL.SEM_SEG_HEAD.NUM_CLASSES", "150"))
    state = snapshot(source)
    # Nothing in a fresh model is zero by design that the comparisons below could confuse.
    assert state[CLASS_HEAD + "weight"].shape[0] == 151
    assert state["criterion.empty_weight"].shape == (151,)
    return state


@pytest.fixture(scope="module")
def zoo_pkl(zoo_state, tmp_path_factory):
    return write_zoo_pkl(tmp_path_factory.mktemp("zoo") / "model_final_test.pkl", zoo_state)


def loader_records(caplog):
    return [r for r in caplog.records if r.name.startswith(("rooftop_m2f.checkpoint",
                                                            "fvcore", "detectron2.checkpoint",
                                                            "mask2former"))]


def test_model_zoo_pkl_keeps_everything_that_fits(zoo_state, zoo_pkl, caplog):
    torch.manual_seed(7)
    cfg = tiny_cfg()
    model = build_model(cfg)
    before = snapshot(model)
    caplog.set_level(logging.INFO)
    report = load_model_weights(model, cfg, zoo_pkl)
    after = model.state_dict()

    for name, value in after.items():
        if name in CLASS_HEAD_KEYS or name.startswith("criterion."):
            # the 4+1 class head and our loss weights keep their values
            assert torch.equal(value, before[name]), name
        else:
            assert torch.equal(value, zoo_state[name]), f"{name} was not loaded"
    # the whole pixel decoder in particular (Mask2Former's legacy-layout hook would drop it)
    decoder = [k for k in after if k.startswith("sem_seg_head.pixel_decoder.")]
    assert decoder and all(torch.equal(after[k], zoo_state[k]) for k in decoder)

    assert set(report.reinitialised) == set(CLASS_HEAD_KEYS)
    assert report.reinitialised[CLASS_HEAD + "weight"] == ((151, 64), (5, 64))
    assert len(report.loaded) == len(after) - 3  # class head weight, bias; criterion
    assert list(report.ignored) == ["criterion.empty_weight"]

    records = loader_records(caplog)
    text = "\n".join(r.getMessage() for r in records)
    assert not [r for r in records if r.levelno >= logging.WARNING], text
    assert len(records) <= 8, text  # a summary, not a wall
    assert f"Loaded {len(after) - 3} of {len(after)} model tensors" in text
    assert "re-initialised sem_seg_head.predictor.class_embed.{bias, weight}: class head " \
           "150+1 -> 4+1 outputs" in text
    assert "criterion.empty_weight: loss weights come from the config" in text
    assert "FAIR" in text


def test_backbone_only_switch(zoo_state, zoo_pkl, caplog):
    torch.manual_seed(8)
    cfg = tiny_cfg("ROOFTOP.LOAD_BACKBONE_ONLY", "True")
    model = build_model(cfg)
    before = snapshot(model)
    caplog.set_level(logging.INFO)
    report = load_model_weights(model, cfg, zoo_pkl)
    after = model.state_dict()
    backbone = [k for k in after if k.startswith("backbone.")]
    head = [k for k in after if k.startswith("sem_seg_head.")]
    assert backbone and head
    assert all(torch.equal(after[k], zoo_state[k]) for k in backbone)
    assert all(torch.equal(after[k], before[k]) for k in head), "the heads must stay as built"
    assert sorted(report.loaded) == sorted(backbone)
    assert len(report.dropped) == len([k for k in zoo_state if k.startswith("sem_seg_head.")])
    text = "\n".join(r.getMessage() for r in loader_records(caplog))
    assert "(backbone only: ROOFTOP.LOAD_BACKBONE_ONLY)" in text
    assert "sem_seg_head.pixel_decoder.*" in text and "sem_seg_head.predictor.*" in text
    assert "re-initialised" not in text  # the class head is not even looked at


def test_wrong_architecture_is_an_error_and_loads_nothing(zoo_state, tmp_path):
    # A Swin with other depths and widths (e.g. Swin-T weights for a Swin-S config).
    torch.manual_seed(9)
    other = build_model(tiny_cfg("MODEL.SWIN.DEPTHS", "[1, 1, 1, 1]", "MODEL.SWIN.EMBED_DIM", "48",
                                 "MODEL.SWIN.NUM_HEADS", "[1, 2, 3, 6]"))
    path = write_zoo_pkl(tmp_path / "swin_other.pkl", snapshot(other))
    cfg = tiny_cfg()
    model = build_model(cfg)
    before = snapshot(model)
    with pytest.raises(WeightsError) as info:
        load_model_weights(model, cfg, path)
    message = str(info.value)
    assert "swin_other.pkl" in message and "does not fit this model" in message
    assert "backbone.patch_embed.proj.weight (48, 3, 4, 4) -> (32, 3, 4, 4)" in message
    assert "backbone.layers.2.blocks.1" in message  # a block the checkpoint does not have
    assert "ROOFTOP.LOAD_BACKBONE_ONLY" in message
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), \
        "nothing may be loaded from a checkpoint that does not fit"

    # A ResNet backbone's names: nothing of this model's backbone is there.
    resnet = {"backbone.stem.conv1.weight": torch.zeros(64, 3, 7, 7),
              "backbone.res2.0.conv1.weight": torch.zeros(64, 64, 1, 1)}
    resnet.update({k: v for k, v in zoo_state.items() if k.startswith("sem_seg_head.")})
    path = write_zoo_pkl(tmp_path / "r50.pkl", resnet)
    with pytest.raises(WeightsError, match=r"(?s)r50\.pkl.*does not fit.*backbone\.res2\.0\.conv1"):
        load_model_weights(model, tiny_cfg("ROOFTOP.LOAD_BACKBONE_ONLY", "True"), path)


def test_other_mismatch_outside_the_class_head_is_an_error(zoo_state, tmp_path):
    state = dict(zoo_state)
    state["sem_seg_head.predictor.query_feat.weight"] = torch.zeros(100, 64)
    path = write_zoo_pkl(tmp_path / "queries.pkl", state)
    cfg = tiny_cfg()
    with pytest.raises(WeightsError, match=r"query_feat\.weight \(100, 64\) -> \(16, 64\)"):
        load_model_weights(build_model(cfg), cfg, path)


def test_unreadable_checkpoints(zoo_pkl, tmp_path):
    cfg = tiny_cfg()
    model = build_model(cfg)
    data = open(zoo_pkl, "rb").read()
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"truncated\.pkl: cannot read the checkpoint.*truncated"):
        load_model_weights(model, cfg, str(truncated))
    with pytest.raises(WeightsError, match=r"nowhere\.pkl does not exist"):
        load_model_weights(model, cfg, str(tmp_path / "nowhere.pkl"))
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a zip archive at all")
    with pytest.raises(WeightsError, match=r"junk\.pth: cannot read the checkpoint"):
        load_model_weights(model, cfg, str(bad))
    assert load_model_weights(model, cfg, "") is None  # nothing to load: stays as built


def test_our_own_checkpoint_round_trips(tmp_path):
    torch.manual_seed(10)
    cfg = tiny_cfg()
    trained = build_model(cfg)
    DetectionCheckpointer(trained, str(tmp_path)).save("model_final")
    model = build_model(cfg)
    report = load_model_weights(model, cfg, str(tmp_path / "model_final.pth"))
    assert not report.reinitialised and not report.missing
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())


def test_predictor_and_trainer_use_the_loader(zoo_state, zoo_pkl, tiny_datasets_root, tmp_path):
    from rooftop_m2f.engine import Trainer
    from rooftop_m2f.inference.predictor import RooftopPredictor

    name = "sem_seg_head.pixel_decoder.transformer.level_embed"
    predictor = RooftopPredictor(tiny_cfg("MODEL.WEIGHTS", zoo_pkl))
    assert torch.equal(predictor.model.state_dict()[name], zoo_state[name])
    mask = predictor(np.zeros((64, 64, 3), np.uint8))
    assert mask.shape == (64, 64)

    cfg = tiny_cfg("MODEL.WEIGHTS", zoo_pkl, "OUTPUT_DIR", str(tmp_path / "run"),
                   "ROOFTOP.DATASET_ROOT", str(tiny_datasets_root / "capetown"),
                   "DATALOADER.NUM_WORKERS", "0", "ROOFTOP.CSV_LOGS", "False")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)  # no checkpoint in OUTPUT_DIR yet: MODEL.WEIGHTS
    state = trainer.model.state_dict()
    assert torch.equal(state[name], zoo_state[name])
    assert not torch.equal(state[CLASS_HEAD + "bias"][:4], zoo_state[CLASS_HEAD + "bias"][:4])
    assert trainer.start_iter == 0
