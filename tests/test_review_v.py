"""Findings of session 42, each test failing on the code before its fix."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from test_bad_inputs import assert_plain_sentence
from test_data import pattern, save

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- copies the hashes miss
def _model_with_split(tmp_path: Path) -> Path:
    """A model folder over a 5-image dataset: p0, p1 trained; p2, shifted (a re-framed copy of p0
    no hash links) and mirror.png (a mirrored copy of p0) tested; p3 validated."""
    root = tmp_path / "ds"
    for k in range(4):
        save(root / "glioma" / f"p{k}.jpg", pattern(700 + k))
    save(root / "glioma" / "mirror.png", np.ascontiguousarray(pattern(700)[:, ::-1]))
    save(root / "glioma" / "shifted.png", np.roll(pattern(700), 17, axis=1))
    w = tmp_path / "w"
    w.mkdir()
    (w / "card.json").write_text(json.dumps({"sources": [{"name": "ds", "path": str(root)}]}))
    split = {"train": ["glioma/p0.jpg", "glioma/p1.jpg"], "val": ["glioma/p3.jpg"],
             "test": ["glioma/mirror.png", "glioma/p2.jpg", "glioma/shifted.png"]}
    (w / "split.json").write_text(json.dumps({"method": "test", "files": {"ds": split}}))
    recs = [{"file": f, "source": "ds", "label": "glioma"} for f in split["test"]]
    (w / "eval.json").write_text(json.dumps({"predictions": recs}))
    return w


def test_mark_copies_adds_the_copies_a_list_names(tmp_path):
    """`mark-copies --copy-list`: the aligned audit's copies (bench/copy_audit.py --out) are marked
    beside the hash check's, counted apart, and the list is named with its digest. Before, the
    shipped eval.json could only carry the hash check's 28 of the 229 copies the audit found."""
    from core.cli import main
    w = _model_with_split(tmp_path)
    tsv = tmp_path / "aligned.tsv"
    tsv.write_text("test_source\ttest_file\ttrain_source\ttrain_file\thp256\n"
                   "ds\tglioma/shifted.png\tds\tglioma/p0.jpg\t0.91\n")
    assert main(["mark-copies", "--weights", str(w), "--copy-list", str(tsv)]) == 0
    ev = json.loads((w / "eval.json").read_text())
    assert {r["file"]: r["copy_in_training"] for r in ev["predictions"]} == {
        "glioma/mirror.png": True, "glioma/p2.jpg": False, "glioma/shifted.png": True}
    assert ev["copies_in_training"]["per_source"] == {"ds": {"copy_in_training": 2, "n": 3, "from_lists": 1}}
    (listed,) = ev["copies_in_training"]["lists"]
    assert listed["file"] == "aligned.tsv" and listed["n"] == 1 and len(listed["sha256"]) == 64


@pytest.mark.parametrize("row", ["ds\tglioma/shifted.png\tds\tglioma/p3.jpg",     # its copy was validated on
                                 "ds\tglioma/p0.jpg\tds\tglioma/p1.jpg",           # a training image
                                 "other\tglioma/shifted.png\tds\tglioma/p0.jpg"])  # another source
def test_a_copy_list_made_for_another_split_marks_nothing(tmp_path, row, capsys):
    """A list whose pairs are not (test or val image, training image) of this model's split was made
    for another split: a clear error, and eval.json is left as it was."""
    from core.cli import main
    w = _model_with_split(tmp_path)
    before = (w / "eval.json").read_text()
    tsv = tmp_path / "other.tsv"
    tsv.write_text(f"test_source\ttest_file\ttrain_source\ttrain_file\n{row}\n")
    assert main(["mark-copies", "--weights", str(w), "--copy-list", str(tsv)]) != 0
    err = capsys.readouterr().err
    assert "another split" in err and "Traceback" not in err
    assert (w / "eval.json").read_text() == before


def test_a_file_that_is_not_a_copy_list_is_refused(tmp_path, capsys):
    from core.cli import main
    w = _model_with_split(tmp_path)
    tsv = tmp_path / "notes.txt"
    tsv.write_text("some notes, not a table\n")
    assert main(["mark-copies", "--weights", str(w), "--copy-list", str(tsv)]) != 0
    assert "not a copy list" in capsys.readouterr().err


