"""Review R: zip members whose decompressor zipfile does not bound (bzip2, lzma), zip64 and oversized
listings parsed before any limit, labelled-zip members named alike, a damaged eval.json record,
classes without test scans in the normalised confusion matrix, and tar uploads.

Each test failed on the code before its fix.
"""
from __future__ import annotations

import bz2
import gzip
import io
import json
import shutil
import math
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from conftest import REPO, edited_weights
from core import app_support, archive
from core.dashboard import confusion_heatmap
from core.inference import Predictor
from core.reader import ScanError, read_scan

SAMPLES = REPO / "assets" / "samples"
NOT_READ = "compressed with a method this app does not read"


def _lying_bzip2_zip(inflated: int, declared: int = 1000) -> bytes:
    """One bzip2 member whose headers declare ``declared`` bytes, inflating to ``inflated``."""
    stream = bz2.compress(b"\0" * inflated, 9)
    name = b"scan.png"
    local = struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 46, 0, 12, 0, 0, 0, len(stream), declared,
                        len(name), 0) + name
    cd = struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 0x031E, 46, 0, 12, 0, 0, 0, len(stream),
                     declared, len(name), 0, 0, 0, 0, 0o100644 << 16, 0) + name
    body = local + stream
    return body + cd + struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, len(cd), len(body), 0)


def _no_decompressor(*a, **k):
    pytest.fail("a bzip2 or lzma member was decompressed")


# ----------------------------------------------------------------------------- 1: bzip2 / lzma members
def test_a_bzip2_member_lying_about_its_size_is_refused_without_inflating(monkeypatch):
    """A 580-byte zip whose bzip2 member declares 1 kB inflated to 600 MB: zipfile bounds a read
    by the declared size for deflate only."""
    data = _lying_bzip2_zip(4 * 2**20)
    monkeypatch.setattr(zipfile.bz2, "BZ2Decompressor", _no_decompressor)
    got = archive.read_zip(data)
    assert not list(got) and len(got.skipped) == 1
    assert NOT_READ in got.skipped[0][1]


def test_an_lzma_member_is_refused_and_the_others_are_read(monkeypatch):
    png = (SAMPLES / "glioma.jpg").read_bytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a/packed.jpg", png, compress_type=zipfile.ZIP_LZMA)
        z.writestr("a/plain.jpg", png, compress_type=zipfile.ZIP_DEFLATED)
    monkeypatch.setattr(zipfile.lzma, "LZMADecompressor", _no_decompressor)
    got = archive.read_zip(buf.getvalue())
    assert [n for n, _ in got] == ["a/plain.jpg"]
    assert got.skipped[0][0] == "a/packed.jpg" and NOT_READ in got.skipped[0][1]


# ----------------------------------------------------------------------------- 2: listings too large
def _refused_before_parsing(monkeypatch, data: bytes, match: str) -> None:
    monkeypatch.setattr(zipfile, "ZipFile", lambda *a, **k: pytest.fail("the listing was parsed"))
    with pytest.raises(ScanError, match=match):
        archive.read_zip(data)


def test_a_zip64_listing_of_too_many_entries_is_refused_before_parsing(monkeypatch):
    """Past 65,535 entries the end record's count reads 0xFFFF and the zip64 record holds the
    count: it was taken as 0, and 450,000 entries took 10 s and 340 MB before the refusal."""
    buf = io.BytesIO()
    with monkeypatch.context() as m:
        m.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 10)   # the zip64 end record without 65,536 entries
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
            for i in range(archive.MAX_ENTRIES + 1):
                z.writestr(zipfile.ZipInfo(f"{i:x}"), b"x")
    data = bytearray(buf.getvalue())
    assert b"PK\x06\x06" in data[-200:]
    end = data.rfind(b"PK\x05\x06")
    data[end + 8:end + 12] = b"\xff" * 4   # the 16-bit counts as past 65,535 entries they read
    _refused_before_parsing(monkeypatch, bytes(data), f"more than {archive.MAX_MEMBERS} files")


