"""Metrics against confusion matrices worked out by hand; loss, calibration and operating point."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf

from core.engine import CalibrationWarning, fit_temperature, pick_threshold, set_nll
from core.labels import is_tumour_label
from core.metrics import (classification_metrics, decide, expected_calibration_error,
                          risk_coverage, threshold_curve, tumour_probability,
                          wilson)

C4 = ["glioma", "meningioma", "pituitary", "notumor"]


def probs_for(preds, right):
    """One row per prediction: 0.7 on the predicted class if right else 0.55; the rest shared."""
    rows = []
    for p, ok in zip(preds, right):
        top = 0.7 if ok else 0.55
        row = [(1 - top) / 3] * 4
        row[C4.index(p)] = top
        rows.append(row)
    return np.array(rows)


# labels:  g g g m m p p n n n
# preds:   g g m m n p p n n g
# Confusion (rows = truth g, m, p, n; columns = prediction):
#   g: 2 1 0 0
#   m: 0 1 0 1
#   p: 0 0 2 0
#   n: 1 0 0 2
LABELS = ["glioma"] * 3 + ["meningioma"] * 2 + ["pituitary"] * 2 + ["notumor"] * 3
PREDS = ["glioma", "glioma", "meningioma", "meningioma", "notumor", "pituitary", "pituitary",
         "notumor", "notumor", "glioma"]


def test_four_class_metrics_by_hand():
    right = [lab == p for lab, p in zip(LABELS, PREDS)]
    m = classification_metrics(probs_for(PREDS, right), LABELS, C4)
    assert m["classes"] == C4 and m["n"] == 10 and m["n_fine"] == 10
    assert m["confusion"] == [[2, 1, 0, 0], [0, 1, 0, 1], [0, 0, 2, 0], [1, 0, 0, 2]]
    assert m["accuracy"] == pytest.approx(0.7)
    expected = {
        # precision = diagonal / column sum, recall = diagonal / row sum,
        # specificity = TN / (TN + FP) with TN = 10 - row - column + diagonal.
        "glioma": (2 / 3, 2 / 3, 2 / 3, 6 / 7, 3),
        "meningioma": (1 / 2, 1 / 2, 1 / 2, 7 / 8, 2),
        "pituitary": (1.0, 1.0, 1.0, 1.0, 2),
        "notumor": (2 / 3, 2 / 3, 2 / 3, 6 / 7, 3),
    }
    for c, (prec, rec, f1, spec, sup) in expected.items():
        pc = m["per_class"][c]
        assert pc["precision"] == pytest.approx(prec), c
        assert pc["recall"] == pytest.approx(rec), c
        assert pc["f1"] == pytest.approx(f1), c
        assert pc["specificity"] == pytest.approx(spec), c
        assert pc["support"] == sup, c
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 1 + 2 / 3) / 4)
    # Tumour vs no tumour: 7 tumours, one (a meningioma) called notumor; 3 normals, one flagged.
    assert m["tumour_missed"] == 1 and m["normal_flagged"] == 1
    assert m["n_tumour"] == 7 and m["n_normal"] == 3
    assert m["sensitivity"] == pytest.approx(6 / 7) and m["specificity"] == pytest.approx(2 / 3)
    assert m["binary_accuracy"] == pytest.approx(8 / 10)
    # 7 right at confidence 0.7 (bin accuracy 1), 3 wrong at 0.55 (bin accuracy 0):
    # ECE = 0.7 * |0.7 - 1| + 0.3 * |0.55 - 0| = 0.21 + 0.165.
    assert m["ece"] == pytest.approx(0.375)
    # 95% Wilson intervals: 7 of 10 right is the textbook (0.397, 0.892)
    assert m["ci95"]["accuracy"] == pytest.approx([0.3968, 0.8922], abs=1e-4)
    assert m["ci95"]["sensitivity"] == pytest.approx(list(wilson(6, 7)))
    assert m["ci95"]["specificity"] == pytest.approx(list(wilson(2, 3)))


def test_ece_tiny_case():
    # Two bins: {0.9, 0.9} with one right -> |0.9 - 0.5| = 0.4; {0.6, 0.6} both right -> 0.4.
    assert expected_calibration_error([0.9, 0.9, 0.6, 0.6], [1, 0, 1, 1]) == pytest.approx(0.4)
    assert expected_calibration_error([0.8] * 5, [1, 1, 1, 1, 0]) == pytest.approx(0.0)
    assert math.isnan(expected_calibration_error([], []))


def test_coarse_labels_count_for_tumour_metrics_only():
    # Br35H-style labels against a 4-class model: not in the confusion matrix, yet misses count.
    labels = ["tumor", "tumor", "tumor", "notumor", "glioma"]
    preds = ["pituitary", "notumor", "glioma", "meningioma", "glioma"]
    m = classification_metrics(probs_for(preds, [True] * 5), labels, C4)
    assert m["n"] == 5 and m["n_fine"] == 2
    assert m["confusion"] == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]]
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["tumour_missed"] == 1 and m["normal_flagged"] == 1
    assert m["n_tumour"] == 4 and m["sensitivity"] == pytest.approx(3 / 4)


def test_binary_model_metrics():
    classes = ["tumor", "notumor"]
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = ["tumor", "tumor", "notumor", "notumor"]
    m = classification_metrics(probs, labels, classes)
    assert m["confusion"] == [[1, 1], [1, 1]]
    assert m["tumour_missed"] == 1 and m["normal_flagged"] == 1
    assert m["accuracy"] == pytest.approx(0.5)


def test_decide_at_thresholds():
    p = np.array([[0.30, 0.10, 0.10, 0.50],    # tumour probability 0.5, best tumour class glioma
                  [0.05, 0.05, 0.10, 0.80],    # 0.2, best pituitary
                  [0.10, 0.60, 0.10, 0.20]])   # 0.8, best meningioma
    assert decide(p, C4, None).tolist() == [3, 3, 1]
    assert decide(p, C4, 0.5).tolist() == [0, 3, 1]   # at the threshold counts as tumour
    assert decide(p, C4, 0.51).tolist() == [3, 3, 1]
    assert decide(p, C4, 0.1).tolist() == [0, 2, 1]
    assert decide(p, C4, 0.9).tolist() == [3, 3, 3]
    assert tumour_probability(p, C4) == pytest.approx([0.5, 0.2, 0.8])
    # A model without a notumor class ignores the threshold.
    assert decide(p[:, :3], C4[:3], 0.99).tolist() == [0, 2, 1]
    m = classification_metrics(p, ["glioma", "pituitary", "notumor"], C4, threshold=0.1)
    assert m["threshold"] == 0.1 and m["tumour_missed"] == 0 and m["normal_flagged"] == 1


def test_decide_keeps_a_class_that_is_neither_tumour_nor_none():
    c5 = ["glioma", "meningioma", "pituitary", "stroke", "notumor"]
    p = np.array([[0.05, 0.0, 0.0, 0.90, 0.05],    # stroke, tumour probability 0.05
                  [0.30, 0.0, 0.0, 0.20, 0.50],    # tumour probability 0.3
                  [0.60, 0.0, 0.0, 0.30, 0.10]])
    assert decide(p, c5, 0.5).tolist() == [3, 4, 0]
    assert decide(p, c5, 0.2).tolist() == [3, 0, 0]


def test_a_call_of_a_class_that_is_neither_is_not_a_tumour_call():
    """A tumour called 'stroke' is missed and a normal called 'stroke' is no false alarm: the
    headline, the threshold curve, silent misses and the gallery count it alike (they counted
    'anything but notumor' as a tumour call, the curve did not)."""
    from core.dashboard import is_missed_tumour
    from core.evaluation import evaluate_records
    from core.metrics import other_calls
    c5 = ["glioma", "meningioma", "pituitary", "notumor", "stroke"]
    p = np.array([[.1, .05, .05, .1, .7], [.6, .1, .1, .1, .1], [.05, .05, .05, .15, .7], [.05, .05, .05, .8, .05]])
    labels = ["glioma", "glioma", "notumor", "notumor"]
    m = classification_metrics(p, labels, c5, 0.5)
    assert (m["tumour_missed"], m["sensitivity"], m["normal_flagged"]) == (1, 0.5, 0)
    at = {r["threshold"]: r for r in threshold_curve(tumour_probability(p, c5), np.array([1, 1, 0, 0], bool),
                                                     extra=(0.5,), other=other_calls(p, c5))}
    assert (at[0.5]["missed"], at[0.5]["false_alarm_rate"]) == (1, 0.0)
    assert at[0.0]["missed"] == 1          # no operating point makes 'stroke' a tumour call
    records = [{"file": f"{k}.png", "label": lab, "probs": dict(zip(c5, row)), "in_distribution": True,
                "uncertain": False} for k, (lab, row) in enumerate(zip(labels, p.tolist()))]
    for r, k in zip(records, decide(p, c5, 0.5)):
        r["pred"] = c5[k]
    ev = evaluate_records(records, c5, 0.5)
    assert (ev["tumour_missed"], ev["silent_misses"]) == (1, 1)
    assert [is_missed_tumour(r) for r in records] == [True, False, False, False]


def test_a_call_that_is_neither_is_no_tumour_call_for_referral_pairing_and_yes_no_folders():
    """The same 'anything but notumor' remained in the type-referral rule, the paired comparison
    and the tumour-vs-no-tumour scoring of yes/no folders (which then called a 'stroke' call a
    tumour again from the summed probability)."""
    from core.compare import paired_calls
    from core.evaluation import score_labelled
    from core.referral import ReferralRule
    c5 = ["glioma", "meningioma", "pituitary", "notumor", "stroke"]
    rule = ReferralRule(c5, .3, .4, min_type_confidence=.6)
    assert not rule.flags(np.array([[.1, .1, .1, .1, .6]]), np.array([4]), .5)[1][0]   # no type to doubt
    assert rule.flags(np.array([[.3, .25, .2, .1, .15]]), np.array([0]), .5)[1][0]
    found = paired_calls([({"label": "stroke", "pred": "stroke"},) * 2, ({"label": "glioma", "pred": "stroke"},) * 2])
    assert (found["tumours_found"]["n"], found["tumours_found"]["a_right"]) == (1, 0)
    rows = [[.3, .1, .1, .1, .4], [.6, .1, .1, .1, .1], [.05, .05, .05, .8, .05]]
    recs = [{"file": f"{k}.png", "label": lab, "probs": dict(zip(c5, row)), "in_distribution": True, "uncertain": False,
             "pred": c5[int(np.argmax(row))]} for k, (lab, row) in enumerate(zip(["tumor", "tumor", "notumor"], rows))]
    ev = score_labelled(recs, c5, 0.5, [])
    at = {r["threshold"]: r for r in ev["threshold_curve"]}
    assert (ev["tumour_missed"], ev["silent_misses"], at[0.5]["missed"]) == (1, 1, 1)


def test_a_model_that_cannot_call_no_tumour_has_no_sensitivity():
    """Without 'notumor' every call is a tumour: 100 % sensitivity would be true by construction."""
    m = classification_metrics(np.array([[.2, .3, .5]]), ["glioma"], ["glioma", "meningioma", "pituitary"])
    assert "sensitivity" not in m and "tumour_missed" not in m and m["accuracy"] == 0.0


def test_is_tumour_label():
    assert [is_tumour_label(x) for x in ("glioma", "tumor", "notumor", "other")] == \
        [True, True, False, None]


def test_threshold_curve_and_risk_coverage():
    t = np.array([0.1, 0.4, 0.6, 0.9])
    is_t = np.array([False, True, False, True])
    rows = {round(r["threshold"], 2): r for r in threshold_curve(t, is_t, n=11)}
    assert rows[0.0]["missed"] == 0 and rows[0.0]["false_alarm_rate"] == 1.0
    assert rows[0.5]["missed"] == 1 and rows[0.5]["miss_rate"] == 0.5
    assert rows[0.5]["false_alarm_rate"] == 0.5
    assert rows[1.0]["missed"] == 2
    # an operating point between grid points is on the curve itself (0.4 < 0.45 < 0.5 drew a line)
    exact = {r["threshold"]: r for r in threshold_curve(t, is_t, n=11, extra=(0.45, None))}
    assert len(exact) == 12 and exact[0.45]["miss_rate"] == 0.5 and exact[0.45]["false_alarm_rate"] == 0.5
    rc = risk_coverage(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 1, 0, 0]))
    assert rc[0]["coverage"] == 0.5 and rc[0]["accuracy"] == 1.0
    assert rc[-1]["coverage"] == 1.0 and rc[-1]["accuracy"] == 0.5


# ----------------------------------------------------------------------------- loss
def test_set_nll_is_cross_entropy_for_fine_labels():
    torch.manual_seed(0)
    logits = torch.randn(7, 4)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 3])
    allowed = nnf.one_hot(y, 4).bool()
    assert set_nll(logits, allowed).item() == pytest.approx(nnf.cross_entropy(logits, y).item(), rel=1e-6)
    assert set_nll(logits, allowed, smoothing=0.1).item() == pytest.approx(
        nnf.cross_entropy(logits, y, label_smoothing=0.1).item(), rel=1e-5)


def test_set_nll_for_coarse_tumour_label():
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    allowed = torch.tensor([[True, True, True, False]] * 2)
    p_no = torch.softmax(logits, 1)[:, 3]
    expected = (-torch.log(1 - p_no)).mean()
    assert set_nll(logits, allowed).item() == pytest.approx(expected.item(), rel=1e-6)


# ----------------------------------------------------------------------------- calibration
def test_fit_temperature_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(6000, 4, generator=g) * 2.0
    y = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=g)[:, 0]
    masks = nnf.one_hot(y, 4).bool()
    for t_true in (0.5, 2.5):
        t = fit_temperature(true_logits * t_true, masks)   # over/under-confident by t_true
        assert t == pytest.approx(t_true, rel=0.1)
    assert fit_temperature(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool)) == 1.0


@pytest.mark.parametrize("target", [0.9, 0.95, 0.99])
def test_pick_threshold_meets_target_sensitivity(target):
    rng = np.random.default_rng(1)
    is_t = rng.random(400) < 0.6
    t_prob = np.clip(np.where(is_t, rng.beta(2, 5, 400), rng.beta(1, 8, 400)), 0, 1)
    thr = pick_threshold(t_prob, is_t, target)
    assert 0 < thr <= 0.5
    assert (t_prob[is_t] >= thr).mean() >= target
    # Highest such threshold: the next tumour probability above it loses the target.
    above = np.sort(t_prob[is_t][t_prob[is_t] > thr])
    if thr < 0.5 and len(above):
        assert (t_prob[is_t] >= above[0] + 1e-9).mean() < target


def test_pick_threshold_is_capped_at_one_half_and_handles_no_tumours():
    t_prob = np.array([0.9, 0.95, 0.97, 0.1])
    is_t = np.array([True, True, True, False])
    assert pick_threshold(t_prob, is_t, 0.99) == 0.5
    assert pick_threshold(np.array([0.2]), np.array([False]), 0.99) == 0.5


def test_pick_threshold_specificity_floor_holds_in_every_source():
    # Source a: 100 normals far below every threshold; source b: 40 normals spread up to 0.4.
    # Pooled, b's false alarms are diluted; per source, the floor must hold in b as well.
    rng = np.random.default_rng(0)
    t_a = rng.uniform(0, 0.01, 100)
    t_b = np.linspace(0.0, 0.4, 40)
    tumours = rng.uniform(0.05, 1.0, 100)
    t_prob = np.concatenate([t_a, t_b, tumours])
    is_t = np.r_[np.zeros(140, bool), np.ones(100, bool)]
    src = np.array(["a"] * 100 + ["b"] * 40 + ["a"] * 100)
    pooled = pick_threshold(t_prob, is_t, 0.99, 0.95)
    per_source = pick_threshold(t_prob, is_t, 0.99, 0.95, groups=src)
    assert per_source > pooled
    assert (t_b < per_source).mean() >= 0.95 and (t_b < pooled).mean() < 0.95
    # a source with too few normals to judge does not move the threshold
    few = np.array(["a"] * 100 + ["b"] * 40 + ["a"] * 100)
    few[100:130] = "a"  # b keeps 10 normals only
    assert pick_threshold(t_prob, is_t, 0.99, 0.95, groups=few, min_group_normals=20) <= per_source


def test_macro_f1_averages_the_classes_the_set_has():
    # An LGG-like set (glioma and notumor only) with one glioma called meningioma: the class it
    # has no image of must not enter the average with an F1 of 0.
    classes = ["glioma", "meningioma", "pituitary", "notumor"]
    labels = ["glioma"] * 4 + ["notumor"] * 4
    probs = np.array([[0.9, 0.05, 0.03, 0.02]] * 3 + [[0.1, 0.8, 0.05, 0.05]] + [[0.05, 0.05, 0.05, 0.85]] * 4)
    m = classification_metrics(probs, labels, classes)
    f1_glioma, f1_notumor = 2 * 3 / (2 * 3 + 1), 1.0
    assert m["macro_f1"] == pytest.approx((f1_glioma + f1_notumor) / 2)


def test_a_class_without_images_has_no_recall_and_one_never_called_no_precision():
    """LGG has glioma and notumor only: meningioma's recall and F1 are n/a, not 0.000."""
    labels, preds = ["glioma", "glioma", "notumor"], ["glioma", "meningioma", "notumor"]
    m = classification_metrics(probs_for(preds, [True, False, True]), labels, C4)
    men, pit = m["per_class"]["meningioma"], m["per_class"]["pituitary"]
    assert men["support"] == 0 and men["recall"] is None and men["f1"] is None
    assert men["precision"] == 0.0                      # called once, wrongly
    assert pit["precision"] is None and pit["recall"] is None and pit["specificity"] == 1.0
    assert m["per_class"]["glioma"]["recall"] == pytest.approx(0.5)


