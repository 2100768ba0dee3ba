"""``RooftopMSDeformAttnPixelDecoder``: Mask2Former's multi-scale deformable-attention pixel
decoder as this project runs it, registered so that the YAML names it
(``MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``).

Same parameters and state-dict keys as Mask2Former's ``MSDeformAttnPixelDecoder`` (model-zoo and
converted weights load unchanged). Its construction makes the encoder's attention run our
compiled op (``msdeform.py``, ``ROOFTOP.MSDEFORM_ATTN_IMPL``), its encoder layers the lean ones
(``encoder_layer.py``), and ``forward_features`` follow ``ROOFTOP.PIXEL_DECODER_AUTOCAST``
(``precision.py``). A config naming Mask2Former's ``MSDeformAttnPixelDecoder`` gets that class
as Mask2Former ships it (see ``meta_arch.py``).
"""
import logging

import torch
from detectron2.config import configurable
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from mask2former.modeling.pixel_decoder.msdeformattn import MSDeformAttnPixelDecoder

from .encoder_layer import install_lean_encoder_layers
from .msdeform import install_msdeform_attn
from .precision import device_type_of, float32_norms

logger = logging.getLogger(__name__)


def _undecorated_forward_features():
    """Mask2Former's ``forward_features`` without its autocast-off decorator (the decorator is
    ``functools.wraps``-based, so the plain function is its ``__wrapped__``)."""
    fn = MSDeformAttnPixelDecoder.forward_features
    return getattr(fn, "__wrapped__", fn)


@SEM_SEG_HEADS_REGISTRY.register()
class RooftopMSDeformAttnPixelDecoder(MSDeformAttnPixelDecoder):
    """Mask2Former's pixel decoder built with our attention and encoder layers (module doc).

    ``msdeform_attn_impl`` is what a forward on the construction device runs ("compiled-cpu",
    "compiled-cuda" or "pytorch"); ``rooftop_autocast`` is ``ROOFTOP.PIXEL_DECODER_AUTOCAST``."""

    @configurable
    def __init__(self, input_shape, *, msdeform_attn_impl: str = "auto", autocast: bool = False,
                 **kwargs):
        super().__init__(input_shape, **kwargs)
        # Mask2Former's constructor builds its encoder inline, so our module classes are set
        # on the modules it made (same parameters, same keys) rather than built in its place.
        self.msdeform_attn_impl = install_msdeform_attn(self, msdeform_attn_impl)
        install_lean_encoder_layers(self)
        self.rooftop_autocast = bool(autocast)
        if self.rooftop_autocast:
            float32_norms(self)
        logger.info("Pixel decoder: %s", "runs under autocast (bf16/fp16) when the caller enables "
                    "it; norms, attention softmax, sampling locations and the loss in float32"
                    if self.rooftop_autocast
                    else "float32 (autocast off inside, as Mask2Former on CUDA)")

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["msdeform_attn_impl"] = cfg.ROOFTOP.MSDEFORM_ATTN_IMPL
        ret["autocast"] = cfg.ROOFTOP.PIXEL_DECODER_AUTOCAST
        return ret

    def forward_features(self, features):
        """Mask2Former's ``forward_features``; under the caller's autocast when
        ``rooftop_autocast``, else with autocast off on every device."""
        device_type = device_type_of(features.values())
        inner = _undecorated_forward_features()
        if self.rooftop_autocast and torch.is_autocast_enabled(device_type):
            return inner(self, features)
        with torch.autocast(device_type, enabled=False):
            return inner(self, features)
