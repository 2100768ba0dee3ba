"""Multi-scale deformable attention on our compiled op (``ops/``, module
``MultiScaleDeformableAttention``), never falling back silently.

Mask2Former's ``MSDeformAttn`` silently falls back to a slow ``grid_sample`` path when its CUDA op
fails (always on the CPU). :func:`install_msdeform_attn` makes its modules
:class:`RooftopMSDeformAttn` (same parameters and keys) whose forward calls the compiled op;
``ROOFTOP.MSDEFORM_ATTN_IMPL`` chooses (:func:`resolve_impl`) and :func:`impl_calls` counts what ran.
"""
import collections
import logging
import threading
from typing import Dict, Optional

import torch
from torch.autograd.function import once_differentiable

from mask2former.modeling.pixel_decoder.ops.functions.ms_deform_attn_func import (
    ms_deform_attn_core_pytorch,
)
from mask2former.modeling.pixel_decoder.ops.modules.ms_deform_attn import MSDeformAttn

logger = logging.getLogger(__name__)

IMPLS = ("auto", "compiled", "pytorch")
OP_MODULE = "MultiScaleDeformableAttention"

_lock = threading.Lock()
_op_state: Dict[str, object] = {"loaded": False, "module": None, "error": None}
_impl_calls: "collections.Counter[str]" = collections.Counter()
_warned: set = set()


# ---- the compiled op ------------------------------------------------------------------------------
def load_compiled_op():
    """The compiled ``MultiScaleDeformableAttention`` module, or ``None`` when it cannot be
    imported (the reason is in :func:`compiled_op_error`). Imported once."""
    with _lock:
        if not _op_state["loaded"]:
            _op_state["loaded"] = True
            try:
                import MultiScaleDeformableAttention as op
            except ImportError as exc:  # not built, or built against another torch
                _op_state["error"] = f"import {OP_MODULE} failed: {type(exc).__name__}: {exc}"
            else:
                if hasattr(op, "with_cuda"):
                    _op_state["module"] = op
                else:
                    _op_state["error"] = (
                        f"{OP_MODULE} at {getattr(op, '__file__', '?')} is not rooftop-m2f's build "
                        "(it has no with_cuda()); rebuild ops/ with `make ops`")
        return _op_state["module"]


def compiled_op_error() -> Optional[str]:
    """Why the compiled op is unavailable (``None`` when it imported)."""
    load_compiled_op()
    return _op_state["error"]


def describe_compiled_op() -> str:
    op = load_compiled_op()
    if op is None:
        return f"compiled op unavailable: {compiled_op_error()}"
    cuda = (f"CUDA kernels for TORCH_CUDA_ARCH_LIST={op.cuda_arch_list()}" if op.with_cuda()
            else "no CUDA kernels (CPU-only build)")
    return f"{OP_MODULE} from {op.__file__}: CPU kernels, {cuda}"


def compiled_unsupported_reason(device: torch.device) -> Optional[str]:
    """``None`` when the compiled op has a kernel for ``device``, else the reason it has not."""
    device = torch.device(device)
    op = load_compiled_op()
    if op is None:
        return f"{compiled_op_error()} (build it with `make ops`)"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if op.with_cuda():
            return None
        return (f"{OP_MODULE} at {op.__file__} was built CPU-only (no CUDA kernels); rebuild ops/ "
                "where a CUDA toolkit is installed (FORCE_CUDA=1 or a visible GPU)")
    return f"{OP_MODULE} has no kernel for device type {device.type!r}"


def _require_op():
    op = load_compiled_op()
    if op is None:
        raise RuntimeError(f"{OP_MODULE} is not available: {compiled_op_error()}; "
                           "build it with `make ops`")
    return op


