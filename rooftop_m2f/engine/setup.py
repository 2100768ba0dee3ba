"""Config set-up shared by the command-line tools: build, check and freeze a run's config."""
import logging
import os
import re

import torch
import yaml
from detectron2.engine import default_setup
from detectron2.utils.logger import setup_logger

from ..cli import ConfigError, check_config_file, check_overrides, closest_key, tidy_log_handlers
from ..config import get_rooftop_cfg, validate
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
    """Config from a YAML file and ``KEY VALUE`` overrides; nothing else happens. A missing file,
    a key that does not exist (answered with the closest valid key) or a value of the wrong type
    is a :class:`ConfigError` naming it."""
    opts = [str(o) for o in opts]
    if config_file is not None:
        check_config_file(config_file)
    check_overrides(opts)
    cfg = get_rooftop_cfg()
    try:
        if config_file is not None:  # None: the project's defaults (add_rooftop_config)
            cfg.merge_from_file(config_file)
    except (KeyError, AssertionError, ValueError) as e:
        raise _config_error(cfg, config_file, e) from None
    except FileNotFoundError as e:  # a _BASE_ that does not exist
        raise ConfigError(f"{config_file}: _BASE_ {e.filename}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{config_file}: not valid YAML ({_one_line(e)})") from None
    try:
        cfg.merge_from_list(opts)
    except (KeyError, AssertionError, ValueError) as e:
        raise _config_error(cfg, "command line", e) from None
    return validate(cfg)


def _one_line(error):
    return " ".join(str(error).replace("'", "").split())


def _config_keys(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _config_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _config_error(cfg, where, error):
    message = _one_line(error)
    missing = re.search(r"Non-existent (?:config )?key: (\S+)", message)
    if missing:
        key = missing.group(1)
        near = closest_key(key, list(_config_keys(cfg)))
        hint = f"; did you mean {near}?" if near else ""
        return ConfigError(f"{where}: {key} is not a config key{hint}")
    mismatch = re.search(r"with values \((.*) vs\. (.*)\) for config key: (\S+)", message)
    if mismatch:
        default, given, key = mismatch.groups()
        return ConfigError(f"{where}: {key} {given}: wrong type (the config has {default})")
    return ConfigError(f"{where}: {message}")


def prepare_cfg(cfg):
    """Adapt the config to this machine and register the dataset splits it names."""
    _adapt_to_device(cfg)
    register_from_cfg(cfg)


def build_cfg(config_file, opts=(), freeze=True):
    """:func:`load_cfg`, adapted to the machine, with the dataset splits registered from it.
    No files are written (prediction and other tools)."""
    cfg = load_cfg(config_file, opts)
    prepare_cfg(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def setup_cfg(args):
    """For training and evaluation: :func:`build_cfg`, epochs resolved to iterations, then
    detectron2's default set-up (OUTPUT_DIR, its config.yaml, logging, seeds)."""
    cfg = load_cfg(args.config_file, args.opts)
    setup_logging(cfg.OUTPUT_DIR)
    prepare_cfg(cfg)
    if not args.eval_only:
        resolve_epochs(cfg)
    cfg.freeze()
    default_setup(cfg, args)
    logging.getLogger("detectron2").info(
        "Environment, full config and model are in %s (not repeated here)",
        os.path.join(cfg.OUTPUT_DIR, "log.txt"))
    return cfg


def check_training_data(cfg, machine_rank=0):
    """Before training: with ``ROOFTOP.CHECK_DATASET`` (the default), the first machine decodes
    every file of the training and test splits once (:func:`rooftop_m2f.data.checks.check_datasets`) and
    raises one :class:`DatasetError` listing every problem, before any model is built."""
    if not cfg.ROOFTOP.CHECK_DATASET or machine_rank != 0:
        return None
    from ..data.checks import check_datasets

    return check_datasets(cfg.DATASETS.TRAIN + cfg.DATASETS.TEST)


def setup_logging(output_dir):
    """detectron2's loggers for a run (console on the main process, ``log.txt`` for all), tidied
    before anything is logged: the environment table, the full config and the model go to
    ``log.txt`` only, and ``log.txt`` has no colour codes. The ``setup_logger`` calls repeat
    ``default_setup``'s (it is cached), so that one finds the same handlers."""
    rank = _rank()
    setup_logger(output=output_dir, distributed_rank=rank, name="rooftop_m2f")
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    setup_logger(output_dir, distributed_rank=rank)
    tidy_log_handlers("rooftop_m2f", "fvcore", "detectron2")
    # detectron2's environment table imports torch.utils.cpp_extension, which warns on every
    # machine without a GPU that it found no CUDA runtime; our op's build says what it found.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _rank():
    from detectron2.utils import comm

    return comm.get_rank()
