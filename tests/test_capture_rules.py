"""Marks drawn on a slice in colour (a measured line, an outline, an arrow, a label) are refused
with their own reason: the model reads marks as lesions. Grey scans with a coloured banner or text
at the image's edge, and colour photos (the colour rule's), are not refused for marks. Several
slices in one image (a viewer's layout, a montage) are refused too; one slice never is."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import DATA
from core.inference import (COLOUR_OOD_REASON, MARKS_OOD_REASON, MARKS_SHARE_LIMIT, PANELS_OOD_REASON, Predictor,
                            marks_reason, panels_reason)
from core.reader import panel_divider, read_scan, read_volume_scans
from test_reader import make_dicom

YELLOW, GREEN = (255, 255, 0), (0, 255, 0)


def head(size: int = 192) -> np.ndarray:
    """A grey 'head': a bright ellipse with a darker core, uint8."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot((yy - size / 2) / (0.42 * size), (xx - size / 2) / (0.36 * size))
    return ((r < 1) * 150 + (r < 0.8) * 40).astype(np.uint8)


def with_marks(grey: np.ndarray, colour=YELLOW) -> Image.Image:
    """A measured line, an ellipse and its label inside the head, 2 px wide, as a viewer draws them."""
    im = Image.fromarray(grey).convert("RGB")
    draw, s = ImageDraw.Draw(im), grey.shape[0]
    draw.line([(0.35 * s, 0.4 * s), (0.6 * s, 0.55 * s)], fill=colour, width=2)
    draw.ellipse([0.45 * s, 0.3 * s, 0.6 * s, 0.42 * s], outline=colour, width=2)
    draw.text((0.4 * s, 0.6 * s), "12.3 mm", fill=colour)
    return im


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("JPEG", {"quality": 75}), ("WEBP", {"quality": 80})])
@pytest.mark.parametrize("colour", [YELLOW, GREEN, (0, 255, 255), (255, 0, 0)])
def test_marks_in_colour_are_measured_and_refused(fmt, kw, colour):
    scan = read_scan(encode(with_marks(head(), colour), fmt, **kw), f"marked.{fmt.lower()}")
    assert scan.colourfulness < 0.03                    # the colour rule's mean alone lets them through
    assert scan.info["colour_marks"] > 5 * MARKS_SHARE_LIMIT
    assert marks_reason(scan) == MARKS_OOD_REASON


def test_the_same_marks_in_grey_or_none_are_not_measured():
    for im in (Image.fromarray(head()).convert("RGB"), with_marks(head(), (255, 255, 255))):
        scan = read_scan(encode(im, "PNG"), "x.png")
        assert "colour_marks" not in scan.info and marks_reason(scan) is None


def test_a_coloured_banner_or_text_at_the_edge_is_not_marks():
    """As on some benchmark scans saved from web pages: colour stripes and a site's name at the
    image's edge, outside the head's core."""
    im = Image.fromarray(head()).convert("RGB")
    draw = ImageDraw.Draw(im)
    draw.rectangle([0, 0, 191, 5], fill=(40, 60, 200))
    draw.text((4, 178), "www.example.org", fill=(230, 30, 30))
    draw.rectangle([186, 40, 191, 150], fill=(200, 0, 200))
    scan = read_scan(encode(im, "JPEG", quality=90), "banner.jpg")
    assert scan.info.get("colour_marks", 0.0) <= MARKS_SHARE_LIMIT and marks_reason(scan) is None


def test_a_colour_photo_is_left_to_the_colour_rule(random_weights):
    rgb = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8).repeat(16, 0).repeat(16, 1)
    scan = read_scan(encode(Image.fromarray(rgb), "PNG"), "photo.png")
    assert scan.info["colour_marks"] > MARKS_SHARE_LIMIT and marks_reason(scan) is None
    pr = Predictor(random_weights).predict_scan(scan)   # no gate: the gateless colour rule says why
    assert not pr.in_distribution and pr.ood_reason == COLOUR_OOD_REASON


