"""A brain MRI slice as a clinician may upload it: a capture of a viewer's screen, not the file.

Used by `bench/shift_eval.py` (``--perturbations`` names them; none runs by default):

    python bench/shift_eval.py --weights weights/resnet18_192_gpu_ema120_s2 --sources benchmark br35h lgg brisc \
        --perturbations none "viewer frame" "burned-in text" "annotation marks" "2x2 panels" "screen photo" "viewer window"

Each capture is drawn on the decoded grey slice, seeded per image, with PIL's own font (so the text
is the same on every machine). None of these looks was drawn or trained on before this file was
written: the default's training augmentation has no text, frames or panels (`train.py --marks-p`
came after, and is off by default), and the gate's outlier kinds
hold screenshots and text pages but no brain slice inside a viewer. What a served capture should
do: a single slice with text around it is still that slice (right call, or a flag); a capture of
several panels or a whole window is not one slice, so a flag is the right answer, and a silent
call on it is the model reading something it was never shown.
"""
from __future__ import annotations

import io
from typing import Callable

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from core.reader import ScanImage, read_scan

# A capture returns the grey image, or, when it draws in colour, the scan read back from the
# colour file it would be uploaded as.
Capture = Callable[[np.ndarray, np.random.Generator], "np.ndarray | ScanImage"]

# What a DICOM viewer prints in the corners of a slice (invented values; no real patient).
CORNERS = (("ANON^PATIENT", "ID 0000000", "1970-01-01 F"),
           ("MR BRAIN W/WO", "Se: 5  Im: 14/24", "AX T1 +C"),
           ("W: 620  L: 310", "TR 450  TE 12", "ST 5.0 mm"),
           ("Zoom 1.00", "HFS", "2026-12-06 10:41"))


# Grey [0, 1] arrays to and from 8-bit PIL images (also shift_eval's JPEG, resampling and blur).
def to_pil(a: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8))


def to_array(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def encoded(im: Image.Image, save: str = "png") -> bytes:
    """``im`` as the file bytes an upload would carry: "png", or "jpeg Q" at quality Q."""
    buf = io.BytesIO()
    if save == "png":
        im.save(buf, "PNG")
    else:
        im.save(buf, "JPEG", quality=int(save.split()[1]))
    return buf.getvalue()


def jpeg(im: Image.Image, quality: int) -> np.ndarray:
    """``im`` saved as a JPEG and read back: the file's compression, as an upload would carry it."""
    return to_array(Image.open(io.BytesIO(encoded(im, f"jpeg {quality}"))))


def _font(px: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, px))


