"""Preprocessing, augmentation, the image cache, prediction and checkpoints."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

import core.data as D
import core.engine as E
from core.inference import MIRROR_ALWAYS
from core.models import create_model
from core.preprocess import DEFAULT_SPEC, head_bbox, normalise, pad_square, prepare, preprocess

pytestmark = pytest.mark.usefixtures("private_cache")  # conftest: a per-test hash cache


def synthetic_head(h=240, w=320, centre=(140, 190), radii=(70, 90), label=True) -> np.ndarray:
    """A bright textured ellipse (the head) on black, with burnt-in white text in a corner."""
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - centre[0]) / radii[0]) ** 2 + ((xx - centre[1]) / radii[1]) ** 2 <= 1
    rng = np.random.default_rng(0)
    img = np.where(inside, 0.45 + 0.3 * rng.random((h, w)), 0.0)
    if label:
        pil = Image.fromarray((img * 255).astype(np.uint8))
        draw = ImageDraw.Draw(pil)
        draw.text((4, 4), "L  R  AX T1 SE", fill=255, font=ImageFont.load_default())
        draw.text((4, h - 14), "10mm", fill=255, font=ImageFont.load_default())
        img = np.asarray(pil, dtype=np.float32) / 255
    return img.astype(np.float32)


# ----------------------------------------------------------------------------- preprocessing
def test_head_bbox_ignores_burnt_in_text():
    img = synthetic_head()
    y0, y1, x0, x1 = head_bbox(img)
    # The ellipse spans rows 70..210 and columns 100..280; the margin is 4% of each side.
    assert 70 - 0.04 * 240 - 3 <= y0 <= 70 + 3 and 210 - 3 <= y1 <= 210 + 0.04 * 240 + 3
    assert 100 - 0.04 * 320 - 3 <= x0 <= 100 + 3 and 280 - 3 <= x1 <= 280 + 0.04 * 320 + 3
    # The text at the top-left and bottom-left corners is left out of the crop.
    assert y0 > 20 and x0 > 60


def test_head_bbox_of_blank_and_noise_images_is_the_whole_image():
    assert head_bbox(np.zeros((50, 70), np.float32)) == (0, 50, 0, 70)
    speckle = (np.random.default_rng(0).random((64, 64)) > 0.995).astype(np.float32)
    assert head_bbox(speckle) == (0, 64, 0, 64)


def test_open_cross_is_scipys_binary_opening():
    # head_bbox's opening is hand-written for speed; it must stay the exact scipy operation
    # (training caches and shipped gates were built with scipy's), borders and tiny masks included.
    from scipy import ndimage
    from core.preprocess import _open_cross
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (1, 6), (2, 2), (3, 3), (6, 1), (7, 9), (40, 33)]:
        for p in (0.3, 0.7, 0.95, 1.0):
            m = rng.random(shape) < p
            assert np.array_equal(_open_cross(m), ndimage.binary_opening(m)), (shape, p)


def test_a_served_scan_searches_for_the_head_once(monkeypatch, tmp_path):
    # The model's input, the gate's 64 px view and the display view crop to one box.
    import core.preprocess as P
    from core.reader import ScanImage
    calls = []
    real = P.head_bbox
    monkeypatch.setattr(P, "head_bbox", lambda g, *a, **k: calls.append(1) or real(g, *a, **k))
    scan = ScanImage(synthetic_head())
    small = prepare(scan.pixels, {**DEFAULT_SPEC, "size": 64}, scan.head_box)
    big = prepare(scan.pixels, DEFAULT_SPEC, scan.head_box)
    assert len(calls) == 1
    assert np.array_equal(small, prepare(scan.pixels, {**DEFAULT_SPEC, "size": 64}))
    assert np.array_equal(big, prepare(scan.pixels, DEFAULT_SPEC))


def test_prepare_shapes_ranges_and_crop():
    img = synthetic_head()
    spec = {**DEFAULT_SPEC, "size": 64}
    out = prepare(img, spec)
    assert out.shape == (64, 64) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    # Cropped to the head, the ellipse (pi * 70 * 90 px) fills about half of the padded square
    # of side 194 (its width plus margins); uncropped it fills about a fifth of 320 x 320.
    full = prepare(img, {**spec, "crop": "none"})
    assert full.shape == (64, 64)
    assert (out > 0.2).mean() > 0.42 and (full > 0.2).mean() < 0.25


def test_pad_square_centres_the_image():
    a = np.ones((2, 4), np.float32)
    sq = pad_square(a)
    assert sq.shape == (4, 4)
    assert sq.sum() == 8 and sq[1:3].sum() == 8


def test_preprocess_is_normalised_prepare():
    img = synthetic_head(label=False)
    spec = {**DEFAULT_SPEC, "size": 48}
    x = preprocess(img, spec)
    assert x.shape == (1, 48, 48) and x.dtype == torch.float32
    # the served input is on the uint8 grid of the training image cache (core.engine._prepare_one)
    cached = (prepare(img, spec) * 255).round().astype(np.uint8).astype(np.float32) / 255
    expected = (torch.from_numpy(cached) - spec["mean"]) / spec["std"]
    assert torch.allclose(x[0], expected, atol=1e-6)
    assert torch.allclose(normalise(torch.tensor([spec["mean"]]), spec), torch.zeros(1))


# ----------------------------------------------------------------------------- augmentation
def test_augment_keeps_shape_and_range():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 40, 40)
    y = E.augment(x, 1.0, skull_strip_p=1.0)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert not torch.allclose(x, y)
    assert torch.equal(E.augment(x, 0.0), x)


def test_augment_resamples_to_a_smaller_size_for_progressive_resizing():
    torch.manual_seed(0)
    x = torch.zeros(4, 1, 40, 40)
    x[:, :, 10:30, 10:30] = 1.0
    small = E.augment(x, 1.0, skull_strip_p=0.0, out_size=28)
    assert small.shape == (4, 1, 28, 28) and 0 <= small.min() and small.max() <= 1
    plain = E.augment(x, 0.0, out_size=20)  # no augmentation: a plain (antialiased) resize
    assert plain.shape == (4, 1, 20, 20)
    assert torch.allclose(plain[0, 0, 6:14, 6:14], torch.ones(8, 8), atol=1e-4)
    assert plain[0, 0, 0, 0] == 0


def _bottom_half_share(y: torch.Tensor) -> torch.Tensor:
    """Per sample, the share of the image's mass below the middle row."""
    return y[:, 0, y.shape[-2] // 2:].sum((1, 2)) / y[:, 0].sum((1, 2))


def test_quarter_turns_move_content_across_the_image_and_are_off_by_default():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 40, 40)
    x[:, :, 4:16, 4:16] = 1.0  # a block in the top-left corner
    upright = E.random_affine(x, 1.0)  # +-15 deg, h-flip: the block stays in the top half
    assert (_bottom_half_share(upright) < 0.2).all()
    turned = E.random_affine(x, 1.0, rotate=0.0, turn_p=1.0)
    down = (_bottom_half_share(turned) > 0.8).float().mean()
    # A quarter turn one way, a half turn, or (with the mirror) the other quarter turn sends the
    # block to the bottom half in about two thirds of the samples; never with turn_p 0.
    assert 0.4 < down < 0.9
    torch.manual_seed(1); a = E.random_affine(x, 1.0)
    torch.manual_seed(1); b = E.random_affine(x, 1.0, rotate=15.0, shear=0.1, turn_p=0.0)
    assert torch.equal(a, b)


