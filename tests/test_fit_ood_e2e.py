"""`python -m core fit-ood` end to end on a tiny generated dataset: a 1-epoch classifier from
train.py, then the whole fit (every compared method, ``--final all`` with 2 category folds,
1-epoch gate networks, a few outliers per category) and the served gate, in about a minute.

At this scale the rates mean nothing; what is checked is what fit-ood writes and that the pieces
agree: the report, the gate file, the card, eval.json and a Predictor loading the folder. The
categories come from `core.outliers` as installed: with or without Debian's invesalius-examples."""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from core import outliers as O
from core.cli import main
from core.inference import Predictor
from core.ood import COMPARED, OODGate
from core.reader import ScanImage, read_scan

from conftest import CLASSES

pytestmark = pytest.mark.usefixtures("private_cache")  # conftest: gate nets and outliers cached per test
N_TRAIN, N_TEST = 8, 4


def head_dataset(root, per_class=10):
    """Class-per-folder PNGs of synthetic head slices (`outliers.head_like`)."""
    for ci, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            rng = np.random.default_rng(100 * ci + k)
            head = O.head_like(rng, int(rng.integers(96, 128)))
            Image.fromarray((head * 255).astype(np.uint8)).save(root / c / f"{k}.png")


def fit_ood(*args):
    threads = torch.get_num_threads()   # fit-ood sets it for the process: give it back to later tests
    try:   # one thread: two on a busy 2-core machine made every step tens of times slower
        assert main(["fit-ood", *map(str, [*args, "--epochs", 1, "--n-train", N_TRAIN, "--n-test", N_TEST,
                                           "--threads", 1])]) == 0
    finally:
        torch.set_num_threads(threads)


def test_fit_ood_ships_the_chosen_gate_with_its_report_and_the_predictor_serves_it(tmp_path, private_cache):
    import train
    data, w = tmp_path / "data", tmp_path / "model"
    head_dataset(data)
    assert train.main(["--data", str(data), "--out", str(w), "--arch", "simple_cnn", "--img", "32",
                       "--epochs", "1", "--batch-size", "8", "--workers", "1", "--no-progress"]) == 0
    fit_ood("--weights", w, "--data-config", tmp_path / "none.toml", "--final", "all", "--folds", 2)

    rep = json.loads((w / "ood_eval.json").read_text())
    seen, unseen, test_only = list(O.SEEN), list(O.UNSEEN), list(O.TEST_ONLY)
    assert ("real_head_ct" in seen) == O.has_head_ct()
    assert (rep["seen_categories"], rep["unseen_categories"], rep["test_only_categories"]) == (seen, unseen, test_only)
    chosen = rep["chosen"]   # auto: picked among the network-based gates with the colour rule
    assert chosen in COMPARED and chosen.startswith("cnn") and chosen.endswith("colour")
    assert rep["shipped"] == f"{chosen} [all]"
    rows = rep["methods"]
    assert set(COMPARED) | {f"{chosen} [fold 1]", f"{chosen} [fold 2]", f"{chosen} [all]"} <= set(rows)
    split = json.loads((w / "split.json").read_text())["files"]["data"]
    for row in rows.values():   # the threshold flags at most 2 % of validation: none of 6 slices
        assert row["val_mri_flagged_pct"] == {"data": 0.0}
        assert set(row["outliers_flagged_pct"]) == set(seen + unseen + test_only)
    assert rep["counts"]["val_mri"] == {"data": len(split["val"])}
    assert rep["counts"]["test_mri"] == {"data": len(split["test"])}
    assert rep["counts"]["train_outliers_per_category"] == N_TRAIN
    # The held-out estimate: each trained category from the fold gate that never saw it
    held = rep["held_out_estimate"]
    assert len(held["folds"]) == 2 and sorted(sum(held["folds"], [])) == sorted(seen + unseen)
    assert set(held["per_category"]) == set(seen + unseen + test_only)
    for i, fold in enumerate(held["folds"]):
        for c in fold:
            assert held["per_category"][c] == rows[f"{chosen} [fold {i + 1}]"]["outliers_flagged_pct"][c]
    assert held["per_category"]["real_medical"] == rows[f"{chosen} [all]"]["outliers_flagged_pct"]["real_medical"]
    assert chosen not in rep["held_out_estimate_alternatives"]

    # The gate file is the shipped gate, for these weights; the card and eval.json say so
    gate = OODGate.load(w)
    assert gate.method == chosen and gate.net is not None
    assert gate.info["weights_sha256"] == hashlib.sha256((w / "model.safetensors").read_bytes()).hexdigest()
    assert gate.info["trained_on"]["negative_categories"] == seen + unseen
    # its network is the last one trained, on every category: not the comparison's (nor a fold's)
    nets = sorted(private_cache.parent.glob("gate-net-*.pt"), key=lambda f: f.stat().st_mtime_ns)
    assert len(nets) == 1 + 2 + 1
    last = torch.load(nets[-1], weights_only=True)
    assert all(torch.equal(v, last[k]) for k, v in gate.net.state_dict().items())
    assert gate.info["held_out_estimate"] == held
    assert all(gate.info["measured"][k] == rows[rep["shipped"]][k] for k in gate.info["measured"])
    card = json.loads((w / "card.json").read_text())
    assert card["ood"]["method"] == chosen and card["ood"]["threshold"] == gate.threshold
    ev = json.loads((w / "eval.json").read_text())   # annotate-ood ran on the test split
    assert ev["ood_annotation"]["gate"] == chosen and ev["ood_annotation"]["checked"] == len(split["test"])

    # Served: validation slices all pass (the threshold's margin), most of the dataset's own
    # slices pass, and noise is flagged
    p = Predictor(w)
    assert p.gate is not None and p.gate.method == chosen
    passed = {sp: [p.predict_scan(read_scan(data / r)).in_distribution for r in rels] for sp, rels in split.items()}
    assert all(passed["val"])
    assert np.mean(sum(passed.values(), [])) >= 0.75, passed
    test_pct = 100 * (1 - np.mean(passed["test"]))
    assert test_pct == pytest.approx(rows[rep["shipped"]]["test_mri_flagged_pct"]["data"], abs=0.01)
    for seed in range(3):
        noise = ScanImage(np.random.default_rng(seed).random((200, 180)).astype(np.float32))
        assert p.predict_scan(noise).in_distribution is False