def _corner_text(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], size: int, grey: int = 235) -> None:
    """The four corners' lines of `CORNERS` inside ``box`` (x0, y0, x1, y1), and the orientation
    letters at the middle of each edge."""
    x0, y0, x1, y1 = box
    font, pad, step = _font(size), max(2, size // 3), int(size * 1.25)
    for k, lines in enumerate(CORNERS):
        right, bottom = k in (1, 3), k in (2, 3)
        for i, line in enumerate(lines):
            w = draw.textlength(line, font=font)
            x = x1 - pad - w if right else x0 + pad
            y = (y1 - pad - step * (len(lines) - i)) if bottom else y0 + pad + step * i
            draw.text((x, y), line, fill=grey, font=font)
    for letter, (x, y) in (("A", ((x0 + x1) // 2, y0 + pad)), ("P", ((x0 + x1) // 2, y1 - pad - size)),
                           ("R", (x0 + pad, (y0 + y1) // 2)), ("L", (x1 - pad - size // 2, (y0 + y1) // 2))):
        draw.text((x, y), letter, fill=grey, font=font)


def viewer_frame(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The slice centred in a wider black viewport, the corner text and a scale bar around it."""
    h, w = a.shape
    H, W = int(h * rng.uniform(1.2, 1.35)), int(w * rng.uniform(1.5, 1.8))
    canvas = Image.new("L", (W, H), 0)
    top, left = (H - h) // 2, (W - w) // 2
    canvas.paste(to_pil(a), (left, top))
    draw = ImageDraw.Draw(canvas)
    _corner_text(draw, (0, 0, W, H), h // 26)
    bar_x, ticks = W - max(6, W // 40), np.linspace(top + h * 0.3, top + h * 0.7, 6)
    draw.line([(bar_x, ticks[0]), (bar_x, ticks[-1])], fill=220, width=2)
    for t in ticks:
        draw.line([(bar_x - 5, t), (bar_x, t)], fill=220, width=1)
    return to_array(canvas)


def burned_in_text(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The corner text written into the slice itself, as a screen capture of a tight viewport (or
    a DICOM with burned-in annotations) has it."""
    im = to_pil(a)
    _corner_text(ImageDraw.Draw(im), (0, 0, *im.size), max(9, im.size[1] // 30))
    return to_array(im)


def _annotate(im: Image.Image, a: np.ndarray, rng: np.random.Generator, fill: int | tuple[int, int, int]) -> None:
    """A reader's marks on the slice: a measured line with its length, an elliptic region with its
    statistics and an arrow, placed at random inside the lit part of the slice (not at the lesion,
    which the bench does not know)."""
    (h, w) = a.shape
    draw, font = ImageDraw.Draw(im), _font(max(9, h // 32))
    ys, xs = np.nonzero(a > 0.1)
    if len(xs) == 0:
        ys, xs = np.array([h // 2]), np.array([w // 2])

    def point() -> tuple[float, float]:
        i = int(rng.integers(len(xs)))
        return float(xs[i]), float(ys[i])
    (x0, y0), (x1, y1) = point(), point()
    draw.line([(x0, y0), (x1, y1)], fill=fill, width=2)
    draw.text((x1 + 4, y1), f"{np.hypot(x1 - x0, y1 - y0) * 0.45:.1f} mm", fill=fill, font=font)
    cx, cy = point()
    r = max(6, min(h, w) // 14)
    draw.ellipse([cx - r, cy - r * 0.7, cx + r, cy + r * 0.7], outline=fill, width=2)
    draw.text((cx - r, cy + r), "ROI 1: mean 412, SD 37, 1.2 cm2", fill=fill, font=font)
    ax, ay = point()
    draw.line([(ax, ay), (ax + r, ay - r)], fill=fill, width=3)
    draw.polygon([(ax, ay), (ax + r * 0.45, ay - r * 0.1), (ax + r * 0.1, ay - r * 0.45)], fill=fill)


def annotation_marks(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`_annotate`'s marks in white."""
    im = to_pil(a)
    _annotate(im, a, rng, 255)
    return to_array(im)


def annotation_marks_yellow(a: np.ndarray, rng: np.random.Generator) -> ScanImage:
    """The same marks in yellow, as many viewers draw them, saved as a PNG and read back as an
    upload is (`core.reader`): the grey image, its colourfulness and the share of the head's core
    in strong colour, which `core.inference.marks_reason` refuses above its limit."""
    im = to_pil(a).convert("RGB")
    _annotate(im, a, rng, (255, 255, 0))
    return read_scan(encoded(im), "marked.png")


def panels_2x2(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Four windowings of the slice in a 2 x 2 layout with grey gutters, as a viewer shows a
    slice beside its other sequences: several images in one capture, not one slice."""
    h, w = a.shape
    looks = [a, np.clip(a, 0, 1) ** 0.6, np.clip(a, 0, 1) ** 1.7, np.clip((a - 0.1) * 1.6, 0, 1)]
    gap = max(2, w // 60)
    out = np.full((2 * h + gap, 2 * w + gap), 0.35, np.float32)
    for k, look in enumerate(looks):
        r, c = divmod(k, 2)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = look
    return out


def screen_photo(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A phone photo of the slice on a monitor: a dark bezel around a glowing screen, the view
    a little askew (perspective), the screen's black lifted, moire stripes, blur, sensor noise,
    uneven light, and the phone's JPEG."""
    h, w = a.shape
    screen = 0.06 + 0.86 * np.clip(a, 0, 1)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle, period = rng.uniform(0, np.pi), rng.uniform(3.0, 6.0)
    screen = screen + 0.03 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    bezel = int(0.12 * max(h, w))
    out = np.full((h + 2 * bezel, w + 2 * bezel), 0.02, np.float32)
    out[bezel:bezel + h, bezel:bezel + w] = screen
    H, W = out.shape
    jitter = lambda: int(rng.integers(-int(0.06 * W), int(0.06 * W) + 1))  # noqa: E731
    corners = [[0, 0], [W - 1, 0], [W - 1, H - 1], [0, H - 1]]
    moved = [[x + jitter(), y + jitter()] for x, y in corners]
    out = F.perspective(torch.from_numpy(out)[None], corners, moved, fill=0.02)[0].numpy()
    gy, gx = np.mgrid[0:H, 0:W].astype(np.float32)
    light = 1.0 - 0.25 * (((gx - W * rng.uniform(0.3, 0.7)) / W) ** 2 + ((gy - H * rng.uniform(0.3, 0.7)) / H) ** 2)
    out = np.clip(out * light + rng.normal(0, 0.02, out.shape), 0, 1)
    return jpeg(to_pil(out).filter(ImageFilter.GaussianBlur(float(rng.uniform(0.8, 1.5)))), 80)


def viewer_window(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A whole viewer window: a menu bar, a toolbar of icons, a column of series thumbnails and
    the slice in the main viewport with its corner text: a screenshot of the screen, not of the slice."""
    h, w = a.shape
    side, bar = max(40, w // 4), max(24, h // 9)
    W, H = w + side + 3 * bar, h + 2 * bar
    canvas = Image.new("L", (W, H), 45)
    draw, font = ImageDraw.Draw(canvas), _font(max(9, bar // 3))
    draw.rectangle([0, 0, W, bar // 2], fill=200)
    draw.text((6, 1), "File  Edit  View  Series  Tools  Help", fill=20, font=font)
    for i in range(10):
        x = side + i * (bar + 4) + 6
        draw.rectangle([x, bar // 2 + 3, x + bar - 6, bar - 3], outline=170, width=1)
    thumb = to_pil(a).resize((side - 10, max(8, (side - 10) * h // w)))
    for i in range(3):
        y = bar + 6 + i * (thumb.size[1] + font.size * 2)
        canvas.paste(thumb, (5, y))
        draw.text((5, y + thumb.size[1] + 2), f"Se {i + 3}: AX {('T1', 'T2', 'FLAIR')[i]}", fill=210, font=font)
    view = Image.new("L", (w + 2 * bar, h), 0)
    view.paste(to_pil(a), (bar, 0))
    _corner_text(ImageDraw.Draw(view), (0, 0, *view.size), max(9, h // 30))
    canvas.paste(view, (side + bar // 2, bar + bar // 2))
    return to_array(canvas)


CAPTURES: dict[str, Capture] = {
    "viewer frame": viewer_frame,
    "burned-in text": burned_in_text,
    "annotation marks": annotation_marks,
    "annotation marks yellow": annotation_marks_yellow,
    "2x2 panels": panels_2x2,
    "screen photo": screen_photo,
    "viewer window": viewer_window,
}
