"""The Streamlit app through AppTest: every page, predictions, batches, the shared threshold.

Runs on a random-init model made by conftest (no data, no training).
"""
from __future__ import annotations

import io
import zipfile

import pytest
from streamlit.testing.v1 import AppTest

import core.inference
from core.labels import class_label
from conftest import CLASSES, DATA, REPO

PAGES = ["app_pages/diagnose.py", "app_pages/evaluation.py", "app_pages/training.py", "app_pages/model_card.py"]
SAMPLE = REPO / "assets" / "samples" / "glioma.jpg"


@pytest.fixture
def app(random_weights, monkeypatch) -> AppTest:
    monkeypatch.setenv("BT_WEIGHTS", str(random_weights))
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=90)
    return at.run()


def texts(at: AppTest) -> str:
    return "\n".join([m.value for m in at.markdown] + [c.value for c in at.caption]
                     + [e.value for e in at.error] + [w.value for w in at.warning]
                     + [i.value for i in at.info] + [t.value for t in at.title]
                     + [h.value for h in at.header] + [h.value for h in at.subheader])


def predictions(at: AppTest) -> list[str]:
    return [m.value.lstrip("# ") for m in at.markdown if m.value.lstrip("#").startswith(" Prediction:")]   # H2 alone, H3 in a batch


def figure_titles(at: AppTest) -> str:
    return "\n".join(p.proto.spec for p in at.get("plotly_chart"))


def test_every_page_renders(app):
    assert not app.exception
    assert "**not a medical device**" in texts(app) and "Loaded model: test-random (simple_cnn)" in texts(app)
    assert threshold_slider(app).value == 0.5  # the card's operating point
    for page in PAGES:
        app.switch_page(page).run()
        assert not app.exception, (page, [e.value for e in app.exception])
        assert not app.error, (page, [e.value for e in app.error])


def heading_levels(at: AppTest) -> list[tuple[int, str]]:
    """(level, text) of the page's headings in the order shown: titles, headers, subheaders and
    markdown '#' lines (a screen reader lists them as the page's outline)."""
    import re
    from streamlit.testing.v1 import element_tree as et

    def walk(node):
        kids = getattr(node, "children", None)
        yield from (x for k in sorted(kids) for x in walk(kids[k])) if isinstance(kids, dict) else [node]
    found = []
    for n in walk(at._tree):
        if isinstance(n, et.HeadingBase):
            found.append(({"title": 1, "header": 2, "subheader": 3}[n.type], n.value))
        elif isinstance(n, et.Markdown) and (m := re.match(r"(#{1,6}) ", n.value)):
            found.append((len(m[1]), n.value))
    return found


def test_headings_never_skip_a_level(app):
    """Home, Training and Model card went from H1 (title) to H3 (subheader) and H4: a screen
    reader's outline of the page had holes (an accessibility review). Diagnose's batch heading and
    a single scan's call (H3 straight under the title: a review of that fix) too."""
    outlines = {"home": heading_levels(app)}
    app.switch_page("app_pages/diagnose.py").run()
    app.file_uploader[0].set_value(("s.jpg", SAMPLE.read_bytes(), "image/jpeg")).run()
    outlines["diagnose, one scan"] = heading_levels(app)
    app.file_uploader[0].set_value([(f"s{i}.jpg", SAMPLE.read_bytes(), "image/jpeg") for i in range(2)]).run()
    outlines["diagnose"] = heading_levels(app)
    for page in PAGES[1:]:
        outlines[page] = heading_levels(app.switch_page(page).run())
    for page, found in outlines.items():
        levels = [lvl for lvl, _ in found]
        assert levels and levels[0] == 1, (page, found)
        assert all(b <= a + 1 for a, b in zip(levels, levels[1:])), (page, found)
    assert [lvl for lvl, t in outlines["diagnose, one scan"] if t.startswith("## Prediction")] == [2]
    assert [lvl for lvl, t in outlines["diagnose"] if t.startswith("### Prediction")] == [3, 3]