def test_predict_refuses_marks_with_their_reason_and_keeps_the_batch(random_weights, tmp_path, capsys):
    from core.cli import main
    marked, clean = tmp_path / "marked.png", tmp_path / "clean.png"
    with_marks(head()).save(marked)
    Image.fromarray(head()).save(clean)
    # 1: a refused input has no call, so the exit status does not read as all scans called
    assert main(["predict", str(marked), str(clean), "--weights", str(random_weights), "--json"]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["ok"] for r in rows] == [True, True]
    assert rows[0]["in_distribution"] is False and rows[0]["ood_reason"] == MARKS_OOD_REASON
    assert rows[0]["call"] is None and rows[1]["call"] is not None   # never shown as a diagnosis
    assert rows[0]["info"]["colour_marks"] > MARKS_SHARE_LIMIT
    assert rows[1]["ood_reason"] != MARKS_OOD_REASON and "colour_marks" not in rows[1]["info"]


def test_dicom_colour_frames_are_measured_each_on_its_own():
    """An RGB secondary capture: the marks of frame 1 are not the other frames'."""
    frames = np.stack([np.asarray(Image.fromarray(head(96)).convert("RGB"))] * 3)
    frames[1] = np.asarray(with_marks(head(96)))
    data = make_dicom(frames, rgb=True, window=None)
    scans = read_volume_scans(data, "capture.dcm")[0]
    assert [marks_reason(s) is not None for s in scans] == [False, True, False]
    assert marks_reason(read_scan(data, "capture.dcm", frame=1)) == MARKS_OOD_REASON


# The shared scans with the most strong colour (benchmark scans saved from web pages with
# coloured stripes at their edges; Br35H JPEGs with chroma noise or red marker ticks), found by
# measuring every shared scan (`PYTHONPATH=. python bench/capture_rules.py`).
COLOURED_SCANS = ["brain-tumor-mri/Training/notumor/Tr-no_0721.jpg", "brain-tumor-mri/Training/notumor/Tr-no_1397.jpg",
                  "brain-tumor-mri/Training/notumor/Tr-no_0855.jpg", "br35h/yes/y12.jpg", "br35h/yes/y481.jpg",
                  "br35h/yes/y560.jpg", "br35h/yes/y909.jpg"]


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared")
@pytest.mark.parametrize("rel", COLOURED_SCANS)
def test_shared_scans_with_colour_at_their_edges_are_not_refused(rel):
    scan = read_scan(DATA / rel)
    assert scan.colourfulness > 0.0003   # RGB files with colour in them: the rule has something to judge
    assert scan.info.get("colour_marks", 0.0) <= MARKS_SHARE_LIMIT / 2 and marks_reason(scan) is None


def test_the_app_refuses_a_marked_upload_and_serves_the_clean_one_beside_it(random_weights, monkeypatch):
    from streamlit.testing.v1 import AppTest
    from conftest import REPO
    monkeypatch.setenv("BT_WEIGHTS", str(random_weights))
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=90).run()
    at.switch_page("app_pages/diagnose.py").run()
    at.file_uploader[0].set_value([("marked.png", encode(with_marks(head()), "PNG"), "image/png"),
                                   ("clean.png", encode(Image.fromarray(head()), "PNG"), "image/png")]).run()
    assert not at.exception
    warnings = " ".join(w.value for w in at.warning)
    assert "Out of distribution" in warnings and "marks drawn on it in colour" in warnings
    assert len([m for m in at.markdown if m.value.lstrip("#").startswith(" Prediction:")]) == 1   # the clean scan's
    from core.dashboard import CAPTURE_RULES
    at.switch_page("app_pages/model_card.py").run()   # the card says what is refused besides the gate
    assert not at.exception and CAPTURE_RULES in [c.value for c in at.caption]


def heavy_marks(colour=YELLOW) -> Image.Image:
    """Marks thick enough to lift the whole image's colourfulness past 0.03, the gateless limit."""
    im = with_marks(head(), colour)
    draw, s = ImageDraw.Draw(im), 192
    for k in range(6):
        draw.line([(0.25 * s, (0.25 + 0.1 * k) * s), (0.75 * s, (0.25 + 0.1 * k) * s)], fill=colour, width=7)
    return im


