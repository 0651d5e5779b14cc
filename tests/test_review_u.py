"""Findings of session 41's reviews, each test failing on the code before its fix."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from core.header import header_reason

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "samples"
needs_samples = pytest.mark.skipif(not (SAMPLES / "sample_glioma_multiframe.dcm").exists(),
                                   reason="needs ../shared/data/samples")


# ----------------------------------------------------------------- the DICOM header check
@pytest.mark.parametrize("part", ["CHESTABDPELVIS", "NECKCHEST", "NECKCHESTABDPELV", "PANCREAS",
                                  "SPLEEN", "COLON", "TIBIAFIBULA", "RADIUSULNA", "ENTIREBODY",
                                  "MEDIASTINUM", "CORONARYARTERY", "BUTTOCK"])
def test_standard_non_head_body_parts_are_flagged(part):
    """DICOM's own codes (CID 4031) for parts that are not the head: CHESTABDPELVIS is the
    standard spelling of what was listed only as CHESTABDOMENPELVIS (18 characters: no valid file
    holds it)."""
    reason = header_reason({"modality": "MR", "body_part": part})
    assert reason is not None and part in reason


@pytest.mark.parametrize("part", ["HEAD", "NECK", "HEADNECK", "FACE", "JAW", "THYROID", "CRANIO CERVICAL",
                                  "NEURO CERVICAL", "CERVICAL VESSELS"])
def test_head_and_neighbours_are_left_to_the_pixels(part):
    assert header_reason({"modality": "MR", "body_part": part}) is None


@pytest.mark.parametrize("modality", ["MR BRAIN", "MRI BRAIN", "MR T1", "MR 3T"])
def test_words_typed_beside_mr_are_not_modalities(modality):
    assert header_reason({"modality": modality, "body_part": "HEAD"}) is None


@pytest.mark.parametrize("modality", ["MR CT", "CT MR", "OT CT"])
def test_several_modalities_are_judged_by_every_one(modality):
    """Modality holds one value; in a file with several their order decided: MR\\CT passed,
    CT\\MR did not."""
    reason = header_reason({"modality": modality})
    assert reason is not None and "a CT image" in reason


def test_an_unknown_modality_is_named_once_without_an_article():
    reason = header_reason({"modality": "IVUS"})
    assert reason == ("The DICOM header says this image's modality is IVUS, not MR; "
                      "the model reads brain MRI only.")


def test_header_words_are_decoded_and_carry_no_markdown():
    """A value under a binary VR came out as "BMR" (str of b'MR'): a real MR refused as a 'BMR
    image'; '_' survived and put the app's warning into italics ("_ABDOMEN_")."""
    from pydicom.multival import MultiValue
    from core.reader import _code_string
    assert _code_string(b"MR", 16) == "MR" and _code_string(b"ABDOMEN ", 32) == "ABDOMEN"
    assert _code_string(MultiValue(str, ["MR", "CT"]), 16) == "MR CT"
    assert _code_string(b"MR\\CT", 16) == "MR CT" and _code_string(b"CT\\MR", 16) == "CT MR"
    assert _code_string("_ABDOMEN_", 32) == "ABDOMEN" and _code_string("__CT__", 16) == "CT"
    reason = header_reason({"modality": "MR", "body_part": "Whole_Body"})
    assert "_" not in reason and "WHOLE BODY" in reason


def _enhanced(per_frame: list[str]) -> bytes:
    """The sample 3-frame MR with one Frame Anatomy per frame and no Body Part Examined."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence
    ds = pydicom.dcmread(SAMPLES / "sample_glioma_multiframe.dcm")
    if "BodyPartExamined" in ds:
        del ds.BodyPartExamined
    groups = []
    for meaning in per_frame:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "0", "SCT", meaning
        anatomy = Dataset()
        anatomy.FrameLaterality = "U"
        anatomy.AnatomicRegionSequence = DicomSequence([code])
        group = Dataset()
        group.FrameAnatomySequence = DicomSequence([anatomy])
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(groups)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@needs_samples
def test_each_frame_is_judged_by_its_own_anatomy():
    """Frame 0's anatomy stood for every frame: a brain frame was refused as spine, an abdomen
    frame read as brain."""
    from core.reader import read_scan, read_volume_scans
    data = _enhanced(["Cervical spine", "Brain", "Abdomen"])
    parts = [read_scan(data, "e.dcm", frame=k).info["body_part"] for k in range(3)]
    assert parts == ["CERVICAL SPINE", "BRAIN", "ABDOMEN"]
    assert [header_reason({"modality": "MR", "body_part": p}) is None for p in parts] == [False, True, False]
    assert read_scan(data, "e.dcm").info["body_part"] == "BRAIN"     # the middle frame, read by default
    assert read_scan(data, "e.dcm", frame=2).info["body_part_of_frame"] is True   # not Body Part Examined
    scans, _, _ = read_volume_scans(data, "e.dcm")
    assert [s.info["body_part"] for s in scans] == parts
    mixed = _enhanced(["", "Brain", ""])   # frames read together carry what each read alone does
    together, _, _ = read_volume_scans(mixed, "m.dcm")
    alone = [read_scan(mixed, "m.dcm", frame=k).info for k in range(3)]
    assert [s.info.get("body_part_of_frame") for s in together] == [i.get("body_part_of_frame") for i in alone] \
        == [None, True, None]