def test_shipped_default_marks_every_copy_its_list_names():
    """The shipped default's eval.json carries its copy_pairs_test.tsv (the same list, by digest),
    and every test image the list names is marked."""
    from core.evaluation import read_copy_list
    d = ROOT / "weights" / (ROOT / "weights" / "DEFAULT").read_text().strip()
    ev = json.loads((d / "eval.json").read_text())
    lists = ev["copies_in_training"].get("lists") or []
    assert [x["file"] for x in lists] == ["copy_pairs_test.tsv"]
    named = read_copy_list(d / "copy_pairs_test.tsv", json.loads((d / "split.json").read_text())["files"])
    marked = {(r["source"], r["file"]) for r in ev["predictions"] if r.get("copy_in_training")}
    assert named and named <= marked


def _models_with_copy_lists() -> list[str]:
    """The shipped models whose eval.json marks came from copy lists (the others record none)."""
    return sorted(p.parent.name for p in (ROOT / "weights").glob("*/eval.json")
                  if (json.loads(p.read_text()).get("copies_in_training") or {}).get("lists"))


def test_the_default_and_its_parents_record_their_copy_lists():
    assert {"resnet18_192_gpu_ema120_s2", "resnet18_176_copyaware_ft"} <= set(_models_with_copy_lists())


@pytest.mark.parametrize("model", _models_with_copy_lists())
def test_every_shipped_eval_names_lists_that_are_there(model):
    """A shipped eval.json whose marks came from a copy list names it where it is, with its digest:
    `mark-copies` run again reads it (the two 176 px models named a file their folders lack)."""
    from core.evaluation import recorded_copy_lists
    ev = json.loads((ROOT / "weights" / model / "eval.json").read_text())
    recorded = ev["copies_in_training"]["lists"]
    assert len(recorded_copy_lists(ev, log=lambda *_: None)) == len(recorded) > 0
    for entry in recorded:
        assert not Path(entry["path"]).is_absolute()   # a path of this machine would not travel


