"""`python -m core audit|evaluate|predict` on generated data with a hand-built model.

The model is a simple_cnn whose last layer is zeroed and given a fixed bias, so that every image
gets the same known probabilities and the expected metrics can be written down.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.cli import main
from core.inference import file_sha256
from core.models import create_model
from core.preprocess import DEFAULT_SPEC

ROOT = Path(__file__).resolve().parents[1]
C4 = ["glioma", "meningioma", "pituitary", "notumor"]


pytestmark = pytest.mark.usefixtures("private_cache")  # conftest: a per-test hash cache


def pattern(seed, size=64):
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((6, 6)) * 200 + 40).astype(np.uint8))
    return coarse.resize((size, size), Image.BICUBIC)


def make_weights(path: Path, classes=C4, bias=(0.0, 0.0, 0.0, 2.0), threshold=0.5) -> Path:
    """A model that ignores its input: logits = bias."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = create_model("simple_cnn", len(classes))
    with torch.no_grad():
        model[10].weight.zero_()
        model[10].bias.copy_(torch.tensor(bias))
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")
    card = {"name": "unit-test", "arch": "simple_cnn", "classes": list(classes),
            "preprocessing": {**DEFAULT_SPEC, "size": 32},
            "calibration": {"temperature": 1.0}, "operating_point": {"threshold": threshold},
            "uncertainty": {"min_confidence": 0.0}}
    (path / "card.json").write_text(json.dumps(card))
    return path


def expected_probs(bias):
    e = np.exp(np.array(bias) - max(bias))
    return e / e.sum()


@pytest.fixture
def weights(tmp_path):
    return make_weights(tmp_path / "weights")


@pytest.fixture
def four_class_dir(tmp_path):
    root = tmp_path / "eval4"
    for ci, (c, n) in enumerate((("glioma_tumor", 3), ("meningioma", 2), ("pituitary", 1),
                                  ("no_tumor", 4))):
        (root / c).mkdir(parents=True)
        for k in range(n):
            pattern(10 * ci + k).save(root / c / f"{c[:2]}{k}.jpg")
    (root / "no_tumor" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "no_tumor" / "Thumbs.txt").write_text("x")
    return root


EVAL_KEYS = {"classes", "n", "accuracy", "macro_f1", "per_class", "confusion", "tumour_missed",
             "normal_flagged", "predictions"}


