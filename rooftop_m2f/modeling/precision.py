"""The float32 parts of the pixel decoder under autocast (``ROOFTOP.PIXEL_DECODER_AUTOCAST``).

Mask2Former keeps its pixel decoder in float32 under AMP, and so does ours by default. With the
switch on, ours (:mod:`.pixel_decoder`) runs in the autocast dtype except for the
numerically sensitive parts: the norms (:class:`Float32GroupNorm`, :class:`Float32LayerNorm`), the
sampling offsets and attention softmax (:mod:`.msdeform`) and the loss (:class:`Float32Criterion`).
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
