"""Do several models err on the same images? Argmax accuracy alone and averaged, on one split.

    python bench/ensemble_eval.py --weights weights/resnet18_176_ft_rot_mild weights/resnet18_176 \
        weights/resnet18_176_ft_mask [--source benchmark] [--split val]

Each model serves each file of the first model's split (``val``: its split.json, the default;
``test``: its eval.json) through `Predictor` (reader, preprocessing, calibrated probabilities).
Prints each model's plain argmax accuracy, the accuracy of the mean of their probabilities, and
how many images are wrong in at least one model and in all of them. Many "any", few "all" means
the errors move from run to run (an ensemble or more data could help); the reverse means hard
images. The models must share the split (runs continued with ``train.py --init`` do).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import header, json_output, load_predictor, positive  # noqa: E402
from bench.tta_eval import labelled_files  # noqa: E402
from core.inference import Predictor  # noqa: E402
from core.reader import read_scan  # noqa: E402


def served_probs(pred: Predictor, files: list[Path]) -> np.ndarray:
    return np.concatenate([pred.probabilities(pred.input_tensor(read_scan(f))) for f in files])


def agreement(probs: dict[str, np.ndarray], y: np.ndarray) -> dict:
    """Each model's argmax accuracy, the mean-probability ensemble's, and the images wrong in any
    model and in all of them."""
    wrong = {w: set(np.nonzero(pr.argmax(1) != y)[0].tolist()) for w, pr in probs.items()}
    return {"n": len(y), "models": {w: 1 - len(e) / len(y) for w, e in wrong.items()},
            "mean_of_all": float((np.mean(list(probs.values()), 0).argmax(1) == y).mean()),
            "wrong_in_any": len(set.union(*wrong.values())),
            "wrong_in_all": len(set.intersection(*wrong.values()))}


def trained_on(preds: list, source: str, files: list[Path]) -> tuple[str, int] | None:
    """(a model, how many of ``files`` it trained on) for the first model that trained on any
    of them, else None: an ensemble measured on a member's training images flatters it."""
    names = {(f.parent.name, f.name) for f in files}  # class folder and file: unique in a source
    for pr in preds:
        split = json.loads((Path(pr.dir) / "split.json").read_text())["files"]
        train = {tuple(Path(rel).parts[-2:]) for rel in split.get(source, {}).get("train", [])}
        if (n := len(names & train)):
            return str(pr.dir), n
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", nargs="+", required=True, help="model directories (same classes and split)")
    p.add_argument("--source", default="benchmark")
    p.add_argument("--split", choices=("test", "val"), default="val")
    p.add_argument("--threads", type=positive, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    json_output(args.json)  # its folder made now, not after the run
    torch.set_num_threads(args.threads)
    run = header()
    preds = [load_predictor(p, w) for w in args.weights]
    if any(pr.classes != preds[0].classes for pr in preds):
        p.error("the models have different class lists")
    rows = labelled_files(preds[0], args.source, args.split)
    if (seen := trained_on(preds, args.source, [f for f, _ in rows])):
        p.error(f"{seen[0]} trained on {seen[1]} of these {len(rows)} {args.split} files: the models "
                "must share one split (train.py --split-from, or --init)")
    if not rows:
        p.error(f"no {args.split} file of source {args.source!r} found (is ../shared beside the checkout?)")
    files, y = [f for f, _ in rows], np.array([preds[0].classes.index(c) for _, c in rows])
    result = agreement({w: served_probs(pr, files) for w, pr in zip(args.weights, preds)}, y)
    for w, acc in result["models"].items():
        print(f"{w:50s} {acc:.2%} ({round((1 - acc) * len(y))} wrong)")
    print(f"{'mean of the probabilities':50s} {result['mean_of_all']:.2%}")
    print(f"wrong in any model {result['wrong_in_any']}, in all {result['wrong_in_all']} (n={len(y)}, "
          f"{args.source} {args.split})")
    out = {**run, "source": args.source, "split": args.split, "result": result}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
