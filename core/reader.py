"""Read any scan a user may bring into one grey image, or fail with one plain sentence.

Everything that reads a file (training, evaluation, the CLI, the app) goes through `read_scan`,
so the same file gives the same pixels and the same message everywhere.

Formats are recognised by their content (DICOM "DICM" at byte 128, gzip and NIfTI magic, then
Pillow); the file name only helps with DICOM files that lack the 128-byte preamble and with
the wording of messages, so a scan with the wrong extension still reads.

* Images (Pillow): JPEG, PNG (8 and 16 bit), BMP, TIFF, WebP, GIF, MPO; the first frame of
  animated or multi-page files unless ``frame=`` says otherwise. Every Pillow mode becomes grey:
  8-bit modes by ITU-R 601 luminance / 255, alpha composited on black (the MRI background),
  16/32-bit integer and float modes by a robust 0.5-99.5 percentile window. EXIF orientation
  is applied. Images larger than `MAX_SIDE` are reduced (the model sees 176-192 px), images larger
  than `MAX_PIXELS` are refused from the header, before any pixel is decoded.
* DICOM (pydicom): see `_read_dicom` for the transfer syntaxes and the display pipeline.
* NIfTI-1/2 (.nii, .nii.gz; nibabel): see `_nifti_volume` for orientation and intensity.
* Zips of scans: `read_zip` and `zip_to_labelled` (in memory, with zip-bomb limits; `core.archive`).

Decisions:
* Images smaller than `MIN_SIDE` pixels on a side are refused rather than upscaled: an 8 x 8
  thumbnail holds no anatomy and upscaling it would only give the model a blur to be confident
  about. Images more elongated than `MAX_ASPECT` (a strip, a banner) are refused too. None of
  the 12,463 images of the shared training sources is affected by these limits or by `MAX_SIDE`.
* Blank images (one value everywhere) are read, with ``info["blank"] = True``: the training
  sources hold such slices (31 all-black lgg-flair/notumor slices), so refusing them here would
  silently change the datasets; the app can warn on the flag instead.
* `ScanImage.info` only ever holds technical fields listed in `SAFE_INFO_KEYS` (format, size,
  frame, window, orientation...); no DICOM/EXIF metadata is copied, so no patient name, ID or
  date can reach the app, the logs or a report. A DICOM's series is kept only as a salted hash of
  its UID (new salt each process), enough to group one batch's files by series.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import io
import logging
import math
import os
import re
import threading
import warnings
import weakref
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .header import recognised_body_part, recognised_modality

MAX_BYTES = 50 * 2**20            # largest file accepted (keep .streamlit/config.toml in step)
MAX_PIXELS = 40_000_000           # width x height, checked from the header before decoding
MAX_SIDE = 2048                   # larger images are reduced to this (longest side)
MIN_SIDE = 16                     # smaller images are refused (see the module docstring)
MAX_ASPECT = 8.0                  # longest side / shortest side
MAX_VOXELS = 32_000_000           # one 3D volume (128 MB as float32)
# A .nii.gz or deflated DICOM may not inflate beyond this (a bomb): one volume of MAX_VOXELS as
# float32 and its header. A 0.5 MB .nii.gz inflating to 256 MB (the old limit) took 630 MB of a
# cloud host's 1 GB; a larger 4D file is refused (its first volume alone is read anyway).
MAX_DECOMPRESSED = MAX_VOXELS * 4 + 2**20

# Pillow refuses (DecompressionBombError) above twice this, inside Image.open, from the header.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS

# A pixel's chroma (its largest |channel - grey|) above this is strong colour. Grey scans saved as
# JPEG reach 0.15 at the odd sharp edge; thin yellow, green, cyan, red or blue marks are 0.59-0.89.
MARK_CHROMA = 0.2

# Only these Pillow plugins are tried: no EPS/PDF (they run Ghostscript) or exotic decoders.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "DIB", "TIFF", "WEBP", "GIF")
SUPPORTED = "JPEG, PNG, BMP, TIFF, WebP, GIF, DICOM or NIfTI"
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".dcm", ".dicom")
STACK_SUFFIXES = (".tif", ".tiff", ".gif")  # images that may hold several pages (slices)
# Slices of one volume read whole to be scored (NIfTI slices, DICOM frames, TIFF/GIF pages; also
# bounded by MAX_VOXELS): every one is a forward pass, and a 171 KB NIfTI of 30,000 tiny slices held
# a CPU for an hour. A 1 mm head has under 256 slices in any plane; past it the slice shown is read alone.
MAX_SLICES = 256

# The only keys `ScanImage.info` may carry (technical, never identifying).
SAFE_INFO_KEYS = frozenset({
    "format", "mode", "width", "height", "frame", "n_frames", "exif_rotated", "downscaled_from",
    "intensity_window", "modality", "photometric_interpretation", "transfer_syntax",
    "bits_stored", "rescale", "window", "window_source", "n_slices", "slice_index",
    "n_volumes", "volume", "orientation", "voxel_size_mm", "display", "blank", "plane",
    "body_part", "body_part_of_frame",   # DICOM Body Part Examined, or a frame's own anatomy (core.header)
    "series", "instance",             # DICOM series (a salted hash, see _series_fields) and Instance Number
    "head_share",                     # a volume slice's cross-section of the head over the widest
    "colour_marks",                   # share of the head's core in strong colour (_rgb_to_grey)
    "slices_scored", "slice_choice",  # added by inference.most_tumour_like_slice
})


class ScanError(ValueError):
    """A file that cannot be used; str(error) is one plain sentence for the user."""


# What a per-file safety net says when something other than a ScanError ends a file
UNPROCESSED = "The file could not be processed: it may be damaged, or a variant this reader does not handle."


def is_file_fault(e: BaseException) -> bool:
    """Whether a per-file safety net may make ``e`` that file's error: any Exception, and the
    PanicException of a decoder written in Rust (pylibjpeg-rle panics on some damaged RLE data;
    pyo3 derives it from BaseException, so `except Exception` let one file end a whole batch).
    Never an interrupt, nor Streamlit's rerun and stop, which derive from BaseException too."""
    return isinstance(e, Exception) or type(e).__name__ == "PanicException"


def file_fault_error(e: BaseException) -> str:
    """`UNPROCESSED`, the error a per-file net gives a file that ``e`` ended, when the net may hold
    ``e`` (`is_file_fault`); anything else (an interrupt, Streamlit's rerun or stop) is raised again."""
    if not is_file_fault(e):
        raise e
    return UNPROCESSED


@dataclass
class ScanImage:
    pixels: np.ndarray                 # float32, H x W, grey, in [0, 1]
    colourfulness: float = 0.0         # mean |channel - grey| of the original, 0 for grey scans
    kind: str = "image"                # image | dicom | nifti
    info: dict = field(default_factory=dict)

    @functools.cached_property
    def head_box(self) -> tuple[int, int, int, int]:
        """`preprocess.head_bbox` of the pixels, found once: the model's input, the gate's and the
        display view of a served scan all crop to it (the search is a third of the check's time)."""
        from .preprocess import head_bbox
        return head_bbox(self.pixels)


# ----------------------------------------------------------------------------- bytes in
def _source_name(src: Any, name: str | None) -> str:
    if name:
        return str(name)
    if isinstance(src, (str, Path)):
        return Path(src).name
    return str(getattr(src, "name", "") or "")


