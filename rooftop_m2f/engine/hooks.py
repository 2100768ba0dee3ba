"""Where the output hooks go: :func:`add_output_hooks` puts the CSV epoch logs
(:mod:`.csv_logs`) and the top-K best checkpointer (:mod:`.best_checkpoint`) into the
trainer's hook list, each at its place.
"""
import logging
from typing import List

from detectron2.data import MetadataCatalog
from detectron2.engine import hooks as d2_hooks
from detectron2.utils import comm

from .best_checkpoint import TopKBestCheckpointer
from .csv_logs import EpochClock, EpochCSVWriter, EvalCSVWriter, MetricsJSONResumeTrim
from .epochs import iters_per_epoch

logger = logging.getLogger(__name__)


def add_output_hooks(trainer, hook_list: List) -> List:
    """Insert the CSV writers and the best checkpointer into ``hook_list`` (detectron2's
    ``DefaultTrainer.build_hooks`` list, possibly extended) at their places, in place:
    the training-row writer right after ``LRScheduler`` (before any ``PeriodicCheckpointer``),
    the evaluation writers and the best checkpointer right after ``EvalHook``."""
    cfg = trainer.cfg
    output_dir = cfg.OUTPUT_DIR
    ipe = iters_per_epoch(cfg)
    kinds = [type(h) for h in hook_list]
    clock = EpochClock(ipe)
    hook_list.insert(0, MetricsJSONResumeTrim(output_dir))

    def index_of(kind):
        return next((i for i, h in enumerate(hook_list) if isinstance(h, kind)), None)

    if cfg.ROOFTOP.CSV_LOGS:
        at = index_of(d2_hooks.LRScheduler)
        if at is None:
            raise RuntimeError(f"no LRScheduler hook in {kinds}; cannot place EpochCSVWriter")
        ckpt = index_of(d2_hooks.PeriodicCheckpointer)
        if ckpt is not None and ckpt <= at:
            raise RuntimeError(f"PeriodicCheckpointer before LRScheduler in {kinds}")
        epoch_writer = EpochCSVWriter(output_dir, ipe)
        clock = epoch_writer.clock  # shared: a resume that moves the epoch origin moves both
        hook_list.insert(at + 1, epoch_writer)
    at = index_of(d2_hooks.EvalHook)
    if at is None:
        logger.warning("no EvalHook in the trainer's hooks: no valid_epoch.csv, no best checkpoints")
        return hook_list
    after_eval = []
    test_sets = list(cfg.DATASETS.TEST)
    if cfg.ROOFTOP.CSV_LOGS and test_sets:
        prefixes = {test_sets[0]: ""} if len(test_sets) == 1 else {n: f"{n}/" for n in test_sets}
        class_names = MetadataCatalog.get(test_sets[0]).get("stuff_classes", None) or []
        after_eval.append(EvalCSVWriter(output_dir, clock, {n: p + "sem_seg/" for n, p in prefixes.items()},
                                        class_names, "ema" if cfg.ROOFTOP.EMA.ENABLED else "raw"))
    if cfg.ROOFTOP.BEST_CHECKPOINT_TOPK > 0 and test_sets and comm.is_main_process():
        metric = cfg.ROOFTOP.BEST_CHECKPOINT_METRIC
        if len(test_sets) > 1:
            metric = f"{test_sets[0]}/{metric}"
        checkpointer = trainer.checkpointer
        after_eval.append(TopKBestCheckpointer(checkpointer, checkpointer.save_dir, metric,
                                               cfg.ROOFTOP.BEST_CHECKPOINT_TOPK))
    hook_list[at + 1:at + 1] = after_eval
    return hook_list
