"""``setup(args)``: the one way every tool builds its config."""
import argparse
import logging
import os
import re
import sys

import torch
import yaml
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..cli import ConfigError, UserError, check_config_file, check_overrides, check_weights
from ..cli import closest_key, tidy_log_handlers
from ..config import get_rooftop_cfg
from ..data.capetown import register_from_cfg
from .epochs import resolve_epochs
from .run_dir import check_output_dir
from .training_options import check_training_options

logger = logging.getLogger(__name__)


def setup(args):
    """The frozen config of ``args.config_file`` (None: the project's defaults) with the
    ``KEY VALUE`` overrides ``args.opts``, checked (a missing file, an unknown key with the
    closest one, a value of the wrong type: one :class:`ConfigError` line), adapted to this
    machine and with its dataset splits registered. Nothing is written.

    For a run of ``tools/train_net.py`` (``args`` has ``eval_only`` and ``resume``) also, before
    anything is written: epochs become iterations and the training options are checked; the
    main process decides what the run may do with ``OUTPUT_DIR`` (:func:`.check_output_dir`,
    ``--archive-old-run``), checks the weights and the dataset (``ROOFTOP.CHECK_DATASET``), and
    every other process ends with its exit status when it refuses (the main process reports
    it); then detectron2's ``default_setup`` (logging, ``config.yaml``, seeds). A process that
    torchrun restarted after a failure resumes its run (``args.resume`` becomes True)."""
    if not hasattr(args, "eval_only"):
        cfg, notes = _build(args)
        for _, note in notes:  # the tool says what matters to it
            logger.info("%s", note)
        return _frozen(cfg)
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    args.resume = args.resume or restarts > 0
    cfg = _main_process_first(lambda main: _build_run(args, main))
    default_setup(cfg, args)
    logging.getLogger("detectron2").info(
        "Environment, full config and model are in %s (not repeated here)",
        os.path.join(cfg.OUTPUT_DIR, "log.txt"))
    return cfg


def build_cfg(config_file, opts=()):
    """:func:`setup` of a tool that is not a run, from a config file and overrides."""
    return setup(argparse.Namespace(config_file=config_file, opts=list(opts)))


def _frozen(cfg):
    cfg.freeze()
    return cfg


def _build(args):
    """``(cfg, notes)``: the config, and what was changed for this machine."""
    config_file, opts = args.config_file, [str(o) for o in args.opts or ()]
    if config_file is not None:
        check_config_file(config_file)
    check_overrides(opts)
    cfg = get_rooftop_cfg()
    for where, merge in ((config_file, lambda: cfg.merge_from_file(config_file)),
                         ("command line", lambda: cfg.merge_from_list(opts))):
        if where is None:
            continue
        try:
            merge()
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
    register_from_cfg(cfg)
    return cfg, notes


def _build_run(args, main):
    """The run's config; on the main process also the decisions taken before anything is
    written."""
    cfg, notes = _build(args)
    if args.eval_only:
        if getattr(args, "archive_old_run", False):
            raise UserError("--archive-old-run is for training; --eval-only writes no run")
    else:
        notes += resolve_epochs(cfg)
        check_training_options(cfg)
    resuming = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts and not args.eval_only:
        notes.append((logging.WARNING, f"torchrun restart {restarts}: the run continues from "
                      + ("its last checkpoint" if resuming else "the start (no checkpoint yet)")))
    if main and not args.eval_only:
        archived = check_output_dir(cfg, args.resume, getattr(args, "archive_old_run", False),
                                    restarted=restarts > 0)
        if archived:
            print(f"--archive-old-run: the previous run's files are now in {archived}",
                  file=sys.stderr, flush=True)
    if main and not resuming:
        check_weights(cfg.MODEL.WEIGHTS, what="--eval-only",
                      allow_random=getattr(args, "random_weights", False) or not args.eval_only)
    setup_logging(cfg.OUTPUT_DIR)  # OUTPUT_DIR is written from here on
    for level, note in notes:
        logger.log(level, "%s", note)
    if not main:
        return _frozen(cfg)
    if not args.eval_only and cfg.ROOFTOP.CHECK_DATASET:
        from ..data.checks import check_datasets

        check_datasets(list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST))
    return _frozen(cfg)


def _main_process_first(build):
    """``build(True)`` on the main process, then ``build(False)`` on the others. When the main
    process stops (a :class:`UserError`, which it reports, or a ``SystemExit``), the others end
    with the same exit status and say nothing."""
    status = None
    if comm.is_main_process():
        try:
            return _shared(build(True), None)
        except UserError as e:
            status = e.exit_code
            _shared(None, status)
            raise
        except SystemExit as e:
            _shared(None, e.code or 0)
            raise
    status = _shared(None, None)
    if status is not None:
        raise SystemExit(status)
    return build(False)


def _shared(value, status):
    """Pass the main process's exit status (None: it goes on) to the other processes."""
    if comm.get_world_size() > 1:
        status = comm.all_gather(status)[0]
    return value if value is not None else status


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
        return ConfigError(f"{where}: {key} is not a config key"
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
