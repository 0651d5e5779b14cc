"""Training on several processes under torchrun: DistributedDataParallel, NCCL on GPUs, gloo on CPU.

    torchrun --nproc_per_node 4 train.py --config experiments/resnet50_gpu.toml

Every helper is a no-op for a single process (world size 1), so a plain ``python train.py``
runs exactly the code it ran before. ``--batch-size`` is per process (as in the torchvision
reference scripts): the global batch is batch_size x world_size and an epoch is still about one
pass over the training split, split across the ranks.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

DEBUG_ENV = "BT_DDP_DEBUG_DIR"  # set: every rank writes its final parameters there (tests)
# Rank 0 decodes and hashes every image before the others start; a first run on a large
# dataset takes longer than the 10-minute NCCL default.
TIMEOUT = dt.timedelta(minutes=60)


def setup(device_arg: str) -> tuple[int, int, torch.device | None]:
    """(rank, world_size, device) under torchrun; (0, 1, None) for a single process.

    Only a WORLD_SIZE above 1 (set by torchrun) starts a process group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", "0"))
    # each process takes the GPU of its LOCAL_RANK, whichever cuda:N was named
    use_cuda = (device_arg == "auto" or device_arg.startswith("cuda")) and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def cleanup(world: int) -> None:
    if world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def quiet(*_args, **_kw) -> None:
    """`print` for ranks other than 0: one log, not one per process."""


def wrap(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """The module to train: DDP around ``model`` when world > 1, else ``model`` itself.

    On CUDA batch norm becomes SyncBatchNorm (statistics over the global batch); on CPU it
    stays per process. The conversion reuses the parameter tensors, so an optimizer built on
    ``model`` before the call keeps working, and ``model`` (unwrapped) is what gets saved.
    """
    if world <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    if device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the children in place
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)


def shard(order: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's share of an epoch's drawn order; every rank drew the same order (same seed)."""
    return order[rank::world] if world > 1 else order


def reduce_epoch_stats(stats: dict, n: int, world: int, device: torch.device) -> dict:
    """Loss, accuracy and the mask pointing loss over all ranks (weighted by images), throughput summed."""
    if world <= 1:
        return stats
    point = stats.get("pointing_loss")
    t = torch.tensor([stats["loss"] * n, stats["acc"] * n, n, stats["images_per_s"],
                      (point or 0.0) * n, n if point is not None else 0],
                     dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    total = max(t[2].item(), 1.0)
    out = {**stats, "loss": t[0].item() / total, "acc": t[1].item() / total,
           "images_per_s": t[3].item()}
    # lesion slices are drawn uniformly, so weighting each rank's mean by its images is fair
    if t[5].item() > 0:
        out["pointing_loss"] = t[4].item() / t[5].item()
    return out


def rank0_decides(flag: bool, world: int, device: torch.device) -> bool:
    """Rank 0's value of ``flag`` on every rank (early stopping is decided where validation ran)."""
    if world <= 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.broadcast(t, src=0)
    return bool(t.item())


def debug_dump(model: nn.Module, rank: int, world: int) -> Path | None:
    """With $BT_DDP_DEBUG_DIR set, write rank<r>.safetensors (parameters) and rank<r>.json.

    Tests compare the ranks: under DDP every rank must end with the same parameters. Buffers
    (batch-norm running statistics) are per process on CPU and are left out. The random state
    is hashed too: every rank must draw its own augmentations, resumed or not.
    """
    root = os.environ.get(DEBUG_ENV)
    if not root:
        return None
    from safetensors.torch import save_file
    params = {k: v.detach().float().cpu().contiguous() for k, v in model.named_parameters()}
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(k.encode()); h.update(params[k].numpy().tobytes())
    out = Path(root)
    out.mkdir(parents=True, exist_ok=True)
    save_file(params, out / f"rank{rank}.safetensors")
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "world_size": world, "params_sha256": h.hexdigest(),
         "rng_sha256": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest(),
         "backend": torch.distributed.get_backend() if world > 1 else None}))
    return out
