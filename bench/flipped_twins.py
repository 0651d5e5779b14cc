"""How much do flipped copies across a model's recorded split flatter its test figures?

    python bench/flipped_twins.py --weights weights/resnet18_176_ft_rot_mild

The benchmark and Br35H hold mirrored and half-turned copies of their own images, which the
phash grouping of earlier splits did not join (`core.data.flipped_twin_pairs` now does). This
finds, over the model's recorded split (`core.data.copies_in_training`), every test image whose
near duplicate or flipped copy is a training image ("leaky"; `python -m core mark-copies` writes the
same marks into eval.json for the Evaluation page), and re-scores the model's own test records (eval.json, no forward pass) on all, on the
strict rest, and on the leaky part, per source, at the card's operating point. It also counts
validation images so reached (they chose the epoch, the temperature and the threshold).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import header  # noqa: E402
from core import data as D  # noqa: E402
from core.evaluation import evaluate_records  # noqa: E402
from core.inference import default_weights, load_card  # noqa: E402
from core.ood import source_roots  # noqa: E402

FIELDS = ("n", "accuracy", "tumour_missed", "n_tumour", "sensitivity", "normal_flagged", "n_normal", "specificity")


def scores(records: list[dict], classes: list[str], threshold: float | None) -> dict:
    ev = evaluate_records(records, classes, threshold)
    per = ev.get("per_source") or {records[0].get("source", "data"): ev} if records else {}
    return {src: {k: m.get(k) for k in FIELDS} for src, m in per.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="model directory (default: weights/DEFAULT)")
    p.add_argument("--data-config", default="experiments/default.toml")
    args = p.parse_args(argv)
    args.weights = str(args.weights or default_weights())
    run = header()
    weights = Path(args.weights)
    record = json.loads((weights / "split.json").read_text())["files"]
    samples = D.samples_from_record(record, source_roots(load_card(weights), args.data_config))
    leaky = D.copies_in_training(samples, known=False)   # the hash and flip checks this study is about
    split_of = {(s.source, s.rel): s.split for s in samples}
    reached = Counter(f"{split_of[k]}/{k[0]}" for k in leaky)
    totals = Counter(f"{s.split}/{s.source}" for s in samples if s.split != "train")
    print("val/test images with a near duplicate or a flipped copy in training: "
          + ", ".join(f"{k} {reached[k]} of {totals[k]}" for k in sorted(totals)))
    ev = json.loads((weights / "eval.json").read_text())
    recs = ev["predictions"]
    parts = {"all": recs,
             "strict": [r for r in recs if (r.get("source", "data"), r["file"]) not in leaky],
             "leaky": [r for r in recs if (r.get("source", "data"), r["file"]) in leaky]}
    result = {name: scores(rs, ev["classes"], ev["threshold"]) for name, rs in parts.items()}
    for src in result["all"]:
        for name in parts:
            m = result[name].get(src)
            if not m:
                continue
            acc = "—" if m["accuracy"] is None else f"{100 * m['accuracy']:.1f} %"
            sens = "—" if m["sensitivity"] is None else f"{m['sensitivity']:.3f}"
            spec = "—" if m["specificity"] is None else f"{m['specificity']:.3f}"
            print(f"{src:10s} {name:6s} n={m['n']:4d}  accuracy {acc:7s} tumours missed {m['tumour_missed']} "
                  f"of {m['n_tumour']}  sensitivity {sens}  specificity {spec} ({m['normal_flagged']} of {m['n_normal']} flagged)")
    print(json.dumps(run | {"weights": str(weights), "reached_from_train": dict(reached),
                            "totals": dict(totals), "result": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
