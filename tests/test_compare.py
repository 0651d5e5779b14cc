"""`python -m core compare`: rows from model cards, Markdown and JSON output, latency."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from core.cli import main as cli_main
from core.compare import compare_rows, to_markdown

FIELDS = {"name", "classes", "sources", "accuracy", "macro_f1", "tumour_missed", "ece",
          "parameters", "weights_file_bytes", "latency_ms", "train_time_s", "device", "img",
          "epochs", "aug", "reduced", "settings"}


def make_model_dir(out: Path, classes: list[str], config: dict | None = None,
                   extra: dict | None = None) -> Path:
    """A random simple_cnn in the shipped format with a card like train.py writes."""
    from safetensors.torch import save_file

    from core.models import count_parameters, create_model
    out.mkdir(parents=True)
    torch.manual_seed(0)
    model = create_model("simple_cnn", len(classes))
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()},
              out / "model.safetensors")
    card = {"name": out.name, "arch": "simple_cnn", "classes": classes,
            "task": "binary tumour / no tumour" if len(classes) == 2 else f"{len(classes)}-class",
            "preprocessing": {"size": 32, "crop": "head", "mean": 0.2, "std": 0.25},
            "calibration": {"temperature": 1.0}, "operating_point": {"threshold": 0.5},
            "sources": [{"name": "benchmark", "weight": 1.0}, {"name": "heldout", "weight": 0.0}],
            "metrics": {"n": 40, "accuracy": 0.9, "macro_f1": 0.88, "tumour_missed": 2,
                        "sensitivity": 0.95, "specificity": 0.8, "ece": 0.03,
                        "per_source": {"benchmark": {"accuracy": 0.92}}},
            "training": {"epochs": 30, "epochs_run": 12, "img": 32, "precision": "bf16",
                         "augmentation": {"strength": 1.0, "skull_strip_p": 0.2},
                         "train_time_s": 125.0, "device": "cpu (x86_64, 2 cores)",
                         "config": config},
            "parameters": count_parameters(model),
            "weights_file_bytes": (out / "model.safetensors").stat().st_size, **(extra or {})}
    (out / "card.json").write_text(json.dumps(card))
    return out


@pytest.fixture()
def two_models(tmp_path) -> list[Path]:
    a = make_model_dir(tmp_path / "weights" / "binary", ["tumor", "notumor"],
                       config={"reduced": "CPU budget: 32 px", "reported": "98.8%"})
    b = make_model_dir(tmp_path / "runs" / "four", ["glioma", "meningioma", "pituitary", "notumor"],
                       extra={"latency_ms": 7.5})
    (tmp_path / "runs" / "logs").mkdir()        # no card: passed over
    (tmp_path / "weights" / "DEFAULT").write_text("binary")  # a file: passed over
    return [a, b]


def test_rows_have_every_field(two_models, tmp_path):
    rows = compare_rows([tmp_path / "weights" / "binary", tmp_path / "weights" / "DEFAULT",
                         tmp_path / "runs" / "logs", tmp_path / "runs" / "four"], repeats=3)
    assert [r["name"] for r in rows] == ["binary", "four"]
    for r in rows:
        assert FIELDS <= r.keys()
    binary, four = rows
    assert binary["sources"] == ["benchmark"]  # the weight-0 source was not trained on
    assert binary["reduced"] == "CPU budget: 32 px" and "REDUCED: CPU budget: 32 px" in binary["settings"]
    assert binary["latency_from"].startswith("measured, 1 thread, ") and binary["latency_ms"] > 0  # + precision
    assert four["latency_ms"] == 7.5 and four["latency_from"] == "card"
    assert four["reduced"] is None and "REDUCED" not in four["settings"]
    assert "12/30 epochs" in four["settings"]
    assert "aug 1.0," in four["settings"]  # default ranges: nothing more said


def test_settings_name_the_widened_augmentation():
    from core.compare import _settings, settings_text
    aug = {"strength": 1.0, "rotate": 45.0, "shear": 0.1, "turn_p": 0.25, "blur_p": 0.0}
    text = settings_text(_settings({"img": 176, "epochs": 12, "augmentation": aug}, {}))
    assert "aug 1.0 (rotate 45, turns 0.25)" in text
    text = settings_text(_settings({"img": 176, "epochs": 12, "augmentation": {**aug, "gamma_log": 0.8}}, {}))
    assert "aug 1.0 (rotate 45, turns 0.25, ln gamma 0.8)" in text


def test_folders_of_models_expand_and_repeat_once(two_models, tmp_path):
    rows = compare_rows([tmp_path / "weights", tmp_path / "runs", tmp_path / "runs" / "four"],
                        latency=False)
    assert [r["name"] for r in rows] == ["binary", "four"]
    assert rows[0]["latency_ms"] is None


def test_cli_writes_markdown_and_json(two_models, tmp_path, capsys):
    md, js = tmp_path / "out" / "compare.md", tmp_path / "out" / "compare.json"
    dirs = [str(d) for d in two_models]
    assert cli_main(["compare", *dirs, "--no-latency", "--md", str(md), "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "binary" in printed and "four" in printed
    rows = json.loads(js.read_text())
    assert [r["name"] for r in rows] == ["binary", "four"] and FIELDS <= rows[0].keys()
    table = [ln for ln in md.read_text().splitlines() if ln.startswith("|")]
    assert len(table) == 4  # header, separator, two rows
    assert len({ln.count("|") for ln in table}) == 1  # every row has the same columns
    assert "REDUCED" in table[2] and "92.0%" in table[2]  # benchmark accuracy beside overall
    assert "98.8%" in md.read_text()  # the seed's reported figure is quoted


def test_markdown_escapes_pipes():
    row = {"name": "a|b", "classes": ["tumor", "notumor"], "sources": [], "accuracy": None,
           "macro_f1": None, "tumour_missed": None, "ece": None, "parameters": None,
           "weights_file_bytes": None, "latency_ms": None, "train_time_s": None,
           "device": None, "settings": ""}
    line = to_markdown([row]).splitlines()[2]
    assert "a\\|b" in line


def test_no_cards_is_a_usage_error(tmp_path, capsys):
    assert cli_main(["compare", str(tmp_path), "--no-latency"]) == 2
    assert "no card.json" in capsys.readouterr().err


def test_record_writes_measured_latency_into_the_card(two_models, capsys):
    a, b = two_models
    assert cli_main(["compare", str(a), str(b), "--record", "--repeats", "2"]) == 0
    card_a = json.loads((a / "card.json").read_text())
    assert card_a["benchmark"]["latency_ms"] > 0 and card_a["benchmark"]["threads"] == 1
    # a latency the card already had is kept, not overwritten by a fresh timing
    assert "benchmark" not in json.loads((b / "card.json").read_text())
    assert compare_rows([a], latency=False)[0]["latency_from"] == "card"


def test_app_table_shows_the_compare_rows(two_models):
    from core.dashboard import models_table
    table = models_table(two_models)
    assert list(table["model"]) == ["binary", "four"]
    # a yes/no model's two-class accuracy is not ranked beside four-class ones
    assert pd.isna(table["benchmark accuracy"][0]) and table["benchmark accuracy"][1] == 0.92
    assert table["CPU latency (ms)"].tolist()[1] == 7.5
    assert "REDUCED" in table["settings"][0]


def test_overlaid_curves_have_train_and_val_per_run():
    from core.dashboard import overlay_histories
    h = [{"epoch": e, "train": {"acc": 0.5 + e / 10}, "val": {"acc": 0.4 + e / 10}} for e in (1, 2, 3)]
    fig = overlay_histories({"aug": h, "noaug": h[:2]}, "acc")
    names = [t.name for t in fig.data]
    assert names == ["aug (val)", "aug (train)", "noaug (val)", "noaug (train)"]
    assert list(fig.data[2].y) == pytest.approx([0.5, 0.6])


def _with_eval(d: Path, records: list[tuple[str, str, str, str]], train: list[str] = ()) -> Path:
    """eval.json records (source, file, label, pred) and a split.json, as train.py writes them."""
    preds = [{"source": s, "file": f, "label": lab, "pred": p} for s, f, lab, p in records]
    n_t = sum(lab != "notumor" for _, _, lab, _ in records)
    (d / "eval.json").write_text(json.dumps({"predictions": preds, "n_tumour": n_t, "per_source": {
        "benchmark": {"tumour_missed": 1, "n_tumour": n_t}}}))
    (d / "split.json").write_text(json.dumps({"files": {"benchmark": {"train": list(train)}}}))
    return d


def test_paired_compares_two_models_on_the_images_both_were_tested_on(tmp_path):
    """Side-by-side rows of different splits reversed a conclusion (cnn_bn with and without
    augmentation): the paired figures are on the shared images only, with McNemar's p."""
    from core.compare import paired
    four = ["glioma", "meningioma", "pituitary", "notumor"]
    a = make_model_dir(tmp_path / "a", four)
    b = make_model_dir(tmp_path / "b", four)
    shared = [("benchmark", f"glioma/s{i}.jpg", "glioma") for i in range(12)]
    _with_eval(a, [(s, f, lab, "glioma") for s, f, lab in shared] + [("benchmark", "glioma/only_a.jpg", "glioma", "notumor")])
    _with_eval(b, [(s, f, lab, "notumor" if i < 10 else "glioma") for i, (s, f, lab) in enumerate(shared)]
               + [("benchmark", "notumor/only_b.jpg", "notumor", "notumor")])
    res = paired(a, b)
    bench = res["per_source"]["benchmark"]
    assert res["shared"] == 12 and bench["n"] == 12
    assert (bench["a"], round(bench["b"], 4), bench["a_only"], bench["b_only"]) == (1.0, round(2 / 12, 4), 10, 0)
    assert bench["p"] == pytest.approx(2 * 0.5 ** 10)   # exact two-sided McNemar
    rows = {r["name"]: r for r in compare_rows([a, b], latency=False)}
    assert rows["a"]["test_set"] != rows["b"]["test_set"]   # 13 images each, not the same 13
    md = to_markdown(list(rows.values()))
    assert "2 different test sets" in md and "--paired" in md
    assert cli_main(["compare", str(a), str(b), "--paired"]) == 0
    with pytest.raises(SystemExit):
        cli_main(["compare", str(a), "--repeats", "0"])


