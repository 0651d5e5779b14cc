"""Reports a clinician can print and keep: a PDF with one page per scan, and the same as CSV.

API (``items`` are ``(name, bytes_or_path)`` pairs, as for `core.inference.predict_many`, or
``(name, bytes_or_path, {"slice_index": k})`` to report the slice or frame a volume was viewed at):

- ``build_report(items, predictor, threshold=None, method=None) -> bytes``: the PDF.
  A batch (more than one item) opens with a summary page; every scan then gets one page with the
  image the model saw, the saliency overlay, the predicted class, every calibrated probability,
  the tumour probability against the operating point, the flags, and the model's identity.
  A file that cannot be read gets a page of its own saying why.
- ``build_csv(results, classes, predictor=None) -> str``: one row per scan; ``results`` are
  `ScanResult`s from `analyse` or the dicts `predict_many` returns; ``predictor`` fills the model
  columns (name, version, weights, card and gate SHA-256).
- ``report_downloads_data(items, predictor, threshold=None, method=None)
  -> {"pdf": (bytes, "application/pdf", "report.pdf"), "csv": (bytes, "text/csv", "report.csv")}``:
  for the app's Diagnose page, ``items = [(uploaded name, raw bytes)]``; feed each tuple to
  ``st.download_button(label, data=..., mime=..., file_name=...)``. It predicts and computes
  saliency again (about one forward and one backward pass per file), so call it behind a button
  or cache it on the uploaded bytes.
- ``analyse(items, predictor, threshold=None, method=None) -> list[ScanResult]``: the
  prediction and saliency for each file, computed once and shared by the PDF and the CSV.
- CLI: ``python -m core report FILE... --out report.pdf [--csv F] [--weights DIR]
  [--threshold T] [--method NAME] [--audit LOG]``; exit 0 when every file was predicted,
  1 when some failed (they still get a page), 2 on a usage error or an unwritable output.

``threshold=None`` uses the model card's operating point. Privacy: everything is built in memory;
nothing the user uploads is written anywhere but the report they ask for. Only the base name of
each file is printed (no folders, which may carry patient names), unless two files of one report
share it: then the fewest folders that tell them apart are (patient_A/slice_01.jpg), or a number
when none do. Never DICOM tags or other metadata the reader found.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import os
import re
import sys
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from .inference import (END_SLICE_CAVEAT, SEEN_TEXT, UNCHECKED_TEXT, Prediction, Predictor, calibration_text,
                        end_slice_note, listed_slices, shown_slice, volume_check)
from .labels import (NO_TUMOUR, TUMOUR, call_label, class_label, class_word, is_tumour_label, source_label,
                     tumour_classes)
from .metrics import digits_apart
from .preprocess import prepare
from .reader import ScanError, file_fault_error, load_bytes, looks_like_text, read_scan
from .referral import ReferralRule, at_threshold, call_note

DEFAULT_DISCLAIMER = "Research demo, not a medical device; not for diagnosis."
# on the page and in the report: a red spot on a 'no tumour' map read as a suspected lesion
SALIENCY_CAVEAT = ("A saliency map shows which pixels moved the model's score for the class explained, not "
                   "the extent of a lesion")

DISPLAY_PX = 384  # the model's crop redone at this size, so the pictures print sharp
PDF_MIME, CSV_MIME = "application/pdf", "text/csv"

FLAG_OOD = "out-of-distribution"
FLAG_UNCERTAIN = "uncertain, refer"
FLAG_TYPE_UNCERTAIN = "tumour type uncertain"
FLAG_UNREADABLE = "cannot read"
FLAG_NOT_CHECKED = "image not checked"   # a model without an out-of-distribution gate
FLAG_OTHER_SLICES = "other slices reach the operating point"   # a volume, its slice shown below it
FLAG_UNCHECKED_SLICES = "other slices not checked"   # a volume that cannot be read whole (inference.whole_read_failed)
FLAG_MASK = "mask contradicts call"      # a paired tumour mask marks a lesion; the call is 'no tumour'
FLAG_END_SLICE = "slice near an end of the head"   # a volume's tumour call on such a slice (inference.end_slice_note)
FLAG_SEEN = "seen in training"   # the file itself is one the model trained on (Predictor.seen_in_training)


def uncalled_words(pred: Prediction, target: str) -> str:
    """'p 0.004, not the call' when a map explains a class other than the call (a 'no tumour'
    call's likeliest tumour): 'Grad-CAM++ for Meningioma (red = strongest evidence)' over a red
    blob on a normal brain read as a located meningioma. '' for the call's own class."""
    if target == pred.pred or target not in pred.probs:
        return ""
    # each map is scaled to its own peak: a class at p 0.004 still shows a full yellow spot
    return f"p {pred.probs[target]:.3f}, not the call; scaled to its own peak, so yellow is no sign of it"


def saliency_scope(card: dict) -> str:
    """Where this model's maps were tested against tumour masks, and on what they were not: only
    LGG ships masks, so a figure for FLAIR gliomas says nothing of a meningioma's map (by eye, the
    default's meningioma maps mostly lie beside the lesion: docs/generalisation.md)."""
    measured = ((card or {}).get("saliency") or {}).get("measured") or {}
    if not measured.get("pointing_game"):
        return "This model's maps were never tested against tumour masks."
    target, method = measured.get("target"), card["saliency"].get("default_method") or "the map"
    kind = f" ({class_word(target)})" if target and target != TUMOUR else ""
    return (f"Where the maps point was tested against radiologists' masks only on "
            f"{source_label(measured.get('source', ''))} slices{kind}: {method}'s peak lay on the tumour "
            f"(within {measured.get('dilate_px', 0)} px) in {measured['pointing_game']:.0%} of "
            f"{measured.get('n_slices', '?')} held-out slices; the peak, not the extent. " + untested_words(card))


def untested_words(card: dict) -> str:
    """What the card's mask check did not cover: other sequences, and the tumour types it lacks."""
    target = (((card or {}).get("saliency") or {}).get("measured") or {}).get("target")
    others = [class_word(c) for c in tumour_classes(card.get("classes") or []) if c not in (TUMOUR, target)]
    return "Not tested on other sequences" + (f" or tumour types ({', '.join(others)})." if others else ".")


def saliency_caveat(classes: list[str]) -> str:
    """What a map is and is not, for a model with these classes (a 'no tumour' map only where there is one)."""
    return SALIENCY_CAVEAT + ("; a map for 'no tumour' marks what spoke against a tumour." if NO_TUMOUR in classes else ".")


# ---------------------------------------------------------------- analysis (once per file)

@dataclass
class ScanResult:
    """Everything a report needs about one file; pixels only for the pages, never saved."""
    name: str                              # as printed: base name, with folders where two collide
    ok: bool
    error: str | None = None
    prediction: Prediction | None = None
    view: np.ndarray | None = None         # grey [0, 1], the model's crop at DISPLAY_PX
    overlay: np.ndarray | None = None      # RGB uint8 saliency overlay on `view`
    saliency_note: str | None = None       # why there is no overlay, if there is none
    source: str = ""                       # format, size and slice, from technical fields only
    hot_slices: list[int] = field(default_factory=list)   # a volume's other slices at the operating point
    unchecked: bool = False                # the volume could not be read whole: its other slices unscored
    method: str | None = None              # the saliency method of this page (each file may have its own)
    sha256: str | None = None              # of the file's bytes: a CSV row matches its audit line and file
    mask_note: str | None = None           # a paired tumour mask marks a lesion under a 'no tumour' call
    series: str | None = None              # "DICOM series 1 of this report, Instance Number 12" (render_pdf)
    seen: bool = False                     # the file is one the model trained on (`Predictor.seen_in_training`)
    outlined: bool = False                 # its paired tumour mask is drawn on the map
    mask_sha256: str | None = None         # of the tumour mask paired with it (drawn or not): a call the
                                           # mask contradicts is traced to the mask that said so

    @property
    def mask_given(self) -> bool:
        return self.mask_sha256 is not None

    @property
    def flags(self) -> list[str]:
        return flags_of(self.to_row())

    def to_row(self) -> dict:
        """The `predict_many` shape: {"file", "ok", ...Prediction fields} or {"file", "ok", "error"}."""
        if not self.ok:   # with the bytes' hash when they were read: a failed file is traced too
            return {"file": self.name, "ok": False, "error": self.error,
                    **({"sha256": self.sha256} if self.sha256 else {})}
        return {"file": self.name, "ok": True, "sha256": self.sha256, **self.prediction.to_json(),
                **({"hot_slices": self.hot_slices} if self.hot_slices else {}),
                **({"other_slices_unchecked": True} if self.unchecked else {}),
                **({"mask_contradicts": True} if self.mask_note else {}),
                **({"mask_sha256": self.mask_sha256} if self.mask_sha256 else {}),
                **({"seen_in_training": True} if self.seen else {})}


def flags_of(row: Mapping) -> list[str]:
    """The flags a clinician must see for one result row. An out-of-distribution scan has that
    flag alone: it gets no call, so there is no call to refer or to doubt the type of."""
    if not row.get("ok"):
        return [FLAG_UNREADABLE]
    hot = ([FLAG_OTHER_SLICES] if row.get("hot_slices") else []) + (
        [FLAG_UNCHECKED_SLICES] if row.get("other_slices_unchecked") else [])
    seen = [FLAG_SEEN] if row.get("seen_in_training") else []
    if not row.get("in_distribution", True):
        return [FLAG_OOD] + hot + seen
    # no gate scored it ("ood_score" null): a moon photo was called pituitary with no flag at all
    unchecked = "ood_score" in row and row["ood_score"] is None
    end = end_slice_note(row.get("info") or {}, row.get("pred", ""), list(row.get("probs") or {})) is not None
    return [name for name, on in ((FLAG_MASK, bool(row.get("mask_contradicts"))), (FLAG_NOT_CHECKED, unchecked),
                                  (FLAG_UNCERTAIN, bool(row.get("uncertain"))),
                                  (FLAG_TYPE_UNCERTAIN, bool(row.get("type_uncertain"))),
                                  (FLAG_END_SLICE, end)) if on] + hot + seen


def refused_by_header(row: Mapping) -> bool:
    """Whether a result row's out-of-distribution reason is its DICOM header's (`core.header`)."""
    from .header import PREFIX as HEADER_PREFIX
    return (row.get("ood_reason") or "").startswith(HEADER_PREFIX)


def flag_labels(row: Mapping) -> list[str]:
    """`flags_of` as a table shows them: the out-of-distribution flag says when the DICOM header
    raised it (a CT's header and a photo's pixels are not one finding). The batch table, its CSV
    and the PDF's summary use these; banners and the audit log the flags themselves."""
    flags = flags_of(row)
    if flags and flags[0] == FLAG_OOD and refused_by_header(row):
        flags = [f"{FLAG_OOD} (DICOM header)", *flags[1:]]
    return flags


def call_of(row: Mapping) -> str:
    """The class a result row calls; '' for an unreadable or out-of-distribution scan."""
    return row.get("pred", "") if row.get("ok") and row.get("in_distribution", True) else ""


NAME_CHARS = 120   # a longer name keeps its start and its end: see `display_name`
# A backslash separates folders only in a Windows path (C:\ or \\server\ first); on Linux it is a
# character of the name. Zip members come with "/" already (`core.archive`).
_WINDOWS_PATH = re.compile(r"^(?:[A-Za-z]:\\|\\\\)")


def _undecodable(ch: str) -> str | None:
    """'\\xff' for a byte the file system could not decode (Python keeps it as a lone surrogate,
    U+DCFF, which strict JSON parsers and UTF-8 files refuse), else None."""
    return f"\\x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF else None


def strict_name(name: str) -> str:
    """A file name with its undecodable bytes as '\\xNN' and nothing else changed: `predict`'s JSON
    lines stay strict JSON (a fuzzing review). Not for stored records, whose names must still open
    their files (eval.json keeps Python's own form)."""
    return "".join(_undecodable(ch) or ch for ch in str(name))


def _shown_char(ch: str) -> str:
    """A character as a name prints it: a byte the file system could not decode as \\xNN
    (`_undecodable`), so two such names stay apart; other control and format characters (a
    newline, a right-to-left override) dropped: they change how a line reads."""
    if (byte := _undecodable(ch)):
        return byte
    return "" if unicodedata.category(ch)[0] == "C" else ch


def _name_parts(name: str | PurePath) -> list[str]:
    """The printable folders and base name of a path, base name last."""
    text = str(name)
    if _WINDOWS_PATH.match(text):
        text = text.replace("\\", "/")
    parts = ["".join(map(_shown_char, p)) for p in (text.rstrip("/") or text).split("/")]   # a folder's "x/"
    # a base name of invisible characters only must not leave its folder to stand in for it
    return [p for p in parts[:-1] if p] + [parts[-1] or "(unnamed)"]


def _capped(text: str) -> str:
    """At most NAME_CHARS characters, start and end kept (where series numbers and the suffix
    are): two long names that share a prefix must not print as one."""
    return text[:60] + "..." + text[-57:] if len(text) > NAME_CHARS else text


def display_name(name: str | PurePath) -> str:
    """Base name only, printable characters only, at most NAME_CHARS of them."""
    return _capped(_name_parts(name)[-1])


def shown_path(name: str | PurePath) -> str:
    """The whole path, as `display_name` shows a base name: no control or format characters (an
    escape sequence, a right-to-left override, zero-width ones), each folder and the base name at
    most NAME_CHARS characters (mask pairing and `display_names` need the whole path)."""
    return "/".join(map(_capped, _name_parts(name)))


def display_names(names: list[str | PurePath]) -> list[str]:
    """`display_name` of each, with names that would print alike told apart: by the shortest end
    of their paths that differs (patient_A/slice_01.jpg, patient_B/slice_01.jpg), else by a number
    ("x.jpg (2)"). Folders are printed only where the base names collide."""
    parts = [tuple(_name_parts(n)) for n in names]
    depth = [1] * len(parts)
    while True:
        shown = [_capped("/".join(p[-k:])) for p, k in zip(parts, depth)]
        # a name printed like another path takes one more folder, while it has one (the same path
        # twice gains nothing from its folders: it is numbered below)
        paths = Counter(text for text, _ in set(zip(shown, parts)))
        grow = [i for i, text in enumerate(shown) if paths[text] > 1 and depth[i] < len(parts[i])]
        if not grow:
            break
        for i in grow:
            depth[i] += 1
    if len(set(shown)) == len(shown):
        return shown
    # Still alike: the same file twice (numbered), or different files whose long names differ only
    # where the cap cuts: for those the folders told nothing apart, so they are not printed (they
    # may name a patient), and the files are numbered
    files = defaultdict(set)
    for text, p in zip(shown, parts):
        files[text].add(p)
    shown = [_capped(p[-1]) if len(files[text]) > 1 else text for text, p in zip(shown, parts)]
    return unique_names(shown)


def unique_names(names: list[str]) -> list[str]:
    """The names with repeats told apart: the second 'scans.zip' becomes 'scans.zip (2)', or the
    first number not taken by any name. Rows, reports and mask pairing go by name, and two
    patients' zips are often named alike."""
    taken, out = set(names), []
    seen: set[str] = set()
    for n in names:
        if n in seen:
            k = 2
            while f"{n} ({k})" in taken:
                k += 1
            n = f"{n} ({k})"
            taken.add(n)
        seen.add(n)
        out.append(n)
    return out


def printable_path(name: str) -> str:
    """The full name with control and format characters escaped: a newline in a file name must not
    split the one line the CLI prints per file, nor a right-to-left override (U+202E) reverse it."""
    return "".join(_undecodable(ch) or (ch.encode("unicode_escape").decode("ascii")
                                        if unicodedata.category(ch) in ("Cc", "Cf", "Cs") else ch)
                   for ch in str(name))


def slice_words(info: Mapping, numbering: str = "") -> str:
    """'slice 15 of 19, chosen as most tumour-like' (a NIfTI slice; 'frame' of a DICOM or TIFF
    stack), '' for a single image."""
    for key, word in (("slice_index", "slice"), ("frame", "frame")):
        if info.get(key) is not None:
            n = info.get("n_slices") or info.get("n_frames")
            if n == 1:   # a one-frame file: 'frame 0 of 1' says nothing
                return ""
            text = f"{word} {info[key]}" + (f" of {n}{numbering}" if n else "")
            return text + (f", chosen as {info['slice_choice']}" if info.get("slice_choice") else "")
    return ""


def source_line(info: Mapping) -> str:
    """'DICOM, MR, 224 x 224 px; frame 1 of 3' from allow-listed technical fields only."""
    parts = [str(info[k]) for k in ("format", "modality") if info.get(k)]
    if info.get("width") and info.get("height"):
        parts.append(f"{info['width']} x {info['height']} px")
    text = ", ".join(parts)
    if where := slice_words(info, " (numbered from 0)"):
        text += f"; {where}"
    if info.get("display"):
        text += f"; {info['display']}"
    if volume := volume_words(info):   # a 4D file: say which of its volumes was read
        text += f"; {volume}"
    return text


def volume_of(info: Mapping) -> str:
    """'0 of 3': which volume of a 4D file was read (the CSV's cell); '' for a file of one volume."""
    return f"{info.get('volume', 0)} of {info['n_volumes']}" if (info.get("n_volumes") or 1) > 1 else ""


def volume_words(info: Mapping, short: bool = False) -> str:
    """'volume 0 of 3 (numbered from 0); the others were not read' for a 4D NIfTI ('volume 0 of 3'
    when ``short``); '' for a file of one volume."""
    if not (volume := volume_of(info)):
        return ""
    return f"volume {volume}" if short else f"volume {volume} (numbered from 0); the others were not read"


def saliency_target(pred: Prediction, classes: list[str]) -> str:
    """The class a report's map explains, as the Diagnose page's default (`saliency.explained_class`)."""
    try:
        from .saliency import explained_class
    except ImportError:   # no saliency in this installation: there is no map to caption either
        return pred.pred
    return explained_class(pred.pred, pred.probs, classes)


def _saliency(predictor: Predictor, scan, method: str, target: str, view: np.ndarray,
              mask: bytes | None = None):
    """(overlay RGB, None, outlined) or (None, why not, False): a failing map must not lose the
    prediction. A paired tumour ``mask`` that fits the scan is outlined on the map, as on the page."""
    try:
        from . import saliency as S
    except ImportError:
        return None, "Saliency is not available in this installation.", False
    try:
        cam = S.saliency_map(predictor, scan, method=method, target=target)
        over = S.overlay(view, cam, 0.4)
    except Exception as e:  # a report without a map beats no report
        return None, f"The saliency map could not be computed ({type(e).__name__}).", False
    if mask is None or shown_slice(scan.info) is not None:   # outlines on 2D scans only, as on the page
        return over, None, False
    try:   # a mask that fails must not take the map with it
        from .masks import input_mask
        frame = input_mask(scan, mask, {**predictor.spec, "size": view.shape[0]})
        return (S.contour_overlay(over, frame), None, True) if frame is not None else (over, None, False)
    except Exception:
        return over, None, False


REPORT_INFO_KEYS = ("slice_index", "n_slices", "frame", "n_frames", "series", "instance", "head_share",
                    "slice_choice", "n_volumes", "volume")


def analyse_one(name: str, src, predictor: Predictor, threshold: float | None = None,
                method: str | None = None, hot: list[int] | None = None,
                mask: bytes | None = None, slice_choice: str | None = None, head_share: float | None = None,
                unchecked: bool = False, **read_kw) -> ScanResult:
    """Read, predict and explain one file; any failure becomes a ScanResult with an error.

    ``read_kw`` go to `read_scan` (``frame=``/``slice_index=`` pick a slice of a volume). ``hot``:
    the volume's other slices at the operating point when the caller has them already (the app
    scored every slice for its table), with ``head_share``, the slice's (`volume_check`: a DICOM
    frame or stack page read alone has none) and ``unchecked`` (the volume could not be read whole);
    None scores them here. ``mask``: the tumour mask the page
    paired with the scan (`app_support.pair_masks`), judged against the call as the page does.
    ``slice_choice``: how the caller chose ``slice_index`` ("most tumour-like"), for the source line.
    """
    shown = display_name(name)
    if isinstance(src, Exception):  # an upload that could not be unpacked (a zip member): listed, as on the page
        return ScanResult(shown, False, error=str(src))
    data = None
    try:
        data = load_bytes(src)
        scan = read_scan(data, shown, **read_kw)
        if slice_choice and shown_slice(scan.info) is not None:
            scan.info["slice_choice"] = slice_choice
        pred = at_threshold(predictor.predict_scan(scan), predictor.classes, threshold,
                            getattr(predictor, "referral", None))
        view = prepare(scan.pixels, {**predictor.spec, "size": DISPLAY_PX}, scan.head_box)
    except ScanError as e:
        return ScanResult(shown, False, error=str(e), sha256=failed_file_sha256(data))
    except BaseException as e:  # a bug in one file must not take down the rest of a batch
        return ScanResult(shown, False, error=file_fault_error(e), sha256=failed_file_sha256(data))
    method = method or card_method(predictor)
    over, note, outlined = (_saliency(predictor, scan, method, saliency_target(pred, predictor.classes), view, mask)
                            if pred.in_distribution
                            else (None, "No saliency map: an out-of-distribution scan gets no call to explain.", False))
    if hot is None:
        hot, head_share, unchecked = volume_check(predictor, data, shown, scan.info, pred.threshold, pred.in_distribution)
    if head_share is not None and "head_share" not in scan.info:
        scan.info["head_share"] = head_share   # flags a tumour call on an end frame, as --best-slice does
    # Reader metadata stays out of reports and CSVs (`source` is allow-listed), but for what names
    # the slice and its series: the audit log's slice and the summary's series lines read them.
    pred.info = {k: scan.info[k] for k in REPORT_INFO_KEYS if k in scan.info}
    return ScanResult(shown, True, prediction=pred, view=view, overlay=over, saliency_note=note, outlined=outlined,
                      mask_sha256=hashlib.sha256(mask).hexdigest() if mask is not None else None,
                      source=source_line(scan.info), method=method,
                      sha256=(sha := hashlib.sha256(data).hexdigest()), mask_note=_mask_note(pred, scan, mask, predictor),
                      seen=bool(getattr(predictor, "seen_in_training", lambda _: False)(sha)), hot_slices=hot,
                      unchecked=unchecked)


def failed_file_sha256(data) -> str | None:
    """The hex SHA-256 of a failed file's bytes, None when none were read (a missing file) or they
    are text: a short text's hash (a name and a birth date) can be found by guessing."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or looks_like_text(bytes(data)):
        return None
    return hashlib.sha256(data).hexdigest()


def _mask_note(pred: Prediction, scan, mask: bytes | None, predictor: Predictor) -> str | None:
    """The Diagnose page's red warning (`core.masks.mask_contradiction`) without its markdown:
    the report must not call 'no tumour, no flags' what the page calls a missed tumour."""
    if mask is None:
        return None
    from .masks import mask_contradiction
    note = mask_contradiction(pred, scan, mask, predictor.spec, shown_slice(scan.info))
    return note.replace("**", "") if note else None


def analyse(items: Iterable[tuple[str, Any]], predictor: Predictor, threshold: float | None = None,
            method: str | None = None, **read_kw) -> list[ScanResult]:
    """`analyse_one` for every item, in order.

    An item may carry its own options as a third element, e.g. ``(name, data, {"slice_index": 7,
    "method": "gradcam", "mask": mask_bytes})``, so a report shows the slice each volume was viewed
    at, the saliency method chosen for it on the page and what its paired tumour mask says.
    """
    items = list(items)
    out = []
    for shown, (name, src, *own) in zip(display_names([it[0] for it in items]), items):
        opts = {**read_kw, **(own[0] if own and own[0] else {})}
        r = analyse_one(name, src, predictor, threshold, opts.pop("method", None) or method,
                        opts.pop("hot_slices", None), opts.pop("mask", None),
                        opts.pop("slice_choice", None), opts.pop("head_share", None),
                        opts.pop("unchecked", False), **opts)
        r.name = shown   # told apart from the batch's other files of the same base name
        out.append(r)
    return out


def method_label(method: str) -> str:
    try:
        from .saliency import method_name
        return method_name(method)
    except (ImportError, ValueError):
        return method


# ---------------------------------------------------------------- CSV

def csv_safe(text: str) -> str:
    """Spreadsheets run cells that start with = + - @ as formulas; a file name must not."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def spreadsheet_csv(text: str) -> bytes:
    """CSV text as a download: UTF-8 with a byte-order mark. Without one, Excel reads the file in
    the local code page and garbles non-ASCII file names and the flags' dashes. (The CLI's
    ``--csv`` file stays plain UTF-8, for scripts.)"""
    return text.encode("utf-8-sig")


CSV_DIGITS = 6   # a spreadsheet compares a probability with the threshold: 4 decimals hid the side
MODEL_COLUMNS = ("model", "model_version", "weights_sha256", "card_sha256", "gate_sha256")   # `audit.model_fields`


def _fmt(x: float | None, digits: int = CSV_DIGITS) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _tp_cells(row: Mapping, called: bool) -> list[str]:
    """Tumour probability and threshold, with decimals enough to write them apart."""
    tp, t = row.get("tumour_probability"), row.get("threshold")
    digits = digits_apart(tp, t, CSV_DIGITS) if tp is not None and t is not None else CSV_DIGITS
    return [_fmt(tp, digits) if called else "", _fmt(t, digits)]


def tp_digits(tp: float, threshold: float | None, digits: int = 3) -> int:
    """Decimals (at least ``digits``) that write a tumour probability apart from the operating
    point it was called against: a 'notumor' call at 0.5 must not read "0.500"."""
    return digits if threshold is None else digits_apart(tp, threshold, digits)


def tp_column_format(rows: Iterable[Mapping]) -> str:
    """A printf format for a column of the rows' tumour probabilities (the app's batch table):
    one for the column, with the decimals its closest value to its threshold needs."""
    return "%.{}f".format(max([3, *(tp_digits(r["tumour_probability"], r.get("threshold"))
                                    for r in rows if r.get("ok") and r.get("in_distribution", True)
                                    and r.get("tumour_probability") is not None)]))


def _model_cells(predictor: Predictor) -> list[str]:
    """The model columns of every row: a CSV read on its own still names what made it."""
    from .audit_log import model_fields
    fields = model_fields(predictor) if predictor is not None else dict.fromkeys(MODEL_COLUMNS)
    return [csv_safe(str(fields[k])) if fields[k] is not None else "" for k in MODEL_COLUMNS]


def build_csv(results: Iterable[ScanResult | Mapping], classes: list[str], predictor=None) -> str:
    """One row per scan: file, prediction, p_<class>..., tumour probability, threshold, flags,
    error, the slice of a volume (and which volume of a 4D file), the DICOM series and Instance
    Number of a file of a series, the file's SHA-256 (as in the audit log), its paired tumour mask's, and
    ``predictor``'s identity."""
    from .audit_log import slice_of
    from .dashboard import series_positions
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "ok", "prediction", *[f"p_{c}" for c in classes], "tumour_probability",
                "threshold", "confidence", "uncertain", "out_of_distribution", "flags", "error", "ood_reason",
                "slice", "slice_choice", "volume", "series", "instance", "file_sha256", "mask_sha256", *MODEL_COLUMNS,
                "card_threshold", "generated_utc"])
    rows = [r.to_row() if isinstance(r, ScanResult) else dict(r) for r in results]
    # a DICOM series uploaded one file per slice: its number in the batch ('series 1' of the
    # series table) and each file's Instance Number, as the batch table names them
    in_series = {i: (k, "" if inst is None else inst) for i, (k, inst) in series_positions(rows).items()}
    # the card's point beside each row's, and when: a row read alone could not tell a point set by
    # hand from the validated one, nor when it was made (a traceability review)
    card_point = getattr(predictor, "threshold", None)
    model = [*_model_cells(predictor), _fmt(card_point) if card_point is not None else "",
             datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")]
    # ScanResults already carry their display names (analyse): naming them again loses a folder
    names = ([r.name for r in results] if all(isinstance(r, ScanResult) for r in results)
             else display_names([row.get("file", "") for row in rows]))
    for name, row in zip(names, rows):
        ok = bool(row.get("ok"))
        called = bool(call_of(row))  # a flagged scan keeps its raw p_ columns, nothing read as a call
        probs = row.get("probs") or {}
        shown = slice_of(row) if ok else None
        w.writerow([csv_safe(name), int(ok), call_of(row),
                    *[_fmt(probs.get(c)) if ok else "" for c in classes],
                    *_tp_cells(row, called),
                    _fmt(row.get("confidence")) if called else "",
                    int(bool(row.get("uncertain"))) if called else "",
                    int(not row.get("in_distribution", True)) if ok else "",
                    "; ".join(flag_labels(row)), csv_safe(row.get("error") or ""), csv_safe(row.get("ood_reason") or ""),
                    "" if shown is None else shown,
                    (row.get("info") or {}).get("slice_choice", "") if shown is not None else "",
                    volume_of(row.get("info") or {}) if ok else "",
                    *in_series.get(id(row), ("", "")),
                    row.get("sha256") or "", row.get("mask_sha256") or "", *model])
    return buf.getvalue()


# ---------------------------------------------------------------- PDF

def _font_paths() -> tuple[Path, Path] | None:
    """DejaVu Sans from matplotlib's own data: Unicode file names print on any machine."""
    try:
        import matplotlib
        d = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    except ImportError:
        return None
    regular, bold = d / "DejaVuSans.ttf", d / "DejaVuSans-Bold.ttf"
    return (regular, bold) if regular.exists() and bold.exists() else None


@functools.lru_cache(maxsize=None)
def _code_points(*paths: str) -> frozenset[int]:
    """The characters every one of these font files has a glyph for."""
    from fontTools.ttLib import TTFont
    sets = [set(TTFont(p, lazy=True).getBestCmap()) for p in paths]
    return frozenset(set.intersection(*sets))


# Colours (RGB): a restrained clinical palette; colour is never the only carrier of a flag.
INK, MUTED, RULE, ACCENT, BAR_BG = (33, 37, 41), (108, 117, 125), (206, 212, 218), (31, 78, 121), (233, 236, 239)
AMBER = ((255, 243, 205), (153, 102, 0))    # (fill, text/border)
RED = ((248, 215, 218), (132, 32, 41))
GREEN = ((220, 237, 224), (21, 87, 36))
FLAG_TEXT = {
    FLAG_OOD: ("OUT OF DISTRIBUTION", "The image does not resemble the training data; "
               "do not rely on this result.", RED),
    FLAG_UNCERTAIN: ("UNCERTAIN - REFER", "Confidence is below the model's referral level; "
                     "refer for expert review.", AMBER),
    FLAG_NOT_CHECKED: ("IMAGE NOT CHECKED", "This model has no out-of-distribution check: it answers for "
                       "any image, even one that is not a brain MRI. Check that this is one.", AMBER),
    FLAG_OTHER_SLICES: ("OTHER SLICES REACH THE OPERATING POINT", "Other slices of this volume reach the "
                        "operating point; this one does not. Look at them before calling the volume clear.", AMBER),
    FLAG_UNCHECKED_SLICES: ("OTHER SLICES NOT CHECKED", UNCHECKED_TEXT, AMBER),
    FLAG_MASK: ("MASK CONTRADICTS CALL", "The uploaded tumour mask marks a lesion; the call is 'no tumour'.", RED),
    FLAG_TYPE_UNCERTAIN: ("TUMOUR - TYPE UNCERTAIN", "A tumour is called but its type is not "
                          "clear; read the type as a suggestion only.", AMBER),
    FLAG_END_SLICE: ("SLICE NEAR AN END OF THE HEAD", "The slice lies near the vertex, the skull base or a pole. "
                     + END_SLICE_CAVEAT, AMBER),
    FLAG_SEEN: ("SEEN IN TRAINING", SEEN_TEXT, AMBER),
}


@dataclass
class ReportContext:
    """What every page prints about the run: model identity, operating point, date."""
    model: str
    version: str
    arch: str
    weights_sha256: str
    classes: list[str]
    threshold: float | None
    threshold_source: str
    calibration: str         # `calibration_text` of the card
    disclaimer: str
    method: str
    date: str
    ood_check: bool          # the model ships an out-of-distribution gate
    referral: ReferralRule | None = None   # the card's rule (tumour band, type confidence)
    card_sha256: str = ""    # the card and the gate change results as the weights do (audit lines too)
    gate_sha256: str | None = None
    miss_note: str | None = None   # under every 'no tumour' call: how often the model missed tumours
    threshold_cost: str | None = None   # a point set for this report: what it costs against the card's
    saliency_scope: str = ""   # where the maps were checked against masks (`saliency_scope`)

    @classmethod
    def of(cls, predictor: Predictor, threshold: float | None, method: str | None) -> "ReportContext":
        card = predictor.card
        method = method or card_method(predictor)
        t = predictor.threshold if threshold is None else float(threshold)
        # The app always passes its slider's value: only a value other than the card's was set here.
        source = "model card" if threshold is None or t == predictor.threshold else "set for this report"
        return cls(model=str(predictor.name), version=str(card.get("version") or "unversioned"),
                   arch=str(card.get("arch", "")), weights_sha256=str(predictor.weights_sha256),
                   classes=list(predictor.classes), threshold=t, threshold_source=source,
                   calibration=calibration_text(card),
                   disclaimer=str(card.get("intended_use") or DEFAULT_DISCLAIMER),
                   method=method_label(method),
                   date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   ood_check=getattr(predictor, "gate", None) is not None,
                   referral=getattr(predictor, "referral", None),
                   card_sha256=str(getattr(predictor, "card_sha256", "")),
                   gate_sha256=getattr(predictor, "gate_sha256", None),
                   saliency_scope=saliency_scope(card),
                   **_app_notes(predictor, t))

    def hashes_text(self) -> str:
        """The card's and the gate's SHA-256, short, for the Model section."""
        gate = self.gate_sha256[:16] if self.gate_sha256 else "no gate"
        return f"{self.card_sha256[:16] or 'unknown'} / {gate}"

    def no_flags_text(self) -> str:
        """What 'no flags' means for this model: only the checks it actually has."""
        ood = ("passed the out-of-distribution check" if self.ood_check
               else "no out-of-distribution check for this model")
        rule = self.referral
        if rule is not None and rule.uses_band:
            # levels at 4 decimals and 0.1 %: a scan's 0.959 must not read as below a level of "0.96" (0.9586)
            lo, hi = rule.band(self.threshold)
            conf = f"tumour probability outside the referral band {lo:.4f}-{hi:.4f}"
            if rule.min_type_confidence > 0:
                conf += (f", tumour type clear (the top type holds at least "
                         f"{rule.min_type_confidence:.1%} of the tumour probability)")
        else:
            level = rule.min_confidence if rule is not None else 0.0
            conf = (f"probability of the class called above the referral level {level:.4f}"
                    if level > 0 else "no referral level set")
        return f"{ood.capitalize()}; {conf}."



def _app_notes(predictor: Predictor, threshold: float | None) -> dict[str, str | None]:
    """The notes the app shows beside a call, from the model's eval.json at this operating point:
    `app_support.miss_note` (under a 'no tumour' call: the test tumours called 'no tumour') and
    `app_support.threshold_cost` (a point set by hand, against the card's)."""
    try:
        from .app_support import miss_note, threshold_cost   # imports streamlit: a CLI without it prints no notes
    except ImportError:
        return {}
    try:
        return {"miss_note": miss_note(predictor, threshold), "threshold_cost": threshold_cost(predictor, threshold)}
    except AttributeError:   # a predictor without a folder or classes (a stand-in): no figures to give
        return {}


def _report_pdf_class():
    from fpdf import FPDF

    class ReportPDF(FPDF):
        """A4 portrait; the header and footer carry model, date and disclaimer on every page."""

        def __init__(self, ctx: ReportContext):
            super().__init__(orientation="P", unit="mm", format="A4")
            self.ctx = ctx
            self.set_margins(16, 14, 16)
            self.set_auto_page_break(True, margin=22)
            fonts = _font_paths()
            if fonts:
                self.add_font("Body", "", str(fonts[0]))
                self.add_font("Body", "B", str(fonts[1]))
                self.family = "Body"
            else:  # core font: Latin-1 only, so text goes through _t
                self.family = "Helvetica"
            self.unicode = bool(fonts)
            self.glyphs = _code_points(str(fonts[0]), str(fonts[1])) if fonts else frozenset()
            self.set_title("Brain MRI classifier report")
            self.set_author(f"{ctx.model} {ctx.version}")
            self.set_creator("core.report")
            self.probe = None   # `height_of`'s spare document

        def multi_cell(self, *args, **kw):
            kw.setdefault("align", "L")  # fpdf2 justifies by default: odd gaps in short lines
            return super().multi_cell(*args, **kw)

        def t(self, text: str) -> str:
            """Text the font can draw. A character it has no glyph for (CJK, emoji) is written as
            its code point, \\u8111: fpdf2 dropped it silently, and two names such as 脑_1.jpg
            and 正常_1.jpg both printed as _1.jpg."""
            if not self.unicode:
                return text.encode("latin-1", "backslashreplace").decode("latin-1")
            return "".join(ch if ord(ch) in self.glyphs or ch in "\n\t" else
                           ch.encode("ascii", "backslashreplace").decode("ascii") for ch in text)

        def font(self, size: float, bold: bool = False, colour=INK) -> None:
            self.set_font(self.family, "B" if bold else "", size)
            self.set_text_color(*colour)

        def header(self) -> None:
            self.font(13, True, ACCENT)
            self.cell(0, 7, self.t("Brain MRI tumour classifier - scan report"))
            self.font(8, True, RED[1])
            self.set_xy(self.l_margin, self.t_margin)
            self.cell(0, 7, self.t("RESEARCH DEMO - NOT FOR DIAGNOSIS"), align="R")
            self.ln(8)
            c = self.ctx
            line = self.t(f"Model {c.model}, version {c.version}  |  weights SHA-256 "
                          f"{c.weights_sha256[:16]}  |  generated {c.date}")
            size = 8.0
            self.font(size, False, MUTED)
            while self.get_string_width(line) > self.epw and size > 5:   # a long model name ran past the margin
                size -= 0.5
                self.font(size, False, MUTED)
            self.cell(0, 4, line)
            self.ln(5)
            self._rule()
            self.ln(4)

        def footer(self) -> None:
            self.set_y(-17)
            self._rule()
            self.ln(1.5)
            self.font(7.5, False, MUTED)
            self.multi_cell(self.epw - 22, 3.6, self.t(f"Intended use: {self.ctx.disclaimer}"))
            self.set_xy(self.w - self.r_margin - 22, -15.5)
            self.cell(22, 3.6, f"Page {self.page_no()} of {{nb}}", align="R")

        def height_of(self, draw: Callable[[Any], None]) -> float:
            """The height (mm) ``draw(pdf)`` takes, drawn on a page of a spare document."""
            if self.probe is None:
                self.probe = type(self)(self.ctx)
            self.probe.add_page()
            top = self.probe.get_y()
            draw(self.probe)
            return self.probe.get_y() - top

        def _rule(self) -> None:
            self.set_draw_color(*RULE)
            self.set_line_width(0.3)
            self.line(self.l_margin, self.get_y(), self.w - self.r_margin, self.get_y())

    return ReportPDF


def _section(pdf, title: str) -> None:
    pdf.ln(2)
    pdf.font(10, True, ACCENT)
    pdf.cell(0, 6, pdf.t(title), new_x="LMARGIN", new_y="NEXT")


def _banner(pdf, title: str, text: str, colours, height: float = 9.5) -> None:
    """A coloured box with a bold label: flags and the cannot-read notice. Long text wraps
    beside the label and the box grows to hold it."""
    fill, ink = colours
    x, y = pdf.l_margin, pdf.get_y()
    pdf.font(9, True, ink)
    label_w = pdf.get_string_width(pdf.t(title)) + 4
    pdf.font(9, False, ink)
    text_w = pdf.epw - label_w - 6
    lines = len(pdf.multi_cell(text_w, 5, pdf.t(text), dry_run=True, output="LINES"))
    height = max(height, 5 * lines + 4.5)
    pdf.set_fill_color(*fill)
    pdf.set_draw_color(*ink)
    pdf.set_line_width(0.3)
    pdf.rect(x, y, pdf.epw, height, style="DF")
    top = y + (height - 5 * lines) / 2
    pdf.set_xy(x + 3, top)
    pdf.font(9, True, ink)
    pdf.cell(label_w, 5, pdf.t(title))
    pdf.font(9, False, ink)
    pdf.set_xy(x + 3 + label_w, top)
    pdf.multi_cell(text_w, 5, pdf.t(text))
    pdf.set_xy(x, y + height + 1.5)


def _kv(pdf, rows: list[tuple[str, str]], key_w: float = 48) -> None:
    for k, v in rows:
        pdf.font(8.5, False, MUTED)
        pdf.cell(key_w, 4.8, pdf.t(k))
        pdf.font(8.5, False, INK)
        pdf.cell(0, 4.8, pdf.t(v), new_x="LMARGIN", new_y="NEXT")


def _bar(pdf, x: float, y: float, w: float, h: float, value: float, colour) -> None:
    pdf.set_fill_color(*BAR_BG)
    pdf.rect(x, y, w, h, style="F")
    pdf.set_fill_color(*colour)
    pdf.rect(x, y, w * float(np.clip(value, 0, 1)), h, style="F")


def _probability_rows(pdf, p: Prediction, classes: list[str]) -> None:
    """Every class with its calibrated probability as a number and a bar; the call stands out."""
    bar_x, bar_w = pdf.l_margin + 62, pdf.epw - 62
    called = p.pred if p.in_distribution else None
    for c in classes:
        v = p.probs.get(c, 0.0)
        y = pdf.get_y()
        pdf.font(9, c == called, INK)
        pdf.cell(42, 5.5, pdf.t(class_label(c)))
        pdf.cell(18, 5.5, f"{v:.3f}", align="R")
        _bar(pdf, bar_x, y + 1.2, bar_w, 3.2, v, ACCENT if c == called else (152, 169, 186))
        pdf.set_xy(pdf.l_margin, y + 5.5)


def _tp_digits(tp: float, ctx: ReportContext) -> int:
    """Decimals that keep a tumour probability apart from the operating point and the referral
    band's edges it is compared with on the page (0.95849 is not "0.958" beside an edge 0.9585)."""
    edges = [ctx.threshold] if ctx.threshold is not None else []
    if ctx.referral is not None and ctx.referral.uses_band:
        edges += list(ctx.referral.band(ctx.threshold))
    return max([3, *(digits_apart(tp, e) for e in edges)])


def _tumour_row(pdf, p: Prediction, ctx: ReportContext) -> None:
    """Tumour probability as a bar with the operating point marked on it."""
    tp, t = p.tumour_probability, p.threshold
    digits = _tp_digits(tp, ctx)   # the probability and the point it is read against, alike
    y = pdf.get_y() + 1
    pdf.set_xy(pdf.l_margin, y)
    pdf.font(9, True, INK)
    pdf.cell(42, 6, pdf.t("Tumour probability"))
    pdf.cell(18, 6, f"{tp:.{digits}f}", align="R")
    bar_x, bar_w = pdf.l_margin + 62, pdf.epw - 62
    # from the call itself: decide() compares in float64, and a float32 tp can sit 1e-7 either side
    above = t is not None and p.pred in tumour_classes(ctx.classes)
    # a referred call's bar is amber, as on the page: green read as 'safe' under 'UNCERTAIN - REFER'
    _bar(pdf, bar_x, y + 1.3, bar_w, 3.6, tp, AMBER[1] if p.uncertain else RED[1] if above else GREEN[1])
    if t is not None:
        tx = bar_x + bar_w * t
        pdf.set_draw_color(*INK)
        pdf.set_line_width(0.5)
        pdf.line(tx, y + 0.2, tx, y + 6)
        pdf.set_xy(pdf.l_margin, y + 6.5)
        pdf.font(8, False, MUTED)
        side = "at or above" if above else "below"
        pdf.multi_cell(0, 4, pdf.t(
            f"{side.capitalize()} the operating point {t:.{digits}f} ({ctx.threshold_source}; "
            f"black mark on the bar): read as {'tumour' if above else 'no tumour'}."
            + (" The operating point was chosen on validation data to favour sensitivity."
               if ctx.threshold_source == "model card" else f" {ctx.threshold_cost}" if ctx.threshold_cost else "")),
            new_x="LMARGIN", new_y="NEXT")
    else:
        pdf.set_xy(pdf.l_margin, y + 7)


IMAGE_GAP, MIN_IMAGE_MM, CAPTION_LINE_MM = 6, 40, 3.6


def _image_side(pdf, below: float, caption: float) -> float:
    """The images' side (mm): their column's width, less what the ``below`` sections and the
    ``caption`` under the images need to keep a scan on one page (a page with several banners
    printed its caveat on a page of its own; a two-line caption pushed the last line over)."""
    room = pdf.page_break_trigger - pdf.get_y() - caption - below - 1
    return max(MIN_IMAGE_MM, min((pdf.epw - IMAGE_GAP) / 2, room))


PDF_JPEG_QUALITY = 92


def _jpeg(img) -> io.BytesIO:
    """The picture as JPEG bytes, which fpdf embeds as they are: lossless (Flate) pictures made
    a 60-scan report 19 MB, ~300 kB a page; at this quality the difference does not show."""
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=PDF_JPEG_QUALITY)
    buf.seek(0)
    return buf


