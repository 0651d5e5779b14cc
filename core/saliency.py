"""Saliency maps from the grad-cam package, an overlay for display, tumour-mask files, their
outline on a map and scores of a map against them.

The model is shared by every app session (``st.cache_resource``); grad-cam registers hooks on
it, so each map is computed under ``predictor.lock`` with a CAM object created for that call
and released by its context manager (`saliency_maps`' other methods release their own hooks at
once and borrow the first object's activations and gradients).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from pytorch_grad_cam import (EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, XGradCAM)
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from scipy import ndimage

from .inference import Predictor
from .labels import NO_TUMOUR, has_tumour_decision, tumour_classes
from .models import saliency_layer
from .preprocess import head_bbox, pad_square
from .reader import ScanImage

# Display name -> grad-cam class. Every one works on any CNN of the registry via saliency_layer.
METHODS = {
    "Grad-CAM": GradCAM,
    "Grad-CAM++": GradCAMPlusPlus,
    "HiResCAM": HiResCAM,
    "XGrad-CAM": XGradCAM,
    "LayerCAM": LayerCAM,
    "EigenCAM": EigenCAM,
}


# The first principal component of the layer's activations: one map whatever class is asked for.
CLASS_AGNOSTIC = {"EigenCAM"}
FALLBACK_METHOD = "Grad-CAM"  # for cards without a measured saliency default
POINTING_PX = 4  # the pointing game forgives a peak this many input pixels off the mask


def explained_class(pred: str, probs: dict[str, float], classes: list[str]) -> str:
    """The class a map explains unless the reader picks another: the call, except for a 'no tumour'
    call of a tumour model, where it is the likeliest tumour class. A missed tumour is the worst
    error, and a map for 'no tumour' (a central blob) shows nothing a reader can check that call
    against; where the model saw the most tumour-like evidence does."""
    if pred != NO_TUMOUR or not has_tumour_decision(classes):   # a 'stroke' call explains itself
        return pred
    return max(tumour_classes(classes), key=lambda c: probs.get(c, 0.0))


def default_method(card: dict | None) -> str:
    """The method a model's card names as best on the tumour-mask check, else Grad-CAM (also when
    that best is no better than a map that ignores the model: `saliency_check.beats_floors`)."""
    saved = (card or {}).get("saliency") or {}
    name = saved.get("default_method") if saved.get("beats_floors", True) else None
    try:
        return method_name(name) if name else FALLBACK_METHOD
    except ValueError:  # a card written for a method this version no longer offers
        return FALLBACK_METHOD


def measured_default(card: dict | None) -> dict | None:
    """The card's saliency block when the method shown first is the one it measured best against
    tumour masks, above every floor; None when the first method was never shown to point at them."""
    saved = (card or {}).get("saliency") or {}
    if saved.get("default_method") and saved.get("beats_floors", True) and default_method(card) == saved["default_method"]:
        return saved
    return None


def _key(name: str) -> str:
    """'Grad-CAM++', 'gradcam++' and 'GradCAMPlusPlus' all become 'gradcampp'."""
    return "".join(ch for ch in name.lower().replace("+", "p") if ch.isalnum()).replace(
        "plusplus", "pp")


_ALIASES = {_key(k): k for k in METHODS}


def method_name(method: str) -> str:
    """Canonical display name for ``method`` ("gradcam", "Grad-CAM++", "eigencam", ...)."""
    if _key(method) in _ALIASES:
        return _ALIASES[_key(method)]
    raise ValueError(f"unknown saliency method {method!r}; choose from {', '.join(METHODS)}")


def is_class_agnostic(method: str) -> bool:
    """Whether ``method`` (any spelling `method_name` takes) draws one map whatever the class."""
    return method_name(method) in CLASS_AGNOSTIC


def saliency_map(predictor: Predictor, scan: ScanImage, method: str = "gradcam",
                 target: str | int | None = None) -> np.ndarray:
    """H x W map in [0, 1] at the model input size, for ``target`` (class name or index).

    ``target=None`` explains the model's own top class. Maps explain the raw logits, so the
    operating point does not change them.
    """
    cls = METHODS[method_name(method)]
    # The model's weights are frozen (Predictor): the graph grad-cam needs is built through
    # the input, so only activation gradients are computed, no weight gradients.
    x = predictor.input_tensor(scan).requires_grad_(True)
    targets = None if target is None else [ClassifierOutputTarget(_target_index(predictor, target))]
    grey_cam = None
    with predictor.lock:  # hooks live on the shared model while this block runs
        try:
            with cls(model=predictor.model, target_layers=[saliency_layer(predictor.model)]) as cam:
                with torch.enable_grad():
                    grey_cam = cam(input_tensor=x, targets=targets)[0]
        finally:
            predictor.model.zero_grad(set_to_none=True)  # no gradients left on the shared model
    if grey_cam is None:  # grad-cam's __exit__ swallows IndexError and leaves nothing behind
        raise RuntimeError(f"{method_name(method)} produced no map for this model")
    return _unit(np.nan_to_num(np.asarray(grey_cam, dtype=np.float32)))


def saliency_maps(predictor: Predictor, scan: ScanImage, methods: list[str],
                  target: str | int | None = None) -> dict[str, np.ndarray]:
    """What `saliency_map` gives for each of ``methods``, from one forward and backward pass.

    Every method here reads the same layer's activations and gradients, so a batch check of
    all methods need not pay one pass each: the first CAM object's store is lent to the others.
    """
    names = [method_name(m) for m in methods]
    # The model's weights are frozen (Predictor): the graph grad-cam needs is built through
    # the input, so only activation gradients are computed, no weight gradients.
    x = predictor.input_tensor(scan).requires_grad_(True)
    layers = [saliency_layer(predictor.model)]
    targets = None if target is None else [ClassifierOutputTarget(_target_index(predictor, target))]
    out: dict[str, np.ndarray] = {}
    with predictor.lock:
        try:
            with GradCAM(model=predictor.model, target_layers=layers) as first:
                with torch.enable_grad():
                    first(input_tensor=x, targets=targets)
                targets = targets or [ClassifierOutputTarget(int(first.outputs[0].argmax()))]
                for name in names:  # inside the block: leaving it clears the store
                    out[name] = _from_store(METHODS[name], predictor.model, layers,
                                            first.activations_and_grads, x, targets)
        finally:
            predictor.model.zero_grad(set_to_none=True)
    if len(out) != len(names):  # grad-cam's __exit__ swallows IndexError
        raise RuntimeError("the saliency maps could not be computed for this model")
    return out


def _from_store(cls, model, layers, store, x, targets) -> np.ndarray:
    """One method's map from another CAM object's activations and gradients."""
    cam = cls(model=model, target_layers=layers)
    own = cam.activations_and_grads
    own.release()  # its hooks are not needed
    cam.activations_and_grads = store
    try:
        grey = cam.aggregate_multi_layers(cam.compute_cam_per_layer(x, targets, False))[0]
    finally:  # the CAM's __del__ releases its store: it must not empty the lent one
        cam.activations_and_grads = own
    return _unit(np.nan_to_num(np.asarray(grey, dtype=np.float32)))


def _target_index(predictor: Predictor, target: str | int) -> int:
    if isinstance(target, (int, np.integer)):
        if not 0 <= int(target) < len(predictor.classes):
            raise ValueError(f"class index {target} out of range")
        return int(target)
    if target not in predictor.classes:
        raise ValueError(f"unknown class {target!r}; the model predicts {predictor.classes}")
    return predictor.classes.index(target)


def _unit(a: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a flat map stays all zero rather than dividing by zero."""
    a = a - a.min()
    peak = a.max()
    return (a / peak if peak > 0 else a).astype(np.float32)