def test_tumours_missed_is_shown_out_of_its_tumour_scans(tmp_path):
    from core.compare import missed_text
    d = make_model_dir(tmp_path / "m", ["glioma", "meningioma", "pituitary", "notumor"],
                       extra={"sources": [{"name": "benchmark"}, {"name": "lgg"}]})
    _with_eval(d, [("benchmark", "glioma/a.jpg", "glioma", "glioma"), ("lgg", "glioma/b.jpg", "glioma", "notumor")])
    (row,) = compare_rows([d], latency=False)
    assert missed_text(row) == "2 of 2 (benchmark 1 of 2)"


def test_lgg_intervals_resample_patients_not_slices():
    """433 LGG slices of 13 patients: a Wilson interval over slices was far too narrow."""
    from core.evaluation import evaluate_records
    classes = ["glioma", "meningioma", "pituitary", "notumor"]
    recs = []
    for p in range(12):   # twelve patients, 20 slices each; three patients' slices a third wrong
        for k in range(20):
            wrong = p < 3 and k < 7
            recs.append({"file": f"glioma/TCGA_CS_{1000 + p}_{k:03d}.jpg", "source": "lgg", "label": "glioma",
                         "probs": dict(zip(classes, [0.1, 0.1, 0.1, 0.7] if wrong else [0.7, 0.1, 0.1, 0.1])),
                         "tumour_probability": 0.3 if wrong else 0.9, "pred": "notumor" if wrong else "glioma",
                         "in_distribution": True, "uncertain": False, "confidence": 0.7})
    ev = evaluate_records(recs, classes, 0.5)
    lo, hi = ev["ci95"]["accuracy"]
    from core.metrics import wilson
    w_lo, w_hi = wilson(219, 240)
    assert "12 patients" in ev["ci95_method"] and lo < w_lo - 0.01 and hi > w_hi
    plain = evaluate_records([{**r, "file": f"glioma/x{i}.jpg"} for i, r in enumerate(recs)], classes, 0.5)
    assert "ci95_method" not in plain and plain["ci95"]["accuracy"] == pytest.approx(list(wilson(219, 240)))