def _images(pdf, r: ScanResult, ctx: ReportContext, side: float) -> None:
    """The model's view and the saliency overlay side by side, same frame, same size, each
    centred in its half of the page above its caption."""
    from PIL import Image
    col = (pdf.epw - IMAGE_GAP) / 2
    y = pdf.get_y()
    x1, x2 = (pdf.l_margin + k * (col + IMAGE_GAP) + (col - side) / 2 for k in (0, 1))
    pdf.image(_jpeg(Image.fromarray((np.clip(r.view, 0, 1) * 255).astype(np.uint8), "L")),
              x=x1, y=y, w=side, h=side)
    if r.overlay is not None:
        pdf.image(_jpeg(Image.fromarray(r.overlay, "RGB")), x=x2, y=y, w=side, h=side)
    else:  # an empty frame with the reason, so the missing map is never silent
        pdf.set_draw_color(*RULE)
        pdf.rect(x2, y, side, side, style="D")
        pdf.set_xy(x2 + 6, y + side / 2 - 6)
        pdf.font(9, False, MUTED)
        pdf.multi_cell(side - 12, 4.5, pdf.t(r.saliency_note or "No saliency map."), align="C")
    pdf.set_xy(pdf.l_margin, y + side + 1)
    pdf.font(8, False, MUTED)
    pdf.cell(col, 4, pdf.t("Image as the model sees it (cropped to the head)"))
    pdf.set_x(pdf.l_margin + col + IMAGE_GAP)
    # wrapped: it may run to three lines
    pdf.multi_cell(col, CAPTION_LINE_MM, pdf.t(_map_caption(r, ctx)), new_x="LMARGIN", new_y="NEXT")


