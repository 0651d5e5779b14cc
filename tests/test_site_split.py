"""bench/site_split.py: a leave-one-site-out split moves exactly one site's LGG training and
validation files to test, and the unseen-against-seen figures are the hand-worked ones."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.site_split import leave_site_out, main, per_site, site_gap, site_of  # noqa: E402


def _record() -> dict:
    return {"method": "grouped", "files": {
        "benchmark": {"train": ["glioma/a.jpg"], "val": ["glioma/b.jpg"], "test": ["glioma/c.jpg"]},
        "lgg": {"train": ["glioma/TCGA_HT_7690_001.jpg", "notumor/TCGA_DU_5851_002.jpg"],
                "val": ["notumor/TCGA_HT_7690_003.jpg", "glioma/TCGA_CS_4941_011.jpg"],
                "test": ["glioma/TCGA_DU_6404_004.jpg"]}}}


def test_site_of_reads_the_tcga_name():
    assert site_of("glioma/TCGA_HT_7690_012.jpg") == "HT"
    assert site_of("glioma/Tr-gl_0001.jpg") is None


def test_leave_site_out_moves_only_that_sites_train_and_val_files():
    rec = _record()
    out, n = leave_site_out(rec, "HT")
    assert rec == _record()  # the recorded split it was given is not changed
    lgg = out["files"]["lgg"]
    assert n == 2
    assert lgg["train"] == ["notumor/TCGA_DU_5851_002.jpg"]
    assert lgg["val"] == ["glioma/TCGA_CS_4941_011.jpg"]
    assert sorted(lgg["test"]) == sorted(["glioma/TCGA_DU_6404_004.jpg", "glioma/TCGA_HT_7690_001.jpg",
                                          "notumor/TCGA_HT_7690_003.jpg"])
    assert out["files"]["benchmark"] == _record()["files"]["benchmark"]  # other sources untouched
    assert "leave-one-site-out" in out["method"]


def _eval(rows) -> dict:
    """rows: (file, label, pred) of LGG test records, plus one benchmark record that must be ignored."""
    preds = [{"file": f, "source": "lgg", "label": lab, "pred": p, "uncertain": bool(u),
              "tumour_probability": 0.9 if p != "notumor" else 0.1} for f, lab, p, *u in rows]
    preds.append({"file": "glioma/TCGA_HT_0000_001.jpg", "source": "benchmark", "label": "glioma", "pred": "notumor"})
    return {"predictions": preds}


ROWS = [  # HT: 2 patients, 4 slices, 3 right; DU: 1 patient, 3 slices, 2 right; CS: 1 patient, 2 slices, 1 right
    ("glioma/TCGA_HT_1111_001.jpg", "glioma", "glioma"), ("notumor/TCGA_HT_1111_002.jpg", "notumor", "glioma"),
    ("glioma/TCGA_HT_2222_001.jpg", "glioma", "glioma"), ("notumor/TCGA_HT_2222_002.jpg", "notumor", "notumor"),
    ("glioma/TCGA_DU_3333_001.jpg", "glioma", "glioma"), ("notumor/TCGA_DU_3333_002.jpg", "notumor", "notumor"),
    ("glioma/TCGA_DU_3333_003.jpg", "glioma", "meningioma"),  # the wrong type, but a tumour found
    ("glioma/TCGA_CS_4444_001.jpg", "glioma", "notumor"), ("notumor/TCGA_CS_4444_002.jpg", "notumor", "notumor"),
]


def test_per_site_figures_by_hand():
    got = per_site(_eval(ROWS))
    # AUC from the probabilities (0.9 when called tumour, else 0.1): HT's one false alarm ties
    # with its two tumours, so half of those two pairs count
    assert got["HT"] == {"n": 4, "patients": 2, "accuracy": 0.75, "sensitivity": 1.0, "specificity": 0.5, "auc": 0.75}
    assert got["DU"] == {"n": 3, "patients": 1, "accuracy": 0.6667, "sensitivity": 1.0, "specificity": 1.0, "auc": 1.0}
    assert got["CS"] == {"n": 2, "patients": 1, "accuracy": 0.5, "sensitivity": 0.0, "specificity": 1.0, "auc": 0.5}


def test_site_gap_unseen_against_seen():
    g = site_gap(_eval(ROWS), "HT", n_boot=500)
    assert (g["unseen"], g["seen"], g["gap"]) == (0.75, 0.6, 0.15)  # HT 3/4 against DU + CS 3/5
    assert g["patients"] == [2, 2] and g["slices"] == [4, 5]
    lo, hi = g["gap_ci95"]
    assert lo <= 0.15 <= hi and lo < hi
    lo, hi = g["unseen_ci95"]  # HT's patients are 1/2 and 2/2 right: resampled, 0.5 to 1.0
    assert 0.5 <= lo < 0.75 < hi <= 1.0
    g = site_gap(_eval(ROWS), "DU", n_boot=200)
    assert (g["unseen"], g["seen"]) == (round(2 / 3, 4), round(4 / 6, 4))
    with pytest.raises(ValueError, match="site EZ"):
        site_gap(_eval(ROWS), "EZ")


def test_cli_writes_a_split_train_py_can_read(tmp_path):
    src = tmp_path / "run"
    src.mkdir()
    (src / "split.json").write_text(json.dumps(_record()))
    assert main(["--split-from", str(src), "--site", "CS", "--out", str(tmp_path / "out")]) == 0
    written = json.loads((tmp_path / "out" / "split.json").read_text())
    assert written["files"]["lgg"]["val"] == ["notumor/TCGA_HT_7690_003.jpg"]
    with pytest.raises(SystemExit):  # a site with nothing to move is a usage error, not an empty split
        main(["--split-from", str(src), "--site", "EZ", "--out", str(tmp_path / "none")])
    with pytest.raises(SystemExit):  # so is a run with no eval.json, not a traceback
        main(["--report", str(src), "--site", "HT"])
    assert not (tmp_path / "none").exists()


def test_error_edges_bins_by_mask_area_and_distance_to_the_tumour(tmp_path):
    import numpy as np
    from PIL import Image
    from bench.site_split import error_edges
    for d in ("glioma", "notumor", "masks"):
        (tmp_path / d).mkdir()
    areas = {5: 100, 6: 3000, 30: 199, 31: 200, 32: 500, 33: 999, 34: 1000}  # slice -> lesion pixels
    for n, a in areas.items():
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "glioma" / f"TCGA_HT_1111_{n:03d}.jpg")
        m = np.zeros((64, 64), np.uint8)
        m.flat[:a] = 255
        Image.fromarray(m).save(tmp_path / "masks" / f"TCGA_HT_1111_{n:03d}.png")
    rows = [("glioma/TCGA_HT_1111_005.jpg", "glioma", "notumor"),     # the small one missed
            ("glioma/TCGA_HT_1111_030.jpg", "glioma", "glioma"), ("glioma/TCGA_HT_1111_031.jpg", "glioma", "glioma"),
            ("glioma/TCGA_HT_1111_032.jpg", "glioma", "notumor"), ("glioma/TCGA_HT_1111_033.jpg", "glioma", "glioma"),
            ("glioma/TCGA_HT_1111_034.jpg", "glioma", "glioma"),
            ("glioma/TCGA_HT_1111_006.jpg", "glioma", "meningioma"),  # found (type aside)
            ("notumor/TCGA_HT_1111_004.jpg", "notumor", "glioma"),    # next to the tumour: a false alarm
            ("notumor/TCGA_HT_1111_008.jpg", "notumor", "notumor"),   # 2 slices away
            ("notumor/TCGA_HT_1111_020.jpg", "notumor", "notumor"),   # far
            ("notumor/TCGA_DU_2222_001.jpg", "notumor", "glioma")]    # another site: left out with site="HT"
    ev = _eval(rows)
    next(r for r in ev["predictions"] if r["file"].endswith("_032.jpg"))["in_distribution"] = False  # flagged
    got = error_edges(ev, tmp_path, site="HT")
    # each bin holds its lower edge: 199 -> below 200, 200 -> 200-500, 999 -> 500-1000, 1000 -> 1000-2000
    assert got["sensitivity_by_mask_px"] == {">=0": {"n": 2, "right": 1, "silent_misses": 1},
                                             ">=200": {"n": 1, "right": 1, "silent_misses": 0},
                                             ">=500": {"n": 2, "right": 1, "silent_misses": 0},  # the flagged miss
                                             ">=1000": {"n": 1, "right": 1, "silent_misses": 0},
                                             ">=2000": {"n": 1, "right": 1, "silent_misses": 0}}
    rows[0] = rows[0] + (True,)  # the same miss, referred "uncertain": no longer silent
    got = error_edges(_eval(rows), tmp_path, site="HT")
    assert got["sensitivity_by_mask_px"][">=0"] == {"n": 2, "right": 1, "silent_misses": 0}
    with pytest.raises(ValueError, match="no LGG folder"):
        error_edges(_eval(rows), tmp_path / "absent")
    assert got["specificity_by_slices_to_tumour"] == {">=1": {"n": 1, "right": 0}, ">=2": {"n": 1, "right": 1},
                                                      ">=4": {"n": 1, "right": 1}}
    assert error_edges(_eval(rows), tmp_path)["specificity_by_slices_to_tumour"][">=4"] == {"n": 2, "right": 1}


def test_paired_on_site_counts_each_call_by_hand():
    from bench.site_split import paired_on_site
    a = _eval(ROWS)
    b = _eval([(f, lab, {"TCGA_HT_1111_002": "notumor", "TCGA_HT_2222_001": "notumor"}.get(f.split("/")[1][:16], p))
               for f, lab, p in ROWS])
    got = paired_on_site(a, b, "HT")  # B fixes HT 1111's false alarm and misses HT 2222's tumour
    assert got["n"] == 4
    assert got["accuracy"] == {"n": 4, "a_right": 3, "b_right": 3, "a_only": 1, "b_only": 1, "p": 1.0, "units": 2}
    assert got["tumours_found"] == {"n": 2, "a_right": 2, "b_right": 1, "a_only": 1, "b_only": 0, "p": 1.0, "units": 1}
    assert got["normals_right"] == {"n": 2, "a_right": 1, "b_right": 2, "a_only": 0, "b_only": 1, "p": 1.0, "units": 1}
    with pytest.raises(ValueError, match="share no lgg test slice of site EZ"):
        paired_on_site(a, b, "EZ")


def _b_runs() -> tuple[dict, dict]:
    """A, and B that fixes HT 1111's false alarm and misses HT 2222's tumour (CS as A)."""
    a = _eval(ROWS)
    b = _eval([(f, lab, {"TCGA_HT_1111_002": "notumor", "TCGA_HT_2222_001": "notumor"}.get(f.split("/")[1][:16], p))
               for f, lab, p in ROWS])
    return a, b


def test_paired_pooled_adds_each_sites_slices_by_hand():
    from bench.site_split import paired_pooled
    a, b = _b_runs()
    got = paired_pooled([(a, b, "HT"), (a, b, "CS")])  # HT's 4 slices and CS's 2 (A and B agree on CS)
    assert got["sites"] == ["HT", "CS"] and got["n"] == 6
    assert got["accuracy"] == {"n": 6, "a_right": 4, "b_right": 4, "a_only": 1, "b_only": 1, "p": 1.0, "units": 2}
    assert got["tumours_found"] == {"n": 3, "a_right": 2, "b_right": 1, "a_only": 1, "b_only": 0, "p": 1.0, "units": 1}
    assert got["normals_right"] == {"n": 3, "a_right": 2, "b_right": 3, "a_only": 0, "b_only": 1, "p": 1.0, "units": 1}


def test_pooled_cli_reads_runs_and_refuses_what_is_not_triples(tmp_path, capsys):
    a, b = _b_runs()
    for name, ev in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps(ev))
    ra, rb = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(["--pooled", ra, rb, "HT", ra, rb, "CS"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("command: ") and printed[1].startswith("machine: ")   # bench/_machine.header
    out = json.loads(next(line for line in printed if line.startswith("pooled")).split(":", 1)[1])
    assert out["n"] == 6 and out["accuracy"]["a_right"] == 4
    with pytest.raises(SystemExit) as e:
        main(["--pooled", ra, rb])
    assert e.value.code == 2
    for bad in (["--pooled", ra, rb, "EZ"],                        # no slice of that site
                ["--pooled", ra, rb, "HT", ra, rb, "HT"],          # one triple twice: its slices twice
                ["--pooled", ra, rb, "HT", "--site", "HT"]):       # --pooled takes nothing else
        with pytest.raises(SystemExit) as e:
            main(bad)
        assert e.value.code == 2