def test_a_listing_larger_than_its_count_is_refused_before_parsing(monkeypatch):
    """zipfile parses as many entries as the listing's declared size holds, whatever the count."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for i in range(1000):
            z.writestr(zipfile.ZipInfo(f"{i:04d}" + "n" * 3000), b"x")
    _refused_before_parsing(monkeypatch, buf.getvalue(), "list of files is too large")


# ----------------------------------------------------------------------------- 3: names alike
def test_labelled_members_named_alike_keep_their_own_scan_in_the_gallery(random_weights):
    """'glioma/a.jpg' and './glioma/a.jpg' were one name: the gallery showed the other scan."""
    normal, glioma = (SAMPLES / "notumor.jpg").read_bytes(), (SAMPLES / "glioma.jpg").read_bytes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("glioma/a.jpg", normal)
        z.writestr("./glioma/a.jpg", glioma)
    predictor = Predictor(random_weights)
    held = app_support.evaluate_zip(predictor, "mine.zip", buf.getvalue())
    records = held["ev"]["predictions"]
    assert len({r["file"] for r in records}) == 2 and all(r["label"] == "glioma" for r in records)
    probs = [predictor.predict_file(held["blobs"][r["file"]], r["file"]).probs for r in records]
    assert probs[0] != probs[1]   # else the check below could not tell the scans apart
    for r, p in zip(records, probs):
        assert all(math.isclose(r["probs"][c], p[c], abs_tol=1e-5) for c in predictor.classes)


# ----------------------------------------------------------------------------- 4, 5: eval.json records
def _damaged(random_weights, tmp_path, damage) -> Path:
    w = edited_weights(random_weights, tmp_path / "w")
    ev = json.loads((w / "eval.json").read_text())
    damage(ev["predictions"][0])
    (w / "eval.json").write_text(json.dumps(ev))   # NaN and Infinity are written as JSON reads them
    return w


DAMAGES = {"a class missing": lambda r: r["probs"].pop("glioma"),
           "NaN": lambda r: r["probs"].update(glioma=float("nan")),
           "infinite tumour probability": lambda r: r.update(tumour_probability=float("inf")),
           "no label": lambda r: r.pop("label"),
           "no gate flag": lambda r: r.pop("in_distribution"),   # the page's _metrics_for: a KeyError
           "no file": lambda r: r.pop("file")}


@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_eval_record_is_one_sentence(random_weights, tmp_path, damage):
    assert app_support.eval_problem(random_weights) is None   # undamaged, it passes the check
    w = _damaged(random_weights, tmp_path, damage)
    problem = app_support.eval_problem(w)
    assert problem and "eval.json is unreadable (its record 1 " in problem
    assert app_support.load_eval(w) is None
    assert app_support.miss_note(Predictor(w), 0.5) is None   # the Diagnose page's note: a KeyError


@pytest.mark.parametrize("damage", [DAMAGES["a class missing"], DAMAGES["NaN"], DAMAGES["no gate flag"]],
                         ids=["missing", "NaN", "no gate flag"])
def test_the_evaluation_page_stands_a_damaged_eval_record(random_weights, tmp_path, monkeypatch, damage):
    w = _damaged(random_weights, tmp_path, damage)
    monkeypatch.setenv("BT_WEIGHTS", str(w))
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=90).run()
    at.switch_page("app_pages/evaluation.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("eval.json is unreadable" in x.value for x in at.warning)


# ----------------------------------------------------------------------------- 6: empty rows
def test_a_class_without_test_scans_has_no_recall_in_the_normalised_matrix():
    fig = confusion_heatmap([[3, 1, 0], [0, 0, 0], [0, 1, 3]], ["a", "b", "c"])
    z, text = fig.data[0].z, fig.data[0].text
    assert np.isnan(z[1]).all() and list(text[1]) == ["0<br>n/a"] * 3
    assert list(text[0]) == ["3<br>75%", "1<br>25%", "0<br>0%"]


# ----------------------------------------------------------------------------- 7: tar uploads
def _tar(gz: bool) -> bytes:
    jpg = (SAMPLES / "glioma.jpg").read_bytes()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        info = tarfile.TarInfo("scans/a.jpg")
        info.size = len(jpg)
        tf.addfile(info, io.BytesIO(jpg))
    return buf.getvalue()


@pytest.mark.parametrize("name, data", [("scans.tar", _tar(False)), ("scans.tar.gz", _tar(True)),
                                        ("scans.tgz", _tar(True)), ("scans.gz", gzip.compress(_tar(False))),
                                        ("scans", _tar(False))],
                         ids=["tar", "tar.gz", "tgz", "gz", "no suffix"])
def test_a_tar_archive_is_said_to_be_one(name, data):
    with pytest.raises(ScanError, match=r"^Tar archives are not supported: upload a zip\.$"):
        read_scan(data, name)
    with pytest.raises(ScanError, match="Tar archives"):
        app_support.read_upload(data, name)


# ----------------------------------------------------------------------------- reruns of a batch
def test_a_rerun_of_a_40_scan_batch_reads_no_file_again(random_weights, monkeypatch):
    """Every widget click reruns the page, which analyses every row again: the scans must come
    from the session's cache (bounded by bytes), not be decoded again (16 entries did that)."""
    from PIL import Image
    monkeypatch.setenv("BT_WEIGHTS", str(random_weights))
    reads = {"n": 0}
    real = app_support.read_upload

    def counting(*a, **k):
        reads["n"] += 1
        return real(*a, **k)
    monkeypatch.setattr(app_support, "read_upload", counting)
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(buf, "w") as z:
        for k in range(40):
            img = Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).resize((96, 96))
            b = io.BytesIO()
            img.save(b, "PNG")
            z.writestr(f"batch/{k}.png", b.getvalue())
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=300).run()
    at.switch_page("app_pages/diagnose.py").run()
    at.file_uploader[0].set_value([("batch.zip", buf.getvalue(), "application/zip")]).run()
    assert not at.exception, [e.value for e in at.exception]
    assert reads["n"] >= 40
    reads["n"] = 0
    details = next(s for s in at.selectbox if s.label == "Show the details of")
    details.set_value(details.options[5]).run()
    assert not at.exception, [e.value for e in at.exception]
    assert reads["n"] == 0


