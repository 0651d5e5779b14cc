"""Evaluation records and reports shared by train.py, `python -m core evaluate` and the app."""
from __future__ import annotations

import functools
import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from .data import not_mri, read_card, save_whole, source_of
from .labels import (FINE_TUMOURS, NO_TUMOUR, TUMOUR, folds_types, has_tumour_decision, is_tumour_label,
                     tumour_classes)
from .metrics import (classification_metrics, cluster_interval, decide, other_calls, other_classes,
                      risk_coverage, threshold_curve, tumour_probability, wilson)
from .referral import ReferralRule, type_confidence

if TYPE_CHECKING:  # for the type hints only: core.inference loads torch and the models
    from .inference import Predictor


def prediction_record(file: str, source: str, label: str, p) -> dict:
    """The evaluation record of one served `Prediction` (CLI `evaluate`, the app's labelled uploads)."""
    return {"file": file, "source": source, "label": label, "pred": p.pred, "probs": p.probs,
            "tumour_probability": p.tumour_probability, "confidence": p.confidence,
            "uncertain": p.uncertain, "type_uncertain": p.type_uncertain,
            "in_distribution": p.in_distribution, "ood_score": p.ood_score, "ood_reason": p.ood_reason,
            "threshold": p.threshold}


def prediction_records(samples, probs: np.ndarray, classes: list[str], threshold: float | None,
                       referral: ReferralRule | None = None) -> list[dict]:
    """One record per image: file, source, label, pred, probs and the flags.

    ``referral`` (the card's rule) sets ``uncertain``/``type_uncertain``; without one nothing is referred.
    Probabilities are rounded to the 6 decimals the file keeps before anything is decided: the
    summary (and `rescore`) decides again from the stored values, and a call or flag made from the
    unrounded ones could contradict it (0.49999995 called 'notumor' but stored as 0.5).
    """
    probs = _as_stored(probs)
    pred = decide(probs, classes, threshold)
    t_prob = tumour_probability(probs, classes) if tumour_classes(classes) else None
    rule = referral or ReferralRule(tuple(classes))
    unc, typ = rule.flags(probs, pred, threshold)
    out = []
    for i, s in enumerate(samples):
        # a typed tumour scored by a tumour/no-tumour model is a 'tumor' (as score_labelled does)
        label = TUMOUR if folds_types(classes) and s.label in FINE_TUMOURS else s.label
        out.append({"file": s.rel, "source": s.source, "label": label, "pred": classes[pred[i]],
                    "probs": {c: float(v) for c, v in zip(classes, probs[i])},
                    "tumour_probability": None if t_prob is None else _stored_tumour_probability(float(t_prob[i]), threshold),
                    "confidence": float(probs[i, pred[i]]), "uncertain": bool(unc[i]),
                    "type_uncertain": bool(typ[i]), "in_distribution": True, "ood_score": None,
                    "ood_reason": None, "threshold": threshold})
    return out


def _as_stored(probs) -> np.ndarray:
    """Probabilities as eval.json keeps them: 6 decimals, by Python's `round` as ever written."""
    return np.vectorize(lambda v: round(float(v), 6), otypes=[np.float64])(np.asarray(probs, np.float64))


def _stored_tumour_probability(t: float, threshold: float | None) -> float:
    """``t`` (a sum of 6-decimal probabilities) to 6 decimals, unless that lands on the other side
    of the threshold than ``t`` itself, which the call was made from: the sum's float error
    (0.49999999999999994) must not read 0.5 beside a 'notumor' call at 0.5."""
    r = round(t, 6)
    return t if threshold is not None and (r >= threshold) != (t >= threshold) else r


def _metrics_for(records: list[dict], classes: list[str], threshold: float | None) -> dict:
    probs = np.array([[r["probs"][c] for c in classes] for r in records])
    labels = [r["label"] for r in records]
    m = classification_metrics(probs, labels, classes, threshold)
    truth = [is_tumour_label(lab) for lab in labels]
    known = [i for i, t in enumerate(truth) if t is not None]
    if known and m.get("n_tumour") is not None and has_tumour_decision(classes):
        # from the probabilities the headline decides on, not the separately rounded stored value:
        # the curve must count the headline's misses at the operating point
        tp = tumour_probability(probs[known], classes)
        is_t = np.array([truth[i] for i in known])
        m["threshold_curve"] = threshold_curve(tp, is_t, extra=(threshold,),
                                               other=other_calls(probs[known], classes))
        flagged = np.array([(not records[i]["in_distribution"]) or records[i]["uncertain"]
                            for i in known])
        missed = is_t & ~np.array([bool(is_tumour_label(records[i]["pred"])) for i in known])
        m["silent_misses"] = int((missed & ~flagged).sum())
    _patient_intervals(m, records, classes, threshold)
    m["flagged_ood"] = int(sum(not r["in_distribution"] for r in records))
    odd = [r for r in records if not_mri(r["file"])]
    if odd:   # head CTs a source filed as MRI: flagging one is right, so MRI flag rates leave them out
        m["not_mri"] = len(odd)
        m["not_mri_flagged"] = int(sum(not r["in_distribution"] for r in odd))
    m["referred_uncertain"] = int(sum(r["uncertain"] for r in records))
    m["referred_type_uncertain"] = int(sum(r.get("type_uncertain", False) for r in records))
    m.update(_risk_coverages(records, classes, threshold))
    return m


MIN_PATIENTS = 10   # fewer, and the patient bootstrap's interval is narrower than the truth (1 patient: zero width)