def load_bytes(src: str | Path | bytes | Any) -> bytes:
    """The bytes of a path, bytes or file-like object (e.g. a Streamlit upload), size-checked."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, str) and not src.strip():   # Path("") is ".": 'a folder' named no folder
        raise ScanError("The path is empty (an unset variable?): name the file.")
    elif isinstance(src, (str, Path)):
        data = _read_path(Path(src))
    elif hasattr(src, "getvalue"):
        data = bytes(src.getvalue())
    elif hasattr(src, "read"):
        data = src.read(MAX_BYTES + 1)
    else:
        raise ScanError("The input is not a file.")
    if len(data) == 0:
        raise ScanError("The file is empty.")
    if len(data) > MAX_BYTES:
        raise ScanError(f"The file is larger than the {MAX_BYTES // 2**20} MB limit.")
    return data


def _read_path(path: Path) -> bytes:
    try:
        if path.is_dir():
            raise ScanError("The path is a folder, not a file.")
        st = path.stat()
        if not S_ISREG(st.st_mode):  # /dev/zero has no size to check and a FIFO never ends
            raise ScanError("The path is not a regular file (a device, pipe or socket).")
        if st.st_size > MAX_BYTES:  # refuse before reading a huge file into memory
            raise ScanError(f"The file is larger than the {MAX_BYTES // 2**20} MB limit.")
        with path.open("rb") as f:  # bounded: the file may grow between stat and read
            return f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ScanError("The file does not exist.") from None
    except PermissionError:
        raise ScanError("The file cannot be opened (permission denied).") from None
    except OSError as e:
        raise ScanError(f"The file cannot be opened ({e.strerror or type(e).__name__}).") from None


# ----------------------------------------------------------------------------- sniffing
def _is_nifti(data: bytes) -> bool:
    return data[344:348] in (b"n+1\x00", b"ni1\x00") or data[4:8] == b"n+2\x00"


def _looks_like_raw_dicom(data: bytes) -> bool:
    """A DICOM data set without the 128-byte preamble starts with a group 0002 or 0008 tag."""
    return len(data) > 8 and data[:2] in (b"\x02\x00", b"\x08\x00") and data[3] < 0x10


def looks_like_text(data: bytes) -> bool:
    head = data[:2048]
    if b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return sum(c.isprintable() or c.isspace() for c in text) >= 0.95 * len(text)


def sniff(data: bytes) -> str:
    """The kind of file from its first bytes: dicom, gzip, nifti, zip, pdf or other."""
    if data[128:132] == b"DICM":
        return "dicom"
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    if _is_nifti(data):
        return "nifti"
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if data[:5] == b"%PDF-":
        return "pdf"
    return "other"


TAR_REFUSED = "Tar archives are not supported: upload a zip."


def _is_tar(data: bytes) -> bool:
    """A tar archive (plain, or the first bytes inflated from a .tar.gz): its header says
    'ustar' at byte 257, whatever the file is named."""
    return data[257:262] == b"ustar"


def _suffix(name: str) -> str:
    low = name.lower()
    return ".nii.gz" if low.endswith(".nii.gz") else Path(low).suffix


# ----------------------------------------------------------------------------- pixels
def robust_window(a: np.ndarray, inplace: bool = False) -> tuple[np.ndarray, tuple[float, float]]:
    """Scale to [0, 1] between the 0.5 and 99.5 percentiles (outliers do not set the contrast).

    ``inplace``: the caller owns ``a`` (float32) and lets it be overwritten; a 128 MB volume then
    needs no second and third copy on a 1 GB host."""
    out = np.asarray(a, dtype=np.float32)
    if (out is a and not inplace) or not out.flags.writeable:
        out = out.copy()
    np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    if out.size == 0:
        return out, (0.0, 1.0)
    sample = out if out.size <= 4_000_000 else out.ravel()[:: out.size // 4_000_000 + 1]
    lo, hi = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    if hi - lo < 1e-6:  # nearly constant: fall back to the full range
        lo, hi = float(out.min()), float(out.max())
    out -= lo
    with np.errstate(over="ignore"):   # extreme values (-3.4e38 in a float TIFF) overflow, then clip
        out /= max(hi - lo, 1e-6)   # a division, as before: bit-identical results (a reciprocal is not)
    np.clip(out, 0.0, 1.0, out=out)
    return out, (lo, hi)


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise ScanError(f"The image is too large ({width} x {height} pixels; "
                        f"the limit is {MAX_PIXELS // 1_000_000} megapixels).")
    if min(width, height) < MIN_SIDE:   # "too small" read as a slip beside 60000 x 10: name the short side
        what = "too small" if max(width, height) < MIN_SIDE else "too narrow"
        raise ScanError(f"The image is {what} ({width} x {height} pixels); each side "
                        f"must be at least {MIN_SIDE} pixels.")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ScanError(f"The image is too elongated ({width} x {height} pixels) to be a "
                        "scan slice.")


def _blank(grey: np.ndarray) -> dict:
    """{"blank": True} for an image with one value everywhere (nothing to classify)."""
    return {"blank": True} if float(grey.max()) - float(grey.min()) < 1e-6 else {}


def _resize(grey: np.ndarray, height: int, width: int) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32), mode="F")
    out = np.asarray(img.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def _frame_index(options: dict, n_frames: int, default: int, what: str = "frame") -> int:
    """The frame/slice asked for (``frame``, ``slice_index`` or ``slice`` are synonyms)."""
    k = next((options[key] for key in ("frame", "slice_index", "slice") if options.get(key) is not None),
             default)
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise ScanError(f"The {what} number must be a whole number.") from None
    if n_frames < 1:
        raise ScanError(f"The file has no {what}s: there is no image in it.")
    if not 0 <= k < n_frames:
        if n_frames == 1:
            raise ScanError(f"The file has one {what} (number 0); {what} {k} does not exist.")
        raise ScanError(f"The file has {n_frames} {what}s, numbered 0 to {n_frames - 1}; "
                        f"{what} {k} does not exist.")
    return k


# ----------------------------------------------------------------------------- images
class _NotAnImage(Exception):
    """Pillow does not recognise the content."""


def _flatten_mode(img: Image.Image) -> Image.Image:
    """Bring every Pillow mode to L, RGB, I or F; transparency is composited on black."""
    if img.mode == "1":
        return img.convert("L")
    if img.mode.startswith("I;16"):
        return img.convert("I")
    if img.mode in ("L", "RGB", "I", "F"):
        if "transparency" not in img.info:
            return img
    if img.mode in ("P", "PA", "LA", "La", "RGBA", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV


def _to_grey(img: Image.Image) -> tuple[np.ndarray, float, dict]:
    """A flattened (L, RGB, I or F) image -> grey [0, 1], colourfulness, info."""
    if img.mode in ("I", "F"):
        values = np.asarray(img)
        if (widened := _widened_8bit(values)) is not None:
            return widened, 0.0, {"intensity_window": [0.0, 65535.0]}
        grey, (lo, hi) = robust_window(values.astype(np.float32), inplace=True)
        return grey, 0.0, {"intensity_window": [round(lo, 3), round(hi, 3)]}
    a = np.asarray(img, dtype=np.float32) / 255.0
    if a.ndim == 2:
        return a, 0.0, {}
    return _rgb_to_grey(a)


def _rgb_to_grey(rgb: np.ndarray) -> tuple[np.ndarray, float, dict]:
    """RGB in [0, 1] -> grey (luminance), colourfulness (mean |channel - grey|) and, where strongly
    coloured pixels lie in the core of the head, ``{"colour_marks": their share}``: the measure of a
    reader's marks drawn in colour, which the mean misses (`core.inference.marks_reason`)."""
    grey = (rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).astype(np.float32)
    deviation = np.abs(rgb - grey[..., None])
    colour = float(deviation.mean())
    if not (deviation > MARK_CHROMA).any():   # most RGB files here are grey: nothing more to measure
        return grey, colour, {}
    # the channels' maximum as two np.maximum: deviation.max(axis=-1) took 2 ms on a 224 px scan
    strong = np.maximum(np.maximum(deviation[..., 0], deviation[..., 1]), deviation[..., 2]) > MARK_CHROMA
    share = round(_head_core_share(strong, grey), 6)
    return grey, colour, ({"colour_marks": share} if share > 0 else {})


def _head_core_share(strong: np.ndarray, grey: np.ndarray) -> float:
    """The share of the head box's inner part (an eighth cut from each side) that ``strong``
    covers: a site's coloured banner or text at the edge of the image stays outside it."""
    from .preprocess import head_bbox
    y0, y1, x0, x1 = head_bbox(grey)
    dy, dx = (y1 - y0) // 8, (x1 - x0) // 8
    core = strong[y0 + dy:y1 - dy, x0 + dx:x1 - dx]
    return float(core.mean()) if core.size else 0.0


def _widened_8bit(a: np.ndarray) -> np.ndarray | None:
    """An 8-bit image saved as 16 bits (every value a multiple of 257: v * 257 maps 0-255 onto
    0-65535) as the 8-bit one reads, v / 255; None for a genuine 16-bit image. The percentile
    window stretched such a re-save: one BRISC slice in 3 was then flagged, against 1 in 40."""
    if a.dtype.kind not in "iu" or a.size == 0 or a.min() < 0 or a.max() > 65535 or (a % 257).any():
        return None
    return (a / 65535.0).astype(np.float32)


@functools.cache
def _image_formats() -> tuple[str, ...]:
    """IMAGE_FORMATS that this Pillow build has (MPO and WebP register only after init)."""
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


# Pillow refuses a PNG text chunk that inflates past PngImagePlugin.MAX_TEXT_CHUNK (1 MB): a 7 KB
# file can hold a 3 MB comment. Not damage: metadata too large to read safely.
TEXT_BOMB = ("The image's embedded text (metadata) is too large to read safely: save the image again "
             "without its metadata.")


def _damaged(e: Exception, verb: str) -> ScanError:
    """Pillow's failure to read (``verb``) an image: an oversized text chunk said as such, else damage."""
    return ScanError(TEXT_BOMB if "MAX_TEXT" in str(e) else f"The image file is damaged and cannot be {verb}.")


