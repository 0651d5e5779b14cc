"""PDF/CSV reports and the audit log, on small generated scans and randomly initialised models.

PDF checks read the text back with poppler's ``pdftotext`` and render every page with
``pdftoppm``; they are skipped (with the reason) where poppler-utils is not installed.
"""
from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core import report as R
from core.audit_log import append_audit, read_audit
from core.cli import main
from core.inference import Predictor
from core.models import create_model

POPPLER = shutil.which("pdftotext") and shutil.which("pdftoppm")
needs_poppler = pytest.mark.skipif(not POPPLER, reason="poppler-utils (pdftotext, pdftoppm) not "
                                                       "installed: apt-get install poppler-utils")
DISCLAIMER = "Research demo for tests. Not a medical device; not for diagnosis."


# ----------------------------------------------------------------------------- fixtures
def make_weights(root, classes: list[str], min_confidence: float = 0.0, seed: int = 0):
    """A model directory as train.py writes it, with random weights (no training)."""
    from safetensors.torch import save_file
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = create_model("mobilenet_v3_small", len(classes))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, root / "model.safetensors")
    card = {"name": f"test-{len(classes)}class", "version": "0.0-test", "arch": "mobilenet_v3_small",
            "classes": classes,
            "preprocessing": {"size": 64, "crop": "head", "mean": 0.2, "std": 0.25},
            "calibration": {"temperature": 1.0}, "operating_point": {"threshold": 0.3},
            "uncertainty": {"min_confidence": min_confidence}, "intended_use": DISCLAIMER}
    (root / "card.json").write_text(json.dumps(card))
    return root


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> Predictor:
    return Predictor(make_weights(tmp_path_factory.mktemp("w4"),
                                  ["glioma", "meningioma", "pituitary", "notumor"]))


@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> Predictor:
    # min_confidence 0.999: every prediction of a random model is flagged 'uncertain, refer'
    return Predictor(make_weights(tmp_path_factory.mktemp("w2"), ["tumor", "notumor"],
                                  min_confidence=0.999, seed=1))



def undated(csv_text: str) -> list[str]:
    """A CSV's lines without their last column, `generated_utc`: two builds a second apart differ there."""
    return [line.rsplit(",", 1)[0] for line in csv_text.splitlines()]

def scan_png(seed: int, size: int = 96) -> bytes:
    """A bright 'head' ellipse with texture on black: the crop finds it as a real scan's head."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    head = ((yy - size / 2) / (0.42 * size)) ** 2 + ((xx - size / 2) / (0.36 * size)) ** 2 < 1
    img = np.where(head, 0.35 + 0.5 * rng.random((size, size)), 0.0)
    buf = io.BytesIO()
    Image.fromarray((img * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def dicom_with_patient(name: str, pid: str) -> bytes:
    """A small MR DICOM whose tags name a (made-up) patient."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MRImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.PatientName, ds.PatientID, ds.Modality = name, pid, "MR"
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelData = (np.random.default_rng(0).random((64, 64)) * 3000).astype(np.uint16).tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def reader_message(data: bytes, name: str) -> str:
    """The reader's own sentence for a bad file (the reader's wording is not this module's)."""
    from core.reader import ScanError, read_scan
    with pytest.raises(ScanError) as e:
        read_scan(data, name)
    return str(e.value)


def flat(text: str) -> str:
    """Whitespace collapsed: pdftotext wraps long sentences over lines."""
    return " ".join(text.split())


def pdf_pages(pdf: bytes, tmp_path) -> list[str]:
    """Text of each page, and proof that poppler renders every page to a non-blank image."""
    path = tmp_path / "r.pdf"
    path.write_bytes(pdf)
    text = subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True,
                          check=True, text=True).stdout
    pages = text.split("\f")[:-1]  # pdftotext ends every page with a form feed
    subprocess.run(["pdftoppm", "-r", "30", "-png", str(path), str(tmp_path / "pg")], check=True)
    pngs = sorted(tmp_path.glob("pg-*.png"))
    assert len(pngs) == len(pages)
    for png in pngs:
        assert np.asarray(Image.open(png).convert("L")).std() > 5, f"{png.name} is blank"
    return pages


# ----------------------------------------------------------------------------- PDF
@needs_poppler
def test_single_scan_pdf_has_prediction_probabilities_and_disclaimer(four, tmp_path):
    pdf = R.build_report([("case_a.png", scan_png(0))], four)
    assert pdf.startswith(b"%PDF")
    (page,) = pdf_pages(pdf, tmp_path)  # one scan: one page, no summary
    r = R.analyse([("case_a.png", scan_png(0))], four)[0]
    assert R.class_label(r.prediction.pred) in page and f"probability {r.prediction.confidence:.3f}" in page
    for c in four.classes:
        assert R.class_label(c) in page
        assert f"{r.prediction.probs[c]:.3f}" in page
    assert f"{r.prediction.tumour_probability:.3f}" in page and "operating point 0.300" in page
    assert "not for diagnosis" in page and DISCLAIMER.split(".")[0] in page
    assert four.weights_sha256[:12] in page and "0.0-test" in page and four.name in page
    assert page.count(four.weights_sha256[:16]) >= 2   # the header and the body name it alike
    assert "Grad-CAM" in page and "case_a.png" in page
    assert r.overlay is not None and r.overlay.shape == (R.DISPLAY_PX, R.DISPLAY_PX, 3)