def test_blur_smooths_the_selected_images_and_is_off_by_default():
    torch.manual_seed(0)
    x = (torch.rand(16, 1, 32, 32) > 0.5).float()  # high-frequency noise
    roughness = lambda y: (y[..., 1:] - y[..., :-1]).abs().mean((1, 2, 3))  # noqa: E731
    blurred = E._random_blur(x, 1.0)
    assert blurred.shape == x.shape and (roughness(blurred) < 0.8 * roughness(x)).all()
    assert torch.allclose(blurred.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=0.02)  # mass kept
    assert torch.allclose(E._random_blur(x, 0.0), x, atol=1e-6)
    torch.manual_seed(1); a = E.augment(x, 1.0, 0.0)
    torch.manual_seed(1); b = E.augment(x, 1.0, 0.0, options={"blur_p": 0.0, "turn_p": 0.0})
    assert torch.equal(a, b)


def test_gamma_range_widens_on_request_and_keeps_the_default_stream():
    x = torch.full((256, 1, 8, 8), 0.5)
    torch.manual_seed(2); a = E.random_intensity(x, 1.0, 0.0)
    torch.manual_seed(2); b = E.random_intensity(x, 1.0, 0.0, 0.0, 0.4)
    assert torch.equal(a, b)  # the default is 0.4: old runs keep their random numbers
    torch.manual_seed(2); wide = E.augment(x, 1.0, 0.0, options={"gamma_log": 0.8})
    torch.manual_seed(2); narrow = E.augment(x, 1.0, 0.0)
    # contrast, brightness and noise draw the same numbers, so only the gamma spread differs
    assert wide.mean((1, 2, 3)).std() > 1.5 * narrow.mean((1, 2, 3)).std()


