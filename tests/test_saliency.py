"""core.saliency: every method on every small architecture, alignment, hooks, mask scores."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from conftest import DATA
from core.models import create_model, saliency_layer
from core.preprocess import preprocess
from core.reader import ScanImage, read_scan
from core.saliency import (METHODS, colour_map, mask_scores, mask_to_input, method_name,
                           overlay, saliency_map)

CLASSES = ["glioma", "meningioma", "pituitary", "notumor"]
SPEC = {"size": 48, "crop": "none", "mean": 0.2, "std": 0.25}


class Stub:
    """The slice of `core.inference.Predictor` that saliency_map uses."""

    def __init__(self, model: nn.Module, spec: dict = SPEC):
        self.model, self.spec, self.classes = model.eval(), spec, CLASSES
        self.lock = threading.Lock()

    def input_tensor(self, scan: ScanImage) -> torch.Tensor:
        return preprocess(scan.pixels, self.spec)[None]


def square_scan(y: slice = slice(4, 16), x: slice = slice(4, 16)) -> ScanImage:
    a = np.zeros((48, 48), np.float32)
    a[y, x] = 1.0
    return ScanImage(a)


def brightness_model() -> nn.Module:
    """Logit 0 = mean activation of a 1x1 conv that copies the input: its evidence is brightness."""
    conv = nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.fill_(0.8)  # normalised background is -0.8: background activation 0
    head = nn.Linear(1, len(CLASSES))
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0], [-1.0], [-1.0], [-1.0]]))
        head.bias.zero_()
    m = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    m.cam_layer = "1"
    return m


@pytest.mark.parametrize("arch", ["simple_cnn", "cnn_bn", "mobilenet_v3_small"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_on_every_small_arch(arch, method):
    torch.manual_seed(0)
    p = Stub(create_model(arch, len(CLASSES)))
    cam = saliency_map(p, square_scan(), method, target="glioma")
    assert cam.shape == (48, 48) and cam.dtype == np.float32
    assert np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1


@pytest.mark.parametrize("method", list(METHODS))
def test_map_points_at_the_evidence_not_a_flipped_copy(method):
    p = Stub(brightness_model())
    cam = saliency_map(p, square_scan(), method, target="glioma")
    y, x = np.unravel_index(int(cam.argmax()), cam.shape)
    assert 2 <= y < 18 and 2 <= x < 18, (method, y, x)
    mask = np.zeros((48, 48), bool)
    mask[4:16, 4:16] = True
    scores = mask_scores(cam, mask)
    assert scores["pointing_hit"] is True and scores["energy_in_mask"] > 0.5


def test_target_by_name_or_index_and_bad_target():
    p = Stub(brightness_model())
    a = saliency_map(p, square_scan(), "gradcam", target="glioma")
    b = saliency_map(p, square_scan(), "gradcam", target=0)
    np.testing.assert_allclose(a, b)
    # Evidence against 'meningioma' only: Grad-CAM keeps positive evidence, so the map is empty.
    assert saliency_map(p, square_scan(), "gradcam", target="meningioma").max() == 0
    with pytest.raises(ValueError):
        saliency_map(p, square_scan(), "gradcam", target="astrocytoma")
    with pytest.raises(ValueError):
        saliency_map(p, square_scan(), "gradcam", target=7)


def test_method_names_and_aliases():
    assert method_name("gradcam") == "Grad-CAM"
    assert method_name("gradcam++") == method_name("GradCAMPlusPlus") == "Grad-CAM++"
    assert method_name("EigenCAM") == "EigenCAM" and method_name("hirescam") == "HiResCAM"
    assert method_name("layercam") == "LayerCAM"
    with pytest.raises(ValueError):
        method_name("occlusion")


def test_hooks_and_gradients_are_released():
    torch.manual_seed(0)
    p = Stub(create_model("simple_cnn", 4))
    layer = saliency_layer(p.model)
    saliency_map(p, square_scan(), "gradcam++")
    assert not layer._forward_hooks and not layer._backward_hooks
    assert all(q.grad is None for q in p.model.parameters())
    assert not p.lock.locked()


def test_concurrent_maps_equal_sequential_ones():
    torch.manual_seed(0)
    p = Stub(create_model("cnn_bn", 4))
    scans = [square_scan(), square_scan(slice(20, 40), slice(10, 30))]
    expected = [saliency_map(p, s, "gradcam") for s in scans]
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:   # a thread's exception is otherwise lost, and `got` stays empty
        try:
            got[k] = saliency_map(p, scans[k % 2], "gradcam")
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(got) == list(range(6)), errors
    for k, cam in got.items():
        np.testing.assert_allclose(cam, expected[k % 2], atol=1e-5)


def test_overlay_and_colour_map():
    grey = np.linspace(0, 1, 64 * 80, dtype=np.float32).reshape(64, 80)
    cam = np.zeros((16, 16), np.float32)
    cam[:8, :8] = 1
    out = overlay(grey, cam, 0.5)
    assert out.shape == (64, 80, 3) and out.dtype == np.uint8
    plain = overlay(grey, cam, 0.0)  # no map: the grey image itself
    assert np.abs(plain[..., 0].astype(int) - plain[..., 2]).max() <= 1
    assert colour_map(cam).shape == (16, 16, 3)


def test_the_map_brightens_steadily_to_its_peak_for_a_colour_blind_reader_too():
    """Jet's luminance fell from yellow to its red peak, and to a deuteranope its green, yellow and
    red merged: the caption's "peak" colour then meant nothing. Luminance must rise with the map's
    weight, in plain sight and through a deuteranope's and a protanope's eyes (Machado et al. 2009)."""
    ramp = np.linspace(0, 1, 256, dtype=np.float32)[None, :].repeat(4, 0)
    rgb = (colour_map(ramp)[0].astype(np.float64) / 255) ** 2.2   # linear light: what the simulations act on
    sims = {"plain": np.eye(3),
            "deuteranopia": np.array([[0.367, 0.861, -0.228], [0.280, 0.673, 0.047], [-0.012, 0.043, 0.969]]),
            "protanopia": np.array([[0.152, 1.053, -0.205], [0.115, 0.786, 0.099], [-0.004, -0.048, 1.052]])}
    for name, m in sims.items():
        seen = np.clip(rgb @ m.T, 0, 1)
        lum = seen @ np.array([0.2126, 0.7152, 0.0722])   # relative luminance
        smooth = np.convolve(lum, np.ones(8) / 8, mode="valid")   # the colour map's 8-bit steps
        assert (np.diff(smooth) > 0).all(), name
        assert smooth[-1] - smooth[0] > 0.4, name


def test_mask_scores_edge_cases():
    cam = np.zeros((32, 32), np.float32)
    cam[28, 28] = 1
    mask = np.zeros((32, 32), bool)
    mask[2:8, 2:8] = True
    assert mask_scores(cam, mask) == {"pointing_hit": False, "energy_in_mask": 0.0}
    assert mask_scores(cam, np.zeros((32, 32))) == {"pointing_hit": None, "energy_in_mask": None}
    # A peak just off the mask's edge counts as a hit within the tolerance.
    cam2 = np.zeros((100, 100), np.float32)
    cam2[50, 62] = 1
    m2 = np.zeros((100, 100), bool)
    m2[40:60, 40:60] = True
    assert mask_scores(cam2, m2)["pointing_hit"] is True
    assert mask_scores(cam2, m2, tolerance=0.0)["pointing_hit"] is False


def test_mask_to_input_follows_the_head_crop():
    grey = np.zeros((200, 300), np.float32)
    grey[40:160, 60:240] = 0.8  # the 'head'
    mask = np.zeros_like(grey, bool)
    mask[60:100, 80:120] = True
    m = mask_to_input(grey, mask, {"size": 64, "crop": "head"})
    assert m.shape == (64, 64) and m.any()
    ys, xs = np.nonzero(m)
    assert xs.mean() < 32  # the lesion sits in the left part of the head


@pytest.mark.skipif(not (DATA / "lgg-flair").is_dir(), reason="shared LGG data not present")
def test_real_lgg_mask_runs_end_to_end():
    masks = sorted((DATA / "lgg-flair" / "masks").glob("*.png"))
    pair = next(((DATA / "lgg-flair" / "glioma" / f"{m.stem}.jpg", m) for m in masks
                 if (DATA / "lgg-flair" / "glioma" / f"{m.stem}.jpg").is_file()), None)
    if pair is None:
        pytest.skip("no image/mask pair found")
    scan = read_scan(pair[0])
    mask = np.asarray(read_scan(pair[1]).pixels) > 0.5
    torch.manual_seed(0)
    spec = {"size": 64, "crop": "head", "mean": 0.2, "std": 0.25}
    p = Stub(create_model("simple_cnn", 4), spec)
    cam = saliency_map(p, scan, "gradcam")
    s = mask_scores(cam, mask_to_input(scan.pixels, mask, spec))
    assert mask.any(), f"{pair[1]} marks no lesion: pick a slice whose mask has one"
    assert isinstance(s["pointing_hit"], bool) and 0 <= s["energy_in_mask"] <= 1


def test_a_map_is_not_touched_by_another_session_predicting(random_weights):
    """Every model pass holds the Predictor's lock, so a prediction running in another thread
    (the report, the most-tumour-like slice) never feeds the map's hooks."""
    from core.inference import Predictor
    pred = Predictor(random_weights)
    rng = np.random.default_rng(0)
    a, b = (ScanImage((rng.random((64, 64)) * 255).astype(np.float32)) for _ in range(2))
    ref = saliency_map(pred, a, "gradcam", "glioma")
    stop, errors, diffs = threading.Event(), [], []

    def other():
        while not stop.is_set():
            pred.predict_scan(b)

    t = threading.Thread(target=other, daemon=True)
    t.start()
    try:
        for _ in range(15):
            try:
                diffs.append(float(np.abs(saliency_map(pred, a, "gradcam", "glioma") - ref).max()))
            except Exception as e:  # noqa: BLE001 - the race showed itself as exceptions too
                errors.append(repr(e))
    finally:
        stop.set()
        t.join()
    assert not errors and max(diffs) < 1e-4


def test_a_no_tumour_call_is_explained_by_its_likeliest_tumour_class():
    from core.saliency import explained_class
    four = ["glioma", "meningioma", "pituitary", "notumor"]
    probs = {"glioma": 0.02, "meningioma": 0.05, "pituitary": 0.01, "notumor": 0.92}
    assert explained_class("notumor", probs, four) == "meningioma"
    assert explained_class("glioma", probs, four) == "glioma"          # a tumour call explains itself
    assert explained_class("notumor", {"tumor": 0.1, "notumor": 0.9}, ["tumor", "notumor"]) == "tumor"
    assert explained_class("cat", {"cat": 0.9, "dog": 0.1}, ["cat", "dog"]) == "cat"   # no tumour decision
    # another finding is no 'no tumour' call: it explains itself
    assert explained_class("stroke", {"glioma": 0.3, "notumor": 0.1, "stroke": 0.6},
                           ["glioma", "notumor", "stroke"]) == "stroke"
