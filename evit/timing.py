"""Timing a callable the way the benchmarks do: warm-up, then timed windows, medians over repeats, with the
device's queue drained before each clock read; the process's peak memory. Used by the benchmark CLI and by the
analyses that time models (op_profile, mhsa_ratio)."""
from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Callable

import torch

# In the builder, whose deploy path times its candidates; re-exported here, where the analyses look for them.
from evit.builder.machine import Timing, describe_machine, synchronizer, time_interleaved  # noqa: F401


BUSY_CORES = 0.3  # other processes using more than this many cores' worth of CPU time: a machine under load


def _busy_seconds() -> float:
    """CPU seconds all processes have run (user, nice, system, irq, softirq, steal; not idle or iowait) since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[i] for i in (0, 1, 2, 5, 6, 7) if i < len(fields))
    return busy / os.sysconf("SC_CLK_TCK")


def other_load(seconds: float = 0.5) -> float | None:
    """How many cores' worth of CPU time processes other than this one used over `seconds` (while this one sleeps,
    its threads idle): 0 on a quiet machine, about 1 with a busy loop beside us. None where the kernel does not
    say (no /proc/stat)."""
    if not Path("/proc/stat").exists():
        return None
    ours = sum(os.times()[:2])
    busy, start = _busy_seconds(), time.perf_counter()
    time.sleep(seconds)
    others = _busy_seconds() - busy - (sum(os.times()[:2]) - ours)
    return max(0.0, others / (time.perf_counter() - start))


def describe_load(cores: float | None) -> str:
    """A line for a report: the load timings were measured under, or '' on a quiet machine (or unknown)."""
    if cores is None or cores <= BUSY_CORES:
        return ""
    return f"measured under load: other processes used {cores:.1f} of {os.cpu_count()} cores as it started"


def time_callable(fn: Callable[[], object], batch: int, warmup_s: float, seconds: float, repeats: int,
                  sync: Callable[[], None]) -> Timing:
    return time_interleaved({"fn": fn}, batch, warmup_s, seconds, repeats, sync)["fn"]


def peak_memory_mb(device: str) -> float:
    """GPU: peak allocated by torch. CPU: the process's peak resident set so far (an upper bound)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
