"""Zips of scans, read in memory only.

Nothing here writes a file, so a member's path is only ever a label; even so, members with
absolute or ``..`` paths are refused (a zip carrying them was not made by a scanner export), as
are links and encrypted members. Hidden files and macOS ``__MACOSX`` resource forks are skipped
and count towards no limit (a labelled zip lists them, as `evaluate` lists them in a folder). Zip bombs are bounded by sizes, not guessed from ratios: the
number of entries and the listing's size are checked in the end record (or the zip64 one)
before the listing is parsed, members are inflated only while ``budget`` (their declared sizes)
lasts, and a read stops at the declared size, so a lying header cannot inflate more. That stop
holds for stored and deflated members only (zipfile bounds no other decompressor), so bzip2 and
lzma members are refused. A well-compressed scan (a NIfTI label map is mostly
zeros) is therefore read like any other.
"""
from __future__ import annotations

import io
import stat
import struct
import zipfile
import zlib
from pathlib import PurePosixPath
from typing import Callable

from .reader import MAX_BYTES, ScanError

MAX_MEMBERS = 2000                   # files a zip may hold (resource forks and folders not counted)
MAX_ENTRIES = 4 * MAX_MEMBERS        # entries of any kind, from the end record, before parsing
MAX_TOTAL_BYTES = 4 * MAX_BYTES      # everything inflated, held in memory at once
# What zips may add when unpacked, on top of their own bytes: 64 MB, plus 4x what they weigh. A
# 0.4 MB zip of zeros pinned 240 MB per session (and on every rerun) on a 1 GB host; a DICOM
# series deflates 2-3x (176 slices: 32 MB zipped, 88 MB unpacked) and must still be read whole.
# bench/app_memory.py --zip-mb measures it.
FREE_UNPACK_BYTES = 64 * 2**20
UNPACK_RATIO = 4
JUNK_NAMES = {"thumbs.db", "desktop.ini"}
UTF8_FLAG, UNICODE_PATH_EXTRA = 0x800, 0x7075
ZIP64_LOCATOR, ZIP64_END = 20, 56    # bytes of the zip64 end locator and of its end record
CD_ENTRY_BYTES = 46                  # a listing entry without its name, extra field and comment
MAX_NAME_BYTES = 300                 # a generous average for a path plus extra fields
# zipfile stops a read at the declared size only for these (it bounds no other decompressor)
READABLE_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}


class ZipMembers(list):
    """A list of (member_name, bytes); ``skipped`` holds (member_name, reason) for the others,
    and ``entries`` every member in archive order as (name, bytes or reason)."""

    def __init__(self, items=(), skipped=None):
        super().__init__(items)
        self.skipped: list[tuple[str, str]] = list(skipped or [])
        self.entries: list[tuple[str, bytes | str]] = []
        self.note: str | None = None   # a labelled zip's one-folder hint (`core.data.tree_classes`)
        self.split_note: str | None = None   # which split folder of a labelled zip was scored

    def add(self, name: str, content: bytes) -> None:
        self.append((name, content))
        self.entries.append((name, content))

    def skip(self, name: str, why: str) -> None:
        self.skipped.append((name, why))
        self.entries.append((name, why))


