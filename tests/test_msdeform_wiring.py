"""install_msdeform_attn: Mask2Former's MSDeformAttn modules run our compiled op, with the same
results as Mask2Former's own PyTorch path, and never fall back silently."""
import copy
import importlib
import logging

import pytest
import torch
from torch import nn

import mask2former.modeling.pixel_decoder.ops.modules.ms_deform_attn as upstream_module
from detectron2.layers import ShapeSpec
from mask2former.modeling.pixel_decoder.msdeformattn import MSDeformAttnPixelDecoder
from mask2former.modeling.pixel_decoder.ops.functions.ms_deform_attn_func import (
    ms_deform_attn_core_pytorch,
)
from mask2former.modeling.pixel_decoder.ops.modules.ms_deform_attn import MSDeformAttn
from rooftop_m2f.modeling import msdeform
from rooftop_m2f.modeling.msdeform import (
    RooftopMSDeformAttn,
    impl_calls,
    install_msdeform_attn,
    reset_impl_calls,
    resolve_impl,
)

HAS_GPU = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(
    not HAS_GPU, reason="no NVIDIA GPU on this machine (torch.cuda.is_available() is False)")
LOGGER = msdeform.__name__


@pytest.fixture(autouse=True)
def _fresh_bookkeeping(monkeypatch):
    reset_impl_calls()
    monkeypatch.setattr(msdeform, "_warned", set())
    yield
    reset_impl_calls()


@pytest.fixture
def upstream_reference(monkeypatch):
    """Make Mask2Former's own MSDeformAttn.forward run its PyTorch reference path (it would
    otherwise call MultiScaleDeformableAttention, i.e. our op, when importable)."""
    class ReferenceFunction:
        @staticmethod
        def apply(value, spatial_shapes, level_start_index, locations, weights, im2col_step):
            return ms_deform_attn_core_pytorch(value, spatial_shapes, locations, weights)

    monkeypatch.setattr(upstream_module, "MSDeformAttnFunction", ReferenceFunction)


@pytest.fixture
def core_calls(monkeypatch):
    """Counts calls of the PyTorch reference made by our module (independent of our bookkeeping)."""
    calls = []
    original = msdeform.ms_deform_attn_core_pytorch

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(msdeform, "ms_deform_attn_core_pytorch", counting)
    return calls


def compiled_op_or_fail():
    try:
        return importlib.import_module("MultiScaleDeformableAttention")
    except ImportError as exc:
        pytest.fail(f"the compiled op is not built ({exc}); run `make ops` first")


# ---- a plain MSDeformAttn -------------------------------------------------------------------------
SHAPES = [(8, 8), (4, 4), (2, 2)]


def make_attention(seed=0, d_model=64, heads=8, points=4, dtype=torch.float64):
    torch.manual_seed(seed)
    module = MSDeformAttn(d_model=d_model, n_levels=len(SHAPES), n_heads=heads, n_points=points)
    with torch.no_grad():  # non-trivial offsets and weights (the init zeroes their weights)
        module.sampling_offsets.weight.normal_(0, 0.05)
        module.attention_weights.weight.normal_(0, 0.1)
    return module.to(dtype)


