"""Small, documented shims for the installed detectron2 / Mask2Former, applied by :func:`apply`.

We never edit installed files and never copy their code. Each shim fixes one verified
incompatibility of the packages this project installs (see INSTALL.md), and is a no-op
when the installed package does not have the problem (for example upstream detectron2 built
from git, which has its compiled ``detectron2._C``).
"""
import importlib
import inspect
import logging
import sys
import types

logger = logging.getLogger(__name__)

_applied = False


def _has_detectron2_C() -> bool:
    try:
        importlib.import_module("detectron2._C")
        return True
    except ImportError:
        return False


def _install_fast_eval_api_fallback() -> None:
    """``import mask2former`` imports ``detectron2.evaluation.fast_eval_api``, which does
    ``from detectron2 import _C`` at import time. The PyPI snapshot of detectron2 ships a ``_C``
    built for CPython 3.10 that never loads on 3.11. detectron2 itself treats a missing
    ``fast_eval_api`` as optional and uses pycocotools' ``COCOeval`` instead; we register a
    module that does exactly that, so the import succeeds. Nothing in this project runs COCO
    instance evaluation."""
    name = "detectron2.evaluation.fast_eval_api"
    if name in sys.modules or _has_detectron2_C():
        return
    from pycocotools.cocoeval import COCOeval

    module = types.ModuleType(name)
    module.__doc__ = (
        "rooftop_m2f.compat: stand-in for detectron2's fast_eval_api, whose compiled "
        "extension is not available; COCOeval_opt is pycocotools' COCOeval."
    )
    module.COCOeval_opt = COCOeval
    sys.modules[name] = module
    logger.debug("detectron2._C not loadable: using pycocotools COCOeval for fast_eval_api")


def _patch_create_ddp_model() -> None:
    """detectron2's ``create_ddp_model`` passes ``device_ids=[local_rank]`` even for a CPU
    model, which DistributedDataParallel rejects. We wrap it to pass ``device_ids=None`` for a
    model whose parameters live on the CPU (multi-process CPU training with the GLOO backend)."""
    from detectron2.engine import defaults

    original = defaults.create_ddp_model
    if getattr(original, "_rooftop_cpu_aware", False):
        return

    def create_ddp_model(model, *, fp16_compression=False, **kwargs):
        first_param = next(model.parameters(), None)
        if first_param is not None and first_param.device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return original(model, fp16_compression=fp16_compression, **kwargs)

    create_ddp_model._rooftop_cpu_aware = True
    create_ddp_model.__doc__ = original.__doc__
    defaults.create_ddp_model = create_ddp_model


def criterion_kwargs(class_weight, mask_weight, dice_weight, dec_layers, deep_supervision):
    """Keyword arguments for the installed ``mask2former`` ``SetCriterion`` loss weights.

    ``maskformer2==0.1`` (PyPI) has a ``SetCriterion.__init__`` that takes ``class_weight,
    mask_weight, dice_weight, num_layers`` while upstream git takes ``weight_dict``. (Our
    meta-architecture builds the criterion itself, so the mismatching ``MaskFormer.from_config``
    of the PyPI package is never called.)"""
    from mask2former.modeling.criterion import SetCriterion

    params = inspect.signature(SetCriterion.__init__).parameters
    if "weight_dict" in params:  # upstream git
        weight_dict = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        if deep_supervision:
            for i in range(dec_layers - 1):
                weight_dict.update({f"loss_ce_{i}": class_weight, f"loss_mask_{i}": mask_weight,
                                    f"loss_dice_{i}": dice_weight})
        return {"weight_dict": weight_dict}
    if {"class_weight", "mask_weight", "dice_weight", "num_layers"} <= set(params):  # PyPI 0.1
        return {
            "class_weight": class_weight,
            "mask_weight": mask_weight,
            "dice_weight": dice_weight,
            "num_layers": dec_layers - 1 if deep_supervision else 0,
        }
    raise TypeError(
        "Unsupported mask2former SetCriterion signature: "
        f"{list(params)}; expected 'weight_dict' or 'class_weight/mask_weight/dice_weight/num_layers'"
    )


def apply() -> None:
    """Apply all shims once; call before importing ``mask2former``."""
    global _applied
    if _applied:
        return
    _install_fast_eval_api_fallback()
    _patch_create_ddp_model()
    _applied = True