def _read_image(data: bytes, options: dict) -> ScanImage:
    try:
        with warnings.catch_warnings():
            # Between MAX_PIXELS and 2x Pillow only warns; _check_size refuses those itself. A
            # damaged EXIF block warns too ("Corrupt EXIF data"), which the CLI's stderr is not for.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            img = Image.open(io.BytesIO(data), formats=_image_formats())
    except UnidentifiedImageError as e:
        raise _NotAnImage from e
    except Image.DecompressionBombError as e:   # Pillow's sentence holds the header's pixel count
        declared = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(declared[1]) // 1_000_000:,}" if declared else f"more than {2 * MAX_PIXELS // 1_000_000}"
        raise ScanError(f"The image is too large (its header declares {size} megapixels; the limit is "
                        f"{MAX_PIXELS // 1_000_000} megapixels).") from None
    except Exception as e:  # a broken header: Pillow raises many types here
        raise _damaged(e, "read") from e
    with img:
        width, height = img.size
        _check_size(width, height)  # from the header: nothing decoded yet
        info: dict[str, Any] = {"format": img.format, "mode": img.mode, "width": width,
                                "height": height}
        try:
            n_frames = _count_frames(img)  # a damaged GIF or TIFF fails here already
            frame = _frame_index(options, n_frames or 2**31, 0)
            _seek(img, frame)
            if frame:
                _check_page(img, info)
            if n_frames != 1:
                info.update(frame=frame, n_frames=n_frames)
            if img.format in ("JPEG", "MPO") and max(width, height) > MAX_SIDE:
                img.draft(img.mode, (MAX_SIDE, MAX_SIDE))  # decode at 1/2, 1/4...: less memory
            _load(img)
            if img.format in ("JPEG", "MPO") and img.size != (width, height):   # the decoder reduced it
                info["downscaled_from"] = [width, height]   # already: say from what
            grey, colour, extra = _decode_loaded(img, info)
        except ScanError:
            raise
        except MemoryError:
            raise ScanError("The image is too large to process.") from None
        except Image.DecompressionBombError:
            raise ScanError(f"The image is too large (over {MAX_PIXELS // 1_000_000} megapixels).") from None
        except OSError as e:
            if "truncated" in str(e).lower():
                raise ScanError("The image file is truncated (incomplete).") from e
            raise ScanError("The image file is damaged and cannot be decoded.") from e
        except Exception as e:  # decoder errors come as SyntaxError, ValueError, EOFError, ...
            raise _damaged(e, "decoded") from e
    info.update(extra)
    info.update(_blank(grey))
    return ScanImage(grey, colour, "image", info)


def _load(img: Image.Image) -> None:
    """Decode the current page; Pillow's bomb warning stays quiet: `_check_size` checked this
    page's size (the first from the header, a later one in `_check_page`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img.load()


def _check_page(img: Image.Image, info: dict) -> None:
    """A later page of a TIFF or GIF is checked as the first was (each page has its own size and
    mode: a 64-megapixel page 2 was decoded, a 600 x 4 strip read as a slice), and ``info``
    describes the page shown."""
    _check_size(*img.size)
    info.update(mode=img.mode, width=img.width, height=img.height)


def _count_frames(img: Image.Image) -> int | None:
    """Frames in an animated or multi-page file; None where counting would mean decoding them
    all (a large GIF: Pillow counts GIF frames by decoding each one)."""
    if not getattr(img, "is_animated", False):
        return 1
    if img.format == "GIF" and img.width * img.height > 1_000_000:
        return None
    return int(img.n_frames)


def _seek(img: Image.Image, frame: int) -> None:
    if frame:
        try:
            img.seek(frame)
        except EOFError:  # only when the frame count was not known beforehand
            raise ScanError(f"The file has fewer frames than asked for; frame {frame} does not "
                            "exist.") from None


def _decode_loaded(img: Image.Image, info: dict) -> tuple[np.ndarray, float, dict]:
    orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
    turned = isinstance(orientation, int) and 2 <= orientation <= 8  # a malformed tag is ignored, as viewers do
    swap = turned and orientation >= 5
    if swap and "downscaled_from" in info:   # a JPEG reduced while decoding: its size as displayed
        info["downscaled_from"] = info["downscaled_from"][::-1]
    img = _reduce_image(img, info, swap)  # first: the steps below copy
    if turned:
        img = ImageOps.exif_transpose(img)
        info["exif_rotated"] = int(orientation)
    return _to_grey(_flatten_mode(img))


def _reduce_image(img: Image.Image, info: dict, swap: bool = False) -> Image.Image:
    """The image reduced to MAX_SIDE, before any conversion: a 6300 x 6300 RGBA PNG converted at
    full size took 800 MB. Palette and 1-bit images are sampled (their values are indices)."""
    longest = max(img.size)
    if longest <= MAX_SIDE:
        return img
    factor = math.ceil(longest / MAX_SIDE)
    info.setdefault("downscaled_from", list(img.size[::-1] if swap else img.size))   # a JPEG's draft set it
    if img.mode in ("P", "PA", "1"):
        return img.resize((max(1, img.width // factor), max(1, img.height // factor)), Image.NEAREST)
    try:
        return img.reduce(factor)
    except ValueError:  # a mode reduce() does not take (CMYK, YCbCr, I;16...)
        return img.resize((max(1, img.width // factor), max(1, img.height // factor)), Image.BOX)


# ----------------------------------------------------------------------------- DICOM
DEFLATED_TS = "1.2.840.10008.1.2.1.99"   # Deflated Explicit VR Little Endian: the whole dataset zlib-packed


def _check_deflated(data: bytes, force: bool) -> None:
    """Refuse a deflated DICOM that inflates beyond MAX_DECOMPRESSED: pydicom inflates such a file
    whole and without a limit (a 1.5 MB file took 3 GB). Counted here first, 1 MB at a time."""
    if DEFLATED_TS.encode() not in data[:4096]:   # the file meta (uncompressed) names the syntax
        return
    from pydicom.filereader import _read_file_meta_info, read_preamble
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, force)
        if str(_read_file_meta_info(fp).get("TransferSyntaxUID", "")) != DEFLATED_TS:
            return
    except Exception:  # dcmread says what is wrong with the file
        return
    d, rest, total = zlib.decompressobj(-zlib.MAX_WBITS), data[fp.tell():], 0
    try:
        while not d.eof:
            got = len(d.decompress(rest, 2**20))
            rest, total = d.unconsumed_tail, total + got
            if total > MAX_DECOMPRESSED:
                raise ScanError(f"The DICOM file is compressed (deflated) and would take more than "
                                f"{MAX_DECOMPRESSED // 2**20} MB once inflated: too large to read.")
            if not got and not rest:   # the input ends before the stream does
                break
    except zlib.error as e:
        raise ScanError("The DICOM file is damaged and cannot be read.") from e


def _dcmread(data: bytes, force: bool):
    import pydicom
    _check_deflated(data, force)
    # pydicom parses elements lazily, on first access, and then warns about invalid values with
    # its own file and line (and the value) on stderr: reading never validates here.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():  # pydicom warnings may quote element values
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), force=force)
    except Exception as e:  # InvalidDicomError, EOFError, struct/unicode errors on garbage
        raise ScanError("The DICOM file is damaged and cannot be read.") from e


def _overlong_rle(message: str) -> bool:
    """Whether pydicom's RLE decoder said a segment decoded longer than its frame by more than
    the pad byte of an odd length: damaged data, which it truncates and serves with only a
    warning (a damaged file decoded so had 19,654 of 50,176 pixels wrong)."""
    m = re.search(r"non-conformant padding\D+(\d+) vs\. (\d+) bytes", message)
    return bool(m) and int(m.group(1)) - int(m.group(2)) > 1


def _is_compressed(ts) -> bool:
    try:
        return bool(ts.is_compressed)
    except ValueError:  # a UID pydicom does not know: most likely a newer compression
        return True


def _decoder_available(ts) -> bool:
    """Whether a pixel decoder for transfer syntax ``ts`` is installed here."""
    from pydicom.pixels import get_decoder
    try:
        return bool(get_decoder(ts).is_available)
    except (NotImplementedError, ValueError):
        return False


def _dicom_frame(ds, index: int | None) -> np.ndarray:
    """Decode one frame; compressed syntaxes go through pydicom's decoders (see `_read_dicom`)."""
    from pydicom.pixels import pixel_array
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        # A data set without file meta (no preamble): its encoding is what pydicom read.
        implicit, little = getattr(ds, "original_encoding", (True, True))
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian)
    ts = ds.file_meta.TransferSyntaxUID
    # RLE by pydicom's own decoder: pylibjpeg-rle's (Rust) panics on some damaged data, printing a
    # backtrace that no Python handler can hold back (the panic itself is caught below)
    plugin = "pydicom" if ts == RLELossless else ""
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            arr = pixel_array(ds, index=index, decoding_plugin=plugin)
        if any(_overlong_rle(str(w.message)) for w in said):
            raise ValueError("an RLE segment decodes longer than its frame")
        return arr
    except (NotImplementedError, RuntimeError) as e:
        if _is_compressed(ts) and not _decoder_available(ts):
            raise ScanError(f"The DICOM file uses a compression ({_ascii_text(ts.name, 64)}) that cannot be "
                            "decoded here.") from e
        if _is_compressed(ts):  # the decoder is there: the compressed data is what failed
            raise ScanError("The DICOM file's compressed pixel data is damaged or incomplete.") from e
        raise ScanError("The DICOM file's pixel data cannot be decoded.") from e
    except MemoryError:
        raise ScanError("The DICOM image is too large to process.") from None
    except BaseException as e:   # a Rust decoder's panic included
        if not is_file_fault(e):
            raise
        raise ScanError("The DICOM file's pixel data is damaged or incomplete.") from e


def _first(value) -> float | None:
    """First value of a possibly multi-valued DS element, or None when missing or unusable."""
    from pydicom.multival import MultiValue
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _functional(ds, name: str, frame: int | None):
    """The first item of functional-group sequence ``name`` (Enhanced MR and CT keep the window,
    the rescale and the anatomy there, not at the top level) for ``frame``: its per-frame group,
    else the shared one; None when the file has neither."""
    groups = []
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is not None and frame is not None and 0 <= frame < len(per):
        groups.append(per[frame])
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    for g in groups:
        seq = g.get(name)
        if seq:
            return seq[0]
    return None


