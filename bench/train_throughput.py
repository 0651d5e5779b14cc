"""Training throughput (images/s) of the real training step, on random uint8 images.

    python bench/train_throughput.py --arch mobilenet_v3_small --img 192
    python bench/train_throughput.py --arch resnet18 --img 224 --device cuda --precision bf16

Runs `core.engine.train_one_epoch` (batched augmentation, normalisation, forward, set-valued
loss, backward, AdamW step, OneCycle schedule) as train.py does: a plain step, without the
weights' moving average (EMA) or the mask loss that some recipes add (the default's did); the
warm-up steps (allocator, kernel selection) are excluded from the timing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._machine import header, non_negative, positive  # noqa: E402
from core.cli import integer_at_least  # noqa: E402
from core.engine import train_one_epoch  # noqa: E402
from core.models import count_parameters, create_model, list_models  # noqa: E402
from core.preprocess import DEFAULT_SPEC  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="mobilenet_v3_small", choices=list_models())
    p.add_argument("--img", type=positive, default=192)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    # train_one_epoch skips a batch of one (batch-norm): --batch-size 1 timed no training at all
    p.add_argument("--batch-size", type=integer_at_least(2), default=64)
    p.add_argument("--steps", type=positive, default=10, help="timed steps")
    p.add_argument("--warmup", type=non_negative, default=3, help="untimed steps first")
    p.add_argument("--threads", type=non_negative, default=0, help="CPU threads (0 = torch default)")
    p.add_argument("--classes", type=integer_at_least(2), default=4)
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model first (compilation happens in the warm-up steps)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is available")
    meta = header(args.device)
    device = torch.device(args.device)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    spec = {**DEFAULT_SPEC, "size": args.img}
    model = create_model(args.arch, args.classes).to(device).to(memory_format=torch.channels_last)
    if args.compile:
        model = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    total = (args.warmup + args.steps) * args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=args.warmup + args.steps + 1)
    # Images stay on the CPU as uint8, as train.py keeps its cache; batches move per step.
    images = torch.randint(0, 256, (total, 1, args.img, args.img), dtype=torch.uint8)
    masks = torch.zeros(total, args.classes, dtype=torch.bool)
    masks[torch.arange(total), torch.randint(0, args.classes, (total,))] = True
    order = torch.arange(total)
    kw = dict(batch_size=args.batch_size, precision=args.precision, smoothing=0.1,
              aug_strength=1.0, skull_strip_p=0.2, progress=False)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    train_one_epoch(model, images, masks, order[:args.warmup * args.batch_size], opt, sched,
                    spec, device, **kw)
    sync()
    c0, t0 = time.process_time(), time.perf_counter()
    stats = train_one_epoch(model, images, masks, order[args.warmup * args.batch_size:], opt,
                            sched, spec, device, **kw)
    sync()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    n = args.steps * args.batch_size
    result = {**meta, "arch": args.arch, "img": args.img, "device": args.device,
              "precision": args.precision, "compile": args.compile, "batch_size": args.batch_size, "steps": args.steps,
              "warmup_steps": args.warmup, "parameters": count_parameters(model),
              "images_per_s": round(n / dt, 1), "ms_per_step": round(1000 * dt / args.steps, 1),
              # CPU seconds the process used: on a shared machine, images per CPU-second times
              # the cores is an estimate of what an idle machine would do (threads spin, so low).
              "cpu_s": round(cpu, 2), "images_per_cpu_s": round(n / max(cpu, 1e-9), 1),
              "loss_finite": bool(torch.isfinite(torch.tensor(stats["loss"])))}
    print(f"{args.arch} @ {args.img}px, batch {args.batch_size}, {args.device}/{args.precision}: "
          f"{result['images_per_s']} images/s ({result['ms_per_step']} ms/step over {args.steps} steps, "
          f"{args.warmup} warm-up steps excluded; {result['images_per_cpu_s']} images per CPU-second)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
