"""Datasets: find images in class-per-folder layouts, group near duplicates, split by group.

A *source* is one data root (the benchmark, Br35H, LGG, ...). Every image becomes a `Sample`;
samples are grouped by perceptual hash (near duplicates, across sources too) and by patient
where the file name gives one, and groups, never single images, are assigned to splits.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath

import numpy as np

from .archive import METADATA_DIRS
from .labels import CANONICAL, FINE_TUMOURS, TUMOUR, normalise_label

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif",
                  ".dcm", ".dicom", ".ima", ".nii", ".gz"}
SPLIT_DIRS = {"training": "train", "train": "train", "testing": "test", "test": "test",
              "validation": "val", "val": "val", "valid": "val"}


def split_of(folder_name: str) -> str | None:
    """'train', 'test' or 'val' for a split folder ('Training', 'Testing ', 'training_set',
    'test-data', 'Validation'), None for any other: a trailing space or a '_set' suffix must not
    make the split a class."""
    key = re.sub(r"[^a-z]", "", folder_name.lower())
    for _ in range(2):   # train_images, test_split, Training_Set_Images
        key = re.sub(r"(set|data|images|imgs|split|files)$", "", key) or key
    return SPLIT_DIRS.get(key)
SKIP_DIRS = {"masks", "mask", *METADATA_DIRS}
# TCGA_<site>_<patient>_<slice>: every slice of one patient belongs to one group. Hyphens (the
# usual barcode, TCGA-CS-4941) and any case too, or a patient folder (TCGA_CS_4941_19960909/011.jpg).
# A barcode's site is 2 characters and its patient 4 (all 95 of lgg-flair): 'tcga_batch_1/' or
# 'TCGA-GBM-T1-0001.png' name no patient, and must not join a folder's images into one group.
PATIENT_RE = re.compile(r"^(TCGA[_-][A-Z0-9]{2}[_-][A-Z0-9]{4})[_-]\d+", re.I)
PATIENT_DIR_RE = re.compile(r"^(TCGA[_-][A-Z0-9]{2}[_-][A-Z0-9]{4})(?:[_-]|$)", re.I)
HASH_CACHE = Path(os.environ.get("BT_CACHE", Path.home() / ".cache" / "brain-tumour")) / "phash4.json"  # plain + flips: not the one-hash phash.json of older versions


def _umask() -> int:
    mask = os.umask(0o022)   # read by setting: there is no getter
    os.umask(mask)
    return mask


def save_whole(path: str | Path, write) -> None:
    """``write(tmp)``, then ``tmp`` swapped in for ``path``: a reader (another run filling the same
    cache at the same moment, as two runs side by side on one GPU machine do) never opens a
    half-written file. The temporary name carries the process id, so two writers never share one,
    and keeps the suffix, so numpy appends none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        # the mode a plain open() gives: safetensors writes 0600, and weights that only their
        # trainer can read fail to load in an app or CLI run by another user
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


DEFAULT_SOURCE = "data"   # the source of a sample, or an eval.json record, that names none


def source_of(record: dict) -> str:
    """The source an eval.json record belongs to."""
    return record.get("source", DEFAULT_SOURCE)


@dataclass
class Sample:
    path: str            # absolute path
    rel: str             # path relative to the source root (what cards and eval.json record)
    label: str           # normalised label (fine class, notumor or coarse 'tumor')
    original: str        # the folder name as found
    source: str = DEFAULT_SOURCE
    preset_split: str | None = None   # 'test'/'val' when the dataset ships a Testing/ or Validation/ folder
    group: str = ""
    split: str = ""


@dataclass
class Scan:
    """What a walk over a data root found: the samples and everything it skipped, with why."""
    samples: list[Sample] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    wrapper: str = ""   # "Brain Tumor/" when the classes sit in one wrapper folder (`_unwrapped`)

    def inner(self, rel: str) -> str:
        """``rel`` below the wrapper: where Training/ or Testing/ would start."""
        rel = rel.replace("\\", "/")
        return rel[len(self.wrapper):] if self.wrapper and rel.startswith(self.wrapper) else rel


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".") or p.name.startswith("._")


def _links_above(d: Path) -> bool:
    """A linked folder pointing at itself or a folder above it: walking it would loop."""
    try:
        return d.is_symlink() and d.parent.resolve().is_relative_to(d.resolve())
    except (OSError, RuntimeError):  # a loop of links
        return True


def _link_to_sibling(d: Path, siblings: list[Path]) -> Path | None:
    """The folder of ``siblings`` that the linked folder ``d`` points at, if any: 'gliomalink ->
    glioma' read the same images again as a class of its own (a link to a folder elsewhere is read)."""
    if not d.is_symlink():
        return None
    target = d.resolve()
    return next((s for s in siblings if s != d and not s.is_symlink() and s.resolve() == target), None)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir()
                  if d.is_dir() and not _is_hidden(d) and d.name.lower() not in SKIP_DIRS and not _links_above(d))


def _skip_reason(name: str) -> str:
    return "archive or system metadata" if name.lower() in METADATA_DIRS else "a folder of masks: not read as scans"


def _stray(base: Path, root: Path) -> list[tuple[str, str]]:
    """What sits beside the class folders and is not read: loose files and hidden folders."""
    out = []
    for f in sorted(base.iterdir()):
        rel = str(f.relative_to(root))
        if f.is_dir() and _is_hidden(f):
            out.append((rel + "/", "hidden folder"))
        elif f.is_dir() and f.name.lower() in SKIP_DIRS:
            out.append((rel + "/", _skip_reason(f.name)))
        elif _links_above(f):
            out.append((rel + "/", "a link to this folder or one above it: not followed" if f.exists()
                        else "a loop of links, leading to no file: not followed"))
        elif not f.is_dir():
            out.append((rel, "hidden file" if _is_hidden(f) else "not inside a class folder"))
    return out


# First bytes of the image formats the reader decodes (what `predict` reads whatever the name).
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")
BMP_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}   # after "BM": a note starting "BM..." is no bitmap


