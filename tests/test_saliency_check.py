"""Saliency against tumour masks: scores, one-pass maps, contours, mask pairing, the CLI."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_weights
from core import app_support as app
from core.cli import main
from core.models import create_model
from core.reader import ScanImage
from core.saliency import (METHODS, contour_overlay, default_method, mask_path_for, mask_scores,
                           read_mask, saliency_map, saliency_maps)
from core.metrics import wilson
from core.saliency_check import BASELINES, best_method, lesion_class, spread, to_markdown
from test_saliency import Stub, square_scan


# ----------------------------------------------------------------------------- scores
def test_pointing_and_energy_against_a_hand_made_map():
    mask = np.zeros((40, 40), bool)
    mask[10:20, 10:20] = True                      # 100 of 1600 pixels
    cam = np.full((40, 40), 0.1, np.float32)
    cam[12, 15] = 1.0                              # the peak, inside
    inside = mask_scores(cam, mask, tolerance=0)
    assert inside["pointing_hit"] is True
    expected = (99 * 0.1 + 1.0) / (1599 * 0.1 + 1.0)
    assert inside["energy_in_mask"] == pytest.approx(expected, rel=1e-5)
    cam[12, 15], cam[35, 35] = 0.1, 1.0            # the peak far outside
    outside = mask_scores(cam, mask, tolerance=0.1)
    assert outside["pointing_hit"] is False
    assert outside["energy_in_mask"] == pytest.approx(100 * 0.1 / (1599 * 0.1 + 1.0), rel=1e-5)
    cam[35, 35], cam[10, 23] = 0.1, 1.0            # 3 px off the edge: a hit at 4 px, not at 2
    assert mask_scores(cam, mask, tolerance=4 / 40)["pointing_hit"] is True
    assert mask_scores(cam, mask, tolerance=2 / 40)["pointing_hit"] is False


def test_wilson_interval_and_best_method():
    lo, hi = wilson(8, 10)
    assert lo < 0.8 < hi and 0 <= lo and hi <= 1
    rows = [{"method": "A", "baseline": False, "pointing_glioma": 0.5, "energy_glioma": 0.2},
            {"method": "B", "baseline": False, "pointing_glioma": 0.5, "energy_glioma": 0.3},
            {"method": "random map", "baseline": True, "pointing_glioma": 0.9, "energy_glioma": 0.9}]
    assert best_method(rows) == "B"  # ties broken by energy; a baseline is never the default
    rounding = [{"method": "Grad-CAM", "baseline": False, "pointing_glioma": 0.8867, "energy_glioma": 0.17258768},
                {"method": "HiResCAM", "baseline": False, "pointing_glioma": 0.8867, "energy_glioma": 0.17258769}]
    assert best_method(rounding) == "Grad-CAM"  # the same map up to float rounding: the first kept
    assert spread(list(range(10)), 3) == [0, 4, 9] and spread([1, 2], 5) == [1, 2]


def test_one_pass_maps_equal_one_map_per_method():
    torch.manual_seed(0)
    p = Stub(create_model("cnn_bn", 4))
    for target in ("glioma", "notumor", None):
        maps = saliency_maps(p, square_scan(), list(METHODS), target)
        assert list(maps) == list(METHODS)
        for m, cam in maps.items():
            np.testing.assert_allclose(cam, saliency_map(p, square_scan(), m, target), atol=1e-5)
    assert not p.lock.locked() and all(q.grad is None for q in p.model.parameters())


def test_default_method_comes_from_the_card():
    assert default_method({}) == default_method(None) == "Grad-CAM"
    assert default_method({"saliency": {"default_method": "gradcam++"}}) == "Grad-CAM++"
    assert default_method({"saliency": {"default_method": "occlusion"}}) == "Grad-CAM"


# ----------------------------------------------------------------------------- contours and masks
def test_contour_overlay_outlines_the_mask_only():
    rgb = np.full((64, 64, 3), 100, np.uint8)
    mask = np.zeros((32, 32), bool)                # half the display size: resized
    mask[8:16, 8:16] = True
    out = contour_overlay(rgb, mask)
    assert out.shape == rgb.shape and out.dtype == np.uint8 and (rgb == 100).all()
    drawn = (out != 100).any(axis=2)
    ys, xs = np.nonzero(drawn)
    assert drawn.any() and ys.min() == 16 and ys.max() == 31 and xs.min() == 16 and xs.max() == 31
    assert not drawn[20:28, 20:28].any()           # the inside stays as it was
    # a white ring outside a black one, each 1 px, both inside the mask: seen on any colour
    assert (out[16, 16:32] == 255).all() and (out[31, 16:32] == 255).all()
    assert (out[17, 17:31] == 0).all() and (out[17:31, 17] == 0).all()
    assert set(map(tuple, out[drawn].tolist())) == {(255, 255, 255), (0, 0, 0)}
    assert not (contour_overlay(rgb, np.zeros((64, 64), bool)) != 100).any()


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_pair_masks_takes_x_mask_out_of_the_batch():
    items = [("TCGA_A_1_5.tif", b"img"), ("TCGA_A_1_5_mask.tif", b"mask"),
             ("lonely_mask.tif", b"m2"), ("z.zip/d/s.png", b"i3"), ("z.zip/d/s_mask.png", b"m3"),
             ("z.zip/other/s_mask.png", b"m4"), ("bad_mask.png", ValueError("x")), ("bad.png", b"i5")]
    kept, masks = app.pair_masks(items)
    assert masks == {"TCGA_A_1_5.tif": b"mask", "z.zip/d/s.png": b"m3"}
    assert [n for n, _ in kept] == ["TCGA_A_1_5.tif", "lonely_mask.tif", "z.zip/d/s.png",
                                    "z.zip/other/s_mask.png", "bad_mask.png", "bad.png"]


def test_input_mask_and_note_on_an_upload():
    grey = np.zeros((96, 96), np.float32)
    grey[8:88, 8:88] = 0.6
    m = np.zeros((96, 96), np.uint8)
    m[20:40, 20:40] = 255
    spec = {"size": 48, "crop": "head", "mean": 0.2, "std": 0.25}
    frame = app.input_mask(ScanImage(grey), _png(m), spec)
    assert frame.shape == (48, 48) and frame.any()
    cam = frame.astype(np.float32)
    assert "peak on the tumour mask" in app.mask_note(cam, frame) and "100%" in app.mask_note(cam, frame)
    assert app.input_mask(ScanImage(grey), _png(m[:50]), spec) is None      # another size
    assert app.input_mask(ScanImage(grey), b"not an image", spec) is None
    assert app.input_mask(ScanImage(grey), None, spec) is None


def test_input_mask_follows_the_readers_reduction_of_a_large_scan():
    from core.reader import MAX_SIDE, read_scan
    side = MAX_SIDE + 512                             # the reader shrinks this scan to MAX_SIDE
    grey = np.zeros((side, side), np.uint8)
    grey[100:-100, 100:-100] = 150
    m = np.zeros((side, side), np.uint8)
    m[600:1200, 700:1300] = 255
    scan = read_scan(_png(grey), "big.png")
    small = scan.pixels.shape[0]
    assert scan.pixels.shape == (small, small) and small <= MAX_SIDE and scan.info["downscaled_from"] == [side, side]
    spec = {"size": 64, "crop": "head", "mean": 0.2, "std": 0.25}
    frame = app.input_mask(scan, _png(m), spec)
    assert frame is not None
    same = app.input_mask(ScanImage(scan.pixels), _png(np.asarray(
        Image.fromarray(m).resize((small, small), Image.Resampling.NEAREST))), spec)
    assert (frame != same).mean() < 0.01             # where a mask drawn on the reduced scan falls
    assert app.input_mask(scan, _png(m[:, :-8]), spec) is None     # another size still does not fit


def test_a_mask_of_another_size_is_refused_from_its_header_not_decoded(tmp_path):
    """A 77 KB PNG of 8,900² pixels named X_mask.png took 575 MB to decode, then was found the
    wrong size; read_mask now refuses it from the header. Measured in a fresh process: the suite's
    own peak memory would hide the decode."""
    import subprocess
    import sys
    big = _png(np.zeros((8900, 8900), np.uint8))
    (tmp_path / "big.png").write_bytes(big)
    code = (f"import resource, numpy as np; from core.masks import input_mask; from core.reader import ScanImage\n"
            f"b = open({str(tmp_path / 'big.png')!r}, 'rb').read()\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "m = input_mask(ScanImage(np.zeros((96, 96), np.float32)), b, {'size': 48, 'crop': 'head', 'mean': 0.2, 'std': 0.25})\n"
            "print(m is None, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    refused, grown_kib = out.stdout.split()
    assert refused == "True" and int(grown_kib) < 40_000, out.stdout + out.stderr    # 8900² would be 77+ MB
    with pytest.raises(ValueError, match="8900 x 8900"):
        read_mask(big, {(96, 96)})
    assert read_mask(_png(np.full((4, 4), 255, np.uint8)), {(4, 4)}).all()


def test_a_flat_map_points_nowhere():
    """argmax of an all-zero map (Grad-CAM of 'notumor') is the top-left pixel: a mask there scored a hit."""
    corner = np.zeros((10, 10), bool)
    corner[:3, :3] = True
    assert mask_scores(np.zeros((10, 10)), corner, 0)["pointing_hit"] is False
    assert mask_scores(np.full((10, 10), 0.4), corner, 0)["pointing_hit"] is False
    assert "flat" in app.mask_note(np.zeros((10, 10), np.float32), corner)
    peak = np.zeros((10, 10))
    peak[1, 1] = 1
    assert mask_scores(peak, corner, 0)["pointing_hit"] is True


@pytest.mark.parametrize("arg", [["--threads", "0"], ["--limit", "-3"], ["--dilate", "-2"]])
def test_saliency_check_refuses_impossible_counts(arg, capsys):
    with pytest.raises(SystemExit) as e:
        main(["saliency-check", "--weights", "weights/x", *arg])
    assert e.value.code == 2 and "must be at least" in capsys.readouterr().err


def test_pair_masks_takes_nifti_gz_masks_as_one_suffix():
    kept, masks = app.pair_masks([("vol.nii.gz", b"v"), ("vol_mask.nii.gz", b"m"), ("b.nii", b"w")])
    assert masks == {"vol.nii.gz": b"m"} and [n for n, _ in kept] == ["vol.nii.gz", "b.nii"]


def test_mask_path_for_both_lgg_layouts(tmp_path):
    (tmp_path / "glioma").mkdir()
    (tmp_path / "masks").mkdir()
    img = tmp_path / "glioma" / "TCGA_CS_1_01.jpg"
    img.write_bytes(b"x")
    assert mask_path_for(img) is None
    (tmp_path / "masks" / "TCGA_CS_1_01.png").write_bytes(_png(np.zeros((4, 4), np.uint8)))
    assert mask_path_for(img) == tmp_path / "masks" / "TCGA_CS_1_01.png"
    kaggle = tmp_path / "glioma" / "TCGA_CS_1_02.tif"
    (tmp_path / "glioma" / "TCGA_CS_1_02_mask.tif").write_bytes(b"m")
    assert mask_path_for(kaggle) == tmp_path / "glioma" / "TCGA_CS_1_02_mask.tif"
    assert not read_mask(tmp_path / "masks" / "TCGA_CS_1_01.png").any()


# ----------------------------------------------------------------------------- the CLI
def lgg_like(root: Path, n: int = 4) -> list[str]:
    """root/{glioma,notumor}/TCGA_XX_0001_NN.jpg heads with a bright lesion, masks in root/masks."""
    yy, xx = np.mgrid[:96, :96]
    rels = []
    for k in range(n):
        head = (((yy - 48) / 40) ** 2 + ((xx - 48) / 34) ** 2 < 1) * 0.5
        lesion = ((yy - 30 - 8 * k) ** 2 + (xx - 35) ** 2) < 64
        for d in ("glioma", "notumor", "masks"):
            (root / d).mkdir(parents=True, exist_ok=True)
        name = f"TCGA_XX_0001_{k:02d}"
        Image.fromarray(((head + 0.4 * lesion) * 255).astype(np.uint8)).save(root / "glioma" / f"{name}.jpg")
        empty = k == n - 1  # a mask file with no lesion: skipped, not scored
        Image.fromarray((lesion * 255 * (not empty)).astype(np.uint8)).save(root / "masks" / f"{name}.png")
        rels.append(f"glioma/{name}.jpg")
    Image.fromarray((head * 255).astype(np.uint8)).save(root / "notumor" / "TCGA_XX_0001_99.jpg")
    return rels + ["notumor/TCGA_XX_0001_99.jpg"]


def lgg_weights(tmp_path: Path) -> tuple[Path, dict]:
    """(a random model whose card names an lgg-like source and whose split tests it, its card)."""
    w = make_weights(tmp_path / "w")
    rels = lgg_like(tmp_path / "lgg")
    card = json.loads((w / "card.json").read_text())
    card["sources"].append({"name": "lgg", "path": str(tmp_path / "lgg")})
    (w / "card.json").write_text(json.dumps(card))
    (w / "split.json").write_text(json.dumps({"files": {"lgg": {"test": rels, "train": []}}}))
    return w, card


def test_cli_on_a_tiny_lgg_like_folder(tmp_path, capsys):
    w, card = lgg_weights(tmp_path)
    assert main(["saliency-check", "--weights", str(w), "--limit", "0", "--data-config", ""]) == 0
    out = json.loads((w / "saliency_eval.json").read_text())
    assert [r["method"] for r in out["rows"]] == [*METHODS, *BASELINES]
    assert out["settings"]["slices_with_mask"] == 4 and len(out["slices"]) == 3
    assert out["skipped_empty"] == ["TCGA_XX_0001_03.jpg"]
    for r in out["rows"]:
        assert 0 <= r["pointing_glioma"] <= 1 and 0 <= r["energy_predicted"] <= 1
    assert 0 < out["chance"]["area_share"] < out["chance"]["grown_share"] < 1
    saved = json.loads((w / "card.json").read_text())["saliency"]
    assert saved["default_method"] == out["best"] and saved["measured"]["n_slices"] == 3
    assert default_method({"saliency": saved}) == (out["best"] if out["best_beats_floors"] else "Grad-CAM")
    printed = capsys.readouterr().out
    assert "| method | pointing game" in printed and "mask area (chance)" in printed
    assert to_markdown(out).splitlines()[0] == printed.splitlines()[0]
    # --no-card and --json leave the card alone and write where asked.
    (w / "card.json").write_text(json.dumps(card))
    assert main(["saliency-check", "--weights", str(w), "--limit", "2", "--data-config", "",
                 "--no-card", "--json", str(tmp_path / "s.json")]) == 0
    assert "saliency" not in json.loads((w / "card.json").read_text())
    assert json.loads((tmp_path / "s.json").read_text())["settings"]["slices_used"] == 2


def test_a_yes_no_model_is_checked_on_its_tumour_class(tmp_path):
    """LGG's lesions are gliomas: a yes/no model's maps are checked for its 'tumor' class."""
    from safetensors.torch import save_file
    assert lesion_class(["glioma", "notumor"]) == "glioma" and lesion_class(["tumor", "notumor"]) == "tumor"
    assert lesion_class(["meningioma", "notumor"]) is None
    w = make_weights(tmp_path / "w")
    rels = lgg_like(tmp_path / "lgg")
    card = json.loads((w / "card.json").read_text())
    card["sources"].append({"name": "lgg", "path": str(tmp_path / "lgg")})
    card["classes"] = ["tumor", "notumor"]
    card.pop("calibration", None)
    (w / "card.json").write_text(json.dumps(card))
    save_file({k: v.contiguous() for k, v in create_model("simple_cnn", 2).state_dict().items()},
              w / "model.safetensors")
    (w / "split.json").write_text(json.dumps({"files": {"lgg": {"test": rels, "train": []}}}))
    assert main(["saliency-check", "--weights", str(w), "--limit", "0", "--data-config", "", "--no-card"]) == 0
    out = json.loads((w / "saliency_eval.json").read_text())
    assert len(out["slices"]) == 3 and {s["pred"] for s in out["slices"]} <= {"tumor", "notumor"}
    assert out["predicted_glioma"] == sum(s["pred"] == "tumor" for s in out["slices"])
    card["classes"] = ["meningioma", "notumor"]  # no class for a glioma: one sentence, exit 2
    (w / "card.json").write_text(json.dumps(card))
    assert main(["saliency-check", "--weights", str(w), "--data-config", ""]) == 2


# ----------------------------------------------------------------------------- the app
@pytest.fixture
def masked_app(tmp_path, monkeypatch):
    """The app on a random model whose card names EigenCAM and whose synth data has a mask."""
    return _masked_app(tmp_path, monkeypatch)


def _masked_app(tmp_path, monkeypatch, refused: bool = False):
    """``refused``: the missed scan's record is one the out-of-distribution gate refused."""
    from streamlit.testing.v1 import AppTest
    from conftest import REPO
    w = make_weights(tmp_path / "w")
    card = json.loads((w / "card.json").read_text())
    card["saliency"] = {"default_method": "EigenCAM", "measured": {}}
    (w / "card.json").write_text(json.dumps(card))
    ev = json.loads((w / "eval.json").read_text())
    for r in ev["predictions"]:  # one tumour missed for sure, so the gallery shows it
        if r["source"] == "synth" and r["file"] == "glioma/0.png":
            r.update(pred="notumor", tumour_probability=0.2, confidence=0.8, in_distribution=not refused,
                     probs={"glioma": 0.1, "meningioma": 0.05, "pituitary": 0.05, "notumor": 0.8})
    (w / "eval.json").write_text(json.dumps(ev))
    (w / "data" / "synth" / "masks").mkdir()
    m = np.zeros((96, 96), np.uint8)
    m[30:50, 25:45] = 255
    Image.fromarray(m).save(w / "data" / "synth" / "masks" / "0.png")
    monkeypatch.setenv("BT_WEIGHTS", str(w))
    return AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=120).run()


