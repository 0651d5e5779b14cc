"""What the pages used to work out themselves and now ask core for: the Evaluation page's headline
figures and source filter, the Training and Model card pages' tables and captions, the Diagnose
page's problems of a large batch."""
from __future__ import annotations

from core import app_support as app
from core import dashboard as dash


def test_headline_metrics_say_na_where_a_figure_is_undefined():
    ev = {"n": 12, "accuracy": None, "macro_f1": None, "tumour_missed": 2, "sensitivity": 0.8,
          "specificity": None}
    shown = {label: value for label, value, _, _ in dash.headline_metrics(ev)}
    assert shown == {"Scans": "12", "Accuracy": "n/a", "Macro F1": "n/a", "Tumours missed": "2",
                     "Sensitivity": "80.0%", "Specificity": "n/a"}
    full = {"n": 3, "accuracy": 2 / 3, "macro_f1": 0.5, "tumour_missed": 0, "sensitivity": 1.0,
            "specificity": 0.5, "ci95": {"accuracy": [0.2, 0.9]}}
    rows = dash.headline_metrics(full)
    assert [v for _, v, _, _ in rows] == ["3", "66.7%", "0.500", "0", "100.0%", "50.0%"]
    assert "20.0% to 90.0%" in rows[1][2]
    # the counts under the rates: 'Sensitivity 100.0%' over one tumour said so nowhere in sight
    counted = {**full, "n_fine": 3, "n_tumour": 1, "n_normal": 2, "normal_flagged": 1}
    assert [c for *_, c in dash.headline_metrics(counted)] == [None, "2 of 3", None, "0 of 1", "1 of 1", "1 of 2"]


def test_of_source_keeps_one_source_and_records_without_one_are_data():
    recs = [{"file": "a", "source": "br35h"}, {"file": "b"}, {"file": "c", "source": "lgg"}]
    assert app.of_source(recs, None) == recs
    assert [r["file"] for r in app.of_source(recs, "data")] == ["b"]
    assert [r["file"] for r in app.of_source(recs, "lgg")] == ["c"]
    assert app.sources_of(recs) == ["br35h", "data", "lgg"]


def test_batch_problems_name_unreadable_files_and_hot_volumes_only():
    rows = [{"ok": False, "file": "broken*.jpg", "error": "Not an image."},
            {"ok": True, "file": "vol.nii.gz", "hot_slices": [3, 4, 5]},
            {"ok": True, "file": "clear.png", "hot_slices": []},
            {"ok": True, "file": "plain.png"}]
    problems = app.batch_problems(rows)
    assert [k for k, _ in problems] == ["error", "warning"]
    assert "Not an image." in problems[0][1] and "`broken*.jpg`" in problems[0][1]
    assert "slices 3-5" in problems[1][1] or "slices 3, 4, 5" in problems[1][1]


def test_model_card_tables_and_caption_come_from_the_card():
    card = {"sources": [{"name": "br35h", "path": "../shared/data/br35h", "images": {"train": 10, "test": 2},
                         "label_map": {"yes": "tumor", "no": "notumor"}}],
            "metrics": {"accuracy": 0.9, "per_source": {"br35h": {}}},
            "parameters": 2_500_000, "weights_file_bytes": 3 * 2**20, "date": "2026-12-05"}
    table = dash.sources_readable(card)
    assert table.loc[0, "source"] == "Br35H" and table.loc[0, "test images"] == 2
    assert list(table.columns) == ["source", "train images", "test images"]   # narrow: it fits a phone
    (note,) = dash.source_notes(card)
    assert note.startswith("**Br35H**: ") and note.endswith("Folders → classes: yes → Tumour, no → No tumour.")
    assert "type not given" in note   # a reader need not know the datasets' short names
    metrics = dash.metrics_readable(card)
    assert list(metrics["test set"]) == ["all sources", "Br35H"] and metrics.loc[0, "accuracy"] == "90.0%"
    assert metrics.loc[1, "accuracy"] == "—"   # not defined for that set: no 'None' on the page
    # a tumour-free set's 'accuracy' is its specificity: '—' as in the README (it read 100.0 %); a set
    # with no types gets its tumour probability's calibration (it read '—' beside the README's 0.035)
    card["metrics"]["per_source"] = {"brisc": {"accuracy": 1.0, "specificity": 1.0, "sensitivity": None},
                                     "br35h": {"accuracy": None, "ece": None, "tumour_ece": 0.0352, "sensitivity": 0.985}}
    metrics = dash.metrics_readable(card).set_index("test set")
    assert metrics.loc["BRISC", "accuracy"] == "—" and metrics.loc["BRISC", "specificity"] == "100.0%"
    assert metrics.loc["Br35H", "calibration error"] == "0.035 (tumour prob.)"
    caption = dash.build_caption(card, "ab" * 32)
    assert caption.startswith("2.50 M parameters, weights 3.0 MiB, sha256 abababababababab...")
    assert caption.endswith("built 2026-12-05")


