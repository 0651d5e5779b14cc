"""Training the class maps on tumour masks: mask cache, aligned augmentation, the pointing loss,
and train.py --mask-loss end to end on generated LGG-like data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import core.data as D
import core.engine as E
from core.models import cam_features, create_model, has_class_maps
from core.preprocess import DEFAULT_SPEC

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("private_cache")  # conftest: a per-test hash cache


def blob_batch(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy grey 'heads' with one bright disc each at a random place; the disc is the mask."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy, cx = [torch.randint(size // 5, 4 * size // 5, (n,), generator=g) for _ in range(2)]
    r = size // 10
    mask = ((yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2 <= r * r).float()[:, None]
    img = 0.35 + 0.1 * torch.rand(n, 1, size, size, generator=g) + 0.5 * mask
    return (img.clamp(0, 1) * 255).to(torch.uint8), mask.to(torch.uint8)


def test_random_affine_moves_a_stacked_mask_with_the_image():
    img, mask = blob_batch(6, 64, seed=1)
    both = torch.cat([mask.float(), mask.float()], 1)   # the image channel is the mask itself
    torch.manual_seed(0)
    out = E.random_affine(both, 1.0, out_size=48)
    assert out.shape == (6, 2, 48, 48)
    assert torch.equal(out[:, 0], out[:, 1])            # one transform for both channels
    assert not torch.allclose(out[:, :1], E.random_affine(mask.float(), 0.0, out_size=48), atol=0.1)


def test_train_one_epoch_warps_each_mask_with_its_image_and_removes_its_hook(monkeypatch):
    """Spy on what the pointing loss receives: the lesion must lie on the bright disc of the
    augmented image it belongs to, for images with a mask and a fine label only."""
    images, lesion = blob_batch(8, 64, seed=5)
    allowed = torch.zeros(8, 2, dtype=torch.bool)
    allowed[:, 0] = True
    allowed[7, :] = True                                 # a coarse label: no pointing loss
    known = torch.ones(8, dtype=torch.bool)
    known[6] = False                                     # no mask known
    seen = {}
    real_intensity, real_pointing = E.random_intensity, E.pointing_loss
    monkeypatch.setattr(E, "random_intensity",
                        lambda x, *a: seen.setdefault("x", x.clone()) is None or real_intensity(x, *a))
    monkeypatch.setattr(E, "pointing_loss",
                        lambda maps, les: seen.setdefault("lesion", les.clone()) is None or real_pointing(maps, les))
    model = create_model("resnet18", 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.manual_seed(0)
    stats = E.train_one_epoch(model, images, allowed, torch.arange(8), opt, None,
                              {**DEFAULT_SPEC, "size": 64}, torch.device("cpu"), batch_size=8,
                              progress=False, out_size=48, lesions=(lesion, known), mask_weight=1.0)
    assert "pointing_loss" in stats
    x, les = seen["x"], seen["lesion"]
    assert x.shape == les.shape == (8, 1, 48, 48)
    for i in range(6):                                   # warped alike: the disc is where the mask is
        disc, m = x[i, 0] > 0.75, les[i, 0] > 0.5
        assert m.sum() > 10 and (disc & m).sum() / (disc | m).sum() > 0.6
    assert les[6].sum() == 0 and les[7].sum() == 0
    from core.models import saliency_layer
    assert not saliency_layer(model)._forward_hooks


def test_pointing_loss_rewards_a_peak_on_the_lesion_and_ignores_a_constant():
    lesion = torch.zeros(3, 1, 60, 60)
    lesion[:, :, :20, :20] = 1                          # the top-left cell of a 3 x 3 grid
    lesion[2] = 0                                       # no lesion left in the frame: not counted
    flat = torch.zeros(3, 3, 3)
    on, off = flat.clone(), flat.clone()
    on[:, 0, 0], off[:, 2, 2] = 4.0, 4.0
    l_flat, l_on, l_off = (E.pointing_loss(m, lesion).item() for m in (flat, on, off))
    assert l_on < l_flat < l_off
    assert l_flat == pytest.approx(np.log(9), abs=1e-5)
    assert E.pointing_loss(on + 7.0, lesion).item() == pytest.approx(l_on, abs=1e-5)
    maps = torch.zeros(1, 3, 3, requires_grad=True)
    none = E.pointing_loss(maps, torch.zeros(1, 1, 60, 60))
    none.backward()                                     # a batch without lesions still back-props
    assert none.item() == 0 and torch.equal(maps.grad, torch.zeros(1, 3, 3))


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b0"])
def test_class_maps_average_to_the_logits(arch):
    torch.manual_seed(0)
    model = create_model(arch, 4).eval()
    assert has_class_maps(model)
    feats, logits = cam_features(model, torch.rand(2, 1, 64, 64))
    head = model.get_submodule(model.cam_head)
    maps = E.class_maps(model, feats)
    assert maps.shape[:2] == (2, 4)
    assert torch.allclose(maps.mean(dim=(2, 3)) + head.bias, logits, atol=1e-4)
    assert not has_class_maps(create_model("simple_cnn", 4))


def _pointing_after(mask_weight: float) -> float:
    """Train a small ResNet on blob images (all one class) and return the held-out pointing loss
    of that class's map."""
    torch.manual_seed(0)
    model = create_model("resnet18", 2)
    images, lesion = blob_batch(96, 96, seed=2)
    allowed = torch.zeros(96, 2, dtype=torch.bool)
    allowed[:, 0] = True
    known = torch.ones(96, dtype=torch.bool)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    spec = {**DEFAULT_SPEC, "size": 96}
    for _ in range(4):
        stats = E.train_one_epoch(model, images, allowed, torch.randperm(96), opt, None, spec,
                                  torch.device("cpu"), batch_size=16, progress=False,
                                  lesions=(lesion, known), mask_weight=mask_weight)
    assert ("pointing_loss" in stats) == (mask_weight > 0)
    test_img, test_lesion = blob_batch(32, 96, seed=3)
    from core.preprocess import normalise
    feats, _ = cam_features(model.eval(), normalise(test_img.float() / 255, spec))
    return E.pointing_loss(E.class_maps(model, feats)[:, 0], test_lesion).item()