def test_the_reliability_diagram_uses_the_bins_of_its_ece():
    from core.metrics import expected_calibration_error, reliability
    rng = np.random.default_rng(0)
    conf = rng.uniform(0.3, 1, 500)
    correct = rng.random(500) < conf
    bins = reliability(conf, correct)
    from_bins = sum(b["n"] * abs(b["confidence"] - b["accuracy"]) for b in bins) / 500
    assert from_bins == pytest.approx(expected_calibration_error(conf, correct))


def test_the_tumour_probability_is_calibrated_on_every_source_typed_or_not():
    from core.metrics import reliability
    # Br35H labels ("tumor", no type) have no class calibration; the tumour probability has one.
    # Tumour probabilities 0.9, 0.9 (both tumours: |0.9 - 1| = 0.1) and 0.6, 0.6 (one tumour:
    # |0.6 - 0.5| = 0.1): ECE 0.1.
    classes = ["glioma", "meningioma", "notumor", "pituitary"]
    probs = np.array([[0.5, 0.4, 0.1, 0.0], [0.0, 0.0, 0.1, 0.9], [0.6, 0.0, 0.4, 0.0], [0.3, 0.3, 0.4, 0.0]])
    m = classification_metrics(probs, ["tumor", "tumor", "tumor", "notumor"], classes, threshold=0.5)
    assert m["ece"] is None and m["accuracy"] is None and m["tumour_ece"] == pytest.approx(0.1)
    assert [(b["n"], b["accuracy"]) for b in m["tumour_reliability"]] == [(2, 0.5), (2, 1.0)]
    # every value is binned once: exactly 0 (a top-class confidence never is 0) and a stored sum
    # of rounded probabilities just above 1
    bins = reliability(np.array([0.0, 0.5, 1.0, 1.000001]), np.array([0, 1, 1, 1]))
    assert sum(b["n"] for b in bins) == 4 and bins[-1]["n"] == 2
    # binned, each counts: 1.000001 wrong and 0 right give ECE 1 (unbinned, both would give 0)
    assert expected_calibration_error([1.000001, 0.0], [0, 1]) == pytest.approx(1.0, abs=1e-5)
    zero = classification_metrics(np.array([[0.0, 0.0, 1.0, 0.0]]), ["notumor"], classes)
    assert zero["tumour_ece"] == 0.0 and zero["tumour_reliability"][0]["n"] == 1