def _patient_intervals(m: dict, records: list[dict], classes: list[str], threshold: float | None) -> None:
    """Replace ``m``'s Wilson intervals by patient-cluster bootstraps when records name their
    patient (LGG's ``TCGA_<site>_<patient>`` files) and patients hold several slices each; a
    record without a patient is its own group (all sources pooled: LGG's slices still cluster)."""
    from .data import patient_id
    named = [patient_id(r["file"]) for r in records]
    patients = [p or f"{r.get('source', 'data')}/{r['file']}" for p, r in zip(named, records)]
    if not records or len(set(patients)) == len(records) or "ci95" not in m:
        return
    n_named = len({p for p in named if p})
    probs = np.array([[r["probs"][c] for c in classes] for r in records])
    pred = [classes[k] for k in decide(probs, classes, threshold)]
    labels = [r["label"] for r in records]
    truth = [is_tumour_label(lab) for lab in labels]
    rates = {"accuracy": [(p == lab, i) for i, (p, lab) in enumerate(zip(pred, labels)) if lab in classes],
             "sensitivity": [(bool(is_tumour_label(p)), i) for i, (p, t) in enumerate(zip(pred, truth)) if t is True],
             "specificity": [(not is_tumour_label(p), i) for i, (p, t) in enumerate(zip(pred, truth)) if t is False]}
    by_groups, booted = [], []
    for key, rows in rates.items():
        if key not in m["ci95"] or not rows:
            continue
        hits, groups = np.array([h for h, _ in rows], dtype=float), [patients[i] for _, i in rows]
        per = defaultdict(list)
        for h, g in zip(hits, groups):
            per[g].append(h)
        # the rarer outcome (the misses of a good rate) in fewer than 3 groups: resampling them
        # gives the bootstrap almost no spread (specificity [1, 1] over 3 patients; one missed
        # slice narrowed [0.77, 1] to [0.99, 1]), and a handful of groups is no resampling
        rare = min(sum(any(v) for v in per.values()), sum(not all(v) for v in per.values()))
        if len(per) < MIN_PATIENTS or rare < 3:
            # Wilson with each group one observation: the slices of one patient are not independent
            # centred on the pooled rate it is printed beside (a patient's mean rate, rounded to a
            # whole patient, left 0.524 outside [0.646, 0.985] when one patient held most slices)
            m["ci95"][key] = list(wilson(float(hits.mean()) * len(per), len(per)))
            by_groups.append(key)
        else:
            # never narrower than the slice-level Wilson interval it replaces: a percentile bootstrap
            # over a dozen patients runs narrow, and with errors spread evenly over them (1-3 each)
            # it gave LGG's accuracy 95.5-97.9 % against Wilson's 94.6-98.1 % (an audit, session 53)
            (b_lo, b_hi), (w_lo, w_hi) = cluster_interval(hits, groups), m["ci95"][key]
            m["ci95"][key] = [min(b_lo, w_lo), max(b_hi, w_hi)]
            booted.append(key)
    others = " and the other scans one by one" if not all(named) else ""
    m["ci95_method"] = "; ".join(
        ([f"{', '.join(booted)}: bootstrap over {n_named} patients{others}, as slices of one patient are not "
          "independent, widened to the slice-level Wilson interval where that is wider"] if booted else [])
        + ([f"{', '.join(by_groups)}: Wilson over patients{others}, each one observation (errors in under 3 "
            f"patients, or under {MIN_PATIENTS} patients, give a bootstrap no spread)"] if by_groups else []))


def _risk_coverages(records: list[dict], classes: list[str], threshold: float | None) -> dict:
    """Risk-coverage of the fine class, the tumour decision and the tumour type.

    ``risk_coverage`` (the one the app plots) is the tumour decision's for a coarse set (tumour
    labels without a type, e.g. Br35H), where the fine class can only be judged on the normals.
    """
    out = {}
    fine = [r for r in records if r["label"] in classes]
    if fine:
        # the call made at the operating point, as accuracy judges it and referral keeps or refers
        # it (not the top class: with a low threshold the two differ, and 100 % coverage must be
        # the headline accuracy)
        conf = np.array([r["probs"][r["pred"]] for r in fine])
        correct = np.array([r["pred"] == r["label"] for r in fine])
        out["risk_coverage"] = risk_coverage(conf, correct)
    if not has_tumour_decision(classes):
        return out
    known = [r for r in records if is_tumour_label(r["label"]) is not None]
    if known:
        called = np.array([bool(is_tumour_label(r["pred"])) for r in known])
        t = tumour_probability(np.array([[r["probs"][c] for c in classes] for r in known]), classes)
        truth = np.array([bool(is_tumour_label(r["label"])) for r in known])
        # confidence in the decision taken: the probability of the side it went to
        out["risk_coverage_tumour"] = risk_coverage(np.where(called, t, 1 - t), called == truth)
        if not any(r["label"] in FINE_TUMOURS for r in known) and truth.any():
            out["risk_coverage"] = out["risk_coverage_tumour"]
    types = tumour_classes(classes)
    typed = [r for r in records if r["label"] in types and is_tumour_label(r["pred"])]
    if typed and len(types) > 1:
        p = np.array([[r["probs"][c] for c in classes] for r in typed])
        best = np.array([types[int(np.argmax([r["probs"][c] for c in types]))] for r in typed])
        out["risk_coverage_type"] = risk_coverage(type_confidence(p, classes),
                                                  best == np.array([r["label"] for r in typed]))
    return out


def evaluate_records(records: list[dict], classes: list[str], threshold: float | None) -> dict:
    """Overall metrics, the same per source, and the records themselves as ``predictions``."""
    ev = _metrics_for(records, classes, threshold)
    sources = sorted({source_of(r) for r in records})
    if len(sources) > 1:
        ev["per_source"] = {s: _metrics_for([r for r in records if source_of(r) == s],
                                            classes, threshold) for s in sources}
    ev["predictions"] = records
    return ev


