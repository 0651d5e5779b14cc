"""How much do the validation images with a copy in training move the calibration and the
operating point that train.py fits on validation? The shipped default's temperature and threshold
were fitted on a validation split in which 189 images (bench/copy_audit.py --split val, and the
split's own hash check) have a
copy of the same slice in training: the model is surer of those than of a new scan.

    PYTHONPATH=. python bench/val_copies.py                       # the default; ~4 min on 2 cores

Refits both on the validation images without a copy (the hash check's and the audit's list,
copy_pairs_val.tsv beside the weights), as train.py fits them (`core.engine.fit_temperature`,
`pick_threshold` with the card's target and floor), and scores the test images without a copy
(eval.json's marks) under the card's fit and the refit: ECE per source, sensitivity and
specificity at each threshold. Logits from the prepared images train.py evaluates (fp16 weights in
fp32, as `finish` does), so the card's fit is reproduced first as a check.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import header  # noqa: E402
from core import data as D  # noqa: E402
from core import engine as E  # noqa: E402
from core.evaluation import copies_trained_on  # noqa: E402
from core.inference import Predictor, default_weights  # noqa: E402
from core.labels import is_tumour_label  # noqa: E402
from core.metrics import expected_calibration_error, other_calls, tumour_probability  # noqa: E402
from core.ood import read_split_file, source_roots  # noqa: E402


def logits_of(pred: Predictor, samples: list[D.Sample], spec: dict) -> torch.Tensor:
    images = E.cache_images(samples, spec, workers=2)
    return E.predict_logits(pred.model.float(), images, spec, torch.device("cpu"))


def fit(logits, samples, classes, card) -> tuple[float, float]:
    """(temperature, threshold) as `core.training.finish` fits them."""
    masks = E.target_masks(samples, classes)
    t = E.fit_temperature(logits, masks)
    probs = torch.softmax(logits / t, 1).numpy()
    known = [i for i, s in enumerate(samples) if is_tumour_label(s.label) is not None]
    op = card["operating_point"]
    thr = E.pick_threshold(tumour_probability(probs[known], classes),
                           np.array([bool(is_tumour_label(samples[i].label)) for i in known]),
                           op["target_sensitivity"], op["min_specificity"],
                           groups=np.array([samples[i].source for i in known]),
                           never=other_calls(probs[known], classes))
    return t, thr


def scores(logits, samples, classes, t, thr) -> dict:
    probs = torch.softmax(logits / t, 1).numpy()
    out = {}
    for src in sorted({s.source for s in samples}):
        rows = [i for i, s in enumerate(samples) if s.source == src]
        typed = [i for i in rows if samples[i].label in classes]
        lab = np.array([classes.index(samples[i].label) for i in typed])
        top = probs[typed]
        ece = expected_calibration_error(top.max(1), top.argmax(1) == lab) if typed else None
        tp = tumour_probability(probs[rows], classes)
        is_t = np.array([bool(is_tumour_label(samples[i].label)) for i in rows])
        call = tp >= thr
        out[src] = {"n": len(rows), "ece": ece,
                    "sensitivity": float(call[is_t].mean()) if is_t.any() else None,
                    "specificity": float((~call[~is_t]).mean()) if (~is_t).any() else None}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="model directory (default: weights/DEFAULT)")
    args = p.parse_args(argv)
    header("cpu")
    torch.set_num_threads(2)
    wdir = Path(args.weights or default_weights())
    pred = Predictor(wdir)
    card, classes = pred.card, pred.classes
    record = read_split_file(wdir / "split.json")
    samples = D.samples_from_record(record, source_roots(card, None))
    held = {s["name"] for s in card["sources"] if s.get("weight", 1) == 0}
    hashed = copies_trained_on(samples, card["sources"], known=False)   # the hash check's, as measured
    listed = {a for a, _ in D.read_copy_pairs(wdir / "copy_pairs_val.tsv")}
    val = [s for s in samples if s.split == "val" and s.source not in held]
    clean_val = [i for i, s in enumerate(val) if (s.source, s.rel) not in hashed | listed]
    marks = {(r["source"], r["file"]): bool(r.get("copy_in_training"))
             for r in json.loads((wdir / "eval.json").read_text())["predictions"]}
    test = [s for s in samples if s.split == "test" and not marks.get((s.source, s.rel), False)]
    spec = card["preprocessing"]
    print(f"{wdir.name}: validation {len(val)} images, {len(val) - len(clean_val)} with a copy in training; "
          f"test {len(test)} without one")
    vl, tl = logits_of(pred, val, spec), logits_of(pred, test, spec)
    t_all, thr_all = fit(vl, val, classes, card)
    t_clean, thr_clean = fit(vl[clean_val], [val[i] for i in clean_val], classes, card)
    print(f"card: temperature {card['calibration']['temperature']:.4f}, threshold {card['operating_point']['threshold']:.4f}")
    print(f"refit on all validation images (the card's fit, reproduced): T {t_all:.4f}, threshold {thr_all:.4f}")
    print(f"refit without the validation copies: T {t_clean:.4f}, threshold {thr_clean:.4f}")
    print("\ntest images without a copy, per source: ECE / sensitivity / specificity")
    a = scores(tl, test, classes, t_all, thr_all)
    b = scores(tl, test, classes, t_clean, thr_clean)
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    print(f"{'source':10s} {'n':>5s}  {'card fit':>24s}  {'fit without copies':>24s}")
    for src in a:
        cells = ["  ".join(fmt(x[src][k], ".4f") for k in ("ece", "sensitivity", "specificity")) for x in (a, b)]
        print(f"{src:10s} {a[src]['n']:5d}  {cells[0]:>24s}  {cells[1]:>24s}")
    print(json.dumps({"t_all": t_all, "thr_all": thr_all, "t_clean": t_clean, "thr_clean": thr_clean,
                      "card_fit": a, "fit_without_copies": b}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
