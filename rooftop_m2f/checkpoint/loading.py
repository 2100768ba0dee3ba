"""Loading ``MODEL.WEIGHTS`` (model-zoo, converted Hugging Face, or a run's own weights) into
:class:`RooftopMaskFormer`, for training, ``--eval-only`` and prediction: everything that fits
is loaded, what does not is reported or refused (:func:`plan_load`), in a short log.
(``--resume`` does not come here: it restores a run's own last checkpoint, optimizer included.)
"""
import copy
import logging
import os
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from detectron2.checkpoint.c2_model_loading import align_and_update_state_dicts
from fvcore.common.checkpoint import _IncompatibleKeys

from .safe_io import SafeDetectionCheckpointer, WeightsError

logger = logging.getLogger(__name__)

__all__ = ["WeightsError", "LoadReport", "plan_load", "PretrainedCheckpointer",
           "load_model_weights", "CLASS_HEAD_KEYS"]

CLASS_HEAD_KEYS = ("sem_seg_head.predictor.class_embed.weight",
                   "sem_seg_head.predictor.class_embed.bias")
_CONFIG_DERIVED = {
    "pixel_mean": "normalisation comes from MODEL.PIXEL_MEAN",
    "pixel_std": "normalisation comes from MODEL.PIXEL_STD",
}
_CRITERION_REASON = ("loss weights come from the config (ROOFTOP.LOSS.PER_CLASS_WEIGHTS, "
                     "MODEL.MASK_FORMER.NO_OBJECT_WEIGHT)")
_COMPUTED_BUFFER = re.compile(r"^backbone\..*\.relative_position_index$")


def group_names(names) -> List[str]:
    """Compact, sorted display of tensor names: ``a.b.{weight, bias}`` for shared prefixes."""
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    for name in sorted(names):
        head, _, leaf = name.rpartition(".")
        groups.setdefault(head, []).append(leaf)
    out = []
    for head, leaves in groups.items():
        if len(leaves) == 1:
            out.append(f"{head}.{leaves[0]}" if head else leaves[0])
        else:
            out.append(f"{head}.{{{', '.join(leaves)}}}")
    return out


def _prefix_counts(names, depth=2) -> str:
    counts: "OrderedDict[str, int]" = OrderedDict()
    for name in sorted(names):
        prefix = ".".join(name.split(".")[:depth])
        counts[prefix] = counts.get(prefix, 0) + 1
    return ", ".join(f"{p}.*: {n}" for p, n in counts.items())


class LoadReport:
    """The outcome of matching a checkpoint to a model (see :func:`plan_load`).

    ``loaded``: names loaded; ``reinitialised``: class head names kept at their initialisation
    (name -> (checkpoint shape, model shape)); ``ignored``: checkpoint names not loaded, by design
    (name -> reason); ``dropped``: checkpoint names outside the backbone under backbone-only;
    ``renamed``: old-layout name -> new name; ``kept_init``: model names left at their
    initialisation by design; errors: ``mismatched`` (name -> (checkpoint shape, model shape)),
    ``missing`` (model names the checkpoint lacks), ``unexpected`` (checkpoint names the model
    lacks)."""

    def __init__(self, source: str, num_model_tensors: int, backbone_only: bool):
        self.source = source
        self.num_model_tensors = num_model_tensors
        self.backbone_only = backbone_only
        self.loaded: List[str] = []
        self.reinitialised: Dict[str, Tuple[tuple, tuple]] = OrderedDict()
        self.ignored: Dict[str, str] = OrderedDict()
        self.dropped: List[str] = []
        self.renamed: Dict[str, str] = OrderedDict()
        self.kept_init: Dict[str, str] = OrderedDict()
        self.mismatched: Dict[str, Tuple[tuple, tuple]] = OrderedDict()
        self.missing: List[str] = []
        self.unexpected: List[str] = []

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.unexpected)

    def error_message(self) -> str:
        lines = [f"{self.source} does not fit this model (wrong architecture or config?):"]

        def show(label, items):
            items = list(items)
            lines.append(f"  {label} ({len(items)}): " + "; ".join(items[:8]) +
                         (f"; ... {len(items) - 8} more" if len(items) > 8 else ""))

        if self.mismatched:
            show("shape mismatch, checkpoint -> model",
                 (f"{k} {tuple(a)} -> {tuple(b)}" for k, (a, b) in self.mismatched.items()))
        if self.missing:
            show("in the model but not in the checkpoint", group_names(self.missing))
        if self.unexpected:
            show("in the checkpoint but not in the model", group_names(self.unexpected))
        hint = ("Check MODEL.SWIN.* / MODEL.SEM_SEG_HEAD.* / MODEL.MASK_FORMER.* against the "
                "checkpoint's model")
        if not self.backbone_only:
            hint += ", or set ROOFTOP.LOAD_BACKBONE_ONLY True to take its backbone only"
        lines.append("  " + hint + ".")
        return "\n".join(lines)

    def summary_lines(self) -> List[str]:
        scope = " (backbone only: ROOFTOP.LOAD_BACKBONE_ONLY)" if self.backbone_only else ""
        lines = [f"Loaded {len(self.loaded)} of {self.num_model_tensors} model tensors from "
                 f"{self.source}{scope}"]
        if self.reinitialised:
            (ckpt_shape, model_shape) = next(iter(self.reinitialised.values()))
            lines.append(
                f"  re-initialised {', '.join(group_names(self.reinitialised))}: class head "
                f"{ckpt_shape[0] - 1}+1 -> {model_shape[0] - 1}+1 outputs (shape mismatch)")
        if self.dropped:
            lines.append(f"  not loaded, outside the backbone ({len(self.dropped)}: "
                         f"{_prefix_counts(self.dropped)}): ROOFTOP.LOAD_BACKBONE_ONLY; the pixel "
                         "decoder and transformer decoder start from their initialisation")
        by_reason: "OrderedDict[str, List[str]]" = OrderedDict()
        for name, reason in self.ignored.items():
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            lines.append(f"  not loaded {', '.join(group_names(names))}: {reason}")
        by_reason = OrderedDict()
        for name, reason in self.kept_init.items():
            if self.backbone_only and not name.startswith("backbone."):
                continue  # said above
            by_reason.setdefault(reason, []).append(name)
        for reason, names in by_reason.items():
            shown = group_names(names)
            text = ", ".join(shown[:3]) + (f", ... ({len(names)} tensors)" if len(shown) > 3
                                           else "")
            lines.append(f"  kept as built {text}: {reason}")
        if self.renamed:
            lines.append(f"  {len(self.renamed)} sem_seg_head.* names renamed from the old "
                         "MaskFormer head layout to sem_seg_head.pixel_decoder.*")
        return lines