def _map_caption(r: ScanResult, ctx: ReportContext) -> str:
    """The saliency map's caption: method, class explained and what its yellow means."""
    from .saliency import OUTLINE_WORDS, PEAK_WORDS, is_class_agnostic
    shown = method_label(r.method) if r.method else ctx.method
    if r.overlay is None:
        return f"{shown} saliency: not available"
    explained = saliency_target(r.prediction, ctx.classes)
    uncalled = uncalled_words(r.prediction, explained)
    return (f"{shown} " + ("(class-agnostic)" if is_class_agnostic(r.method or ctx.method)
                           else f"for '{class_label(explained)}' ({uncalled or PEAK_WORDS})")
            + (f"; {OUTLINE_WORDS}: the uploaded tumour mask" if r.outlined
               else "; the tumour mask given cannot be read or does not fit this scan (or it is a volume's slice): not drawn"
               if r.mask_given else ""))


def _caption_height(pdf, r: ScanResult, ctx: ReportContext) -> float:
    """The height (mm) of the images' captions, the longer of the two (the map's may wrap)."""
    pdf.font(8, False, MUTED)
    lines = pdf.multi_cell((pdf.epw - IMAGE_GAP) / 2, CAPTION_LINE_MM, pdf.t(_map_caption(r, ctx)),
                           dry_run=True, output="LINES")
    return 1 + max(4, CAPTION_LINE_MM * len(lines))


