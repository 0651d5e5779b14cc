"""Fixes from the session-39 reviews: the Diagnose page's volumes (a refused slice hiding a tumour
on the next, stacks found by content, the slice shown by default, another model's 'most
tumour-like' slice, the batch warnings one rerun late)."""
from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

import core.inference
from conftest import REPO
from test_reader import dicom12, lps_volume, make_dicom, phantom

from core import app_support as app
from core.inference import Predictor, hot_slices, predict_many, volume_check


@pytest.fixture(scope="module")
def predictor(random_weights):
    return Predictor(random_weights)


def volume(n: int = 5, brightest_last: bool = True) -> bytes:
    return lps_volume([np.roll(phantom(), 9 * k, 1) * ((0.4 + 0.15 * k) if brightest_last else (1 - 0.15 * k))
                       for k in range(n)])


def tiff_stack(n: int = 3) -> bytes:
    pages = [Image.fromarray((np.roll(phantom(), 10 * k, 0) * 255).astype(np.uint8)) for k in range(n)]
    buf = io.BytesIO()
    pages[0].save(buf, "TIFF", save_all=True, append_images=pages[1:])
    return buf.getvalue()


def refuse(monkeypatch, only_slice: int | None = None, **extra) -> None:
    """Every scan refused by the out-of-distribution check, or only slice ``only_slice`` of a volume."""
    real = Predictor.predict_scan
    def predict(self, scan):
        out = real(self, scan)
        if only_slice is None or scan.info.get("slice_index") == only_slice:
            out = replace(out, in_distribution=False, ood_reason=None)
        return replace(out, **extra)
    monkeypatch.setattr(Predictor, "predict_scan", predict)


# ------------------------------------------------------------- a refused slice reaches nothing
def test_a_refused_slice_does_not_hide_the_other_slices():
    scores = {0: 0.1, 1: 0.9, 2: 0.95}
    assert hot_slices(scores, 0.5, 1) == []   # the slice shown is called a tumour: nothing hidden
    assert hot_slices(scores, 0.5, 1, shown_in_distribution=False) == [2]   # it gets no call
    assert hot_slices(scores, 0.5, 0, shown_in_distribution=False) == [1, 2]


def test_predict_names_the_hot_slices_of_a_volume_whose_shown_slice_is_refused(predictor, monkeypatch):
    data = volume()
    refuse(monkeypatch, only_slice=2, threshold=0.0)   # every slice reaches a threshold of 0
    row, = predict_many(predictor, [("v.nii.gz", data)])
    assert not row["in_distribution"] and row["hot_slices"] == [0, 1, 3, 4]   # the middle one is shown
    info = predictor.predict_file(data, "v.nii.gz").info
    assert volume_check(predictor, data, "v.nii.gz", info, 0.0, in_distribution=False).hot == [0, 1, 3, 4]
    alert = app.volume_alert(predictor, data, "v.nii.gz", 0.0, 2, shown_in_distribution=False)
    assert alert and "out of distribution" in alert


def test_a_volume_refused_throughout_sends_no_one_to_its_other_slices(predictor, monkeypatch):
    data = volume(6)   # not the volume above: the app caches its check per file and model
    refuse(monkeypatch, threshold=0.0)   # no brain MRI: the check refuses every slice
    row, = predict_many(predictor, [("v.nii.gz", data)])
    assert not row["in_distribution"] and "hot_slices" not in row
    assert app.volume_alert(predictor, data, "v.nii.gz", 0.0, 3, shown_in_distribution=False) is None


# ------------------------------------------------------------------ stacks found by content
def test_a_stack_without_its_suffix_is_a_volume_at_the_readers_slice():
    data = tiff_stack()
    assert app.volume_slices(data, "stack") == (3, 0)   # read_scan shows a stack's first page
    frames = np.stack([dicom12(np.roll(phantom(), 9 * k, 1)) for k in range(4)])
    raw = make_dicom(frames, preamble=False)
    assert app.volume_slices(raw, "IM0001") == (4, 2)   # a DICOM's middle frame, suffix or not
    assert app.volume_slices(volume(), "v.nii.gz") == (5, 2)
    assert app.volume_slices(b"not an image", "x") == (1, 0)


# ------------------------------------------------------------------------------- the page
@pytest.fixture
def page(random_weights, monkeypatch) -> AppTest:
    monkeypatch.setenv("BT_WEIGHTS", str(random_weights))
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=90).run()
    return at.switch_page("app_pages/diagnose.py").run()


def warnings(at: AppTest) -> str:
    return "\n".join(w.value for w in at.warning)


def set_threshold(at: AppTest, value: float) -> AppTest:
    next(s for s in at.sidebar.slider if s.key.startswith("_threshold_widget")).set_value(value)
    return at.run()


def test_the_page_warns_of_hot_slices_behind_a_refused_one(page, monkeypatch):
    refuse(monkeypatch, only_slice=2)
    page.file_uploader[0].set_value([("v.nii.gz", volume(), "application/gzip")]).run()
    set_threshold(page, 0.0)
    assert not page.exception, [e.value for e in page.exception]
    assert "Other slices of this volume reach the operating point: 0, 1, 3, 4" in warnings(page)


