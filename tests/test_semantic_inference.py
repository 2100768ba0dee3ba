"""RooftopMaskFormer's inference (chunked semantic scores) computes what Mask2Former's
MaskFormer.forward computes: padding, crop, resize to another output size in both orders
(SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE True/False), batches of different sizes."""
import pytest
import torch

from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import sem_seg_postprocess
from mask2former.maskformer_model import MaskFormer
from torch.nn import functional as F

from rooftop_m2f.engine.setup import build_cfg
from rooftop_m2f.modeling.semantic_inference import semantic_scores

from conftest import TINY_CONFIG


def mask2former_scores(class_logits, mask_logits, padded, image, output, before):
    """Mask2Former's order of operations for one image, written out."""
    masks = F.interpolate(mask_logits[None], size=padded, mode="bilinear", align_corners=False)[0]
    probs = F.softmax(class_logits, -1)[:, :-1]
    if before:
        masks = sem_seg_postprocess(masks, image, *output)
        return torch.einsum("qc,qhw->chw", probs, masks.sigmoid())
    scores = torch.einsum("qc,qhw->chw", probs, masks.sigmoid())
    return sem_seg_postprocess(scores, image, *output)


@pytest.mark.parametrize("before", [True, False])
@pytest.mark.parametrize("image,output", [((64, 64), (64, 64)), ((50, 61), (50, 61)),
                                          ((50, 61), (100, 122)), ((64, 48), (33, 20))])
@pytest.mark.parametrize("chunk", [1, 5000, 10**9])
def test_semantic_scores_match_mask2former(before, image, output, chunk):
    torch.manual_seed(0)
    class_logits = torch.randn(7, 5)
    mask_logits = torch.randn(7, 16, 16) * 3
    padded = (64, 64)
    expected = mask2former_scores(class_logits, mask_logits, padded, image, output, before)
    got = semantic_scores(class_logits, mask_logits, padded, image, output, before,
                          chunk_elements=chunk)
    assert got.shape == (4, *output)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_semantic_scores_rejects_mismatched_queries():
    with pytest.raises(ValueError, match="same Q"):
        semantic_scores(torch.randn(7, 5), torch.randn(6, 16, 16), (64, 64), (64, 64), (64, 64))


@pytest.fixture(scope="module")
def tiny_model():
    cfg = build_cfg(TINY_CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    torch.manual_seed(3)
    return build_model(cfg).eval()


def test_model_inference_matches_maskformer_forward(tiny_model):
    torch.manual_seed(1)
    inputs = [
        {"image": torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8)},
        # not a multiple of the size divisibility: padded, cropped, then resized
        {"image": torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8),
         "height": 140, "width": 180},
    ]
    with torch.no_grad():
        ours = tiny_model(inputs)
        theirs = MaskFormer.forward(tiny_model, inputs)
    assert [r["sem_seg"].shape for r in ours] == [(4, 96, 96), (4, 140, 180)]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a["sem_seg"], b["sem_seg"], rtol=1e-5, atol=1e-5)
        assert torch.equal(a["sem_seg"].argmax(0), b["sem_seg"].argmax(0))


def test_training_forward_is_mask2formers(tiny_model):
    """Training returns Mask2Former's weighted losses (the override only changes inference)."""
    from rooftop_m2f.data.mapper import instances_from_sem_seg

    mask = torch.zeros(64, 64, dtype=torch.int64)
    mask[10:30, 10:30] = 1
    batch = [{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8), "sem_seg": mask,
              "instances": instances_from_sem_seg(mask)}]
    tiny_model.train()
    try:
        torch.manual_seed(5)
        ours = tiny_model(batch)
        torch.manual_seed(5)
        theirs = MaskFormer.forward(tiny_model, batch)
    finally:
        tiny_model.eval()
    assert set(ours) == set(theirs) and "loss_ce" in ours
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key])


def test_semantic_scores_leave_the_mask_logits_alone():
    """Mask logits already at the padded size: nothing is resized, nothing squashed in place."""
    torch.manual_seed(0)
    class_logits, mask_logits = torch.randn(3, 5), torch.randn(3, 16, 16)
    before = mask_logits.clone()
    for image, output in [((16, 16), (16, 16)), ((12, 16), (12, 16)), ((16, 12), (8, 6))]:
        semantic_scores(class_logits, mask_logits, (16, 16), image, output)
        assert torch.equal(mask_logits, before)
