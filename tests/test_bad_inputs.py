"""A corpus of bad and unusual uploads: each reads correctly or fails with its one clear sentence,
through `read_scan`, through `predict_many` and through `python -m core predict` (run once for
the whole corpus). Also the zip reader's limits (traversal, zip bomb, hidden files).
"""
from __future__ import annotations

import gzip
import io
import json
import os
import re
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_reader import (PHI, dicom12, encode, grey8, image_in_mode, lps_volume, make_dicom,  # noqa: E402
                         nifti_bytes, phantom)

from core import archive, reader  # noqa: E402
from core.reader import ScanError, ScanImage, read_scan  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OK = "ok"


@dataclass
class Case:
    name: str                                   # file name (its extension may lie)
    data: bytes | None                          # None: the path is made by `make_path`
    expect: str                                 # OK or a regex the error must match
    check: Callable[[ScanImage], bool] | None = None
    make_path: Callable[[Path], None] | None = None


# ----------------------------------------------------------------------------- builders
def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring any size, with almost no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def random_bytes(n: int, seed: int = 0) -> bytes:
    data = bytearray(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())
    data[:4] = b"\x13\x37\x42\x42"  # make sure no magic number starts it
    return bytes(data)


def exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(grey8(96, 64).transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif)


def animated_gif() -> bytes:
    frames = [Image.fromarray(np.roll(np.asarray(grey8()), 20 * k, axis=1)) for k in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def dicom_with_syntax(uid: str) -> bytes:
    """A DICOM claiming a transfer syntax we have no decoder for, with junk encapsulated data."""
    import pydicom
    from pydicom.encaps import encapsulate
    ds = pydicom.dcmread(io.BytesIO(make_dicom(dicom12(phantom()))))
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 500])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = uid
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def nifti_bomb() -> bytes:
    """A .nii.gz whose header declares 1024^3 int16 voxels (2 GB) over 20 MB of zeros."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1024, 1024, 1024))
    hdr.set_data_dtype(np.int16)
    head = hdr.binaryblock + b"\0" * 4
    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    body = z.compress(head) + b"".join(z.compress(b"\0" * 2**20) for _ in range(20)) + z.flush()
    return body


def nifti_header_pair() -> bytes:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((32, 32, 3))
    hdr["magic"] = b"ni1"
    return hdr.binaryblock


def damaged_dicom(**elements: str) -> bytes:
    """A good DICOM whose given elements hold letters where the standard wants a number."""
    import pydicom
    ds = pydicom.dcmread(io.BytesIO(make_dicom(dicom12(phantom()))))
    for k, v in elements.items():
        setattr(ds, k, v)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue().replace(b"987654321", b"abcdefghi")


def ztxt_bomb() -> bytes:
    """A 7 KB PNG whose compressed text chunk inflates to 3 MB."""
    from PIL import PngImagePlugin
    meta = PngImagePlugin.PngInfo()
    meta.add_text("Comment", "A" * (3 * 2**20), zip=True)
    return encode(grey8(), "PNG", pnginfo=meta)


def nan_affine(raw_nii: bytes) -> bytes:
    """A NIfTI-1 whose sform (the one used: sform_code 1, qform_code 0) holds a NaN."""
    b = bytearray(raw_nii)
    struct.pack_into("<hh", b, 252, 0, 1)
    struct.pack_into("<12f", b, 280, np.nan, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0)
    return bytes(b)


def exif_orientation_as_text() -> bytes:
    """A JPEG whose EXIF Orientation tag holds text: viewers ignore it, so must we."""
    exif = Image.Exif()
    exif[0x0112] = 6
    raw = exif.tobytes()
    entry = b"\x01\x12\x00\x03\x00\x00\x00\x01"  # tag 0x0112, type SHORT, count 1 (Pillow: big endian)
    assert entry in raw
    return encode(grey8(), "JPEG", exif=raw.replace(entry, b"\x01\x12\x00\x02\x00\x00\x00\x01"))  # ASCII


def make_zip(members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, content in members.items():
            zf.writestr(zipfile.ZipInfo(name), content, compress_type=compression)
    return buf.getvalue()


def sparse_file(size: int) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        with open(path, "wb") as f:
            f.truncate(size)  # sparse: no disk or memory used
    return make


# ----------------------------------------------------------------------------- the corpus
def build_corpus() -> list[Case]:
    base = phantom()
    good_png = encode(grey8(), "PNG")
    jpeg = encode(grey8(256, 256), "JPEG", quality=90)
    vol = [np.roll(base, 5 * k, axis=0) for k in range(5)]
    dcm = make_dicom(dicom12(base))
    frames = np.stack([dicom12(np.roll(base, 15 * k, 1)) for k in range(3)])
    pixels_cut = dcm[: len(dcm) - 6000]
    big = Image.fromarray(np.tile(np.linspace(0, 255, 4000).astype(np.uint8), (4000, 1)))
    rng = np.random.default_rng(1)
    photo = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    five_d = nifti_bytes(np.zeros((16, 16, 4, 2, 2), np.int16), gz=False)
    raw_nii = nifti_bytes(np.stack([s.T for s in vol], -1), np.diag([-1.0, -1.0, 1, 1]), gz=False)
    similar = lambda px, ref: float(np.corrcoef(px.ravel(), ref.ravel())[0, 1]) > 0.98  # noqa: E731
    return [
        # -- not images at all
        Case("empty.jpg", b"", r"^The file is empty\.$"),
        Case("text.jpg", b"Patient notes: nothing to see here.\n" * 5, r"contains text"),
        Case("page.png", b"<!DOCTYPE html><html><body><img src='scan.png'></body></html>", r"contains text"),
        Case("random.bin", random_bytes(4096), r"name ends in '\.bin' but its content is not a supported scan"),
        Case("noise", random_bytes(4096, 1), r"^The file is not a supported scan"),
        Case("report.pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", r"PDF document"),
        Case("archive.zip", make_zip({"a.png": good_png}), r"zip archive, not a single scan"),
        Case("missing.png", None, r"^The file does not exist\.$", make_path=lambda p: None),
        Case("a_folder.png", None, r"folder, not a file", make_path=lambda p: p.mkdir()),
        Case("oversize.dcm", None, r"larger than the 50 MB limit",
             make_path=sparse_file(reader.MAX_BYTES + 1)),
        # -- broken or hostile images
        Case("truncated.jpg", jpeg[: len(jpeg) // 2], r"truncated"),
        Case("truncated.png", good_png[: len(good_png) // 2], r"truncated|damaged"),
        Case("header_60000.png", png_header_only(60_000, 60_000), r"too large \(its header declares 3,600 megapixels"),
        Case("ztxt_bomb.png", ztxt_bomb(), r"embedded text \(metadata\) is too large"),   # was 'damaged'
        Case("jpeg_ls.jls", b"\xff\xd8\xff\xf7\x00\x0b\x08\x00\x40\x00\x40\x01\x01\x11\x00\xff\xda" + bytes(64),
             r"name ends in '\.jls' but its content is not a supported scan"),   # starts as a JPEG does: not 'damaged'
        Case("bad_crc.png", good_png[:20] + bytes([good_png[20] ^ 1]) + good_png[21:],   # IHDR fails its checksum
             r"^The file is a PNG image that is damaged and cannot be read\.$"),
        Case("header_7000.png", png_header_only(7_000, 7_000), r"too large \(7000 x 7000 pixels"),
        Case("tiny_8x8.png", encode(grey8(8, 8), "PNG"), r"too small \(8 x 8 pixels\)"),
        Case("strip_60000x10.png", encode(grey8(10, 60000), "PNG"), r"too narrow \(60000 x 10 pixels\)"),
        Case("strip_2000x40.png", encode(grey8(40, 2000), "PNG"), r"too elongated"),
        # -- unusual but fine
        Case("big_4000.jpg", encode(big, "JPEG", quality=80), OK,
             lambda s: max(s.pixels.shape) <= reader.MAX_SIDE and s.pixels.shape[0] == s.pixels.shape[1]),
        Case("wide_288x96.png", encode(grey8(96, 288), "PNG"), OK, lambda s: s.pixels.shape == (96, 288)),
        Case("anim.gif", animated_gif(), OK, lambda s: s.info["n_frames"] == 3 and s.info["frame"] == 0),
        Case("exif_rotated.jpg", exif_rotated_jpeg(), OK, lambda s: s.pixels.shape == (96, 64)),
        Case("colour_photo.jpg", encode(Image.fromarray(photo), "JPEG"), OK, lambda s: s.colourfulness > 0.1),
        Case("mode_1.png", encode(image_in_mode("1"), "PNG"), OK),
        Case("mode_P.png", encode(image_in_mode("P"), "PNG"), OK, lambda s: similar(s.pixels, base)),
        Case("mode_LA.png", encode(image_in_mode("LA"), "PNG"), OK, lambda s: s.pixels[:, :8].max() == 0),
        Case("mode_CMYK.jpg", encode(image_in_mode("CMYK"), "JPEG"), OK, lambda s: similar(s.pixels, base)),
        Case("mode_I16.png", encode(image_in_mode("I;16"), "PNG"), OK, lambda s: similar(s.pixels, base)),
        Case("mode_I.tif", encode(image_in_mode("I"), "TIFF"), OK, lambda s: similar(s.pixels, base)),
        Case("mode_F.tif", encode(image_in_mode("F"), "TIFF"), OK, lambda s: similar(s.pixels, base)),
        Case("scan.webp", encode(grey8(), "WEBP", lossless=True), OK),
        Case("scan.bmp", encode(grey8().convert("RGB"), "BMP"), OK),
        Case("png_named.jpg", good_png, OK),
        Case("blank.png", encode(Image.new("L", (64, 64)), "PNG"), OK, lambda s: s.info["blank"]),
        # -- DICOM
        Case("plain.dcm", dcm, OK, lambda s: similar(s.pixels, base)),
        Case("dicom_named.jpg", dcm, OK, lambda s: s.kind == "dicom"),
        Case("mono1.dcm", make_dicom(4095 - dicom12(base), photometric="MONOCHROME1"), OK,
             lambda s: similar(s.pixels, base)),
        Case("multiframe.dcm", make_dicom(frames), OK, lambda s: s.info["frame"] == 1),
        Case("rescale.dcm", make_dicom(dicom12(base) // 2, rescale=(2.0, -1000.0), window=(0, 4000)), OK,
             lambda s: similar(s.pixels, base)),
        Case("no_window.dcm", make_dicom(dicom12(base), window=None), OK),
        Case("no_preamble.dcm", make_dicom(dicom12(base), preamble=False), OK),
        Case("no_pixels.dcm", make_dicom(dicom12(base), with_pixels=False), r"no pixel data"),
        Case("cut_pixels.dcm", pixels_cut, r"DICOM file.*(damaged|incomplete)"),
        Case("mpeg2.dcm", dicom_with_syntax("1.2.840.10008.1.2.4.100"),
             r"compression \(MPEG2.*cannot be decoded"),
        Case("frames_not_a_number.dcm", damaged_dicom(NumberOfFrames="987654321"),
             r"damaged \(its number of frames is not a number\)"),
        Case("slope_not_a_number.dcm", damaged_dicom(RescaleSlope="987654321", RescaleIntercept="0"),
             r"rescale or colour tables are damaged"),
        *(Case(f"slope_{v}.dcm", make_dicom(dicom12(base), rescale=(float(v), 0.0)), r"rescale or colour tables are damaged")
          for v in ("nan", "inf", "0")),   # every pixel one value: was read as 'blank'
        Case("intercept_nan.dcm", make_dicom(dicom12(base), rescale=(1.0, float("nan"))),
             r"rescale or colour tables are damaged"),
        Case("palette_without_lut.dcm", make_dicom(dicom12(base), photometric="PALETTE COLOR"),
             r"rescale or colour tables are damaged"),
        Case("garbage_after_magic.dcm", b"\0" * 128 + b"DICM" + random_bytes(600), r"DICOM file.*damaged"),
        # -- NIfTI
        Case("vol3d.nii.gz", lps_volume(vol), OK,
             lambda s: s.info["slice_index"] == 2 and similar(s.pixels, vol[2])),
        Case("vol3d_raw.nii", raw_nii, OK, lambda s: s.info["n_slices"] == 5),
        Case("vol4d.nii.gz", nifti_bytes(np.stack([np.stack([s.T for s in vol], -1)] * 2, -1)), OK,
             lambda s: s.info["n_volumes"] == 2),
        Case("truncated.nii", raw_nii[: len(raw_nii) // 2], r"NIfTI file is truncated"),
        Case("truncated.nii.gz", gzip.compress(raw_nii)[:len(gzip.compress(raw_nii)) // 2], r"truncated"),
        Case("text.nii.gz", gzip.compress(b"not a volume\n" * 100), r"does not contain a NIfTI volume"),
        Case("bomb.nii.gz", nifti_bomb(), r"volume is too large"),
        Case("pair.hdr", nifti_header_pair(), r"header without its image data"),
        Case("five_d.nii", five_d, r"5 dimensions"),
        Case("nan_affine.nii", nan_affine(raw_nii), r"orientation \(affine\) is damaged"),
        Case("no_slices.nii.gz", nifti_bytes(np.zeros((64, 64, 0), np.int16)), r"has no slices"),
        Case("two_members.nii.gz", gzip.compress(raw_nii[:1000]) + gzip.compress(raw_nii[1000:]), OK,
             lambda s: s.info["n_slices"] == 5),
        Case("exif_text_orientation.jpg", exif_orientation_as_text(), OK),
        Case("pipe.png", None, r"not a regular file", make_path=lambda p: os.mkfifo(p)),
    ]


CORPUS = build_corpus()


def materialise(cases: list[Case], folder: Path) -> list[str]:
    paths = []
    for c in cases:
        p = folder / c.name
        if c.make_path:
            c.make_path(p)
        else:
            p.write_bytes(c.data)
        paths.append(str(p))
    return paths


def assert_plain_sentence(message: str) -> None:
    """One sentence for a person: capital first, full stop last, no code, no second sentence."""
    assert re.fullmatch(r"[A-Z][^\n]{5,220}\.", message), message
    assert not re.search(r"\.\s+[A-Z]", message), message
    assert "Traceback" not in message and "Error" not in message and "0x" not in message, message


# ----------------------------------------------------------------------------- read_scan
@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_corpus_through_read_scan(case, tmp_path):
    (path,) = materialise([case], tmp_path)
    if case.expect == OK:
        scan = read_scan(path)
        px = scan.pixels
        assert px.ndim == 2 and px.dtype == np.float32 and min(px.shape) >= reader.MIN_SIDE
        assert 0.0 <= float(px.min()) and float(px.max()) <= 1.0
        assert float(px.std()) > 0.01 or scan.info.get("blank")
        assert set(scan.info) <= reader.SAFE_INFO_KEYS
        assert case.check is None or case.check(scan), scan.info
    else:
        with pytest.raises(ScanError) as err:
            read_scan(path)
        assert re.search(case.expect, str(err.value)), str(err.value)
        assert_plain_sentence(str(err.value))


def test_bytes_and_path_give_the_same_outcome(tmp_path):
    """The app passes bytes, the CLI passes paths: same pixels or the same sentence."""
    for case in CORPUS:
        if case.data is None:
            continue
        (path,) = materialise([case], tmp_path)
        outcomes = []
        for src in (path, case.data):
            try:
                outcomes.append(read_scan(src, case.name).pixels.tobytes())
            except ScanError as e:
                outcomes.append(str(e))
        assert outcomes[0] == outcomes[1], case.name


# ----------------------------------------------------------------------------- batches
@pytest.fixture(scope="module")
def weights_dir(random_weights) -> Path:  # random_weights: a random simple_cnn, tests/conftest.py
    return random_weights


def test_an_empty_path_is_named_not_read_as_the_working_folder():
    """`predict ""` (an unset variable) answered 'The path is a folder, not a file.'"""
    for empty in ("", "  "):
        with pytest.raises(ScanError, match=r"^The path is empty"):
            reader.load_bytes(empty)


def test_mixed_batch_returns_a_result_for_every_file(weights_dir):
    from core.inference import Predictor, predict_many
    cases = [c for c in CORPUS if c.data is not None]
    items = [(c.name, c.data) for c in cases] + [("gone.png", str(ROOT / "no" / "such.png"))]
    results = predict_many(Predictor(weights_dir), items)
    assert [r["file"] for r in results] == [name for name, _ in items]
    for case, r in zip(cases, results):
        assert r["ok"] == (case.expect == OK), (case.name, r.get("error"))
        if not r["ok"]:
            assert re.search(case.expect, r["error"]), (case.name, r["error"])
    assert results[-1] == {"file": "gone.png", "ok": False, "error": "The file does not exist."}


def test_cli_predicts_whole_corpus_in_order(weights_dir, tmp_path):
    paths = materialise(CORPUS, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "core", "predict", "--json", "--weights",
                           str(weights_dir), *paths], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["file"] for r in lines] == paths
    for case, r in zip(CORPUS, lines):
        if case.expect == OK:
            assert r["ok"] and r["pred"] in ("glioma", "meningioma", "pituitary", "notumor"), case.name
        else:
            assert not r["ok"] and re.search(case.expect, r["error"]), (case.name, r)
            assert_plain_sentence(r["error"])
    assert not any(p.lower() in proc.stdout.lower() for p in PHI)


def test_app_shows_every_corpus_outcome_in_one_batch(weights_dir, monkeypatch):
    """The same corpus uploaded to the Diagnose page (AppTest): one clear error per bad file,
    a prediction for every good one, and no exception for the batch."""
    from streamlit.testing.v1 import AppTest
    # A zip is a batch in the app (unpacked in memory, tested in test_app.py), not an error.
    cases = [c for c in CORPUS if c.data is not None and len(c.data) < 8 * 2**20
             and not c.name.endswith(".zip")]
    monkeypatch.setenv("BT_WEIGHTS", str(weights_dir))
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=300).run()
    at.switch_page("app_pages/diagnose.py").run()
    at.file_uploader[0].set_value([(c.name, c.data, "application/octet-stream") for c in cases]).run()
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    for c in cases:
        mine = [e for e in errors if c.name in e]
        if c.expect == OK:
            assert not mine, (c.name, mine)
        else:
            # the page shows "**name**: sentence"; the sentence is the reader's own
            assert mine and re.search(c.expect, mine[0].split("**: ", 1)[-1]), (c.name, mine)
    table = at.dataframe[0].value  # a big batch shows its results as one table
    assert list(table["file"]) == [c.name for c in cases]
    for c, pred, flags in zip(cases, table["prediction"], table["flags"]):
        if c.expect == OK:  # a class, or no call at all for an image flagged out of distribution
            called = pred in ("Glioma", "Meningioma", "Pituitary tumour", "No tumour")
            assert called != str(flags).startswith("out-of-distribution"), (c.name, pred, flags)
        else:
            assert str(flags).startswith("error:"), (c.name, pred, flags)


# ----------------------------------------------------------------------------- zips
def test_zip_members_are_read_in_memory_and_unsafe_ones_refused():
    png = encode(grey8(), "PNG")
    data = make_zip({"scans/a.png": png, "scans/sub/b.png": png, "../evil.png": png,
                     "/etc/abs.png": png, "scans/../../up.png": png, "C:\\win.png": png,
                     ".hidden.png": png, "scans/.DS_Store": b"x", "__MACOSX/scans/._a.png": b"x",
                     "scans/empty.png": b""})
    got = reader.read_zip(data)
    assert [name for name, _ in got] == ["scans/a.png", "scans/sub/b.png"]
    assert all(content == png for _, content in got)
    skipped = dict(got.skipped)
    # shown as stored: the message speaks of '..', and "up.png" must not pass for a safe name
    for name in ("../evil.png", "/etc/abs.png", "scans/../../up.png", "C:\\win.png"):
        assert "unsafe" in skipped[name], skipped
    assert skipped["scans/empty.png"] == "The file is empty."
    assert not any("MACOSX" in n or "DS_Store" in n or "hidden" in n for n in skipped)


def test_zip_symlink_member_is_skipped():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        link = zipfile.ZipInfo("scans/link.png")
        link.external_attr = (0o120777 << 16)
        zf.writestr(link, "/etc/passwd")
        zf.writestr("scans/a.png", encode(grey8(), "PNG"))
    got = reader.read_zip(buf.getvalue())
    assert [n for n, _ in got] == ["scans/a.png"] and "link" in dict(got.skipped)["scans/link.png"]


def test_zip_bomb_is_bounded_by_the_budget_without_inflating_it(monkeypatch):
    """A member past the budget is listed, never inflated; the others are read."""
    png = encode(grey8(), "PNG")
    data = make_zip({"a.png": png, "bomb.dcm": b"\0" * (20 * 2**20), "c.png": png})
    assert len(data) < 100_000
    inflated = []
    real = archive._read_member
    monkeypatch.setattr(archive, "_read_member", lambda zf, info: inflated.append(info.filename) or real(zf, info))
    got = reader.read_zip(data, budget=10 * 2**20)
    assert [n for n, _ in got] == ["a.png", "c.png"] and inflated == ["a.png", "c.png"]
    assert "more than 10 MB" in dict(got.skipped)["bomb.dcm"]
    assert [n for n, _ in got.entries] == ["a.png", "bomb.dcm", "c.png"]   # archive order


def test_a_scan_that_compresses_well_is_read_not_refused_as_a_bomb():
    """A NIfTI label map is mostly zeros (it deflated 918 times): the whole zip was refused."""
    vol = np.zeros((240, 240, 40), np.uint8)
    vol[100:120, 100:120, 18:22] = 1
    nii = nib.Nifti1Image(vol, np.eye(4)).to_bytes()
    data = make_zip({"case/seg.nii": nii, "case/t1.png": encode(grey8(), "PNG")})
    assert len(nii) > 100 * len(data)
    got = reader.read_zip(data)
    assert [n for n, _ in got] == ["case/seg.nii", "case/t1.png"] and not got.skipped


def test_zip_limits_on_count(monkeypatch):
    with pytest.raises(ScanError, match=f"more than {archive.MAX_MEMBERS} files"):
        archive.read_zip(make_zip({f"f{i}.png": b"x" for i in range(archive.MAX_MEMBERS + 1)},
                                  zipfile.ZIP_STORED))
    many = make_zip({f"f{i}": b"" for i in range(archive.MAX_ENTRIES + 1)}, zipfile.ZIP_STORED)
    # refused from the end record, before zipfile parses the listing
    monkeypatch.setattr(zipfile, "ZipFile", lambda *a, **k: pytest.fail("the listing was parsed"))
    with pytest.raises(ScanError, match="more than"):
        archive.read_zip(many)


def test_mac_resource_forks_count_towards_no_limit():
    """A Mac-made zip of 1,100 scans also holds 1,100 __MACOSX/._* forks: it was refused."""
    n = archive.MAX_MEMBERS // 2 + 100
    members = {}
    for i in range(n):
        members[f"scans/s{i}.png"] = b"x"
        members[f"__MACOSX/scans/._s{i}.png"] = b"\0" * 20
    got = archive.read_zip(make_zip(members, zipfile.ZIP_STORED))
    assert len(got) == n and not got.skipped


def test_a_zip_listing_of_an_unsupported_version_is_one_sentence():
    """A (damaged) listing asking for zip version 6.4: zipfile raised NotImplementedError, which
    took down the whole Diagnose batch."""
    good = bytearray(make_zip({"a.png": encode(grey8(), "PNG")}))
    struct.pack_into("<H", good, good.find(b"PK\x01\x02") + 6, 64)
    with pytest.raises(ScanError, match="not supported, or is damaged"):
        archive.read_zip(bytes(good))


def _zip_with_raw_name(raw: bytes) -> bytes:
    """A one-member zip whose name is stored as these bytes, without the UTF-8 flag (as
    Info-ZIP writes it): zipfile would set the flag for any non-ASCII name it is given."""
    placeholder = b"#" * len(raw)
    data = make_zip({placeholder.decode(): b"x"}, zipfile.ZIP_STORED)
    assert data.count(placeholder) == 2   # the local header and the central directory
    return data.replace(placeholder, raw)


def test_utf8_member_names_without_the_utf8_flag_are_read_as_utf8():
    """Linux `zip` writes UTF-8 names without the flag; zipfile reads them as cp437."""
    name = "Müller_脑肿瘤.png"
    raw = _zip_with_raw_name(name.encode("utf-8"))
    assert not zipfile.ZipFile(io.BytesIO(raw)).infolist()[0].flag_bits & 0x800
    assert [n for n, _ in archive.read_zip(raw)] == [name]
    # a genuine cp437 name (not valid UTF-8) stays as zipfile reads it
    assert [n for n, _ in archive.read_zip(_zip_with_raw_name("Ç├ü.png".encode("cp437")))] == ["Ç├ü.png"]


def _zip_with_unicode_path(stored: str, unicode: str, crc_of: str) -> bytes:
    """A one-member zip named ``stored`` with a Unicode Path extra field naming ``unicode``,
    written for the name ``crc_of``."""
    info = zipfile.ZipInfo(stored)
    utf8 = unicode.encode()
    info.extra = struct.pack("<HHB", 0x7075, 5 + len(utf8), 1) + struct.pack("<I", zlib.crc32(crc_of.encode())) + utf8
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(info, b"x")
    return buf.getvalue()


def test_unicode_path_extra_field_names_the_member():
    assert [n for n, _ in archive.read_zip(_zip_with_unicode_path("M_ller.png", "Müller.png", "M_ller.png"))] == ["Müller.png"]


def test_damaged_zip_member_does_not_stop_the_others():
    png = encode(grey8(), "PNG")
    data = bytearray(make_zip({"a.png": png, "b.png": png}, zipfile.ZIP_STORED))
    at = data.find(png) + 200  # corrupt a's stored bytes: its CRC check fails
    data[at] ^= 0xFF
    got = reader.read_zip(bytes(data))
    assert [n for n, _ in got] == ["b.png"]
    assert "damaged" in dict(got.skipped)["a.png"]


@pytest.mark.parametrize("data,message", [(b"", "empty"), (random_bytes(500), "not a valid zip"),
                                          (make_zip({"a.png": b"1"})[:40], "not a valid zip")])
def test_not_a_zip(data, message):
    with pytest.raises(ScanError, match=message):
        reader.read_zip(data)


def test_zip_to_labelled_uses_the_class_folder():
    png = encode(grey8(), "PNG")
    data = make_zip({"Testing/glioma/a.png": png, "Testing/notumor/b.png": png, "top.png": png,
                     "__MACOSX/Testing/glioma/._a.png": b"x"})
    got = reader.zip_to_labelled(data)
    assert [(c, n) for c, n, _ in got] == [("glioma", "Testing/glioma/a.png"),
                                           ("notumor", "Testing/notumor/b.png")]
    # the resource fork listed, as `evaluate` lists a folder's (it was dropped without a word)
    assert dict(got.skipped) == {"top.png": "The file is not inside a class folder.",
                                 "__MACOSX/": "archive or system metadata"}


# ----------------------------------------------------------------------------- reader review (session 19)
def _big_frame(side: int = 2100) -> np.ndarray:
    a = np.zeros((side, side), np.uint16)
    a[side // 4: 3 * side // 4, side // 4: 3 * side // 4] = 2048   # mid-grey square on black
    return a


def test_a_large_dicom_frame_is_reduced_before_its_tables(monkeypatch):
    """A 6300 x 6300 DICOM took 740 MB in the reader: rescale and window each copied it at full size."""
    seen = []
    real = reader._dicom_grey_values
    monkeypatch.setattr(reader, "_dicom_grey_values", lambda arr, ds, *a: seen.append(arr.shape) or real(arr, ds, *a))
    s = reader.read_scan(make_dicom(_big_frame(), window=(2048, 4096)), "big.dcm")
    assert seen == [(1050, 1050)] and s.pixels.shape == (1050, 1050)
    assert s.info["downscaled_from"] == [2100, 2100]
    assert abs(float(s.pixels[525, 525]) - 0.5) < 0.01 and float(s.pixels[5, 5]) == 0.0


def test_a_large_rgba_png_is_reduced_before_it_is_flattened(monkeypatch):
    """A 0.2 MB RGBA PNG of 6300 x 6300 took 800 MB: converted and composited at full size."""
    seen = []
    real = reader._flatten_mode
    monkeypatch.setattr(reader, "_flatten_mode", lambda img: seen.append(img.size) or real(img))
    rgba = Image.fromarray((_big_frame() >> 4).astype(np.uint8)).convert("RGBA")
    s = reader.read_scan(encode(rgba, "PNG"), "big.png")
    assert seen == [(1050, 1050)] and s.info["downscaled_from"] == [2100, 2100]


def test_robust_window_leaves_the_callers_array_alone_unless_told():
    a = np.linspace(0, 100, 1000, dtype=np.float32)
    before = a.copy()
    out, _ = reader.robust_window(a)
    assert np.array_equal(a, before) and out.max() == 1.0
    out2, _ = reader.robust_window(a, inplace=True)
    assert out2 is a and np.allclose(out, out2)


def test_damaged_header_element_and_damaged_gif_are_one_sentence():
    """pydicom parses elements lazily: a corrupt VR raised NotImplementedError from the info step;
    a damaged GIF failed while its frames were counted, outside the reader's guard."""
    d = bytearray(make_dicom(dicom12(np.asarray(grey8()) / 255.0), series="1.2.3.4"))
    i = d.index(b"\x20\x00\x0e\x00UI")
    d[i + 4:i + 6] = b"UO"
    with pytest.raises(ScanError, match="damaged"):
        reader.read_scan(bytes(d), "series.dcm")
    y, x = np.mgrid[:64, :64]
    a = np.where(((y - 32) / 25.6) ** 2 + ((x - 32) / 22.4) ** 2 < 1, 100, 0)
    g = Image.fromarray(np.where((y < 32) & (x < 32) & (a > 0), 200, a).astype(np.uint8))
    buf = io.BytesIO()
    g.save(buf, "GIF", save_all=True, append_images=[g])
    gif = bytearray(buf.getvalue())
    gif[134], gif[303] = 245, 33
    with pytest.raises(ScanError):
        reader.read_scan(bytes(gif), "stack.gif")