def _is_image_file(f: Path) -> bool:
    """By suffix, or by content: scanner exports often have no suffix, a UID for a name
    ("1.2.840.113619.2.55.1") or a vendor's (".IMA"), and a saved JPEG may have none either."""
    if f.suffix.lower() in IMAGE_SUFFIXES:
        return True
    if not f.is_file():  # opening a pipe to sniff it would wait for ever
        return False
    try:
        with open(f, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return (head[128:] == b"DICM" or head.startswith(IMAGE_MAGIC)
            or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
            or (head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in BMP_HEADER_SIZES))


MASK_BESIDE_SCAN = "a tumour mask beside its scan (Kaggle LGG's X_mask): not a scan (train.py --mask-loss reads it)"


def _is_mask_beside_scan(f: Path) -> bool:
    """``X_mask.tif`` next to ``X.tif`` (the Kaggle LGG layout `saliency.mask_path_for` reads), or
    ``X_mask.png`` next to ``X.jpg`` as the Diagnose page pairs them: a radiologist's outline,
    which must not train or be scored as a scan of its class."""
    stem = f.stem
    return stem.lower().endswith("_mask") and any(
        g.is_file() for g in f.parent.glob(glob.escape(stem[:-5]) + ".*")
        if g != f and g.suffix.lower() in IMAGE_SUFFIXES)


REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_KEYS = {"path", "name", "weight", "label_map"}


def resolve_root(path: str | Path) -> Path:
    """A data root as configs write it: from the working directory, else from the repository
    root (the shipped configs say ../shared/..., which holds from the repository)."""
    p = Path(path)
    return p if p.is_absolute() or p.exists() else REPO_ROOT / p


def real_path(path: str | Path) -> Path:
    """``path`` with its links followed; FileNotFoundError, in a sentence, for a loop of links
    (Python 3.11's resolve raises a RuntimeError on one, which reached users as a traceback)."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):
        raise FileNotFoundError(f"{path} is not a directory (its links lead round in a loop)") from None


def repo_relative(path: str | Path) -> str:
    """A file's path as a record keeps it: relative to the repository (with /) when it lies inside
    it, so that the record holds on another machine or checkout; else as `portable_root` keeps a
    data root (as written when it reads the same from the repository root, else absolute)."""
    p = resolve_root(path).resolve()
    # outside it (../shared/...), as a card records a data root: as written when that holds from the repository
    return p.relative_to(REPO_ROOT).as_posix() if p.is_relative_to(REPO_ROOT) else portable_root(path)


def portable_root(path: str | Path) -> str:
    """A data root as a card records it: as written when it reads the same from the repository
    root (later commands resolve it from there, from any folder), else absolute."""
    p = Path(path)
    if p.is_absolute() or (REPO_ROOT / p).resolve() == resolve_root(p).resolve():
        return str(path)
    return str(resolve_root(p).resolve())


def _checked_entry(e: dict) -> dict:
    """A config's source table, refused in one sentence when a key or a value is wrong (a typo
    such as 'wieght' would otherwise train a held-out source at weight 1)."""
    if "path" not in e:
        raise ValueError(f"a source without a path: {e}")
    for key in ("path", "name"):   # a TOML name = 2021 trained, then its split.json's "2021" failed a resume
        if key in e and not (isinstance(e[key], str) and e[key].strip()):
            raise ValueError(f"source {e['path']!r}: {key} must be a non-empty text, not {e[key]!r}")
    unknown = sorted(set(e) - SOURCE_KEYS)
    if unknown:
        raise ValueError(f"source {e['path']}: unknown key(s) {', '.join(unknown)} "
                         f"(a source takes {', '.join(sorted(SOURCE_KEYS))})")
    w = e.get("weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
        raise ValueError(f"source {e['path']}: weight must be a number >= 0, not {w!r}")
    lm = e.get("label_map", {})
    if not isinstance(lm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in lm.items()):
        raise ValueError(f"source {e['path']}: label_map must map folder names to class names")
    return {**e, "weight": float(w)}


def parse_sources(entries: list) -> list[dict]:
    """`PATH`, `PATH=WEIGHT` or {path, weight, name, label_map} -> [{path, weight, name, ...}]; a
    source is named after its folder (the parent of a Training/Testing folder), as train.py
    records it. ``label_map`` renames folders of that source: {"lesion": "tumor"}."""
    if isinstance(entries, (str, dict)) or not isinstance(entries, (list, tuple)):
        raise ValueError(f"a list of sources is expected (data = [...]), not {entries!r}")
    out = []
    for e in entries:
        if isinstance(e, dict):
            d = _checked_entry(e)
        elif Path(str(e)).is_dir():   # a folder whose name holds '=' ("run=3") is a folder
            d = {"path": str(e), "weight": 1.0}
        else:   # the weight follows the last '=': "a=b/c=2" is the folder "a=b/c", weight 2
            path, _, w = str(e).rpartition("=") if "=" in str(e) else (str(e), "", "")
            try:
                d = {"path": path, "weight": float(w or 1.0)}
            except ValueError:
                raise ValueError(f"{e}: the weight after '=' must be a number") from None
        try:
            p = real_path(resolve_root(d["path"]))  # `.` and `data/` are named after the folder itself
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
        d.setdefault("name", p.parent.name if split_of(p.name) else p.name)
        out.append(d)
    return out


def overlapping(roots: list[tuple[str, Path]]) -> list[str]:
    """'a and b' for each pair of (name, resolved folder) where one is the other or lies inside it:
    their images would count twice."""
    return [f"{a} and {b}" for i, (a, ra) in enumerate(roots) for b, rb in roots[i + 1:]
            if ra == rb or ra in rb.parents or rb in ra.parents]


def _layout_like(d: Path, depth: int = 8, children=_class_dirs) -> bool:
    """Whether a folder holds a dataset layout rather than images of one class: Training/Testing
    folders, folders named like two different classes, or one folder that holds such a layout
    (wrappers nest: "archive/Brain Tumor/Training/...", and `zip -r` of an absolute path nests
    /home/user/data/set/ four deep and more). ``children``: a folder's class-level
    subfolders (on disk, or in a zip's listing: `tree_classes`)."""
    subs = children(d)
    named = {normalise_label(x.name) for x in subs} & set(CANONICAL)  # distinct: "no_1", "no_2" are patients
    if any(split_of(x.name) for x in subs) or len(named) >= 2:
        return True
    return depth > 1 and len(subs) == 1 and _layout_like(subs[0], depth - 1, children)


def _is_wrapper(d: Path, children=_class_dirs) -> bool:
    """A lone folder that only wraps the classes: it holds a layout, or it is named like no class
    and every folder in it names a different class ("MyData/glioma/"). Patient folders stay inside
    their class: "yes/patient1/", and "astrocytoma/{normal_01, p2}" or "astrocytoma/{no_1, no_2}",
    whose names only look like classes."""
    if _layout_like(d, children=children):
        return True
    labels = [normalise_label(x.name) for x in children(d)]
    return normalise_label(d.name) not in CANONICAL and bool(labels) and \
        all(lab in CANONICAL for lab in labels) and len(set(labels)) == len(labels)


def _unwrapped(root: Path, children=_class_dirs) -> Path:
    """The folder the classes are in: an archive often unpacks into one wrapper folder
    ("Brain Tumor/Training/glioma/..."), whose name must not label every image below it."""
    while True:
        tops = children(root)
        if len(tops) != 1 or split_of(tops[0].name) or not _is_wrapper(tops[0], children):
            return root
        root = tops[0]


def _split_levels(split_dir: Path, children=_class_dirs) -> list[Path]:
    """A Training/ folder and the folders below it down to the one the classes are in (last):
    archives double the split folder ("Training/Training/glioma/") or wrap it ("Training/data/glioma/")."""
    levels = [split_dir]
    for _ in range(3):
        subs = children(levels[-1])
        if len(subs) != 1 or not (split_of(subs[0].name) or _is_wrapper(subs[0], children)):
            break
        levels.append(subs[0])
    return levels


def _class_levels(top: Path, children=_class_dirs) -> tuple[list[tuple[Path, str | None]], list[Path], list[Path]]:
    """([(folder the classes are in, its split or None)], the split folders, the folders beside
    them) of an unwrapped ``top``: Training/Testing levels passed, class folders beside a Testing/
    with no Training/ being the training part (`discover`)."""
    tops = children(top)
    split_tops = [d for d in tops if split_of(d.name)]
    levels = [_split_levels(d, children) for d in split_tops]
    layout = [(ls[-1], split_of(ls[0].name)) for ls in levels] if split_tops else [(top, None)]
    beside = [d for d in tops if d not in split_tops]
    if split_tops and beside and "train" not in {preset for _, preset in layout}:
        layout.append((top, None))
    return layout, split_tops, beside


class TreeClasses(dict):
    """`tree_classes`'s {rel: (class folder, why not read)}, with ``note`` (`one_folder_words`) and
    ``splits``: {split folder: 'train', 'test' or 'val'}, the layout's own (`_class_levels`)."""
    note: str | None = None
    splits: dict = {}

    def split(self, rel: str) -> str | None:
        """The split folder ``rel`` lies in, as `discover` gives its samples' ``preset_split``: only a
        split folder of the layout counts ('glioma/test/x.jpg' is a glioma of no split)."""
        return next((s for f in PurePosixPath(rel).parents if (s := self.splits.get(f))), None)


def tree_classes(rels: list[str]) -> TreeClasses:
    """{rel: (its class folder's name, None) or (None, why it is not read)} for files given by
    their relative paths (a zip's members, no pixels at hand), read as `discover` reads the same
    tree on disk: wrapper folders unwrapped, Training/Testing levels passed, every file below a
    class folder of that class ('glioma/patient01/x.jpg'), masks left out."""
    kids: dict[PurePosixPath, set[PurePosixPath]] = defaultdict(set)
    for rel in rels:
        for folder in list(PurePosixPath(rel).parents)[:-1]:
            kids[folder.parent].add(folder)

    def children(d):
        return sorted(x for x in kids.get(d, ()) if not x.name.startswith(".") and x.name.lower() not in SKIP_DIRS)
    top = _unwrapped(PurePosixPath("."), children)
    layout, split_tops, _ = _class_levels(top, children)
    classes = {c: c.name for base, _ in layout for c in children(base) if c not in split_tops}
    scans = {(q.parent, q.stem) for q in map(PurePosixPath, rels) if q.suffix.lower() in IMAGE_SUFFIXES
             and not q.stem.lower().endswith("_mask")}
    out = TreeClasses()
    for rel in rels:
        p = PurePosixPath(rel)
        home = next((classes[f] for f in p.parents if f in classes), None)
        if (skip := next((f.name for f in p.parents if f.name.lower() in SKIP_DIRS), None)):
            out[rel] = (None, _skip_reason(skip))
        elif p.stem.lower().endswith("_mask") and (p.parent, p.stem[:-5]) in scans:
            out[rel] = (None, MASK_BESIDE_SCAN)
        else:
            out[rel] = (home, None if home else "the file is not inside a class folder")
    out.note = one_folder_words([PurePosixPath(r).relative_to(top).parts for r, (c, _) in out.items() if c],
                                "zip the contents of '{top}' instead")
    out.splits = {d: split_of(d.name) for d in split_tops}
    return out


def _nothing_found(root: Path, skipped: list[tuple[str, str]]) -> str:
    """Why a walk found no image, with what it set aside (five loose JPEGs are not 'nothing')."""
    msg = f"no images found in class folders under {root} (expected {root}/<class>/*.jpg)"
    if not skipped:
        return msg
    why = Counter(reason for _, reason in skipped)
    parts = ", ".join(f"{n} {reason}" for reason, n in why.most_common(3))
    return f"{msg}; set aside: {parts} (e.g. {skipped[0][0]})"


def discover(root: str | Path, source: str | None = None, check_readable: bool = False) -> Scan:
    """Find ``root/<class>/*`` or ``root/{Training,Testing}/<class>/*`` images; with a Testing/
    (or Validation/) folder and no Training/ one, the class folders beside it are the training part.

    Hidden files, non-images and (with ``check_readable``) unreadable images are reported in
    ``Scan.skipped`` and never stop the walk.
    """
    root = real_path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    source = source or root.name
    scan = Scan()
    top = _unwrapped(root)
    scan.wrapper = "" if top == root else top.relative_to(root).as_posix() + "/"
    layout, split_tops, beside = _class_levels(top)
    # loose files in the levels a doubled split folder skips
    scan.skipped += [item for d in split_tops for lv in _split_levels(d)[:-1] for item in _stray(lv, root)]
    scan.skipped += _stray(root, root) + (_stray(top, root) if top != root else [])
    # class folders beside Testing/ with no Training/ are the training part (in `layout`); beside
    # Training/Testing they belong to no split: say so, never drop silently
    if split_tops and (top, None) not in layout:
        scan.skipped += [(str(d.relative_to(root)) + "/", "a folder beside the Training/Testing folders: not read "
                                        "(move it into one of them)") for d in beside]
    for base, preset in layout:
        if base != top:
            scan.skipped += _stray(base, root)
        cdirs = _class_dirs(base)
        for cdir in cdirs:
            if base == top and cdir in split_tops:
                continue
            if (twin := _link_to_sibling(cdir, cdirs)) is not None:   # its images once, under their own class
                scan.skipped.append((str(cdir.relative_to(root)) + "/", f"a link to the folder {twin.name}/: read once, there"))
                continue
            label = normalise_label(cdir.name)
            found = sorted(cdir.rglob("*"))
            if not found:  # a failed copy leaves an empty folder: its class would just drop out
                scan.skipped.append((str(cdir.relative_to(root)) + "/", "an empty class folder"))
            for f in found:
                rel = str(f.relative_to(root))
                if any(p.name.lower() in SKIP_DIRS for p in f.relative_to(cdir).parents):
                    continue   # inside a masks/ folder, which is reported once below
                if f.is_dir():
                    if f.name.lower() in SKIP_DIRS:
                        scan.skipped.append((rel + "/", _skip_reason(f.name)))
                    elif f.is_symlink():  # rglob does not enter linked folders: say so
                        scan.skipped.append((rel + "/", "a linked folder: not followed (copy its files in)"))
                    continue
                if _is_hidden(f) or any(_is_hidden(p) for p in f.relative_to(root).parents if p.name):
                    scan.skipped.append((rel, "hidden file"))
                elif not f.exists():
                    scan.skipped.append((rel, _broken_link(f)))
                elif not _is_image_file(f):
                    scan.skipped.append((rel, "not an image file"))
                elif _is_mask_beside_scan(f):
                    scan.skipped.append((rel, MASK_BESIDE_SCAN))
                else:
                    scan.samples.append(Sample(str(f), rel, label, cdir.name, source,
                                               preset if preset in ("test", "val") else None))
    if check_readable:
        scan = drop_unreadable(scan)
    if not scan.samples:
        raise ValueError(_nothing_found(root, scan.skipped))
    return scan


def _broken_link(f: Path) -> str:
    try:
        os.stat(f)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a loop of links: not read"
    return "broken link: the file it points to is missing"


def _folder_below_class(scan: Scan, s: Sample) -> str | None:
    """The folder right below a sample's class folder ('Brain Tumor/Glioma/x.jpg' -> 'Glioma'), None
    for a file directly in it; below Training/ in a split layout."""
    p = Path(scan.inner(s.rel)).parts
    k = p.index(s.original) if s.original in p else 0
    return p[k + 1] if len(p) > k + 2 else None


def nested_classes_note(scan: Scan) -> str | None:
    """A sentence when every class folder holds folders named like two or more classes
    ('train_imgs/{glioma, notumor}/', 'scans_a/{yes, no}/'): those outer folders are splits or
    collections, not classes, and every image would be labelled by them. None otherwise."""
    inner: dict[str, set[str]] = defaultdict(set)
    for s in scan.samples:
        below = _folder_below_class(scan, s)
        inner[s.original].add("" if below is None else normalise_label(below))
    if len(inner) < 2 or any(len(names & set(CANONICAL)) < 2 or "" in names for names in inner.values()):
        return None
    outer = ", ".join(sorted(inner))
    return (f"every class folder ({outer}) holds folders named like classes "
            f"({', '.join(sorted(set.union(*inner.values())))}), so the images would be labelled {outer}: "
            "if those are splits, name them Training/ and Testing/; if they are collections, pass each as "
            "its own --data source")


def typed_inside_coarse_note(scan: Scan) -> str | None:
    """A sentence when a folder read as 'some tumour' ('Brain Tumor', 'yes') holds folders named by
    tumour type ('Brain Tumor/Glioma/', 'Brain Tumor/Meningioma/'): every image is labelled by the
    outer folder, so the types were dropped without a word. None otherwise."""
    types: dict[str, set[str]] = defaultdict(set)
    for s in scan.samples:
        below = _folder_below_class(scan, s) if s.label == TUMOUR else None
        if below is not None and (inner := normalise_label(below)) in FINE_TUMOURS:
            types[s.original].add(inner)
    if not types:
        return None
    said = "; ".join(f"'{outer}' holds {', '.join(sorted(t))} folders" for outer, t in sorted(types.items()))
    return (f"{said}: their images are read as 'tumor' (some tumour, type unknown), after the outer folder; "
            "to keep the types, move those folders up beside the others")


def untyped_tumour_note(samples: list[Sample]) -> str | None:
    """A sentence when a folder read as 'some tumour, type unknown' ('Brain Tumor', 'yes') sits
    beside typed tumour folders in one dataset ('Brain_Glioma/ Brain_Menin/ Brain Tumor/'): a
    folder of one type read as no type, and nothing said so."""
    if not any(s.label in FINE_TUMOURS for s in samples):
        return None   # a yes/no dataset: coarse by design
    coarse = sorted({s.original for s in samples if s.label == TUMOUR})
    if not coarse:
        return None
    named = ", ".join(f"'{c}'" for c in coarse)
    return (f"{named} names no tumour type, beside folders that do: its images are read as 'tumor' (some "
            "tumour, type unknown), not as one type, and if it holds one type, name the folder by it "
            "(e.g. pituitary_tumor)")


def one_folder_note(scan: Scan) -> str | None:
    """A hint when every image sits in subfolders of one class folder ('archive/cats/',
    'archive/dogs/'): those subfolders may be the classes, under a wrapper named like none."""
    return one_folder_words([Path(scan.inner(s.rel)).parts for s in scan.samples], "pass the folder '{top}' itself")


def one_folder_words(parts: list[tuple[str, ...]], advice: str) -> str | None:
    """`one_folder_note` for files given by their path parts below the unwrapped top; ``advice``
    (with '{top}') says what to do instead."""
    tops = {p[0] for p in parts}
    subs = {p[1] for p in parts if len(p) > 2}
    if len(tops) != 1 or len(subs) < 2 or any(len(p) < 3 for p in parts):
        return None
    (top,) = tops
    if split_of(top):  # Training/<class>/: the classes are right
        return None
    named = ", ".join(f"'{x}'" for x in sorted(subs)[:3]) + (", ..." if len(subs) > 3 else "")
    return (f"every image sits in subfolders of the one folder '{top}' ({len(subs)} of them: {named}), so all are "
            f"labelled '{normalise_label(top)}': if those subfolders are the classes, "
            + advice.format(top=top))


def drop_unreadable(scan: Scan) -> Scan:
    from .reader import ScanError, read_scan
    keep = []
    for s in scan.samples:
        try:
            read_scan(s.path)
            keep.append(s)
        except ScanError as e:
            scan.skipped.append((s.rel, str(e)))
    scan.samples = keep
    return scan


# ----------------------------------------------------------------------------- hashing
# The benchmark and Br35H also hold mirrored and half-turned copies of their own images (saved
# augmentations; over half of the benchmark's images have one). A copy's phash is unrelated to
# its original's, so copies are found by hashing each image's flips and checking the pixels.
TRANSFORMS = ("hflip", "vflip", "rot180")
TWIN_CORRELATION = 0.97   # no two LGG patients' slices reach it (1,071 candidate pairs; 12 reach 0.95)


def _flip(a: np.ndarray, kind: str) -> np.ndarray:
    return np.ascontiguousarray({"hflip": a[:, ::-1], "vflip": a[::-1], "rot180": a[::-1, ::-1]}[kind])


def _phash_grey(grey: np.ndarray) -> int:
    import imagehash
    from PIL import Image
    return int(str(imagehash.phash(Image.fromarray((grey * 255).astype(np.uint8)))), 16)


def _hashes_file(path: str) -> list[int]:
    """64-bit DCT perceptual hashes of the grey image, then of each of its `TRANSFORMS`;
    robust to re-saving and contrast changes."""
    from .reader import read_scan
    try:
        grey = read_scan(path).pixels
    except Exception:  # unreadable files get a unique hash: they form a group of their own
        return [int(hashlib.sha1(f"{path}|{k}".encode(errors="surrogateescape")).hexdigest()[:16], 16) for k in range(4)]
    return [_phash_grey(grey)] + [_phash_grey(_flip(grey, t)) for t in TRANSFORMS]


def _all_hashes(paths: list[str]) -> np.ndarray:
    """(N, 4) hashes (plain, then `TRANSFORMS`), cached on disk by path, size and mtime."""
    cache: dict[str, list[int]] = {}
    if HASH_CACHE.exists():
        try:  # one hex value per entry is a cache from before the flips: hashed again
            cache = {k: [int(x, 16) for x in v.split(",")] for k, v in json.loads(HASH_CACHE.read_text()).items()}
        except (ValueError, OSError, AttributeError):
            cache = {}
    out, dirty = [], False
    for p in paths:
        st = os.stat(p)
        key = f"{p}|{st.st_size}|{int(st.st_mtime)}"
        if len(cache.get(key, ())) != 1 + len(TRANSFORMS):
            cache[key] = _hashes_file(p)
            dirty = True
        out.append(cache[key])
    if dirty:
        HASH_CACHE.parent.mkdir(parents=True, exist_ok=True)
        HASH_CACHE.write_text(json.dumps({k: ",".join(f"{x:016x}" for x in v) for k, v in cache.items()}))
    return np.array(out, dtype=np.uint64).reshape(len(paths), 1 + len(TRANSFORMS))


def phashes(paths: list[str]) -> np.ndarray:
    """The plain perceptual hash of each file (cached)."""
    return _all_hashes(paths)[:, 0]


def _thumb(path: str, side: int = 48) -> np.ndarray:
    """The head, cropped and resized to side x side, zero mean and unit norm (for correlation)."""
    from PIL import Image
    from .preprocess import head_bbox
    from .reader import read_scan
    grey = read_scan(path).pixels
    y0, y1, x0, x1 = head_bbox(grey)
    t = np.asarray(Image.fromarray((grey[y0:y1, x0:x1] * 255).astype(np.uint8)).resize((side, side)),
                   dtype=np.float32)
    t -= t.mean()
    return t / max(float(np.linalg.norm(t)), 1e-6)


def flipped_twin_pairs(paths: list[str], max_distance: int = 6, hashes: np.ndarray | None = None,
                       thumb=None) -> list[tuple[int, int]]:
    """Pairs (i < j) where j is a mirrored or half-turned copy of i.

    Candidates: a flip of i hashes within ``max_distance`` bits of j while i and j themselves do
    not (those are near duplicates already). Kept when the head thumbnails, i flipped, correlate
    >= `TWIN_CORRELATION`: roughly symmetric axial slices hash alike under a mirror, so the hash
    alone would join different slices. ``hashes``: the (N, 4) array of `_all_hashes`, ``thumb``:
    a `_thumbs` reader (each made here when not given; `copy_pairs` shares its own).
    """
    h = _all_hashes(paths) if hashes is None else hashes
    thumb = thumb or _thumbs(paths)
    pairs = set()
    for i in range(len(paths)):
        plain = np.bitwise_count(h[:, 0] ^ h[i, 0]) > max_distance
        for k, kind in enumerate(TRANSFORMS, start=1):
            near = np.nonzero((np.bitwise_count(h[:, 0] ^ h[i, k]) <= max_distance) & plain)[0]
            for j in near:
                if (min(i, j), max(i, j)) in pairs:
                    continue
                a, b = thumb(i), thumb(int(j))
                if a is not None and b is not None and float((_flip(a, kind) * b).sum()) >= TWIN_CORRELATION:
                    pairs.add((min(i, int(j)), max(i, int(j))))
    return sorted(pairs)


def _thumbs(paths: list[str]):
    """thumb(i): `_thumb` of paths[i], read once (None when unreadable)."""
    cache: dict[int, np.ndarray | None] = {}

    def thumb(i: int) -> np.ndarray | None:
        if i not in cache:
            try:
                cache[i] = _thumb(paths[i])
            except Exception:
                cache[i] = None
        return cache[i]
    return thumb


def copy_pairs(paths: list[str], max_distance: int = 6, flips: bool = True) -> list[tuple[int, int]]:
    """Near-duplicate pairs, then (``flips``) mirrored or half-turned copies: every pair of
    images that are one scan. Hashes are read once for both.

    A hash link is taken on its own between two images of one known patient or of no known
    patient (`PATIENT_RE`). Between two patients, or a patient's slice and an image of another
    collection, it must also pass the thumbnail check (>= `TWIN_CORRELATION`): 6 bits of phash
    match dark, round FLAIR slices to other patients' and to unrelated scans of other
    collections (598 cross-collection links in the split, none above 0.88). Such a link would
    tie an image to a patient, whose group then refuses its real copies (45 benchmark copy pairs
    crossed the first copy-aware split that way), or mark another patient's slice as a copy.
    """
    hashes = _all_hashes(paths)
    patient = [patient_id(p) for p in paths]
    thumb = _thumbs(paths)

    def same_scan(i: int, j: int) -> bool:
        if patient[i] == patient[j]:
            return True
        a, b = thumb(i), thumb(j)
        return a is not None and b is not None and float((a * b).sum()) >= TWIN_CORRELATION
    pairs = [(i, j) for i, j in near_duplicate_pairs(hashes[:, 0], max_distance) if same_scan(i, j)]
    return pairs + flipped_twin_pairs(paths, max_distance, hashes, thumb) if flips else pairs


# Copies of one slice that neither check above joins (re-framed, mirrored or turned, re-contrasted),
# found in the shared sources by aligning every image with its likeliest partners
# (`bench/copy_audit.py --split all --pairs-out`): listed by content, so any layout or name of the
# same files is joined, and a fresh split keeps each pair on one side.
KNOWN_COPIES_FILE = Path(__file__).with_name("known_copies.tsv")
KNOWN_COPIES_COLUMNS = ("source", "file", "copy_source", "copy_file", "hp256", "dihedral_k", "sha256", "copy_sha256")
CONTENT_DIGITS = 16   # hex digits of the SHA-256: 64 bits, no chance meeting among the shared files


def read_card(weights_dir: str | Path) -> dict:
    """A model folder's card.json as written, unchecked beyond being a JSON object (`inference.load_card`
    checks what serving needs). Raises OSError when it cannot be read, ValueError when it is no card."""
    path = Path(weights_dir) / "card.json"
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as e:  # a hand edit gone wrong: name the file, not only the column
        raise ValueError(f"{path} is damaged (not valid JSON: {e})") from None
    if not isinstance(card, dict):
        raise ValueError(f"{path} is not a model card (a JSON object)")
    return card


def sha256_of(src: bytes | str | Path) -> str | None:
    """SHA-256 (hex) of an input's bytes: a regular file read again, or the bytes given; None for
    what cannot be read (gone, a pipe that would block, no permission)."""
    if isinstance(src, (bytes, bytearray)):
        return hashlib.sha256(src).hexdigest()
    try:
        return hashlib.sha256(Path(src).read_bytes()).hexdigest() if os.path.isfile(src) else None
    except OSError:
        return None


def content_key(path: str | Path) -> str | None:
    """A file's content key: the first `CONTENT_DIGITS` hex digits of its SHA-256 (`sha256_of`;
    None when it cannot be read)."""
    digest = sha256_of(path)
    return digest and digest[:CONTENT_DIGITS]


def _known_copies(path: Path) -> tuple[tuple[str, str], ...]:
    """The (content key, content key) pairs of a known-copies list; () when there is none. ValueError
    when it is not one: a list that silently joined nothing would let a split leak again."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return ()
    return _known_copies_read(path, st.st_mtime_ns, st.st_size)   # an edited list is read again


@lru_cache(maxsize=8)
def _known_copies_read(path: Path, mtime_ns: int, size: int) -> tuple[tuple[str, str], ...]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a known-copies list (not UTF-8 text)") from None
    at = {c.strip(): n for n, c in enumerate(lines[0].split("\t"))} if lines else {}
    if "sha256" not in at or "copy_sha256" not in at:
        raise ValueError(f"{path}: not a known-copies list (a TSV whose header names sha256 and copy_sha256)")
    rows = [[c.strip() for c in x.split("\t")] for x in lines[1:] if x.strip()]
    a, b = at["sha256"], at["copy_sha256"]
    if bad := [n for n, r in enumerate(rows, 2) if len(r) <= max(a, b) or not r[a] or not r[b]]:
        raise ValueError(f"{path}: line {bad[0]} lacks a content key")
    return tuple((r[a], r[b]) for r in rows)


def read_known_copies(path: str | Path) -> tuple[tuple[str, str], ...]:
    """The content-key pairs of a known-copies list (`KNOWN_COPIES_COLUMNS`; `bench/copy_audit.py
    --split all --pairs-out` writes one for any data); ValueError when the file is missing or is not one."""
    f = resolve_root(path)
    if not f.is_file():
        raise ValueError(f"{path}: no such file")
    return _known_copies(f.resolve())


def known_copy_pairs(paths: list[str], lists: tuple | list = (), shipped: bool = True) -> list[tuple[int, int]]:
    """Pairs (i < j) of ``paths`` whose contents `KNOWN_COPIES_FILE` (``shipped``), or one of
    ``lists`` (more known-copies lists, `read_known_copies`), lists as copies of one slice."""
    listed = ((_known_copies(KNOWN_COPIES_FILE) if shipped else ())
              + tuple(q for f in lists for q in read_known_copies(f)))
    if not listed:
        return []
    at: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(paths):
        if (k := content_key(p)) is not None:
            at[k].append(i)
    return sorted({(min(i, j), max(i, j)) for a, b in listed for i in at.get(a, ()) for j in at.get(b, ()) if i != j})


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int) -> list[tuple[int, int]]:
    """All pairs (i < j) whose hashes differ in at most ``max_distance`` bits."""
    pairs = []
    for i in range(len(hashes) - 1):
        d = np.bitwise_count(hashes[i + 1:] ^ hashes[i])
        for j in np.nonzero(d <= max_distance)[0]:
            pairs.append((i, i + 1 + int(j)))
    return pairs


def _union_find(n: int, pairs, patient: list[str | None] | None = None) -> list[int]:
    """Connected components of the pairs; a component never joins two different known patients."""
    parent = list(range(n))
    owner = list(patient) if patient else [None] * n  # the patient a component holds, if any

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a
    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra == rb or (owner[ra] and owner[rb] and owner[ra] != owner[rb]):
            continue
        lo, hi = min(ra, rb), max(ra, rb)
        parent[hi] = lo
        owner[lo] = owner[lo] or owner[hi]
    return [find(i) for i in range(n)]


def mixed_label_groups(samples: list[Sample]) -> list[Counter]:
    """Label counts of each near-duplicate group whose labels disagree (a coarse 'tumor' beside
    tumour types does not), largest first. Such groups come from hash links alone between images
    of no known patient, kept because neighbouring slices of one patient are linked that way: the
    group is split as one, which costs stratification. A patient's own slices are left out of the
    count: a patient's tumour and tumour-free slices disagree by design (the audit called all 95
    LGG patients labelling errors)."""
    by_group: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        if patient_id(s.path) is None:
            by_group[s.group][s.label] += 1
    mixed = []
    for counts in by_group.values():
        labels = set(counts) - ({TUMOUR} if set(counts) & set(FINE_TUMOURS) else set())
        if len(labels) > 1:
            mixed.append(counts)
    return sorted(mixed, key=lambda c: -sum(c.values()))


def patient_id(path: str) -> str | None:
    """The TCGA patient a slice's file name gives (`PATIENT_RE`), else its folder's
    (`PATIENT_DIR_RE`), as TCGA_<SITE>_<PATIENT>; None for none. With only the underscored file
    name read, TCGA-CS-4941-011.jpg or glioma/TCGA_CS_4941/011.jpg spread a patient over the splits."""
    p = Path(path)
    m = PATIENT_RE.match(p.name) or PATIENT_DIR_RE.match(p.parent.name)
    return m.group(1).replace("-", "_").upper() if m else None


NOT_MRI_FILE = Path(__file__).with_name("not_mri.txt")


@lru_cache(maxsize=1)
def _not_mri() -> dict[str, str]:
    rows = (line.split() for line in NOT_MRI_FILE.read_text().splitlines() if not line.startswith("#"))
    return {r[0]: r[1] for r in rows if len(r) == 2}


def not_mri(path: str | Path) -> str | None:
    """What a scan of the shared sources that is not brain MRI is ("CT"), by its file name
    (`NOT_MRI_FILE`, found by eye); None for every other file. BRISC files head CTs as T1, and
    the benchmark and Br35H hold a few CTs too: the gate must learn them as outliers, and a CT it
    flags is no MRI wrongly flagged."""
    return _not_mri().get(Path(path).name)


def _patient_key(s: Sample) -> str | None:
    """TCGA ids are global: one patient's slices in two sources (a copied folder) are one group."""
    return patient_id(s.path)


