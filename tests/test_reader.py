"""Every format a clinician may upload reads into the right grey image (core.reader).

Inputs are generated here (a small asymmetric head phantom, so that orientation mistakes show);
tests that use the shared samples or the shipped model skip cleanly when those are absent.
"""
from __future__ import annotations

import gzip
import io
import json
import tomllib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from core import reader
from core.reader import SAFE_INFO_KEYS, ScanError, read_scan, read_volume_slices

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SAMPLES = SHARED / "samples"
PHI = ("Doe^Jane", "SECRET-1234", "19700101", "20240102", "St Elsewhere")


# ----------------------------------------------------------------------------- builders
def phantom(h: int = 96, w: int = 96) -> np.ndarray:
    """A head-like image in [0, 1] with a lesion at the upper left (no symmetry)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    head = ((y - h / 2) / (0.45 * h)) ** 2 + ((x - w / 2) / (0.38 * w)) ** 2 <= 1
    brain = ((y - h / 2) / (0.38 * h)) ** 2 + ((x - w / 2) / (0.31 * w)) ** 2 <= 1
    lesion = (y - 0.3 * h) ** 2 + (x - 0.35 * w) ** 2 <= (0.1 * min(h, w)) ** 2
    img = np.zeros((h, w), np.float32)
    img[head] = 0.7
    img[brain] = 0.35 + 0.2 * (x / w)[brain]
    img[lesion] = 0.95
    return img


def corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(a, float).ravel(), np.asarray(b, float).ravel())[0, 1])


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def grey8(h: int = 96, w: int = 96) -> Image.Image:
    return Image.fromarray((phantom(h, w) * 255).round().astype(np.uint8))


def make_dicom(frames: np.ndarray, *, photometric: str = "MONOCHROME2", bits_stored: int = 12,
               window: tuple[float, float] | None = (2048, 4096), rescale: tuple[float, float] | None = None,
               signed: bool = False, preamble: bool = True, with_pixels: bool = True,
               rgb: bool = False, series: str | None = None, instance: int | None = None) -> bytes:
    """A small MR DICOM with fake patient identifiers (which must never come out again)."""
    from pydicom.dataset import FileMetaDataset, Dataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = PHI[0], PHI[1], PHI[2]
    ds.StudyDate, ds.InstitutionName, ds.Modality = PHI[3], PHI[4], "MR"
    arr = np.asarray(frames)
    n = arr.shape[0] if arr.ndim == (4 if rgb else 3) else 1
    ds.Rows, ds.Columns = arr.shape[-3:-1] if rgb else arr.shape[-2:]
    if n > 1:
        ds.NumberOfFrames = n
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else photometric
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 if rgb else 16
    ds.BitsStored = 8 if rgb else bits_stored
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if series:
        ds.SeriesInstanceUID = series
    if instance is not None:
        ds.InstanceNumber = instance
    if with_pixels:
        dtype = np.uint8 if rgb else (np.int16 if signed else np.uint16)
        ds.PixelData = arr.astype(dtype).tobytes()
    buf = io.BytesIO()
    if preamble:
        ds.preamble = b"\0" * 128
        ds.save_as(buf, enforce_file_format=True)
    else:
        ds.save_as(buf, implicit_vr=False, little_endian=True)
    return buf.getvalue()


def dicom12(img: np.ndarray) -> np.ndarray:
    """[0, 1] -> 12-bit stored values, as the sample DICOMs hold them."""
    return (img * 4095).round().astype(np.uint16)


def nifti_bytes(vol: np.ndarray, affine: np.ndarray | None = None, gz: bool = True,
                cls=nib.Nifti1Image, zooms: tuple | None = None) -> bytes:
    img = cls(vol, np.eye(4) if affine is None else affine)
    if zooms:
        img.header.set_zooms(zooms)
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=1) if gz else raw


def lps_volume(slices: list[np.ndarray]) -> bytes:
    """A volume stored as DICOM-derived NIfTIs are (x toward the left, y toward posterior):
    voxel (i, j, k) = image k at row j, column i. Read back, slice k must equal image k."""
    vol = np.stack([s.T for s in slices], axis=-1).astype(np.float32)
    return nifti_bytes(vol, np.diag([-1.0, -1.0, 1.0, 1.0]))


# ----------------------------------------------------------------------------- images
MODES = [  # (mode, format, minimum correlation with the phantom)
    ("1", "PNG", 0.6), ("L", "PNG", 0.999), ("LA", "PNG", 0.99), ("P", "PNG", 0.97),
    ("RGB", "PNG", 0.999), ("RGBA", "PNG", 0.99), ("CMYK", "JPEG", 0.97), ("CMYK", "TIFF", 0.999),
    ("I;16", "PNG", 0.999), ("I", "TIFF", 0.999), ("F", "TIFF", 0.999), ("RGB", "BMP", 0.999),
    ("L", "TIFF", 0.999), ("RGB", "WEBP", 0.999), ("P", "GIF", 0.97), ("L", "JPEG", 0.98),
]


def image_in_mode(mode: str) -> Image.Image:
    base = phantom()
    if mode == "I;16":
        return Image.fromarray(dicom12(base))  # 12-bit values in 16-bit words
    if mode == "I":
        return Image.fromarray((base * 100_000 - 5_000).astype(np.int32))
    if mode == "F":
        return Image.fromarray((base * 3.5 - 1.0).astype(np.float32))
    g = grey8()
    if mode == "1":
        return g.convert("1", dither=Image.Dither.NONE)
    if mode == "P":
        return g.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if mode in ("LA", "RGBA"):
        alpha = np.full(base.shape, 255, np.uint8)
        alpha[:, :8] = 0  # a transparent strip must come out black
        out = g.convert(mode[:-1] if mode == "LA" else "RGB").convert(mode)
        out.putalpha(Image.fromarray(alpha))
        return out
    return g.convert(mode)


@pytest.mark.parametrize("mode,fmt,min_corr", MODES, ids=[f"{m}-{f}" for m, f, _ in MODES])
def test_every_pil_mode_becomes_grey(mode, fmt, min_corr):
    img = image_in_mode(mode)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    scan = read_scan(encode(img, fmt, **kw), f"x.{fmt.lower()}")
    px = scan.pixels
    assert px.dtype == np.float32 and px.shape == (96, 96)
    assert 0.0 <= px.min() and px.max() <= 1.0 and px.max() > 0.8
    assert scan.colourfulness < 0.01
    if mode in ("LA", "RGBA"):
        assert px[:, :8].max() == 0.0
        assert corr(px[:, 8:], phantom()[:, 8:]) > min_corr
    else:
        assert corr(px, phantom()) > min_corr
    assert scan.kind == "image"


def test_sixteen_bit_png_keeps_precision():
    ramp = np.linspace(0, 1, 96 * 96, dtype=np.float32).reshape(96, 96)
    scan = read_scan(encode(Image.fromarray(dicom12(ramp)), "PNG"), "x.png")
    assert scan.info["mode"] == "I;16"
    assert len(np.unique(scan.pixels)) > 1000  # not squeezed through 8 bits
    assert corr(scan.pixels, ramp) > 0.999


def test_colour_photo_is_colourful():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    scan = read_scan(encode(Image.fromarray(rgb), "PNG"))
    assert scan.colourfulness > 0.1
    assert read_scan(encode(grey8().convert("RGB"), "PNG")).colourfulness < 1e-6


def test_exif_orientation_is_applied():
    upright = grey8(96, 64)  # portrait, lesion upper left
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone sensor would store
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    scan = read_scan(encode(stored, "JPEG", exif=exif, quality=95), "photo.jpg")
    assert scan.pixels.shape == (96, 64)
    assert corr(scan.pixels, phantom(96, 64)) > 0.98
    assert scan.info["exif_rotated"] == 6


def test_animated_gif_first_frame_and_frame_option():
    frames = [Image.fromarray(np.roll(np.asarray(grey8()), 20 * k, axis=1)) for k in range(3)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    first = read_scan(data, "anim.gif")
    assert first.info["n_frames"] == 3 and first.info["frame"] == 0
    assert corr(first.pixels, np.asarray(frames[0])) > 0.99
    assert corr(read_scan(data, frame=2).pixels, np.asarray(frames[2])) > 0.99
    with pytest.raises(ScanError, match="frame 3 does not exist"):
        read_scan(data, frame=3)


def test_large_image_is_reduced_not_refused():
    big = Image.fromarray(np.tile(np.linspace(0, 255, 3000, dtype=np.float32), (3000, 1)).astype(np.uint8))
    scan = read_scan(encode(big, "PNG", compress_level=1), "big.png")
    assert max(scan.pixels.shape) <= reader.MAX_SIDE
    assert scan.info["downscaled_from"] == [3000, 3000]
    assert corr(scan.pixels[0], np.linspace(0, 1, scan.pixels.shape[1])) > 0.999


def test_file_like_and_path_inputs(tmp_path):
    data = encode(grey8(), "PNG")
    (tmp_path / "a.png").write_bytes(data)
    by_path = read_scan(tmp_path / "a.png").pixels
    by_str = read_scan(str(tmp_path / "a.png")).pixels
    by_io = read_scan(io.BytesIO(data), "upload.png").pixels
    assert np.array_equal(by_path, by_str) and np.array_equal(by_path, by_io)


# ----------------------------------------------------------------------------- DICOM
def test_dicom_header_window_gives_the_source_image():
    base = phantom()
    scan = read_scan(make_dicom(dicom12(base)), "a.dcm")
    assert scan.kind == "dicom"
    assert np.abs(scan.pixels - base).max() < 2e-3
    assert scan.info["window"] == {"center": 2048.0, "width": 4096.0}
    assert scan.info["window_source"] == "header"


def test_dicom_narrow_window_follows_the_standard_formula():
    values = dicom12(phantom())
    scan = read_scan(make_dicom(values, window=(1500, 1000)))
    expected = np.clip((values - 1499.5) / 999 + 0.5, 0, 1)
    assert np.abs(scan.pixels - expected).max() < 1e-5


def test_monochrome1_is_inverted():
    values = dicom12(phantom())
    mono2 = read_scan(make_dicom(values)).pixels
    mono1 = read_scan(make_dicom(4095 - values, photometric="MONOCHROME1"))
    assert np.abs(mono1.pixels - mono2).max() < 1e-3
    assert mono1.info["photometric_interpretation"] == "MONOCHROME1"


def test_rescale_slope_and_intercept_applied_before_the_window():
    hu = phantom() * 2000 - 1000  # CT-like values
    stored = ((hu + 1024) / 2).round()  # slope 2, intercept -1024
    scan = read_scan(make_dicom(stored, rescale=(2, -1024), window=(40, 400)))
    expected = np.clip((stored * 2 - 1024 - 39.5) / 399 + 0.5, 0, 1)
    assert np.abs(scan.pixels - expected).max() < 1e-5
    assert scan.info["rescale"] == {"slope": 2.0, "intercept": -1024.0}


def test_dicom_without_window_uses_percentiles():
    scan = read_scan(make_dicom(dicom12(phantom()) // 4, window=None))
    assert scan.info["window_source"].startswith("percentile")
    assert scan.pixels.max() == 1.0 and corr(scan.pixels, phantom()) > 0.999


def test_signed_dicom():
    values = (phantom() * 4000 - 1000).astype(np.int16)
    scan = read_scan(make_dicom(values, signed=True, bits_stored=16, window=None))
    assert corr(scan.pixels, phantom()) > 0.999


def test_multiframe_middle_frame_by_default():
    frames = np.stack([dicom12(np.roll(phantom(), 15 * k, axis=1)) for k in range(3)])
    data = make_dicom(frames)
    scan = read_scan(data, "multi.dcm")
    assert scan.info["frame"] == 1 and scan.info["n_frames"] == 3
    assert corr(scan.pixels, frames[1]) > 0.999
    assert corr(read_scan(data, frame=0).pixels, frames[0]) > 0.999
    assert corr(read_scan(data, slice_index=2).pixels, frames[2]) > 0.999  # synonym
    with pytest.raises(ScanError, match="frame 3 does not exist"):
        read_scan(data, frame=3)
    slices = read_volume_slices(data, "multi.dcm")
    assert len(slices) == 3 and all(corr(s, f) > 0.999 for s, f in zip(slices, frames))


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless", "JPEGBaseline8Bit"])
def test_compressed_transfer_syntaxes(syntax):
    import pydicom
    from pydicom import uid
    from pydicom.encaps import encapsulate
    base = phantom()
    ds = pydicom.dcmread(io.BytesIO(make_dicom(dicom12(base))))
    if syntax == "JPEGBaseline8Bit":  # no JPEG encoder in pydicom: encapsulate Pillow's output
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.WindowCenter, ds.WindowWidth = 128, 256
        ds.PixelData = encapsulate([encode(grey8(), "JPEG", quality=95)])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    else:
        ds.compress(getattr(uid, syntax))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    scan = read_scan(buf.getvalue(), "c.dcm")
    assert scan.info["transfer_syntax"] == getattr(uid, syntax).name
    assert corr(scan.pixels, base) > 0.99


def test_rgb_dicom_keeps_colourfulness():
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0], rgb[16:48, 16:48, 1] = 200, 255
    scan = read_scan(make_dicom(rgb, rgb=True, window=None))
    assert scan.colourfulness > 0.1 and scan.pixels.shape == (64, 64)


@pytest.mark.parametrize("name", ["raw.dcm", "raw.bin", None])
def test_dicom_without_preamble(name):
    scan = read_scan(make_dicom(dicom12(phantom()), preamble=False), name)
    assert scan.kind == "dicom" and corr(scan.pixels, phantom()) > 0.999


def test_dicom_info_carries_no_identifiers():
    scan = read_scan(make_dicom(np.stack([dicom12(phantom())] * 2)))
    assert set(scan.info) <= SAFE_INFO_KEYS
    text = json.dumps(scan.info)
    assert not any(p.lower() in text.lower() for p in PHI)


def test_dicom_series_key_groups_files_without_carrying_the_uid():
    uid_a, uid_b = "1.2.826.0.1.3680043.8.498.111", "1.2.826.0.1.3680043.8.498.222"
    a1, a2, b = (read_scan(make_dicom(dicom12(phantom()), series=u, instance=k))
                 for u, k in ((uid_a, 1), (uid_a, 2), (uid_b, 1)))
    assert a1.info["series"] == a2.info["series"] != b.info["series"]
    assert len(a1.info["series"]) == 12 and (a1.info["instance"], a2.info["instance"]) == (1, 2)
    assert set(a1.info) <= SAFE_INFO_KEYS and "3680043" not in json.dumps(a1.info)
    plain = read_scan(make_dicom(dicom12(phantom())))
    assert "series" not in plain.info and "instance" not in plain.info


# ----------------------------------------------------------------------------- NIfTI
def test_nifti_from_dicom_orientation_shows_anterior_up():
    imgs = [np.roll(phantom(), 4 * k, axis=0) for k in range(5)]
    scan = read_scan(lps_volume(imgs), "vol.nii.gz")
    assert scan.kind == "nifti" and scan.info["n_slices"] == 5 and scan.info["slice_index"] == 2
    assert corr(scan.pixels, imgs[2]) > 0.999  # lesion still upper left: not flipped
    assert scan.info["orientation"].startswith("LPS")


def test_nifti_orientation_does_not_depend_on_storage_order():
    imgs = [np.roll(phantom(), 4 * k, axis=0) for k in range(5)]
    lps = read_scan(lps_volume(imgs)).pixels
    ras = np.stack([s.T[::-1, ::-1] for s in imgs], -1)  # same anatomy stored RAS
    stored_yx = np.ascontiguousarray(ras.transpose(1, 0, 2))  # and with x/y swapped on disk
    swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    swap[:3, 3] = ras_offset = [-90.0, -100.0, -40.0]  # a scanner's affine is never the identity
    ras_affine = np.eye(4); ras_affine[:3, 3] = ras_offset
    for data in (nifti_bytes(ras, ras_affine), nifti_bytes(stored_yx, swap)):
        assert np.abs(read_scan(data).pixels - lps).max() < 1e-5


def test_nifti_without_geometry_shows_the_stored_image_upright():
    """An identity affine (or none) is what scripts saving image arrays write; the shared sample
    is one, stored x = column, y = row. Reoriented as RAS it showed upside down."""
    imgs = [np.roll(phantom(), 4 * k, axis=0) for k in range(5)]
    stored = np.stack([s.T for s in imgs], -1).astype(np.float32)
    no_codes = nib.Nifti1Image(stored, None)  # nibabel writes qform_code = sform_code = 0
    assert int(no_codes.header["qform_code"]) == int(no_codes.header["sform_code"]) == 0
    for data in (nifti_bytes(stored), gzip.compress(no_codes.to_bytes())):
        scan = read_scan(data, "arrays.nii.gz")
        assert corr(scan.pixels, imgs[2]) > 0.999
        assert scan.info["orientation"].startswith("none stored")
        assert "assumed" in scan.info["display"]


@pytest.mark.skipif(not (SHARED / "samples" / "sample_glioma_volume.nii.gz").exists(),
                    reason="shared NIfTI sample not present")
def test_shared_nifti_sample_shows_its_source_slice_upright():
    scan = read_scan((SHARED / "samples" / "sample_glioma_volume.nii.gz").read_bytes())
    src = Image.open(SHARED / "brain-tumor-mri" / "Training" / "glioma" / "Tr-glTr_0007.jpg").convert("L")
    src = np.asarray(src.resize(scan.pixels.shape[::-1]), np.float32)
    assert corr(scan.pixels, src) > 0.99


def test_nifti_slice_option_and_read_volume_slices_agree():
    imgs = [phantom() * (0.5 + 0.1 * k) for k in range(5)]
    data = lps_volume(imgs)
    slices = read_volume_slices(data, "v.nii.gz")
    assert len(slices) == 5
    for k in (0, 4):
        assert np.array_equal(read_scan(data, slice_index=k).pixels, slices[k])
    assert slices[4].mean() > slices[0].mean()  # one window for the volume: brightness kept
    with pytest.raises(ScanError, match="slice 5 does not exist"):
        read_scan(data, slice_index=5)


def test_a_volume_is_decoded_once_for_many_slice_reads_and_stays_unchanged(monkeypatch):
    import core.reader as reader
    imgs = [phantom() * (0.5 + 0.1 * k) for k in range(5)]
    data = lps_volume(imgs)
    first = {k: read_scan(data, slice_index=k).pixels for k in range(5)}  # a cold read each...
    calls = []
    real = reader._nifti_volume
    monkeypatch.setattr(reader, "_nifti_volume", lambda *a: calls.append(1) or real(*a))
    reader._LAST_VOLUME.clear()
    scans = [read_scan(data, slice_index=k) for k in (3, 1, 3)]
    assert len(calls) == 1  # ...against one decode for three reads of one file
    widest, thresholded = reader._over_widest, []
    monkeypatch.setattr(reader, "_over_widest", lambda *a: thresholded.append(1) or widest(*a))
    again = [read_scan(data, slice_index=k).info["head_share"] for k in (3, 1)]
    assert again == [s.info["head_share"] for s in scans[:2]] and not thresholded  # shares kept too
    scans[0].pixels[:] = 0  # a caller changing its slice must not reach the cached volume
    assert np.array_equal(read_scan(data, slice_index=3).pixels, first[3])
    assert np.array_equal(scans[1].pixels, first[1]) and scans[1].info["slice_index"] == 1
    other = lps_volume([phantom()] * 3)
    assert read_scan(other).info["n_slices"] == 3 and len(calls) == 2  # another file: decoded anew
    assert read_scan(data, volume=0).info["n_slices"] == 5
    read_scan(data).info["voxel_size_mm"].append(99)  # nor does a change to its info's lists
    assert 99 not in read_scan(data).info["voxel_size_mm"]


def test_nifti_4d_and_uncompressed_and_nifti2():
    vol = np.stack([np.stack([phantom().T] * 3, -1), np.stack([phantom().T[::-1]] * 3, -1)], -1)
    data = nifti_bytes(vol.astype(np.float32), np.diag([-1.0, -1.0, 1.0, 1.0]), gz=False)
    first, second = read_scan(data, "4d.nii"), read_scan(data, "4d.nii", volume=1)
    assert first.info["n_volumes"] == 2 and first.info["volume"] == 0
    assert corr(first.pixels, phantom()) > 0.999 and corr(second.pixels, phantom()) < 0.9
    two = nifti_bytes((vol[..., 0] * 1000).astype(np.int16), cls=nib.Nifti2Image)
    assert read_scan(two, "v2.nii.gz").info["n_slices"] == 3


def test_nifti_anisotropic_pixels_are_made_square():
    vol = np.stack([phantom(48, 96).T] * 3, -1)  # 96 x 48 voxels of 1 x 2 mm
    data = nifti_bytes(vol, np.diag([-1.0, -2.0, 1.0, 1.0]))
    assert read_scan(data).pixels.shape == (96, 96)


def test_thin_coronal_stack_is_shown_coronally_superior_up():
    """Five coronal slices (voxel (i, j, k) = image k at row j, column i; i toward the patient's
    left, j toward the feet, k toward the front): shown in their own plane, as acquired."""
    imgs = [np.roll(phantom(), 4 * k, axis=1) for k in range(5)]
    vol = np.stack([s.T for s in imgs], axis=-1)
    affine = np.array([[-1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0], [0, 0, 0, 1]])
    data = nifti_bytes(vol, affine)
    scan = read_scan(data)
    assert scan.info["plane"] == "coronal" and scan.info["n_slices"] == 5
    assert corr(scan.pixels, imgs[2]) > 0.999
    with pytest.raises(ScanError, match="too narrow \(96 x 5"):  # axial cuts are 96 x 5 strips
        read_scan(data, plane="axial")
    with pytest.raises(ScanError, match="plane must be"):
        read_scan(data, plane="oblique")


# ----------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def predictor(random_weights):  # random_weights: tests/conftest.py
    from core.inference import Predictor
    return Predictor(random_weights)


def test_most_tumour_like_slice_scores_only_nonempty_slices(predictor):
    from core.inference import most_tumour_like_slice
    imgs = [np.zeros((96, 96), np.float32)] + [np.roll(phantom(), 6 * k, 1) for k in range(4)] \
        + [np.zeros((96, 96), np.float32)]
    data = lps_volume(imgs)
    index, pred = most_tumour_like_slice(predictor, data, "v.nii.gz")
    slices = read_volume_slices(data)
    probs = {k: predictor.predict_scan(reader.ScanImage(slices[k])).tumour_probability
             for k in range(1, 5)}
    assert index == max(probs, key=probs.get)
    assert pred.info["slice_index"] == index and pred.info["n_slices"] == 6
    assert pred.info["slices_scored"] == 4
    assert pred.tumour_probability == pytest.approx(probs[index], abs=1e-5)


def test_most_tumour_like_slice_of_empty_volume(predictor):
    from core.inference import most_tumour_like_slice
    with pytest.raises(ScanError, match="empty"):
        most_tumour_like_slice(predictor, lps_volume([np.zeros((32, 32), np.float32)] * 3))


# ----------------------------------------------------------------------------- config
def test_upload_limit_matches_reader_limit():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] * 1024 * 1024 == reader.MAX_BYTES


# ----------------------------------------------------------------------------- shared samples
def _sample_labels() -> dict[str, str]:
    if not (SAMPLES / "labels.json").exists():
        pytest.skip("shared samples not available")
    return json.loads((SAMPLES / "labels.json").read_text())


def test_shared_samples_read_or_fail_clearly():
    for name, label in _sample_labels().items():
        if label == "error":
            with pytest.raises(ScanError, match="no pixel data"):
                read_scan(SAMPLES / name)
        else:
            scan = read_scan(SAMPLES / name)
            assert scan.pixels.ndim == 2 and scan.pixels.max() > 0.5, name
            assert set(scan.info) <= SAFE_INFO_KEYS
            assert "anonymous" not in json.dumps(scan.info).lower()


def test_sample_dicom_looks_like_its_training_jpeg():
    """sample_glioma.dcm was made from Training/glioma/Tr-glTr_0007.jpg (phash distance 2):
    the 12-bit values, header window and MONOCHROME1 inversion must give the JPEG back."""
    jpeg = SHARED / "brain-tumor-mri" / "Training" / "glioma" / "Tr-glTr_0007.jpg"
    if not jpeg.exists() or not (SAMPLES / "sample_glioma.dcm").exists():
        pytest.skip("shared data not available")
    target = read_scan(jpeg).pixels
    for name in ("sample_glioma.dcm", "sample_glioma_multiframe.dcm"):
        assert corr(read_scan(SAMPLES / name).pixels, target) > 0.999
    men = SHARED / "brain-tumor-mri" / "Training" / "meningioma" / "Tr-meTr_0007.jpg"
    if men.exists():
        assert corr(read_scan(SAMPLES / "sample_meningioma_monochrome1.dcm").pixels,
                    read_scan(men).pixels) > 0.999


def _shipped_model_dir() -> Path:
    default = ROOT / "weights" / "DEFAULT"
    if not default.exists():
        pytest.skip("no weights/DEFAULT")
    d = ROOT / "weights" / default.read_text().strip()
    if not ((d / "card.json").exists() and (d / "model.safetensors").exists()):
        pytest.skip(f"shipped model {d.name} not trained yet")
    return d


def test_shipped_model_predicts_the_sample_labels():
    labels = _sample_labels()
    from core.inference import Predictor
    pred = Predictor(_shipped_model_dir())
    wrong = {}
    for name, label in labels.items():
        if label == "error":
            continue
        got = pred.predict_file(SAMPLES / name).pred
        if got != label:
            wrong[name] = f"{got} (expected {label})"
    assert not wrong, wrong


def test_bytes_and_file_objects_past_the_size_limit_are_refused(monkeypatch):
    """The limit held for a path (by its size on disk) but was not tested for uploaded bytes."""
    import core.reader as R
    buf = io.BytesIO()
    Image.new("L", (64, 64), 90).save(buf, "PNG")
    data = buf.getvalue() + b"\0" * 4000
    monkeypatch.setattr(R, "MAX_BYTES", 2000)
    for src in (data, io.BytesIO(data)):
        with pytest.raises(R.ScanError, match="larger than"):
            R.read_scan(src, "big.png")
    monkeypatch.setattr(R, "MAX_BYTES", 10_000)
    assert R.read_scan(data, "big.png").pixels.shape == (64, 64)


def test_a_nifti_of_complex_values_is_refused_from_its_header_before_inflating():
    """A 0.5 MB .nii.gz of complex128 zeros (320 x 320 x 312) was inflated and decoded, 1 GB,
    before its type was refused. Header only here: refused from it, nothing else is read."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((320, 320, 312))
    hdr.set_data_dtype(np.complex128)
    hdr["vox_offset"] = 352
    data = gzip.compress(hdr.binaryblock + b"\0" * 4)
    with pytest.raises(ScanError, match="colour or complex values"):
        read_scan(data, "big.nii.gz")
    hdr.set_data_dtype(np.float64)
    with pytest.raises(ScanError) as e:
        read_scan(gzip.compress(hdr.binaryblock + b"\0" * 4), "short.nii.gz")
    assert "colour or complex" not in str(e.value)


