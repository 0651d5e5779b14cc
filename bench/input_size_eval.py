"""How well a model reads its validation split at input sizes other than its own.

    python bench/input_size_eval.py --weights weights/resnet18_192_gpu_ema120_s2 --sizes 128 176 192

Each size prepares the model's validation images (its split.json, the sources of its card: the
shared data must be beside the checkout) with the model's preprocessing at that size, and prints
the loss and accuracy of the shipped weights (a coarse label counts as right when it allows the top
class). It answers whether a teacher (`train.py --teacher --distill-online`) can read a student's
batches at the student's sizes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import header, load_predictor  # noqa: E402
import core.data as D  # noqa: E402
import core.engine as E  # noqa: E402
from core.models import create_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True)
    p.add_argument("--sizes", type=int, nargs="+", required=True)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    args = p.parse_args(argv)
    pred = load_predictor(p, args.weights)
    header()
    from core import training as TR  # its reader of a card's sources, with their folder-name maps
    sources = [{k: s[k] for k in ("name", "path", "weight")} | {"label_map": s.get("label_map")}
               for s in pred.card["sources"]]
    samples, _ = TR.load_samples(sources, argparse.Namespace(limit=0, seed=0, binary=False))
    D.apply_split_record(samples, json.loads((pred.dir / "split.json").read_text())["files"])
    val = [i for i, s in enumerate(samples) if s.split == "val"]
    masks = E.target_masks([samples[i] for i in val], pred.classes)
    model = create_model(pred.card["arch"], len(pred.classes))
    model.load_state_dict(E.shipped_state(model, pred.dir))
    own = pred.card["preprocessing"]
    print(f"{len(val)} validation images; the model's own input: {own['size']} px")
    for size in args.sizes:
        images = E.cache_images(samples, own | {"size": size})[val]
        r = E.evaluate_split(model, images, masks, own, torch.device("cpu"), args.precision)
        print(f"{size:4d} px: loss {r['loss']:.4f}  accuracy {r['acc']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
