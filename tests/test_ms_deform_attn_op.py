"""The compiled MultiScaleDeformableAttention op (ops/) against Mask2Former's PyTorch reference.

CPU tests need the op built (`make ops` does it before `make test`); they fail, not skip, when it
is missing. CUDA tests skip, with the reason, where no GPU is present.
"""
import importlib
import itertools

import pytest
import torch

from mask2former.modeling.pixel_decoder.ops.functions.ms_deform_attn_func import (
    ms_deform_attn_core_pytorch,
)
from rooftop_m2f.modeling.msdeform import ms_deform_attn

HAS_GPU = torch.cuda.is_available()
NO_GPU_REASON = ("no NVIDIA GPU on this machine (torch.cuda.is_available() is False); the CUDA "
                 "kernel tests need one")
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason=NO_GPU_REASON)

# Mask2Former's pixel decoder: 3 levels (strides 8, 16, 32), 8 heads of 32 channels, 4 points.
M2F_HEADS, M2F_CHANNELS, M2F_POINTS = 8, 32, 4


@pytest.fixture(scope="module")
def op():
    try:
        return importlib.import_module("MultiScaleDeformableAttention")
    except ImportError as exc:
        pytest.fail(f"the compiled op is not built ({exc}); run `make ops` first")


@pytest.fixture(scope="module")
def cuda_op(op):
    if not HAS_GPU:
        pytest.skip(NO_GPU_REASON)
    if not op.with_cuda():
        pytest.fail("a GPU is present but MultiScaleDeformableAttention was built CPU-only; "
                    "rebuild with `make clean-ops ops`")
    return op


# ---- helpers --------------------------------------------------------------------------------------
def level_tensors(shapes, device="cpu"):
    spatial = torch.tensor(shapes, dtype=torch.long, device=device).reshape(-1, 2)
    start = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    return spatial, start


def make_problem(shapes, batch, heads, channels, queries, points, *, seed=0,
                 dtype=torch.float64, device="cpu", low=-0.15, high=1.15):
    """Random value, locations in [low, high] (so some points fall outside), softmaxed weights."""
    gen = torch.Generator().manual_seed(seed)
    spatial, start = level_tensors(shapes)
    levels, values = len(shapes), int(spatial.prod(1).sum())
    value = torch.randn(batch, values, heads, channels, generator=gen, dtype=torch.float64)
    loc = low + (high - low) * torch.rand(batch, queries, heads, levels, points, 2,
                                          generator=gen, dtype=torch.float64)
    attn = torch.randn(batch, queries, heads, levels * points, generator=gen,
                       dtype=torch.float64).softmax(-1).view(batch, queries, heads, levels, points)
    grad = torch.randn(batch, queries, heads * channels, generator=gen, dtype=torch.float64)
    to = dict(dtype=dtype, device=device)
    return dict(value=value.to(**to), spatial=spatial.to(device), start=start.to(device),
                loc=loc.to(**to), attn=attn.to(**to), grad=grad.to(**to))


def local_locations(shapes, batch, heads, points, *, seed=0, spread_px=2.0):
    """Pixel-decoder-like locations: every query is a pixel of some level, its reference point is
    that pixel's centre (in every level) and the offsets are a few pixels."""
    gen = torch.Generator().manual_seed(seed)
    refs = []
    for h, w in shapes:
        ys, xs = torch.meshgrid((torch.arange(h, dtype=torch.float64) + 0.5) / h,
                                (torch.arange(w, dtype=torch.float64) + 0.5) / w, indexing="ij")
        refs.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
    ref = torch.cat(refs)  # (Q, 2)
    size_xy = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)
    offsets = spread_px * torch.randn(batch, ref.shape[0], heads, len(shapes), points, 2,
                                      generator=gen, dtype=torch.float64)
    return ref[None, :, None, None, None, :] + offsets / size_xy[None, None, None, :, None, :]


def away_from_kinks(loc, shapes, margin=0.01):
    """Move pixel coordinates at least `margin` px away from integers: the bilinear weights'
    derivative jumps there, so rounding a location to another precision could change the location
    gradient by O(1) (not an error of either implementation)."""
    size_xy = torch.tensor([[w, h] for h, w in shapes], dtype=loc.dtype)[None, None, None, :, None]
    px = loc * size_xy - 0.5
    whole = px.floor()
    px = whole + (px - whole).clamp(margin, 1 - margin)
    return (px + 0.5) / size_xy


