"""The one launch module of tools/train_net.py: checks before anything is written, starting the
processes with bounded waits, stop signals passed on to them, their exit statuses and one-line
errors (:func:`run_training`).
"""
import datetime
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading

from detectron2.utils import comm

from ..cli import UserError, check_weights
from ..fileio import WRITE_ERRNOS, OutputWriteError
from . import activity as act
from .fault_tolerance import NonFiniteLossError, TrainingInterrupted, parse_signals
from .run_dir import RunDirError, check_output_dir

logger = logging.getLogger(__name__)

# A worker that reported its own error line exits with this status; the launcher adds nothing.
EXIT_REPORTED = 3
ONE_LINE_ERRORS = (UserError, NonFiniteLossError, RunDirError, OutputWriteError)


def _failed(message, exit_code=1):
    """The launcher's end: one line (``tools/train_net.py`` prints it through cli.run)."""
    error = UserError(message)
    error.exit_code = exit_code
    return error


def is_timeout(error) -> bool:
    """A collective or a data loader that gave up waiting."""
    if not isinstance(error, RuntimeError):
        return False
    text = str(error).lower()
    return "timed out" in text or "timeout" in text or "wait timeout" in text


def is_write_failure(error) -> bool:
    return isinstance(error, OSError) and error.errno in WRITE_ERRNOS


def is_one_line(error) -> bool:
    return isinstance(error, ONE_LINE_ERRORS) or is_timeout(error) or is_write_failure(error)


def one_line(error, cfg=None) -> str:
    """The message of a one-line error (see :func:`is_one_line`), with the rank and what this
    and the other processes were doing for a timeout."""
    if is_timeout(error):
        rank = comm.get_rank()
        mine = act.current()["activity"]
        others = act.describe_others(exclude_rank=rank)
        if "dataloader" in str(error).lower().replace(" ", ""):
            limit = f" ({cfg.ROOFTOP.LOADER_TIMEOUT_S:g} s, ROOFTOP.LOADER_TIMEOUT_S)" if cfg else ""
            head = (f"rank {rank}: a data-loader worker delivered nothing within its timeout{limit} "
                    f"while {mine}")
        else:
            limit = f" {cfg.ROOFTOP.DIST_TIMEOUT_S:g} s (ROOFTOP.DIST_TIMEOUT_S)" if cfg else ""
            head = (f"rank {rank}: gave up after waiting{limit} for the other processes while "
                    f"{mine}")
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        detail = re.sub(r"^\[[^\]]*\]\s*", "", detail)[:160]  # gloo's "[source:line] "
        return (f"{head}; the others: {others or 'no report'}. The last checkpoint is intact; "
                f"continue with --resume ({type(error).__name__}: {detail})")
    if is_write_failure(error):
        return (f"a write failed: {error}; the files written before are intact (atomic writes); "
                "free space and continue with --resume")
    return str(error)


