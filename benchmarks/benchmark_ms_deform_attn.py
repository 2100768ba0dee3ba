#!/usr/bin/env python3
"""Benchmark our compiled multi-scale deformable attention against Mask2Former's PyTorch reference.

Defaults: the pixel decoder of one 1024x1024 image: levels 128x128, 64x64, 32x32 (21,504 values,
and every value position is a query), 8 heads x 32 channels, 4 points, float32, batch 1.
Both implementations run in this process, interleaved repeat by repeat, forward (no grad) and
forward+backward (grad of value, locations and weights); the table gives the median time.

Peak memory:
  * CPU: a fresh subprocess per (implementation, pass) builds the inputs, runs a tiny warm-up,
    resets the kernel's resident-set high-water mark (writes 5 to /proc/self/clear_refs), runs the
    pass once and reports VmHWM - VmRSS(before): the peak resident memory the pass added on top
    of its inputs. glibc is told (MALLOC_MMAP_THRESHOLD_) to map every block >= 128 KiB and
    unmap it on free, so freed memory is not silently reused or kept.
  * CUDA: torch.cuda.max_memory_allocated() above the inputs, after reset_peak_memory_stats().
On CUDA the effective bandwidth (minimum bytes each pass must move: read every input once, write
every output once, divided by the median time) is also reported, as a fraction of the card's
peak (memory clock x bus width) and of its device-to-device copy bandwidth (--copy-bandwidth-gbs;
default: measured by the benchmark with a 1 GiB tensor copy, read + write bytes / time).
--dtypes runs several dtypes in one process (one table each; CUDA: all four, the CPU kernels:
float32/float64).

    .venv/bin/python benchmarks/benchmark_ms_deform_attn.py [--device cuda] [--locations uniform]
        [--dtypes float32,float16,bfloat16]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from measure import (  # benchmarks/measure.py, beside this script
    cpu_model,
    proc_status_kb,
    reset_peak_rss,
    synchronize,
)

IMPLS = ("ours", "reference")
PASSES = ("forward", "forward+backward")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--levels", default="128x128,64x64,32x32",
                    help="comma-separated HxW of the feature levels")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--channels", type=int, default=32, help="channels per head")
    ap.add_argument("--points", type=int, default=4)
    ap.add_argument("--queries", type=int, default=0, help="0: one per value position")
    ap.add_argument("--dtype", default="float32",
                    choices=["float32", "float64", "float16", "bfloat16"],
                    help="float16/bfloat16 need --device cuda (our CPU kernels are fp32/fp64)")
    ap.add_argument("--dtypes", default="",
                    help="comma-separated dtypes, one table each, in this process (overrides "
                         "--dtype; on the CPU float16/bfloat16 are skipped with a note)")
    ap.add_argument("--copy-bandwidth-gbs", type=float, default=0.0,
                    help="GPU device-to-device copy bandwidth, GB/s, for the '%% copy' column "
                         "(default: measured with a 1 GiB copy)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--locations", default="local", choices=["local", "uniform"],
                    help="local: each query's pixel centre plus N(0, 2 px) offsets per level, as "
                         "in the pixel decoder; uniform: anywhere in [0, 1] (cache-hostile)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--peak-bandwidth-gbs", type=float, default=0.0,
                    help="GPU peak memory bandwidth in GB/s (default: from the device)")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--_memory-child", nargs=2, metavar=("IMPL", "PASS"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ---- problem ---------------------------------------------------------------------------------------
def level_shapes(text):
    return [tuple(int(v) for v in level.split("x")) for level in text.split(",")]


def make_problem(args, device):
    shapes = level_shapes(args.levels)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    spatial = torch.tensor(shapes, dtype=torch.long)
    start = torch.cat([spatial.new_zeros(1), spatial.prod(1).cumsum(0)[:-1]])
    values = int(spatial.prod(1).sum())
    queries = args.queries or values
    n, m, c, levels, p = args.batch, args.heads, args.channels, len(shapes), args.points
    value = torch.randn(n, values, m, c, generator=gen)
    if args.locations == "local":
        refs = []
        for h, w in shapes:
            ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w,
                                    indexing="ij")
            refs.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], -1))
        ref = torch.cat(refs)
        ref = ref[torch.arange(queries) % ref.shape[0]]
        size_xy = spatial.flip(-1).float()
        offsets = 2.0 * torch.randn(n, queries, m, levels, p, 2, generator=gen)
        loc = ref[None, :, None, None, None, :] + offsets / size_xy[None, None, None, :, None, :]
    else:
        loc = torch.rand(n, queries, m, levels, p, 2, generator=gen)
    attn = torch.randn(n, queries, m, levels * p, generator=gen).softmax(-1)
    attn = attn.view(n, queries, m, levels, p)
    grad = torch.randn(n, queries, m * c, generator=gen)
    to = dict(device=device, dtype=dtype)
    return dict(value=value.to(**to), spatial=spatial.to(device), start=start.to(device),
                loc=loc.contiguous().to(**to), attn=attn.to(**to), grad=grad.to(**to),
                shapes=shapes, queries=queries)


def implementation(name):
    from rooftop_m2f import compat

    compat.apply()  # the compatibility shims, before mask2former is imported
    if name == "ours":
        from rooftop_m2f.modeling.msdeform import ms_deform_attn

        return lambda v, s, st, l, a: ms_deform_attn(v, s, st, l, a, 64)
    from mask2former.modeling.pixel_decoder.ops.functions.ms_deform_attn_func import (
        ms_deform_attn_core_pytorch,
    )
    return lambda v, s, st, l, a: ms_deform_attn_core_pytorch(v, s, l, a)


def run_pass(fn, prob, pass_name):
    """One forward, or one forward+backward; returns the output (and leaves .grad on inputs)."""
    if pass_name == "forward":
        with torch.no_grad():
            return fn(prob["value"], prob["spatial"], prob["start"], prob["loc"], prob["attn"])
    value, loc, attn = (prob[k].detach().requires_grad_() for k in ("value", "loc", "attn"))
    out = fn(value, prob["spatial"], prob["start"], loc, attn)
    out.backward(prob["grad"])
    return out, value.grad, loc.grad, attn.grad


# ---- peak memory -----------------------------------------------------------------------------------
def _status_kib(field):
    value = proc_status_kb(field)
    if value is None:
        raise RuntimeError(f"{field} not in /proc/self/status")
    return value


def memory_child(args):
    """Runs in a fresh process: peak resident memory added by one pass (bytes), as JSON."""
    impl_name, pass_name = args._memory_child
    fn = implementation(impl_name)
    tiny = argparse.Namespace(**{**vars(args), "levels": "4x4,2x2", "queries": 8, "batch": 1})
    run_pass(fn, make_problem(tiny, "cpu"), pass_name)  # load kernels, start the thread pool
    prob = make_problem(args, "cpu")
    import gc

    gc.collect()
    before = _status_kib("VmRSS")
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs)")
    result = run_pass(fn, prob, pass_name)
    peak = _status_kib("VmHWM")
    del result
    print(json.dumps({"peak_bytes": max(0, peak - before) * 1024}))


def cpu_peak_memory(args, impl_name, pass_name):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-child", impl_name, pass_name,
           "--levels", args.levels, "--batch", str(args.batch), "--heads", str(args.heads),
           "--channels", str(args.channels), "--points", str(args.points),
           "--queries", str(args.queries), "--dtype", args.dtype, "--locations", args.locations,
           "--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072",
               PYTHONWARNINGS="ignore")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]


def cuda_peak_memory(fn, prob, pass_name):
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = run_pass(fn, prob, pass_name)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del result
    return peak


# ---- machine ---------------------------------------------------------------------------------------
def gpu_peak_bandwidth(args):
    """Bytes/s; from --peak-bandwidth-gbs or the device's memory clock and bus width (x2: DDR)."""
    if args.peak_bandwidth_gbs:
        return args.peak_bandwidth_gbs * 1e9, "given"
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8, (
            f"{clock_khz / 1e3:.0f} MHz x {bus_bits} bit x 2")
    return 0.0, "unknown (pass --peak-bandwidth-gbs)"