def test_training_caption_and_histories_by_card_name(random_weights, tmp_path):
    import json
    import shutil
    card = {"training": {"optimizer": "AdamW", "schedule": "cosine", "batch_size": 32, "device": "cpu",
                         "train_time_s": 90}}
    assert app.training_caption(card, 7) == ("7 epochs, AdamW with cosine schedule, batch 32, on cpu in 1.5 min. The card "
                                            "does not record which epoch's weights shipped (train.py keeps the lowest "
                                            "validation loss unless told --keep last).")
    stopped = {"training": {**card["training"], "epochs": 12, "best_epoch": 5, "stopped_early": True}}
    assert app.training_caption(stopped, 7).endswith(
        "1.5 min; stopped early, of 12 planned; the weights shipped are epoch 5's, the lowest validation loss (dotted line).")
    last = {"training": {**card["training"], "epochs": 6, "best_epoch": 6, "kept": "last"}}   # train.py --keep last
    assert app.training_caption(last, 6).endswith(
        "the weights shipped are epoch 6's, the final epoch, kept by choice (dotted line).")
    figs = dash.history_figures([{"epoch": e, "train": {"loss": 1 / e, "acc": 0.5}, "val": {"loss": 1 / e, "acc": 0.5},
                                  "lr": 0.1} for e in (1, 2, 3)], shipped_epoch=2)
    assert [s.x0 for s in figs["loss"].layout.shapes] == [2] and not figs["lr"].layout.shapes
    averaged = {"training": {**stopped["training"], "weight_average": {"with": "weights/parent", "shipped": "average"}}}
    assert app.shipped_epoch(averaged) == (5, True)
    assert app.training_caption(averaged, 7).endswith("averaged with those of the run it continued (weights/parent).")
    with_history, without = tmp_path / "a", tmp_path / "b"
    for d in (with_history, without):
        shutil.copytree(random_weights, d)
        (d / "history.json").unlink(missing_ok=True)
        c = json.loads((d / "card.json").read_text())
        (d / "card.json").write_text(json.dumps({**c, "name": f"run-{d.name}"}))
    (with_history / "history.json").write_text(json.dumps([{"epoch": 1, "acc": 0.5, "loss": 1.0}]))
    assert app.histories([with_history, without]) == {"run-a (a)": [{"epoch": 1, "acc": 0.5, "loss": 1.0}]}
    # two copies of one card: both offered, told apart by folder (the last hid the first)
    twin = tmp_path / "c"
    shutil.copytree(with_history, twin)
    assert set(app.histories([with_history, twin])) == {"run-a (a)", "run-a (c)"}


def test_training_caption_says_what_changes_how_the_curves_read():
    """Progressive resizing (a jump at epoch 11), a fine-tune's parent, an EMA run's two kinds of
    weights and a history with gaps read as instability, a from-scratch run, or another length."""
    base = {"optimizer": "AdamW", "schedule": "cosine", "batch_size": 32, "device": "cpu", "img": 176}
    caption = app.training_caption({"training": {**base, "progressive": {"small_img": 128, "epochs": 10}}}, 30)
    assert "Epochs 1-10 ran at 128 px, the rest at 176 px" in caption and "a time not recorded" in caption
    caption = app.training_caption({"training": {**base, "train_time_s": 60, "init": {
        "from": "weights/parent", "epochs_run": 30, "train_time_s": 2890.7}}}, 12)
    assert "It continued weights/parent (30 epochs, 48.2 min, not counted above)" in caption
    assert "moving average (decay 0.999)" in app.training_caption({"training": {**base, "weight_ema": 0.999}}, 5)
    caption = app.training_caption({"training": {**base, "epochs_run": 30}}, 24)
    assert caption.startswith("30 epochs") and "history.json holds 24 of the 30 epochs run" in caption


