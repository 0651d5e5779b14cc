"""A decoder's panic, or any surprise of one file, ends that file only (review of 2026-12-07).

pylibjpeg-rle, a Rust decoder, panicked on a damaged RLE DICOM with pyo3's PanicException, which
derives from BaseException: every `except Exception` net let it through, and `predict`,
`evaluate`, `audit` and the app's batch ended at that file with a Rust and Python traceback."""
from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys

import numpy as np
import pytest

import core.reader as reader
from conftest import DATA, REPO
from core.inference import iter_predictions
from core.reader import UNPROCESSED, ScanError, is_file_fault, read_scan
from test_bad_inputs import assert_plain_sentence
from test_reader import make_dicom


class PanicException(BaseException):
    """As pyo3 names and derives it."""


def damaged_rle(path) -> bytes:
    """The shared sample DICOM, RLE-compressed, with 27 bytes of its RLE stream overwritten: the
    file the review found (pylibjpeg-rle 2.2: 'index out of bounds: the len is 100352')."""
    import pydicom
    from pydicom.uid import RLELossless
    ds = pydicom.dcmread(path)
    ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    d = bytearray(buf.getvalue())
    d[6489:6516] = bytes([221, 99, 252, 53, 199, 151, 255, 8, 166, 205, 144, 9, 80, 102, 167, 69, 173, 219,
                          109, 136, 49, 194, 176, 248, 120, 33, 20])
    return bytes(d)


def test_a_damaged_rle_dicom_ends_no_batch_and_prints_no_backtrace(tmp_path):
    sample = DATA / "samples" / "sample_glioma.dcm"
    if not sample.is_file():
        pytest.skip("needs ../shared/data/samples")
    bad = tmp_path / "damaged_rle.dcm"
    bad.write_bytes(damaged_rle(sample))
    good = next((DATA / "brain-tumor-mri" / "Training" / "glioma").glob("*.jpg"))
    r = subprocess.run([sys.executable, "-m", "core", "predict", str(good), str(bad), str(good), "--json"],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [row["file"] for row in rows] == [str(good), str(bad), str(good)], r.stderr[-2000:]
    assert rows[0]["ok"] and rows[2]["ok"]
    # refused: pydicom's own decoder reads the damaged stream with a third of the pixels wrong
    # and only warns of "non-conformant padding" (50,368 bytes for a 50,176-pixel frame)
    assert not rows[1]["ok"] and "damaged" in rows[1]["error"]
    assert_plain_sentence(rows[1]["error"])
    assert r.returncode == 1 and "panicked" not in r.stderr and "Traceback" not in r.stderr


def test_a_valid_rle_dicom_reads_as_its_uncompressed_original():
    sample = DATA / "samples" / "sample_glioma.dcm"
    if not sample.is_file():
        pytest.skip("needs ../shared/data/samples")
    import pydicom
    from pydicom.uid import RLELossless
    ds = pydicom.dcmread(sample)
    ds.compress(RLELossless)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    assert np.array_equal(read_scan(buf.getvalue(), "rle.dcm").pixels, read_scan(sample).pixels)


def test_a_decoder_panic_is_the_file_s_error(tmp_path, monkeypatch):
    import pydicom.pixels

    def panics(*a, **k):
        raise PanicException("index out of bounds")
    monkeypatch.setattr(pydicom.pixels, "pixel_array", panics)
    with pytest.raises(ScanError) as err:
        read_scan(make_dicom(np.full((1, 64, 64), 900, np.uint16)), "x.dcm")
    assert_plain_sentence(str(err.value))


def test_the_batch_net_holds_a_panic_and_lets_an_interrupt_through(monkeypatch, random_weights):
    from core.inference import Predictor
    predictor = Predictor(random_weights)
    raised = iter([PanicException("boom"), RuntimeError("a bug"), None])
    real = reader.read_scan

    def read(src, name=None, **kw):
        if (e := next(raised)) is not None:
            raise e
        return real(src, name, **kw)
    monkeypatch.setattr("core.inference.read_scan", read)
    png = io.BytesIO()
    from PIL import Image
    Image.fromarray((np.random.default_rng(0).random((96, 96)) * 255).astype(np.uint8)).save(png, "PNG")
    rows = list(iter_predictions(predictor, [("a.png", png.getvalue()), ("b.png", png.getvalue()),
                                             ("c.png", png.getvalue())]))
    assert [(r["file"], r["ok"]) for r in rows] == [("a.png", False), ("b.png", False), ("c.png", True)]
    assert rows[0]["error"] == rows[1]["error"] == UNPROCESSED
    assert_plain_sentence(UNPROCESSED)
    monkeypatch.setattr("core.inference.read_scan", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        list(iter_predictions(predictor, [("a.png", png.getvalue())]))


def test_is_file_fault_names_what_a_net_may_hold():
    assert is_file_fault(ValueError()) and is_file_fault(PanicException())
    for control in (KeyboardInterrupt(), SystemExit(), GeneratorExit()):
        assert not is_file_fault(control)
    from streamlit.runtime.scriptrunner_utils.exceptions import RerunException, StopException
    assert not is_file_fault(StopException()) and not is_file_fault(RerunException(None))


def test_a_transfer_syntax_with_control_characters_reaches_no_message_or_info_raw():
    """A damaged header's UID went into the error as it was: in the CLI's text an escape sequence
    cleared the terminal."""
    data = make_dicom(np.full((1, 64, 64), 900, np.uint16))
    uid = b"1.2.840.10008.1.2.1\x00"
    assert data.count(uid) == 1
    bad = data.replace(uid, b"1.2\x1b[2J\x1b[31mX".ljust(len(uid), b"\x00"))
    with pytest.raises(ScanError) as err:
        read_scan(bad, "x.dcm")
    assert "\x1b" not in str(err.value) and "compression" in str(err.value)
    assert_plain_sentence(str(err.value))


def _exif_jpeg(count: int) -> bytes:
    """A JPEG whose EXIF orientation tag claims ``count`` values (1: a valid tag 6; more: data
    the block does not hold, which Pillow warns of while opening the file)."""
    from PIL import Image
    ifd = b"MM\x00*\x00\x00\x00\x08" + b"\x00\x01" + b"\x01\x12\x00\x03" + count.to_bytes(4, "big") + b"\x00\x06\x00\x00"
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(1).random((80, 64)) * 255).astype(np.uint8)).save(
        buf, "JPEG", exif=b"Exif\x00\x00" + ifd + b"\x00\x00\x00\x00")
    return buf.getvalue()


