"""Weights are data, never code (rooftop_m2f/checkpoint/safe_io.py): crafted .pkl and .pth files are
refused with one line and run nothing, in-process and through every tool; real model-zoo .pkl
files load; a run's own checkpoints are read with weights_only=True; downloads from a local HTTP
server are checked before they reach the cache."""
import collections
import http.server
import os
import pickle
import shlex
import socket
import threading

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

from conftest import TINY_CONFIG, run_tool
from rooftop_m2f.engine.setup import build_cfg
from rooftop_m2f.checkpoint.loading import load_model_weights
from rooftop_m2f.checkpoint.safe_io import (
    WeightsError,
    fetch_weights,
    read_checkpoint_file,
    read_pkl,
    read_torch,
)

FAST = ["SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256", "ROOFTOP.CHECK_DATASET", "False",
        "ROOFTOP.MSDEFORM_ATTN_IMPL", "pytorch"]


class Payload:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def write_crafted(path, marker):
    """A weights file whose 'model' holds the payload: pickled for .pkl, torch.save for .pth."""
    data = {"model": {"backbone.x": Payload(marker)}, "__author__": "someone"}
    if str(path).endswith(".pkl"):
        with open(path, "wb") as f:
            pickle.dump(data, f)
    else:
        torch.save(data, path)
    return str(path)


def tiny_cfg(*opts):
    return build_cfg(TINY_CONFIG, ["ROOFTOP.MSDEFORM_ATTN_IMPL", "pytorch", *opts])


@pytest.fixture(scope="module")
def tiny_state():
    torch.manual_seed(321)
    return {k: v.detach().clone() for k, v in build_model(tiny_cfg()).state_dict().items()}


def zoo_bytes(state, protocol=2):
    """The model zoo's format: {"model": {name: numpy array}, "__author__",
    "matching_heuristics"}."""
    model = collections.OrderedDict((k, v.numpy()) for k, v in state.items())
    return pickle.dumps({"model": model, "__author__": "Mask2Former",
                         "matching_heuristics": True}, protocol=protocol)


def assert_refused_one_line(message, name, refused):
    assert "\n" not in message, message
    assert name in message and refused in message and "nothing in it was run" in message, message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message


# ---- the readers, in-process -----------------------------------------------------------------
@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pkl_reader_reads_arrays_scalars_and_plain_data(tmp_path, protocol):
    data = {"model": collections.OrderedDict(a=np.arange(6, dtype=np.float32).reshape(2, 3),
                                             b=np.array([1, 2], np.int64)),
            "__author__": "FAIR", "matching_heuristics": True, "iteration": np.int64(7),
            "lr": np.float64(0.5), "raw": b"\x00\xffbytes", "shape": (1, [2, None])}
    path = tmp_path / f"p{protocol}.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    back = read_pkl(str(path))
    assert type(back["model"]) is collections.OrderedDict
    assert np.array_equal(back["model"]["a"], data["model"]["a"])
    assert back["model"]["a"].dtype == np.float32 and back["model"]["b"].dtype == np.int64
    assert back["iteration"] == 7 and back["lr"] == 0.5 and back["raw"] == data["raw"]
    assert back["shape"] == (1, [2, None]) and back["matching_heuristics"] is True


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_crafted_file_is_refused_and_runs_nothing(tmp_path, suffix):
    marker = tmp_path / "marker"
    path = write_crafted(tmp_path / f"crafted{suffix}", marker)
    with pytest.raises(WeightsError) as info:
        read_checkpoint_file(path)
    assert_refused_one_line(str(info.value), path, "posix.system")
    cfg = tiny_cfg()
    with pytest.raises(WeightsError) as info:
        load_model_weights(build_model(cfg), cfg, path)
    assert_refused_one_line(str(info.value), path, "posix.system")
    assert not marker.exists(), "the payload ran"


def test_pkl_reader_refuses_other_objects(tmp_path):
    cases = {
        "torch._utils": pickle.dumps({"model": {"w": torch.zeros(2)}}),  # torch tensors: .pth
        "builtins.eval": b"cbuiltins\neval\n(S'1+1'\ntR.",  # hand-written GLOBAL and call
        "collections.Counter": pickle.dumps({"model": collections.Counter(a=1)}),
    }
    for refused, data in cases.items():
        path = tmp_path / (refused.replace(".", "_") + ".pkl")
        path.write_bytes(data)
        with pytest.raises(WeightsError) as info:
            read_pkl(str(path))
        assert_refused_one_line(str(info.value), str(path), f"refers to {refused}")

    objects = tmp_path / "objects.pkl"
    objects.write_bytes(pickle.dumps({"model": {"w": np.array([1, "x"], dtype=object)}}))
    with pytest.raises(WeightsError, match=r"objects\.pkl: holds an array of Python objects"):
        read_pkl(str(objects))


