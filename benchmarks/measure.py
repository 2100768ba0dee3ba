"""Measurement helpers of the scripts in ``benchmarks/`` (which import it as ``measure``, their
sibling): timing with device synchronisation, and peak memory of one phase of a process (GPU:
torch's allocator statistics; CPU: the process's peak resident set, reset at the start of the
phase).

Each benchmark variant should run in a fresh process, so that its peak memory is its own.
"""
import ctypes
import gc
import json
import platform
import subprocess
import time


def proc_status_kb(field):
    """A ``/proc/self/status`` field in kB (e.g. "VmRSS", "VmHWM"), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0). Returns whether it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def release_freed_heap():
    """Return freed heap memory to the OS (glibc), so the RSS baseline is live memory only and
    not what loading/initialising left in malloc's free lists (which a later run would reuse
    without RSS growth)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def synchronize(device):
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def memory_start(device):
    """Start measuring the peak memory of a phase; returns the dict :func:`memory_peak` fills.
    (torch is imported for a CUDA device only: a CPU worker of another runtime stays without.)"""
    release_freed_heap()
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return {"method": "torch.cuda.max_memory_allocated",
                "before_mb": torch.cuda.memory_allocated() / 2**20}
    rss = proc_status_kb("VmRSS")
    reset = reset_peak_rss()
    return {"method": "peak RSS (VmHWM) " + ("reset before the first run" if reset
                                              else "over the whole process"),
            "before_mb": rss / 1024 if rss else None}


def memory_peak(device, info):
    """Fill ``info["peak_mb"]`` (see :func:`memory_start`) and return ``info``."""
    if str(device).startswith("cuda"):
        import torch

        info["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        hwm = proc_status_kb("VmHWM")
        info["peak_mb"] = hwm / 1024 if hwm else None
    return info


def memory_growth_mb(info):
    """Peak minus the memory at the start of the phase, in MB (None when unknown)."""
    if info.get("peak_mb") is None or info.get("before_mb") is None:
        return None
    return info["peak_mb"] - info["before_mb"]


def timed(fn, warmup, iters, device):
    """(wall-clock seconds per run, process CPU seconds per run, last output)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times, cpu_times = [], []
    out = None
    for _ in range(iters):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times, out


def cpu_model():
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_json_worker(cmd, out, cwd, label):
    """Run a benchmark worker process ``cmd`` that writes its results as JSON to ``out``;
    return them, with ``"process_wall_s"`` (the whole process, start-up included) added. Exits with the worker's stderr
    tail when it fails."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker {label} failed ({proc.returncode}):\n"
                         f"{proc.stderr[-4000:]}")
    with open(out) as f:
        result = json.load(f)
    result["process_wall_s"] = time.perf_counter() - start
    return result
