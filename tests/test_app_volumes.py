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
    page_row, _, pred = app_support.analyse(predictor, "v.dcm", data, predictor.threshold, slice_index=0)
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
    _, _, pred = app_support.analyse(predictor, "v.dcm", data, predictor.threshold, slice_index=0)
    assert cli["info"]["head_share"] < 0.05 and pred.info["head_share"] == cli["info"]["head_share"]