def test_a_yes_no_set_against_a_typed_model_has_no_accuracy_from_its_normals_alone():
    labels, preds = ["tumor", "tumor", "notumor", "notumor"], ["glioma", "notumor", "notumor", "glioma"]
    m = classification_metrics(probs_for(preds, [True, False, True, False]), labels, C4, 0.5)
    assert m["accuracy"] is None and m["confusion"] == []
    assert m["sensitivity"] == pytest.approx(0.5) and m["specificity"] == pytest.approx(0.5)


def test_risk_coverage_judges_the_call_and_a_one_class_set_has_no_macro_f1():
    from core.evaluation import evaluate_records
    C = ["glioma", "meningioma", "pituitary", "notumor"]
    def rec(lab, p, src="s"):
        t = 1 - p["notumor"]
        pred = max((c for c in C if c != "notumor"), key=p.get) if t >= 0.05 else "notumor"
        return {"file": f"{lab}{len(p)}", "source": src, "label": lab, "pred": pred, "probs": p,
                "tumour_probability": t, "confidence": p[pred], "uncertain": False,
                "type_uncertain": False, "in_distribution": True, "ood_score": None}
    # a normal scan called pituitary at a low operating point (0.05): the top class is right, the call is not
    normal = rec("notumor", {"glioma": .02, "meningioma": .02, "pituitary": .04, "notumor": .92})
    tumour = rec("glioma", {"glioma": .9, "meningioma": .04, "pituitary": .03, "notumor": .03})
    ev = evaluate_records([normal, tumour], C, 0.05)
    assert normal["pred"] == "pituitary" and ev["accuracy"] == 0.5
    assert ev["risk_coverage"][-1]["coverage"] == 1.0 and ev["risk_coverage"][-1]["accuracy"] == 0.5  # was 1.0
    normals = [rec("notumor", {"glioma": .01, "meningioma": .01, "pituitary": .01, "notumor": .97}, "brisc")] * 3
    brisc = evaluate_records(normals, C, 0.5)
    assert brisc["accuracy"] == 1.0 and brisc["macro_f1"] is None  # an average over one class