def _clean_name(raw: str) -> tuple[str, str | None]:
    """(display name, reason to refuse or None) for a member path. A refused name is shown as
    stored: the message speaks of its '..' and it must not pass for a safe member's name."""
    name = raw.replace("\\", "/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    unsafe = name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts
    if unsafe:
        return raw, "The file's path in the zip is unsafe (absolute or containing '..')."
    return "/".join(parts) or "(unnamed)", None


def _member_name(info: zipfile.ZipInfo) -> str:
    """The member's name as its maker wrote it. Info-ZIP (Linux ``zip``) stores UTF-8 names
    without the UTF-8 flag, which zipfile then reads as cp437 ('Müller' became 'M├╝ller'): take
    the Unicode Path extra field if it matches the name (its CRC), else, for a Unix-made zip, the
    name's bytes as UTF-8 if they are."""
    if info.flag_bits & UTF8_FLAG:
        return info.filename
    try:
        stored = info.filename.encode("cp437")   # the name's bytes as the zip holds them
    except UnicodeEncodeError:
        return info.filename
    extra, at = info.extra, 0
    while at + 4 <= len(extra):
        kind, size = struct.unpack_from("<HH", extra, at)
        if kind == UNICODE_PATH_EXTRA and size > 5 and extra[at + 4] == 1:
            # valid only for the name it was written for: a renamed member keeps a stale field
            if struct.unpack_from("<I", extra, at + 5)[0] == zlib.crc32(stored):
                try:
                    return extra[at + 9:at + 4 + size].decode("utf-8")
                except UnicodeDecodeError:
                    pass
            break
        at += 4 + size
    if info.create_system != 3:   # not Unix-made: a DOS/Windows tool's cp437 name is what it says
        return info.filename
    try:
        return stored.decode("utf-8")
    except UnicodeDecodeError:
        return info.filename


# Metadata folders that archives, NAS boxes and Windows leave beside the images (a Synology @eaDir
# holds a thumbnail per image, named like the image: a folder read it as a class, and inside a class
# as scans). Lower case; skipped by zips here and by folders (core.data.SKIP_DIRS).
METADATA_DIRS = {"__macosx", "@eadir", "$recycle.bin", "system volume information"}


def _is_junk(name: str) -> bool:
    return _junk_reason(name) is not None


# Why a labelled zip left a junk member out: the words `core.data` gives the same file in a folder.
HIDDEN, HIDDEN_FOLDER, METADATA = "hidden file", "hidden folder", "archive or system metadata"
JUNK_REASONS = (HIDDEN, HIDDEN_FOLDER, METADATA)


def _junk_listed(names: list[str]) -> list[tuple[str, str]]:
    """(name, reason) of the junk among ``names``: a metadata or hidden folder once, as 'X/' (as
    `core.data` lists a folder's), a hidden or system file by itself."""
    out: dict[str, str] = {}
    for name in names:
        if not (why := _junk_reason(name)):
            continue
        parts = PurePosixPath(name).parts
        folder = next((k for k, p in enumerate(parts[:-1]) if p.lower() in METADATA_DIRS or p.startswith(".")), None)
        if folder is not None:
            out.setdefault("/".join(parts[:folder + 1]) + "/", METADATA if parts[folder].lower() in METADATA_DIRS
                           else HIDDEN_FOLDER)
        else:
            out.setdefault(name, why)
    return list(out.items())


def _junk_reason(name: str) -> str | None:
    """HIDDEN, METADATA or None: a member no scanner wrote (.DS_Store, __MACOSX/, Thumbs.db)."""
    parts = PurePosixPath(name).parts
    if any(p.startswith(".") and p not in (".", "..") for p in parts):
        return HIDDEN
    return METADATA if any(p.lower() in METADATA_DIRS for p in parts[:-1]) or parts[-1].lower() in JUNK_NAMES else None


def _declared_listing(data: bytes) -> tuple[int, int] | None:
    """(entries, listing bytes) the end record declares, the zip64 end record's where one stands
    before it, as zipfile reads them (None if no end record): read before zipfile parses the
    listing, which for 450,000 entries takes seconds and hundreds of MB."""
    at = data.rfind(b"PK\x05\x06", max(0, len(data) - 2**16 - 22))
    if at < 0 or at + 16 > len(data):
        return None
    declared = struct.unpack_from("<HI", data, at + 10)
    z64 = at - ZIP64_LOCATOR - ZIP64_END
    if z64 >= 0 and data[at - ZIP64_LOCATOR:at - ZIP64_LOCATOR + 4] == b"PK\x06\x07" \
            and data[z64:z64 + 4] == b"PK\x06\x06":
        # zipfile takes these over the 16-bit count (0xFFFF past 65,535 entries) whatever it says
        declared = struct.unpack_from("<QQ", data, z64 + 32)
    return declared


def _listing_problem(data: bytes) -> str | None:
    """Why the listing is too large to parse: zipfile parses as many entries as the listing's
    declared size holds, whatever their count says, so both are bounded."""
    entries, size = _declared_listing(data) or (0, 0)
    if entries > MAX_ENTRIES:
        return f"The zip archive holds more than {MAX_MEMBERS} files."
    if size > MAX_ENTRIES * (CD_ENTRY_BYTES + MAX_NAME_BYTES):
        return (f"The zip archive's list of files is too large (more than {MAX_MEMBERS} files, "
                "or very long names).")
    return None


def _open_zip(data: bytes) -> zipfile.ZipFile:
    if not data:
        raise ScanError("The zip archive is empty.")
    if len(data) > MAX_BYTES:
        raise ScanError(f"The zip archive is larger than the {MAX_BYTES // 2**20} MB limit.")
    if (problem := _listing_problem(data)):
        raise ScanError(problem)
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except UnicodeDecodeError as e:  # flagged UTF-8, yet not: zipfile cannot list any member
        raise ScanError("The zip archive has a file name that is not valid UTF-8; "
                        "create the zip again.") from e
    except NotImplementedError as e:  # a (damaged) listing asks for a zip version zipfile lacks
        raise ScanError("The zip archive uses a zip version that is not supported, or is damaged.") from e
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as e:
        raise ScanError("The file is not a valid zip archive.") from e


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "The file is a link, not a scan."
    if info.flag_bits & 0x1:
        return "The file is encrypted."
    if info.compress_type not in READABLE_METHODS:
        # a bzip2 member declaring 1 kB inflated to 600 MB before the size check could stop it
        return ("The file is compressed with a method this app does not read (bzip2, lzma or "
                "other): re-zip it with the standard method.")
    if info.file_size == 0:
        return "The file is empty."
    if info.file_size > MAX_BYTES:
        return f"The file is larger than the {MAX_BYTES // 2**20} MB limit."
    return None


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    with zf.open(info) as f:
        content = f.read(info.file_size + 1)  # never more than the header declared
    if len(content) != info.file_size:
        raise zipfile.BadZipFile("size differs from the header")
    return content


def _listing(zf: zipfile.ZipFile) -> list[tuple[str, zipfile.ZipInfo]]:
    """(name, info) of the files worth reading, in archive order: no folders, no junk."""
    try:
        named = [(_member_name(i), i) for i in zf.infolist() if not i.is_dir()]
    except Exception as e:
        raise ScanError("The zip archive is damaged.") from e
    files = [(n, i) for n, i in named if not _is_junk(_clean_name(n)[0])]
    if len(files) > MAX_MEMBERS:
        raise ScanError(f"The zip archive holds more than {MAX_MEMBERS} files.")
    return files


def unpack_allowance(zip_bytes: int) -> int:
    """Bytes that zips weighing ``zip_bytes`` may inflate to, held at once: bounded by what they
    weigh, so a small zip cannot cost the host far more memory than an upload of its size."""
    return min(MAX_TOTAL_BYTES, FREE_UNPACK_BYTES + UNPACK_RATIO * zip_bytes)


def read_zip(data: bytes, budget: int | None = None, over_budget: str | None = None,
             unwanted: Callable[[str], str | None] | None = None) -> ZipMembers:
    """The scans inside a zip as (member_name, bytes), in archive order, all in memory.

    Raises ScanError (one sentence) for an archive that cannot be used at all: not a zip, damaged,
    too many files. A single bad member is left out and listed in ``.skipped`` with its reason,
    so it never stops the others; so is each member past ``budget`` bytes (declared sizes, checked
    before inflating), with the reason ``over_budget``, and each member ``unwanted`` gives a
    reason for (never inflated, so it costs no budget).
    """
    out = ZipMembers()
    budget = unpack_allowance(len(data)) if budget is None else budget
    over = over_budget or (f"The zip archive unpacks to more than {budget // 2**20} MB: this file "
                           "was not read.")
    with _open_zip(data) as zf:
        for raw, info in _listing(zf):
            name, unsafe = _clean_name(raw)
            problem = unsafe or _member_problem(info) or (unwanted(name) if unwanted else None)
            if not problem and info.file_size > budget:
                problem = over
            if problem:
                out.skip(name, problem)
                continue
            try:
                content = _read_member(zf, info)
            except NotImplementedError:
                out.skip(name, "The file uses a zip compression method that is not supported.")
                continue
            except Exception:  # CRC error, truncated archive, bad deflate stream
                out.skip(name, "The file is damaged inside the zip archive.")
                continue
            out.add(name, content)
            budget -= len(content)
    return out


OTHER_SPLIT = "in a split folder other than the one scored"   # not listed: said once (`split_note`)


def zip_to_labelled(data: bytes, known: Callable[[str], bool] | None = None,
                    budget: int | None = None) -> ZipMembers:
    """A class-per-folder zip as (class_folder, member_name, bytes), each member labelled as
    `python -m core evaluate` labels the same tree on disk (`core.data.tree_classes`: wrappers
    unwrapped, Training/Testing passed, patient folders inside their class, masks left out); map
    the folder with `core.labels.normalise_label`. Members outside a class folder, and with
    ``known`` those of a class folder it rejects, are listed in ``.skipped`` and never inflated."""
    from .data import tree_classes
    with _open_zip(data) as zf:   # the names alone: the layout is decided before anything is inflated
        names = [_clean_name(raw)[0] for raw, _ in _listing(zf)]
        every = [_clean_name(_member_name(i))[0] for i in zf.infolist() if not i.is_dir()]
    home = tree_classes(names)
    # a Training/ + Testing/ layout: only Testing/ (else Validation/) is scored, as `evaluate` scores
    # it (the page pooled both, its headline figures counting the model's own training images);
    # what lies outside that folder is left out unread and unlisted, as `evaluate` leaves it
    chosen = next((s for s in ("test", "val") if s in home.splits.values()), None)

    def outside(name: str, junk: bool = False) -> bool:
        """In another split folder, or (a scan) in a class folder beside the one scored, which
        `evaluate` takes for the training part; a loose file is listed as it lists it."""
        split = home.split(name)
        return chosen is not None and split != chosen and (split is not None or (not junk and bool(home.get(name, (None,))[0])))

    def unwanted(name: str) -> str | None:
        if outside(name):
            return OTHER_SPLIT
        folder, why = home.get(name, (None, "the file is not inside a class folder"))
        if why:
            return why[0].upper() + why[1:] + "."
        if known and not known(folder):
            return f"its folder ('{folder}') names no class of this model"
        return None
    budget = unpack_allowance(len(data)) if budget is None else budget
    over = (f"The zip archive unpacks to more than {budget // 2**20} MB: this file was not read "
            "(evaluate larger sets with `python -m core evaluate` on the folder).")
    members = read_zip(data, budget, over, unwanted)
    # hidden and system files listed, as `evaluate` lists them in a folder (they were dropped without
    # a word): after the real problems, a metadata folder once ('__MACOSX/': 600 forks buried them)
    out = ZipMembers(skipped=[s for s in members.skipped if s[1] != OTHER_SPLIT]
                     + _junk_listed([n for n in every if not outside(n, junk=True)]))
    out.note = home.note
    if (left := sum(s[1] == OTHER_SPLIT for s in members.skipped)):
        folder = {"test": "Testing/", "val": "Validation/"}[chosen]
        out.split_note = (f"Scored: the {folder} folder's scans, as `python -m core evaluate` scores this layout; "
                          f"the {left} file{'s' * (left != 1)} outside it were left out unread (a model's "
                          "own training images would flatter it).")
    for name, content in members:
        out.append((home[name][0], name, content))
    return out
