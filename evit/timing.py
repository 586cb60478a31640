"""Timing a callable the way the benchmarks do: warm-up, then timed windows, medians over repeats, with the
device's queue drained before each clock read; the process's peak memory. Used by the benchmark CLI and by the
analyses that time models (op_profile, mhsa_ratio)."""
from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from evit.builder.machine import describe_machine  # noqa: F401  (re-exported: the timing helpers' key)


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


def synchronizer(device: str) -> Callable[[], None]:
    """What to call before reading a clock so that the device's queued work is counted."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


@dataclass
class Timing:
    throughput: float  # images / s, median over repeats
    throughput_min: float
    throughput_max: float
    latency_ms: float  # median time of one iteration
    window_ms: list[float] = field(default_factory=list)  # ms per iteration of each window, in the order run


def time_interleaved(fns: dict[str, Callable[[], object]], batch: int, warmup_s: float, seconds: float,
                     repeats: int, sync: Callable[[], None]) -> dict[str, Timing]:
    """Warm each callable up, then `repeats` rounds in which each runs one window of about `seconds`;
    throughput per window = batch * iterations / time. Interleaving makes ratios fair on a shared machine."""
    for fn in fns.values():
        end = time.perf_counter() + warmup_s
        while True:
            fn()
            if time.perf_counter() >= end:
                break
    sync()
    rates: dict[str, list[float]] = {k: [] for k in fns}
    latencies: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            iters, start = 0, time.perf_counter()
            while True:
                fn()
                iters += 1
                sync()
                elapsed = time.perf_counter() - start
                if elapsed >= seconds:
                    break
            rates[key].append(batch * iters / elapsed)
            latencies[key].append(1000 * elapsed / iters)
    out = {}
    for key in fns:
        r = pd.Series(rates[key])
        out[key] = Timing(float(r.median()), float(r.min()), float(r.max()), float(pd.Series(latencies[key]).median()),
                          latencies[key])
    return out


def time_callable(fn: Callable[[], object], batch: int, warmup_s: float, seconds: float, repeats: int,
                  sync: Callable[[], None]) -> Timing:
    return time_interleaved({"fn": fn}, batch, warmup_s, seconds, repeats, sync)["fn"]


def peak_memory_mb(device: str) -> float:
    """GPU: peak allocated by torch. CPU: the process's peak resident set so far (an upper bound)."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