def test_a_stack_without_a_suffix_gets_its_slider_at_the_clis_slice(page):
    page.file_uploader[0].set_value([("stack", tiff_stack(), "application/octet-stream")]).run()
    assert not page.exception, [e.value for e in page.exception]
    slider, = [s for s in page.slider if s.key.startswith("s-")]
    assert slider.max == 2 and slider.value == 0   # as `python -m core predict` reads it


def batch(data: bytes | None = None, n_images: int = 6) -> list[tuple[str, bytes, str]]:
    png = io.BytesIO()
    Image.fromarray((phantom() * 255).astype(np.uint8)).save(png, "PNG")
    return [("v.nii.gz", data or volume(), "application/gzip")] + [(f"{k}.png", png.getvalue(), "image/png")
                                                            for k in range(n_images)]


def details_of(at: AppTest):
    return next(b for b in at.selectbox if b.label == "Show the details of")


BINARY = REPO / "weights" / "simple_cnn_binary"


@pytest.mark.skipif(not app.is_model_dir(BINARY), reason="shipped weights/simple_cnn_binary not present")
def test_another_models_most_tumour_like_slice_is_chosen_again(page, random_weights):
    data = volume(brightest_last=False)
    ours = app.best_slice(Predictor(random_weights), data, "v.nii.gz")[0]
    theirs = app.best_slice(Predictor(BINARY), data, "v.nii.gz")[0]
    assert ours != theirs   # else the test tells nothing
    page.file_uploader[0].set_value(batch(data)).run()   # 7 files: a table and one file's details
    next(t for t in page.toggle if t.label == "Most tumour-like slice").set_value(True).run()
    details_of(page).select(1).run()   # another file's details: the volume is in the table only
    page.selectbox(key="_model_widget").select(next(str(d) for d in app.model_choices() if d.name == BINARY.name))
    page.run()
    assert not page.exception, [e.value for e in page.exception]
    row = page.dataframe[0].value.iloc[0]
    assert row["slice"].startswith(f"slice {theirs} of 5") and "most tumour-like" in row["slice"], row["slice"]


def test_the_batch_warnings_follow_the_slice_just_shown(page, random_weights):
    scores = core.inference.slice_scores(Predictor(random_weights), volume(), "v.nii.gz")[2]
    lo, hi = min(scores, key=scores.get), max(scores, key=scores.get)
    page.file_uploader[0].set_value(batch()).run()
    assert details_of(page).value == 0   # the volume's details
    set_threshold(page, round((scores[lo] + scores[hi]) / 2, 4))
    slider, = [s for s in page.slider if s.key.startswith("s-")]
    slider.set_value(lo).run()
    stale = "reach the operating point; the slice in the table does not"
    assert stale in warnings(page)   # slice hi is hot, slice lo is not
    slider, = [s for s in page.slider if s.key.startswith("s-")]
    slider.set_value(hi).run()   # in one run: the warning must follow at once
    assert not page.exception, [e.value for e in page.exception]
    assert stale not in warnings(page)


# --------------------------------------------------------------------- the served gate
from test_ood import _noise, synthetic_gate  # noqa: E402,F401  (a fixture: a gate fitted in seconds)


def gated(gate, folder):
    from conftest import make_weights
    d = make_weights(folder, arch="simple_cnn", size=64)
    gate.save(d)
    return d


