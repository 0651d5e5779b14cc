"""Findings of session 53 (a code review of core/), each test failing on the code before its fix."""
from __future__ import annotations

import json

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

