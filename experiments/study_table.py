"""Per-source table of several runs for docs/generalisation.md.

    python experiments/study_table.py runs/study_* weights/mobilenet_v3_small
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _f(v, pct=False) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.1f} %" if pct else f"{v:.3f}"


def row(run: Path) -> str:
    card = json.loads((run / "card.json").read_text())
    ev = json.loads((run / "eval.json").read_text())
    ps = ev.get("per_source", {})
    trained = [s["name"] for s in card["sources"] if s["weight"] > 0]
    b, y, l, n = (ps.get(k, {}) for k in ("benchmark", "br35h", "lgg", "brisc"))
    t = card["training"]
    return (f"| {card['name']} | {', '.join(trained)} | {t['img']} px, {t['epochs_run']} ep, "
            f"{t['train_time_s'] / 60:.0f} min | {_f(b.get('accuracy'), True)} / {b.get('tumour_missed', '—')} "
            f"of {b.get('n_tumour', '—')} | {_f(b.get('ece'))} | {_f(y.get('sensitivity'))} | "
            f"{_f(l.get('accuracy'))} ({_f(l.get('sensitivity'))} / {_f(l.get('specificity'))}) | "
            f"{_f(n.get('specificity'))} |")


def main(runs: list[str]) -> None:
    print("| run | trained on | settings | benchmark test acc / tumours missed | benchmark ECE | "
          "Br35H tumour sensitivity | LGG accuracy (sens / spec) | BRISC specificity |")
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        if (Path(r) / "eval.json").exists():
            print(row(Path(r)))


if __name__ == "__main__":
    main(sys.argv[1:])
