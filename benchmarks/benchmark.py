#!/usr/bin/env python3
"""End-to-end benchmark: our detectron2 Mask2Former (with our MSDeformAttn op) against Hugging Face
transformers' Mask2Former, same architecture, same weights, same machine.

    .venv/bin/python benchmarks/benchmark.py --random-weights [--sizes 1024 320] [--iters 3] \
        [--warmup 1] [--train-iters 1] [--rounds 1] [--paired-iters 0] [--batches 1] \
        [--precisions fp32 bf16 fp16] [--train-precisions fp32 bf16 fp16] [--device auto] \
        [--config-file configs/capetown_swinS_1024.yaml] [--json results.json]

What is measured (batch 1, float32 inference; the model of --config-file, Swin-S, 4 classes):
  * weights (--random-weights, required to say so): a randomly initialised HF model of
    the config's architecture (plus N(0, 0.02) noise on every parameter, so no tensor is a
    trivial zero) is saved with save_pretrained and converted with tools/convert_hf_to_d2.py's
    code: both models run the same weights.
  * inference, per size: median latency over --iters timed runs after --warmup, images/s, peak
    memory, speedup (HF latency / ours), and agreement of the predictions (pixels with the same
    class, max |class/mask logit difference|). Timed: uint8 image tensor in, per-class score map
    out: ours is the full RooftopMaskFormer inference (normalise, pad, backbone, pixel decoder,
    transformer decoder, semantic inference); HF is normalise + Mask2FormerForUniversalSegmentation
    + the same semantic inference (rooftop_m2f.checkpoint.hf_reference.semantic_scores).
  * with --rounds R, per size: R rounds of fresh processes, ours and HF alternating (order
    swapped every round); the speed-up is the median of the rounds' ratios, so a drift of the
    machine's speed over minutes does not favour whichever ran at the better time.
  * with --paired-iters N, per size: both models in one process, timed in alternation (N
    pairs), the speed-up being the median of the per-pair ratios: on a shared machine whose
    speed drifts between minutes this is the steadier figure.
  * with --batches / --precisions, per size: every (batch, precision) pair, ours and HF; the
    batch is that many different synthetic tiles; bf16/fp16 run the model under torch.autocast
    of that dtype (ours with ROOFTOP.PIXEL_DECODER_AUTOCAST from --pixel-decoder-autocast), and
    each is compared with the same model in fp32 at the same batch: pixels with the same class,
    pixels with the same strongest query, speed-up. (1, fp32) is the table's plain row.
  * one training step per size: forward (losses) + backward + AdamW step, AMP (float16 autocast +
    GradScaler) on CUDA only; median of --train-iters after one warm-up step. --train-precisions
    fp32 / bf16 (autocast, no scaler) / fp16 (autocast + GradScaler) instead.
  On CUDA a worker process runs all (batch, precision) pairs of one model and size in turn
  (peak memory reset before each: torch's statistics are per pair); on the CPU every pair gets
  its own process (the resident-set peak is per process).
  * the data loader: RooftopSemanticDatasetMapper with the config's full augmentation on
    synthetic 1024x1024 tiles, in one process and in a torch DataLoader with --workers (3, the
    reference run's workers per GPU), against our training step rate (1 image per GPU).
Every variant runs in a fresh subprocess, one after the other, so that its peak memory is its
own: on CUDA torch.cuda.max_memory_allocated; on the CPU the process's peak resident set size
(VmHWM, reset just before the first measured run through /proc/self/clear_refs, after freed heap
memory was returned to the OS with malloc_trim), which includes the weights and the framework;
the growth over the loaded model is printed next to it.
"""
import argparse
import json
import os
import platform
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


