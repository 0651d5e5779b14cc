"""Training pieces as plain functions: image cache, batched augmentation, loss, epochs, checkpoints."""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as nnf
from torch import nn

from .data import HASH_CACHE, Sample, read_card, save_whole
from .inference import apply_tta, file_sha256, weights_mismatch
from .labels import label_targets
from .preprocess import normalise, prepare


# ----------------------------------------------------------------------------- image cache
def _prepare_one(args) -> np.ndarray:
    path, spec = args
    from .reader import read_scan
    return (prepare(read_scan(path).pixels, spec) * 255).round().astype(np.uint8)


def cache_path(kind: str, samples: list[Sample], spec: dict, suffix: str) -> Path:
    """Where `kind` (images, lesions) of these files under this spec are cached. Each file's
    size and modification time are part of the key: a file replaced under the same name (a
    re-exported dataset) must not be trained on as its old pixels."""
    stamps = "|".join(_stamp(s.path) for s in samples)
    if kind == "lesions":  # a corrected, added or removed mask must not train as the old one
        from .saliency import mask_path_for
        stamps += "|masks|" + "|".join(_stamp(mask_path_for(s.path)) for s in samples)
    key = hashlib.sha1(f"{kind}|v2|{stamps}{sorted(spec.items())!r}".encode(errors="surrogateescape"))
    return HASH_CACHE.parent / f"{kind}-{key.hexdigest()[:16]}{suffix}"


def _stamp(path: str | Path | None) -> str:
    """'path:size:mtime': a file's identity in a cache key ('-' for no file)."""
    if path is None:
        return "-"
    st = os.stat(path)
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def map_in_processes(fn, jobs: list, workers: int, min_jobs: int = 200, chunksize: int = 64) -> list:
    """[fn(job) for job in jobs], in ``workers`` spawned processes when there are more than
    ``min_jobs`` (the image caches here and in core.ood)."""
    if workers > 1 and len(jobs) > min_jobs:
        # spawn, not fork: a forked child of a process whose torch thread pool has run hangs
        # forever in its first parallel op (seen: resize, for a --teacher's cache)
        import multiprocessing
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
            return list(ex.map(fn, jobs, chunksize=chunksize))
    return [fn(j) for j in jobs]


def _map_files(fn, samples: list[Sample], spec: dict, workers: int) -> list:
    """fn((path, spec)) for every sample."""
    return map_in_processes(fn, [(s.path, spec) for s in samples], workers)


def cache_images(samples: list[Sample], spec: dict, workers: int = 2) -> torch.Tensor:
    """Decode and prepare every image once: uint8 tensor (N, 1, S, S), cached on disk."""
    path = cache_path("images", samples, spec, ".npy")
    if path.exists():
        return torch.from_numpy(np.load(path))
    arr = np.stack(_map_files(_prepare_one, samples, spec, workers))[:, None]
    save_whole(path, lambda tmp: np.save(tmp, arr))
    return torch.from_numpy(arr)


def _lesion_one(args) -> np.ndarray | str | None:
    """The image's mask in the input frame; None without one; why not, for a mask that cannot serve."""
    path, spec = args
    from .reader import read_scan
    from .saliency import mask_path_for, mask_to_input, read_mask
    mpath = mask_path_for(path)
    if mpath is None:
        return None
    try:
        mask = read_mask(mpath)
    except Exception as e:   # one damaged mask must not end a run whose image reads fine
        return f"its mask {mpath.name} could not be read ({type(e).__name__})"
    grey = read_scan(path).pixels
    if np.asarray(mask).shape[:2] != grey.shape[:2]:   # drawn on another image: it would land misaligned
        return f"its mask {mpath.name} is {mask.shape[1]} x {mask.shape[0]} px, the scan {grey.shape[1]} x {grey.shape[0]}"
    return mask_to_input(grey, mask, spec).astype(np.uint8)


