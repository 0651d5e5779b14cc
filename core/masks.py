"""Tumour masks uploaded beside their scans: brought into the model-input frame of the scan they
outline, and what a mask says against a 'no tumour' call. Used by the app's pages and the PDF report
alike, so that both call the same case a missed tumour."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .inference import Prediction
from .metrics import is_tumour_label
from .reader import ScanImage


def input_mask(scan: ScanImage, src: bytes | str | Path | None, spec: dict) -> np.ndarray | None:
    """A mask file in the model-input frame of ``scan``; None when there is none or it does not fit."""
    from .saliency import mask_to_input
    if src is None:
        return None
    try:
        mask = frame_mask(scan, src)
    except Exception:  # not an image, or not of its scan's size: no outline rather than a broken page
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