@needs_poppler
def test_batch_has_summary_and_a_page_saying_why_a_file_failed(four, tmp_path):
    items = [("a.png", scan_png(1)), ("broken.jpg", b"this is not an image"),
             ("b.png", scan_png(2)), ("gone.png", str(tmp_path / "no-such-file.png"))]
    pages = pdf_pages(R.build_report(items, four), tmp_path)
    assert len(pages) == 1 + len(items)
    summary = pages[0]
    assert "Batch summary" in summary and "2 could not be read" in summary
    for name, _ in items:
        assert name in summary
    assert "broken.jpg" in pages[2] and "CANNOT READ" in pages[2]
    assert flat(reader_message(b"this is not an image", "broken.jpg")) in flat(pages[2])
    assert "The file does not exist." in pages[4]  # the reader's sentence, as in the CLI
    for p in (pages[1], pages[3]):
        assert "Calibrated probabilities" in p and "not for diagnosis" in p


@needs_poppler
def test_binary_model_report_shows_tumour_probability_and_refer_flag(binary, tmp_path):
    (page,) = pdf_pages(R.build_report([("yes_1.png", scan_png(3))], binary), tmp_path)
    assert "Tumour probability" in page and "No tumour" in page
    assert "UNCERTAIN - REFER" in page  # min_confidence 0.999 flags every result
    # a flagged page of a model without a gate still says nothing checked the image (it said so
    # only inside the NO FLAGS banner, so a grey cat photo read "Tumour / UNCERTAIN - REFER" alone)
    assert "IMAGE NOT CHECKED" in page and "no out-of-distribution check" in page
    assert "referral level 0.9990" in R.ReportContext.of(binary, None, None).no_flags_text()


@needs_poppler
def test_out_of_distribution_flag_is_printed(four, tmp_path):
    r = R.analyse([("odd.png", scan_png(4))], four)[0]
    r.prediction.in_distribution = False
    r.prediction.ood_reason = ("The DICOM header says this is an ultrasound image (Modality US), not an "
                               "MRI; the model reads brain MRI only.")   # wraps: must not run off the page
    pdf = R.render_pdf([r], R.ReportContext.of(four, None, "gradcam"))
    (page,) = pdf_pages(pdf, tmp_path)
    words = " ".join(page.split())
    assert "OUT OF DISTRIBUTION" in page and "Modality US" in words and "Do not rely on this result." in words


def flagged(predictor, monkeypatch) -> None:
    """Every scan out of distribution (and referred, type in doubt: flags of a call not made)."""
    import dataclasses
    real = predictor.predict_scan
    monkeypatch.setattr(predictor, "predict_scan", lambda scan: dataclasses.replace(
        real(scan), in_distribution=False, uncertain=True, type_uncertain=True))


@needs_poppler
def test_a_dicom_series_gets_one_line_on_the_summary_page(four, tmp_path):
    from test_reader import dicom12, make_dicom
    grey = np.asarray(Image.open(io.BytesIO(scan_png(40))), np.float32) / 255
    uid = "1.2.826.0.1.3680043.8.498.4242"
    items = [(f"IM{k}", make_dicom(dicom12(np.roll(grey, k, 1)), series=uid, instance=k)) for k in (2, 1)]
    items.append(("single.png", scan_png(41)))
    results = R.analyse(items, four, 0.3)
    (line,) = R.series_lines([r.to_row() for r in results])
    assert line.startswith("Series 1 (2 files): ") and "at #" in line
    summary = flat(pdf_pages(R.render_pdf(results, R.ReportContext.of(four, 0.3, None)), tmp_path)[0])
    assert "DICOM series" in summary and line in summary
    assert results[0].prediction.info["instance"] == 2 and "window" not in results[0].prediction.info


def test_cli_audit_names_the_frame_of_a_multiframe_dicom(four, tmp_path):
    from test_reader import dicom12, make_dicom
    grey = np.asarray(Image.open(io.BytesIO(scan_png(42))), np.float32) / 255
    (tmp_path / "multi.dcm").write_bytes(make_dicom(np.stack([dicom12(np.roll(grey, k, 0)) for k in range(3)])))
    (tmp_path / "one.dcm").write_bytes(make_dicom(dicom12(grey)))
    log = tmp_path / "audit.jsonl"
    assert main(["report", str(tmp_path / "multi.dcm"), str(tmp_path / "one.dcm"), "--out", str(tmp_path / "r.pdf"),
                 "--weights", str(four.dir), "--audit", str(log)]) == 0
    assert [r["slice"] for r in read_audit(log)] == [1, None]  # the middle frame; a one-frame file has none
    from test_reader import lps_volume
    (tmp_path / "v.nii.gz").write_bytes(lps_volume([grey * (0.5 + 0.1 * k) for k in range(5)]))
    assert main(["report", str(tmp_path / "v.nii.gz"), "--out", str(tmp_path / "r.pdf"),
                 "--weights", str(four.dir), "--audit", str(log)]) == 0
    assert read_audit(log)[-1]["slice"] == 2  # a NIfTI volume's middle slice (was null: no n_slices)


@needs_poppler
def test_a_flagged_scan_gets_no_call_in_the_pdf(four, tmp_path, monkeypatch):
    flagged(four, monkeypatch)
    items = [("cat.png", scan_png(40)), ("dog.png", scan_png(41))]
    results = R.analyse(items, four, threshold=0.0)  # at 0 every scan would read 'tumour'
    summary, page, _ = pdf_pages(R.render_pdf(results, R.ReportContext.of(four, 0.0, "gradcam")),
                                 tmp_path)
    assert "No diagnosis" in summary and not any(R.class_label(c) in summary for c in four.classes)
    words = flat(page)
    assert "No diagnosis: out of distribution" in words and "OUT OF DISTRIBUTION" in words
    assert "Raw model output, not a diagnosis" in words
    for call in ("Predicted class", f"probability {results[0].prediction.confidence:.3f}", "read as",
                 "UNCERTAIN - REFER", "TYPE UNCERTAIN", "Grad-CAM for"):
        assert call not in words, call
    assert "no diagnosis" in R.text_line(results[0].to_row()) and results[0].flags == [R.FLAG_OOD]
    assert "tumour probability" not in R.text_line(results[0].to_row())