def test_diagnose_predicts_a_builtin_sample(app, monkeypatch):
    calls = []
    real = core.inference.Predictor.predict_scan
    monkeypatch.setattr(core.inference.Predictor, "predict_scan",
                        lambda self, scan: calls.append(1) or real(self, scan))
    app.switch_page("app_pages/diagnose.py").run()
    app.multiselect[0].select("glioma.jpg").run()
    assert not app.exception
    (line,) = predictions(app)
    assert any(f"**{class_label(c)}**" in line for c in CLASSES)
    assert len(app.image) >= 3  # the scan, the overlay, the raw map
    assert "over the model input" in " ".join(c for im in app.image for c in im.captions)
    assert "Class probabilities" in figure_titles(app)
    assert calls == [1]
    # Display-only controls re-run the saliency fragment, never the model.
    app.slider(key=next(s.key for s in app.slider if s.key.startswith("o-"))).set_value(0.9).run()
    app.selectbox(key=next(s.key for s in app.selectbox if s.key.startswith("m-"))).set_value("HiResCAM").run()
    app.selectbox(key=next(s.key for s in app.selectbox if s.key.startswith("t-"))).set_value("notumor").run()
    assert not app.exception and calls == [1]
    # a class other than the call is explained with its probability, and said not to be the call
    assert "HiResCAM (for 'no tumour', p " in " ".join(c for im in app.image for c in im.captions)
    assert ", not the call; scaled to its own peak, so yellow is no sign of it) over the model input" in " ".join(c for im in app.image for c in im.captions)
    # EigenCAM draws one map whatever the class: no class is claimed for it.
    app.selectbox(key=next(s.key for s in app.selectbox if s.key.startswith("m-"))).set_value("EigenCAM").run()
    assert next(s for s in app.selectbox if s.key.startswith("t-")).disabled
    captions = " ".join(c for im in app.image for c in im.captions)
    assert "EigenCAM (class-agnostic" in captions and "'notumor'" not in captions


@pytest.mark.parametrize("reason, shown", [
    (None, core.inference.PIXEL_OOD_REASON),   # an older Prediction without a reason
    ("The DICOM header says this is a CT image (Modality CT), not an MRI.", "Modality CT"),
])
def test_out_of_distribution_is_not_presented_as_a_diagnosis(app, monkeypatch, reason, shown):
    from dataclasses import replace
    real = core.inference.Predictor.predict_scan
    monkeypatch.setattr(core.inference.Predictor, "predict_scan", lambda self, scan: replace(
        real(self, scan), in_distribution=False, uncertain=True, confidence=0.2, ood_reason=reason))
    app.switch_page("app_pages/diagnose.py").run()
    app.multiselect[0].select("notumor.jpg").run()
    assert not app.exception and predictions(app) == []
    warnings = " ".join(w.value for w in app.warning)
    assert "Out of distribution" in warnings and "not a diagnosis" in warnings and shown in warnings
    assert "Uncertain — refer for review" not in warnings  # no call, so nothing to refer


def test_report_buttons_plug_in(app):
    from core import report
    assert hasattr(report, "report_downloads_data")
    app.switch_page("app_pages/diagnose.py").run()
    app.multiselect[0].select("glioma.jpg").run()
    next(b for b in app.button if b.label.startswith("Prepare a PDF")).click().run()
    assert not app.exception and not app.error
    labels = [b.label for b in app.get("download_button")]
    assert "Download the PDF report" in labels and "Download the CSV report" in labels
    # the button that had focus is gone: a status message says where the downloads are
    assert any(m.value.startswith("Report ready") for m in app.success)