def test_shown_card_leaves_out_wrong_typed_fields_and_names_them():
    """A hand-edited card whose shown blocks had another type was a traceback on the Training and
    Model card pages (serving never reads them, so the model still loads)."""
    from core.inference import shown_card
    card = {"classes": ["a", "b"], "training": [], "split": None, "parameters": "2M",
            "sources": [{"name": "x", "images": None, "label_map": ["yes"]}, "benchmark"],
            "metrics": {"accuracy": 0.9}}
    shown = shown_card(card)
    assert shown["unreadable_fields"] == ["parameters", "sources", "sources.label_map", "training"]
    assert "training" not in shown and "split" not in shown and shown["sources"] == [{"name": "x"}]
    assert shown["metrics"] == {"accuracy": 0.9}
    fine = {"classes": ["a", "b"], "training": {"best_epoch": 3}, "sources": [{"name": "x", "images": {"train": 1}}]}
    assert shown_card(fine) is fine
    assert shown_card({"training": {"best_epoch": "7"}})["unreadable_fields"] == ["training.best_epoch"]
    assert shown_card({"training": {"weight_ema": "0.999"}})["unreadable_fields"] == ["training.weight_ema"]
    number = {"benchmark": 16.5}    # a latency as compare reads it (`card_latency`)
    assert shown_card(number) is number
    assert "not recorded" in dash.build_caption({}, "ab" * 32)


def test_the_model_card_says_its_saliency_default_and_speed():
    card = {"saliency": {"default_method": "Grad-CAM", "measured": {"pointing_game": 0.8933, "energy_in_mask": 0.2708,
                                                                   "n_slices": 150, "dilate_px": 4, "source": "lgg"}},
            "benchmark": {"latency_ms": 16.57, "what": "median single-image served pass"}}
    sal, speed = dash.saliency_and_speed(card)
    assert "Grad-CAM by default" in sal and "89% of 150 test slices" in sal and "27% of its mass" in sal
    assert "the LGG FLAIR tumour mask" in sal and "is no outline of one" in sal   # 27 % inside: a pointer, not an outline
    assert sal.endswith("Not tested on other sequences.")   # no classes in this card: no types to name
    typed = dash.saliency_and_speed({**card, "classes": ["glioma", "meningioma", "notumor", "pituitary"],
                                     "saliency": {**card["saliency"], "measured": {**card["saliency"]["measured"],
                                                                                   "target": "glioma"}}})[0]
    assert typed.endswith("Not tested on other sequences or tumour types (meningioma, pituitary tumour).")
    assert speed.startswith("Speed: 16.6 ms, median single-image served pass")
    assert dash.saliency_and_speed({}) == ["Saliency: no method was checked against tumour masks for this model "
                                           "(or the card names one this version lacks); Grad-CAM is shown by default."]