def exit_worker_now(code: int) -> None:
    """End a spawned DDP worker with ``code`` at once, without the interpreter's teardown.

    For a worker stopped by :class:`.fault_tolerance.StopOnSignal`, after training returned: the
    checkpoint is saved (atomically, every process waited for it) and detectron2's writers closed
    their files in ``after_train``. The teardown of such a process (its communication and runtime threads)
    sometimes aborted ("terminate called without an active exception", SIGABRT: seen in about
    one full test run in three), and the launcher then reported a crash instead of the stop."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def worker_entry(main_func, args):
    """Runs ``main_func(args)`` in a spawned training process; a one-line error is logged and
    reported to the launcher, and ends the process with :data:`EXIT_REPORTED` (no traceback)."""
    try:
        return main_func(args)
    except TrainingInterrupted:
        raise
    except Exception as e:  # noqa: BLE001  (only the one-line kinds are handled)
        if not is_one_line(e):
            raise
        message = one_line(e, getattr(args, "_cfg", None))
        if not message.startswith("rank "):
            message = f"rank {comm.get_rank()}: {message}"
        logger.error("%s", message)  # log.txt[.rankN]; the launcher prints it last
        act.report_error(message)
        exit_worker_now(EXIT_REPORTED)


def prepare(args):
    """The run's config, epochs resolved; the OUTPUT_DIR decision (training); the weights and
    the dataset checked (:func:`run_training`, 1). Raises the one-line errors."""
    from .epochs import resolve_epochs
    from .setup import check_training_data, load_cfg, prepare_cfg, setup_logging
    from .training_options import check_training_options

    cfg = load_cfg(args.config_file, args.opts)
    prepare_cfg(cfg)
    resuming = args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if not args.eval_only:
        resolve_epochs(cfg)
        check_training_options(cfg)  # README "Training options": one line naming a bad key
        if args.machine_rank == 0:  # OUTPUT_DIR may be shared by the machines
            archived = check_output_dir(cfg, args.resume, getattr(args, "archive_old_run", False))
            if archived:
                print(f"--archive-old-run: the previous run's files are now in {archived}",
                      file=sys.stderr, flush=True)
    elif getattr(args, "archive_old_run", False):
        raise RunDirError("--archive-old-run is for training; --eval-only writes no run")
    if not resuming:
        check_weights(cfg.MODEL.WEIGHTS, allow_random=args.random_weights or not args.eval_only,
                      what="--eval-only")
    cfg.freeze()
    setup_logging(cfg.OUTPUT_DIR)  # the first process's handlers (cached), now that it may write
    if not args.eval_only:
        check_training_data(cfg, args.machine_rank)
    return cfg


def run_worker(args):
    """One training (or evaluation) process: what each process of ``launch`` runs."""
    from .setup import setup_cfg
    from .trainer import Trainer

    cfg = setup_cfg(args)
    if args.eval_only:
        return Trainer.test(cfg, Trainer.build_evaluation_model(cfg, resume=args.resume))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    try:
        return trainer.train()
    except TrainingInterrupted as stop:
        if args.num_gpus * args.num_machines > 1:  # a spawned worker: see exit_worker_now
            exit_worker_now(stop.code)
        raise


class _Supervisor:
    """In the launcher: passes stop signals on to the processes and kills those that have not
    stopped ``grace`` seconds later, naming them (:func:`run_training`, 4)."""

    def __init__(self, signals, grace, activity_dir):
        self.signals = list(signals)
        self.grace = float(grace)
        self.activity_dir = activity_dir
        self.context = None
        self.received = None
        self.killed = []
        self._timer = None
        for s in self.signals:
            signal.signal(s, self._on_signal)

    def _alive(self):
        return [(rank, p) for rank, p in enumerate(self.context.processes if self.context else [])
                if p.is_alive()]

    def _on_signal(self, signum, frame):
        for _, process in self._alive():
            try:
                os.kill(process.pid, signum)
            except ProcessLookupError:
                pass
        if self.received is None:
            self.received = signum
            self._timer = threading.Timer(self.grace, self._kill_the_rest)
            self._timer.daemon = True
            self._timer.start()

    def _kill_the_rest(self):
        records = act.read_activities(self.activity_dir)
        for rank, process in self._alive():
            record = records.get(rank)
            doing = act.describe(record) if record else f"rank {rank}: no report"
            self.killed.append(doing)
            process.kill()

    def message(self):
        name = signal.Signals(self.received).name
        return (f"{name}: {len(self.killed)} process(es) had not stopped {self.grace:g} s later "
                f"(ROOFTOP.STOP_GRACE_S) and were killed: {'; '.join(self.killed)}. The last "
                "complete checkpoint is intact; continue with --resume")

    def cancel(self):
        if self._timer is not None:
            self._timer.cancel()


def _launch_processes(main_func, args, cfg, supervisor):
    import torch.multiprocessing as mp
    from detectron2.engine.launch import _distributed_worker, _find_free_port

    dist_url = args.dist_url
    if dist_url == "auto":
        if args.num_machines != 1:
            raise RunDirError("--dist-url auto works on one machine only")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    timeout = datetime.timedelta(seconds=float(cfg.ROOFTOP.DIST_TIMEOUT_S))
    world_size = args.num_gpus * args.num_machines
    context = mp.start_processes(
        _distributed_worker, nprocs=args.num_gpus,
        args=(worker_entry, world_size, args.num_gpus, args.machine_rank, dist_url,
              (main_func, args), timeout),
        daemon=False, join=False)
    supervisor.context = context
    while not context.join(grace_period=float(cfg.ROOFTOP.STOP_GRACE_S)):
        pass


def run_training(args, main_func=run_worker):
    """tools/train_net.py's work: returns the exit status, or raises a :class:`UserError` whose
    one line ``cli.run`` prints. It is the whole of what the command line does around ``main``:

    1. Builds the config (epochs resolved, see :mod:`.epochs`) and runs
       :func:`.run_dir.check_output_dir`: a second run into a folder that holds one, or a resume
       that cannot be honoured, is one line before ``OUTPUT_DIR`` is touched; ``--archive-old-run``
       moves the old run into ``previous_runs/<date>/`` first. Then, still before any model is
       built or process started: the weights (given when evaluating; a file that exists and is a
       checkpoint; a URL downloaded and checked) and the dataset (every file decoded once).
    2. Starts the processes (detectron2's worker, so the same process group set-up) with
       ``ROOFTOP.DIST_TIMEOUT_S`` as the collectives' timeout. Each process records what it is
       doing (:mod:`.activity`) in a temporary folder of the launcher.
    3. A process that gives up (a collective or a data loader timed out, a non-finite loss, a
       failed write, a user error) reports one ``rank N: ...`` line saying what it and the others
       were doing, and exits; the launcher gives the others ``ROOFTOP.STOP_GRACE_S`` seconds,
       then SIGTERM, then as long again, then SIGKILL, and exits with status 1. A process that
       dies (killed, crashed in native code) is named with what it was doing.
    4. A stop signal (``ROOFTOP.STOP_SIGNALS``) to the launcher is passed on to the processes,
       which save and stop at the end of their iteration (exit status 128 + signal). A process
       that has not stopped ``ROOFTOP.STOP_GRACE_S`` seconds later (stuck in a data loader, an
       evaluation, a collective) is killed and named; the launcher then exits with 128 + signal,
       no traceback. The last complete checkpoint is untouched (saves are atomic).
    """
    from torch.multiprocessing import ProcessExitedException

    from .training_options import RunEndedByEarlyStopping

    try:
        cfg = prepare(args)
    except RunEndedByEarlyStopping as e:  # --resume of a run early stopping ended: not an error
        print(f"train_net.py: {e}", file=sys.stderr, flush=True)
        return 0
    except RunDirError as e:
        raise _failed(str(e)) from None
    args._cfg = cfg
    world_size = args.num_gpus * args.num_machines
    if world_size == 1:
        try:
            main_func(args)
        except TrainingInterrupted:
            raise
        except Exception as e:  # noqa: BLE001
            if not is_one_line(e):
                raise
            raise _failed(one_line(e, cfg), getattr(e, "exit_code", 1)) from None
        return 0

    stop_signals = [] if args.eval_only else parse_signals(cfg.ROOFTOP.STOP_SIGNALS)
    activity_dir = tempfile.mkdtemp(prefix="rooftop_m2f_activity_")
    os.environ[act.ENV_DIR] = activity_dir  # inherited by the spawned processes
    supervisor = _Supervisor(stop_signals, cfg.ROOFTOP.STOP_GRACE_S, activity_dir)
    try:
        _launch_processes(main_func, args, cfg, supervisor)
        return 0
    except ProcessExitedException as e:
        if supervisor.killed:
            raise _failed(supervisor.message(), 128 + supervisor.received) from None
        if e.exit_code in [128 + s for s in stop_signals]:
            return e.exit_code  # stopped on a signal after saving: pass it on
        records = act.read_activities(activity_dir)
        stopped = [act.describe(records[rank]) if rank in records else f"rank {rank}"
                   for rank, p in enumerate(supervisor.context.processes)
                   if rank != e.error_index and p.exitcode is not None and p.exitcode < 0]
        also = f" Stopped by the launcher: {'; '.join(stopped)}." if stopped else ""
        errors = act.read_errors(activity_dir)
        if e.exit_code == EXIT_REPORTED and e.error_index in errors:
            raise _failed(f"{errors[e.error_index]}.{also}") from None
        record = records.get(e.error_index)
        doing = act.describe(record).split(": ", 1)[-1] if record else "(no report)"
        how = (f"was killed by {e.signal_name}" if getattr(e, "signal_name", None)
               else f"exited with status {e.exit_code}")
        raise _failed(f"rank {e.error_index} {how} while {doing}; the other processes were "
                      f"stopped.{also} The last complete checkpoint is intact") from None
    finally:
        supervisor.cancel()
        shutil.rmtree(activity_dir, ignore_errors=True)
        os.environ.pop(act.ENV_DIR, None)