def _dicom_window(values: np.ndarray, ds, frame: int | None = None,
                  shared: tuple[float, float] | None = None) -> tuple[np.ndarray, dict]:
    """Modality values -> [0, 1] display values with the file's VOI (window or LUT).

    Linear window per DICOM PS3.3 C.11.2.1.2 (pydicom's apply_windowing returns the result in a
    bit-depth dependent output range; here we want [0, 1] directly). Without a usable window, or
    when the header's window leaves no contrast, a robust percentile window is used.
    """
    if "VOILUTSequence" in ds:
        try:
            from pydicom.pixels import apply_voi
            with warnings.catch_warnings():  # "Applying a VOI LUT on a float input" and the like
                warnings.simplefilter("ignore")
                out = apply_voi(values, ds).astype(np.float32)
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            grey = np.clip(out / float(2**bits - 1), 0, 1)
            if float(grey.std()) > 1e-3:
                return grey, {"window_source": "VOI LUT"}
        except Exception:  # a broken LUT falls back to the window or percentiles below
            pass
    voi = ds if "WindowCenter" in ds else (_functional(ds, "FrameVOILUTSequence", frame) or ds)
    center, width = _first(voi.get("WindowCenter")), _first(voi.get("WindowWidth"))
    function = str(voi.get("VOILUTFunction", "LINEAR")).strip().upper()
    if center is not None and width is not None and width >= (1 if function == "LINEAR" else 1e-9):
        if function == "SIGMOID":
            grey = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        elif function == "LINEAR_EXACT":
            grey = (values - center) / width + 0.5
        else:
            grey = (values - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5
        grey = np.clip(grey, 0, 1).astype(np.float32)
        if float(grey.std()) > 1e-3:
            return grey, {"window": {"center": center, "width": width}, "window_source": "header"}
    if shared is not None:   # the volume's window (`_dicom_frames`), not this frame's own
        lo, hi = shared
        grey = np.clip((np.nan_to_num(values) - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)
        return grey, {"window": {"center": round((lo + hi) / 2, 3), "width": round(hi - lo, 3)},
                      "window_source": "percentile 0.5-99.5 of every frame"}
    grey, (lo, hi) = robust_window(values)
    return grey, {"window": {"center": round((lo + hi) / 2, 3), "width": round(hi - lo, 3)},
                  "window_source": "percentile 0.5-99.5", "range": (lo, hi)}


def _dicom_grey(arr: np.ndarray, ds, frame: int | None = None,
                shared: tuple[float, float] | None = None) -> tuple[np.ndarray, float, dict]:
    """One decoded frame -> grey [0, 1], colourfulness, window info; ScanError when the file's
    tables cannot be applied. ``shared``: the window to use where the file gives none."""
    try:
        return _dicom_grey_values(arr, ds, frame, shared)
    except MemoryError:
        raise ScanError("The DICOM image is too large to process.") from None
    except Exception as e:  # a palette without its table, a non-numeric slope, a broken LUT
        raise ScanError("The DICOM file's rescale or colour tables are damaged.") from e


def _dicom_grey_values(arr: np.ndarray, ds, frame: int | None = None,
                       shared: tuple[float, float] | None = None) -> tuple[np.ndarray, float, dict]:
    from pydicom.pixels import apply_color_lut, apply_modality_lut
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if pi == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)  # RGB with the LUT's own 8 or 16 bit entries
        top = float(np.iinfo(arr.dtype).max) if arr.dtype.kind in "ui" else 1.0
    else:
        top = float(2 ** int(ds.get("BitsStored", 8) or 8) - 1)
    if arr.ndim == 3:  # colour (YBR already converted to RGB by pydicom)
        return _rgb_to_grey(np.clip(arr.astype(np.float32) / top, 0, 1))
    for key in ("RescaleSlope", "RescaleIntercept"):   # NaN, infinite or a zero slope made every pixel
        # one value: read as 'blank', where the header is what is broken (a review)
        raw = ds.get(key)
        if raw is not None and (_first(raw) is None or (key == "RescaleSlope" and _first(raw) == 0)):
            raise ValueError(f"{key} {raw!r}")
    values = apply_modality_lut(arr, ds).astype(np.float32)  # Rescale Slope/Intercept or LUT
    pvt = None if "RescaleSlope" in ds else _functional(ds, "PixelValueTransformationSequence", frame)
    if pvt is not None and _first(pvt.get("RescaleSlope")) == 0:   # a frame's own zero slope: blank, as above
        raise ValueError("per-frame RescaleSlope 0")
    if pvt is not None and _first(pvt.get("RescaleSlope")) is not None:
        values = values * np.float32(_first(pvt.RescaleSlope)) + np.float32(_first(pvt.get("RescaleIntercept")) or 0.0)
    grey, info = _dicom_window(values, ds, frame, shared)
    if pi == "MONOCHROME1":  # the lowest value is white
        grey = 1.0 - grey
    return grey, 0.0, info


MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"   # DICOMDIR: a CD/DVD export's index, not an image


def _dicom_header(data: bytes):
    force = sniff(data) != "dicom"  # no preamble: ask pydicom to try anyway
    ds = _dcmread(data, force=force)
    if (str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "")) == MEDIA_DIRECTORY
            or "DirectoryRecordSequence" in ds):
        raise ScanError("This is a DICOMDIR, the index of a CD or DVD export, not an image: upload "
                        "the image files it lists (usually in the folders beside it).")
    try:
        return (ds, *_dicom_geometry(ds))
    except ScanError as e:
        raise _named_by_header(e, ds) from e


def _named_by_header(e: ScanError, ds, frame: int | None = None) -> ScanError:
    """``e``, followed by the header's own word when it says the file is not a brain MRI
    (`core.header.header_reason`): a CT whose pixels cannot be read is named a CT, not only a file
    that cannot be read (the header is otherwise judged after the pixels decode)."""
    from .header import header_reason
    try:
        reason = header_reason({"modality": _modality(ds),
                                **_body_part(ds, frame or 0)})
    except Exception:   # a damaged element: the first sentence stands alone
        return e
    if not reason:
        return e
    # one short sentence, as every reader error is: the read failure, then what the header says
    said = reason.split("; the model reads")[0].rstrip(".")
    return ScanError(f"{str(e).rstrip('.')}; {said[0].lower()}{said[1:]}.")