def test_a_model_without_a_gate_is_not_shown_as_checked():
    """cnn_bn_aug's Evaluation page read 'Out of distribution 0 of 540' and a binary model's
    'Tumour — type uncertain 0 of 527': neither was ever checked."""
    ev = {"n": 10, "tumour_missed": 1, "n_tumour": 6, "normal_flagged": 0, "n_normal": 4, "silent_misses": 1,
          "flagged_ood": 0, "referred_uncertain": 2, "referred_type_uncertain": 0}
    assert not dash.gate_scored([{"ood_score": None}]) and dash.gate_scored([{"ood_score": -1.2}])
    gated, plain = dash.miss_metrics(ev, True), dash.miss_metrics(ev, False)
    assert gated[3][:2] == ("Out of distribution", "0 of 10")
    assert plain[3][:2] == ("Refused (no gate)", "0 of 10") and "no out-of-distribution gate" in plain[3][2]
    assert "no gate here" in plain[2][2] and "no gate here" not in gated[2][2]
    # 'missed' counts flagged misses too, and says how many: a clinician read 13 missed as 13 told
    # 'no tumour' with no word (5 of them were referred); silent misses get their denominator
    assert gated[0][2].endswith(": 0 of the 1 carry an 'uncertain, refer' or out-of-distribution flag, 1 none (silent misses).")
    assert gated[2][1] == "1 of 6"
    # only the flags the model has, and the verb agrees (a review of that sentence)
    assert plain[0][2].endswith(": 0 of the 1 carry an 'uncertain, refer' flag, 1 none (silent misses).")
    no_rule = dash.miss_metrics({**ev, "tumour_missed": 2}, False, refers=False)
    assert no_rule[0][2].endswith("neither a gate nor a referral rule, so every one is a silent miss.")
    assert "no flag can speak" in no_rule[2][2]
    assert dash.missed_help({"tumour_missed": 3, "silent_misses": 2}, gated=True, refers=False).endswith(
        ": 1 of the 3 carries an out-of-distribution flag, 2 none (silent misses).")
    one_ct = dash.miss_metrics({**ev, "not_mri": 1, "not_mri_flagged": 0}, True)[3][2]
    assert "0 of them are among the 1 CT that the source filed as MRI" in one_ct   # was 'the 1 CTs'
    assert "2 of them are among the 12 CTs" in dash.miss_metrics({**ev, "not_mri": 12, "not_mri_flagged": 2}, True)[3][2]
    assert dash.headline_metrics({**ev, "tumour_missed": 3})[3][2].endswith("2 of the 3 carry an 'uncertain, refer' "
                                                                           "or out-of-distribution flag, 1 none (silent misses).")
    from core.referral import ReferralRule
    c4, yn = ["glioma", "meningioma", "pituitary", "notumor"], ["tumor", "notumor"]
    four = dash.referral_metrics(ev, c4, ReferralRule(tuple(c4), 0.3, 0.7, 0.0, 0.8))
    no_rule = dash.referral_metrics(ev, c4, ReferralRule(tuple(c4)))   # cnn_bn_aug's card: no band, no type level
    binary = dash.referral_metrics(ev, yn, ReferralRule(tuple(yn), 0.3, 0.7, 0.0, 0.8))
    # of the tumour calls (5 found + 0 flagged normals), not of every scan (a clinician's check)
    assert four[1][1] == "0 of 5 tumour calls" and binary[1][1] == "n/a" and binary[0][1] == "2 of 10"
    assert no_rule[1][1] == "n/a" and "no type-confidence level" in no_rule[1][2]
    # a yes/no zip against the typed model: scored tumour vs no tumour, though the model names types
    folded = dash.referral_metrics(ev, yn, ReferralRule(tuple(c4), 0.3, 0.7, 0.0, 0.8))
    assert folded[1][1] == "n/a" and "scored tumour vs no tumour" in folded[1][2]
    # ... unless its card sets no type level: then no CLI count to point to
    assert "no type-confidence level" in dash.referral_metrics(ev, yn, ReferralRule(tuple(c4)))[1][2]
    assert "names no tumour type" in binary[1][2]


def test_a_shortfall_of_a_model_with_a_class_that_is_neither_is_not_blamed_on_the_floor_alone():
    op = {"target_sensitivity": .99, "val_sensitivity": .9, "val_specificity": .99, "min_specificity": .97}
    text = app.operating_point_text({"classes": ["glioma", "notumor", "stroke"], "operating_point": op}, 0.3)
    assert "a tumour called stroke is missed at any threshold" in text
    assert "healthy scans at" in app.operating_point_text({"classes": ["glioma", "notumor"], "operating_point": op}, 0.3)


def test_the_reliability_note_says_how_mid_range_probabilities_fared():
    """'Reliability (ECE 0.007)' over bins where nearly every scan sits at 0.99 read as 'calibrated',
    while the few scans at 0.5-0.8 were right about half the time."""
    bins = [{"lo": 0.5, "hi": 0.6, "n": 10, "confidence": 0.55, "accuracy": 0.3},
            {"lo": 0.7, "hi": 0.8, "n": 10, "confidence": 0.75, "accuracy": 0.5},
            {"lo": 0.93, "hi": 1.0, "n": 980, "confidence": 0.99, "accuracy": 0.995}]
    note = dash.reliability_note(bins)
    assert note.startswith("20 of 1,000 scans (2%) have a top-class probability under 80%")
    assert "stated 65%" in note and "right 40%" in note
    # a bin whose mean is above the cut but whose scans straddle it is not counted under it
    assert dash.reliability_note([{"lo": 0.867, "hi": 0.933, "n": 23, "confidence": 0.909, "accuracy": 0.8}]) is None
    assert "overconfident" in note
    assert "about as often right" in dash.reliability_note([{**bins[0], "n": 20, "accuracy": 0.57}])
    assert dash.reliability_note(bins[2:]) is None
    # one scan under the cut is no verdict (a zip of 60 read 'overconfident' over one scan)
    few = dash.reliability_note([{**bins[0], "n": 1, "accuracy": 0.0}, bins[2]])
    assert "too few to say" in few and "confident" not in few


