"""Golden test: the shipped default model, through the served path (reader, preprocessing,
calibration, operating point), on the benchmark's own test split.

The images are every file the model's `split.json` records as the benchmark's test split, less
those eval.json marks as having a copy in the training split (`copy_in_training`, 103 of 853: 26
near duplicates or mirrored or half-turned copies the split's own check finds, 65 re-framed or
re-contrasted copies `bench/copy_audit.py` aligned, and 12 more its all-pairs audit found, marked through
core/known_copies.tsv): no
image here, nor a copy of it that anyone found, was trained on. An
earlier version sampled 200 test images, 9 of them with such a copy, and passed issue 3's 98 %
with them (196 of 200); on the 191 others the model scored 97.9 %.

Fails, never skips, when the shipped model is incomplete or its benchmark folder is missing while
../shared is present; without ../shared it skips, and tests/test_environment.py fails.
"""
import json
from pathlib import Path

import pytest
import torch

from core.labels import NO_TUMOUR, normalise_label

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
# Issue 3's targets. The shipped default (resnet18_192_gpu_ema120_s2) scores 97.7 % here (733 of
# 750, no tumour missed; 745 of 762 before the all-pairs audit's 12 more copies, 809 of 827 before the audit's copies were marked): the accuracy target is not met, and the test says so as a strict xfail
# (a model that meets it turns that into a failure, so the mark cannot outlive the gap).
MAX_MISSED = 2
TARGET_ACCURACY = 0.98
MEETS_TARGET = False


def shipped_model_dir() -> Path:
    default = ROOT / "weights" / "DEFAULT"
    assert default.is_file(), "no weights/DEFAULT"
    d = ROOT / "weights" / default.read_text().strip()
    for f in ("card.json", "model.safetensors", "split.json", "eval.json"):
        assert (d / f).is_file(), f"shipped model incomplete: {d / f} missing"
    return d


def benchmark_root(card: dict) -> Path:
    for s in card.get("sources", []):
        if s["name"] == "benchmark":
            p = Path(s["path"])
            return p if p.is_absolute() else (ROOT / p).resolve()
    return SHARED / "data" / "brain-tumor-mri" / "Training"


@pytest.fixture(scope="module")
def golden():
    d = shipped_model_dir()
    card = json.loads((d / "card.json").read_text())
    root = benchmark_root(card)
    if not root.is_dir():
        if not SHARED.is_dir():
            pytest.skip("../shared is not beside the checkout")
        pytest.fail(f"the card's benchmark folder {root} does not exist although ../shared does")
    test = json.loads((d / "split.json").read_text())["files"]["benchmark"]["test"]
    recorded = {r["file"]: r for r in json.loads((d / "eval.json").read_text())["predictions"]
                if r.get("source") == "benchmark"}
    assert set(recorded) == set(test), "eval.json's benchmark records are not split.json's test files"
    chosen = sorted(f for f in test if not recorded[f].get("copy_in_training"))
    from core.inference import Predictor
    predictor = Predictor(d)
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one image at a time: threads only contend on a busy machine
    try:
        for rel in chosen:
            p = predictor.predict_file(root / rel)
            rows.append({"file": rel, "label": normalise_label(Path(rel).parts[0]), "pred": p.pred,
                         "recorded": recorded[rel]["pred"]})
    finally:
        torch.set_num_threads(threads)
    return d, rows


def _accuracy(rows) -> tuple[float, list]:
    wrong = [r for r in rows if r["pred"] != r["label"]]
    return 1 - len(wrong) / len(rows), wrong


@pytest.mark.xfail(not MEETS_TARGET, strict=True,
                   reason="issue 3's 98 % is not met on copy-free test images (--runxfail prints the accuracy)")
def test_shipped_model_meets_the_target_accuracy(golden):
    d, rows = golden
    acc, wrong = _accuracy(rows)
    assert acc >= TARGET_ACCURACY, f"{d.name}: accuracy {acc:.4f} on {len(rows)} images; wrong: {wrong}"


def test_shipped_model_matches_its_evaluation(golden):
    """Regression guard: the served path reproduces the copy-free benchmark accuracy that train.py
    recorded in eval.json (cached uint8 images, fp32 weights), to within two images."""
    d, rows = golden
    recorded = sum(r["recorded"] == r["label"] for r in rows) / len(rows)
    acc, wrong = _accuracy(rows)
    assert len(rows) > 500 and acc >= recorded - 2 / len(rows), \
        f"{d.name}: {acc:.4f} served vs {recorded:.4f} recorded; wrong: {wrong}"


def test_shipped_model_misses_few_tumours(golden):
    d, rows = golden
    missed = [r for r in rows if r["label"] != NO_TUMOUR and r["pred"] == NO_TUMOUR]
    assert len(missed) <= MAX_MISSED, f"{d.name}: {len(missed)} tumours called notumor: {missed}"


def test_serving_path_agrees_with_the_training_evaluation(golden):
    """The app/CLI path (decode + preprocess + half-precision weights) against eval.json from
    training: the same decisions on all but a few images."""
    d, rows = golden
    differ = [(r["file"], r["pred"], r["recorded"]) for r in rows if r["pred"] != r["recorded"]]
    assert len(differ) <= 4, differ
