"""Images that are not brain MRI slices, for training and for honestly testing the OOD gate.

Every generator draws one image from a category with a seeded ``numpy.random.Generator`` and
returns a PIL image (grey or colour, random size). `make_scans` encodes it to PNG or JPEG and
reads it back through `read_scan`, so the gate sees exactly what the app would see.

Categories come in three groups: a comparison gate trains on ``SEEN`` and is measured on
``UNSEEN`` (kinds of image nobody showed it); the shipped gate trains on both, its held-out
rates coming from category folds (`core.ood.category_folds`); ``TEST_ONLY`` (real images) never
trains any gate. Natural photos are split
by *image* as well: training crops come from one set of photos, test crops from another.
Only images stored inside installed packages are used (skimage, sklearn, matplotlib sample
data, pydicom's test files and, when Debian's ``invesalius-examples`` is installed, its real head CT);
nothing is downloaded.
"""
from __future__ import annotations

import io
import math
import os
import plistlib
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from scipy import ndimage

from .preprocess import head_bbox
from .reader import ScanError, ScanImage, read_scan

Rng = np.random.Generator

WORDS = ("patient scan report the of and to in is for with on image result normal value total "
         "data model click save open file edit view help settings account login password user "
         "tumour brain analysis table figure chart mean median error loss accuracy price order "
         "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor").split()


# ----------------------------------------------------------------------------- helpers
def _size(rng: Rng, lo: int = 128, hi: int = 448) -> tuple[int, int]:
    """(width, height) with a random aspect ratio: uploads are rarely square."""
    s = int(rng.integers(lo, hi))
    a = float(np.exp(rng.uniform(-0.4, 0.4)))
    return max(32, int(s * a)), max(32, int(s / a))


def _colour(rng: Rng, grey: bool | None = None) -> tuple[int, int, int]:
    if grey if grey is not None else rng.random() < 0.5:
        v = int(rng.integers(0, 256))
        return v, v, v
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _from_float(a: np.ndarray) -> Image.Image:
    a = np.clip(a, 0, 1)
    return Image.fromarray((a * 255).round().astype(np.uint8))


@lru_cache(maxsize=None)
def _fonts() -> tuple[str, ...]:
    """TrueType fonts that matplotlib ships (always installed here)."""
    import matplotlib
    d = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    # DejaVu*Display has no Latin letters: text in it drew nothing (7 % of `text` images blank)
    return tuple(sorted(str(p) for p in d.glob("*.ttf") if p.name.startswith(("DejaVu", "cm", "STIXGeneral"))
                        and "Display" not in p.name))


def _font(rng: Rng, size: int) -> ImageFont.FreeTypeFont:
    fonts = _fonts()
    return ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], max(6, size))


def _sentence(rng: Rng, n: int) -> str:
    return " ".join(WORDS[int(i)] for i in rng.integers(0, len(WORDS), n))


def _smooth_noise(rng: Rng, h: int, w: int, sigma: float) -> np.ndarray:
    a = ndimage.gaussian_filter(rng.standard_normal((h, w)), sigma)
    return (a - a.min()) / max(float(np.ptp(a)), 1e-6)


# ----------------------------------------------------------------------------- seen kinds
def blank(rng: Rng) -> Image.Image:
    """A nearly uniform image (the reader refuses exactly uniform ones): faint noise or a border."""
    w, h = _size(rng)
    a = np.asarray(Image.new("RGB", (w, h), _colour(rng)), np.float32) / 255
    if rng.random() < 0.5:
        a = a + rng.normal(0, rng.uniform(0.002, 0.02), (h, w, 1))
    else:
        b = int(rng.integers(1, 6))
        a[:b], a[-b:], a[:, :b], a[:, -b:] = (float(rng.random()),) * 4
    return _from_float(a)


def noise(rng: Rng) -> Image.Image:
    w, h = _size(rng)
    kind = rng.integers(5)
    ch = 3 if rng.random() < 0.4 else 1
    shape = (h, w, ch) if ch == 3 else (h, w)
    if kind == 0:
        a = rng.random(shape)
    elif kind == 1:
        a = rng.normal(rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3), shape)
    elif kind == 2:  # salt and pepper on a flat background
        a = np.full(shape, rng.uniform(0, 1))
        m = rng.random(shape[:2]) < rng.uniform(0.02, 0.3)
        a[m] = rng.integers(0, 2, int(m.sum()))[:, None] if ch == 3 else rng.integers(0, 2, int(m.sum()))
    elif kind == 3:  # smooth blobs: cloud-like noise at a random scale
        a = _smooth_noise(rng, h, w, rng.uniform(1, 12))
        if rng.random() < 0.5:
            a = a ** rng.uniform(0.5, 3)
    else:  # noise at several scales, thresholded into blobs
        a = _smooth_noise(rng, h, w, rng.uniform(2, 8))
        a = (a > rng.uniform(0.4, 0.7)).astype(float) * rng.uniform(0.3, 1)
    return _from_float(a)