def test_decide_sums_the_tumour_probability_in_float64_whatever_comes_in():
    """Served float32 probabilities summed to 0.5 in float32 and 0.49999999 in float64: the CLI
    (float32) called a tumour, the app (float64) no tumour, at the 0.5 operating point."""
    from core.metrics import decide, tumour_probability
    classes = ["glioma", "meningioma", "pituitary", "notumor"]
    t = np.array([0.19961661100387573, 0.28152167797088623, 0.01886170543730259], np.float32)
    p32 = np.array([[*t, 0.5]], np.float32)
    assert p32[0, :3].sum(dtype=np.float32) >= 0.5 > p32[0, :3].astype(np.float64).sum()
    assert tumour_probability(p32, classes)[0] < 0.5
    assert decide(p32, classes, 0.5)[0] == decide(p32.astype(np.float64), classes, 0.5)[0] == 3


def test_pick_threshold_reaches_tumours_below_one_in_ten_thousand():
    """A floor at 1e-4 left a weak model's tumours at p < 1e-4 missed against the target."""
    t_prob = np.array([5e-5] * 2 + [0.9] * 98 + [0.01] * 50)
    is_t = np.array([True] * 100 + [False] * 50)
    thr = pick_threshold(t_prob, is_t, 0.99)
    assert (t_prob[is_t] >= thr).mean() >= 0.99