# ----------------------------------------------------------------- the gate's outlier sets
def test_categories_present_only_with_their_files_keep_the_shipped_folds():
    """Without the InVesalius package `scan_ct` went to fold 2, and fold 3's gate (the one holding
    out `abdominal_ct`) trained on a real abdominal CT."""
    from core import outliers as O
    from core.ood import category_folds
    cats = [c for c in list(O.SEEN) + list(O.UNSEEN) if c != "real_head_ct"]
    for present in (cats + ["scan_ct"], cats + ["real_head_ct", "scan_ct"]):
        folds = category_folds(present, 4)
        assert "scan_ct" in folds[2] and "abdominal_ct" in folds[2]
        assert "real_head_ct" not in present or "real_head_ct" in folds[1]


def test_every_text_font_draws_latin_letters():
    """DejaVu*Display has no Latin glyphs: 7 % of `text` images came out blank and were redrawn,
    others nearly blank and still labelled text."""
    from PIL import Image, ImageDraw, ImageFont
    from core.outliers import _fonts
    for path in _fonts():
        img = Image.new("L", (200, 60))
        ImageDraw.Draw(img).text((5, 5), "Brain MRI scan", fill=255, font=ImageFont.truetype(path, 24))
        assert img.getbbox() is not None, path


# ----------------------------------------------------------------- resuming a torchrun run
def test_a_resumed_ddp_run_keeps_a_stream_per_rank_and_its_process_count(tmp_path):
    """Rank 0's random state was restored on every rank: after a resume all ranks drew the same
    augmentations. A resume on another process count ran on, its card silent about it."""
    import json
    import os
    import subprocess
    import sys
    from conftest import make_blob_dataset
    root = Path(__file__).resolve().parents[1]
    data, out, debug = tmp_path / "data", tmp_path / "out", tmp_path / "debug"
    make_blob_dataset(data)
    env = {**os.environ, "BT_CACHE": str(tmp_path / "cache"), "BT_DDP_DEBUG_DIR": str(debug),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = ["train.py", "--data", str(data), "--out", str(out), "--arch", "cnn_bn", "--binary",
            "--img", "32", "--batch-size", "8", "--workers", "1", "--no-progress", "--keep", "last"]
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

    def run(cmd):
        return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)

    r = run(ddp + args + ["--epochs", "1"])
    assert r.returncode == 0, r.stderr[-2000:]
    single = run([sys.executable] + args + ["--epochs", "2", "--resume"])
    assert single.returncode != 0 and "trained on 2 process(es)" in single.stderr
    assert "Traceback" not in single.stderr
    finish = run([sys.executable] + args + ["--epochs", "1", "--resume"])   # nothing left to train:
    assert finish.returncode == 0, finish.stderr[-2000:]                     # finished anywhere
    r = run(ddp + args + ["--epochs", "2", "--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    meta = [json.loads((debug / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert meta[0]["params_sha256"] == meta[1]["params_sha256"]
    assert meta[0]["rng_sha256"] != meta[1]["rng_sha256"]


# ----------------------------------------------------------------- process settings of the app
@pytest.mark.parametrize("env, arenas_set, triton_blocked", [
    ({"MALLOC_ARENA_MAX": ""}, True, True),          # glibc ignores an empty cap: no cap at all
    ({"MALLOC_ARENA_MAX": "many"}, True, True),
    ({"MALLOC_ARENA_MAX": "4"}, False, True),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=8"}, False, True),   # the tunable is a cap too
    ({"BT_ALLOW_TRITON": "false"}, True, True),      # "false" let triton load
    ({"BT_ALLOW_TRITON": "yes"}, True, False),
])
def test_runtime_reads_its_environment_as_meant(env, arenas_set, triton_blocked):
    import os
    import subprocess
    import sys
    code = ("import sys; from core import runtime; "
            "print(runtime._LIBC is None or runtime.ARENAS_SET, 'triton' in sys.modules and sys.modules['triton'] is None)")
    base = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES", "BT_ALLOW_TRITON")}
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         env={**base, **env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    libc_missing_or_set, blocked = out.stdout.split()
    assert blocked == str(triton_blocked)
    import core.runtime as R
    if R._LIBC is not None:
        assert libc_missing_or_set == str(arenas_set)


# ----------------------------------------------------------------- the paired test
def test_the_paired_test_counts_a_patient_once():
    """LGG's test slices are 13 patients': counted as independent images, one patient whose slices
    all went one way made a difference look significant."""
    from scipy.stats import binomtest
    from core.compare import mcnemar
    pairs = [(True, False)] * 6 + [(False, True)] * 2 + [(True, True)] * 20
    alone = mcnemar(pairs)
    assert alone["p"] == pytest.approx(binomtest(2, 8, 0.5).pvalue)          # McNemar, unchanged
    grouped = mcnemar(pairs, ["P1"] * 6 + [None, None] + [None] * 20)          # six slices of one patient
    assert (grouped["a_only"], grouped["b_only"], grouped["units"]) == (6, 2, 3)
    assert grouped["p"] == pytest.approx(1.0)   # +-6 +-1 +-1: |sum| >= 4 in every sign pattern
    for a, b in [(12, 25), (13, 8), (0, 7)]:    # single images: the exact binomial test
        ps = [(True, False)] * a + [(False, True)] * b
        assert mcnemar(ps, [None] * len(ps))["p"] == pytest.approx(binomtest(min(a, b), a + b, 0.5).pvalue)


def test_compare_paired_groups_lgg_slices_by_patient(tmp_path):
    from test_compare import _with_eval, make_model_dir
    from core.compare import paired
    four = ["glioma", "meningioma", "pituitary", "notumor"]
    a, b = make_model_dir(tmp_path / "a", four), make_model_dir(tmp_path / "b", four)
    files = [f"glioma/TCGA_CS_4941_1996090{k}_{k}.tif" for k in range(8)] + \
            [f"glioma/TCGA_DU_{7000 + k}_19960909_1.tif" for k in range(3)]
    _with_eval(a, [("lgg", f, "glioma", "glioma") for f in files])
    _with_eval(b, [("lgg", f, "glioma", "notumor" if k < 8 else "glioma") for k, f in enumerate(files)])
    lgg = paired(a, b)["per_source"]["lgg"]
    assert (lgg["a_only"], lgg["b_only"], lgg["units"]) == (8, 0, 1)
    assert lgg["p"] == pytest.approx(1.0)     # one patient: no evidence (8 slices alone: p = 0.008)


# ----------------------------------------------------------------- header refusals in tables
def _header_row(**extra) -> dict:
    return {"file": "ct.dcm", "ok": True, "pred": "glioma", "probs": {"glioma": 0.99, "notumor": 0.01},
            "tumour_probability": 0.99, "threshold": 0.3, "confidence": 0.99, "uncertain": False,
            "in_distribution": False, "ood_score": -0.7, "info": {"format": "DICOM"},
            "ood_reason": "The DICOM header says this is a CT image (Modality CT), not an MRI; "
                          "the model reads brain MRI only.", **extra}


def test_the_csv_and_the_table_say_when_the_header_refused_a_scan():
    """The page's table marked '(DICOM header)'; the CSV said only 'out-of-distribution' and
    had no reason, so a CT's header and a photo's pixels read alike; the table's call cell gave
    the pixel gate's reason ('not like its training scans') for a header refusal."""
    import csv
    from core.dashboard import NO_CALL_HEADER, NO_CALL_OOD, batch_table
    from core.report import build_csv
    header = _header_row()
    photo = _header_row(file="cat.png", ood_reason="The image is in colour; brain MRI is grey.")
    rows = list(csv.DictReader(io.StringIO(build_csv([header, photo], ["glioma", "notumor"]))))
    assert rows[0]["flags"] == "out-of-distribution (DICOM header)" and rows[1]["flags"] == "out-of-distribution"
    assert rows[0]["ood_reason"].startswith("The DICOM header says") and "colour" in rows[1]["ood_reason"]
    table = batch_table([header, photo])
    assert list(table["prediction"]) == [NO_CALL_HEADER, NO_CALL_OOD]


def test_a_refused_shown_slice_is_not_said_to_miss_the_operating_point():
    """'slices 0, 2 reach the operating point; the slice in the table does not' of a slice the
    header refused (its raw tumour probability 0.996)."""
    from core.app_support import batch_problems
    refused, (kind, text) = batch_problems([_header_row(hot_slices=[0, 2])])
    assert kind == "warning" and "the slice in the table is out of distribution" in text
    assert refused[0] == "warning" and "out of distribution, no diagnosis" in refused[1]
    ((_, clean),) = batch_problems([_header_row(hot_slices=[0, 2], in_distribution=True, ood_reason=None)])
    assert "the slice in the table does not" in clean


def test_a_frames_own_anatomy_is_not_called_the_body_part_examined():
    reason = header_reason({"modality": "MR", "body_part": "ABDOMEN", "body_part_of_frame": True})
    assert "the anatomy it states for this frame is ABDOMEN" in reason


# ----------------------------------------------------------------- other people's layouts
def _kaggle_layout(root: Path) -> Path:
    """'Brain_Glioma/ Brain_Menin/ Brain Tumor/': the last names no tumour type."""
    from conftest import make_blob_dataset
    make_blob_dataset(root / "tmp", per_class=8)
    for src, dst in (("glioma", "Brain_Glioma"), ("meningioma", "Brain_Menin"), ("pituitary", "Brain Tumor")):
        (root / "tmp" / src).rename(root / dst)
    return root


def test_an_untyped_tumour_folder_beside_typed_ones_is_said(tmp_path, capsys):
    """'Brain Tumor' was read as 'some tumour' in audit, evaluate and train.py without a word, and
    evaluate's summary printed n 60 beside an accuracy over 40."""
    from core import data as D
    from core.cli import main as cli_main
    root = _kaggle_layout(tmp_path / "kaggle")
    scan = D.discover(root)
    assert "'Brain Tumor' names no tumour type" in D.untyped_tumour_note(scan.samples)
    yes_no = [D.Sample(path="x", rel="yes/x.png", label="tumor", original="yes"),
              D.Sample(path="y", rel="no/y.png", label="notumor", original="no")]
    assert D.untyped_tumour_note(yes_no) is None   # coarse by design
    assert cli_main(["audit", str(root)]) == 0
    assert "note: 'Brain Tumor' names no tumour type" in capsys.readouterr().out


def test_audit_says_when_a_class_loses_every_image(tmp_path, capsys):
    from conftest import make_blob_dataset
    from core.cli import main as cli_main
    make_blob_dataset(tmp_path / "d", per_class=20)
    for f in (tmp_path / "d" / "meningioma").iterdir():
        f.write_bytes(b"not an image")
    for f in sorted((tmp_path / "d" / "pituitary").iterdir())[8:]:   # a class of 8: a small stratum
        f.unlink()
    import warnings
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert cli_main(["audit", str(tmp_path / "d")]) == 0
    assert "no image of meningioma could be read" in capsys.readouterr().out
    # sklearn's note on the pooled small stratum reached the terminal as a library warning
    assert not [w for w in seen if "least populated class" in str(w.message)]


def test_evaluate_says_when_its_images_carry_the_models_training_names(tmp_path):
    """The shared benchmark's Training/ folder (or a download of it) evaluated at 97.5 % with no
    word that 32 of its 40 images were the model's own training and validation scans."""
    import json
    from core.evaluation import trained_name_note
    model = tmp_path / "m"
    model.mkdir()
    (model / "split.json").write_text(json.dumps({"files": {"benchmark": {
        "train": ["glioma/Tr-gl_0010.jpg"], "val": ["notumor/Tr-no_0002.jpg"], "test": ["glioma/Te-gl_0001.jpg"]}}}))
    note = trained_name_note(model, ["glioma_tumor/Tr-gl_0010.jpg", "no_tumor/Tr-no_0002.jpg",
                                     "glioma_tumor/Te-gl_0001.jpg", "glioma_tumor/other.jpg"])
    assert note.startswith("2 of these 4 images share a file name")
    assert trained_name_note(model, ["glioma/Te-gl_0001.jpg"]) is None      # its test images: fine
    assert trained_name_note(tmp_path / "none", ["x.jpg"]) is None          # no split.json: nothing said


def test_a_labelled_zip_says_when_a_folder_names_no_tumour_type(tmp_path):
    """evaluate said it of 'Brain Tumor/' beside 'Brain_Glioma/'; the Evaluation page's zip did not."""
    import zipfile
    from core.app_support import labelled_zip
    root = _kaggle_layout(tmp_path / "k")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(root.rglob("*.png")):
            z.write(f, f.relative_to(root).as_posix())
    items, _, note, _ = labelled_zip(buf.getvalue(), ["glioma", "meningioma", "pituitary", "notumor"])
    assert {label for _, label, _ in items} == {"glioma", "meningioma", "tumor"}
    assert "'Brain Tumor' names no tumour type" in note


def test_a_held_out_sources_training_split_is_not_called_trained_on(tmp_path):
    """A source of weight 0 trains nothing: its files were called 'trained or validated on'."""
    import json
    from core.evaluation import trained_name_note
    model = tmp_path / "m"
    model.mkdir()
    (model / "split.json").write_text(json.dumps({"files": {
        "benchmark": {"train": ["glioma/Tr-gl_0010.jpg"], "val": [], "test": []},
        "held": {"train": ["glioma/H-1.jpg", "glioma/H-2.jpg"], "val": ["glioma/H-3.jpg"], "test": []}}}))
    (model / "card.json").write_text(json.dumps({"sources": [{"name": "benchmark", "weight": 1.0},
                                                             {"name": "held", "weight": 0}]}))
    note = trained_name_note(model, ["glioma/H-1.jpg", "glioma/H-2.jpg", "glioma/H-3.jpg", "glioma/Tr-gl_0010.jpg"])
    assert note.startswith("2 of these 4 images")   # H-3 (validation) and Tr-gl_0010 (trained)