class OtherClasses(ValueError):
    """eval.json scored other classes than the card names (files copied from two runs)."""


def read_eval(path: str | Path, classes: tuple[str, ...] | None = None) -> dict:
    """eval.json checked against the card's ``classes``: every page and command decides its records
    by those classes, so one record short of a class (or holding NaN) was a KeyError on the
    Evaluation and Diagnose pages, a crash of the ROC curve, or a traceback of compare and rescore.
    Raises ValueError (`OtherClasses` for another model's results) that says what is wrong."""
    try:
        ev = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(ev, dict) or not isinstance(ev.get("predictions"), list):
        raise ValueError("no list of per-image predictions")
    theirs = ev.get("classes")
    if classes is not None and isinstance(theirs, list) and set(theirs) != set(classes):
        raise OtherClasses(f"{path} holds results for the classes {', '.join(map(str, theirs))}, not the "
                           f"card's {', '.join(classes)}: the per-image test results cannot be shown.")
    wanted = classes or (tuple(theirs) if isinstance(theirs, list) else None)
    for k, record in enumerate(ev["predictions"]):
        if (why := _record_problem(record, wanted)):
            raise ValueError(f"its record {k + 1} {why}")
    return ev


def _record_problem(record: object, classes: tuple[str, ...] | None) -> str | None:
    """What an eval.json record lacks that the pages read: its file, label and gate flag, and a
    finite probability of every class (of its own ones where the card is unreadable)."""
    from .inference import finite_number
    if not isinstance(record, dict) or not isinstance(record.get("label"), str):
        return "has no label"
    if not isinstance(record.get("file"), str):
        return "has no file name"
    if not isinstance(record.get("in_distribution"), bool):
        return "has no in_distribution flag (true or false)"
    probs = record.get("probs")
    if not isinstance(probs, dict):
        return "has no probabilities"
    for c in classes or tuple(probs):
        if not finite_number(probs.get(c)):
            return f"has no finite probability of '{c}'"
    if record.get("tumour_probability") is not None and not finite_number(record["tumour_probability"]):
        return "has a tumour probability that is not a finite number"
    return None


def json_text(obj, indent: int | None = None) -> str:
    """JSON that every parser reads: a non-finite float (a NaN voxel size in a damaged header, a
    rate of nothing) becomes null instead of Python's NaN/Infinity, which strict parsers refuse."""
    def finite(x):
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [finite(v) for v in x]
        return x
    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def write_json(path: Path, obj: dict | list) -> None:
    """Replace a JSON file atomically: a run stopped half-way never leaves a truncated card."""
    save_whole(path, lambda tmp: tmp.write_text(json_text(obj, indent=1)))


# What a card keeps from eval.json: the headline figures (always, None where missing),
# then the trust figures where the file has them (a silent miss is a tumour called "no tumour" with
# neither flag; head CTs a source filed as MRI are counted apart).
# n_fine: the scans of a known type, accuracy's denominator (Br35H's untyped tumours count in n only)
CARD_METRICS = ("n", "n_fine", "accuracy", "macro_f1", "tumour_missed", "normal_flagged", "sensitivity",
                "specificity", "ece", "tumour_ece")
CARD_SOURCE_METRICS = ("n", "n_fine", "accuracy", "macro_f1", "sensitivity", "specificity", "tumour_missed", "ece",
                       "tumour_ece")
CARD_TRUST_METRICS = ("silent_misses", "flagged_ood", "referred_uncertain", "not_mri", "not_mri_flagged")


def card_metrics(ev: dict) -> dict:
    """The headline figures a model card keeps from its eval.json, overall and per source."""
    def pick(d: dict, keys: tuple[str, ...]) -> dict:
        return {k: d.get(k) for k in keys} | {k: d[k] for k in CARD_TRUST_METRICS if k in d}
    return pick(ev, CARD_METRICS) | {"per_source": {k: pick(v, CARD_SOURCE_METRICS)
                                                    for k, v in ev.get("per_source", {}).items()}}


def _reflag(records: list[dict], classes: list[str], threshold: float | None, rule: ReferralRule) -> None:
    """Each record's referral flags and confidence, recomputed by today's rule from its stored
    probabilities and call (older files judged the top class, not the class called)."""
    rows = [r for r in records if r["pred"] in classes]
    if not rows:
        return
    probs = np.array([[r["probs"][c] for c in classes] for r in rows])
    pred = np.array([classes.index(r["pred"]) for r in rows])
    unc, typ = rule.flags(probs, pred, threshold)
    for r, p, k, u, t in zip(rows, probs, pred, unc, typ):
        r.update(uncertain=bool(u), type_uncertain=bool(t), confidence=round(float(p[k]), 6))


def _flat_metrics(m: dict) -> dict:
    """A card's metrics block as {"all.accuracy": .., "lgg.accuracy": ..} (`rescore`'s report)."""
    per = m.get("per_source") if isinstance(m.get("per_source"), dict) else {}
    return {**{f"all.{k}": v for k, v in m.items() if k != "per_source"},
            **{f"{s}.{k}": v for s, d in per.items() if isinstance(d, dict) for k, v in d.items()}}


