"""Volumes on the Diagnose page and in the report (review of 2026-12-07).

- A stack the page shows one frame of, but that cannot be read whole (a 300-page TIFF), ended
  the page with a traceback when the slice profile read it, and the batch after it was lost.
- A DICOM frame or TIFF page read alone carried no head_share, so a tumour call on an end frame
  went unmarked on the page, in its table, CSV and PDF, where `--best-slice` marked it.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from core import app_support
from core.inference import Predictor, predict_many
from core.report import analyse_one
from test_app_review import SAMPLES, app, predictions, texts  # noqa: F401  (app: the fixture)
from test_reader import make_dicom


def disc_frames(radii: list[int], side: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side] - side / 2
    return np.stack([np.where(yy ** 2 + xx ** 2 < r ** 2, 1500 + 300 * np.sin(xx / 3), 0).astype(np.uint16)
                     for r in radii])


def test_a_stack_too_large_to_read_whole_keeps_the_batch(app):
    pages = [Image.fromarray((np.random.default_rng(k).random((128, 128)) * 200).astype(np.uint8)) for k in range(300)]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    glioma = (SAMPLES / "glioma.jpg").read_bytes()
    app.switch_page("app_pages/diagnose.py").run()
    app.file_uploader[0].set_value([("stack.tif", buf.getvalue(), "image/tiff"),
                                    ("glioma.jpg", glioma, "image/jpeg")]).run(timeout=120)
    assert not app.exception, [e.value for e in app.exception]
    assert len(predictions(app)) == 2 and app.dataframe   # the JPEG after it, and the table


def test_a_frame_read_alone_carries_its_volume_head_share(random_weights):
    """Frame 0 is a small disc (its cross-section 9 % of the widest), frames 1-2 wide ones."""
    predictor = Predictor(random_weights)
    data = make_dicom(disc_frames([12, 40, 40]), window=None)
    (row,) = predict_many(predictor, [("v.dcm", data)], frame=0)
    assert row["ok"] and row["info"]["frame"] == 0 and row["info"]["head_share"] < 0.2
    (row,) = predict_many(predictor, [("v.dcm", data)])   # the middle frame, by default
    assert row["info"]["frame"] == 1 and row["info"]["head_share"] > 0.95
    page_row, _, pred = app_support.analyse(predictor, "v.dcm", data, predictor.threshold, slice_index=0)
    assert pred.info["head_share"] < 0.2 and page_row["info"]["head_share"] == pred.info["head_share"]
    report = analyse_one("v.dcm", data, predictor, frame=0)
    assert report.prediction.info["head_share"] == pred.info["head_share"]
    # the app hands the report what its row has, and nothing is scored again
    given = analyse_one("v.dcm", data, predictor, frame=0, hot=[], head_share=0.123)
    assert given.prediction.info["head_share"] == 0.123 and given.hot_slices == []
