"""The sidebar's model choice and operating point against hand-broken weights folders: a wrong
weights/DEFAULT, bad cards, weights that do not load, a card rewritten while the app runs."""
from __future__ import annotations

import json
import shutil

import pytest
from streamlit.testing.v1 import AppTest

import core.inference
from conftest import REPO, edited_weights
from core import app_support
from core.cli import main
from core.inference import load_card

SAMPLE = REPO / "assets" / "samples" / "glioma.jpg"


def start(monkeypatch, weights=None) -> AppTest:
    if weights is None:
        monkeypatch.delenv("BT_WEIGHTS", raising=False)
    else:
        monkeypatch.setenv("BT_WEIGHTS", str(weights))
    return AppTest.from_file(str(REPO / "streamlit_app.py"), default_timeout=90).run()


def threshold_slider(at: AppTest):
    return next(s for s in at.sidebar.slider if s.key.startswith("_threshold_widget"))


def rewrite_card(weights, **changes) -> None:
    card = json.loads((weights / "card.json").read_text())
    (weights / "card.json").write_text(json.dumps({**card, **changes}))


@pytest.fixture
def root(random_weights, tmp_path, monkeypatch):
    """A weights root holding one model folder, 'only', whose card is named 'only'."""
    r = tmp_path / "repo" / "weights"
    edited_weights(random_weights, r / "only", {"name": "only"})
    monkeypatch.setattr(core.inference, "WEIGHTS_ROOT", r)
    return r


# ----------------------------------------------------------------------------- 1: weights/DEFAULT
@pytest.mark.parametrize("default", [None, "onyl"])
def test_a_missing_or_wrong_weights_default_is_a_sidebar_warning(root, monkeypatch, default):
    # it silently served the alphabetically first folder, perhaps a narrow model without a gate
    if default is not None:
        (root / "DEFAULT").write_text(default + "\n")
    at = start(monkeypatch)
    assert not at.exception and at.session_state["weights_dir"] == str(root / "only")
    (warning,) = [w.value for w in at.sidebar.warning]
    assert str(root / "DEFAULT") in warning
    assert ("names 'onyl'" if default else "is missing") in warning


def test_a_right_weights_default_brings_no_warning(root, monkeypatch):
    (root / "DEFAULT").write_text("only\n")
    assert app_support.default_file_problem() is None


# ----------------------------------------------------------------------------- 2: operating point
@pytest.mark.parametrize("op, words", [
    ({"threshold": "high"}, "threshold must be a number between 0 and 1"),
    ({"threshold": float("nan")}, "threshold must be"),
    ({"threshold": 1.5}, "threshold must be"),
    ({"threshold": 0.5, "target_sensitivity": "high"}, "target_sensitivity must be"),
    ([0.3], "operating_point is not a block")])
def test_a_bad_operating_point_is_one_sentence_and_left_out(random_weights, tmp_path, op, words):
    bad = edited_weights(random_weights, tmp_path / "bad", {"operating_point": op})
    with pytest.raises(ValueError, match=words):
        load_card(bad)
    assert not app_support.is_model_dir(bad)


def test_a_bad_operating_point_fails_the_cli_in_one_sentence(random_weights, tmp_path, capsys):
    bad = edited_weights(random_weights, tmp_path / "bad", {"operating_point": {"threshold": "high"}})
    assert main(["predict", "--weights", str(bad), str(SAMPLE)]) == 2
    err = capsys.readouterr().err
    assert "threshold must be a number" in err and len(err.strip().splitlines()) == 1


def test_a_bad_operating_point_in_bt_weights_is_a_warning_not_a_traceback(root, random_weights, tmp_path,
                                                                         monkeypatch):
    (root / "DEFAULT").write_text("only")
    bad = edited_weights(random_weights, tmp_path / "bad", {"operating_point": {"threshold": "high"}})
    at = start(monkeypatch, bad)
    assert not at.exception, [e.message for e in at.exception]
    assert any("threshold must be a number" in w.value for w in at.sidebar.warning)
    assert at.session_state["weights_dir"] == str(root / "only")