@pytest.mark.parametrize("gate_limit, expected", [
    (0.06, MARKS_OOD_REASON),      # the gate's colour rule passes it: the marks rule judges it by that limit
    (0.001, "colour"),             # the gate refuses it: its own reason stands
])
def test_with_a_gate_the_marks_rule_follows_the_gates_colour_rule(random_weights, gate_limit, expected):
    from core.inference import GATE_COLOUR_OOD_REASON
    from core.ood import OODGate
    scan = read_scan(encode(heavy_marks(), "PNG"), "marked.png")
    assert 0.03 < scan.colourfulness < 0.06 and marks_reason(scan) is None   # past the gateless limit
    pred = Predictor(random_weights)
    pred.gate = OODGate("colour", [], 0.0, colour_limit=gate_limit)
    p = pred.predict_scan(scan)
    assert not p.in_distribution
    assert p.ood_reason == (GATE_COLOUR_OOD_REASON if expected == "colour" else expected)


def test_a_stacks_info_does_not_take_its_first_pages_marks():
    pages = [with_marks(head(96)), Image.fromarray(head(96)).convert("RGB")]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    scans, _, info = read_volume_scans(buf.getvalue(), "stack.tif")
    assert [marks_reason(s) is not None for s in scans] == [True, False] and "colour_marks" not in info


