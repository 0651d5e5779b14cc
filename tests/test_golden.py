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
# The target on this sample. The default of sessions 13-23 (resnet18_176_copyaware_ft,
# trained on the CPU) scored 97.0 % here (6 of 200 wrong) and this test was marked as its known
# failure; the default since session 24 (resnet18_192_gpu_ema120_s2, trained on a GPU, same split)
# scores 98.0 % (4 of 200 wrong, all meningiomas called another type; no tumour missed), in bf16
# and in fp32, the closest right call 0.18 from its runner-up.
MAX_MISSED = 2
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


def test_shipped_model_meets_the_target_accuracy(golden):
    d, rows = golden
    assert len(rows) == N_SAMPLE
    acc, wrong = _accuracy(rows)
    assert acc >= TARGET_ACCURACY, f"{d.name}: accuracy {acc:.3f} on {len(rows)} images; wrong: {wrong}"


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
