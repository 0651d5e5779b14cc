"""Referral: the tumour call (band around the threshold) and the tumour type, judged apart."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from core.evaluation import evaluate_records
from core.metrics import decide
from core.referral import (BAND_RULE, TOP_CLASS_RULE, ReferralRule, at_threshold, pick_band,
                           pick_referral, type_confidence)

C4 = ["glioma", "meningioma", "pituitary", "notumor"]
TYPES = C4[:3]


def rows(t: float, type_share: float, top: int = 0) -> np.ndarray:
    """One 4-class row: tumour probability t, the ``top`` type holding ``type_share`` of it."""
    rest = (1 - type_share) / 2
    shares = np.full(3, rest)
    shares[top] = type_share
    return np.r_[t * shares, 1 - t]


def validation_set(seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Normals far below 0.3 but a few near it, fine tumours with clear types (a few confused),
    coarse tumours ('tumor') with the type spread evenly, and errors only near the threshold."""
    rng = np.random.default_rng(seed)
    probs, labels = [], []
    for _ in range(400):
        probs.append(rows(rng.uniform(0.0, 0.15), 0.9)); labels.append("notumor")
    for t in (0.32, 0.35, 0.4):                                     # false alarms near the threshold
        probs.append(rows(t, 0.9)); labels.append("notumor")
    for k in range(300):
        c = k % 3
        share = rng.uniform(0.9, 1.0)
        probs.append(rows(rng.uniform(0.9, 1.0), share, c)); labels.append(TYPES[c])
    for k in range(12):                                             # type errors, low type share
        probs.append(rows(rng.uniform(0.9, 1.0), 0.45, (k + 1) % 3)); labels.append(TYPES[k % 3])
    for t in (0.22, 0.25, 0.28):                                    # missed tumours near the threshold
        probs.append(rows(t, 0.9)); labels.append("glioma")
    for _ in range(200):                                            # Br35H-like coarse tumours
        probs.append(rows(rng.uniform(0.95, 1.0), 0.34)); labels.append("tumor")
    return np.array(probs), labels


def test_band_keeps_confident_coarse_tumours_and_refers_the_threshold_region():
    probs, labels = validation_set()
    u = pick_referral(probs, labels, C4, threshold=0.3, target_error=0.0, type_target_error=0.0)
    assert u["rule"] == BAND_RULE
    assert u["lo"] == pytest.approx(0.22) and 0.4 < u["hi"] < 0.41   # the six errors, no more
    assert u["val_error_kept"] == 0.0 and u["val_referred"] == pytest.approx(6 / len(labels))
    assert 0.45 < u["min_type_confidence"] < 0.91             # the confused types fall below it
    assert u["type_val_error_kept"] == 0.0 and u["type_val_referred"] == pytest.approx(12 / 312)
    # the default 0.5 % target refers only as many errors as it needs (the cheapest ones)
    loose = pick_referral(probs, labels, C4, threshold=0.3)
    assert loose["val_error_kept"] <= 0.005 and loose["val_referred"] < u["val_referred"]

    rule = ReferralRule.from_card({"classes": C4, "uncertainty": u})
    coarse = np.array([rows(t, 0.34) for t in (0.96, 0.99)])   # type spread evenly, call sure
    unc, typ = rule.flags(coarse, decide(coarse, C4, 0.3))
    assert not unc.any() and typ.all()
    assert coarse.max(1).max() < 0.4                           # the old top-class rule referred them
    near = np.array([rows(0.31, 0.95), rows(0.29, 0.95)])      # either side of the threshold
    unc, typ = rule.flags(near, decide(near, C4, 0.3))
    assert unc.all() and not typ.any()