# ----------------------------------------------------------------------------- several images in one
def layout(tiles: list[np.ndarray], cols: int, gap: int = 4, fill: int = 0) -> np.ndarray:
    """Tiles in a grid with plain gutters of ``fill``, as a viewer lays out slices."""
    rows = -(-len(tiles) // cols)
    h, w = tiles[0].shape
    out = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap), fill, np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        out[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = t
    return out


@pytest.mark.parametrize("cols, n, fill", [(2, 4, 0), (2, 4, 90), (2, 2, 0), (1, 2, 0)])
@pytest.mark.parametrize("fmt, kw", [("PNG", {}), ("JPEG", {"quality": 75})])
def test_several_slices_in_one_image_are_refused(random_weights, cols, n, fill, fmt, kw):
    tiles = [head(), (head() * 0.7).astype(np.uint8), head(), (head() * 0.5).astype(np.uint8)][:n]
    scan = read_scan(encode(Image.fromarray(layout(tiles, cols, fill=fill)), fmt, **kw), f"layout.{fmt.lower()}")
    assert panel_divider(scan.pixels) is not None
    p = Predictor(random_weights).predict_scan(scan)
    assert not p.in_distribution and p.ood_reason == PANELS_OOD_REASON


def test_one_slice_is_not_a_layout_even_small_in_a_wide_dark_field():
    """A small head far from the centre leaves plain background bands, but nothing lit beyond them;
    a nearly empty slice (a volume's end) is the empty-slice rule's, not a layout."""
    field = np.zeros((256, 256), np.uint8)
    field[150:246, 150:246] = head(96)
    noisy = np.clip(np.random.default_rng(0).normal(6, 2, (256, 256)), 0, 255).astype(np.uint8)
    loud = np.clip(np.random.default_rng(1).normal(120, 40, (256, 256)), 0, 255).astype(np.uint8)
    for grey in (head(), field, np.maximum(field, noisy), noisy, loud):
        scan = read_scan(encode(Image.fromarray(grey), "PNG"), "one.png")
        assert panels_reason(scan) is None


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared")
def test_shared_scans_are_not_layouts_but_their_pairs_are():
    """Shared scans that come nearest: a small head in a dark field, two separate lit parts
    (found by measuring every shared scan, docs/generalisation.md "Marks drawn in colour, and several slices in one image")."""
    names = ["lgg-flair/notumor/TCGA_DU_A5TS_032.jpg", "lgg-flair/notumor/TCGA_HT_7608_028.jpg",
             "br35h/yes/y560.jpg", "br35h/yes/y1155.jpg", "brain-tumor-mri/Training/notumor/Tr-no_0255.jpg"]
    for rel in names:
        grey = read_scan(DATA / rel).pixels
        assert panel_divider(grey) is None, rel
        if "lgg" in rel:
            continue   # a head this small (under 10 % of its tile) is too little lit for a layout's side
        pair = (np.concatenate([grey, np.zeros((grey.shape[0], 6), np.float32), grey], axis=1) * 255).astype(np.uint8)
        assert panel_divider(read_scan(encode(Image.fromarray(pair), "JPEG", quality=85), "p.jpg").pixels), rel


class StubGate:
    """A pixel gate that passes or refuses every scan (`Predictor.distribution_check`'s interface)."""
    components, colour_limit, uses_classifier = ["cnn"], None, False

    def __init__(self, refuses: bool):
        self.refuses = refuses

    def verdict(self, scan, x, model):
        return not self.refuses, (1.0 if self.refuses else -1.0), {"cnn": 1.0 if self.refuses else -1.0}


@pytest.mark.parametrize("refuses", [False, True])
def test_with_a_gate_a_layout_it_passes_is_refused_as_one_and_its_own_refusal_stands(random_weights, refuses):
    from core.inference import PIXEL_OOD_REASON
    scan = read_scan(encode(Image.fromarray(layout([head()] * 4, 2)), "PNG"), "layout.png")
    pred = Predictor(random_weights)
    pred.gate = StubGate(refuses)
    p = pred.predict_scan(scan)
    assert not p.in_distribution and p.ood_reason == (PIXEL_OOD_REASON if refuses else PANELS_OOD_REASON)


@pytest.mark.parametrize("fill", [0, 80, 160, 255])
@pytest.mark.parametrize("shape", [(192, 400), (400, 192), (192, 192)])
def test_one_slice_padded_with_any_plain_value_is_not_a_layout(fill, shape):
    canvas = np.full(shape, fill, np.uint8)
    y, x = (shape[0] - 192) // 2, (shape[1] - 192) // 2
    canvas[y:y + 192, x:x + 192] = head()
    assert panel_divider(canvas.astype(np.float32) / 255) is None


@pytest.mark.skipif(not DATA.exists(), reason="needs ../shared")
def test_strips_and_tiny_images_are_not_layouts():
    """A band across an 8:1 strip is a short line through tissue, not a gutter; a 16 px image is read."""
    grey = read_scan(DATA / "brain-tumor-mri/Training/glioma/Tr-gl_0100.jpg").pixels
    h, w = grey.shape
    for strip in (grey[h // 2 - w // 16:h // 2 + w // 16], grey[:, w // 2 - h // 16:w // 2 + h // 16]):
        assert panel_divider(strip) is None
    tiny = read_scan(encode(Image.fromarray(head(16)), "PNG"), "tiny.png")
    assert panels_reason(tiny) is None


def test_no_slice_of_a_head_volume_is_refused_as_a_layout(random_weights):
    """A synthetic head with skull, read as a volume in every plane, and its most tumour-like slice."""
    from core.inference import most_tumour_like_slice
    from test_reader import nifti_bytes
    zz, yy, xx = np.mgrid[:40, :64, :56]
    r = np.sqrt(((zz - 20) / 18) ** 2 + ((yy - 32) / 28) ** 2 + ((xx - 28) / 24) ** 2)
    vol = (np.where(r < 1, 300, 0) + np.where(r < 0.85, 500, 0) + 20 * np.sin(xx / 3.0) * (r < 0.85)).astype(np.float32)
    data = nifti_bytes(vol)
    for plane in ("axial", "coronal", "sagittal"):
        scans = read_volume_scans(data, "head.nii.gz", plane=plane)[0]
        assert [k for k, s in enumerate(scans) if panels_reason(s)] == [], plane
    k, p = most_tumour_like_slice(Predictor(random_weights), data, "head.nii.gz")
    assert p.ood_reason != PANELS_OOD_REASON