def _dicom_geometry(ds) -> tuple[int, int, int]:
    """(rows, columns, frames) of a data set that holds pixels; ScanError otherwise."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if not any(k in ds for k in ("SOPClassUID", "Modality", "Rows")):  # nothing parsed
            raise ScanError("The DICOM file is damaged and cannot be read.")
        raise ScanError("The DICOM file contains no image (it has no pixel data).")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception:
        raise ScanError("The DICOM file is damaged (its image size is missing).") from None
    _check_size(cols, rows)
    from pydicom.pixels.utils import get_nr_frames
    try:
        with warnings.catch_warnings():  # pydicom warns with the element's (possibly private) value
            warnings.simplefilter("ignore")
            n_frames = max(1, int(get_nr_frames(ds, warn=False)))
    except Exception:
        raise ScanError("The DICOM file is damaged (its number of frames is not a number).") from None
    if (size := _frame_bytes(ds, rows, cols)) > MAX_FRAME_BYTES:
        raise ScanError(f"The DICOM image is too large ({size // 2**20} MB a frame once decoded; "
                        f"the limit is {MAX_FRAME_BYTES // 2**20} MB).")
    return rows, cols, n_frames


# Pixels count, bytes matter: 3 samples of 32 bits passed as 40 megapixels and decoded to 476 MB.
# A frame at the pixel limit may hold 16-bit grey or 8-bit colour; a file's frames together, what
# MAX_VOXELS of float32 would.
MAX_FRAME_BYTES = MAX_PIXELS * 3


def _frame_bytes(ds, rows: int, cols: int) -> int:
    """Bytes one decoded frame takes, from the header (samples per pixel x bits allocated)."""
    try:
        return rows * cols * max(1, int(ds.get("SamplesPerPixel", 1) or 1)) * \
            max(8, int(ds.get("BitsAllocated", 16) or 16)) // 8
    except (TypeError, ValueError):
        raise ScanError("The DICOM file is damaged (its sample size is not a number).") from None


def _code_string(value, n: int) -> str:
    """A header's code word as DICOM's CS values are written (upper case, digits, spaces),
    at most ``n`` characters: these fields are typed by hand and reach every output (an
    `ood_reason`, the PDF, the page), so nothing else of them may (a name, a markdown link)."""
    if isinstance(value, bytes):   # a value stored under a binary VR (OB, UN): its text, not "b'MR'"
        value = value.decode("latin-1")
    elif isinstance(value, Sequence) and not isinstance(value, str):   # pydicom's MultiValue: its values, not "['MR', 'CT']"
        value = " ".join(str(v) for v in value)
    # word separators stay separators ("HIP/FEMUR"); '_' too, which a markdown page reads as italics
    text = re.sub(r"[/,.&+_\\]", " ", str(value).upper())   # a binary VR's values stay apart (MR\CT)
    return " ".join("".join(ch for ch in text if ch.isascii() and (ch.isalnum() or ch in " -^")).split())[:n]


def _ascii_text(value, n: int) -> str:
    """A header value shown as it is written (a UID's name, a photometric word), printable ASCII
    only, at most ``n`` characters: an escape sequence in a damaged header cleared the terminal."""
    return "".join(ch for ch in str(value) if ch.isascii() and ch.isprintable())[:n]


def _dicom_info(ds, rows: int, cols: int, n_frames: int, frame: int | None = None) -> dict:
    """Only technical fields, copied one by one (never the data set itself); the body part of
    ``frame`` where an Enhanced MR states one per frame (default: the middle frame's)."""
    info: dict[str, Any] = {
        "format": "DICOM", "width": cols, "height": rows,
        "modality": _modality(ds),
        **_body_part(ds, n_frames // 2 if frame is None else frame),
        "photometric_interpretation": _ascii_text(ds.get("PhotometricInterpretation", ""), 24),
        "transfer_syntax": _ascii_text(getattr(ds.file_meta.get("TransferSyntaxUID"), "name", ""), 64),
        "bits_stored": int(ds.get("BitsStored", 0) or 0),
        "n_frames": n_frames,
    }
    slope, intercept = _first(ds.get("RescaleSlope")), _first(ds.get("RescaleIntercept"))
    if slope is not None and intercept is not None:
        info["rescale"] = {"slope": slope, "intercept": intercept}
    return info | _series_fields(ds)


def _modality(ds) -> str:
    return recognised_modality(_code_string(ds.get("Modality", ""), 16))


def _body_part(ds, frame: int) -> dict:
    """``body_part``: Body Part Examined, else the anatomy an Enhanced MR or CT states for
    ``frame`` in its Frame Anatomy (per frame where frames differ, so a frame is judged by what it
    shows; ``body_part_of_frame`` then says so, since the file's Body Part Examined is empty)."""
    part = ds.get("BodyPartExamined", "")
    if part:
        return {"body_part": recognised_body_part(_code_string(part, 32))}
    fa = _functional(ds, "FrameAnatomySequence", frame)
    region = fa.get("AnatomicRegionSequence") if fa is not None else None
    part = recognised_body_part(_code_string(region[0].get("CodeMeaning", "") if region else "", 32))
    return {"body_part": part, "body_part_of_frame": True} if part else {"body_part": ""}


# Salted per process: the key groups one batch's files by series and links to nothing outside it
# (de-identification replaces UIDs: a plain hash could still be matched to the archive's UID).
_SERIES_SALT = os.urandom(16)


def _series_fields(ds) -> dict:
    """``series`` (12 hex digits from the Series Instance UID) and ``instance`` (Instance
    Number), when present: a series exported as one file per slice is then seen as one scan."""
    out: dict[str, Any] = {}
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if uid:
        out["series"] = hashlib.sha256(_SERIES_SALT + uid.encode()).hexdigest()[:12]
    try:
        out["instance"] = int(str(ds.get("InstanceNumber", "")).strip())
    except ValueError:
        pass
    return out


def _lazy_damage_guard(read):
    """pydicom parses elements when first read, so a damaged element (an unknown VR, say) raises
    wherever the reader first touches it: as one sentence, whichever step that is."""
    @functools.wraps(read)
    def guarded(*args, **kw):
        try:
            return read(*args, **kw)
        except (ScanError, MemoryError):
            raise
        except BaseException as e:
            if not is_file_fault(e):
                raise
            raise ScanError("The DICOM file is damaged and cannot be read.") from e
    return guarded


@_lazy_damage_guard
def _read_dicom(data: bytes, options: dict) -> ScanImage:
    """One frame of a DICOM file (default: the middle frame of a multi-frame file).

    Pipeline: decode -> Modality LUT (Rescale Slope/Intercept) -> VOI (Window Center/Width, VOI
    LUT, else a 0.5-99.5 percentile window) -> MONOCHROME1 inverted. Colour (RGB, YBR,
    PALETTE COLOR) becomes luminance, with colourfulness kept for the out-of-distribution gate.

    Transfer syntaxes decoded: uncompressed (implicit/explicit VR little endian, explicit big
    endian, deflated) by pydicom; RLE Lossless by pydicom or pylibjpeg-rle; JPEG Baseline and
    Extended (8/12 bit) by Pillow or pylibjpeg-libjpeg; JPEG Lossless (process 14, SV1) and
    JPEG-LS (lossless, near-lossless) by pylibjpeg-libjpeg; JPEG 2000 (lossless, lossy) and
    HTJ2K by pylibjpeg-openjpeg. Others (JPEG XL, MPEG/H.264/HEVC video) give a clear message.
    """
    ds, rows, cols, n_frames = _dicom_header(data)
    frame = _frame_index(options, n_frames, n_frames // 2)
    try:
        arr = _dicom_frame(ds, frame if n_frames > 1 else None)
    except ScanError as e:
        raise _named_by_header(e, ds, frame) from e
    if arr.ndim == 4 or (arr.ndim == 3 and int(ds.get("SamplesPerPixel", 1) or 1) == 1):
        arr = arr[0]  # a frame index pydicom ignored: keep one frame
    info = _header_read(_dicom_info, ds, rows, cols, n_frames, frame)
    arr = _reduce_frame(arr, ds, info)
    grey, colour, window = _dicom_grey(arr, ds, frame)
    window.pop("range", None)   # `_dicom_frames`' to pool; not a ScanImage info key
    info |= window | {"frame": frame} | _blank(grey)
    return ScanImage(np.ascontiguousarray(grey, dtype=np.float32), colour, "dicom", info)


def _reduce_frame(arr: np.ndarray, ds, info: dict) -> np.ndarray:
    """A decoded frame reduced to MAX_SIDE before any table is applied: at 6300 x 6300 the
    rescale and window steps each made a 160 MB float copy. Block means of the stored values
    (the rescale is linear, so it commutes); palette indices are sampled, not averaged."""
    h, w = arr.shape[:2]
    if max(h, w) <= MAX_SIDE:
        return arr
    f = math.ceil(max(h, w) / MAX_SIDE)
    info["downscaled_from"] = [w, h]
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "PALETTE COLOR":
        return np.ascontiguousarray(arr[::f, ::f])
    blocks = arr[: h // f * f, : w // f * f].reshape(h // f, f, w // f, f, *arr.shape[2:])
    out = blocks.mean(axis=(1, 3), dtype=np.float32)
    # stored integers stay integers: a Modality or VOI LUT looks its values up
    return np.rint(out).astype(arr.dtype) if arr.dtype.kind in "ui" else out


def _header_read(read, *args):
    """``read(*args)`` of header fields (`_dicom_info`, `_body_part`), with a damaged element
    (pydicom parses lazily, on access) as one sentence."""
    try:
        return read(*args)
    except Exception as e:
        raise ScanError("The DICOM file is damaged (a header element cannot be read).") from e


@_lazy_damage_guard
def _dicom_frames(data: bytes) -> tuple[list[tuple[np.ndarray, float, dict]], dict]:
    """Every frame as (grey, colourfulness, its body part's info keys), and the file's info."""
    ds, rows, cols, n_frames = _dicom_header(data)
    _check_slice_count(n_frames)
    if rows * cols * n_frames > MAX_VOXELS or _frame_bytes(ds, rows, cols) * n_frames > MAX_VOXELS * 4:
        raise _named_by_header(ScanError(f"The DICOM file has too many frames to read at once ({n_frames})."), ds)
    try:
        arr = _dicom_frame(ds, None)
    except ScanError as e:
        raise _named_by_header(e, ds, n_frames // 2) from e
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    frames = arr if arr.ndim == (4 if spp > 1 else 3) else arr[None]
    info = _header_read(_dicom_info, ds, rows, cols, n_frames)
    greys = [_dicom_grey(_reduce_frame(f, ds, info), ds, k) for k, f in enumerate(frames)]
    ranges = [g[2]["range"] for g in greys if "range" in g[2]]
    if len(greys) > 1 and len(ranges) == len(greys):
        # no window in the file: one for the volume, as a NIfTI gets. Each frame stretched to its
        # own percentiles made noise-only end frames full-contrast: not blank, and 'all head'.
        shared = (min(lo for lo, _ in ranges), max(hi for _, hi in ranges))
        greys = [_dicom_grey(_reduce_frame(f, ds, info), ds, k, shared) for k, f in enumerate(frames)]
    # the window is the same for every frame; the range is `_dicom_grey`'s to pool, and the colour
    # measure each frame's own
    window = {k: v for k, v in greys[len(greys) // 2][2].items() if k not in ("range", "colour_marks")}
    parts = [_header_read(_body_part, ds, k) for k in range(len(greys))]
    marks = [{"colour_marks": g[2]["colour_marks"]} if "colour_marks" in g[2] else {} for g in greys]
    return [(g[0], g[1], part | m) for g, part, m in zip(greys, parts, marks)], info | window


# ----------------------------------------------------------------------------- NIfTI
def _quiet_nibabel() -> None:
    """nibabel logs header fixes ("pixdim ... setting 0 dims to 1", "vox offset -100 too low") to
    stderr; the CLI's stdout and stderr are for our lines, and a header it cannot fix is refused."""
    logging.getLogger("nibabel").setLevel(logging.CRITICAL)   # a fixed problem is logged at 40-45


def _nifti_header(head: bytes):
    """(nibabel header, its least data offset) of a single-file NIfTI's first bytes; None when
    ``head`` is not a NIfTI header."""
    import nibabel as nib
    _quiet_nibabel()
    if head[344:348] == b"ni1\x00":
        raise ScanError("This is a NIfTI header without its image data; please upload a single "
                        ".nii or .nii.gz file.")
    if head[344:348] == b"n+1\x00":
        cls, minimum = nib.Nifti1Header, 352
    elif head[4:8] == b"n+2\x00":
        cls, minimum = nib.Nifti2Header, 544
    else:
        return None
    try:
        return cls.from_fileobj(io.BytesIO(head), check=False), minimum
    except Exception as e:
        raise ScanError("The NIfTI header is damaged.") from e


def _nifti_nbytes(head: bytes) -> int | None:
    """Bytes a single-file NIfTI needs (header, extensions, voxels), from its header alone;
    None when ``head`` is not a NIfTI header."""
    if (found := _nifti_header(head)) is None:
        return None
    hdr, minimum = found
    try:
        voxels = math.prod(int(d) for d in hdr.get_data_shape())
        return max(int(hdr.get_data_offset()), minimum) + voxels * hdr.get_data_dtype().itemsize
    except Exception as e:
        raise ScanError("The NIfTI header is damaged.") from e


def _check_nifti_dtype(dtype: np.dtype) -> None:
    """Refuse colour and complex voxels from the header: a 0.5 MB .nii.gz of complex128 zeros was
    inflated and decoded (1 GB) before this was found. Real values of up to 8 bytes are scans."""
    if not np.issubdtype(dtype, np.number) or np.issubdtype(dtype, np.complexfloating):
        raise ScanError("The NIfTI file holds colour or complex values, which are not supported.")
    if dtype.itemsize > 8:   # float128: no scanner writes it, and it doubles a float64 volume's memory
        raise ScanError(f"The NIfTI file stores its values in {dtype.itemsize} bytes each, which is not supported.")


def _too_large(head: bytes, need: int) -> str | None:
    """Why a NIfTI of ``need`` bytes may not be inflated, or None: beyond MAX_DECOMPRESSED, unless
    it is one 3D volume within MAX_VOXELS (a 256^3 float64 scan is a scan, not a bomb)."""
    if need <= MAX_DECOMPRESSED:
        return None
    if need > 2**50:   # a petabyte: stray dimensions of a damaged header (dim[0] = 8), not a scan
        return "The NIfTI header declares an impossible size: the file is damaged."
    shape = _nifti_header(head)[0].get_data_shape()
    if math.prod(int(d) for d in shape[3:]) <= 1 and math.prod(int(d) for d in shape[:3]) <= MAX_VOXELS:
        return None
    return (f"The volume is too large (its header declares {_size_words(need)} of voxels; "
            f"the limit is {MAX_DECOMPRESSED // 2**20} MB).")


def _size_words(n: int) -> str:
    """Bytes as a reader takes them in: '128 MB', '3.4 GB', '98 TB' (not '102996826 MB')."""
    for unit, size in (("TB", 2**40), ("GB", 2**30)):
        if n >= size:
            return f"{n / size:.2g} {unit}" if n < 10 * size else f"{n // size:,} {unit}"
    return f"{n // 2**20} MB"


def _gunzip_nifti(data: bytes) -> bytes:
    """Inflate a .nii.gz only as far as its header says the volume goes.

    The header comes first, so a volume over MAX_DECOMPRESSED (or a gzip bomb, whatever it
    claims) is refused after inflating 544 bytes, and trailing data is never inflated.
    """
    d = zlib.decompressobj(wbits=31)
    try:
        head = d.decompress(data, 544)
        need = _nifti_nbytes(head)
        if need is None and _is_tar(head):
            raise ScanError(TAR_REFUSED)
        if need is None:
            raise ScanError("The compressed file does not contain a NIfTI volume.")
        _check_nifti_dtype(_nifti_header(head)[0].get_data_dtype())   # before inflating, not after
        if why := _too_large(head, need):
            raise ScanError(why)
        chunks, got = [head], len(head)
        while got < need:
            if d.eof and d.unused_data:  # a multi-member gzip (bgzip, concatenated .gz parts)
                rest, d = d.unused_data, zlib.decompressobj(wbits=31)
                chunk = d.decompress(rest, need - got)
            else:
                chunk = d.decompress(d.unconsumed_tail, need - got)
            if not chunk and (not d.eof or not d.unused_data):
                break
            chunks.append(chunk)
            got += len(chunk)
    except zlib.error as e:
        raise ScanError("The compressed file is damaged and cannot be decompressed.") from e
    return b"".join(chunks)


def _nifti_image(data: bytes):
    import nibabel as nib
    _quiet_nibabel()
    if data[:2] == b"\x1f\x8b":
        data = _gunzip_nifti(data)
    need = _nifti_nbytes(data[:544])
    if need is None:
        raise ScanError("The file is not a NIfTI volume.")
    if why := _too_large(data[:544], need):
        raise ScanError(why)
    if len(data) < need:
        raise ScanError("The NIfTI file is truncated (incomplete).")
    cls = nib.Nifti2Image if data[4:8] == b"n+2\x00" else nib.Nifti1Image
    try:
        return cls.from_bytes(data)
    except Exception as e:
        raise ScanError("The NIfTI file is damaged and cannot be read.") from e


def _nifti_volume(data: bytes, options: dict) -> tuple[np.ndarray, tuple, dict]:
    """One 3D volume of a NIfTI file, reoriented to RAS+ and scaled to [0, 1].

    `nibabel.as_closest_canonical` makes axis 0 point right, 1 anterior, 2 superior, whatever
    the scanner's storage order, so axial slices are ``vol[:, :, k]`` (see `_slice_2d` for the
    display and `_plane` for coronal or sagittal stacks). The intensity window
    (0.5-99.5 percentiles) is computed on the whole volume so that slices stay comparable.
    4D files: ``volume=`` picks the volume (default 0, e.g. the b0 of a diffusion series).
    """
    import nibabel as nib
    img = _nifti_image(data)
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3, 4):
        raise ScanError(f"The NIfTI file has {len(shape)} dimensions; only 2D, 3D and 4D "
                        "volumes are supported.")
    _check_nifti_dtype(img.header.get_data_dtype())
    n_vol = shape[3] if len(shape) == 4 else 1
    if int(np.prod(shape[:3])) > MAX_VOXELS:
        raise ScanError(f"The volume is too large ({' x '.join(map(str, shape[:3]))} voxels).")
    vol_index = _frame_index({"frame": options.get("volume")}, n_vol, 0, "volume")
    try:
        if len(img.shape) == 4:  # read only the chosen volume
            raw = np.asanyarray(img.dataobj[..., vol_index])
        else:
            raw = np.asanyarray(img.dataobj).reshape(shape)
            raw = raw[..., vol_index] if raw.ndim == 4 else raw
        vol = np.asarray(raw, dtype=np.float32).reshape(raw.shape if raw.ndim == 3 else raw.shape + (1,))
        del raw   # the stored values, no longer needed: a 128 MB volume must not be held twice
    except MemoryError:
        raise ScanError("The volume is too large to process.") from None
    except Exception as e:
        raise ScanError("The NIfTI file's image data is damaged or incomplete.") from e
    if _stores_geometry(img):
        try:
            orientation = "".join(nib.aff2axcodes(img.affine))
            canon = nib.as_closest_canonical(nib.Nifti1Image(vol, img.affine))
        except Exception as e:  # a NaN or all-zero affine has no orientation to reorient by
            raise ScanError("The NIfTI file's orientation (affine) is damaged.") from e
        del vol
        vol = np.ascontiguousarray(canon.dataobj, dtype=np.float32)
        zooms = tuple(float(z) for z in canon.header.get_zooms()[:3])
        del canon
        orientation += " (shown as RAS, radiological)"
    else:
        # Flipping x and y reads the identity as image tools and ITK mean it (x across, y down):
        # `_slice_2d` then shows vol[:, :, k].T, the stored image, upright.
        vol = np.ascontiguousarray(vol[::-1, ::-1, :])
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        orientation = NO_GEOMETRY
    del img
    vol, (lo, hi) = robust_window(vol, inplace=True)
    # a damaged header's NaN, infinite or zero voxel size is unknown, said as null; an unknown side
    # takes the smallest known one (1 mm beside a known 0.5 mm doubled the slice's height; cubes
    # for all three dropped a known 2:1 shape), 1 mm when none is known
    stored = [round(z, 3) if math.isfinite(z) and z != 0 else None for z in zooms]
    known = [abs(z) for z, k in zip(zooms, stored) if k is not None]
    zooms = tuple(z if k is not None else min(known, default=1.0) for z, k in zip(zooms, stored))
    info = {"format": "NIfTI", "n_volumes": n_vol,
            "volume": vol_index, "orientation": orientation,
            "voxel_size_mm": stored,
            "intensity_window": [round(lo, 3), round(hi, 3)]}
    return vol, zooms, info


NO_GEOMETRY = "none stored (identity affine or none): shown in stored order, axis 0 across, axis 1 down"


def _stores_geometry(img) -> bool:
    """False for a file that carries no scanner geometry: no qform or sform, or an exactly
    identity affine. A scanner or converter (dcm2niix) writes real voxel sizes and offsets; an
    identity is what a script that saves image arrays writes (the shared samples are such files,
    stored x = image column, y = image row). Reoriented as RAS, those show upside down (a 180°
    turn the classifier was not trained for), so they are shown in stored image order instead."""
    h = img.header
    if int(h.get("qform_code", 0)) == 0 and int(h.get("sform_code", 0)) == 0:
        return False
    return not np.array_equal(np.asarray(img.affine, dtype=float), np.eye(4))


PLANES = {"sagittal": 0, "coronal": 1, "axial": 2}  # the RAS+ axis each plane cuts across
PLANE_DISPLAY = {"axial": "axial, anterior up, patient right on the left",
                 "coronal": "coronal, superior up, patient right on the left",
                 "sagittal": "sagittal, superior up, anterior on the left"}


def _plane(shape: tuple, options: dict) -> str:
    """``plane=`` when given; else axial, unless the volume is a thin stack acquired in another
    plane (a coronal or sagittal series of a few thick slices), which is shown in its own plane."""
    asked = options.get("plane")
    if asked is not None:
        if str(asked).lower() not in PLANES:
            raise ScanError("The plane must be axial, coronal or sagittal.")
        return str(asked).lower()
    for name, axis in (("coronal", 1), ("sagittal", 0)):
        others = [shape[a] for a in range(3) if a != axis]
        if shape[axis] < shape[2] and 2 * shape[axis] <= min(others):
            return name
    return "axial"


def _slice_2d(vol: np.ndarray, plane: str, k: int, zooms: tuple) -> np.ndarray:
    """Slice k of a RAS+ volume as radiologists view it (radiological convention, as DICOM
    viewers and the training JPEGs show it): axial with anterior up, coronal and sagittal with
    superior up; patient's right on the viewer's left; anterior on the left in sagittal views.
    Anisotropic pixels are made square."""
    axis = PLANES[plane]
    # Basic indexing (a view) and one copy: np.take gathered across the whole volume, 90 ms a
    # slice. A copy always, even of a 1 x 1 slice: the cached volume is read-only and shared.
    s = np.array(vol[(slice(None),) * axis + (k,)].T[::-1, ::-1], dtype=np.float32, order="C", copy=True)
    z_col, z_row = (abs(zooms[a]) or 1.0 for a in range(3) if a != axis)
    if abs(z_col / z_row - 1.0) > 0.01:  # stretch the coarser axis
        h, w = s.shape
        scale = 1.0 / min(z_col, z_row)
        h2, w2 = round(h * z_row * scale), round(w * z_col * scale)
        f = min(1.0, MAX_SIDE / max(h2, w2))
        s = _resize(s, max(1, round(h2 * f)), max(1, round(w2 * f)))
    return s


# The last volume read, decoded: moving the app's slice slider, or reading the slice that
# --best-slice chose, re-reads one file many times, and each read decompressed, reoriented and
# windowed the whole volume (0.6-0.9 s for 256 x 256 x 155). One entry, at most 64 MiB.
_LAST_VOLUME: dict = {}
_LAST_VOLUME_LOCK = threading.Lock()
LAST_VOLUME_BYTES = 64 * 2**20


def _decoded_volume(data: bytes, options: dict) -> tuple[np.ndarray, tuple, dict]:
    key = (hashlib.sha1(data).digest(), len(data), options.get("volume"))
    with _LAST_VOLUME_LOCK:
        hit = _LAST_VOLUME.get(key)
    if hit is None:
        # Odd headers (zero pixdim) and out-of-range values make nibabel and numpy warn on stderr,
        # in the middle of the CLI's JSON lines; what matters reaches the user as a ScanError or info.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hit = _nifti_volume(data, options)
        hit[0].flags.writeable = False  # shared by every later read: slices are copies
        with _LAST_VOLUME_LOCK:
            _LAST_VOLUME.clear()
            if hit[0].nbytes <= LAST_VOLUME_BYTES:
                _LAST_VOLUME[key] = hit
    vol, zooms, info = hit
    return vol, zooms, copy.deepcopy(info)  # its lists too: a caller's edit must not reach the cache


def _nifti_slices(data: bytes, options: dict) -> tuple[np.ndarray, str, tuple, dict]:
    vol, zooms, info = _decoded_volume(data, options)
    plane = _plane(vol.shape, options)
    display = PLANE_DISPLAY[plane] if info["orientation"] != NO_GEOMETRY else \
        f"{plane} assumed (the file stores no orientation), in stored image order"
    info |= {"plane": plane, "n_slices": int(vol.shape[PLANES[plane]]), "display": display}
    return vol, plane, zooms, info


# The shares of the volume last asked about, per plane: every slider move re-reads one cached volume,
# and thresholding all of it again took 10-30 ms a read. A weak reference, so that a volume too
# large for `_LAST_VOLUME` is not kept alive by this.
_SHARES_OF: list = [lambda: None, {}]


def _head_shares(vol: np.ndarray, plane: str) -> np.ndarray:
    """Each slice's lit share over the volume's widest: how far it lies from an end of the head
    (`inference.end_slice_note` reads it). From the windowed volume, before any resampling."""
    with _LAST_VOLUME_LOCK:
        ref, by_plane = _SHARES_OF
        if ref() is vol and plane in by_plane:
            return by_plane[plane]
    axis = PLANES[plane]
    shares = _over_widest((vol > LIT_LEVEL).mean(axis=tuple(a for a in range(vol.ndim) if a != axis)))
    shares.flags.writeable = False
    with _LAST_VOLUME_LOCK:
        if _SHARES_OF[0]() is not vol:
            _SHARES_OF[:] = [weakref.ref(vol), {}]
        _SHARES_OF[1][plane] = shares
    return shares


def _over_widest(lit: np.ndarray) -> np.ndarray:
    """Each slice's lit share over the largest of them (all 0 when nothing is lit), as head_share."""
    top = float(lit.max()) if lit.size else 0.0
    return np.round(lit / top, 4) if top > 0 else np.zeros_like(lit)


def _read_nifti(data: bytes, options: dict) -> ScanImage:
    vol, plane, zooms, info = _nifti_slices(data, options)
    n = info["n_slices"]
    k = _frame_index(options, n, n // 2, "slice")
    grey = _slice_2d(vol, plane, k, zooms)
    _check_size(grey.shape[1], grey.shape[0])
    info |= {"slice_index": k, "head_share": float(_head_shares(vol, plane)[k])} | _blank(grey)
    return ScanImage(grey, 0.0, "nifti", info)


# ----------------------------------------------------------------------------- public API
def _image_signature(data: bytes) -> str | None:
    """The image format a file's first bytes announce (PNG, GIF), else None. Not JPEG: a JPEG-LS
    or lossless JPEG starts alike and is no damaged JPEG, only one Pillow does not read."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    return "GIF" if data[:6] in (b"GIF87a", b"GIF89a") else None


def _dispatch_error(data: bytes, name: str) -> ScanError:
    """The sentence for content nobody could read."""
    kind = sniff(data)
    if kind == "zip":
        return ScanError("The file is a zip archive, not a single scan: unzip it first.")
    if kind == "pdf":
        return ScanError("The file is a PDF document; please upload the scan itself "
                         f"({SUPPORTED}).")
    if _is_tar(data):
        return ScanError(TAR_REFUSED)
    if looks_like_text(data):
        return ScanError("The file contains text (for example a web page), not an image or scan.")
    if data[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):   # a TIFF (or BigTIFF) Pillow cannot decode
        return ScanError("The file is a TIFF whose pixel type or layout cannot be read (64-bit floating "
                         "point, say); save it as 8- or 16-bit grey, or 32-bit floating point.")
    if (kind := _image_signature(data)):   # a PNG whose header fails its checksum: damaged, not unsupported
        return ScanError(f"The file is a {kind} image that is damaged and cannot be read.")
    ext = "".join(ch for ch in _suffix(name) if ch.isprintable())[:16]   # a name's control characters stay out
    if ext:
        return ScanError(f"The file's name ends in '{ext}' but its content is not a supported "
                         f"scan ({SUPPORTED}).")
    return ScanError(f"The file is not a supported scan ({SUPPORTED}).")


def read_scan(src: str | Path | bytes, name: str | None = None, **options) -> ScanImage:
    """Read a path, bytes or file-like object into a `ScanImage`; raise `ScanError` otherwise.

    Options: ``frame`` (DICOM multi-frame, GIF, TIFF; default the middle DICOM frame, else 0),
    ``slice_index`` (NIfTI slice, default the middle one; a synonym of ``frame`` elsewhere, and
    ``slice`` is accepted too), ``plane`` (NIfTI: axial, coronal or sagittal; default axial, or
    the acquisition plane of a thin coronal/sagittal stack), ``volume`` (4D NIfTI, default 0).
    """
    name = _source_name(src, name)
    data = load_bytes(src)
    kind = sniff(data)
    if kind == "dicom":
        return _read_dicom(data, options)
    if kind in ("gzip", "nifti"):
        return _read_nifti(data, options)
    if kind in ("zip", "pdf"):
        raise _dispatch_error(data, name)
    try:
        return _read_image(data, options)
    except _NotAnImage:
        pass
    if _suffix(name) in (".dcm", ".dicom") or _looks_like_raw_dicom(data):
        return _read_dicom(data, options)
    raise _dispatch_error(data, name)


def read_volume(src: str | Path | bytes, name: str | None = None,
                **options) -> tuple[list[np.ndarray], str, dict]:
    """Every slice of a scan: NIfTI axial slices, DICOM frames, pages of a TIFF/GIF stack, or the
    one image; with kind and info. Slices come out exactly as `read_scan` gives them one at a
    time (same window)."""
    scans, kind, info = read_volume_scans(src, name, **options)
    return [s.pixels for s in scans], kind, info


def read_volume_scans(src: str | Path | bytes, name: str | None = None,
                      **options) -> tuple[list[ScanImage], str, dict]:
    """`read_volume` with each slice as the ScanImage `read_scan` would give for it: a NIfTI
    slice or DICOM frame with the volume's info and its own blank flag, a page with its own
    colour and flags. The index of each slice is the caller's to add."""
    name = _source_name(src, name)
    data = load_bytes(src)
    kind = sniff(data)
    if kind in ("gzip", "nifti"):
        vol, plane, zooms, info = _nifti_slices(data, options)
        _check_slice_count(info["n_slices"])
        slices = [_slice_2d(vol, plane, k, zooms) for k in range(info["n_slices"])]
        if slices:   # as read_scan refuses a slice of this size (a thin stack seen from the side)
            _check_size(slices[0].shape[1], slices[0].shape[0])
        shares = _head_shares(vol, plane)
        return [ScanImage(g, 0.0, "nifti", info | {"head_share": float(h)} | _blank(g))
                for g, h in zip(slices, shares)], "nifti", info
    if kind == "dicom" or (kind == "other" and (_suffix(name) in (".dcm", ".dicom")
                                                or _looks_like_raw_dicom(data))):
        try:
            frames, info = _dicom_frames(data)
            volume_info = {k: v for k, v in info.items() if k != "body_part_of_frame"}   # each frame says its own
            return _with_head_shares([ScanImage(g, c, "dicom", volume_info | part | _blank(g))
                                      for g, c, part in frames]), "dicom", info
        except ScanError:
            if kind == "dicom":
                raise
    pages = read_image_pages(data, name, **options)  # a multi-page TIFF or GIF is a stack
    stack_info = {k: v for k, v in pages[0].info.items() if k != "colour_marks"}   # each page has its own
    return (_with_head_shares(pages) if len(pages) > 1 else pages), pages[0].kind, stack_info


def _check_slice_count(n: int) -> None:
    """A volume of more than MAX_SLICES slices is not read whole (see there)."""
    if n > MAX_SLICES:
        raise ScanError(f"The volume has too many slices to read at once ({n}; at most {MAX_SLICES}).")


def _with_head_shares(scans: list[ScanImage]) -> list[ScanImage]:
    """DICOM frames or stack pages, each with its head_share from its own lit share (frames are
    windowed alike; pages one by one, so there it is a rough guide). A NIfTI slice gets it from
    the volume (`_head_shares`); a frame read alone gets none."""
    shares = _over_widest(np.array([lit_share(s.pixels) for s in scans]))
    return [dataclasses.replace(s, info={**s.info, "head_share": float(h)}) for s, h in zip(scans, shares)]


def read_image_pages(src: str | Path | bytes, name: str | None = None, **options) -> list[ScanImage]:
    """Every page of a multi-page TIFF or GIF, each exactly as ``read_scan(frame=k)`` gives it
    (its own colour and blank flag), in one forward pass over the file: reading page k afresh
    would decode pages 0..k again each time. Any other image gives ``[read_scan(...)]``."""
    name = _source_name(src, name)
    data = load_bytes(src)
    first = read_scan(data, name, **options)
    counted = first.info.get("n_frames", 1)   # None: a large GIF, whose frames are counted here
    n = MAX_SLICES if counted is None else int(counted or 1)
    if first.kind != "image" or n <= 1 or any(options.get(k) is not None for k in ("frame", "slice", "slice_index")):
        return [first]
    if counted is not None and (n > MAX_SLICES or first.info["width"] * first.info["height"] * n > MAX_VOXELS):
        raise ScanError(f"The image has too many pages to read at once ({n}).")
    pages = [first]
    try:
        with Image.open(io.BytesIO(data), formats=_image_formats()) as img:
            for k in range(1, n):
                if counted is None:
                    try:
                        img.seek(k)
                    except EOFError:  # the last frame was read
                        break
                    if first.info["width"] * first.info["height"] * (k + 1) > MAX_VOXELS:
                        raise ScanError(f"The image has too many pages to read at once (over {k}).")
                else:
                    img.seek(k)
                info = {"format": first.info.get("format"), "frame": k, "n_frames": n}
                try:
                    _check_page(img, info)
                except ScanError as e:
                    raise ScanError(f"Page {k + 1} of the image: {e}") from None
                _load(img)
                grey, colour, extra = _decode_loaded(img, info)
                pages.append(ScanImage(grey, colour, "image", info | extra | _blank(grey)))
    except ScanError:
        raise
    except MemoryError:
        raise ScanError("The image is too large to process.") from None
    except Exception as e:  # a page past the first that does not decode
        raise ScanError(f"Page {len(pages)} of the image is damaged and cannot be decoded.") from e
    if counted is None:
        for page in pages:
            page.info["n_frames"] = len(pages)
    return pages


def read_volume_slices(src: str | Path | bytes, name: str | None = None, **options) -> list[np.ndarray]:
    """Grey [0, 1] slices of a volume (NIfTI axial slices, DICOM frames); [image] for a 2D file."""
    return read_volume(src, name, **options)[0]


LIT_LEVEL = 0.1   # a tenth of the window: above it a pixel holds signal, below it is background


def lit_share(grey: np.ndarray) -> float:
    """The share of a slice's pixels above `LIT_LEVEL`: how much of it is head."""
    return float((grey > LIT_LEVEL).mean())


# A plain band across the whole image, between two lit parts of comparable size, splits a viewer's
# layout or a montage (`panel_divider`). Over the 11,314 shared scans none qualifies; 96-100 % of
# 2 x 2 layouts of their test scans do, as PNG or JPEG (docs/generalisation.md, "Marks drawn in
# colour, and several slices in one image").
PANEL_FLAT = 0.02      # the band's standard deviation, over the image's 99th percentile
PANEL_LIT = 0.2        # lit: above this share of the 99th percentile (the head, not background noise)
PANEL_SIDE = 0.05      # each side holds at least this share of the image lit ...
PANEL_BALANCE = 0.2    # ... and at least this share of the other side's lit area
PANEL_MIN_BAND = 64    # a band shorter than this (px, shrunk to <= 256) is a line through tissue


def panel_divider(grey: np.ndarray) -> tuple[str, float] | None:
    """("row" or "column", its place as a share of the height or width) of the first plain band in
    the middle half of the image with comparable lit parts on both sides; None for one slice.

    Plain lines count for neither side, so a slice padded with grey or white is one slice. Rows are
    judged on every row (columns sampled), columns on every column: a 1 px gutter is not skipped."""
    step = max(1, max(grey.shape) // 256)
    hi = float(np.percentile(grey[::step, ::step], 99))
    if hi <= 1e-3:
        return None
    for name, a in (("row", grey[:, ::step]), ("column", grey[::step, :].T)):
        n = a.shape[0]
        if a.shape[1] < PANEL_MIN_BAND:
            continue
        plain = a.std(axis=1) < PANEL_FLAT * hi
        lit = (a > PANEL_LIT * hi).sum(axis=1) * ~plain
        before = np.cumsum(lit)
        after = before[-1] - before
        side = np.minimum(before, after)
        ok = plain & (side > PANEL_SIDE * a.size) & (side >= PANEL_BALANCE * np.maximum(before, after))
        ok[:n // 4] = ok[3 * n // 4:] = False
        if ok.any():
            return name, round(int(np.argmax(ok)) / n, 3)
    return None


def is_empty_slice(grey: np.ndarray) -> bool:
    """True for slices with (almost) no signal: the ends of a volume, padding frames. --best-slice
    skips them; a model without an out-of-distribution gate refuses them (`Predictor`)."""
    return float(grey.max()) - float(grey.min()) < 0.05 or lit_share(grey) < 0.02


def read_zip(data: bytes, *args, **kw):
    """The scans in a zip as (member_name, bytes); see `core.archive.read_zip`."""
    from .archive import read_zip as _read_zip  # imported here: archive imports this module
    return _read_zip(data, *args, **kw)


def zip_to_labelled(data: bytes, *args, **kw):
    """A class-per-folder zip as (class_folder, member_name, bytes); see `core.archive`."""
    from .archive import zip_to_labelled as _zip_to_labelled
    return _zip_to_labelled(data, *args, **kw)