def _stable_key(s: Sample) -> tuple[str, str]:
    return s.source, s.rel


def group_roots(paths: list[str], patient: list[str | None], max_distance: int = 6, flips: bool = True,
                patients: bool = True, known: bool = True, lists: tuple | list = ()) -> list[int]:
    """Each image's group (the index of one member): near duplicates, mirrored or half-turned copies
    (``flips``), the copies `KNOWN_COPIES_FILE` (``known``) and ``lists`` list and one patient's
    slices (``patients``) share one; two known patients never do."""
    first: dict[str, int] = {}
    # Patient links first, so that hash links cannot chain two patients' slices together:
    # similar-looking FLAIR slices of different patients are not duplicates.
    pairs = [(first.setdefault(key, i), i) for i, key in enumerate(patient) if key and patients]
    pairs += copy_pairs(paths, max_distance, flips)
    if known or lists:
        pairs += known_copy_pairs(paths, lists, shipped=known)
    return _union_find(len(paths), pairs, patient)


def assign_groups(samples: list[Sample], max_distance: int = 6, flips: bool = True,
                  patients: bool = True, known: bool = True, lists: tuple | list = ()) -> None:
    """Give every sample a group id (`group_roots`; ``lists``: more known-copies lists, such as
    `bench/copy_audit.py --split all` writes for other data). ``patients=False`` leaves a patient's
    other slices apart (groups of copies only), still never joining two patients."""
    # In (source, rel) order, whatever the order of the --data sources: the groups, their names
    # and so the split are the files' own (reversing three sources moved 18 of 97 images)
    samples = sorted(samples, key=_stable_key)
    roots = group_roots([s.path for s in samples], [_patient_key(s) for s in samples],
                        max_distance, flips, patients, known, lists)
    for s, r in zip(samples, roots):
        s.group = f"g{r}"


