"""Zips of scans, read in memory only.

Nothing here writes a file, so a member's path is only ever a label; even so, members with
absolute or ``..`` paths are refused (a zip carrying them was not made by a scanner export), as
are links and encrypted members. Hidden files and macOS ``__MACOSX`` resource forks are skipped
silently. Before anything is inflated the archive is checked against zip-bomb limits: member
count, total declared size, and each member's compression ratio; reads are then bounded by the
declared size, so a lying header cannot inflate more.
"""
from __future__ import annotations

import io
import stat
import zipfile
from pathlib import PurePosixPath

from .reader import MAX_BYTES, ScanError

MAX_MEMBERS = 2000
MAX_TOTAL_BYTES = 4 * MAX_BYTES      # everything inflated, held in memory at once
MAX_RATIO = 100                      # uncompressed / compressed, per member
RATIO_FLOOR = 2**20                  # small members may compress well (blank DICOM padding)
JUNK_NAMES = {"thumbs.db", "desktop.ini"}


class ZipMembers(list):
    """A list of (member_name, bytes); ``skipped`` holds (member_name, reason) for the others."""

    def __init__(self, items=(), skipped=None):
        super().__init__(items)
        self.skipped: list[tuple[str, str]] = list(skipped or [])


def _clean_name(raw: str) -> tuple[str, str | None]:
    """(display name, reason to refuse or None) for a member path."""
    name = raw.replace("\\", "/")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    unsafe = name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts
    shown = "/".join(p for p in parts if p != "..") or "(unnamed)"
    return shown, "The file's path in the zip is unsafe (absolute or containing '..')." if unsafe else None


def _is_junk(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p.startswith(".") or p == "__MACOSX" for p in parts) or parts[-1].lower() in JUNK_NAMES


def _open_zip(data: bytes) -> zipfile.ZipFile:
    if not data:
        raise ScanError("The zip archive is empty.")
    if len(data) > MAX_BYTES:
        raise ScanError(f"The zip archive is larger than the {MAX_BYTES // 2**20} MB limit.")
    try:
        return zipfile.ZipFile(io.BytesIO(data))
    except UnicodeDecodeError as e:  # flagged UTF-8, yet not: zipfile cannot list any member
        raise ScanError("The zip archive has a file name that is not valid UTF-8; "
                        "create the zip again.") from e
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as e:
        raise ScanError("The file is not a valid zip archive.") from e


def _check_bomb(infos: list[zipfile.ZipInfo]) -> None:
    """Refuse the whole archive from its central directory, before inflating anything."""
    if len(infos) > MAX_MEMBERS:
        raise ScanError(f"The zip archive holds more than {MAX_MEMBERS} files.")
    total = sum(i.file_size for i in infos)
    if total > MAX_TOTAL_BYTES:
        raise ScanError(f"The zip archive unpacks to more than {MAX_TOTAL_BYTES // 2**20} MB.")
    for i in infos:
        if i.file_size > RATIO_FLOOR and i.file_size > MAX_RATIO * max(i.compress_size, 1):
            raise ScanError(f"The zip archive looks like a zip bomb (a file expands more than "
                            f"{MAX_RATIO} times).")


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "The file is a link, not a scan."
    if info.flag_bits & 0x1:
        return "The file is encrypted."
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


def read_zip(data: bytes) -> ZipMembers:
    """The scans inside a zip as (member_name, bytes), in archive order, all in memory.

    Raises ScanError (one sentence) for an archive that cannot be used at all: not a zip, too
    many files, too large once unpacked, a zip bomb. A single bad member is left out and listed
    in ``.skipped`` with its reason, so it never stops the others.
    """
    out = ZipMembers()
    with _open_zip(data) as zf:
        try:
            infos = [i for i in zf.infolist() if not i.is_dir()]
        except Exception as e:
            raise ScanError("The zip archive is damaged.") from e
        _check_bomb(infos)
        for info in infos:
            name, unsafe = _clean_name(info.filename)
            if _is_junk(name):
                continue
            problem = unsafe or _member_problem(info)
            if problem:
                out.skipped.append((name, problem))
                continue
            try:
                out.append((name, _read_member(zf, info)))
            except NotImplementedError:
                out.skipped.append((name, "The file uses a zip compression method that is not supported."))
            except Exception:  # CRC error, truncated archive, bad deflate stream
                out.skipped.append((name, "The file is damaged inside the zip archive."))
    return out


def zip_to_labelled(data: bytes) -> ZipMembers:
    """A class-per-folder zip as (class_folder, member_name, bytes): the class is the folder
    holding the file (``any/prefix/<class>/scan.jpg``), as named in the zip; map it with
    `core.labels.normalise_label`. Files at the top level are listed in ``.skipped``."""
    members = read_zip(data)
    out = ZipMembers(skipped=members.skipped)
    for name, content in members:
        parts = PurePosixPath(name).parts
        if len(parts) < 2:
            out.skipped.append((name, "The file is not inside a class folder."))
            continue
        out.append((parts[-2], name, content))
    return out
