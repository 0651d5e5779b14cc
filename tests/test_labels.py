"""Folder-name vocabulary: the aliases found in public datasets, model classes, coarse targets."""
import pytest

from core.labels import (CANONICAL, NO_TUMOUR, TUMOUR, label_targets, model_classes,
                         normalise_label, tumour_classes)


@pytest.mark.parametrize("folder, label", [
    ("glioma", "glioma"), ("glioma_tumor", "glioma"), ("Brain_Glioma", "glioma"),
    ("GLIOMA-TUMOUR", "glioma"),
    ("meningioma", "meningioma"), ("meningioma_tumor", "meningioma"),
    ("Brain_Menin", "meningioma"),
    ("pituitary", "pituitary"), ("pituitary_tumor", "pituitary"),
    ("notumor", "notumor"), ("no_tumor", "notumor"), ("no", "notumor"), ("No", "notumor"),
    ("yes", "tumor"), ("Yes", "tumor"), ("tumor", "tumor"),
    # plurals (session 37 review: they stayed unknown classes, the model without tumour semantics)
    ("Gliomas", "glioma"), ("Meningiomas", "meningioma"), ("Pituitary Tumors", "pituitary"),
    ("glioma tumours", "glioma"), ("Brain Tumors", "tumor"), ("No Tumors", "notumor"),
])
def test_known_folder_names_map_to_the_vocabulary(folder, label):
    assert normalise_label(folder) == label


@pytest.mark.parametrize("folder, kept", [
    ("Astrocytoma", "astrocytoma"), ("Schwannoma T2", "schwannoma_t2"), ("class_7", "class_7"),
    ("nos", "nos"), ("Menins", "menins"),
])
def test_unknown_folder_names_are_kept(folder, kept):
    out = normalise_label(folder)
    assert out == kept
    assert out not in CANONICAL


def test_model_classes_fine_order_and_notumor_last():
    assert model_classes({"notumor", "pituitary", "glioma", "meningioma"}) == \
        ["glioma", "meningioma", "pituitary", "notumor"]


def test_coarse_tumor_is_absorbed_by_fine_classes():
    # Benchmark (fine) + Br35H (yes/no): 'tumor' trains the fine classes through their sum.
    assert model_classes({"glioma", "meningioma", "pituitary", "notumor", "tumor"}) == \
        ["glioma", "meningioma", "pituitary", "notumor"]


def test_yes_no_dataset_is_binary():
    assert model_classes(["tumor", "notumor", "tumor"]) == ["tumor", "notumor"]


def test_unknown_labels_become_classes_of_their_own():
    assert model_classes({"glioma", "zeta", "alpha", "notumor"}) == ["glioma", "alpha", "zeta", "notumor"]


def test_label_targets_fine_and_coarse():
    classes = ["glioma", "meningioma", "pituitary", "notumor"]
    assert label_targets("meningioma", classes) == [1]
    assert label_targets(NO_TUMOUR, classes) == [3]
    assert label_targets(TUMOUR, classes) == [0, 1, 2]
    assert label_targets(TUMOUR, ["tumor", "notumor"]) == [0]
    assert tumour_classes(classes) == ["glioma", "meningioma", "pituitary"]


def test_label_targets_rejects_what_the_model_cannot_express():
    assert label_targets("glioma", ["tumor", "notumor"]) == [0]  # a typed tumour is a tumour
    with pytest.raises(ValueError):
        label_targets("glioma", ["notumor", "other"])
    with pytest.raises(ValueError):
        label_targets(TUMOUR, ["notumor", "other"])