def preset_split_text(samples: list[Sample]) -> str | None:
    """For the card's split method: which sources' own Testing/ or Validation/ folder made a split,
    and how many of their other images went with it as near copies (`split_by_group`); None when
    no dataset shipped one. The card said only 'drawn from seed 0', of a test split that was the
    dataset's own folder plus 2 moved images."""
    parts = []
    for role, folder in (("test", "Testing/"), ("val", "Validation/")):
        shipped = [s for s in samples if s.preset_split == role]
        if not shipped:
            continue
        groups = {s.group for s in shipped}
        moved = sum(1 for s in samples if not s.preset_split and s.split == role and s.group in groups)
        sources = ", ".join(sorted({s.source for s in shipped}))
        parts.append(f"the {role} split of {sources} is the dataset's own {folder} folder ({len(shipped)} images"
                     + (f", with {moved} of its other images, near copies of them, moved in" if moved else "") + ")")
    return "; ".join(parts) or None


def split_by_group(samples: list[Sample], seed: int = 0, val: float = 0.15,
                   test: float = 0.15) -> None:
    """Assign train/val/test by group, stratified by (source, label), seeded.

    Samples with a preset split (a shipped Testing/ or Validation/ folder) keep it, and their
    groups go with them so that no near duplicate crosses the boundary. A source without a
    Testing/ folder gets its own grouped test share, whatever the other sources ship.
    """
    from sklearn.model_selection import StratifiedGroupKFold
    samples = sorted(samples, key=_stable_key)   # the split is the files', not the order they came in
    groups = np.array([s.group for s in samples])
    if len(set(groups)) < 2:  # one group cannot be split (nor leak): it stays where it was put
        for s in samples:
            s.split = s.preset_split or "train"
        return
    n_folds = max(2, min(20, len(set(groups))))  # StratifiedGroupKFold needs a group per fold
    preset_groups = {s.group for s in samples if s.preset_split == "test"}
    preset_val = {s.group for s in samples if s.preset_split == "val"} - preset_groups
    tested = {s.source for s in samples if s.preset_split == "test"}  # sources shipping a test set
    strat = np.array([f"{s.source}/{s.label}" for s in samples])
    folds = np.zeros(len(samples), dtype=int)
    # StratifiedGroupKFold needs every stratum to have a few members: smaller strata are pooled
    # as "rare". One of fewer than 3 groups cannot fill train, val and test: it goes to train (a
    # class of one image in val or test leaves the model without it), its groups with it.
    counts = Counter(strat)
    # counted among the groups left to split: a shipped Testing/ folder's groups train nothing
    free = [(g, k) for g, k, s in zip(groups, strat, samples) if not s.preset_split]
    n_groups = Counter(k for _, k in set(free))
    rare_groups = {g for g, k in free if n_groups[k] < 3}
    strat = np.array([k if counts[k] >= n_folds else "rare" for k in strat])
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    # Which folds test and validate is drawn from the seed too: the splitter places the largest
    # groups first, into fold 0, whatever the seed (shuffling only breaks ties), so the biggest
    # groups were in test for every seed, and a third of LGG's patients never were.
    role = np.random.default_rng(seed).permutation(n_folds)
    with warnings.catch_warnings():   # the pooled 'rare' stratum may still be small: sklearn warns on
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)   # stderr, splits alike
        for k, (_, idx) in enumerate(sgkf.split(np.zeros(len(samples)), strat, groups)):
            folds[idx] = role[k]
    n_val = round(val * n_folds)
    # A group is decided once: one with a member from a source that ships its own test set takes
    # no test share (its other members would land in test beside their copy in training).
    untested = {s.group for s in samples} - {s.group for s in samples if s.source in tested}
    for s, f in zip(samples, folds):
        n_test = round(test * n_folds) if s.group in untested else 0
        if s.group in preset_groups:
            s.split = "test"
        elif s.group in preset_val:
            s.split = "val"
        elif s.group in rare_groups:
            s.split = "train"
        elif f < n_test:
            s.split = "test"
        elif f < n_test + n_val:
            s.split = "val"
        else:
            s.split = "train"


