"""Fixes from the session-16 reviews of scan inputs, volumes, evaluate, audit and compare."""
from __future__ import annotations

import io
from dataclasses import replace
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CLASSES, make_weights
from test_reader import encode, grey8, lps_volume, make_dicom, dicom12, phantom

from core import app_support as app
from core import engine as E
from core.cli import main
from core.reader import ScanError, read_scan, read_volume


@pytest.fixture(scope="module")
def predictor(random_weights):
    from core.inference import Predictor
    return Predictor(random_weights)


def volume() -> tuple[bytes, list[np.ndarray]]:
    # shifted 3 px a slice, not 9: rolled 36 px the head wrapped round the edge, two halves with
    # background between, which the served path now refuses as a layout of several slices
    imgs = [np.roll(phantom(), 3 * k, 1) * (0.4 + 0.15 * k) for k in range(5)]
    return lps_volume(imgs), imgs


# ----------------------------------------------------------------------------- volumes
def test_best_slice_searches_each_slice_for_the_head_once(predictor, monkeypatch):
    import core.preprocess as P
    from core.inference import most_tumour_like_slice
    calls = []
    real = P.head_bbox
    monkeypatch.setattr(P, "head_bbox", lambda g, *a, **k: calls.append(1) or real(g, *a, **k))
    data, imgs = volume()
    k, pred = most_tumour_like_slice(predictor, data, "v.nii.gz")
    assert len(calls) == len(imgs)  # scored, then the chosen slice predicted: one search each
    assert pred.info["slice_choice"] == "most tumour-like" and pred.info["slice_index"] == k


def test_best_slice_skips_slices_the_gate_refuses(predictor, monkeypatch):
    from core.inference import most_tumour_like_slice, slice_scores
    data, _ = volume()
    scores = slice_scores(predictor, data, "v.nii.gz")[2]
    ranked = sorted(scores, key=scores.get, reverse=True)
    refused = {ranked[0]}
    monkeypatch.setattr(predictor, "distribution_check",
                        lambda scan, x: (scan.info.get("slice_index") not in refused, None, "refused"))
    k, pred = most_tumour_like_slice(predictor, data, "v.nii.gz")
    assert k == ranked[1] and pred.in_distribution
    index, text = app.best_slice(predictor, data, "v.nii.gz")
    assert index == ranked[1] and "pass the out-of-distribution check" in text
    refused = set(ranked)  # every slice refused: the top one comes back, and the caption says so
    k, pred = most_tumour_like_slice(predictor, data, "v.nii.gz")
    assert k == ranked[0] and not pred.in_distribution
    assert "no slice" in app.best_slice(predictor, data, "v.nii.gz")[1]


def test_volume_alert_names_other_slices_over_the_operating_point(predictor):
    from core.inference import slice_scores
    data, _ = volume()
    scores = slice_scores(predictor, data, "v.nii.gz")[2]
    low, high = min(scores, key=scores.get), max(scores, key=scores.get)
    assert scores[high] > scores[low]
    threshold = (scores[low] + scores[high]) / 2
    alert = app.volume_alert(predictor, data, "v.nii.gz", threshold, low)
    assert alert and f"slice {high}" in alert
    assert app.volume_alert(predictor, data, "v.nii.gz", threshold, high) is None
    assert app.volume_alert(predictor, data, "v.nii.gz", 1.01, low) is None


def test_multipage_tiff_is_a_stack_of_slices():
    pages = [Image.fromarray((np.roll(phantom(), 10 * k, 0) * 255).astype(np.uint8)) for k in range(3)]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    slices, kind, info = read_volume(buf.getvalue(), "stack.tif")
    assert len(slices) == 3 and info["n_frames"] == 3
    for k, s in enumerate(slices):
        assert np.array_equal(s, read_scan(buf.getvalue(), "stack.tif", frame=k).pixels)
    assert app.volume_slices(buf.getvalue(), "stack.tif") == (3, 0)   # (pages, the reader's default)
    assert app.volume_slices(buf.getvalue(), "stack") == (3, 0)   # exports often have no suffix


