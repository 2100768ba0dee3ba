"""Export of the semantic-segmentation path of a :class:`~rooftop_m2f.modeling.meta_arch.RooftopMaskFormer`
to ONNX (``tools/export_onnx.py``).

The graph (:class:`SemanticScores`) is the network between the normaliser and the class scores:

* input ``image``: (B, 3, S, S) float32, a window already resized to the model's input size S
  (``ROOFTOP.INPUT_SIZE`` when set, else the window size ``ROOFTOP.TILE.SIZE``), channels in
  ``INPUT.FORMAT`` order, normalised as ``(pixel - MODEL.PIXEL_MEAN) / MODEL.PIXEL_STD``; the
  batch B is ``ROOFTOP.TILE.BATCH_SIZE``, fixed (Mask2Former's Swin turns the batch into a
  constant of the trace);
* output ``scores``: (B, K, S, S) float32 per-class scores, Mask2Former's semantic inference
  ``sum_q softmax(class_logits_q)[k] * sigmoid(mask_logits_q)`` (non-negative, not normalised;
  the class map is their argmax). Scores, not the class map, because windows are blended where
  they overlap and test-time views are averaged: both need the scores.

Inside, the image is padded to a multiple of ``MODEL.MASK_FORMER.SIZE_DIVISIBILITY`` (zeros, as
detectron2's ``ImageList`` pads) and the scores cropped back, as the PyTorch model does. The
deformable attention runs our PyTorch reference path (``ROOFTOP.MSDEFORM_ATTN_IMPL pytorch``:
``grid_sample``, exported as ONNX ``GridSample``); the compiled op has no ONNX form. The graph is
traced with torch's TorchScript-based exporter: ``torch.export`` cannot follow Mask2Former's
pixel decoder, which keeps the levels' shapes in a tensor and loops over it, and at a fixed
window size the trace records them as the constants they are.

Beside the model: ``model.json`` (:func:`describe_export`; the runtime, :mod:`.onnx_runtime`,
reads it) and ``config.yaml``, the full config the model was built from.
"""
import datetime
import hashlib
import json
import logging
import os
import warnings
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..classes import CLASS_NAMES, IGNORE_LABEL, PALETTE
from ..cli import UsageError, UserError
from ..fileio import atomic_path, write_text_atomic
from ..modeling.semantic_inference import semantic_scores
from .onnx_runtime import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    INPUT_NAME,
    META_FILE,
    MODEL_FILE,
    OUTPUT_NAME,
    import_onnxruntime,
    make_session,
)

logger = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization (17) and GridSample (16) are standard operators from here on
# The export's own check: ONNX Runtime's scores of a random input within this fraction of the
# largest score of PyTorch's. Float rounding gives ~1e-6; a mask logit at the attention
# threshold can flip one query's attention mask in one decoder layer and move the window's
# scores by a few 1e-3 (PyTorch's two deformable-attention implementations differ as much);
# a wrong conversion gives differences of the order of the scores.
CHECK_RTOL = 1e-2


def model_input_size(cfg) -> int:
    """The side S of the graph's input: ``ROOFTOP.INPUT_SIZE`` when set, else the window size."""
    return int(cfg.ROOFTOP.INPUT_SIZE) or int(cfg.ROOFTOP.TILE.SIZE)


