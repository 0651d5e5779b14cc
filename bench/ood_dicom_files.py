"""Real DICOM files served whole: what the pixel gate and the header check each flag.

    python bench/ood_dicom_files.py --weights weights/resnet18_176_ft_rot_mild

The 10 real non-brain DICOM files pydicom ships (`core.outliers.REAL_MEDICAL`: abdominal MR,
CTs, a bone scan, ultrasound, a small MR; never trained on) and the brain MRI DICOMs of
``../shared/data/samples`` go through `Predictor.predict_file` exactly as an upload does. Per
file: the header's modality and body part, whether the pixel gate alone flags it
(``ood_score > 0``), whether the header does (`core.header.header_reason`), and the served
verdict (either). `bench/ood_threshold.py` measures the pixel gate on many views of the same
images, where no header survives; ``--views N`` serves N seeded views here too (crops, flips,
turns, as `core.outliers.real_medical` draws them, saved as PNG: pixels only) and prints which
file's views the gate lets through.

    python bench/ood_dicom_files.py --views 300
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import header, load_predictor  # noqa: E402
from core.header import header_reason  # noqa: E402
from core.inference import Predictor, default_weights  # noqa: E402
from core.outliers import REAL_MEDICAL  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "samples"


def rows_for(pred: Predictor, files: list[Path], kind: str) -> list[dict]:
    out = []
    for f in files:
        p = pred.predict_file(f)
        out.append({"file": f.name, "kind": kind, "modality": p.info.get("modality", ""),
                    "body_part": p.info.get("body_part", ""),
                    "pixel_flag": p.ood_score is not None and p.ood_score > 0,
                    "header_flag": header_reason(p.info) is not None,
                    "flagged": not p.in_distribution, "pred": p.pred})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default=None, help="model directory (default: weights/DEFAULT)")
    p.add_argument("--views", type=int, default=0, help="also serve this many seeded views as PNG files")
    p.add_argument("--seed", type=int, default=5, help="seed of the views")
    args = p.parse_args(argv)
    args.weights = str(args.weights or default_weights())
    run = header()
    import pydicom
    pred = load_predictor(p, args.weights)
    real = [Path(pydicom.__file__).parent / "data" / "test_files" / n for n in REAL_MEDICAL]
    brain = sorted(f for f in SAMPLES.glob("*.dcm") if f.name != "sample_no_pixels.dcm")
    rows = rows_for(pred, real, "non-brain") + rows_for(pred, brain, "brain MRI")
    for r in rows:
        print(f"{r['kind']:9s} {r['file']:36s} {r['modality'] or '-':3s} {r['body_part'] or '-':11s} "
              f"pixels {'FLAG' if r['pixel_flag'] else 'pass'}  header {'FLAG' if r['header_flag'] else 'pass'}"
              f"  served {'FLAGGED' if r['flagged'] else 'in distribution: ' + r['pred']}")
    summary = {kind: {k: sum(r[k] for r in rows if r["kind"] == kind) for k in ("pixel_flag", "header_flag", "flagged")}
               | {"n": sum(r["kind"] == kind for r in rows)} for kind in ("non-brain", "brain MRI")}
    print(f"flagged: {summary}")
    views = view_rates(pred, args.views, args.seed) if args.views else None
    print(json.dumps(run | {"weights": args.weights, "summary": summary, "rows": rows, "views": views}))
    return 0


def view_rates(pred: Predictor, n: int, seed: int) -> dict:
    """{file: [flagged, served]} over ``n`` seeded views of the real files, served as PNG uploads."""
    import io
    import numpy as np
    from core import outliers as O
    rng, out = np.random.default_rng(seed), {name: [0, 0] for name in REAL_MEDICAL}
    for _ in range(n):
        name = REAL_MEDICAL[int(rng.integers(len(REAL_MEDICAL)))]
        buf = io.BytesIO()
        O._view(rng, O._dicom_u8(name), 0.5, 1.0).save(buf, "PNG")
        out[name][0] += not pred.predict_file(buf.getvalue(), "view.png").in_distribution
        out[name][1] += 1
    for name, (flagged, served) in out.items():
        print(f"views of {name:28s} flagged {flagged:3d} of {served:3d}")
    total = [sum(v[i] for v in out.values()) for i in (0, 1)]
    print(f"views flagged: {total[0]} of {total[1]} ({100 * total[0] / max(1, total[1]):.1f} %)")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