def test_real_model_zoo_pkl_loads(tiny_state, tmp_path):
    path = tmp_path / "model_final_zoo.pkl"
    path.write_bytes(zoo_bytes(tiny_state))
    cfg = tiny_cfg()
    model = build_model(cfg)
    report = load_model_weights(model, cfg, str(path))
    after = model.state_dict()
    assert len(report.loaded) == len(after) - 1  # everything but criterion.empty_weight
    for name in report.loaded:
        assert torch.equal(after[name], tiny_state[name]), name


def test_junk_and_truncated_torch_files_are_one_line_errors(tiny_state, tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a zip archive at all")
    good = tmp_path / "good.pth"
    torch.save({"model": tiny_state}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:5000])
    for path in (junk, cut):
        with pytest.raises(WeightsError, match=rf"{path.name}: cannot read the checkpoint") as e:
            read_torch(str(path))
        assert "\n" not in str(e.value) and "weights_only` set to `False" not in str(e.value)


# ---- the run's own checkpoints: weights_only=True on --resume ----------------------------------
def test_run_checkpoints_are_plain_data_and_resume_reads_them_weights_only(
        tiny_datasets_root, tmp_path, monkeypatch):
    from rooftop_m2f.engine import Trainer
    from rooftop_m2f.checkpoint.saving import AtomicDetectionCheckpointer

    out = tmp_path / "run"
    opts = [*FAST, "DATASETS.TRAIN", "('capetown_sem_seg_train',)", "DATASETS.TEST", "()",
            "ROOFTOP.DATASET_ROOT", str(tiny_datasets_root / "capetown"),
            "INPUT.CROP.SIZE", "(64, 64)", "SOLVER.MAX_ITER", "2", "SOLVER.CHECKPOINT_PERIOD", "1",
            "TEST.EVAL_PERIOD", "0", "ROOFTOP.CSV_LOGS", "True", "OUTPUT_DIR", str(out)]
    cfg = tiny_cfg(*opts)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    saved = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert saved["iteration"] == 1
    trainer_state = saved["trainer"]  # model, optimizer, scheduler, iteration, our hooks' state
    assert trainer_state["iteration"] == 1 and "state" in trainer_state["_trainer"]["optimizer"]
    assert {"LRScheduler", "EpochCSVWriter"} <= set(trainer_state["hooks"])
    assert trainer_state["hooks"]["EpochCSVWriter"]["sums"], "the CSV hook's state is saved"

    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    resumed = Trainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    assert calls == [True], "the resume must call torch.load with weights_only=True, explicitly"

    # A state_dict with a numpy scalar could not be resumed: it is never saved.
    class NumpyState:
        def state_dict(self):
            return {"best": np.float64(0.5)}

        def load_state_dict(self, state):
            pass

    checkpointer = AtomicDetectionCheckpointer(resumed.model, str(tmp_path / "np"),
                                               extra=NumpyState())
    with pytest.raises(TypeError, match=r"extra/best \(numpy.float64\)"):
        checkpointer.save("model_x")
    assert not (tmp_path / "np" / "model_x.pth").exists()


# ---- downloads -----------------------------------------------------------------------------
class WeightsServer:
    """http.server on 127.0.0.1 in a thread: path -> (bytes, Content-Length to announce)."""

    def __init__(self):
        self.files = {}
        self.requests = []
        files, requests = self.files, self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                if self.path not in files:
                    self.send_error(404)
                    return
                body, length = files[self.path]
                self.send_response(200)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.timeout = 5
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    s = WeightsServer()
    yield s
    s.close()


def cache_files(cache):
    return sorted(os.path.relpath(os.path.join(d, f), cache)
                  for d, _, files in os.walk(cache) for f in files)


