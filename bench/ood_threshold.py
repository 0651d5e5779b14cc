"""What would a looser OOD threshold buy? (an experiment on the served path)

    python bench/ood_threshold.py --weights weights/resnet18_176_ft_rot_mild
    python bench/ood_threshold.py --category real_head_ct_top   # the real head CT's upper slices

The shipped gate flags at most 2 % of each source's validation MRI. This scores every validation
scan and ``--views`` views of the real non-brain DICOM images (`core.outliers.real_medical`, never
trained on; ``--category``: another of `core.outliers.CATEGORIES`) through `Predictor`, then moves the threshold so that at most each ``--fractions``
share of every source's validation MRI is flagged (recomputed here on the served path, so the
2 % row is close to, not the same as, the shipped threshold that fit-ood set), and prints what
share of the real views it would flag. The issue's limit for brain MRI is 3 %. It also counts how the views the shipped gate
lets through are shown: "uncertain, refer" or a confident call.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import header, load_predictor  # noqa: E402
from core import outliers as O  # noqa: E402
from core.inference import default_weights  # noqa: E402
from core.ood import mri_only, source_roots, split_files  # noqa: E402
from core.reader import read_scan  # noqa: E402


def _cut(scores: np.ndarray, fraction: float) -> float:
    """The lowest cut with at most ``fraction`` of ``scores`` strictly above it (flagged)."""
    k = int(np.floor(fraction * len(scores) + 1e-9))
    if k >= len(scores):
        return float("-inf")
    return float(np.sort(scores)[len(scores) - k - 1])


def threshold_table(val: dict[str, np.ndarray], outliers: np.ndarray, fractions: list[float]) -> list[dict]:
    """For each fraction: the ood_score cut that flags at most that share of every source's
    validation scans, and the share of each source and of the outliers it flags (%)."""
    rows = []
    for f in fractions:
        cut = max(_cut(s, f) for s in val.values() if len(s))
        rows.append({"max_val_flagged": f, "cut": round(cut, 3),
                     "val_flagged_pct": {k: round(100 * float(np.mean(s > cut)), 2) for k, s in val.items() if len(s)},
                     "outliers_flagged_pct": round(100 * float(np.mean(outliers > cut)), 1)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="model directory (default: weights/DEFAULT)")
    p.add_argument("--data-config", default="experiments/default.toml")
    p.add_argument("--views", type=int, default=200)
    p.add_argument("--category", default="real_medical", help="outlier category to draw the views from "
                   "(core.outliers.CATEGORIES; real_head_ct_top needs Debian's invesalius-examples; "
                   "scan_ct_test: the test split's head CTs of core/not_mri.txt)")
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.02, 0.025, 0.03, 0.05])
    args = p.parse_args(argv)
    args.weights = str(args.weights or default_weights())
    run = header()
    pred = load_predictor(p, args.weights)
    files, not_mri = mri_only(split_files(Path(args.weights) / "split.json", source_roots(pred.card, args.data_config)))
    O.use_scan_ct(not_mri["train"], not_mri["test"])   # the sources' own head CTs, as fit-ood draws them
    if args.category not in O.CATEGORIES or args.category in O.MRI_DERIVED:
        p.error(f"--category: one of {', '.join(c for c in O.CATEGORIES if c not in O.MRI_DERIVED)}")
    val = {src: np.array([pred.predict_file(f).ood_score for f in sp["val"][0]]) for src, sp in files.items()}
    rng = np.random.default_rng(args.seed)
    draw = O.CATEGORIES[args.category]
    views = [pred.predict_scan(read_scan(O.encode(draw(rng), rng))) for _ in range(args.views)]
    real = np.array([v.ood_score for v in views])
    rows = threshold_table(val, real, args.fractions)
    # What the app shows for the views the shipped gate lets through: "uncertain, refer", or a call.
    passed = [v for v in views if v.in_distribution]
    shown = {"passed_gate": len(passed), "uncertain": sum(v.uncertain for v in passed),
             "called": dict(Counter(v.pred for v in passed if not v.uncertain))}
    print(f"shipped gate (ood_score > 0): {len(passed)} of {len(views)} {args.category} views pass "
          f"({100 * (1 - len(passed) / len(views)):.1f} % flagged); {shown['uncertain']} of them are "
          f"'uncertain, refer', the rest called {shown['called']}")
    for r in rows:
        print(f"val MRI <= {r['max_val_flagged']:.1%} per source (cut {r['cut']:+.3f}): {args.category} views "
              f"flagged {r['outliers_flagged_pct']} %; val flagged {r['val_flagged_pct']}")
    print(json.dumps(run | {"weights": args.weights, "category": args.category, "rows": rows,
                            "shipped_gate_passes": shown}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