# ---- small helpers -----------------------------------------------------------------------------
def set_threads(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


def synthetic_sample(size, index=0):
    """A deterministic synthetic rooftop tile: uint8 (3, S, S) tensor and int64 (S, S) mask."""
    import numpy as np
    import torch

    from capetown_synthetic import render_image

    image, mask = render_image(seed=11, split="val", index=index, size=size)
    return (torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
            torch.as_tensor(mask.astype(np.int64)))


def build_ours(args, device):
    import logging

    from detectron2.modeling import build_model

    from rooftop_m2f.engine.setup import build_cfg
    from rooftop_m2f.checkpoint.loading import load_model_weights

    logging.basicConfig(level=logging.WARNING)
    opts = ["MODEL.DEVICE", device, "MODEL.WEIGHTS", args.d2_weights,
            "ROOFTOP.MSDEFORM_ATTN_IMPL", args.msdeform_impl, "MODEL.SWIN.DROP_PATH_RATE", "0.0"]
    if args.pixel_decoder_autocast != "config":
        opts += ["ROOFTOP.PIXEL_DECODER_AUTOCAST", str(args.pixel_decoder_autocast == "on")]
    cfg = build_cfg(args.config_file, opts)
    model = build_model(cfg)
    load_model_weights(model, cfg)
    return cfg, model


def pixel_stats(args, device):
    """Our normalisation (MODEL.PIXEL_MEAN / PIXEL_STD of the config), (3, 1, 1) tensors."""
    import torch

    from rooftop_m2f.engine.setup import build_cfg

    cfg = build_cfg(args.config_file, ["MODEL.DEVICE", "cpu"])
    return (torch.tensor(cfg.MODEL.PIXEL_MEAN, device=device).view(-1, 1, 1),
            torch.tensor(cfg.MODEL.PIXEL_STD, device=device).view(-1, 1, 1))


def build_hf(args, device):
    from transformers import Mask2FormerForUniversalSegmentation

    model = Mask2FormerForUniversalSegmentation.from_pretrained(args.hf_dir).to(device)
    return model


# ---- workers (each in its own process) --------------------------------------------------------
PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


def autocast(device, precision):
    """The autocast context of a precision name ("fp32": autocast off)."""
    import torch

    dtype = PRECISIONS[precision]
    return torch.autocast(torch.device(device).type, dtype=getattr(torch, dtype or "float32"),
                          enabled=dtype is not None)


def make_runner(args, variant, device, image, captured, model=None):
    """(run, model): ``run(images, precision)`` maps a (B, 3, H, W) uint8 batch (or one
    (3, H, W) image) to (B, K, H, W) class scores with ``variant`` ("ours" or "hf") under the
    precision's autocast, and leaves the decoder's final class and mask logits in ``captured``."""
    from rooftop_m2f.checkpoint.hf_reference import semantic_scores

    if variant == "ours":
        import torch

        if model is None:
            _, model = build_ours(args, device)
            model.eval()
            model.sem_seg_head.register_forward_hook(
                lambda m, i, o: captured.update(cls=o["pred_logits"], masks=o["pred_masks"]))

        def run(images=image, precision="fp32"):
            images = images if images.dim() == 4 else images[None]
            size = tuple(images.shape[-2:])
            with autocast(device, precision):
                out = model([{"image": im, "height": size[0], "width": size[1]} for im in images])
            return torch.stack([o["sem_seg"] for o in out])
        return run, model
    mean, std = pixel_stats(args, device)
    if model is None:
        model = build_hf(args, device).eval()

    def run(images=image, precision="fp32"):
        images = images if images.dim() == 4 else images[None]
        with autocast(device, precision):
            x = (images.float() - mean) / std
            out = model(pixel_values=x)
            captured.update(cls=out.class_queries_logits, masks=out.masks_queries_logits)
            return semantic_scores(out.class_queries_logits, out.masks_queries_logits,
                                   tuple(images.shape[-2:]))
    return run, model


def synthetic_batch(size, batch, device):
    """``batch`` different synthetic tiles, (B, 3, S, S) uint8 on ``device``."""
    import torch

    return torch.stack([synthetic_sample(size, index=i)[0] for i in range(batch)]).to(device)


def config_key(batch, precision):
    """Key suffix of a (batch, precision) pair; "" for the plain (1, fp32)."""
    return "" if (batch, precision) == (1, "fp32") else f"_b{batch}_{precision}"


def worker_infer(args):
    """One model and size; every (batch, precision) pair of --batch-list x --precision-list in
    turn. Writes {config key: result} to args.out and each pair's outputs to
    ``<out><key>.pt``."""
    import torch

    from rooftop_m2f.modeling import msdeform

    device = args.device
    threads = set_threads(args)
    torch.set_grad_enabled(False)
    captured = {}
    run, model = None, None
    results = {}
    for batch in args.batch_list:
        images = synthetic_batch(args.size, batch, device)
        for precision in args.precision_list:
            if model is None:
                run, model = make_runner(args, args.variant, device, images, captured)
            msdeform.reset_impl_calls()
            memory = memory_start(device)
            times, cpu_times, scores = timed(lambda: run(images, precision), args.warmup,
                                             args.iters, device)
            memory_peak(device, memory)
            key = config_key(batch, precision)
            result = {"kind": "infer", "variant": args.variant, "size": args.size,
                      "batch": batch, "precision": precision, "times": times,
                      "median_s": statistics.median(times), "cpu_times": cpu_times,
                      "median_cpu_s": statistics.median(cpu_times), "threads": threads,
                      "memory": memory,
                      "msdeform_impl_calls": msdeform.impl_calls() if args.variant == "ours"
                      else {}}
            if args.variant == "ours":
                result["pixel_decoder_autocast"] = bool(
                    getattr(model.sem_seg_head.pixel_decoder, "rooftop_autocast", False))
            if args.variant == "hf":
                backbone_config = model.model.pixel_level_module.encoder.config
                result["hf_attn_implementation"] = getattr(backbone_config,
                                                           "_attn_implementation", None)
            masks = captured["masks"].float()
            torch.save({"pred": scores.argmax(1).to(torch.uint8).cpu(),
                        "owner": masks.argmax(1).to(torch.int16).cpu(),
                        "scores": scores[0].float().cpu(), "cls": captured["cls"].float().cpu(),
                        "masks": masks[0].cpu()}, args.out + key + ".pt")
            results[key] = result
            del scores, masks
            captured.clear()
    with open(args.out, "w") as f:
        json.dump(results, f)


def worker_paired(args):
    """Both models in one process, timed in alternation (ours, HF, HF, ours, ...), so that a
    machine that slows down or speeds up during the run (shared hosts do) affects both alike;
    the speed-up is the median of the per-pair ratios."""
    import torch

    device = args.device
    threads = set_threads(args)
    torch.set_grad_enabled(False)
    image, _ = synthetic_sample(args.size)
    image = image.to(device)
    runs = {v: make_runner(args, v, device, image, {})[0] for v in ("ours", "hf")}
    runs = {v: (lambda r=r: r(image)) for v, r in runs.items()}
    for _ in range(args.warmup):
        for run in runs.values():
            run()
    times = {v: [] for v in runs}
    cpu_times = {v: [] for v in runs}
    for i in range(args.iters):
        for variant in (("ours", "hf") if i % 2 == 0 else ("hf", "ours")):
            t, c, _ = timed(runs[variant], 0, 1, device)
            times[variant] += t
            cpu_times[variant] += c
    ratios = [h / o for h, o in zip(times["hf"], times["ours"])]
    cpu_ratios = [h / o for h, o in zip(cpu_times["hf"], cpu_times["ours"])]
    with open(args.out, "w") as f:
        json.dump({"kind": "paired", "size": args.size, "times": times, "cpu_times": cpu_times,
                   "ratios": ratios, "cpu_ratios": cpu_ratios,
                   "median_ratio": statistics.median(ratios),
                   "median_cpu_ratio": statistics.median(cpu_ratios), "threads": threads}, f)


def worker_paired_precision(args):
    """Our model in one process, fp32 and ``args.precision_list[0]`` timed in alternation
    (``args.iters`` pairs, order swapped every pair): the speed-up of the reduced precision is the
    median of the per-pair ratios, steady on a machine whose load changes from minute to minute."""
    import torch

    device = args.device
    threads = set_threads(args)
    torch.set_grad_enabled(False)
    precision = args.precision_list[0]
    images = synthetic_batch(args.size, args.batch_list[0], device)
    run, _ = make_runner(args, "ours", device, images, {})
    for _ in range(args.warmup):
        run(images, "fp32")
        run(images, precision)
    times = {"fp32": [], precision: []}
    cpu_times = {"fp32": [], precision: []}
    for i in range(args.iters):
        for p in (("fp32", precision) if i % 2 == 0 else (precision, "fp32")):
            t, c, _ = timed(lambda: run(images, p), 0, 1, device)
            times[p] += t
            cpu_times[p] += c
    ratios = [a / b for a, b in zip(times["fp32"], times[precision])]
    cpu_ratios = [a / b for a, b in zip(cpu_times["fp32"], cpu_times[precision])]
    with open(args.out, "w") as f:
        json.dump({"kind": "paired_precision", "size": args.size, "precision": precision,
                   "batch": args.batch_list[0], "times": times, "cpu_times": cpu_times,
                   "ratios": ratios, "cpu_ratios": cpu_ratios,
                   "median_ratio": statistics.median(ratios),
                   "median_cpu_ratio": statistics.median(cpu_ratios), "threads": threads}, f)


def worker_train(args):
    import torch

    from rooftop_m2f.data.mapper import instances_from_sem_seg

    device = args.device
    threads = set_threads(args)
    amp = device.startswith("cuda")
    image, mask = synthetic_sample(args.size)
    if args.variant == "ours":
        cfg, model = build_ours(args, device)
        model.train()
        batch = [{"image": image, "sem_seg": mask, "instances": instances_from_sem_seg(mask)}]

        def loss_fn():
            losses = model(batch)
            return sum(losses.values())
    else:
        mean, std = pixel_stats(args, device)
        model = build_hf(args, device)
        model.train()
        inst = instances_from_sem_seg(mask)
        labels = [inst.gt_classes.to(device)]
        masks = [inst.gt_masks.float().to(device)]
        img = image.to(device)

        def loss_fn():
            x = ((img.float() - mean) / std)[None]
            return model(pixel_values=x, mask_labels=masks, class_labels=labels).loss
    results = {}
    for precision in args.precision_list:
        # "amp": float16 autocast + GradScaler on CUDA, float32 on the CPU (the default).
        prec = ("fp16" if amp else "fp32") if precision == "amp" else precision
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        scaler = torch.amp.GradScaler("cuda", enabled=prec == "fp16" and amp)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, prec):
                loss = loss_fn()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            return float(loss.detach())

        memory = memory_start(device)
        times, cpu_times, loss = timed(step, 1, args.train_iters, device)
        memory_peak(device, memory)
        results["" if precision == "amp" else f"_{precision}"] = {
            "kind": "train", "variant": args.variant, "size": args.size, "times": times,
            "median_s": statistics.median(times), "cpu_times": cpu_times,
            "median_cpu_s": statistics.median(cpu_times), "threads": threads,
            "memory": memory, "amp": prec != "fp32", "precision": prec,
            "grad_scaler": scaler.is_enabled(), "loss": loss}
        del optimizer
    with open(args.out, "w") as f:
        json.dump(results, f)