def resize_map(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a map to ``shape`` (H, W), kept in [0, 1]."""
    if cam.shape == tuple(shape):
        return cam.astype(np.float32)
    zoom = (shape[0] / cam.shape[0], shape[1] / cam.shape[1])
    return np.clip(ndimage.zoom(cam.astype(np.float32), zoom, order=1), 0, 1)[:shape[0], :shape[1]]


# Viridis, not the library's jet: to a red-green colour-blind reader jet's green, yellow and red
# merge and its red peak turns dark; viridis brightens steadily to its peak for every reader
# (an accessibility review, session 51). Every caption names the peak by PEAK_COLOUR.
COLORMAP = cv2.COLORMAP_VIRIDIS
PEAK_COLOUR = "yellow"
# what the peak colour means, in every caption: "strongest evidence" read as "the tumour is here"
PEAK_WORDS = f"{PEAK_COLOUR} = what moved the score most, not the lesion"
# A tumour mask's outline: a white ring outside a black one, seen on any colour of the map and scan
# (magenta was 1 CIELAB unit from jet's light blue to a deuteranope)
OUTLINE = ((255, 255, 255), (0, 0, 0))
OUTLINE_WORDS = "black-and-white outline"


def overlay(grey: np.ndarray, cam: np.ndarray, opacity: float = 0.4) -> np.ndarray:
    """RGB uint8 of the grey image with the map as a `COLORMAP` heat map at ``opacity`` (0 = no map)."""
    grey = np.clip(np.asarray(grey, dtype=np.float32), 0, 1)
    cam = resize_map(np.clip(cam, 0, 1), grey.shape)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    return show_cam_on_image(rgb, cam, use_rgb=True, colormap=COLORMAP,
                             image_weight=float(np.clip(1 - opacity, 0, 1)))


def peak_words(cam: np.ndarray) -> str:
    """Where a map peaks, in words, for a reader who cannot see it: "the image's upper left"
    (the image's sides, not the patient's: radiological images show the patient's right on the left)."""
    cam = np.asarray(cam)
    if cam.size == 0 or not np.isfinite(cam).any() or np.nanmax(cam) <= 0:
        return "no region stands out"
    r, c = np.unravel_index(int(np.nanargmax(cam)), cam.shape)
    row = ("upper", "middle", "lower")[min(3 * r // cam.shape[0], 2)]
    col = ("left", "centre", "right")[min(3 * c // cam.shape[1], 2)]
    return "strongest at the image's " + ("centre" if (row, col) == ("middle", "centre") else f"{row} {col}")


def colour_map(cam: np.ndarray) -> np.ndarray:
    """The raw map as an RGB uint8 `COLORMAP` image (the 'map alone' view)."""
    return overlay(np.zeros_like(cam), cam, opacity=1.0)


def mask_to_input(grey: np.ndarray, mask: np.ndarray, spec: dict) -> np.ndarray:
    """Bring a mask drawn on the original scan into the model-input frame (crop, pad, resize).

    Uses the crop box found on ``grey``, exactly as `core.preprocess.prepare` does for the image.
    """
    mask = np.asarray(mask) > 0
    if spec.get("crop", "head") == "head":
        y0, y1, x0, x1 = head_bbox(grey)
        mask = mask[y0:y1, x0:x1]
    sq = pad_square(mask.astype(np.float32))
    return resize_map(sq, (spec["size"], spec["size"])) >= 0.5


def mask_scores(cam: np.ndarray, mask: np.ndarray, tolerance: float = 0.05) -> dict:
    """How well a map points at a mask of the same frame.

    pointing_hit: the map's peak lies inside the mask dilated by ``tolerance`` x image size
    (the pointing game, which forgives peaks just off a small lesion's edge).
    energy_in_mask: share of the map's total mass inside the (undilated) mask.
    """
    mask = np.asarray(mask) > 0
    cam = resize_map(np.asarray(cam, dtype=np.float32), mask.shape)
    if not mask.any():
        return {"pointing_hit": None, "energy_in_mask": None}
    grown = dilate(mask, int(round(tolerance * max(mask.shape))))  # 0: no tolerance
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    total = float(cam.sum())
    # a flat map (Grad-CAM of 'notumor' is often all zero) has no peak: argmax's top-left corner
    # would score a hit for a lesion there
    return {"pointing_hit": bool(grown[peak]) and bool(cam.max() > cam.min()),
            "energy_in_mask": float(cam[mask].sum() / total) if total > 0 else 0.0}


def dilate(mask: np.ndarray, px: int) -> np.ndarray:
    """The mask grown by ``px`` pixels (city-block distance), as the pointing game forgives."""
    mask = np.asarray(mask) > 0
    return ndimage.binary_dilation(mask, iterations=px) if px > 0 and mask.any() else mask


# ----------------------------------------------------------------------------- mask files
def mask_path_for(image: str | Path) -> Path | None:
    """The tumour mask stored beside an image, if any.

    Two layouts: the shared LGG folder (``<root>/<class>/X.jpg`` with ``<root>/masks/X.png``)
    and the original Kaggle LGG one (``X.tif`` with ``X_mask.tif`` in the same folder).
    """
    image = Path(image)
    for cand in (image.parent.parent / "masks" / f"{image.stem}.png",
                 image.with_name(f"{image.stem}_mask{image.suffix}")):
        if cand.is_file() and cand != image:
            return cand
    return None


def read_mask(src: str | Path | bytes, sizes: set[tuple[int, int]] | None = None) -> np.ndarray:
    """A binary mask image (path or bytes) as a bool array: lesion is the brighter of its two
    values, whether they are 0/255 or 0/1 (which the upload pairing also takes for a mask).

    ``sizes``: the (width, height) it may have (its scan's), checked from the header: a 77 KB PNG
    of 8,900² pixels took 575 MB to decode before its size was found wrong. Any mask is held to the
    reader's pixel limit. Raises ValueError when refused."""
    import io
    from PIL import Image
    from PIL import ImageOps
    from .reader import MAX_PIXELS
    with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as im:
        w, h = im.size
        if im.getexif().get(0x0112) in (5, 6, 7, 8):   # a quarter turn: its size as the reader shows it
            w, h = h, w
        if w * h > MAX_PIXELS or (sizes is not None and (w, h) not in sizes):   # before exif_transpose decodes it
            raise ValueError(f"a mask of {w} x {h} pixels does not fit its scan")
        im = ImageOps.exif_transpose(im)   # turned as the reader turns its scan, or the outline misses
        a = np.asarray(im.convert("L"))   # uint8: a float copy of a large mask was 4 bytes a pixel
    lo, hi = int(a.min()), int(a.max())
    return a > ((lo + hi) // 2 if hi > lo else 127)   # integers: a > 127 is a > 127.5


def contour_overlay(rgb: np.ndarray, mask: np.ndarray,
                    colours: tuple[tuple[int, int, int], ...] = OUTLINE, thickness: int = 1) -> np.ndarray:
    """A copy of ``rgb`` (H x W x 3 uint8) with the outline of ``mask`` drawn as rings of
    ``colours``, outermost first, each ``thickness`` px, all inside the mask.

    The mask is resized (nearest) to the image when their sizes differ, so a mask in the
    model-input frame can go on any display size of that frame.
    """
    from skimage.segmentation import find_boundaries
    out = np.array(rgb, dtype=np.uint8, copy=True)
    mask = np.asarray(mask) > 0
    if mask.shape != out.shape[:2]:
        zoom = (out.shape[0] / mask.shape[0], out.shape[1] / mask.shape[1])
        mask = ndimage.zoom(mask.astype(np.uint8), zoom, order=0)[:out.shape[0], :out.shape[1]] > 0
    inside = mask
    for colour in colours:   # inward only, so the line never covers the map just outside
        edge = find_boundaries(inside, mode="inner")
        if thickness > 1:
            edge = dilate(edge, thickness - 1) & inside
        out[edge] = colour
        inside = inside & ~edge
    return out
