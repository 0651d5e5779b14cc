"""Real images from two Debian packages, never trained on: does the served path flag what is not
brain MRI, and pass (and call healthy) the healthy brain MRI of collections it never saw?

    apt-get install insighttoolkit5-examples mricron-data     # 2 + 16 MB; nothing is downloaded at run time
    python bench/package_images.py --weights weights/resnet18_192_gpu_ema120_s2 [--views 40] [--json OUT]

Found after the shipped gate's outlier kinds were written, so a blind check of it:
- not brain MRI (ITK's example data): a pelvic MRI slice (`FatMRISlice.png`), two colour
  cryosection photos of the Visible Woman's head and eye, a colour watershed label map, and two
  rat-lung CT slices (`RatLungSlice*.mha`). Each is served whole (in its colours) and as
  ``--views`` seeded grey views (crops, flips, turns, resizes, grey: `core.outliers._view`, as
  the gate's real-image test, `real_medical`, draws them).
- healthy brain MRI: ITK's three 2D slices (a real sagittal T1; BrainWeb's simulated axial T1
  and PD), served whole, and two volumes with skull, MRIcron's `ch2.nii.gz` (the Colin27
  single-subject T1, 1 mm) and ITK's `KmeansTest_T1UCharRaw.nii.gz`, every 4th slice of each
  plane with at least 8 % of it lit (`bench/stripped_template.brain_slices`). They hold no
  tumour: a tumour call is a false alarm.
- skull-stripped brains of the same two subjects: MRIcron's `ch2bet.nii.gz`, and KmeansTest's T1
  masked by its brain label map (`KmeansTest_T1RawSkullStrip.nii.gz` is the map, not a T1);
  reported apart, like `bench/stripped_template.py`'s template.

Per group: images, flagged out of distribution, tumour calls, and tumour calls served with
neither flag (out of distribution, "uncertain"): "silent".
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import header, json_output, load_predictor, positive  # noqa: E402
from bench.stripped_template import PLANES, brain_slices, serve  # noqa: E402
from core import outliers as O  # noqa: E402
from core.inference import Predictor, default_weights  # noqa: E402
from core.reader import ScanImage, read_scan  # noqa: E402

ITK = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
MRICRON = Path("/usr/share/mricron/templates")
NOT_BRAIN = ("FatMRISlice.png", "VisibleWomanEyeSlice.png", "VisibleWomanHeadSlice.png",
             "WatershedSegmentation.png", "RatLungSlice1.mha", "RatLungSlice2.mha")
BRAIN_2D = ("BrainMidSagittalSlice.png", "BrainT1Slice.png", "BrainProtonDensitySlice.png")
KMEANS_T1, KMEANS_LABELS = "KmeansTest_T1UCharRaw.nii.gz", "KmeansTest_T1RawSkullStrip.nii.gz"


def needed_files() -> list[Path]:
    """Every file the check reads (paths built on call, so that tests can move ITK and MRICRON)."""
    return ([ITK / n for n in NOT_BRAIN + BRAIN_2D + (KMEANS_T1, KMEANS_LABELS)]
            + [ITK / n.replace(".mha", ".raw") for n in NOT_BRAIN if n.endswith(".mha")]
            + [MRICRON / "ch2.nii.gz", MRICRON / "ch2bet.nii.gz"])


def read_image(path: Path) -> np.ndarray:
    """uint8 pixels of a PNG, or of a 2D MetaImage (.mha) of unsigned bytes with a raw data file."""
    if path.suffix != ".mha":
        with Image.open(path) as im:   # a palette image's array would be its palette indices
            return np.asarray(im.convert("RGB") if im.mode == "P" else im)
    head = dict(ln.split(" = ", 1) for ln in path.read_text().splitlines() if " = " in ln)
    if head.get("ElementType") != "MET_UCHAR" or head.get("NDims") != "2":
        raise ValueError(f"{path.name}: only 2D MET_UCHAR MetaImages are read here")
    w, h = map(int, head["DimSize"].split())
    return np.fromfile(path.with_name(head["ElementDataFile"]), np.uint8, w * h).reshape(h, w)


def scan_of(a: np.ndarray | Image.Image | bytes) -> ScanImage:
    """An image as the served path reads an uploaded PNG."""
    if not isinstance(a, bytes):
        buf = io.BytesIO()
        (a if isinstance(a, Image.Image) else Image.fromarray(a)).save(buf, "PNG")
        a = buf.getvalue()
    return read_scan(a, "upload.png")


def masked_volume(t1: Path, labels: Path, out: Path) -> Path:
    """``t1`` with every voxel outside ``labels`` > 0 set to 0, saved to ``out``: a stripped brain."""
    import nibabel as nib
    img, lab = nib.load(t1), nib.load(labels)
    a = np.asarray(img.dataobj) * (np.asarray(lab.dataobj) > 0)
    nib.save(nib.Nifti1Image(a.astype(np.float32), img.affine), out)
    return out


def summary(r: dict) -> str:
    """One group's counts in words."""
    return f"{r['flagged']}/{r['n']} flagged, {r['tumour_calls']} tumour calls ({r['silent_false_alarms']} silent)"