def test_a_dicom_frame_is_limited_by_its_decoded_bytes_not_its_pixels():
    """6300 x 6300 with 3 samples of 32 bits passed the 40-megapixel check and decoded to 476 MB."""
    from pydicom import dcmread
    ds = dcmread(io.BytesIO(make_dicom(np.zeros((16, 16)), with_pixels=False)))
    ds.Rows = ds.Columns = 6300
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 3, 32, 32, 31
    ds.PhotometricInterpretation, ds.PlanarConfiguration = "RGB", 0
    ds.PixelData = b"\0" * 64
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(ScanError, match="MB a frame once decoded"):
        read_scan(buf.getvalue(), "big.dcm")


def test_volume_slices_are_held_to_the_slice_size_limits():
    from core.reader import read_volume_scans
    data = nifti_bytes(np.random.default_rng(0).random((10, 10, 10)).astype(np.float32))
    with pytest.raises(ScanError, match="too small"):
        read_scan(data, "tiny.nii.gz")
    with pytest.raises(ScanError, match="too small"):
        read_volume_scans(data, "tiny.nii.gz")


def test_a_multi_frame_dicom_without_a_window_gets_one_for_the_volume():
    """Each frame stretched to its own percentiles: noise-only end frames came out full-contrast,
    not blank, and 'all head'. The same volume as NIfTI (one window) had them right."""
    from core.reader import read_volume_scans
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    head = np.where((yy - 32) ** 2 / 26 ** 2 + (xx - 32) ** 2 / 22 ** 2 <= 1, 2000.0, 0.0)
    noise = rng.integers(0, 6, (64, 64)).astype(float)
    vol = np.stack([noise, head + noise, head + noise, noise])
    scans, kind, info = read_volume_scans(make_dicom(vol, window=None), "four.dcm")
    assert kind == "dicom" and len(scans) == 4
    from core.reader import is_empty_slice
    assert [is_empty_slice(s.pixels) for s in scans] == [True, False, False, True]
    assert scans[0].info["head_share"] < scans[1].info["head_share"]
    assert info["window_source"] == "percentile 0.5-99.5 of every frame"
