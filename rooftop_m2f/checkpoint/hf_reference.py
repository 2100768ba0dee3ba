"""Our model and Hugging Face transformers' Mask2Former side by side: the parity test and
``benchmarks/benchmark.py``. Needs ``transformers`` (a test/tool dependency, requirements-dev.txt);
nothing in training or prediction imports this module.

Pre-processing is matched by feeding both models the same normalised tensor: ours normalises
with ``MODEL.PIXEL_MEAN``/``PIXEL_STD`` (0-255 RGB; ImageNet statistics), HF's image processor
rescales by 1/255 and normalises with the same statistics scaled by 1/255 (identical up to float
rounding) after resizing; here we bypass both resizers and its processor entirely. Input sides
must be multiples of 32: ours pads the normalised image to ``SIZE_DIVISIBILITY`` (32) with zeros,
HF does not pad. Post-processing: :func:`semantic_scores` is Mask2Former's semantic inference at
the input resolution (what our model returns); HF's ``post_process_semantic_segmentation``
first resizes the mask logits to 384x384, which is a different resampling, so it is not used
for pixel comparisons.
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "hf_config_from_cfg",
    "perturb_",
    "save_random_hf_checkpoint",
    "normalized_input",
    "our_decoder_outputs",
    "hf_decoder_outputs",
    "semantic_scores",
]


def hf_config_from_cfg(cfg):
    """The ``transformers.Mask2FormerConfig`` of the model our ``cfg`` builds (Swin backbone)."""
    from transformers import Mask2FormerConfig, SwinConfig

    swin = cfg.MODEL.SWIN
    head = cfg.MODEL.SEM_SEG_HEAD
    mf = cfg.MODEL.MASK_FORMER
    if cfg.MODEL.BACKBONE.NAME != "D2SwinTransformer" or swin.APE:
        raise ValueError("only a D2SwinTransformer backbone without APE has a HF counterpart")
    backbone = SwinConfig(
        embed_dim=swin.EMBED_DIM, depths=list(swin.DEPTHS), num_heads=list(swin.NUM_HEADS),
        window_size=swin.WINDOW_SIZE, patch_size=swin.PATCH_SIZE, mlp_ratio=swin.MLP_RATIO,
        qkv_bias=swin.QKV_BIAS, drop_path_rate=0.0, image_size=swin.PRETRAIN_IMG_SIZE,
        out_features=["stage1", "stage2", "stage3", "stage4"])
    return Mask2FormerConfig(
        backbone_config=backbone, feature_size=head.CONVS_DIM, mask_feature_size=head.MASK_DIM,
        hidden_dim=mf.HIDDEN_DIM, num_queries=mf.NUM_OBJECT_QUERIES,
        encoder_layers=head.TRANSFORMER_ENC_LAYERS, decoder_layers=mf.DEC_LAYERS,
        dim_feedforward=mf.DIM_FEEDFORWARD, encoder_feedforward_dim=1024,
        num_attention_heads=mf.NHEADS, common_stride=head.COMMON_STRIDE, pre_norm=mf.PRE_NORM,
        enforce_input_projection=mf.ENFORCE_INPUT_PROJ, num_labels=head.NUM_CLASSES,
        no_object_weight=mf.NO_OBJECT_WEIGHT, class_weight=mf.CLASS_WEIGHT,
        mask_weight=mf.MASK_WEIGHT, dice_weight=mf.DICE_WEIGHT,
        train_num_points=mf.TRAIN_NUM_POINTS, oversample_ratio=mf.OVERSAMPLE_RATIO,
        importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO)


@torch.no_grad()
def perturb_(model: torch.nn.Module, scale: float, seed: int) -> None:
    """Add ``scale`` x N(0, 1) to every parameter. Fresh inits have exact zeros (relative
    position bias tables, deformable-attention offset and weight projections) that would hide a
    wrong mapping of those tensors; this makes every tensor matter."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def save_random_hf_checkpoint(cfg, folder: str, seed: int = 0, noise: float = 0.05):
    """A randomly initialised (then :func:`perturb_`-ed) HF ``Mask2FormerForUniversalSegmentation``
    with the architecture of ``cfg``, written with ``save_pretrained`` to ``folder``. Returns the
    model (eval mode)."""
    from transformers import Mask2FormerForUniversalSegmentation

    torch.manual_seed(seed)
    model = Mask2FormerForUniversalSegmentation(hf_config_from_cfg(cfg)).eval()
    if noise:
        perturb_(model, noise, seed + 1)
    model.save_pretrained(folder)
    return model


def normalized_input(model, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 RGB -> the float tensor our model feeds its backbone (normalised with
    its pixel mean/std), which is also what HF's model gets. H and W must be multiples of 32."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) uint8 images, got {tuple(images.shape)} "
                         f"{images.dtype}")
    if images.shape[-2] % 32 or images.shape[-1] % 32:
        raise ValueError(f"image sides must be multiples of 32 (ours pads to 32, HF does not); "
                         f"got {tuple(images.shape[-2:])}")
    mean = model.pixel_mean.to(images.device)
    std = model.pixel_std.to(images.device)
    return (images.float() - mean) / std


def our_decoder_outputs(model, x: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``[(class logits (B, Q, K+1), mask logits (B, Q, H/4, W/4))]``, one per decoder output
    (the learnable queries first, the last layer last), from our model on normalised ``x``."""
    predictor = model.sem_seg_head.predictor
    previous = getattr(predictor, "full_masks_every_layer", None)
    if previous is not None:  # RooftopMaskedTransformerDecoder: every layer's masks, please
        predictor.full_masks_every_layer = True
    try:
        out = model.sem_seg_head(model.backbone(x))
    finally:
        if previous is not None:
            predictor.full_masks_every_layer = previous
    pairs = [(a["pred_logits"], a["pred_masks"]) for a in out["aux_outputs"]]
    pairs.append((out["pred_logits"], out["pred_masks"]))
    return pairs


def hf_decoder_outputs(hf_model, x: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The same list from HF's model (``class_queries_logits``, ``masks_queries_logits`` of each
    auxiliary output, then the final ones)."""
    out = hf_model(pixel_values=x, output_auxiliary_logits=True)
    pairs = [(a["class_queries_logits"], a["masks_queries_logits"])
             for a in (out.auxiliary_logits or [])]
    pairs.append((out.class_queries_logits, out.masks_queries_logits))
    return pairs


def semantic_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor, size) -> torch.Tensor:
    """Mask2Former's semantic inference: (B, K, H, W) class scores at ``size`` = (H, W), the
    mask logits upsampled bilinearly, per pixel sum over queries of P(class) x sigmoid(mask)
    with the no-object class dropped."""
    masks = F.interpolate(mask_logits, size=tuple(size), mode="bilinear", align_corners=False)
    probs = class_logits.softmax(-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", probs, masks.sigmoid())