def test_the_risk_coverage_axis_stops_at_100_percent():
    """A small zip answered every scan right: the flat line at 100 % sat on an axis running to 200 %."""
    rows = [{"coverage": c, "accuracy": 1.0, "min_confidence": m} for c, m in ((1.0, 0.0), (0.9, 0.6))]
    lo, hi = dash.risk_coverage_figure(rows).layout.yaxis.range
    assert 0.98 <= lo < hi == 1.0


def test_the_refused_scans_are_named():
    """The false-negative tab said 'Out of distribution 3 of 60' and nowhere which three."""
    probs = {"tumor": 0.2, "notumor": 0.8}
    recs = [{"file": "no/a.jpg", "label": "notumor", "in_distribution": False, "ood_reason": "Looks like a CT.",
             "copy_in_training": True, "probs": probs, "pred": "notumor"},
            {"file": "yes/b.jpg", "label": "tumor", "in_distribution": True, "probs": probs, "pred": "notumor"}]
    (line,) = app.refused_lines(recs)
    assert line.startswith("`no/a.jpg` (labelled no tumour): Looks like a CT.") and "copy in training" in line
    import json
    from conftest import REPO
    shipped = REPO / "weights" / (REPO / "weights" / "DEFAULT").read_text().strip() / "eval.json"
    two = json.loads(shipped.read_text())["predictions"][:2]
    two[0] = {**two[0], "in_distribution": False}
    classes = list(two[0]["probs"])
    note = app.accepted_note({"flagged_ood": 1, "n": 2}, two, classes, 0.5)
    assert note.startswith("1 of these 2 scans is refused") and "false-negative tab names them" in note


def test_a_yes_no_set_draws_one_roc_curve():
    """tumor, notumor and 'tumour vs no tumour': three identical curves in the legend."""
    recs = [{"label": lab, "probs": {"tumor": p, "notumor": 1 - p}, "tumour_probability": p}
            for lab, p in (("tumor", 0.9), ("tumor", 0.4), ("notumor", 0.2), ("notumor", 0.6))]
    names = [t.name for t in dash.roc_figure(recs, ["tumor", "notumor"]).data if t.showlegend is not False]
    assert len(names) == 1 and names[0].startswith("tumour vs no tumour")
    two = [{**r, "label": "glioma" if r["label"] == "tumor" else "notumor",
            "probs": {"glioma": r["probs"]["tumor"], "notumor": r["probs"]["notumor"]}} for r in recs]
    assert len([t for t in dash.roc_figure(two, ["glioma", "notumor"]).data if t.showlegend is not False]) == 1
    # a record written without its tumour probability: the tumour classes' sum, not no curve
    bare = [{k: v for k, v in r.items() if k != "tumour_probability"} for r in recs]
    assert [t.name for t in dash.pr_figure(bare, ["tumor", "notumor"]).data][0].startswith("tumour vs no tumour")
    three = [{**r, "label": {"tumor": "glioma"}.get(r["label"], r["label"]),
              "probs": {"glioma": r["probs"]["tumor"] / 2, "pituitary": r["probs"]["tumor"] / 2,
                        "notumor": r["probs"]["notumor"]}} for r in recs]
    assert len([t for t in dash.roc_figure(three, ["glioma", "pituitary", "notumor"]).data
                if t.showlegend is not False]) == 3   # glioma, notumor (pituitary has no scans) and the pooled one


