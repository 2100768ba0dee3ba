"""The training options (README "Training options"): EMA, early stopping, gradient
accumulation, label smoothing, cosine and layer-wise LR, profiling. Toy models and fake
trainers in-process; one short tools/train_net.py run for EMA + early stopping + accumulation
end to end."""
import copy
import csv
import glob
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import EventStorage

from conftest import TINY_CONFIG, tool_in_process, train
from rooftop_m2f.cli import ConfigError
from rooftop_m2f.config import get_rooftop_cfg
from rooftop_m2f.checkpoint.saving import AtomicDetectionCheckpointer
from rooftop_m2f.engine.epochs import images_per_step, iters_per_epoch_for
from rooftop_m2f.engine.optimizer import _with_full_model_clipping, param_groups
from rooftop_m2f.engine.training_options import (
    AccumulatingTrainer,
    EarlyStopped,
    EarlyStopping,
    ModelEMA,
    ProfileIterations,
    check_training_options,
    stopped_run_message,
)


class Toy(torch.nn.Module):
    """Linear regression with a float and an integer buffer; forward returns its loss."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2).double()
        self.register_buffer("scale", torch.ones(2, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def forward(self, batch):
        x = torch.stack([b["x"] for b in batch])
        y = torch.stack([b["y"] for b in batch])
        return {"loss_mse": ((self.linear(x) * self.scale - y) ** 2).mean()}


# --- 1. EMA -------------------------------------------------------------------------------------

def test_ema_update_follows_the_warmed_up_decay():
    model = Toy()
    ema = ModelEMA(model, decay=0.5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for t in range(4):
        with torch.no_grad():
            model.linear.weight.add_(1.0 + t)
            model.scale.mul_(2.0)
            model.count.add_(1)
        d = min(0.5, (1 + t) / (10 + t))  # 0.1, 2/11, 3/12, 4/13
        assert ema.decay_at(t) == pytest.approx(d)
        ema.update()
        for k, v in model.state_dict().items():
            expected[k] = d * expected[k] + (1 - d) * v if v.is_floating_point() else v.clone()
    for k, v in expected.items():
        assert torch.allclose(ema.weights[k], v, rtol=0, atol=1e-12), k
    assert int(ema.weights["count"]) == 4 and ema.updates == 4
    assert ModelEMA(model, 0.9998).decay_at(10**6) == pytest.approx(0.9998)  # capped


def test_ema_swapped_in_evaluates_ema_and_restores_raw():
    model = Toy()
    ema = ModelEMA(model, 0.9)
    with torch.no_grad():
        model.linear.weight.add_(5.0)
    raw = copy.deepcopy(model.state_dict())
    with ema.swapped_in():
        assert torch.equal(model.linear.weight, ema.weights["linear.weight"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, raw[k])


def _trained_ema(model, steps=7):
    ema = ModelEMA(model, 0.99)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        ema.update()
    return ema


@pytest.mark.parametrize("name", ["model_0000006", "model_final",
                                  "model_best_iter=0000007_valid_macro_fg_mIoU=0.5000"])
def test_ema_state_resumes_bit_identical(tmp_path, name):
    model = Toy()
    ema = _trained_ema(model)
    saver = AtomicDetectionCheckpointer(model, str(tmp_path))
    saver.add_checkpointable("ema", ema)
    saver.save(name, iteration=6)
    data = torch.load(tmp_path / f"{name}.pth", map_location="cpu", weights_only=True)
    if name == "model_0000006":  # periodic: raw weights under "model", the EMA's in "ema"
        assert "model_raw" not in data and torch.equal(data["model"]["linear.weight"],
                                                       model.linear.weight)
    else:  # what users take away: the EMA weights under "model", the raw ones beside
        assert torch.equal(data["model"]["linear.weight"], ema.weights["linear.weight"])
        assert torch.equal(data["model_raw"]["linear.weight"], model.linear.weight)
        assert not torch.equal(data["model"]["linear.weight"], data["model_raw"]["linear.weight"])

    fresh = Toy()
    fresh_ema = ModelEMA(fresh, 0.99)
    loader = AtomicDetectionCheckpointer(fresh, str(tmp_path))
    loader.add_checkpointable("ema", fresh_ema)
    loader.load(str(tmp_path / f"{name}.pth"))
    assert fresh_ema.loaded and fresh_ema.updates == ema.updates == 7
    for k in ema.weights:
        assert torch.equal(fresh_ema.weights[k], ema.weights[k]), k  # bit-identical
        assert torch.equal(fresh.state_dict()[k], model.state_dict()[k]), k  # raw model back
    # and both go on identically
    with torch.no_grad():
        model.linear.weight.add_(1.0)
        fresh.linear.weight.add_(1.0)
    ema.update()
    fresh_ema.update()
    assert all(torch.equal(fresh_ema.weights[k], ema.weights[k]) for k in ema.weights)


# --- 2. early stopping ---------------------------------------------------------------------------

class FakeCheckpointer:
    def __init__(self, hook):
        self.saved, self.hook = [], hook

    def save(self, name, **kwargs):
        self.saved.append((name, kwargs, dict(self.hook.state_dict())))


class FakeTrainer:
    def __init__(self, max_iter):
        self.iter = 0
        self.max_iter = max_iter
        self.storage = EventStorage(0)


def test_early_stopping_stops_at_the_expected_evaluation():
    metric = "sem_seg/macro_fg_mIoU"
    hook = EarlyStopping(None, metric, patience=3, min_delta=0.02, eval_period=10)
    hook.checkpointer = FakeCheckpointer(hook)
    hook.trainer = trainer = FakeTrainer(max_iter=1000)
    # evaluations 1..: best 0.30 at evaluation 2; 0.31 and 0.315 are not better by > 0.02
    planted = [0.10, 0.30, 0.31, 0.315, 0.29, 0.9]
    stopped_at = None
    for i in range(0, 60):
        trainer.iter = trainer.storage.iter = i
        if (i + 1) % 10 == 0:
            trainer.storage.put_scalar(metric, planted[(i + 1) // 10 - 1], smoothing_hint=False)
        try:
            hook.after_step()
        except EarlyStopped as e:
            stopped_at, reason = i + 1, str(e)
            break
    assert stopped_at == 50  # evaluation 5: the third in a row without improvement
    assert hook.stopped and hook.best == pytest.approx(0.30) and hook.best_evaluation == 2
    assert "after evaluation 5 (iteration 50)" in reason
    assert "was evaluation 2 (iteration 20)" in reason and "PATIENCE=3" in reason
    (name, kwargs, state), = hook.checkpointer.saved
    assert name == "model_final" and kwargs == {"iteration": 49} and state["stopped"]
    # --resume of that run: one line, from the checkpoint's trainer state
    message = stopped_run_message({"trainer": {"hooks": {"EarlyStopping": state}}}, "m.pth")
    assert message.startswith("m.pth: this run was ended by early stopping") and "\n" not in message
    assert stopped_run_message({"trainer": {"hooks": {}}}, "m.pth") is None


def test_early_stopping_state_survives_a_resume():
    hook = EarlyStopping(None, "m", patience=2, min_delta=0.0, eval_period=1)
    assert not hook.observe(1, 0.5) and not hook.observe(2, 0.4)
    resumed = EarlyStopping(None, "m", patience=2, min_delta=0.0, eval_period=1)
    resumed.load_state_dict(copy.deepcopy(hook.state_dict()))
    assert resumed.observe(3, 0.45)  # the second evaluation in a row without improvement


# --- 3. gradient accumulation -----------------------------------------------------------------

def _samples(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(3, generator=gen, dtype=torch.float64),
             "y": torch.randn(2, generator=gen, dtype=torch.float64)} for _ in range(n)]


def _one_step(trainer_cls, batches, **kwargs):
    torch.manual_seed(0)
    model = Toy()
    # whole-model gradient clipping, as the recipes use: clipped once per optimizer step
    optimizer = _with_full_model_clipping(torch.optim.SGD, 0.05)(model.parameters(), lr=0.5)
    trainer = trainer_cls(model, iter(batches), optimizer, **kwargs)
    with EventStorage(0):
        for step in range(2):
            trainer.iter = step
            trainer.run_step()
    return model


def test_two_accumulated_batches_of_2_equal_one_batch_of_4():
    data = _samples(8)
    big = _one_step(SimpleTrainer, [data[0:4], data[4:8]])
    accumulated = _one_step(AccumulatingTrainer, [data[0:2], data[2:4], data[4:6], data[6:8]],
                            accum_steps=2)
    no_accumulation = _one_step(SimpleTrainer, [data[0:2], data[2:4]])
    for (name, a), b, c in zip(big.named_parameters(), accumulated.parameters(),
                               no_accumulation.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name
        assert not torch.allclose(a, c, rtol=0, atol=1e-6), name  # the test can fail


def test_the_amp_trainer_accumulates_the_same_way():
    """AMPTrainer's subclass: scaled backward per micro-step, one scaler step (here the scaler
    and autocast are inactive, as on a machine without CUDA, so the result is exact)."""
    import warnings

    from rooftop_m2f.engine.training_options import AccumulatingAMPTrainer

    data = _samples(8)
    big = _one_step(SimpleTrainer, [data[0:4], data[4:8]])
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast("cuda") without CUDA: disabled, with a warning
        accumulated = _one_step(AccumulatingAMPTrainer, [data[0:2], data[2:4], data[4:6], data[6:8]],
                                accum_steps=2, grad_scaler=scaler, precision=torch.float16)
    for a, b in zip(big.parameters(), accumulated.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_accumulation_syncs_ddp_gradients_only_on_the_last_micro_step(tmp_path, monkeypatch):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        calls = []
        original = DistributedDataParallel.no_sync

        def counting_no_sync(self):
            calls.append(1)
            return original(self)

        monkeypatch.setattr(DistributedDataParallel, "no_sync", counting_no_sync)
        torch.manual_seed(0)
        model = DistributedDataParallel(Toy())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        data = _samples(6)
        trainer = AccumulatingTrainer(model, iter([data[0:2], data[2:4], data[4:6]]), optimizer,
                                      accum_steps=3)
        with EventStorage(0):
            trainer.run_step()
        assert len(calls) == 2  # micro-steps 1 and 2 of 3
        torch.manual_seed(0)  # the same step on one batch of 6
        reference = Toy()
        opt = torch.optim.SGD(reference.parameters(), lr=0.5)
        opt.zero_grad()
        reference(data)["loss_mse"].backward()
        opt.step()
        for a, b in zip(model.module.parameters(), reference.parameters()):
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
    finally:
        dist.destroy_process_group()


def test_an_epoch_counts_optimizer_steps():
    cfg = get_rooftop_cfg()
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.ROOFTOP.GRAD_ACCUM_STEPS = 2
    assert images_per_step(cfg) == 4
    assert iters_per_epoch_for(10, images_per_step(cfg)) == 3


# --- 4. label smoothing ------------------------------------------------------------------------

def test_label_smoothing_loss_by_hand():
    from rooftop_m2f import compat
    from rooftop_m2f.modeling.label_smoothing import (LabelSmoothingSetCriterion,
                                                      smoothed_cross_entropy)

    compat.apply()
    logits = torch.tensor([[[2.0, 0.3, -1.0], [0.0, 1.0, 3.0]]])  # 1 image, 2 queries, K = 2 + 1
    eps, no_object = 0.2, 0.1
    criterion = LabelSmoothingSetCriterion(
        2, matcher=None, eos_coef=no_object, losses=["labels"], num_points=16,
        oversample_ratio=3.0, importance_sample_ratio=0.75, label_smoothing=eps,
        **compat.criterion_kwargs(2.0, 5.0, 5.0, 1, False))
    # query 0 matched to a segment of class 1; query 1 unmatched (no-object, weight 0.1)
    targets = [{"labels": torch.tensor([1])}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    loss = criterion.loss_labels({"pred_logits": logits}, targets, indices, 1)["loss_ce"]

    def log_p(row):
        z = math.log(sum(math.exp(v) for v in row))
        return [v - z for v in row]

    q0, q1 = log_p([2.0, 0.3, -1.0]), log_p([0.0, 1.0, 3.0])
    l0 = (1 - eps) * -q0[1] + eps * -(sum(q0) / 3)  # smoothed: eps spread over 3 outputs
    l1 = -q1[2]                                      # unmatched: hard no-object target
    expected = (1.0 * l0 + no_object * l1) / (1.0 + no_object)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # eps = 0 is Mask2Former's weighted cross-entropy
    target = torch.tensor([[1, 2]])
    plain = smoothed_cross_entropy(logits, target, torch.tensor([[True, False]]),
                                   criterion.empty_weight, 0.0)
    assert float(plain) == pytest.approx(float(F.cross_entropy(
        logits.transpose(1, 2), target, criterion.empty_weight)), rel=1e-6)
    assert float(loss) != pytest.approx(float(plain), rel=1e-3)


# --- 5. schedules ------------------------------------------------------------------------------

def test_cosine_schedule_with_warmup():
    from rooftop_m2f.engine.trainer import Trainer

    cfg = get_rooftop_cfg()
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupCosineLR"
    cfg.SOLVER.BASE_LR, cfg.SOLVER.BASE_LR_END = 1.0, 0.0
    cfg.SOLVER.MAX_ITER, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.WARMUP_FACTOR = 100, 10, 0.001
    check_training_options(cfg)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = Trainer.build_lr_scheduler(cfg, optimizer)
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    cosine = [0.5 * (1 + math.cos(math.pi * t / 100)) for t in range(100)]
    end_of_warmup = cosine[10]
    for t in range(10):  # linear from WARMUP_FACTOR to the cosine's value at the warm-up's end
        assert lrs[t] == pytest.approx(0.001 + (end_of_warmup - 0.001) * t / 10, rel=1e-6)
    for t in range(10, 100):
        assert lrs[t] == pytest.approx(cosine[t], rel=1e-6, abs=1e-9)
    # --resume: the configured schedule at the checkpoint's position, here a run extended from
    # 100 to 200 iterations, resumed at iteration 50
    from rooftop_m2f.engine.trainer import continue_schedule

    cfg.SOLVER.MAX_ITER = 200
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    continue_schedule(Trainer.build_lr_scheduler(cfg, optimizer), 50)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 50 / 200)), rel=1e-6)
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupCosine"
    with pytest.raises(ConfigError, match="SOLVER.LR_SCHEDULER_NAME"):
        check_training_options(cfg)


def test_layer_wise_lr_decay_of_the_swin_stages(tiny_datasets_root, monkeypatch):
    from detectron2.modeling import build_model

    from rooftop_m2f.engine.setup import build_cfg

    monkeypatch.setenv("DETECTRON2_DATASETS", str(tiny_datasets_root))
    cfg = build_cfg(TINY_CONFIG, ["SOLVER.BASE_LR", "1.0", "SOLVER.BACKBONE_MULTIPLIER", "0.5",
                                  "ROOFTOP.LAYER_DECAY", "0.5"])
    model = build_model(cfg)
    lr_of = {id(g["params"][0]): g["lr"] for g in param_groups(cfg, model)}
    lrs = {name: lr_of[id(p)] for name, p in model.named_parameters()}
    by_prefix = {}
    for name, lr in lrs.items():
        if name.startswith("backbone.patch_embed."):
            by_prefix.setdefault("patch_embed", set()).add(lr)
        elif name.startswith("backbone.layers."):
            by_prefix.setdefault(f"stage{int(name.split('.')[2]) + 1}", set()).add(lr)
        elif name.startswith("backbone.norm"):
            by_prefix.setdefault(f"stage{int(name[len('backbone.norm')]) + 1}", set()).add(lr)
        elif not name.startswith("backbone."):
            by_prefix.setdefault("heads", set()).add(lr)
    S = 4  # stage s of S: 0.5 (backbone multiplier) * 0.5 ** (S - s); patch embed 0.5 ** S
    assert by_prefix["patch_embed"] == {0.5 * 0.5 ** S}
    for s in range(1, S + 1):
        assert by_prefix[f"stage{s}"] == {0.5 * 0.5 ** (S - s)}, s
    assert by_prefix["heads"] == {1.0}
    assert len(lrs) == sum(1 for _ in model.parameters())


# --- 6. profiling -------------------------------------------------------------------------------

def test_profiler_writes_a_trace_and_the_top_operators(tmp_path):
    hook = ProfileIterations(start=1, num=1, output_dir=str(tmp_path))

    class T:
        iter = 0

    hook.trainer = T()
    model = Toy()
    batch = _samples(4)
    for it in range(3):
        hook.trainer.iter = it
        hook.before_step()
        model(batch)["loss_mse"].backward()
        hook.after_step()
    traces = glob.glob(str(tmp_path / "log" / "profiler-tensorboard-iter1" / "*.pt.trace.json"))
    assert len(traces) == 1
    with open(traces[0]) as f:
        assert json.load(f)["traceEvents"]
    assert not (tmp_path / "log" / "profiler-tensorboard-iter0").exists()
    table = (tmp_path / "profiler-top-ops-iter1.txt").read_text()
    assert "aten::" in table and "Self CPU" in table


# --- values ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("ROOFTOP.EMA.DECAY", 1.5), ("ROOFTOP.EARLY_STOP.PATIENCE", -1),
    ("ROOFTOP.EARLY_STOP.MIN_DELTA", -0.1), ("ROOFTOP.GRAD_ACCUM_STEPS", 0),
    ("ROOFTOP.LABEL_SMOOTHING", 1.0), ("ROOFTOP.LAYER_DECAY", 0.0),
])
def test_bad_values_are_one_line_naming_the_key(key, value):
    cfg = get_rooftop_cfg()
    cfg.ROOFTOP.EMA.ENABLED = True
    node, leaf = cfg, key.split(".")
    for part in leaf[:-1]:
        node = node[part]
    node[leaf[-1]] = value
    from rooftop_m2f.config import validate

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        validate(cfg)
    assert "\n" not in str(error.value)


# --- end to end: EMA, early stopping and accumulation in a real run, then --resume -------------

@pytest.mark.slow
def test_ema_early_stop_and_accumulation_in_a_run(tiny_datasets_root, tmp_path):
    out = tmp_path / "run"
    opts = ["SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "40", "TEST.EVAL_PERIOD", "2",
            "ROOFTOP.EMA.ENABLED", "True", "ROOFTOP.GRAD_ACCUM_STEPS", "2",
            "ROOFTOP.BEST_CHECKPOINT_TOPK", "1",
            "ROOFTOP.EARLY_STOP.PATIENCE", "1", "ROOFTOP.EARLY_STOP.MIN_DELTA", "1.0"]
    result = train(out, tiny_datasets_root, *opts)
    console = result.stdout + result.stderr
    # no evaluation can improve by more than 1.0: the second one stops the run
    assert ("Training stopped by early stopping (ROOFTOP.EARLY_STOP) after evaluation 2 "
            "(iteration 4)") in console
    assert "was evaluation 1 (iteration 2)" in console
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert final["iteration"] == 3 and final["ema"]["updates"] == 4
    assert set(final["model"]) == set(final["model_raw"])
    assert any(not torch.equal(final["model"][k], final["model_raw"][k]) for k in final["model"])
    with open(out / "valid_epoch.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["iteration"], r["weights"]) for r in rows] == [("2", "ema"), ("4", "ema")]
    best = json.loads((out / "best_checkpoints.json").read_text())["checkpoints"]
    assert best and all("model_raw" in torch.load(out / b["file"], map_location="cpu",
                                                  weights_only=True) for b in best)
    with open(out / "train_epoch.csv", newline="") as f:  # 8 images at 2 x 2 per step
        assert list(csv.DictReader(f))[0]["iter_end"] == "2"
    # --resume of the stopped run says so, in one line, and trains no further
    resumed = train(out, tiny_datasets_root, *opts, flags=["--resume"])
    lines = [line for line in (resumed.stdout + resumed.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "this run was ended by early stopping" in lines[0], lines
    assert torch.load(out / "model_final.pth", map_location="cpu",
                      weights_only=True)["iteration"] == 3


def test_a_bad_value_stops_train_net_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "never"
    status, err = tool_in_process("train_net.py", "--config-file", TINY_CONFIG, "OUTPUT_DIR", out,
                                  "ROOFTOP.GRAD_ACCUM_STEPS", "0", capsys=capsys)
    assert status == 2
    assert err.strip() == "train_net.py: error: ROOFTOP.GRAD_ACCUM_STEPS 0: must be >= 1"
    assert not out.exists()
