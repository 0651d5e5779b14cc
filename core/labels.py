"""One vocabulary of class names, and the mapping from the many folder names found in the wild.

A folder name maps to a *label*: either a fine class (glioma, meningioma, pituitary, notumor) or
the coarse class ``tumor`` ("some tumour, type not given", e.g. Br35H ``yes``).
"""
from __future__ import annotations

import re
import unicodedata

FINE_TUMOURS = ("glioma", "meningioma", "pituitary")
NO_TUMOUR = "notumor"
TUMOUR = "tumor"  # coarse label: any tumour class
CANONICAL = (*FINE_TUMOURS, NO_TUMOUR, TUMOUR)

# Keys are folder names lower-cased with everything but letters removed.
_ALIASES = {
    "glioma": "glioma", "gliomatumor": "glioma", "gliomatumour": "glioma", "brainglioma": "glioma",
    "meningioma": "meningioma", "meningiomatumor": "meningioma", "brainmenin": "meningioma",
    "menin": "meningioma", "brainmeningioma": "meningioma", "meningiomatumour": "meningioma",
    "pituitary": "pituitary", "pituitarytumor": "pituitary", "pituitarytumour": "pituitary",
    "brainpituitary": "pituitary",
    "notumor": "notumor", "notumour": "notumor", "no": "notumor", "normal": "notumor",
    "healthy": "notumor", "braintumornot": "notumor", "nontumor": "notumor",
    "nontumour": "notumor", "nottumor": "notumor", "nottumour": "notumor", "notumors": "notumor",
    "yes": "tumor", "tumor": "tumor", "tumour": "tumor", "braintumor": "tumor",
    "braintumour": "tumor",
    # Kaggle-style yes/no sets: 'Brain Tumor' beside 'No Brain Tumor' or 'Healthy', 'Positive'
    # beside 'Negative': left unmapped, evaluate skipped the whole normal class (specificity null)
    "nobraintumor": "notumor", "nobraintumour": "notumor", "brainhealthy": "notumor", "healthybrain": "notumor",
    "brainnormal": "notumor", "normalbrain": "notumor", "withouttumor": "notumor", "withouttumour": "notumor",
    "negative": "notumor", "positive": "tumor", "withtumor": "tumor", "withtumour": "tumor",
}
# Plural folder names ('Gliomas', 'Pituitary Tumors', 'No Tumours', 'Brain Tumors') are the same classes.
_ALIASES.update({k + "s": v for k, v in list(_ALIASES.items()) if k not in ("no", "yes", "menin")})


def normalise_label(folder_name: str) -> str:
    """Map a folder name such as ``glioma_tumor``, ``Brain_Menin`` or ``yes`` to the vocabulary.

    Unknown names are kept (accents dropped, lower-cased, runs of non-letters/digits as ``_``) so that any class-per-folder
    dataset still trains, just without the tumour/no-tumour semantics.
    """
    name = _plain(folder_name).lower()
    key = re.sub(r"[^a-z]", "", name)
    if key in _ALIASES:
        return _ALIASES[key]
    return re.sub(r"[\W_]+", "_", name).strip("_") or folder_name


def _plain(name: str) -> str:
    """Accents dropped and compatibility forms unfolded ('Gliôma' -> 'Glioma', 'Ⅱ' -> 'II'), so
    that NFC and NFD spellings of one folder name give one label."""
    return "".join(c for c in unicodedata.normalize("NFKD", name) if not unicodedata.combining(c))


def model_classes(labels: set[str] | list[str]) -> list[str]:
    """The classes a model trained on these labels predicts, in a stable order.

    The coarse ``tumor`` label becomes a class of its own when no fine tumour class is present
    (a yes/no dataset); otherwise it trains the fine classes through their sum. With a single
    tumour type beside it (LGG glioma + Br35H yes) that sum is the one type, and every tumour
    would be taught as that type: the model is then tumour vs no tumour, the type folded in.
    Without a no-tumour class beside it (``Brain_Glioma/ Brain_Menin/ Brain Tumor/``) "some tumour"
    rules nothing out, and its images would teach nothing: it is then a class of its own, the
    tumours that are none of the named types.
    """
    labels = set(labels)
    fine = [c for c in FINE_TUMOURS if c in labels]
    if TUMOUR in labels and fine and NO_TUMOUR not in labels:
        return fine + sorted(labels - set(CANONICAL)) + [TUMOUR]
    if TUMOUR in labels and len(fine) == 1:
        labels, fine = labels - set(fine), []
    other = sorted(labels - set(CANONICAL))
    classes = fine + other
    if TUMOUR in labels and not fine:
        classes.append(TUMOUR)
    if NO_TUMOUR in labels:
        classes.append(NO_TUMOUR)
    return classes


