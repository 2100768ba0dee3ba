"""RooftopEncoderLayer (in-place residuals and ReLU) computes the same values and gradients as
Mask2Former's MSDeformAttnTransformerEncoderLayer, with and without dropout."""
import copy

import pytest
import torch

from mask2former.modeling.pixel_decoder.msdeformattn import MSDeformAttnTransformerEncoderLayer

from rooftop_m2f.modeling.encoder_layer import RooftopEncoderLayer, install_lean_encoder_layers
from rooftop_m2f.modeling.msdeform import install_msdeform_attn

SHAPES = [(8, 8), (4, 4), (2, 2)]


def inputs(seed):
    g = torch.Generator().manual_seed(seed)
    positions = sum(h * w for h, w in SHAPES)
    src = torch.randn(2, positions, 32, generator=g, dtype=torch.float64)
    pos = torch.randn(2, positions, 32, generator=g, dtype=torch.float64)
    ref = torch.rand(2, positions, len(SHAPES), 2, generator=g, dtype=torch.float64)
    shapes = torch.tensor(SHAPES, dtype=torch.long)
    start = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    return src, pos, ref, shapes, start


@pytest.mark.parametrize("dropout,training", [(0.0, False), (0.0, True), (0.3, True)])
def test_same_values_and_gradients(dropout, training):
    torch.manual_seed(0)
    theirs = MSDeformAttnTransformerEncoderLayer(d_model=32, d_ffn=64, dropout=dropout,
                                                 n_levels=len(SHAPES), n_heads=4, n_points=2)
    theirs = theirs.double().train(training)
    ours = copy.deepcopy(theirs)
    assert install_lean_encoder_layers(ours) == 1 and type(ours) is RooftopEncoderLayer
    # Both attend with the same (PyTorch reference) deformable attention.
    install_msdeform_attn(theirs, "pytorch")
    install_msdeform_attn(ours, "pytorch")

    results = []
    for layer in (theirs, ours):
        src, pos, ref, shapes, start = inputs(1)
        src.requires_grad_(True)
        torch.manual_seed(7)  # same dropout masks
        out = layer(src, pos, ref, shapes, start, None)
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
        grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
        results.append((out.detach(), src.grad.clone(), grads))
    (out_a, gsrc_a, grads_a), (out_b, gsrc_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gsrc_b, gsrc_a, rtol=1e-10, atol=1e-12)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-10, atol=1e-12)
    assert out_a.std() > 0.1  # not vacuous


def test_model_uses_lean_layers():
    from detectron2.modeling import build_model

    from conftest import TINY_CONFIG
    from rooftop_m2f.engine.setup import build_cfg

    model = build_model(build_cfg(TINY_CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]))
    layers = [m for m in model.modules() if isinstance(m, MSDeformAttnTransformerEncoderLayer)]
    assert layers and all(type(m) is RooftopEncoderLayer for m in layers)