# ----------------------------------------------------------------- train.py --drop-copies
def _train(args, cache_dir, expect=0):
    import os
    import subprocess
    import sys
    env = {**os.environ, "BT_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "train.py", *map(str, args), "--no-progress"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == expect, f"train.py exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def test_drop_copies_leaves_listed_training_copies_out_and_a_resume_keeps_them_out(tmp_path):
    """A split whose test images have copies in training (the default's: 241 of 1,638) can be
    reused by a new run without them: the training member of each listed pair is left out, the
    test and validation files stay as they were (paired comparisons still hold), split.json and the
    card say so, and a resume keeps them out whether or not it names the list again."""
    from conftest import make_blob_dataset
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_blob_dataset(data)
    common = ["--data", data, "--arch", "simple_cnn", "--img", 32, "--batch-size", 8, "--workers", 1, "--seed", 0]
    _train([*common, "--epochs", 1, "--out", tmp_path / "parent"], cache)
    files = json.loads((tmp_path / "parent" / "split.json").read_text())["files"]["data"]
    train, test, val = sorted(files["train"]), sorted(files["test"]), sorted(files["val"])
    lst = tmp_path / "pairs.tsv"
    lst.write_text("test_source\ttest_file\ttrain_source\ttrain_file\n"
                   f"data\t{test[0]}\tdata\t{train[0]}\n"
                   f"data\t{val[0]}\tdata\t{train[1]}\n"
                   f"data\t{train[2]}\tdata\t{test[1]}\n"      # either way round
                   f"data\t{train[3]}\tdata\t{train[4]}\n"     # both in training: no leak
                   f"data\tglioma/gone.png\tdata\t{train[5]}\n")   # not in the data: nothing
    child = tmp_path / "child"
    log = _train([*common, "--epochs", 1, "--out", child, "--split-from", tmp_path / "parent",
                  "--drop-copies", lst], cache)
    assert "3 training images are copies of validation or test images" in log
    assert "not in the recorded split" not in log
    rec = json.loads((child / "split.json").read_text())
    out = {rel for _, rel in rec["dropped_copies"]}
    assert out == {train[0], train[1], train[2]}
    assert sorted(rec["files"]["data"]["train"]) == sorted(set(train) - out)
    assert sorted(rec["files"]["data"]["test"]) == test and sorted(rec["files"]["data"]["val"]) == val
    card = json.loads((child / "card.json").read_text())
    dc = card["split"]["dropped_copies"]
    assert dc["n"] == 3 and dc["lists"][0]["file"] == "pairs.tsv" and len(dc["lists"][0]["sha256"]) == 64
    assert card["split"]["sizes"]["train"] == len(train) - 3
    # what the app flags as 'seen in training': the files it trained on, not the ones left out
    from core.evaluation import seen_digests
    from core.inference import file_sha256
    seen = seen_digests(child)
    assert file_sha256(data / train[5])[:16] in seen and file_sha256(data / val[1])[:16] in seen
    assert file_sha256(data / train[0])[:16] not in seen and file_sha256(data / test[0])[:16] not in seen

    # resumed without the list, moved away since: the run's own split keeps them out (the list is
    # not read again), and says nothing of them as files "not in the recorded split"
    lst.rename(tmp_path / "moved.tsv")
    log = _train([*common, "--epochs", 2, "--out", child, "--resume"], cache)
    assert "resumed after epoch" in log and "not in the recorded split" not in log
    rec2 = json.loads((child / "split.json").read_text())
    assert rec2["dropped_copies"] == rec["dropped_copies"] and rec2["files"] == rec["files"]
    assert json.loads((child / "card.json").read_text())["split"]["dropped_copies"]["n"] == 3

    # another list on a resume would change the training set mid-run
    other = tmp_path / "other.tsv"
    other.write_text(f"test_source\ttest_file\ttrain_source\ttrain_file\ndata\t{test[2]}\tdata\t{train[6]}\n")
    log = _train([*common, "--epochs", 3, "--out", child, "--resume", "--drop-copies", other], cache, expect=2)
    assert "--drop-copies (other lists" in log


@pytest.mark.parametrize("option, content, why", [
    ("--drop-copies", "not a table\n", "not a copy list"),
    ("--drop-copies", None, "no such file"),
    ("--join-copies", "source\tfile\tcopy_source\tcopy_file\nds\ta.png\tds\tb.png\n", "not a known-copies list"),
    ("--join-copies", None, "no such file"),
])
def test_a_copy_list_that_cannot_be_used_is_refused_before_reading_images(tmp_path, option, content, why):
    """--drop-copies reads test/train pairs, --join-copies a known-copies list: the other kind of
    table, or no file at all, is one sentence (exit 2) before any image is read."""
    f = tmp_path / "list.tsv"
    if content is not None:
        f.write_text(content)
    log = _train(["--data", tmp_path / "nowhere_yet", option, f], tmp_path / "cache", expect=2)
    assert f"error: {option}" in log and why in log.lower() and "Traceback" not in log   # not the usage line's


def test_finish_from_needs_the_lists_the_run_was_trained_with(tmp_path):
    """A GPU run trained with --drop-copies and finished here without them was carded as if it had
    trained on the copies (the split check only compares the files the run kept): refused now, by
    the copies each side leaves out (a run of an older train.py records no digest of its lists);
    finished with the lists, or on the run's own split, the card says what was left out."""
    from conftest import make_blob_dataset
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_blob_dataset(data)
    common = ["--data", data, "--arch", "simple_cnn", "--img", 32, "--batch-size", 8, "--workers", 1,
              "--seed", 0, "--epochs", 1]
    parent = tmp_path / "parent"
    _train([*common, "--out", parent], cache)
    files = json.loads((parent / "split.json").read_text())["files"]["data"]
    lst = tmp_path / "pairs.tsv"
    lst.write_text(f"test_source\ttest_file\ttrain_source\ttrain_file\n"
                   f"data\t{sorted(files['test'])[0]}\tdata\t{sorted(files['train'])[0]}\n")
    there = tmp_path / "there"
    _train([*common, "--out", there, "--split-from", parent, "--drop-copies", lst], cache)
    log = _train([*common, "--out", tmp_path / "bare", "--finish-from", there, "--split-from", parent], cache,
                 expect=2)
    assert "it left 1 training copies out" in log and "this run leaves 0 out" in log and "Traceback" not in log
    for k, extra in enumerate((["--split-from", parent, "--drop-copies", lst], ["--split-from", there])):
        _train([*common, "--out", tmp_path / f"here{k}", "--finish-from", there, *extra], cache)
        card = json.loads((tmp_path / f"here{k}" / "card.json").read_text())
        assert card["split"]["dropped_copies"]["n"] == 1
        assert card["split"]["sizes"]["train"] == len(files["train"]) - 1
    # trained without a list, finished with one: refused too
    _train([*common, "--out", tmp_path / "plain", "--split-from", parent], cache)
    log = _train([*common, "--out", tmp_path / "late", "--finish-from", tmp_path / "plain", "--split-from", parent,
                  "--drop-copies", lst], cache, expect=2)
    assert "it left 0 training copies out" in log


# ----------------------------------------------------------------- the header names what cannot be read
SAMPLES = ROOT.parent / "shared" / "data" / "samples"
needs_samples = pytest.mark.skipif(not (SAMPLES / "sample_no_pixels.dcm").exists(), reason="needs ../shared/data/samples")


def _dicom_bytes(name: str, **change) -> bytes:
    import io
    import pydicom
    ds = pydicom.dcmread(SAMPLES / name)
    for k, v in change.items():
        setattr(ds, k, v(getattr(ds, k)) if callable(v) else v)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


@needs_samples
@pytest.mark.parametrize("change,said", [({"Modality": "CT"}, "a CT image (Modality CT)"),
                                         ({"BodyPartExamined": "CHEST"}, "is CHEST, not the head"),
                                         ({}, None)])
def test_a_file_without_pixels_is_named_by_its_header(change, said):
    """The header was judged only after the pixels decoded: a CT with no pixel data read 'contains no
    image' with no word that it is a CT, which the model would refuse whole."""
    from core.reader import ScanError, read_scan
    with pytest.raises(ScanError) as e:
        read_scan(_dicom_bytes("sample_no_pixels.dcm", **change), name="x.dcm")
    msg = str(e.value)
    assert_plain_sentence(msg)   # the error contract: one sentence
    assert msg.startswith("The DICOM file contains no image (it has no pixel data)")
    assert (said in msg and "the DICOM header says" in msg) if said else "header" not in msg


@needs_samples
def test_a_ct_whose_pixels_are_cut_is_named_a_ct_in_a_slice_and_a_volume_read():
    from core.reader import ScanError, read_scan, read_volume_scans
    data = _dicom_bytes("sample_glioma.dcm", Modality="CT", PixelData=lambda b: b[: len(b) // 2])
    for read in (lambda: read_scan(data, name="x.dcm"), lambda: read_volume_scans(data, name="x.dcm")):
        with pytest.raises(ScanError) as e:
            read()
        assert "damaged or incomplete" in str(e.value) and "a CT image (Modality CT)" in str(e.value)
        assert_plain_sentence(str(e.value))


def test_drop_copies_refuses_a_list_for_other_data(tmp_path):
    """A list whose source names are not --data's dropped nothing and said nothing."""
    from conftest import make_blob_dataset
    data = tmp_path / "data"
    make_blob_dataset(data)
    lst = tmp_path / "pairs.tsv"
    lst.write_text("test_source\ttest_file\ttrain_source\ttrain_file\n"
                   "benchmark\tglioma/glioma_0.png\tbenchmark\tglioma/glioma_1.png\n")
    log = _train(["--data", data, "--arch", "simple_cnn", "--img", 32, "--epochs", 1, "--workers", 1,
                  "--out", tmp_path / "run", "--drop-copies", lst], tmp_path / "cache", expect=2)
    assert "none of its 1 pairs names an image of --data" in log and "Traceback" not in log
    assert not (tmp_path / "run" / "card.json").exists()


def test_drop_copies_on_the_command_line_replaces_a_configs(tmp_path, monkeypatch):
    """drop_copies = "a.tsv" in a config with --drop-copies b.tsv crashed (str.append)."""
    import train
    (tmp_path / "data" / "glioma").mkdir(parents=True)
    head = "test_source\ttest_file\ttrain_source\ttrain_file\n"
    for name in ("a.tsv", "b.tsv"):
        (tmp_path / name).write_text(head + f"data\tglioma/{name}.png\tdata\tglioma/x.png\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = "{tmp_path / "data"}"\ndrop_copies = "{tmp_path / "a.tsv"}"\n')
    monkeypatch.chdir(tmp_path)
    assert train.parse_args(["--config", str(cfg)]).drop_copies == [str(tmp_path / "a.tsv")]
    args = train.parse_args(["--config", str(cfg), "--drop-copies", str(tmp_path / "b.tsv")])
    assert args.drop_copies == [str(tmp_path / "b.tsv")] and len(args.drop_copies_sha256) == 1


def test_mark_copies_again_keeps_the_lists_marks_and_a_held_out_source_marks_nothing(tmp_path):
    """Run again without --copy-list, mark-copies dropped every mark the lists had made (201 of the
    default's 229); a list whose copy is in a held-out source (weight 0) marked it though that
    training split trains nothing."""
    import shutil
    from core.cli import main
    w = _model_with_split(tmp_path)
    tsv = tmp_path / "lists" / "aligned.tsv"
    tsv.parent.mkdir()
    tsv.write_text("test_source\ttest_file\ttrain_source\ttrain_file\n"
                   "ds\tglioma/shifted.png\tds\tglioma/p0.jpg\n")
    assert main(["mark-copies", "--weights", str(w), "--copy-list", str(tsv)]) == 0
    assert main(["mark-copies", "--weights", str(w)]) == 0
    ev = json.loads((w / "eval.json").read_text())
    assert {r["file"] for r in ev["predictions"] if r["copy_in_training"]} == {"glioma/mirror.png", "glioma/shifted.png"}
    shutil.move(tsv, tmp_path / "elsewhere.tsv")
    before = (w / "eval.json").read_text()
    assert main(["mark-copies", "--weights", str(w)]) != 0   # the list is gone: say so, change nothing
    assert (w / "eval.json").read_text() == before
    card = json.loads((w / "card.json").read_text())
    card["sources"][0]["weight"] = 0
    (w / "card.json").write_text(json.dumps(card))
    assert main(["mark-copies", "--weights", str(w), "--copy-list", str(tmp_path / "elsewhere.tsv")]) == 0
    ev = json.loads((w / "eval.json").read_text())
    assert not any(r["copy_in_training"] for r in ev["predictions"])


@pytest.mark.parametrize("text,why", [("", "header line"), ("ds\tglioma/a.png\tds\tglioma/b.png\n", "header line"),
                                      ("test_source\ttest_file\ttrain_source\ttrain_file\nds\ta\n", "fewer than 4"),
                                      (b"\xff\xfe\x00", "not UTF-8")])
def test_read_copy_pairs_names_what_is_wrong(tmp_path, text, why):
    from core.data import read_copy_pairs
    f = tmp_path / "l.tsv"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=why) as e:
        read_copy_pairs(f)
    assert str(f) in str(e.value)


def test_read_copy_pairs_strips_cells_and_line_ends(tmp_path):
    from core.data import read_copy_pairs
    f = tmp_path / "l.tsv"
    f.write_bytes(b"\xef\xbb\xbftest_source\ttest_file\ttrain_source\ttrain_file\r\nds \ta.png\tds\tb.png \r\n")
    assert read_copy_pairs(f) == [(("ds", "a.png"), ("ds", "b.png"))]


# ----------------------------------------------------------------- a scan the model trained on
def _seen_model(tmp_path, random_weights, files) -> Path:
    import hashlib
    import shutil
    w = tmp_path / "seen_model"
    shutil.copytree(random_weights, w)
    (w / "seen_sha256.txt").write_text("# test\n" + "".join(
        hashlib.sha256(Path(f).read_bytes()).hexdigest()[:16] + "\n" for f in files))
    return w


def test_a_file_the_model_trained_on_is_flagged_in_predict_and_the_report(tmp_path, random_weights):
    """A clinician trying the public set's own images read the model's memory as its skill, with no
    word: the file itself, by content, is now flagged 'seen in training' (CLI line, JSON, flags)."""
    from core.inference import Predictor, iter_predictions
    from core.report import FLAG_SEEN, analyse_one, flags_of, text_line
    samples = ROOT / "assets" / "samples"
    pred = Predictor(_seen_model(tmp_path, random_weights, [samples / "glioma.jpg"]))
    rows = list(iter_predictions(pred, [("g.jpg", str(samples / "glioma.jpg")),
                                        ("n.jpg", (samples / "notumor.jpg").read_bytes())]))
    assert rows[0].get("seen_in_training") is True and "seen_in_training" not in rows[1]
    assert FLAG_SEEN in flags_of(rows[0]) and FLAG_SEEN not in flags_of(rows[1])
    assert "[" in text_line(rows[0]) and FLAG_SEEN in text_line(rows[0])
    assert analyse_one("g.jpg", str(samples / "glioma.jpg"), pred).seen
    assert not analyse_one("n.jpg", str(samples / "notumor.jpg"), pred).seen
    # without the list (an older model folder) nothing is flagged
    assert "seen_in_training" not in next(iter_predictions(Predictor(random_weights), [("g.jpg", str(samples / "glioma.jpg"))]))


def test_the_diagnose_page_says_when_a_scan_was_trained_on(tmp_path, random_weights, monkeypatch):
    from streamlit.testing.v1 import AppTest
    samples = ROOT / "assets" / "samples"
    monkeypatch.setenv("BT_WEIGHTS", str(_seen_model(tmp_path, random_weights, [samples / "glioma.jpg"])))
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=120).run()
    at.switch_page("app_pages/diagnose.py").run()
    at.file_uploader[0].set_value([("mine.jpg", (samples / "glioma.jpg").read_bytes(), "image/jpeg"),
                                   ("other.jpg", (samples / "notumor.jpg").read_bytes(), "image/jpeg")]).run()
    assert not at.exception, [e.value for e in at.exception]
    assert sum("Seen in training" in i.value for i in at.info) == 1
    table = at.dataframe[0].value
    flags = dict(zip(table["file"], table["flags"]))
    assert "seen in training" in flags["mine.jpg"] and "seen in training" not in flags["other.jpg"]


def test_seen_files_lists_training_and_validation_files_and_copies_not_plain_test_files(tmp_path):
    from core.cli import main
    from core.evaluation import seen_digests
    from core.inference import file_sha256
    w = _model_with_split(tmp_path)
    ev = json.loads((w / "eval.json").read_text())
    ev["predictions"][0]["copy_in_training"] = True   # mirror.png
    (w / "eval.json").write_text(json.dumps(ev))
    assert main(["seen-files", "--weights", str(w)]) == 0
    seen = seen_digests(w)
    digest = lambda rel: file_sha256(tmp_path / "ds" / rel)[:16]  # noqa: E731
    assert {digest("glioma/p0.jpg"), digest("glioma/p1.jpg"), digest("glioma/p3.jpg"),
            digest("glioma/mirror.png")} == seen


def test_recorded_copy_lists_are_found_as_older_or_other_machines_wrote_them(tmp_path):
    """eval.json of the first version named a list by file only; a Windows run wrote backslashes;
    a damaged entry was a traceback."""
    from core.evaluation import recorded_copy_lists
    from core.inference import file_sha256
    w = tmp_path / "w"
    w.mkdir()
    tsv = w / "copy_pairs_test.tsv"
    tsv.write_text("test_source\ttest_file\ttrain_source\ttrain_file\n")
    sha = file_sha256(tsv)
    quiet = lambda *_: None  # noqa: E731
    assert recorded_copy_lists({"copies_in_training": {"lists": [{"file": tsv.name, "sha256": sha}]}},
                               quiet, w) == [str(tsv)]
    shipped = ROOT / "weights" / "resnet18_192_gpu_ema120_s2" / "copy_pairs_test.tsv"
    windows = {"file": shipped.name, "path": "weights\\resnet18_192_gpu_ema120_s2\\copy_pairs_test.tsv",
               "sha256": file_sha256(shipped)}
    assert recorded_copy_lists({"copies_in_training": {"lists": [windows]}}, quiet) == [
        "weights/resnet18_192_gpu_ema120_s2/copy_pairs_test.tsv"]
    with pytest.raises(ValueError, match="not what mark-copies writes"):
        recorded_copy_lists({"copies_in_training": {"lists": ["copy_pairs_test.tsv"]}}, quiet)


def test_a_list_inside_the_repository_is_recorded_relative_to_it():
    from core.data import repo_relative
    shipped = ROOT / "weights" / "resnet18_192_gpu_ema120_s2" / "copy_pairs_test.tsv"
    assert repo_relative(str(shipped)) == "weights/resnet18_192_gpu_ema120_s2/copy_pairs_test.tsv"
    assert repo_relative("/tmp/x.tsv") == str(Path("/tmp/x.tsv").resolve())


def test_a_resume_from_a_config_whose_lists_moved_goes_on(tmp_path):
    """--config X --resume read the config's lists again: moved since the run began, the resume
    stopped, though the run's split.json holds its copies."""
    from conftest import make_blob_dataset
    data, cache = tmp_path / "data", tmp_path / "cache"
    make_blob_dataset(data)
    common = ["--data", data, "--arch", "simple_cnn", "--img", 32, "--batch-size", 8, "--workers", 1, "--seed", 0]
    _train([*common, "--epochs", 1, "--out", tmp_path / "parent"], cache)
    files = json.loads((tmp_path / "parent" / "split.json").read_text())["files"]["data"]
    lst = tmp_path / "lists" / "pairs.tsv"
    lst.parent.mkdir()
    lst.write_text("test_source\ttest_file\ttrain_source\ttrain_file\n"
                   f"data\t{sorted(files['test'])[0]}\tdata\t{sorted(files['train'])[0]}\n")
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'drop_copies = ["{lst}"]\nsplit_from = "{tmp_path / "parent"}"\n')
    run = tmp_path / "run"
    _train(["--config", cfg, *common, "--epochs", 1, "--out", run], cache)
    lst.rename(tmp_path / "moved.tsv")
    log = _train(["--config", cfg, *common, "--epochs", 2, "--out", run, "--resume"], cache)
    assert "resumed after epoch" in log
    rec = json.loads((run / "split.json").read_text())
    assert [rel for _, rel in rec["dropped_copies"]] == [sorted(files["train"])[0]]
    # a list typed on the command line that is not there is still an error, not a silent fallback
    log = _train(["--config", cfg, *common, "--epochs", 3, "--out", run, "--resume", "--drop-copies",
                  tmp_path / "typo.tsv"], cache, expect=2)
    assert "--drop-copies" in log and "cannot be read" in log


def test_a_zip_of_renamed_training_files_is_marked_by_content(tmp_path, random_weights):
    """The Evaluation page's zip marked the model's own images by file name only: renamed, they
    scored as new patients'."""
    import io
    import zipfile
    from core import app_support
    from core.inference import Predictor
    samples = ROOT / "assets" / "samples"
    pred = Predictor(_seen_model(tmp_path, random_weights, [samples / "glioma.jpg"]))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("glioma/renamed.jpg", (samples / "glioma.jpg").read_bytes())
        z.writestr("notumor/other.jpg", (samples / "notumor.jpg").read_bytes())
    held = app_support.evaluate_zip(pred, "mine.zip", buf.getvalue())
    marks = {r["file"]: bool(r.get("copy_in_training")) for r in held["ev"]["predictions"]}
    assert marks == {"glioma/renamed.jpg": True, "notumor/other.jpg": False}


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "brain-tumor-mri").is_dir(), reason="needs ../shared")
def test_the_shipped_defaults_seen_list_holds_its_training_files_and_not_its_clean_test_files():
    from core.evaluation import seen_digests
    from core.inference import file_sha256
    d = ROOT / "weights" / (ROOT / "weights" / "DEFAULT").read_text().strip()
    seen = seen_digests(d)
    root = ROOT.parent / "shared" / "data" / "brain-tumor-mri" / "Training"
    files = json.loads((d / "split.json").read_text())["files"]["benchmark"]
    ev = json.loads((d / "eval.json").read_text())["predictions"]
    clean = [r["file"] for r in ev if r["source"] == "benchmark" and not r.get("copy_in_training")]
    copied = [r["file"] for r in ev if r["source"] == "benchmark" and r.get("copy_in_training")]
    assert all(file_sha256(root / f)[:16] in seen for f in files["train"][::97] + files["val"][::29] + copied[::9])
    assert not any(file_sha256(root / f)[:16] in seen for f in clean[::7])


