#!/usr/bin/env python3
"""The exported model on ONNX Runtime against our PyTorch CPU path, side by side in one run.

    .venv/bin/python benchmarks/benchmark_onnx.py --random-weights [--sizes 1024 320] \\
        [--threads 1 2] [--iters 3] [--warmup 1] [--variants pytorch-fp32 onnxruntime] \\
        [--config-file configs/capetown_swinS_1024.yaml] [--json results.json]

What is measured (Swin-S Mask2Former of --config-file, 4 classes, batch 1, on the CPU):
  * weights (--random-weights, required to say so): a randomly initialised Hugging Face model of
    the config's architecture (plus N(0, 0.02) noise) converted with tools/convert_hf_to_d2.py's
    code, as benchmarks/benchmark.py does; every variant runs these weights;
  * per window size S (ROOFTOP.TILE.SIZE S, no ROOFTOP.INPUT_SIZE: the model sees S x S), the
    model exported with tools/export_onnx.py's code (the export time is printed);
  * per size and thread count, the variants of --variants (default all three; pytorch-fp32, the
    reference, always runs), each in its own process: "pytorch-fp32"
    (RooftopPredictor, our compiled MSDeformAttn op), "pytorch-bf16" (the same under
    torch.autocast bfloat16 with ROOFTOP.PIXEL_DECODER_AUTOCAST True) and "onnxruntime"
    (OnnxPredictor, CPUExecutionProvider, a process that never imports torch). Timed: a uint8
    RGB synthetic window in, (K, S, S) float32 scores out, preprocessing included; median of
    --iters after --warmup; windows/s = 1 / median; peak memory = the process's peak resident
    set (VmHWM, reset before the first timed run) and its growth over the loaded model;
  * agreement with pytorch-fp32: pixels of the same class, max |score difference| over the
    window's largest score (random weights tend to predict one class everywhere: the score
    difference is the telling figure).
The variants' order alternates between thread counts, so a drift of the machine's speed
does not favour one.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from measure import (  # benchmarks/measure.py, beside this script
    cpu_model,
    memory_growth_mb,
    memory_peak,
    memory_start,
    run_json_worker,
    timed,
)
from rooftop_m2f.cli import UsageError, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)
VARIANTS = ("pytorch-fp32", "pytorch-bf16", "onnxruntime")


def synthetic_window(size):
    from capetown_synthetic import render_image

    return render_image(seed=11, split="val", index=0, size=size)[0]


def torch_cfg(args, precision):
    from rooftop_m2f.engine import build_cfg

    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", args.d2_weights, "ROOFTOP.TILE.SIZE",
            str(args.size), "ROOFTOP.INPUT_SIZE", "0", "MODEL.SWIN.DROP_PATH_RATE", "0.0"]
    if precision == "bf16":
        opts += ["ROOFTOP.PIXEL_DECODER_AUTOCAST", "True"]
    return build_cfg(args.config_file, opts)


# ---- workers (each in its own process) ----------------------------------------------------------
def worker_export(args):
    import logging

    from rooftop_m2f.export.onnx_export import export_onnx

    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    written = export_onnx(torch_cfg(args, "fp32"), args.onnx_dir, overwrite=True)
    result = {"export_s": time.perf_counter() - start, "max_abs_diff": written["max_abs_diff"],
              "model_mb": os.path.getsize(written["model"]) / 2**20}
    with open(args.out, "w") as f:
        json.dump(result, f)


def worker_infer(args):
    import logging

    import numpy as np

    logging.basicConfig(level=logging.WARNING)
    window = synthetic_window(args.size)
    if args.variant == "onnxruntime":
        from rooftop_m2f.export.onnx_runtime import OnnxPredictor

        predictor = OnnxPredictor(os.path.join(args.onnx_dir, "model.onnx"), threads=args.threads,
                                  providers=["CPUExecutionProvider"])

        def score():
            return predictor.scores(window)
    else:
        import contextlib

        import torch

        from rooftop_m2f.inference.predictor import RooftopPredictor

        torch.set_num_threads(args.threads)
        precision = args.variant.split("-")[1]
        predictor = RooftopPredictor(torch_cfg(args, precision))
        context = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                   else contextlib.nullcontext())

        def score():
            with context:
                return predictor.scores(window).numpy()
    memory = memory_start("cpu")
    times, cpu_times, scores = timed(score, args.warmup, args.iters, "cpu")
    memory_peak("cpu", memory)
    np.save(args.out + ".npy", np.asarray(scores, dtype=np.float32))
    result = {"variant": args.variant, "size": args.size, "threads": args.threads,
              "times": times, "median_s": statistics.median(times),
              "median_cpu_s": statistics.median(cpu_times), "memory": memory,
              "imports_torch": "torch" in sys.modules}
    with open(args.out, "w") as f:
        json.dump(result, f)


# ---- the orchestrator ---------------------------------------------------------------------------
def run_worker(args, scratch, kind, **extra):
    tag = "_".join(f"{k}{v}" for k, v in extra.items() if k != "onnx_dir")
    out = os.path.join(scratch, f"{kind}_{tag}.json")
    cmd = [sys.executable, HERE, "--worker", kind, "--out", out, "--config-file", args.config_file,
           "--d2-weights", args.d2_weights, "--iters", str(args.iters),
           "--warmup", str(args.warmup)]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    env_threads = str(extra.get("threads", 2))
    os.environ["OMP_NUM_THREADS"] = env_threads  # the worker's OpenMP pool (torch)
    result = run_json_worker(cmd, out, REPO, f"{kind} {extra}")
    print(f"  [{kind} {' '.join(f'{k}={v}' for k, v in extra.items())}] "
          f"{result['process_wall_s']:.0f} s", flush=True)
    return result, out


def agreement(reference_file, other_file):
    import numpy as np

    a = np.load(reference_file + ".npy")
    b = np.load(other_file + ".npy")
    classes = a.argmax(0)
    return {"same_class": float((classes == b.argmax(0)).mean()),
            "classes": sorted(set(np.unique(classes).tolist())),
            "max_rel_score_diff": float(np.abs(a - b).max() / np.abs(a).max())}


def fmt_mb(memory):
    growth = memory_growth_mb(memory)
    peak = memory.get("peak_mb")
    if peak is None:
        return "n/a"
    return f"{peak:,.0f} MB" + (f" (+{growth:,.0f})" if growth is not None else "")


def report(results, info, variants):
    lines = [f"Machine: {info['cpu']}, {info['cpu_count']} cores visible (shared with other "
             f"work), Python {info['python']}, torch {info['torch']}, onnxruntime "
             f"{info['onnxruntime']}; Swin-S random converted weights, batch 1, CPU.", ""]
    for size, entry in results["sizes"].items():
        lines.append(f"{size}x{size} windows: export {entry['export']['export_s']:.0f} s, "
                     f"model {entry['export']['model_mb']:.0f} MB, export check max |diff| "
                     f"{entry['export']['max_abs_diff']:.2g}")
    lines += ["", "| window | threads | variant | median latency | windows/s | peak RSS (growth) "
                  "| fp32 latency / this | same class vs fp32 | max rel score diff |",
              "|---|---|---|---|---|---|---|---|---|"]
    for size, entry in results["sizes"].items():
        for threads, runs in entry["runs"].items():
            base = runs["pytorch-fp32"]["median_s"]
            for variant in variants:
                r = runs[variant]
                agree = r.get("agreement", {})
                lines.append(
                    f"| {size} | {threads} | {variant} | {r['median_s']:.3f} s | "
                    f"{1 / r['median_s']:.2f} | {fmt_mb(r['memory'])} | "
                    f"{base / r['median_s']:.2f}x | "
                    + (f"{agree['same_class']:.4%} | {agree['max_rel_score_diff']:.1e} |"
                       if agree else "- | - |"))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default=os.path.join(REPO, "configs",
                                                              "capetown_swinS_1024.yaml"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 320])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="what to run (default all); pytorch-fp32, the reference, always runs")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--random-weights", action="store_true",
                        help="required: every variant runs the same random weights (see above)")
    parser.add_argument("--worker", choices=["export", "infer"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--d2-weights", help=argparse.SUPPRESS)
    parser.add_argument("--onnx-dir", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.threads = args.threads[0]
        return {"export": worker_export, "infer": worker_infer}[args.worker](args)
    if not args.random_weights:
        raise UsageError("benchmark_onnx.py runs random weights (no checkpoint is loaded): add "
                         "--random-weights to say so")
    import platform

    import onnxruntime
    import torch

    from rooftop_m2f.checkpoint.hf_conversion import convert_hf_to_file
    from rooftop_m2f.checkpoint.hf_reference import save_random_hf_checkpoint
    from rooftop_m2f.engine import build_cfg

    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}
    started = time.perf_counter()
    results = {"machine": info, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="rooftop_onnx_bench_") as scratch:
        hf_dir = os.path.join(scratch, "hf_model")
        args.d2_weights = os.path.join(scratch, "converted.pth")
        cfg = build_cfg(args.config_file, ["MODEL.DEVICE", "cpu"])
        print(f"Building a random HF model of {os.path.basename(args.config_file)} and converting "
              "it ...", flush=True)
        save_random_hf_checkpoint(cfg, hf_dir, seed=0, noise=0.02)
        convert_hf_to_file(hf_dir, args.d2_weights, num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
                           config_file=args.config_file)
        variants = [v for v in VARIANTS if v == "pytorch-fp32" or v in args.variants]
        order = list(variants)
        for size in args.sizes:
            onnx_dir = os.path.join(scratch, f"onnx_{size}")
            export, _ = run_worker(args, scratch, "export", size=size, onnx_dir=onnx_dir)
            entry = results["sizes"][size] = {"export": export, "runs": {}}
            for threads in args.threads:
                runs, files = {}, {}
                for variant in order:
                    runs[variant], files[variant] = run_worker(
                        args, scratch, "infer", size=size, threads=threads, variant=variant,
                        onnx_dir=onnx_dir)
                for variant in variants[1:]:
                    runs[variant]["agreement"] = agreement(files["pytorch-fp32"], files[variant])
                entry["runs"][threads] = runs
                order.reverse()
    results["total_s"] = time.perf_counter() - started
    text = report(results, info, variants)
    print("\n" + text)
    print(f"\nTotal {results['total_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