def reference(p):
    """Output and (value, loc, attn) gradients of Mask2Former's reference, by autograd."""
    value, loc, attn = (p[k].detach().requires_grad_() for k in ("value", "loc", "attn"))
    out = ms_deform_attn_core_pytorch(value, p["spatial"], loc, attn)
    grads = torch.autograd.grad(out, (value, loc, attn), p["grad"])
    return out.detach(), grads


def compiled(op, p, im2col_step=64):
    args = (p["value"], p["spatial"], p["start"], p["loc"], p["attn"])
    out = op.ms_deform_attn_forward(*args, im2col_step)
    grads = op.ms_deform_attn_backward(*args, p["grad"], im2col_step)
    return out, tuple(grads)


def assert_matches(op, p, *, atol=1e-10, rtol=1e-9, im2col_step=64):
    out, grads = compiled(op, p, im2col_step)
    ref_out, ref_grads = reference(p)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol, msg="forward")
    for name, ours, ref in zip(("value", "sampling_locations", "attention_weights"), grads,
                               ref_grads):
        torch.testing.assert_close(ours, ref, atol=atol, rtol=rtol, msg=f"grad of {name}")


def random_case(seed):
    gen = torch.Generator().manual_seed(1000 + seed)

    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    shapes = [(draw(1, 12), draw(1, 12)) for _ in range(draw(1, 4))]
    return dict(shapes=shapes, batch=draw(1, 3), heads=draw(1, 4), channels=draw(1, 40),
                queries=draw(1, 30), points=draw(1, 4))


FIXED_CASES = [
    dict(shapes=[(5, 7)], batch=1, heads=1, channels=1, queries=3, points=1),
    dict(shapes=[(6, 4), (3, 5), (1, 1)], batch=2, heads=3, channels=5, queries=7, points=3),
    dict(shapes=[(8, 8), (4, 4)], batch=3, heads=2, channels=16, queries=10, points=2),
    dict(shapes=[(9, 13), (5, 7), (3, 4), (2, 2)], batch=2, heads=4, channels=33, queries=20,
         points=4),
    dict(shapes=[(1, 17), (17, 1)], batch=1, heads=2, channels=3, queries=9, points=2),
]


# ---- correctness (CPU, float64) ---------------------------------------------------------------------
@pytest.mark.parametrize("case", FIXED_CASES + [random_case(s) for s in range(6)],
                         ids=lambda c: "x".join(map(str, [c["batch"], c["heads"], c["channels"]]))
                         + "-" + str(c["shapes"]).replace(" ", ""))
def test_matches_reference_random_shapes(op, case):
    p = make_problem(case["shapes"], case["batch"], case["heads"], case["channels"],
                     case["queries"], case["points"], seed=len(case["shapes"]))
    assert_matches(op, p)


def test_matches_reference_mask2former_shapes(op):
    """The pixel decoder's geometry (3 levels, 8 heads x 32 channels, 4 points, every pixel a
    query) on a 256x256 image: levels 32x32, 16x16, 8x8."""
    shapes = [(32, 32), (16, 16), (8, 8)]
    p = make_problem(shapes, 2, M2F_HEADS, M2F_CHANNELS, 1344, M2F_POINTS, seed=3)
    p["loc"] = local_locations(shapes, 2, M2F_HEADS, M2F_POINTS, seed=3)
    assert_matches(op, p)


def test_float32_close_to_float64_reference(op):
    shapes = [(32, 32), (16, 16), (8, 8)]
    p64 = make_problem(shapes, 1, M2F_HEADS, M2F_CHANNELS, 1344, M2F_POINTS, seed=4)
    p64["loc"] = away_from_kinks(local_locations(shapes, 1, M2F_HEADS, M2F_POINTS, seed=4),
                                 shapes)
    p32 = {k: (v.float() if v.is_floating_point() else v) for k, v in p64.items()}
    out, grads = compiled(op, p32)
    ref_out, ref_grads = reference(p64)
    ref32_out, ref32_grads = reference(p32)  # the reference's own float32 error, for scale
    assert out.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    for name, ours, want, ref32 in zip(("output", "grad value", "grad loc", "grad attn"),
                                       (out,) + grads, (ref_out,) + ref_grads,
                                       (ref32_out,) + ref32_grads):
        err = (ours.double() - want).abs().max().item()
        ref32_err = (ref32.double() - want).abs().max().item()
        scale = want.abs().max().item()
        # float32 results within 1e-5 of each tensor's scale, and no worse than twice the
        # reference's float32 error (both measured against the float64 reference)
        assert err <= 1e-5 * scale, f"{name}: {err:.3g} > 1e-5 x {scale:.3g}"
        assert err <= 2 * ref32_err + 1e-7 * scale, f"{name}: {err:.3g} vs {ref32_err:.3g}"


