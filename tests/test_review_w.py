"""Findings of session 53 (a code review of core/), each test failing on the code before its fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_train_usage import TINY, data, refused  # noqa: F401 (data: the fixture)


# ----------------------------------------------------------------- the gallery's caption
def test_the_gallery_writes_a_miss_apart_from_the_operating_point():
    """'p(tumour) 0.50' under a miss at 0.4996 with the operating point at 0.5 read as a call at it."""
    from core.app_support import gallery_caption
    miss = {"file": "a.jpg", "label": "glioma", "pred": "notumor", "tumour_probability": 0.4996}
    said = gallery_caption(miss, 0.5)
    assert "p(tumour) 0.4996" in said and said.startswith(": true glioma, predicted no tumour")
    assert "p(tumour) 0.20" in gallery_caption({**miss, "tumour_probability": 0.2}, 0.5)   # two decimals where they do
    flagged = gallery_caption({**miss, "uncertain": True, "copy_in_training": True}, 0.5, "outline: tumour mask, on it")
    assert flagged.endswith("; flagged 'uncertain, refer'; outline: tumour mask, on it; a copy of it was in training")
    refused_scan = gallery_caption({**miss, "in_distribution": False}, 0.5)
    assert "refused by the out-of-distribution check" in refused_scan and "p(tumour)" not in refused_scan


# ----------------------------------------------------------------- one reader of cards
@pytest.mark.parametrize("text, words", [("[1, 2]", "not a model card"), ("{", "not valid JSON")])
def test_a_card_that_is_no_json_object_is_one_sentence_wherever_it_is_read(tmp_path, text, words):
    """A card holding a JSON list gave a TypeError in the parent check of --init (`card["classes"]`)."""
    from core.data import read_card
    from core.engine import checked_parent
    from core.inference import load_card
    (tmp_path / "card.json").write_text(text)
    for read in (read_card, load_card, lambda d: checked_parent(d, ["glioma", "notumor"], {}, "--init")):
        with pytest.raises(ValueError, match=words):
            read(tmp_path)


def test_a_config_naming_a_distillation_option_without_a_teacher_is_refused(data, tmp_path, capsys):  # noqa: F811
    """The check of named options covers a config's keys (the check of changed values it replaced did)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = "{data}"\ndistill = 0.3\n')
    assert "--distill needs --teacher" in refused(["--config", cfg, "--out", tmp_path / "r", *TINY], capsys)
    cfg.write_text(f'data = "{data}"\ndistill = 0.5\n')   # its default value, named
    assert "--distill needs --teacher" in refused(["--config", cfg, "--out", tmp_path / "r", *TINY], capsys)


# ----------------------------------------------------------------- the Evaluation page's records
def test_the_evaluation_view_is_the_figures_and_the_records_they_are_of():
    from core.app_support import evaluation_at, evaluation_view, of_source, records_at
    classes = ["glioma", "notumor"]
    recs = [{"file": f"{k}.jpg", "source": "a" if k % 2 else "b", "label": lab,
             "probs": {"glioma": p, "notumor": 1 - p}, "pred": "glioma" if p >= 0.5 else "notumor",
             "tumour_probability": p, "in_distribution": True, "uncertain": False}
            for k, (lab, p) in enumerate([("glioma", 0.9), ("glioma", 0.3), ("notumor", 0.4), ("notumor", 0.1)])]
    ev, shown = evaluation_view(recs, classes, 0.35, "a")
    assert shown == records_at(of_source(recs, "a"), classes, 0.35)
    assert [r["pred"] for r in shown] == ["notumor", "notumor"]   # 0.3 under 0.35: called again, not the stored call
    assert json.dumps(ev, sort_keys=True, default=str) == \
        json.dumps(evaluation_at(recs, classes, 0.35, "a"), sort_keys=True, default=str)


def test_the_slice_profile_caption_says_the_share_the_chart_shades():
    from core.dashboard import slice_profile_caption
    from core.inference import END_SLICE_SHARE
    assert "under half of the head's widest" in slice_profile_caption(END_SLICE_SHARE)
    assert "under 40% of the head's widest" in slice_profile_caption(0.4)



# ----------------------------------------------------------------- patient intervals
def test_a_patient_bootstrap_is_never_narrower_than_the_slice_interval_it_replaces():
    """Errors spread evenly over 12 patients (one wrong slice of 20 each) gave the percentile bootstrap
    a narrower interval than Wilson over the slices; a dozen patients cannot know more than 240
    independent slices would (an audit of the shipped LGG figures, session 53)."""
    from core.evaluation import evaluate_records
    from core.metrics import cluster_interval, wilson
    classes = ["glioma", "meningioma", "pituitary", "notumor"]
    recs = []
    for p in range(12):
        for k in range(20):
            wrong = k == 0
            recs.append({"file": f"glioma/TCGA_CS_{1000 + p}_{k:03d}.jpg", "source": "lgg", "label": "glioma",
                         "probs": dict(zip(classes, [0.1, 0.1, 0.1, 0.7] if wrong else [0.7, 0.1, 0.1, 0.1])),
                         "tumour_probability": 0.3 if wrong else 0.9, "pred": "notumor" if wrong else "glioma",
                         "in_distribution": True, "uncertain": False, "confidence": 0.7})
    hits = [r["pred"] == "glioma" for r in recs]
    b_lo, b_hi = cluster_interval(hits, [r["file"].split("_")[2] for r in recs])   # the patient
    w_lo, w_hi = wilson(228, 240)
    assert b_hi - b_lo < (w_hi - w_lo) / 4   # the bootstrap alone: every patient 19 of 20, no spread
    ev = evaluate_records(recs, classes, 0.5)
    assert ev["ci95"]["accuracy"] == pytest.approx([w_lo, w_hi])
    assert "widened to the slice-level Wilson interval" in ev["ci95_method"]