def test_mask_weight_moves_the_class_map_onto_the_lesion():
    # Same seed, data and steps; only the loss differs. Chance (a flat map) is log(9) = 2.2.
    with_masks, without = _pointing_after(1.0), _pointing_after(0.0)
    assert with_masks < without - 0.3 and with_masks < np.log(9) - 0.3


def _lgg_like(root: Path, n: int = 12) -> None:
    """root/glioma, root/notumor and root/masks/<stem>.png as in the shared LGG folder."""
    for c in ("glioma", "notumor"):
        (root / c).mkdir(parents=True)
    (root / "masks").mkdir()
    imgs, masks = blob_batch(2 * n, 64, seed=4)
    for k in range(2 * n):
        c = "glioma" if k < n else "notumor"
        img = imgs[k, 0].numpy() if c == "glioma" else np.full((64, 64), 110, np.uint8)
        img = img.copy()
        img[:, :6] = 0                                  # a dark border for the head crop
        Image.fromarray(img).save(root / c / f"TCGA_XX_{k:04d}_1.png")
        m = masks[k, 0].numpy() * 255 if c == "glioma" else np.zeros((64, 64), np.uint8)
        Image.fromarray(m.astype(np.uint8)).save(root / "masks" / f"TCGA_XX_{k:04d}_1.png")


def test_cache_lesions_reads_masks_beside_the_images(tmp_path, private_cache):
    _lgg_like(tmp_path / "lgg", n=4)
    samples = D.discover(tmp_path / "lgg").samples
    samples.append(D.Sample(str(tmp_path / "nomask.png"), "nomask.png", "glioma", "glioma"))
    Image.fromarray(np.full((64, 64), 90, np.uint8)).save(tmp_path / "nomask.png")
    spec = {**DEFAULT_SPEC, "size": 32}
    masks, known = E.cache_lesions(samples, spec, workers=1)
    assert masks.shape == (9, 1, 32, 32) and masks.dtype == torch.uint8
    assert known.tolist() == [True] * 8 + [False]
    glioma = [i for i, s in enumerate(samples[:8]) if s.label == "glioma"]
    assert all(masks[i].sum() > 0 for i in glioma)
    assert masks[[i for i in range(8) if i not in glioma]].sum() == 0
    assert len(list(private_cache.parent.glob("lesions-*.npz"))) == 1
    again = E.cache_lesions(samples, spec, workers=1)
    assert torch.equal(again[0], masks) and torch.equal(again[1], known)
    # a corrected mask is read afresh (the cache key stamped the images only)
    first = samples[glioma[0]]
    mfile = tmp_path / "lgg" / "masks" / Path(first.rel).name
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(mfile)
    os.utime(mfile, ns=(1, 1))
    fixed = E.cache_lesions(samples, spec, workers=1)
    assert fixed[0][glioma[0]].sum() == 0 and len(list(private_cache.parent.glob("lesions-*.npz"))) == 2


def test_train_py_mask_loss_end_to_end_and_refused_for_a_model_without_class_maps(tmp_path):
    _lgg_like(tmp_path / "lgg")
    env = {**os.environ, "BT_CACHE": str(tmp_path / "cache")}
    common = [sys.executable, "train.py", "--data", str(tmp_path / "lgg"), "--img", "64",
              "--epochs", "1", "--batch-size", "8", "--workers", "1", "--no-progress",
              "--mask-loss", "0.5"]
    r = subprocess.run([*common, "--arch", "resnet18", "--out", str(tmp_path / "run")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    rec = card["training"]["mask_loss"]
    assert rec["weight"] == 0.5 and 0 < rec["train_images_with_mask"] <= card["split"]["sizes"]["train"]
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert np.isfinite(hist[0]["train"]["pointing_loss"])
    r = subprocess.run([*common, "--arch", "simple_cnn", "--out", str(tmp_path / "bad")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "--mask-loss" in r.stderr
    assert not (tmp_path / "bad").exists()              # refused before anything is written


def test_a_damaged_or_mis_sized_mask_is_left_out_not_fatal(tmp_path, private_cache, capsys):
    """An unreadable X_mask ended a --mask-loss run; one of another size was used, misaligned."""
    _lgg_like(tmp_path / "lgg", n=3)
    samples = D.discover(tmp_path / "lgg").samples
    glioma = [s for s in samples if s.label == "glioma"]
    (tmp_path / "lgg" / "masks" / Path(glioma[0].rel).name).write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray(np.full((40, 100), 255, np.uint8)).save(tmp_path / "lgg" / "masks" / Path(glioma[1].rel).name)
    masks, known = E.cache_lesions(samples, {**DEFAULT_SPEC, "size": 32}, workers=1)
    assert [known[samples.index(s)].item() for s in glioma] == [False, False, True]
    assert masks[samples.index(glioma[1])].sum() == 0
    out = capsys.readouterr().out
    assert "note: 2 masks not used" in out and "could not be read" in out and "100 x 40 px, the scan 64 x 64" in out