# ----------------------------------------------------------------------------- 3: weights that do not load
def test_weights_that_do_not_load_are_said_once_in_the_sidebar_and_once_on_the_page(random_weights, tmp_path,
                                                                                  monkeypatch):
    bad = edited_weights(random_weights, tmp_path / "bad", {"weights_sha256": "0" * 64})
    at = start(monkeypatch, bad)
    assert not at.exception
    (error,) = [e.value for e in at.sidebar.error]
    assert "could not be loaded" in error and "not the ones its card describes" in error
    assert not [s for s in at.sidebar.slider if s.key.startswith("_threshold_widget")]
    at.switch_page("app_pages/diagnose.py").run()
    (shown,) = [e.value for e in at.main.error]  # not a second one pointing to the sidebar
    assert "could not be loaded" in shown and not at.exception


# ----------------------------------------------------------------------------- 4: card rewritten on disk
def test_a_rewritten_card_default_is_followed_unless_the_point_was_moved(random_weights, tmp_path, monkeypatch):
    w = edited_weights(random_weights, tmp_path / "w")
    at = start(monkeypatch, w)
    assert threshold_slider(at).value == 0.5
    rewrite_card(w, operating_point={"threshold": 0.3})  # train.py wrote the folder again
    at.run()
    assert threshold_slider(at).value == pytest.approx(0.3) and at.session_state["threshold"] == 0.3
    threshold_slider(at).set_value(0.4).run()
    rewrite_card(w, operating_point={"threshold": 0.2})
    at.run()
    assert threshold_slider(at).value == pytest.approx(0.4) and at.session_state["threshold"] == pytest.approx(0.4)
    assert not at.exception


# ----------------------------------------------------------------------------- 5: damaged card in BT_WEIGHTS
def test_a_damaged_bt_weights_card_is_reported_with_its_own_sentence(random_weights, tmp_path, monkeypatch):
    w = tmp_path / "w"
    shutil.copytree(random_weights, w)
    (w / "card.json").write_text('{"name": ')
    monkeypatch.setenv("BT_WEIGHTS", str(w))
    problem = app_support.env_weights_problem()
    assert "is damaged (not valid JSON" in problem and "is not a model folder" not in problem


# ----------------------------------------------------------------------------- 6: preprocessing keys
@pytest.mark.parametrize("drop", ["size", "mean", "std"])
def test_a_card_without_a_preprocessing_key_fails_in_one_sentence(random_weights, tmp_path, drop):
    spec = {k: v for k, v in load_card(random_weights)["preprocessing"].items() if k != drop}
    bad = edited_weights(random_weights, tmp_path / "bad", {"preprocessing": spec})
    with pytest.raises(ValueError, match="preprocessing block needs size"):
        load_card(bad)
    assert not app_support.is_model_dir(bad)