def test_seen_in_training_rides_beside_the_out_of_distribution_flag_and_is_no_review_flag():
    """A refused training file lost its 'seen' flag in the text line, table, CSV and PDF (the JSON
    kept it); the PDF summary counted a training file as 'flagged for review'."""
    from core.report import FLAG_OOD, FLAG_SEEN, flags_of
    assert flags_of({"ok": True, "in_distribution": False, "seen_in_training": True}) == [FLAG_OOD, FLAG_SEEN]
    assert flags_of({"ok": True, "in_distribution": True, "seen_in_training": True, "probs": {}}) == [FLAG_SEEN]


def test_the_pdf_summary_does_not_count_a_seen_file_for_review(tmp_path, random_weights):
    from test_report import flat, pdf_pages
    from core.inference import Predictor
    from core.report import ReportContext, analyse_one, render_pdf
    samples = ROOT / "assets" / "samples"
    pred = Predictor(_seen_model(tmp_path, random_weights, [samples / "glioma.jpg"]))
    results = [analyse_one(n, str(samples / n), pred) for n in ("glioma.jpg", "notumor.jpg")]
    assert results[0].seen and not results[1].seen and "seen in training" in results[0].flags
    flagged_other = sum(bool(set(r.flags) - {"seen in training"}) for r in results)
    summary = flat(pdf_pages(render_pdf(results, ReportContext.of(pred, None, None)), tmp_path)[0])
    assert f"{flagged_other} flagged for review" in summary and "seen in training" in summary


