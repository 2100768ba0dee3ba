"""The one definition of an epoch, in iterations, used everywhere a number of epochs becomes a
number of iterations: ``SOLVER.MAX_ITER`` (``ROOFTOP.EPOCHS``), ``TEST.EVAL_PERIOD``
(``ROOFTOP.EVAL_EVERY_EPOCHS``), ``SOLVER.CHECKPOINT_PERIOD`` (``ROOFTOP.CHECKPOINT_EVERY_EPOCHS``)
and the epochs of ``train_epoch.csv`` / ``valid_epoch.csv``.

One epoch is ``ceil(N / B)`` iterations, ``N`` the number of training images (every split of
``DATASETS.TRAIN``), ``B`` = ``SOLVER.IMS_PER_BATCH`` x ``ROOFTOP.GRAD_ACCUM_STEPS`` (an iteration
is one optimizer step, which takes that many images): the smallest number of batches that holds
every image once (detectron2's training loader is an endless shuffled stream, so the last batch
of an epoch is filled from the next one). With 10 images at 4 per batch an epoch is 3 iterations
and 100 epochs are 300 iterations, 100 CSV rows.

A number of epochs ``E`` (fractional allowed) is ``ceil(E * iters_per_epoch)`` iterations
(at least 1) for the length of the run, and ``max(1, round(E * iters_per_epoch))`` for a period.
"""
import logging
import math

from detectron2.data import DatasetCatalog

logger = logging.getLogger(__name__)


def iters_per_epoch_for(num_images: int, ims_per_batch: int) -> int:
    """``ceil(num_images / ims_per_batch)``, at least 1 (see the module doc)."""
    if ims_per_batch < 1:
        raise ValueError(f"SOLVER.IMS_PER_BATCH must be >= 1, got {ims_per_batch}")
    return max(1, math.ceil(int(num_images) / int(ims_per_batch)))


def num_train_images(cfg) -> int:
    return sum(len(DatasetCatalog.get(name)) for name in cfg.DATASETS.TRAIN)


def images_per_step(cfg) -> int:
    """Images per iteration (optimizer step): ``SOLVER.IMS_PER_BATCH * ROOFTOP.GRAD_ACCUM_STEPS``."""
    return int(cfg.SOLVER.IMS_PER_BATCH) * max(1, int(cfg.ROOFTOP.GRAD_ACCUM_STEPS))


def iters_per_epoch(cfg) -> int:
    """Iterations per epoch of ``cfg``'s training splits (they must be registered)."""
    return iters_per_epoch_for(num_train_images(cfg), images_per_step(cfg))


def epochs_to_iters(epochs: float, ipe: int) -> int:
    """The length of a run of ``epochs`` epochs: ``ceil(epochs * ipe)``, at least 1."""
    return max(1, math.ceil(float(epochs) * ipe - 1e-9))


def epochs_to_period(epochs: float, ipe: int) -> int:
    """A period of ``epochs`` epochs: ``round(epochs * ipe)``, at least 1."""
    return max(1, round(float(epochs) * ipe))


def resolve_epochs(cfg) -> int:
    """Turn ``ROOFTOP.EPOCHS`` / ``EVAL_EVERY_EPOCHS`` / ``CHECKPOINT_EVERY_EPOCHS`` (those > 0)
    into ``SOLVER.MAX_ITER`` / ``TEST.EVAL_PERIOD`` / ``SOLVER.CHECKPOINT_PERIOD`` in place;
    returns the iterations per epoch."""
    num_images = num_train_images(cfg)
    ipe = iters_per_epoch_for(num_images, images_per_step(cfg))
    if cfg.ROOFTOP.EPOCHS > 0:
        cfg.SOLVER.MAX_ITER = epochs_to_iters(cfg.ROOFTOP.EPOCHS, ipe)
        logger.info("ROOFTOP.EPOCHS=%g over %d training images at %d per optimizer step (%d "
                    "iterations per epoch): SOLVER.MAX_ITER=%d", cfg.ROOFTOP.EPOCHS, num_images,
                    images_per_step(cfg), ipe, cfg.SOLVER.MAX_ITER)
    if cfg.ROOFTOP.EVAL_EVERY_EPOCHS > 0:
        cfg.TEST.EVAL_PERIOD = epochs_to_period(cfg.ROOFTOP.EVAL_EVERY_EPOCHS, ipe)
        logger.info("ROOFTOP.EVAL_EVERY_EPOCHS=%g: TEST.EVAL_PERIOD=%d",
                    cfg.ROOFTOP.EVAL_EVERY_EPOCHS, cfg.TEST.EVAL_PERIOD)
    if cfg.ROOFTOP.CHECKPOINT_EVERY_EPOCHS > 0:
        cfg.SOLVER.CHECKPOINT_PERIOD = epochs_to_period(cfg.ROOFTOP.CHECKPOINT_EVERY_EPOCHS, ipe)
        logger.info("ROOFTOP.CHECKPOINT_EVERY_EPOCHS=%g: SOLVER.CHECKPOINT_PERIOD=%d",
                    cfg.ROOFTOP.CHECKPOINT_EVERY_EPOCHS, cfg.SOLVER.CHECKPOINT_PERIOD)
    return ipe