def _captions(at) -> str:
    return " ".join([c for im in at.image for c in im.captions] + [c.value for c in at.caption])


def test_diagnose_pairs_an_uploaded_mask_and_outlines_it(masked_app, tmp_path):
    at = masked_app
    scan = (tmp_path / "w" / "data" / "synth" / "glioma" / "0.png").read_bytes()
    mask = (tmp_path / "w" / "data" / "synth" / "masks" / "0.png").read_bytes()
    at.switch_page("app_pages/diagnose.py").run()
    at.file_uploader[0].set_value([("TCGA_X_1_01.png", scan, "image/png"),
                                   ("TCGA_X_1_01_mask.png", mask, "image/png")]).run()
    assert not at.exception
    assert len([m for m in at.markdown if m.value.lstrip("#").startswith(" Prediction:")]) == 1
    text = _captions(at)
    assert "1 tumour mask(s) paired" in text and "Black-and-white outline" in text and "map peak" in text
    method = next(s for s in at.selectbox if s.key.startswith("m-"))
    assert method.value == "EigenCAM"  # the card's measured default


def test_gallery_outlines_the_mask_beside_a_missed_lgg_like_scan(masked_app):
    at = masked_app
    at.switch_page("app_pages/evaluation.py").run()
    at.selectbox[0].set_value("synth").run()
    assert not at.exception
    assert at.radio(key="gallery-explain").label == "EigenCAM for"
    caption = next(c for im in at.image for c in im.captions if c.startswith("`glioma/0.png`"))
    assert "black-and-white outline: tumour mask" in caption and "map peak" in caption
    # where the maps were checked, said above the gallery as beside Diagnose's map
    assert any("tested against" in c.value and "masks" in c.value for c in at.caption)


