#!/usr/bin/env python3
"""Ablation of the training options (docs/ADVANCED.md, "Training options"): the demo recipe
(configs/capetown_tiny_cpu.yaml on the synthetic dataset) alone and with each option, a few
seeds each; the validation macro foreground mIoU after the last iteration (mean and spread over
the seeds) and the wall time of each run.

    .venv/bin/python benchmarks/ablation.py                  # 300 iterations, 3 seeds, all options
    .venv/bin/python benchmarks/ablation.py --iters 100 --seeds 1 --options baseline ema

Every run is tools/train_net.py in its own process, into <output-dir>/<option>/seed<k>/; a run
whose result file exists is not run again (so an interrupted ablation continues). The synthetic
dataset is written to <output-dir>/datasets/capetown once (datasets/make_synthetic_capetown.py's
defaults). The table (Markdown) is printed and written to <output-dir>/ablation.md, the numbers
to <output-dir>/ablation.json. Not a test: it trains one run per option and seed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import cpu_model  # benchmarks/measure.py, beside this script

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "capetown_tiny_cpu.yaml"

# option name -> (what it sets, KEY VALUE overrides on top of the demo recipe)
OPTIONS = {
    "baseline": ("the demo recipe (poly LR, batch 4)", []),
    "ema": ("ROOFTOP.EMA.ENABLED True, DECAY 0.9998", ["ROOFTOP.EMA.ENABLED", "True"]),
    "label_smoothing": ("ROOFTOP.LABEL_SMOOTHING 0.1", ["ROOFTOP.LABEL_SMOOTHING", "0.1"]),
    "cosine": ("SOLVER.LR_SCHEDULER_NAME WarmupCosineLR",
               ["SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR"]),
    "layer_decay": ("ROOFTOP.LAYER_DECAY 0.75", ["ROOFTOP.LAYER_DECAY", "0.75"]),
    "grad_accum": ("SOLVER.IMS_PER_BATCH 2, ROOFTOP.GRAD_ACCUM_STEPS 2 (4 images per step)",
                   ["SOLVER.IMS_PER_BATCH", "2", "ROOFTOP.GRAD_ACCUM_STEPS", "2"]),
}
METRIC = "sem_seg/macro_fg_mIoU"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=300, help="SOLVER.MAX_ITER of each run")
    p.add_argument("--seeds", type=int, default=3, help="seeds per option (1, 2, ...)")
    p.add_argument("--options", nargs="+", default=list(OPTIONS), choices=list(OPTIONS))
    p.add_argument("--output-dir", default="output/ablation")
    return p.parse_args(argv)


def final_metric(run_dir):
    """The metric of the last evaluation in metrics.json."""
    value = None
    with open(os.path.join(run_dir, "metrics.json")) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                if METRIC in record:
                    value = record[METRIC]
    if value is None:
        raise RuntimeError(f"{run_dir}: no {METRIC} in metrics.json")
    return float(value)


def run_one(option, seed, iters, out, datasets_root):
    run_dir = out / option / f"seed{seed}"
    result_file = run_dir / "ablation_result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    if run_dir.exists():  # an interrupted run: start it again
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    overrides = ["OUTPUT_DIR", str(run_dir), "SEED", str(seed), "SOLVER.MAX_ITER", str(iters),
                 "TEST.EVAL_PERIOD", str(iters), "SOLVER.CHECKPOINT_PERIOD", str(iters),
                 "ROOFTOP.CHECK_DATASET", "False", *OPTIONS[option][1]]
    env = dict(os.environ, DETECTRON2_DATASETS=str(datasets_root))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file",
                           str(CONFIG), *overrides], cwd=REPO, env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"ablation.py: {option} seed {seed} failed (exit {proc.returncode}); see "
                 f"{run_dir}/log.txt\n{proc.stderr[-2000:]}")
    result = {"option": option, "seed": seed, "iters": iters, "metric": final_metric(run_dir),
              "wall_s": wall}
    result_file.write_text(json.dumps(result) + "\n")
    return result


def table(results, iters, seeds):
    lines = [f"| option | setting | macro fg mIoU, mean ± std over {seeds} seeds | per seed | "
             "wall time per run, s |", "|---|---|---|---|---|"]
    for option, runs in results.items():
        values = [r["metric"] for r in runs]
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        wall = statistics.mean(r["wall_s"] for r in runs)
        lines.append(f"| {option} | {OPTIONS[option][0]} | {mean:.4f} ± {std:.4f} | "
                     f"{', '.join(f'{v:.4f}' for v in values)} | {wall:.0f} |")
    lines.append("")
    lines.append(f"{iters} iterations per run, evaluated once at the end on the synthetic "
                 f"validation split; {cpu_model()}, {os.cpu_count()} cores, CPU only.")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output_dir).resolve()
    datasets_root = out / "datasets"
    subprocess.run([sys.executable, str(REPO / "datasets" / "make_synthetic_capetown.py"),
                    "--root", str(datasets_root / "capetown")], check=True)
    results = {}
    for option in args.options:
        results[option] = []
        for seed in range(1, args.seeds + 1):
            r = run_one(option, seed, args.iters, out, datasets_root)
            print(f"{option} seed {seed}: {METRIC} {r['metric']:.4f} in {r['wall_s']:.0f} s",
                  flush=True)
            results[option].append(r)
    text = table(results, args.iters, args.seeds)
    (out / "ablation.md").write_text(text + "\n")
    (out / "ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