def rescore(weights_dir: str | Path, log: Callable[[str], None] = print) -> dict:
    """Recompute eval.json's summary, and the card's metrics, from its stored per-image records.

    The records (label, calibrated probabilities, flags) are the measurement; every figure above
    them is derived, and a file written by older metric code keeps that code's figures (a macro F1
    averaged over classes a source does not have, say). No data and no forward pass are needed.
    Returns the figures that changed, as ``{name: (old, new)}``.
    """
    weights_dir = Path(weights_dir)
    path = weights_dir / "eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: train.py writes it")
    try:
        ev = read_eval(path)   # every record holds every class it names
        if not (isinstance(ev.get("classes"), list) and ev["classes"]):
            raise ValueError("it names no list of classes")
    except ValueError as e:
        raise ValueError(f"{path} cannot be rescored: {e}") from None
    stored = json.loads(path.read_text())
    card_path = weights_dir / "card.json"
    card = read_card(weights_dir) if card_path.is_file() else None
    old = _flat_metrics(card_metrics(ev))   # eval.json's figures as stored, then the card's
    held = card.get("metrics") if card is not None and isinstance(card.get("metrics"), dict) else {}
    on_card = _flat_metrics(held) if card is not None else old   # a card without metrics: every figure is new
    if card and card.get("classes") == list(ev["classes"]):
        _reflag(ev["predictions"], ev["classes"], ev.get("threshold"), ReferralRule.from_card(card))
    for r in ev["predictions"]:  # files written before records carried it: the run's one threshold
        r.setdefault("threshold", ev.get("threshold"))
    ev.update(evaluate_records(ev["predictions"], ev["classes"], ev.get("threshold")))
    rewritten = not same_figures(stored, ev)  # a tracked file is not rewritten for float noise
    if rewritten:
        write_json(path, ev)
    fresh = card_metrics(ev)
    new = _flat_metrics(fresh)
    # a figure either file holds otherwise (a card lacking a field written since: n_fine read 'already current')
    changed = {k: (old.get(k) if old.get(k) != v else on_card.get(k), v) for k, v in new.items()
               if old.get(k) != v or on_card.get(k) != v}
    if card is not None and not same_figures(card.get("metrics"), {**held, **fresh}):
        card["metrics"] = {**held, **fresh}
        write_json(card_path, card)
    log(f"rescore {weights_dir}: " + (", ".join(f"{k} {o} -> {n}" for k, (o, n) in changed.items())
                                      or ("the card's figures already current; eval.json's curves rewritten"
                                          if rewritten else "every figure already current")))
    return changed


def same_figures(a, b, tol: float = 2e-6) -> bool:
    """Equal JSON-like values, numbers within ``tol``: a recomputation that only moves the sixth
    decimal (0.98994 stored, 0.989939 recomputed) has changed nothing."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_figures(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_figures(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return abs(a - b) <= tol
    return a == b


def copy_marked(ev: dict) -> set[tuple[str, str]]:
    """(source, file) of eval.json's test records marked ``copy_in_training`` (`mark_records`)."""
    return {(source_of(r), r["file"]) for r in ev.get("predictions") or [] if r.get("copy_in_training")}


def without_copies(records: list[dict]) -> tuple[list[dict], int]:
    """The records whose image has no copy in the training split (``copy_in_training``, written
    by `mark_copies`), and how many were left out."""
    kept = [r for r in records if not r.get("copy_in_training")]
    return kept, len(records) - len(kept)


def mark_copies(weights_dir: str | Path, data_config: str | Path | None = None,
                copy_lists: list[str | Path] = (), log=print) -> dict:
    """Mark each test record of eval.json with ``copy_in_training`` and rewrite it.

    True when a near duplicate or a mirrored/half-turned copy of the image is in the model's
    training split (`core.data.copies_in_training` over split.json): its figures then measure a
    scan the model has seen, not generalisation. ``copy_lists``: TSVs of further copies found
    another way (`read_copy_list`; `bench/copy_audit.py` aligns re-framed and re-contrasted copies
    the hashes miss), marked too and counted apart; without them, the lists eval.json already
    names are read again (`recorded_copy_lists`), so that a second run keeps their marks. The
    Evaluation page can leave these out. Needs every image of the split (ValueError otherwise);
    returns the counts per source.
    """
    from . import data as D
    from .ood import read_split_file, source_roots
    weights_dir = Path(weights_dir)
    card = read_card(weights_dir)
    record = read_split_file(weights_dir / "split.json")
    path = weights_dir / "eval.json"
    ev = json.loads(path.read_text())
    held = held_out_sources(card.get("sources") or [])
    lists = [str(x) for x in copy_lists] or recorded_copy_lists(ev, log, weights_dir)
    listed = {name: read_copy_list(name, record, held) for name in lists}   # before the slow hashing
    samples = D.samples_from_record(record, source_roots(card, data_config))
    counts = mark_records(ev, copies_trained_on(samples, card.get("sources") or []), log, listed)
    # the files an upload is flagged 'seen in training' for include the test files just marked:
    # hashed before either file is written, so that the two are rewritten together
    digests = seen_files(samples, card.get("sources") or [], copy_marked(ev))
    write_json(path, ev)
    write_seen_files(weights_dir, digests)
    log(f"{weights_dir / SEEN_FILE}: {len(digests)} files (rewritten with the marks)")
    return counts


def recorded_copy_lists(ev: dict, log=print, weights_dir: str | Path | None = None) -> list[str]:
    """The copy lists an eval.json's marks came from (`mark_records`), found where they were read
    (from here, else the repository; else, by name, beside the model) with the same content;
    ValueError naming one that is not."""
    from .data import resolve_root
    from .inference import file_sha256
    out = []
    for entry in (ev.get("copies_in_training") or {}).get("lists") or []:
        if not isinstance(entry, dict):
            raise ValueError("eval.json's copies_in_training.lists is not what mark-copies writes")
        name = str(entry.get("file", ""))
        recorded = str(entry.get("path") or name).replace("\\", "/")   # a path recorded on Windows
        places = [resolve_root(recorded)] + ([Path(weights_dir) / name] if weights_dir and name else [])
        found = next((p for p in places if p.is_file() and file_sha256(p) == entry.get("sha256")), None)
        if found is None:
            raise ValueError(f"eval.json's marks include the copy list {name} (sha256 "
                             f"{str(entry.get('sha256'))[:12]}...), which is not at {places[0]} as it was: give it "
                             "again with --copy-list, or its marks would be lost")
        out.append(recorded if found == places[0] else str(found))   # a relative path stays relative
    if out:
        log(f"the copy lists eval.json names, read again: {', '.join(out)}")
    return out