def test_the_gallery_draws_no_map_for_a_scan_the_gate_refused(tmp_path, monkeypatch):
    """A missed Br35H scan refused by the gate got its Grad-CAM in the gallery, captioned as a call."""
    from core import app_support
    at = _masked_app(tmp_path, monkeypatch, refused=True)
    asked = []
    real = app_support.cached_saliency
    monkeypatch.setattr(app_support, "cached_saliency", lambda p, scan, key, *a, **k: asked.append(key) or real(p, scan, key, *a, **k))
    at.switch_page("app_pages/evaluation.py").run()
    at.selectbox[0].set_value("synth").run()
    assert not at.exception
    caption = next(c for im in at.image for c in im.captions if c.startswith("`glioma/0.png`"))
    assert "refused by the out-of-distribution check" in caption and "no map" in caption
    assert not any(k.endswith("glioma/0.png") for k in asked)


def _blob_scan_and_mask(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey head with a bright lesion off-centre, and the lesion's mask."""
    yy, xx = np.mgrid[:h, :w] / np.array([h, w])[:, None, None]
    head = ((yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.16) * 90.0
    lesion = (yy - 0.35) ** 2 + (xx - 0.62) ** 2 < 0.006
    return np.clip(head + lesion * 150, 0, 255).astype(np.uint8), lesion.astype(np.uint8) * 255


@pytest.mark.parametrize("orientation, fmt, size", [(6, "JPEG", (300, 240)), (3, "PNG", (300, 240)),
                                                    (1, "JPEG", (4100, 4100))])
def test_a_mask_lands_on_its_lesion_when_the_reader_turns_or_shrinks_the_scan(orientation, fmt, size):
    """A mask with its scan's EXIF turn was read unturned (outline off the lesion, IoU 0); a JPEG
    of 4096 px or more, reduced while decoding, recorded no (or a wrong) original size, so its
    full-size mask matched nothing (no outline, no contradiction warning)."""
    import io
    from core.app_support import display_image, input_mask
    from core.preprocess import DEFAULT_SPEC
    from core.reader import read_scan
    scan_a, mask_a = _blob_scan_and_mask(*size)

    def saved(a, f):
        im, buf = Image.fromarray(a), io.BytesIO()
        exif = im.getexif()
        exif[0x0112] = orientation
        im.save(buf, f, exif=exif) if orientation != 1 else im.save(buf, f)
        return buf.getvalue()
    scan = read_scan(saved(scan_a, fmt), f"x.{fmt.lower()}")
    mask = input_mask(scan, saved(mask_a, "PNG"), DEFAULT_SPEC)
    assert mask is not None and mask.any()
    view = display_image(scan, DEFAULT_SPEC)
    assert view[mask].mean() > 2 * view[(view > 0.05) & ~mask].mean()   # on the bright lesion


def test_score_slice_refuses_a_mask_it_cannot_use(tmp_path):
    """saliency-check dropped a slice whose mask was unreadable or misfit as if its mask were
    empty: the measurement quietly covered fewer slices."""
    from core.saliency_check import score_slice
    from conftest import make_weights
    from core.inference import Predictor
    pred = Predictor(make_weights(tmp_path / "w"))
    scan = tmp_path / "s.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)).save(scan)
    for bad in (b"not an image", _png(np.zeros((30, 30), np.uint8))):
        (tmp_path / "m.png").write_bytes(bad)
        with pytest.raises(ValueError, match="cannot be used as the mask of s.png"):
            score_slice(pred, scan, tmp_path / "m.png", 2, np.random.default_rng(0), ["gradcam"])
    (tmp_path / "m.png").write_bytes(_png(np.zeros((64, 64), np.uint8)))       # empty: skipped, not an error
    assert score_slice(pred, scan, tmp_path / "m.png", 2, np.random.default_rng(0), ["gradcam"]) is None


def test_saliency_grid_draws_each_types_copy_free_test_tumours(tmp_path, capsys):
    """bench/saliency_grid.py: the contact sheet behind the by-eye note on meningioma maps."""
    from conftest import SHARED
    if not SHARED.exists():
        pytest.skip("../shared is not beside the checkout")
    from PIL import Image
    from bench.saliency_grid import main as grid
    out = tmp_path / "sheet.png"
    assert grid(["--per-class", "1", "--out", str(out)]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
    assert [r[2] for r in rows] == ["glioma", "meningioma", "pituitary"]
    w, h = Image.open(out).size
    assert w == 6 * h   # one row of three tiles, each the scan beside its map
