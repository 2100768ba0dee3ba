"""What each training process is doing, so that a stuck or dead one can be named.

Each process records its current activity ("training from iteration 0", "evaluating
capetown_sem_seg_val", "saving model_0000999.pth") with :func:`activity` (a context manager) or
:func:`set_activity`. When the launcher sets ``ROOFTOP_ACTIVITY_DIR`` (a temporary folder of
its own, never ``OUTPUT_DIR``) every change is also written to ``<dir>/rank<N>.json``, so that
the process that timed out waiting for the others, and the launcher, can say which rank was
doing what, and since when. Changes are rare (a handful per evaluation or checkpoint), never
per iteration.

Test hook: ``ROOFTOP_TEST_STALL=<rank>:<seconds>`` makes that rank sleep in the first image its
evaluation data loader maps (a stuck evaluation), for the tests of the timeouts.
"""
import contextlib
import json
import logging
import os
import time

logger = logging.getLogger(__name__)

ENV_DIR = "ROOFTOP_ACTIVITY_DIR"
ENV_STALL = "ROOFTOP_TEST_STALL"

_current = {"activity": "starting", "since": time.time()}


def _rank():
    from detectron2.utils import comm

    return comm.get_rank()


def current():
    return dict(_current)


def set_activity(text):
    _current.update(activity=str(text), since=time.time())
    directory = os.environ.get(ENV_DIR)
    if not directory:
        return
    rank = _rank()
    path = os.path.join(directory, f"rank{rank}.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump({"rank": rank, "pid": os.getpid(), **_current}, f)
        os.replace(tmp, path)
    except OSError as e:  # a report, never a reason to stop training
        logger.debug("cannot record the activity in %s: %s", path, e)


@contextlib.contextmanager
def activity(text):
    """Record ``text`` as this process's activity while the block runs, then the previous one.
    A block left by an exception keeps its activity: the report of the error says where."""
    previous = _current["activity"]
    set_activity(text)
    yield
    set_activity(previous)


def report_error(message):
    """Leave this process's one-line error for the launcher (``<dir>/error_rank<N>.txt``)."""
    directory = os.environ.get(ENV_DIR)
    if directory:
        with contextlib.suppress(OSError):
            with open(os.path.join(directory, f"error_rank{_rank()}.txt"), "w") as f:
                f.write(message)


def read_errors(directory):
    """``{rank: message}`` left by :func:`report_error`."""
    out = {}
    if directory and os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith("error_rank") and name.endswith(".txt"):
                with contextlib.suppress(OSError, ValueError):
                    with open(os.path.join(directory, name)) as f:
                        out[int(name[len("error_rank"):-len(".txt")])] = f.read().strip()
    return out


def read_activities(directory):
    """``{rank: {"rank", "pid", "activity", "since"}}`` from ``directory`` (missing: empty)."""
    out = {}
    if not directory or not os.path.isdir(directory):
        return out
    for name in os.listdir(directory):
        if name.startswith("rank") and name.endswith(".json"):
            try:
                with open(os.path.join(directory, name)) as f:
                    record = json.load(f)
                out[int(record["rank"])] = record
            except (OSError, ValueError, KeyError):
                continue
    return out


def describe(record, now=None):
    """``rank 1: evaluating capetown_sem_seg_val (for 23 s)``"""
    age = (now or time.time()) - float(record.get("since", 0))
    return f"rank {record['rank']}: {record['activity']} (for {age:.0f} s)"


def describe_others(exclude_rank=None, directory=None):
    records = read_activities(directory or os.environ.get(ENV_DIR))
    now = time.time()
    return "; ".join(describe(r, now) for k, r in sorted(records.items()) if k != exclude_rank)


class StallForTests:
    """Wraps the evaluation mapper: with ``ROOFTOP_TEST_STALL=<rank>:<seconds>``, that rank
    sleeps before mapping its first image (see the module doc). Inert otherwise."""

    def __init__(self, mapper):
        self.mapper = mapper
        self._done = False

    @staticmethod
    def wanted():
        return bool(os.environ.get(ENV_STALL))

    def __call__(self, dataset_dict):
        if not self._done:
            self._done = True
            rank, seconds = os.environ[ENV_STALL].split(":")
            if int(rank) == _rank():
                logger.warning("%s: rank %s stalls for %s s (test hook)", ENV_STALL, rank, seconds)
                time.sleep(float(seconds))
        return self.mapper(dataset_dict)