def cache_lesions(samples: list[Sample], spec: dict, workers: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The tumour mask of every image that has one (LGG), in the model-input frame.

    Returns uint8 (N, 1, S, S) masks (0/1; zeros where none is known) and a bool (N,) saying
    which images have a mask. Brought into the frame exactly as `cache_images` prepares the
    image (`core.saliency.mask_to_input`), and cached on disk like it.
    """
    path = cache_path("lesions", samples, spec, ".npz")
    if path.exists():
        z = np.load(path)
        return torch.from_numpy(z["masks"]), torch.from_numpy(z["known"])
    found = _map_files(_lesion_one, samples, spec, workers)
    if bad := [(s.rel, m) for s, m in zip(samples, found) if isinstance(m, str)]:
        print(f"note: {len(bad)} masks not used (the images train without one): "
              + "; ".join(f"{rel}: {why}" for rel, why in bad[:5]) + (" ..." if len(bad) > 5 else ""), flush=True)
        found = [None if isinstance(m, str) else m for m in found]
    size = spec["size"]
    known = np.array([m is not None for m in found], bool)
    masks = np.zeros((len(found), 1, size, size), np.uint8)
    for i, m in enumerate(found):
        if m is not None:
            masks[i, 0] = m
    save_whole(path, lambda tmp: np.savez_compressed(tmp, masks=masks, known=known))
    return torch.from_numpy(masks), torch.from_numpy(known)


def target_masks(samples: list[Sample], classes: list[str]) -> torch.Tensor:
    """(N, C) bool: which classes each label allows (one for a fine label, several for coarse)."""
    m = torch.zeros(len(samples), len(classes), dtype=torch.bool)
    for i, s in enumerate(samples):
        m[i, label_targets(s.label, classes)] = True
    return m


# ----------------------------------------------------------------------------- augmentation
# The ranges `augment` widens and their defaults (train.py's flags and the cards use these names).
GEOMETRY_DEFAULTS = {"rotate": 15.0, "shear": 0.1, "turn_p": 0.0}  # `random_affine`
INTENSITY_DEFAULTS = {"blur_p": 0.0, "gamma_log": 0.4}            # `random_intensity`
LESION_DEFAULTS = {"lesion_dim_p": 0.0}                           # `dim_lesions` (images with a tumour mask)
STRIP_CROP_DEFAULTS = {"strip_crop_p": 0.0}                       # `strip_and_crop`
MARKS_DEFAULTS = {"marks_p": 0.0}                                 # `draw_marks`
AUG_OPTION_DEFAULTS = {**GEOMETRY_DEFAULTS, **INTENSITY_DEFAULTS, **LESION_DEFAULTS, **STRIP_CROP_DEFAULTS,
                       **MARKS_DEFAULTS}
# Options added after runs were recorded without them: such a run trained with them off.
ADDED_LATER = {**LESION_DEFAULTS, **STRIP_CROP_DEFAULTS, **MARKS_DEFAULTS}


def augment(x: torch.Tensor, strength: float = 1.0, skull_strip_p: float = 0.2,
            out_size: int | None = None, options: dict | None = None) -> torch.Tensor:
    """Per-sample random affine, flip, intensity and skull removal on a [0, 1] batch (N, 1, H, W).

    Batched with affine_grid/grid_sample because per-image PIL transforms cost more than the
    forward pass of a small model on a 2-core CPU. ``out_size`` resamples to a smaller square in
    the same pass (progressive resizing: early epochs at low resolution cost a fraction).
    ``options`` widens it: `random_affine`'s rotate, shear and turn_p, `random_intensity`'s blur_p
    and gamma_log, and adds what is off by default: `strip_and_crop` (strip_crop_p) and
    `draw_marks` (marks_p).
    """
    return augment_carrying(x, None, strength, skull_strip_p, out_size, options)[0]


def augment_carrying(x: torch.Tensor, carry: torch.Tensor | None, strength: float = 1.0,
                     skull_strip_p: float = 0.2, out_size: int | None = None,
                     options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`augment`, with ``carry`` (N, C, H, W, e.g. lesion masks) moved by the same geometry and
    kept out of the intensity changes, so that a mask stays on its image."""
    geo, blur_p, gamma_log = _split_options(options)
    k = x.shape[1]
    strip_p = _option_p(options, "strip_crop_p", strength)
    if strip_p > 0:  # drawn first, and only when on: runs without it keep their random stream
        x, carry = strip_and_crop(x, carry, strip_p)
    moved = random_affine(x if carry is None else torch.cat([x, carry], 1), strength, out_size, **geo)
    x = random_intensity(moved[:, :k], strength, skull_strip_p, blur_p, gamma_log)
    marks_p = _option_p(options, "marks_p", strength)
    if marks_p > 0:  # drawn last, and only when on: runs without it keep their random stream
        x = draw_marks(x, marks_p)
    return x, None if carry is None else moved[:, k:]


MARK_WORDS = ("12.3 mm", "ROI", "A", "R", "L", "Se 4", "Im 12", "W 400 L 40", "HU", "T1", "x", "1", "2", "cm")


def draw_marks(x: torch.Tensor, p: float) -> torch.Tensor:
    """With probability ``p`` per image of a [0, 1] batch (N, 1, H, W), a reader's marks burned
    into it, as a screen capture or an annotated export carries them: one to four of lines (with
    end ticks or not), freehand polylines, ellipse and box outlines, arrows, crosshairs and short
    labels, anywhere in the image (not at the lesion), 1-2 px wide at the model's size (arrows 2-3 px
    with a filled head), drawn in white, a light grey or black. The label stays: a mark is not the
    scan. Drawn with PIL on the CPU (0.5-1.6 ms a marked image here, whatever the batch's device)."""
    from PIL import Image, ImageDraw, ImageFont
    n, _, h, w = x.shape
    sel = torch.nonzero(torch.rand(n, device=x.device) < p).flatten().tolist()
    if not sel:
        return x
    rng = np.random.default_rng(int(torch.randint(2**31, (1,)).item()))
    layers, values = [], []
    for _ in sel:
        im = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(im)
        pt = lambda: (float(rng.uniform(0, w)), float(rng.uniform(0, h)))  # noqa: E731
        for _ in range(int(rng.integers(1, 5))):
            kind, width = int(rng.integers(6)), int(rng.integers(1, 3))
            if kind == 0:    # a measured line, ticks at its ends half the time
                (x0, y0), (x1, y1) = pt(), pt()
                draw.line([(x0, y0), (x1, y1)], fill=255, width=width)
                if rng.random() < 0.5:
                    for cx, cy in ((x0, y0), (x1, y1)):
                        draw.line([(cx - 3, cy - 3), (cx + 3, cy + 3)], fill=255, width=1)
            elif kind == 1:  # freehand
                draw.line([pt() for _ in range(int(rng.integers(3, 8)))], fill=255, width=width)
            elif kind == 2:  # a region: ellipse or box
                (cx, cy), r = pt(), float(rng.uniform(0.03, 0.15)) * w
                box = [cx - r, cy - r * rng.uniform(0.5, 1), cx + r, cy + r * rng.uniform(0.5, 1)]
                (draw.ellipse if rng.random() < 0.6 else draw.rectangle)(box, outline=255, width=width)
            elif kind == 3:  # an arrow
                (ax, ay), r, a = pt(), float(rng.uniform(0.05, 0.15)) * w, float(rng.uniform(0, 2 * np.pi))
                bx, by = ax + r * np.cos(a), ay + r * np.sin(a)
                draw.line([(ax, ay), (bx, by)], fill=255, width=width + 1)
                head = [(ax + 0.35 * r * np.cos(a + s), ay + 0.35 * r * np.sin(a + s)) for s in (-0.4, 0.4)]
                draw.polygon([(ax, ay), *head], fill=255)
            elif kind == 4:  # a crosshair
                (cx, cy), r = pt(), float(rng.uniform(0.02, 0.06)) * w
                draw.line([(cx - r, cy), (cx + r, cy)], fill=255, width=1)
                draw.line([(cx, cy - r), (cx, cy + r)], fill=255, width=1)
            else:            # a label
                font = ImageFont.load_default(size=int(rng.integers(max(6, h // 24), max(8, h // 10))))
                draw.text(pt(), str(rng.choice(MARK_WORDS)), fill=255, font=font)
        layers.append(np.asarray(im, np.float32) / 255)
        values.append(float(rng.choice([1.0, rng.uniform(0.6, 0.95), 0.0], p=[0.6, 0.25, 0.15])))
    mark = torch.from_numpy(np.stack(layers))[:, None].to(x.device, x.dtype)
    value = torch.tensor(values, device=x.device, dtype=x.dtype)[:, None, None, None]
    x = x.clone()
    x[sel] = x[sel] * (1 - mark) + value * mark
    return x


def strip_and_crop(x: torch.Tensor, carry: torch.Tensor | None, p: float,
                   margin: float = 0.04) -> tuple[torch.Tensor, torch.Tensor | None]:
    """With probability ``p`` per image of a [0, 1] batch (N, 1, H, W) of head crops: strip the
    skull (`core.preprocess.brain_mask`, as `core.ood.strip_to_brain` strips a whole slice), then
    crop to the brain's box and fill the frame, as the one preprocessing path does with a
    skull-stripped upload (`head_bbox`'s 4 % margin, padded square). Training's other strip
    (`_random_skull_strip`) leaves the brain at the head's scale, which no stripped upload shows.
    ``carry`` (lesion masks) is cropped alike but not cut by the brain mask (a lesion at the
    brain's surface may be stripped while its label stays). An image with no brain left is left
    as it was."""
    from .preprocess import brain_mask
    n, _, h, w = x.shape
    sel = torch.nonzero(torch.rand(n, device=x.device) < p).flatten().tolist()
    if not sel:
        return x, carry
    rng = np.random.default_rng(int(torch.randint(2**31, (1,)).item()))
    # the mask at half resolution: a quarter of the pixels, and a stripped brain's edge is smooth anyway
    half = nnf.avg_pool2d(x[sel].float(), 2, ceil_mode=True).cpu().numpy()[:, 0]
    found = [brain_mask(a, rng) for a in half]
    masks = torch.from_numpy(np.stack([np.zeros(a.shape, bool) if m is None else m for m, a in zip(found, half)])
                             [:, None].astype(np.float32)).to(x.device)
    brain = (nnf.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False) > 0.5).float()
    rows, cols = brain.amax(3)[:, 0] > 0, brain.amax(2)[:, 0] > 0  # (m, H), (m, W)
    keep = rows.any(1)
    if not keep.any():
        return x, carry
    ar_h, ar_w = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    y0 = torch.where(rows, ar_h, h).amin(1); y1 = torch.where(rows, ar_h, -1).amax(1) + 1
    x0 = torch.where(cols, ar_w, w).amin(1); x1 = torch.where(cols, ar_w, -1).amax(1) + 1
    side = torch.maximum(y1 - y0, x1 - x0).float() / 2 + margin * max(h, w)  # half the square's side
    theta = torch.zeros(len(sel), 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2] = 2 * side / w, (x0 + x1).float() / w - 1
    theta[:, 1, 1], theta[:, 1, 2] = 2 * side / h, (y0 + y1).float() / h - 1
    idx = torch.tensor(sel, device=x.device)[keep]
    grid = nnf.affine_grid(theta[keep], [len(idx), 1, h, w], align_corners=False)
    x = x.clone()
    x[idx] = nnf.grid_sample(x[idx] * brain[keep], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if carry is not None:
        carry = carry.clone()
        carry[idx] = nnf.grid_sample(carry[idx], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return x, carry


def _option_p(options: dict | None, name: str, strength: float) -> float:
    """An added augmentation's probability, its default filled in; 0 when augmentation is off
    (evaluation, strength 0)."""
    return float({**AUG_OPTION_DEFAULTS, **(options or {})}[name]) * (strength > 0)


def _split_options(options: dict | None) -> tuple[dict, float, float]:
    """(random_affine's keyword options, blur_p, gamma_log), defaults filled in."""
    o = {**AUG_OPTION_DEFAULTS, **(options or {})}
    return {k: o[k] for k in GEOMETRY_DEFAULTS}, float(o["blur_p"]), float(o["gamma_log"])


def random_affine(x: torch.Tensor, strength: float = 1.0, out_size: int | None = None,
                  rotate: float = GEOMETRY_DEFAULTS["rotate"], shear: float = GEOMETRY_DEFAULTS["shear"],
                  turn_p: float = GEOMETRY_DEFAULTS["turn_p"]) -> torch.Tensor:
    """The geometric half of `augment`: one random rotation (up to ``rotate`` degrees), zoom,
    shear, shift and flip per sample, applied alike to every channel (so a lesion mask stacked on
    the image stays on it). With probability ``turn_p`` a sample also turns by a random quarter,
    half or three-quarter turn: files from elsewhere are not always stored upright. The turns
    draw their random numbers last, so runs without them keep their old random stream."""
    n, dev = x.shape[0], x.device
    size = out_size or x.shape[-1]
    if strength <= 0:
        return x if size == x.shape[-1] else nnf.interpolate(x, size=(size, size), mode="bilinear",
                                                              antialias=True, align_corners=False)
    ang = (torch.rand(n, device=dev) * 2 - 1) * math.radians(rotate) * strength
    scale = 1 + (torch.rand(n, device=dev) * 2 - 1) * 0.12 * strength
    shear = (torch.rand(n, device=dev) * 2 - 1) * shear * strength
    tx, ty = [(torch.rand(n, device=dev) * 2 - 1) * 0.08 * strength for _ in range(2)]
    flip = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
    if turn_p > 0:
        quarters = torch.randint(1, 4, (n,), device=dev) * (torch.rand(n, device=dev) < turn_p)
        ang = ang + quarters * (math.pi / 2)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin + shear, tx], 1),
                         torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = nnf.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return nnf.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_intensity(x: torch.Tensor, strength: float = 1.0, skull_strip_p: float = 0.2,
                     blur_p: float = INTENSITY_DEFAULTS["blur_p"],
                     gamma_log: float = INTENSITY_DEFAULTS["gamma_log"]) -> torch.Tensor:
    """The intensity half of `augment`: skull removal, gamma (ln gamma uniform in +-``gamma_log``:
    0.4 gives 0.67-1.49), contrast, brightness and noise, and
    with probability ``blur_p`` a Gaussian blur (sigma 0.6-1.6 px): files that were downsampled
    or smoothed on the way. The blur draws its random numbers after everything else, so runs
    without it keep their old random stream."""
    if strength <= 0:
        return x
    if skull_strip_p > 0:
        x = _random_skull_strip(x, skull_strip_p)
    x = _intensity(x, strength, gamma_log)
    return _random_blur(x, blur_p) if blur_p > 0 else x


def _intensity(x: torch.Tensor, strength: float,
               gamma_log: float = INTENSITY_DEFAULTS["gamma_log"]) -> torch.Tensor:
    n, dev = x.shape[0], x.device
    # Intensity: gamma, contrast, brightness, then a little noise; scanners differ in all four.
    gamma = torch.exp((torch.rand(n, 1, 1, 1, device=dev) * 2 - 1) * gamma_log * strength)
    x = x.clamp(0, 1) ** gamma
    c = 1 + (torch.rand(n, 1, 1, 1, device=dev) * 2 - 1) * 0.25 * strength
    b = (torch.rand(n, 1, 1, 1, device=dev) * 2 - 1) * 0.08 * strength
    x = (x - 0.5) * c + 0.5 + b
    x = x + torch.randn_like(x) * 0.02 * strength * torch.rand(n, 1, 1, 1, device=dev)
    return x.clamp(0, 1)


def _random_blur(x: torch.Tensor, p: float) -> torch.Tensor:
    """A separable Gaussian blur of random width on a random subset (one grouped conv per axis)."""
    n, c, h, w = x.shape
    sigma = 0.6 + 1.0 * torch.rand(n, device=x.device)
    on = torch.rand(n, device=x.device) < p
    t = torch.arange(-3, 4, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    k = torch.where(on[:, None], k, (t == 0).to(x.dtype)[None])  # identity kernel where off
    k = k.repeat_interleave(c, 0)
    y = x.reshape(1, n * c, h, w)
    y = nnf.conv2d(nnf.pad(y, (3, 3, 0, 0), mode="replicate"), k[:, None, None, :], groups=n * c)
    y = nnf.conv2d(nnf.pad(y, (0, 0, 3, 3), mode="replicate"), k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def _random_skull_strip(x: torch.Tensor, p: float) -> torch.Tensor:
    """Remove a rim of the head for a random subset: a rough brain mask by erosion of the head mask.

    Skull-stripped research scans exist; a model that only ever saw a skull leans on it.
    """
    sel = torch.rand(x.shape[0], device=x.device) < p
    if not sel.any():
        return x
    xs = x[sel]
    head = (xs > 0.1).float()
    head = -nnf.max_pool2d(-nnf.max_pool2d(head, 9, 1, 4), 9, 1, 4)  # closing fills dark CSF
    k = max(3, int(xs.shape[-1] * 0.06) | 1)
    brain = -nnf.max_pool2d(-head, k, 1, k // 2)  # erosion strips the outer rim (the skull)
    x = x.clone()
    x[sel] = xs * brain
    return x


# ----------------------------------------------------------------------------- loss
def set_nll(logits: torch.Tensor, allowed: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """-log P(label) where a coarse label's probability is the sum over the classes it allows.

    For a fine label this is cross-entropy; for Br35H 'yes' it is -log of the summed tumour classes'
    probability (-log(1 - p(notumor)) when every other class is a tumour).
    Label smoothing mixes in the mean cross-entropy over all classes.
    """
    logp = nnf.log_softmax(logits.float(), dim=1)
    nll = -torch.logsumexp(logp.masked_fill(~allowed, float("-inf")), dim=1)
    if smoothing:
        nll = (1 - smoothing) * nll - smoothing * logp.mean(dim=1)
    return nll.mean()


def class_maps(model: nn.Module, feats: torch.Tensor) -> torch.Tensor:
    """Class activation maps (N, C, h, w) of a model whose head is global pooling + one linear
    layer (``cam_head``): each cell's logit contribution, whose mean over cells is the logit
    less its bias. For such a head Grad-CAM's map is the ReLU of this map, so training it trains
    what the saliency panel shows."""
    fc = model.get_submodule(model.cam_head)
    return torch.einsum("nkhw,ck->nchw", feats.float(), fc.weight.float())


def pointing_loss(maps: torch.Tensor, lesion: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between the softmax over cells of a class map (N, h, w) and the share of
    the lesion in each cell ((N, 1, H, W) masks pooled to the map's grid).

    It asks where the evidence is, not how much of it there is: adding a constant to every cell
    leaves it unchanged, so it cannot fight the classification loss over a small lesion's logit.
    Images whose lesion left the frame (augmentation) count zero; the mean is over the rest.
    """
    share = nnf.adaptive_avg_pool2d(lesion.float(), maps.shape[-2:]).flatten(1)
    mass = share.sum(1)
    keep = mass > 0
    if not keep.any():
        return maps.sum() * 0.0
    q = share[keep] / mass[keep, None]
    return -(q * nnf.log_softmax(maps[keep].flatten(1), dim=1)).sum(1).mean()


# ----------------------------------------------------------------------------- loops
def _autocast(device: torch.device, precision: str):
    enabled = precision in ("bf16", "fp16")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


def _augmented_batch(images, masks, lesions, idx, device, strength, skull_strip_p, out_size, options):
    """The augmented [0, 1] batch, and with ``lesions`` its tumour masks warped alike (zero for
    images without a mask or with a coarse label, which the pointing loss then skips)."""
    x = images[idx].to(device, non_blocking=True).float().div_(255)
    if lesions is None:
        return augment(x, strength, skull_strip_p, out_size, options), None
    sel = lesions[1][idx] & (masks[idx].sum(1) == 1)  # a mask and one true class
    x, lesion = augment_carrying(x, lesions[0][idx].to(device).float(), strength, skull_strip_p,
                                 out_size, options)
    lesion = lesion * sel.to(device)[:, None, None, None]
    dim_p = _option_p(options, "lesion_dim_p", strength)
    return (dim_lesions(x, lesion, dim_p) if dim_p > 0 else x), lesion


def dim_lesions(x: torch.Tensor, lesion: torch.Tensor, p: float) -> torch.Tensor:
    """With probability ``p``, each image with a tumour mask has the lesion's pixels scaled by a
    factor drawn in [0.35, 1]: a bright FLAIR lesion turns faint, as bright as the brain around it,
    or darker (a cyst or a resection cavity). Left out of a site, the gliomas missed there were these
    (docs/generalisation.md, "LGG on sites the model never trained on"); the label stays, so the
    model must read the mass and its edge, not the brightness alone. Draws after everything else."""
    n = x.shape[0]
    on = (torch.rand(n, device=x.device) < p) & (lesion.flatten(1).amax(1) > 0)
    factor = torch.where(on, 0.35 + 0.65 * torch.rand(n, device=x.device), torch.ones(n, device=x.device))
    return x * (1 - lesion.clamp(0, 1) * (1 - factor[:, None, None, None]))


class Distill(NamedTuple):
    """What `train_one_epoch` distils from: ``source`` is the teacher's logits for every image
    (`teacher_logits`) or the teacher itself, reading each augmented batch as the student sees it."""
    source: torch.Tensor | nn.Module
    weight: float
    temperature: float


def _step(model: nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
          scheduler: torch.optim.lr_scheduler.LRScheduler | None,
          scaler: torch.amp.GradScaler | None, ema: ModelEma | None) -> None:
    """One optimiser step (loss-scaled under fp16), then the schedule and the weight average."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward(); scaler.step(optimizer); scaler.update()
    else:
        loss.backward(); optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if ema is not None:
        ema.update(model)


def train_one_epoch(model: nn.Module, images: torch.Tensor, masks: torch.Tensor,
                    order: torch.Tensor, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, spec: dict, device: torch.device,
                    batch_size: int = 64, precision: str = "fp32", smoothing: float = 0.1,
                    aug_strength: float = 1.0, skull_strip_p: float = 0.2,
                    scaler: torch.amp.GradScaler | None = None, progress: bool = True, out_size: int | None = None,
                    ema: ModelEma | None = None, lesions: tuple | None = None,
                    mask_weight: float = 0.0, aug_options: dict | None = None,
                    teacher: Distill | None = None) -> dict:
    """One pass over ``order``; ``aug_options`` widens the augmentation (`augment`).
    With ``teacher`` the class loss is (1 - weight) x the label's loss + weight x `distill_loss`
    (the reported loss stays the label's, comparable with runs without a teacher).
    With ``lesions`` (masks, known) from `cache_lesions` and
    ``mask_weight`` > 0, images of a true class that carry a tumour mask add ``mask_weight`` x
    `pointing_loss` of that class's map, so the evidence for it sits on the lesion."""
    model.train()
    total, correct, loss_sum, point_sum, point_n, t0 = 0, 0, 0.0, 0.0, 0, time.time()
    kd_sum = 0.0
    plain = getattr(model, "module", model)  # under DDP the hooks and head live on the module
    feats: dict = {}
    hook = None
    if lesions is not None and mask_weight > 0:
        from .models import saliency_layer
        hook = saliency_layer(plain).register_forward_hook(lambda m, i, o: feats.__setitem__("f", o))
    it = order.split(batch_size)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, leave=False, desc="train", mininterval=5)
    try:
        for idx in it:
            if len(idx) < 2:
                continue
            x, lesion = _augmented_batch(images, masks, lesions if hook is not None else None, idx,
                                         device, aug_strength, skull_strip_p, out_size, aug_options)
            x = normalise(x, spec).contiguous(memory_format=torch.channels_last)
            allowed = masks[idx].to(device)
            with _autocast(device, precision):
                logits = model(x)
            cls_loss = loss = set_nll(logits, allowed, smoothing)
            if teacher is not None:
                kd = distill_loss(logits, _teacher_says(teacher.source, x, idx, device, precision),
                                  teacher.temperature)
                loss = (1 - teacher.weight) * cls_loss + teacher.weight * kd
                kd_sum += kd.item() * len(idx)
            f = feats.pop("f", None)
            if lesion is not None and lesion.any():
                cls = allowed.float().argmax(1)
                point = pointing_loss(class_maps(plain, f)[torch.arange(len(idx), device=cls.device), cls], lesion)
                loss = loss + mask_weight * point
                point_sum += point.item(); point_n += 1
            _step(model, loss, optimizer, scheduler, scaler, ema)
            loss_sum += cls_loss.item() * len(idx)
            total += len(idx)
            correct += allowed.gather(1, logits.argmax(1, keepdim=True)).sum().item()
    finally:
        if hook is not None:
            hook.remove()
    out = {"loss": loss_sum / max(total, 1), "acc": correct / max(total, 1),
           "time_s": time.time() - t0, "images_per_s": total / max(time.time() - t0, 1e-9)}
    if point_n:
        out["pointing_loss"] = point_sum / point_n
    if teacher is not None:
        out["distill_loss"] = kd_sum / max(total, 1)
    return out


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, spec: dict, device: torch.device,
                   batch_size: int = 128, precision: str = "fp32", tta: dict | None = None,
                   out_size: int | None = None) -> torch.Tensor:
    """Logits for uint8 prepared images (N, 1, S, S), under the ``tta`` rule when one is given
    (see `apply_tta`; MIRROR_ALWAYS mirrors every image); ``out_size`` resizes first (validation
    during the low-resolution epochs of progressive resizing)."""
    model.eval()
    out = []
    for chunk in images.split(batch_size):
        x = augment(chunk.to(device).float().div_(255), 0.0, out_size=out_size)
        x = normalise(x, spec).contiguous(memory_format=torch.channels_last)
        with _autocast(device, precision):
            z = apply_tta(model, x, model(x).float(), tta)
        out.append(z.cpu())
    return torch.cat(out) if out else torch.zeros(0)


def evaluate_split(model: nn.Module, images: torch.Tensor, masks: torch.Tensor, spec: dict, device: torch.device,
                   precision: str = "fp32", out_size: int | None = None) -> dict:
    """Validation loss (the coarse-label NLL) and accuracy of ``model`` on prepared images."""
    logits = predict_logits(model, images, spec, device, precision=precision, out_size=out_size)
    loss = set_nll(logits, masks).item() if len(logits) else float("nan")
    acc = masks.gather(1, logits.argmax(1, keepdim=True)).float().mean().item() if len(logits) else 0
    return {"loss": loss, "acc": acc}


# ----------------------------------------------------------------------------- weight averaging
class ModelEma:
    """Exponential moving average of a model's weights and batch-norm statistics.

    Short CPU schedules end on noisy weights (validation loss jumps by 20 % from one epoch to
    the next); the average over the last few hundred steps is smoother and is what we validate
    and ship when ``decay`` > 0. The decay warms up as in timm/TF so early steps are not frozen in.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(getattr(model, "module", model)).eval()
        self.module.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        src = getattr(model, "module", model).state_dict()
        for k, e in self.module.state_dict().items():
            if e.dtype.is_floating_point:
                e.lerp_(src[k].detach(), 1 - d)
            else:  # num_batches_tracked
                e.copy_(src[k])

    def state_dict(self) -> dict:
        return {"model": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = state["updates"]


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, **state) -> None:
    """Tensors and plain types only, so it loads with weights_only=True. Atomic replace."""
    save_whole(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """``mmap``: tensors are mapped, not read (a check that needs only the stored args)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def init_weights(model: torch.nn.Module, weights_dir: str | Path, arch: str, classes: list[str],
                 split: dict) -> dict:
    """Load a finished run's weights into `model` to train on from them (a second, shorter cycle).

    Refuses a model of another architecture or class list, and one whose training images are
    held out here (validation or test in `split`, this run's record): continuing from it would
    leak those images into this run's measurements. Returns what the card records of the parent.
    """
    weights_dir = Path(weights_dir)
    card = checked_parent(weights_dir, classes, split, "--init")
    if card["arch"] != arch:
        raise ValueError(f"--init {weights_dir}: it is a {card['arch']}, this run trains a {arch}")
    path = weights_dir / "model.safetensors"
    model.load_state_dict(shipped_state(model, weights_dir))
    return {"from": str(weights_dir), "command": card.get("command"), "date": card.get("date"),
            "weights_sha256": file_sha256(path),
            "epochs_run": card.get("training", {}).get("epochs_run"),
            "train_time_s": card.get("training", {}).get("train_time_s")}


def checked_parent(weights_dir: Path, classes: list[str], split: dict, option: str) -> dict:
    """The card of a finished run this one learns from (--init, --teacher), refused when its
    classes differ, its weights are not the card's, or any of this run's validation or test
    images (``split``, this run's record) was one of its training images: the run's
    measurements would then be of images it had, through that model, already seen."""
    card = read_card(weights_dir)
    if card["classes"] != classes:
        raise ValueError(f"{option} {weights_dir}: it is for {card['classes']}, this run trains {classes}")
    if (why := weights_mismatch(card, file_sha256(weights_dir / "model.safetensors"), weights_dir)):
        raise ValueError(why)
    parent = json.loads((weights_dir / "split.json").read_text())["files"]
    seen = {(src, rel) for src, d in parent.items() for rel in d.get("train", [])}
    leaked = sorted((src, rel) for src, d in split.items() for k in ("val", "test")
                    for rel in d.get(k, []) if (src, rel) in seen)
    if leaked:
        raise ValueError(f"{option} {weights_dir}: {len(leaked)} of this run's validation/test images "
                         f"were training images of that model (e.g. {leaked[0][0]}/{leaked[0][1]}); "
                         "use the same data and --seed (or --split-from it) so the split is the same")
    return card


def teacher_logits(weights_dir: str | Path, samples: list[Sample], rows: torch.Tensor, classes: list[str],
                   split: dict, device: torch.device, precision: str,
                   workers: int = 2) -> tuple[torch.Tensor, dict, nn.Module]:
    """A finished run's raw logits (N, C) for ``samples`` at ``rows`` (NaN elsewhere), each
    image prepared by the teacher's own card (its input size), un-augmented: computed once, so
    that distillation (`distill_loss`) costs nothing per step. Returns them, the card's record
    and the teacher (frozen, for reading augmented batches during training)."""
    weights_dir = Path(weights_dir)
    t0 = time.time()
    card = checked_parent(weights_dir, classes, split, "--teacher")
    spec = card["preprocessing"]
    images = cache_images(samples, spec, workers)
    from .models import create_model
    model = create_model(card["arch"], len(classes)).to(device).to(memory_format=torch.channels_last)
    model.load_state_dict(shipped_state(model, weights_dir))
    out = torch.full((len(samples), len(classes)), float("nan"))
    out[rows] = predict_logits(model, images[rows], spec, device, precision=precision)
    record = {"teacher": str(weights_dir), "teacher_sha256": card.get("weights_sha256"),
              "teacher_arch": card["arch"], "teacher_input": spec["size"],
              "teacher_command": card.get("command"), "images": len(rows),
              "train_accuracy_of_teacher": _agreement(out[rows], samples, rows, classes),
              "time_s": round(time.time() - t0, 1)}
    return out, record, model.eval().requires_grad_(False)


def _agreement(logits: torch.Tensor, samples: list[Sample], rows: torch.Tensor, classes: list[str]) -> float:
    """Share of the rows whose label allows the teacher's top class (a coarse label: any it allows)."""
    allowed = target_masks([samples[i] for i in rows.tolist()], classes)
    return round(allowed.gather(1, logits.argmax(1, keepdim=True)).float().mean().item(), 4)


def _teacher_says(teacher: torch.Tensor | nn.Module, x: torch.Tensor, idx: torch.Tensor,
                  device: torch.device, precision: str) -> torch.Tensor:
    if isinstance(teacher, nn.Module):
        with torch.no_grad(), _autocast(device, precision):
            return teacher(x).float()
    return teacher[idx].to(device)


def distill_loss(logits: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher || student) of the two softened by temperature ``t``, times t^2 so that its
    gradients keep their size as t grows (Hinton et al. 2015)."""
    s = nnf.log_softmax(logits.float() / t, dim=1)
    q = nnf.log_softmax(teacher.float() / t, dim=1)
    return nnf.kl_div(s, q, log_target=True, reduction="batchmean") * t * t


def shipped_state(model: torch.nn.Module, weights_dir: str | Path) -> dict:
    """A run's shipped (fp16) weights as a state dict in `model`'s dtypes."""
    return state_from_file(model, Path(weights_dir) / "model.safetensors")


def state_from_file(model: torch.nn.Module, path: str | Path) -> dict:
    """A safetensors file of `model`'s weights as a state dict in `model`'s dtypes."""
    from safetensors.torch import load_file
    ref = model.state_dict()
    return {k: v.to(ref[k].dtype) for k, v in load_file(path).items()}


def half_state(state: dict) -> dict:
    """Weights as shipped: floating tensors in fp16 (counters kept), contiguous, on the CPU."""
    return {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous() for k, v in state.items()}


def salvage_best(run_dir: str | Path) -> Path | None:
    """The best epoch's weights of a run stopped before its finish (a time limit on a lent GPU),
    as the fp16 ``salvaged.safetensors`` that ``train.py --finish-from`` takes; None without best.pt."""
    from safetensors.torch import save_file
    best = Path(run_dir) / "best.pt"
    if not best.is_file():
        return None
    state = torch.load(best, map_location="cpu", weights_only=True)
    dest = Path(run_dir) / "salvaged.safetensors"
    save_whole(dest, lambda tmp: save_file(half_state(state), tmp))
    return dest


def average_states(a: dict, b: dict) -> dict:
    """The mean of two state dicts of one architecture (weight averaging of two cycle ends, as in
    SWA); batch-norm running statistics are averaged too, integer counters are taken from `b`."""
    return {k: (a[k].to(b[k].device, torch.float32) + b[k].float()).div(2).to(b[k].dtype)
            if b[k].is_floating_point() else b[k] for k in b}


# ----------------------------------------------------------------------------- calibration
T_RANGE = (0.05, 20.0)   # the temperatures fit_temperature may return


class CalibrationWarning(UserWarning):
    """A temperature that could not be fitted (train.py says so in the card)."""


def fit_temperature(logits: torch.Tensor, masks: torch.Tensor) -> float:
    """Temperature scaling: one scalar T minimising the validation NLL of softmax(logits / T).

    With validation all right the NLL falls as T -> 0 (and with two classes all wrong, as T
    grows): no optimum, and a fit ran to a bound of `T_RANGE` (0.05 multiplies every logit by 20,
    so each test error read as certain). Then 1.0 (the model's own scale) is returned, with a
    `CalibrationWarning`. With more classes, all wrong can still have an optimum (the right class
    a close second): that is fitted."""
    if len(logits) == 0:
        return 1.0
    if not torch.isfinite(logits).all():   # no temperature calibrates NaN outputs: the caller refuses
        return float("nan")
    right = masks[torch.arange(len(logits)), logits.argmax(1)]
    if right.all() or (not right.any() and logits.shape[1] == 2):
        warnings.warn(f"temperature scaling has no optimum to find ({int(right.sum())} of {len(logits)} "
                      "validation images right): probabilities are left uncalibrated (T = 1)",
                      CalibrationWarning, stacklevel=2)
        return 1.0
    log_t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure():
        opt.zero_grad()
        loss = set_nll(logits / log_t.exp(), masks)
        loss.backward()
        return loss
    opt.step(closure)
    t = float(log_t.exp().clamp(T_RANGE[0], T_RANGE[1]).item())

    def nll(temp: float) -> float:
        with torch.no_grad():
            return float(set_nll(logits / temp, masks))
    # LBFGS without a line search can overshoot on small logits (log T to -46, then NaN): a
    # temperature that is not finite, or fits worse than none, is found again by a bounded search.
    if not math.isfinite(t) or not nll(t) <= nll(1.0):
        from scipy.optimize import minimize_scalar
        lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
        t = float(math.exp(minimize_scalar(lambda lt: nll(math.exp(lt)), bounds=(lo, hi), method="bounded").x))
    return t


# The operating point never rises above even odds: a tumour more likely than not is flagged.
CAP_THRESHOLD = 0.5


FLOOR_MIN_NORMALS = 20   # a source with fewer validation normals is not held to the floor (all are pooled when none has more)


def floor_groups(is_tumour: np.ndarray, groups: np.ndarray, min_normals: int = FLOOR_MIN_NORMALS) -> list:
    """The groups (sources) the specificity floor holds in: each with at least ``min_normals``
    normals; [] when none has that many (the floor then holds over them all, pooled)."""
    is_tumour, groups = np.asarray(is_tumour, bool), np.asarray(groups)
    return [g for g in np.unique(groups) if (~is_tumour & (groups == g)).sum() >= min_normals]


def floor_unmet(operating_point: dict) -> tuple[str, float] | None:
    """(which set, its validation specificity) when a card's operating point sits at the cap with
    that specificity still under its floor (`pick_threshold` never goes higher): the floor is not
    met, whatever the sensitivity reached. The set is the worst source the floor holds in
    (``val_specificity_by_source``), else all sources pooled (cards before 2026-12-07). None when
    the floor is met or there is none. A binary model on 60 scans read 'reached 100 % at
    specificity 0 %' and no more."""
    op = operating_point or {}
    floor, thr = op.get("min_specificity"), op.get("threshold")
    if not floor or thr is None or thr < CAP_THRESHOLD:
        return None
    by_source = op.get("val_specificity_by_source") or {}
    worst = min(by_source.items(), key=lambda kv: kv[1]) if by_source else \
        ("all sources pooled", op.get("val_specificity"))
    return worst if worst[1] is not None and worst[1] < floor else None


def pick_threshold(t_prob: np.ndarray, is_tumour: np.ndarray, target_sensitivity: float,
                   min_specificity: float | None = None, groups: np.ndarray | None = None,
                   min_group_normals: int = FLOOR_MIN_NORMALS, never: np.ndarray | None = None) -> float:
    """The highest tumour-probability threshold whose validation sensitivity meets the target.

    With ``min_specificity``, never go so low that validation specificity falls below it: a
    threshold that calls most healthy scans tumours is no operating point. With ``groups``
    (the source of each image) the floor holds in every source with at least
    ``min_group_normals`` normals (in the pooled normals when no source has that many), so that
    many easy normals of one collection cannot pay for false alarms on another. ``never``: rows
    called a class that is neither tumour nor 'no tumour' (`metrics.other_calls`), no tumour call
    at any threshold: a tumour among them is a miss, a normal a right call. The card records the
    sensitivity and specificity actually reached.
    """
    t_prob, is_tumour = np.asarray(t_prob), np.asarray(is_tumour, bool)
    never = np.zeros(len(t_prob), bool) if never is None else np.asarray(never, bool)
    tp = np.sort(t_prob[is_tumour & ~never])
    if len(tp) == 0:
        return 0.5
    # tumours we may miss, those no threshold reaches first (0: every reachable one, the target then out of reach)
    # (less a hair: (1 - 0.9) * 10 is 0.99999..., which floored allowed no miss where the target allows one)
    k = max(0, int(math.floor((1 - target_sensitivity) * int(is_tumour.sum()) + 1e-9)) - int((is_tumour & never).sum()))
    # no floor above 0: a weak model's tumours at p < 1e-4 are still to be reached if the target needs them
    thr = float(min(CAP_THRESHOLD, max(0.0, tp[min(k, len(tp) - 1)] - 1e-6)))
    if min_specificity is None:
        return thr
    groups = np.zeros(len(t_prob), int) if groups is None else np.asarray(groups)
    counted = floor_groups(is_tumour, groups, min_group_normals)
    # no source with enough normals: the floor holds over them all, not nowhere
    sets = [groups == g for g in counted] if counted else [np.ones(len(t_prob), bool)]
    for in_group in sets:
        n_normals = int((~is_tumour & in_group).sum())
        normals = np.sort(t_prob[~is_tumour & ~never & in_group])
        # lowest threshold keeping at least min_specificity of this group's normals below it
        # (those called the other class are below any threshold)
        below = int(math.ceil(min_specificity * n_normals - 1e-9)) - int((~is_tumour & never & in_group).sum())
        if below <= 0 or len(normals) == 0:
            continue
        thr = max(thr, min(CAP_THRESHOLD, float(normals[min(len(normals), below) - 1]) + 1e-6))
    return thr