def test_too_few_patients_get_a_wilson_interval_over_patients_and_say_so():
    """One patient's 40 slices gave a zero-width '95 % interval 90.0 % to 90.0 %', then a Wilson
    interval over slices as if they were 40 patients: one patient is one observation."""
    from core.evaluation import evaluate_records
    from core.metrics import wilson
    classes = ["glioma", "meningioma", "pituitary", "notumor"]
    recs = [{"file": f"glioma/TCGA_CS_1000_{k:03d}.jpg", "source": "lgg", "label": "glioma",
             "probs": dict(zip(classes, [0.1, 0.1, 0.1, 0.7] if k < 4 else [0.7, 0.1, 0.1, 0.1])),
             "tumour_probability": 0.3 if k < 4 else 0.9, "pred": "notumor" if k < 4 else "glioma",
             "in_distribution": True, "uncertain": False, "confidence": 0.7} for k in range(40)]
    ev = evaluate_records(recs, classes, 0.5)
    assert ev["ci95"]["accuracy"] == pytest.approx(list(wilson(0.9, 1)))   # the pooled 36 of 40, over one patient
    assert "Wilson over patients" in ev["ci95_method"] and "bootstrap over" not in ev["ci95_method"]


def test_paired_leaves_out_images_with_a_copy_in_either_models_training(tmp_path):
    """65 and 67 of cnn_bn's 260 shared images have a copy in one model's training split."""
    from core.compare import paired
    four = ["glioma", "meningioma", "pituitary", "notumor"]
    a = _with_eval(make_model_dir(tmp_path / "a", four), [("benchmark", f"glioma/s{i}.jpg", "glioma", "glioma") for i in range(4)])
    b = _with_eval(make_model_dir(tmp_path / "b", four), [("benchmark", f"glioma/s{i}.jpg", "glioma", "notumor") for i in range(4)])
    ev = json.loads((a / "eval.json").read_text())
    ev["predictions"][0]["copy_in_training"] = True
    (a / "eval.json").write_text(json.dumps(ev))
    res = paired(a, b)
    assert res["copies_left_out"] == 1 and res["per_source"]["benchmark"]["n"] == 3
    assert paired(a, b, with_copies=True)["per_source"]["benchmark"]["n"] == 4