def cross_split_duplicates(samples: list[Sample], max_distance: int = 6, flips: bool = True,
                           lists: tuple | list = ()) -> list[tuple[str, str, str, str]]:
    """Near-duplicate pairs (and, with ``flips``, mirrored or half-turned copies), and pairs
    `KNOWN_COPIES_FILE` or ``lists`` list, that sit in different splits (a leak): (split_a, rel_a, split_b, rel_b)."""
    out = []
    paths = [s.path for s in samples]
    for i, j in sorted(set(copy_pairs(paths, max_distance, flips)) | set(known_copy_pairs(paths, lists))):
        a, b = samples[i], samples[j]
        if a.split != b.split:
            out.append((a.split, f"{a.source}/{a.rel}", b.split, f"{b.source}/{b.rel}"))
    return out


def samples_from_record(record: dict, roots: dict[str, Path]) -> list[Sample]:
    """A recorded split (split.json's ``files``) as Samples, paths resolved under ``roots``, each
    labelled by its class folder as `discover` finds it (any layout)."""
    missing = sorted(set(record) - set(roots))
    if missing:
        raise ValueError(f"no data root is known for source(s) {', '.join(missing)}: pass --data-config")
    folders = {src: class_folders(roots[src]) for src in record}
    out = []
    for src, splits in record.items():
        for split, rels in splits.items():
            for rel in rels:
                original = folders[src].get(rel) or Path(rel).parts[0]
                out.append(Sample(path=str(Path(roots[src]) / rel), rel=rel, label=normalise_label(original),
                                  original=original, source=src, split=split))
    return out


