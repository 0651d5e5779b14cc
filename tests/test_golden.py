"""Golden test: the shipped default model on a fixed sample of the benchmark's own test split.

The sample is drawn (seeded) from the file list that the model's `split.json` records as the
benchmark's test split, so none of these images (nor their near duplicates) was trained on.
Skips when the shipped model or the shared data is absent.
"""
import json
import random
from pathlib import Path

import pytest
import torch

from core.labels import NO_TUMOUR, normalise_label

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
N_SAMPLE, SEED = 200, 20240601
# A regression floor, not the target. Until session 12 this was 0.98, which the default
# passed on a split where mirrored and half-turned copies of test images sat in training (353 of
# 858 benchmark test images; 97.0 % on the rest). The default since session 13 is split with
# copies joined and scores 96.7 % on its whole benchmark test split, so
# the 98 % target is not met (97.0 % on this sample, 6 of 200 wrong): this floor guards what is,
# and the target has its own test below, marked as the known failure it is (strict: passing it
# fails the run, so that the floor is raised when a model meets it).
MIN_ACCURACY, MAX_MISSED = 0.96, 2
TARGET_ACCURACY = 0.98


def shipped_model_dir() -> Path:
    default = ROOT / "weights" / "DEFAULT"
    if not default.is_file():
        pytest.skip("no weights/DEFAULT")
    d = ROOT / "weights" / default.read_text().strip()
    for f in ("card.json", "model.safetensors", "split.json"):
        if not (d / f).is_file():
            pytest.skip(f"shipped model incomplete: {d / f} missing")
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
        pytest.skip(f"benchmark data not present at {root}")
    files = json.loads((d / "split.json").read_text())["files"]
    if "benchmark" not in files or not files["benchmark"].get("test"):
        pytest.skip("split.json records no benchmark test split")
    rels = sorted(files["benchmark"]["test"])
    chosen = random.Random(SEED).sample(rels, min(N_SAMPLE, len(rels)))
    from core.inference import Predictor
    predictor = Predictor(d)
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one image at a time: threads only contend on a busy machine
    try:
        for rel in chosen:
            p = predictor.predict_file(root / rel)
            rows.append({"file": rel, "label": normalise_label(Path(rel).parts[0]), "pred": p.pred})
    finally:
        torch.set_num_threads(threads)
    return d, rows


def _accuracy(rows) -> tuple[float, list]:
    wrong = [r for r in rows if r["pred"] != r["label"]]
    return 1 - len(wrong) / len(rows), wrong


# The shipped model on this sample (see MIN_ACCURACY).
def test_shipped_model_accuracy_on_benchmark_test_sample(golden):
    d, rows = golden
    assert len(rows) == N_SAMPLE
    acc, wrong = _accuracy(rows)
    assert acc >= MIN_ACCURACY, f"{d.name}: accuracy {acc:.3f} on {len(rows)} images; wrong: {wrong}"


@pytest.mark.xfail(strict=True, reason="the issue's target, 98 % on this sample: the shipped model "
                   "scores 97.0 % (6 of 200 wrong) on its copy-aware split")
def test_shipped_model_meets_the_target_accuracy(golden):
    d, rows = golden
    acc, wrong = _accuracy(rows)
    assert acc >= TARGET_ACCURACY, f"{d.name}: accuracy {acc:.3f} on {len(rows)} images"


def test_shipped_model_matches_its_card(golden):
    """Regression guard: the app/CLI path (reader, preprocessing, calibration, operating point)
    reproduces the benchmark accuracy that train.py recorded, within sampling error of 200 images."""
    d, rows = golden
    card = json.loads((d / "card.json").read_text())
    recorded = card["metrics"]["per_source"]["benchmark"]["accuracy"]
    acc, wrong = _accuracy(rows)
    assert acc >= recorded - 0.03, f"{d.name}: {acc:.3f} here vs {recorded:.3f} in the card; wrong: {wrong}"


def test_shipped_model_misses_few_tumours(golden):
    d, rows = golden
    missed = [r for r in rows if r["label"] != NO_TUMOUR and r["pred"] == NO_TUMOUR]
    assert len(missed) <= MAX_MISSED, f"{d.name}: {len(missed)} tumours called notumor: {missed}"


def test_serving_path_agrees_with_the_training_evaluation(golden):
    """The app/CLI path (decode + preprocess + fp16 weights) against eval.json from training
    (cached uint8 images, fp32 weights): the same decisions on all but a couple of images."""
    d, rows = golden
    if not (d / "eval.json").is_file():
        pytest.skip("no eval.json")
    recorded = {r["file"]: r["pred"] for r in json.loads((d / "eval.json").read_text())["predictions"]
                if r.get("source") == "benchmark"}
    both = [r for r in rows if r["file"] in recorded]
    assert len(both) == len(rows)
    differ = [(r["file"], r["pred"], recorded[r["file"]]) for r in both if r["pred"] != recorded[r["file"]]]
    assert len(differ) <= 2, differ