def read_copy_list(path: str | Path, split: dict | None = None,
                   held: frozenset[str] = frozenset()) -> set[tuple[str, str]]:
    """(source, file) of the scored images of a copy list (`core.data.read_copy_pairs`) whose copy
    trained: not those whose copy is in a ``held`` source (weight 0: its training split trains
    nothing, as `copies_trained_on` has it). With ``split`` (split.json's files), a row whose copy
    is not a training file of that split, or whose image is not one of its test or validation
    files, is a list made for another split: ValueError, so that no mark is made from it."""
    from .data import read_copy_pairs, split_roles
    pairs = read_copy_pairs(path)
    if split is not None:
        where = split_roles(split)
        wrong = [(a, b) for a, b in pairs if where.get(b) != "train" or where.get(a) not in ("val", "test")]
        if wrong:
            (s1, f1), (s2, f2) = wrong[0]
            raise ValueError(f"{path}: {len(wrong)} of its {len(pairs)} rows do not fit the model's split "
                             f"(first: {s1}/{f1} ~ {s2}/{f2}): a list made for another split")
    return {a for a, b in pairs if b[0] not in held}


def copies_trained_on(samples: list, sources: list[dict], known: bool = True) -> set[tuple[str, str]]:
    """`core.data.copies_in_training` (``known``: with the listed copies) where the train split of a
    source with weight 0 (held out: its test split is scored, nothing of it trained) is no training."""
    from . import data as D
    held = held_out_sources(sources)
    return D.copies_in_training([s for s in samples if s.split != "train" or s.source not in held], known=known)


def held_out_sources(sources: list) -> frozenset[str]:
    """Names of the sources of weight 0 (a card's or config's list): scored on their test split,
    nothing of their train split trained."""
    return frozenset(s["name"] for s in sources if isinstance(s, dict) and s.get("weight", 1) == 0 and "name" in s)


def mark_records(ev: dict, copies: set[tuple[str, str]], log=print,
                 listed: dict[str | Path, set[tuple[str, str]]] | None = None) -> dict:
    """Mark ``ev``'s records with ``copy_in_training`` from (source, file) ``copies``
    (`core.data.copies_in_training`) and the copy lists ``listed`` ({list: its (source, file)},
    `read_copy_list`), and add the counts per source; returns them."""
    listed = {str(k): v for k, v in (listed or {}).items()}
    from_lists = set().union(*listed.values()) - copies
    for r in ev["predictions"]:
        r["copy_in_training"] = (key := (source_of(r), r["file"])) in copies or key in from_lists
    src_of = [source_of(r) for r in ev["predictions"]]
    counts = {src: {"copy_in_training": sum(r["copy_in_training"] for r, s in zip(ev["predictions"], src_of) if s == src),
                    "n": src_of.count(src)}
              for src in sorted(set(src_of))}
    if listed:
        for src, c in counts.items():
            c["from_lists"] = sum((s, r["file"]) in from_lists for r, s in zip(ev["predictions"], src_of) if s == src)
    ev["copies_in_training"] = {"method": "a near duplicate, a mirrored/half-turned copy or a copy "
                                          "core/known_copies.tsv lists in the train split "
                                          "(core.data.copies_in_training)", "per_source": counts}
    if listed:
        ev["copies_in_training"]["method"] += (", or a copy the lists name (found another way; "
                                               "counted apart as from_lists)")
        from .data import repo_relative, resolve_root
        from .inference import file_sha256
        ev["copies_in_training"]["lists"] = [{"file": Path(k).name, "path": repo_relative(k), "n": len(v),
                                              "sha256": file_sha256(resolve_root(k))}
                                             for k, v in listed.items()]
    log("test images with a copy in training: " + ", ".join(
        f"{s} {c['copy_in_training']} of {c['n']}" + (f" ({c['from_lists']} from the lists)" if listed else "")
        for s, c in counts.items()))
    return counts


def _as_tumour_vs_none(r: dict, threshold: float | None) -> dict:
    """A record of a multi-class model seen as tumour vs no tumour (its type kept in ``pred_type``).
    The call is the binary one, as the metrics decide it (argmax of the two without a threshold).
    ``model_probs`` keeps the model's own probabilities: the card's referral rule is judged on
    them (`core.app_support.records_at`), as the served prediction's flags were."""
    classes = list(r["probs"])
    # the sum `decide` makes of the same probabilities, so that the folded call and the model's agree
    t = float(tumour_probability(np.array([[r["probs"][c] for c in classes]]), classes)[0])
    called = t >= (0.5 if threshold is None else threshold)
    types = [c for c in tumour_classes(classes) if c != TUMOUR]
    # the type a tumour call names whatever the operating point (pred_type is the card's call)
    top = max(types, key=lambda c: r["probs"][c]) if types else None
    return {**r, "label": TUMOUR if is_tumour_label(r["label"]) else NO_TUMOUR,
            "pred": TUMOUR if called else NO_TUMOUR, "pred_type": r["pred"], "tumour_type": top,
            "probs": {TUMOUR: t, NO_TUMOUR: 1 - t}, "model_probs": r["probs"],
            "confidence": t if called else 1 - t}   # of the class called, as everywhere (not the likelier side)


