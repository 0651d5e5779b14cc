"""Evaluation records and reports shared by train.py, `python -m core evaluate` and the app."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .labels import NO_TUMOUR, TUMOUR, tumour_classes
from .metrics import (classification_metrics, decide, is_tumour_label, risk_coverage,
                      threshold_curve, tumour_probability)


def prediction_records(samples, probs: np.ndarray, classes: list[str], threshold: float | None,
                       min_confidence: float = 0.0, flags: list[dict] | None = None) -> list[dict]:
    """One record per image: file, source, label, pred, probs and the flags."""
    pred = decide(probs, classes, threshold)
    t_prob = tumour_probability(probs, classes) if tumour_classes(classes) else None
    out = []
    for i, s in enumerate(samples):
        conf = float(probs[i].max())
        rec = {"file": s.rel, "source": s.source, "label": s.label, "pred": classes[pred[i]],
               "probs": {c: round(float(v), 6) for c, v in zip(classes, probs[i])},
               "tumour_probability": None if t_prob is None else round(float(t_prob[i]), 6),
               "confidence": round(conf, 6), "uncertain": conf < min_confidence,
               "in_distribution": True, "ood_score": None}
        if flags:
            rec.update(flags[i])
        out.append(rec)
    return out


def _metrics_for(records: list[dict], classes: list[str], threshold: float | None) -> dict:
    probs = np.array([[r["probs"][c] for c in classes] for r in records])
    labels = [r["label"] for r in records]
    m = classification_metrics(probs, labels, classes, threshold)
    truth = [is_tumour_label(lab) for lab in labels]
    known = [i for i, t in enumerate(truth) if t is not None]
    if known and m.get("n_tumour") is not None:
        tp = np.array([records[i]["tumour_probability"] for i in known])
        is_t = np.array([truth[i] for i in known])
        m["threshold_curve"] = threshold_curve(tp, is_t)
        flagged = np.array([(not records[i]["in_distribution"]) or records[i]["uncertain"]
                            for i in known])
        missed = is_t & np.array([records[i]["pred"] == NO_TUMOUR for i in known])
        m["silent_misses"] = int((missed & ~flagged).sum())
    m["flagged_ood"] = int(sum(not r["in_distribution"] for r in records))
    m["referred_uncertain"] = int(sum(r["uncertain"] for r in records))
    fine = [r for r in records if r["label"] in classes]
    if fine:
        conf = np.array([r["confidence"] for r in fine])
        correct = np.array([max(r["probs"], key=r["probs"].get) == r["label"] for r in fine])
        m["risk_coverage"] = risk_coverage(conf, correct)
    return m


def evaluate_records(records: list[dict], classes: list[str], threshold: float | None) -> dict:
    """Overall metrics, the same per source, and the records themselves as ``predictions``."""
    ev = _metrics_for(records, classes, threshold)
    sources = sorted({r.get("source", "data") for r in records})
    if len(sources) > 1:
        ev["per_source"] = {s: _metrics_for([r for r in records if r.get("source") == s],
                                            classes, threshold) for s in sources}
    ev["predictions"] = records
    return ev


def fold_to_binary_labels(records: list[dict]) -> None:
    """yes/no folders against a multi-class model: every fine tumour label counts as 'tumor'."""
    for r in records:
        if is_tumour_label(r["label"]) and r["label"] != TUMOUR:
            r["label"] = TUMOUR


def evaluate_dir(predictor, data_dir: str | Path, progress: Callable[[float], None] | None = None) -> dict:
    """Evaluate any class-per-folder directory with a loaded `Predictor`."""
    from .data import discover
    from .reader import ScanError, read_scan
    scan = discover(data_dir)
    records, errors = [], [{"file": rel, "error": why} for rel, why in scan.skipped]
    samples = scan.samples
    for k, s in enumerate(samples):
        try:
            p = predictor.predict_scan(read_scan(s.path, s.rel))
        except ScanError as e:
            errors.append({"file": s.rel, "error": str(e)})
            continue
        records.append({"file": s.rel, "source": s.source, "label": s.label, "pred": p.pred,
                        "probs": p.probs, "tumour_probability": p.tumour_probability,
                        "confidence": p.confidence, "uncertain": p.uncertain,
                        "in_distribution": p.in_distribution, "ood_score": p.ood_score})
        if progress:
            progress((k + 1) / len(samples))
    classes = predictor.classes
    labels = {r["label"] for r in records}
    if not labels <= set(classes) and labels <= {TUMOUR, NO_TUMOUR, *classes}:
        fold_to_binary_labels(records)
    ev = evaluate_records(records, classes, predictor.threshold)
    ev["errors"] = errors
    ev["model"] = predictor.name
    return ev
