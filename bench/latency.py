"""Single-image CPU latency of what the app and CLI do per scan: decode + preprocess + forward
+ the out-of-distribution check.

    python bench/latency.py                              # the shipped default model
    python bench/latency.py --weights weights/NAME --threads 1 2 --runs 50
    python bench/latency.py --arch resnet18 --img 224    # an untrained architecture, for sizing

Each run reads the file from disk, decodes it (`core.reader.read_scan`), preprocesses it
(`Predictor.input_tensor`: head crop, pad, resize, normalise) and runs the calibrated forward
pass (`Predictor.probabilities`), then the out-of-distribution check every served scan gets
(`Predictor.distribution_check`: DICOM header, the gate network and feature head). Median and 90th percentile over --runs, after --warmup runs,
for each thread count, plus the median CPU time the process used per image. The precision
(bf16 on CPUs with native bf16; `BT_PRECISION=fp32` turns it off) is printed. Target for the
default model: <= 30 ms per image on one thread.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._machine import header, non_negative, positive  # noqa: E402
from core.inference import Predictor, default_weights  # noqa: E402
from core.reader import read_scan  # noqa: E402

DEFAULT_IMAGE = ROOT.parent / "shared" / "data" / "brain-tumor-mri" / "Training" / "glioma"
TARGET_MS = 30.0


def random_weights_dir(arch: str, img: int) -> Path:
    """A card and untrained weights for an architecture (latency does not depend on training)."""
    from safetensors.torch import save_file
    from core.models import create_model
    from core.preprocess import DEFAULT_SPEC
    d = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    classes = ["glioma", "meningioma", "pituitary", "notumor"]
    m = create_model(arch, len(classes))
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, d / "model.safetensors")
    (d / "card.json").write_text(json.dumps({"name": f"{arch} (untrained)", "arch": arch,
                                             "classes": classes,
                                             "preprocessing": {**DEFAULT_SPEC, "size": img}}))
    return d


def pick_image(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    files = sorted(DEFAULT_IMAGE.glob("*.jpg"))
    if not files:
        sys.exit(f"no image given and none found in {DEFAULT_IMAGE}; pass --image FILE")
    return files[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="model directory (default: weights/DEFAULT)")
    p.add_argument("--arch", help="benchmark an untrained architecture instead of --weights")
    p.add_argument("--img", type=positive, default=192, help="input size with --arch")
    p.add_argument("--image", help="JPEG/PNG/DICOM file (default: a benchmark JPEG)")
    p.add_argument("--threads", type=positive, nargs="+", default=[1, 2])
    p.add_argument("--runs", type=positive, default=50)
    p.add_argument("--warmup", type=non_negative, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads[0])   # the machine line says the first row's threads, not torch's default
    meta = header("cpu")
    try:  # a missing model or image is a usage error, not a traceback
        wdir = random_weights_dir(args.arch, args.img) if args.arch else Path(args.weights or default_weights())
        pred = Predictor(wdir, device="cpu")
        image = pick_image(args.image)
        read_scan(image)
    except (OSError, ValueError) as e:  # ScanError is a ValueError
        p.error(str(e))
    print(f"model: {pred.name} ({pred.card['arch']}, input {pred.spec['size']}px, {pred.precision}, "
          f"{'with' if pred.gate is not None else 'no'} out-of-distribution gate) from {wdir}")
    print(f"image: {image}")
    results = []
    for n in args.threads:
        torch.set_num_threads(n)
        times = {"decode": [], "preprocess": [], "forward": [], "ood_check": [], "total": []}
        cpu = []
        for i in range(args.warmup + args.runs):
            c0 = time.process_time()
            t0 = time.perf_counter()
            scan = read_scan(image)
            t1 = time.perf_counter()
            x = pred.input_tensor(scan)
            t2 = time.perf_counter()
            probs = pred.probabilities(x)
            t3 = time.perf_counter()
            pred.distribution_check(scan, x)  # every served scan runs it (DICOM header, gate)
            t4 = time.perf_counter()
            c4 = time.process_time()
            if i >= args.warmup:
                cpu.append(1000 * (c4 - c0))
                for stage, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                    times[stage].append(1000 * dt)
        assert probs.shape == (1, len(pred.classes))
        row = {"threads": n, "runs": args.runs}
        for stage, v in times.items():
            row[f"{stage}_median_ms"] = round(float(np.median(v)), 2)
            row[f"{stage}_p90_ms"] = round(float(np.percentile(v, 90)), 2)
        # CPU time of this process per image: close to the wall time on an idle machine, and
        # with one thread a fairer figure than the wall time when other work shares the cores.
        row["cpu_time_median_ms"] = round(float(np.median(cpu)), 2)
        results.append(row)
        verdict = "" if n != 1 else (" (target <= %.0f ms: %s)" % (
            TARGET_MS, "met" if row["total_median_ms"] <= TARGET_MS else "NOT met"))
        print(f"{n} thread(s): median {row['total_median_ms']:.1f} ms, p90 {row['total_p90_ms']:.1f} ms"
              f"  [decode {row['decode_median_ms']:.1f}, preprocess {row['preprocess_median_ms']:.1f},"
              f" forward {row['forward_median_ms']:.1f}, out-of-distribution check {row['ood_check_median_ms']:.1f}];"
              f" process CPU time {row['cpu_time_median_ms']:.1f} ms"
              f"{verdict}")
    print(json.dumps({**meta, "model": pred.name, "arch": pred.card["arch"], "precision": pred.precision,
                      "ood_gate": pred.gate is not None,
                      "input_size": pred.spec["size"], "image": str(image), "warmup": args.warmup,
                      "results": results}))
    return 0

if __name__ == "__main__":
    sys.exit(main())