def call_is_right(r: dict, classes: list[str]) -> bool | None:
    """Whether one record's call is right: its type where the label is one of ``classes``, else
    the tumour / no-tumour call (a coarse 'tumour' label); None when neither can be said."""
    if r["label"] in classes:
        return r["pred"] == r["label"]
    truth = is_tumour_label(r["label"])
    return None if truth is None else bool(is_tumour_label(r["pred"])) == truth


class NothingToScore(ValueError):
    """No image of a folder could be read or scored; ``errors`` says why for each file."""

    def __init__(self, message: str, errors: list[dict]):
        super().__init__(message)
        self.errors = errors


def scorable(label: str, classes: list[str]) -> bool:
    """A label the model can be judged on: one of its classes, or tumour/no tumour when it has both."""
    return label in classes or (has_tumour_decision(classes) and is_tumour_label(label) is not None)


def score_labelled(records: list[dict], classes: list[str], threshold: float | None,
                   errors: list[dict]) -> dict:
    """`evaluate_records` for a user's class-per-folder set (CLI ``evaluate``, the app's zip).

    Labels the model cannot name at their own grain are scored as tumour vs no tumour: a yes/no
    folder against a 4-class model (``classes`` of the result become tumor/notumor, each record
    keeps its type as ``pred_type``), glioma/... folders against a binary model (labels folded to
    'tumor'). An image whose folder names no class of the model goes to ``errors``, not into ``n``.
    """
    errors += [{"file": r["file"], "error": f"its folder ('{r['label']}') names no class of this model"}
               for r in records if not scorable(r["label"], classes)]
    records = [r for r in records if scorable(r["label"], classes)]
    if not records:
        raise NothingToScore("no image is in a folder that names a class of this model", errors)
    if folds_types(classes):
        records = _folded_to_binary(records)
    elif not {r["label"] for r in records} <= set(classes) and not other_classes(classes) \
            and not any(r["label"] in FINE_TUMOURS for r in records):
        # 'yes' folders against a typed model (beside typed folders, each keeps its type: scored as
        # several sources are, types where known). Not a model with a class that is neither (a 'stroke'):
        # two classes cannot hold its call (the model calls 'stroke' where the summed tumour
        # probability would say tumour), so its coarse labels are scored as eval.json scores Br35H's
        ev = evaluate_records([_as_tumour_vs_none(r, threshold) for r in records], [TUMOUR, NO_TUMOUR],
                              threshold)
        ev.update(model_classes=classes, scored_as="tumour vs no tumour")
        return ev
    return evaluate_records(records, classes, threshold)


def _folded_to_binary(records: list[dict]) -> list[dict]:
    """Labels for a binary model: glioma, meningioma... are all 'tumor'."""
    return [{**r, "label": TUMOUR} if is_tumour_label(r["label"]) else r for r in records]


def evaluate_dir(predictor: Predictor, data_dir: str | Path) -> dict:
    """Evaluate any class-per-folder directory with a loaded `Predictor`."""
    records, errors, evaluated = _predict_dir(predictor, data_dir, None)
    ev = score_labelled(records, predictor.classes, predictor.threshold, errors)
    ev.update(errors=errors, model=predictor.name, evaluated=evaluated)
    return ev


def evaluate_dirs(predictor: Predictor, data_dirs: list[str | Path]) -> dict:
    """Several class-per-folder directories, each one source named by its folder: ``per_source``
    scores each alone, as a model's eval.json does (a yes/no source's tumours count in tumour
    figures only), and the overall figures pool every scan (its accuracy covers every scan whose
    label is a class of the model, a yes/no source's no-tumour scans included)."""
    if len(data_dirs) == 1:
        return evaluate_dir(predictor, data_dirs[0])
    if (missing := [str(d) for d in data_dirs if not Path(d).is_dir()]):
        raise FileNotFoundError(f"not a directory: {', '.join(missing)}")   # before any is run
    from .data import overlapping
    resolved = [Path(d).resolve() for d in data_dirs]
    if (twice := overlapping([(str(r), r) for r in resolved])):
        raise ValueError(f"directories overlap, so their scans would count twice: {'; '.join(twice)}")
    names = source_names(data_dirs)
    records, errors, evaluated = [], [], {}
    for name, d in zip(names, data_dirs):
        try:
            recs, errs, evaluated[name] = _predict_dir(predictor, d, name)
        except NothingToScore as e:
            recs, errs, evaluated[name] = [], e.errors + [{"file": str(d), "error": str(e)}], "nothing"
        records += recs
        errors += [{**e, "source": name} for e in errs]
    if not records:
        raise NothingToScore("no directory holds an image this model can be judged on", errors)
    if folds_types(predictor.classes):
        records = _folded_to_binary(records)
    ev = evaluate_records(records, predictor.classes, predictor.threshold)
    ev.update(errors=errors, model=predictor.name, evaluated=evaluated)
    return ev


def source_names(data_dirs: list[str | Path]) -> list[str]:
    """Each directory's folder name, numbered where two are alike (two 'Training' folders)."""
    names = [Path(d).resolve().name or "data" for d in data_dirs]
    out: list[str] = []
    for n in names:
        k, name = 1, n
        while name in out or (names.count(n) > 1 and name == n):
            name, k = f"{n}-{k}", k + 1
        out.append(name)
    return out