def total(rows: Iterable[dict]) -> dict[str, int]:
    rows = list(rows)
    return {k: sum(r[k] for r in rows) for k in ("n", "flagged", "tumour_calls", "silent_false_alarms")}


def serve_not_brain(pred: Predictor, views: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)   # one stream: --views and --seed fix every image's views
    out = {}
    for name in NOT_BRAIN:
        a = read_image(ITK / name)
        out[name] = r = {"whole": serve(pred, [(0, scan_of(a))]),
                         "views": serve(pred, list(enumerate(scan_of(O._view(rng, a, 0.5, 1.0))
                                                             for _ in range(views))))}
        print(f"not brain   {name:28s} whole {'FLAG' if r['whole']['flagged'] else 'pass'}; "
              f"views {summary(r['views'])}")
    return out


def serve_volumes(pred: Predictor, paths: dict[str, Path], group: str) -> dict:
    out = {}
    for name, path in paths.items():
        out[name] = r = {pl: serve(pred, brain_slices(path, pl)) for pl in PLANES}
        print(f"{group:16s} {name:33s} " + "; ".join(f"{pl} {summary(v)}" for pl, v in r.items()))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="model directory (default: weights/DEFAULT)")
    ap.add_argument("--views", type=positive, default=40, help="seeded views of each non-brain image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the results, slice by slice, to this file")
    args = ap.parse_args(argv)
    args.weights = str(args.weights or default_weights())
    json_output(args.json)
    missing = [str(p) for p in needed_files() if not p.is_file()]
    if missing:
        ap.error(f"missing {', '.join(missing)} (apt-get install insighttoolkit5-examples mricron-data)")
    run = header()
    pred = load_predictor(ap, args.weights)
    res = {"not_brain": serve_not_brain(pred, args.views, args.seed)}
    res["brain_2d"] = serve(pred, [(i, scan_of((ITK / n).read_bytes())) for i, n in enumerate(BRAIN_2D)])
    for name, r in zip(BRAIN_2D, res["brain_2d"]["slices"]):
        print(f"brain MRI   {name:28s} {'in distribution' if r['in_distribution'] else 'FLAGGED'}, {r['pred']}"
              f"{', uncertain' if r['uncertain'] else ''}")
    res["brain_volumes"] = serve_volumes(pred, {"ch2.nii.gz": MRICRON / "ch2.nii.gz", KMEANS_T1: ITK / KMEANS_T1},
                                         "brain_volumes")
    with tempfile.TemporaryDirectory() as tmp:
        stripped = masked_volume(ITK / KMEANS_T1, ITK / KMEANS_LABELS, Path(tmp) / "kmeans_stripped.nii.gz")
        res["stripped_volumes"] = serve_volumes(pred, {"ch2bet.nii.gz": MRICRON / "ch2bet.nii.gz",
                                                       "KmeansTest T1 x labels": stripped}, "stripped_volumes")
    res["total"] = {"not_brain_views": total(v["views"] for v in res["not_brain"].values()),
                    "brain_volumes": total(r for v in res["brain_volumes"].values() for r in v.values()),
                    "stripped_volumes": total(r for v in res["stripped_volumes"].values() for r in v.values())}
    for k, r in res["total"].items():
        print(f"all {k}: {summary(r)} ({100 * r['flagged'] / max(1, r['n']):.1f} % flagged)")
    if args.json:
        Path(args.json).write_text(json.dumps(run | {"weights": args.weights, "views": args.views,
                                                     "seed": args.seed} | res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