def test_a_folded_record_is_as_confident_as_the_class_it_calls():
    from core.evaluation import _as_tumour_vs_none
    r = {"file": "a.png", "label": "yes", "pred": "glioma", "tumour_probability": 0.4,
         "probs": {"glioma": 0.3, "meningioma": 0.05, "pituitary": 0.05, "notumor": 0.6}}
    folded = _as_tumour_vs_none(r, 0.154)
    assert folded["pred"] == "tumor" and folded["confidence"] == pytest.approx(0.4)


def test_the_threshold_curve_counts_the_headline_misses_at_the_operating_point():
    """resnet18_176_ft_mask at 0.925: 38 missed in the headline, 37 on the curve, because the curve
    read the separately rounded stored tumour probability and the headline summed the class ones."""
    from core.evaluation import evaluate_records
    classes = ["glioma", "meningioma", "pituitary", "notumor"]
    rec = {"file": "glioma/a.png", "source": "s", "label": "glioma", "pred": "notumor",
           "probs": dict(zip(classes, [0.3, 0.3, 0.3249995, 0.0750005])),
           "tumour_probability": 0.925, "confidence": 0.3, "uncertain": False, "in_distribution": True}
    normal = {**rec, "file": "notumor/b.png", "label": "notumor"}
    ev = evaluate_records([rec, normal], classes, 0.925)
    row = next(r for r in ev["threshold_curve"] if r["threshold"] == 0.925)
    assert ev["tumour_missed"] == row["missed"] == 1