def test_batch_with_a_bad_file_shows_the_error_and_the_others(app):
    good = SAMPLE.read_bytes()
    app.switch_page("app_pages/diagnose.py").run()
    app.file_uploader[0].set_value([("first.jpg", good, "image/jpeg"),
                                    ("broken.jpg", b"this is not a picture", "image/jpeg"),
                                    ("third.jpg", (REPO / "assets/samples/notumor.jpg").read_bytes(),
                                     "image/jpeg")]).run()
    assert not app.exception
    errors = [e.value for e in app.error]
    assert len(errors) == 1 and "broken.jpg" in errors[0]
    assert len(predictions(app)) == 2
    table = app.dataframe[0].value
    assert list(table["file"]) == ["first.jpg", "broken.jpg", "third.jpg"]
    assert table["flags"][1].startswith("error:") and table["prediction"][0] in map(class_label, CLASSES)
    # where the maps were tested: said once above the batch, not under each file's map
    assert sum("tested against tumour masks" in c.value for c in app.caption) == 1
    assert app.dataframe[0].proto.placeholder == "—"   # its empty number cells: not a grey "None"
    assert any(b.label.startswith("Download the table") for b in app.get("download_button"))


def test_a_batch_of_only_unreadable_files_offers_no_report(app):
    app.switch_page("app_pages/diagnose.py").run()
    app.file_uploader[0].set_value([("a.jpg", b"not a picture", "image/jpeg"),
                                    ("b.png", b"nor this", "image/png")]).run()
    assert not app.exception and len(app.error) == 2
    assert not any(b.label.startswith("Prepare a PDF") for b in app.button)
    app.file_uploader[0].set_value([("a.jpg", b"not a picture", "image/jpeg"),
                                    ("good.jpg", SAMPLE.read_bytes(), "image/jpeg")]).run()
    assert any(b.label.startswith("Prepare a PDF") for b in app.button)


def test_series_table_counts_slices_called_tumour_by_instance():
    from core.dashboard import series_table

    def row(file, series, instance, pred, p, ok=True, ood=False, uncertain=False):
        return {"file": file, "ok": ok, "pred": pred, "tumour_probability": p, "in_distribution": not ood,
                "uncertain": uncertain, "info": {"series": series, "instance": instance}}
    rows = [row("c.dcm", "s1", 3, "glioma", 0.91), row("a.dcm", "s1", 1, "notumor", 0.02),
            row("b.dcm", "s1", 2, "meningioma", 0.97, uncertain=True), row("d.dcm", "s1", 4, "glioma", 0.99, ood=True),
            row("lone.dcm", "s2", 1, "glioma", 0.9), {"file": "bad.dcm", "ok": False, "error": "x"},
            {"file": "x.png", "ok": True, "pred": "glioma", "tumour_probability": 0.9, "info": {}}]
    table = series_table(rows)
    assert len(table) == 1  # a series with one file here, a plain image and an error: no row
    r = table.iloc[0]
    assert (r["files"], r["tumour called"], r["out of distribution"], r["uncertain"]) == (4, 2, 1, 1)
    assert r["slices called tumour"] == "#2, #3"  # by Instance Number; the refused slice is no call
    assert r["highest tumour probability"] == 0.97 and r["highest at"] == "#2"
    assert series_table([row(f"{k}.dcm", "s", k, "glioma", 0.9) for k in range(12)], listed=3).iloc[0][
        "slices called tumour"] == "#0, #1, #2, ..."
    twice = series_table(rows + [row("b.dcm", "s1", 2, "meningioma", 0.97)]).iloc[0]  # a file given twice
    assert (twice["files"], twice["tumour called"]) == (4, 2)
    hashed = [{**r, "sha256": r["file"] * 2} for r in rows]   # ...or under another name (its hash tells)
    again = series_table(hashed + [{**hashed[0], "file": "copy/c.dcm"}]).iloc[0]
    assert (again["files"], again["slices called tumour"]) == (4, "#2, #3")