def folds_types(classes: list[str]) -> bool:
    """A tumour / no-tumour model (a 'tumor' class and no typed one): a typed tumour is scored as
    its 'tumor'. A model with 'tumor' beside typed classes (glioma, meningioma, another tumour)
    scores each type as itself."""
    return TUMOUR in classes and not any(c in FINE_TUMOURS for c in classes)


def is_tumour_label(label: str) -> bool | None:
    """True for a tumour class (typed or coarse), False for 'no tumour', None for any other label."""
    if label in FINE_TUMOURS or label == TUMOUR:
        return True
    if label == NO_TUMOUR:
        return False
    return None


def tumour_classes(classes: list[str]) -> list[str]:
    """Classes that count as 'a tumour is present'."""
    return [c for c in classes if is_tumour_label(c)]


def has_tumour_decision(classes: list[str]) -> bool:
    """A model with tumour classes and 'no tumour': its calls are decided by an operating point."""
    return bool(tumour_classes(classes)) and NO_TUMOUR in classes


_CLASS_NAMES = {NO_TUMOUR: "No tumour", TUMOUR: "Tumour", "glioma": "Glioma",
                "meningioma": "Meningioma", "pituitary": "Pituitary tumour"}


def class_label(c: str) -> str:
    """How a class is shown to a reader ('notumor' -> 'No tumour'): headings, tables, charts of
    the app and the PDF. The CSV, JSON and CLI keep the model's class names, which other
    programs read."""
    return _CLASS_NAMES.get(c, c.replace("_", " ").capitalize())


def call_label(pred: str, type_uncertain: bool = False) -> str:
    """A call as a reader sees it in a heading or a table: a tumour whose type is in doubt is a
    tumour, not its likeliest type (the batch table read 'Meningioma' where the page said 'Tumour,
    type uncertain', for a meningioma probability of 0.114)."""
    return "Tumour, type uncertain" if type_uncertain else class_label(pred)


def class_word(c: str) -> str:
    """A class inside a sentence ('notumor' -> 'no tumour', 'pituitary' -> 'pituitary tumour')."""
    if c not in _CLASS_NAMES:   # a class of one's own data keeps its name ('stroke', 'Brain_Mets' -> 'Brain Mets')
        return c.replace("_", " ")
    return _CLASS_NAMES[c][0].lower() + _CLASS_NAMES[c][1:]


# The shared sources' short keys (cards, eval.json, the CLI) as a reader knows the collections
_SOURCE_NAMES = {"benchmark": "Benchmark", "br35h": "Br35H", "lgg": "LGG FLAIR", "brisc": "BRISC"}


def source_label(key: str) -> str:
    """How a source is shown to a reader ('lgg' -> 'LGG FLAIR'); another source keeps its name."""
    return _SOURCE_NAMES.get(key, key)


def or_list(words: list[str]) -> str:
    """'a, b or c' (one word alone)."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def cannot_rule_out(classes: list[str]) -> str | None:
    """For a model with tumour classes but no 'no tumour' one (glioma/meningioma/pituitary, or a
    'stroke' class beside them), the sentence that says what it cannot do: it calls a healthy scan
    one of its classes. None for a model that can call a scan tumour-free, or one with no tumour class."""
    if NO_TUMOUR in classes or not tumour_classes(classes):
        return None
    named = or_list([("a tumour of no named type" if c == TUMOUR else class_word(c)) for c in classes])
    return (f"This model has no 'no tumour' class, so it calls every scan {named}, a healthy one too: "
            "it cannot call a scan tumour-free.")


def is_tumour_call(pred: str, classes: list[str]) -> bool:
    """Whether the class ``pred`` of a model with ``classes`` says 'a tumour is present'."""
    return has_tumour_decision(classes) and pred in tumour_classes(classes)


def label_targets(label: str, classes: list[str]) -> list[int]:
    """Indices of the model classes that a label allows (several for a coarse label)."""
    if label in classes:
        return [classes.index(label)]
    if label in FINE_TUMOURS and TUMOUR in classes:  # a typed tumour for a tumour/no-tumour model
        return [classes.index(TUMOUR)]
    if label == TUMOUR:
        idx = [classes.index(c) for c in tumour_classes(classes)]
        if idx:
            return idx
    raise ValueError(f"label {label!r} cannot be expressed with classes {classes}")