def _border_locations(shapes, batch, heads):
    """Every pair of special pixel coordinates, per level; W and H are powers of two and the
    coordinates multiples of 1/4, so loc * W - 0.5 is exact in both implementations."""
    per_level = []
    for h, w in shapes:
        def special(n):
            # outside by more than a pixel, on the edge where one neighbour is inside (-1, n),
            # the map's border (-0.5, n - 0.5 i.e. loc 0 and 1), exact pixel centres, inside
            return [-3.0, -1.5, -1.0, -0.75, -0.5, 0.0, 0.25, 1.0, n - 1.0, n - 0.75, n - 0.5,
                    n - 0.25, float(n), n + 0.5]
        pts = torch.tensor(list(itertools.product(special(w), special(h))), dtype=torch.float64)
        per_level.append((pts + 0.5) / torch.tensor([w, h], dtype=torch.float64))
    loc = torch.stack(per_level, 1)  # (Q, L, 2)
    return loc[None, :, None, :, None, :].expand(batch, -1, heads, -1, 1, -1).contiguous()


def test_points_on_borders_corners_and_outside(op):
    shapes = [(4, 8), (2, 2), (1, 4)]
    loc = _border_locations(shapes, 2, 3)
    p = make_problem(shapes, 2, 3, 6, loc.shape[1], 1, seed=5)
    p["loc"] = loc
    assert_matches(op, p)
    # The cases really are exercised: points with no neighbour inside the map have zero
    # gradients, the others (including those with one neighbour inside) do not.
    out, (gv, gl, ga) = compiled(op, p)
    size_xy = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)
    px = loc * size_xy[None, None, None, :, None, :] - 0.5
    outside = ((px < -1) | (px >= size_xy[None, None, None, :, None, :])).any(-1)
    strictly_inside = ((px > -1) & (px < size_xy[None, None, None, :, None, :])).all(-1)
    assert outside.any() and strictly_inside.any()
    assert (ga[outside] == 0).all() and (gl[outside] == 0).all()
    assert (ga[strictly_inside] != 0).all()
    # On the edge x = -1 (the only inside column has weight 0) the output is unchanged but the
    # location gradient along x is not zero (the reference's floor convention, matched above).
    edge_x = (px[..., 0] == -1) & (px[..., 1] > -1) & (px[..., 1] < size_xy[:, 1][None, None,
                                                                                  None, :, None])
    assert edge_x.any() and (ga[edge_x] == 0).all() and (gl[..., 0][edge_x] != 0).all()


def test_far_and_non_finite_locations_contribute_nothing(op):
    p = make_problem([(6, 5), (3, 3)], 1, 2, 4, 6, 2, seed=6, low=0.0, high=1.0)
    base_out, _ = compiled(op, p)
    bad = p["loc"].clone()
    bad[0, 0, 0, 0, 0] = torch.tensor([1e6, 0.5])
    bad[0, 1, 1, 1, 1] = torch.tensor([-1e6, -1e6])
    bad[0, 2, 0, 1, 0] = torch.tensor([float("nan"), 0.5])
    bad[0, 3, 1, 0, 1] = torch.tensor([0.5, float("inf")])
    p_bad = dict(p, loc=bad)
    out, (gv, gl, ga) = compiled(op, p_bad)
    assert torch.isfinite(out).all() and torch.isfinite(gv).all() and torch.isfinite(ga).all()
    for q, h, l, pt in [(0, 0, 0, 0), (1, 1, 1, 1), (2, 0, 1, 0), (3, 1, 0, 1)]:
        assert ga[0, q, h, l, pt] == 0 and (gl[0, q, h, l, pt] == 0).all()
    # Compared with the same point simply given zero weight, the output is identical.
    zero_w = p["attn"].clone()
    for q, h, l, pt in [(0, 0, 0, 0), (1, 1, 1, 1), (2, 0, 1, 0), (3, 1, 0, 1)]:
        zero_w[0, q, h, l, pt] = 0
    expected, _ = compiled(op, dict(p, attn=zero_w))
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert not torch.equal(out, base_out)