def test_dim_lesions_scales_only_masked_pixels_of_chosen_images():
    torch.manual_seed(0)
    x = torch.full((64, 1, 8, 8), 0.8)
    lesion = torch.zeros_like(x)
    lesion[:32, :, 2:5, 2:5] = 1  # half the images carry a lesion
    y = E.dim_lesions(x, lesion, 0.5)
    assert torch.equal(y[32:], x[32:])                            # no mask: untouched
    assert torch.equal(y * (1 - lesion), x * (1 - lesion))        # outside the lesion: untouched
    inside = y[:32, 0, 3, 3]
    dimmed = inside < 0.8
    assert 8 <= int(dimmed.sum()) <= 24                           # about half of them
    assert (inside[dimmed] >= 0.8 * 0.35 - 1e-6).all() and inside.max() <= 0.8
    assert torch.equal(E.dim_lesions(x, lesion, 0.0), x)


def test_augmented_batch_dims_lesions_on_request_and_keeps_the_default_stream():
    torch.manual_seed(0)
    images = (torch.rand(8, 1, 16, 16) * 255).to(torch.uint8)
    les = torch.zeros(8, 1, 16, 16, dtype=torch.uint8)
    les[:, :, 4:12, 4:12] = 1
    lesions = (les, torch.ones(8, dtype=torch.bool))
    masks = torch.zeros(8, 2, dtype=torch.bool)
    masks[:, 0] = True
    idx = torch.arange(8)
    run = lambda opts: E._augmented_batch(images, masks, lesions, idx, torch.device("cpu"), 1.0, 0.0, None, opts)  # noqa: E731
    # off (by default or at 0) it is the path before dimming existed: same batch, and no random
    # number drawn, so the next batch of an old recipe is what it was
    torch.manual_seed(3)
    ref, lref = E.augment_carrying(images.float().div(255), les.float(), 1.0, 0.0, None, None)
    after_ref = torch.rand(4)
    for opts in (None, {"lesion_dim_p": 0.0}):
        torch.manual_seed(3); b, lb = run(opts)
        assert torch.equal(b, ref) and torch.equal(lb, lref) and torch.equal(torch.rand(4), after_ref)
    torch.manual_seed(3); a, la = run(None)
    torch.manual_seed(3); off, _ = E._augmented_batch(images, masks, lesions, idx, torch.device("cpu"), 0.0, 0.0,
                                                      None, {"lesion_dim_p": 1.0})
    assert torch.equal(off, images.float().div(255))   # strength 0 (evaluation): nothing dimmed
    coarse = masks.clone(); coarse[:, 1] = True          # a coarse label: no mask counts, nothing dimmed
    torch.manual_seed(3); d, ld = E._augmented_batch(images, coarse, lesions, idx, torch.device("cpu"), 1.0, 0.0,
                                                     None, {"lesion_dim_p": 1.0})
    assert torch.equal(d, a) and not ld.any()
    torch.manual_seed(3); c, lc = run({"lesion_dim_p": 1.0})
    assert torch.equal(lc, la)                         # the same geometry, the mask unchanged
    inside = la > 0.5
    assert (c[inside] <= a[inside] + 1e-6).all() and (c[inside] < a[inside] - 1e-3).any()
    assert torch.equal(c[la == 0], a[la == 0])


# ----------------------------------------------------------------------------- cache and loops
def _write_images(root, n=6):
    paths = []
    for k in range(n):
        p = root / f"img{k}.png"
        Image.fromarray((synthetic_head(label=False) * 255 * (0.5 + k / 10)).clip(0, 255)
                        .astype(np.uint8)).save(p)
        paths.append(p)
    return [D.Sample(str(p), p.name, "glioma" if k % 2 else "notumor", "x") for k, p in enumerate(paths)]