def gradient(rng: Rng) -> Image.Image:
    w, h = _size(rng)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    if rng.random() < 0.5:
        t = rng.uniform(0, 2 * math.pi)
        a = xx * math.cos(t) + yy * math.sin(t)
    else:  # radial, sometimes a bright disc on black (a crude "head" to teach texture matters)
        cy, cx = rng.uniform(0.2, 0.8, 2) * (h / max(h, w), w / max(h, w))
        a = -np.hypot(yy - cy, xx - cx)
    a = (a - a.min()) / max(float(np.ptp(a)), 1e-6)
    if rng.random() < 0.5:
        a = a ** rng.uniform(0.3, 3)
    if rng.random() < 0.4:
        c0, c1 = np.array(_colour(rng, False)) / 255, np.array(_colour(rng, False)) / 255
        return _from_float(a[..., None] * c1 + (1 - a[..., None]) * c0)
    return _from_float(a)


def shapes(rng: Rng) -> Image.Image:
    w, h = _size(rng)
    grey = rng.random() < 0.5
    img = Image.new("RGB", (w, h), _colour(rng, grey))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 16))):
        x0, y0 = rng.integers(-w // 4, w), rng.integers(-h // 4, h)
        sw, sh = rng.integers(8, max(w, h)), rng.integers(8, max(w, h))
        box = [int(x0), int(y0), int(x0 + sw), int(y0 + sh)]
        fill, line = _colour(rng, grey), int(rng.integers(1, 6))
        k = rng.integers(4)
        if k == 0:
            d.ellipse(box, fill=fill if rng.random() < 0.7 else None, outline=_colour(rng, grey), width=line)
        elif k == 1:
            d.rectangle(box, fill=fill if rng.random() < 0.7 else None, outline=_colour(rng, grey), width=line)
        elif k == 2:
            pts = [(int(x), int(y)) for x, y in zip(rng.integers(0, w, 5), rng.integers(0, h, 5))]
            d.polygon(pts[: int(rng.integers(3, 6))], fill=fill)
        else:
            d.line(box, fill=fill, width=int(rng.integers(1, 12)))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 4))))
    return img


def text(rng: Rng) -> Image.Image:
    """A page of rendered text: document, dark-mode note, or a few large words."""
    w, h = _size(rng, 160, 512)
    dark = rng.random() < 0.3
    bg = _colour(rng, True) if rng.random() < 0.3 else ((20, 20, 20) if dark else (250, 250, 250))
    fg = (230, 230, 230) if dark else (int(rng.integers(0, 80)),) * 3
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    size = int(rng.integers(8, 40))
    font = _font(rng, size)
    y = int(rng.integers(2, 20))
    while y < h:
        d.text((int(rng.integers(2, 20)), y), _sentence(rng, int(rng.integers(2, 14))), fill=fg, font=font)
        y += int(size * rng.uniform(1.1, 2.2))
    return img.rotate(float(rng.normal(0, 3)), fillcolor=bg) if rng.random() < 0.3 else img


def pattern(rng: Rng) -> Image.Image:
    """Checkerboards, stripes, grids, dot arrays and sine gratings."""
    w, h = _size(rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    p = rng.uniform(4, 64)
    t = rng.uniform(0, math.pi)
    u, v = xx * math.cos(t) + yy * math.sin(t), -xx * math.sin(t) + yy * math.cos(t)
    k = rng.integers(4)
    if k == 0:
        a = ((np.floor(u / p) + np.floor(v / p)) % 2).astype(float)
    elif k == 1:
        a = (np.floor(u / p) % 2).astype(float)
    elif k == 2:
        a = (0.5 + 0.5 * np.sin(2 * math.pi * u / p) * np.sin(2 * math.pi * v / p * rng.uniform(0, 1.5)))
    else:
        a = ((np.hypot((u % p) - p / 2, (v % p) - p / 2) < p * rng.uniform(0.1, 0.45))).astype(float)
    lo, hi = sorted(rng.uniform(0, 1, 2))
    return _from_float(lo + (hi - lo) * a)


# ----------------------------------------------------------------------------- packaged images
def _skimage_dir() -> Path:
    import skimage
    return Path(skimage.__file__).parent / "data"


@lru_cache(maxsize=None)
def _packaged(name: str) -> np.ndarray:
    """A local image shipped inside a package, as uint8 (H, W) or (H, W, 3)."""
    import matplotlib
    if name.startswith("lfw"):  # skimage's 200 patches of 25 x 25: 100 faces (lfw_a, training),
        # then 100 patches of the photos' backgrounds, no faces (lfw_b, testing)
        faces = np.load(_skimage_dir() / "lfw_subset.npy")
        part = faces[:100] if name == "lfw_a" else faces[100:]
        return (np.concatenate(list(part.reshape(10, 10, 25, 25).transpose(0, 2, 1, 3)), 0)
                .reshape(250, 250) * 255).astype(np.uint8)
    if name in ("china.jpg", "flower.jpg"):
        import sklearn.datasets
        p = Path(sklearn.datasets.__file__).parent / "images" / name
    elif name == "grace_hopper.jpg":
        p = Path(matplotlib.get_data_path()) / "sample_data" / name
    elif name.endswith(".npz"):  # elevation maps
        z = np.load(Path(matplotlib.get_data_path()) / "sample_data" / name)
        e = z["topo"] if "topo" in z else z["elevation"]
        e = (e - e.min()) / max(float(np.ptp(e)), 1e-6)
        return (e * 255).astype(np.uint8)
    else:
        p = _skimage_dir() / name
    a = np.asarray(Image.open(p).convert("RGB" if _is_colour(p) else "L"))
    return a


def _is_colour(p: Path) -> bool:
    with Image.open(p) as im:
        return im.mode not in ("L", "I", "I;16", "F", "1", "LA")


def _view(rng: Rng, a: np.ndarray, min_scale: float = 0.25, grey_p: float = 0.5) -> Image.Image:
    """A random crop, rotation, flip, colour drop and resize of a packaged image."""
    img = Image.fromarray(a)
    W, H = img.size
    s = float(np.sqrt(rng.uniform(min_scale, 1)))
    cw, ch = max(16, int(W * s)), max(16, int(H * s))
    x0, y0 = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
    img = img.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        img = img.rotate(float(rng.choice([90, 180, 270, rng.uniform(-30, 30)])), expand=True)
    if rng.random() < grey_p:
        img = img.convert("L")
    w, h = _size(rng)
    return img.resize((w, h), Image.Resampling.BILINEAR)


PHOTOS_TRAIN = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "rocket.jpg", "horse.png",
                "coins.png", "moon.png", "brick.png", "grass.png", "gravel.png", "color.png", "lfw_a")
