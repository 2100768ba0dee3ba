"""The pixel decoder's deformable-attention encoder layer, with fewer full-size temporaries.

Mask2Former's ``MSDeformAttnTransformerEncoderLayer`` runs over every position of the 1/8,
1/16 and 1/32 feature maps (21,504 at 1024 px): each residual sum and the FFN's ReLU allocate
a new (positions x 256) or (positions x 1024) tensor, six layers deep. On a CPU a fresh tensor
of that size costs more in page faults than the arithmetic on it. :class:`RooftopEncoderLayer`
computes the same expressions in place where autograd allows it: the ReLU on the first FFN
projection's output and each residual sum on the output of the projection before it (neither
output is needed by its projection's backward). Same parameters, same state-dict keys, same
values. :func:`install_lean_encoder_layers` converts the layers of a built pixel decoder
(``RooftopMSDeformAttnPixelDecoder``'s constructor calls it).

Under autocast (``ROOFTOP.PIXEL_DECODER_AUTOCAST``) the sublayer outputs are half precision and
the residual stream is float32 (the norms are float32 ones, ``precision.py``): the sum is then
out of place, so it is float32 rather than rounded into the half-precision output.
"""
import logging

import torch
from torch.nn import functional as F

from mask2former.modeling.pixel_decoder.msdeformattn import MSDeformAttnTransformerEncoderLayer

logger = logging.getLogger(__name__)


class RooftopEncoderLayer(MSDeformAttnTransformerEncoderLayer):
    def forward_ffn(self, src):
        hidden = self.linear1(src)
        hidden = F.relu_(hidden) if self.activation is F.relu else self.activation(hidden)
        out = self.dropout3(self.linear2(self.dropout2(hidden)))
        return self.norm2(_residual(out, src))

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index,
                padding_mask=None):
        attended = self.self_attn(self.with_pos_embed(src, pos), reference_points, src,
                                  spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(_residual(self.dropout1(attended), src))
        return self.forward_ffn(src)


def _residual(out, src):
    """``out + src``, in place in ``out`` when both have the same dtype (see the module doc)."""
    return out.add_(src) if out.dtype == src.dtype else src + out


def install_lean_encoder_layers(model: torch.nn.Module) -> int:
    """Turn every ``MSDeformAttnTransformerEncoderLayer`` of ``model`` into a
    :class:`RooftopEncoderLayer`; returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is MSDeformAttnTransformerEncoderLayer:
            module.__class__ = RooftopEncoderLayer
            count += 1
    return count