def test_mark_copies_rewrites_the_seen_list_and_a_new_seen_file_is_loaded(tmp_path):
    from core.app_support import weights_stamp
    from core.cli import main
    from core.evaluation import SEEN_FILE, seen_digests
    from core.inference import file_sha256
    w = _model_with_split(tmp_path)
    before = weights_stamp(w)
    tsv = tmp_path / "aligned.tsv"
    tsv.write_text("test_source\ttest_file\ttrain_source\ttrain_file\nds\tglioma/shifted.png\tds\tglioma/p0.jpg\n")
    assert main(["mark-copies", "--weights", str(w), "--copy-list", str(tsv)]) == 0
    assert file_sha256(tmp_path / "ds" / "glioma" / "shifted.png")[:16] in seen_digests(w)
    assert (w / SEEN_FILE).is_file() and weights_stamp(w) != before   # the app reloads the model


def test_a_list_under_shared_is_recorded_as_written():
    from core.data import repo_relative
    shared = ROOT.parent / "shared" / "data" / "README.md"
    if not shared.exists():
        pytest.skip("needs ../shared")
    assert repo_relative("../shared/data/README.md") == "../shared/data/README.md"


def _seen_glioma_and_a_folder(tmp_path, random_weights, prefix: str):
    """(a model that trained on the built-in glioma sample, a class folder holding both samples
    renamed ``prefix``<class>.jpg)."""
    import shutil
    from core.inference import Predictor
    samples = ROOT / "assets" / "samples"
    pred = Predictor(_seen_model(tmp_path, random_weights, [samples / "glioma.jpg"]))
    d = tmp_path / "eval"
    for c in ("glioma", "notumor"):
        (d / c).mkdir(parents=True)
        shutil.copy(samples / f"{c}.jpg", d / c / f"{prefix}{c}.jpg")
    return pred, d