def worker_loader(args):
    import torch

    from rooftop_m2f.data.capetown import load_split
    from rooftop_m2f.data.mapper import RooftopSemanticDatasetMapper
    from capetown_synthetic import make_synthetic_capetown
    from rooftop_m2f.engine.setup import build_cfg

    cfg = build_cfg(args.config_file, ["MODEL.DEVICE", "cpu"])
    root = os.path.join(args.scratch, "loader_data")
    make_synthetic_capetown(root, num_train=args.loader_images, num_val=0, num_test=0,
                            size=1024, seed=0)
    dicts = load_split(os.path.join(root, "train"))
    mapper = RooftopSemanticDatasetMapper(cfg, True)
    mapper(dicts[0])
    start = time.perf_counter()
    for d in dicts:
        mapper(d)
    single = len(dicts) / (time.perf_counter() - start)

    class Repeat(torch.utils.data.Dataset):
        def __len__(self):
            return args.loader_images * 4

        def __getitem__(self, i):
            return mapper(dicts[i % len(dicts)])

    loader = torch.utils.data.DataLoader(Repeat(), batch_size=1, num_workers=args.workers,
                                         collate_fn=lambda x: x, shuffle=False)
    it = iter(loader)
    for _ in range(args.workers):  # workers started and warm
        next(it)
    start = time.perf_counter()
    count = 0
    for _ in it:
        count += 1
    multi = count / (time.perf_counter() - start)
    aug = [type(a).__name__ for a in mapper.augmentations.augs]
    with open(args.out, "w") as f:
        json.dump({"kind": "loader", "single_process_img_s": single, "workers": args.workers,
                   "loader_img_s": multi, "images": count, "augmentations": aug}, f)