def retouch(d, tensors=None, **changes) -> None:
    """Change a saved gate's config, in its file and in its card alike (as a hand edit would)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    path = d / "ood.safetensors"
    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    cfg.update(changes)
    save_file({**load_file(str(path)), **(tensors or {})}, str(path), metadata={"config": json.dumps(cfg)})
    if (d / "card.json").is_file():
        card = json.loads((d / "card.json").read_text())
        card["ood"] = cfg
        (d / "card.json").write_text(json.dumps(card))


@pytest.mark.parametrize("changes, why", [
    ({"threshold": float("nan")}, "ood block must be an object with the gate's threshold"),   # the card's NaN
    ({"colour_limit": 0.0}, "colour limit is not a positive number"),
    ({"components": [{"name": "cnn", "center": 0.0, "scale": 0.0}]}, "centre or scale of cnn"),
    ({"components": [{"name": "cnnx", "center": 0.0, "scale": 1.0}]}, "parts no code scores"),
    ({"net_width": None}, "gate network and its list of parts disagree"),
    ({"components": [{"name": "cnn", "center": 0.0, "scale": 1.0}, {"name": "head", "center": 0.0, "scale": 1.0}]},
     "feature scorer does not match"),
])
def test_a_gate_with_unusable_numbers_or_parts_is_refused_in_one_sentence(synthetic_gate, tmp_path, changes, why):
    d = gated(synthetic_gate, tmp_path / "m")
    retouch(d, **changes)
    with pytest.raises(ValueError, match=why):
        Predictor(d)
    if changes.get("threshold") is not None:   # the gate file alone: its own check
        card = json.loads((d / "card.json").read_text())
        (d / "card.json").write_text(json.dumps({**card, "ood": {**card["ood"], "threshold": 0.5}}))
        with pytest.raises(ValueError, match="threshold is not a finite number"):
            Predictor(d)
    from core.cli import main
    assert main(["predict", str(REPO / "assets" / "samples" / "glioma.jpg"), "--weights", str(d), "--json"]) == 2


def test_a_nan_threshold_in_the_card_never_matches_the_gate(synthetic_gate):
    card = {"ood": {**synthetic_gate.config(), "threshold": float("nan")}}
    assert "not the one its card lists" in synthetic_gate.mismatch(card, "abc", None)


def test_a_feature_head_that_does_not_fit_together_is_refused(synthetic_gate, tmp_path):
    import torch
    from core.ood import FeatureHead, GateError, OODGate
    rng = np.random.default_rng(0)
    head = FeatureHead(np.zeros(8), np.ones(8), rng.normal(size=(4, 8)), np.zeros(4), rng.normal(size=(1, 4)), np.zeros(1))
    g = OODGate("cnn+head+colour", synthetic_gate.components + [replace(synthetic_gate.components[0], name="head")],
                synthetic_gate.threshold, synthetic_gate.colour_limit, synthetic_gate.net, head)
    assert g.config_problem() is None
    g.save(tmp_path)
    OODGate.load(tmp_path)
    retouch(tmp_path, tensors={"density.w1": torch.zeros(4, 9)})
    with pytest.raises(GateError, match="layers do not fit together"):
        OODGate.load(tmp_path)


def test_a_card_ood_block_of_the_wrong_type_is_one_sentence(synthetic_gate, tmp_path):
    d = gated(synthetic_gate, tmp_path / "m")
    card = json.loads((d / "card.json").read_text())
    for bad in ([1], "x", {"threshold": "0.5"}):
        (d / "card.json").write_text(json.dumps({**card, "ood": bad}))
        assert "ood block must be an object" in app.model_dir_problem(d)
        with pytest.raises(ValueError, match="ood block must be an object"):
            Predictor(d)


def test_a_gate_file_its_card_does_not_describe_is_refused(synthetic_gate, tmp_path):
    d = gated(synthetic_gate, tmp_path / "m")
    card = json.loads((d / "card.json").read_text())
    del card["ood"]
    (d / "card.json").write_text(json.dumps(card))
    assert "its card does not describe" in app.model_dir_problem(d)   # was served with no gate, unsaid
    with pytest.raises(ValueError, match="its card does not describe"):
        Predictor(d)


def test_a_colour_only_gate_says_the_pixels_were_not_checked(synthetic_gate, tmp_path):
    from core.ood import OODGate
    from core.report import FLAG_NOT_CHECKED, flags_of
    colour_only = gated(OODGate("colour", [], 0.0, synthetic_gate.colour_limit), tmp_path / "c")
    real = gated(synthetic_gate, tmp_path / "g")
    p = Predictor(colour_only)
    pr = p.predict_scan(_noise(3))
    assert pr.in_distribution and pr.ood_score is None   # was -1.0: 'checked' and passed
    assert FLAG_NOT_CHECKED in flags_of({"ok": True, **pr.to_json()})
    assert not app.has_ood_gate(p) and not app.has_gate_file(colour_only) and app.has_gate_file(real)
    warning = app.no_gate_warning(p, [colour_only, real])
    assert warning and warning.endswith(f"Prefer {app.load_card(real)['name']}, which has one.")
    assert app.no_gate_warning(Predictor(real), [colour_only, real]) is None


# ------------------------------------------------------------------- datasets and splits
def test_a_tcga_patient_is_found_in_hyphenated_lower_case_and_folder_names():
    from core.data import patient_id
    for path in ("lgg/glioma/TCGA_CS_4941_011.jpg", "x/TCGA-CS-4941-011.jpg", "x/tcga_cs_4941_011.png",
                 "glioma/TCGA_CS_4941/011.jpg", "glioma/TCGA_CS_4941_19960909/011.jpg"):
        assert patient_id(path) == "TCGA_CS_4941", path
    assert patient_id("glioma/Tr-gl_0011.jpg") is None and patient_id("glioma/TCGA_CS.jpg") is None
    for not_a_patient in ("glioma/tcga_batch_1/a.png", "x/TCGA-GBM-T1-0001.png", "TCGA_LGG_glioma/img1.png"):
        assert patient_id(not_a_patient) is None, not_a_patient


def test_the_seed_decides_which_groups_test_the_largest_included():
    from core.data import Sample, split_by_group
    def samples():
        out = [Sample(f"/b{k}.png", f"glioma/b{k}.png", "glioma", "glioma", group="big") for k in range(50)]
        out += [Sample(f"/g{k}.png", f"glioma/g{k}.png", "glioma", "glioma", group=f"g{k}") for k in range(20)]
        return out + [Sample(f"/n{k}.png", f"notumor/n{k}.png", "notumor", "notumor", group=f"n{k}")
                      for k in range(30)]
    where = []
    for seed in range(8):
        s = samples()
        split_by_group(s, seed=seed)
        where.append(s[0].split)
        assert len({x.split for x in s if x.group == "big"}) == 1   # a group stays whole
    assert "test" not in set(where) or len(set(where)) > 1, where   # was 'test' for every seed


def test_a_reused_split_says_what_it_names_that_is_not_here(tmp_path):
    import core.data as D
    samples = [D.Sample("/a", "glioma/a.png", "glioma", "glioma", "bench"),
               D.Sample("/b", "glioma/b.png", "glioma", "glioma", "bench")]
    record = {"bench": {"train": ["glioma/a.png", "glioma/gone.png"], "test": ["glioma/b.png"]},
              "old_name": {"train": ["notumor/c.png"]}}
    notes = D.apply_split_record(samples, record)
    assert [s.split for s in samples] == ["train", "test"]
    assert any("source(s) old_name, which no --data source is called" in n for n in notes)
    assert any("1 file(s) the recorded split names are not in source bench (first: glioma/gone.png)" in n
               for n in notes)


def png(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).resize((64, 64)).save(path)


def test_split_folders_of_other_names_are_splits_or_refused(tmp_path):
    import core.data as D
    assert D.split_of("train_images") == "train" and D.split_of("Test Images") == "test"
    assert D.split_of("Training_Set_Images") == "train" and D.split_of("Test Images of glioma") is None
    for k, rel in enumerate(("train_images/glioma/a.png", "train_images/notumor/b.png",
                             "test_images/glioma/c.png", "test_images/notumor/d.png")):
        png(tmp_path / "E" / rel, k)
    scan = D.discover(tmp_path / "E")
    assert {s.label for s in scan.samples} == {"glioma", "notumor"}   # was 'train_images', 'test_images'
    assert D.nested_classes_note(scan) is None
    for k, rel in enumerate(("site_a/glioma/a.png", "site_a/notumor/b.png", "site_b/glioma/c.png",
                             "site_b/notumor/d.png")):
        png(tmp_path / "F" / rel, k)
    note = D.nested_classes_note(D.discover(tmp_path / "F"))
    assert note and "every class folder (site_a, site_b) holds folders named like classes" in note
    kaggle = tmp_path / "G"
    for k, rel in enumerate(("Training/glioma/a.png", "Training/notumor/b.png", "Testing/glioma/c.png")):
        png(kaggle / rel, k)
    assert D.nested_classes_note(D.discover(kaggle)) is None   # Training/<class>/ is the right layout


def test_train_refuses_collections_as_classes(tmp_path):
    import subprocess
    import sys
    for k, rel in enumerate(("site_a/glioma/a.png", "site_a/notumor/b.png", "site_b/glioma/c.png",
                             "site_b/notumor/d.png")):
        png(tmp_path / "F" / rel, k)
    r = subprocess.run([sys.executable, str(REPO / "train.py"), "--data", str(tmp_path / "F"), "--arch", "simple_cnn",
                        "--out", str(tmp_path / "out"), "--epochs", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "holds folders named like classes" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("folder, label", [("No Brain Tumor", "notumor"), ("Brain_Healthy", "notumor"),
                                           ("Negative", "notumor"), ("Positive", "tumor"),
                                           ("without tumour", "notumor"), ("Brain Tumor", "tumor")])
def test_common_yes_no_folder_names_map_to_the_vocabulary(folder, label):
    from core.labels import normalise_label
    assert normalise_label(folder) == label


def test_a_recorded_split_is_labelled_by_class_folder_in_any_layout(tmp_path):
    import core.data as D
    from core.ood import split_files
    root = tmp_path / "K"
    for k, rel in enumerate(("archive/Training/glioma/a.png", "archive/Training/notumor/b.png",
                             "archive/Testing/glioma/c.png", "archive/Testing/notumor/d.png")):
        png(root / rel, k)
    record = {"k": {"train": ["archive/Training/glioma/a.png", "archive/Training/notumor/b.png"],
                    "test": ["archive/Testing/glioma/c.png", "archive/Testing/notumor/d.png"]}}
    samples = D.samples_from_record(record, {"k": root})
    assert [s.label for s in samples] == ["glioma", "notumor", "glioma", "notumor"]   # was 'archive' x 4
    (tmp_path / "split.json").write_text(json.dumps({"files": record}))
    groups = split_files(tmp_path / "split.json", {"k": root})["k"]["test"][1]
    assert groups == ["k/glioma", "k/notumor"]


def test_the_audit_counts_patients_and_does_not_call_a_patients_slices_a_labelling_error(tmp_path, capsys,
                                                                                         private_cache):
    import core.data as D
    from core.cli import main
    for k, rel in enumerate(("glioma/TCGA_CS_4941_011.png", "notumor/TCGA_CS_4941_012.png",
                             "glioma/TCGA_DU_5872_003.png", "notumor/TCGA_DU_5872_004.png")):
        png(tmp_path / "L" / rel, k)
    samples = D.discover(tmp_path / "L").samples
    D.assign_groups(samples)
    assert len({s.group for s in samples}) == 2 and D.mixed_label_groups(samples) == []
    assert main(["audit", str(tmp_path / "L")]) == 0
    out = capsys.readouterr().out
    assert "the slices of each of 2 TCGA patients are one group" in out and "labels disagree" not in out


def test_a_linked_class_folder_pointing_at_its_sibling_is_read_once(tmp_path):
    import os
    import core.data as D
    for k in range(3):
        png(tmp_path / "M" / "glioma" / f"{k}.png", k)
    png(tmp_path / "M" / "notumor" / "n.png", 9)
    os.symlink(tmp_path / "M" / "glioma", tmp_path / "M" / "gliomalink")
    elsewhere = tmp_path / "elsewhere" / "meningioma"
    png(elsewhere / "m.png", 10)
    os.symlink(elsewhere, tmp_path / "M" / "meningioma")   # a class kept elsewhere is read
    scan = D.discover(tmp_path / "M")
    assert sorted(s.rel for s in scan.samples) == ["glioma/0.png", "glioma/1.png", "glioma/2.png",
                                                   "meningioma/m.png", "notumor/n.png"]
    assert ("gliomalink/", "a link to the folder glioma/: read once, there") in scan.skipped


def test_a_gate_whose_weights_give_nan_flags_with_no_nan_in_the_json(synthetic_gate, tmp_path):
    import torch
    d = gated(synthetic_gate, tmp_path / "m")
    from safetensors.torch import load_file
    t = load_file(str(d / "ood.safetensors"))
    head = next(k for k in t if k.startswith("net.head") and k.endswith("weight"))
    retouch(d, tensors={head: torch.full_like(t[head], float("nan"))})
    row, = predict_many(Predictor(d), [("g.jpg", str(REPO / "assets" / "samples" / "glioma.jpg"))])
    assert row["ok"] and not row["in_distribution"] and row["ood_score"] is None and row["ood_reason"]
    json.dumps(row, allow_nan=False)   # NaN was printed, which no JSON reader takes


def test_the_split_does_not_depend_on_the_order_of_the_sources(tmp_path, private_cache):
    import core.data as D
    for src in ("a", "b", "c"):
        for c in ("glioma", "notumor"):
            for k in range(12):
                png(tmp_path / src / c / f"{k}.png", 100 * "abc".index(src) + 50 * (c == "notumor") + k)
    def split(order):
        samples = [s for src in order for s in D.discover(tmp_path / src, src).samples]
        D.assign_groups(samples)
        D.split_by_group(samples, seed=1)
        return {(s.source, s.rel): (s.split, s.group) for s in samples}
    assert split("abc") == split("cba") == split("bca")


# -------------------------------------------------------------- the browser review's findings
def low_point_call(threshold: float = 0.05):
    from core.inference import Prediction
    probs = {"glioma": 0.01, "meningioma": 0.005, "pituitary": 0.102, "notumor": 0.883}
    return Prediction(pred="pituitary", probs=probs, tumour_probability=0.117, threshold=threshold,
                      confidence=0.102, uncertain=False, in_distribution=True, ood_score=-1.0)


def test_a_call_that_is_not_the_top_class_says_why():
    from core.referral import call_note
    classes = ["glioma", "meningioma", "pituitary", "notumor"]
    note = call_note(low_point_call(), classes)
    assert note.startswith("Called a tumour: the tumour probability 0.117") and "operating point 0.050" in note
    assert "pituitary tumour is the likeliest tumour type" in note
    high = replace(low_point_call(0.5), pred="notumor", probs={"glioma": 0.6, "meningioma": 0.0, "pituitary": 0.0,
                                                                 "notumor": 0.4}, tumour_probability=0.6, threshold=0.7)
    assert "below the operating point 0.700, though 'glioma' is the likeliest single class" in call_note(high, classes)
    assert call_note(high, classes).startswith("Called no tumour:")
    binary = replace(low_point_call(), pred="tumor", probs={"tumor": 0.117, "notumor": 0.883})
    note = call_note(binary, ["tumor", "notumor"])   # 'tumor' is no tumour type, and one class is no sum
    assert note == ("Called a tumour: the tumour probability 0.117 reaches the operating point 0.050, though "
                    "'no tumour' is the likeliest single class.")
    top = replace(low_point_call(), pred="notumor", tumour_probability=0.117, threshold=0.5)
    assert call_note(top, classes) is None and call_note(replace(low_point_call(), in_distribution=False), classes) is None


def test_the_batch_table_says_why_a_scan_has_no_call():
    from core.dashboard import batch_table
    rows = [{"file": "cat.jpg", "ok": True, "pred": "glioma", "probs": {"glioma": 1.0}, "in_distribution": False,
             "tumour_probability": 1.0, "confidence": 1.0},
            {"file": "broken.jpg", "ok": False, "error": "The image file is damaged and cannot be read."}]
    table = batch_table(rows)
    assert list(table["prediction"]) == ["no call: not like its training scans", "no call: unreadable"]
    assert list(table.columns[:4]) == ["file", "prediction", "tumour probability", "flags"]   # the reason beside the call
    vol = {**rows[0], "in_distribution": True, "info": {"slice_index": 2, "n_slices": 5}}
    table = batch_table([vol, rows[1]])
    assert list(table.columns[:5]) == ["file", "prediction", "tumour probability", "flags", "slice"] and table["slice"][1] == ""


def test_home_shows_the_evaluation_pages_default_figures(tmp_path):
    from conftest import make_weights
    from core.evaluation import without_copies
    w = make_weights(tmp_path / "w")   # its own: the session's random model stays as made
    ev = json.loads((w / "eval.json").read_text())
    ev["predictions"][0]["copy_in_training"] = True
    (w / "eval.json").write_text(json.dumps(ev))
    figures, note = app.home_figures(Predictor(w))
    kept, copies = without_copies(ev["predictions"])
    assert figures["Test scans"] == f"{len(kept):,}" and copies == 1 and "1 more have one" in note
    assert {"Sensitivity", "Specificity", "Tumours missed"} <= set(figures)


def test_uploads_are_still_there_after_a_visit_to_another_page(page):
    glioma = (REPO / "assets" / "samples" / "glioma.jpg").read_bytes()
    page.file_uploader[0].set_value([("a.jpg", glioma, "image/jpeg")]).run()
    assert [m.value for m in page.markdown if m.value.lstrip("#").startswith(" Prediction:")]
    page.switch_page("app_pages/model_card.py").run()
    page.switch_page("app_pages/diagnose.py").run()
    assert not page.exception, [e.value for e in page.exception]
    assert [m.value for m in page.markdown if m.value.lstrip("#").startswith(" Prediction:")]   # was an empty page
    assert any("uploaded before you left this page" in c.value for c in page.caption)
    other = (REPO / "assets" / "samples" / "notumor.jpg").read_bytes()
    page.file_uploader[0].set_value([("b.jpg", other, "image/jpeg")]).run()   # one more after coming back
    assert len([m for m in page.markdown if m.value.lstrip("#").startswith(" Prediction:")]) == 2   # a.jpg was dropped
    assert any("1 file(s) below were uploaded before you left this page, the others since" in c.value
               for c in page.caption)
    page.file_uploader[0].set_value([]).run()
    next(b for b in page.button if b.label == "Clear them").click().run()
    assert not [m.value for m in page.markdown if m.value.lstrip("#").startswith(" Prediction:")]
    page.file_uploader[0].set_value([("a.jpg", glioma, "image/jpeg")]).run()
    page.file_uploader[0].set_value([]).run()   # emptied by the user: nothing comes back
    assert not [m.value for m in page.markdown if m.value.lstrip("#").startswith(" Prediction:")]


def test_the_model_card_reads_in_words():
    from core import dashboard as dash
    card = json.loads((REPO / "weights" / "resnet18_192_gpu_ema120_s2" / "card.json").read_text())
    text = dash.referral_text(card)
    assert text.startswith("Uncertain, refer: when the tumour probability lies between 0.041 and 0.972")
    assert "Tumour type uncertain: when the likeliest type holds less than 96%" in text
    assert dash.preprocessing_text(card["preprocessing"]).startswith("Read as grey")
    assert "resized to 192 x 192 px" in dash.preprocessing_text(card["preprocessing"])
    at = AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=90)
    at.run()
    at.switch_page("app_pages/model_card.py").run()
    assert not at.exception, [e.value for e in at.exception]
    shown = "\n".join(m.value for m in at.markdown)
    assert "**Referral**: Uncertain, refer" in shown and "**Preprocessing**: Read as grey" in shown
    assert "mirrored or turned copies and one patient's slices go to one side" in dash.split_text(card["split"])
    old = json.loads((REPO / "weights" / "cnn_bn_aug" / "card.json").read_text())
    assert "(not mirrored or turned copies)" in dash.split_text(old["split"])   # an older split: many copies
    assert dash.referral_text(old).startswith("Uncertain, refer: when the probability of the class called is below")
    table = dash.metrics_readable(card)
    assert "None" not in table.to_string() and (table == "—").any().any()   # br35h has no accuracy


def test_the_reports_summary_does_not_count_a_refused_scan_as_called(predictor, monkeypatch, tmp_path):
    from test_report import flat, pdf_pages
    from core.report import build_report
    glioma = (REPO / "assets" / "samples" / "glioma.jpg").read_bytes()
    real = Predictor.predict_scan
    monkeypatch.setattr(Predictor, "predict_scan", lambda self, scan: replace(
        real(self, scan), in_distribution=scan.info.get("width") != 97, ood_reason=None))
    odd = io.BytesIO()
    Image.fromarray((phantom(97, 97) * 255).astype(np.uint8)).save(odd, "PNG")   # refused by its width
    pdf = build_report([("a.jpg", glioma), ("b.png", odd.getvalue()), ("c.jpg", b"broken")], predictor)
    summary = flat(pdf_pages(pdf, tmp_path)[0])
    assert "3 files: 1 called, 1 refused as out of distribution, 1 could not be read" in summary


def test_the_report_says_why_a_call_is_not_the_top_class(predictor, monkeypatch, tmp_path):
    from test_report import flat, pdf_pages
    from core.report import build_report
    monkeypatch.setattr(Predictor, "predict_scan", lambda self, scan: replace(low_point_call(), info=dict(scan.info)))
    pdf = build_report([("a.jpg", (REPO / "assets" / "samples" / "glioma.jpg").read_bytes())], predictor,
                       threshold=0.05)
    page = flat(pdf_pages(pdf, tmp_path)[0])
    assert "Called a tumour: the tumour probability 0.117" in page and "pituitary tumour is the likeliest tumour type" in page


def test_the_sidebar_says_when_the_operating_point_was_set_by_hand(page):
    assert not any("Set by hand" in w.value for w in page.sidebar.warning)
    set_threshold(page, 0.123)
    assert any("Set by hand to 0.123 for this model" in w.value for w in page.sidebar.warning)


def test_a_refused_slices_others_are_all_tried_before_none_is_named(predictor, monkeypatch):
    from core.inference import checked_hot_slices, slice_scores
    data = volume(12)
    scores = slice_scores(predictor, data, "v.nii.gz")[2]
    lowest = min(scores, key=scores.get)   # the only slice the check accepts: past the first 8 tried
    real = Predictor.predict_scan
    monkeypatch.setattr(Predictor, "predict_scan", lambda self, scan: replace(
        real(self, scan), in_distribution=scan.info.get("slice_index") == lowest))
    shown = next(k for k in scores if k != lowest)
    assert checked_hot_slices(predictor, data, "v.nii.gz", scores, 0.0, shown, False) == sorted(
        k for k in scores if k != shown)


# ------------------------------------------------------------- the volumes and zips review's findings
def test_a_zip_of_the_models_own_training_images_is_said_to_be_one(tmp_path):
    import zipfile
    from conftest import make_weights
    w = make_weights(tmp_path / "w")
    split = {"files": {"synth": {"train": ["glioma/seen.jpg"], "val": [], "test": []}}}
    (w / "split.json").write_text(json.dumps(split))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in ("seen.jpg", "new.jpg"):
            z.writestr(f"glioma/{name}", (REPO / "assets" / "samples" / "glioma.jpg").read_bytes())
    held = app.evaluate_zip(Predictor(w), "z.zip", buf.getvalue())
    marked = {r["file"]: bool(r.get("copy_in_training")) for r in held["ev"]["predictions"]}
    assert marked == {"glioma/seen.jpg": True, "glioma/new.jpg": False}


def test_many_skipped_files_are_one_line_by_reason():
    skipped = [{"file": f"x/{k}.jpg", "error": "Its folder names no class of this model."} for k in range(30)]
    skipped += [{"file": "notes.txt", "error": "Not an image."}]
    line = app.skipped_summary(skipped)
    assert line.startswith("31 files left out of these figures (listed below). 30 files: its folder names no class")
    assert "1 file: not an image" in line
    assert "bad.jpg" in app.skipped_summary([{"file": "bad.jpg", "error": "Damaged."}])
    # a fourth reason is counted, not hidden as '1 other reason(s)'
    four = app.skipped_summary([{"file": f"{k}.jpg", "error": f"Reason {k}."} for k in range(4)])
    assert four.endswith("; 1 more for other reasons.")


def test_a_class_without_scans_has_no_figures_rather_than_none():
    from core.dashboard import per_class_table
    table = per_class_table({"per_class": {"glioma": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "specificity": 1.0,
                                                      "support": 4},
                                           "pituitary": {"precision": None, "recall": None, "f1": None,
                                                         "specificity": 1.0, "support": 0}}})
    assert list(table.loc[1, ["precision", "recall", "f1"]]) == ["—", "—", "—"] and table.loc[0, "recall"] == "1.000"


def test_the_reports_header_line_stays_inside_the_margins(predictor, monkeypatch):
    import fpdf
    from core.report import build_report
    monkeypatch.setattr(predictor, "card", {**predictor.card, "name": "a-long-model-name-" * 4, "version": "2026-12-06"})
    widths, real_cell = [], fpdf.FPDF.cell
    def cell(self, w=None, h=None, text="", *a, **k):
        if "weights SHA-256" in str(text):   # the header's identity line, on every page
            widths.append((self.get_string_width(str(text)), self.epw))
        return real_cell(self, w, h, text, *a, **k)
    monkeypatch.setattr(fpdf.FPDF, "cell", cell)
    build_report([("a.jpg", (REPO / "assets" / "samples" / "glioma.jpg").read_bytes())], predictor)
    assert widths and all(w <= epw for w, epw in widths), widths


def test_a_series_files_row_names_its_series_and_instance():
    from core.dashboard import batch_table, series_table
    def dcm(name, instance, series, tp):
        return {"file": name, "ok": True, "pred": "glioma" if tp >= 0.5 else "notumor", "tumour_probability": tp,
                "confidence": 0.9, "probs": {}, "in_distribution": True, "sha256": name,
                "info": {"series": series, "instance": instance, "frame": 0, "n_frames": 1}}
    rows = [dcm("IM9.dcm", 12, "s1", 0.99), dcm("IM3.dcm", 11, "s1", 0.2), dcm("IM5.dcm", 4, "s2", 0.1),
            dcm("IM7.dcm", 5, "s2", 0.3), {"file": "a.png", "ok": True, "pred": "notumor", "tumour_probability": 0.1,
                                          "confidence": 0.9, "probs": {}, "in_distribution": True, "info": {}}]
    assert series_table(rows)["highest at"].tolist() == ["#12", "#5"]
    assert batch_table(rows)["slice"].tolist() == ["series 1, instance 12", "series 1, instance 11", "series 2, instance 4", "series 2, instance 5", ""]


def test_a_one_frame_file_has_no_frame_words():
    from core.report import slice_words
    assert slice_words({"frame": 0, "n_frames": 1}) == "" and slice_words({"frame": 1, "n_frames": 3}) == "frame 1 of 3"


LAYOUTS = {   # each tree, on disk and zipped: the page must choose what `evaluate` chooses
    "training + testing": ["archive/Training/glioma/a.png", "archive/Training/notumor/b.png",
                           "archive/Testing/glioma/c.png", "archive/Testing/notumor/d.png"],
    "testing beside class folders": ["Testing/glioma/a.png", "Testing/notumor/b.png", "glioma/c.png", "notumor/d.png"],
    "validation + training": ["Training/glioma/a.png", "Training/notumor/b.png", "Validation/glioma/c.png",
                              "Validation/notumor/d.png"],
    # split-like folders inside class folders are patients' or sessions', not splits: every scan is scored
    "split names inside classes": ["glioma/train/a.png", "glioma/test/b.png", "notumor/train/c.png", "notumor/test/d.png"],
    "a patient folder named test": ["glioma/test/a.png", "glioma/p1/b.png", "notumor/p2/c.png"],
    "no split": ["mine/glioma/a.png", "mine/notumor/b.png"],
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_labelled_zip_scores_the_files_evaluate_scores_in_the_same_tree(layout, tmp_path):
    """The page pooled Training/ and Testing/ (its headline figures counted the model's own training
    images) while `evaluate` scores Testing/ alone; its first fix then took 'glioma/test/' for a
    test split, which `evaluate` does not (two reviews)."""
    from core.data import discover
    from core.evaluation import evaluation_set
    from test_review_t import zipped
    from test_report import scan_png
    tree = {name: scan_png(k) for k, name in enumerate(LAYOUTS[layout])}
    for name, data in tree.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    scan = discover(tmp_path)
    on_disk = sorted(s.rel for s in evaluation_set(scan.samples, scan.inner)[0])
    items, skipped, _, note = app.labelled_zip(zipped(tree), ["glioma", "meningioma", "pituitary", "notumor"])
    assert sorted(n for n, _, _ in items) == on_disk and skipped == []
    left = len(tree) - len(on_disk)
    assert (note is None) == (left == 0)
    if left:
        assert note.startswith(f"Scored: the {'Validation' if 'validation' in layout else 'Testing'}/ folder's "
                               f"scans") and f"the {left} files outside it were left out" in note


def test_a_left_out_training_folder_lists_nothing_of_its_own():
    """Its unknown-class folder, loose files and hidden files were listed one by one, in a red box,
    though `evaluate` lists none of a training folder's leftovers (a review)."""
    from test_review_t import zipped
    from test_report import scan_png
    tree = {"Training/glioma/a.png": scan_png(1), "Training/astro/x.png": scan_png(2), "Training/loose.txt": b"x",
            "Training/glioma/.DS_Store": b"x", "Testing/glioma/c.png": scan_png(3), "Testing/notumor/d.png": scan_png(4),
            "top.png": scan_png(5)}
    _, skipped, _, note = app.labelled_zip(zipped(tree), ["glioma", "meningioma", "pituitary", "notumor"])
    assert skipped == [{"file": "top.png", "error": "The file is not inside a class folder."}]
    assert "the 3 files outside it" in note   # a, x and loose.txt; the .DS_Store is no file of the count


