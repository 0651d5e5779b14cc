"""Review N: a record and its summary decide alike, the tumour probability is written apart
from its threshold, and risk-coverage never cuts inside a tie."""
import json
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np

from core.evaluation import evaluate_records, prediction_records, rescore
from core.labels import NO_TUMOUR
from core.metrics import risk_coverage

C = ["glioma", "meningioma", "pituitary", "notumor"]


def _samples(n: int, label: str = "glioma") -> list:
    return [NS(rel=f"{k}.jpg", source="x", label=label) for k in range(n)]


# ----------------------------------------------------------------------------- 1: round, then decide
def test_a_record_and_its_summary_decide_from_the_same_stored_probabilities():
    # tumour probability 0.49999995 unrounded; each class rounds up, so the stored sum is 0.500001
    probs = np.array([[0.16666665, 0.16666665, 0.16666665, 0.50000005], [0.9, 0.05, 0.03, 0.02]])
    recs = prediction_records(_samples(2), probs, C, 0.5)
    ev = evaluate_records(recs, C, 0.5)
    missed = sum(r["pred"] == NO_TUMOUR for r in recs)
    # old: the record said notumor (tumour_probability 0.5) while the summary counted no miss
    assert ev["tumour_missed"] == missed and ev["silent_misses"] == missed
    for r in recs:
        assert (r["pred"] != NO_TUMOUR) == (r["tumour_probability"] >= r["threshold"])


def test_rescore_reproduces_the_flags_a_record_was_written_with(tmp_path: Path):
    # tumour probability 0.59999995 unrounded (inside the band [0.3, 0.6)), stored 0.600001 (outside)
    probs = np.array([[0.19999998, 0.19999998, 0.19999999, 0.40000005]])
    card = {"classes": C, "uncertainty": {"lo": 0.3, "hi": 0.6}}
    from core.referral import ReferralRule
    recs = prediction_records(_samples(1), probs, C, 0.5, referral=ReferralRule.from_card(card))
    written = [r["uncertain"] for r in recs]
    (tmp_path / "eval.json").write_text(json.dumps({"classes": C, "threshold": 0.5,
                                                    **evaluate_records(recs, C, 0.5)}))
    (tmp_path / "card.json").write_text(json.dumps(card))
    rescore(tmp_path, log=lambda _: None)
    again = json.loads((tmp_path / "eval.json").read_text())["predictions"]
    assert [r["uncertain"] for r in again] == written   # old: True written, False on rescore


def test_a_stored_tumour_probability_stays_on_the_side_of_its_call():
    # 6-decimal probabilities summing to exactly 0.5, which float addition makes 0.49999999999999994
    probs = np.array([[0.279958, 0.205755, 0.014287, 0.5]])
    (r,) = prediction_records(_samples(1), probs, C, 0.5)
    assert r["pred"] == NO_TUMOUR and r["tumour_probability"] < 0.5   # old: 0.5 beside 'notumor'


# ----------------------------------------------------------------------------- 2: digits apart
def _row(tp: float, pred: str = "notumor", threshold: float | None = 0.5) -> dict:
    return {"file": "a.jpg", "ok": True, "pred": pred, "tumour_probability": tp, "threshold": threshold,
            "in_distribution": True, "uncertain": False, "type_uncertain": False, "ood_reason": None,
            "confidence": 1 - tp, "probs": {}}


def test_the_cli_line_writes_the_tumour_probability_apart_from_the_threshold():
    from core.report import text_line
    assert "(tumour probability 0.49996)" in text_line(_row(0.49996))        # old: 0.500
    assert "(tumour probability 0.700)" in text_line(_row(0.7, "glioma"))   # 3 decimals when enough
    assert "(tumour probability 0.499)" in text_line(_row(0.49946, threshold=None))


def test_the_batch_table_format_has_the_decimals_its_closest_row_needs():
    from core.report import tp_column_format
    assert tp_column_format([_row(0.2), _row(0.9, "glioma")]) == "%.3f"
    assert tp_column_format([_row(0.2), _row(0.49996), {"file": "b", "ok": False}]) == "%.5f"
    refused = {**_row(0.49996), "in_distribution": False}   # not in the table: no call to read
    assert tp_column_format([_row(0.2), refused]) == "%.3f"


def test_the_diagnose_page_formats_its_tumour_probabilities_by_that_rule():
    page = (Path(__file__).resolve().parents[1] / "app_pages" / "diagnose.py").read_text()
    assert "tp_column_format(results)" in page
    assert "ProgressColumn(format=tp_format" in page and "NumberColumn(format=tp_format)" in page


# ----------------------------------------------------------------------------- 3: ties in risk-coverage
def test_risk_coverage_keeps_or_refers_equal_confidences_together():
    tied = np.full(4, 0.9)
    a, b = risk_coverage(tied, [1, 1, 0, 0]), risk_coverage(tied, [0, 0, 1, 1])
    assert a == b   # old: accuracy 1.0 and 0.0 at coverage 0.5, whichever order the sort left
    assert all(r["coverage"] == 1.0 and r["accuracy"] == 0.5 for r in a)
    conf = np.array([0.9, 0.8, 0.8, 0.8, 0.6, 0.5])
    for r in risk_coverage(conf, [1, 0, 1, 1, 0, 1]):   # each point is one a threshold produces
        assert r["coverage"] == (conf >= r["min_confidence"]).mean()
