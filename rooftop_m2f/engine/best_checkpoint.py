"""The top-K best checkpoints of a run (main process): ``model_best_iter=<iter>_valid_<metric>=
<score>.pth``, their index ``best_checkpoints.json`` and the ``model_best.pth`` link."""
import json
import logging
import os
import re
from pathlib import Path

from ..fileio import write_text_atomic
from .csv_logs import EvalWatcher, evaluated

logger = logging.getLogger(__name__)

BEST_JSON, BEST_LINK = "best_checkpoints.json", "model_best.pth"
BEST_NAME_RE = re.compile(r"^model_best_iter=(\d{7,})_valid_(.+)=(-?\d+\.\d+)\.pth$")


def best_checkpoint_name(iteration: int, metric: str, score: float) -> str:
    """``model_best_iter=0031000_valid_macro_fg_mIoU=0.6620`` (the checkpointer adds .pth)."""
    return f"model_best_iter={iteration:07d}_valid_{metric.split('/')[-1]}={score:.4f}"


class TopKBestCheckpointer(EvalWatcher):
    """Keeps the ``top_k`` checkpoints with the highest ``metric``, saved with the trainer's
    checkpointer; ``best_checkpoints.json`` lists them best first (ties: the earlier iteration
    first) and ``model_best.pth`` links to the best. ``last_checkpoint`` keeps naming the
    checkpoint ``--resume`` continues. The files' names are the state: a run resumed at ``s``
    finds them in OUTPUT_DIR and deletes (with a warning) those of iterations after ``s``."""

    def __init__(self, checkpointer, output_dir: str, metric: str, top_k: int):
        super().__init__([metric])
        self.checkpointer, self.output_dir = checkpointer, output_dir
        self.metric, self.top_k = metric, int(top_k)
        self.entries = []  # {"file", "iteration", "score"}, best first

    def _path(self, name):
        return os.path.join(self.output_dir, name)

    def _delete(self, entry, why):
        logger.warning("Deleting best checkpoint %s (%s)", self._path(entry["file"]), why)
        os.remove(self._path(entry["file"]))

    def before_train(self):
        if not self._enabled:
            return
        matches = [BEST_NAME_RE.match(n) for n in sorted(os.listdir(self.output_dir))] \
            if os.path.isdir(self.output_dir) else []
        found = [{"file": m.group(0), "iteration": int(m.group(1)), "score": float(m.group(3))}
                 for m in matches if m and m.group(2) == self.metric.split("/")[-1]]
        start = self.trainer.start_iter
        for e in found:
            if e["iteration"] > start:
                self._delete(e, f"after the checkpoint this run starts from ({start}); redone")
        self.entries = [e for e in found if e["iteration"] <= start]
        if found:
            self._prune()

    def _prune(self):
        """Keep the top K, write the index and the link, delete the others."""
        self.entries.sort(key=lambda e: (-e["score"], e["iteration"]))
        pruned, self.entries = self.entries[self.top_k:], self.entries[: self.top_k]
        best = self.entries[0]["file"] if self.entries else None
        write_text_atomic(self._path(BEST_JSON), json.dumps(
            {"metric": self.metric, "mode": "max", "top_k": self.top_k, "best": best,
             "checkpoints": self.entries}, indent=2) + "\n")
        link, tmp = self._path(BEST_LINK), self._path(f".{BEST_LINK}.tmp")
        try:
            for stale in (tmp, link if best is None else None):
                if stale and os.path.lexists(stale):
                    os.remove(stale)
            if best is not None:
                os.symlink(best, tmp)
                os.replace(tmp, link)
        except OSError as e:
            logger.warning("cannot link %s -> %s (%s); see %s", link, best, e, BEST_JSON)
        for e in pruned:
            self._delete(e, f"not in the top {self.top_k}")

    def on_eval(self, iteration: int):
        score = evaluated(self.trainer, self.metric)
        if score is None:
            logger.warning("%s is not a number at iteration %d; no best-checkpoint decision",
                           self.metric, iteration)
        else:
            self.consider(iteration, score)

    def consider(self, iteration: int, score: float):
        """Save a checkpoint for ``score`` after ``iteration`` completed iterations if it enters
        the top K, pruning the one it pushes out; return the file name saved, or None."""
        last = self.entries[-1] if len(self.entries) >= self.top_k else None
        if last and (-score, iteration) >= (-last["score"], last["iteration"]):
            logger.info("%s = %.4f at iteration %d: not in the top %d", self.metric, score,
                        iteration, self.top_k)
            return None
        name, tag = best_checkpoint_name(iteration, self.metric, score), self._path("last_checkpoint")
        previous = Path(tag).read_text().strip() if os.path.exists(tag) else None
        self.checkpointer.save(name, iteration=iteration - 1, valid_metric=self.metric, valid_score=score)
        if previous:  # the save tagged the best checkpoint: --resume continues the other
            self.checkpointer.tag_last_checkpoint(previous)
        elif os.path.exists(tag):
            os.remove(tag)
        self.entries = [e for e in self.entries if e["file"] != name + ".pth"]
        self.entries.append({"file": name + ".pth", "iteration": iteration, "score": score})
        self._prune()
        logger.info("Best checkpoints by %s: %s", self.metric, ", ".join(e["file"] for e in self.entries))
        return name + ".pth"