def test_band_edges_and_fallback_within_the_cap():
    t = np.r_[np.linspace(0, 0.2, 90), np.linspace(0.8, 1, 90), [0.3, 0.45, 0.6]]
    y = np.r_[np.zeros(90, bool), np.ones(90, bool), [True, False, False]]
    b = pick_band(t, y, threshold=0.5, target_error=0.0)
    assert b["lo"] == 0.3 and 0.6 < b["hi"] < 0.61            # exactly the three errors
    assert b["val_error_kept"] == 0.0 and b["val_referred"] == pytest.approx(3 / 183)
    # 40 errors cannot all be referred within 10 %: the lowest kept error the cap allows
    t2 = np.r_[t, np.full(40, 0.7)]
    y2 = np.r_[y, np.zeros(40, bool)]
    b2 = pick_band(t2, y2, threshold=0.5, target_error=0.0)
    assert b2["val_referred"] <= 0.10 and b2["val_error_kept"] > 0
    assert b2["lo"] <= 0.5 <= b2["hi"]
    # a perfectly separated set refers nothing
    b3 = pick_band(np.r_[0.1, 0.9], np.array([False, True]), 0.5)
    assert b3["lo"] == b3["hi"] == 0.5 and b3["val_referred"] == 0.0


def test_models_without_a_tumour_decision_keep_the_top_class_rule():
    classes = ["cat", "dog", "fox"]
    sure, unsure, dog = [0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.1, 0.8, 0.1]
    probs = np.array([sure] * 19 + [dog] * 19 + [unsure] * 2)
    labels = ["cat"] * 19 + ["dog"] * 21                     # the two unsure ones are wrong
    u = pick_referral(probs, labels, classes, threshold=None)
    assert u["rule"] == TOP_CLASS_RULE and u["min_confidence"] == 0.8
    assert u["val_referred"] == pytest.approx(2 / 40) and u["val_error_kept"] == 0.0
    rule = ReferralRule.from_card({"classes": classes, "uncertainty": u})
    three = np.array([sure, unsure, dog])
    unc, typ = rule.flags(three, three.argmax(1))
    assert unc.tolist() == [False, True, False] and not typ.any()


def test_binary_model_never_flags_the_type():
    classes = ["tumor", "notumor"]
    probs = np.array([[0.95, 0.05], [0.45, 0.55], [0.1, 0.9], [0.6, 0.4]] * 30)
    labels = ["tumor", "tumor", "notumor", "notumor"] * 30
    u = pick_referral(probs, labels, classes, threshold=0.5)
    assert u["rule"] == BAND_RULE and u["min_type_confidence"] == 0.0
    rule = ReferralRule.from_card({"classes": classes, "uncertainty": u})
    _, typ = rule.flags(probs, decide(probs, classes, 0.5))
    assert not typ.any() and np.all(type_confidence(probs, classes) == 1)


def test_old_card_keeps_the_top_class_rule():
    rule = ReferralRule.from_card({"classes": C4, "uncertainty": {"min_confidence": 0.6}})
    assert not rule.uses_band
    probs = np.array([rows(0.99, 0.34), rows(0.99, 0.95), rows(0.3, 0.9)])
    unc, typ = rule.flags(probs, decide(probs, C4, 0.5))
    assert unc.tolist() == list(probs.max(1) < 0.6) and not typ.any()
    assert ReferralRule.from_card({"classes": C4}).flags(probs, np.zeros(3, int))[0].sum() == 0


def served(p: np.ndarray, rule: ReferralRule, threshold: float):
    """A `Prediction` as predict_scan makes it at ``threshold``."""
    from core.inference import Prediction
    k = int(decide(p[None], C4, threshold)[0])
    unc, typ = rule.flags(p, np.array([k]), threshold)
    return Prediction(pred=C4[k], probs=dict(zip(C4, p)), tumour_probability=float(p[:3].sum()),
                      threshold=threshold, confidence=float(p[k]), uncertain=bool(unc[0]),
                      type_uncertain=bool(typ[0]), in_distribution=True, ood_score=None)


def test_type_flag_follows_a_moved_threshold():
    rule = ReferralRule(tuple(C4), lo=0.1, hi=0.6, min_type_confidence=0.7)
    pred = served(rows(0.4, 0.4), rule, 0.5)
    assert (pred.pred, pred.type_uncertain, pred.uncertain) == ("notumor", False, True)
    moved = at_threshold(pred, C4, 0.3, rule)
    assert moved.pred == "glioma" and moved.type_uncertain is True and moved.uncertain is True
    assert "referral band" in moved.uncertain_reason and "tumour type" in moved.uncertain_reason


