"""The pixel decoder the config names (MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME): ours by default,
with Mask2Former's state-dict keys; Mask2Former's own when a config names it, unchanged."""
import logging

import torch

from conftest import TINY_CONFIG


def _model(*opts):
    from detectron2.modeling import build_model

    from rooftop_m2f.engine.setup import build_cfg

    torch.manual_seed(0)
    cfg = build_cfg(TINY_CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
    return build_model(cfg).eval()


def test_configs_name_our_pixel_decoder():
    from rooftop_m2f.engine.setup import build_cfg
    from rooftop_m2f.modeling.encoder_layer import RooftopEncoderLayer
    from rooftop_m2f.modeling.msdeform import RooftopMSDeformAttn
    from rooftop_m2f.modeling.pixel_decoder import RooftopMSDeformAttnPixelDecoder

    cfg = build_cfg(TINY_CONFIG, [])
    assert cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME == "RooftopMSDeformAttnPixelDecoder"
    decoder = _model().sem_seg_head.pixel_decoder
    assert type(decoder) is RooftopMSDeformAttnPixelDecoder
    assert decoder.msdeform_attn_impl in ("compiled-cpu", "pytorch")
    kinds = {type(m) for m in decoder.modules()}
    assert RooftopMSDeformAttn in kinds and RooftopEncoderLayer in kinds


def test_mask2former_pixel_decoder_runs_as_shipped_with_one_log_line(caplog):
    from mask2former.modeling.pixel_decoder.msdeformattn import (
        MSDeformAttnPixelDecoder,
        MSDeformAttnTransformerEncoderLayer,
    )
    from mask2former.modeling.pixel_decoder.ops.modules.ms_deform_attn import MSDeformAttn

    with caplog.at_level(logging.INFO, logger="rooftop_m2f.modeling.meta_arch"):
        model = _model("MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "MSDeformAttnPixelDecoder")
    decoder = model.sem_seg_head.pixel_decoder
    assert type(decoder) is MSDeformAttnPixelDecoder
    attention = [m for m in decoder.modules() if isinstance(m, MSDeformAttn)]
    layers = [m for m in decoder.modules()
              if isinstance(m, MSDeformAttnTransformerEncoderLayer)]
    assert attention and all(type(m) is MSDeformAttn for m in attention)  # no silent swap
    assert layers and all(type(m) is MSDeformAttnTransformerEncoderLayer for m in layers)
    lines = [r.getMessage() for r in caplog.records if r.name == "rooftop_m2f.modeling.meta_arch"
             and "PIXEL_DECODER_NAME" in r.getMessage()]
    assert len(lines) == 1 and "MSDeformAttnPixelDecoder" in lines[0]


def test_same_state_dict_as_mask2former_pixel_decoder():
    ours = _model().state_dict()
    theirs = _model("MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "MSDeformAttnPixelDecoder").state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # same seed, same initialisation