def _predict_dir(predictor: Predictor, data_dir: str | Path,
                 source: str | None) -> tuple[list[dict], list[dict], str]:
    """(records, errors, which images were evaluated) of one directory; records of scorable images only."""
    from .data import MASK_BESIDE_SCAN, discover, one_folder_note, split_of, typed_inside_coarse_note, untyped_tumour_note
    from .reader import ScanError, file_fault_error, read_scan
    scan = discover(data_dir, source)
    samples, evaluated = evaluation_set(scan.samples, scan.inner)
    # 'Brain Tumor/{Normal T1, Glioma T1}/' (all scored as tumours); 'Brain_Glioma/ Brain Tumor/'
    # (the last has no type); the model's own training images
    for note in filter(None, (one_folder_note(scan), typed_inside_coarse_note(scan), untyped_tumour_note(samples))):
        evaluated += f" (note: {note})"
    records = []
    # neither a training folder's leftovers (when a test split is evaluated) nor the masks kept
    # beside their scans are errors of this evaluation
    errors = [{"file": rel, "error": why} for rel, why in scan.skipped
              if why != MASK_BESIDE_SCAN and (evaluated.startswith("every image")
                                              or split_of(scan.inner(rel).split("/")[0]) != "train")]
    # Only what can be scored is run through the model (an 'astrocytoma' folder is not).
    errors += [{"file": s.rel, "error": f"its folder ('{s.original}') names no class of this model"}
               for s in samples if not scorable(s.label, predictor.classes)]
    samples = [s for s in samples if scorable(s.label, predictor.classes)]
    if not samples:
        raise NothingToScore("no image is in a folder that names a class of this model", errors)
    for s in samples:
        try:
            p = predictor.predict_scan(read_scan(s.path, s.rel))
        except ScanError as e:
            errors.append({"file": s.rel, "error": str(e)})
            continue
        except BaseException as e:  # the reader's surprise for one file never ends the run
            errors.append({"file": s.rel, "error": file_fault_error(e)})
            continue
        records.append(prediction_record(s.rel, s.source, s.label, p))
    if not records:
        raise NothingToScore(f"none of the {len(samples)} image files under {data_dir} could be read",
                             errors)
    # over the images scored: an unreadable file counted in "68 of these 82" beside n = 80
    scored = {r["file"] for r in records}
    if (note := trained_note(predictor, [s for s in samples if s.rel in scored])):
        evaluated += f" (note: {note})"
    return records, errors, evaluated


@functools.lru_cache(maxsize=8)
def _trained_names(split_file: str, stamp: float, held: frozenset[str]) -> frozenset[str]:
    from .data import split_roles
    from .ood import read_split_file
    try:
        roles = split_roles(read_split_file(split_file))
    except (OSError, ValueError, TypeError, AttributeError):   # no usable split.json: nothing to match
        return frozenset()
    # a held-out source's (weight 0) train split trained nothing (`copies_trained_on`)
    return frozenset(Path(rel).name for (src, rel), role in roles.items()
                     if role == "val" or (role == "train" and src not in held))


def trained_file_names(weights_dir: str | Path) -> frozenset[str]:
    """Base names of the files the model trained or was validated on (its split.json): an uploaded
    zip's scan of the same name is taken for the same image. The public sets name their files
    uniquely (Tr-gl_0011.jpg, TCGA_CS_4941_011.jpg); the images themselves are not on the host."""
    f = Path(weights_dir) / "split.json"
    if not f.is_file():
        return frozenset()
    try:
        sources = read_card(weights_dir).get("sources") or []
    except (OSError, ValueError):
        sources = []
    return _trained_names(str(f), f.stat().st_mtime, held_out_sources(sources))


SEEN_FILE = "seen_sha256.txt"


def seen_files(samples: list, sources: list, marked: set[tuple[str, str]] = frozenset()) -> list[str]:
    """The content key (`core.data.content_key`: SHA-256, first 16 hex digits) of every file the
    model trained or was validated on (sources of weight 0 apart: nothing of theirs trained), and
    of every test file with a copy in training (``marked``, eval.json's ``copy_in_training``):
    sorted, one each."""
    from .data import content_key
    held = held_out_sources(sources)
    listed = [s for s in samples if (s.split in ("train", "val") and s.source not in held) or (s.source, s.rel) in marked]
    keys = {s.path: content_key(s.path) for s in listed}
    if unread := [p for p, k in keys.items() if k is None]:
        raise ValueError(f"{len(unread)} files of the split cannot be read (first: {unread[0]})")
    return sorted(set(keys.values()))


def write_seen_files(weights_dir: str | Path, digests: list[str]) -> None:
    text = ("# SHA-256 (first 16 hex digits) of the files this model trained or was validated on, "
            "or whose copy it trained on: an upload of one of them is flagged 'seen in training'\n"
            + "".join(f"{d}\n" for d in digests))
    save_whole(Path(weights_dir) / SEEN_FILE, lambda tmp: tmp.write_text(text))


def seen_digests(weights_dir: str | Path) -> frozenset[str] | None:
    """`SEEN_FILE` of a model folder (None when it has none: no upload can be told apart)."""
    f = Path(weights_dir) / SEEN_FILE
    try:
        lines = f.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    return frozenset(x.strip() for x in lines if x.strip() and not x.startswith("#"))


