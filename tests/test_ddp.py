"""Scale-out: `torchrun --nproc_per_node 2 train.py` with gloo on the CPU, on generated images.

Checks that both ranks end with the same parameters (each rank dumps its own when
$BT_DDP_DEBUG_DIR is set), that only rank 0 logs, and that the output is the ordinary result
format: a binary model that `Predictor` loads, with tumour probability = p(tumor).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import distributed as DD

from conftest import make_blob_dataset as make_dataset

ROOT = Path(__file__).resolve().parents[1]
C4 = ["glioma", "meningioma", "pituitary", "notumor"]




@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("ddp")
    data, out, debug = tmp / "data", tmp / "out", tmp / "debug"
    make_dataset(data)
    env = {**os.environ, "BT_CACHE": str(tmp / "cache"), "BT_DDP_DEBUG_DIR": str(debug),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train.py", "--data", str(data), "--out", str(out), "--arch", "cnn_bn", "--binary",
           "--img", "32", "--epochs", "2", "--batch-size", "8", "--workers", "1", "--no-progress"]
    # The timeout only guards against a deadlock; the run takes ~15 s on an idle 2-core CPU.
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"torchrun failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return {"out": out, "debug": debug, "data": data, "log": r.stdout}


def test_ranks_end_with_identical_parameters(ddp_run):
    from safetensors.torch import load_file
    dbg = ddp_run["debug"]
    meta = [json.loads((dbg / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [m["world_size"] for m in meta] == [2, 2]
    assert {m["backend"] for m in meta} == {"gloo"}
    p0, p1 = (load_file(dbg / f"rank{r}.safetensors") for r in (0, 1))
    assert p0.keys() == p1.keys() and p0
    diff = max((p0[k] - p1[k]).abs().max().item() for k in p0)
    assert diff <= 1e-6, f"ranks diverged: max parameter difference {diff}"
    assert meta[0]["params_sha256"] == meta[1]["params_sha256"]


def test_only_rank0_logs_and_writes_the_usual_outputs(ddp_run):
    out, log = ddp_run["out"], ddp_run["log"]
    assert log.count("epoch 1/2") == 1 and log.count("epoch 2/2") == 1
    assert log.count("split sizes:") == 1
    for f in ("model.safetensors", "card.json", "history.json", "eval.json", "split.json",
              "checkpoint.pt"):
        assert (out / f).is_file(), f
    assert not (out / "best.pt").exists()
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["world_size"] == 2
    assert card["classes"] == ["tumor", "notumor"]
    assert len(json.loads((out / "history.json").read_text())) == 2


def test_binary_output_loads_and_tumour_probability_is_p_tumor(ddp_run):
    from core.inference import Predictor
    pred = Predictor(ddp_run["out"])
    assert pred.is_tumour_model
    for f in [next((ddp_run["data"] / c).iterdir()) for c in ("glioma", "notumor")]:
        p = pred.predict_file(f)
        assert set(p.probs) == {"tumor", "notumor"}
        assert p.tumour_probability == pytest.approx(p.probs["tumor"], abs=1e-6)
        assert p.pred in ("tumor", "notumor")


def test_single_process_helpers_are_no_ops():
    order = torch.arange(10)
    assert DD.shard(order, 0, 1) is order
    stats = {"loss": 1.0, "acc": 0.5, "images_per_s": 3.0, "time_s": 1.0}
    assert DD.reduce_epoch_stats(stats, 10, 1, torch.device("cpu")) is stats
    assert DD.rank0_decides(True, 1, torch.device("cpu")) is True


def test_shards_partition_the_drawn_order():
    order = torch.randperm(48)
    parts = [DD.shard(order, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [16, 16, 16]
    assert sorted(torch.cat(parts).tolist()) == sorted(order.tolist())


def test_epoch_stats_reduction_keeps_the_pointing_loss(monkeypatch):
    # a stand-in all_reduce adds a second rank: 30 images, loss 2.0, acc 1.0, 5 img/s, and a
    # pointing loss of 0.5 only where that rank had one
    def second_rank(with_point):
        def all_reduce(t):
            t += torch.tensor([2.0 * 30, 1.0 * 30, 30, 5.0, 0.5 * 30 if with_point else 0.0,
                               30 if with_point else 0], dtype=t.dtype)
        return all_reduce
    stats = {"loss": 1.0, "acc": 0.5, "images_per_s": 3.0, "pointing_loss": 0.25}
    monkeypatch.setattr(torch.distributed, "all_reduce", second_rank(True))
    out = DD.reduce_epoch_stats(stats, 10, 2, torch.device("cpu"))
    assert out["loss"] == pytest.approx((10 + 60) / 40) and out["acc"] == pytest.approx((5 + 30) / 40)
    assert out["images_per_s"] == pytest.approx(8.0)
    assert out["pointing_loss"] == pytest.approx((2.5 + 15) / 40)
    monkeypatch.setattr(torch.distributed, "all_reduce", second_rank(False))
    out = DD.reduce_epoch_stats(stats, 10, 2, torch.device("cpu"))  # only this rank had one
    assert out["pointing_loss"] == pytest.approx(0.25)
    plain = DD.reduce_epoch_stats({"loss": 1.0, "acc": 0.5, "images_per_s": 3.0}, 10, 2,
                                  torch.device("cpu"))
    assert "pointing_loss" not in plain
