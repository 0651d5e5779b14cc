"""Is a real skull-stripped brain MRI served, or withheld as "not like the training data"?

    pip install --no-deps nilearn==0.14.1      # for its MNI152 template file; nothing else of it is used
    python bench/stripped_template.py --weights weights/resnet18_192_gpu_ema120_s2 [--template FILE.nii.gz]

Research collections of the BraTS kind are skull-stripped, and none is in shared/. The one real
skull-stripped brain MRI on reach is the ICBM 2009a MNI152 T1 template that nilearn ships inside
its wheel (197 x 233 x 189 voxels of 1 mm: an average of 152 healthy adults' T1 scans, brain
only). It is one volume, smoother than any single scan, and healthy: a check of the gate and of
false tumour calls on stripped scans, not of tumour sensitivity. Unlike `bench/shift_eval.py`'s
"skull stripped" perturbation (and `core.ood.strip_to_brain`, which trains the gate), nobody here
made it: its brain mask is the template's own.

Every 4th slice of each plane is read as an uploaded volume's slice is (`core.reader`, the
served window), slices with under 8 % brain skipped, and served through `Predictor.predict_scan`.
Per plane: slices, share flagged out of distribution, tumour calls (the template has no tumour),
and tumour calls served with neither flag ("silent false alarms").
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import flagging_parts, header, json_output, load_predictor, part_counts, positive  # noqa: E402
from core.inference import Predictor  # noqa: E402
from core.labels import is_tumour_label  # noqa: E402
from core.reader import ScanError, lit_share, read_volume_scans  # noqa: E402

TEMPLATE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
PLANES = ("axial", "coronal", "sagittal")
MIN_BRAIN = 0.08   # share of a slice above a tenth of the window: the volume's end slices fall below it


def nilearn_template() -> Path | None:
    """The template inside an installed nilearn, found without importing nilearn (whose own
    dependencies this project does not install)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / TEMPLATE
    return path if path.is_file() else None


def brain_slices(path: Path, plane: str, step: int = 4, min_brain: float = MIN_BRAIN) -> list[tuple[int, object]]:
    """(index, ScanImage) of every ``step``-th slice of ``plane`` holding at least ``min_brain``
    of its area above a tenth of the window."""
    scans, kind, _ = read_volume_scans(path, plane=plane)
    if kind != "nifti":
        raise ScanError("not a NIfTI volume")
    return [(k, s) for k, s in enumerate(scans)
            if k % step == 0 and lit_share(s.pixels) >= min_brain]


def serve(pred: Predictor, slices: list[tuple[int, object]], parts: bool = False) -> dict:
    """``parts``: also which gate parts flag each slice on their own."""
    rows = []
    for k, scan in slices:
        p = pred.predict_scan(scan)
        rows.append({"slice": k, "pred": p.pred, "in_distribution": bool(p.in_distribution),
                     "uncertain": bool(p.uncertain), "ood_score": p.ood_score}
                    | ({"flagged_by": flagging_parts(pred, scan, not p.in_distribution)} if parts else {}))
    flagged = [not r["in_distribution"] for r in rows]
    tumour = [bool(is_tumour_label(r["pred"])) for r in rows]   # core's tumour call
    silent = [t and not f and not r["uncertain"] for t, f, r in zip(tumour, flagged, rows)]
    n = len(rows)
    return {"n": n, "flagged": int(sum(flagged)), "flagged_pct": round(100 * sum(flagged) / n, 1) if n else None,
            "tumour_calls": int(sum(tumour)), "silent_false_alarms": int(sum(silent)),
            **({"flagged_by": part_counts([r["flagged_by"] for r in rows])} if parts else {}), "slices": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="model directory (default: weights/DEFAULT)")
    p.add_argument("--template", default=None, help=f"a skull-stripped brain NIfTI (default: nilearn's {TEMPLATE})")
    p.add_argument("--step", type=positive, default=4, help="every STEP-th slice of each plane")
    p.add_argument("--parts", action="store_true",
                   help="also how many slices each part of the gate flags on its own (network, feature head, colour)")
    p.add_argument("--threads", type=positive, default=2)
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)
    path = Path(args.template) if args.template else nilearn_template()
    if path is None:
        p.error("no template: pip install --no-deps nilearn==0.14.1, or pass --template FILE.nii.gz")
    if not path.is_file():
        p.error(f"no such file: {path}")
    json_output(args.json)
    torch.set_num_threads(args.threads)
    pred = load_predictor(p, args.weights)
    run = header()
    planes = {}
    for plane in PLANES:
        try:
            planes[plane] = brain_slices(path, plane, args.step)
        except ScanError as e:
            p.error(f"{path} cannot be used: {e}")
    if not any(planes.values()):
        p.error(f"{path} has no slice with at least {MIN_BRAIN:.0%} brain")
    result = {}
    for plane, slices in planes.items():
        r = result[plane] = serve(pred, slices, parts=args.parts)
        print(f"{plane:9s} slices {r['n']:3d}  flagged {r['flagged']:3d} ({r['flagged_pct']} %)  "
              f"tumour calls {r['tumour_calls']:3d}  silent false alarms {r['silent_false_alarms']}"
              + (f"  flagged by {r['flagged_by']}" if args.parts else ""), flush=True)
    total = {k: sum(r[k] for r in result.values()) for k in ("n", "flagged", "tumour_calls", "silent_false_alarms")}
    if args.parts:
        total["flagged_by"] = part_counts([s["flagged_by"] for r in result.values() for s in r["slices"]])
    print(f"all       slices {total['n']:3d}  flagged {total['flagged']:3d} "
          f"({100 * total['flagged'] / max(1, total['n']):.1f} %)  tumour calls {total['tumour_calls']:3d}  "
          f"silent false alarms {total['silent_false_alarms']}"
          + (f"  flagged by {total['flagged_by']}" if args.parts else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(run | {"weights": str(pred.dir), "template": str(path),
                                                     "total": total, "result": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