def test_one_tumour_type_beside_coarse_tumours_makes_a_tumour_vs_no_tumour_model():
    """LGG glioma + Br35H yes: the coarse scans would all be taught as glioma."""
    assert model_classes({"glioma", "tumor", "notumor"}) == ["tumor", "notumor"]
    assert model_classes({"glioma", "meningioma", "tumor", "notumor"}) == ["glioma", "meningioma", "notumor"]
    assert model_classes({"glioma", "notumor"}) == ["glioma", "notumor"]
    # no tumour-free class: "some tumour" rules nothing out, so Brain_Glioma/ Brain_Menin/ Brain Tumor/
    # is three classes (the coarse sum over every class taught nothing; session 37 review)
    assert model_classes({"glioma", "meningioma", "tumor"}) == ["glioma", "meningioma", "tumor"]
    assert model_classes({"glioma", "tumor"}) == ["glioma", "tumor"]
    assert label_targets("tumor", ["glioma", "meningioma", "tumor"]) == [2]


@pytest.mark.parametrize("name, label", [("meningioma_tumour", "meningioma"), ("non-tumour", "notumor"),
                                         ("Non Tumor", "notumor"), ("Not Tumor", "notumor"), ("not_tumour", "notumor")])
def test_more_folder_spellings(name, label):
    assert normalise_label(name) == label


def test_accents_and_compatibility_forms_fold():
    """'Gliôma' was 'gli_ma'; NFC and NFD 'Méningiome' two labels; 'grade_Ⅰ' and 'grade_Ⅱ' one."""
    assert normalise_label("Gliôma") == "glioma"
    assert normalise_label("M\u00e9ningiome") == normalise_label("Me\u0301ningiome") == "meningiome"
    assert normalise_label("grade_Ⅰ") != normalise_label("grade_Ⅱ")
    assert normalise_label("肿瘤_A") != normalise_label("正常_A")


def test_tumour_decision_and_tumour_call_need_both_sides():
    from core.labels import has_tumour_decision, is_tumour_call
    four = ["glioma", "meningioma", "pituitary", "notumor"]
    assert has_tumour_decision(four) and has_tumour_decision(["tumor", "notumor"])
    assert not has_tumour_decision(["glioma", "meningioma"])   # no 'no tumour' to decide against
    assert not has_tumour_decision(["cat", "notumor"])
    assert is_tumour_call("glioma", four) and is_tumour_call("tumor", ["tumor", "notumor"])
    assert not is_tumour_call("notumor", four)
    assert not is_tumour_call("cat", ["glioma", "cat", "notumor"])
    assert not is_tumour_call("glioma", ["glioma", "meningioma"])   # a type, not a decision


def test_a_model_with_another_tumour_class_scores_each_type_as_itself():
    """glioma / meningioma / another tumour (no tumour-free class): typed labels were folded to
    'tumor' as for a tumour / no-tumour model, and a perfect model scored 33 % (session 37 review)."""
    from types import SimpleNamespace
    import numpy as np
    from core.evaluation import evaluate_records, prediction_records, score_labelled
    from core.labels import folds_types
    labels = ["glioma"] * 3 + ["meningioma"] * 3 + ["tumor"] * 3
    classes = model_classes(set(labels))
    assert not folds_types(classes) and folds_types(["tumor", "notumor"])
    perfect = np.array([[1.0 if c == lab else 0.0 for c in classes] for lab in labels])
    samples = [SimpleNamespace(rel=f"{lab}/{i}.jpg", source="d", label=lab) for i, lab in enumerate(labels)]
    records = prediction_records(samples, perfect, classes, None)
    assert [r["label"] for r in records] == labels
    assert evaluate_records(records, classes, None)["accuracy"] == 1.0
    assert score_labelled(records, classes, None, [])["accuracy"] == 1.0


def test_classes_are_named_for_a_reader_and_the_model_names_kept_elsewhere():
    from core.labels import class_label, class_word
    assert [class_label(c) for c in ("notumor", "tumor", "glioma", "pituitary")] == \
        ["No tumour", "Tumour", "Glioma", "Pituitary tumour"]
    assert [class_word(c) for c in ("notumor", "tumor", "glioma", "pituitary")] == \
        ["no tumour", "tumour", "glioma", "pituitary tumour"]
    assert class_label("brain_mets") == "Brain mets" and class_word("stroke") == "stroke"