def test_fit_temperature_stays_finite_and_no_worse_than_none_on_small_logits():
    """LBFGS without a line search overshot on small, half-wrong logits (log T to -46, then NaN):
    a run then shipped a card with temperature NaN that every command refused."""
    import math
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(12, 4, generator=g) * 0.2
        y = z.argmax(1).clone()
        y[::2] = torch.randint(0, 4, (6,), generator=g)
        masks = torch.zeros(12, 4, dtype=torch.bool)
        masks[torch.arange(12), y] = True
        t = fit_temperature(z, masks)
        assert math.isfinite(t) and 0.05 <= t <= 20, (seed, t)
        assert float(set_nll(z / t, masks)) <= float(set_nll(z, masks)) + 1e-6, seed


def test_the_specificity_floor_never_lifts_the_threshold_above_even_odds():
    """Normals of a source at p(tumour) 0.6-0.9: the floor would ask for 0.9, but a tumour more
    likely than not is still flagged (CAP_THRESHOLD)."""
    rng = np.random.default_rng(0)
    t_prob = np.r_[rng.uniform(0.8, 1.0, 50), rng.uniform(0.6, 0.9, 30)]
    is_t = np.r_[np.ones(50, bool), np.zeros(30, bool)]
    thr = pick_threshold(t_prob, is_t, 0.99, min_specificity=0.9)
    assert thr == pytest.approx(0.5)
    low = np.r_[rng.uniform(0.8, 1.0, 50), rng.uniform(0.0, 0.3, 30)]
    assert 0.3 < pick_threshold(low, is_t, 0.99, min_specificity=0.9) <= 0.5


