"""Does averaging several gate networks make the OOD gate generalise better? (an experiment)

    python bench/ood_ensemble.py --weights weights/resnet18_176 --seeds 3

Trains ``--seeds`` gate networks (`core.ood.train_gate_net`, seeds 0..N-1) twice: on every
outlier category, and on every category except the first held-out fold of
`core.ood.category_folds`. For each single network and for their mean logit it fits the
cnn+colour gate (threshold on validation MRI, as fit-ood does) and reports % flagged of each
source's test MRI, of the real non-brain DICOM views (`real_medical`, never trained on), and of
the held-out fold's categories (for the fold networks). Uses fit-ood's caches when present.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._machine import header, json_output, positive  # noqa: E402
from core.data import read_card  # noqa: E402
from core import outliers as O  # noqa: E402
from core.ood import (ImageSet, OODGate, _load_mri, category_folds, outlier_set,  # noqa: E402
                      train_gate_net)


class MeanLogit(nn.Module):
    def __init__(self, nets: list[nn.Module]):
        super().__init__()
        self.nets = nn.ModuleList(nets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([n(x) for n in self.nets]).mean(0)


def rates(net: nn.Module, d: dict, test_out: dict[str, ImageSet]) -> dict:
    gate = OODGate.fit(d["pos"], None, d["val"], "cnn+colour", net=net, log=lambda *a: None)
    pct = lambda data: round(100 * float(np.mean(gate.scores(data) > 0)), 1)  # noqa: E731
    return {"test_mri": {s: pct(x) for s, x in d["test"].items()},
            "outliers": {c: pct(x) for c, x in test_out.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=str(ROOT / "weights" / "resnet18_176"))
    p.add_argument("--data-config", default=str(ROOT / "experiments" / "default.toml"))
    p.add_argument("--seeds", type=positive, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    json_output(args.json)  # its folder made now, not after the run
    torch.set_num_threads(2)
    run = header()
    w = Path(args.weights)
    card = read_card(w)
    d = _load_mri(card, args.data_config, w / "split.json", None, 0, 0, print)
    cats = list(O.SEEN) + list(O.UNSEEN)
    held = category_folds(cats, 4)[0]
    neg = {c: outlier_set(c, 700, 0, None, d["train_mri"]) for c in cats}
    test_out = {c: outlier_set(c, 200, 1000, None, d["test_mri"]) for c in held + list(O.TEST_ONLY)}
    result: dict = {"held_out_fold": held}
    for setting, kept in (("all", cats), ("fold1_held_out", [c for c in cats if c not in held])):
        nets = []
        for s in range(args.seeds):
            t0 = time.time()
            nets.append(train_gate_net(d["pos"], ImageSet.concat([neg[c] for c in kept]), epochs=args.epochs,
                                       seed=s, log=lambda *a: None))
            result[f"{setting}/seed{s}"] = rates(nets[-1], d, test_out)
            print(setting, f"seed {s} ({time.time() - t0:.0f} s):", json.dumps(result[f"{setting}/seed{s}"]), flush=True)
        result[f"{setting}/mean_logit"] = rates(MeanLogit(nets).eval(), d, test_out)
        print(setting, "mean logit:", json.dumps(result[f"{setting}/mean_logit"]), flush=True)
    print(json.dumps(run | {"result": result}))
    if args.json:
        Path(args.json).write_text(json.dumps(run | {"result": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