def test_a_dicom_series_uploaded_as_files_gets_a_series_row(app):
    import numpy as np
    from PIL import Image
    from test_reader import dicom12, make_dicom
    grey = np.asarray(Image.open(SAMPLE).convert("L"), np.float32) / 255
    uid = "1.2.826.0.1.3680043.8.498.777"
    files = [(f"IM{k}", make_dicom(dicom12(np.roll(grey, 3 * k, 0)), series=uid, instance=k), "application/dicom")
             for k in (3, 1, 2)]
    files.append(("other.dcm", make_dicom(dicom12(grey), series=uid + "9", instance=1), "application/dicom"))
    app.switch_page("app_pages/diagnose.py").run()
    app.file_uploader[0].set_value(files).run()
    assert not app.exception
    series = app.dataframe[1].value
    assert len(series) == 1 and series.iloc[0]["files"] == 3
    assert series.iloc[0]["highest at"] in ("#1", "#2", "#3")
    assert any("A tumour called on any slice" in c.value for c in app.caption)


def test_zip_upload_is_unpacked_in_memory(app):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("scans/a.jpg", SAMPLE.read_bytes())
        z.writestr("scans/b.txt", b"notes")
        z.writestr("scans/c.jpg", (REPO / "assets/samples/pituitary.jpg").read_bytes())
    app.switch_page("app_pages/diagnose.py").run()
    app.file_uploader[0].set_value(("batch.zip", buf.getvalue(), "application/zip")).run()
    assert not app.exception
    assert len(predictions(app)) == 2
    assert any("b.txt" in e.value for e in app.error)


def threshold_slider(at: AppTest):
    return next(s for s in at.sidebar.slider if s.key.startswith("_threshold_widget"))


def test_operating_point_is_shared_by_diagnose_and_evaluation(app):
    threshold_slider(app).set_value(1.0).run()  # nothing reaches p(tumour) >= 1: all missed
    app.switch_page("app_pages/evaluation.py").run()
    assert {m.label: m.value for m in app.metric}["Tumours missed"] == "10"  # all 10 of them
    app.switch_page("app_pages/diagnose.py").run()
    app.multiselect[0].select("glioma.jpg").run()
    assert predictions(app) == ["Prediction: **No tumour**"]
    threshold_slider(app).set_value(0.0).run()  # everything flagged: nothing missed
    assert predictions(app) != ["Prediction: **No tumour**"]
    app.switch_page("app_pages/evaluation.py").run()
    assert {m.label: m.value for m in app.metric}["Tumours missed"] == "0"
    assert threshold_slider(app).value == 0.0
    app.sidebar.button[0].click().run()  # back to the card's operating point
    assert threshold_slider(app).value == 0.5 and not app.exception


def test_evaluation_shows_confusion_and_false_negative_analysis(app):
    app.switch_page("app_pages/evaluation.py").run()
    assert not app.exception
    titles = figure_titles(app)
    for title in ("Confusion matrix (count and row %)", "False negatives against",
                  "operating point 0.500", "ROC", "Precision-recall", "Reliability",
                  "Risk-coverage"):
        assert title in titles, title
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Scans"] == "14" and "of 10" in metrics["Tumours missed here"]
    helps = {m.label: m.proto.help for m in app.metric}
    assert "95 % interval" in helps["Accuracy"] and "95 % interval" in helps["Sensitivity"]
    assert list(app.dataframe[0].value["class"]) == [class_label(c) for c in CLASSES]
    # One source at a time; the gallery says when a source's scans are not on disk.
    app.selectbox[0].set_value("synth").run()
    assert {m.label: m.value for m in app.metric}["Scans"] == "12"
    app.selectbox[0].set_value("elsewhere").run()
    app.radio(key="gallery-kind").set_value("misclassified").run()
    assert not app.exception
    assert "not on this machine" in texts(app) and "none of them on this machine" in texts(app)
    # none on disk: no '2 scans; 2 shown' over no image, nor a slider (a fresh-machine review)
    assert "mistakes first" not in texts(app) and not [s for s in app.slider if s.key == "gallery-count"]
    # Synthetic scans on disk: the gallery shows them with a map for the class asked for.
    app.selectbox[0].set_value("synth").run()
    app.radio(key="gallery-explain").set_value("label").run()
    assert not app.exception
    captions = " ".join(c for im in app.image for c in im.captions)
    assert "true" in captions and "predicted" in captions
    # a missed tumour's 'no tumour' map is said not to point at the tumour, only when that map is shown
    app.radio(key="gallery-kind").set_value("missed").run()
    assert "need not point at the one missed" not in texts(app)
    app.radio(key="gallery-explain").set_value("pred").run()
    assert "need not point at the one missed" in texts(app)