def make_inputs(batch=2, d_model=64, boxes=False, padding=False, seed=1, dtype=torch.float64,
                device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    spatial = torch.tensor(SHAPES, dtype=torch.long)
    start = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    values = int(spatial.prod(1).sum())
    queries = values  # encoder self-attention: every pixel is a query
    query = torch.randn(batch, queries, d_model, generator=gen, dtype=torch.float64)
    flat = torch.randn(batch, values, d_model, generator=gen, dtype=torch.float64)
    if boxes:
        centre = torch.rand(batch, queries, 1, 2, generator=gen, dtype=torch.float64)
        size = 0.05 + 0.3 * torch.rand(batch, queries, 1, 2, generator=gen, dtype=torch.float64)
        ref = torch.cat([centre, size], -1).expand(-1, -1, len(SHAPES), -1)
    else:
        ref = torch.rand(batch, queries, 1, 2, generator=gen,
                         dtype=torch.float64).expand(-1, -1, len(SHAPES), -1)
    mask = None
    if padding:
        mask = torch.rand(batch, values, generator=gen) < 0.2
        mask = mask.to(device)
    to = dict(dtype=dtype, device=device)
    return dict(query=query.to(**to), reference_points=ref.contiguous().to(**to),
                input_flatten=flat.to(**to), input_spatial_shapes=spatial.to(device),
                input_level_start_index=start.to(device), input_padding_mask=mask)


def run(module, inputs):
    """Output and gradients of the parameters and the float inputs."""
    inputs = {k: (v.detach().clone().requires_grad_() if torch.is_tensor(v) and
                  v.is_floating_point() else v) for k, v in inputs.items()}
    out = module(**inputs)
    grad = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    out.backward(grad)
    grads = {f"param {n}": p.grad for n, p in module.named_parameters()}
    grads.update({f"input {k}": v.grad for k, v in inputs.items()
                  if torch.is_tensor(v) and v.requires_grad})
    return out.detach(), grads


def assert_same(a, b, atol, rtol):
    out_a, grads_a = a
    out_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("boxes,padding", [(False, False), (False, True), (True, False)],
                         ids=["points", "points+padding", "boxes"])
def test_module_matches_mask2former_reference(upstream_reference, core_calls, boxes, padding):
    compiled_op_or_fail()
    reference = make_attention()
    ours = copy.deepcopy(reference)
    assert install_msdeform_attn(ours, "compiled") == "compiled-cpu"
    assert type(ours) is RooftopMSDeformAttn and type(reference) is MSDeformAttn
    inputs = make_inputs(boxes=boxes, padding=padding)
    assert_same(run(ours, inputs), run(reference, inputs), atol=1e-10, rtol=1e-9)
    assert ours.last_impl == "compiled-cpu" and not core_calls
    assert impl_calls() == {"compiled-cpu": 1}


def test_pytorch_impl_is_the_reference(upstream_reference, core_calls):
    reference = make_attention(seed=2)
    ours = copy.deepcopy(reference)
    assert install_msdeform_attn(ours, "pytorch") == "pytorch"
    inputs = make_inputs(seed=3, padding=True)
    assert_same(run(ours, inputs), run(reference, inputs), atol=1e-12, rtol=1e-12)
    assert ours.last_impl == "pytorch" and len(core_calls) == 1
    assert impl_calls() == {"pytorch": 1}


def test_install_keeps_parameters_and_state_dict():
    module = make_attention(seed=4)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    install_msdeform_attn(module, "auto")
    after = module.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # Reinstalling switches the implementation of an already converted module.
    assert install_msdeform_attn(module, "pytorch") == "pytorch"
    assert module._rooftop_msda_mode == "pytorch"


def test_invalid_impl_is_rejected():
    with pytest.raises(ValueError, match="must be one of"):
        install_msdeform_attn(make_attention(), "cuda")


def test_model_without_msdeform_attn():
    assert install_msdeform_attn(nn.Linear(2, 2), "compiled") == "none"


def test_subclass_with_own_forward_is_not_overwritten():
    class Custom(MSDeformAttn):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    with pytest.raises(TypeError, match="Custom"):
        install_msdeform_attn(nn.Sequential(Custom(64, 3, 8, 4)), "auto")


def test_cpu_bfloat16_runs_the_compiled_op_in_float32(core_calls):
    compiled_op_or_fail()
    module = make_attention(seed=5, dtype=torch.float32)
    install_msdeform_attn(module, "compiled")
    inputs32 = make_inputs(seed=6, dtype=torch.float32)
    with torch.no_grad():
        out32 = module(**inputs32)
        out16 = copy.deepcopy(module).to(torch.bfloat16)(
            **make_inputs(seed=6, dtype=torch.bfloat16))
    assert out16.dtype == torch.bfloat16 and not core_calls
    assert (out16.float() - out32).abs().max() <= 0.05 * out32.abs().max()


# ---- Mask2Former's pixel decoder --------------------------------------------------------------------
def make_pixel_decoder(seed=0):
    torch.manual_seed(seed)
    input_shape = {
        "res2": ShapeSpec(channels=16, stride=4),
        "res3": ShapeSpec(channels=24, stride=8),
        "res4": ShapeSpec(channels=32, stride=16),
        "res5": ShapeSpec(channels=40, stride=32),
    }
    decoder = MSDeformAttnPixelDecoder(
        input_shape, transformer_dropout=0.0, transformer_nheads=8,
        transformer_dim_feedforward=128, transformer_enc_layers=2, conv_dim=64, mask_dim=64,
        norm="GN", transformer_in_features=["res3", "res4", "res5"], common_stride=4)
    for module in decoder.modules():  # non-trivial sampling offsets and attention weights
        if isinstance(module, MSDeformAttn):
            with torch.no_grad():
                module.sampling_offsets.weight.normal_(0, 0.05)
                module.attention_weights.weight.normal_(0, 0.1)
    return decoder


def decoder_features(size=64, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, ch, size // stride, size // stride, generator=gen)
            for name, ch, stride in [("res2", 16, 4), ("res3", 24, 8), ("res4", 32, 16),
                                     ("res5", 40, 32)]}


def run_decoder(decoder, features):
    mask_features, encoder_out, multi_scale = decoder.forward_features(features)
    loss = (mask_features.square().mean() + encoder_out.square().mean()
            + sum(f.abs().mean() for f in multi_scale))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in decoder.named_parameters() if p.grad is not None}
    return [mask_features.detach(), encoder_out.detach()] + [f.detach() for f in multi_scale], grads


