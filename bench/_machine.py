"""Shared by the benchmarks: the exact command and the machine it ran on."""
from __future__ import annotations

import os
import platform
import shlex
import sys

from core.cli import integer_at_least  # the CLI's own argparse type

positive = integer_at_least(1)
non_negative = integer_at_least(0)


def load_predictor(parser, weights):
    """`core.inference.Predictor` of ``weights``; a missing or broken model is a usage error
    (one sentence, exit 2), not a traceback."""
    from core.inference import Predictor
    try:
        return Predictor(weights)
    except (OSError, ValueError, KeyError) as e:
        parser.error(f"cannot load the model {weights}: {e}")


def no_files_error(parser, pred, source: str, split: str) -> None:
    """A source with no file in the split (misspelt, or data not beside the checkout) is a usage
    error, not a silent run over n = 0."""
    known = ", ".join(s.get("name", "?") for s in pred.card.get("sources", []))
    parser.error(f"no {split} file of source {source!r} found for {pred.dir} (its sources: {known})")


def flagging_parts(pred, scan, flagged: bool) -> list[str]:
    """The parts of the model's gate that each alone flag ``scan`` (`Predictor.gate_margins`; the
    gate's component names: "cnn", the 64 px network that reads the image's look; "head", the
    feature head on the classifier's features; "colour"), or ["other"] for a scan ``flagged``
    by none of them (a blank image, the DICOM header, an empty slice, a model without a gate)."""
    from core.ood import flagging
    return flagging(pred.gate_margins(scan)) or (["other"] if flagged else [])


def part_counts(flagged_by: list[list[str]]) -> dict[str, int]:
    """How many scans each part flags (a scan flagged by two parts counts for both)."""
    counts: dict[str, int] = {}
    for parts in flagged_by:
        for k in parts:
            counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items()))


def json_output(path: str | None) -> str | None:
    """Make the folder of a --json output before a long run, so the result is not lost at its end."""
    if path:
        from pathlib import Path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        if Path(path).is_dir():
            raise SystemExit(f"error: --json {path} is a folder; give a file name")
    return path


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