@needs_poppler
def test_each_page_names_its_file_by_hash_as_the_csv_does(four, tmp_path):
    """A page alone could not be tied to the bytes it was made from: the CSV and the audit log had
    the file's SHA-256, the PDF had only its name."""
    import hashlib
    data = scan_png(11)
    (page,) = pdf_pages(R.build_report([("case_h.png", data)], four), tmp_path)
    assert f"file SHA-256 {hashlib.sha256(data).hexdigest()[:16]}" in flat(page)


@needs_poppler
def test_a_type_uncertain_call_heads_its_page_as_a_tumour_not_as_its_likeliest_type(four, tmp_path, monkeypatch):
    import dataclasses
    real = four.predict_scan
    monkeypatch.setattr(four, "predict_scan", lambda scan: dataclasses.replace(
        real(scan), pred="meningioma", type_uncertain=True))
    (page,) = pdf_pages(R.build_report([("case_t.png", scan_png(3))], four), tmp_path)
    r = R.analyse([("case_t.png", scan_png(3))], four)[0]
    head = flat(page.split("Probabilities")[0] if "Probabilities" in page else page)
    assert "Tumour, type uncertain" in head
    assert f"likeliest type: meningioma ({r.prediction.confidence:.3f})" in head
    assert "probability" not in head.split("likeliest type")[0]   # no 'Meningioma ... probability 0.4' headline
    (tmp_path / "batch").mkdir()   # the summary table named the likeliest type as the call
    summary = flat(pdf_pages(R.build_report([("case_t.png", scan_png(3)), ("b.png", scan_png(4))], four),
                             tmp_path / "batch")[0])
    assert "Tumour, type" in summary and "Meningioma" not in summary   # its cell wraps after "type"


@needs_poppler
def test_a_no_tumour_calls_map_of_the_likeliest_tumour_says_it_is_not_the_call(four, tmp_path, monkeypatch):
    """'Grad-CAM++ for Meningioma (red = strongest evidence)' over a normal brain read as a located
    meningioma (a clinician's walkthrough): the caption gives the class's probability instead."""
    import dataclasses
    real = four.predict_scan
    monkeypatch.setattr(four, "predict_scan", lambda scan: dataclasses.replace(real(scan), pred="notumor"))
    r = R.analyse([("clear.png", scan_png(5))], four)[0]
    target = R.saliency_target(r.prediction, four.classes)
    assert target != "notumor"
    (page,) = pdf_pages(R.build_report([("clear.png", scan_png(5))], four), tmp_path)
    words = flat(page)
    assert f"for '{R.class_label(target)}' (p {r.prediction.probs[target]:.3f}, not the call; scaled to its own peak, so yellow is no sign of it)" in words
    assert "strongest evidence" not in words
    monkeypatch.setattr(four, "predict_scan", lambda scan: dataclasses.replace(real(scan), pred="glioma"))
    (page,) = pdf_pages(R.build_report([("clear.png", scan_png(5))], four), tmp_path)
    assert "for 'Glioma' (yellow = what moved the score most, not the lesion)" in flat(page)


def test_a_flagged_scan_has_no_prediction_in_the_csv(four, monkeypatch):
    flagged(four, monkeypatch)
    results = R.analyse([("cat.png", scan_png(42))], four)
    (row,) = csv.DictReader(io.StringIO(R.build_csv(results, four.classes)))
    assert row["ok"] == "1" and row["prediction"] == "" and row["flags"] == R.FLAG_OOD
    assert sum(float(row[f"p_{c}"]) for c in four.classes) == pytest.approx(1, abs=1e-3)


@needs_poppler
def test_no_patient_identifiers_or_folders_in_report(four, tmp_path):
    folder = tmp_path / "DOE_JANE_1970"
    folder.mkdir()
    (folder / "slice.png").write_bytes(scan_png(5))
    items = [(str(folder / "slice.png"), str(folder / "slice.png")),
             ("mri.dcm", dicom_with_patient("DOE^JANE", "PID-99127"))]
    text = "\n".join(pdf_pages(R.build_report(items, four), tmp_path))
    assert "slice.png" in text and "mri.dcm" in text
    for secret in ("DOE", "JANE", "PID-99127", str(tmp_path)):
        assert secret not in text


def test_threshold_moves_the_decision(binary):
    item = [("s.png", scan_png(6))]
    low = R.analyse(item, binary, threshold=0.0)[0].prediction
    high = R.analyse(item, binary, threshold=1.0)[0].prediction
    assert (low.pred, low.threshold) == ("tumor", 0.0)
    assert (high.pred, high.threshold) == ("notumor", 1.0)


def test_an_item_can_name_the_slice_of_a_volume(four, tmp_path):
    import nibabel as nib
    vol = np.zeros((48, 48, 5), np.float32)
    for k in range(5):
        vol[8:40, 10:38, k] = 100 + 40 * k  # every slice holds a 'head'
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    data = (tmp_path / "v.nii.gz").read_bytes()
    r = R.analyse([("v.nii.gz", data, {"slice_index": 3})], four)[0]
    assert r.ok and "slice 3 of 5" in r.source