def measured_copy_bandwidth(nbytes=2**30, repeats=10):
    """Device-to-device copy bandwidth, bytes/s: (read + write) bytes / median time of a copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def min_bytes(prob, pass_name):
    es = prob["value"].element_size()
    v, l, a = prob["value"].numel(), prob["loc"].numel(), prob["attn"].numel()
    o = prob["grad"].numel()
    forward = v + l + a + o  # read value, locations, weights; write output
    backward = (v + l + a + o) + (v + l + a)  # read them and grad_output; write three grads
    return es * (forward if pass_name == "forward" else forward + backward)


def machine_lines(args):
    from rooftop_m2f.modeling.msdeform import describe_compiled_op

    lines = [f"machine: {cpu_model()}, {os.cpu_count()} cores visible, torch threads "
             f"{torch.get_num_threads()}; {platform.platform()}",
             f"torch {torch.__version__} (CUDA {torch.version.cuda}); python "
             f"{platform.python_version()}",
             f"op: {describe_compiled_op()}"]
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                     f"sm_{props.major}{props.minor}, {props.multi_processor_count} SMs")
    else:
        lines.append("device: cpu")
    return lines


# ---- main ------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory_child:
        memory_child(args)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU visible to torch")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()] or [args.dtype]
    for dtype in dtypes:
        if dtype not in ("float32", "float64", "float16", "bfloat16"):
            sys.exit(f"--dtypes: unknown dtype {dtype!r}")
    if args.device == "cpu" and not [d for d in dtypes if d in ("float32", "float64")]:
        sys.exit("our CPU kernels are float32/float64; use --device cuda for float16/bfloat16")
    copy_bw = None
    if args.device == "cuda":
        copy_bw = (args.copy_bandwidth_gbs * 1e9, "given") if args.copy_bandwidth_gbs else (
            measured_copy_bandwidth(), "measured: 1 GiB device-to-device copy")
    tables = []
    for dtype in dtypes:
        if args.device == "cpu" and dtype in ("float16", "bfloat16"):
            print(f"{dtype}: skipped (our CPU kernels are float32/float64)\n")
            continue
        tables.append(run_dtype(argparse.Namespace(**{**vars(args), "dtype": dtype}), copy_bw))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            machine=machine_lines(args), args=vars(args),
            copy_bandwidth_gbs=copy_bw[0] / 1e9 if copy_bw else None,
            results=[row for table in tables for row in table]), indent=1, default=str))
    return 0


def run_dtype(args, copy_bw):
    """One table (both implementations, both passes) for args.dtype; returns its rows."""
    prob = make_problem(args, args.device)
    impls = {name: implementation(name) for name in IMPLS}
    for line in machine_lines(args):
        print(line)
    shapes = " + ".join(f"{h}x{w}" for h, w in prob["shapes"])
    print(f"problem: batch {args.batch}, levels {shapes} = {prob['value'].shape[1]} values, "
          f"{prob['queries']} queries, {args.heads} heads x {args.channels} channels, "
          f"{args.points} points, {args.dtype}, {args.locations} locations")

    # Same answer first (forward and the value gradient).
    ours = run_pass(impls["ours"], prob, "forward+backward")
    ref = run_pass(impls["reference"], prob, "forward+backward")
    names = ("output", "grad value", "grad loc", "grad attn")
    parts, jumps = [], 0
    for name, a, b in zip(names, ours, ref):
        diff = (a.float() - b.float()).abs()
        scale = b.float().abs().max().item() or 1.0
        far = diff > 1e-3 * scale
        if name == "grad loc":
            # The location gradient jumps where a point crosses a pixel boundary; the two
            # implementations round loc * W - 0.5 differently, so a point within rounding of a
            # boundary can land on either side. Report those separately.
            jumps = int(far.sum())
            diff = diff[~far]
        parts.append(f"{name} {diff.max().item() / scale if diff.numel() else 0.0:.1e}")
    print("max |ours - reference| / max |reference|: " + ", ".join(parts)
          + f"; {jumps} of {ours[2].numel()} location-gradient elements differ by more than "
          "1e-3 (points within rounding of a pixel boundary, where that gradient jumps)")
    del ours, ref

    times = {(i, p): [] for i in IMPLS for p in PASSES}
    for pass_name in PASSES:
        for _ in range(args.warmup):
            for name in IMPLS:
                run_pass(impls[name], prob, pass_name)
        for _ in range(args.repeats):
            for name in IMPLS:  # interleaved, so load changes hit both alike
                synchronize(args.device)
                t0 = time.perf_counter()
                result = run_pass(impls[name], prob, pass_name)
                synchronize(args.device)
                times[name, pass_name].append(time.perf_counter() - t0)
                del result

    memory = {}
    if not args.no_memory:
        for name in IMPLS:
            for pass_name in PASSES:
                memory[name, pass_name] = (
                    cpu_peak_memory(args, name, pass_name) if args.device == "cpu"
                    else cuda_peak_memory(impls[name], prob, pass_name))

    bandwidth, bw_source = (gpu_peak_bandwidth(args) if args.device == "cuda" else (0.0, ""))
    header = f"{'pass':<18}{'implementation':<16}{'median ms':>11}{'peak MB':>10}"
    if args.device == "cuda":
        header += f"{'GB/s':>9}{'% peak':>8}{'% copy':>8}"
    print()
    print(header)
    print("-" * len(header))
    results = []
    for pass_name in PASSES:
        for name in IMPLS:
            med = statistics.median(times[name, pass_name])
            mb = memory.get((name, pass_name), float("nan")) / 2**20
            line = f"{pass_name:<18}{name:<16}{med * 1e3:>11.1f}{mb:>10.1f}"
            row = dict(pass_=pass_name, impl=name, median_ms=med * 1e3, peak_mb=mb,
                       times_ms=[t * 1e3 for t in times[name, pass_name]])
            if args.device == "cuda":
                gbs = min_bytes(prob, pass_name) / med / 1e9
                frac = gbs * 1e9 / bandwidth if bandwidth else float("nan")
                copy_frac = gbs * 1e9 / copy_bw[0]
                line += f"{gbs:>9.0f}{100 * frac:>7.1f}%{100 * copy_frac:>7.1f}%"
                row.update(effective_gbs=gbs, fraction_of_peak=frac,
                           fraction_of_copy=copy_frac, min_bytes=min_bytes(prob, pass_name))
            row["dtype"] = args.dtype
            print(line)
            results.append(row)
        t_ours = statistics.median(times["ours", pass_name])
        t_ref = statistics.median(times["reference", pass_name])
        ratio = f"{pass_name:<18}{'ref / ours':<16}{t_ref / t_ours:>10.1f}x"
        if memory:
            ratio += f"{memory['reference', pass_name] / max(memory['ours', pass_name], 1):>9.1f}x"
        print(ratio)
    print()
    print(f"time: median of {args.repeats} runs after {args.warmup} warm-up, the two "
          "implementations interleaved in this process.")
    if args.device == "cpu":
        print("peak MB: peak resident-set growth above the inputs during one pass, each in a "
              "fresh subprocess (/proc/self/clear_refs + VmHWM; glibc mmap threshold 128 KiB so "
              "freed blocks are returned to the OS).")
    else:
        print("peak MB: torch.cuda.max_memory_allocated() above the inputs during one pass. "
              f"GB/s: minimum bytes moved (each input read once, each output written once) / "
              f"median time; peak bandwidth {bandwidth / 1e9:.0f} GB/s ({bw_source}); "
              f"copy bandwidth {copy_bw[0] / 1e9:.0f} GB/s ({copy_bw[1]}).")
    print()
    return results


if __name__ == "__main__":
    sys.exit(main())