@pytest.mark.parametrize("t_prob, threshold, call", [(0.986, 0.99, "notumor"), (0.029, 0.01, "glioma")])
def test_a_threshold_moved_past_the_band_refers_the_calls_it_turns(t_prob, threshold, call):
    """No tumour at p(tumour) 0.986 (or a tumour at 0.029) is a call against the side the model is
    sure of: the band stretches to the operating point, so it is referred, never shown plain."""
    rule = ReferralRule(tuple(C4), lo=0.04, hi=0.95, min_type_confidence=0.0)
    pred = served(rows(t_prob, 0.9), rule, 0.5)
    assert pred.uncertain is False                          # confident at the card's threshold
    moved = at_threshold(pred, C4, threshold, rule)
    assert moved.pred == call and moved.uncertain is True
    assert moved.confidence == pytest.approx(pred.probs[call])
    assert "stretched to the operating point" in moved.uncertain_reason
    # and the same for the dashboards' records at that threshold
    from core.app_support import records_at
    rec = {"file": "x", "label": "glioma", "probs": pred.probs, "confidence": pred.confidence,
           "tumour_probability": pred.tumour_probability, "uncertain": False, "type_uncertain": False}
    (r,) = records_at([rec], C4, threshold, rule)
    assert (r["pred"], r["uncertain"], r["confidence"]) == (call, True, pytest.approx(pred.probs[call]))
    assert not records_at([rec], C4, 0.5, rule)[0]["uncertain"]


def test_old_card_rule_judges_the_class_called_not_the_top_one():
    """Called glioma at threshold 0.02 while p(notumor) is 0.95: the call's own 0.03 is referred."""
    rule = ReferralRule.from_card({"classes": C4, "uncertainty": {"min_confidence": 0.6}})
    p = np.array([[0.03, 0.01, 0.01, 0.95]])
    k = decide(p, C4, 0.02)
    assert C4[k[0]] == "glioma"
    assert rule.flags(p, k)[0].tolist() == [True]
    assert "its call (Glioma) a probability of 0.030, under the referral level 0.600" in rule.reason(p[0], int(k[0]))


def _record(source, label, p, rule, threshold=0.3):
    k = int(decide(p[None], C4, threshold)[0])
    unc, typ = rule.flags(p[None], np.array([k]))
    return {"file": f"{label}/{len(label)}.png", "source": source, "label": label, "pred": C4[k],
            "probs": dict(zip(C4, p)), "tumour_probability": float(p[:3].sum()),
            "confidence": float(p.max()), "uncertain": bool(unc[0]), "type_uncertain": bool(typ[0]),
            "in_distribution": True, "ood_score": None}


def test_evaluation_counts_referrals_apart_and_uses_the_tumour_call_for_coarse_sources():
    rule = ReferralRule(tuple(C4), lo=0.2, hi=0.5, min_type_confidence=0.7)
    recs = [_record("br35h", "tumor", rows(0.98, 0.34), rule) for _ in range(8)]
    recs += [_record("br35h", "tumor", rows(0.25, 0.9), rule),      # missed, but referred
             _record("br35h", "tumor", rows(0.1, 0.9), rule),       # missed silently
             _record("br35h", "notumor", rows(0.05, 0.9), rule)]
    recs += [_record("bench", "glioma", rows(0.97, 0.95), rule) for _ in range(4)]
    recs += [_record("bench", "meningioma", rows(0.97, 0.5, 0), rule)]  # wrong type, flagged
    ev = evaluate_records(recs, C4, 0.3)
    br = ev["per_source"]["br35h"]
    assert br["referred_uncertain"] == 1 and br["referred_type_uncertain"] == 8
    assert br["silent_misses"] == 1 and br["tumour_missed"] == 2
    assert br["risk_coverage"] == br["risk_coverage_tumour"]      # coarse: judged on the call
    assert br["risk_coverage"][-1]["accuracy"] == pytest.approx(9 / 11)
    bench = ev["per_source"]["bench"]
    assert bench["referred_type_uncertain"] == 1 and bench["referred_uncertain"] == 0
    assert bench["risk_coverage_type"][-1]["accuracy"] == pytest.approx(4 / 5)
    assert bench["risk_coverage"] != bench.get("risk_coverage_tumour")
    assert ev["referred_type_uncertain"] == 9
    # records without the new field (eval.json from before) still evaluate
    old = [{k: v for k, v in r.items() if k != "type_uncertain"} for r in recs]
    assert evaluate_records(old, C4, 0.3)["referred_type_uncertain"] == 0