def test_an_empty_labelled_zip_is_one_sentence(random_weights):
    from core.inference import Predictor
    from test_review_t import zipped
    with pytest.raises(app.ScanError, match=r"^The zip archive holds no files\.$"):
        app.evaluate_zip(Predictor(random_weights), "empty.zip", zipped({}))


def test_a_labelled_zip_lists_its_hidden_and_system_files_as_evaluate_does():
    """.DS_Store, __MACOSX/ and Thumbs.db were dropped without a word from a zip, while `evaluate`
    lists them for a folder; a zip of nothing else said only 'No scan could be evaluated'."""
    from test_review_t import zipped
    from test_report import scan_png
    tree = {"glioma/a.jpg": scan_png(1), "notumor/b.jpg": scan_png(2), ".DS_Store": b"x", "glioma/.DS_Store": b"x",
            **{f"__MACOSX/glioma/._{k}.jpg": b"x" for k in range(300)}, "notumor/Thumbs.db": b"x",
            "notumor/broken.jpg": b"not an image", "astro/c.jpg": scan_png(3)}
    items, skipped, _, _ = app.labelled_zip(zipped(tree), ["glioma", "notumor"])
    # a metadata folder once, as `evaluate` says it ('__MACOSX/': 300 forks buried the real problems),
    # after them (a review)
    assert [(s["file"], s["error"]) for s in skipped] == [
        ("astro/c.jpg", "its folder ('astro') names no class of this model"), (".DS_Store", "hidden file"),
        ("glioma/.DS_Store", "hidden file"), ("__MACOSX", "archive or system metadata"),
        ("notumor/Thumbs.db", "archive or system metadata")]
    assert not app.only_junk(skipped) and app.only_junk(skipped[1:]) and not app.only_junk([])
