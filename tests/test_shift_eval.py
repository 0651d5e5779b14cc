"""bench/shift_eval.py's scoring: fine labels count for accuracy, a coarse "tumour" label (Br35H)
only for sensitivity, and silent misses are tumours called healthy with no flag."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.shift_eval import PERTURBATIONS, evaluate, markdown_table  # noqa: E402


class FixedPredictor:
    """Predicts from the file name (``<pred>_<n>.png``), so the scoring can be checked by hand."""
    classes = ["glioma", "meningioma", "pituitary", "notumor"]

    def __init__(self):
        self.seen: list[str] = []

    def predict_scan(self, scan):
        name = scan.info["file"]
        self.seen.append(name)
        return SimpleNamespace(pred=name.split("_")[0], in_distribution=True, uncertain=False)


def _reads_with_name(monkeypatch) -> None:
    """shift_eval reads each file with its stem in ``info["file"]``, for `FixedPredictor`."""
    import bench.shift_eval as se
    real_read = se.read_scan

    def read_with_name(path):
        scan = real_read(path)
        scan.info["file"] = Path(path).stem
        return scan
    monkeypatch.setattr(se, "read_scan", read_with_name)


def _named_files(folder: Path, names_labels: list[tuple[str, str]]) -> list[tuple[Path, str]]:
    """(file, label) rows of flat grey PNGs named ``<name>_<i>.png``, for `FixedPredictor`."""
    rows = []
    for i, (name, label) in enumerate(names_labels):
        path = folder / f"{name}_{i}.png"
        Image.fromarray(np.full((32, 32), 100, np.uint8)).save(path)
        rows.append((path, label))
    return rows


def test_coarse_tumour_labels_count_for_sensitivity_only(tmp_path, monkeypatch):
    rows = _named_files(tmp_path, [("glioma", "glioma"), ("notumor", "glioma"), ("notumor", "notumor"),
                                   ("meningioma", "tumor"), ("notumor", "tumor")])
    _reads_with_name(monkeypatch)
    r = evaluate(FixedPredictor(), rows, PERTURBATIONS["rotate 90"])
    assert r["n"] == 5
    assert r["accuracy"] == round(2 / 3, 4)          # the three fine labels: glioma right, glioma missed, notumor right
    assert r["sensitivity"] == 0.5 and r["tumours_missed"] == 2   # 4 tumours (2 coarse), 2 called healthy
    assert r["specificity"] == 1.0 and r["silent_misses"] == 2
    table = markdown_table([{"weights": "w/m", "result": {"br35h": {"none": {**r, "accuracy": None}}}}], "br35h")
    assert "| none | — / 2 / 1.000 / 0.0 % |" in table
    assert [(Path(x["file"]).stem, x["label"], x["pred"]) for x in r["records"]] == [
        (Path(f).stem, lab, Path(f).stem.split("_")[0]) for f, lab in rows]   # one record per image, in order


def test_accepted_accuracy_and_silent_errors_by_hand(tmp_path, monkeypatch):
    """A name ``<pred>_<flag>_<n>``: 'ood' served out of distribution, 'unc' referred uncertain."""
    class Flagging(FixedPredictor):
        def predict_scan(self, scan):
            pred, flag, _ = scan.info["file"].split("_")
            return SimpleNamespace(pred=pred, in_distribution=flag != "ood", uncertain=flag == "unc")
    rows = _named_files(tmp_path, [("glioma_ok", "glioma"), ("meningioma_ok", "glioma"),
                                   ("meningioma_ood", "glioma"), ("notumor_unc", "glioma"),
                                   ("notumor_ok", "tumor"), ("meningioma_ok", "tumor")])
    _reads_with_name(monkeypatch)
    r = evaluate(Flagging(), rows, PERTURBATIONS["none"])
    assert r["accuracy"] == 0.25                     # fine labels, flagged or not: 1 right of 4
    assert r["accepted_accuracy"] == round(1 / 3, 4) and r["accepted_n"] == 3  # fine labels the gate accepts
    assert r["silent_errors"] == 2                   # the meningioma call and the coarse tumour called healthy
    assert r["silent_misses"] == 1 and r["ood_flagged"] == round(1 / 6, 4)


def test_a_capture_in_colour_is_served_as_read_from_its_file(tmp_path, monkeypatch):
    from core.reader import ScanImage
    seen = []

    class Recording(FixedPredictor):
        def predict_scan(self, scan):
            seen.append((scan.colourfulness, scan.info.get("colour_marks")))
            return super().predict_scan(scan)
    rows = _named_files(tmp_path, [("glioma", "glioma")])
    _reads_with_name(monkeypatch)
    drawn = ScanImage(np.zeros((8, 8), np.float32), 0.25, "image", {"file": "glioma_0", "colour_marks": 0.01})
    evaluate(Recording(), rows, lambda a, r: drawn)   # drawn in colour: the scan its file reads as
    evaluate(Recording(), rows, lambda a, r: a)       # grey: the file's own (0 for a grey PNG)
    assert seen == [(0.25, 0.01), (0.0, None)]


def test_screen_captures_are_seeded_grey_images_and_run_only_when_named():
    import bench.shift_eval as se
    from bench.screen_captures import CAPTURES
    from core.inference import MARKS_SHARE_LIMIT
    from core.reader import ScanImage
    yy, xx = np.mgrid[:160, :140]
    head = (np.hypot(yy - 80, xx - 70) < 55).astype(np.float32) * 0.6
    for name, capture in CAPTURES.items():
        a, b = capture(head, np.random.default_rng(3)), capture(head, np.random.default_rng(3))
        if isinstance(a, ScanImage):   # drawn in colour: the scan read back from its file
            assert a.colourfulness == b.colourfulness and 1e-3 < a.colourfulness < 1, name   # white gives ~1e-10
            assert a.info["colour_marks"] > MARKS_SHARE_LIMIT, name   # refused as marks when served
            a, b = a.pixels, b.pixels
        assert a.dtype == np.float32 and a.ndim == 2 and 0 <= a.min() and a.max() <= 1, name
        assert np.array_equal(a, b), name                  # seeded per image: two models see the same capture
        assert a.shape != head.shape or np.abs(a - head).mean() > 0.001, name
    assert set(CAPTURES) <= set(se.PERTURBATIONS) and not set(CAPTURES) & set(se.RUN_BY_DEFAULT)


def test_parts_count_each_gate_part_that_flags_on_its_own(tmp_path, monkeypatch):
    """--parts: per image, the gate parts over their threshold; per run, the share each flags
    (an image flagged by two parts counts for both, an unflagged one for none)."""
    margins = [{"cnn": 0.5, "head": 1.0, "colour": -1.0}, {"cnn": -0.1, "head": 2.0, "colour": -1.0},
               {"cnn": -1.0, "head": -1.0, "colour": -1.0}, {"cnn": -1.0, "head": 0.0, "colour": 3.0},
               {"cnn": -1.0, "head": -1.0, "colour": -1.0}]   # the last one flagged by its header

    class Gated(FixedPredictor):
        def predict_scan(self, scan):
            p = super().predict_scan(scan)
            p.in_distribution = len(self.seen) < 5
            return p

        def gate_margins(self, scan):
            return margins[len(self.seen) - 1]   # the image predict_scan just saw
    rows = []
    for i in range(5):
        path = tmp_path / f"glioma_{i}.png"
        Image.fromarray(np.full((32, 32), 100, np.uint8)).save(path)
        rows.append((path, "glioma"))
    _reads_with_name(monkeypatch)
    r = evaluate(Gated(), rows, PERTURBATIONS["none"], parts=True)
    plain = evaluate(Gated(), rows, PERTURBATIONS["none"])
    assert [x["flagged_by"] for x in r["records"]] == [["cnn", "head"], ["head"], [], ["colour"], ["other"]]
    assert r["ood_flagged_by"] == {"cnn": 0.2, "colour": 0.2, "head": 0.4, "other": 0.2}
    assert "ood_flagged_by" not in plain and "flagged_by" not in plain["records"][0]


def _result(preds: dict[str, str], labels: dict[str, str]) -> dict:
    recs = [{"file": f, "label": labels[f], "pred": p} for f, p in preds.items()]
    return {"result": {"br35h": {"skull stripped": {"records": recs}}, "lgg": {"none": {"n": 2}}}}


def test_paired_pairs_two_results_image_by_image_and_refuses_what_has_no_records(tmp_path, capsys):
    from bench.shift_eval import main, paired
    labels = {"a.png": "tumor", "b.png": "tumor", "c.png": "tumor", "d.png": "notumor"}
    a = _result({"a.png": "notumor", "b.png": "notumor", "c.png": "glioma", "d.png": "notumor"}, labels)
    b = _result({"a.png": "glioma", "b.png": "meningioma", "c.png": "glioma", "d.png": "glioma"}, labels)
    got = paired(a, b)
    assert list(got) == ["br35h"] and list(got["br35h"]) == ["skull stripped"]  # LGG: no records, skipped
    r = got["br35h"]["skull stripped"]
    assert r["tumours_found"] == {"n": 3, "a_right": 1, "b_right": 3, "a_only": 0, "b_only": 2, "p": 0.5}
    assert r["normals_right"] == {"n": 1, "a_right": 1, "b_right": 0, "a_only": 1, "b_only": 0, "p": 1.0}
    assert r["accuracy"]["n"] == 1                      # a coarse "tumour" has no type to get right
    fa, fb = tmp_path / "a.json", tmp_path / "b.json"
    fa.write_text(json.dumps(a)); fb.write_text(json.dumps(b))
    assert main(["--paired", str(fa), str(fb)]) == 0
    assert '"b_only": 2' in capsys.readouterr().out
    fb.write_text(json.dumps({"result": {"lgg": {"none": {"n": 2}}}}))
    with pytest.raises(SystemExit) as e:
        main(["--paired", str(fa), str(fb)])
    assert e.value.code == 2


def test_perturbation_seeds_are_per_file_and_paired_refuses_other_draws():
    """Seeded by list position, one scan turned +45 degrees in one run and -45 in a run on another
    list (--limit, another model's split), and --paired compared the two."""
    from bench.shift_eval import file_seed, paired
    assert file_seed("/x/data/glioma/a.jpg") == file_seed("/elsewhere/glioma/a.jpg")   # class folder + name
    assert file_seed("/x/glioma/a.jpg") != file_seed("/x/glioma/b.jpg")

    def result(name, recs):
        return {"result": {"br35h": {name: {"records": [{"label": "tumor", "pred": "glioma", **r} for r in recs]}}}}
    a = result("rotate 45", [{"file": "a.png", "seed": 1}])
    b = result("rotate 45", [{"file": "a.png", "seed": 2}])
    with pytest.raises(ValueError, match="other seeds"):
        paired(a, b)
    # results written before seeds: a record's seed was its place in its list
    old_a = result("rotate 45", [{"file": "a.png"}, {"file": "b.png"}])
    old_b = result("rotate 45", [{"file": "b.png"}, {"file": "a.png"}])
    with pytest.raises(ValueError, match="other seeds"):
        paired(old_a, old_b)
    assert paired(old_a, old_a)["br35h"]["rotate 45"]["tumours_found"]["n"] == 2
    # a perturbation that draws nothing pairs an old result with a new one
    assert paired(result("skull stripped", [{"file": "a.png"}]),
                  result("skull stripped", [{"file": "a.png", "seed": file_seed("a.png")}]))


def test_ensemble_agreement_by_hand():
    from bench.ensemble_eval import agreement
    y = np.array([0, 1, 1, 0])
    a = np.array([[.9, .1], [.6, .4], [.2, .8], [.8, .2]])  # wrong on image 1
    b = np.array([[.4, .6], [.1, .9], [.3, .7], [.7, .3]])  # wrong on image 0
    c = np.array([[.8, .2], [.7, .3], [.1, .9], [.6, .4]])  # wrong on image 1
    r = agreement({"a": a, "b": b, "c": c}, y)
    assert r["models"] == {"a": 0.75, "b": 0.75, "c": 0.75}
    assert r["wrong_in_any"] == 2 and r["wrong_in_all"] == 0
    # mean: image 0 (.7,.3) right, image 1 (.467,.533) right -> all four right
    assert r["mean_of_all"] == 1.0


def test_ood_threshold_table_caps_every_source_by_hand():
    from bench.ood_threshold import threshold_table
    # a: 10 scores 0..9; b: 10 scores 0..0.9. At <= 10 % the cut must flag a's top score only
    # (cut 8, the larger of a's 8 and b's 0.8), so b flags nothing.
    val = {"a": np.arange(10.0), "b": np.arange(10.0) / 10}
    rows = threshold_table(val, np.array([-1.0, 5.0, 8.5, 9.5]), [0.1, 0.5])
    assert rows[0]["cut"] == 8.0
    assert rows[0]["val_flagged_pct"] == {"a": 10.0, "b": 0.0}
    assert rows[0]["outliers_flagged_pct"] == 50.0
    assert rows[1]["cut"] == 4.0 and rows[1]["outliers_flagged_pct"] == 75.0
    assert rows[1]["val_flagged_pct"] == {"a": 50.0, "b": 0.0}
    everything = threshold_table({"a": np.arange(4.0), "empty": np.array([])}, np.array([0.0]), [1.0])[0]
    assert everything["cut"] == float("-inf") and everything["outliers_flagged_pct"] == 100.0


def test_false_alarm_errors_and_series_by_hand():
    from bench.false_alarms import clusters, errors
    recs = [{"source": "b", "label": "notumor", "tumour_probability": 0.7, "file": "n1"},
            {"source": "b", "label": "notumor", "tumour_probability": 0.5, "file": "n2"},  # at the threshold: a call
            {"source": "b", "label": "notumor", "tumour_probability": 0.2, "file": "n3"},
            {"source": "b", "label": "glioma", "tumour_probability": 0.1, "file": "g1"},
            {"source": "b", "label": "tumor", "tumour_probability": 0.9, "file": "t1"},
            {"source": "other", "label": "notumor", "tumour_probability": 0.9, "file": "x"}]
    assert [r["file"] for r in errors(recs, "b", 0.5, "false-alarm")] == ["n1", "n2"]
    assert [r["file"] for r in errors(recs, "b", 0.5, "missed")] == ["g1"]
    # a-b and b-c are alike, a-c are not: single linkage joins all three; d stays alone
    a, b, c, d = (np.array(v, dtype=float) for v in ([1, 0, 0], [.8, .6, 0], [.28, .96, 0], [0, 0, 1]))
    ids = clusters(np.stack([a, b, c, d]), join=0.75)
    assert ids[0] == ids[1] == ids[2] != ids[3]


def test_stripped_template_serves_brain_slices_of_each_plane_and_counts_flags(tmp_path):
    """bench/stripped_template.py: slices read as an uploaded volume's are, near-empty ones
    skipped; a tumour call counts as a silent false alarm only without either flag."""
    import nibabel as nib
    from bench.stripped_template import brain_slices, serve
    zz, yy, xx = np.mgrid[0:40, 0:48, 0:36]
    brain = ((xx - 18) / 15) ** 2 + ((yy - 24) / 20) ** 2 + ((zz - 20) / 16) ** 2 < 1
    vol = np.where(brain, 0.6 + 0.1 * np.sin(xx / 3.0), 0.0).astype(np.float32).transpose(2, 1, 0)  # x, y, z
    path = tmp_path / "t.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.diag([-1.0, -1.0, 1.0, 1.0])), path)   # stored LPS: the reader turns it to RAS
    axial = brain_slices(path, "axial", step=4)
    ks = [k for k, _ in axial]
    assert ks and all(k % 4 == 0 for k in ks) and 0 not in ks and 36 not in ks  # the ends hold no brain
    assert {s.pixels.shape for _, s in axial} == {(48, 36)}
    assert brain_slices(path, "sagittal", step=4) and brain_slices(path, "coronal", step=4)

    class Stub:
        def __init__(self):
            self.i = 0

        def predict_scan(self, scan):
            self.i += 1   # slice 1 flagged tumour, 2 uncertain tumour, 3 silent tumour, 4 healthy...
            kind = self.i % 4
            return SimpleNamespace(pred="notumor" if kind == 0 else "glioma", in_distribution=kind != 1,
                                   uncertain=kind == 2, ood_score=1.0 if kind == 1 else -1.0)
    r = serve(Stub(), axial[:4])
    assert (r["n"], r["flagged"], r["tumour_calls"], r["silent_false_alarms"]) == (4, 1, 3, 1)
    assert "flagged_by" not in r
    Stub.gate_margins = lambda self, scan: {"cnn": 1.0 if self.i % 4 == 1 else -1.0, "head": 0.5}
    by = serve(Stub(), axial[:4], parts=True)
    assert by["flagged_by"] == {"cnn": 1, "head": 4} and by["slices"][0]["flagged_by"] == ["cnn", "head"]
    assert r["flagged_pct"] == 25.0 and [s["slice"] for s in r["slices"]] == ks[:4]


def test_package_images_reads_metaimages_and_refuses_without_the_packages(tmp_path, monkeypatch, capsys):
    """bench/package_images.py: a 2D MetaImage of bytes is read through its raw file (rows of
    DimSize's second number), other element types are refused, and a machine without the Debian
    packages gets a usage error, not a traceback."""
    import bench.package_images as P
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    a.tofile(tmp_path / "x.raw")
    (tmp_path / "x.mha").write_text("ObjectType = Image\nNDims = 2\nDimSize = 4 3\n"
                                    "ElementType = MET_UCHAR\nElementDataFile = x.raw\n")
    assert np.array_equal(P.read_image(tmp_path / "x.mha"), a)
    Image.fromarray(np.kron(a, np.ones((8, 8), np.uint8))).convert("P").save(tmp_path / "p.png")
    assert P.read_image(tmp_path / "p.png").shape == (24, 32, 3)   # palette: colours, not indices
    assert P.scan_of(np.kron(a, np.ones((8, 8), np.uint8))).pixels.shape == (24, 32)   # as an uploaded PNG
    for bad in ("NDims = 2\nElementType = MET_FLOAT", "NDims = 3\nElementType = MET_UCHAR"):
        (tmp_path / "f.mha").write_text(f"{bad}\nDimSize = 4 3\nElementDataFile = x.raw\n")
        with pytest.raises(ValueError, match="2D MET_UCHAR"):
            P.read_image(tmp_path / "f.mha")
    assert P.total([{"n": 3, "flagged": 1, "tumour_calls": 2, "silent_false_alarms": 0}] * 2) == \
        {"n": 6, "flagged": 2, "tumour_calls": 4, "silent_false_alarms": 0}
    monkeypatch.setattr(P, "ITK", tmp_path / "absent")
    with pytest.raises(SystemExit) as e:
        P.main(["--weights", str(tmp_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(tmp_path / "absent" / "FatMRISlice.png") in err and "apt-get install" in err