# ----------------------------------------------------------------------------- 7: relative BT_WEIGHTS
def test_a_relative_bt_weights_is_found_in_the_repository_as_weights_is(root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no weights/ here: --weights looks in the repository, so must BT_WEIGHTS
    monkeypatch.setenv("BT_WEIGHTS", "weights/only")
    assert core.inference.default_weights() == root / "only"
    assert app_support.env_weights_problem() is None


# ----------------------------------------------------------------------------- 8: chooser labels
def test_model_labels_name_the_folder_only_when_it_differs_and_mark_bt_weights(root, random_weights, tmp_path,
                                                                              monkeypatch):
    (root / "DEFAULT").write_text("only")
    edited_weights(random_weights, root / "other")  # card name 'test-random'
    copy = edited_weights(random_weights, tmp_path / "mine" / "only", {"name": "only"})
    at = start(monkeypatch, copy)
    assert not at.exception
    # weights/DEFAULT's folder is marked: among a dozen names, the one to start from
    assert at.selectbox(key="_model_widget").options == ["only (BT_WEIGHTS)", "only (default)", "test-random (other)"]


# ----------------------------------------------------------------------------- 9: eval.json of other classes
def test_eval_json_of_other_classes_is_one_sentence_on_evaluation(random_weights, tmp_path, monkeypatch):
    w = tmp_path / "w"
    shutil.copytree(random_weights, w)
    ev = json.loads((w / "eval.json").read_text())
    ev["classes"] = ["cat", "dog"]
    for r in ev["predictions"]:
        r["probs"] = {"cat": 0.4, "dog": 0.6}
    (w / "eval.json").write_text(json.dumps(ev))
    problem = app_support.eval_problem(w)
    assert "classes cat, dog, not the card's glioma" in problem
    at = start(monkeypatch, w)
    at.switch_page("app_pages/evaluation.py").run()
    assert not at.exception, [e.message for e in at.exception]
    assert problem in [x.value for x in at.main.warning]


# ----------------------------------------------------------------------------- review N: more card blocks
@pytest.mark.parametrize("changes, words", [
    ({"uncertainty": [1, 2]}, "uncertainty block is not a block"),
    ({"uncertainty": {"lo": "abc", "hi": 0.9}}, "lo must be numbers between 0 and 1"),
    ({"uncertainty": {"lo": 0.9, "hi": 0.1}}, "band runs backwards"),
    ({"uncertainty": {"min_confidence": float("nan")}}, "min_confidence must be")])
def test_a_bad_referral_block_is_one_sentence(random_weights, tmp_path, changes, words):
    bad = edited_weights(random_weights, tmp_path / "bad", changes)
    with pytest.raises(ValueError, match=words):
        load_card(bad)


def test_a_mistyped_crop_is_refused_rather_than_turning_the_head_crop_off(random_weights, tmp_path):
    spec = {**load_card(random_weights)["preprocessing"], "crop": "centre"}
    with pytest.raises(ValueError, match="crop is 'centre'"):
        load_card(edited_weights(random_weights, tmp_path / "bad", {"preprocessing": spec}))


def test_probabilities_that_are_not_numbers_are_never_a_no_tumour_call(random_weights, monkeypatch):
    import numpy as np
    from core.inference import Predictor
    from core.reader import ScanError, read_scan
    p = Predictor(random_weights)
    monkeypatch.setattr(p, "probabilities", lambda x: np.full((1, len(p.classes)), np.nan, np.float32))
    with pytest.raises(ScanError, match="no usable probabilities"):
        p.predict_scan(read_scan(SAMPLE))


def test_a_gate_from_another_model_is_refused(tmp_path):
    from core.inference import Predictor, load_card as card_of
    src, other = REPO / "weights" / "resnet18_176_copyaware_ft", REPO / "weights" / "resnet18_176_ft_mask"
    mixed = tmp_path / "mixed"
    shutil.copytree(src, mixed)
    shutil.copy(other / "ood.safetensors", mixed / "ood.safetensors")   # the card still lists its own
    assert card_of(mixed)["ood"]["threshold"] != card_of(other)["ood"]["threshold"]
    with pytest.raises(ValueError, match="not the one its card lists"):
        Predictor(mixed)


def test_a_folder_missing_the_gate_its_card_lists_is_named_so_and_left_out(tmp_path):
    src = REPO / "weights" / "resnet18_176_copyaware_ft"
    d = tmp_path / "nogate"
    d.mkdir()
    for f in ("card.json", "model.safetensors"):   # what the app called a model folder
        shutil.copy(src / f, d / f)
    assert "lists an out-of-distribution gate but" in app_support.model_dir_problem(d)
    assert "ood.safetensors is missing" in app_support.model_dir_problem(d)
    assert not app_support.is_model_dir(d)
    shutil.copy(src / "ood.safetensors", d / "ood.safetensors")
    assert app_support.model_dir_problem(d) is None
