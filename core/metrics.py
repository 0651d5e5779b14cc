"""Metrics from probabilities: one place for accuracy, per-class scores, tumour misses and ECE.

Labels may be fine classes of the model or coarse (``tumor``/``notumor``); fine metrics use
the samples whose label is a model class, tumour metrics use every sample with a tumour label.
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from .labels import FINE_TUMOURS, NO_TUMOUR, TUMOUR, has_tumour_decision, is_tumour_label, tumour_classes


def tumour_probability(probs: np.ndarray, classes: list[str]) -> np.ndarray:
    """Sum of the tumour classes' probabilities, in float64 whatever comes in: summed in float32
    the served path reached 0.5 where the app's float64 sum stayed at 0.49999999, and the CLI and
    the app called the same scan differently at the 0.5 operating point."""
    idx = [classes.index(c) for c in tumour_classes(classes)]
    return np.asarray(probs, dtype=np.float64)[:, idx].sum(axis=1)


def decide(probs: np.ndarray, classes: list[str], threshold: float | None) -> np.ndarray:
    """Predicted class index per row at an operating point on the tumour probability.

    At or above the threshold the most likely tumour class is predicted, below it 'notumor'.
    Without a threshold, or for a model with no notumor class, plain argmax. A class that is
    neither (a dataset's own 'stroke' folder, say) is predicted when it is the most likely: the
    operating point decides tumour against no tumour, not against it.
    """
    probs = np.asarray(probs, dtype=np.float64)   # one precision for every caller (`tumour_probability`)
    pred = probs.argmax(axis=1)
    tum = [classes.index(c) for c in tumour_classes(classes)]
    if threshold is None or NO_TUMOUR not in classes or not tum:
        return pred
    is_t = tumour_probability(probs, classes) >= threshold
    best_t = np.array(tum)[probs[:, tum].argmax(axis=1)]
    return np.where(other_calls(probs, classes), pred, np.where(is_t, best_t, classes.index(NO_TUMOUR)))


def other_classes(classes: list[str]) -> list[str]:
    """The classes that are neither a tumour nor 'notumor' (a dataset's own 'stroke' folder)."""
    return [c for c in classes if is_tumour_label(c) is None]


def other_calls(probs: np.ndarray, classes: list[str]) -> np.ndarray:
    """Rows whose most likely class is neither a tumour nor 'notumor' (a dataset's 'stroke'):
    `decide` calls them that class at every operating point, so they are never a tumour call."""
    return np.isin(np.asarray(probs).argmax(axis=1), [classes.index(c) for c in other_classes(classes)])


def tumour_calls(pred: np.ndarray, classes: list[str]) -> np.ndarray:
    """Which predicted class indices say 'a tumour is present': a tumour class, not 'anything but
    notumor' (a tumour called 'stroke' is missed)."""
    return np.isin(pred, [classes.index(c) for c in tumour_classes(classes)])


def digits_apart(a: float, b: float, digits: int = 3, percent: bool = False) -> int:
    """The fewest decimals (at least ``digits``; for ``percent``, of the percentage) that write
    ``a`` and ``b`` differently, so that a sentence saying one is below the other never reads
    "0.967 is below 0.967". Equal values stay at ``digits``."""
    a, b = (a * 100, b * 100) if percent else (a, b)
    if a == b or not (math.isfinite(a) and math.isfinite(b)):
        return digits
    # 17 significant digits of the larger tell any two distinct floats apart: a float32
    # 0.49999997, or 0.49999999999999994, must not read "0.500" beside a threshold 0.5
    last = max(digits, 17 - math.floor(math.log10(max(abs(a), abs(b)))))
    for d in range(digits, last + 1):
        if f"{a:.{d}f}" != f"{b:.{d}f}":
            return d
    return digits


def apart(a: float, b: float, digits: int = 3, percent: bool = False) -> tuple[str, str]:
    """``a`` and ``b`` written with `digits_apart` decimals."""
    d = digits_apart(a, b, digits, percent)
    return tuple((f"{v * 100:.{d}f}%" if percent else f"{v:.{d}f}") for v in (a, b))


ECE_BINS = 15  # the reliability diagram draws the same bins its ECE is computed on


def _bins(conf: np.ndarray, bins: int):
    """Masks of ``conf`` per bin of (lo, hi]; the first bin also takes 0 (a tumour probability
    can be 0, a top-class confidence never is) and the last anything above 1 (a sum of stored,
    rounded probabilities can reach 1.000001): every value in [0, inf) lands in exactly one bin."""
    edges = np.linspace(0, 1, bins + 1)
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        yield lo, hi, ((conf > lo) | (i == 0) & (conf >= 0)) & ((conf <= hi) | (i == bins - 1) & (conf > lo))


def expected_calibration_error(conf: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    conf, correct = np.asarray(conf, float), np.asarray(correct, float)
    if len(conf) == 0:
        return float("nan")
    ece = 0.0
    for _, _, m in _bins(conf, bins):
        if m.any():
            ece += m.mean() * abs(conf[m].mean() - correct[m].mean())
    return float(ece)


def reliability(conf: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per bin of ``conf``: mean confidence and the share ``correct``, the bins `expected_calibration_error` sums over."""
    conf, correct = np.asarray(conf, float), np.asarray(correct, float)
    out = []
    for lo, hi, m in _bins(conf, bins):
        if m.any():
            out.append({"lo": float(lo), "hi": float(hi), "n": int(m.sum()),
                        "confidence": float(conf[m].mean()), "accuracy": float(correct[m].mean())})
    return out


def _ratio(a: int, b: int) -> float | None:
    return float(a / b) if b else None


def wilson(hits: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a rate: honest at n of a hundred or so and near 0 or 1, where a
    99 % target and a 98 % result are a handful of images apart. ``hits`` may be fractional (a
    rate times an effective number of observations, such as patients)."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def cluster_interval(hits: np.ndarray, groups: list[str], n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap of a rate that resamples whole groups. The slices of one patient
    are not independent, so a Wilson interval over slices can be too narrow (an earlier default's
    LGG accuracy: 94.1-97.7 % over slices, 93.8-98.4 % over its 13 patients); with errors spread
    evenly over the patients it can also be the wider one (`evaluation._patient_intervals` keeps the
    wider at each end)."""
    hits = np.asarray(hits, dtype=float)
    keys = sorted(set(groups))
    idx = {g: i for i, g in enumerate(keys)}
    g = np.array([idx[x] for x in groups])
    k, n = np.bincount(g, weights=hits, minlength=len(keys)), np.bincount(g, minlength=len(keys))
    draws = np.random.default_rng(seed).integers(len(keys), size=(n_boot, len(keys)))
    counts = n[draws].sum(axis=1)
    rates = k[draws].sum(axis=1) / np.maximum(counts, 1)
    lo, hi = np.percentile(rates[counts > 0], [2.5, 97.5])
    return (float(lo), float(hi))


def classification_metrics(probs: np.ndarray, labels: list[str], classes: list[str],
                           threshold: float | None = None) -> dict:
    """Everything the CLI's ``evaluate`` JSON and the dashboards report, for one set of samples."""
    probs = np.asarray(probs, dtype=np.float64)
    pred = decide(probs, classes, threshold)
    # every key always there (null where the set has no typed image: a yes/no set against a typed
    # model), so that a reader of the JSON finds the contract's fields in every evaluation
    out: dict = {"classes": classes, "n": len(labels), "threshold": threshold, "n_fine": 0, "accuracy": None,
                 "macro_f1": None, "per_class": {}, "confusion": [], "ece": None, "reliability": None}
    ci95: dict = {}  # 95% Wilson intervals of the rates below
    fine = _typed(labels, classes)
    if fine.any():
        part, intervals = _class_metrics(probs[fine], pred[fine], [lab for lab, f in zip(labels, fine) if f], classes)
        out.update(part)
        ci95.update(intervals)
    truth = [is_tumour_label(lab) for lab in labels]
    has = np.array([t is not None for t in truth], dtype=bool)
    # only a model that can say 'no tumour' has a sensitivity: without that class every call is a
    # tumour and 100 % is true by construction
    if has.any() and has_tumour_decision(classes):
        t_true = np.array([bool(t) for t in truth])[has]
        part, intervals = _tumour_metrics(probs[has], pred[has], t_true, classes)
        out.update(part)
        ci95.update(intervals)
    if ci95:
        out["ci95"] = ci95
    return out


def _typed(labels: list[str], classes: list[str]) -> np.ndarray:
    """Which samples are judged class by class: those labelled with one of the model's classes."""
    fine = np.array([lab in classes for lab in labels], dtype=bool)
    if TUMOUR not in classes and TUMOUR in labels and not any(lab in FINE_TUMOURS for lab in labels):
        # a yes/no set against a typed model: its tumours have no type, so an 'accuracy' over
        # its normal scans alone would pass for the set's; it is judged on the tumour call only
        fine[:] = False
    return fine


def _class_metrics(probs: np.ndarray, p: np.ndarray, labels: list[str], classes: list[str]) -> tuple[dict, dict]:
    """Accuracy, macro F1, per-class rates, confusion and calibration of typed samples (``p``:
    their calls), and the accuracy's 95 % interval."""
    y = np.array([classes.index(lab) for lab in labels])
    cm = confusion_matrix(y, p, labels=range(len(classes)))
    prec, rec, f1, sup = precision_recall_fscore_support(y, p, labels=range(len(classes)), zero_division=0)
    per_class = {}
    for k, c in enumerate(classes):
        tn = cm.sum() - cm[k].sum() - cm[:, k].sum() + cm[k, k]
        fp = cm[:, k].sum() - cm[k, k]
        # n/a, not 0, where a rate has no denominator: a class this set has no image of
        # has no recall or F1, and one never predicted has no precision.
        per_class[c] = {"precision": float(prec[k]) if cm[:, k].sum() else None,
                        "recall": float(rec[k]) if sup[k] else None,
                        "f1": float(f1[k]) if sup[k] else None,
                        "specificity": _ratio(tn, tn + fp), "support": int(sup[k])}
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y
    present = sorted(set(y.tolist()))  # a class this set has no image of has no F1 to average
    hits = int((p == y).sum())
    return dict(n_fine=len(y), accuracy=hits / len(y),
                # one class present (BRISC: normals only): an "average" of one F1 reads above
                # the accuracy it is computed from, and means nothing
                macro_f1=(float(f1_score(y, p, labels=present, average="macro", zero_division=0))
                          if len(present) > 1 else None),
                per_class=per_class, confusion=cm.tolist(),
                ece=expected_calibration_error(conf, correct),
                reliability=reliability(conf, correct)), {"accuracy": list(wilson(hits, len(y)))}


def _tumour_metrics(probs: np.ndarray, pred: np.ndarray, t_true: np.ndarray, classes: list[str]) -> tuple[dict, dict]:
    """Tumour vs no tumour of samples whose truth is known (``t_true``): misses, false alarms,
    sensitivity, specificity and the tumour probability's calibration, and their 95 % intervals."""
    t_pred = tumour_calls(pred, classes)   # as the Diagnose page and the threshold curve say
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(t_true, t_pred, labels=[False, True]).ravel())
    # calibration of the tumour probability itself: the only calibration a source labelled
    # "tumour" without a type (Br35H) can be judged on, and the number the operating point reads
    t_prob = tumour_probability(probs, classes)
    intervals = {**({"sensitivity": list(wilson(tp, tp + fn))} if tp + fn else {}),
                 **({"specificity": list(wilson(tn, tn + fp))} if tn + fp else {})}
    return dict(tumour_missed=fn, normal_flagged=fp, n_tumour=tp + fn, n_normal=tn + fp,
                sensitivity=_ratio(tp, tp + fn), specificity=_ratio(tn, tn + fp),
                binary_accuracy=_ratio(tp + tn, tp + tn + fp + fn),
                tumour_ece=expected_calibration_error(t_prob, t_true),
                tumour_reliability=reliability(t_prob, t_true)), intervals


def threshold_curve(t_prob: np.ndarray, is_tumour: np.ndarray, n: int = 101,
                    extra: tuple[float | None, ...] = (), other: np.ndarray | None = None) -> list[dict]:
    """Miss rate and false-alarm rate against the tumour-probability threshold, on a grid of
    ``n`` points plus the ``extra`` thresholds (the operating point: between grid points the
    figure would draw a line, not the page's own numbers). ``other`` marks the rows called a class
    that is neither tumour nor no tumour (`other_calls`): no threshold makes them a tumour call."""
    t_prob, is_tumour = np.asarray(t_prob), np.asarray(is_tumour, bool)
    never = np.zeros(len(t_prob), bool) if other is None else np.asarray(other, bool)
    rows = []
    grid = np.union1d(np.linspace(0, 1, n), [float(t) for t in extra if t is not None and 0 <= t <= 1])
    for t in grid:
        flagged = (t_prob >= t) & ~never
        rows.append({"threshold": float(t),
                     "missed": int((is_tumour & ~flagged).sum()),
                     "miss_rate": _ratio(int((is_tumour & ~flagged).sum()), int(is_tumour.sum())),
                     "false_alarm_rate": _ratio(int((~is_tumour & flagged).sum()),
                                                int((~is_tumour).sum()))})
    return rows


def risk_coverage(conf: np.ndarray, correct: np.ndarray) -> list[dict]:
    """Accuracy of the predictions kept when the least confident are referred, at each coverage.

    Equal confidences are kept or referred together (as `referral.pick_min_confidence` does): a
    cut inside a tie is a point no confidence threshold can produce, its accuracy set by the order
    the sort left the tie in. So a coverage is the nearest one at or above the nominal share.
    """
    conf = np.asarray(conf, np.float64)
    order = np.argsort(-conf, kind="stable")
    s, c = conf[order], np.asarray(correct, float)[order]
    n = len(c)
    out = []
    for cov in np.linspace(0.5, 1.0, 11):
        k = max(1, int(round(cov * n)))
        k = int(np.searchsorted(-s, -s[k - 1], side="right"))   # every prediction as confident as the k-th
        out.append({"coverage": float(k / n), "accuracy": float(c[:k].mean()),
                    "min_confidence": float(s[k - 1])})
    return out
