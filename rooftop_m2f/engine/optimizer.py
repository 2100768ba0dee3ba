"""AdamW (or SGD) with a backbone learning-rate multiplier, optional layer-wise decay of the
Swin backbone's learning rates (ROOFTOP.LAYER_DECAY), no weight decay on norms and embeddings,
and optional whole-model gradient-norm clipping."""
import itertools
import re

import torch
from detectron2.solver.build import maybe_add_gradient_clipping

NORM_TYPES = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
              torch.nn.GroupNorm, torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d,
              torch.nn.InstanceNorm3d, torch.nn.LayerNorm, torch.nn.LocalResponseNorm)
# Parameters that are embeddings or position tables (Swin, pixel decoder, transformer decoder).
EMBEDDING_NAMES = ("relative_position_bias_table", "absolute_pos_embed", "level_embed",
                   "query_embed", "query_feat")


def layer_decay_stage(param_name: str):
    """The Swin stage of a backbone parameter for ``ROOFTOP.LAYER_DECAY``: 0 for the patch
    embedding (and absolute position embedding), ``i + 1`` for ``layers.i`` (its blocks and the
    patch merging at its end) and ``norm<i>``; None otherwise."""
    if re.match(r"^backbone\.(patch_embed\.|absolute_pos_embed$)", param_name):
        return 0
    match = re.match(r"^backbone\.(?:layers\.(\d+)\.|norm(\d+)\.)", param_name)
    return int(match.group(1) or match.group(2)) + 1 if match else None


def param_groups(cfg, model):
    """One group per parameter with its own lr and weight decay.

    ``ROOFTOP.LAYER_DECAY`` = d < 1: a backbone parameter of Swin stage s (1..S, S =
    ``len(MODEL.SWIN.DEPTHS)``) learns at ``lr * d ** (S - s)``, the patch embedding at
    ``lr * d ** S`` (:func:`layer_decay_stage`); heads untouched."""
    s, decay, num_stages = cfg.SOLVER, float(cfg.ROOFTOP.LAYER_DECAY), len(cfg.MODEL.SWIN.DEPTHS)
    groups, seen = [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            lr, full_name = s.BASE_LR, f"{module_name}.{name}"
            if module_name.startswith("backbone"):
                lr *= s.BACKBONE_MULTIPLIER
                stage = layer_decay_stage(full_name) if decay != 1.0 else num_stages
                if stage is None:
                    raise ValueError(f"ROOFTOP.LAYER_DECAY={decay:g} is for the Swin backbone; "
                                     f"{full_name} is not in one of its stages")
                lr *= decay ** (num_stages - stage)
            embedding = isinstance(module, torch.nn.Embedding) or name in EMBEDDING_NAMES
            weight_decay = (s.WEIGHT_DECAY_NORM if isinstance(module, NORM_TYPES)
                            else s.WEIGHT_DECAY_EMBED if embedding else s.WEIGHT_DECAY)
            groups.append({"params": [param], "lr": lr, "weight_decay": weight_decay})
    return groups


def _with_full_model_clipping(optimizer_cls, max_norm):
    """A subclass of ``optimizer_cls`` that clips the norm of all gradients together before
    each step (detectron2's own clipping works per parameter group)."""

    class FullModelGradientClipping(optimizer_cls):
        def step(self, closure=None):
            torch.nn.utils.clip_grad_norm_(itertools.chain.from_iterable(g["params"] for g in self.param_groups),
                                           max_norm)
            return super().step(closure=closure)

    FullModelGradientClipping.__name__ = f"{optimizer_cls.__name__}FullModelGradientClipping"
    return FullModelGradientClipping


def build_optimizer(cfg, model):
    s = cfg.SOLVER
    if s.OPTIMIZER not in ("ADAMW", "SGD"):
        raise ValueError(f"SOLVER.OPTIMIZER={s.OPTIMIZER!r}: expected 'ADAMW' or 'SGD'")
    optimizer_cls = torch.optim.AdamW if s.OPTIMIZER == "ADAMW" else torch.optim.SGD
    kwargs = {} if s.OPTIMIZER == "ADAMW" else {"momentum": s.MOMENTUM}
    if s.CLIP_GRADIENTS.ENABLED and s.CLIP_GRADIENTS.CLIP_TYPE == "full_model":
        optimizer_cls = _with_full_model_clipping(optimizer_cls, s.CLIP_GRADIENTS.CLIP_VALUE)
    else:  # detectron2's per-group "value" / "norm" clipping, or none
        optimizer_cls = maybe_add_gradient_clipping(cfg, optimizer_cls)
    return optimizer_cls(param_groups(cfg, model), s.BASE_LR, **kwargs)