def _head_with_rim(size=192, centre=(0.5, 0.5)) -> tuple[torch.Tensor, torch.Tensor]:
    """A head crop: a grey brain (0.5) with a dark ventricle (0.05) and a bright spot (0.8, under
    the 'lesion' returned with it), inside a bright rim (0.9, the skull: 4 % of the radius)."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - centre[0] * size, xx - centre[1] * size)
    img = np.zeros((size, size), np.float32)
    img[r < 0.35 * size] = 0.9  # the head fills 70 % of the frame, so only a crop can fill it
    img[r < 0.335 * size] = 0.5
    img[(abs(yy - size / 2) < 0.05 * size) & (abs(xx - size / 2) < 0.1 * size)] = 0.05
    spot = (abs(yy - 0.5 * size) < 0.05 * size) & (abs(xx - 0.7 * size) < 0.05 * size)
    img[spot] = 0.8
    return torch.from_numpy(img)[None, None], torch.from_numpy(spot.astype(np.float32))[None, None]


def test_strip_and_crop_removes_the_rim_fills_the_frame_and_moves_the_lesion_alike():
    x, lesion = _head_with_rim()
    x, lesion = x.repeat(6, 1, 1, 1), lesion.repeat(6, 1, 1, 1)
    torch.manual_seed(0)
    y, ly = E.strip_and_crop(x, lesion, 1.0)
    for i in range(6):  # each with its own threshold and depth
        img, les = y[i, 0], ly[i, 0]
        assert img.max() < 0.85                              # the bright rim is gone
        rows = torch.nonzero(img.amax(1) > 0.2).flatten()
        assert rows.max() - rows.min() >= 0.85 * 192         # the brain fills the frame (the head filled 70 %)
        assert img[94:98, 94:98].max() < 0.1                 # the dark ventricle stays inside, dark
        on = les > 0.5
        assert on.sum() > 0 and (img[on] > 0.6).float().mean() > 0.95  # the lesion still lies on the spot
    blank = torch.zeros(2, 1, 32, 32)
    assert torch.equal(E.strip_and_crop(blank, None, 1.0)[0], blank)  # nothing to strip: unchanged


def test_strip_and_crop_centres_an_off_centre_brain_with_the_preprocessing_margin():
    x, _ = _head_with_rim(centre=(0.4, 0.62))  # the head up and to the right; the ventricle and spot stay put
    torch.manual_seed(1)
    y, _ = E.strip_and_crop(x.repeat(4, 1, 1, 1), None, 1.0)
    for img in y[:, 0]:
        rows = torch.nonzero(img.amax(1) > 0.2).flatten().float()
        cols = torch.nonzero(img.amax(0) > 0.2).flatten().float()
        assert abs((rows.min() + rows.max()) / 2 - 95.5) <= 2 and abs((cols.min() + cols.max()) / 2 - 95.5) <= 2
        # head_bbox's 4 % margin of the frame it crops from (7.7 px of 192), enlarged with the brain
        assert 6 <= rows.min() <= 16 and 175 <= rows.max() <= 185


@pytest.mark.parametrize("option", ["strip_crop_p", "marks_p"])
def test_an_added_augmentation_is_off_by_default_and_keeps_the_default_stream(option):
    x = _head_with_rim()[0].repeat(4, 1, 1, 1)
    torch.manual_seed(5)   # the reference composed by hand, not by augment: a change there shows
    ref = E.random_intensity(E.random_affine(x, 1.0, None), 1.0, 0.0)
    after_ref = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(E.augment(x, 1.0, 0.0, options={option: 0.0}), ref)
    assert torch.equal(torch.rand(3), after_ref)
    torch.manual_seed(5)
    assert not torch.equal(E.augment(x, 1.0, 0.0, options={option: 1.0}), ref)
    assert torch.equal(E.augment(x, 0.0, 0.0, options={option: 1.0}), x)  # evaluation: untouched


def test_draw_marks_burns_thin_marks_into_the_chosen_images():
    x = torch.full((32, 1, 96, 96), 0.5)  # mid-grey: a black, grey or white mark shows on it
    torch.manual_seed(0)
    out = E.draw_marks(x, 1.0)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1
    changed = (out != x).flatten(1)
    share = changed.float().mean(1)
    # every image marked (p = 1); the marks are lines and labels, not fills of the image
    assert bool((share > 0).all()) and float(share.max()) < 0.2
    torch.manual_seed(0)
    assert torch.equal(E.draw_marks(x, 0.0), x)
    torch.manual_seed(0)
    few = (E.draw_marks(x, 0.25) != x).flatten(1).any(1).float().mean()
    assert 0.05 < float(few) < 0.6  # about a quarter of 32
    again = E.draw_marks(x, 1.0)   # the next batch gets other marks, and not only white ones
    assert not torch.equal(again, out)
    marked = torch.cat([out, again])[torch.cat([out, again]) != 0.5]
    assert (marked < 0.45).any() and ((marked > 0.55) & (marked < 0.97)).any() and (marked > 0.99).any()
    half = E.draw_marks(x.to(torch.bfloat16), 1.0)   # as a bf16 batch arrives: no dtype clash
    assert half.dtype == torch.bfloat16 and (half != x.to(torch.bfloat16)).any()


def test_cache_images_shape_dtype_and_disk_cache(tmp_path, private_cache):
    samples = _write_images(tmp_path)
    spec = {**DEFAULT_SPEC, "size": 32}
    imgs = E.cache_images(samples, spec, workers=1)
    assert imgs.shape == (6, 1, 32, 32) and imgs.dtype == torch.uint8
    files = list(private_cache.parent.glob("images-*.npy"))
    assert len(files) == 1
    # The second call reads the cache, a different spec does not.
    assert torch.equal(E.cache_images(samples, spec, workers=1), imgs)
    E.cache_images(samples, {**spec, "size": 24}, workers=1)
    assert len(list(private_cache.parent.glob("images-*.npy"))) == 2


def test_target_masks_for_fine_and_coarse_labels():
    s = [D.Sample("a", "a", lab, lab) for lab in ("glioma", "tumor", "notumor")]
    m = E.target_masks(s, ["glioma", "meningioma", "pituitary", "notumor"])
    assert m.tolist() == [[True, False, False, False], [True, True, True, False],
                          [False, False, False, True]]


def test_train_one_epoch_and_predict_logits():
    torch.manual_seed(0)
    model = create_model("simple_cnn", 3)
    images = (torch.rand(20, 1, 24, 24) * 255).to(torch.uint8)
    masks = torch.zeros(20, 3, dtype=torch.bool)
    masks[torch.arange(20), torch.arange(20) % 3] = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    spec = {**DEFAULT_SPEC, "size": 24}
    stats = E.train_one_epoch(model, images, masks, torch.arange(20), opt, None, spec,
                              torch.device("cpu"), batch_size=8, progress=False)
    assert np.isfinite(stats["loss"]) and 0 <= stats["acc"] <= 1 and stats["images_per_s"] > 0
    logits = E.predict_logits(model, images, spec, torch.device("cpu"), batch_size=7)
    assert logits.shape == (20, 3)
    tta = E.predict_logits(model, images, spec, torch.device("cpu"), tta=MIRROR_ALWAYS)
    flipped = E.predict_logits(model, torch.flip(images, dims=[3]), spec, torch.device("cpu"))
    assert torch.allclose(tta, (logits + flipped) / 2, atol=1e-5)
    # selective: only the rows below the confidence are averaged with their mirror image
    conf = torch.softmax(logits, 1).amax(1)
    # half-way between two confidences: the median itself is a row's, and its logits computed in
    # another batch (other thread counts) fall on either side of it by float noise
    ranked = conf.sort().values
    cut = float((ranked[9] + ranked[10]) / 2)
    sel = E.predict_logits(model, images, spec, torch.device("cpu"),
                           tta={"kind": "mirror", "below_confidence": cut, "selection_temperature": 1.0})
    low = conf < cut
    assert 0 < int(low.sum()) < 20
    assert torch.allclose(sel[low], tta[low], atol=1e-5) and torch.allclose(sel[~low], logits[~low], atol=1e-5)
    assert not torch.allclose(sel[~low], tta[~low], atol=1e-5)
    scaled = E.predict_logits(model, images, spec, torch.device("cpu"),
                              tta={"kind": "mirror", "below_confidence": cut, "selection_temperature": 1.0,
                                   "scale": 1.5})
    assert torch.allclose(scaled[low], 1.5 * tta[low], atol=1e-5)
    assert torch.allclose(scaled[~low], logits[~low], atol=1e-5)
    ev = E.evaluate_split(model, images, masks, spec, torch.device("cpu"))
    assert np.isfinite(ev["loss"]) and 0 <= ev["acc"] <= 1
    # progressive resizing: train and validate at a smaller size than the cached images
    small = E.train_one_epoch(model, images, masks, torch.arange(20), opt, None, spec,
                              torch.device("cpu"), batch_size=8, progress=False, out_size=16)
    assert np.isfinite(small["loss"])
    assert E.predict_logits(model, images, spec, torch.device("cpu"), out_size=16).shape == (20, 3)


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_with_weights_only(tmp_path):
    torch.manual_seed(0)
    model = create_model("cnn_bn", 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=10)
    rng = torch.get_rng_state()
    history = [{"epoch": 1, "train": {"loss": 0.5}, "val": {"loss": 0.6, "acc": 0.7}}]
    path = tmp_path / "checkpoint.pt"
    E.save_checkpoint(path, model=model.state_dict(), optimizer=opt.state_dict(),
                      scheduler=sched.state_dict(), epoch=0, history=history, best=0.6, bad=0,
                      rng=rng, args={"data": ["a", "b"], "lr": 1e-3})
    assert path.exists() and not path.with_suffix(".tmp").exists()
    ck = E.load_checkpoint(path)
    assert ck["epoch"] == 0 and ck["history"] == history and ck["args"]["data"] == ["a", "b"]
    fresh = create_model("cnn_bn", 4)
    fresh.load_state_dict(ck["model"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(ck["optimizer"])
    assert torch.equal(ck["rng"], rng)
    assert ck["scheduler"]["total_steps"] == 10


def test_checkpoint_refuses_arbitrary_objects(tmp_path):
    import argparse
    import pickle
    path = tmp_path / "bad.pt"
    E.save_checkpoint(path, args=argparse.Namespace(a=1))
    # weights_only loading refuses the pickled class (torch raises pickle's UnpicklingError)
    with pytest.raises(pickle.UnpicklingError,
                       match=r"(?s)Weights only load failed.*Unsupported global: GLOBAL argparse\.Namespace"):
        E.load_checkpoint(path)


def test_a_cache_is_never_seen_half_written(tmp_path, private_cache, monkeypatch):
    """Two runs side by side (the GPU machine's) fill one cache: the second once read the first's
    half-written file and stopped (BadZipFile). A write stopped part-way leaves no cache file."""
    samples = _write_images(tmp_path)
    spec = {**DEFAULT_SPEC, "size": 32}
    real_save = np.save

    def save_then_die(file, arr, *a, **k):
        with open(file, "wb") as f:
            f.write(b"\x93NUMPY half of it")
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", save_then_die)
    with pytest.raises(OSError, match="disk full"):
        E.cache_images(samples, spec, workers=1)
    assert list(private_cache.parent.iterdir()) == []  # neither the cache nor a stray temporary
    monkeypatch.setattr(np, "save", real_save)
    assert E.cache_images(samples, spec, workers=1).shape == (6, 1, 32, 32)


def test_the_served_probabilities_are_divided_by_the_cards_temperature(random_weights, tmp_path, monkeypatch):
    """Every fixture card says T = 1, where dividing by it or not gives the same numbers: a
    Predictor that served the raw softmax passed every test but one."""
    from conftest import edited_weights
    from core.inference import Predictor
    monkeypatch.setenv("BT_PRECISION", "fp32")   # the logits below are fp32's; a bf16 CPU serves bf16
    t = 2.5
    pred = Predictor(edited_weights(random_weights, tmp_path / "w", {"calibration": {"method": "test", "temperature": t}}))
    x = torch.rand(3, 1, *(2 * [pred.spec["size"]]))
    with torch.no_grad():
        logits = pred.model(x.to(pred.device)).float()
    served = pred.probabilities(x)
    assert np.allclose(served, torch.softmax(logits / t, 1).numpy(), atol=1e-5)
    assert not np.allclose(served, torch.softmax(logits, 1).numpy(), atol=1e-3)
