"""Shared by the benchmarks: the exact command and the machine it ran on."""
from __future__ import annotations

import os
import platform
import shlex
import sys


def positive(text: str) -> int:
    """argparse type: an integer >= 1 (0 runs or threads is a usage error, not a crash later)."""
    import argparse
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"{v} must be at least 1")
    return v


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine(device: str = "cpu") -> dict:
    import torch  # here, not at the top: bench/app_memory.py describes a torch in another Python
    info = {"cpu": cpu_model(), "cores": usable_cores(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def header(device: str = "cpu") -> dict:
    """Print the command and the machine; return the machine dict for the JSON result."""
    cmd = "python " + shlex.join(sys.argv)
    info = machine(device)
    print(f"command: {cmd}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    return {"command": cmd, "machine": info}