PHOTOS_TEST = ("china.jpg", "flower.jpg", "grace_hopper.jpg", "motorcycle_left.png",
               "hubble_deep_field.jpg", "clock_motion.png", "logo.png", "lfw_b")
MEDICAL_PHOTOS = ("ihc.png", "retina.jpg", "microaneurysms.png", "cell.png")


def photo(rng: Rng) -> Image.Image:
    return _view(rng, _packaged(PHOTOS_TRAIN[int(rng.integers(len(PHOTOS_TRAIN)))]))


def photo_unseen(rng: Rng) -> Image.Image:
    return _view(rng, _packaged(PHOTOS_TEST[int(rng.integers(len(PHOTOS_TEST)))]))


def medical_photo(rng: Rng) -> Image.Image:
    """Histology, retina fundus, microaneurysm and cell microscopy images (skimage's own)."""
    return _view(rng, _packaged(MEDICAL_PHOTOS[int(rng.integers(len(MEDICAL_PHOTOS)))]), 0.1, 0.4)


def scanned_document(rng: Rng) -> Image.Image:
    return _view(rng, _packaged(("page.png", "text.png")[int(rng.integers(2))]), 0.3, 1.0)


def elevation_map(rng: Rng) -> Image.Image:
    """Terrain elevation maps (matplotlib sample data), grey or through a colour map."""
    a = _packaged(("topobathy.npz", "jacksboro_fault_dem.npz")[int(rng.integers(2))])
    if rng.random() < 0.5:
        import matplotlib
        cmap = matplotlib.colormaps[str(rng.choice(["terrain", "viridis", "gist_earth", "magma"]))]
        a = (cmap(a / 255.0)[..., :3] * 255).astype(np.uint8)
    return _view(rng, a, 0.3, 0.0)


def shepp_logan(rng: Rng) -> Image.Image:
    """The Shepp-Logan head phantom (a CT test object): head-shaped but not a brain MRI."""
    return _view(rng, _packaged("phantom.png"), 0.6, 1.0)