def test_nan_in_value_propagates_like_the_reference(op):
    """A NaN value is never hidden (not even under a zero attention weight)."""
    p = make_problem([(5, 4), (2, 3)], 1, 2, 4, 9, 2, seed=10, low=0.0, high=1.0)
    value = p["value"].clone()
    value[0, 7, 1, 2] = float("nan")
    attn = p["attn"].clone()
    attn[0, :, :, 0, 0] = 0.0
    p = dict(p, value=value, attn=attn)
    out, grads = compiled(op, p)
    ref_out, ref_grads = reference(p)
    assert torch.isnan(ref_out).any()
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-9, equal_nan=True)
    for ours, ref in zip(grads, ref_grads):
        torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-9, equal_nan=True)


@pytest.mark.parametrize("batch,im2col_step", [(3, 2), (5, 4), (2, 64), (7, 3), (1, 1)])
def test_batch_not_divisible_by_im2col_step(op, batch, im2col_step):
    p = make_problem([(6, 5), (3, 3)], batch, 2, 8, 11, 2, seed=batch)
    assert_matches(op, p, im2col_step=im2col_step)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("batch,heads", [(1, 1), (2, 8)])
def test_value_gradient_scatter_is_race_free(op, threads, batch, heads):
    """Many queries sample the same few pixels, so every thread scatters into the same value
    rows: with 1 (batch, head) pair the queries are split into per-thread chunks, with 16 pairs
    the pairs are split. Every thread count must give the reference's gradient (a lost update
    would show as a mismatch; the problem is large enough for the threads to overlap in time)."""
    queries = 8192 // (batch * heads)
    p = make_problem([(2, 2), (1, 1)], batch, heads, 8, queries, 4, seed=7, low=0.2, high=0.8)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        ref_out, ref_grads = reference(p)
        for _ in range(3):
            out, grads = compiled(op, p)
            torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-9)
            for ours, want in zip(grads, ref_grads):
                torch.testing.assert_close(ours, want, atol=1e-9, rtol=1e-9)
    finally:
        torch.set_num_threads(previous)


def _gradcheck_inputs(seed, batch=2, shapes=((4, 5), (2, 3)), heads=2, channels=3, queries=4,
                      points=2, device="cpu"):
    """Locations whose pixel coordinates stay >= 0.05 px from integers (the bilinear
    interpolation has kinks there that finite differences cannot cross)."""
    gen = torch.Generator().manual_seed(seed)
    p = make_problem(list(shapes), batch, heads, channels, queries, points, seed=seed)
    size_xy = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)
    px = torch.randint(-2, 6, p["loc"].shape, generator=gen).double()
    px = px + 0.05 + 0.9 * torch.rand(p["loc"].shape, generator=gen, dtype=torch.float64)
    loc = (px + 0.5) / size_xy[None, None, None, :, None, :]
    to = dict(device=device)
    return (p["value"].to(**to).requires_grad_(), p["spatial"].to(**to), p["start"].to(**to),
            loc.to(**to).requires_grad_(), p["attn"].to(**to).requires_grad_())