def test_evaluation_leaves_out_test_scans_with_a_copy_in_training(random_weights, tmp_path, monkeypatch):
    import json
    import shutil
    w = tmp_path / "w"
    shutil.copytree(random_weights, w)
    ev = json.loads((w / "eval.json").read_text())
    for r in ev["predictions"]:
        r["copy_in_training"] = r["source"] == "elsewhere"   # 2 of the 14
    (w / "eval.json").write_text(json.dumps(ev))
    monkeypatch.setenv("BT_WEIGHTS", str(w))
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=90).run()
    at.switch_page("app_pages/evaluation.py").run()
    toggle = at.toggle[0]
    assert "Leave out the 2 test scans with a copy in training" in toggle.label and toggle.value
    assert {m.label: m.value for m in at.metric}["Scans"] == "12" and not at.exception
    toggle.set_value(False).run()
    assert {m.label: m.value for m in at.metric}["Scans"] == "14"


def test_evaluation_on_an_uploaded_labelled_zip(app):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for c in ("glioma", "meningioma", "pituitary", "notumor"):
            z.writestr(f"mine/{c}/{c}.jpg", (REPO / f"assets/samples/{c}.jpg").read_bytes())
        z.writestr("mine/notumor/bad.jpg", b"garbage")
    app.switch_page("app_pages/evaluation.py").run()
    app.radio[0].set_value("zip").run()
    app.file_uploader[0].set_value(("mine.zip", buf.getvalue(), "application/zip")).run()
    app.button[0].click().run()
    assert not app.exception
    assert any("bad.jpg" in e.value for e in app.error)
    assert {m.label: m.value for m in app.metric}["Scans"] == "4"
    assert "Confusion matrix (count and row %)" in figure_titles(app)


def test_training_page_plots_history_and_compares_models(app):
    app.switch_page("app_pages/training.py").run()
    titles = figure_titles(app)
    assert "Loss" in titles and "Accuracy" in titles and "Learning rate" in titles
    table = app.dataframe[0].value
    assert "test-random" in list(table["model"]) and "tumours missed" in table.columns
    assert "benchmark accuracy" in table.columns and "settings" in table.columns
    assert app.multiselect[0].value  # runs preselected for the side-by-side curves
    assert "Accuracy" in figure_titles(app)[3:]


@pytest.mark.skipif(not (DATA / "samples" / "sample_glioma_volume.nii.gz").is_file(),
                    reason="shared NIfTI sample not present")
def test_nifti_upload_gets_a_slice_slider(app):
    data = (DATA / "samples" / "sample_glioma_volume.nii.gz").read_bytes()
    app.switch_page("app_pages/diagnose.py").run()
    app.file_uploader[0].set_value(("vol.nii.gz", data, "application/gzip")).run()
    assert not app.exception
    slider = next(s for s in app.slider if s.key.startswith("s-"))
    assert slider.min == 0 and slider.value == (slider.max + 1) // 2  # the middle slice
    assert len(predictions(app)) == 1
    slider.set_value(0).run()
    assert not app.exception
    next(t for t in app.toggle if t.key.startswith("best-")).set_value(True).run()
    assert not app.exception and "highest tumour probability" in texts(app)
    assert len(predictions(app)) == 1