def class_folders(root: str | Path) -> dict[str, str]:
    """{rel: its class folder's name} of every image `discover` finds under ``root`` ({} when
    there is none): a recorded rel's first folder is its class only in a flat layout, and
    'Training/glioma/x.jpg' or 'archive/glioma/x.jpg' were labelled 'training' and 'archive'."""
    try:
        return {s.rel: s.original for s in discover(root).samples}
    except (OSError, ValueError):
        return {}


def copies_in_training(samples: list[Sample], max_distance: int = 6, known: bool = True) -> set[tuple[str, str]]:
    """(source, rel) of the val/test samples with a copy in the train split: a training sample is
    its near duplicate (phash), its mirrored or half-turned copy (`flipped_twin_pairs`) or (``known``)
    a copy `KNOWN_COPIES_FILE` lists.

    Direct pairs only: chains of near duplicates run along a patient's neighbouring slices, so
    one loose link would mark a whole run of slices. Splits made before flips were joined have
    many (over half of the benchmark's test images); copy-aware splits have none. Raises
    ValueError when files are missing: an unread training file could hide a copy.
    """
    absent = [s.path for s in samples if not os.path.isfile(s.path)]
    if absent:
        raise ValueError(f"{len(absent)} files of the split are missing (first: {absent[0]}); "
                         "copies can only be found with every image present")
    out = set()
    paths = [s.path for s in samples]
    for i, j in set(copy_pairs(paths, max_distance)) | set(known_copy_pairs(paths) if known else ()):
        for a, b in ((samples[i], samples[j]), (samples[j], samples[i])):
            if a.split != "train" and b.split == "train":
                out.add((a.source, a.rel))
    return out