@pytest.mark.parametrize("seed,im2col_step", [(0, 64), (1, 1), (2, 3)])
def test_gradcheck(op, seed, im2col_step):
    value, spatial, start, loc, attn = _gradcheck_inputs(seed)

    def fn(v, l, a):
        return ms_deform_attn(v, spatial, start, l, a, im2col_step)

    assert torch.autograd.gradcheck(fn, (value, loc, attn), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_only_requested_gradients_are_returned(op):
    value, spatial, start, loc, attn = _gradcheck_inputs(3)
    loc.requires_grad_(False)
    out = ms_deform_attn(value, spatial, start, loc, attn, 64)
    out.sum().backward()
    assert value.grad is not None and attn.grad is not None and loc.grad is None


def test_empty_queries_and_batch(op):
    for batch, queries in [(0, 5), (2, 0)]:
        p = make_problem([(3, 4)], max(batch, 1), 2, 4, max(queries, 1), 2, seed=8)
        p = dict(p, value=p["value"][:batch], loc=p["loc"][:batch, :queries],
                 attn=p["attn"][:batch, :queries], grad=p["grad"][:batch, :queries])
        out, (gv, gl, ga) = compiled(op, p)
        assert out.shape == (batch, queries, 8)
        assert gv.shape == p["value"].shape and (gv == 0).all()
        assert gl.shape == p["loc"].shape and ga.shape == p["attn"].shape


def test_build_reports_cuda(op):
    assert isinstance(op.with_cuda(), bool)
    assert isinstance(op.cuda_arch_list(), str)
    assert op.with_cuda() == (op.cuda_arch_list() != "")


# ---- bad input -----------------------------------------------------------------------------------
def _bad(p, **changes):
    return dict(p, **changes)


def _non_contiguous(t):
    """Same shape and values, non-contiguous memory."""
    out = t.transpose(0, 1).contiguous().transpose(0, 1)
    assert not out.is_contiguous()
    return out


BASE = dict(shapes=[(4, 3), (2, 2)], batch=2, heads=2, channels=3, queries=5, points=2)


def _base():
    return make_problem(BASE["shapes"], BASE["batch"], BASE["heads"], BASE["channels"],
                        BASE["queries"], BASE["points"], seed=9)


BAD_FORWARD = {
    "value int32": (lambda p: _bad(p, value=p["value"].to(torch.int32)),
                    r"value has dtype Int; expected float32"),
    "value 3-D": (lambda p: _bad(p, value=p["value"][..., 0]),
                  r"value must be 4-D \(N, S, heads, C\); got shape \[2, 16, 2\]"),
    "loc float32 vs value float64": (lambda p: _bad(p, loc=p["loc"].float()),
                                     r"sampling_locations has dtype Float but value has dtype "
                                     r"Double"),
    "attn float32 vs value float64": (lambda p: _bad(p, attn=p["attn"].float()),
                                      r"attention_weights has dtype Float but value has dtype "
                                      r"Double"),
    "spatial_shapes int32": (lambda p: _bad(p, spatial=p["spatial"].int()),
                             r"spatial_shapes must be int64"),
    "spatial_shapes (L, 3)": (lambda p: _bad(p, spatial=torch.ones(2, 3, dtype=torch.long)),
                              r"spatial_shapes must have shape \(levels, 2\).*got shape \[2, 3\]"),
    "non-positive level": (lambda p: _bad(p, spatial=torch.tensor([[4, 3], [0, 2]]),
                                          start=torch.tensor([0, 12])),
                           r"spatial_shapes\[1\] = \(0, 2\) must be positive"),
    "level_start_index shifted": (lambda p: _bad(p, start=p["start"] + 1),
                                  r"level_start_index\[0\] = 1 but level 0 starts at 0"),
    "level_start_index wrong length": (lambda p: _bad(p, start=p["start"][:1]),
                                       r"level_start_index must have shape \(2,\).*got shape "
                                       r"\[1\]"),
    "S disagrees with spatial_shapes": (lambda p: _bad(p, value=p["value"][:, :-1].contiguous()),
                                        r"value has S = 15 rows \(shape \[2, 15, 2, 3\]\) but "
                                        r"spatial_shapes sums to 16"),
    "loc with 1 level": (lambda p: _bad(p, loc=p["loc"][:, :, :, :1].contiguous()),
                         r"sampling_locations must have shape .* = \[2, 5, 2, 2, 2, 2\].*got "
                         r"\[2, 5, 2, 1, 2, 2\]"),
    "loc last dim 3": (lambda p: _bad(p, loc=torch.zeros(2, 5, 2, 2, 2, 3, dtype=torch.float64)),
                       r"sampling_locations must have shape .*got \[2, 5, 2, 2, 2, 3\]"),
    "loc heads mismatch": (lambda p: _bad(p, loc=torch.zeros(2, 5, 3, 2, 2, 2,
                                                             dtype=torch.float64)),
                           r"sampling_locations must have shape .* = \[2, 5, 2, 2, 2, 2\]"),
    "loc batch mismatch": (lambda p: _bad(p, loc=p["loc"][:1].contiguous()),
                           r"sampling_locations must have shape .*got \[1, 5, 2, 2, 2, 2\]"),
    "attn points mismatch": (lambda p: _bad(p, attn=p["attn"][..., :1].contiguous()),
                             r"attention_weights must have shape .* = \[2, 5, 2, 2, 2\].*got "
                             r"\[2, 5, 2, 2, 1\]"),
    "attn 4-D": (lambda p: _bad(p, attn=p["attn"].flatten(3)),
                 r"attention_weights must be 5-D.*got shape \[2, 5, 2, 4\]"),
    "value non-contiguous": (lambda p: _bad(p, value=_non_contiguous(p["value"])),
                             r"value must be contiguous.*shape \[2, 16, 2, 3\]"),
    "loc non-contiguous": (lambda p: _bad(p, loc=_non_contiguous(p["loc"])),
                           r"sampling_locations must be contiguous"),
    "attn non-contiguous": (lambda p: _bad(p, attn=_non_contiguous(p["attn"])),
                            r"attention_weights must be contiguous"),
    "float16 on CPU": (lambda p: _bad(p, value=p["value"].half(), loc=p["loc"].half(),
                                      attn=p["attn"].half()),
                       r"CPU kernel supports float32 and float64; got value of dtype Half"),
    "value on meta": (lambda p: _bad(p, value=p["value"].to("meta")),
                      r"unsupported device meta"),
    "spatial_shapes on another device": (lambda p: _bad(p, spatial=p["spatial"].to("meta")),
                                         r"spatial_shapes is on meta but value is on cpu"),
    "17 levels": (lambda p: _bad(p, spatial=torch.ones(17, 2, dtype=torch.long),
                                 start=torch.arange(17)),
                  r"number of levels must be in \[1, 16\]"),
}


@pytest.mark.parametrize("name", list(BAD_FORWARD))
def test_bad_input_is_rejected(op, name):
    make_bad, message = BAD_FORWARD[name]
    p = make_bad(_base())
    args = (p["value"], p["spatial"], p["start"], p["loc"], p["attn"])
    with pytest.raises(RuntimeError, match=message):
        op.ms_deform_attn_forward(*args, 64)
    with pytest.raises(RuntimeError, match=message):
        op.ms_deform_attn_backward(*args, p["grad"], 64)


def test_bad_im2col_step_is_rejected(op):
    p = _base()
    with pytest.raises(RuntimeError, match=r"im2col_step must be >= 1; got 0"):
        op.ms_deform_attn_forward(p["value"], p["spatial"], p["start"], p["loc"], p["attn"], 0)


@pytest.mark.parametrize("grad,message", [
    (lambda g: g[:, :-1].contiguous(),
     r"grad_output must have shape \(N, Q, heads \* C\) = \[2, 5, 6\]; got \[2, 4, 6\]"),
    (lambda g: g.float(), r"grad_output has dtype Float but value has dtype Double"),
    (_non_contiguous, r"grad_output must be contiguous"),
    (lambda g: g.to("meta"), r"grad_output is on meta but value is on cpu"),
])
def test_bad_grad_output_is_rejected(op, grad, message):
    p = _base()
    with pytest.raises(RuntimeError, match=message):
        op.ms_deform_attn_backward(p["value"], p["spatial"], p["start"], p["loc"], p["attn"],
                                   grad(p["grad"]), 64)


# ---- CUDA ---------------------------------------------------------------------------------------
def _to(p, device, dtype=None):
    out = {}
    for k, v in p.items():
        v = v.to(device)
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v
    return out


@requires_gpu
@pytest.mark.parametrize("case", FIXED_CASES + [random_case(s) for s in range(3)],
                         ids=lambda c: str(c["shapes"]).replace(" ", ""))
def test_cuda_float64_matches_reference(cuda_op, case):
    p = make_problem(case["shapes"], case["batch"], case["heads"], case["channels"],
                     case["queries"], case["points"], seed=11, device="cuda")
    assert_matches(cuda_op, p)


@requires_gpu
@pytest.mark.parametrize("channels", [1, 3, 24, 32, 64, 96])
def test_cuda_channel_counts(cuda_op, channels):
    """Lane groups: C < 32 (power of two or not), C = 32 (one warp), C > 32 (several channels
    per lane)."""
    p = make_problem([(7, 6), (3, 3)], 2, 3, channels, 37, 3, seed=channels, device="cuda")
    assert_matches(cuda_op, p)


@requires_gpu
def test_cuda_mask2former_shapes_float32_vs_cpu_and_reference(cuda_op):
    shapes = [(32, 32), (16, 16), (8, 8)]
    p64 = make_problem(shapes, 2, M2F_HEADS, M2F_CHANNELS, 1344, M2F_POINTS, seed=12)
    p64["loc"] = away_from_kinks(local_locations(shapes, 2, M2F_HEADS, M2F_POINTS, seed=12),
                                 shapes)
    assert_matches(cuda_op, _to(p64, "cuda"))
    p32 = _to(p64, "cpu", torch.float32)
    cpu_out, cpu_grads = compiled(cuda_op, p32)
    gpu_out, gpu_grads = compiled(cuda_op, _to(p32, "cuda"))
    torch.testing.assert_close(gpu_out.cpu(), cpu_out, atol=1e-5, rtol=1e-5)
    for g, c in zip(gpu_grads, cpu_grads):
        torch.testing.assert_close(g.cpu(), c, atol=1e-4, rtol=1e-4)


@requires_gpu
def test_cuda_border_points(cuda_op):
    shapes = [(4, 8), (2, 2), (1, 4)]
    loc = _border_locations(shapes, 2, 3)
    p = make_problem(shapes, 2, 3, 6, loc.shape[1], 1, seed=13)
    p["loc"] = loc
    assert_matches(cuda_op, _to(p, "cuda"))


# Half precision: inputs are rounded to the low-precision dtype once; the float32 op on those same
# rounded inputs is the reference, so the difference is the kernels' own (float32 accumulation,
# one rounding of each result). Stated tolerance: max |error| <= TOL * max |reference| per tensor,
# TOL = 4e-3 for float16 (2^-11 unit roundoff, with margin) and 3e-2 for bfloat16 (2^-8).
HALF_TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_half_precision_vs_float32(cuda_op, dtype):
    shapes = [(32, 32), (16, 16), (8, 8)]
    p = make_problem(shapes, 2, M2F_HEADS, M2F_CHANNELS, 1344, M2F_POINTS, seed=14)
    p["loc"] = away_from_kinks(local_locations(shapes, 2, M2F_HEADS, M2F_POINTS, seed=14),
                               shapes)
    low = _to(p, "cuda", dtype)
    ref = _to(low, "cuda", torch.float32)  # the same rounded inputs, in float32
    out, grads = compiled(cuda_op, low)
    ref_out, ref_grads = compiled(cuda_op, ref)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    tol = HALF_TOLERANCE[dtype]
    for name, ours, want in zip(("output", "grad value", "grad loc", "grad attn"),
                                (out,) + grads, (ref_out,) + ref_grads):
        err = (ours.float() - want).abs().max().item()
        scale = want.abs().max().item()
        assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol} x {scale:.3g}"