def test_library_warnings_on_damaged_files_stay_off_stderr(tmp_path):
    """Pillow's "Tag data larger than file", numpy's overflow on a float TIFF's -3.4e38 and
    nibabel's "vox offset too low" reached the CLI's stderr, which is for its own lines."""
    import nibabel as nib
    from PIL import Image
    assert read_scan(_exif_jpeg(1), "ok.jpg").info.get("exif_rotated") == 6   # the tag is read
    (tmp_path / "exif.jpg").write_bytes(_exif_jpeg(0xFFFF))
    a = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    a[3, 3] = -3.4e38
    Image.fromarray(a, mode="F").save(tmp_path / "extreme.tif")
    img = nib.Nifti1Image(np.random.default_rng(0).random((32, 32, 3)).astype(np.float32), np.eye(4))
    nib.save(img, tmp_path / "v.nii")
    raw = bytearray((tmp_path / "v.nii").read_bytes())
    raw[108:112] = np.float32(-100).tobytes()   # vox_offset
    (tmp_path / "offset.nii").write_bytes(bytes(raw))
    code = ("import sys; from core.reader import read_scan, ScanError\n"
            "for f in sys.argv[1:]:\n"
            "    try: read_scan(f)\n"
            "    except ScanError: pass\n")
    files = [str(tmp_path / n) for n in ("exif.jpg", "extreme.tif", "offset.nii")]
    r = subprocess.run([sys.executable, "-c", code, *files], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stderr == "", r.stderr


def test_a_nifti_header_with_stray_dimensions_is_called_damaged_not_petabytes(tmp_path):
    """dim[0] = 8 reads a ninth, stray value as a dimension: 'The volume is too large
    (108086391056891904 MB).'"""
    import nibabel as nib
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 4), np.int16), np.eye(4)), tmp_path / "v.nii")
    raw = bytearray((tmp_path / "v.nii").read_bytes())
    raw[40:42] = np.int16(8).tobytes()
    for data, name in ((bytes(raw), "v.nii"), (gzip.compress(bytes(raw)), "v.nii.gz")):
        with pytest.raises(ScanError) as err:
            read_scan(data, name)
        assert "impossible size" in str(err.value), name
        assert_plain_sentence(str(err.value))