# ----------------------------------------------------------------------------- predict --json
@pytest.mark.parametrize("uncertainty, bias, want", [
    ({"min_confidence": 0.8}, (0, 0, 0, 2.0), (True, False)),          # old card: top class 0.71
    ({"min_confidence": 0.5}, (0, 0, 0, 2.0), (False, False)),
    ({"lo": 0.2, "hi": 0.4, "min_type_confidence": 0.6}, (0, 0, 0, 2.0), (True, False)),  # t 0.289
    ({"lo": 0.2, "hi": 0.4, "min_type_confidence": 0.6}, (2, 2, 2, -2.0), (False, True)),  # spread types
])
def test_predict_json_carries_both_flags(tmp_path, capsys, uncertainty, bias, want):
    from test_cli import make_weights
    from core.cli import main
    w = make_weights(tmp_path / "w", bias=bias, threshold=0.3)
    card = json.loads((w / "card.json").read_text())
    card["uncertainty"] = uncertainty
    (w / "card.json").write_text(json.dumps(card))
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(40, 240, (48, 48)).astype(np.uint8)).save(img)
    assert main(["predict", "--json", "--weights", str(w), str(img)]) == 0
    x = json.loads(capsys.readouterr().out)
    assert (x["uncertain"], x["type_uncertain"]) == want
    assert (x["uncertain_reason"] is None) == (not any(want))
    assert main(["predict", "--weights", str(w), str(img)]) == 0
    text = capsys.readouterr().out
    assert ("uncertain, refer" in text) == want[0] and ("tumour type uncertain" in text) == want[1]


# ----------------------------------------------------------------------------- annotate-ood
def test_annotate_ood_adds_the_gate_flags_to_eval_json(tmp_path, capsys):
    from conftest import make_weights
    from core.cli import main
    from core.ood import OODGate
    w = make_weights(tmp_path / "w")
    OODGate("colour", [], 0.0, colour_limit=0.03).save(w)     # the colour rule alone: no training
    rgb = np.zeros((96, 96, 3), np.uint8)
    rgb[:, :48, 0], rgb[:, 48:, 1] = 230, 200                   # a colourful photo, not MRI
    Image.fromarray(rgb).save(w / "data" / "synth" / "glioma" / "0.png")
    before = json.loads((w / "eval.json").read_text())
    assert before["flagged_ood"] == 0

    assert main(["annotate-ood", "--weights", str(w), "--data-config", str(tmp_path / "none.toml")]) == 0
    assert "1 flagged" in capsys.readouterr().out
    ev = json.loads((w / "eval.json").read_text())
    byfile = {(r["source"], r["file"]): r for r in ev["predictions"]}
    bad = byfile[("synth", "glioma/0.png")]
    # the colour rule alone checks no pixels: no score, as served (`Predictor.distribution_check`)
    assert bad["in_distribution"] is False and bad["ood_score"] is None
    assert all(r["in_distribution"] and r["ood_score"] is None for k, r in byfile.items()
               if k[0] == "synth" and k[1] != "glioma/0.png")
    assert byfile[("elsewhere", "missing/x.png")]["ood_score"] is None
    assert ev["flagged_ood"] == 1 and ev["per_source"]["synth"]["flagged_ood"] == 1
    assert ev["ood_annotation"] | {"seconds": 0} == {"gate": "colour", "checked": 12, "missing": 2,
                                                     "unreadable": 0, "flagged": 1, "seconds": 0,
                                                     "precision": ev["ood_annotation"]["precision"]}
    assert ev["ood_annotation"]["precision"] in ("fp32", "bf16")   # bf16 moves gate scores near the threshold
    assert ev["accuracy"] == before["accuracy"] and len(ev["predictions"]) == len(before["predictions"])


