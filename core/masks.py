"""Tumour masks uploaded beside their scans: told apart from scans and paired with the scan they
outline (`pair_masks`), brought into the model-input frame of that scan, and what a mask says
against a 'no tumour' call. Used by the app's pages, the PDF report and `report` alike, so that all
three call the same case a missed tumour."""
from __future__ import annotations

import io
import re
from collections import Counter
from pathlib import Path

import numpy as np

from .inference import Prediction
from .labels import is_tumour_label
from .reader import ScanImage


def input_mask(scan: ScanImage, src: bytes | str | Path | None, spec: dict) -> np.ndarray | None:
    """A mask file in the model-input frame of ``scan``; None when there is none or it does not fit."""
    from .saliency import mask_to_input
    if src is None:
        return None
    try:
        mask = frame_mask(scan, src)
    # not an image, or not of its scan's size: no outline rather than a broken page (any exception:
    # Pillow raises SyntaxError, EOFError, struct.error and more on damaged files, not only OSError)
    except Exception:
        return None
    return mask_to_input(scan.pixels, mask, spec) if mask.any() else None


def frame_mask(scan: ScanImage, src: bytes | str | Path) -> np.ndarray:
    """A mask file in ``scan``'s own frame (shrunk alike where the reader shrank the scan). Raises
    (ValueError, or the image library's error) when it cannot be read or is not of the scan's size."""
    from .saliency import read_mask
    mask = read_mask(src, mask_sizes(scan))
    if mask.shape != scan.pixels.shape and scan.info.get("downscaled_from") == [mask.shape[1], mask.shape[0]]:
        mask = _reduced_mask(mask, scan.pixels.shape)  # the reader shrank a large scan: shrink its mask alike
    if mask.shape != scan.pixels.shape:
        raise ValueError(f"a mask of {mask.shape[1]} x {mask.shape[0]} pixels does not fit its scan")
    return mask


def mask_sizes(scan: ScanImage) -> set[tuple[int, int]]:
    """The (width, height) a mask of ``scan`` may have: the scan's, or the size the reader reduced it from."""
    h, w = scan.pixels.shape[:2]
    return {(w, h), *([tuple(scan.info["downscaled_from"])] if scan.info.get("downscaled_from") else [])}


def _reduced_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A full-size mask brought to the reader's reduced scan: area mean, then the half-way cut."""
    from PIL import Image
    small = Image.fromarray(mask.astype(np.float32)).resize((shape[1], shape[0]), Image.Resampling.BOX)
    return np.asarray(small) >= 0.5


def mask_contradiction(pred: Prediction, scan: ScanImage, mask: bytes | None, spec: dict,
                       slice_index: int | None = None) -> str | None:
    """A warning when the uploaded tumour mask marks a lesion and the call is 'no tumour'; only a
    mask that fits the scan counts, as for the outline (`input_mask`: same size or the size the reader reduced, not a volume slice)."""
    if mask is None or is_tumour_label(pred.pred) or not pred.in_distribution or slice_index is not None:
        return None
    fitted = input_mask(scan, mask, spec)
    if fitted is None or not fitted.any():
        return None
    return ("**The uploaded tumour mask marks a lesion, but the model does not call a tumour**: by the mask this "
            "is a missed tumour. Lower the operating point or read the scan yourself.")


# ----------------------------------------------------------------------------- pairing
# (the app pairs uploads, `report` the files it is given: X_mask.tif outlines X.tif)
def _stem(name: str) -> str:
    """Upload name without its extension (``.nii.gz`` is one), folder kept: zip members pair
    within one folder. A repeat's counter stays (`report.unique_names`: 'X.png (2)' -> 'X (2)'), so
    the second patient's X.png is not the first's X."""
    if (m := re.fullmatch(r"(.*[^/])( \(\d+\))", name)) and "." in m[1].rsplit("/", 1)[-1]:
        return _stem(m[1]) + m[2]
    if name.lower().endswith(".nii.gz"):
        return name[:-len(".nii.gz")]
    return name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name


def base_stem(name: str) -> str:
    """`_stem` without its folders: the name a scan and its mask share ('masks/X.png', 'glioma/X.jpg')."""
    return _stem(name).rsplit("/", 1)[-1]


def _uncounted(name: str) -> str:
    """An upload's name without the counter `report.unique_names` puts after a repeat's extension
    ('X.png (2)' -> 'X.png'; 'brain (1).png' is a name of its own)."""
    return re.sub(r"(\.[^./]+) \(\d+\)$", r"\1", name)