def _shape(value) -> tuple:
    return tuple(value.shape)


def plan_load(model_state: Mapping[str, torch.Tensor], ckpt_state: Mapping[str, object],
              backbone_only: bool = False, source: str = "checkpoint") -> LoadReport:
    """Decide, without touching the model, what of ``ckpt_state`` is loaded. Names must already
    be in detectron2 naming. Returns a :class:`LoadReport`; ``report.ok`` is False when
    something does not fit.

    * every tensor whose name and shape fit is loaded;
    * the class head (``sem_seg_head.predictor.class_embed``) may differ in its number of outputs
      (ADE20K's 150+1 against our 4+1): it keeps its fresh initialisation, and the log says so;
    * ``criterion.*`` (loss weights) is never loaded: it comes from the config
      (``ROOFTOP.LOSS.PER_CLASS_WEIGHTS``, ``MODEL.MASK_FORMER.NO_OBJECT_WEIGHT``);
    * ``backbone_only`` (``ROOFTOP.LOAD_BACKBONE_ONLY``): only ``backbone.*`` is taken; the pixel
      decoder and the transformer decoder start from their initialisation (the reference run's
      recipe);
    * anything else that does not fit (a shape mismatch elsewhere, a model tensor the checkpoint
      lacks, a checkpoint tensor the model does not have) makes the report not ``ok``: the
      checkpointer then raises a :class:`WeightsError` naming the file and the tensors, and a
      checkpoint of another architecture is never loaded half-way.
    """
    report = LoadReport(source, len(model_state), backbone_only)
    provided = set()
    for name in ckpt_state:
        target = name
        if name.startswith("criterion."):
            report.ignored[name] = _CRITERION_REASON
            continue
        if name in _CONFIG_DERIVED:
            report.ignored[name] = _CONFIG_DERIVED[name]
            continue
        if (name.startswith("sem_seg_head.") and target not in model_state
                and not name.startswith(("sem_seg_head.pixel_decoder.", "sem_seg_head.predictor."))):
            renamed = "sem_seg_head.pixel_decoder." + name[len("sem_seg_head."):]
            if renamed in model_state:
                report.renamed[name] = renamed
                target = renamed
        if backbone_only and not target.startswith("backbone."):
            report.dropped.append(name)
            continue
        if target not in model_state:
            report.unexpected.append(name)
            continue
        provided.add(target)
        ckpt_shape, model_shape = _shape(ckpt_state[name]), _shape(model_state[target])
        if ckpt_shape == model_shape:
            report.loaded.append(target)
        elif target in CLASS_HEAD_KEYS:
            report.reinitialised[target] = (ckpt_shape, model_shape)
        else:
            report.mismatched[target] = (ckpt_shape, model_shape)

    for name in model_state:
        if name in provided:
            continue
        if name.startswith("criterion."):
            continue  # from the config; nothing to report
        if backbone_only and not name.startswith("backbone."):
            report.kept_init[name] = "not in scope (backbone only)"
        elif _COMPUTED_BUFFER.match(name):
            report.kept_init[name] = "computed buffer, not in the checkpoint"
        else:
            report.missing.append(name)
    if not report.loaded and report.ok:
        report.missing.extend(n for n in model_state if n.startswith("backbone."))
    return report