def test_a_set_of_one_side_says_what_its_figures_measure():
    """BRISC's test scans are all tumour-free: 'Accuracy 100 %' and 'tumours missed 0 of 0' read as a
    perfect model; Br35H's are all tumours: 'normal scans flagged 0 of 0'."""
    brisc = {"n": 108, "n_tumour": 0, "n_normal": 108, "tumour_missed": 0, "normal_flagged": 0}
    br35h = {"n": 200, "n_tumour": 200, "n_normal": 0, "tumour_missed": 3, "normal_flagged": 0}
    assert "(the specificity)" in dash.one_side_note(brisc) and "(no specificity)" in dash.one_side_note(br35h)
    assert dash.one_side_note({**brisc, "n_tumour": 5}) is None
    # one scan: no 'All 1 scans here are' (a review)
    assert dash.one_side_note({"n_tumour": 0, "n_normal": 1}).startswith("The one scan here is tumour-free: ")
    assert dash.one_side_note({"n_tumour": 1, "n_normal": 0}).startswith("The one scan here is a tumour: ")
    figures = {label: value for label, value, _ in dash.miss_metrics(brisc, gated=True)}
    assert figures["Tumours missed here"] == figures["Silent misses"] == "n/a" and figures["Normal scans flagged"] == "0 of 108"
    figures = {label: value for label, value, _ in dash.miss_metrics(br35h, gated=True)}
    assert figures["Normal scans flagged"] == "n/a" and figures["Tumours missed here"] == "3 of 200"
    assert dash.source_text(None) == "all sources" and dash.source_text("lgg").startswith("LGG FLAIR: TCGA")
    assert dash.source_text("mine") == "mine"


def test_the_gates_categories_are_named_in_words():
    import json
    from conftest import REPO
    card = json.loads((REPO / "weights" / (REPO / "weights" / "DEFAULT").read_text().strip() / "card.json").read_text())
    names = list(dash.ood_table(card)["category"])
    assert "Shepp-Logan phantom" in names and not any("_" in n for n in names)
    from core.outliers import CATEGORIES   # not imported by the app (5 s): the names kept beside it, in step
    assert set(CATEGORIES) <= set(dash.OUTLIER_NAMES)


def test_every_chart_with_a_legend_puts_it_under_the_plot():
    """Beside the plot, the ROC legend covered the curves of a 60 px wide chart on a tablet, and six
    runs' names took half of a half-width learning curve."""
    import json
    from conftest import REPO
    ev = json.loads((REPO / "weights" / (REPO / "weights" / "DEFAULT").read_text().strip() / "eval.json").read_text())
    recs, classes = ev["predictions"], ev["classes"]
    history = [{"epoch": 1, "train": {"loss": 1.0}, "val": {"loss": 0.9}}]
    figures = [dash.roc_figure(recs, classes), dash.pr_figure(recs, classes),
               dash.reliability_figure(ev["reliability"], ev.get("ece")),
               dash.threshold_figure(ev["threshold_curve"], 0.3), dash.overlay_histories({"a": history}, "loss")]
    for fig in figures:
        assert sum(t.showlegend is not False for t in fig.data) >= 1 and fig.layout.showlegend is not False
        assert fig.layout.legend.orientation == "h" and fig.layout.legend.y < 0, fig.layout.title.text


def test_the_probability_scale_reaches_100_percent():
    """Plotly's own ticks stopped at 80 % on a narrow column: a 99 % bar ran past the scale's end."""
    fig = dash.probability_bar({"glioma": 0.99, "notumor": 0.01}, "glioma")
    assert fig.layout.xaxis.range == (0, 1) and fig.layout.xaxis.dtick == 0.25


def test_the_threshold_chart_zooms_to_the_rates_around_the_operating_point():
    """0-100 % laid a 1.5 % miss rate and 1.7 % false alarms flat on zero: moving the point showed
    nothing (a clinician's check of the figures). The axis now ends where 3x those rates fit."""
    curve = [{"threshold": t / 10, "miss_rate": t / 10 * 0.05, "false_alarm_rate": (1 - t / 10) * 0.06} for t in range(11)]
    assert dash.rate_axis_top(curve, 0.3) == 0.2   # 4.2 % false alarms at 0.3: 3x fits in 20 %
    assert dash.rate_axis_top(curve, None) == 1.02
    assert dash.rate_axis_top([{"threshold": 0.5, "miss_rate": 0.4, "false_alarm_rate": 0.1}], 0.5) == 1.02
    fig = dash.threshold_figure(curve, 0.3)
    assert tuple(fig.layout.yaxis.range) == (0, 0.2) and "double-click for all" in fig.layout.yaxis.title.text