def _file_heading(pdf, r: ScanResult, index: int, total: int) -> None:
    pdf.font(8.5, False, MUTED)
    pdf.cell(0, 4.5, pdf.t(f"Scan {index} of {total}"), new_x="LMARGIN", new_y="NEXT")
    pdf.font(11, True, INK)
    pdf.multi_cell(0, 5.5, pdf.t(f"File: {r.name}"), new_x="LMARGIN", new_y="NEXT")
    # the file's hash, as the CSV and the audit log give it: a page alone could not be tied to the
    # bytes it was made from (a traceability review)
    digest = f"file SHA-256 {r.sha256[:16]}" if r.sha256 else ""
    if r.source or r.series or digest:
        pdf.font(8.5, False, MUTED)
        source = "; ".join(x for x in (r.source, r.series, digest) if x)
        pdf.multi_cell(0, 4.2, pdf.t(f"Source: {source}"), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(1.5)


def _result_box(pdf, p: Prediction) -> None:
    """The one line a reader looks for: the call and its confidence, or that there is none."""
    y = pdf.get_y()
    pdf.set_fill_color(241, 245, 249)
    pdf.rect(pdf.l_margin, y, pdf.epw, 14, style="F")
    pdf.set_xy(pdf.l_margin + 4, y + 2)
    pdf.font(8.5, False, MUTED)
    pdf.cell(0, 4, pdf.t("Predicted class" if p.in_distribution else "Result"),
             new_x="LMARGIN", new_y="NEXT")
    pdf.set_x(pdf.l_margin + 4)
    if p.in_distribution:
        # a type in doubt must not read as firmly as the call (the app's headline says the same)
        pdf.font(15, True, ACCENT)
        pdf.cell(90, 7, pdf.t(call_label(p.pred, p.type_uncertain)))
        pdf.font(9, False, INK)
        side = (f"likeliest type: {class_word(p.pred)} ({p.confidence:.3f})" if p.type_uncertain
                else f"probability {p.confidence:.3f}")
        pdf.cell(pdf.epw - 98, 7, pdf.t(side), align="R")
    else:
        pdf.font(15, True, RED[1])
        pdf.cell(0, 7, pdf.t("No diagnosis: out of distribution"))
    pdf.set_xy(pdf.l_margin, y + 16)


def _scan_page(pdf, r: ScanResult, ctx: ReportContext, index: int, total: int) -> None:
    _file_heading(pdf, r, index, total)
    _result_box(pdf, r.prediction)  # result first
    if why := call_note(r.prediction, ctx.classes):   # a call that is not the top probability: why
        pdf.font(8.5, False, INK)
        pdf.multi_cell(0, 4.2, pdf.t(why), new_x="LMARGIN", new_y="NEXT")
        pdf.ln(1)
    _flag_banners(pdf, r, ctx)
    pdf.ln(1)
    _images(pdf, r, ctx, _image_side(pdf, pdf.height_of(lambda probe: _below_images(probe, r, ctx)),
                                     _caption_height(pdf, r, ctx)))
    _below_images(pdf, r, ctx)


def _flag_banners(pdf, r: ScanResult, ctx: ReportContext) -> None:
    """One banner per flag, with the numbers or the sentence that explain it; NO FLAGS if none."""
    p = r.prediction
    flags = flags_of(r.to_row())
    for f in flags:
        title, text, colours = FLAG_TEXT[f]
        why = (ctx.referral.describe_call(p, f == FLAG_UNCERTAIN, f == FLAG_TYPE_UNCERTAIN)
               if ctx.referral is not None and f in (FLAG_UNCERTAIN, FLAG_TYPE_UNCERTAIN) else None)
        if why:  # the numbers make the referral checkable
            text = why[0].upper() + why[1:] + ("; refer for expert review." if f == FLAG_UNCERTAIN
                                               else "; read the type as a suggestion only.")
        if f == FLAG_OOD and p.ood_reason:  # the header or the pixels: say which
            text = f"{p.ood_reason} Do not rely on this result."
        if f == FLAG_MASK:   # the page's own sentence
            text = r.mask_note or text
        if f == FLAG_OTHER_SLICES:
            shown = "the slice shown does not" if p.in_distribution else "the slice shown is out of distribution"
            text = (f"Slices {listed_slices(r.hot_slices)} of this volume reach the operating point; {shown}. "
                    "Look at them before calling the volume clear.")
        _banner(pdf, title, text, colours)
    if not flags:
        _banner(pdf, "NO FLAGS", ctx.no_flags_text(), GREEN, height=7.5)


def _below_images(pdf, r: ScanResult, ctx: ReportContext) -> None:
    """Probabilities, the tumour probability against the operating point, the miss note under a
    'no tumour' call, the model's identity and the caveat."""
    p = r.prediction
    _section(pdf, "Calibrated probabilities" if p.in_distribution
             else "Raw model output, not a diagnosis")
    _probability_rows(pdf, p, ctx.classes)
    if p.tumour_probability is not None and p.in_distribution:  # its operating point makes a call
        _tumour_row(pdf, p, ctx)
    # a clear call is not a clear scan: under any call but a tumour's, as the Diagnose page says it
    if p.in_distribution and p.tumour_probability is not None and not is_tumour_label(p.pred) and ctx.miss_note:
        pdf.font(8, False, MUTED)
        pdf.multi_cell(0, 4, pdf.t(ctx.miss_note), new_x="LMARGIN", new_y="NEXT")
    _section(pdf, "Model")
    _kv(pdf, [("Model / version", f"{ctx.model} / {ctx.version} ({ctx.arch})"),
              ("Weights SHA-256", ctx.weights_sha256[:16]),
              ("Card / gate SHA-256", ctx.hashes_text()),
              ("Calibration", ctx.calibration),
              ("Saliency method", method_label(r.method) if r.method else ctx.method),
              ("Report date", ctx.date)])
    pdf.ln(1)
    pdf.font(7.5, False, MUTED)
    pdf.multi_cell(0, 3.6, pdf.t(
        "Probabilities are the model's calibrated estimates, not a diagnosis. " + saliency_caveat(ctx.classes)
        + (" " + ctx.saliency_scope if ctx.saliency_scope else "")),
        new_x="LMARGIN", new_y="NEXT")


def _error_page(pdf, r: ScanResult, index: int, total: int) -> None:
    _file_heading(pdf, r, index, total)
    _banner(pdf, "CANNOT READ", "No prediction was made for this file.", RED)
    pdf.ln(3)
    pdf.font(10, True, INK)
    pdf.cell(0, 6, pdf.t("Why"), new_x="LMARGIN", new_y="NEXT")
    pdf.font(10, False, INK)
    pdf.multi_cell(0, 5.5, pdf.t(r.error or "Unknown error."), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(3)
    pdf.font(8.5, False, MUTED)
    pdf.multi_cell(0, 4.5, pdf.t(
        "Accepted: JPEG, PNG and other common images, DICOM and NIfTI. Check that the file is "
        "complete and is a brain MRI slice, then run it again."))


def _fit(pdf, text: str, width: float) -> str:
    """Shorten ``text`` in the middle until it fits ``width`` mm: start and extension both stay."""
    if pdf.get_string_width(text) <= width:
        return text
    head, tail = text[: len(text) // 2], text[len(text) // 2:]
    while (head or tail) and pdf.get_string_width(f"{head}...{tail}") > width:
        head, tail = (head[:-1], tail) if len(head) >= len(tail) else (head, tail[1:])
    return f"{head}...{tail}"


def _called_tp(r: ScanResult) -> float | None:
    """The tumour probability a summary row prints: none for an unread or out-of-distribution
    scan (no call, no number)."""
    return r.prediction.tumour_probability if r.ok and r.prediction.in_distribution else None


def _summary_page(pdf, results: list[ScanResult], ctx: ReportContext, links: list[str]) -> None:
    from fpdf.fonts import FontFace
    n_ok = sum(r.ok for r in results)
    # 'seen in training' says what a result is worth, not that the scan needs a second reader
    n_flag = sum(bool(set(r.flags) - {FLAG_SEEN}) for r in results if r.ok)
    n_called = sum(bool(call_of(r.to_row())) for r in results)   # a refused scan was read, but gets no call
    pdf.font(12, True, INK)
    pdf.cell(0, 7, pdf.t("Batch summary"), new_x="LMARGIN", new_y="NEXT")
    pdf.font(9, False, INK)
    digits = max([3, *(_tp_digits(p, ctx) for p in map(_called_tp, results) if p is not None)])
    t = "not set" if ctx.threshold is None else f"{ctx.threshold:.{digits}f} ({ctx.threshold_source})"
    pdf.multi_cell(0, 5, pdf.t(
        f"{len(results)} files: {n_called} called, {n_ok - n_called} refused as out of distribution, "
        f"{len(results) - n_ok} could not be read, "
        f"{n_flag} flagged for review. Operating point on the tumour probability: {t}. "
        + (f"{ctx.threshold_cost} " if ctx.threshold_cost else "")
        + "One page per file follows; click a row to jump to it."), new_x="LMARGIN", new_y="NEXT")
    pdf.ln(3)
    pdf.font(8.5)
    head = FontFace(emphasis="BOLD", color=(255, 255, 255), fill_color=ACCENT)
    # the row number fits four digits at 8.5 pt: a batch's row 113 wrapped to "11" over "3"
    with pdf.table(col_widths=(12, 58, 30, 22, 56), text_align=("RIGHT", "LEFT", "LEFT", "RIGHT", "LEFT"),
                   headings_style=head, line_height=5.2, padding=1.2,
                   borders_layout="HORIZONTAL_LINES", cell_fill_color=(248, 249, 250),
                   cell_fill_mode="ROWS") as table:
        hdr = table.row()
        for h in ("#", "File", "Prediction", "Tumour p.", "Flags"):
            hdr.cell(pdf.t(h))
        fitted = [_fit(pdf, pdf.t(r.name), 62 - 2 * 1.2 - 1) for r in results]
        if len(set(fitted)) < len(fitted):  # shortening cut out what tells two names apart: wrap them
            fitted = [pdf.t(r.name) for r in results]
        for i, (r, link, name) in enumerate(zip(results, links, fitted), 1):
            row = table.row()
            row.cell(str(i), link=link)
            row.cell(name, link=link)
            if r.ok:
                p = r.prediction
                call = call_label(p.pred, p.type_uncertain) if p.in_distribution else "No diagnosis"
                row.cell(pdf.t(call), link=link)
                shown = _called_tp(r)
                row.cell("" if shown is None else f"{shown:.{digits}f}", link=link)
                flags = flag_labels(r.to_row())
                colour = RED[1] if set(flags) - {FLAG_SEEN} else AMBER[1] if flags else INK
                row.cell(pdf.t(", ".join(flags) or "-"), link=link, style=FontFace(color=colour))
            else:
                row.cell("-", link=link)
                row.cell("-", link=link)
                row.cell(pdf.t(FLAG_UNREADABLE), link=link, style=FontFace(color=RED[1]))
    lines = series_lines([r.to_row() for r in results])
    if lines:
        pdf.ln(3)
        pdf.font(9, False, INK)
        pdf.multi_cell(0, 5, pdf.t("DICOM series (files of one series, slices by Instance Number; a tumour "
                                   "called on any slice is a tumour call for the series):\n" + "\n".join(lines)),
                       new_x="LMARGIN", new_y="NEXT")


def series_lines(rows: list[dict]) -> list[str]:
    """One sentence per DICOM series with several files in a batch (`dashboard.series_table`)."""
    from .dashboard import series_table
    out = []
    for s in series_table(rows).to_dict("records"):
        called = (f"tumour called on {s['tumour called']}: {s['slices called tumour']}" if s["tumour called"]
                  else "no slice called tumour")
        best = ("" if s["highest at"] is None
                else f"; highest tumour probability {s['highest tumour probability']:.3f} at {s['highest at']}")
        extra = "".join(f"; {s[k]} {k}" for k in ("out of distribution", "uncertain") if s[k])
        out.append(f"{s['series'].capitalize()} ({s['files']} files): {called}{best}{extra}.")
    return out


def _name_series(results: list[ScanResult]) -> None:
    """Each file of a DICOM series uploaded one file per slice gets its series (numbered as the
    batch table and CSV number them) and Instance Number, for its page."""
    from .dashboard import series_positions
    rows = [r.to_row() for r in results]
    at = series_positions(rows)
    for r, row in zip(results, rows):   # a result rendered again in another report keeps no label of the last one
        k, instance = at.get(id(row), (None, None))
        r.series = None if k is None else f"DICOM series {k} of this report" + (
            f", Instance Number {instance}" if instance is not None else "")


def render_pdf(results: list[ScanResult], ctx: ReportContext) -> bytes:
    """The PDF for already analysed results: summary page for a batch, then one page per file."""
    _name_series(results)
    pdf = _report_pdf_class()(ctx)
    # Named destinations: the summary links to pages whose numbers are not known yet.
    links = [f"#scan-{i}" for i in range(1, len(results) + 1)]
    if len(results) > 1:
        pdf.add_page()
        _summary_page(pdf, results, ctx, links)
    for i, (r, link) in enumerate(zip(results, links), 1):
        pdf.add_page()
        pdf.set_link(name=link[1:])
        if r.ok:
            _scan_page(pdf, r, ctx, i, len(results))
        else:
            _error_page(pdf, r, i, len(results))
    if not results:
        pdf.add_page()
        pdf.font(11, False, INK)
        pdf.cell(0, 8, "No files were given.")
    return bytes(pdf.output())


def build_report(items: Iterable[tuple[str, Any]], predictor: Predictor, threshold: float | None = None,
                 method: str | None = None, **read_kw) -> bytes:
    """PDF report for ``items`` = [(name, bytes or path)]; see the module docstring."""
    results = analyse(items, predictor, threshold, method, **read_kw)
    return render_pdf(results, ReportContext.of(predictor, threshold, method))


def report_downloads_data(items: Iterable[tuple[str, Any]], predictor: Predictor, threshold: float | None = None,
                          method: str | None = None, **read_kw) -> dict[str, tuple[bytes | str, str, str]]:
    """{"pdf": (bytes, mime, file name), "csv": (bytes, mime, file name)} for download buttons."""
    results = analyse(items, predictor, threshold, method, **read_kw)
    pdf = render_pdf(results, ReportContext.of(predictor, threshold, method))
    return {"pdf": (pdf, PDF_MIME, "report.pdf"),
            "csv": (spreadsheet_csv(build_csv(results, predictor.classes, predictor)), CSV_MIME, "report.csv")}


# ---------------------------------------------------------------- CLI

def _probability(text: str) -> float:
    import argparse
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{v} is outside [0, 1]")
    return v


def text_line(row: Mapping) -> str:
    """One result row (the `predict_many` shape) as the CLI prints it. A flagged scan shows no
    call and no tumour probability: only the flag and why."""
    name = printable_path(row["file"])
    if not row.get("ok"):
        return f"{name}: error: {row['error']}"
    flags = flags_of(row)
    tp = row.get("tumour_probability")
    text = f"{name}: {call_of(row) or 'no diagnosis'}"
    if tp is not None and call_of(row):
        text += f" (tumour probability {tp:.{tp_digits(tp, row.get('threshold'))}f})"
    text += f" [{', '.join(flags)}]" if flags else ""
    text += f" ({volume})" if (volume := volume_words(row.get("info") or {})) else ""
    return text + (f" {row['ood_reason']}" if row.get("ood_reason") else "")


def _write(path: str, data: bytes | str, what: str) -> bool:
    try:
        p = Path(path)
        p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data, encoding="utf-8")
        return True
    except OSError as e:
        print(f"error: cannot write the {what} to {path}: {e.strerror or e}", file=sys.stderr)
        return False


def card_method(predictor: Predictor) -> str:
    """The saliency method the app offers first: the card's best against tumour masks."""
    try:
        from .saliency import default_method
        return default_method(predictor.card)
    except ImportError:
        return "gradcam"


def _unknown_method(method: str | None) -> str | None:
    """The error for a saliency method that does not exist, or None (also when saliency is absent)."""
    try:
        from .saliency import method_name
        if method is not None:
            method_name(method)
    except ImportError:
        return None  # the pages will say that saliency is unavailable
    except ValueError as e:
        return str(e)
    return None


def _resolved(path: str | Path) -> Path:
    """``path`` with its links followed (`data.real_path`); a loop of links stays as given, made
    absolute: it is said as one file's sentence, or as an output's usage error."""
    from .data import real_path
    try:
        return real_path(path)
    except FileNotFoundError:
        return Path(os.path.abspath(path))


def _output_problem(args) -> str | None:
    """Why the output paths cannot be used, checked before any file is analysed (a typo must not
    cost a batch, and a report must never overwrite a scan or another output)."""
    from .cli import output_problem
    outs = [(flag, Path(p)) for flag, p in (("--out", args.out), ("--csv", args.csv), ("--audit", args.audit)) if p]
    inputs = {_resolved(f) for f in args.files}
    seen: dict[Path, str] = {}
    for flag, p in outs:
        if (why := output_problem(flag, p)):   # first: a loop of links is said here
            return why
        real = _resolved(p)
        if real in inputs:
            return f"{flag} {p} is one of the input files"
        if real in seen:
            return f"{flag} and {seen[real]} name the same file {p}"
        seen[real] = flag
    if args.audit:
        from .audit_log import foreign_file_problem
        return foreign_file_problem(args.audit)
    return None


def pair_file_masks(files: list[str]) -> tuple[list[tuple[str, Any]], dict[str, bytes]]:
    """`report`'s files with tumour masks taken out, paired as the app pairs uploads
    (`core.masks.pair_masks`: X_mask.png beside X.png, the LGG layout): a mask was read as a scan,
    refused, and its raw output printed. Only a file that could be a mask (an X_mask of any kind, or a
    lossless image whose name another file shares) is read ahead; the others stay paths, read one at a time.
    Paired by their absolute, normalised paths ('./glioma/X.jpg' beside 'masks/X.png' pairs), and
    returned under the names as given."""
    from .masks import MASK_SUFFIXES, base_stem, pair_masks
    given = {os.path.normpath(os.path.abspath(f)) if str(f).strip() else str(f): f for f in files}
    if len(given) < len(files):   # a file named twice: paired by name as given, as the app pairs repeats
        given = {str(f): f for f in files}
    base_of = {k: base_stem(k) for k in given}
    bases = Counter(base_of.values())
    items: list[tuple[str, Any]] = []
    for key, f in given.items():
        base = base_of[key]
        src: Any = f
        # an X_mask of any kind pairs, as in the app (X_mask.nii.gz beside X.nii.gz); a file that only
        # shares a name pairs when it is a lossless image (a two-valued one, checked by pair_masks)
        if base.endswith("_mask") or (key.lower().endswith(MASK_SUFFIXES) and bases[base] > 1):
            try:
                src = load_bytes(f)
            except ScanError:
                pass   # reported with its own sentence when it is read as a scan
        items.append((key, src))
    kept, masks = pair_masks(items)
    return [(given[k], src) for k, src in kept], {given[k]: m for k, m in masks.items()}


def cmd_report(args) -> int:
    from .inference import Predictor
    if (why := _unknown_method(args.method) or _output_problem(args)):
        print(f"error: {why}", file=sys.stderr)
        return 2
    try:
        predictor = Predictor(args.weights)
    except Exception as e:  # a missing or broken model is a usage error, not a traceback
        where = f" from {args.weights}" if args.weights else ""
        print(f"error: cannot load the model{where}: {e or type(e).__name__}", file=sys.stderr)
        return 2
    items, masks = pair_file_masks(args.files)
    for scan in masks:   # each pair named: a mask taken out of the batch must not go unsaid
        print(f"tumour mask paired with {scan}: not predicted as a scan; outlined on its map and judged "
              "against its call where it fits the scan", file=sys.stderr)
    results = analyse([(f, src, {"mask": masks.get(f)}) for f, src in items], predictor, args.threshold, args.method)
    if args.audit:   # first: a closed pipe or a failed PDF must not lose the trace of results made
        from .audit_log import append_audit
        try:
            for r in results:
                if r.ok:
                    append_audit(args.audit, r.sha256, predictor, r.prediction, r.flags, r.mask_sha256)
                elif r.sha256:   # read but not predicted: traced too, with no result (never its error's words)
                    append_audit(args.audit, r.sha256, predictor, None, [FLAG_UNREADABLE])
        except OSError as e:
            print(f"error: cannot write the audit log {args.audit}: {e.strerror or e}", file=sys.stderr)
            return 2
    for r in results:
        print(text_line(r.to_row()), flush=True)
    pdf = render_pdf(results, ReportContext.of(predictor, args.threshold, args.method))
    if not _write(args.out, pdf, "report"):
        return 2
    print(f"wrote {args.out} ({len(results)} file{'s' * (len(results) != 1)}, "
          f"{method_label(args.method or card_method(predictor))} saliency)")
    if args.csv:
        if not _write(args.csv, build_csv(results, predictor.classes, predictor), "CSV"):
            return 2
        print(f"wrote {args.csv}")
    if args.audit:
        print(f"audit: {sum(r.ok for r in results)} lines appended to {args.audit}")
    # as `predict`: a scan the out-of-distribution check refused has no call
    return 0 if all(r.ok and r.prediction.in_distribution for r in results) else 1


def add_cli(sub) -> None:
    r = sub.add_parser("report", help="PDF (and CSV) report, one page per scan",
                       description="Predict each file and write a printable PDF report: a summary "
                                   "page for a batch, then one page per file (files that cannot be "
                                   "read get a page saying why). Exit 0 when every file was "
                                   "predicted, 1 when some failed or were refused by the "
                                   "out-of-distribution check, 2 on a usage or output error.")
    r.add_argument("files", nargs="+", help="image, DICOM or NIfTI files")
    r.add_argument("--out", required=True, help="the PDF to write")
    r.add_argument("--csv", help="also write the results as CSV here")
    r.add_argument("--weights", help="model directory (default: $BT_WEIGHTS or weights/DEFAULT)")
    r.add_argument("--threshold", type=_probability,
                   help="operating point on the tumour probability (default: the model card's)")
    r.add_argument("--method", help="saliency method (gradcam, gradcam++, hirescam, xgradcam, "
                                    "layercam, eigencam; default: the card's, as in the app)")
    r.add_argument("--audit", help="append one JSON line per file read (its prediction, or none) to this log "
                                   "(opt-in; holds file hashes and results, never file names)")
    r.set_defaults(fn=cmd_report)
