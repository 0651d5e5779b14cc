"""Test-time augmentation (mirror image) against a plain forward, on a model's own test split.

    python bench/tta_eval.py --weights weights/resnet18_176 [--sources benchmark lgg] [--split val]

Reads each test file that the model's eval.json lists (``--split val``: each validation file of
its split.json; the shared data must be beside the checkout), runs the reader, preprocessing and
the shipped weights (fp32 forward) once as is and once mirrored, and prints the argmax accuracy per
source: plain, with mirror TTA, and with TTA only where the plain calibrated confidence is below
``--selective`` (the share of images that pay for the second pass is printed). TTA doubles the
forward cost of the images it runs on. Decide on ``--split val``; ``test`` only reports.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import header, load_predictor, no_files_error, positive  # noqa: E402
from core.app_support import record_scan_path  # noqa: E402
from core.inference import MIRROR_ALWAYS, Predictor, apply_tta, tta_rows  # noqa: E402
from core.ood import source_roots, split_files  # noqa: E402
from core.reader import read_scan  # noqa: E402


def labelled_files(pred: Predictor, source: str, split: str,
                   extra_labels: tuple[str, ...] = ()) -> list[tuple[Path, str]]:
    """(file, class) of one source's split, for files whose label is one of the model's classes
    (or one of ``extra_labels``, e.g. the coarse "tumor" of Br35H, where only sensitivity counts)."""
    wanted = set(pred.classes) | set(extra_labels)
    if split == "test":
        records = json.loads((pred.dir / "eval.json").read_text())["predictions"]
        rows = [(record_scan_path(pred.card, r), r["label"]) for r in records
                if r.get("source") == source and r["label"] in wanted]
        return [(p, label) for p, label in rows if p is not None]
    files = split_files(pred.dir / "split.json", source_roots(pred.card, None)).get(source, {})
    paths, groups = files.get(split, ([], []))
    return [(Path(p), g.split("/", 1)[1]) for p, g in zip(paths, groups)
            if g.split("/", 1)[1] in wanted and Path(p).is_file()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="model directory (default: weights/DEFAULT)")
    p.add_argument("--sources", nargs="+", default=["benchmark", "lgg"])
    p.add_argument("--threads", type=positive, default=2)
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--selective", type=float, default=0.95,
                   help="run the mirror pass only below this plain confidence")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pred = load_predictor(p, args.weights)
    run = header()
    # the served rule (core.inference.apply_tta), picking rows at this model's plain temperature
    rule = {"kind": "mirror", "below_confidence": args.selective, "selection_temperature": pred.temperature}
    result = {}
    for src in args.sources:
        rows = labelled_files(pred, src, args.split)
        if not rows:  # a misspelt source, or data not beside the checkout: no silent n=0
            no_files_error(p, pred, src, args.split)
        hits = {"plain": [], "tta": [], "selective": [], "selective_share": []}
        with torch.inference_mode():
            for path, label in rows:
                x = pred.input_tensor(read_scan(path))
                z = pred.model(x)
                truth = pred.classes.index(label)
                hits["plain"].append(int(z.argmax()) == truth)
                hits["tta"].append(int(apply_tta(pred.model, x, z, MIRROR_ALWAYS).argmax()) == truth)
                hits["selective"].append(int(apply_tta(pred.model, x, z, rule).argmax()) == truth)
                hits["selective_share"].append(bool(tta_rows(z, rule)[0]))
        result[src] = {k: round(float(np.mean(v)), 4) for k, v in hits.items()} | {"n": len(rows)}
        print(f"{src} ({args.split}): {len(rows)} images with a class label, argmax accuracy plain "
              f"{result[src]['plain']:.4f}, with mirror TTA {result[src]['tta']:.4f}, TTA below "
              f"confidence {args.selective} {result[src]['selective']:.4f} "
              f"(second pass on {100 * result[src]['selective_share']:.0f} %)")
    print(json.dumps(run | {"weights": str(pred.dir), "result": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