def test_the_model_card_says_over_how_many_scans_the_accuracy_is():
    """'scans 1,638' beside 'accuracy 97.8%' read as 97.8 % of 1,638; it is of the 1,438 typed ones
    (Br35H's 200 untyped tumours count in the tumour figures only)."""
    from core import dashboard as dash
    from core.evaluation import card_metrics
    card = {"metrics": card_metrics({"n": 1638, "n_fine": 1438, "accuracy": 0.9777, "per_source": {
        "benchmark": {"n": 853, "n_fine": 853, "accuracy": 0.979}}})}
    assert card["metrics"]["n_fine"] == 1438 and card["metrics"]["per_source"]["benchmark"]["n_fine"] == 853
    table = dash.metrics_readable(card).set_index("test set")
    assert table.loc["all sources", "scans"] == "1,638" and table.loc["all sources", "accuracy"] == "97.8% (of 1,438 typed)"
    assert table.loc["Benchmark", "accuracy"] == "97.9%"   # all of its scans are typed: nothing to say


def test_a_metrics_interval_help_reads_the_part_of_the_method_that_drew_it():
    """`ci95_method` names its rates first ('accuracy, sensitivity: bootstrap ...; specificity: ...'):
    each rate's help gave the whole text, the other rates' methods too."""
    from core.dashboard import interval_text
    ev = {"ci95": {"accuracy": [0.9, 0.95], "specificity": [0.8, 1.0]},
          "ci95_method": "accuracy, sensitivity: bootstrap over 13 patients; specificity: Wilson over patients"}
    assert interval_text(ev, "accuracy") == "95 % interval 90.0% to 95.0% (bootstrap over 13 patients)."
    assert interval_text(ev, "specificity") == "95 % interval 80.0% to 100.0% (Wilson over patients)."
    assert interval_text({**ev, "ci95_method": ""}, "accuracy").startswith("95 % interval 90.0% to 95.0% (Wilson): ")


@pytest.mark.parametrize("metrics", [None, [], "absent"])
def test_rescore_fills_a_card_whose_metrics_are_missing_or_not_a_block(tmp_path, metrics):
    """'metrics': null was a TypeError ({**None}); a card without the block read 'every figure already
    current' while rescore wrote the whole block."""
    import shutil
    from core.evaluation import rescore
    src = Path(__file__).resolve().parents[1] / "weights" / "simple_cnn_binary"
    for f in ("eval.json", "card.json"):
        shutil.copy(src / f, tmp_path / f)
    card = json.loads((tmp_path / "card.json").read_text())
    if metrics == "absent":
        del card["metrics"]
    else:
        card["metrics"] = metrics
    (tmp_path / "card.json").write_text(json.dumps(card))
    said = []
    changed = rescore(tmp_path, log=said.append)
    assert changed and "all.accuracy" in changed and "already current" not in said[0]
    assert json.loads((tmp_path / "card.json").read_text())["metrics"] == json.loads((src / "card.json").read_text())["metrics"]


def test_counts_past_a_thousand_are_written_with_a_separator_as_elsewhere():
    """'Scans 1397' and '11 of 1397' sat beside the Model card's '1,638' and the README's figures."""
    from core import dashboard as dash
    ev = {"n": 1397, "n_fine": 1290, "n_tumour": 870, "n_normal": 527, "accuracy": 0.976, "tumour_missed": 13,
          "normal_flagged": 9, "sensitivity": 0.985, "specificity": 0.983, "flagged_ood": 11, "referred_uncertain": 60}
    rows = {label: value for label, value, *_ in dash.headline_metrics(ev, True, True)}
    assert rows["Scans"] == "1,397"
    assert "over the 1,290 scans" in dash.scans_help(ev) and "the other 107 are" in dash.scans_help(ev)


def test_the_models_table_gives_accuracy_its_own_count():
    """'test images 1,638' beside 'accuracy 0.978' on the Training page: that accuracy is over 1,438."""
    from core.dashboard import models_table
    shipped = Path(__file__).resolve().parents[1] / "weights" / "resnet18_192_gpu_ema120_s2"
    row = models_table([shipped]).iloc[0]
    ev = json.loads((shipped / "eval.json").read_text())
    typed = sum(r["label"] in ev["classes"] for r in ev["predictions"])
    assert row["test images"] == len(ev["predictions"]) and row["typed test images"] == typed < len(ev["predictions"])


def test_compare_says_accuracy_s_count_only_where_it_is_one():
    from core.compare import _accuracy
    row = {"accuracy": 0.978, "test_images": 1638, "typed_test_images": 1438}
    assert _accuracy(row) == "97.8% of 1438 typed"
    assert _accuracy({**row, "typed_test_images": 1638}) == "97.8%"          # every test image typed
    assert _accuracy({**row, "typed_test_images": True}) == "97.8%"          # a hand-edited card's flag, no count
    assert "typed" not in _accuracy({**row, "accuracy": None})               # no accuracy: nothing it is over


def test_rescore_of_a_card_with_no_class_list_leaves_the_flags_as_stored(tmp_path):
    """'classes': null in a hand-edited card was a TypeError (list(None)) before any figure was read."""
    import shutil
    from core.evaluation import rescore
    src = Path(__file__).resolve().parents[1] / "weights" / "simple_cnn_binary"
    for f in ("eval.json", "card.json"):
        shutil.copy(src / f, tmp_path / f)
    card = json.loads((tmp_path / "card.json").read_text())
    (tmp_path / "card.json").write_text(json.dumps({**card, "classes": None}))
    assert rescore(tmp_path, log=lambda _: None) == {}