# ---- the orchestrator -------------------------------------------------------------------------
def machine_info(device):
    import detectron2
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "detectron2": detectron2.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    info["cpu"] = cpu_model()
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 2**20
    except OSError:
        pass
    info["memory_gb"] = round(mem, 1) if mem else None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    from rooftop_m2f.modeling.msdeform import describe_compiled_op

    info["msdeform_op"] = describe_compiled_op()
    return info


def run_worker(kind, args, scratch, **extra):
    tag = "_".join(str(v) for k in ("variant", "size", "batch_list", "precision_list")
                   for v in (extra[k] if isinstance(extra.get(k), list) else [extra.get(k, "")]))
    out = os.path.join(scratch, f"{kind}_{tag}.json")
    cmd = [sys.executable, HERE, "--worker", kind, "--out", out, "--scratch", scratch,
           "--config-file", args.config_file, "--device", args.device,
           "--hf-dir", args.hf_dir, "--d2-weights", args.d2_weights,
           "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--train-iters", str(args.train_iters), "--msdeform-impl", args.msdeform_impl,
           "--workers", str(args.workers), "--loader-images", str(args.loader_images),
           "--threads", str(args.threads)]
    cmd += ["--pixel-decoder-autocast", args.pixel_decoder_autocast]
    for key, value in extra.items():
        if isinstance(value, (list, tuple)):
            cmd += [f"--{key.replace('_', '-')}", *map(str, value)]
        else:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    result = run_json_worker(cmd, out, REPO, f"{kind} {extra}")
    wall = result.pop("process_wall_s")
    if kind in ("infer", "train"):  # {config key: result}
        for res in result.values():
            res["wall_s"] = wall
    else:
        result["wall_s"] = wall
    print(f"  [{kind} {extra.get('variant', '')} {extra.get('size', '')} "
          f"{extra.get('batch_list', '')} {extra.get('precision_list', '')}] done in "
          f"{wall:.0f} s", flush=True)
    return result, out