def test_fit_ood_before_the_classifier_is_trained_ships_a_gate_of_its_own_parts(tmp_path):
    """Without model.safetensors fit-ood compares only the parts that read no classifier, and it
    ships one: it used to fit everything, then fail on hashing the missing weights, writing nothing."""
    from conftest import make_weights
    w = make_weights(tmp_path / "w")
    (w / "model.safetensors").unlink()
    rels = sorted(str(p.relative_to(w / "data" / "synth")) for p in (w / "data" / "synth").rglob("*.png"))
    (w / "split.json").write_text(json.dumps({"files": {"synth": {
        "train": rels[0::3], "val": rels[1::3] + rels[2::3][:2], "test": rels[2::3][2:]}}}))
    fit_ood("--weights", w, "--data-config", tmp_path / "none.toml")
    rep = json.loads((w / "ood_eval.json").read_text())
    assert set(rep["methods"]) == {"colour", "cnn", "cnn+colour"} and rep["shipped"] == rep["chosen"] == "cnn+colour"
    gate = OODGate.load(w)
    assert gate.method == "cnn+colour" and not gate.uses_classifier and "weights_sha256" not in gate.info


@pytest.mark.parametrize("args, message", [(["--folds", "1"], "1 must be at least 2"),
                                           (["--epochs", "0"], "0 must be at least 1"),
                                           (["--n-test", "-3"], "-3 must be at least 1")])
def test_fit_ood_refuses_sizes_that_would_fail_late(tmp_path, capsys, args, message):
    """--folds 1 put every category in one fold, whose gate network then had no outlier to train
    on: a crash after the whole comparison. Now a usage error before any work."""
    with pytest.raises(SystemExit) as e:
        main(["fit-ood", "--weights", str(tmp_path), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("case", ["unknown part", "two feature scorers", "classifier part, no classifier",
                                  "--out without the model", "--split that is no split"])
def test_fit_ood_refuses_a_bad_request_before_any_work(tmp_path, capsys, monkeypatch, case):
    """A bad --method was refused only after the whole comparison (about 46 minutes); --out a
    folder without the model's card got no card (the gate unusable) though the command said it
    wrote one; a --split that is no split.json ended in a traceback."""
    import core.ood
    from conftest import make_weights
    w = make_weights(tmp_path / "w")
    (w / "split.json").write_text(json.dumps({"files": {"synth": {"train": [], "val": [], "test": []}}}))
    monkeypatch.setattr(core.ood, "fit_gate_for_weights", lambda *a, **k: pytest.fail("the fit started"))
    args, message = {
        "unknown part": (["--method", "bogus+colour"], "unknown OOD method part(s): bogus"),
        "two feature scorers": (["--method", "mahalanobis+knn"], "more than one feature scorer"),
        "classifier part, no classifier": (["--method", "head+colour"], "no trained classifier"),
        "--out without the model": (["--out", str(tmp_path / "elsewhere")], "must be a copy of --weights"),
        "--split that is no split": (["--split", str(w / "card.json")], "is not a split.json"),
    }[case]
    if case == "classifier part, no classifier":
        (w / "model.safetensors").unlink()
    (tmp_path / "elsewhere").mkdir()
    assert main(["fit-ood", "--weights", str(w), *args]) == 2
    assert message in capsys.readouterr().err


def test_the_measured_estimate_keeps_altered_mri_and_trained_siblings_apart():
    """--final seen: the card's 'not brain MRI' worst was 2.5 %, which was solarised brain MRI, and a
    slice of the trained head CT's own patient was counted as held out."""
    from core.ood import _measured_estimate
    row = {"outliers_flagged_pct": {"photo": 90.0, "chart": 80.0, "mri_solarised": 2.5,
                                    "real_head_ct_top": 10.0, "noise": 100.0}}
    est = _measured_estimate(row, ["photo", "chart", "mri_solarised", "real_head_ct_top"], ["noise", "real_head_ct"])
    assert set(est["per_category"]) == {"photo", "chart", "mri_solarised"}
    assert (est["non_brain_mean_pct"], est["non_brain_min_pct"], est["altered_mri_mean_pct"]) == (85.0, 80.0, 2.5)
    est = _measured_estimate(row, ["real_head_ct_top"], [])     # a gate of scores alone trained on nothing
    assert est["per_category"] == {"real_head_ct_top": 10.0}
