"""A contact sheet of saliency maps on test tumours of a source without masks, for reading by eye.

Only LGG ships tumour masks, so `python -m core saliency-check` measures where the maps point on
FLAIR gliomas alone. This draws, for a seeded sample of a source's test tumours with no copy in
training, each scan as the model sees it beside its map for the class called, so that where the
maps of the other types lie can at least be looked at (docs/generalisation.md says what was seen).

    python bench/saliency_grid.py --weights weights/resnet18_192_gpu_ema120_s2 --per-class 8 --out runs/saliency_grid.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.app_support import display_image, gallery_scan  # noqa: E402
from core.inference import Predictor, resolve_weights  # noqa: E402
from core.saliency import default_method, overlay, saliency_map  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="weights folder (default: the shipped default)")
    ap.add_argument("--source", default="benchmark")
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--method", default=None, help="default: the card's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/saliency_grid.png")
    args = ap.parse_args(argv)
    weights = resolve_weights(args.weights)
    predictor = Predictor(weights)
    method = args.method or default_method(predictor.card)
    records = json.loads((weights / "eval.json").read_text())["predictions"]
    rng = np.random.default_rng(args.seed)
    tiles, names = [], []
    for cls in [c for c in predictor.classes if c != "notumor"]:
        pool = [r for r in records if r.get("source") == args.source and r["label"] == cls
                and not r.get("copy_in_training")]
        for k in sorted(rng.choice(len(pool), min(args.per_class, len(pool)), replace=False)):
            r = pool[k]
            scan = gallery_scan(predictor.card, r)
            if scan is None:
                raise SystemExit(f"{r['file']} is not on this machine: the source's folder is missing")
            base = display_image(scan, predictor.spec)
            cam = saliency_map(predictor, scan, method, r["pred"])
            grey = np.repeat((base * 255).astype(np.uint8)[..., None], 3, 2)
            tile = Image.fromarray(np.concatenate([grey, overlay(base, cam, 0.4)], 1))
            ImageDraw.Draw(tile).text((4, 4), f"{len(tiles) + 1} {cls[:4]}->{r['pred'][:4]}", fill=(255, 255, 0))
            tiles.append(np.asarray(tile))
            names.append(f"{len(tiles)}\t{r['file']}\t{cls}\t{r['pred']}")
    cols = 3
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    sheet = np.concatenate([np.concatenate(tiles[i:i + cols], 1) for i in range(0, len(tiles), cols)], 0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(args.out)
    print(f"command: python bench/saliency_grid.py {' '.join(argv or sys.argv[1:])}")
    print(f"{method} maps for the class called, {args.source} test tumours without a copy in training:")
    print("\n".join(names))
    print(f"sheet: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