def agreement(ours_file, hf_file):
    """Agreement of two runs' saved outputs (``<file>.pt``): all images of the batch for the
    classes and the strongest query, the first image for the logit differences."""
    import torch

    a = torch.load(ours_file + ".pt", weights_only=True)
    b = torch.load(hf_file + ".pt", weights_only=True)
    # With random weights one class tends to win everywhere, which makes the class agreement
    # vacuous; which query's mask is strongest at each pixel (of 100, at 1/4 resolution) is not.
    owner_a, owner_b = a["owner"], b["owner"]
    return {"pixels": (a["pred"] == b["pred"]).float().mean().item(),
            "classes_predicted": sorted(set(a["pred"].unique().tolist())),
            "query_owner": (owner_a == owner_b).float().mean().item(),
            "owner_queries": len(owner_a[0].unique()),
            "max_class_logit_diff": (a["cls"] - b["cls"]).abs().max().item(),
            "max_mask_logit_diff": (a["masks"] - b["masks"]).abs().max().item(),
            "max_score_diff": (a["scores"] - b["scores"]).abs().max().item()}


def timing_row(size, name, res, hf):
    """One markdown row: time, images/s, CPU time, memory, and the speed-up against HF's."""
    speed = f"{hf['median_s'] / res['median_s']:.2f}x | {hf['median_cpu_s'] / res['median_cpu_s']:.2f}x"
    images = res.get("batch", 1)
    return (f"| {size}x{size} | {name} | {res['median_s']:.2f} s | {images / res['median_s']:.3f} | "
            f"{res['median_cpu_s']:.2f} s | {fmt_mb(res['memory']['peak_mb'])} "
            f"({growth(res['memory'])}) | {speed} |")


def fmt_mb(value):
    return "n/a" if value is None else f"{value:,.0f} MB"


