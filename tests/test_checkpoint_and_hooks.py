"""In-process tests of the fault-tolerance pieces: atomic checkpoints (a crash or kill during a
save), the finite-loss check (unit and in a real Trainer), the AMP skipped-step counter with a
fake GradScaler (AMPTrainer needs CUDA) and save-and-stop on SIGTERM."""
import os
import signal
import types

import pytest
import torch
from detectron2.utils.events import EventStorage

from conftest import TINY_CONFIG
from rooftop_m2f.checkpoint import saving as ckpt_module
from rooftop_m2f.checkpoint.saving import AtomicDetectionCheckpointer
from rooftop_m2f.engine.fault_tolerance import (
    AMPSkippedStepCounter,
    FiniteLossCheck,
    NonFiniteLossError,
    StopOnSignal,
    TrainingInterrupted,
    check_finite,
    parse_signals,
)


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


def hidden_files(directory):
    return sorted(p for p in os.listdir(directory) if p.startswith("."))


# --- atomic checkpoints ---------------------------------------------------------------------
def test_save_is_complete_and_tagged(tmp_path):
    model = small_model()
    c = AtomicDetectionCheckpointer(model, str(tmp_path))
    c.save("model_0000003", iteration=3)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    data = torch.load(tmp_path / "model_0000003.pth", weights_only=True)
    assert data["iteration"] == 3 and torch.equal(data["model"]["0.weight"], model[0].weight)
    assert hidden_files(tmp_path) == []
    assert oct(os.stat(tmp_path / "model_0000003.pth").st_mode & 0o077) != "0o0"  # not 0600


