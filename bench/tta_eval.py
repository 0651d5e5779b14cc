"""Test-time augmentation (mirror image) against a plain forward, on a model's own test split.

    python bench/tta_eval.py --weights weights/resnet18_176 [--sources benchmark lgg]

Reads each test file that the model's eval.json lists (the shared data must be beside the
checkout), runs the served path (reader, preprocessing, fp16 weights) once as is and once
mirrored, and prints the argmax accuracy of both per source. TTA doubles the forward cost.
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
from core.app_support import record_scan_path  # noqa: E402
from core.inference import Predictor  # noqa: E402
from core.reader import read_scan  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="model directory (default: weights/DEFAULT)")
    p.add_argument("--sources", nargs="+", default=["benchmark", "lgg"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pred = Predictor(args.weights)
    run = header()
    records = json.loads((pred.dir / "eval.json").read_text())["predictions"]
    result = {}
    for src in args.sources:
        rows = [r for r in records if r.get("source") == src and r["label"] in pred.classes]
        hits = {"plain": [], "tta": []}
        with torch.inference_mode():
            for r in rows:
                x = pred.input_tensor(read_scan(record_scan_path(pred.card, r)))
                z, zf = pred.model(x)[0], pred.model(torch.flip(x, dims=[3]))[0]
                truth = pred.classes.index(r["label"])
                hits["plain"].append(int(z.argmax()) == truth)
                hits["tta"].append(int((z + zf).argmax()) == truth)
        result[src] = {k: round(float(np.mean(v)), 4) for k, v in hits.items()} | {"n": len(rows)}
        print(f"{src}: {len(rows)} images with a class label, argmax accuracy plain "
              f"{result[src]['plain']:.4f}, with mirror TTA {result[src]['tta']:.4f}")
    print(json.dumps(run | {"weights": str(pred.dir), "result": result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