def _tiff(*pages: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), 100, np.uint8)).save(buf, "TIFF", save_all=True, append_images=list(pages), **kw)
    return buf.getvalue()


def test_later_tiff_pages_are_checked_like_the_first():
    """A 600 x 4 page 2 was read as a slice, a 64-megapixel one decoded, and info described page 1."""
    strip = _tiff(Image.fromarray(np.full((4, 600), 100, np.uint8)))
    with pytest.raises(ScanError, match="Page 2 .*too narrow"):
        reader.read_image_pages(strip, "x.tif")
    with pytest.raises(ScanError, match="too narrow"):
        reader.read_scan(strip, "x.tif", frame=1)
    big = _tiff(Image.new("L", (7000, 7000)), compression="tiff_adobe_deflate")
    with pytest.raises(ScanError, match="too large"):
        reader.read_scan(big, "x.tif", frame=1)
    f = reader.read_scan(_tiff(Image.fromarray(np.random.default_rng(0).random((300, 200), np.float32))), "x.tif", frame=1)
    assert (f.info["mode"], f.info["width"], f.info["height"]) == ("F", 200, 300)


def test_every_frame_of_a_large_gif_is_read():
    """Frames of a GIF over 1 megapixel are not counted up front: the stack showed one page."""
    frames = [Image.fromarray(np.full((1000, 1200), v, np.uint8)) for v in (50, 120, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    pages = reader.read_image_pages(buf.getvalue(), "stack.gif")
    assert len(pages) == 3 and all(p.info["n_frames"] == 3 for p in pages)


def test_a_dicomdir_says_what_it_is():
    import pydicom
    p = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "DICOMDIR"
    with pytest.raises(ScanError, match="DICOMDIR, the index of a CD"):
        reader.read_scan(p)


def test_big_endian_dicom_without_a_transfer_syntax_is_not_byte_swapped():
    import pydicom
    from pydicom.filewriter import dcmwrite
    a = dicom12(np.asarray(grey8()) / 255.0)
    ds = pydicom.dcmread(io.BytesIO(make_dicom(a, window=None)))
    del ds.file_meta
    ds.PixelData = a.astype(">u2").tobytes()
    buf = io.BytesIO()
    dcmwrite(buf, ds, implicit_vr=False, little_endian=False)
    little = reader.read_scan(make_dicom(a, window=None), "le.dcm").pixels
    assert np.allclose(reader.read_scan(buf.getvalue(), "be.dcm").pixels, little, atol=1e-6)


@pytest.mark.parametrize("part,refused", [("LUMBAR SPINE", True), ("CERVICAL SPINE", True), ("CARDIAC", True),
                                          ("CHEST_TO_PELVIS", True), ("LOWER LEG", True), ("C-SPINE", True),
                                          ("HEAD^NECK", False), ("HEAD AND NECK", False), ("brain", False),
                                          ("KOPF", False), ("", False)])
def test_body_part_words_not_only_whole_terms(part, refused):
    from core.header import header_reason
    assert (header_reason({"modality": "MR", "body_part": part}) is not None) == refused


def test_enhanced_mr_window_rescale_and_body_part_come_from_its_functional_groups():
    """Enhanced MR keeps them in functional groups: the window fell back to percentiles and an
    abdominal Enhanced MR passed the header check."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from core.header import header_reason
    a = np.tile(np.linspace(0, 1000, 96, dtype=np.float32), (96, 1)).astype(np.uint16)
    ds = pydicom.dcmread(io.BytesIO(make_dicom(np.stack([a, a, a]), window=None)))
    group, voi, pvt, anat, region = Dataset(), Dataset(), Dataset(), Dataset(), Dataset()
    voi.WindowCenter, voi.WindowWidth = 300, 200
    pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = 1, 100, "US"   # stored 200-400 -> window 200-400
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "T-D4000", "SRT", "Abdomen"
    anat.AnatomicRegionSequence = Sequence([region])
    group.FrameVOILUTSequence, group.PixelValueTransformationSequence = Sequence([voi]), Sequence([pvt])
    group.FrameAnatomySequence = Sequence([anat])
    ds.SharedFunctionalGroupsSequence = Sequence([group])
    buf = io.BytesIO()
    ds.save_as(buf)
    s = reader.read_scan(buf.getvalue(), "enhanced.dcm")
    assert s.info["window_source"] == "header" and s.info["window"] == {"center": 300.0, "width": 200.0}
    row = s.pixels[48]
    assert row[a[48] < 100].max() == 0.0 and row[a[48] > 300].min() == 1.0   # rescaled, then windowed
    assert "ABDOMEN" in (header_reason(s.info) or "")
    pvt.RescaleSlope = 0   # a frame's own zero slope makes every pixel one value: damaged, not 'blank'
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(reader.ScanError, match="rescale or colour tables are damaged"):
        reader.read_scan(buf.getvalue(), "enhanced.dcm")


@pytest.mark.parametrize("edit,message", [
    ({"calibration": None}, "calibration block"), ({"calibration": {"temperature": None}}, "calibration block"),
    ({"tta": {"kind": "mirror", "below_confidence": 0.9}}, "tta block")])
def test_a_card_with_a_broken_served_block_fails_in_one_sentence(random_weights, tmp_path, edit, message):
    """A null temperature crashed the Predictor with a traceback; a mirror rule without its
    selection temperature loaded, then failed every file with a KeyError."""
    from conftest import edited_weights
    from core.inference import Predictor
    with pytest.raises(ValueError, match=message):
        Predictor(edited_weights(random_weights, tmp_path / "w", edit))


def test_a_card_without_calibration_says_its_probabilities_are_raw(random_weights, tmp_path):
    from conftest import edited_weights
    from core.inference import Predictor, calibration_text
    d = edited_weights(random_weights, tmp_path / "w", drop=("calibration",))
    assert Predictor(d).temperature == 1.0 and calibration_text(Predictor(d).card).startswith("none")


def test_a_stale_unicode_path_field_and_a_dos_made_cp437_name_are_not_taken():
    """The Unicode Path field holds only for the name it was written for (its CRC), and a name
    from a DOS/Windows tool is cp437, even where its bytes happen to be valid UTF-8."""
    stale = _zip_with_unicode_path("patient_B.png", "patient_A.png", "patient_A.png")
    assert [n for n, _ in archive.read_zip(stale)] == ["patient_B.png"]
    raw = bytearray(_zip_with_raw_name("Maßüé.png".encode("cp437")))
    for sig, at in ((b"PK\x01\x02", 5),):   # the central directory's "made by" system: 0 = MS-DOS
        raw[raw.find(sig) + at] = 0
    assert [n for n, _ in archive.read_zip(bytes(raw))] == ["Maßüé.png"]


def test_an_8bit_slice_saved_as_16bit_reads_as_the_8bit_one():
    """A JPEG re-saved as a 16-bit PNG (values x 257) was stretched by the percentile window:
    another contrast from the same slice, and other verdicts from the gate and the model."""
    a = np.asarray(grey8())
    wide = Image.fromarray(a.astype(np.uint16) * 257)
    assert np.allclose(reader.read_scan(encode(wide, "PNG"), "w.png").pixels,
                       reader.read_scan(encode(grey8(), "PNG"), "n.png").pixels, atol=1e-6)
    genuine = Image.fromarray((a.astype(np.uint16) * 16 + 3))   # 12-bit data: still windowed
    assert reader.read_scan(encode(genuine, "PNG"), "g.png").pixels.max() == 1.0


def test_pydicom_value_warnings_stay_off_stderr(capfd):
    """An invalid UID value made pydicom warn, with its own file and line, when the element was
    first read (after dcmread's guard)."""
    import warnings
    d = bytearray(make_dicom(dicom12(np.asarray(grey8()) / 255.0)))
    i = d.index(b"\x02\x00\x10\x00UI")
    d[i + 9] = ord("#")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        try:
            reader.read_scan(bytes(d), "uid.dcm")
        except ScanError:
            pass
    assert not [w for w in seen if "pydicom" in str(w.filename)], [str(w.message) for w in seen]


def test_one_frame_is_said_in_the_singular():
    with pytest.raises(ScanError, match=r"has one frame \(number 0\); frame 999"):
        reader.read_scan(encode(grey8(), "PNG"), "x.png", slice=999)


def test_a_tiff_pillow_cannot_decode_is_called_a_tiff():
    """A float64 TIFF (tifffile's default for a float array) was 'not a supported scan'."""
    tifffile = pytest.importorskip("tifffile")   # comes with scikit-image
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.random.default_rng(0).random((32, 32)))
    with pytest.raises(reader.ScanError, match="is a TIFF whose pixel type"):
        reader.read_scan(buf.getvalue(), "f.tif")


def test_a_deflated_dicom_that_inflates_past_the_limit_is_refused_before_pydicom_inflates_it():
    """pydicom inflates a Deflated Explicit VR file whole, without a limit: a 1.5 MB file took 3 GB."""
    import resource
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = reader.DEFLATED_TS
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.4", "1.2.3.4"
    buf = io.BytesIO(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta)
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    big = reader.MAX_DECOMPRESSED + 2**20   # a private OB element of zeros, past the limit
    body = [co.compress(struct.pack("<HH2sHI", 0x0029, 0x1010, b"OB", 0, big))]
    body += [co.compress(b"\0" * 2**20) for _ in range(big // 2**20)] + [co.flush()]
    data = buf.getvalue() + b"".join(body)
    assert len(data) < 2**20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(reader.ScanError, match="deflated.*too large"):
        reader.read_scan(data, "bomb.dcm")
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024 < 64 * 2**20
    ok = Path(pydicom.__file__).parent / "data" / "test_files" / "image_dfl.dcm"   # a real deflated file still reads
    assert reader.read_scan(ok.read_bytes(), ok.name).pixels.shape == (512, 512)


def test_a_nifti_that_inflates_past_one_float_volume_is_refused_from_its_header():
    """A 0.5 MB .nii.gz inflating to 256 MB (the old limit) took 630 MB of a 1 GB cloud host. The
    limit is now one volume of MAX_VOXELS as float32: such a 3D volume still fits, a larger 4D
    file is refused from its header before anything of it is inflated."""
    assert reader.MAX_VOXELS * 4 + 352 <= reader.MAX_DECOMPRESSED < 2 * reader.MAX_VOXELS * 4
    big = nib.Nifti1Image(np.zeros((256, 256, 64, 8), np.float32), np.eye(4))   # 128 MB of zeros
    data = gzip.compress(big.to_bytes(), 6)
    with pytest.raises(reader.ScanError, match=r"too large \(its header declares 128 MB of voxels; the limit is 123 MB\)"):
        reader.read_scan(data, "big.nii.gz")
    ok = nib.Nifti1Image(np.zeros((64, 64, 8, 2), np.float32) + 1, np.eye(4))
    assert reader.read_scan(gzip.compress(ok.to_bytes()), "ok.nii.gz").info["n_volumes"] == 2


def test_session_34_second_review_of_the_reader():
    """A body part written 'HIP/FEMUR' lost its separator to the code-word cleaning and was no
    longer flagged; a 256^3 float64 volume (a scan, not a bomb) fell over the byte limit; a later
    TIFF page was said to be reduced from page 0's size."""
    from core.header import header_reason
    assert reader._code_string("HIP/FEMUR", 32) == "HIP FEMUR"
    assert header_reason({"modality": "MR", "body_part": reader._code_string("SHOULDER,RIGHT", 32)})
    f64 = gzip.compress(nib.Nifti1Image(np.zeros((256, 256, 256)), np.eye(4)).to_bytes(), 1)
    assert reader.read_scan(f64, "f64.nii.gz").pixels.shape == (256, 256)
    pages = [Image.fromarray(np.full((64, 64), 100, np.uint8)), Image.fromarray(np.full((80, 100), 100, np.uint8))]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    assert "downscaled_from" not in reader.read_scan(buf.getvalue(), "s.tif", frame=1).info