@requires_gpu
def test_cuda_gradcheck(cuda_op):
    value, spatial, start, loc, attn = _gradcheck_inputs(21, device="cuda")

    def fn(v, l, a):
        return ms_deform_attn(v, spatial, start, l, a, 64)

    assert torch.autograd.gradcheck(fn, (value, loc, attn), eps=1e-6, atol=1e-6, rtol=1e-5)


@requires_gpu
def test_cuda_bad_input(cuda_op):
    p = _to(_base(), "cuda")
    with pytest.raises(RuntimeError, match=r"spatial_shapes is on cpu but value is on cuda"):
        cuda_op.ms_deform_attn_forward(p["value"], p["spatial"].cpu(), p["start"], p["loc"],
                                       p["attn"], 64)
    with pytest.raises(RuntimeError, match=r"sampling_locations is on cpu but value is on cuda"):
        cuda_op.ms_deform_attn_forward(p["value"], p["spatial"], p["start"], p["loc"].cpu(),
                                       p["attn"], 64)
    with pytest.raises(RuntimeError, match=r"level_start_index\[1\] = 11 but level 1 starts at "
                                           r"12"):
        cuda_op.ms_deform_attn_forward(p["value"], p["spatial"],
                                       p["start"] + torch.tensor([0, -1], device="cuda"),
                                       p["loc"], p["attn"], 64)
