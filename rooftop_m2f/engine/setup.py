"""Config set-up shared by the command-line tools: build, check and freeze a run's config."""
import logging

import torch
from detectron2.engine import default_setup
from detectron2.utils.logger import setup_logger

from ..config import get_rooftop_cfg
from ..data.capetown import register_from_cfg
from .epochs import resolve_epochs  # noqa: F401  (re-exported: the one definition of an epoch)

logger = logging.getLogger(__name__)


def _adapt_to_device(cfg):
    """A config written for GPUs, run where there is none: say so, and run it on the CPU."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but no CUDA device is available: running on the CPU",
                       cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    if cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu":
        logger.warning("SOLVER.AMP.ENABLED needs CUDA (detectron2's AMPTrainer): AMP is off on the CPU")
        cfg.SOLVER.AMP.ENABLED = False


def load_cfg(config_file, opts=()):
    """Config from a YAML file and ``KEY VALUE`` overrides; nothing else happens."""
    cfg = get_rooftop_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def _prepare(cfg):
    _adapt_to_device(cfg)
    register_from_cfg(cfg)


def build_cfg(config_file, opts=(), freeze=True):
    """:func:`load_cfg`, adapted to the machine, with the dataset splits registered from it.
    No files are written (prediction and other tools)."""
    cfg = load_cfg(config_file, opts)
    _prepare(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def setup_cfg(args):
    """For training and evaluation: :func:`build_cfg`, epochs resolved to iterations, then
    detectron2's default set-up (OUTPUT_DIR, its config.yaml, logging, seeds)."""
    cfg = load_cfg(args.config_file, args.opts)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=_rank(), name="rooftop_m2f")
    _prepare(cfg)
    if not args.eval_only:
        resolve_epochs(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def _rank():
    from detectron2.utils import comm

    return comm.get_rank()
