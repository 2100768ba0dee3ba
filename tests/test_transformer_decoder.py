"""RooftopMaskedTransformerDecoder: in inference, attention masks from resized mask features give
the same attention masks and the same final outputs as Mask2Former's decoder; training and
``full_masks_every_layer`` are Mask2Former's code; checkpoints are interchangeable."""
import pytest
import torch

from detectron2.modeling import build_model
from mask2former.modeling.transformer_decoder.mask2former_transformer_decoder import (
    MultiScaleMaskedTransformerDecoder,
)

from rooftop_m2f.engine.setup import build_cfg
from rooftop_m2f.modeling.transformer_decoder import RooftopMaskedTransformerDecoder

from conftest import TINY_CONFIG


@pytest.fixture(scope="module")
def model_and_features():
    cfg = build_cfg(TINY_CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    predictor = model.sem_seg_head.predictor
    # Random initialisation gives near-constant masks; spread the mask embedding so that the
    # attention masks are a real mix of attend / do not attend.
    with torch.no_grad():
        for p in predictor.mask_embed.parameters():
            p.mul_(4.0)
    torch.manual_seed(1)
    image = torch.randint(0, 256, (1, 3, 96, 128)).float()
    x = (image - model.pixel_mean) / model.pixel_std
    with torch.no_grad():
        mask_features, _, multi_scale = model.sem_seg_head.pixel_decoder.forward_features(
            model.backbone(x))
    return model, mask_features, multi_scale


def run(predictor, mask_features, multi_scale, full):
    """The decoder's output and the attention mask of every prediction-head call."""
    masks = []
    heads = predictor.forward_prediction_heads

    def recording(*args, **kwargs):
        result = heads(*args, **kwargs)
        masks.append(result[2])
        return result

    predictor.forward_prediction_heads = recording
    predictor.full_masks_every_layer = full
    try:
        with torch.no_grad():
            out = predictor(multi_scale, mask_features, None)
    finally:
        del predictor.forward_prediction_heads
        predictor.full_masks_every_layer = False
    return out, masks


def test_built_from_config(model_and_features):
    model, _, _ = model_and_features
    assert type(model.sem_seg_head.predictor) is RooftopMaskedTransformerDecoder


def test_inference_matches_mask2former(model_and_features):
    model, mask_features, multi_scale = model_and_features
    predictor = model.sem_seg_head.predictor
    fast, fast_masks = run(predictor, mask_features, multi_scale, full=False)
    full, full_masks = run(predictor, mask_features, multi_scale, full=True)

    assert len(fast_masks) == len(full_masks) == predictor.num_layers + 1
    fractions = []
    for a, b in zip(fast_masks, full_masks):
        assert a.shape == b.shape and a.dtype == b.dtype == torch.bool
        assert torch.equal(a, b)
        fractions.append(a.float().mean().item())
    # Not vacuous: the masks block some positions and allow others.
    assert any(0.05 < f < 0.95 for f in fractions), fractions
    torch.testing.assert_close(fast["pred_logits"], full["pred_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast["pred_masks"], full["pred_masks"], rtol=1e-5, atol=1e-5)
    assert fast["pred_masks"].shape == mask_features.shape[:1] + (
        predictor.num_queries,) + mask_features.shape[-2:]
    # Intermediate full-resolution masks are not computed in inference, unless asked for.
    assert all(a["pred_masks"] is None for a in fast["aux_outputs"])
    assert all(a["pred_masks"] is not None for a in full["aux_outputs"])


def test_training_runs_mask2formers_decoder(model_and_features, monkeypatch):
    model, mask_features, multi_scale = model_and_features
    predictor = model.sem_seg_head.predictor
    calls = []
    original = MultiScaleMaskedTransformerDecoder.forward_prediction_heads

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(MultiScaleMaskedTransformerDecoder, "forward_prediction_heads", counting)
    predictor.train()
    try:
        out = predictor(multi_scale, mask_features, None)
    finally:
        predictor.eval()
    assert len(calls) == predictor.num_layers + 1
    assert all(a["pred_masks"] is not None for a in out["aux_outputs"])


def test_state_dict_is_mask2formers(model_and_features):
    model, _, _ = model_and_features
    predictor = model.sem_seg_head.predictor
    plain = MultiScaleMaskedTransformerDecoder.__new__(MultiScaleMaskedTransformerDecoder)
    plain.__dict__.update(predictor.__dict__)  # same submodules, Mask2Former's class
    assert list(plain.state_dict()) == list(predictor.state_dict())


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", [(4, 4), (8, 6), (16, 16), (20, 12)])
def test_level_features_are_bilinear_resizes(channels_last, size):
    from torch.nn import functional as F

    from rooftop_m2f.modeling.resize import resize_maps

    x = torch.randn(2, 8, 32, 24)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    expected = F.interpolate(x.contiguous(), size=size, mode="bilinear", align_corners=False)
    got = resize_maps(x, size)
    assert got.shape == (2, 8, *size)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
