"""The DICOM header check (core.header): a file that says it is not a brain MRI is flagged."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from core.header import header_reason
from core.outliers import REAL_MEDICAL

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "samples"


@pytest.mark.parametrize("info, flagged, word", [
    ({"modality": "CT"}, True, "CT"),
    ({"modality": "us"}, True, "ultrasound"),
    ({"modality": "NM", "body_part": "WHOLE BODY"}, True, "nuclear"),
    ({"modality": "XYZ"}, True, "XYZ"),                  # any stated non-MR modality
    ({"modality": "MR", "body_part": "ABDOMEN"}, True, "ABDOMEN"),
    ({"modality": "MR", "body_part": "l-spine"}, True, "L-SPINE"),
    ({"modality": "", "body_part": "Whole_Body"}, True, "WHOLE BODY"),
    # free text: only the recognised term is repeated, never a name or a markdown link beside it
    ({"modality": "MR", "body_part": "LEG [Q. Zyxwar](https:/e.x)"}, True, "examined is LEG, not"),
    ({"modality": "MR"}, False, None),
    ({"modality": "MRI"}, False, None),                    # a non-standard spelling of MR
    ({"modality": "MR", "body_part": "HEAD"}, False, None),
    ({"modality": "MR", "body_part": "KOPF"}, False, None),   # unknown wording: left to the pixels
    ({"modality": "OT", "body_part": ""}, False, None),        # secondary capture says nothing
    ({"modality": "SC"}, False, None),
    ({"format": "PNG", "mode": "L"}, False, None),             # not a DICOM: no header to read
])
def test_header_reason(info, flagged, word):
    reason = header_reason(info)
    assert (reason is not None) == flagged
    if flagged:
        assert word in reason and reason.endswith(".") and "\n" not in reason


def test_pydicom_real_non_brain_files_are_caught_by_their_headers():
    """9 of the 10 real non-brain DICOM files the gate is tested on state CT, US, NM or ABDOMEN;
    MR_small states only MR and stays with the pixel gate."""
    import pydicom
    from core.reader import read_scan
    root = Path(pydicom.__file__).parent / "data" / "test_files"
    caught = {n for n in REAL_MEDICAL if header_reason(read_scan(root / n, n).info)}
    assert caught == set(REAL_MEDICAL) - {"MR_small.dcm"}


def _restamped(src: Path, **tags) -> bytes:
    import pydicom
    ds = pydicom.dcmread(src)
    for k, v in tags.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@pytest.mark.skipif(not (SAMPLES / "sample_glioma.dcm").exists(), reason="needs ../shared/data/samples")
def test_predictor_flags_a_brain_slice_whose_header_says_ct():
    """The same brain pixels: in distribution as MR, flagged with the header's reason as CT or
    as an abdomen; the pixel gate's score is reported unchanged either way."""
    from core.inference import Predictor
    pred = Predictor()
    src = SAMPLES / "sample_glioma.dcm"
    mr = pred.predict_file(_restamped(src, BodyPartExamined="HEAD"), "mr.dcm")
    ct = pred.predict_file(_restamped(src, Modality="CT"), "ct.dcm")
    belly = pred.predict_file(_restamped(src, BodyPartExamined="ABDOMEN"), "abdomen.dcm")
    assert mr.in_distribution and mr.ood_reason is None and mr.info["body_part"] == "HEAD"
    assert not ct.in_distribution and "Modality CT" in ct.ood_reason
    assert not belly.in_distribution and "ABDOMEN" in belly.ood_reason
    assert ct.ood_score == pytest.approx(mr.ood_score) == pytest.approx(belly.ood_score)
    assert ct.pred == mr.pred == "glioma"   # flagged, not changed: the app withholds it


def test_header_words_reach_outputs_as_code_words_only(tmp_path):
    """Modality and Body Part Examined are typed by hand and reach the JSON info, the reason, the
    PDF and the page: a name or a markdown link there came out word for word."""
    from core.reader import _code_string
    assert _code_string("LEG [Q. Zyxwar](https:/e.x)", 32) == "LEG Q ZYXWARHTTPS E X"
    assert _code_string("mr\n", 16) == "MR" and _code_string("Kopf", 32) == "KOPF"


@pytest.fixture(scope="module")
def served():
    from core.inference import Predictor
    return Predictor()


@pytest.mark.parametrize("tags, info, refused", [
    ({"Modality": "MR WIGGUM"}, {"modality": "MR UNRECOGNISED"}, False),
    ({"Modality": "SMITH"}, {"modality": "UNRECOGNISED"}, True),    # still a stated non-MR modality
    ({"BodyPartExamined": "HEAD GUMBLE BARNEY"}, {"body_part": "HEAD"}, False),
    ({"BodyPartExamined": "LEG DOE JOHNATHAN"}, {"body_part": "LEG"}, True),
    ({"BodyPartExamined": "SI JOINT"}, {"body_part": "SI JOINT"}, True),   # a whole standard term as written
])
def test_a_name_typed_into_modality_or_body_part_reaches_no_output(served, tags, info, refused):
    """Code words only was not enough: 'MR WIGGUM' printed a name in the PDF's source line and the
    JSON, 'LEG DOE JOHNATHAN' in the JSON (a privacy review). Only recognised words are kept, and
    every verdict stays as it was."""
    import json
    import pydicom
    from core.inference import predict_many
    from core.reader import read_scan
    from core.report import source_line
    from test_reader import dicom12, make_dicom, phantom
    ds = pydicom.dcmread(io.BytesIO(make_dicom(dicom12(phantom()))))
    for k, v in tags.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf)
    scan = read_scan(buf.getvalue(), "scan.dcm")
    assert {k: scan.info[k] for k in info} == info
    (row,) = predict_many(served, [("scan.dcm", buf.getvalue())])
    shown = json.dumps(row) + source_line(scan.info)   # the CLI's line and the PDF's source line
    names = [w for v in tags.values() for w in v.split() if w not in ("MR", "HEAD", "LEG", "SI", "JOINT")]
    assert not any(n in shown for n in names), shown
    assert (not row["in_distribution"] and "DICOM header" in row["ood_reason"]) == refused


@pytest.mark.parametrize("value", ["BRAIN", "HEAD", "HEADNECK", "HEAD_NECK", "CSPINE", "C-SPINE", "LSPINE",
                                   "ABDOMEN", "CHEST", "EXTREMITY", "KNEE", "SKULL", "Kopf", "CRANE", "ORBIT",
                                   "PITUITARY", "NECK", "WHOLEBODY", "WHOLE BODY", "WHOLE BODY SCAN",
                                   "Whole body MRI", "ENTIRE BODY DOE", "SI JOINT", "Cervical spine",
                                   "Head and Neck", "LOWER_LEG", "SHOULDER,RIGHT", "HEAD GUMBLE BARNEY"])
def test_masking_a_body_part_keeps_its_verdict(value):
    """Kept alone from 'WHOLE BODY SCAN' (accepted), the words WHOLE BODY made a term the value did
    not hold, and the scan was refused (a review)."""
    from core.header import recognised_body_part
    from core.reader import _code_string
    raw = _code_string(value, 32)
    verdict = header_reason({"modality": "MR", "body_part": raw}) is None
    assert (header_reason({"modality": "MR", "body_part": recognised_body_part(raw)}) is None) == verdict
