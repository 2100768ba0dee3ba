"""Scoring image windows with an exported model (``tools/export_onnx.py``) on ONNX Runtime.

Imports numpy, onnxruntime and the standard library only (no torch, detectron2 or Mask2Former),
so a machine without the training environment can predict. :class:`OnnxPredictor` is a window
scorer like :class:`~rooftop_m2f.inference.predictor.RooftopPredictor`: ``scores(window)`` and
``scores_batch(windows)`` give (K, h, w) float32 class scores of (h, w, 3) uint8 RGB windows,
with the PyTorch predictor's test-time preprocessing written in numpy:

* ``input_size`` > 0 (``ROOFTOP.INPUT_SIZE``): the window is resized to input_size squared
  (bilinear, bit for bit OpenCV's ``INTER_LINEAR_EXACT``, as training and the PyTorch predictor
  resize), and the scores are resized back to the window (bilinear, half-pixel centres, as
  PyTorch's ``F.interpolate(..., align_corners=False)``);
* otherwise the graph's input is the window size: a window of that size is scored as is; a
  smaller one (an image side shorter than the window) is padded at the bottom and right with
  zeros after normalisation and its scores cropped. The PyTorch model pads only to a multiple
  of 32, so there the padded context differs and so do the scores near it; a larger window is
  refused.

Then channels in the model's order (``INPUT.FORMAT``), ``(pixel - mean) / std``, ONNX Runtime,
on ``CUDAExecutionProvider`` where onnxruntime-gpu provides it, else on the CPU.
"""
import json
import logging
import os
from typing import List, Optional, Sequence

import numpy as np

from ..cli import UserError

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
META_FILE = "model.json"
CONFIG_FILE = "config.yaml"
FORMAT = "rooftop-m2f semantic scores"
FORMAT_VERSION = 1
INPUT_NAME = "image"
OUTPUT_NAME = "scores"


class ExportedModelError(UserError):
    """An exported model that cannot be used as given: one line naming the file and the problem."""


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise ExportedModelError(
            f"onnxruntime is not installed ({e}): pip install onnxruntime (CPU) or "
            "onnxruntime-gpu (CUDA), the version in requirements.txt") from None
    return onnxruntime