# ----------------------------------------------------------------------------- unseen kinds
def chart(rng: Rng) -> Image.Image:
    """A matplotlib line, bar, scatter, pie, histogram, box or heat-map chart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    style = str(rng.choice(["default", "ggplot", "dark_background", "seaborn-v0_8", "bmh", "grayscale"]))
    w, h = _size(rng, 200, 480)
    with plt.style.context(style):
        fig = plt.figure(figsize=(w / 80, h / 80), dpi=80)
        ax = fig.add_subplot(111)
        k = int(rng.integers(7))
        x = np.arange(int(rng.integers(5, 60)))
        if k == 0:
            for _ in range(int(rng.integers(1, 4))):
                ax.plot(x, np.cumsum(rng.normal(0, 1, len(x))))
        elif k == 1:
            ax.bar(x[:12], rng.random(len(x[:12])))
        elif k == 2:
            ax.scatter(rng.normal(0, 1, 200), rng.normal(0, 1, 200), s=rng.uniform(2, 30), alpha=0.6)
        elif k == 3:
            ax.pie(rng.random(int(rng.integers(2, 7))), labels=None)
        elif k == 4:
            ax.hist(rng.normal(0, 1, 500), bins=int(rng.integers(8, 40)))
        elif k == 5:
            ax.boxplot([rng.normal(i, 1, 50) for i in range(int(rng.integers(2, 6)))])
        else:
            cmap = str(rng.choice(["gray", "viridis", "hot", "bone"]))
            ax.imshow(_smooth_noise(rng, 40, 40, rng.uniform(1, 5)), cmap=cmap)
        if rng.random() < 0.7:
            ax.set_title(_sentence(rng, 3)); ax.set_xlabel(_sentence(rng, 1)); ax.set_ylabel(_sentence(rng, 1))
        fig.canvas.draw()
        a = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        plt.close(fig)
    return Image.fromarray(a)


def screenshot(rng: Rng) -> Image.Image:
    """A user-interface mock-up: title bar, side menu, buttons, text and a picture panel."""
    w, h = _size(rng, 256, 512)
    dark = rng.random() < 0.4
    bg = (30, 30, 35) if dark else (245, 245, 245)
    fg = (220, 220, 220) if dark else (30, 30, 30)
    accent = _colour(rng, rng.random() < 0.3)
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    bar = int(rng.integers(16, 40))
    d.rectangle([0, 0, w, bar], fill=accent)
    f = _font(rng, int(rng.integers(9, 16)))
    d.text((8, bar // 4), _sentence(rng, 3), fill=(255, 255, 255), font=f)
    side = int(rng.integers(0, w // 3)) if rng.random() < 0.7 else 0
    if side:
        d.rectangle([0, bar, side, h], fill=tuple(max(0, c - 15) for c in bg))
        for i, y in enumerate(range(bar + 10, h, int(rng.integers(18, 32)))):
            d.text((8, y), _sentence(rng, 1), fill=fg, font=f)
    y = bar + 10
    while y < h - 20:
        k = rng.integers(4)
        x0 = side + 10
        if k == 0:  # a row of buttons
            for _ in range(int(rng.integers(1, 4))):
                bw = int(rng.integers(40, 100))
                d.rounded_rectangle([x0, y, x0 + bw, y + 22], 5, fill=accent)
                d.text((x0 + 6, y + 4), _sentence(rng, 1), fill=(255, 255, 255), font=f)
                x0 += bw + 10
            y += 32
        elif k == 1:  # an input box
            d.rectangle([x0, y, w - 10, y + 22], outline=fg, width=1)
            y += 32
        elif k == 2:  # a picture panel with something in it
            ph = int(rng.integers(40, max(41, h // 2)))
            panel = shapes(rng) if rng.random() < 0.5 else gradient(rng)
            img.paste(panel.resize((max(8, w - x0 - 10), ph)), (x0, y))
            y += ph + 10
        else:
            d.text((x0, y), _sentence(rng, int(rng.integers(3, 10))), fill=fg, font=f)
            y += 20
    return img


def _blur_field(a: np.ndarray, sigma: float) -> np.ndarray:
    return ndimage.gaussian_filter(a, sigma)


def chest_xray(rng: Rng) -> Image.Image:
    """A synthetic frontal chest radiograph: bright body, dark lungs, ribs, spine, heart."""
    H = int(rng.integers(256, 448)); W = int(H * rng.uniform(0.85, 1.15))
    yy, xx = np.mgrid[0:H, 0:W] / H
    cx = W / H / 2
    a = np.full((H, W), rng.uniform(0.02, 0.15))
    body = (np.abs(xx - cx) < 0.45 * (0.8 + 0.4 * yy)) & (yy > 0.05)
    a[body] = rng.uniform(0.55, 0.7)
    lungs = np.zeros_like(a)
    for side in (-1, 1):
        lx = cx + side * rng.uniform(0.16, 0.22)
        lungs += (((xx - lx) / rng.uniform(0.13, 0.17)) ** 2 + ((yy - 0.48) / rng.uniform(0.3, 0.36)) ** 2) < 1
    lungs = _blur_field(np.clip(lungs, 0, 1), 4)
    a = a - lungs * rng.uniform(0.3, 0.45) + lungs * 0.08 * _smooth_noise(rng, H, W, 2)
    heart = (((xx - cx - 0.06) / 0.14) ** 2 + ((yy - 0.62) / 0.13) ** 2) < 1
    a += _blur_field(heart.astype(float), 5) * 0.3
    spine = np.abs(xx - cx) < 0.035
    a += _blur_field(spine.astype(float), 2) * 0.25 * (0.8 + 0.2 * (np.sin(yy * 60) > 0))
    ribs = np.zeros_like(a)
    for side in (-1, 1):
        for k in range(10):
            y0 = 0.16 + 0.065 * k  # ribs arch up at the spine and fall towards the sides
            dx = (xx - cx) * side
            curve = y0 - 0.25 * dx + 1.6 * (dx - 0.15) ** 2 - 0.036
            ribs += (np.abs(yy - curve) < 0.008) & ((xx - cx) * side > 0.03) & ((xx - cx) * side < 0.4)
    a += _blur_field(ribs, 1.5) * rng.uniform(0.15, 0.3)
    clav = np.abs(yy - 0.14 - 0.15 * np.abs(xx - cx)) < 0.012
    a += _blur_field((clav & (np.abs(xx - cx) < 0.3)).astype(float), 1.5) * 0.3
    a = _blur_field(a, 1) + rng.normal(0, 0.02, a.shape)
    if rng.random() < 0.5:  # the side marker every radiograph carries
        img = _from_float(a)
        ImageDraw.Draw(img).text((int(W * 0.05), int(H * 0.05)), "L" if rng.random() < 0.5 else "R",
                                 fill=255, font=_font(rng, H // 12))
        return img
    return _from_float(a)


def abdominal_ct(rng: Rng) -> Image.Image:
    """A synthetic axial abdominal CT slice: body outline with fat, liver, kidneys, spine, gas."""
    S = int(rng.integers(256, 512))
    yy, xx = np.mgrid[0:S, 0:S] / S
    a = np.zeros((S, S))
    rx, ry = rng.uniform(0.38, 0.46), rng.uniform(0.26, 0.34)
    cy = 0.5

    def ell(x0, y0, ax, ay, ang=0.0):
        c, s = math.cos(ang), math.sin(ang)
        u, v = (xx - x0) * c + (yy - y0) * s, -(xx - x0) * s + (yy - y0) * c
        return (u / ax) ** 2 + (v / ay) ** 2 < 1
    a[ell(0.5, cy, rx, ry)] = 0.35                      # subcutaneous fat
    a[ell(0.5, cy, rx * 0.9, ry * 0.87)] = 0.5          # muscle wall and organs
    a[ell(0.5 - rx * 0.45, cy - ry * 0.2, rx * 0.42, ry * 0.55, rng.uniform(-0.4, 0.4))] = 0.58  # liver
    a[ell(0.5 + rx * 0.6, cy - ry * 0.25, rx * 0.18, ry * 0.25)] = 0.56  # spleen
    for side in (-1, 1):                                 # kidneys with bright cortex
        k = ell(0.5 + side * rx * 0.35, cy + ry * 0.35, rx * 0.12, ry * 0.22, side * 0.5)
        a[k] = 0.7
        a[ell(0.5 + side * rx * 0.35, cy + ry * 0.35, rx * 0.06, ry * 0.1, side * 0.5)] = 0.45
    a[ell(0.5, cy + ry * 0.55, rx * 0.11, ry * 0.22)] = 0.92   # vertebral body
    a[ell(0.5, cy + ry * 0.72, rx * 0.04, ry * 0.06)] = 0.3    # spinal canal
    a[ell(0.5 - rx * 0.05, cy + ry * 0.2, rx * 0.04, ry * 0.06)] = 0.8  # aorta with contrast
    for _ in range(int(rng.integers(3, 12))):            # bowel: gas pockets and loops
        bx, by = 0.5 + rng.uniform(-0.5, 0.5) * rx, cy + rng.uniform(-0.6, 0.3) * ry
        a[ell(bx, by, rng.uniform(0.01, 0.05), rng.uniform(0.01, 0.04))] = rng.choice([0.0, 0.62])
    a[(np.abs(yy - (cy + ry + 0.06)) < 0.008) & (np.abs(xx - 0.5) < 0.45)] = 0.6  # CT table
    a = a + 0.05 * _smooth_noise(rng, S, S, 1.5) * (a > 0.1)
    a = _blur_field(a, 0.8) + rng.normal(0, 0.015, a.shape)
    return _from_float(a)


def ultrasound(rng: Rng) -> Image.Image:
    """A synthetic ultrasound frame: speckled fan (sector) or linear field on black, with echoes
    and the scanner's text and scale bar around it."""
    H = int(rng.integers(240, 480)); W = int(H * rng.uniform(1.1, 1.6))
    yy, xx = np.mgrid[0:H, 0:W].astype(float)
    top, cx = H * rng.uniform(0.05, 0.15), W / 2 + W * rng.uniform(-0.1, 0.1)
    r = np.hypot(yy - top, xx - cx) / H
    if rng.random() < 0.65:  # convex/phased array: a sector
        half = math.radians(rng.uniform(30, 45))
        field = (np.abs(np.arctan2(xx - cx, yy - top)) < half) & (r > rng.uniform(0.02, 0.1)) & (r < 0.85)
    else:  # linear array: a rectangle
        field = (np.abs(xx - cx) < W * rng.uniform(0.25, 0.4)) & (yy > top) & (yy < H * 0.9)
    speckle = rng.rayleigh(1.0, (H, W))
    tissue = 0.25 + 0.35 * _smooth_noise(rng, H, W, H / 25)
    for _ in range(int(rng.integers(1, 5))):  # bright echo lines (interfaces) and dark cysts/vessels
        y0, x0 = rng.uniform(0.2, 0.8) * H, cx + rng.uniform(-0.3, 0.3) * W
        d = ((yy - y0) / (H * rng.uniform(0.03, 0.12))) ** 2 + ((xx - x0) / (W * rng.uniform(0.03, 0.15))) ** 2
        tissue = np.where(d < 1, rng.choice([0.03, 0.9]), tissue)
    depth_gain = np.exp(-rng.uniform(0.5, 2.0) * r)
    a = np.where(field, _blur_field(speckle * tissue * depth_gain, 0.8) * 0.6, 0.0)
    img = _from_float(a)
    d = ImageDraw.Draw(img)
    f = _font(rng, max(9, H // 28))
    for k in range(int(rng.integers(2, 7))):
        d.text((4, 4 + k * (H // 20)), _sentence(rng, 2).upper()[:18], fill=200, font=f)
    if rng.random() < 0.7:  # depth scale with ticks on one side
        x = W - int(W * 0.05)
        for k in range(10):
            d.line([(x, top + k * H * 0.08), (x + 5, top + k * H * 0.08)], fill=180)
    return img.convert("RGB") if rng.random() < 0.3 else img


# ----------------------------------------------------------------------------- real non-brain medical
# Real images shipped as pydicom's own test files: abdominal MR, spine CT, two head CTs, a whole-body
# bone scan, four ultrasound frames and a small MR. Used only to *test* the gate, never to train it.
REAL_MEDICAL = ("examples_overlay.dcm", "CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm",
                "JPEG2000.dcm", "examples_jpeg2k.dcm", "examples_palette.dcm", "examples_rgb_color.dcm",
                "examples_ybr_color.dcm", "MR_small.dcm")


@lru_cache(maxsize=None)
def _dicom_u8(name: str) -> np.ndarray:
    import pydicom
    p = Path(pydicom.__file__).parent / "data" / "test_files" / name
    s = read_scan(p.read_bytes(), name)
    return (np.clip(s.pixels, 0, 1) * 255).astype(np.uint8)


def real_medical(rng: Rng) -> Image.Image:
    """A view (crop, flip, rotation, resize) of one of the real DICOM images in `REAL_MEDICAL`."""
    return _view(rng, _dicom_u8(REAL_MEDICAL[int(rng.integers(len(REAL_MEDICAL)))]), 0.5, 1.0)


# One real head CT: the example of InVesalius, shipped by Debian's ``invesalius-examples`` (GPL-2;
# `apt-get install invesalius-examples`): 108 axial slices of 256 x 256 in Hounsfield units. A head
# CT is the likeliest wrong upload after other MRI, and drawn CTs did not teach the gate real ones.
# Its lower slices (skull base to the ventricles) train; the upper ones (cerebrum to the vertex,
# the most brain-like) are only tested, ten slices (15 mm) further up: below that gap a test slice's
# thumbnail correlates >= 0.97 with a trained one in the wide windows (the copy rule of `core.data`).
# Still one patient, so the held-out estimate takes them from the fold gate that never saw the CT.
HEAD_CT_FILE = Path(os.environ.get("BT_HEAD_CT", "/usr/share/doc/invesalius-examples/examples/Cranium.inv3"))
HEAD_CT_SPLIT = 54
HEAD_CT_TEST_FROM = 64
CT_WINDOWS = ((40, 80), (35, 40), (75, 215), (50, 400), (400, 1800), (600, 2800), (1000, 4000))


@lru_cache(maxsize=1)
def head_ct_volume() -> np.ndarray:
    """The InVesalius project's CT volume (z, y, x) in HU; FileNotFoundError without the package."""
    if not HEAD_CT_FILE.is_file():
        raise FileNotFoundError(f"{HEAD_CT_FILE} not found: `apt-get install invesalius-examples` "
                                "(or set BT_HEAD_CT to a copy of Cranium.inv3)")
    with tarfile.open(HEAD_CT_FILE) as t:
        files = {Path(m.name).name: m for m in t.getmembers() if m.isfile()}
        matrix = plistlib.loads(t.extractfile(files["main.plist"]).read())["matrix"]
        raw = t.extractfile(files[matrix["filename"]]).read()
    return np.frombuffer(raw, dtype=np.dtype(matrix["dtype"]).newbyteorder("<")).reshape(matrix["shape"])


def ct_slices(lo: int, hi: int) -> tuple[int, ...]:
    """Slices lo..hi-1 that hold some head: the top two are air, which the reader marks blank."""
    return tuple(z for z in range(lo, hi) if z < len(_tissue()) and _tissue()[z] >= 0.01)


@lru_cache(maxsize=1)
def _tissue() -> np.ndarray:
    return (head_ct_volume() > -500).mean(axis=(1, 2))


def _ct_view(rng: Rng, lo: int, hi: int) -> Image.Image:
    """One slice of the real head CT in a random display window (brain to full range), either way
    up, then cropped, turned and resized like every packaged image."""
    z = ct_slices(lo, hi)
    hu = head_ct_volume()[z[int(rng.integers(len(z)))]].astype(np.float32)
    c, w = CT_WINDOWS[int(rng.integers(len(CT_WINDOWS)))]
    c, w = c * rng.uniform(0.85, 1.15), w * rng.uniform(0.8, 1.25)
    a = (np.clip((hu - (c - w / 2)) / w, 0, 1) * 255).astype(np.uint8)
    return _view(rng, np.ascontiguousarray(a[::-1] if rng.random() < 0.5 else a), 0.6, 1.0)


def real_head_ct(rng: Rng) -> Image.Image:
    return _ct_view(rng, 0, HEAD_CT_SPLIT)


def real_head_ct_top(rng: Rng) -> Image.Image:
    return _ct_view(rng, HEAD_CT_TEST_FROM, 10**6)


def has_head_ct() -> bool:
    return HEAD_CT_FILE.is_file()


# Head CTs that a source filed among its MRI (`core.data.not_mri`: 56 in BRISC's no_tumor folder,
# 43 in the benchmark's notumor): real CTs of many patients and scanners, where the InVesalius CT is
# one. fit-ood sets them from the model's split (`use_scan_ct`): training and validation files
# train, test files only test.
SCAN_CT_FILES: dict[str, tuple[str, ...]] = {}


def _scan_ct_view(rng: Rng, category: str) -> Image.Image:
    files = SCAN_CT_FILES[category]
    with Image.open(files[int(rng.integers(len(files)))]) as im:
        a = np.asarray(im.convert("L"))
    return _view(rng, a, 0.6, 1.0)


def scan_ct(rng: Rng) -> Image.Image:
    return _scan_ct_view(rng, "scan_ct")


def scan_ct_test(rng: Rng) -> Image.Image:
    return _scan_ct_view(rng, "scan_ct_test")


# ----------------------------------------------------------------------------- from MRI
def mri_inverted(rng: Rng, grey: np.ndarray) -> Image.Image:
    return _from_float((1 - grey) ** rng.uniform(0.6, 1.6))


def mri_patch(rng: Rng, grey: np.ndarray) -> Image.Image:
    """A small square patch from inside the head, blown up: brain texture without a head."""
    y0, y1, x0, x1 = head_bbox(grey)
    side = max(8, int(min(y1 - y0, x1 - x0) * rng.uniform(0.15, 0.4)))
    py = int(rng.integers(y0, max(y0 + 1, y1 - side)))
    px = int(rng.integers(x0, max(x0 + 1, x1 - side)))
    img = _from_float(grey[py:py + side, px:px + side])
    return img.resize(_size(rng, 128, 320), Image.Resampling.BILINEAR)


def head_ct(rng: Rng, grey: np.ndarray) -> Image.Image:
    """A head CT built from an MRI slice's head outline: a thick saturated skull ring around
    flat, low-contrast brain (brain window), or bright bone over near-black brain (bone window)."""
    y0, y1, x0, x1 = head_bbox(grey)
    g = grey[y0:y1, x0:x1]
    head = ndimage.binary_fill_holes(ndimage.binary_opening(g > 0.08 * max(float(g.max()), 1e-3), iterations=2))
    thick = max(2, int(min(g.shape) * rng.uniform(0.02, 0.05)))
    brain = ndimage.binary_erosion(head, iterations=thick)
    skull = head & ~brain
    texture = _blur_field(g, 1.0)
    if rng.random() < 0.7:   # brain window: grey/white matter differ by a few percent
        a = np.where(brain, rng.uniform(0.35, 0.5) + 0.08 * (texture - texture[brain].mean()
                                                            if brain.any() else 0), 0.0)
        a = np.where(skull, 1.0, a)
    else:                    # bone window
        a = np.where(brain, rng.uniform(0.02, 0.12), 0.0) + np.where(skull, rng.uniform(0.8, 1.0), 0.0)
    a = a + rng.normal(0, rng.uniform(0.005, 0.03), a.shape)
    pad = int(min(g.shape) * 0.1)
    return _from_float(np.pad(a, pad))


def mri_solarised(rng: Rng, grey: np.ndarray) -> Image.Image:
    t = rng.uniform(0.15, 0.4)
    return _from_float(np.where(grey > t, 1 - grey, grey))


Generator = Callable[[Rng], Image.Image]
MriGenerator = Callable[[Rng, np.ndarray], Image.Image]

SEEN: dict[str, Generator | MriGenerator] = {
    "blank": blank, "noise": noise, "gradient": gradient, "shapes": shapes, "text": text,
    "pattern": pattern, "photo": photo, "mri_inverted": mri_inverted, "mri_patch": mri_patch,
    "ultrasound": ultrasound, "head_ct": head_ct,
}
UNSEEN: dict[str, Generator | MriGenerator] = {
    "chart": chart, "screenshot": screenshot, "photo_unseen": photo_unseen,
    "scanned_document": scanned_document, "medical_photo": medical_photo,
    "chest_xray": chest_xray, "abdominal_ct": abdominal_ct, "shepp_logan": shepp_logan,
    "elevation_map": elevation_map, "mri_solarised": mri_solarised,
}
# What each category looks like, for held-out folds that never hold out two of one kind at once
# (the shipped gate trains on all the others, so a fold should not remove a category's neighbours).
KIND = {"blank": "synthetic", "noise": "synthetic", "gradient": "synthetic", "shapes": "synthetic",
        "pattern": "synthetic", "text": "document", "chart": "document", "screenshot": "document",
        "scanned_document": "document", "photo": "photo", "photo_unseen": "photo",
        "elevation_map": "photo", "medical_photo": "photo", "chest_xray": "body_medical",
        "abdominal_ct": "body_medical", "ultrasound": "body_medical", "head_ct": "head_not_mri",
        "shepp_logan": "head_not_mri", "mri_inverted": "altered_mri", "mri_patch": "altered_mri",
        "mri_solarised": "altered_mri", "real_medical": "real_medical"}
# The four held-out folds of fit-ood (`core.ood.category_folds`), pinned as first dealt so that the
# shipped gate's held-out estimate stays reproducible and a new category moves no other.
PINNED_FOLDS = (("blank", "pattern", "scanned_document", "elevation_map", "ultrasound", "shepp_logan"),
                ("noise", "text", "photo", "mri_inverted", "chest_xray"),
                ("gradient", "chart", "photo_unseen", "mri_patch", "abdominal_ct"),
                ("shapes", "screenshot", "medical_photo", "mri_solarised", "head_ct"))
# Categories that exist only where their files do (the InVesalius CT's package; the sources' own CTs,
# from the model's split), pinned to the folds the shipped gate had them in: left to "the smallest
# fold", `scan_ct` moved to fold 2 without the package, and fold 3's gate, the one holding out
# `abdominal_ct`, trained on it (`scan_ct` holds a real abdominal CT, y1485).
PINNED_WHERE_PRESENT = {"real_head_ct": 1, "scan_ct": 2}
# Never trained on by any gate, in any fold: real images, the check closest to an unknown upload.
TEST_ONLY: dict[str, Generator | MriGenerator] = {"real_medical": real_medical}
if has_head_ct():  # the gate and its report then say they used it (fit-ood's negative_categories)
    SEEN["real_head_ct"] = real_head_ct
    TEST_ONLY["real_head_ct_top"] = real_head_ct_top
    KIND |= {"real_head_ct": "head_not_mri", "real_head_ct_top": "real_medical"}
# A test-only category drawn from the same patient as a trained one (held out with it, not apart)
TRAINED_SIBLING = {"real_head_ct_top": "real_head_ct"}
MRI_DERIVED = {"mri_inverted", "mri_patch", "mri_solarised", "head_ct"}
# Brain MRI slices that were altered (inverted, cut to a patch, solarised): flagged where possible,
# but reported apart from the images that are not brain MRI at all (the ">= 99 %" target).
ALTERED_MRI = tuple(c for c, k in KIND.items() if k == "altered_mri")
CATEGORIES = {**SEEN, **UNSEEN, **TEST_ONLY}


def use_scan_ct(train: list[str], test: list[str]) -> None:
    """Make the sources' own CTs two categories: ``train`` files a trained one (`scan_ct`),
    ``test`` files a test-only one (`scan_ct_test`; BRISC names no patient, so it is held out
    with `scan_ct`, like the InVesalius CT's upper slices). Without files, neither exists."""
    # KIND and TRAINED_SIBLING follow the categories too: a category's kind left behind made
    # KIND name categories that no longer exist (a later fit, or test, then saw them).
    kinds = {"scan_ct": "head_not_mri", "scan_ct_test": "real_medical"}
    for name, draw, files, table in (("scan_ct", scan_ct, train, SEEN), ("scan_ct_test", scan_ct_test, test, TEST_ONLY)):
        for registry in (SCAN_CT_FILES, table, CATEGORIES, KIND):
            registry.pop(name, None)
        if files:
            SCAN_CT_FILES[name] = tuple(sorted(files))
            table[name] = CATEGORIES[name] = draw
            KIND[name] = kinds[name]
    TRAINED_SIBLING.pop("scan_ct_test", None)
    if "scan_ct_test" in CATEGORIES:
        TRAINED_SIBLING["scan_ct_test"] = "scan_ct"


def encode(img: Image.Image, rng: Rng) -> bytes:
    """PNG or JPEG bytes, as an upload would arrive."""
    buf = io.BytesIO()
    if rng.random() < 0.5:
        img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode).save(
            buf, "JPEG", quality=int(rng.integers(60, 96)))
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


def make_images(category: str, n: int, seed: int, mri: list[np.ndarray] | None = None) -> list[Image.Image]:
    """``n`` images of one category; MRI-derived categories transform the given grey slices."""
    gen = CATEGORIES[category]
    rng = np.random.default_rng([seed, sum(map(ord, category))])
    if category in MRI_DERIVED:
        if not mri:
            raise ValueError(f"category {category!r} needs MRI slices to transform")
        return [gen(rng, mri[int(rng.integers(len(mri)))]) for _ in range(n)]
    return [gen(rng) for _ in range(n)]


def make_scans(category: str, n: int, seed: int, mri: list[np.ndarray] | None = None) -> list[ScanImage]:
    """Like `make_images`, but each one round-tripped through file bytes and `read_scan`."""
    rng = np.random.default_rng([seed, 7])
    out: list[ScanImage] = []
    for attempt in range(5):  # images the reader refuses are replaced (a blank one it only marks)
        for im in make_images(category, n - len(out), seed + 7919 * attempt, mri):
            try:
                out.append(read_scan(encode(im, rng)))
            except ScanError:
                continue
        if len(out) == n:
            break
    return out


def head_like(rng: Rng, size: int = 128) -> np.ndarray:
    """A crude synthetic head slice (skull ring, brain texture, dark ventricles) for fast tests."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    rx, ry = rng.uniform(0.3, 0.42), rng.uniform(0.36, 0.46)
    r = ((xx - 0.5) / rx) ** 2 + ((yy - 0.5) / ry) ** 2
    a = np.where(r < 1, 0.35 + 0.2 * _smooth_noise(rng, size, size, 2), 0.0)
    a[(r > 0.8) & (r < 1)] = 0.85
    a[((xx - 0.5) / 0.06) ** 2 + ((yy - 0.5) / 0.15) ** 2 < 1] = 0.1
    return np.clip(a + rng.normal(0, 0.02, a.shape), 0, 1).astype(np.float32)

