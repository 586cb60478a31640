"""What timings depend on besides the model: the device's model name, threads, torch and python. Here, in the
builder, because evit.deploy chooses its inference path by timing on the machine it runs on and keeps the choice
per machine; evit.timing and the analyses' latency tables key their own caches by the same description."""
from __future__ import annotations

import platform
from pathlib import Path

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