COPY_LIST_COLUMNS = ("source", "file", "train_source", "train_file")


def read_copy_pairs(path: str | Path) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """The pairs of a copy list: a TSV with a header line whose first four columns are an image's
    source and file and its copy's (`bench/copy_audit.py --out` and ``--pairs-out`` write one: the
    copy is a training image of the split it audited). ValueError, naming the file, when it is not
    one (no header: its first pair would be taken for one and lost)."""
    try:
        lines = resolve_root(path).read_text(encoding="utf-8-sig").splitlines()   # from here, else the repository
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a copy list (not UTF-8 text)") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    head = [c.strip() for c in lines[0].split("\t")] if lines else []
    if len(head) < 4 or not head[0].endswith("source") or not head[2].endswith("source"):
        raise ValueError(f"{path}: not a copy list (a TSV whose header line names "
                         f"{', '.join(COPY_LIST_COLUMNS)}, or test_source ... as the audit writes it)")
    rows = [[c.strip() for c in line.split("\t")] for line in lines[1:] if line.strip()]
    if any(len(r) < 4 or not all(r[:4]) for r in rows):
        raise ValueError(f"{path}: not a copy list (a row with fewer than 4 columns)")
    return [((r[0], r[1]), (r[2], r[3])) for r in rows]


def listed_training_copies(samples: list[Sample], pairs, roles: dict | None = None) -> list[Sample]:
    """The training samples a listed pair (`read_copy_pairs`) joins to a validation or test image,
    either way round: left out of training, no image is tested or validated on while its copy
    trains. ``roles``: {(source, file): split} of a recorded split, for partners not among
    ``samples`` (a packed subset of the test files); the samples' own splits come first. Pairs of
    files in neither, or within one split, change nothing."""
    where = {(s.source, s.rel): s for s in samples}
    role = {**(roles or {}), **{k: s.split for k, s in where.items() if s.split}}
    out: dict[tuple[str, str], Sample] = {}
    for a, b in pairs:
        for x, y in ((a, b), (b, a)):
            if x in where and where[x].split == "train" and role.get(y) in ("val", "test"):
                out[x] = where[x]
    return list(out.values())


