"""The top-K best checkpoints of a run: ``model_best_iter=<iter>_valid_<metric>=<score>.pth``,
their index ``best_checkpoints.json`` and the ``model_best.pth`` link (README, "What lands in
OUTPUT_DIR"). Only the main process saves them.
"""
import json
import logging
import math
import os
import re
from typing import Dict, List, Optional

from ..fileio import atomic_path
from .eval_watcher import EvalWatcher

logger = logging.getLogger(__name__)

BEST_JSON = "best_checkpoints.json"
BEST_LINK = "model_best.pth"

BEST_NAME_RE = re.compile(r"^model_best_iter=(\d{7,})_valid_(.+)=(-?\d+\.\d+)\.pth$")


def best_checkpoint_name(iteration: int, metric: str, score: float) -> str:
    """``model_best_iter=0031000_valid_macro_fg_mIoU=0.6620`` (no extension; the checkpointer
    adds ``.pth``)."""
    return f"model_best_iter={iteration:07d}_valid_{metric.split('/')[-1]}={score:.4f}"


class TopKBestCheckpointer(EvalWatcher):
    """Keep the ``top_k`` checkpoints with the highest ``metric`` (e.g.
    ``sem_seg/macro_fg_mIoU``), saved with the trainer's checkpointer (so with whatever atomic
    writing it does) as ``model_best_iter=<7-digit completed iterations>_valid_<name>=<4
    decimals>.pth``. ``best_checkpoints.json`` lists them best first (ties: the earlier
    iteration first) and ``model_best.pth`` links to the best.

    ``Checkpointer.save`` also re-points detectron2's ``last_checkpoint`` at the file it wrote;
    this hook puts the previous pointer back (or removes it when there was none), so ``--resume``
    is never sent to a best checkpoint that may later be pruned. A run resumed at ``s`` deletes
    (with a warning) the best checkpoints of iterations after ``s``: it redoes them.
    """

    def __init__(self, checkpointer, output_dir: str, metric: str, top_k: int):
        super().__init__([metric])
        if top_k < 1:
            raise ValueError(f"ROOFTOP.BEST_CHECKPOINT_TOPK must be >= 1, got {top_k}")
        self.checkpointer = checkpointer
        self.output_dir = output_dir
        self.metric = metric
        self.short = metric.split("/")[-1]
        self.top_k = int(top_k)
        self.entries: List[Dict] = []  # {"file", "iteration", "score"}, best first

    # -- state on disk ----------------------------------------------------------------------
    def _path(self, name):
        return os.path.join(self.output_dir, name)

    def _sort(self):
        self.entries.sort(key=lambda e: (-e["score"], e["iteration"]))

    def _write_index(self):
        payload = {"metric": self.metric, "mode": "max", "top_k": self.top_k,
                   "best": self.entries[0]["file"] if self.entries else None,
                   "checkpoints": self.entries}
        with atomic_path(self._path(BEST_JSON)) as tmp:
            with open(tmp, "w") as f:
                json.dump(payload, f, indent=2)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
        link = self._path(BEST_LINK)
        if not self.entries:
            if os.path.islink(link):
                os.remove(link)
            return
        try:
            with atomic_path(link) as tmp:
                os.remove(tmp)
                os.symlink(self.entries[0]["file"], tmp)
        except OSError as e:
            logger.warning("cannot link %s -> %s (%s); see %s for the best checkpoint", link,
                           self.entries[0]["file"], e, BEST_JSON)

    def _load_existing(self) -> List[Dict]:
        """Entries from best_checkpoints.json, plus files matching the name pattern that it does
        not list (a kill between saving and indexing), each only if its file exists."""
        found: Dict[str, Dict] = {}
        index = self._path(BEST_JSON)
        if os.path.exists(index):
            try:
                with open(index) as f:
                    payload = json.load(f)
                for e in payload.get("checkpoints", []):
                    found[e["file"]] = {"file": e["file"], "iteration": int(e["iteration"]),
                                        "score": float(e["score"])}
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning("%s is unreadable (%s); rebuilding the best checkpoints from file "
                               "names", index, e)
        for name in sorted(os.listdir(self.output_dir)) if os.path.isdir(self.output_dir) else []:
            match = BEST_NAME_RE.match(name)
            if match and match.group(2) == self.short and name not in found:
                logger.info("%s: best checkpoint not in %s; taken from its name", name, BEST_JSON)
                found[name] = {"file": name, "iteration": int(match.group(1)),
                               "score": float(match.group(3))}
        out = []
        for name, e in found.items():
            if os.path.exists(self._path(name)):
                out.append(e)
            else:
                logger.warning("%s lists %s, which does not exist; forgotten", BEST_JSON, name)
        return out

    def _delete(self, entry, why):
        path = self._path(entry["file"])
        logger.warning("Deleting best checkpoint %s (%s)", path, why)
        if os.path.exists(path):
            os.remove(path)

    def before_train(self):
        if not self._enabled:
            return
        start = self.trainer.start_iter
        entries = self._load_existing()
        self.entries = []
        for e in entries:
            if e["iteration"] > start:
                self._delete(e, f"iteration {e['iteration']} is after the checkpoint this run "
                                f"starts from ({start}); it will be redone")
            else:
                self.entries.append(e)
        self._sort()
        for e in self.entries[self.top_k:]:
            self._delete(e, f"not in the top {self.top_k}")
        self.entries = self.entries[: self.top_k]
        if entries or os.path.exists(self._path(BEST_JSON)):
            self._write_index()

    # -- on each evaluation ------------------------------------------------------------------
    def on_eval(self, iteration: int):
        value = self.trainer.storage.latest().get(self.metric)
        if value is None or value[1] != self.trainer.iter:
            logger.warning("%s was not computed at iteration %d (undefined?); no best-checkpoint "
                           "decision", self.metric, iteration)
            return
        score = float(value[0])
        if not math.isfinite(score):
            logger.warning("%s = %s at iteration %d; not a best checkpoint", self.metric, score,
                           iteration)
            return
        self.consider(iteration, score)

    def consider(self, iteration: int, score: float) -> Optional[str]:
        """Save a checkpoint for ``score`` at ``iteration`` (completed iterations) if it enters
        the top K; prune the one it pushes out. Returns the file name saved, or None."""
        if len(self.entries) >= self.top_k:
            worst = self.entries[-1]
            if (-score, iteration) >= (-worst["score"], worst["iteration"]):
                logger.info("%s = %.4f at iteration %d: not in the top %d (worst kept %.4f)",
                            self.metric, score, iteration, self.top_k, worst["score"])
                return None
        name = best_checkpoint_name(iteration, self.metric, score)
        self._save(name, iteration, score)
        self.entries = [e for e in self.entries if e["file"] != name + ".pth"]
        self.entries.append({"file": name + ".pth", "iteration": iteration, "score": score})
        self._sort()
        pruned = self.entries[self.top_k:]
        self.entries = self.entries[: self.top_k]
        self._write_index()
        for e in pruned:
            self._delete(e, f"pushed out of the top {self.top_k}")
        logger.info("Best checkpoints by %s: %s", self.metric,
                    ", ".join(f"{e['file']}" for e in self.entries))
        return name + ".pth"

    def _save(self, name, iteration, score):
        tag = self._path("last_checkpoint")
        previous = None
        if os.path.exists(tag):
            with open(tag) as f:
                previous = f.read().strip() or None
        self.checkpointer.save(name, iteration=iteration - 1, valid_metric=self.metric,
                               valid_score=score)
        if previous is not None:
            self.checkpointer.tag_last_checkpoint(previous)
        elif os.path.exists(tag):
            os.remove(tag)
