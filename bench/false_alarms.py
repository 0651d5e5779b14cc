"""Where are a model's test errors of one kind, and does training hold anything like them?

    python bench/false_alarms.py --weights weights/resnet18_176_copyaware_ft --source benchmark
    python bench/false_alarms.py --source lgg --kind missed

Reads the model's own test records (eval.json, no forward pass) and, at the card's operating
point, lists each false alarm (a no-tumour scan called tumour; ``--kind missed``: a tumour called
no tumour) with its flags, then joins errors whose head thumbnails correlate >= ``--join``
(`core.data`'s copy check uses 0.97 for one scan; lower joins neighbouring slices of one series)
and, for each, the most alike image of the training split of any source. An error far from
everything the model trained on is a kind of scan training lacks, not a noisy call.
Error analysis only: nothing is tuned on it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import header  # noqa: E402
from core import data as D  # noqa: E402
from core.inference import default_weights, load_card  # noqa: E402
from core.ood import source_roots  # noqa: E402

THUMB_SIDE = 48   # `core.data._thumb`'s default side: the width of a row of no thumbnails


def errors(records: list[dict], source: str, threshold: float, kind: str) -> list[dict]:
    """Test records of ``source`` that are false alarms or missed tumours at ``threshold``."""
    mine = [r for r in records if r.get("source") == source and r.get("tumour_probability") is not None]
    if kind == "missed":
        return [r for r in mine if r["label"] != "notumor" and r["tumour_probability"] < threshold]
    return [r for r in mine if r["label"] == "notumor" and r["tumour_probability"] >= threshold]


def thumbs(paths: list[str]) -> tuple[np.ndarray, list[int]]:
    """Head thumbnails as rows (unit norm, so a product is a correlation), and which paths had one."""
    thumb = D._thumbs(paths)
    rows = [(i, thumb(i)) for i in range(len(paths))]
    kept = [i for i, t in rows if t is not None]
    if not kept:   # np.stack of nothing raises; no rows correlate with nothing
        return np.zeros((0, THUMB_SIDE * THUMB_SIDE), np.float32), kept
    return np.stack([t.ravel() for _, t in rows if t is not None]), kept


def rows_of(n: int, kept: list[int]) -> list[int | None]:
    """For each of ``n`` paths, its row among the thumbnails `thumbs` kept; None for a file it could
    not read (rows are the readable files only, so a position would pair a file with the next one's)."""
    where = {i: k for k, i in enumerate(kept)}
    return [where.get(i) for i in range(n)]


def describe(found: list[dict], rows: list[int | None], corr: np.ndarray, ids: list[int],
             train: list, tr_kept: list[int]) -> list[dict]:
    """One entry per error: its call, flags, series and nearest training image (``rows`` from
    `rows_of`; an unreadable error has no series and no nearest image)."""
    out = []
    for r, i in zip(found, rows):
        o = {"file": r["file"], "pred": r["pred"], "tumour_probability": round(r["tumour_probability"], 3),
             "uncertain": bool(r.get("uncertain")), "in_distribution": r.get("in_distribution"),
             "silent": not r.get("uncertain") and r.get("in_distribution", True) is not False,
             "unreadable": i is None, "series": None, "nearest_train": None, "nearest_train_r": None}
        if i is not None and corr.shape[1]:
            k = tr_kept[int(np.argmax(corr[i]))]
            o |= {"series": ids[i], "nearest_train": f"{train[k].source}/{train[k].rel}",
                  "nearest_train_r": round(float(corr[i].max()), 3)}
        out.append(o)
    return out


def line(o: dict) -> str:
    """One error as printed."""
    head = f"{o['file']:34s} {o['pred']:10s} p(tumour) {o['tumour_probability']:.3f}  " \
           f"{'silent' if o['silent'] else 'flagged/referred':16s}"
    if o["unreadable"]:
        return f"unreadable {head} its image could not be read: not compared"
    if o["nearest_train"] is None:
        return f"series {o['series']:2d}  {head} no readable training image to compare with"
    return f"series {o['series']:2d}  {head} nearest training image {o['nearest_train']} r={o['nearest_train_r']:.3f}"


def clusters(thumbs: np.ndarray, join: float) -> list[int]:
    """Cluster id per row: rows joined when their correlation reaches ``join`` (single linkage)."""
    ids = list(range(len(thumbs)))
    corr = thumbs @ thumbs.T
    for i in range(len(thumbs)):
        for j in range(i + 1, len(thumbs)):
            if corr[i, j] >= join and ids[j] != ids[i]:
                old = ids[j]
                ids = [ids[i] if x == old else x for x in ids]
    return ids


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="model directory (default: weights/DEFAULT)")
    p.add_argument("--source", default="benchmark")
    p.add_argument("--kind", choices=("false-alarm", "missed"), default="false-alarm")
    p.add_argument("--join", type=float, default=0.9, help="thumbnail correlation that joins two errors")
    p.add_argument("--baseline", type=int, default=100,
                   help="correctly called test images of the same truth to compare with")
    p.add_argument("--data-config", default="experiments/default.toml")
    args = p.parse_args(argv)
    weights = Path(args.weights or default_weights())
    run = header()
    ev = json.loads((weights / "eval.json").read_text())
    record = json.loads((weights / "split.json").read_text())["files"]
    samples = D.samples_from_record(record, source_roots(load_card(weights), args.data_config))
    path_of = {(s.source, s.rel): s.path for s in samples}
    found = errors(ev["predictions"], args.source, ev["threshold"], args.kind)
    if not found:
        print(f"no {args.kind} among {args.source}'s test records")
        return 0
    train = [s for s in samples if s.split == "train"]
    print(f"{len(found)} {args.kind}(s) in {args.source}; comparing with {len(train)} training images ...")
    tr, tr_kept = thumbs([s.path for s in train])
    mine, kept = thumbs([path_of.get((args.source, r["file"]), "") for r in found])   # "": not in the split, unreadable
    corr = mine @ tr.T
    ids = clusters(mine, args.join)
    ids = [sorted(set(ids)).index(x) for x in ids]
    out = describe(found, rows_of(len(found), kept), corr, ids, train, tr_kept)
    for o in sorted(out, key=lambda o: (o["unreadable"], o["series"] or 0, o["file"])):
        print(line(o))
    truth_normal = args.kind == "false-alarm"
    right = [r for r in ev["predictions"] if r.get("source") == args.source and r not in found
             and (r["label"] == "notumor") == truth_normal]
    pick = np.random.default_rng(0).permutation(len(right))[:args.baseline]
    base, _ = thumbs([path_of.get((args.source, right[i]["file"]), "") for i in pick])
    near = (base @ tr.T).max(axis=1) if len(base) and len(tr) else np.zeros(0)
    median, p10 = (round(float(np.median(near)), 3), round(float(np.percentile(near, 10)), 3)) if len(near) else (None, None)
    print(f"for comparison, {len(near)} other test images of the same truth: nearest training image "
          f"r median {median}, 10th percentile {p10}")
    silent = [o for o in out if o["silent"]]
    unread = sum(o["unreadable"] for o in silent)
    print(f"{len(silent)} of {len(out)} carry no flag; they fall in "
          f"{len({o['series'] for o in silent if not o['unreadable']})} series (thumbnails r >= {args.join})"
          + (f", and {unread} could not be read" if unread else ""))
    print(json.dumps(run | {"weights": str(weights), "source": args.source, "kind": args.kind, "errors": out,
                            "baseline_nearest_r": {"n": len(near), "median": median, "p10": p10}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