def test_evaluate_notes_renamed_training_files_by_content(tmp_path, random_weights):
    """`evaluate` noticed the model's own images by file name only: renamed, they scored as new."""
    from core.evaluation import evaluate_dir
    pred, d = _seen_glioma_and_a_folder(tmp_path, random_weights, "renamed_")
    ev = evaluate_dir(pred, d)
    assert "1 of these 2 images are, byte for byte, files this model trained" in ev["evaluated"]
    # counted over the images scored: an unreadable file beside them is an error row, not one of "these"
    (d / "glioma" / "truncated.jpg").write_bytes((d / "glioma" / "renamed_glioma.jpg").read_bytes()[:300])
    ev = evaluate_dir(pred, d)
    assert ev["n"] == 2 and "1 of these 2 images are, byte for byte" in ev["evaluated"], ev["evaluated"]


def test_evaluate_goes_on_past_a_file_it_cannot_hash(tmp_path, random_weights, monkeypatch):
    """Hashing every evaluated file for the 'seen' note ran before the per-file error handling: a
    file gone since discovery ended the evaluation, and a pipe named .jpg hung it."""
    import os
    import core.evaluation as EV
    from core.evaluation import evaluate_dir
    pred, d = _seen_glioma_and_a_folder(tmp_path, random_weights, "a_")
    os.mkfifo(d / "notumor" / "pipe.jpg")
    real = EV.evaluation_set

    def vanishing(*a, **k):   # a file removed between discovery and scoring
        out = real(*a, **k)
        (d / "glioma" / "a_glioma.jpg").unlink(missing_ok=True)
        return out
    monkeypatch.setattr(EV, "evaluation_set", vanishing)
    ev = evaluate_dir(pred, d)
    assert {e["file"] for e in ev["errors"]} >= {"glioma/a_glioma.jpg", "notumor/pipe.jpg"}
