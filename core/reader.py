"""Read any scan a user may bring into one grey image, or fail with one plain sentence.

Everything that reads a file (training, evaluation, the CLI, the app) goes through `read_scan`,
so the same file gives the same pixels and the same message everywhere.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_BYTES = 50 * 1024 * 1024
MAX_PIXELS = 40_000_000


class ScanError(ValueError):
    """A file that cannot be used; str(error) is one plain sentence for the user."""


@dataclass
class ScanImage:
    pixels: np.ndarray                 # float32, H x W, grey, in [0, 1]
    colourfulness: float = 0.0         # mean |channel - grey| of the original, 0 for grey scans
    kind: str = "image"                # image | dicom | nifti
    info: dict = field(default_factory=dict)


def _to_grey(img: Image.Image) -> tuple[np.ndarray, float]:
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float32)
        lo, hi = np.percentile(a, [0.5, 99.5]) if a.size else (0, 1)
        a = np.clip((a - lo) / max(hi - lo, 1e-6), 0, 1)
        return a.astype(np.float32), 0.0
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    colour = float(np.abs(rgb - grey[..., None]).mean())
    return grey.astype(np.float32), colour


def read_scan(src: str | Path | bytes, name: str | None = None, **options) -> ScanImage:
    """Read a file path or bytes into a `ScanImage`; raise `ScanError` with a plain sentence."""
    data = Path(src).read_bytes() if not isinstance(src, (bytes, bytearray)) else bytes(src)
    if len(data) == 0:
        raise ScanError("The file is empty.")
    if len(data) > MAX_BYTES:
        raise ScanError(f"The file is larger than {MAX_BYTES // 2**20} MB.")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ScanError(f"The image is too large ({img.width} x {img.height} pixels).")
            img.load()
            grey, colour = _to_grey(img)
    except ScanError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ScanError("The file is not a readable image.") from e
    return ScanImage(grey, colour, "image", {})
