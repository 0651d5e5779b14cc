"""Shared fixtures: a random-init model folder in the shipped format (fast, needs no data)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # `import core` however pytest is started
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
CLASSES = ["glioma", "meningioma", "pituitary", "notumor"]


@pytest.fixture()
def private_cache(tmp_path, monkeypatch):
    """A per-test perceptual-hash and image cache, so tests never read or write the user's."""
    import core.data as D
    import core.engine as E
    cache = tmp_path / "_cache" / "phash.json"
    monkeypatch.setattr(D, "HASH_CACHE", cache)
    monkeypatch.setattr(E, "HASH_CACHE", cache)
    monkeypatch.setenv("BT_CACHE", str(cache.parent))
    return cache


def make_blob_dataset(root: Path, per_class: int = 10) -> None:
    """Smooth random blobs: distinct perceptual hashes, so the grouped split has every class."""
    for ci, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for k in range(per_class):
            rng = np.random.default_rng(1000 * ci + k)
            coarse = Image.fromarray((rng.random((6, 6)) * 200 + 40).astype(np.uint8))
            coarse.resize((64, 64), Image.BICUBIC).save(root / c / f"{c}_{k}.png")


def _synthetic_scans(root: Path, per_class: int = 3) -> list[tuple[str, str]]:
    """Bright-ellipse 'heads' as PNGs, root/<class>/<n>.png; returns (rel, label)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    out = []
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            head = (((yy - 48) / 40) ** 2 + ((xx - 48) / 34) ** 2 < 1) * 0.6
            img = np.clip(head + rng.normal(0, 0.05, head.shape), 0, 1)
            Image.fromarray((img * 255).astype(np.uint8)).save(root / c / f"{k}.png")
            out.append((f"{c}/{k}.png", c))
    return out


def make_weights(out: Path, arch: str = "simple_cnn", size: int = 64, name: str = "test-random") -> Path:
    """A weights folder (safetensors, card, eval, history) with random weights, in seconds."""
    import torch
    from safetensors.torch import save_file

    from core.evaluation import evaluate_records
    from core.models import count_parameters, create_model

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = create_model(arch, len(CLASSES))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    present = _synthetic_scans(out / "data" / "synth")
    rng = np.random.default_rng(1)
    records = []
    for source, files in (("synth", present), ("elsewhere", [("missing/x.png", "glioma"),
                                                              ("missing/y.png", "notumor")])):
        for rel, label in files:
            p = rng.dirichlet(np.ones(len(CLASSES)))
            records.append({"file": rel, "source": source, "label": label,
                            "pred": CLASSES[int(p.argmax())],
                            "probs": {c: float(v) for c, v in zip(CLASSES, p)},
                            "tumour_probability": float(p[:3].sum()), "confidence": float(p.max()),
                            "uncertain": False, "in_distribution": True, "ood_score": None})
    ev = evaluate_records(records, CLASSES, 0.5)
    (out / "eval.json").write_text(json.dumps(ev))
    history = [{"epoch": e, "train": {"loss": 1.4 - 0.1 * e, "acc": 0.3 + 0.1 * e},
                "val": {"loss": 1.5 - 0.1 * e, "acc": 0.25 + 0.1 * e}, "lr": 1e-3 / e}
               for e in (1, 2, 3)]
    (out / "history.json").write_text(json.dumps(history))
    card = {"name": name, "arch": arch, "classes": CLASSES, "version": "test",
            "preprocessing": {"size": size, "crop": "head", "mean": 0.2, "std": 0.25},
            "calibration": {"method": "none", "temperature": 1.0},
            "operating_point": {"threshold": 0.5, "target_sensitivity": 0.99},
            "uncertainty": {"min_confidence": 0.3},
            "metrics": {k: ev.get(k) for k in ("n", "accuracy", "macro_f1", "tumour_missed",
                                               "sensitivity", "specificity", "ece")},
            "sources": [{"name": "synth", "path": str(out / "data" / "synth"),
                         "images": {"test": len(present)}},
                        {"name": "elsewhere", "path": str(out / "data" / "elsewhere"),
                         "images": {"test": 2}}],
            "split": {"method": "synthetic", "sizes": {"test": len(records)}},
            "training": {"epochs": 3}, "parameters": count_parameters(model),
            "weights_file_bytes": (out / "model.safetensors").stat().st_size,
            "command": "tests/conftest.py make_weights", "intended_use": "Tests only."}
    (out / "card.json").write_text(json.dumps(card))
    return out


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory) -> Path:
    return make_weights(tmp_path_factory.mktemp("weights") / "random")


def edited_weights(src: Path, dst: Path, changes: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the model folder ``src`` at ``dst`` whose card has ``changes`` set and ``drop`` removed."""
    import json
    import shutil
    shutil.copytree(src, dst)
    card = json.loads((dst / "card.json").read_text())
    card = {k: v for k, v in {**card, **(changes or {})}.items() if k not in drop}
    (dst / "card.json").write_text(json.dumps(card))
    return dst