SHOWN_DAMAGES = {"history of numbers": ("history.json", lambda h: [1, 2, 3]),
                 "history without epochs": ("history.json", lambda h: [{k: v for k, v in e.items() if k != "epoch"}
                                                                       for e in h]),
                 "training a list": ("card.json", lambda c: {**c, "training": []}),
                 "best epoch as text": ("card.json", lambda c: {**c, "training": {**c["training"], "best_epoch": "7"}}),
                 "source images null": ("card.json", lambda c: {**c, "sources": [{**s, "images": None} for s in c["sources"]]}),
                 "metrics null": ("card.json", lambda c: {**c, "metrics": None})}


@pytest.mark.parametrize("damage", SHOWN_DAMAGES.values(), ids=SHOWN_DAMAGES.keys())
def test_the_training_and_card_pages_stand_a_damaged_shown_field(tmp_path, monkeypatch, damage):
    """Each of these was a traceback on the Training or Model card page (or Home)."""
    name, fn = damage
    w = tmp_path / "w"
    shutil.copytree(REPO / "weights" / "cnn_bn_aug", w)
    (w / name).write_text(json.dumps(fn(json.loads((w / name).read_text()))))
    monkeypatch.setenv("BT_WEIGHTS", str(w))
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=90).run()
    assert not at.exception, [e.value for e in at.exception]
    for page in ("app_pages/training.py", "app_pages/model_card.py"):
        at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
