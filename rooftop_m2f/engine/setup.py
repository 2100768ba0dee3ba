"""``setup(args)``: the one way every tool builds its config."""
import argparse
import logging
import os
import re
import sys

import torch
import yaml
from detectron2.config import CfgNode as CN
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..cli import (ConfigError, UserError, check_config_file, check_overrides, check_weights,
                   closest_key, config_keys, tidy_log_handlers)
from ..config import (check_dataset_names, get_rooftop_cfg, ints_as_floats, opts_ints_as_floats,
                      validate)
from ..data.capetown import register_from_cfg
from .epochs import resolve_epochs
from .run_dir import check_output_dir
from .training_options import check_training_options

logger = logging.getLogger(__name__)


def setup(args):
    """The frozen, checked config of ``args.config_file`` and the overrides ``args.opts`` (a bad
    file, key or value: one :class:`ConfigError` line), adapted to this machine, its splits
    registered. For ``tools/train_net.py`` (``args.eval_only``) also, before anything is written:
    epochs become iterations, the options, ``OUTPUT_DIR``, weights and dataset are checked on
    the main process (the others end with its exit status), then detectron2's
    ``default_setup``. A process that torchrun restarted resumes its run."""
    if not hasattr(args, "eval_only"):
        cfg, notes = _build(args)
        for _, note in notes:  # the tool says what matters to it
            logger.info("%s", note)
        cfg.freeze()
        return cfg
    args.resume = args.resume or _restarts() > 0
    cfg = _main_process_first(lambda main: _build_run(args, main))
    cfg.freeze()
    default_setup(cfg, args)
    logging.getLogger("detectron2").info(
        "Environment, full config and model are in %s (not repeated here)", os.path.join(cfg.OUTPUT_DIR, "log.txt"))
    return cfg


def build_cfg(config_file, opts=()):
    """:func:`setup` of a tool that is not a run, from a config file and overrides."""
    return setup(argparse.Namespace(config_file=config_file, opts=list(opts)))


def _restarts():
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _build(args):
    """``(cfg, notes)``: the config, and what was changed for this machine."""
    config_file, opts = args.config_file, [str(o) for o in args.opts or ()]
    if config_file is not None:
        check_config_file(config_file)
    check_overrides(opts)
    cfg = get_rooftop_cfg()
    def merge_file(path):
        cfg.merge_from_other_cfg(CN(ints_as_floats(cfg.load_yaml_with_base(path), cfg)))

    for where, merge, source in ((config_file, merge_file, config_file),
                                 ("command line", cfg.merge_from_list, opts_ints_as_floats(opts, cfg))):
        try:
            if where is not None:
                merge(source)
        except (KeyError, AssertionError, ValueError) as e:
            raise _config_error(cfg, where, e) from None
        except FileNotFoundError as e:  # a _BASE_ that does not exist
            raise ConfigError(f"{where}: _BASE_ {e.filename}: no such file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: not valid YAML ({_one_line(e)})") from None
    notes = []
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        notes.append((logging.WARNING, f"MODEL.DEVICE={cfg.MODEL.DEVICE} but no CUDA device "
                      "is available: running on the CPU"))
        cfg.MODEL.DEVICE = "cpu"
    if cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cpu":
        notes.append((logging.WARNING, "SOLVER.AMP.ENABLED needs CUDA (detectron2's AMPTrainer): "
                      "AMP is off on the CPU"))
        cfg.SOLVER.AMP.ENABLED = False
    validate(cfg)
    register_from_cfg(cfg)
    check_dataset_names(cfg)
    return cfg, notes


def _build_run(args, main):
    """The run's config; on the main process also the decisions taken before anything is
    written."""
    cfg, notes = _build(args)
    archive = getattr(args, "archive_old_run", False)
    if args.eval_only and archive:
        raise UserError("--archive-old-run is for training; --eval-only writes no run")
    if not args.eval_only:
        notes += resolve_epochs(cfg)
        check_training_options(cfg)
        if _restarts():
            resuming = os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
            notes.append((logging.WARNING, f"torchrun restart {_restarts()}: the run continues from "
                          + ("its last checkpoint" if resuming else "the start (no checkpoint yet)")))
    if main and not args.eval_only:
        archived = check_output_dir(cfg, args.resume, archive, restarted=_restarts() > 0)
        if archived:
            print(f"--archive-old-run: the previous run's files are now in {archived}",
                  file=sys.stderr, flush=True)
    if main and not (args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))):
        check_weights(cfg.MODEL.WEIGHTS, what="--eval-only",
                      allow_random=getattr(args, "random_weights", False) or not args.eval_only)
    setup_logging(cfg.OUTPUT_DIR)  # OUTPUT_DIR is written from here on
    for level, note in notes:
        logger.log(level, "%s", note)
    if main and not args.eval_only and cfg.ROOFTOP.CHECK_DATASET:
        from ..data.checks import check_datasets

        check_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    return cfg


def _main_process_first(build):
    """``build(True)`` on the main process, then ``build(False)`` on the others. When the main
    process stops (a :class:`UserError`, which it reports, or a ``SystemExit``), the others end
    with the same exit status and say nothing."""
    if comm.get_world_size() == 1:
        return build(True)
    if not comm.is_main_process():
        status = comm.all_gather(None)[0]
        if status is not None:
            raise SystemExit(status)
        return build(False)
    try:
        cfg = build(True)
    except UserError as e:
        comm.all_gather(e.exit_code)
        raise
    except SystemExit as e:
        comm.all_gather(e.code or 0)
        raise
    comm.all_gather(None)
    return cfg


def _one_line(error):
    return " ".join(str(error).replace("'", "").split())


def _config_error(cfg, where, error):
    message = _one_line(error)
    missing = re.search(r"Non-existent (?:config )?key: (\S+)", message)
    if missing:
        near = closest_key(missing.group(1), list(config_keys(cfg)))
        return ConfigError(f"{where}: {missing.group(1)} is not a config key"
                           + (f"; did you mean {near}?" if near else ""))
    mismatch = re.search(r"with values \((.*) vs\. (.*)\) for config key: (\S+)", message)
    if mismatch:
        default, given, key = mismatch.groups()
        return ConfigError(f"{where}: {key} {given}: wrong type (the config has {default})")
    return ConfigError(f"{where}: {message}")


def setup_logging(output_dir):
    """detectron2's loggers for a run, tidied before anything is logged: the environment
    table, the full config and the model go to ``log.txt`` only, which has no colour codes.
    The calls repeat ``default_setup``'s exactly (``setup_logger`` is cached by its arguments),
    so it finds these handlers."""
    rank = comm.get_rank()
    setup_logger(output_dir, distributed_rank=rank, name="rooftop_m2f")
    setup_logger(output_dir, distributed_rank=rank, name="fvcore")
    setup_logger(output_dir, distributed_rank=rank)
    tidy_log_handlers("rooftop_m2f", "fvcore", "detectron2")
    # the environment table imports torch.utils.cpp_extension, which warns without CUDA
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
