#!/usr/bin/env python
"""A tiny forward + backward of our MultiScaleDeformableAttention op, for compute-sanitizer
(tools/gpu_check.sh runs it under ``--tool memcheck`` and ``--tool racecheck``).

    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/msda_sanitizer_case.py

The compiled op is imported from ops/: through the virtualenv's .pth, or the PYTHONPATH that
tools/gpu_check.sh exports (repo root and ops/).

Every dtype the device's kernels take (CUDA: float64, float32, float16, bfloat16; CPU:
float64, float32), three levels of odd sizes, sampling points inside, on the border and outside
the maps (zero padding), batch 2 and more queries than one block holds, so that the kernels'
edge paths and the value-gradient atomics all run. Small enough that racecheck (slow) finishes
in seconds. Prints one line per dtype and exits 1 when an output is not finite.
"""
import argparse
import sys

import torch


def case(device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 9), (4, 5), (1, 3)]
    batch, heads, channels, points = 2, 2, 8, 3
    spatial = torch.tensor(shapes, dtype=torch.long)
    start = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    values = int(spatial.prod(1).sum())
    queries = 300  # more than one block of (query, head) pairs
    value = torch.randn(batch, values, heads, channels, generator=gen)
    # locations in [-0.2, 1.2]: inside, on the border and outside every level
    loc = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=gen) * 1.4 - 0.2
    attn = torch.rand(batch, queries, heads, len(shapes) * points, generator=gen).softmax(-1)
    attn = attn.view(batch, queries, heads, len(shapes), points)
    to = dict(device=device, dtype=dtype)
    return (value.to(**to), spatial.to(device), start.to(device), loc.to(**to), attn.to(**to),
            torch.randn(batch, queries, heads * channels, generator=gen).to(**to))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    import MultiScaleDeformableAttention as op

    dtypes = [torch.float64, torch.float32]
    if args.device == "cuda":
        dtypes += [torch.float16, torch.bfloat16]
    ok = True
    for dtype in dtypes:
        value, spatial, start, loc, attn, grad = case(args.device, dtype)
        out = op.ms_deform_attn_forward(value, spatial, start, loc, attn, 64)
        grads = op.ms_deform_attn_backward(value, spatial, start, loc, attn, grad, 64)
        if args.device == "cuda":
            torch.cuda.synchronize()
        finite = all(bool(t.float().isfinite().all()) for t in (out, *grads))
        ok &= finite
        print(f"{args.device} {str(dtype).replace('torch.', '')}: forward {tuple(out.shape)}, "
              f"backward {[tuple(g.shape) for g in grads]}, finite {finite}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
