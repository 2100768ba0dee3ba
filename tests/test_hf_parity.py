"""Hugging Face transformers Mask2Former -> our detectron2 model: conversion, numerical parity of
every decoder output (class and mask logits, float32, 1e-4), semantic predictions, and bad input.

A tiny randomly initialised HF model (Swin embed 32, depths 1-1-2-1, window 7, hidden 64, 16
queries, 4 decoder outputs, 4 classes) is saved with ``save_pretrained``, converted with our
converter, loaded through our MODEL.WEIGHTS loader and run next to HF's on the same normalised
images (two synthetic rooftop tiles of 128x160: non-square, so height/width mix-ups show).
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

from conftest import TINY_CONFIG, run_tool  # noqa: E402
from capetown_synthetic import render_image  # noqa: E402
from rooftop_m2f.engine.setup import build_cfg  # noqa: E402
from rooftop_m2f.modeling import msdeform  # noqa: E402
from rooftop_m2f.checkpoint.loading import load_model_weights  # noqa: E402
from rooftop_m2f.checkpoint.hf_conversion import (  # noqa: E402
    ConversionError,
    convert_hf_to_file,
    implied_config,
)
from rooftop_m2f.checkpoint.hf_reference import (  # noqa: E402
    hf_decoder_outputs,
    normalized_input,
    our_decoder_outputs,
    save_random_hf_checkpoint,
    semantic_scores,
)

TOL = 1e-4
HEIGHT, WIDTH = 128, 160


@pytest.fixture(scope="module")
def hf_tiny(tmp_path_factory):
    """(cfg, folder, HF model): the tiny HF model saved to ``folder``."""
    cfg = build_cfg(TINY_CONFIG, [])
    folder = tmp_path_factory.mktemp("hf") / "tiny-m2f-swin"
    model = save_random_hf_checkpoint(cfg, str(folder), seed=0, noise=0.05)
    # Class and mask logits of a trained model's magnitude (up to ~10) instead of a fresh
    # init's (~1), so that the 1e-4 tolerance is tested where rounding errors are larger.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        mask_head = model.model.transformer_module.decoder.mask_predictor.mask_embedder
        for param, scale in [(model.class_predictor.weight, 0.5), (mask_head.layers[2].layers[0].weight, 0.5)]:
            param.add_(scale * torch.randn(param.shape, generator=generator))
    model.save_pretrained(str(folder))
    return cfg, str(folder), model


@pytest.fixture(scope="module")
def converted(hf_tiny, tmp_path_factory):
    _, folder, _ = hf_tiny
    out = tmp_path_factory.mktemp("converted") / "tiny_from_hf.pth"
    report, values, notes = convert_hf_to_file(folder, str(out), num_classes=4,
                                               config_file=TINY_CONFIG)
    return str(out), report, values


@pytest.fixture(scope="module")
def images():
    tiles = [render_image(seed=3, split="val", index=i, size=WIDTH)[0][:HEIGHT] for i in range(2)]
    return torch.as_tensor(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()


def test_implied_config_round_trips(hf_tiny, converted):
    cfg, folder, _ = hf_tiny
    _, report, values = converted
    with open(os.path.join(folder, "config.json")) as f:
        assert implied_config(json.load(f)) == values
    for key, value in values.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert (list(node) if isinstance(node, (list, tuple)) else node) == value, key
    # Every HF tensor is mapped or skipped with a reason; nothing else.
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert set(report.mapped) | set(report.skipped) == names
    assert set(report.skipped) == {"criterion.empty_weight",
                                   "model.pixel_level_module.encoder.swin.layernorm.weight",
                                   "model.pixel_level_module.encoder.swin.layernorm.bias"}


@pytest.mark.parametrize("impl", ["compiled", "pytorch"])
def test_logits_and_predictions_match_hf(hf_tiny, converted, images, impl):
    if impl == "compiled" and msdeform.compiled_op_error() is not None:
        pytest.skip(f"compiled MSDeformAttn op not built: {msdeform.compiled_op_error()}")
    _, _, hf_model = hf_tiny
    path, _, _ = converted
    cfg = build_cfg(TINY_CONFIG, ["ROOFTOP.MSDEFORM_ATTN_IMPL", impl, "MODEL.WEIGHTS", path])
    model = build_model(cfg).eval()
    report = load_model_weights(model, cfg)
    assert not report.reinitialised and not report.missing and not report.ignored
    assert len(report.loaded) == len(model.state_dict()) - 1  # all but criterion.empty_weight

    x = normalized_input(model, images)
    msdeform.reset_impl_calls()
    with torch.no_grad():
        ours = our_decoder_outputs(model, x)
        theirs = hf_decoder_outputs(hf_model, x)
    assert set(msdeform.impl_calls()) == {"compiled-cpu" if impl == "compiled" else "pytorch"}

    assert len(ours) == len(theirs) == cfg.MODEL.MASK_FORMER.DEC_LAYERS
    class_diffs, mask_diffs = [], []
    for (oc, om), (tc, tm) in zip(ours, theirs):
        assert oc.shape == tc.shape == (2, 16, 5)
        assert om.shape == tm.shape == (2, 16, HEIGHT // 4, WIDTH // 4)
        class_diffs.append((oc - tc).abs().max().item())
        mask_diffs.append((om - tm).abs().max().item())
    print(f"[{impl}] max |class logit diff| per decoder output: {class_diffs}; "
          f"max |mask logit diff|: {mask_diffs}; max |logit| "
          f"{max(oc.abs().max().item() for oc, _ in ours):.3g} (class), "
          f"{max(om.abs().max().item() for _, om in ours):.3g} (mask)")
    assert max(class_diffs) < TOL and max(mask_diffs) < TOL
    # The comparison is not vacuous: the logits vary well beyond the tolerance.
    assert min(om.std().item() for _, om in ours) > 0.1
    assert min(oc.std().item() for oc, _ in ours) > 0.1

    # Semantic predictions: our full inference path (normalisation, padding, upsampling,
    # semantic inference) against HF's final logits through the same semantic inference.
    with torch.no_grad():
        full = model([{"image": img, "height": HEIGHT, "width": WIDTH} for img in images])
        hf_scores = semantic_scores(*theirs[-1], (HEIGHT, WIDTH))
    ours_scores = torch.stack([r["sem_seg"] for r in full])
    ours_pred, hf_pred = ours_scores.argmax(1), hf_scores.argmax(1)
    agreement = (ours_pred == hf_pred).float().mean().item()
    print(f"[{impl}] semantic prediction agreement: {agreement:.6f} (classes predicted: "
          f"{torch.unique(ours_pred).tolist()}); max |score diff| "
          f"{(ours_scores - hf_scores).abs().max().item():.3g}")
    assert agreement >= 0.999
    # A random model tends to predict one class per image, which would make the agreement
    # vacuous; the class scores themselves and the map of which query wins each pixel (many
    # regions) must agree as well.
    torch.testing.assert_close(ours_scores, hf_scores, atol=TOL, rtol=0)
    upsampled = [torch.nn.functional.interpolate(m, size=(HEIGHT, WIDTH), mode="bilinear",
                                                 align_corners=False) for m in (ours[-1][1],
                                                                                theirs[-1][1])]
    ours_owner, hf_owner = (m.argmax(1) for m in upsampled)
    assert len(torch.unique(ours_owner)) >= 4
    assert (ours_owner == hf_owner).float().mean().item() >= 0.999


def test_converted_file_loads_with_plain_detectron2_checkpointer(converted):
    """The converted state dict carries version metadata, so even detectron2's own
    checkpointer (e.g. --eval-only) loads the pixel decoder instead of renaming it away."""
    path, _, _ = converted
    cfg = build_cfg(TINY_CONFIG, ["ROOFTOP.MSDEFORM_ATTN_IMPL", "pytorch"])
    model = build_model(cfg)
    DetectionCheckpointer(model).load(path)
    saved = torch.load(path, map_location="cpu", weights_only=True)["model"]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())


def test_convert_cli(hf_tiny, tmp_path):
    _, folder, _ = hf_tiny
    out = tmp_path / "w.pth"
    result = run_tool("convert_hf_to_d2.py", "--hf-dir", folder, "--output", out,
                      "--config-file", "configs/capetown_swinS_1024.yaml", check=False)
    assert result.returncode == 2
    assert "does not fit configs/capetown_swinS_1024.yaml" in result.stderr
    assert "MODEL.SWIN.EMBED_DIM is 96 in the config, the checkpoint needs 32" in result.stderr
    assert "Nothing was written" in result.stderr and not out.exists()

    result = run_tool("convert_hf_to_d2.py", "--hf-dir", folder, "--output", out)
    for line in ["MODEL.SWIN.DEPTHS [1, 1, 2, 1]", "MODEL.SWIN.NUM_HEADS [1, 2, 4, 8]",
                 "MODEL.SWIN.WINDOW_SIZE 7", "MODEL.SWIN.EMBED_DIM 32",
                 "MODEL.MASK_FORMER.HIDDEN_DIM 64", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES 16",
                 "MODEL.MASK_FORMER.DEC_LAYERS 4", "MODEL.SEM_SEG_HEAD.NUM_CLASSES 4",
                 "MODEL.SEM_SEG_HEAD.CONVS_DIM 64", "MODEL.SEM_SEG_HEAD.MASK_DIM 64",
                 "skipped criterion.empty_weight"]:
        assert line in result.stdout, line
    assert out.is_file()


# ---- bad input: a clear error naming the file / mismatch, and nothing written ----------------
def copy_folder(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def assert_nothing_written(out):
    assert not out.exists()
    assert os.listdir(out.parent) == [], "no temporary file may be left behind"


def expect_conversion_error(folder, out, pattern, **kwargs):
    with pytest.raises(ConversionError, match="(?s)" + pattern):
        convert_hf_to_file(folder, str(out), **kwargs)
    assert_nothing_written(out)


@pytest.fixture()
def out(tmp_path):
    (tmp_path / "out").mkdir()
    return tmp_path / "out" / "converted.pth"


def test_truncated_weights(hf_tiny, tmp_path, out):
    folder = copy_folder(hf_tiny[1], tmp_path / "truncated")
    weights = os.path.join(folder, "model.safetensors")
    data = open(weights, "rb").read()
    with open(weights, "wb") as f:
        f.write(data[: len(data) // 3])
    expect_conversion_error(folder, out, r"model\.safetensors: cannot read the safetensors file.*"
                                         r"truncated")


def test_folder_without_config_json(hf_tiny, tmp_path, out):
    folder = copy_folder(hf_tiny[1], tmp_path / "noconfig")
    os.remove(os.path.join(folder, "config.json"))
    expect_conversion_error(folder, out, r"noconfig: no config\.json")
    result = run_tool("convert_hf_to_d2.py", "--hf-dir", folder, "--output", out, check=False)
    assert result.returncode == 2 and "no config.json" in result.stderr
    assert_nothing_written(out)


def test_wrong_architecture_resnet_backbone(tmp_path, out):
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig

    backbone = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                            out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32,
                               hidden_dim=32, num_queries=4, encoder_layers=1, decoder_layers=2,
                               dim_feedforward=64, num_labels=4)
    folder = tmp_path / "m2f-resnet"
    Mask2FormerForUniversalSegmentation(config).save_pretrained(str(folder))
    expect_conversion_error(str(folder), out, r"backbone_config\.model_type is 'resnet'")

    # A config.json that says Swin over weights of another model: every stray tensor is listed.
    swin_config = json.load(open(os.path.join(str(folder), "config.json")))
    swin_config["backbone_config"] = {"model_type": "swin", "embed_dim": 32,
                                      "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8],
                                      "window_size": 7}
    json.dump(swin_config, open(os.path.join(str(folder), "config.json"), "w"))
    expect_conversion_error(str(folder), out, r"tensor\(s\) match no conversion rule.*"
                                              r"encoder\.embedder\.embedder\.convolution\.weight")


def test_class_count_mismatch(hf_tiny, tmp_path, out):
    folder = copy_folder(hf_tiny[1], tmp_path / "classes")
    config_path = os.path.join(folder, "config.json")
    config = json.load(open(config_path))
    config["id2label"] = {str(i): f"c{i}" for i in range(6)}
    config["label2id"] = {f"c{i}": i for i in range(6)}
    json.dump(config, open(config_path, "w"))
    expect_conversion_error(folder, out, r"class count mismatch: config\.json has 6 labels.*"
                                         r"class_predictor\.weight has 5 \(= 4\+1\)")
    expect_conversion_error(hf_tiny[1], out, r"class count mismatch: the checkpoint has 4 classes"
                                             r".* but 150 were expected", num_classes=150)


def test_unknown_tensor_fails_the_conversion(hf_tiny, tmp_path, out):
    from safetensors.torch import load_file, save_file

    folder = copy_folder(hf_tiny[1], tmp_path / "extra")
    weights = os.path.join(folder, "model.safetensors")
    state = load_file(weights)
    state["model.transformer_module.decoder.extra_head.weight"] = torch.zeros(3)
    save_file(state, weights, metadata={"format": "pt"})
    expect_conversion_error(folder, out, r"1 tensor\(s\) match no conversion rule.*"
                                         r"model\.transformer_module\.decoder\.extra_head\.weight")


def test_current_and_saved_names_and_stored_position_indices(hf_tiny, converted):
    """transformers 5 keeps new Swin names in memory and writes the old ones; both convert to
    the same tensors. Old checkpoints also stored the relative position index: it is checked
    against ours (computed independently, compared with transformers' own) and mapped."""
    from transformers.models.swin.modeling_swin import SwinRelativePositionBias

    from rooftop_m2f.checkpoint.hf_conversion import convert_state_dict, relative_position_index

    _, folder, hf_model = hf_tiny
    path, _, _ = converted
    saved = torch.load(path, map_location="cpu", weights_only=True)["model"]
    config = json.load(open(os.path.join(folder, "config.json")))
    in_memory = hf_model.state_dict()
    assert any(".attention.q_proj." in k for k in in_memory)
    state, report, _ = convert_state_dict(in_memory, config)
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in state)

    for window in (4, 7, 12):
        theirs = SwinRelativePositionBias(1, (window, window)).relative_position_index
        assert torch.equal(relative_position_index(window).flatten(), theirs.long())
    old = dict(in_memory)
    key = "model.pixel_level_module.encoder.swin.encoder.layers.2.blocks.1.attention.self."
    old[key + "relative_position_index"] = relative_position_index(7)
    state, report, _ = convert_state_dict(old, config)
    assert report.mapped[key + "relative_position_index"] == \
        "backbone.layers.2.blocks.1.attn.relative_position_index"
    old[key + "relative_position_index"] = relative_position_index(7).flip(0)
    with pytest.raises(ConversionError, match="relative position index of a 7x7 window"):
        convert_state_dict(old, config)