def test_rows_give_the_figures_without_copies_in_training(tmp_path):
    """The previous default ranked above the new one on test images with a copy in training
    (98.1 % against 96.7 % benchmark accuracy); without them 97.0 % against 96.6 %."""
    from core.compare import COPIES_NOTE, to_text
    from core.dashboard import models_table
    four = ["glioma", "meningioma", "pituitary", "notumor"]
    d = make_model_dir(tmp_path / "m", four, extra={"sources": [{"name": "benchmark"}, {"name": "lgg"}]})
    right, wrong = dict(zip(four, [0.7, 0.1, 0.1, 0.1])), dict(zip(four, [0.1, 0.1, 0.1, 0.7]))
    recs = [{"source": src, "file": f"glioma/{src}{i}.jpg", "label": "glioma", "probs": p,
             "tumour_probability": 1 - p["notumor"], "pred": "glioma", "in_distribution": True,
             "uncertain": False, "confidence": 0.7, "copy_in_training": copy}
            for i, (src, p, copy) in enumerate([("benchmark", right, True), ("benchmark", right, True),
                                                ("benchmark", wrong, False), ("benchmark", right, False),
                                                ("lgg", right, False)])]
    (d / "eval.json").write_text(json.dumps({"predictions": recs}))
    (row,) = compare_rows([d], latency=False)
    assert row["copies_in_training"] == 2 and row["copy_free_n"] == 3
    assert row["copy_free_accuracy"] == pytest.approx(2 / 3)
    assert row["copy_free_accuracy_per_source"]["benchmark"] == 0.5
    assert (row["copy_free_benchmark_missed"], row["copy_free_benchmark_n_tumour"]) == (1, 2)
    table = models_table([d])
    assert table["copies in training"][0] == 2 and table["copy-free benchmark accuracy"][0] == 0.5
    assert table["copy-free benchmark missed"][0] == 1
    text = to_text([row])
    assert "66.7% (benchmark 50.0%), benchmark missed 1 of 2" in text and COPIES_NOTE in text
    assert COPIES_NOTE in to_markdown([row])


def test_benchmark_missed_of_a_benchmark_only_model_is_its_overall_count(tmp_path):
    """cnn_bn_aug's eval.json has no per-source blocks: 'benchmark missed' was blank beside a
    'benchmark accuracy' that fell back to the overall figure."""
    from core.dashboard import models_table
    d = make_model_dir(tmp_path / "m", ["glioma", "meningioma", "pituitary", "notumor"])
    (d / "eval.json").write_text(json.dumps({"predictions": [], "tumour_missed": 3, "n_tumour": 9}))
    table = models_table([d])
    assert table["benchmark missed"][0] == 3