def _mask_partner(stem: str) -> str | None:
    """The scan stem an ``X_mask`` stem outlines ('X_mask (2)' -> 'X (2)'), None for a scan's."""
    base, counter = re.fullmatch(r"(.*?)((?: \(\d+\))?)", stem).groups()
    return base[:-len("_mask")] + counter if base.endswith("_mask") else None


MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".gif")  # lossless: a JPEG is never two-valued


def _is_mask_file(name: str, data) -> bool:
    """A tumour mask: a lossless image of exactly two grey values (lesion and background). A blank
    slice has one value and an MRI many, so neither is ever taken for a mask."""
    from PIL import Image
    name = _uncounted(name)
    if not isinstance(data, (bytes, bytearray)) or not name.lower().endswith(MASK_SUFFIXES):
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > 4096 * 4096:
                return False
            return len(np.unique(np.asarray(im.convert("L")))) == 2
    except Exception:  # not an image PIL reads (DICOM, NIfTI, broken): not a mask
        return False


def _mask_beside(mask_name: str, scan_name: str) -> bool:
    """The LGG layouts: X.png beside X.jpg in one folder, or masks/X.png beside <class>/X.jpg,
    the two folders side by side, or masks/ inside the scan's folder (another zip's or patient's
    masks/ outlines nothing here)."""
    folder = lambda n: n.rsplit("/", 1)[0] if "/" in n else ""  # noqa: E731
    fm, fs = folder(mask_name), folder(scan_name)
    return fm == fs or (fm.rsplit("/", 1)[-1].lower() in ("masks", "mask") and folder(fm) in (fs, folder(fs)))


def pair_masks(items: list[tuple[str, object]]) -> tuple[list[tuple[str, object]], dict[str, bytes]]:
    """Uploads with tumour masks taken out: ``X_mask.tif`` beside ``X.tif`` is X's mask, and so is
    a two-valued ``X.png`` beside ``X.jpg`` (the LGG layout, ``masks/X.png`` and ``glioma/X.jpg``).

    A paired mask is never predicted as a scan; a mask without its image stays an ordinary
    upload. Returns the remaining items and {image name: mask bytes}.
    """
    partner = {n: _mask_partner(_stem(n)) for n, _ in items}
    images: dict[str, list[str]] = {}
    for n, _ in items:
        if partner[n] is None:
            images.setdefault(_stem(n), []).append(n)
    named = [(n, d, images.get(partner[n], [])) for n, d in items if partner[n]]
    # repeats are numbered per name ('X.png (2)'): with as many X scans as X masks the numbers pair
    # them; scan A + mask, scan B, scan C + mask would give C's mask to B, so then none pairs
    n_scans = Counter(_stem(_uncounted(n)) for names in images.values() for n in names)
    outlines = {n: _mask_partner(_stem(_uncounted(n))) for n, _, _ in named}
    n_masks = Counter(outlines.values())
    named = [x for x in named if n_scans[outlines[x[0]]] == n_masks[outlines[x[0]]]]
    claims = Counter(scans[0] for _, _, scans in named if len(scans) == 1)
    masks, used = {}, set()
    for name, data, scans in named:
        # one scan of that stem (X.jpg and X.tif beside X_mask.tif: which one it outlines is a guess)
        if len(scans) == 1 and claims[scans[0]] == 1 and isinstance(data, (bytes, bytearray)):
            masks[scans[0]] = bytes(data)
            used.add(name)
    same_base: dict[str, list[tuple[str, object]]] = {}
    for name, data in items:
        if name not in used and name not in masks:
            same_base.setdefault(base_stem(name), []).append((name, data))
    for group in (g for g in same_base.values() if len(g) > 1):
        is_mask = [_is_mask_file(n, d) for n, d in group]
        found = [(m, [s for (s, _), f in zip(group, is_mask) if not f and _mask_beside(m, s)])
                 for (m, _), f in zip(group, is_mask) if f]
        claims = Counter(s for _, beside in found for s in beside)
        for (mask_name, beside), mask in zip(found, [d for (_, d), f in zip(group, is_mask) if f]):
            if len(beside) == 1 and claims[beside[0]] == 1:   # one scan beside it, and no other mask beside that
                masks[beside[0]] = bytes(mask)
                used.add(mask_name)
    return [(n, d) for n, d in items if n not in used], masks