def test_pixel_decoder_runs_compiled_op_and_matches_reference(core_calls):
    compiled_op_or_fail()
    reference = make_pixel_decoder()
    ours = copy.deepcopy(reference)
    assert install_msdeform_attn(reference, "pytorch") == "pytorch"
    assert install_msdeform_attn(ours, "auto") == "compiled-cpu"
    converted = [m for m in ours.modules() if isinstance(m, MSDeformAttn)]
    assert len(converted) == 2 and all(type(m) is RooftopMSDeformAttn for m in converted)

    features = decoder_features()
    ref_outs, ref_grads = run_decoder(reference, features)
    assert len(core_calls) == 2
    reset_impl_calls()
    outs, grads = run_decoder(ours, features)
    assert len(core_calls) == 2, "the compiled model called the PyTorch reference"
    assert impl_calls() == {"compiled-cpu": 2}
    assert all(m.last_impl == "compiled-cpu" for m in converted)
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_fails_if_compiled_op_importable_but_fallback_runs(core_calls):
    """No silent fallback: when MultiScaleDeformableAttention imports, a model built the
    way the meta-architecture builds it must run the compiled op, not the PyTorch fallback."""
    op = compiled_op_or_fail()
    decoder = make_pixel_decoder(seed=3)
    active = install_msdeform_attn(decoder, "auto")
    run_decoder(decoder, decoder_features(seed=4))
    assert active == "compiled-cpu", f"compiled op importable ({op.__file__}) but {active} chosen"
    assert impl_calls().get("pytorch", 0) == 0 and not core_calls, "the fallback ran"
    assert impl_calls().get("compiled-cpu", 0) == 2


def test_install_logs_the_active_implementation(caplog):
    compiled_op_or_fail()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        install_msdeform_attn(make_pixel_decoder(), "auto")
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 1 and "2 module(s) use compiled-cpu on cpu" in lines[0]
    assert "MultiScaleDeformableAttention from" in lines[0]


