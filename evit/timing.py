"""Timing a callable the way the benchmarks do: warm-up, then timed windows, medians over repeats, with the
device's queue drained before each clock read; the process's peak memory. Used by the benchmark CLI and by the
analyses that time models (op_profile, mhsa_ratio)."""
from __future__ import annotations

import platform
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch


def describe_machine(device: str, threads: int) -> str:
    """The hardware and software timings depend on: GPU model or CPU model name, threads, torch and python."""
    if device == "cuda":
        hw = torch.cuda.get_device_name()
    else:
        hw = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
            else platform.processor()
    return f"{hw}; {threads} thread(s); torch {torch.__version__}; python {platform.python_version()}"


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