def test_missing_saliency_keeps_the_prediction(four, monkeypatch):
    import core.saliency as S

    def boom(*a, **k):
        raise RuntimeError("no map")
    monkeypatch.setattr(S, "saliency_map", boom)
    r = R.analyse([("s.png", scan_png(7))], four)[0]
    assert r.ok and r.overlay is None and "could not be computed" in r.saliency_note
    assert R.render_pdf([r], R.ReportContext.of(four, None, "gradcam")).startswith(b"%PDF")


# ----------------------------------------------------------------------------- CSV
def test_csv_one_row_per_file_with_every_class(four):
    items = [("a.png", scan_png(8)), ("=cmd.png", scan_png(9)), ("bad.png", b"\x89PNG broken")]
    results = R.analyse(items, four)
    rows = list(csv.DictReader(io.StringIO(R.build_csv(results, four.classes))))
    assert len(rows) == len(items)
    assert {f"p_{c}" for c in four.classes} | {"tumour_probability", "threshold", "prediction",
                                               "flags", "error", "file"} <= set(rows[0])
    assert rows[0]["file"] == "a.png" and rows[0]["error"] == "" and rows[0]["prediction"]
    assert sum(float(rows[0][f"p_{c}"]) for c in four.classes) == pytest.approx(1, abs=1e-3)
    assert rows[1]["file"] == "'=cmd.png"  # no formula injection into spreadsheets
    assert rows[2]["ok"] == "0" and rows[2]["flags"] == "cannot read" and rows[2]["error"]
    # the predict_many dicts give the same CSV
    assert undated(R.build_csv([r.to_row() for r in results], four.classes)) == undated(R.build_csv(results, four.classes))


def test_downloads_for_the_app(binary):
    out = R.report_downloads_data([("a.png", scan_png(10)), ("b.png", scan_png(11))], binary)
    data, mime, name = out["pdf"]
    assert data.startswith(b"%PDF") and mime == "application/pdf" and name == "report.pdf"
    data, mime, name = out["csv"]
    assert mime == "text/csv" and name == "report.csv" and len(data.decode("utf-8-sig").strip().splitlines()) == 3


# ----------------------------------------------------------------------------- audit + CLI
def sha(data: bytes) -> str:
    import hashlib
    return hashlib.sha256(data).hexdigest()


def test_audit_lines_hold_hashes_and_results_never_names(four, tmp_path):
    log = tmp_path / "logs" / "audit.jsonl"
    data = scan_png(12)
    pred = four.predict_file(data, "secret-name.png")
    rec = append_audit(log, sha(data), four, pred, ["uncertain, refer"])
    append_audit(log, sha(data), four, pred.to_json(), [])
    lines = read_audit(log)
    assert lines[0] == rec and len(lines) == 2
    assert set(rec) == {"time", "sha256", "mask_sha256", "model", "model_version", "weights_sha256", "card_sha256",
                        "gate_sha256", "result", "slice", "flags"}
    assert rec["mask_sha256"] is None   # no tumour mask paired with it
    assert rec["slice"] is None  # a single image has no slice
    assert set(rec["result"]) == {"pred", "probs", "tumour_probability", "threshold"}
    assert rec["time"].endswith("+00:00") and rec["weights_sha256"] == four.weights_sha256
    assert "secret-name" not in log.read_text()


def test_audit_survives_a_line_cut_short_and_names_a_volumes_slice(four, tmp_path):
    log = tmp_path / "audit.jsonl"
    data = scan_png(13)
    pred = four.predict_file(data, "a.png")
    append_audit(log, sha(data), four, pred, [])
    log.write_bytes(log.read_bytes() + b'{"time": "2026-12-03T10:00:00+00:00", "sha2')  # a killed write
    pred.info.update(slice_index=7, n_slices=20)
    rec = append_audit(log, sha(data), four, pred, [])
    assert rec["slice"] == 7
    lines = read_audit(log)
    assert len(lines) == 2 and lines[1] == rec  # the new record is whole; the fragment is skipped
    # a log from before the newline check: the record written after a fragment, on its line
    glued = tmp_path / "old.jsonl"
    glued.write_bytes(b'{"time": "2026-12-0' + json.dumps(rec).encode() + b"\n" + b'{"sha256": "\xff"}\n')
    assert read_audit(glued) == [rec]  # and a line that is not UTF-8 is no record
    text = json.dumps(rec, sort_keys=True)
    cut = tmp_path / "cut.jsonl"  # cut just after a nested object: that object is no record
    cut.write_text(text[:text.index("}") + 1] + "\n" + text + "\n")
    assert read_audit(cut) == [rec]
    pred.info = {"slice_index": 0, "n_slices": 1, "frame": 0, "n_frames": 1}
    assert append_audit(log, sha(data), four, pred, [])["slice"] is None  # a one-slice volume: no slice


def test_audit_goes_to_a_pipe(four, tmp_path):
    import os
    import threading
    data = scan_png(14)
    pred = four.predict_file(data, "a.png")
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    try:
        rec = append_audit(fifo, sha(data), four, pred, [])  # was "not seekable": a+b on a pipe
    finally:
        try:  # unblock the reader whatever happened (ENXIO: it has already finished)
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
    reader.join(10)
    assert json.loads(got[0]) == rec

def test_appending_to_the_audit_log_needs_no_read_access(four, tmp_path, monkeypatch):
    # A write-only log sink (-w--w--w-); root reads anything, so reading is refused here instead.
    from pathlib import Path
    data = scan_png(15)
    pred = four.predict_file(data, "a.png")
    log = tmp_path / "wo.jsonl"
    log.write_text('{"cut sh')
    real_open = Path.open

    def write_only(self, mode="r", *a, **k):
        if self == log and ("r" in mode or "+" in mode):
            raise PermissionError(13, "Permission denied")
        return real_open(self, mode, *a, **k)
    monkeypatch.setattr(Path, "open", write_only)
    rec = append_audit(log, sha(data), four, pred, [])
    monkeypatch.undo()
    assert read_audit(log) == [rec]  # glued to the fragment it could not see, and recovered