class SemanticScores(nn.Module):
    """(B, 3, S, S) normalised images -> (B, K, S, S) class scores of ``model`` (module doc).

    Sizes are Python constants of the module, so the trace is of one fixed shape."""

    def __init__(self, model, size: int, batch: int = 1):
        super().__init__()
        self.backbone = model.backbone
        self.sem_seg_head = model.sem_seg_head
        self.size = int(size)
        self.batch = int(batch)
        div = int(model.size_divisibility)
        self.padded = -(-self.size // div) * div if div > 1 else self.size
        self.resize_masks_first = bool(model.sem_seg_postprocess_before_inference)

    def forward(self, images):
        pad = self.padded - self.size
        if pad:
            images = F.pad(images, (0, pad, 0, pad))
        outputs = self.sem_seg_head(self.backbone(images))
        size, padded = (self.size, self.size), (self.padded, self.padded)
        return torch.stack([
            semantic_scores(outputs["pred_logits"][b], outputs["pred_masks"][b], padded, size,
                            size, self.resize_masks_first)
            for b in range(self.batch)])


def _addcdiv(g, self, tensor1, tensor2, value):
    """ONNX form of ``torch.addcdiv`` (the deformable attention's sampling locations), which
    the TorchScript exporter lacks: ``self + value * tensor1 / tensor2``."""
    quotient = g.op("Div", tensor1, tensor2)
    return g.op("Add", self, g.op("Mul", quotient, g.op("CastLike", value, quotient)))


def _index_put(g, self, indices, values, accumulate):
    """``x[index] = value`` with an index that selects nothing is ``x``: Swin's attention-mask
    construction assigns to slices that are empty on small feature maps, which torch's own
    conversion rejects (it cannot shape the empty value tensor). Every other ``index_put``
    goes to torch's conversion."""
    from torch.onnx import symbolic_opset11

    node = indices.node()
    if node.kind() == "prim::ListConstruct" and any(_constant_size(i) == 0 for i in node.inputs()):
        return self
    return symbolic_opset11.index_put(g, self, indices, values, accumulate)


def _constant_size(value):
    """The number of elements of a constant of the graph (None for any other value)."""
    node = value.node()
    if node.kind() not in ("onnx::Constant", "prim::Constant") or not node.hasAttribute("value") \
            or node.kindOf("value") != "t":
        return None
    return node.t("value").numel()


# Conversions the export registers with torch.onnx for the duration of an export.
_SYMBOLICS = {"aten::addcdiv": _addcdiv, "aten::index_put": _index_put}


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weights_file(weights: str) -> Optional[str]:
    if not weights:
        return None
    if "://" in weights:
        from ..checkpoint.safe_io import cached_path

        return cached_path(weights)
    return weights


def check_exportable(cfg):
    """One line for a config this export does not cover, before any model is built."""
    if cfg.MODEL.META_ARCHITECTURE != "RooftopMaskFormer":
        raise UsageError(f"MODEL.META_ARCHITECTURE {cfg.MODEL.META_ARCHITECTURE}: the ONNX export "
                         "covers RooftopMaskFormer only")
    if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
        raise UsageError(f"INPUT.FORMAT {cfg.INPUT.FORMAT}: must be RGB or BGR")
    if int(cfg.ROOFTOP.TILE.SIZE) < 32:
        raise UsageError(f"ROOFTOP.TILE.SIZE {cfg.ROOFTOP.TILE.SIZE}: must be >= 32 pixels")
    if int(cfg.ROOFTOP.TILE.BATCH_SIZE) < 1:
        raise UsageError(f"ROOFTOP.TILE.BATCH_SIZE {cfg.ROOFTOP.TILE.BATCH_SIZE}: must be >= 1")
    if cfg.ROOFTOP.INPUT_SIZE and cfg.MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE:
        raise UsageError("MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE True with "
                         "ROOFTOP.INPUT_SIZE: the masks would be resized to each window's size "
                         "inside the network; the export needs False (the default)")


def describe_export(cfg, *, opset: int, weights_sha256: Optional[str], random_weights: bool,
                    seed: Optional[int], config_file: Optional[str], overrides=(),
                    model_sha256: Optional[str] = None) -> Dict:
    """The content of ``model.json``: what a runtime needs to feed the graph and read its output,
    and where the model came from."""
    size = model_input_size(cfg)
    batch = int(cfg.ROOFTOP.TILE.BATCH_SIZE)
    num_classes = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    classes = list(CLASS_NAMES) if num_classes == len(CLASS_NAMES) else \
        [f"class_{i}" for i in range(num_classes)]
    palette = [list(c) for c in PALETTE] if num_classes == len(PALETTE) else None
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "model_sha256": model_sha256,
        "opset": opset,
        "classes": classes,
        "palette": palette,
        "ignore_label": IGNORE_LABEL,
        "window_size": int(cfg.ROOFTOP.TILE.SIZE),
        "input_size": int(cfg.ROOFTOP.INPUT_SIZE),
        "input": {
            "name": INPUT_NAME,
            "shape": [batch, 3, size, size],
            "dtype": "float32",
            "channels": cfg.INPUT.FORMAT,
            "normalisation": "(pixel - pixel_mean) / pixel_std, pixels 0..255",
            "pixel_mean": [float(v) for v in cfg.MODEL.PIXEL_MEAN],
            "pixel_std": [float(v) for v in cfg.MODEL.PIXEL_STD],
            "resize": "a window is resized to input_size x input_size first (bilinear, OpenCV "
                      "INTER_LINEAR_EXACT) when input_size > 0",
        },
        "output": {
            "name": OUTPUT_NAME,
            "kind": "class_scores",
            "shape": [batch, num_classes, size, size],
            "dtype": "float32",
            "description": "per-class scores sum_q softmax(class_logits_q)[k] * "
                           "sigmoid(mask_logits_q), >= 0, not normalised; argmax over k is the "
                           "class map; resized back to the window (bilinear) when input_size > 0",
        },
        "source": {
            "config_file": config_file,
            "overrides": [str(o) for o in overrides],
            "config": CONFIG_FILE,
            "weights": cfg.MODEL.WEIGHTS or None,
            "weights_sha256": weights_sha256,
            "random_weights": bool(random_weights),
            "seed": seed,
        },
        "exported_with": {"torch": torch.__version__, "onnx": _version("onnx"),
                          "exporter": "torch.onnx.export (TorchScript-based)",
                          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                              timespec="seconds")},
    }


