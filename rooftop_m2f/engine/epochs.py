"""The one definition of an epoch, in iterations (optimizer steps): ``ceil(N / B)``, ``N`` the
training images (every split of ``DATASETS.TRAIN``), ``B`` = ``SOLVER.IMS_PER_BATCH`` x
``ROOFTOP.GRAD_ACCUM_STEPS``. ``E`` epochs are ``ceil(E x that)`` iterations for the length of a
run and ``round(E x that)`` (at least 1) for a period. The CSV epochs count the same way."""
import logging
import math

from detectron2.data import DatasetCatalog


def iters_per_epoch_for(num_images: int, ims_per_step: int) -> int:
    return max(1, math.ceil(int(num_images) / int(ims_per_step)))


def images_per_step(cfg) -> int:
    return int(cfg.SOLVER.IMS_PER_BATCH) * max(1, int(cfg.ROOFTOP.GRAD_ACCUM_STEPS))


def iters_per_epoch(cfg) -> int:
    """Iterations per epoch of ``cfg``'s (registered) training splits."""
    return iters_per_epoch_for(sum(len(DatasetCatalog.get(n)) for n in cfg.DATASETS.TRAIN), images_per_step(cfg))


def resolve_epochs(cfg):
    """Set ``SOLVER.MAX_ITER`` / ``TEST.EVAL_PERIOD`` / ``SOLVER.CHECKPOINT_PERIOD`` from
    ``ROOFTOP.EPOCHS`` / ``EVAL_EVERY_EPOCHS`` / ``CHECKPOINT_EVERY_EPOCHS`` (those > 0), in
    place; return ``(level, message)`` notes saying what was set."""
    keys = [k for k in (("EPOCHS", "SOLVER", "MAX_ITER", lambda x: math.ceil(x - 1e-9)),
                        ("EVAL_EVERY_EPOCHS", "TEST", "EVAL_PERIOD", round),
                        ("CHECKPOINT_EVERY_EPOCHS", "SOLVER", "CHECKPOINT_PERIOD", round))
            if cfg.ROOFTOP[k[0]] > 0]
    ipe = iters_per_epoch(cfg) if keys else 0
    for key, section, target, rounding in keys:
        cfg[section][target] = max(1, rounding(float(cfg.ROOFTOP[key]) * ipe))
    return [(logging.INFO, f"ROOFTOP.{key}={cfg.ROOFTOP[key]:g} at {ipe} iterations per epoch "
             f"({images_per_step(cfg)} images per step): {section}.{target}={cfg[section][target]}")
            for key, section, target, _ in keys]