def test_specificity_and_sensitivity_by_hand_with_misses_and_false_alarms_apart():
    """4 tumours (1 called no tumour) and 4 normals (2 flagged): sensitivity 3/4, specificity 2/4;
    the fixture above has as many misses as false alarms, which a swapped formula passes."""
    labels = ["glioma"] * 4 + ["notumor"] * 4
    preds = ["glioma", "glioma", "glioma", "notumor", "notumor", "notumor", "glioma", "glioma"]
    m = classification_metrics(probs_for(preds, [a == b for a, b in zip(labels, preds)]), labels, C4)
    assert (m["tumour_missed"], m["normal_flagged"]) == (1, 2)
    assert m["sensitivity"] == pytest.approx(3 / 4) and m["specificity"] == pytest.approx(2 / 4)
    assert m["per_class"]["notumor"]["specificity"] == pytest.approx(3 / 4)   # of the 4 non-normals, 1 called normal
    assert m["per_class"]["glioma"]["specificity"] == pytest.approx(2 / 4)


def test_fit_temperature_of_non_finite_logits_is_nan_for_the_caller_to_refuse():
    masks = torch.eye(4, dtype=torch.bool)
    for bad in (float("nan"), float("inf")):
        z = torch.eye(4)
        z[1, 2] = bad
        assert math.isnan(fit_temperature(z, masks))


