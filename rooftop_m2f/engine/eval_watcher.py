"""The base of the training hooks that act once on each evaluation (the CSV rows of
:mod:`.csv_logs`, the best checkpoints of :mod:`.best_checkpoint`)."""
from typing import Sequence

from detectron2.engine import HookBase
from detectron2.utils import comm


class EvalWatcher(HookBase):
    """Base for hooks that act once on each evaluation that detectron2's ``EvalHook`` put into
    the storage. Place them after the ``EvalHook``.

    An evaluation in ``after_step`` stores its scalars at the current iteration index ``i`` (it
    ran after ``i + 1`` completed iterations); the one in ``after_train`` stores them at
    ``trainer.iter`` (``max_iter`` after a complete run).
    """

    def __init__(self, keys: Sequence[str]):
        self._keys = list(keys)
        self._enabled = comm.is_main_process()

    def _new_eval(self, storage_iter: int) -> bool:
        latest = self.trainer.storage.latest()
        return any(latest.get(k, (None, None))[1] == storage_iter for k in self._keys)

    def after_step(self):
        if self._enabled and self._new_eval(self.trainer.iter):
            self.on_eval(self.trainer.iter + 1)

    def after_train(self):
        if (self._enabled and self.trainer.iter >= self.trainer.max_iter
                and self._new_eval(self.trainer.iter)):
            self.on_eval(self.trainer.max_iter)

    def on_eval(self, iteration: int):  # iteration: completed iterations
        raise NotImplementedError