def test_download_is_checked_before_it_reaches_the_cache(server, tiny_state, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("FVCORE_CACHE", str(cache))
    good = zoo_bytes(tiny_state)
    server.files["/zoo/model_good.pkl"] = (good, len(good))
    server.files["/zoo/model_cut.pkl"] = (good[: len(good) // 2], len(good))
    marker = tmp_path / "marker"
    crafted = tmp_path / "crafted.pkl"
    write_crafted(crafted, marker)
    server.files["/zoo/model_crafted.pkl"] = (crafted.read_bytes(), crafted.stat().st_size)

    with pytest.raises(WeightsError) as e:
        fetch_weights(server.url + "/zoo/model_cut.pkl", timeout=10)
    assert str(e.value) == (f"MODEL.WEIGHTS: the download of model_cut.pkl is incomplete "
                            f"({len(good) // 2} of {len(good)} bytes); nothing was cached, "
                            "try again")
    with pytest.raises(WeightsError) as e:
        fetch_weights(server.url + "/zoo/model_crafted.pkl", timeout=10)
    assert_refused_one_line(str(e.value), "model_crafted.pkl", "posix.system")
    assert not marker.exists()
    with pytest.raises(WeightsError,
                       match=r"cannot download model_none\.pkl: .* answered HTTP 404"):
        fetch_weights(server.url + "/zoo/model_none.pkl", timeout=10)
    assert cache_files(cache) == [], "nothing of a failed download may stay in the cache"

    # The good one: cached under the URL's path, then taken from the cache without a request.
    url = server.url + "/zoo/model_good.pkl"
    cfg = tiny_cfg()
    model = build_model(cfg)
    report = load_model_weights(model, cfg, url)
    assert len(report.loaded) == len(tiny_state) - 1
    name = "sem_seg_head.pixel_decoder.transformer.level_embed"
    assert torch.equal(model.state_dict()[name], tiny_state[name])
    assert cache_files(cache) == [os.path.join("zoo", "model_good.pkl")]
    assert (cache / "zoo" / "model_good.pkl").read_bytes() == good
    count = len(server.requests)
    assert fetch_weights(url) == str(cache / "zoo" / "model_good.pkl")
    assert len(server.requests) == count

    # A broken file already in the cache (say, from an older tool) is named, with what to do.
    broken = cache / "zoo" / "model_old.pkl"
    broken.write_bytes(good[:100])
    with pytest.raises(WeightsError, match=r"model_old\.pkl: cannot read the checkpoint .*; it is "
                                           r"the cached download of .*: delete .* to download"):
        load_model_weights(model, cfg, server.url + "/zoo/model_old.pkl")
    assert len(server.requests) == count


def test_no_network_is_one_line_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    with socket.socket() as s:  # a port with nothing listening on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/maskformer/model_final_011c6d.pkl"
    with pytest.raises(WeightsError) as e:
        fetch_weights(url, timeout=5)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("MODEL.WEIGHTS: cannot download model_final_011c6d.pkl (")
    assert f"download {url} elsewhere and pass the local path" in message
    assert cache_files(tmp_path / "cache") == []


# ---- the tools, as users run them --------------------------------------------------------------
def assert_tool_refused(result, name, marker):
    assert result.returncode in (1, 2), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if "refused" in line]
    assert len(lines) == 1, result.stderr[-3000:]
    assert_refused_one_line(lines[0], name, "posix.system")
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_train_net_eval_only_refuses_crafted_weights(tiny_datasets_root, tmp_path, suffix):
    marker = tmp_path / "marker"
    path = write_crafted(tmp_path / f"crafted{suffix}", marker)
    result = run_tool("train_net.py", "--config-file", TINY_CONFIG, "--eval-only", *FAST,
                      "MODEL.WEIGHTS", path, "OUTPUT_DIR", tmp_path / "eval",
                      datasets_root=tiny_datasets_root, check=False)
    assert_tool_refused(result, path, marker)


@pytest.mark.parametrize("eval_only,suffix", [(False, ".pth"), (True, ".pkl")])
def test_train_net_resume_refuses_a_crafted_last_checkpoint(tiny_datasets_root, tmp_path,
                                                            eval_only, suffix):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "marker"
    path = write_crafted(out / f"model_0000003{suffix}", marker)
    (out / "last_checkpoint").write_text(os.path.basename(path))
    result = run_tool("train_net.py", "--config-file", TINY_CONFIG, "--resume",
                      *(["--eval-only"] if eval_only else []), *FAST, "SOLVER.MAX_ITER", "6",
                      "OUTPUT_DIR", out, datasets_root=tiny_datasets_root, check=False)
    assert_tool_refused(result, path, marker)
    assert not (out / "model_final.pth").exists()


@pytest.mark.parametrize("suffix", [".pkl", ".pth"])
def test_predict_refuses_crafted_weights(tmp_path, suffix):
    from PIL import Image

    marker = tmp_path / "marker"
    path = write_crafted(tmp_path / f"crafted{suffix}", marker)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    result = run_tool("predict.py", "--config-file", TINY_CONFIG, "--input", tmp_path / "a.png",
                      "--output", tmp_path / "out", "--opts", "MODEL.WEIGHTS", path, check=False)
    assert_tool_refused(result, path, marker)
    assert not (tmp_path / "out" / "a_index.png").exists()


def test_converter_refuses_a_crafted_pytorch_model_bin(tmp_path):
    # The converter reads config.json (JSON), model.safetensors (no code by design) or
    # pytorch_model.bin: the one that could carry a payload.
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    marker = tmp_path / "marker"
    path = write_crafted(hf / "pytorch_model.bin", marker)
    result = run_tool("convert_hf_to_d2.py", "--hf-dir", hf, "--output", tmp_path / "out.pth",
                      check=False)
    assert_tool_refused(result, path, marker)
    assert not (tmp_path / "out.pth").exists()