def default_providers(ort) -> List[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def make_session(model_path: str, threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None):
    """An ``onnxruntime.InferenceSession`` of ``model_path``; ``threads``: intra-op threads
    (default: ONNX Runtime's, one per core); ``providers``: default CUDA where present, then CPU.
    A file ONNX Runtime cannot load is an :class:`ExportedModelError`."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(model_path, sess_options=options,
                                    providers=list(providers or default_providers(ort)))
    except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
        reason = " ".join(str(e).split())[:300]
        raise ExportedModelError(f"{model_path}: not an ONNX model ONNX Runtime can load "
                                 f"({type(e).__name__}: {reason})") from None


def check_not_a_checkpoint(model_path: str):
    """One line for the likeliest mistake, a PyTorch checkpoint (a zip archive or a pickle) given
    as the model, before its JSON is looked for; any other file is left to ONNX Runtime."""
    with open(model_path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        raise ExportedModelError(f"{model_path}: not an ONNX model but a PyTorch checkpoint (.pth "
                                 "or .pkl); export it first: tools/export_onnx.py --config-file "
                                 "... --output-dir ... MODEL.WEIGHTS " + model_path)


def meta_path_of(model_path: str) -> str:
    """The JSON the export writes beside a model: ``model.onnx`` -> ``model.json``."""
    return os.path.splitext(model_path)[0] + ".json"


def read_meta(model_path: str) -> dict:
    path = meta_path_of(model_path)
    if not os.path.isfile(path):
        raise ExportedModelError(f"{path}: no such file; tools/export_onnx.py writes it beside "
                                 f"{os.path.basename(model_path)} (classes, sizes, normalisation)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ExportedModelError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportedModelError(f"{path}: not the description of a rooftop-m2f export (no "
                                 f"\"format\": \"{FORMAT}\")")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ExportedModelError(f"{path}: format version {meta['format_version']} is newer than "
                                 f"this runtime's ({FORMAT_VERSION}); update rooftop-m2f")
    return meta


def is_onnx_model(path) -> bool:
    """An exported model (``--model``) rather than a PyTorch checkpoint: its name ends in .onnx."""
    return str(path).lower().endswith(".onnx")


def load_export_config(model_path: str, opts=()):
    """The config ``model_path`` was exported with (``config.yaml`` beside it) with the ``KEY
    VALUE`` overrides ``opts``, as a yacs ``CfgNode`` (no detectron2 needed); ``MODEL.WEIGHTS`` is
    the model, so a run's fingerprint names it. A missing file, an unknown key or a value of
    the wrong type is one line."""
    from yacs.config import CfgNode

    from ..cli import ConfigError, check_overrides, closest_key, config_keys

    model_path = os.fspath(model_path)
    if not os.path.isfile(model_path):
        raise ExportedModelError(f"--model {model_path}: no such file")
    check_not_a_checkpoint(model_path)
    path = os.path.join(os.path.dirname(model_path) or ".", CONFIG_FILE)
    try:
        with open(path) as f:
            cfg = CfgNode.load_cfg(f)
    except FileNotFoundError:
        raise ExportedModelError(f"{path}: no such file; tools/export_onnx.py writes it beside "
                                 f"{os.path.basename(model_path)} (the config of the export)") from None
    except (OSError, ValueError, TypeError) as e:  # yaml's errors are ValueErrors here
        raise ExportedModelError(f"{path}: not a readable config ({e})") from None
    check_overrides(opts)
    keys = list(config_keys(cfg))
    for key, value in zip(opts[::2], opts[1::2]):
        if key not in keys:
            near = closest_key(key, keys)
            raise ConfigError(f"{key}: not a config key of {path}"
                              + (f"; did you mean {near}?" if near else ""))
        try:
            cfg.merge_from_list([key, value])
        except (ValueError, AssertionError) as e:
            raise ConfigError(f"{key} {value}: {' '.join(str(e).split())}") from None
    cfg.MODEL.WEIGHTS = model_path
    return cfg


# ---- preprocessing and postprocessing, in numpy -------------------------------------------------
def _exact_taps(src: int, dst: int):
    """OpenCV ``INTER_LINEAR_EXACT`` along one axis: source indices and 8-bit fixed-point weights
    (weights sum to 256); half-pixel centres, clamped at the borders."""
    scale = 1.0 / (np.float64(dst) / np.float64(src))
    x = (np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5
    i0 = np.floor(x).astype(np.int64)
    w1 = np.rint((x - i0) * 256).astype(np.int64)
    border = (i0 < 0) | (i0 >= src - 1)
    i0 = np.clip(i0, 0, src - 1)
    w1[border] = 0
    return i0, np.minimum(i0 + 1, src - 1), 256 - w1, w1


def resize_linear_exact(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) uint8 -> (height, width, C) uint8, as ``cv2.resize(image, (width, height),
    interpolation=cv2.INTER_LINEAR_EXACT)``: integer arithmetic, rounded once."""
    if image.shape[:2] == (height, width):
        return image
    y0, y1, wy0, wy1 = _exact_taps(image.shape[0], height)
    x0, x1, wx0, wx1 = _exact_taps(image.shape[1], width)
    rows = image.astype(np.int64)
    cols = rows[:, x0] * wx0[None, :, None] + rows[:, x1] * wx1[None, :, None]
    out = cols[y0] * wy0[:, None, None] + cols[y1] * wy1[:, None, None]
    return np.clip((out + (1 << 15)) >> 16, 0, 255).astype(np.uint8)


def _bilinear_taps(src: int, dst: int):
    """``F.interpolate(mode="bilinear", align_corners=False)`` along one axis: the float32 scale
    ``src / dst``, positions ``scale * (i + 0.5) - 0.5`` rounded once (a fused multiply-add, as
    PyTorch's vectorised CPU kernel computes them), clamped at 0; float32 weights."""
    scale = np.float64(np.float32(src) / np.float32(dst))
    x = (scale * (np.arange(dst, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    x = np.maximum(x, np.float32(0))
    i0 = np.minimum(np.floor(x).astype(np.int64), src - 1)
    w1 = x - i0.astype(np.float32)
    return i0, np.minimum(i0 + 1, src - 1), np.float32(1) - w1, w1


def resize_bilinear(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) float32 -> (C, height, width) float32, bilinear with half-pixel centres."""
    if maps.shape[1:] == (height, width):
        return maps
    y0, y1, wy0, wy1 = _bilinear_taps(maps.shape[1], height)
    x0, x1, wx0, wx1 = _bilinear_taps(maps.shape[2], width)
    cols = maps[:, :, x0] * wx0 + maps[:, :, x1] * wx1
    return (cols[:, y0] * wy0[:, None] + cols[:, y1] * wy1[:, None]).astype(np.float32, copy=False)


def _check_window(window):
    if not isinstance(window, np.ndarray) or window.ndim != 3 or window.shape[2] != 3 or \
            window.dtype != np.uint8:
        what = (f"{window.shape} {window.dtype}" if isinstance(window, np.ndarray)
                else type(window).__name__)
        raise ValueError(f"expected an (H, W, 3) uint8 RGB window, got {what}")


# ---- the scorer ---------------------------------------------------------------------------------
class OnnxPredictor:
    """Class scores of RGB windows from an exported model (module doc).

    ``model_path``: the ``model.onnx`` of an export, with its ``model.json`` beside it.
    ``threads``: ONNX Runtime's intra-op threads (default: one per core). ``providers``: ONNX
    Runtime execution providers (default: CUDA where present, then CPU)."""

    def __init__(self, model_path: str, threads: Optional[int] = None,
                 providers: Optional[Sequence[str]] = None):
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise ExportedModelError(f"{model_path}: no such file")
        check_not_a_checkpoint(model_path)
        self.model_path = model_path
        self.meta = meta = read_meta(model_path)
        try:
            self.classes = list(meta["classes"])
            self.palette = meta.get("palette")
            self.window_size = int(meta["window_size"])
            self.input_size = int(meta["input_size"])
            spec = meta["input"]
            self.batch, _, self.size, _ = (int(v) for v in spec["shape"])
            self.channels = spec["channels"]
            self.mean = np.asarray(spec["pixel_mean"], np.float32).reshape(3, 1, 1)
            self.std = np.asarray(spec["pixel_std"], np.float32).reshape(3, 1, 1)
        except (KeyError, TypeError, ValueError) as e:
            raise ExportedModelError(f"{meta_path_of(model_path)}: incomplete ({type(e).__name__}: "
                                     f"{e})") from None
        self.num_classes = len(self.classes)
        self.session = make_session(model_path, threads, providers)
        self._check_graph()
        logger.info("%s: %d classes, %d px windows%s, on ONNX Runtime %s", model_path,
                    self.num_classes, self.window_size,
                    f" resized to {self.input_size}" if self.input_size else "",
                    "/".join(self.session.get_providers()))

    @classmethod
    def from_config(cls, cfg, model_path: Optional[str] = None, **kwargs):
        """The model at ``model_path`` (default ``cfg.MODEL.WEIGHTS``), checked against the
        config's window size, input size and class count (:meth:`check_matches`)."""
        predictor = cls(model_path or cfg.MODEL.WEIGHTS, **kwargs)
        predictor.check_matches(window_size=cfg.ROOFTOP.TILE.SIZE,
                                input_size=cfg.ROOFTOP.INPUT_SIZE,
                                num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
        return predictor

    def _check_graph(self):
        """The graph is the one ``model.json`` describes (not another export's)."""
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        expected_in = [self.batch, 3, self.size, self.size]
        expected_out = [self.batch, self.num_classes, self.size, self.size]
        got_in = list(inputs[0].shape) if len(inputs) == 1 else None
        got_out = list(outputs[0].shape) if len(outputs) == 1 else None
        if got_in != expected_in or got_out != expected_out:
            raise ExportedModelError(
                f"{self.model_path}: its graph takes {got_in} and gives {got_out}, but "
                f"{os.path.basename(meta_path_of(self.model_path))} describes {expected_in} -> "
                f"{expected_out}: the model and its JSON come from different exports")
        self._input_name, self._output_name = inputs[0].name, outputs[0].name

    def check_matches(self, window_size: int, input_size: int, num_classes: int):
        """One line when the model was exported for another window size (``ROOFTOP.TILE.SIZE``),
        input size (``ROOFTOP.INPUT_SIZE``) or class count (``MODEL.SEM_SEG_HEAD.NUM_CLASSES``)."""
        for key, mine, theirs in (("ROOFTOP.TILE.SIZE", self.window_size, window_size),
                                  ("ROOFTOP.INPUT_SIZE", self.input_size, input_size),
                                  ("MODEL.SEM_SEG_HEAD.NUM_CLASSES", self.num_classes,
                                   num_classes)):
            if int(theirs) != mine:
                raise ExportedModelError(
                    f"{self.model_path}: exported with {key} {mine}, the config has {theirs}; "
                    f"set {key} {mine} or export the model again with this config")

    # -- the window-scorer protocol ----------------------------------------------------------------
    def scores(self, window_rgb: np.ndarray) -> np.ndarray:
        """(K, h, w) float32 class scores of an (h, w, 3) uint8 RGB window."""
        return self.scores_batch([window_rgb])[0]

    def scores_batch(self, windows_rgb) -> List[np.ndarray]:
        """:meth:`scores` of several windows, run ``batch`` at a time (the graph's fixed batch;
        a last, shorter group is filled with zeros)."""
        windows = list(windows_rgb)
        for window in windows:
            _check_window(window)
        inputs = [self._model_input(w) for w in windows]
        results = []
        for start in range(0, len(inputs), self.batch):
            group = inputs[start:start + self.batch]
            batch = np.zeros((self.batch, 3, self.size, self.size), np.float32)
            for i, x in enumerate(group):
                batch[i] = x
            out = self.session.run([self._output_name], {self._input_name: batch})[0]
            results.extend(out[:len(group)])
        return [self._window_scores(s, w.shape[:2]) for s, w in zip(results, windows)]

    def __call__(self, window_rgb: np.ndarray) -> np.ndarray:
        """(h, w) uint8 class map."""
        return self.scores(window_rgb).argmax(0).astype(np.uint8)

    def _model_input(self, window):
        height, width = window.shape[:2]
        if self.input_size:
            window = resize_linear_exact(window, self.input_size, self.input_size)
        elif height > self.size or width > self.size:
            raise ValueError(f"a {width}x{height} window is larger than the model's {self.size} px "
                             "input (ROOFTOP.TILE.SIZE of the export); tile the image in windows "
                             "of at most that size")
        if self.channels == "BGR":
            window = window[:, :, ::-1]
        x = (window.transpose(2, 0, 1).astype(np.float32) - self.mean) / self.std
        if x.shape[1:] != (self.size, self.size):
            x = np.pad(x, ((0, 0), (0, self.size - x.shape[1]), (0, self.size - x.shape[2])))
        return x

    def _window_scores(self, scores, size):
        height, width = size
        if self.input_size:
            return resize_bilinear(scores, height, width)
        return np.ascontiguousarray(scores[:, :height, :width])