def test_cli_report_csv_audit_and_exit_codes(four, tmp_path, capsys):
    for i in (1, 2):
        (tmp_path / f"scan{i}.png").write_bytes(scan_png(20 + i))
    (tmp_path / "bad.png").write_bytes(b"nope")
    out, table, log = tmp_path / "r.pdf", tmp_path / "r.csv", tmp_path / "audit.jsonl"
    files = [str(tmp_path / n) for n in ("scan1.png", "bad.png", "scan2.png")]
    rc = main(["report", *files, "--out", str(out), "--csv", str(table), "--weights", str(four.dir),
               "--audit", str(log), "--threshold", "0.4", "--method", "gradcam++"])
    assert rc == 1  # one file failed; it is still reported
    assert out.read_bytes().startswith(b"%PDF")
    assert len(list(csv.DictReader(table.open()))) == 3
    lines = read_audit(log)
    # b"nope" is text: a failed text file is never hashed (a binary one is: test_review_t)
    assert len(lines) == 2 and all(x["result"]["threshold"] == 0.4 for x in lines)
    assert not any(n in log.read_text() for n in ("scan1", "scan2", "bad", str(tmp_path)))
    assert f"bad.png: error: {reader_message(b'nope', 'bad.png')}" in capsys.readouterr().out
    assert main(["report", files[0], "--out", str(out), "--weights", str(four.dir)]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--weights", "/nonexistent/model"], "cannot load the model"),
    (["--method", "nosuchcam"], "unknown saliency method"),
    (["--out", "/nonexistent/dir/r.pdf"], "the folder /nonexistent/dir does not exist"),
])
def test_cli_errors_are_one_line_not_tracebacks(four, tmp_path, capsys, extra, message):
    (tmp_path / "s.png").write_bytes(scan_png(30))
    args = ["report", str(tmp_path / "s.png"), "--out", str(tmp_path / "r.pdf"),
            "--weights", str(four.dir), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_rejects_a_threshold_outside_0_1(four, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["report", "x.png", "--out", str(tmp_path / "r.pdf"), "--threshold", "1.5"])
    assert e.value.code == 2 and "outside [0, 1]" in capsys.readouterr().err


def test_report_output_paths_are_checked_before_any_work(tmp_path, capsys):
    from core.cli import main
    scan = tmp_path / "g.jpg"
    scan.write_bytes((Path(__file__).resolve().parents[1] / "assets" / "samples" / "glioma.jpg").read_bytes())
    before = scan.read_bytes()
    assert main(["report", str(scan), "--out", str(scan)]) == 2
    assert scan.read_bytes() == before and "one of the input files" in capsys.readouterr().err
    assert main(["report", str(scan), "--out", str(tmp_path / "x.pdf"), "--csv", str(tmp_path / "x.pdf")]) == 2
    assert "name the same file" in capsys.readouterr().err
    assert main(["report", str(scan), "--out", str(tmp_path / "nope" / "x.pdf")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_flagged_scan_has_no_tumour_probability_or_confidence_in_the_csv(four, monkeypatch):
    flagged(four, monkeypatch)
    (row,) = csv.DictReader(io.StringIO(R.build_csv(R.analyse([("cat.png", scan_png(43))], four), four.classes)))
    assert row["tumour_probability"] == row["confidence"] == row["uncertain"] == ""


@needs_poppler
def test_names_without_glyphs_stay_apart_and_unpacking_errors_are_reported(four, tmp_path):
    """CJK characters were dropped silently (two scans both printed as _1.jpg); a zip member the
    page listed as damaged was left out of the app's report."""
    from core.reader import ScanError
    items = [("脑肿瘤_1.jpg", scan_png(20)), ("正常_1.jpg", scan_png(21)),
             ("scans.zip/bad.jpg", ScanError("The file is damaged inside the zip archive.")),
             ("x" * 70 + "_series_001.dcm.png", scan_png(22)), ("x" * 70 + "_series_002.dcm.png", scan_png(23))]
    out = R.report_downloads_data(items, four)
    summary = pdf_pages(out["pdf"][0], tmp_path)[0]
    assert "\\u8111\\u80bf\\u7624_1.jpg" in summary and "\\u6b63\\u5e38_1.jpg" in summary
    assert "5 files" in summary and "bad.jpg" in summary
    assert out["csv"][0].startswith(b"\xef\xbb\xbf")   # Excel reads the names as UTF-8, not the code page
    rows = list(csv.DictReader(io.StringIO(out["csv"][0].decode("utf-8-sig"))))
    assert [r["file"] for r in rows][:3] == ["脑肿瘤_1.jpg", "正常_1.jpg", "bad.jpg"]
    assert rows[2]["error"] == "The file is damaged inside the zip archive."
    assert rows[3]["file"] != rows[4]["file"] and rows[4]["file"].endswith("_series_002.dcm.png")


@needs_poppler
def test_a_refused_page_of_a_gateless_model_does_not_say_it_answers_anything(four, tmp_path):
    assert getattr(four, "gate", None) is None
    rgb = np.zeros((96, 96, 3), np.uint8)
    rgb[:, :48, 0], rgb[:, 48:, 1] = 230, 200          # colour: refused even without a gate
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    (page,) = pdf_pages(R.build_report([("photo.png", buf.getvalue())], four), tmp_path)
    assert "OUT OF DISTRIBUTION" in page and "IMAGE NOT CHECKED" not in page


@needs_poppler
def test_a_gateless_models_unflagged_call_is_never_a_green_no_flags(four, tmp_path):
    """cnn_bn_aug called a moon photo 'pituitary 0.998' with an empty flags column and a green
    NO FLAGS banner: every call of a model without a gate carries 'image not checked'."""
    assert getattr(four, "gate", None) is None
    row = R.analyse([("scan.png", scan_png(5))], four)[0].to_row()
    assert R.FLAG_NOT_CHECKED in R.flags_of(row)
    pages = pdf_pages(R.build_report([("scan.png", scan_png(5))], four), tmp_path)
    assert "IMAGE NOT CHECKED" in pages[0] and "NO FLAGS" not in pages[0]
    assert "image not checked" in R.build_csv(R.analyse([("scan.png", scan_png(5))], four), four.classes)


def test_a_volume_whose_other_slices_reach_the_point_is_flagged_in_the_report(four, monkeypatch):
    """A glioma on slice 4 behind a clear middle slice: the table, both CSVs and the PDF said
    'notumor' with no flag unless the file's details were opened."""
    import nibabel as nib
    from core import inference
    from core.inference import hot_slices
    assert hot_slices({0: 0.9, 1: 0.2, 2: 0.1}, 0.5, 1) == [0]
    assert hot_slices({0: 0.9, 1: 0.6}, 0.5, 1) == [] and hot_slices({0: 0.9}, 0.5, None) == []
    vol = (np.random.default_rng(0).random((48, 48, 5)) * 200).astype(np.float32)
    data = nib.Nifti1Image(vol, np.eye(4)).to_bytes()
    real = inference.slice_scores
    monkeypatch.setattr(inference, "slice_scores", lambda p, src, name=None, **kw: (
        *real(p, src, name)[:2], {0: 0.1, 1: 0.1, 2: 0.0, 3: 0.2, 4: 0.99}))
    (r,) = R.analyse([("vol.nii", data)], four, threshold=0.5)
    assert r.hot_slices == [4] and R.FLAG_OTHER_SLICES in r.flags
    assert R.FLAG_OTHER_SLICES in R.build_csv([r], four.classes)
    (flat,) = R.analyse([("flat.png", scan_png(3))], four, threshold=0.5)
    assert flat.hot_slices == [] and R.FLAG_OTHER_SLICES not in flat.flags


# ----------------------------------------------------------------------------- review I
def lesion_png(size: int = 96) -> bytes:
    """A two-valued tumour mask the size of `scan_png`, marking a square inside the head."""
    a = np.zeros((size, size), np.uint8)
    a[size // 3: size // 2, size // 3: size // 2] = 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def test_files_of_one_base_name_stay_apart_in_the_report():
    """A zip with patient_A/slice_01.jpg and patient_B/slice_01.jpg printed both as slice_01.jpg;
    a Linux name's backslash cut it, and an undecodable byte vanished."""
    names = R.display_names(["study.zip/patient_A/slice_01.jpg", "study.zip/patient_B/slice_01.jpg", "x.png"])
    assert names == ["patient_A/slice_01.jpg", "patient_B/slice_01.jpg", "x.png"]   # folders only where needed
    assert R.display_names(["/a/x.png", "/a/x.png"]) == ["x.png", "x.png (2)"]   # the same path twice
    assert R.display_names(["C" * 200 + "/A/x.png", "C" * 200 + "/B/x.png"]) == ["A/x.png", "B/x.png"]
    assert all(len(n) <= R.NAME_CHARS for n in R.display_names(["A/" + "y" * 200 + "/x.png", "B/x.png"]))
    # long names that differ only where the cap cuts: folders tell nothing apart, so none is printed
    a, b = "A" * 70, "B" * 70
    long = R.display_names([f"/SMITH_JOHN/mri/{a}1{b}.jpg", f"/SMITH_JOHN/mri/{a}2{b}.jpg"])
    assert not any("SMITH" in n for n in long) and long[1] == long[0] + " (2)"
    # a base name of invisible characters only is not named after its (patient's) folder
    assert R.display_names(["/p/PATIENT_DOE/\u200b"]) == ["(unnamed)"]
    assert R.display_names(["/p/x.jpg", "/p/patient_07/"]) == ["x.jpg", "patient_07"]   # a folder given
    assert R.display_name("scans/(paren) \\ back.jpg") == "(paren) \\ back.jpg"   # a Linux name's character
    assert R.display_name("C:\\Users\\DOE\\scan.jpg") == "scan.jpg"           # a Windows path's separator
    assert R.display_name("/tmp/a\udcff\udcfeb.jpg") == "a\\xff\\xfeb.jpg"    # os.fsdecode(b"a\xff\xfeb.jpg")
    assert R.display_name("a\nb\u202e.jpg") == "ab.jpg"   # control and format characters still dropped


def test_the_report_and_its_csv_tell_same_named_files_apart(four):
    items = [("study.zip/patient_A/slice_01.jpg", scan_png(50)), ("study.zip/patient_B/slice_01.jpg", scan_png(51))]
    results = R.analyse(items, four)
    assert [r.name for r in results] == ["patient_A/slice_01.jpg", "patient_B/slice_01.jpg"]
    rows = list(csv.DictReader(io.StringIO(R.build_csv(results, four.classes))))
    assert [r["file"] for r in rows] == ["patient_A/slice_01.jpg", "patient_B/slice_01.jpg"]
    dict_rows = [{**r.to_row(), "file": name} for r, (name, _) in zip(results, items)]   # `predict_many` rows
    assert undated(R.build_csv(dict_rows, four.classes)) == undated(R.build_csv(results, four.classes))


@needs_poppler
def test_audit_lines_and_the_pdf_name_the_card_and_the_gate(four, tmp_path):
    """A result depends on card.json (calibration, threshold, referral) and the gate as much as on
    the weights; audit lines and the PDF named the weights alone."""
    from core.inference import file_sha256
    data = scan_png(52)
    log = tmp_path / "audit.jsonl"
    old = {"time": "2026-12-01T10:00:00+00:00", "sha256": "0" * 64, "model": "m", "model_version": "v",
           "weights_sha256": "1" * 64, "result": {}, "slice": None, "flags": []}
    log.write_text(json.dumps(old) + "\n")   # a line written before the card and gate hashes
    rec = append_audit(log, sha(data), four, four.predict_file(data, "a.png"), [])
    assert rec["card_sha256"] == file_sha256(four.dir / "card.json") == four.identity[2]
    assert rec["gate_sha256"] is None and four.gate is None   # no gate: nothing judged the image
    assert read_audit(log) == [old, rec]
    (page,) = pdf_pages(R.build_report([("a.png", data)], four), tmp_path)
    assert f"{four.card_sha256[:16]} / no gate" in page


@needs_poppler
def test_a_mask_that_contradicts_a_no_tumour_call_flags_the_report(four, tmp_path, monkeypatch):
    """The Diagnose page showed a red 'missed tumour' error and the miss note; the PDF said
    'No tumour' with neither (a gateless model: not a green NO FLAGS, but no word of the mask)."""
    from core import app_support
    monkeypatch.setattr(app_support, "miss_note", lambda p, t: "MISS NOTE: 'No tumour' is not a guarantee.")
    items = [("lesion.png", scan_png(53), {"mask": lesion_png()}), ("clear.png", scan_png(54))]
    results = R.analyse(items, four, threshold=1.0)   # at 1.0 every call is 'no tumour'
    assert [R.FLAG_MASK in r.flags for r in results] == [True, False]
    rows = list(csv.DictReader(io.StringIO(R.build_csv(results, four.classes))))
    assert R.FLAG_MASK in rows[0]["flags"] and R.FLAG_MASK not in rows[1]["flags"]
    summary, lesion, clear = map(flat, pdf_pages(R.render_pdf(results, R.ReportContext.of(four, 1.0, None)), tmp_path))
    assert R.FLAG_MASK in summary and "MASK CONTRADICTS CALL" in lesion and "missed tumour" in lesion
    assert "MASK CONTRADICTS CALL" not in clear
    assert "MISS NOTE" in lesion and "MISS NOTE" in clear   # under every 'no tumour' call
    tumour = R.analyse([("t.png", scan_png(53), {"mask": lesion_png()})], four, threshold=0.0)
    assert tumour[0].mask_note is None   # a tumour call agrees with the mask


@needs_poppler
def test_a_report_at_a_point_set_by_hand_says_what_it_costs(four, tmp_path, monkeypatch):
    """'Operating point 0.100 (set for this report)' and nothing else: read later, the report could
    not be told from one at the card's validated point."""
    from core import app_support
    monkeypatch.setattr(app_support, "threshold_cost",
                        lambda p, t: None if abs(t - p.threshold) < 1e-9 else f"COST AT {t:.2f} AGAINST THE CARD'S")
    results = R.analyse([("a.png", scan_png(57)), ("b.png", scan_png(58))], four, threshold=0.25)
    summary, page, _ = map(flat, pdf_pages(R.render_pdf(results, R.ReportContext.of(four, 0.25, None)), tmp_path))
    assert "COST AT 0.25 AGAINST THE CARD'S" in summary and "COST AT 0.25 AGAINST THE CARD'S" in page
    at_card = R.render_pdf(R.analyse([("a.png", scan_png(57))], four), R.ReportContext.of(four, None, None))
    (tmp_path / "at_card").mkdir()
    assert not any("COST AT" in flat(t) for t in pdf_pages(at_card, tmp_path / "at_card"))


@needs_poppler
@pytest.mark.parametrize("shift", [-4e-5, 4e-5])
def test_the_operating_point_is_printed_with_the_digits_of_the_probability_read_against_it(four, tmp_path, shift):
    """'Tumour probability 0.99531 / Below the operating point 0.995' and 'Glioma 0.995' beside
    'No tumour 0.995': the point printed at 3 decimals, the CSV at 4."""
    from core.metrics import digits_apart
    items = [("a.png", scan_png(55)), ("b.png", scan_png(56))]
    tp = R.analyse(items[:1], four)[0].prediction.tumour_probability
    t = tp + shift
    results = R.analyse(items, four, threshold=t)
    d = digits_apart(tp, t)
    assert f"{tp:.3f}" == f"{t:.3f}" and d > 3
    summary, page, _ = map(flat, pdf_pages(R.render_pdf(results, R.ReportContext.of(four, t, None)), tmp_path))
    assert f"operating point {t:.{d}f} (" in page and f"{tp:.{d}f}" in page
    assert f"tumour probability: {t:.{d}f}" in summary and f"{tp:.{d}f}" in summary
    row = next(csv.DictReader(io.StringIO(R.build_csv(results, four.classes))))
    assert (float(row["tumour_probability"]) >= float(row["threshold"])) == (row["prediction"] != "notumor")


def test_the_csv_names_the_model_the_slice_and_the_file(four, tmp_path):
    import hashlib
    import nibabel as nib
    vol = np.zeros((48, 48, 5), np.float32)
    vol[8:40, 10:38, :] = 120
    volume = nib.Nifti1Image(vol, np.eye(4)).to_bytes()
    items = [("a.png", scan_png(57)), ("v.nii", volume, {"slice_index": 3}), ("bad.png", b"no image")]
    out = R.report_downloads_data(items, four)
    assert out["csv"][0].startswith(b"\xef\xbb\xbf")
    a, v, bad = csv.DictReader(io.StringIO(out["csv"][0].decode("utf-8-sig")))
    for row in (a, v, bad):
        assert (row["model"], row["model_version"]) == (four.name, "0.0-test")
        assert (row["weights_sha256"], row["card_sha256"], row["gate_sha256"]) == (
            four.weights_sha256, four.card_sha256, "")
    assert a["file_sha256"] == hashlib.sha256(scan_png(57)).hexdigest() and a["slice"] == ""
    assert v["slice"] == "3" and bad["slice"] == ""
    assert bad["file_sha256"] == ""   # text: never hashed (a binary file that fails is: test_review_t)
    # a row read alone says the card's point beside its own, and when it was made
    assert {row["card_threshold"] for row in (a, v, bad)} == {f"{four.threshold:.6f}"}
    assert a["generated_utc"].endswith(" UTC") and a["generated_utc"][:4].isdigit()


def test_display_names_are_stable_and_the_csv_keeps_them():
    """A file passed twice printed 'pA/scan.jpg (2)' in the PDF but 'scan.jpg (2)' in the CSV:
    the CSV named the already-named rows again."""
    from core.report import display_names
    once = display_names(["pA/scan.jpg", "pB/scan.jpg", "pA/scan.jpg"])
    assert once == ["pA/scan.jpg", "pB/scan.jpg", "pA/scan.jpg (2)"]
    assert display_names(once) != once   # why the CSV must not name ScanResults again


def test_a_file_given_twice_keeps_its_pdf_name_in_the_csv(four):
    items = [("pA/scan.jpg", scan_png(53)), ("pB/scan.jpg", scan_png(54)), ("pA/scan.jpg", scan_png(53))]
    results = R.analyse(items, four)
    rows = list(csv.DictReader(io.StringIO(R.build_csv(results, four.classes))))
    assert [r["file"] for r in rows] == [r.name for r in results] == ["pA/scan.jpg", "pB/scan.jpg", "pA/scan.jpg (2)"]


def test_pdf_pictures_are_embedded_as_jpeg(four):
    """The view and the overlay go in as JPEG: Flate-packed pictures made ~300 kB a page, and a
    batch report of tens of scans tens of MB. The pictures are still there, two per scan."""
    items = [(f"s{k}.png", scan_png(k, 256)) for k in range(3)]
    pdf = R.build_report(items, four)
    assert pdf.count(b"/DCTDecode") == 2 * len(items) and b"/FlateDecode\n/Height 384" not in pdf
    assert len(pdf) < 100_000 * (len(items) + 1), len(pdf)


def test_the_report_names_the_volume_of_a_4d_file_as_the_app_table_does(four):
    """`report` kept only some info keys: its CSV and line lost the volume the app's table names."""
    import nibabel as nib
    vol = (np.random.default_rng(0).random((48, 48, 5, 3)) * 200).astype(np.float32)
    (r,) = R.analyse([("four_d.nii", nib.Nifti1Image(vol, np.eye(4)).to_bytes())], four)
    row = r.to_row()
    assert next(csv.DictReader(io.StringIO(R.build_csv([r], four.classes))))["volume"] == "0 of 3"
    assert "volume 0 of 3" in R.text_line(row)


def test_a_referred_calls_tumour_bar_is_amber_not_green(four, monkeypatch):
    """The app's gauge turned amber on a referred call; the PDF's bar stayed green under 'UNCERTAIN - REFER'."""
    import dataclasses
    real, colours = four.predict_scan, []
    drawn = R._bar
    monkeypatch.setattr(R, "_bar", lambda pdf, x, y, w, h, v, colour: colours.append(colour) or drawn(pdf, x, y, w, h, v, colour))
    monkeypatch.setattr(four, "predict_scan", lambda scan: dataclasses.replace(real(scan), pred="notumor", uncertain=True))
    R.build_report([("a.png", scan_png(6))], four)
    assert R.AMBER[1] in colours and R.GREEN[1] not in colours
    colours.clear()
    monkeypatch.setattr(four, "predict_scan", lambda scan: dataclasses.replace(real(scan), pred="notumor", uncertain=False))
    R.build_report([("a.png", scan_png(6))], four)
    assert R.GREEN[1] in colours and R.AMBER[1] not in colours


def test_saliency_scope_says_where_maps_were_checked_and_for_which_types_not():
    """Only LGG ships masks: an 89 % pointing figure for FLAIR gliomas said nothing of a
    meningioma's map, which by eye mostly lies beside the lesion (session 51)."""
    from core.report import saliency_scope
    card = {"classes": ["glioma", "meningioma", "notumor", "pituitary"],
            "saliency": {"default_method": "Grad-CAM++", "measured": {
                "pointing_game": 0.8867, "n_slices": 150, "target": "glioma", "dilate_px": 4, "source": "lgg"}}}
    said = saliency_scope(card)
    assert "only on LGG FLAIR slices (glioma)" in said and "Grad-CAM++'s peak" in said and "89% of 150" in said
    assert "the peak, not the extent" in said
    assert said.endswith("Not tested on other sequences or tumour types (meningioma, pituitary tumour).")
    assert "never tested" in saliency_scope({"classes": card["classes"]})
    assert "never tested" in saliency_scope({"classes": ["notumor", "tumour"], "saliency": {"default_method": "Grad-CAM"}})
    binary = {**card, "classes": ["notumor", "tumor"],
              "saliency": {**card["saliency"], "measured": {**card["saliency"]["measured"], "target": "tumor"}}}
    assert saliency_scope(binary).endswith("Not tested on other sequences.") and "slices:" in saliency_scope(binary)