# ---- the op unavailable, or without a kernel for the device --------------------------------------------
@pytest.fixture
def op_missing(monkeypatch):
    monkeypatch.setattr(msdeform, "_op_state",
                        {"loaded": True, "module": None, "error": "simulated: no such module"})


def test_compiled_impl_raises_when_op_missing(op_missing):
    model = make_attention()
    with pytest.raises(RuntimeError, match="simulated: no such module"):
        install_msdeform_attn(model, "compiled")
    assert type(model) is MSDeformAttn  # untouched


def test_auto_impl_warns_and_falls_back_when_op_missing(op_missing, core_calls, caplog,
                                                        upstream_reference):
    reference = make_attention(seed=7)
    model = copy.deepcopy(reference)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert install_msdeform_attn(model, "auto") == "pytorch"
        inputs = make_inputs(seed=8)
        assert_same(run(model, inputs), run(reference, inputs), atol=1e-12, rtol=1e-12)
        run(model, inputs)
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one warning, not one per forward"
    assert "simulated: no such module" in warnings[0].getMessage()
    assert "PyTorch reference" in warnings[0].getMessage()
    assert impl_calls() == {"pytorch": 2} and len(core_calls) == 2


class _CpuOnlyBuild:
    __file__ = "/simulated/MultiScaleDeformableAttention.so"

    @staticmethod
    def with_cuda():
        return False

    @staticmethod
    def cuda_arch_list():
        return ""


def test_device_without_kernel(monkeypatch, caplog):
    """A CPU-only build and a model moved to a GPU: "auto" warns once and runs the reference there,
    "compiled" refuses; the CPU keeps its compiled kernel."""
    monkeypatch.setattr(msdeform, "_op_state",
                        {"loaded": True, "module": _CpuOnlyBuild(), "error": None})
    assert resolve_impl("compiled", "cpu") == "compiled-cpu"
    with pytest.raises(RuntimeError, match="built CPU-only"):
        resolve_impl("compiled", "cuda")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resolve_impl("auto", "cuda") == "pytorch"
        assert resolve_impl("auto", "cuda:0") == "pytorch"
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1 and "built CPU-only" in warnings[0]
    assert resolve_impl("pytorch", "cuda") == "pytorch"
    assert resolve_impl("auto", "meta") == "pytorch"


# ---- CUDA -----------------------------------------------------------------------------------------
@requires_gpu
def test_cuda_module_matches_cpu_and_runs_compiled_cuda(core_calls):
    op = compiled_op_or_fail()
    if not op.with_cuda():
        pytest.fail("a GPU is present but the op was built CPU-only; run `make clean-ops ops`")
    cpu_module = make_attention(seed=9)
    gpu_module = copy.deepcopy(cpu_module).cuda()
    install_msdeform_attn(cpu_module, "compiled")
    assert install_msdeform_attn(gpu_module, "compiled") == "compiled-cuda"
    cpu = run(cpu_module, make_inputs(seed=10, padding=True))
    gpu = run(gpu_module, make_inputs(seed=10, padding=True, device="cuda"))
    assert gpu_module.last_impl == "compiled-cuda" and not core_calls
    out, grads = gpu
    assert_same((out.cpu(), {k: v.cpu() for k, v in grads.items()}), cpu, atol=1e-9, rtol=1e-8)


@requires_gpu
def test_cuda_autocast_runs_compiled_half(core_calls):
    compiled_op_or_fail()
    module = make_attention(seed=11, dtype=torch.float32).cuda()
    install_msdeform_attn(module, "compiled")
    inputs = make_inputs(seed=12, dtype=torch.float32, device="cuda")
    with torch.no_grad():
        out32 = module(**inputs)
        with torch.autocast("cuda", dtype=torch.float16):
            out16 = module(**inputs)
    assert module.last_impl == "compiled-cuda" and not core_calls
    assert (out16.float() - out32).abs().max() <= 0.02 * out32.abs().max()