class MSDeformAttnFunction(torch.autograd.Function):
    """Autograd wrapper of the compiled op (first derivatives only)."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights, im2col_step):
        op = _require_op()
        output = op.ms_deform_attn_forward(value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights, im2col_step)
        ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights)
        ctx.im2col_step = im2col_step
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, locations, weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = _require_op().ms_deform_attn_backward(
            value, spatial_shapes, level_start_index, locations, weights,
            grad_output.contiguous(), ctx.im2col_step)
        needs = ctx.needs_input_grad
        return (grad_value if needs[0] else None, None, None,
                grad_locations if needs[3] else None, grad_weights if needs[4] else None, None)


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, im2col_step: int = 64):
    """Multi-scale deformable attention through the compiled op, differentiable.

    Shapes: value (N, S, heads, C), spatial_shapes (L, 2) int64 (H, W), level_start_index (L,),
    sampling_locations (N, Q, heads, L, P, 2) in [0, 1], attention_weights (N, Q, heads, L, P);
    returns (N, Q, heads * C). Raises when the op is unavailable or the inputs are malformed."""
    return MSDeformAttnFunction.apply(value, spatial_shapes, level_start_index,
                                      sampling_locations, attention_weights, im2col_step)


# ---- bookkeeping ----------------------------------------------------------------------------------
def impl_calls() -> Dict[str, int]:
    """How many MSDeformAttn forwards ran each implementation since the last reset."""
    with _lock:
        return dict(_impl_calls)


def reset_impl_calls() -> None:
    with _lock:
        _impl_calls.clear()


def _record(impl: str) -> None:
    with _lock:
        _impl_calls[impl] += 1


def _log_once(key, level, msg, *args) -> None:
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    logger.log(level, msg, *args)


def resolve_impl(mode: str, device) -> str:
    """The implementation ("compiled-cpu", "compiled-cuda" or "pytorch") a forward on ``device``
    runs under ``mode``. "compiled" raises ``RuntimeError`` when the op cannot run there; "auto"
    then returns "pytorch" and logs a WARNING with the reason (once per reason and device type)."""
    if mode not in IMPLS:
        raise ValueError(f"MSDeformAttn implementation must be one of {IMPLS}; got {mode!r}")
    device = torch.device(device)
    if mode == "pytorch":
        return "pytorch"
    reason = compiled_unsupported_reason(device)
    if reason is None:
        return f"compiled-{device.type}"
    if mode == "compiled":
        raise RuntimeError(f"MSDeformAttn implementation 'compiled' cannot run on {device}: "
                           f"{reason}")
    _log_once(("fallback", device.type, reason), logging.WARNING,
              "MSDeformAttn (impl='auto'): the compiled op cannot run on %s: %s. Falling back to "
              "the PyTorch reference (grid_sample: slower, much more memory).", device, reason)
    return "pytorch"


# ---- the module -----------------------------------------------------------------------------------
def _softmax_last(x: torch.Tensor) -> torch.Tensor:
    """Softmax over a short last dimension (levels x points, e.g. 12). On the CPU written out,
    exp(x - max) / sum: PyTorch's CPU softmax is much slower on such short rows; the values agree
    to float rounding and autograd differentiates the expression as usual. Elsewhere (one fused
    kernel on a GPU) PyTorch's."""
    if x.device.type != "cpu":
        return x.softmax(-1)
    shifted = x - x.amax(-1, keepdim=True).detach()
    exp = shifted.exp()
    return exp / exp.sum(-1, keepdim=True)


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class RooftopMSDeformAttn(MSDeformAttn):
    """Mask2Former's ``MSDeformAttn`` with our forward. Instances are made by
    :func:`install_msdeform_attn` (class swap); no parameter or buffer is added."""

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes,
                input_level_start_index, input_padding_mask=None):
        """query (N, Q, d_model); reference_points (N, Q, L, 2) normalised (x, y), or (N, Q, L, 4)
        boxes (cx, cy, w, h); input_flatten (N, S, d_model) with S = sum_l H_l W_l;
        input_spatial_shapes (L, 2) int64 (H_l, W_l); input_level_start_index (L,);
        input_padding_mask (N, S) bool, True at padding. Returns (N, Q, d_model)."""
        batch, num_queries, _ = query.shape
        _, num_values, _ = input_flatten.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        channels = self.d_model // heads
        if tuple(input_spatial_shapes.shape) != (levels, 2):
            raise ValueError(f"input_spatial_shapes must have shape ({levels}, 2) for a module with "
                             f"n_levels={levels}; got {tuple(input_spatial_shapes.shape)}")

        # Values: one projection, split into heads; padded positions contribute nothing.
        value = self.value_proj(input_flatten)
        # (On the CPU, a mask without padding, the usual case, costs no pass over the values;
        # on a GPU the check would wait for the device, so the fill always runs there.)
        if input_padding_mask is not None and (value.is_cuda or bool(input_padding_mask.any())):
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, num_values, heads, channels)

        # Per head, level and point: a 2-D offset and a weight, both predicted from the query;
        # the weights are normalised over the levels x points of each head.
        # (float32 also under autocast, ROOFTOP.PIXEL_DECODER_AUTOCAST: the locations computed from
        # the offsets and the softmax of the weights are the sensitive part; no-ops otherwise.)
        offsets = _at_least_float32(self.sampling_offsets(query)).view(
            batch, num_queries, heads, levels, points, 2)
        weights = _at_least_float32(self.attention_weights(query)).view(
            batch, num_queries, heads, levels * points)
        weights = _softmax_last(weights).view(batch, num_queries, heads, levels, points)

        ref = reference_points[:, :, None, :, None, :]  # (N, Q, 1, L, 1, 2 or 4)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise x by W_l and y by H_l.
            size_xy = input_spatial_shapes.flip(-1).to(offsets.dtype)  # (L, 2) as (W, H)
            locations = torch.addcdiv(ref, offsets, size_xy[None, None, None, :, None, :])
        elif reference_points.shape[-1] == 4:
            # Reference boxes: offsets are fractions of the half box size, scaled per point count.
            locations = ref[..., :2] + offsets / points * ref[..., 2:] * 0.5
        else:
            raise ValueError("reference_points must end in 2 (points) or 4 (boxes); got shape "
                             f"{tuple(reference_points.shape)}")

        output = self._attend(value, input_spatial_shapes, input_level_start_index, locations,
                              weights)
        return self.output_proj(output)

    def _attend(self, value, spatial_shapes, level_start_index, locations, weights):
        impl = resolve_impl(getattr(self, "_rooftop_msda_mode", "auto"), value.device)
        self.last_impl = impl
        _record(impl)
        if impl == "pytorch":
            expected = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
            if expected != value.shape[1]:
                raise ValueError(f"value has {value.shape[1]} positions but spatial_shapes "
                                 f"{spatial_shapes.tolist()} sum to {expected}")
            return ms_deform_attn_core_pytorch(value, spatial_shapes, locations, weights)
        dtype = value.dtype
        op_dtype = dtype
        if value.device.type == "cpu" and dtype not in (torch.float32, torch.float64):
            op_dtype = torch.float32
            _log_once(("cpu-upcast", dtype), logging.INFO,
                      "MSDeformAttn: %s inputs on the CPU are computed in float32 by the "
                      "compiled op (its CPU kernels are float32/float64)", dtype)
        elif dtype == torch.bfloat16:
            # The op takes one dtype for values, locations and weights; bfloat16 locations would
            # be rounded by up to 2^-9 of a map (0.25 px on a 128-wide level). float16 keeps 11
            # bits (<= 0.03 px there), so float16 runs as is.
            op_dtype = torch.float32
            _log_once(("bf16-upcast", value.device.type), logging.INFO,
                      "MSDeformAttn: bfloat16 values are computed in float32 by the compiled op "
                      "(bfloat16 sampling locations would be off by up to 0.25 px)")
        output = ms_deform_attn(value.to(op_dtype).contiguous(), spatial_shapes.contiguous(),
                                level_start_index.contiguous(),
                                locations.to(op_dtype).contiguous(),
                                weights.to(op_dtype).contiguous(), self.im2col_step)
        return output.to(dtype)


