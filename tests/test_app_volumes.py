"""Volumes in the CLI, on the Diagnose page and in the report (review of 2026-12-07).

A DICOM frame or TIFF page read alone carried no head_share, so a tumour call on an end frame
went unmarked on the page, in its table, CSV and PDF, where `--best-slice` marked it.
"""
from __future__ import annotations

import numpy as np

from core import app_support
from core.inference import Predictor, predict_many
from core.report import analyse_one
from test_reader import make_dicom


def disc_frames(radii: list[int], side: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side] - side / 2
    return np.stack([np.where(yy ** 2 + xx ** 2 < r ** 2, 1500 + 300 * np.sin(xx / 3), 0).astype(np.uint16)
                     for r in radii])


def test_a_frame_read_alone_carries_its_volume_head_share(random_weights):
    """Frame 0 is a small disc (its cross-section 9 % of the widest), frames 1-2 wide ones."""
    predictor = Predictor(random_weights)
    data = make_dicom(disc_frames([12, 40, 40]), window=None)
    (row,) = predict_many(predictor, [("v.dcm", data)], frame=0)
    assert row["ok"] and row["info"]["frame"] == 0 and row["info"]["head_share"] < 0.2
    (row,) = predict_many(predictor, [("v.dcm", data)])   # the middle frame, by default
    assert row["info"]["frame"] == 1 and row["info"]["head_share"] > 0.95
    page_row, _, pred = app_support.analyse_upload(predictor, "v.dcm", data, predictor.threshold, slice_index=0)
    assert pred.info["head_share"] < 0.2 and page_row["info"]["head_share"] == pred.info["head_share"]
    report = analyse_one("v.dcm", data, predictor, frame=0)
    assert report.prediction.info["head_share"] == pred.info["head_share"]
    # the app hands the report what its row has, and nothing is scored again
    given = analyse_one("v.dcm", data, predictor, frame=0, hot=[], head_share=0.123)
    assert given.prediction.info["head_share"] == 0.123 and given.hot_slices == []


def test_a_nearly_empty_end_frame_the_gate_may_accept_has_its_share_in_the_app_too(random_weights):
    """Slices under 2 % lit are not scored (`is_empty_slice`), so the app's profile had no share for
    them, where the CLI and the report read every slice's."""
    predictor = Predictor(random_weights)
    data = make_dicom(disc_frames([6, 12, 40, 40, 40]), window=None)
    (cli,) = predict_many(predictor, [("v.dcm", data)], frame=0)
    _, _, pred = app_support.analyse_upload(predictor, "v.dcm", data, predictor.threshold, slice_index=0)
    assert cli["info"]["head_share"] < 0.05 and pred.info["head_share"] == cli["info"]["head_share"]


def test_a_volume_refused_whole_is_not_read_again_on_every_rerun(random_weights, monkeypatch):
    """The page asks for the slice profile on every rerun; a volume that cannot be read whole was
    read (and refused) again each time."""
    predictor = Predictor(random_weights)
    calls = []

    def refuse(*args, **kwargs):
        calls.append(1)
        raise app_support.ScanError("too large to read whole")
    monkeypatch.setattr(app_support, "slice_scores", refuse)
    data = make_dicom(disc_frames([40, 40, 40]), window=None)
    assert app_support.volume_profile(predictor, data, "v.dcm") is None
    assert app_support.volume_profile(predictor, data, "v.dcm") is None
    assert len(calls) == 1
    other = make_dicom(disc_frames([40, 30, 40]), window=None)   # another file is read
    assert app_support.volume_profile(predictor, other, "w.dcm") is None and len(calls) == 2


def plain_and_best(predictor: Predictor, name: str, pages: list[np.ndarray], fmt: str) -> tuple[dict, dict]:
    """The `predict` rows of a stack of ``pages`` saved as ``fmt``, read plainly and with --best-slice."""
    import io
    from PIL import Image
    images = [Image.fromarray(a) for a in pages]
    buf = io.BytesIO()
    images[0].save(buf, fmt, save_all=True, append_images=images[1:])
    (plain,) = predict_many(predictor, [(name, buf.getvalue())])
    (best,) = predict_many(predictor, [(name, buf.getvalue())], best_slice=True)
    return plain, best