def growth(memory):
    value = memory_growth_mb(memory)
    return "n/a" if value is None else f"+{value:,.0f} MB"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 320])
    parser.add_argument("--iters", type=int, default=3, help="timed inference runs per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed inference runs first")
    parser.add_argument("--train-iters", type=int, default=1,
                        help="timed training steps per variant (after one warm-up step)")
    parser.add_argument("--train-sizes", type=int, nargs="*", default=None,
                        help="sizes for the training step (default: --sizes; none: skip)")
    parser.add_argument("--workers", type=int, default=3, help="data loader workers")
    parser.add_argument("--loader-images", type=int, default=6,
                        help="distinct synthetic 1024 px tiles for the loader benchmark")
    parser.add_argument("--no-loader", action="store_true", help="skip the data loader part")
    parser.add_argument("--config-file", default=os.path.join(REPO, "configs",
                                                              "capetown_swinS_1024.yaml"))
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--msdeform-impl", default="auto", choices=["auto", "compiled", "pytorch"],
                        help="our MSDeformAttn implementation (ROOFTOP.MSDEFORM_ATTN_IMPL)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per model process (0: torch's default, all cores); "
                             "on a shared, loaded machine 1 gives the most stable comparison")
    parser.add_argument("--json", help="also write all results to this JSON file")
    # worker-only arguments
    parser.add_argument("--rounds", type=int, default=1,
                        help="inference: alternate fresh ours / HF processes this many times per "
                             "size; the speed-up is the median of the rounds' ratios")
    parser.add_argument("--paired-iters", type=int, default=0,
                        help="also time both models in one process, alternating, this many "
                             "pairs per size (the steadiest speed-up on a shared machine)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1],
                        help="inference batch sizes (different synthetic tiles)")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=list(PRECISIONS),
                        help="inference precisions: fp32, or bf16/fp16 autocast (each compared "
                             "with fp32 at the same batch when fp32 is listed)")
    parser.add_argument("--train-precisions", nargs="+", default=["amp"],
                        choices=["amp", *PRECISIONS],
                        help="training step precisions; amp (default): fp16 autocast + "
                             "GradScaler on CUDA, fp32 on the CPU")
    parser.add_argument("--pixel-decoder-autocast", default="on", choices=["on", "off", "config"],
                        help="ours: ROOFTOP.PIXEL_DECODER_AUTOCAST under bf16/fp16 (config: the "
                             "config file's value)")
    parser.add_argument("--paired-precision-iters", type=int, default=0,
                        help="also time our model in fp32 and each reduced precision of "
                             "--precisions in one process, alternating, this many pairs per size "
                             "(the steadiest bf16 speed-up on a shared machine)")
    parser.add_argument("--worker", choices=["infer", "paired", "paired_precision", "train",
                                             "loader"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=["ours", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    parser.add_argument("--d2-weights", help=argparse.SUPPRESS)
    parser.add_argument("--random-weights", action="store_true",
                        help="required: both models run the same random weights (see above)")
    parser.add_argument("--batch-list", type=int, nargs="+", default=[1], help=argparse.SUPPRESS)
    parser.add_argument("--precision-list", nargs="+", default=["fp32"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.worker and not args.random_weights:
        raise UsageError("benchmark.py compares both models on the same random weights (no "
                         "checkpoint is loaded): add --random-weights to say so")

    if args.worker:
        return {"infer": worker_infer, "paired": worker_paired, "train": worker_train,
                "paired_precision": worker_paired_precision,
                "loader": worker_loader}[args.worker](args)

    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    train_sizes = args.sizes if args.train_sizes is None else args.train_sizes
    info = machine_info(args.device)
    if info["transformers"] is None:
        raise SystemExit("transformers is not installed: pip install -r requirements-dev.txt")
    from rooftop_m2f.engine.setup import build_cfg
    from rooftop_m2f.checkpoint.hf_conversion import convert_hf_to_file
    from rooftop_m2f.checkpoint.hf_reference import save_random_hf_checkpoint

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rooftop_bench_") as scratch:
        args.hf_dir = os.path.join(scratch, "hf_model")
        args.d2_weights = os.path.join(scratch, "converted.pth")
        cfg = build_cfg(args.config_file, ["MODEL.DEVICE", "cpu"])
        print(f"Building a random HF model of {os.path.basename(args.config_file)} and converting "
              "it ...", flush=True)
        hf = save_random_hf_checkpoint(cfg, args.hf_dir, seed=0, noise=0.02)
        num_params = sum(p.numel() for p in hf.parameters())
        del hf
        convert_hf_to_file(args.hf_dir, args.d2_weights,
                           num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
                           config_file=args.config_file)
        swin = cfg.MODEL.SWIN
        results = {"machine": info, "params": num_params, "infer": {}, "train": {},
                   "arch": f"Swin embed {swin.EMBED_DIM}, depths {list(swin.DEPTHS)}, "
                           f"{cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES} classes, "
                           f"{cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES} queries"}
        configs = [(b, p) for b in args.batches for p in args.precisions]
        # CUDA: one process runs all pairs (peak memory reset per pair); CPU: one per pair.
        groups = ([configs] if args.device.startswith("cuda") else [[c] for c in configs])
        primary = config_key(*configs[0])
        for size in args.sizes:
            rounds = []
            for r in range(max(1, args.rounds)):
                files, medians = {}, {}
                for variant in (("ours", "hf") if r % 2 == 0 else ("hf", "ours")):
                    for group in groups:
                        res, out = run_worker(
                            "infer", args, scratch, variant=variant, size=size,
                            batch_list=sorted({b for b, _ in group}),
                            precision_list=[p for p in args.precisions
                                            if any(p == q for _, q in group)])
                        for key, value in res.items():
                            files[variant, key] = out + key
                            if r == 0:  # the table's row (time, memory) is the first round's
                                results["infer"][f"{variant}_{size}{key}"] = value
                        medians[variant] = res.get(primary, {}).get("median_s",
                                                                    medians.get(variant))
                if r == 0:
                    for batch, precision in configs:
                        key = config_key(batch, precision)
                        results["infer"][f"agreement_{size}{key}"] = agreement(
                            files["ours", key], files["hf", key])
                        base = config_key(batch, "fp32")
                        if precision == "fp32" or ("ours", base) not in files:
                            continue
                        for variant in ("ours", "hf"):
                            a = agreement(files[variant, base], files[variant, key])
                            a["speedup"] = (results["infer"][f"{variant}_{size}{base}"]["median_s"]
                                            / results["infer"][f"{variant}_{size}{key}"]["median_s"])
                            results["infer"][f"precision_{variant}_{size}{key}"] = a
                rounds.append({**medians, "ratio": medians["hf"] / medians["ours"]})
            results["infer"][f"rounds_{size}"] = rounds
            if args.paired_iters:
                paired_args = argparse.Namespace(**{**vars(args), "iters": args.paired_iters})
                results["infer"][f"paired_{size}"], _ = run_worker(
                    "paired", paired_args, scratch, size=size)
            if args.paired_precision_iters:
                pp_args = argparse.Namespace(**{**vars(args),
                                                "iters": args.paired_precision_iters})
                for precision in args.precisions:
                    if precision != "fp32":
                        results["infer"][f"paired_{precision}_{size}"], _ = run_worker(
                            "paired_precision", pp_args, scratch, variant="ours", size=size,
                            batch_list=[args.batches[0]], precision_list=[precision])
        train_groups = ([args.train_precisions] if args.device.startswith("cuda")
                        else [[p] for p in args.train_precisions])
        for size in train_sizes:
            for variant in ("ours", "hf"):
                for group in train_groups:
                    res, _ = run_worker("train", args, scratch, variant=variant, size=size,
                                        precision_list=group)
                    for key, value in res.items():
                        results["train"][f"{variant}_{size}{key}"] = value
        if not args.no_loader:
            results["loader"], _ = run_worker("loader", args, scratch)
    results["total_s"] = time.perf_counter() - started
    print()
    print(report(results, args, train_sizes))
    if args.json:
        from rooftop_m2f.fileio import write_text_atomic

        write_text_atomic(args.json, json.dumps(results, indent=2))
    return 0


def report(results, args, train_sizes):
    info = results["machine"]
    lines = []
    device = info.get("gpu") or f"{info['cpu']} ({info['cpu_count']} cores visible, torch "\
                                 f"threads {info['torch_threads']}, {info['memory_gb']} GB RAM)"
    lines.append(f"Machine: {device}; {info['platform']}")
    lines.append(f"Versions: Python {info['python']}, torch {info['torch']}, detectron2 "
                 f"{info['detectron2']}, transformers {info['transformers']}"
                 + (f", CUDA {info['cuda']}" if info.get("cuda") else ""))
    lines.append(f"Our MSDeformAttn op: {info['msdeform_op']}")
    lines.append(f"Model: {os.path.basename(args.config_file)} ({results['arch']} Mask2Former, "
                 f"{results['params'] / 1e6:.1f} M parameters), "
                 + ("batch 1, float32" if (args.batches, args.precisions) == ([1], ["fp32"])
                    else "batch and precision per row (plain rows: batch 1, float32)")
                 + "; weights: random "
                 "HF init + N(0, 0.02) noise, converted with tools/convert_hf_to_d2.py (same in both)")
    first = next(iter(results["infer"].values()), None)
    mem_method = first["memory"]["method"] if first else ""
    lines.append("")
    threads = first["threads"] if first else "?"
    lines.append(f"Inference ({threads} torch thread(s) per process; median of {args.iters} after "
                 f"{args.warmup} warm-up; memory: {mem_method}):")
    lines.append("| size | model | median latency | images/s | CPU time / image | peak memory "
                 "(growth over loaded model) | speed-up vs HF (latency) | (CPU time) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    configs = [(b, p) for b in args.batches for p in args.precisions]
    for size in args.sizes:
        for batch, precision in configs:
            key = config_key(batch, precision)
            ours = results["infer"][f"ours_{size}{key}"]
            hf = results["infer"][f"hf_{size}{key}"]
            impl = ",".join(sorted(ours["msdeform_impl_calls"])) or "?"
            extra = "" if not key else (
                f", batch {batch}, {precision}" + (" autocast" if precision != "fp32" else ""))
            pd = ("" if precision == "fp32" else
                  f", pixel decoder {'autocast' if ours.get('pixel_decoder_autocast') else 'fp32'}")
            for name, res in ((f"ours (detectron2, MSDeformAttn {impl}{pd}){extra}", ours),
                              (f"HF transformers (Swin attention: "
                               f"{hf.get('hf_attn_implementation')}){extra}", hf)):
                lines.append(timing_row(size, name, res, hf))
    rounds = [(size, results["infer"].get(f"rounds_{size}") or []) for size in args.sizes]
    if any(len(r) > 1 for _, r in rounds):
        lines.append("")
        lines.append("Alternating rounds of fresh processes (ours, HF, then HF, ours, ...): "
                     "speed-up = median of the rounds' ratios of median latencies:")
        for size, rs in rounds:
            ratios = ", ".join(f"{r['ratio']:.2f}x" for r in rs)
            ours = ", ".join(f"{r['ours']:.2f}" for r in rs)
            hf = ", ".join(f"{r['hf']:.2f}" for r in rs)
            median = statistics.median(r["ratio"] for r in rs)
            lines.append(f"  {size}x{size}: {median:.2f}x over {len(rs)} rounds ({ratios}); "
                         f"median latencies ours {ours} s, HF {hf} s")
    paired = [(size, results["infer"].get(f"paired_{size}")) for size in args.sizes]
    if any(p for _, p in paired):
        lines.append("")
        lines.append("Interleaved in one process (ours and HF alternating, same warm-up): "
                     "speed-up = median of the per-pair ratios HF time / our time:")
        for size, p in paired:
            if p:
                lines.append(f"  {size}x{size}: {p['median_ratio']:.2f}x latency, "
                             f"{p['median_cpu_ratio']:.2f}x CPU time over {len(p['ratios'])} "
                             f"pairs (range {min(p['ratios']):.2f}-{max(p['ratios']):.2f}); "
                             f"medians ours {statistics.median(p['times']['ours']):.2f} s, "
                             f"HF {statistics.median(p['times']['hf']):.2f} s")
    lines.append("")
    lines.append("Agreement (ours vs HF, final outputs):")
    for size, (batch, precision) in ((s, c) for s in args.sizes for c in configs):
        key = config_key(batch, precision)
        a = results["infer"][f"agreement_{size}{key}"]
        label = f"{size}x{size}" + (f" batch {batch} {precision}" if key else "")
        lines.append(f"  {label}: {a['pixels'] * 100:.4f}% of pixels same class (classes "
                     f"predicted {a['classes_predicted']}), {a['query_owner'] * 100:.4f}% "
                     f"same strongest query ({a['owner_queries']} queries win somewhere); "
                     f"max |class logit diff| "
                     f"{a['max_class_logit_diff']:.2e}, max |mask logit diff| "
                     f"{a['max_mask_logit_diff']:.2e}, max |class score diff| "
                     f"{a['max_score_diff']:.2e}")
    precision_rows = [(size, batch, precision, variant,
                       results["infer"].get(f"precision_{variant}_{size}"
                                            f"{config_key(batch, precision)}"))
                      for size in args.sizes for batch, precision in configs
                      for variant in ("ours", "hf")]
    if any(r[-1] for r in precision_rows):
        lines.append("")
        lines.append("Reduced precision vs fp32 (same model, same weights, same batch):")
        for size, batch, precision, variant, a in precision_rows:
            if a:
                lines.append(f"  {size}x{size} batch {batch} {precision} autocast, "
                             f"{'ours' if variant == 'ours' else 'HF'}: {a['speedup']:.2f}x the "
                             f"fp32 speed; {a['pixels'] * 100:.3f}% of pixels same class, "
                             f"{a['query_owner'] * 100:.3f}% same strongest query; max |class "
                             f"score diff| {a['max_score_diff']:.2e}")
    pp = [(size, p, results["infer"].get(f"paired_{p}_{size}")) for size in args.sizes
          for p in args.precisions]
    if any(r for *_, r in pp):
        lines.append("")
        lines.append("Ours, fp32 and reduced precision interleaved in one process: speed-up = "
                     "median of the per-pair ratios fp32 time / reduced-precision time:")
        for size, p, r in pp:
            if r:
                lines.append(f"  {size}x{size} batch {r['batch']} {p}: {r['median_ratio']:.2f}x "
                             f"latency, {r['median_cpu_ratio']:.2f}x CPU time over "
                             f"{len(r['ratios'])} pairs (range {min(r['ratios']):.2f}-"
                             f"{max(r['ratios']):.2f}); medians fp32 "
                             f"{statistics.median(r['times']['fp32']):.2f} s, {p} "
                             f"{statistics.median(r['times'][p]):.2f} s")
    if train_sizes:
        amp = next(iter(results["train"].values()))["amp"]
        lines.append("")
        amp_only = args.train_precisions == ["amp"]
        what = (f"AMP {'on (float16)' if amp else 'off (CPU)'}" if amp_only else
                "precision per row: fp32, bf16 autocast, fp16 autocast + GradScaler")
        lines.append(f"Training step (forward + backward + AdamW, {what}; "
                     f"median of {args.train_iters} after 1 warm-up):")
        lines.append("| size | model | step time | images/s | CPU time / step | peak memory "
                     "(growth) | speed-up vs HF (time) | (CPU time) |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for size in train_sizes:
            for precision in args.train_precisions:
                key = "" if precision == "amp" else f"_{precision}"
                ours = results["train"][f"ours_{size}{key}"]
                hf = results["train"][f"hf_{size}{key}"]
                label = "" if amp_only else f", {ours['precision']}"
                for name, res in ((f"ours{label}", ours), (f"HF transformers{label}", hf)):
                    lines.append(timing_row(size, name, res, hf))
    loader = results.get("loader")
    if loader:
        lines.append("")
        lines.append(f"Data loader (RooftopSemanticDatasetMapper, full augmentation "
                     f"{loader['augmentations']}, 1024x1024 synthetic tiles):")
        lines.append(f"  one process: {loader['single_process_img_s']:.2f} images/s; "
                     f"DataLoader with {loader['workers']} workers: "
                     f"{loader['loader_img_s']:.2f} images/s")
        key = f"ours_{1024}" if f"ours_{1024}" in results["train"] else None
        if key:
            step_rate = 1 / results["train"][key]["median_s"]
            ratio = loader["loader_img_s"] / step_rate
            lines.append(f"  our training step at 1024 here: {step_rate:.3f} images/s per device -> "
                         f"the loader delivers {ratio:.1f}x what the model consumes "
                         f"({'not the bottleneck' if ratio >= 1 else 'THE BOTTLENECK'}); it keeps "
                         f"up with any step rate below {loader['loader_img_s']:.1f} images/s per "
                         f"device ({loader['workers']} workers)")
    lines.append("")
    lines.append(f"Total benchmark time: {results['total_s']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(run(main))