def _module_device(module: torch.nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def install_msdeform_attn(model: torch.nn.Module, impl: str = "auto") -> str:
    """Make every Mask2Former ``MSDeformAttn`` in ``model`` a :class:`RooftopMSDeformAttn` running
    ``impl`` ("auto", "compiled" or "pytorch"). Returns the implementation a forward on the
    model's current device will run ("compiled-cpu", "compiled-cuda" or "pytorch"; "none" when
    the model has no MSDeformAttn) and logs it once. Raises ``RuntimeError`` for
    ``impl="compiled"`` when the compiled op cannot run on that device."""
    if impl not in IMPLS:
        raise ValueError(f"MSDeformAttn implementation must be one of {IMPLS}; got {impl!r}")
    modules = [m for m in model.modules() if isinstance(m, MSDeformAttn)]
    if not modules:
        logger.info("MSDeformAttn: %s has no MSDeformAttn module; nothing to install",
                    type(model).__name__)
        return "none"
    for module in modules:
        if type(module) not in (MSDeformAttn, RooftopMSDeformAttn):
            raise TypeError(f"{type(module).__qualname__} subclasses MSDeformAttn with its own "
                            "behaviour; install_msdeform_attn only converts MSDeformAttn itself")
    device = _module_device(modules[0])
    active = resolve_impl(impl, device)  # before touching the model: "compiled" may raise
    for module in modules:
        module.__class__ = RooftopMSDeformAttn
        module._rooftop_msda_mode = impl
        module.last_impl = None
    logger.info("MSDeformAttn: %d module(s) use %s on %s (impl=%r; %s)", len(modules), active,
                device, impl, describe_compiled_op())
    return active