class PretrainedCheckpointer(SafeDetectionCheckpointer):
    """``DetectionCheckpointer`` for ``MODEL.WEIGHTS``: same formats and URLs, read as data only
    (:mod:`rooftop_m2f.checkpoint.safe_io`), the matching of :func:`plan_load`, a short log, and
    :class:`WeightsError` for what does not fit or cannot be read. ``last_report`` holds the
    :class:`LoadReport` of the last load; the log is one summary line plus one short line per
    group of skipped tensors with the reason, instead of fvcore's per-tensor warnings.

    One more reason for our own loading: Mask2Former's ``MaskFormerHead`` renames
    ``sem_seg_head.*`` keys of any state dict without version metadata (a pickled dict, e.g. the
    model zoo's .pkl) as if it came from an old MaskFormer layout, which silently drops the whole
    pixel decoder (Mask2Former issue #95). We attach the model's own version metadata so that
    never happens, and do that old-layout renaming ourselves, explicitly, when a checkpoint
    really has it.
    """

    what = "MODEL.WEIGHTS"

    def __init__(self, model, save_dir="", *, backbone_only: bool = False, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.backbone_only = bool(backbone_only)
        self.last_report: Optional[LoadReport] = None
        self._current_path = "checkpoint"

    def load(self, path, *args, **kwargs):
        self._current_path = path
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename):
        data = super()._load_file(filename)  # WeightsError for files that are not weights data
        if not isinstance(data.get("model"), Mapping):
            raise WeightsError(f"{filename}: not a checkpoint: expected a dict with a 'model' "
                               f"state dict, got {type(data['model']).__name__}")
        return data

    def _load_model(self, checkpoint):
        source = os.path.basename(str(self._current_path)) or "checkpoint"
        state = checkpoint.pop("model")
        bad = [k for k, v in state.items() if not isinstance(v, (np.ndarray, torch.Tensor))]
        if bad:
            raise WeightsError(f"{self._current_path}: entries that are not arrays or tensors: "
                               f"{bad[:5]}")
        state = OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v))
                             if isinstance(v, np.ndarray) else v) for k, v in state.items())
        if state and all(k.startswith("module.") for k in state):
            state = OrderedDict((k[len("module."):], v) for k, v in state.items())
        model_state = self.model.state_dict()
        if checkpoint.get("matching_heuristics", False):
            state = align_and_update_state_dicts(
                model_state, state, c2_conversion=checkpoint.get("__author__") == "Caffe2")
        author = checkpoint.get("__author__")
        if author:
            source = f"{source} (author: {author})"

        report = plan_load(model_state, state, self.backbone_only, source=source)
        if not report.ok:
            raise WeightsError(report.error_message())
        to_load = OrderedDict()
        for name in state:
            target = report.renamed.get(name, name)
            if target in report.loaded:
                to_load[target] = state[name]
        # The model's own version metadata: keeps Mask2Former's legacy-layout hooks from
        # renaming these (already current) names.
        to_load._metadata = copy.deepcopy(getattr(model_state, "_metadata", OrderedDict()))
        result = self.model.load_state_dict(to_load, strict=False)
        left_out = set(result.unexpected_keys) | (set(report.loaded) & set(result.missing_keys))
        if left_out:
            raise WeightsError(f"{self._current_path}: the model refused {sorted(left_out)[:8]} "
                               "while loading")
        for line in report.summary_lines():
            logger.info(line)
        self.last_report = report
        return _IncompatibleKeys(missing_keys=[], unexpected_keys=[], incorrect_shapes=[])


def load_model_weights(model, cfg, path: Optional[str] = None) -> Optional[LoadReport]:
    """Load ``path`` (default ``cfg.MODEL.WEIGHTS``) into ``model`` (a DDP wrapper is fine) with
    :class:`PretrainedCheckpointer` and ``cfg.ROOFTOP.LOAD_BACKBONE_ONLY``. Returns the report,
    or ``None`` when there is nothing to load (empty path: the model keeps its initialisation).

    The path (or URL) may be the Mask2Former model zoo's ADE20K semantic Swin-S checkpoint
    (``.../maskformer2_swin_small_bs16_160k/model_final_011c6d.pkl``: a pickled
    ``{"model": {name: numpy array}, "__author__": ...}`` in detectron2 naming), a checkpoint
    written by ``tools/convert_hf_to_d2.py`` (``.pth``), or the ``model_*.pth`` of an earlier run.
    """
    path = cfg.MODEL.WEIGHTS if path is None else path
    if not path:
        logger.info("MODEL.WEIGHTS is empty: the model starts from its initialisation")
        return None
    checkpointer = PretrainedCheckpointer(model, backbone_only=cfg.ROOFTOP.LOAD_BACKBONE_ONLY)
    checkpointer.load(path, checkpointables=[])
    return checkpointer.last_report