def test_shipped_model_predicts_when_present(monkeypatch):
    from core.app_support import is_model_dir
    monkeypatch.delenv("BT_WEIGHTS", raising=False)
    try:
        default = core.inference.default_weights()
    except OSError:
        pytest.skip("no weights/DEFAULT")
    if not is_model_dir(default):
        pytest.skip(f"{default} has no trained model yet")
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=120).run()
    at.switch_page("app_pages/diagnose.py").run()
    at.multiselect[0].select("pituitary.jpg").run()
    # the shipped model classifies all four assets/samples correctly
    assert not at.exception and predictions(at) == ["Prediction: **Pituitary tumour**"]


def test_pages_without_a_model_say_so_instead_of_failing(monkeypatch):
    import core.app_support
    monkeypatch.setattr(core.app_support, "model_choices", lambda: [])
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=90).run()
    assert not at.exception
    assert "No trained model found" in "\n".join(e.value for e in at.sidebar.error)
    for page, words in [("app_pages/diagnose.py", "No model is loaded, so nothing can be predicted"),
                        ("app_pages/evaluation.py", "No model is loaded. See the sidebar."),
                        ("app_pages/model_card.py", "No model is loaded. See the sidebar.")]:
        at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert any(words in e.value for e in at.error), (page, [e.value for e in at.error])


def test_a_volume_too_long_to_score_whole_says_so_under_the_call_and_offers_no_best_slice(app):
    """A reader stopped at 'No tumour' on slice 150 of 300; the note that the other slices were not
    read came after the charts and both maps, and the 'most tumour-like' toggle did nothing."""
    import nibabel as nib
    import numpy as np
    from core.reader import MAX_SLICES
    vol = np.zeros((48, 48, MAX_SLICES + 4), np.uint8)
    vol[6:42, 8:40] = 140
    app.switch_page("app_pages/diagnose.py").run()
    app.file_uploader[0].set_value(("long.nii", nib.Nifti1Image(vol, np.eye(4)).to_bytes(),
                                    "application/octet-stream")).run()
    assert not app.exception
    assert next(t for t in app.toggle if t.key.startswith("best-")).disabled
    notes = [w.value for w in app.warning if "only the slice shown was read" in w.value]
    assert len(notes) == 1 and notes[0].startswith(f"**Slice {(MAX_SLICES + 4) // 2} only**")
    # right under the call (or the refusal), before the probability chart
    kinds = [("note" if "only the slice shown" in str(getattr(e, "value", "")) else getattr(e, "type", ""))
             for e in app.main]
    assert "plotly_chart" in kinds and kinds.index("note") < kinds.index("plotly_chart"), kinds


def test_diagnose_speaks_to_a_screen_reader_and_keeps_plotly_toolbars_out_of_the_tab_order(app):
    """Every image has alt text (the saliency map's says where it peaks), the probability bars'
    figures are also text, and plotly's zoom/pan buttons (seven Tab stops a chart) are gone
    (an accessibility review, session 51)."""
    import json as _json
    app.switch_page("app_pages/diagnose.py").run()
    app.multiselect[0].select("glioma.jpg").run()
    assert not app.exception
    alts = [i.alt for im in app.image for i in im.proto.imgs]
    assert alts and all(alts), alts
    assert any("saliency map" in a and "strongest" in a for a in alts)
    assert any(c.value.startswith("Calibrated probabilities: ") and "%" in c.value for c in app.caption)
    # the test model's card measured no map against masks: the page says so beside the map
    assert any("never tested against tumour masks" in c.value for c in app.caption)
    assert all(_json.loads(p.proto.config) == {"displayModeBar": False} for p in app.get("plotly_chart"))
    app.switch_page("app_pages/evaluation.py").run()
    charts = app.get("plotly_chart")
    assert charts and all("zoom" in _json.loads(p.proto.config)["modeBarButtonsToRemove"] for p in charts)
