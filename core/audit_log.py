"""Opt-in audit log: one JSON line per file read, so a result can be traced to a model later.

A line holds the UTC time, the SHA-256 of the scan's bytes (enough to match a file the user
still has, useless for recovering it), the model's name and version, the SHA-256 of its weights,
of its card (calibration, operating point, referral rule) and of its out-of-distribution gate (null
when it has none): a result depends on all three. Then the result (prediction, calibrated
probabilities, tumour probability, threshold), the flags, and the SHA-256 of the tumour mask paired
with the scan (null when none was). Lines written before the card and
gate hashes (or the mask's) were added lack those keys; `read_audit` returns them as they are.
It never holds a file name, pixel data, DICOM tags or anything else that could name a patient:
records are built from an allow-list of fields, not by copying the prediction.

A file that was read but could not be predicted gets a line too, its result null and its flags
["cannot read"]: which bytes were submitted, and that they gave no result. Its error's words stay
out (they may quote a header).
Written by ``python -m core report --audit FILE``; the app writes no audit log.
"""
from __future__ import annotations

import json
import os
import stat
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

# Several threads or processes may share one log file; locks keep their lines whole.
_LOCK = threading.Lock()
RESULT_FIELDS = ("pred", "probs", "tumour_probability", "threshold")
RECORD_STARTS = (b'{"card_sha256": ', b'{"flags": ')   # sort_keys: the first key now, and before card hashes


def _result_fields(result: Any) -> dict | None:
    """The allow-listed result fields from a `Prediction` or a `predict_many` dict; None for a
    file that was read but not predicted (its line says so in its flags)."""
    if result is None:
        return None
    if not isinstance(result, Mapping):
        result = result.to_json()
    return {k: result.get(k) for k in RESULT_FIELDS}


def slice_of(result: Any) -> int | None:
    """The slice (NIfTI) or frame (DICOM, TIFF) of a volume that was predicted: the bytes'
    hash names the whole volume, not the image the result is about."""
    if result is None:
        return None
    info = (result.get("info") if isinstance(result, Mapping) else getattr(result, "info", None)) or {}
    # slice 0 of a one-slice NIfTI, frame 0 of a one-frame DICOM: no slice of anything
    for index, count in (("slice_index", "n_slices"), ("frame", "n_frames")):
        if info.get(index) is not None and int(info.get(count) or 1) > 1:
            return int(info[index])
    return None


def model_fields(predictor: Any) -> dict:
    """What names the model behind a result, for audit lines and the report's CSV: the card and
    the gate change a result as much as the weights do (`Predictor.identity`)."""
    return {"model": predictor.name, "model_version": predictor.card.get("version"),
            "weights_sha256": predictor.weights_sha256,
            "card_sha256": getattr(predictor, "card_sha256", None),
            "gate_sha256": getattr(predictor, "gate_sha256", None)}


def audit_record(file_sha256: str, predictor: Any, result: Any, flags: list[str],
                 mask_sha256: str | None = None) -> dict:
    """The JSON object one prediction adds to the log (see the module docstring); ``file_sha256``
    is the hex SHA-256 of the scan's bytes, the report's own (`ScanResult.sha256`): a batch's
    files are not held in memory until their lines are written. ``mask_sha256``: the tumour mask
    paired with the scan, if any (its 'missed tumour' flag came from that mask)."""
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sha256": str(file_sha256),
        "mask_sha256": mask_sha256,
        **model_fields(predictor),
        "result": _result_fields(result),
        "slice": slice_of(result),
        "flags": [str(f) for f in flags],
    }


def append_audit(path: str | Path, file_sha256: str, predictor: Any, result: Any,
                 flags: list[str], mask_sha256: str | None = None) -> dict:
    """Append one line for one prediction to the log at ``path``; returns the record written.

    Raises OSError when the log cannot be written: the caller decides whether that is fatal.
    """
    record = audit_record(file_sha256, predictor, result, flags, mask_sha256)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True) + "\n"
    with _LOCK, path.open("a", encoding="utf-8") as f:
        _lock_file(f)   # other processes too: each checks the last byte and appends in turn
        if _ends_mid_line(path):  # a write cut short (a killed process) must not swallow this record
            line = "\n" + line
        f.write(line)
    return record


def _lock_file(f) -> None:
    """An exclusive advisory lock on an open log until it is closed, where the OS has one (four
    processes appending at once each saw the other's half-written line and added blank lines)."""
    try:
        import fcntl
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    except (ImportError, OSError):   # Windows, or a pipe or device that takes no lock
        pass


def _ends_mid_line(path: Path) -> bool:
    """Whether a regular file's last byte is not a newline. Anything else (a pipe, /dev/stdout,
    a write-only log) is appended to as it is: reading it could block or is not allowed."""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return False
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False


def foreign_file_problem(path: str | Path) -> str | None:
    """Why ``path`` must not take audit lines: a file that exists and holds no record in its first
    lines (an old CSV, a scan: appending JSON would spoil it). None for a new or empty file, a log,
    or one that cannot be read (a write-only sink is appended to as it is)."""
    p = Path(path)
    try:
        if not p.is_file() or p.stat().st_size == 0:
            return None
        with p.open("rb") as f:
            head = [f.readline(2**16) for _ in range(5)]
    except OSError:
        return None
    if any(_record(line.rstrip(b"\r\n")) is not None for line in head):
        return None
    # the start of a record a killed first write left (`_ends_mid_line` mends it): records are
    # written with sorted keys, so they open with one of these; any '{"' would let a split.json in
    if len(head[0]) and not head[1] and not head[0].endswith(b"\n") and head[0].startswith(RECORD_STARTS):
        return None
    return f"--audit {p} exists and is not an audit log: name a new file or an earlier log"


def read_audit(path: str | Path) -> list[dict]:
    """Every whole record in a log, oldest first; a line cut short by a killed process is skipped."""
    p = Path(path)
    if not p.exists():
        return []
    return [r for line in p.read_bytes().splitlines() if (r := _record(line)) is not None]


def _record(line: bytes) -> dict | None:
    """One line's record; a fragment of a killed write is skipped, and a whole record written
    after one on the same line (by versions before the newline check) is recovered."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return None
    for start in [0] + [i for i in range(len(text) - 1, 0, -1) if text.startswith('{"', i)]:
        try:
            value = json.loads(text[start:])
        except json.JSONDecodeError:
            continue
        # a cut-off line can end in a whole nested object ("probs": {...}): that is no record
        return value if isinstance(value, dict) and "sha256" in value else None
    return None