def test_paired_judges_models_with_other_classes_on_the_tumour_call(tmp_path):
    """A yes/no model against a typed one: each was scored on its own task (the yes/no model's
    tumour call, the typed model's exact type), and McNemar then ranked them the wrong way round."""
    from core.compare import paired, paired_text
    binary = make_model_dir(tmp_path / "yn", ["tumor", "notumor"])
    typed = make_model_dir(tmp_path / "four", ["glioma", "meningioma", "pituitary", "notumor"])
    files = [f"glioma/s{i}.jpg" for i in range(10)]
    # the binary model misses 3 tumours; the typed one finds all 10, 6 of them with the wrong type
    _with_eval(binary, [("benchmark", f, "tumor", "notumor" if i < 3 else "tumor") for i, f in enumerate(files)])
    _with_eval(typed, [("benchmark", f, "glioma", "meningioma" if i < 6 else "glioma") for i, f in enumerate(files)])
    res = paired(binary, typed)
    bench = res["per_source"]["benchmark"]
    assert res["judged_on"].startswith("tumour vs no tumour")
    assert (bench["a"], bench["b"], bench["a_only"], bench["b_only"]) == (0.7, 1.0, 0, 3)
    assert "judged on tumour vs no tumour" in paired_text(res)


@pytest.mark.parametrize("damage, said", [
    ("[]", "no list of per-image predictions"),
    ('{"predictions": [{"x": 1}]}', "its record 1 has no file, label or call"),
    ("{oops", "not JSON")])
def test_a_damaged_eval_json_is_one_sentence_naming_it(tmp_path, capsys, damage, said):
    """compare --paired ended in an AttributeError or KeyError traceback; the table named card.json."""
    four = ["glioma", "meningioma", "pituitary", "notumor"]
    a = _with_eval(make_model_dir(tmp_path / "a", four), [("benchmark", "glioma/s.jpg", "glioma", "glioma")])
    b = _with_eval(make_model_dir(tmp_path / "b", four), [("benchmark", "glioma/s.jpg", "glioma", "glioma")])
    (b / "eval.json").write_text(damage)
    assert cli_main(["compare", str(a), str(b), "--paired"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{b / 'eval.json'} cannot be used" in err and said in err
    row = {r["name"]: r for r in compare_rows([a, b], latency=False)}["b"]
    assert row["problem"].startswith(f"{b / 'eval.json'} cannot be used")


def test_paired_says_when_a_run_was_never_marked_for_copies(tmp_path):
    """Runs trained before train.py marked copies (2026-12-06): their copies were silently counted as copy-free."""
    from core.compare import paired, paired_text
    four = ["glioma", "meningioma", "pituitary", "notumor"]
    a = _with_eval(make_model_dir(tmp_path / "a", four), [("benchmark", "glioma/s.jpg", "glioma", "glioma")])
    b = _with_eval(make_model_dir(tmp_path / "b", four), [("benchmark", "glioma/s.jpg", "glioma", "glioma")])
    ev = json.loads((a / "eval.json").read_text())
    ev["predictions"][0]["copy_in_training"] = False
    (a / "eval.json").write_text(json.dumps(ev))
    res = paired(a, b)
    assert res["copies_unmarked"] == [str(b)]
    assert "b's test records were never marked for copies" in paired_text(res)
    assert "never marked" not in paired_text(paired(a, b, with_copies=True))


@pytest.mark.parametrize("args, said", [(["a", "a", "--paired"], "the same model twice"),
                                        (["a", "nope", "--paired"], "no such folder: "),
                                        (["a", "nope", "--no-latency"], "no such folder: "),
                                        (["a", "b", "--paired", "--md", "x.md"], "--md: not used by --paired"),
                                        (["a", "--with-copies", "--no-latency"], "--with-copies is for --paired only"),
                                        (["a", "--no-latency", "--repeats", "3", "--with-copies"],
                                         "--with-copies is for --paired only")])
def test_compare_usage_errors_say_what_is_wrong(tmp_path, capsys, args, said):
    four = ["glioma", "meningioma", "pituitary", "notumor"]
    for name in ("a", "b"):
        _with_eval(make_model_dir(tmp_path / name, four), [("benchmark", "glioma/s.jpg", "glioma", "glioma")])
    argv = [str(tmp_path / x) if x in ("a", "b", "nope") else x for x in args]
    assert cli_main(["compare", *argv]) == 2
    assert said in capsys.readouterr().err


def test_compare_passes_over_a_file_among_the_folders(tmp_path, capsys):
    """`compare weights/* --no-latency` takes in weights/DEFAULT, a file: passed over, not refused."""
    four = ["glioma", "meningioma", "pituitary", "notumor"]
    a = _with_eval(make_model_dir(tmp_path / "a", four), [("benchmark", "glioma/s.jpg", "glioma", "glioma")])
    (tmp_path / "DEFAULT").write_text("a\n")
    assert cli_main(["compare", str(a), str(tmp_path / "DEFAULT"), "--no-latency"]) == 0
    assert cli_main(["compare", str(a), "--no-latency", "--repeats", "3"]) == 2
    assert "--no-latency skips" in capsys.readouterr().err
