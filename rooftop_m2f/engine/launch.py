"""``launch(main_func, args)``: a tool's processes, started the way PyTorch jobs start. Under
``torchrun`` or ``srun`` (ranks in the environment) this process is one rank; otherwise
detectron2's ``launch`` starts ``args.num_gpus`` processes per machine and passes stop signals
on to them. Collectives wait at most ``args.dist_timeout`` seconds; an error whose message says
it all ends its process with one line naming the rank, and the launcher stops the others."""
import datetime
import logging
import multiprocessing
import os
import re
import signal
import sys

import torch
import torch.distributed as dist
from detectron2.engine import launch as d2_launch
from detectron2.utils import comm
from torch.multiprocessing import ProcessExitedException

from .. import cli
from ..fileio import OutputWriteError

DEFAULT_TIMEOUT_S = 1800.0
PASSED_ON = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def launch(main_func, args):
    """Run ``main_func(args)`` in every process of the job and return the exit status (0 when
    ``main_func`` returns). ``args`` may have ``num_gpus``, ``num_machines``, ``machine_rank``,
    ``dist_url`` (``"auto"``: a free port on this machine) and ``dist_timeout`` (seconds)."""
    timeout = datetime.timedelta(seconds=float(getattr(args, "dist_timeout", DEFAULT_TIMEOUT_S)))
    num_gpus, num_machines = getattr(args, "num_gpus", 1), getattr(args, "num_machines", 1)
    ranks = ranks_from_environment()
    if ranks is not None:
        if num_gpus * num_machines != 1:
            raise cli.UsageError(f"{ranks[4]} starts the processes: drop --num-gpus and "
                                 "--num-machines (one process per rank)")
        _init_from_environment(*ranks[:4], timeout)
        try:
            _run(main_func, args)
        finally:
            dist.destroy_process_group()
        return 0
    if num_gpus * num_machines == 1:
        _run(main_func, args)
        return 0
    dist_url, machine_rank = getattr(args, "dist_url", "auto"), getattr(args, "machine_rank", 0)
    if num_machines > 1 and dist_url == "auto":
        raise cli.UsageError("--num-machines > 1 needs --dist-url tcp://<machine 0>:<port>")
    previous = {s: signal.signal(s, _pass_on) for s in PASSED_ON}
    # the failed process's one line stays the last: not torch's notes on stopping the others
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    try:
        d2_launch(_spawned, num_gpus, num_machines, machine_rank, dist_url,
                  args=(main_func, args), timeout=timeout)
    except ProcessExitedException as e:
        if e.exit_code > 0:
            return e.exit_code  # that process said why (or stopped on a signal, after saving)
        raise cli.UserError(f"rank {machine_rank * num_gpus + e.error_index} was killed by "
                            f"{e.signal_name}; the other processes were stopped") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def ranks_from_environment():
    """``(rank, local_rank, world_size, local_world_size, launcher)`` that torchrun or srun set
    for this process, or None."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return (int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), world,
                int(env.get("LOCAL_WORLD_SIZE", world)), "torchrun")
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        world = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
        if world % nodes:
            raise cli.UsageError(f"srun: {world} tasks on {nodes} nodes; start the same number "
                                 "of tasks on every node (--ntasks-per-node)")
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), world, world // nodes, "srun"
    return None


def _init_from_environment(rank, local_rank, world_size, local_world_size, timeout):
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise cli.UsageError(f"{' and '.join(missing)} not set: export the first node's address "
                             "and a free port, e.g. MASTER_ADDR=$(scontrol show hostnames "
                             "\"$SLURM_JOB_NODELIST\" | head -n 1) MASTER_PORT=29500")
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(local_rank)
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    # torchrun's agent keeps one store across restarts: each attempt gets its own keys
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("nccl" if gpu else "gloo", store=dist.PrefixStore(f"attempt_{attempt}", store),
                            rank=rank, world_size=world_size, timeout=timeout)
    comm.create_local_process_group(local_world_size)
    comm.synchronize()


def _pass_on(signum, frame):
    for child in multiprocessing.active_children():
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass


def _spawned(main_func, args):
    """A process started by detectron2's launch: a one-line error ends it with its status."""
    try:
        status = cli.run(lambda _argv: _run(main_func, args))
    finally:
        dist.destroy_process_group()
    if isinstance(status, int) and status:
        sys.exit(status)


def _run(main_func, args):
    try:
        return main_func(args)
    except cli.UserError:
        raise
    except Exception as e:  # noqa: BLE001  (only errors whose message is complete)
        message = one_line_message(e)
        if message is None:
            raise
        raise cli.UserError(message) from None


def one_line_message(error):
    """The line that reports ``error`` (a user error; a failed write or a timeout, with the
    rank in a job of several processes), or None for an error that needs its traceback."""
    if isinstance(error, cli.UserError):
        return str(error)
    rank = f"rank {comm.get_rank()}: " if comm.get_world_size() > 1 else ""
    if isinstance(error, OutputWriteError):
        return rank + str(error)
    text = str(error).strip()
    if isinstance(error, RuntimeError) and re.search(r"timed? ?out", text, re.IGNORECASE):
        first = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0])[:200]  # gloo's "[file:line] "
        return (f"{rank}gave up waiting ({type(error).__name__}: {first}): another process is "
                "stuck or has died, or a data-loader worker delivered nothing in time; the last "
                "checkpoint is intact")
    return None