def test_best_slice_on_a_stack_it_cannot_read_whole_gives_the_default_page_and_says_why(random_weights):
    """A TIFF whose second page is thumbnail-sized: the default read gives page 0, but --best-slice
    failed the whole file, where the app shows that page with the reason."""
    from core.inference import DEFAULT_SLICE
    rng = np.random.default_rng(0)
    predictor = Predictor(random_weights)
    plain, best = plain_and_best(predictor, "s.tif", [(rng.random(shape) * 200).astype(np.uint8)
                                                      for shape in ((96, 96), (10, 10), (96, 96))], "TIFF")
    assert plain["ok"] and best["ok"], best
    assert best["info"]["frame"] == plain["info"]["frame"] == 0
    assert best["info"]["slice_choice"].startswith(DEFAULT_SLICE) and "too small" in best["info"]["slice_choice"]
    assert best["probs"] == plain["probs"]
    # the other pages were not scored, in either read: the flag says so (a 130-page TIFF over the
    # voxel limit, or one with a thumbnail page, went without it: a second reader's review)
    assert plain.get("other_slices_unchecked") and best.get("other_slices_unchecked")
    # a single image that cannot be read is still an error, with its own sentence
    (bad,) = predict_many(predictor, [("x.png", b"\x89PNG\r\n\x1a\n broken")], best_slice=True)
    assert not bad["ok"] and "slice_choice" not in bad


def test_best_slice_falls_back_on_a_large_gif_that_counts_no_pages(random_weights):
    """A GIF over 1 MP records no page count (n_frames None): the fallback took it for a single
    image and failed the file with 'too many pages', where the plain read gives page 0."""
    rng = np.random.default_rng(0)
    base = (rng.random((1000, 1100)) * 60).astype(np.uint8)
    frames = []
    for k in range(32):   # frames that differ, or Pillow merges them into one
        a = base.copy()
        a[k, :] = 255
        frames.append(a)
    plain, best = plain_and_best(Predictor(random_weights), "big.gif", frames, "GIF")
    assert plain["ok"] and best["ok"], best
    assert best["info"]["frame"] == plain["info"]["frame"] == 0 and "too many pages" in best["info"]["slice_choice"]


def test_a_volume_too_long_to_score_whole_is_read_at_its_slice_and_flagged_unchecked(random_weights, monkeypatch):
    """A 171 KB NIfTI of 30,000 tiny slices held `predict` and the Diagnose page for an hour: every
    slice was scored to look for others reaching the operating point. Past `MAX_SLICES` the slice
    shown is read alone, and every view says the others were not checked (review of 2026-12-07)."""
    import io
    import time

    import nibabel as nib
    import pytest
    from core import inference
    from core.reader import MAX_SLICES, ScanError, read_volume_scans
    from core.report import FLAG_UNCHECKED_SLICES, flags_of, text_line
    predictor = Predictor(random_weights)
    vol = np.zeros((24, 24, MAX_SLICES + 1), np.uint8)
    vol[3:21, 4:20] = 150
    buf = io.BytesIO(nib.Nifti1Image(vol, np.eye(4)).to_bytes())
    data = buf.getvalue()
    with pytest.raises(ScanError, match="too many slices"):
        read_volume_scans(data, "long.nii")
    with pytest.raises(ScanError, match="too many slices"):
        read_volume_scans(make_dicom(disc_frames([10] * (MAX_SLICES + 1), side=32), window=None), "long.dcm")
    scored = []
    real = Predictor.probabilities
    monkeypatch.setattr(Predictor, "probabilities", lambda self, x: scored.append(len(x)) or real(self, x))
    start = time.time()
    (row,) = predict_many(predictor, [("long.nii", data)])
    assert row["ok"] and row["other_slices_unchecked"] and "hot_slices" not in row
    assert sum(scored) <= 2 and time.time() - start < 30   # the slice shown, not every slice
    assert FLAG_UNCHECKED_SLICES in flags_of(row) and FLAG_UNCHECKED_SLICES in text_line(row)
    shown = row["info"]["slice_index"]
    # the page says so under the call, and does not score the volume for its alert below
    assert app_support.volume_alert(predictor, data, "long.nii", predictor.threshold, shown) is None
    page_row, _, _ = app_support.analyse_upload(predictor, "long.nii", data, predictor.threshold)
    assert app_support.unchecked_note(page_row) == f"**Slice {shown} only**: {inference.UNCHECKED_TEXT}"
    assert FLAG_UNCHECKED_SLICES in flags_of(page_row)   # the batch table and its CSV
    report = analyse_one("long.nii", data, predictor)
    assert FLAG_UNCHECKED_SLICES in report.flags
    handed = analyse_one("long.nii", data, predictor, hot=[], unchecked=True)   # as the app hands its row over
    assert FLAG_UNCHECKED_SLICES in handed.flags
    assert sum(scored) <= 4
    # a volume read whole has no such flag
    short = io.BytesIO(nib.Nifti1Image(vol[:, :, :8], np.eye(4)).to_bytes()).getvalue()
    (row,) = predict_many(predictor, [("short.nii", short)])
    assert "other_slices_unchecked" not in row and FLAG_UNCHECKED_SLICES not in flags_of(row)
    page_row, _, _ = app_support.analyse_upload(predictor, "short.nii", short, predictor.threshold)
    assert app_support.unchecked_note(page_row) is None and FLAG_UNCHECKED_SLICES not in analyse_one("short.nii", short, predictor).flags
