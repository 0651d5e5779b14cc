"""When a prediction is referred: the tumour decision and the tumour type are judged apart.

Coarse labels (Br35H ``yes``: a tumour, type unknown) teach a 4-class model to spread probability
over the tumour types, so a rule on the top class probability refers scans whose tumour call is
sure. The rule here, fitted on validation by `pick_referral` and stored in the card's
``uncertainty`` block:

- ``uncertain`` (refer for review): the calibrated tumour probability lies in the band
  ``[lo, hi)`` around the operating threshold, chosen so that the decisions kept outside it err
  on at most ``target_error`` of validation images while at most ``max_referred`` are referred;
- ``type_uncertain``: the call is "tumour" but the most likely type holds less than
  ``min_type_confidence`` of the tumour probability (set the same way on fine-labelled tumours).

A model without tumour/no-tumour classes, or a card written before the band existed (only
``uncertainty.min_confidence``), keeps the top-class rule and never sets ``type_uncertain``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .labels import FINE_TUMOURS, class_label, class_word, has_tumour_decision, is_tumour_label, tumour_classes
from .metrics import apart, decide, digits_apart, other_calls, tumour_calls, tumour_probability

BAND_RULE = "tumour band + type confidence"
TOP_CLASS_RULE = "top-class confidence"


def type_confidence(probs: np.ndarray, classes: list[str]) -> np.ndarray:
    """Share of the tumour probability held by the most likely tumour type (1 with one type)."""
    probs = np.atleast_2d(np.asarray(probs, np.float64))
    idx = [classes.index(c) for c in tumour_classes(classes)]
    if len(idx) < 2:
        return np.ones(len(probs))
    t = probs[:, idx]
    return t.max(1) / np.maximum(t.sum(1), 1e-12)


@dataclass(frozen=True)
class ReferralRule:
    """The card's referral rule; `flags` applies it to decisions made at any threshold."""
    classes: tuple[str, ...]
    lo: float | None = None            # tumour-probability band [lo, hi): refer
    hi: float | None = None
    min_confidence: float = 0.0        # top-class rule (old cards, models without 'notumor')
    min_type_confidence: float = 0.0

    @classmethod
    def from_card(cls, card: dict) -> "ReferralRule":
        u = card.get("uncertainty") or {}
        classes = tuple(card.get("classes", []))
        old = float(u.get("min_confidence") or 0.0)
        if u.get("lo") is None or u.get("hi") is None or not has_tumour_decision(list(classes)):
            return cls(classes, min_confidence=old)
        return cls(classes, float(u["lo"]), float(u["hi"]), old,
                   float(u.get("min_type_confidence") or 0.0))

    @property
    def uses_band(self) -> bool:
        return self.lo is not None and self.hi is not None

    @property
    def refers(self) -> bool:
        """Whether `flags` can ever refer a call 'uncertain' (a card with no rule never does)."""
        return self.uses_band or self.min_confidence > 0

    @property
    def judges_type(self) -> bool:
        """Whether `flags` can ever call a tumour's type uncertain: a band rule with a type level,
        over two tumour classes or more."""
        return self.uses_band and self.min_type_confidence > 0 and len(tumour_classes(list(self.classes))) > 1

    def band(self, threshold: float | None = None) -> tuple[float, float]:
        """The referral band, stretched to hold an operating point moved outside it.

        A call made between the validated edge and a moved threshold goes against the side the
        model is sure of (no tumour at p(tumour) 0.98), so it is referred, never shown plain.
        """
        if threshold is None:
            return self.lo, self.hi
        return min(self.lo, float(threshold)), max(self.hi, float(threshold))

    def flags(self, probs: np.ndarray, pred: np.ndarray,
              threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(uncertain, type_uncertain) per row of ``probs`` decided as class indices ``pred``
        at ``threshold`` (None: the band as fitted)."""
        probs = np.atleast_2d(np.asarray(probs, np.float64))
        pred = np.asarray(pred)
        if not self.uses_band:  # judged on the probability of the class called, not the top one
            return probs[np.arange(len(probs)), pred] < self.min_confidence, np.zeros(len(probs), bool)
        classes = list(self.classes)
        t = tumour_probability(probs, classes)
        lo, hi = self.band(threshold)
        called = tumour_calls(pred, classes)   # not a 'stroke' call
        return ((t >= lo) & (t < hi),
                called & (type_confidence(probs, classes) < self.min_type_confidence))

    def reason(self, probs: np.ndarray, pred: int, threshold: float | None = None) -> str | None:
        """Why one prediction is flagged, with the numbers that make it checkable; None if not."""
        unc, typ = self.flags(probs, np.array([pred]), threshold)
        return self.describe(probs, pred, threshold, bool(unc[0]), bool(typ[0]))

    def describe(self, probs: np.ndarray, pred: int, threshold: float | None,
                 uncertain: bool, type_uncertain: bool) -> str | None:
        """The text for these flags on one row of probabilities called as class index ``pred``."""
        probs = np.asarray(probs, np.float64).reshape(1, -1)
        classes = list(self.classes)
        out = []
        if uncertain and self.uses_band:
            lo, hi = self.band(threshold)
            moved = " (stretched to the operating point)" if (lo, hi) != (self.lo, self.hi) else ""
            t = float(tumour_probability(probs, classes)[0])
            d = max(digits_apart(t, lo), digits_apart(t, hi))
            where = (", where the model's calls were least reliable on validation" if self.lo <= t < self.hi else
                     ", between the band fitted on validation and the operating point moved by hand: a call "
                     "there goes against the side the model is sure of")
            out.append(f"tumour probability {t:.{d}f} is inside the referral band {lo:.{d}f}-{hi:.{d}f}{moved}{where}")
        elif uncertain:
            p, level = apart(float(probs[0, pred]), self.min_confidence)
            # the class as a reader names it, and what the level is for: "the probability of tumor, 0.751,
            # is below the referral level" read as a negative result (a clinician's walkthrough)
            out.append(f"the model gives its call ({class_label(classes[pred])}) a probability of {p}, under the "
                       f"referral level {level}, so it is referred")
        if type_uncertain:
            held, level = apart(float(type_confidence(probs, classes)[0]), self.min_type_confidence, 0, True)
            out.append(f"the most likely tumour type holds {held} of the tumour probability, below {level}")
        return "; ".join(out) or None

    def describe_call(self, pred, uncertain: bool = False, type_uncertain: bool = False) -> str | None:
        """`describe` for one `core.inference.Prediction` (its probabilities, call and threshold)."""
        classes = list(self.classes)
        return self.describe([pred.probs[c] for c in classes], classes.index(pred.pred), pred.threshold,
                             uncertain, type_uncertain)


def at_threshold(pred, classes: list[str], threshold: float | None, rule: ReferralRule | None = None):
    """The same `Prediction` decided at another operating point (None keeps the card's call).

    The confidence is the probability of the class called, and with the card's referral
    ``rule`` both flags are redone: a call can move, and so can the band (`ReferralRule.band`).
    """
    if threshold is None or pred.tumour_probability is None:
        return pred
    p = np.array([pred.probs[c] for c in classes])
    k = int(decide(p[None], classes, float(threshold))[0])
    moved = dataclasses.replace(pred, pred=classes[k], threshold=float(threshold),
                                confidence=pred.probs[classes[k]])
    if rule is None:
        return moved
    unc, typ = rule.flags(p, np.array([k]), threshold)
    return dataclasses.replace(moved, uncertain=bool(unc[0]), type_uncertain=bool(typ[0]),
                               uncertain_reason=rule.describe(p, k, threshold, bool(unc[0]), bool(typ[0])))


def call_note(pred, classes: list[str]) -> str | None:
    """A sentence when the call is not the likeliest class (None otherwise): at a low operating
    point 'pituitary' was called beside bars showing 'no tumour' at 88 %, with nothing saying the
    call is the tumour decision and the class only the likeliest tumour type."""
    if not (pred.in_distribution and pred.tumour_probability is not None and pred.threshold is not None):
        return None
    top = max(pred.probs, key=pred.probs.get)
    if top == pred.pred:
        return None
    tp, op = apart(pred.tumour_probability, pred.threshold)
    together = " (all tumour classes together)" if len(tumour_classes(classes)) > 1 else ""
    if is_tumour_label(pred.pred):
        return (f"Called a tumour: the tumour probability {tp}{together} reaches the operating point "
                f"{op}, though '{class_word(top)}' is the likeliest single class"
                + (f"; {class_word(pred.pred)} is the likeliest tumour type." if pred.pred in FINE_TUMOURS else "."))
    return (f"Called {class_word(pred.pred)}: the tumour probability {tp}{together} is below the operating point "
            f"{op}, though '{class_word(top)}' is the likeliest single class.")


# ----------------------------------------------------------------------------- fitting on validation
def pick_min_confidence(conf: np.ndarray, correct: np.ndarray, target_error: float = 0.005,
                        max_referred: float = 0.10) -> dict:
    """Lowest confidence below which predictions are referred, so that kept ones err <= target.

    Refers at most ``max_referred``; when that cannot reach the target, the level within it
    with the lowest kept error. Equal confidences are kept or referred together.
    """
    conf, correct = np.asarray(conf, np.float64), np.asarray(correct, bool)
    n = len(conf)
    if n == 0:
        return {"min_confidence": 0.0}
    order = np.argsort(-conf, kind="stable")
    c = conf[order]
    kept = np.arange(1, n + 1)
    rate = np.cumsum(~correct[order]) / kept
    cut = np.r_[c[:-1] > c[1:], True] & (kept >= math.ceil((1 - max_referred) * n - 1e-9))
    meets = cut & (rate <= target_error)
    # keep the most that meet the target; otherwise the lowest error (then the most kept)
    k = int(np.flatnonzero(meets)[-1]) if meets.any() else \
        int(np.flatnonzero(cut)[np.lexsort((-kept[cut], rate[cut]))[0]])
    thr = float(c[k]) if k < n - 1 else 0.0
    return {"min_confidence": thr, "target_error": target_error, "max_referred": max_referred,
            "val_referred": float((conf < thr).mean()), "val_error_kept": float(rate[k]),
            "val_n": int(n)}


def pick_band(t_prob: np.ndarray, is_tumour: np.ndarray, threshold: float,
              target_error: float = 0.005, max_referred: float = 0.10, never: np.ndarray | None = None) -> dict:
    """The band [lo, hi) around ``threshold`` that refers the fewest validation images while the
    decisions kept outside it err <= ``target_error``, referring at most ``max_referred``.

    When no band within that cap reaches the target, the one with the lowest kept error. Only
    bands whose edges sit on an error need trying: lo at a missed tumour's probability, hi just
    above a false alarm's (moving an edge elsewhere refers more without removing an error).
    ``never``: rows called a class that is neither tumour nor 'no tumour' (`metrics.other_calls`):
    a tumour among them is missed wherever it lies (only the band refers it), a normal is right.
    """
    t, y = np.asarray(t_prob, np.float64), np.asarray(is_tumour, bool)
    never = np.zeros(len(t), bool) if never is None else np.asarray(never, bool)
    n, cap = len(t), int(math.floor(max_referred * len(t)))
    below = t < threshold
    ts, tum, nor, lost = np.sort(t), np.sort(t[y & ~never]), np.sort(t[~y & ~never]), np.sort(t[y & never])
    lo_c = np.unique(np.r_[threshold, t[below & y]])
    hi_c = np.unique(np.r_[threshold, np.nextafter(t[~below & ((~y & ~never) | (y & never))], np.inf)])
    # an edge that alone refers more than the cap can never be part of an allowed band
    lo_c = lo_c[np.searchsorted(ts, threshold) - np.searchsorted(ts, lo_c) <= cap]
    hi_c = hi_c[np.searchsorted(ts, hi_c) - np.searchsorted(ts, threshold) <= cap]
    referred = np.searchsorted(ts, hi_c)[None, :] - np.searchsorted(ts, lo_c)[:, None]
    errors = (np.searchsorted(tum, lo_c)[:, None] + (len(nor) - np.searchsorted(nor, hi_c))[None, :]
              + np.searchsorted(lost, lo_c)[:, None] + (len(lost) - np.searchsorted(lost, hi_c))[None, :])
    rate = errors / np.maximum(n - referred, 1)
    allowed = referred <= cap
    meets = allowed & (rate <= target_error)
    pool = np.flatnonzero(meets if meets.any() else allowed)  # (threshold, threshold) always allowed
    r, e = referred.ravel()[pool], rate.ravel()[pool]
    # fewest referred, then lowest error; without a band meeting the target, the reverse
    best = pool[np.lexsort((e, r) if meets.any() else (r, e))[0]]
    i, j = np.unravel_index(int(best), referred.shape)
    return {"lo": float(lo_c[i]), "hi": float(hi_c[j]), "target_error": target_error,
            "max_referred": max_referred, "val_referred": float(referred[i, j] / max(n, 1)),
            "val_error_kept": float(rate[i, j]), "val_n": int(n)}


def pick_referral(probs: np.ndarray, labels: list[str], classes: list[str], threshold: float | None,
                  target_error: float = 0.005, max_referred: float = 0.10,
                  type_target_error: float = 0.005, type_max_referred: float = 0.10) -> dict:
    """The card's ``uncertainty`` block from validation probabilities (calibrated) and labels."""
    probs = np.asarray(probs, np.float64)
    if not has_tumour_decision(classes) or threshold is None or len(probs) == 0:
        fine = [i for i, lab in enumerate(labels) if lab in classes]
        y = np.array([classes.index(labels[i]) for i in fine], int)
        conf = probs[fine].max(1) if fine else np.zeros(0)
        correct = probs[fine].argmax(1) == y if fine else np.zeros(0, bool)
        return {"rule": TOP_CLASS_RULE, **pick_min_confidence(conf, correct, target_error, max_referred)}
    truth = [is_tumour_label(lab) for lab in labels]
    known = [i for i, v in enumerate(truth) if v is not None]
    t = tumour_probability(probs, classes)
    band = pick_band(t[known], np.array([truth[i] for i in known], bool), threshold,
                     target_error, max_referred, never=other_calls(probs[known], classes))
    kind = _type_block(probs, labels, classes, threshold, type_target_error, type_max_referred)
    return {"rule": BAND_RULE, "threshold": threshold, **band, **kind}


def _type_block(probs: np.ndarray, labels: list[str], classes: list[str], threshold: float,
                target_error: float, max_referred: float) -> dict:
    """min_type_confidence on the fine-labelled tumours called 'tumour' (type errors only count there)."""
    types = tumour_classes(classes)
    called = tumour_calls(decide(probs, classes, threshold), classes)
    sel = [i for i, lab in enumerate(labels) if lab in FINE_TUMOURS and lab in types and called[i]]
    if len(types) < 2 or not sel:
        return {"min_type_confidence": 0.0}
    idx = [classes.index(c) for c in types]
    correct = np.array([types[int(np.argmax(probs[i, idx]))] == labels[i] for i in sel])
    got = pick_min_confidence(type_confidence(probs[sel], classes), correct, target_error, max_referred)
    return {"min_type_confidence": got["min_confidence"],
            **{f"type_{k}": v for k, v in got.items() if k != "min_confidence"}}