def mark_seen_files(weights_dir: str | Path, data_config: str | Path | None = None, log=print) -> int:
    """Write a model's `SEEN_FILE` from its split.json, its data and eval.json's copy marks
    (`python -m core seen-files`); returns how many files it lists. Needs every file (ValueError)."""
    from . import data as D
    from .ood import read_split_file, source_roots
    weights_dir = Path(weights_dir)
    card = read_card(weights_dir)
    samples = D.samples_from_record(read_split_file(weights_dir / "split.json"), source_roots(card, data_config))
    if absent := [s.path for s in samples if not os.path.isfile(s.path)]:
        raise ValueError(f"{len(absent)} files of the split are missing (first: {absent[0]})")
    ev = json.loads((weights_dir / "eval.json").read_text()) if (weights_dir / "eval.json").is_file() else {}
    if "copies_in_training" not in ev:
        log("note: eval.json has no copy marks (`python -m core mark-copies`): test files with a copy in "
            "training are not listed")
    digests = seen_files(samples, card.get("sources") or [], copy_marked(ev))
    write_seen_files(weights_dir, digests)
    log(f"{weights_dir / SEEN_FILE}: {len(digests)} files (training, validation and test files with a copy in training)")
    return len(digests)


def trained_note(predictor: Predictor, samples: list) -> str | None:
    """A hint when evaluated files are this model's own training or validation images: by content
    where the model lists them (`SEEN_FILE`; renamed copies too), else by name (`trained_name_note`)."""
    from .inference import sha256_of
    if getattr(predictor, "seen", None):   # a file gone or unreadable is the evaluation's error row, not here
        n = sum(predictor.seen_in_training(sha256_of(s.path)) for s in samples)
        if n:
            return (f"{n} of these {len(samples)} images are, byte for byte, files this model trained or was "
                    "validated on, or whose copy it trained on (its seen_sha256.txt): these figures flatter it")
    return trained_name_note(predictor.dir, [s.rel for s in samples])


def trained_name_note(model_dir: Path, rels: list[str]) -> str | None:
    """A hint when evaluated files carry the names of this model's own training or validation
    images (`trained_file_names`): the shared benchmark's Training/ folder, or a download of it,
    scores far higher than unseen scans, and nothing said so. Names only (the images themselves
    may not be on this machine): 'if they are the same scans'."""
    seen = trained_file_names(model_dir)
    n = sum(Path(r).name in seen for r in rels)
    return (f"{n} of these {len(rels)} images share a file name with images this model trained or was "
            "validated on (its split.json): if they are the same scans, these figures flatter it") if n else None


def evaluation_set(samples: list, inner: Callable[[str], str] = lambda rel: rel.replace("\\", "/")) -> tuple[list, str]:
    """(the images to evaluate, which they are): a Testing/ folder's when the dataset ships one,
    else a Validation/ folder's, else every image, training images included (said so: a model's
    own training images flatter it). ``inner``: a path below the dataset's wrapper folder."""
    for split, folder in (("test", "Testing/ images"), ("val", "Validation/ images")):
        chosen = [s for s in samples if s.preset_split == split]
        if chosen:
            return chosen, folder
    from .data import split_of
    if any(split_of(inner(s.rel).split("/")[0]) for s in samples):
        return samples, ("every image, Training/ included (no Testing/ or Validation/ folder): "
                         "a model's own training images would flatter it")
    return samples, "every image in the class folders (no Testing/ or Validation/ folder to choose from)"


def annotate_ood(weights_dir: str | Path, predictor=None, roots: dict[str, Path] | None = None,
                 data_config: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Run the model's OOD gate over the test files of its eval.json and rewrite it.

    train.py writes eval.json before any gate exists, so every record says in distribution.
    Each record's file (relative to its source root: the card's sources, then ``data_config``)
    is read and checked (~2 ms a file for the gate network alone; gates that score the
    classifier's features add its forward pass); ``in_distribution``/``ood_score`` are
    stored and the summary (``flagged_ood``, ``silent_misses``, per source) recomputed. Missing
    files keep their record unchanged and are counted.
    """
    from .inference import Predictor
    from .ood import source_roots
    from .reader import ScanError, read_scan
    weights_dir = Path(weights_dir)
    path = weights_dir / "eval.json"
    ev = json.loads(path.read_text())
    predictor = predictor or Predictor(weights_dir)
    if predictor.gate is None:
        raise ValueError(f"{weights_dir} has no ood.safetensors: run fit-ood first")
    roots = roots if roots is not None else source_roots(predictor.card, data_config)
    gate = predictor.gate
    records, missing, unreadable, t0 = ev["predictions"], 0, 0, time.time()
    for r in records:
        root = roots.get(source_of(r))
        f = root / r["file"] if root is not None else None
        if f is None or not f.is_file():
            missing += 1
            continue
        try:
            scan = read_scan(f, r["file"])
        except ScanError:
            unreadable += 1
            continue
        x = None
        if gate.uses_classifier:   # the served forward pass (bf16 where the Predictor uses it), whose features the gate reuses
            x = predictor.input_tensor(scan)
            predictor.probabilities(x)
        ok, score, reason = predictor.distribution_check(scan, x)
        r["in_distribution"], r["ood_score"] = bool(ok), None if score is None else round(float(score), 6)
        r["ood_reason"] = reason
    threshold = ev.get("threshold", predictor.threshold)
    fresh = evaluate_records(records, predictor.classes, threshold)
    ev.update(fresh)
    checked = len(records) - missing - unreadable
    ev["ood_annotation"] = {"gate": gate.method, "checked": checked, "missing": missing,
                            "unreadable": unreadable, "flagged": int(sum(not r["in_distribution"]
                                                                         for r in records)),
                            "seconds": round(time.time() - t0, 1),
                            # the served pass's precision: bf16 moves gate scores near the threshold
                            "precision": getattr(predictor, "precision", None)}
    write_json(path, ev)
    log(f"annotate-ood: {checked} test files checked, {ev['ood_annotation']['flagged']} flagged "
        f"out of distribution, {missing} missing, {unreadable} unreadable "
        f"({ev['ood_annotation']['seconds']} s)")
    return ev["ood_annotation"]