def test_evaluate_contract_four_class(weights, four_class_dir, tmp_path, capsys):
    out = tmp_path / "ev.json"
    assert main(["evaluate", str(four_class_dir), "--weights", str(weights), "--json", str(out)]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "broken.jpg" in captured.err and "Thumbs.txt" in captured.err
    ev = json.loads(out.read_text())
    assert EVAL_KEYS <= set(ev)
    assert ev["classes"] == C4 and ev["n"] == 10 and summary["n"] == 10
    # Every image is predicted 'notumor' with the same probabilities.
    assert ev["accuracy"] == pytest.approx(0.4) and summary["accuracy"] == pytest.approx(0.4)
    assert ev["confusion"] == [[0, 0, 0, 3], [0, 0, 0, 2], [0, 0, 0, 1], [0, 0, 0, 4]]
    assert ev["tumour_missed"] == 6 and ev["normal_flagged"] == 0
    for c, sup in zip(C4, (3, 2, 1, 4)):
        pc = ev["per_class"][c]
        assert set(pc) == {"precision", "recall", "f1", "specificity", "support"}
        assert pc["support"] == sup
    assert ev["per_class"]["notumor"]["recall"] == 1.0
    assert ev["per_class"]["notumor"]["precision"] == pytest.approx(0.4)
    assert ev["per_class"]["glioma"]["specificity"] == 1.0
    # macro F1 over the classes present: notumor F1 = 2 * 0.4 / 1.4, the three tumours 0.
    assert ev["macro_f1"] == pytest.approx((0.8 / 1.4) / 4)
    p = expected_probs((0, 0, 0, 2.0))
    files = set()
    for r in ev["predictions"]:
        assert {"file", "label", "pred", "probs"} <= set(r)
        assert not Path(r["file"]).is_absolute() and (four_class_dir / r["file"]).is_file()
        assert r["pred"] == "notumor"
        assert [r["probs"][c] for c in C4] == pytest.approx(p, abs=1e-5)
        files.add(r["file"])
    assert "glioma_tumor/gl0.jpg" in files and len(files) == 10
    assert {r["label"] for r in ev["predictions"]} == set(C4)
    assert {e["file"] for e in ev["errors"]} == {"no_tumor/broken.jpg", "no_tumor/Thumbs.txt"}
    # issue 11: calibration error, and the trust flags on every record
    assert 0 <= ev["ece"] <= 1
    for r in ev["predictions"]:
        assert {"in_distribution", "ood_score", "uncertain", "threshold"} <= set(r) and r["threshold"] == 0.5


def yes_no_dir(root, yes: int, no: int, seed: int):
    """A Br35H-like folder: ``yes`` and ``no`` images in yes/ and no/."""
    for ci, (c, n) in enumerate((("yes", yes), ("no", no))):
        (root / c).mkdir(parents=True)
        for k in range(n):
            pattern(seed + 10 * ci + k).save(root / c / f"{c}{k}.png")
    return root


def test_evaluate_yes_no_folder_as_tumour_vs_no_tumour(weights, tmp_path, capsys):
    root = yes_no_dir(tmp_path / "br35h", yes=5, no=3, seed=100)
    out = tmp_path / "ev.json"
    assert main(["evaluate", str(root), "--weights", str(weights), "--json", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert ev["n"] == 8
    assert {r["label"] for r in ev["predictions"]} == {"tumor", "notumor"}
    assert ev["n_tumour"] == 5 and ev["n_normal"] == 3
    assert ev["tumour_missed"] == 5 and ev["normal_flagged"] == 0
    assert ev["sensitivity"] == 0.0 and ev["specificity"] == 1.0
    # The headline figures are the tumour vs no-tumour ones, not the 'no' folder's alone.
    assert ev["scored_as"] == "tumour vs no tumour" and ev["model_classes"] == C4
    assert ev["classes"] == ["tumor", "notumor"] and ev["confusion"] == [[0, 5], [0, 3]]
    assert ev["accuracy"] == pytest.approx(3 / 8)
    assert {r["pred_type"] for r in ev["predictions"]} == {"notumor"}


def test_evaluate_fine_and_coarse_mix_keeps_the_types_it_knows(weights, tmp_path):
    # glioma/ beside yes/ no/ was folded to tumour vs no tumour, the glioma label overwritten: a
    # meningioma call on a glioma passed; types are now scored where known, as for several sources
    root = tmp_path / "mix"
    for ci, c in enumerate(("glioma", "yes", "no")):
        (root / c).mkdir(parents=True)
        pattern(200 + ci).save(root / c / "a.png")
    out = tmp_path / "ev.json"
    assert main(["evaluate", str(root), "--weights", str(weights), "--json", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert sorted(r["label"] for r in ev["predictions"]) == ["glioma", "notumor", "tumor"]
    assert ev["tumour_missed"] == 2 and ev["n_fine"] == 2 and "scored_as" not in ev
    typed = [r for r in ev["predictions"] if r["label"] != "tumor"]
    assert ev["accuracy"] == sum(r["pred"] == r["label"] for r in typed) / 2


def test_evaluate_several_directories_reports_each_as_a_source(weights, four_class_dir, tmp_path, capsys):
    # issue 10: `evaluate` reports every source apart. A typed set and a yes/no set together:
    # each is one source (its folder's name); the yes/no one counts in tumour figures only.
    yes_no = yes_no_dir(tmp_path / "br35h", yes=3, no=2, seed=300)
    out = tmp_path / "ev.json"
    assert main(["evaluate", str(four_class_dir), str(yes_no), "--weights", str(weights), "--json", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert ev["n"] == 10 + 5 and set(ev["per_source"]) == {"eval4", "br35h"}
    typed, coarse = ev["per_source"]["eval4"], ev["per_source"]["br35h"]
    assert typed["n"] == 10 and typed["accuracy"] == pytest.approx(4 / 10)   # the model says notumor
    assert coarse["n"] == 5 and coarse["tumour_missed"] == 3 and coarse["specificity"] == 1.0
    # no types: only the tumour probability's calibration, over this source's own records
    from core.metrics import expected_calibration_error
    recs = [r for r in ev["predictions"] if r["source"] == "br35h"]
    p_t = [sum(v for c, v in r["probs"].items() if c != "notumor") for r in recs]
    assert coarse["ece"] is None and coarse["tumour_ece"] == pytest.approx(
        expected_calibration_error(p_t, [r["label"] == "tumor" for r in recs]))
    assert {r["source"] for r in ev["predictions"] if r["file"].startswith("yes")} == {"br35h"}
    assert ev["tumour_missed"] == 6 + 3
    printed = capsys.readouterr()
    assert "per_source" in printed.out and "skipped eval4: " in printed.err   # the broken jpeg, by source
    # two folders of one name stay two sources
    from core.evaluation import source_names
    assert source_names(["/a/Training", "/b/Training", "/c/br35h"]) == ["Training-1", "Training-2", "br35h"]
    # a folder and its own subfolder would count scans twice: refused, a clear error, no traceback
    assert main(["evaluate", str(yes_no), str(yes_no / "yes"), "--weights", str(weights)]) == 2
    assert "overlap" in capsys.readouterr().err


def test_predict_json_lines_and_exit_codes(weights, four_class_dir, tmp_path, capsys):
    good = [four_class_dir / "glioma_tumor" / "gl0.jpg", four_class_dir / "no_tumor" / "no1.jpg"]
    assert main(["predict", "--json", "--weights", str(weights), *map(str, good)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["file"] for x in lines] == [str(g) for g in good]
    p = expected_probs((0, 0, 0, 2.0))
    card_name = json.loads((weights / "card.json").read_text())["name"]
    for x in lines:
        assert x["ok"] is True and x["pred"] == "notumor"
        assert {"file", "ok", "pred", "probs", "tumour_probability"} <= set(x)
        assert x["tumour_probability"] == pytest.approx(p[:3].sum(), abs=1e-5)
        # issue 11's fields on every line (a gateless model: in distribution, no score)
        assert {"in_distribution", "ood_score", "uncertain", "threshold"} <= set(x)
        assert x["in_distribution"] is True and x["ood_score"] is None
        assert isinstance(x["uncertain"], bool) and x["threshold"] == 0.5
        # the model behind the line, as the audit log names it: a line kept apart still says it
        assert x["model"] == card_name and x["weights_sha256"] == file_sha256(weights / "model.safetensors")
        assert {"model_version", "card_sha256", "gate_sha256"} <= set(x)

    bad = four_class_dir / "no_tumor" / "broken.jpg"
    missing = tmp_path / "nope.jpg"
    assert main(["predict", "--json", "--weights", str(weights), str(good[0]), str(bad),
                 str(missing)]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["ok"] for x in lines] == [True, False, False]
    for x in lines[1:]:
        assert set(x) == {"file", "ok", "error"} and x["error"]

    # Plain text output names the file and the prediction.
    assert main(["predict", "--weights", str(weights), str(good[0])]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{good[0]}: notumor") and f"model: {card_name} (weights SHA-256 " in err


def test_threshold_changes_the_prediction(tmp_path, four_class_dir, capsys):
    # tumour probability 3 / (3 + e^2) = 0.289: below 0.5 it is notumor, above 0.2 a tumour.
    w = make_weights(tmp_path / "w_low", threshold=0.2)
    f = four_class_dir / "pituitary" / "pi0.jpg"
    assert main(["predict", "--json", "--weights", str(w), str(f)]) == 0
    x = json.loads(capsys.readouterr().out)
    assert x["pred"] == "glioma"  # ties between tumour classes go to the first
    assert x["threshold"] == 0.2


def test_usage_errors_exit_2(weights, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", "--json", "--weights", str(weights)])  # no files
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2
    assert main(["evaluate", str(tmp_path / "missing"), "--weights", str(weights)]) == 2
    assert main(["predict", "--weights", str(tmp_path / "no_model"), __file__]) == 2
    (tmp_path / "empty" / "glioma").mkdir(parents=True)
    assert main(["evaluate", str(tmp_path / "empty"), "--weights", str(weights)]) == 2
    assert "error:" in capsys.readouterr().err


def test_audit_prints_counts_groups_and_cross_split(tmp_path, capsys):
    root = tmp_path / "ds"
    for ci, c in enumerate(("glioma_tumor", "meningioma", "pituitary", "no_tumor")):
        (root / c).mkdir(parents=True)
        for k in range(6):
            img = pattern(1000 + 10 * ci + k)
            img.save(root / c / f"{k}_a.jpg", quality=95)
            img.save(root / c / f"{k}_b.jpg", quality=40)   # a near duplicate of each
    (root / "glioma_tumor" / "broken.jpg").write_bytes(b"\x00" * 10)
    assert main(["audit", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"48 readable images in {root}" in out  # broken.jpg is reported, not counted
    assert "glioma" in out and "folders: glioma_tumor" in out and "folders: no_tumor" in out
    assert "skipped glioma_tumor/broken.jpg" in out
    assert ("near-duplicate groups (phash <= 6 bits, mirrored or half-turned copies, and copies known_copies.tsv "
            "list: 0 pairs among these files; no TCGA patient id found "
            "in the file or folder names): 24 groups, 24 with more than one image, 48 images") in out
    assert "group of 2: glioma_tumor/0_a.jpg, glioma_tumor/0_b.jpg" in out   # the groups, named
    assert "... and 4 more groups" in out
    assert "cross-split near duplicates, flipped and listed copies (grouped split, seed 0): 0" in out


def test_audit_shipped_split_reports_leaks(tmp_path, capsys):
    root = tmp_path / "kaggle"
    for part in ("Training", "Testing"):
        for c in ("glioma", "notumor"):
            (root / part / c).mkdir(parents=True)
    for k in range(3):
        pattern(k).save(root / "Training" / "glioma" / f"{k}.jpg")
        pattern(50 + k).save(root / "Training" / "notumor" / f"{k}.jpg")
    pattern(1).save(root / "Testing" / "glioma" / "copy.jpg", quality=50)   # leaked copy
    pattern(99).save(root / "Testing" / "notumor" / "x.jpg")
    assert main(["audit", str(root)]) == 0
    out = capsys.readouterr().out
    assert "cross-split near duplicates, flipped and listed copies (shipped split): 1" in out
    assert "Training/glioma/1.jpg" in out and "Testing/glioma/copy.jpg" in out


def test_python_dash_m_core_end_to_end(weights, four_class_dir, tmp_path):
    env = {**os.environ, "BT_CACHE": str(tmp_path / "cache")}
    good = four_class_dir / "meningioma" / "me0.jpg"
    bad = four_class_dir / "no_tumor" / "broken.jpg"
    r = subprocess.run([sys.executable, "-m", "core", "predict", "--json", "--weights", str(weights),
                        str(good), str(bad)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [(x["file"], x["ok"]) for x in lines] == [(str(good), True), (str(bad), False)]


def _folder(root: Path, names_counts, seed=300) -> Path:
    for ci, (c, n) in enumerate(names_counts):
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            pattern(seed + 10 * ci + k).save(root / c / f"{k}.png")
    return root


def test_evaluate_uses_testing_when_the_dataset_ships_one(weights, tmp_path):
    root = tmp_path / "kaggle"
    _folder(root / "Training", (("glioma", 2), ("notumor", 2)))
    _folder(root / "Testing", (("glioma", 3), ("notumor", 1)), seed=400)
    out = tmp_path / "ev.json"
    assert main(["evaluate", str(root), "--weights", str(weights), "--json", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert ev["n"] == 4 and all(r["file"].startswith("Testing/") for r in ev["predictions"])


def test_binary_model_scores_typed_folders_as_tumour(tmp_path):
    w = make_weights(tmp_path / "wb", classes=["tumor", "notumor"], bias=(0.0, 2.0))
    root = _folder(tmp_path / "typed", (("glioma", 2), ("pituitary", 1), ("notumor", 2)))
    out = tmp_path / "ev.json"
    assert main(["evaluate", str(root), "--weights", str(w), "--json", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert ev["n"] == 5 and ev["accuracy"] == pytest.approx(2 / 5)   # every scan called notumor
    assert ev["confusion"] == [[0, 3], [0, 2]] and ev["tumour_missed"] == 3


def test_unknown_folder_is_reported_not_half_scored(weights, tmp_path, capsys):
    root = _folder(tmp_path / "odd", (("glioma", 1), ("notumor", 1), ("weird_class", 2)))
    out = tmp_path / "ev.json"
    assert main(["evaluate", str(root), "--weights", str(weights), "--json", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert ev["n"] == 2 and sum(map(sum, ev["confusion"])) == 2
    assert "weird_class/0.png: its folder ('weird_class') names no class" in capsys.readouterr().err


def test_evaluate_nothing_readable_exits_1_and_lists_the_files(weights, tmp_path, capsys):
    root = tmp_path / "bad"
    (root / "glioma").mkdir(parents=True)
    (root / "glioma" / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "glioma" / "b.jpg").write_bytes(b"")
    assert main(["evaluate", str(root), "--weights", str(weights)]) == 1
    err = capsys.readouterr().err
    assert "skipped glioma/a.jpg" in err and "skipped glioma/b.jpg" in err
    assert "error: none of the 2 image files" in err and "Traceback" not in err


def test_evaluate_json_path_is_checked_before_the_run(weights, four_class_dir, tmp_path, capsys):
    assert main(["evaluate", str(four_class_dir), "--weights", str(weights), "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["evaluate", str(four_class_dir), "--weights", str(weights),
                 "--json", str(tmp_path / "no" / "ev.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_stray_files_links_and_extensionless_dicom(weights, tmp_path, capsys):
    from core.data import discover
    root = _folder(tmp_path / "ds", (("glioma", 1), ("notumor", 1)))
    (root / "notes.txt").write_text("x")
    (root / ".hidden_dir").mkdir()
    pattern(7).save(root / ".hidden_dir" / "x.png")
    (root / "glioma" / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    dcm = ROOT.parent / "shared" / "data" / "samples"
    dicoms = sorted(dcm.glob("*.dcm"))
    if dicoms:  # a DICOM export without an extension is still a scan
        (root / "notumor" / "IM0001").write_bytes(dicoms[0].read_bytes())
    scan = discover(root)
    skipped = dict(scan.skipped)
    assert skipped["notes.txt"] == "not inside a class folder"
    assert skipped[".hidden_dir/"] == "hidden folder"
    assert skipped["glioma/gone.jpg"].startswith("broken link")
    assert ("notumor/IM0001" in {s.rel for s in scan.samples}) == bool(dicoms)
    assert main(["audit", str(root)]) == 0   # the dangling link no longer stops the audit
    assert "skipped glioma/gone.jpg" in capsys.readouterr().out


def test_damaged_weights_are_a_usage_error(weights, four_class_dir, tmp_path, capsys):
    bad = tmp_path / "damaged"
    bad.mkdir()
    (bad / "card.json").write_text((weights / "card.json").read_text())
    (bad / "model.safetensors").write_bytes((weights / "model.safetensors").read_bytes()[:200])
    f = four_class_dir / "glioma_tumor" / "gl0.jpg"
    assert main(["predict", "--json", "--weights", str(bad), str(f)]) == 2
    err = capsys.readouterr().err
    assert "could not be loaded" in err and "Traceback" not in err


def test_relative_weights_resolve_from_any_folder(tmp_path, monkeypatch):
    from core.inference import WEIGHTS_ROOT, resolve_weights
    name = (WEIGHTS_ROOT / "DEFAULT").read_text().strip()
    monkeypatch.chdir(tmp_path)
    assert resolve_weights(f"weights/{name}") == WEIGHTS_ROOT / name
    assert resolve_weights(str(tmp_path / "x")) == tmp_path / "x"   # as given when absolute


def test_model_without_gate_still_flags_colour(weights, four_class_dir, tmp_path, capsys):
    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.jpg"
    Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((96, 96)).save(photo)
    grey = four_class_dir / "glioma_tumor" / "gl0.jpg"
    assert main(["predict", "--json", "--weights", str(weights), str(photo), str(grey)]) == 1   # the photo: no call
    a, b = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert a["in_distribution"] is False and "colour" in a["ood_reason"]
    assert b["in_distribution"] is True and b["ood_reason"] is None
    assert a["call"] is None and b["call"] == b["pred"]   # a refused photo is told no diagnosis


def test_odd_nifti_headers_leave_stderr_quiet(weights, tmp_path):
    import nibabel as nib
    vol = (np.random.default_rng(0).random((32, 32, 3)) * 1e38).astype(np.float64)  # overflows float32
    img = nib.Nifti1Image(vol, np.eye(4))
    img.header["pixdim"][1:4] = 0            # nibabel logs a fix for this
    f = tmp_path / "odd.nii"
    f.write_bytes(img.to_bytes())
    r = subprocess.run([sys.executable, "-m", "core", "predict", "--json", "--weights", str(weights), str(f)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and json.loads(r.stdout)["ok"], r.stderr
    assert r.stderr == ""


def test_yes_folder_call_agrees_with_its_metrics_without_a_threshold(tmp_path):
    # p(notumor) 0.45 is the top class, but the tumour classes hold 0.55 together: scored as
    # tumour vs no tumour, the call is 'tumor' in the records and in the metrics alike.
    w = make_weights(tmp_path / "w", bias=(0.0, 0.0, 0.0, float(np.log(0.45 / (0.55 / 3)))), threshold=None)
    root = _folder(tmp_path / "yes_only", (("yes", 3),))
    out = tmp_path / "ev.json"
    assert main(["evaluate", str(root), "--weights", str(w), "--json", str(out)]) == 0
    ev = json.loads(out.read_text())
    assert {r["pred"] for r in ev["predictions"]} == {"tumor"}
    assert ev["tumour_missed"] == 0 and ev["silent_misses"] == 0


def test_ood_source_roots_read_a_one_path_config(tmp_path):
    from core.ood import source_roots
    cfg = tmp_path / "c.toml"
    cfg.write_text('data = "/somewhere/br35h=0.5"\n')
    assert source_roots(None, cfg) == {"br35h": Path("/somewhere/br35h")}


def test_rescore_recomputes_a_stale_summary_from_the_records(tmp_path, capsys):
    """A summary written by older metric code is rebuilt from the per-image records alone."""
    from core.evaluation import evaluate_records
    rec = lambda f, src, lab, p: {"file": f, "source": src, "label": lab, "pred": max(p, key=p.get),
                                  "probs": p, "tumour_probability": 1 - p["notumor"], "confidence": max(p.values()),
                                  "uncertain": False, "type_uncertain": False,
                                  "in_distribution": True, "ood_score": None}
    g, n, m = ({"glioma": .9, "meningioma": .04, "pituitary": .03, "notumor": .03},
               {"glioma": .05, "meningioma": .05, "pituitary": .05, "notumor": .85},
               {"glioma": .1, "meningioma": .8, "pituitary": .05, "notumor": .05})
    records = [rec("a.jpg", "lgg", "glioma", g), rec("b.jpg", "lgg", "glioma", m),
               rec("c.jpg", "lgg", "notumor", n), rec("d.jpg", "bench", "meningioma", m)]
    ev = evaluate_records(records, C4, 0.5)
    fresh_f1 = ev["per_source"]["lgg"]["macro_f1"]
    # LGG has glioma and notumor only: F1 1.0 for notumor, 2/3 for glioma; meningioma stays out.
    assert fresh_f1 == pytest.approx((1 + 2 / 3) / 2)
    ev["per_source"]["lgg"]["macro_f1"] = 0.25          # what older code stored
    ev["accuracy"] = 0.1
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    (tmp_path / "card.json").write_text(json.dumps({"name": "x", "metrics": {"accuracy": 0.1, "kept": 1}}))
    assert main(["rescore", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "eval.json").read_text())
    assert out["per_source"]["lgg"]["macro_f1"] == pytest.approx(fresh_f1)
    assert out["accuracy"] == pytest.approx(0.75)
    assert out["predictions"] == [{**r, "threshold": 0.5} for r in records]  # records gain the run's threshold
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["metrics"]["per_source"]["lgg"]["macro_f1"] == pytest.approx(fresh_f1)
    assert card["metrics"]["accuracy"] == pytest.approx(0.75) and card["metrics"]["kept"] == 1
    assert "lgg.macro_f1 0.25 ->" in capsys.readouterr().out
    assert main(["rescore", str(tmp_path / "missing")]) == 2


@pytest.mark.parametrize("ev, card, said", [
    ({"predictions": []}, {}, "names no list of classes"),
    ({"classes": C4, "predictions": [{"file": "a.jpg", "label": "glioma", "in_distribution": True,
                                      "probs": {"glioma": 1.0}}]}, {}, "no finite probability of 'meningioma'"),
    ({"classes": C4, "predictions": []}, [], "is not a model card"),
    ([], {}, "no list of per-image predictions")])
def test_rescore_of_a_damaged_file_is_one_sentence(tmp_path, capsys, ev, card, said):
    """A KeyError, TypeError or AttributeError traceback before."""
    (tmp_path / "eval.json").write_text(json.dumps(ev))
    (tmp_path / "card.json").write_text(json.dumps(card))
    assert main(["rescore", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert said in err and err.count("\n") == 1 and "Traceback" not in err


def test_predict_text_gives_a_flagged_scan_no_call(weights, tmp_path, capsys):
    rng = np.random.default_rng(1)
    photo = tmp_path / "cat.png"
    Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).resize((96, 96)).save(photo)
    assert main(["predict", "--weights", str(weights), str(photo)]) == 1   # refused: no call
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{photo}: no diagnosis [out-of-distribution]"), line
    assert "tumour probability" not in line and "notumor" not in line


def test_predict_sums_up_a_dicom_series_on_stderr(weights, tmp_path, capsys):
    from test_reader import dicom12, make_dicom
    uid = "1.2.826.0.1.3680043.8.498.5151"
    files = []
    for k in (1, 2, 3):
        f = tmp_path / f"IM{k}"
        f.write_bytes(make_dicom(dicom12(np.asarray(pattern(k), np.float32) / 255), series=uid, instance=k))
        files.append(str(f))
    assert main(["predict", "--json", "--weights", str(weights), *files]) == 0
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 3 and all(json.loads(x)["ok"] for x in out.splitlines())
    assert err.strip().startswith("Series 1 (3 files): ") and uid not in out + err


@pytest.mark.parametrize("card, why", [([], "not a model card"), ({"name": "x"}, "lacks classes, arch, preprocessing"),
                                       ({"classes": ["a"], "arch": "simple_cnn", "preprocessing": {}},
                                        "fewer than two classes")])
def test_a_malformed_card_is_one_sentence_and_exit_2(weights, tmp_path, capsys, card, why):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(weights, bad)
    (bad / "card.json").write_text(json.dumps(card))
    assert main(["predict", "--json", "--weights", str(bad), __file__]) == 2
    err = capsys.readouterr().err
    assert why in err and "Traceback" not in err


def test_a_card_without_a_threshold_decides_at_one_half_everywhere(weights, tmp_path):
    """The CLI and the app used to differ: argmax in one, 0.5 in the other."""
    from conftest import edited_weights
    from core.app_support import card_threshold
    from core.inference import Predictor
    w = edited_weights(weights, tmp_path / "w", drop=("operating_point",))
    assert Predictor(w).threshold == card_threshold(Predictor(w).card) == 0.5


def test_confidence_is_the_probability_of_the_class_called(tmp_path, four_class_dir, capsys):
    # tumour probability 0.289 >= 0.2: called glioma (p 0.096) while notumor holds 0.711
    w = make_weights(tmp_path / "w_low", threshold=0.2)
    assert main(["predict", "--json", "--weights", str(w), str(four_class_dir / "pituitary" / "pi0.jpg")]) == 0
    x = json.loads(capsys.readouterr().out)
    assert x["pred"] == "glioma" and x["confidence"] == pytest.approx(x["probs"]["glioma"])


def test_records_without_a_source_are_one_source_named_data():
    from core.app_support import evaluation_at
    from core.evaluation import evaluate_records
    p = {"glioma": .9, "meningioma": .04, "pituitary": .03, "notumor": .03}
    recs = [{"file": "a", "label": "glioma", "pred": "glioma", "probs": p, "tumour_probability": .97,
             "confidence": .9, "uncertain": False, "in_distribution": True},
            {**{"file": "b", "label": "glioma", "pred": "glioma", "probs": p, "tumour_probability": .97,
                "confidence": .9, "uncertain": False, "in_distribution": True}, "source": "lgg"}]
    ev = evaluate_records(recs, C4, 0.5)
    assert ev["per_source"]["data"]["n"] == 1 and ev["per_source"]["lgg"]["n"] == 1
    assert evaluation_at(recs, C4, 0.5, "data")["n"] == 1


def test_model_without_gate_refuses_a_nearly_empty_slice(weights, four_class_dir, tmp_path, capsys):
    """One bright voxel in an empty volume: gateless models called its middle slice glioma
    (0.92 to 0.98). Nothing is there to classify; a real slice still gets its call."""
    import gzip
    import nibabel as nib
    vol = np.zeros((64, 64, 9), np.int16)
    vol[30, 30, 4] = 1000
    affine = np.diag([-0.9, -0.9, 3.0, 1.0])
    affine[:3, 3] = [10.0, 20.0, 30.0]
    f = tmp_path / "one_voxel.nii.gz"
    f.write_bytes(gzip.compress(nib.Nifti1Image(vol, affine).to_bytes()))
    grey = four_class_dir / "glioma_tumor" / "gl0.jpg"
    assert main(["predict", "--json", "--weights", str(weights), str(f), str(grey)]) == 1   # the empty slice: no call
    a, b = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert a["in_distribution"] is False and "nearly empty" in a["ood_reason"]
    assert b["in_distribution"] is True and b["ood_reason"] is None
    from core.ood import OODGate
    OODGate("colour", [], 0.0, colour_limit=0.03).save(weights)   # a gate that judges colour alone
    assert main(["predict", "--json", "--weights", str(weights), str(f)]) == 1
    assert "nearly empty" in json.loads(capsys.readouterr().out)["ood_reason"]


def test_evaluate_json_dash_writes_the_json_to_stdout(weights, four_class_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(four_class_dir), "--weights", str(weights), "--json", "-"]) == 0
    out, err = capsys.readouterr()
    ev = json.loads(out)   # stdout is the whole JSON and nothing else; the summary went to stderr
    assert EVAL_KEYS <= set(ev) and len(ev["predictions"]) == ev["n"] and '"accuracy"' in err
    assert not (tmp_path / "-").exists()


def test_an_unwritable_json_path_is_refused_before_the_run(weights, four_class_dir, tmp_path, capsys):
    locked = tmp_path / "locked.json"
    locked.mkdir()   # a folder where the file would go
    for path in (str(locked), "/proc/eval.json"):
        assert main(["evaluate", str(four_class_dir), "--weights", str(weights), "--json", path]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --json") and "Errno" not in err, err


def test_a_name_the_console_cannot_encode_does_not_end_the_batch(weights, four_class_dir, tmp_path):
    import shutil
    odd = tmp_path / "scan \u8111.jpg"
    shutil.copy(four_class_dir / "meningioma" / "me0.jpg", odd)
    good = four_class_dir / "glioma_tumor" / "gl0.jpg"
    env = {**os.environ, "BT_CACHE": str(tmp_path / "cache"), "PYTHONIOENCODING": "cp1252"}
    r = subprocess.run([sys.executable, "-m", "core", "predict", "--weights", str(weights), str(good), str(odd),
                        str(good)], cwd=ROOT, env=env, capture_output=True, text=True, encoding="cp1252",
                       errors="replace", timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 3 and "\\u8111" in r.stdout.splitlines()[1]


def test_a_wrapped_training_only_folder_still_warns_and_filters_as_unwrapped(weights, tmp_path, capsys):
    """Behind a wrapper folder, rel starts with the wrapper's name: the Training/ warning and the
    Training/ error filter looked at that and missed it."""
    root = tmp_path / "download"
    for k, c in enumerate(("glioma", "notumor")):
        (root / "Brain Tumor" / "Training" / c).mkdir(parents=True)
        pattern(400 + k).save(root / "Brain Tumor" / "Training" / c / f"{k}.jpg")
    (root / "Brain Tumor" / "pituitary").mkdir()   # beside Training/: reported with its whole path
    assert main(["evaluate", str(root), "--weights", str(weights)]) == 0
    err = capsys.readouterr().err
    assert "Training/ included" in err and "training images would flatter it" in err
    assert "skipped Brain Tumor/pituitary/:" in err
    (root / "Brain Tumor" / "Testing" / "glioma").mkdir(parents=True)
    pattern(500).save(root / "Brain Tumor" / "Testing" / "glioma" / "t.jpg")
    (root / "Brain Tumor" / "Training" / "glioma" / "notes.txt").write_text("x")
    assert main(["evaluate", str(root), "--weights", str(weights)]) == 0
    err = capsys.readouterr().err
    assert "evaluated: Testing/ images" in err and "notes.txt" not in err   # Training/ is not evaluated


def test_json_paths_that_a_probe_would_spoil_are_left_to_the_write(tmp_path):
    from core.cli import output_problem
    target = tmp_path / "made_later.json"
    (tmp_path / "link.json").symlink_to(target)   # a link to a file not made yet
    assert output_problem("--json", tmp_path / "link.json") is None and not target.exists()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)   # opening it for writing would hand a waiting reader an empty stream
    assert output_problem("--json", fifo) is None
    assert output_problem("--json", tmp_path / "new.json") is None and not (tmp_path / "new.json").exists()


def test_a_link_into_a_missing_folder_is_refused_before_the_run(tmp_path):
    from core.cli import output_problem
    (tmp_path / "bad.json").symlink_to(tmp_path / "no_such_dir" / "x.json")
    assert "does not exist" in output_problem("--json", tmp_path / "bad.json")


def test_a_chain_of_links_into_a_missing_folder_is_refused(tmp_path):
    from core.cli import output_problem
    (tmp_path / "b.json").symlink_to(tmp_path / "missing" / "x.json")
    (tmp_path / "a.json").symlink_to(tmp_path / "b.json")
    assert "does not exist" in output_problem("--json", tmp_path / "a.json")


def test_predict_flags_a_volume_whose_other_slices_reach_the_point(weights, tmp_path, capsys, monkeypatch):
    """`predict` said 'notumor' with no flag for a volume whose slices 5, 6 and 50 were gliomas,
    where the app and the report flagged it."""
    import nibabel as nib
    from core import inference
    vol = (np.random.default_rng(0).random((48, 48, 7)) * 200).astype(np.float32)
    f = tmp_path / "vol.nii"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), f)
    real = inference.slice_scores
    monkeypatch.setattr(inference, "slice_scores", lambda p, src, name=None, **kw: (
        *real(p, src, name)[:2], {0: 0.99, 1: 0.0, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.0, 6: 0.0}))
    monkeypatch.setattr(inference.Predictor, "predict_scan", lambda self, scan: inference.Prediction(
        "notumor", {"tumor": 0.0, "notumor": 1.0}, 0.0, 0.5, 1.0, False, True, None, info=dict(scan.info)))
    assert main(["predict", "--json", "--weights", str(weights), str(f)]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["hot_slices"] == [0]
    assert main(["predict", "--weights", str(weights), str(f)]) == 0
    assert "other slices reach the operating point" in capsys.readouterr().out


# ----------------------------------------------------------------------------- review F, session 20
def _damaged_vr_dicom() -> bytes:
    """A DICOM whose (0002,0002) element claims a VR that does not exist: pydicom raises
    NotImplementedError when the element is first read, not when the file is opened."""
    from test_reader import dicom12, grey8, make_dicom
    d = bytearray(make_dicom(dicom12(np.asarray(grey8()) / 255.0)))
    i = d.index(b"\x02\x00\x02\x00UI")
    d[i + 4:i + 6] = b"U7"
    return bytes(d)


def test_a_damaged_dicom_is_one_skipped_file_of_evaluate(weights, four_class_dir, capsys):
    (four_class_dir / "glioma_tumor" / "bad_vr.dcm").write_bytes(_damaged_vr_dicom())
    assert main(["evaluate", str(four_class_dir), "--weights", str(weights)]) == 0
    err = capsys.readouterr().err
    assert "skipped glioma_tumor/bad_vr.dcm: The DICOM file is damaged" in err and "Traceback" not in err


def test_text_lines_keep_one_line_per_file_and_weights_name_what_is_missing(weights, four_class_dir, tmp_path, capsys):
    odd = tmp_path / "new\nline.jpg"
    odd.write_bytes((four_class_dir / "glioma_tumor" / "gl0.jpg").read_bytes())
    assert main(["predict", "--weights", str(weights), str(odd)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "new\\nline.jpg:" in out
    rtl = tmp_path / "\u202eabc.gpj.jpg"   # a right-to-left override would show the line reversed
    rtl.write_bytes(odd.read_bytes())
    assert main(["predict", "--weights", str(weights), str(rtl)]) == 0
    out = capsys.readouterr().out
    assert "\u202e" not in out and "\\u202eabc.gpj.jpg:" in out
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "card.json").write_text((weights / "card.json").read_text())
    assert main(["predict", "--weights", str(bare), str(odd)]) == 2
    assert "no model.safetensors" in capsys.readouterr().err


def test_rescore_leaves_current_files_untouched(tmp_path):
    """It rewrote eval.json whenever it ran: recomputed figures moved in the sixth decimal, so a
    rescore of the shipped weights left a git diff with nothing changed."""
    import shutil
    from core.evaluation import rescore, same_figures
    shipped = sorted(p.parent for p in (Path(__file__).resolve().parents[1] / "weights").glob("*/eval.json"))
    if not shipped:
        pytest.skip("no shipped models")
    for src in shipped:   # every shipped model is current: rescoring it leaves no diff
        d = tmp_path / src.name
        d.mkdir()
        for f in ("eval.json", "card.json"):
            shutil.copy(src / f, d / f)
        assert rescore(d, log=lambda _: None) == {}, src.name
        assert (d / "eval.json").read_bytes() == (src / "eval.json").read_bytes(), src.name
        assert (d / "card.json").read_bytes() == (src / "card.json").read_bytes(), src.name
    assert same_figures({"a": [0.98994, 1]}, {"a": [0.989939, 1]}) and not same_figures({"a": 0.98}, {"a": 0.97})


@pytest.mark.parametrize("command", ["fit-ood", "rethreshold-ood", "annotate-ood"])
def test_gate_commands_name_a_folder_that_is_no_model(command, tmp_path, capsys):
    """They printed "[Errno 2] No such file or directory: '.../split.json'"."""
    assert main([command, "--weights", str(tmp_path / "nowhere")]) == 2
    assert "--weights " in capsys.readouterr().err
    assert main([command, "--weights", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no card.json, so it is not a folder train.py wrote" in err and "Errno" not in err


def test_audit_escapes_control_characters_in_every_name_it_lists(tmp_path, capsys):
    """A newline or a right-to-left override in a file name split or reversed the group and leak
    lines (the skipped lines were escaped already)."""
    root = tmp_path / "kaggle"
    for part in ("Training", "Testing"):
        (root / part / "glioma").mkdir(parents=True)
    odd = "scan\u202eelif\nnext.jpg"
    pattern(1).save(root / "Training" / "glioma" / odd)
    pattern(1).save(root / "Training" / "glioma" / "plain.jpg", quality=60)
    pattern(1).save(root / "Testing" / "glioma" / f"t{odd}", quality=50)   # its copy across the split
    pattern(7).save(root / "Testing" / "glioma" / "other.jpg")
    assert main(["audit", str(root)]) == 0
    out = capsys.readouterr().out
    assert "\u202e" not in out and "elif\\nnext.jpg" in out
    assert all(not line.startswith("next.jpg") for line in out.splitlines())
    assert "group of 3:" in out and out.count("scan\\u202eelif\\nnext.jpg") >= 2   # group and leak lines


def test_a_model_with_no_no_tumour_class_says_it_cannot_rule_one_out(tmp_path, four_class_dir, capsys, monkeypatch):
    """A glioma/meningioma/pituitary model called a healthy scan 'pituitary' with nothing said, in
    the CLI, on the Diagnose page and on the Model card."""
    from streamlit.testing.v1 import AppTest
    three = make_weights(tmp_path / "three", classes=C4[:3], bias=(0.0, 0.0, 2.0), threshold=None)
    healthy = four_class_dir / "no_tumor" / "no1.jpg"
    assert main(["predict", "--json", "--weights", str(three), str(healthy)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["pred"] == "pituitary"
    assert "no 'no tumour' class" in err and "glioma, meningioma or pituitary" in err
    from core.labels import cannot_rule_out   # a 'stroke' class beside the types rules nothing out either
    assert "glioma, pituitary tumour or stroke" in cannot_rule_out(["glioma", "pituitary", "stroke"])
    assert cannot_rule_out(["tumor", "notumor"]) is None and cannot_rule_out(["stroke", "notumor"]) is None
    assert main(["predict", "--weights", str(make_weights(tmp_path / "four")), str(healthy)]) == 0
    assert "no 'no tumour' class" not in capsys.readouterr().err
    card = json.loads((three / "card.json").read_text())   # and train.py's note on a class it could not test
    card["data_notes"] = {"classes_not_tested": "pituitary (2 images; none in validation or test): ..."}
    (three / "card.json").write_text(json.dumps(card))
    monkeypatch.setenv("BT_WEIGHTS", str(three))
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=120).run()
    for page in ("app_pages/diagnose.py", "app_pages/model_card.py"):
        at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
        shown = [w.value for w in at.warning] + [m.value for m in at.markdown]
        assert any("Cannot rule a tumour out" in t for t in shown), page
    assert any(w.value.startswith("**Classes with no validation or test image**: pituitary") for w in at.warning)
    from core.report import saliency_caveat   # no word of a 'no tumour' map for a model with none
    assert "no tumour" not in saliency_caveat(C4[:3]) and "no tumour" in saliency_caveat(C4)


def test_a_folder_skipped_whole_is_one_line(tmp_path, capsys):
    """A yes/no folder against a three-type model printed one identical line per file (120 of them)."""
    three = make_weights(tmp_path / "three", classes=C4[:3], bias=(0.0, 0.0, 2.0), threshold=None)
    data = yes_no_dir(tmp_path / "yn", yes=2, no=5, seed=3)
    (data / "glioma").mkdir()
    pattern(9).save(data / "glioma" / "g.jpg")
    assert main(["evaluate", str(data), "--weights", str(three), "--json", str(tmp_path / "e.json")]) == 0
    err = capsys.readouterr().err
    assert "skipped no/ (5 files): its folder ('no') names no class of this model" in err
    assert err.count("skipped yes/") == 2   # a few stay named one by one
    assert len(json.loads((tmp_path / "e.json").read_text())["errors"]) == 7
    # skipped folders and files loose at the root are each named, however many
    from core.cli import _print_skipped
    _print_skipped([{"file": f"{c}/", "error": "an empty class folder"} for c in "abcde"]
                   + [{"file": f"n{k}.txt", "error": "not inside a class folder"} for k in range(5)])
    err = capsys.readouterr().err
    assert all(f"skipped {c}/: an empty class folder" in err for c in "abcde") and "skipped n4.txt:" in err


def test_a_file_name_that_is_not_utf8_gives_strict_json(weights, four_class_dir, tmp_path, capsys):
    """Python keeps a name's undecodable bytes as lone surrogates ('\\udcff'), which json.dumps wrote
    as such and strict parsers refuse: written as '\\xff' instead (a fuzzing review)."""
    import shutil
    name = os.fsdecode(b"bad_\xff\xfe_name.jpg")
    shutil.copy(four_class_dir / "glioma_tumor" / "gl0.jpg", tmp_path / name)
    assert main(["predict", "--json", "--weights", str(weights), str(tmp_path / name)]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["ok"] and line["file"] == f"{tmp_path}/bad_\\xff\\xfe_name.jpg"
    line["file"].encode("utf-8")   # no lone surrogate left
    # a stored record keeps Python's own form: eval.json's names must still open their files
    from core.evaluation import json_text
    assert json.loads(json_text({"file": name}))["file"] == name
    assert main(["predict", "--weights", str(weights), str(tmp_path / name)]) == 0
    assert capsys.readouterr().out.startswith(f"{tmp_path}/bad_\\xff\\xfe_name.jpg: ")