def test_pick_threshold_counts_calls_of_another_class_and_pools_a_floor_no_source_can_hold():
    """A tumour called 'stroke' (p(stroke) 0.45, the tumour types 0.55 together) is served as
    'stroke' whatever the threshold, but counted as caught: the card said 1.0 where it was 0.9.
    And with two sources of 15 validation normals each, the specificity floor held nowhere."""
    t = np.r_[np.full(90, 0.9), np.full(10, 0.55), np.full(50, 0.05)]
    is_t = np.r_[np.ones(100, bool), np.zeros(50, bool)]
    never = np.r_[np.zeros(90, bool), np.ones(10, bool), np.zeros(50, bool)]
    thr = pick_threshold(t, is_t, 0.99, never=never)
    called = (t >= thr) & ~never
    assert called[is_t].mean() == 0.9                       # the target cannot be met: every reachable tumour is
    assert thr < 0.9
    # normals called the other class are right at any threshold: they do not push the floor
    probs = np.r_[np.full(90, 0.3), np.full(10, 0.4), np.full(30, 0.01)]
    y = np.r_[np.ones(90, bool), np.zeros(40, bool)]
    assert pick_threshold(probs, y, 0.99, 0.97) > 0.4          # as tumour calls, the 0.4 normals set the floor
    assert pick_threshold(probs, y, 0.99, 0.97, never=np.r_[np.zeros(90, bool), np.ones(10, bool),
                                                            np.zeros(30, bool)]) < 0.4
    rng = np.random.default_rng(0)
    tum = np.r_[np.full(95, 0.9), np.full(5, 0.001)]
    normals = rng.uniform(0.1, 0.3, 30)
    probs, y = np.r_[tum, normals], np.r_[np.ones(100, bool), np.zeros(30, bool)]
    groups = np.r_[np.array(["a", "b"] * 50), np.array(["a", "b"] * 15)]
    thr = pick_threshold(probs, y, 0.99, 0.97, groups=groups)
    assert (normals < thr).mean() >= 0.97                  # pooled: 15 + 15 normals hold the floor


def test_pick_threshold_allows_the_misses_its_target_allows_whatever_the_float_error():
    """(1 - 0.9) * 10 is 0.99999...: floored, a 90 % target over 10 tumours allowed no miss, and the
    threshold fell to the lowest tumour's. Likewise ceil(0.07 * 100) is 8, where 7 normals suffice."""
    t_prob = np.linspace(0.1, 0.9, 10)
    thr = pick_threshold(t_prob, np.ones(10, bool), 0.9)
    assert (t_prob >= thr).sum() == 9 and thr == pytest.approx(t_prob[1], abs=1e-5)
    normals = np.linspace(0.0, 0.495, 100)   # 7 of them below the floor's threshold keep 0.07
    t = np.r_[np.full(10, 1e-4), normals]   # the tumours alone would put the threshold near 0
    is_t = np.r_[np.ones(10, bool), np.zeros(100, bool)]
    thr = pick_threshold(t, is_t, 0.9, min_specificity=0.07)
    assert (normals < thr).sum() == 7


def test_a_temperature_fit_with_no_optimum_leaves_the_model_uncalibrated_and_says_so():
    """Validation all right: the NLL falls as T -> 0, and the fit ran to the bound 0.05, which
    multiplies every logit by 20 (a test error then reads as certain). All wrong: it ran to 20."""
    z = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    right = torch.zeros(3, 4, dtype=torch.bool)
    right[[0, 1, 2], [0, 1, 3]] = True
    two = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.5, 0.0]])
    for logits, masks in ((z, right), (two, ~nnf.one_hot(two.argmax(1), 2).bool())):
        with pytest.warns(CalibrationWarning, match="no optimum"):
            assert fit_temperature(logits, masks) == 1.0
    # Four classes all wrong, the right one a close second: an optimum exists, and is fitted
    close = torch.tensor([[2.0, 1.9, -3.0, -3.0], [0.0, 3.0, 2.9, -2.0]]) * 5
    second = torch.zeros(2, 4, dtype=torch.bool)
    second[[0, 1], [1, 2]] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        t = fit_temperature(close, second)
    nll = [float(set_nll(close / x, second)) for x in (1.0, t, 20.0)]
    assert 1 < t < 20 and nll[1] < nll[0] and nll[1] < nll[2]   # inside the range, below both ends