def test_stack_pages_carry_their_own_flags_and_big_stacks_are_refused(predictor, monkeypatch):
    from core import reader
    from core.inference import most_tumour_like_slice
    blank = Image.new("L", (96, 96), 0)
    brains = [Image.fromarray((np.roll(phantom(), 9 * k, 1) * 255).astype(np.uint8)) for k in range(3)]
    buf = io.BytesIO()
    blank.save(buf, "TIFF", save_all=True, append_images=brains)
    pages = reader.read_image_pages(buf.getvalue(), "s.tif")
    assert [bool(p.info.get("blank")) for p in pages] == [True, False, False, False]
    assert [p.info["frame"] for p in pages] == [0, 1, 2, 3]
    k, pred = most_tumour_like_slice(predictor, buf.getvalue(), "s.tif")
    assert k != 0 and pred.in_distribution  # a blank first page does not stand for the others
    colour = io.BytesIO()
    tinted = [Image.merge("RGB", (b, b.point(lambda v: v // 3), b.point(lambda v: 255 - v))) for b in brains]
    tinted[0].save(colour, "TIFF", save_all=True, append_images=tinted[1:])
    k, pred = most_tumour_like_slice(predictor, colour.getvalue(), "c.tif")
    assert not pred.in_distribution  # each page keeps its colour, so the colour rule still holds
    monkeypatch.setattr(reader, "MAX_VOXELS", 96 * 96 * 3)
    with pytest.raises(ScanError, match="too many pages"):
        reader.read_image_pages(buf.getvalue(), "s.tif")


def test_an_office_document_is_one_file_not_a_zip_of_scans():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("word/media/image1.png", encode(grey8(), "PNG"))
    (name, data), = app.expand_uploads([("notes.docx", buf.getvalue())])
    assert name == "notes.docx" and isinstance(data, bytes)


def test_a_damaged_volume_header_does_not_stop_the_page(predictor):
    data = make_dicom(dicom12(phantom()), photometric="PALETTE COLOR")  # no colour table
    assert app.volume_slices(data, "bad.dcm") == (1, 0)  # read_scan tells the user why
    assert app.best_slice(predictor, lps_volume([np.zeros((32, 32), np.float32)] * 3), "e.nii.gz") \
        == (None, "Every slice of the volume is empty.")


# ----------------------------------------------------------------------------- blank, zips
def test_a_blank_image_is_refused_by_every_model(predictor):
    from core.inference import BLANK_OOD_REASON
    assert predictor.gate is None
    p = predictor.predict_scan(read_scan(encode(Image.new("L", (64, 64), 255), "PNG")))
    assert not p.in_distribution and p.ood_reason == BLANK_OOD_REASON


def test_zips_are_known_by_content_and_an_empty_one_is_said_so():
    png = encode(grey8(), "PNG")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("a.png", png)
    items = app.expand_uploads([("scans.ZIP.download", buf.getvalue()), ("png_named.zip", png)])
    assert [n for n, _ in items] == ["scans.ZIP.download/a.png", "png_named.zip"]
    assert all(isinstance(d, bytes) for _, d in items)
    empty = io.BytesIO()
    zipfile.ZipFile(empty, "w").close()
    (name, err), = app.expand_uploads([("e.zip", empty.getvalue())])
    assert isinstance(err, ScanError) and "no files" in str(err)


def test_a_zip_name_flagged_utf8_that_is_not_gets_a_sentence():
    from core.archive import _open_zip
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("caf\u00e9.png", b"x")  # stored with the UTF-8 flag
    broken = buf.getvalue().replace("caf\u00e9".encode(), b"caf\xff\xfe")
    with pytest.raises(ScanError, match="not valid UTF-8"):
        _open_zip(broken)


# ----------------------------------------------------------------------------- tables, report
def test_batch_table_lists_no_numbers_for_a_refused_scan():
    from core.dashboard import batch_table
    t = batch_table([{"file": "c.png", "ok": True, "pred": "notumor", "tumour_probability": 0.16,
                      "confidence": 0.84, "in_distribution": False}])
    assert t.iloc[0]["prediction"] == "no call: not like its training scans" and t.iloc[0]["tumour probability"] is None
    assert t.iloc[0]["probability of the call"] is None and t.iloc[0]["flags"] == "out-of-distribution"


def test_report_maps_default_to_the_cards_method(predictor):
    from core.report import ReportContext
    from core.saliency import default_method, method_name
    card = {**predictor.card, "saliency": {"default_method": "HiResCAM"}}
    stub = type("P", (), {"card": card, "threshold": 0.5, "name": "m", "weights_sha256": "x",
                          "classes": CLASSES, "gate": None})()
    assert default_method(card) == "HiResCAM"
    assert ReportContext.of(stub, None, None).method == method_name("HiResCAM")
    assert ReportContext.of(stub, None, "gradcam").method == "Grad-CAM"


def test_operating_point_text_names_the_cap():
    op = {"threshold": 0.5, "target_sensitivity": 0.99, "min_specificity": 0.97,
          "val_sensitivity": 0.971, "val_specificity": 0.9696}
    assert "0.5 cap" in app.operating_point_text({"operating_point": op}, 0.5)
    low = {**op, "threshold": 0.2, "val_specificity": 0.971}
    text = app.operating_point_text({"operating_point": low}, 0.2)
    assert "raised to keep healthy scans at" in text and "cap" not in text
    # the sensitivity target met, the floor not: a binary model on 60 scans said only "reached 100.0%
    # at specificity 0.0%"
    met = {**op, "val_sensitivity": 1.0, "val_specificity": 0.0}
    assert "floor of 97.0% in every source is not met" in app.operating_point_text({"operating_point": met}, 0.5)
    # a pooled 90.9 % hid one source at 0 %: the floor holds per source, and so does the check
    per = {**op, "min_specificity": 0.9, "val_sensitivity": 1.0, "val_specificity": 0.909,
           "val_specificity_by_source": {"a": 0.0, "b": 1.0}}
    assert E.floor_unmet(per) == ("a", 0.0) and E.floor_unmet({**per, "threshold": 0.3}) is None
    assert "cap the validation specificity of a is 0.0%)." in app.operating_point_text({"operating_point": per}, 0.5)
    lgg = {**per, "val_specificity_by_source": {"lgg": 0.0, "brisc": 1.0}}   # a shared source, named for a reader
    assert "specificity of LGG FLAIR is 0.0%" in app.operating_point_text({"operating_point": lgg}, 0.5)
    assert E.floor_unmet({**per, "val_specificity_by_source": {"a": 0.95, "b": 1.0}}) is None


def test_benchmark_accuracy_of_benchmark_only_and_binary_models():
    from core.dashboard import benchmark_accuracy
    four = ["glioma", "meningioma", "pituitary", "notumor"]
    assert benchmark_accuracy({"classes": four, "sources": ["benchmark"], "accuracy": 0.9}) == 0.9
    assert benchmark_accuracy({"classes": four, "sources": ["benchmark", "lgg"], "accuracy": 0.9,
                               "accuracy_per_source": {"benchmark": 0.95}}) == 0.95
    assert benchmark_accuracy({"classes": four, "sources": ["benchmark", "lgg"], "accuracy": 0.9}) is None
    assert benchmark_accuracy({"classes": ["tumor", "notumor"], "sources": ["benchmark"], "accuracy": 0.97}) is None


# ----------------------------------------------------------------------------- evaluate, audit
def _class_folder(root: Path, names: dict[str, int]) -> None:
    for cls, n in names.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            (root / cls / f"{k}.png").write_bytes(
                encode(Image.fromarray((np.roll(phantom(), 7 * k + len(cls), 1) * 255).astype(np.uint8)), "PNG"))


def test_evaluate_a_model_without_a_no_tumour_class(tmp_path):
    from safetensors.torch import save_file
    from core.models import create_model
    w = make_weights(tmp_path / "w")
    card = json.loads((w / "card.json").read_text())
    card["classes"] = ["glioma", "meningioma", "pituitary"]
    (w / "card.json").write_text(json.dumps(card))
    save_file({k: v.contiguous() for k, v in create_model("simple_cnn", 3).state_dict().items()},
              w / "model.safetensors")
    _class_folder(tmp_path / "d", {"glioma": 3, "meningioma": 2, "astrocytoma": 2})
    assert main(["evaluate", str(tmp_path / "d"), "--weights", str(w), "--json", str(tmp_path / "e.json")]) == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["n"] == 5 and "threshold_curve" not in ev
    assert sum("astrocytoma" in e["file"] for e in ev["errors"]) == 2
    assert all("threshold" in r for r in ev["predictions"])


def test_evaluate_says_which_images_it_scored(tmp_path, random_weights, capsys):
    root = tmp_path / "d"
    _class_folder(root / "Training", {"glioma": 2, "notumor": 2})
    (root / "Testing" / "glioma").mkdir(parents=True)  # a Testing/ folder with nothing in it
    assert main(["evaluate", str(root), "--weights", str(random_weights), "--json", str(tmp_path / "e.json")]) == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["n"] == 4 and ev["evaluated"].startswith("every image, Training/ included")
    assert "Training/ included" in capsys.readouterr().err
    _class_folder(root / "Validation", {"glioma": 1, "notumor": 1})
    assert main(["evaluate", str(root), "--weights", str(random_weights), "--json", str(tmp_path / "e.json")]) == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    assert ev["n"] == 2 and ev["evaluated"] == "Validation/ images"


def test_dicom_names_and_linked_folders_are_found_or_reported(tmp_path):
    from core.data import discover
    root = tmp_path / "d"
    _class_folder(root, {"glioma": 2})
    dcm = make_dicom(dicom12(phantom()))
    (root / "glioma" / "1.2.840.113619.2.55.3.1").write_bytes(dcm)
    (root / "glioma" / "scan.IMA").write_bytes(dcm)
    (root / "glioma" / "notes.txt").write_text("not a scan")
    _class_folder(tmp_path / "elsewhere", {"more": 1})
    (root / "glioma" / "linked").symlink_to(tmp_path / "elsewhere" / "more", target_is_directory=True)
    scan = discover(root)
    rels = {s.rel for s in scan.samples}
    assert {"glioma/1.2.840.113619.2.55.3.1", "glioma/scan.IMA"} <= rels and len(rels) == 4
    skipped = dict(scan.skipped)
    assert skipped["glioma/notes.txt"] == "not an image file"
    assert "linked folder" in skipped["glioma/linked/"]


def test_audit_of_a_single_group_finishes(tmp_path, capsys):
    root = tmp_path / "d"
    for cls in ("glioma", "notumor"):
        (root / cls).mkdir(parents=True)
        (root / cls / "a.png").write_bytes(encode(grey8(), "PNG"))
    (root / "glioma" / "tiny.png").write_bytes(encode(grey8(15, 15), "PNG"))
    assert main(["audit", str(root)]) == 0
    out = capsys.readouterr().out
    assert "2 readable images" in out and "too small" in out and "cross-split" in out


# ----------------------------------------------------------------------------- compare, rescore
def test_compare_keeps_the_good_rows_beside_a_broken_card(tmp_path, capsys):
    good = make_weights(tmp_path / "good")
    for name, text in (("badjson", "{\n,"), ("listcard", "[1, 2]")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "card.json").write_text(text)
    assert main(["compare", str(tmp_path), "--json", str(tmp_path / "rows.json")]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert rows["test-random"]["latency_from"].startswith("measured, 1 thread, ")
    assert "cannot be read" in rows["badjson"]["problem"] and "cannot be read" in rows["listcard"]["problem"]
    assert main(["compare", str(good), "--md", str(tmp_path)]) == 2  # a folder: refused before timing


def test_rescore_recomputes_the_referral_flags(tmp_path):
    from core.evaluation import rescore
    w = make_weights(tmp_path / "w")
    card = json.loads((w / "card.json").read_text())
    card["uncertainty"] = {"min_confidence": 0.99}  # every stored record is now below it
    (w / "card.json").write_text(json.dumps(card))
    ev = json.loads((w / "eval.json").read_text())
    assert not any(r["uncertain"] for r in ev["predictions"])
    rescore(w, log=lambda s: None)
    ev = json.loads((w / "eval.json").read_text())
    assert all(r["uncertain"] for r in ev["predictions"]) and ev["referred_uncertain"] == len(ev["predictions"])


# ----------------------------------------------------------------------------- the app
@pytest.fixture
def at(random_weights, monkeypatch):
    from streamlit.testing.v1 import AppTest
    monkeypatch.setenv("BT_WEIGHTS", str(random_weights))
    return AppTest.from_file(str(Path(__file__).resolve().parents[1] / "streamlit_app.py"),
                             default_timeout=120).run()


def test_the_evaluation_data_choice_survives_another_page(at):
    at.switch_page("app_pages/evaluation.py").run()
    at.radio[0].set_value("zip").run()
    at.switch_page("app_pages/diagnose.py").run()
    at.switch_page("app_pages/evaluation.py").run()
    assert at.radio[0].value == "zip" and at.file_uploader


def test_a_big_batch_keeps_each_volumes_slice(at, predictor):
    from core.inference import slice_scores
    data, _ = volume()
    scores = slice_scores(predictor, data, "v.nii.gz")[2]
    chosen = next(k for k in sorted(scores, key=lambda k: abs(scores[k] - scores[2]), reverse=True))
    assert abs(scores[chosen] - scores[2]) > 1e-4  # the chosen slice differs from the middle one
    files = [("v.nii.gz", data, "application/octet-stream")] + [
        (f"s{k}.png", encode(Image.fromarray((np.roll(phantom(), 2 * k, 0) * 255).astype(np.uint8)), "PNG"),
         "image/png") for k in range(7)]
    at.switch_page("app_pages/diagnose.py").run()
    at.file_uploader[0].set_value(files).run()
    next(s for s in at.slider if s.label.startswith("Slice")).set_value(chosen).run()
    row = lambda: at.dataframe[0].value.iloc[0]["tumour probability"]  # noqa: E731
    assert row() == pytest.approx(scores[chosen], abs=2e-3)
    details = lambda: next(s for s in at.selectbox if s.label == "Show the details of")  # noqa: E731
    details().set_value(3).run()  # another file's details: the volume keeps its slice
    assert not at.exception and row() == pytest.approx(scores[chosen], abs=2e-3)
    details().set_value(0).run()
    assert next(s for s in at.slider if s.label.startswith("Slice")).value == chosen


# ----------------------------------------------------------------------------- bench
def test_latency_times_the_served_out_of_distribution_check(random_weights, capsys, monkeypatch):
    import sys
    import time
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import latency
    from core.inference import Predictor
    real, calls = Predictor.distribution_check, []

    def slow_check(self, scan, x):  # the served check, made to take >= 30 ms
        calls.append((scan, x))
        time.sleep(0.03)
        return real(self, scan, x)

    monkeypatch.setattr(Predictor, "distribution_check", slow_check)
    img = Path(__file__).resolve().parents[1] / "assets" / "samples" / "glioma.jpg"
    assert latency.main(["--weights", str(random_weights), "--image", str(img), "--threads", "1",
                         "--runs", "2", "--warmup", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = out["results"][0]
    assert out["precision"] in ("bf16", "fp32") and out["ood_gate"] is False
    # once per timed or warm-up image, on the scan and the tensor that was classified
    assert len(calls) == 3
    assert all(x is not None and x.shape[0] == 1 and scan.pixels is not None for scan, x in calls)
    # and the ood_check column times that call (the sleep), which the total includes
    assert 30 <= row["ood_check_median_ms"] <= row["total_median_ms"]
    parts = sum(row[f"{k}_median_ms"] for k in ("decode", "preprocess", "forward", "ood_check"))
    assert row["total_median_ms"] == pytest.approx(parts, rel=0.35, abs=1.0)


@pytest.mark.parametrize("args, message", [(["--threads", "-1"], "-1 must be at least 0"),
                                           (["--classes", "1"], "1 must be at least 2")])
def test_train_throughput_usage_errors_are_one_line(args, message, capsys):
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import train_throughput
    with pytest.raises(SystemExit) as e:  # -1 threads was a RuntimeError from torch
        train_throughput.main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bench_json_folder_is_made_before_the_run(tmp_path):
    from bench._machine import json_output
    assert json_output(str(tmp_path / "new" / "x.json")) and (tmp_path / "new").is_dir()
    with pytest.raises(SystemExit):
        json_output(str(tmp_path))


def test_ensemble_eval_refuses_models_that_trained_on_the_files(tmp_path):
    from types import SimpleNamespace
    from bench.ensemble_eval import trained_on
    for name, train in (("a", ["glioma/1.jpg"]), ("b", ["glioma/2.jpg", "notumor/3.jpg"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "split.json").write_text(json.dumps({"files": {"src": {"train": train, "val": []}}}))
    a, b = SimpleNamespace(dir=tmp_path / "a"), SimpleNamespace(dir=tmp_path / "b")
    files = [tmp_path / "root" / "glioma" / "2.jpg", tmp_path / "root" / "notumor" / "3.jpg"]
    assert trained_on([a], "src", files) is None
    assert trained_on([a, b], "src", files) == (str(tmp_path / "b"), 2)
    assert trained_on([a, b], "other", files) is None  # another source's files are another's


def test_predict_a_volume_at_a_slice_or_its_most_tumour_like_one(random_weights, predictor, tmp_path, capsys):
    from core.inference import most_tumour_like_slice
    data, _ = volume()
    f = tmp_path / "v.nii.gz"
    f.write_bytes(data)
    empty = tmp_path / "e.nii.gz"
    empty.write_bytes(lps_volume([np.zeros((32, 32), np.float32)] * 3))
    best = most_tumour_like_slice(predictor, data, "v.nii.gz")[0]
    assert main(["predict", str(f), str(empty), "--weights", str(random_weights), "--json", "--best-slice"]) == 1   # the empty volume: no call
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["info"]["slice_index"] == best and rows[0]["info"]["slice_choice"] == "most tumour-like"
    assert rows[1]["ok"] and rows[1]["in_distribution"] is False  # an empty volume: refused as blank
    assert main(["predict", str(f), "--weights", str(random_weights), "--json", "--slice", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["info"]["slice_index"] == 1
    assert main(["predict", str(f), "--weights", str(random_weights), "--slice", "9"]) == 1
    assert "does not exist" in capsys.readouterr().out


def test_a_tumour_call_near_an_end_of_the_head_is_flagged(predictor, monkeypatch):
    """Each NIfTI slice carries head_share, its lit cross-section over the volume's widest (slice
    indices kept across an empty slice), whether read alone or as a volume; a tumour call on a
    slice under END_SLICE_SHARE gets the note and the flag (CLI text, report, table), a middle
    slice or a 'no tumour' call does not, and a refused slice has no call to doubt."""
    from core import inference as I
    from core.reader import SAFE_INFO_KEYS
    from core.report import FLAG_END_SLICE, REPORT_INFO_KEYS, flags_of
    big, small = phantom(), np.zeros_like(phantom())
    small[24:72, 24:72] = np.asarray(Image.fromarray(big).resize((48, 48)))  # the same head, smaller
    data = lps_volume([np.zeros_like(big), small, big * 0.8, big])
    shares = [s.info["head_share"] for s in I.indexed_slices(data, "v.nii.gz")[0]]
    assert shares == [read_scan(data, "v.nii.gz", slice=k).info["head_share"] for k in range(4)]
    assert shares[0] == 0.0 and shares[3] == 1.0
    assert shares[1] == pytest.approx((small > 0.1).mean() / (big > 0.1).mean(), abs=0.02)
    assert shares[1] < I.END_SLICE_SHARE <= shares[2]
    assert "head_share" in SAFE_INFO_KEYS and "head_share" in REPORT_INFO_KEYS   # the report keeps it
    tumour = next(c for c in predictor.classes if c != "notumor")
    for k, call, said in ((1, tumour, True), (3, tumour, False), (1, "notumor", False)):
        pred = replace(predictor.predict_file(data, "v.nii.gz", slice=k), pred=call)
        assert (I.end_slice_note(pred.info, pred.pred, predictor.classes) is not None) is said
        assert (FLAG_END_SLICE in flags_of({"ok": True, **pred.to_json()})) is said
    k, best = I.most_tumour_like_slice(predictor, data, "v.nii.gz", scores={1: 1.0, 2: 0.0, 3: 0.0})
    assert k == 1 and best.info["head_share"] == shares[1]
    pages = [Image.fromarray((a * 255).astype(np.uint8)) for a in (big, small)]   # a TIFF stack too
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    stack = [sc.info["head_share"] for sc in I.indexed_slices(buf.getvalue(), "s.tif")[0]]
    assert stack[0] == 1.0 and stack[1] < I.END_SLICE_SHARE   # pages are windowed one by one: a rough guide
    refused = {"ok": True, **replace(pred, pred=tumour, in_distribution=False).to_json()}
    assert FLAG_END_SLICE not in flags_of(refused)
    assert I.end_slice_note({"head_share": 0.2}, tumour, ["glioma", "meningioma"]) is None  # no 'no tumour' class