def test_reasons_never_write_a_number_below_an_equal_looking_level():
    """Rounded to 3 decimals, 0.96695 "is below the referral level 0.967" read as a contradiction."""
    import re
    classes = ("glioma", "meningioma", "pituitary", "notumor")
    top = ReferralRule(classes, min_confidence=0.967)
    text = top.describe(np.array([[0.96695, 0.01, 0.01, 0.01305]]), 0, None, True, False)
    p, level = re.findall(r"\d\.\d+", text)
    assert p != level and float(p) < float(level), text
    band = ReferralRule(classes, 0.2, 0.8, 0.0, 0.8)
    text = band.describe(np.array([[0.3999, 0.3999, 0.0, 0.2002]]), 0, None, True, True)
    t, lo, hi = (float(v) for v in re.findall(r"\d\.\d+", text)[:3])
    assert lo <= t < hi, text
    assert "holds 50% of the tumour probability, below 80%" in text


def test_apart_adds_decimals_only_where_they_differ():
    from core.metrics import apart
    assert apart(0.96695, 0.967) == ("0.9669", "0.9670")
    assert apart(0.5, 0.9) == ("0.500", "0.900")
    assert apart(0.9696, 0.97, 1, percent=True) == ("96.96%", "97.00%")
    assert apart(0.97, 0.97) == ("0.970", "0.970")


def test_describe_call_reads_a_prediction_as_describe_reads_its_row():
    from types import SimpleNamespace
    rule = ReferralRule(tuple(C4), 0.3, 0.7, 0.0, 0.8)
    row = rows(0.5, 0.6, top=1)
    pred = SimpleNamespace(probs=dict(zip(C4, row)), pred="meningioma", threshold=0.4)
    text = rule.describe_call(pred, uncertain=True, type_uncertain=True)
    assert text == rule.describe(row, 1, 0.4, True, True)
    assert "tumour probability 0.500 is inside the referral band 0.300-0.700" in text and "holds 60% " in text
    assert rule.describe_call(pred) is None


def test_the_band_refers_its_lower_edge_and_not_its_upper_one():
    """[lo, hi): at a band stretched to the operating point, a scan exactly at the threshold is
    called a tumour plainly, one just below it is referred."""
    rule = ReferralRule(tuple(C4), 0.25, 0.75)
    probs = np.array([[t, 0, 0, 1 - t] for t in (0.25, 0.5, 0.75, 0.875, 0.125)])
    unc, _ = rule.flags(probs, decide(probs, C4, 0.5), 0.5)
    assert unc.tolist() == [True, True, False, False, False]
    unc, _ = rule.flags(probs, decide(probs, C4, 0.875), 0.875)   # band stretched to [0.25, 0.875)
    assert unc.tolist() == [True, True, True, False, False]


def test_equal_confidences_are_kept_or_referred_together():
    from core.referral import pick_min_confidence
    conf = np.r_[np.full(8, 0.9), 0.7, 0.7]
    correct = np.r_[np.ones(8, bool), True, False]   # the right 0.7 first: a split inside the tie keeps it
    r = pick_min_confidence(conf, correct, target_error=0.0, max_referred=0.5)
    assert r["min_confidence"] == pytest.approx(0.9) and r["val_referred"] == pytest.approx(0.2)


def test_pick_band_counts_a_tumour_called_another_class_as_an_error_only_the_band_refers():
    t = np.array([0.9, 0.8, 0.6, 0.1, 0.05, 0.02])
    y = np.array([True, True, True, False, False, False])
    plain = pick_band(t, y, threshold=0.5, target_error=0.0, max_referred=0.5)
    assert plain["val_error_kept"] == 0.0 and plain["val_referred"] == 0.0
    never = np.array([False, False, True, False, False, False])   # the 0.6 tumour is served as 'stroke'
    band = pick_band(t, y, threshold=0.5, target_error=0.0, max_referred=0.5, never=never)
    assert band["val_error_kept"] == 0.0 and band["lo"] <= 0.6 < band["hi"]


def test_the_band_text_says_least_reliable_only_inside_the_band_fitted_on_validation():
    """The stretched part of a band, up to an operating point moved by hand, is where the model
    was sure (the band's own docstring): 'least reliable on validation' was said of it too."""
    rule = ReferralRule(tuple(C4), 0.3, 0.7)
    inside = rule.describe(rows(0.5, 0.6, top=1), 1, 0.5, True, False)
    assert "least reliable on validation" in inside and "moved by hand" not in inside
    stretched = rule.describe(rows(0.8, 0.9, top=1), 3, 0.95, True, False)
    assert "stretched to the operating point" in stretched and "least reliable" not in stretched
    assert "moved by hand" in stretched