def test_failure_during_save_leaves_previous_checkpoint_tagged(tmp_path, monkeypatch):
    model = small_model()
    c = AtomicDetectionCheckpointer(model, str(tmp_path))
    c.save("model_0000003", iteration=3)
    good = (tmp_path / "model_0000003.pth").read_bytes()

    def dies_half_way(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(ckpt_module.torch, "save", dies_half_way)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        c.save("model_0000007", iteration=7)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (tmp_path / "model_0000007.pth").exists()
    assert hidden_files(tmp_path) == []  # the temporary file was removed
    assert (tmp_path / "model_0000003.pth").read_bytes() == good

    # overwriting an existing name that fails keeps the old complete file
    with pytest.raises(OSError):
        c.save("model_0000003", iteration=3)
    assert (tmp_path / "model_0000003.pth").read_bytes() == good


def test_kill_during_save_is_recovered_on_resume(tmp_path):
    """A SIGKILL cannot run clean-up code: simulate what it leaves (a partial temporary file
    next to the complete previous checkpoint) and check the resume ignores and removes it."""
    model = small_model()
    c = AtomicDetectionCheckpointer(model, str(tmp_path))
    c.save("model_0000003", iteration=3)
    partial = tmp_path / ".model_0000007.k1ll3d.tmp.pth"
    partial.write_bytes(b"PK\x03\x04 half")
    (tmp_path / ".last_checkpoint.x8y9.tmp").write_text("model_00")
    assert c.get_checkpoint_file().endswith("model_0000003.pth")
    assert [os.path.basename(p) for p in c.get_all_checkpoint_files()] == ["model_0000003.pth"]

    fresh = small_model(seed=1)
    c2 = AtomicDetectionCheckpointer(fresh, str(tmp_path))
    extra = c2.resume_or_load("", resume=True)
    assert extra["iteration"] == 3
    assert torch.equal(fresh[0].weight, model[0].weight)
    assert hidden_files(tmp_path) == []


def test_refuses_to_save_non_finite_weights(tmp_path):
    model = small_model()
    c = AtomicDetectionCheckpointer(model, str(tmp_path))
    c.save("model_0000001", iteration=1)
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    with pytest.raises(FloatingPointError) as e:
        c.save("model_0000003", iteration=3)
    assert "2.bias" in str(e.value) and "last_checkpoint still names model_0000001.pth" in str(e.value)
    assert not (tmp_path / "model_0000003.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


# --- non-finite loss ------------------------------------------------------------------------
class LossModel(torch.nn.Module):
    def __init__(self, losses):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.losses = losses

    def forward(self, x):
        if self.training:
            return {k: self.w * v for k, v in self.losses.items()}
        return x


def test_check_finite_names_iteration_and_terms():
    check_finite({"loss_ce": torch.tensor(0.5), "loss_mask": 1.0}, iteration=3)
    with pytest.raises(NonFiniteLossError) as e:
        check_finite({"loss_ce": torch.tensor(0.5), "loss_mask_2": torch.tensor(float("inf")),
                             "loss_dice": torch.tensor(float("nan"))}, iteration=12, rank=1)
    msg = str(e.value)
    assert "iteration 12 on rank 1" in msg
    assert "loss_mask_2=inf" in msg and "loss_dice=nan" in msg and "2 of 3 loss terms" in msg
    assert "loss_ce=0.5" in msg
    assert isinstance(e.value, FloatingPointError)


def test_finite_loss_hook_checks_training_forward_only():
    model = LossModel({"loss_ce": torch.tensor(1.0), "loss_dice": torch.tensor(float("nan"))})
    hook = FiniteLossCheck(model)
    hook.trainer = types.SimpleNamespace(iter=7)
    model(torch.zeros(1))  # no hook yet
    hook.before_train()
    with pytest.raises(NonFiniteLossError, match=r"iteration 7: loss_dice=nan"):
        model(torch.zeros(1))
    model.eval()
    model(torch.zeros(1))  # inference output is not a loss dict: not checked
    hook.after_train()
    model.train()
    model(torch.zeros(1))  # hook removed


def tiny_trainer_cfg(root, out, opts=()):
    from rooftop_m2f.data.capetown import register_capetown
    from rooftop_m2f.engine.setup import build_cfg

    register_capetown(str(root / "capetown"), prefix="ftunit")
    cfg = build_cfg(TINY_CONFIG, [
        "DATASETS.TRAIN", "('ftunit_train',)", "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256", "INPUT.CROP.SIZE", "(64, 64)",
        "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", str(out), "SEED", "0", *opts])
    os.makedirs(out, exist_ok=True)
    return cfg


def test_nan_in_a_real_trainer_stops_at_that_iteration(tiny_datasets_root, tmp_path):
    """A NaN injected into the criterion's output at iteration 3 stops Trainer.train with the
    iteration and the term; the checkpoint of iteration 1 stays the last one, complete."""
    from rooftop_m2f.engine import Trainer

    out = tmp_path / "nan"
    cfg = tiny_trainer_cfg(tiny_datasets_root, out, ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "2"])
    trainer = Trainer(cfg)
    assert isinstance(trainer.checkpointer, AtomicDetectionCheckpointer)
    criterion = trainer.model.criterion
    original = criterion.forward
    calls = []

    def poisoned(outputs, targets):
        losses = original(outputs, targets)
        calls.append(trainer.iter)
        if trainer.iter == 3:
            losses["loss_dice"] = losses["loss_dice"] * float("nan")
        return losses

    criterion.forward = poisoned
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    assert "Non-finite loss at iteration 3: loss_dice=nan (1 of" in str(e.value)
    assert "loss_ce=" in str(e.value)
    assert calls == [0, 1, 2, 3]
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert sorted(p.name for p in out.glob("*.pth")) == ["model_0000001.pth"]
    assert hidden_files(out) == []
    assert torch.load(out / "model_0000001.pth", weights_only=True)["iteration"] == 1


# --- AMP skipped steps ----------------------------------------------------------------------
class FakeScaler:
    """get_scale() returns the scale after each step as a GradScaler would."""

    def __init__(self, scales, enabled=True):
        self.scales = list(scales)
        self.enabled = enabled
        self.current = self.scales.pop(0)

    def is_enabled(self):
        return self.enabled

    def get_scale(self):
        return self.current

    def step(self):
        self.current = self.scales.pop(0)


def run_amp_hook(hook, scaler, steps, start=0):
    trainer = types.SimpleNamespace(iter=start)
    hook.trainer = trainer
    with EventStorage(start) as storage:
        trainer.storage = storage
        for it in range(start, start + steps):
            trainer.iter = storage.iter = it
            hook.before_step()
            scaler.step()  # the optimizer step of the iteration, inside run_step
            hook.after_step()
        return storage


def test_amp_skipped_steps_are_counted_logged_and_stored(caplog):
    # 65536 -> 32768 (skip) -> 16384 (skip) -> 16384 -> 16384 -> 32768 (growth, not a skip)
    scaler = FakeScaler([65536.0, 32768.0, 16384.0, 16384.0, 16384.0, 32768.0])
    hook = AMPSkippedStepCounter(scaler)
    with caplog.at_level("WARNING"):
        storage = run_amp_hook(hook, scaler, 5)
    assert hook.skipped_steps == 2
    history = storage.history("amp/skipped_steps").values()
    assert [v for v, _ in history] == [1.0, 2.0, 2.0, 2.0, 2.0]
    assert storage.history("amp/loss_scale").latest() == 32768.0
    assert sum("skipped" in r.getMessage() for r in caplog.records) == 2
    assert "iteration 1 skipped" in caplog.records[-1].getMessage()

    # the count is checkpointed with the trainer state and continues after a resume
    resumed = AMPSkippedStepCounter(FakeScaler([8.0, 4.0]))
    resumed.load_state_dict(hook.state_dict())
    run_amp_hook(resumed, resumed.grad_scaler, 1, start=5)
    assert resumed.skipped_steps == 3


def test_amp_counter_is_inert_when_scaler_disabled():
    scaler = FakeScaler([1.0, 0.5], enabled=False)
    hook = AMPSkippedStepCounter(scaler)
    storage = run_amp_hook(hook, scaler, 1)
    assert hook.skipped_steps == 0 and "amp/skipped_steps" not in storage.histories()


# --- SIGTERM --------------------------------------------------------------------------------
def stop_hook(tmp_path, it, max_iter=100):
    model = small_model()
    checkpointer = AtomicDetectionCheckpointer(model, str(tmp_path))
    hook = StopOnSignal(checkpointer, [signal.SIGTERM])
    hook.trainer = types.SimpleNamespace(iter=it, max_iter=max_iter)
    return hook


def test_sigterm_saves_at_the_end_of_the_iteration_and_stops(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    hook = stop_hook(tmp_path, 4)
    hook.before_train()
    try:
        hook.after_step()  # no signal yet: nothing happens
        assert not list(tmp_path.iterdir())
        os.kill(os.getpid(), signal.SIGTERM)  # the handler only sets a flag
        assert hook.received == signal.SIGTERM
        with pytest.raises(TrainingInterrupted) as e:
            hook.after_step()
    finally:
        hook.after_train()
    assert signal.getsignal(signal.SIGTERM) is before  # handler restored
    assert e.value.code == 143 and isinstance(e.value, SystemExit)
    assert "SIGTERM after iteration 4" in str(e.value) and "--resume" in str(e.value)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"
    assert torch.load(tmp_path / "model_0000004.pth", weights_only=True)["iteration"] == 4


def test_sigterm_in_the_last_iteration_lets_the_run_finish(tmp_path):
    hook = stop_hook(tmp_path, 9, max_iter=10)
    hook.before_train()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        hook.after_step()  # no exception: the run completes (model_final by the periodic hook)
    finally:
        hook.after_train()
    assert not (tmp_path / "model_0000009.pth").exists()


def test_parse_signals():
    assert parse_signals(["SIGTERM", "sigusr1"]) == [signal.SIGTERM, signal.SIGUSR1]
    with pytest.raises(ValueError, match="unknown signal 'SIGFOO'"):
        parse_signals(["SIGFOO"])
    with pytest.raises(ValueError, match="cannot be caught"):
        parse_signals(["SIGKILL"])


def test_non_finite_outputs_are_caught_before_the_criterion():
    class WithCriterion(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.criterion = torch.nn.Identity()
            self.called = False

        def forward(self, x):
            out = {"pred_logits": x, "aux_outputs": [{"pred_masks": x * 0 + float("inf")}]}
            self.criterion(out)
            self.called = True
            return {"loss_ce": x.sum()}

    model = WithCriterion()
    hook = FiniteLossCheck(model)
    hook.trainer = types.SimpleNamespace(iter=5)
    hook.before_train()
    with pytest.raises(NonFiniteLossError) as e:
        model(torch.ones(2, 3))
    assert "outputs at iteration 5" in str(e.value)
    assert "aux_outputs[0].pred_masks (6 of 6 values)" in str(e.value) and "pred_logits" not in str(e.value)
    assert not model.called
    hook.after_train()
    model(torch.ones(2, 3))
    assert model.called


def test_a_checkpoint_on_an_evaluation_iteration_holds_that_evaluations_early_stopping_count(
        tiny_datasets_root, tmp_path):
    """The periodic checkpoint of an evaluation iteration is written after EarlyStopping counted
    that evaluation, so a resume from it (which starts after the evaluation) loses no count."""
    from rooftop_m2f.checkpoint.safe_io import read_torch
    from rooftop_m2f.engine import Trainer

    out = tmp_path / "early"
    cfg = tiny_trainer_cfg(tiny_datasets_root, out, [
        "DATASETS.TEST", "('ftunit_val',)", "TEST.EVAL_PERIOD", "2", "SOLVER.MAX_ITER", "4",
        "SOLVER.CHECKPOINT_PERIOD", "2", "ROOFTOP.EARLY_STOP.PATIENCE", "5",
        "ROOFTOP.CHECK_DATASET", "False"])
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    state = read_torch(out / "model_0000001.pth")["trainer"]["hooks"]["EarlyStopping"]
    assert state["evaluations"] == 1  # the evaluation after iteration 2 is in the checkpoint
