"""The pixel decoder under autocast (``ROOFTOP.PIXEL_DECODER_AUTOCAST``), with the numerically
sensitive parts kept in float32.

Mask2Former's ``MSDeformAttnPixelDecoder.forward_features`` is decorated to turn CUDA autocast
off and casts its inputs to float32 ("deformable detr does not support half precision"), so under
AMP the backbone and the transformer decoder run in float16/bfloat16 but the pixel decoder, whose
six encoder layers run over every position of the 1/8, 1/16 and 1/32 maps, stays in float32.
(That decorator only concerns CUDA: under CPU autocast Mask2Former's pixel decoder ran its
convolutions and linear layers in bfloat16 anyway.) Our op has float16/bfloat16 CUDA kernels.

The pixel decoder (:class:`~rooftop_m2f.modeling.pixel_decoder.RooftopMSDeformAttnPixelDecoder`)
follows the switch; this module holds the float32 parts it and the criterion use:

  * switch off (the default, until measured on a GPU): autocast is off in ``forward_features``
    on every device (CUDA: as Mask2Former; CPU: now also float32, so that "off" means the same
    everywhere).
  * switch on: ``forward_features`` runs under the caller's autocast (bfloat16 or float16):
    convolutions and linear layers in that dtype, while these stay float32:
      - the GroupNorms and LayerNorms of the pixel decoder (inputs cast to float32, float32
        out: :class:`Float32GroupNorm`, :class:`Float32LayerNorm`), hence the encoder's residual
        stream is float32 (a half-precision sublayer output is added out of place, promoting);
      - the sampling offsets and the softmax of the attention weights (``RooftopMSDeformAttn``
        casts both projections' outputs to float32), and the sampling locations computed from
        them;
      - our op's float16 kernels take float16 values, locations and weights (a location in
        [0, 1] then rounds by at most 2^-12 of the map, 0.03 px on a 128-wide level); with
        bfloat16 values the op computes in float32 (bfloat16 would round a location by up to
        2^-9 of the map, 0.25 px on the 128-wide level of a 1024 px image); on the CPU the op
        always computes in float32 (its kernels are float32/float64);
      - the loss: the criterion runs with autocast off on float32 copies of the outputs
        (:class:`Float32Criterion`; only when the switch is on, so the default is unchanged).
"""
import torch
from torch import nn
from torch.nn import functional as F


def device_type_of(tensors):
    """The device type ("cpu", "cuda") of the first tensor in ``tensors``; "cpu" when none."""
    for t in tensors:
        if torch.is_tensor(t):
            return t.device.type
    return "cpu"


class Float32GroupNorm(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype or autocast; float32 out."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.group_norm(x.float(), self.num_groups, _f32(self.weight), _f32(self.bias),
                                self.eps)


class Float32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype or autocast; float32 out."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, _f32(self.weight),
                                _f32(self.bias), self.eps)


def _f32(t):
    return None if t is None else t.float()


def _to_float32(obj):
    if torch.is_tensor(obj):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _to_float32(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_float32(v) for v in obj)
    return obj


class Float32Criterion:
    """Mixin made into a subclass of the model's criterion class at install time: the losses
    (and the Hungarian matching) on float32 outputs with autocast off."""

    def forward(self, outputs, targets, *args, **kwargs):
        device_type = device_type_of([outputs.get("pred_logits")])
        with torch.autocast(device_type, enabled=False):
            return super().forward(_to_float32(outputs), targets, *args, **kwargs)


_criterion_classes = {}


def float32_criterion_class(cls):
    """``cls`` (a criterion class) with :class:`Float32Criterion` mixed in (made once per class)."""
    if issubclass(cls, Float32Criterion):
        return cls
    if cls not in _criterion_classes:
        _criterion_classes[cls] = type(f"Float32{cls.__name__}", (Float32Criterion, cls), {})
    return _criterion_classes[cls]


def float32_norms(module: nn.Module) -> int:
    """Turn the GroupNorms and LayerNorms inside ``module`` into their float32 versions (same
    parameters and state-dict keys); returns how many."""
    count = 0
    for sub in module.modules():
        if type(sub) is nn.GroupNorm:
            sub.__class__ = Float32GroupNorm
            count += 1
        elif type(sub) is nn.LayerNorm:
            sub.__class__ = Float32LayerNorm
            count += 1
    return count