def _version(module):
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def build_export_model(cfg):
    """Our model from ``cfg`` on the CPU, the deformable attention on the PyTorch reference
    path, weights loaded (``MODEL.WEIGHTS``; empty: the current random initialisation)."""
    from detectron2.modeling import build_model

    from .. import modeling  # noqa: F401  registers RooftopMaskFormer and its decoders
    from ..checkpoint.loading import load_model_weights

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    cfg.ROOFTOP.MSDEFORM_ATTN_IMPL = "pytorch"
    cfg.freeze()
    model = build_model(cfg)
    load_model_weights(model, cfg)
    return model.eval()


def export_onnx(cfg, output_dir: str, *, random_weights: bool = False, overwrite: bool = False,
                opset: int = OPSET, config_file: Optional[str] = None, overrides=()) -> Dict:
    """Write ``model.onnx``, ``model.json`` and ``config.yaml`` into ``output_dir`` (see the module
    doc) and return ``{"model": path, "meta": path, "config": path, "max_abs_diff": float}``.

    The graph is checked with ``onnx.checker`` and run once with ONNX Runtime on a random input,
    whose scores must agree with PyTorch's (:data:`CHECK_RTOL`). Existing
    files are kept unless ``overwrite``; on any failure nothing is written."""
    try:
        import onnx
    except ImportError as e:
        raise UserError(f"onnx is not installed ({e}): pip install onnx, the version in "
                        "requirements.txt") from None
    import_onnxruntime()  # one line now, rather than after the export, when it is missing
    check_exportable(cfg)
    paths = {key: os.path.join(output_dir, name) for key, name in
             (("model", MODEL_FILE), ("meta", META_FILE), ("config", CONFIG_FILE))}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} exists (an earlier export); use another --output-dir or "
                        "add --overwrite")
    weights_file = _weights_file(cfg.MODEL.WEIGHTS)
    seed = None
    if not weights_file:
        if not random_weights:
            raise UsageError("the export needs weights: MODEL.WEIGHTS path.pth, or "
                             "--random-weights for an untrained model on purpose")
        seed = int(cfg.SEED) if int(cfg.SEED) >= 0 else 0
        torch.manual_seed(seed)
    weights_sha256 = file_sha256(weights_file) if weights_file else None

    model = build_export_model(cfg)
    size = model_input_size(cfg)
    batch = int(cfg.ROOFTOP.TILE.BATCH_SIZE)
    graph = SemanticScores(model, size, batch).eval()
    example = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    logger.info("Exporting %s: input %s (%dx%d windows%s), opset %d", type(model).__name__,
                [batch, 3, size, size], cfg.ROOFTOP.TILE.SIZE, cfg.ROOFTOP.TILE.SIZE,
                f" resized to {size}" if cfg.ROOFTOP.INPUT_SIZE else "", opset)
    with torch.no_grad():
        expected = graph(example).numpy()
    os.makedirs(output_dir, exist_ok=True)
    with atomic_path(paths["model"]) as model_tmp, atomic_path(paths["meta"]) as meta_tmp:
        with torch.no_grad(), warnings.catch_warnings():
            # The trace records the fixed shapes as constants: that is the intent here.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The TorchScript-based exporter's own deprecation notices (module doc: why it), and
            # numpy's about Swin's shape arithmetic on traced sizes.
            for message in (r"You are using the legacy TorchScript-based ONNX export",
                            r"The feature will be removed",
                            r"__array_wrap__ must accept context"):
                warnings.filterwarnings("ignore", message=message, category=DeprecationWarning)
            for name, symbolic in _SYMBOLICS.items():
                torch.onnx.register_custom_op_symbolic(name, symbolic, opset)
            try:
                torch.onnx.export(graph, (example,), model_tmp, dynamo=False, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  do_constant_folding=True)
            finally:
                for name in _SYMBOLICS:
                    torch.onnx.unregister_custom_op_symbolic(name, opset)
        onnx.checker.check_model(model_tmp, full_check=True)
        session = make_session(model_tmp, threads=None, providers=["CPUExecutionProvider"])
        got = session.run([OUTPUT_NAME], {INPUT_NAME: example.numpy()})[0]
        del session
        max_diff = float(np.abs(got - expected).max())
        scale = float(np.abs(expected).max())
        if not max_diff <= CHECK_RTOL * scale:
            raise RuntimeError(f"the exported graph's scores differ from PyTorch's by {max_diff:.3g} "
                               f"(more than {CHECK_RTOL} of the largest score, {scale:.3g}) on a "
                               "random input")
        logger.info("onnx.checker passed; ONNX Runtime agrees with PyTorch on a random input "
                    "(max |score difference| %.2g, largest score %.3g)", max_diff, scale)
        meta = describe_export(cfg, opset=opset, weights_sha256=weights_sha256,
                               random_weights=random_weights and not weights_file, seed=seed,
                               config_file=config_file, overrides=overrides,
                               model_sha256=file_sha256(model_tmp))
        with open(meta_tmp, "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        write_text_atomic(paths["config"], cfg.dump())
    return {**paths, "max_abs_diff": max_diff}
