"""Timing on this machine: what timings depend on besides the model (the device's model name, threads, torch and
python) and interleaved timing windows. Here, in the builder, because evit.deploy chooses its inference path by
timing its candidates on the machine it runs on and keeps the choice per machine; evit.timing re-exports these for
the benchmarks and analyses, which key their own caches by the same description."""
from __future__ import annotations

import platform
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
        cpuinfo = Path("/proc/cpuinfo")
        hw = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                   if line.startswith("model name")), platform.processor()) if cpuinfo.exists() \
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