def data_fingerprint(samples: list[Sample]) -> str:
    """A short hash of which files (relative path, content, label) a run saw: the same names
    with other pixels are other data. Stable across machines (no paths, no times)."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: (s.source, s.rel)):
        with open(s.path, "rb") as f:
            content = hashlib.file_digest(f, "sha1").hexdigest()
        h.update(f"{s.source}/{s.rel}|{content}|{s.label}\n".encode(errors="surrogateescape"))
    return h.hexdigest()[:16]


def split_record(samples: list[Sample]) -> dict:
    """The split as file lists per source and split, so that it can be reproduced exactly."""
    rec: dict = defaultdict(lambda: defaultdict(list))
    for s in samples:
        rec[s.source][s.split].append(s.rel)
    return {src: {k: sorted(v) for k, v in d.items()} for src, d in rec.items()}


def split_roles(record: dict) -> dict[tuple[str, str], str]:
    """A split record ({source: {split: [rel, ...]}}) as (source, rel) -> split."""
    return {(src, rel): split for src, d in record.items() for split, rels in d.items() for rel in rels}


def apply_split_record(samples: list[Sample], record: dict) -> list[str]:
    """Give each sample its recorded split ('' for a file the record does not name); returns what
    the record names that is not here, a sentence each: sources no sample is called (a renamed
    --data name: every file looked new) and, per source, recorded files that are gone."""
    lookup = split_roles(record)
    for s in samples:
        s.split = lookup.get((s.source, s.rel), "")
    here = {(s.source, s.rel) for s in samples}
    sources = {s.source for s in samples}
    notes = []
    if unknown := sorted(set(record) - sources):
        notes.append(f"the recorded split names source(s) {', '.join(unknown)}, which no --data source is "
                     f"called (these are: {', '.join(sorted(sources))}): none of their files is used")
    for src in sorted(set(record) & sources):
        gone = sorted(rel for rel in (r for rels in record[src].values() for r in rels) if (src, rel) not in here)
        if gone:
            notes.append(f"{len(gone)} file(s) the recorded split names are not in source {src} "
                         f"(first: {gone[0]}): the split is smaller than recorded")
    return notes
