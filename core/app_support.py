"""Logic behind the Streamlit pages: model choice, cached predictions, uploads, evaluation at the
session's operating point. Pages only lay out what these functions return.

Uploaded files stay in memory (bytes in the session); nothing here writes them to disk.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from collections import Counter, OrderedDict
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import streamlit as st

from .evaluation import (SEEN_FILE, NothingToScore, OtherClasses, call_is_right, evaluate_records, prediction_record,
                         read_eval, score_labelled, trained_file_names, without_copies)
from . import inference
from .data import source_of
from .inference import (BEST_SLICE, PIXEL_OOD_REASON, ROOT, Prediction, Predictor, card_threshold,
                        default_weights, end_slice_note, finite_number, load_card, hot_slices, listed_slices,
                        checked_hot_slices, most_tumour_like_slice, resolve_weights, shipped_default, shipped_models, shown_slice,
                        slice_scores, training_sources, SEEN_TEXT, UNCHECKED_TEXT)
from .labels import (TUMOUR, NO_TUMOUR, cannot_rule_out, class_label, class_word, is_tumour_label, normalise_label, or_list,
                     source_label, tumour_classes)
from .archive import unpack_allowance
from .masks import input_mask, mask_contradiction, pair_masks  # noqa: F401 (the pages' names for them)
from .metrics import apart, classification_metrics, decide, other_classes
from .preprocess import prepare
from .referral import ReferralRule, at_threshold, call_note  # noqa: F401 (call_note: the pages' name for it)
# the upload batch names files, and traces a failed one, as the report does
from . import report
from .report import failed_file_sha256, saliency_caveat, saliency_scope, shown_path, uncalled_words, unique_names
from .reader import MAX_SLICES  # noqa: F401 (the Diagnose page's name for it: its best-slice toggle)
from .reader import (STACK_SUFFIXES, VOLUME_SUFFIXES, ScanError, ScanImage, file_fault_error, is_file_fault,
                     read_scan, read_volume_slices, read_zip, sniff, zip_to_labelled)

SAMPLES_DIR = ROOT / "assets" / "samples"
# What to upload. Measured with bench/screen_captures.py (docs/generalisation.md, "Screen captures"):
# text around a slice costs little; a reader's marks on it, panels and photos of a screen cost more
# (marks in colour and panels are refused: core.inference.marks_reason, panels_reason).
UPLOAD_HELP = ("Upload the scan as the scanner or viewer exports it: DICOM, NIfTI (a volume is read slice "
               "by slice), a zip, or an image of one slice. A viewer's text around the slice costs little. "
               "Avoid screen captures with a reader's marks drawn on the slice (lines, circles, arrows, "
               "labels): marks in colour are refused, but on test scans marked in white the model called "
               "the wrong type, or a tumour in a healthy scan, far more often, often without a warning. "
               "Several slices in one image (a viewer's layout) are refused: upload them one by one. A photo "
               "of a screen misses more tumours.")


# ----------------------------------------------------------------------------- models
def model_dir_problem(d: str | Path) -> str | None:
    """Why ``d`` cannot serve a model, in one sentence (a hand-broken card says what is wrong with
    it); None when its weights sit beside a card that can serve them."""
    d = Path(d)
    if not ((d / "card.json").is_file() and (d / "model.safetensors").is_file()):
        return f"{d} is not a model folder (card.json and model.safetensors)"
    try:
        card = load_card(d)
    except (OSError, ValueError) as e:
        return str(e)
    return inference.gate_file_problem(d, card)  # the Predictor refuses it too


def is_model_dir(d: Path) -> bool:
    """Weights beside a card that can serve them (a hand-broken card is left out of the list)."""
    return model_dir_problem(d) is None


def model_choices() -> list[Path]:
    """Every usable weights dir: the default ($BT_WEIGHTS or weights/DEFAULT) first."""
    out: list[Path] = []
    # then weights/DEFAULT: a mistyped $BT_WEIGHTS falls back to it, not to the first folder
    for default in (default_weights, shipped_default):
        try:
            out.append(default())
        except (OSError, ValueError):  # no weights/DEFAULT file, or not text: `default_file_problem` says so
            pass
    out += shipped_models()
    seen, uniq = set(), []
    for d in out:
        key = Path(d).resolve()
        if key not in seen and is_model_dir(key):
            seen.add(key)
            uniq.append(Path(d))
    return uniq


def env_weights_problem() -> str | None:
    """A sentence when $BT_WEIGHTS names no usable model folder (a typo must not pass silently)."""
    env = os.environ.get("BT_WEIGHTS")
    if not env or (problem := model_dir_problem(resolve_weights(env))) is None:
        return None
    return f"BT_WEIGHTS={env} cannot be used: {problem}; showing the default model."


def default_file_problem() -> str | None:
    """A sentence when weights/DEFAULT is missing or names no usable model folder while it decides
    (no usable $BT_WEIGHTS): the first folder in the list is shown instead, which may be a narrow
    model without a gate, and that must not pass silently."""
    env = os.environ.get("BT_WEIGHTS")
    if env and is_model_dir(resolve_weights(env)):
        return None  # $BT_WEIGHTS decides; the file is not read
    f = inference.WEIGHTS_ROOT / "DEFAULT"
    try:
        d = inference.shipped_default()
    except (OSError, ValueError):
        return f"{f} is missing or unreadable, so the first model folder in the list is shown instead."
    if is_model_dir(d):
        return None
    return (f"{f} names '{d.relative_to(inference.WEIGHTS_ROOT)}', which is not a usable model folder in "
            f"{inference.WEIGHTS_ROOT}, so the first model folder in the list is shown instead.")


def probabilities_text(probs: dict[str, float]) -> str:
    """The probability bars' figures in words, for whoever cannot read the chart."""
    return "Calibrated probabilities: " + ", ".join(f"{class_label(c)} {p:.1%}" for c, p in probs.items()) + "."


def model_label(weights_dir: str | Path) -> str:
    """The model chooser's name for a weights dir: its card's name, then its folder when that
    differs, a mark on the shipped default (weights/DEFAULT: among a dozen names, the one to start
    from) and on the $BT_WEIGHTS folder (a copy may carry a shipped model's name)."""
    d = Path(weights_dir)
    try:
        name = load_card(d).get("name", d.name)
    except (OSError, ValueError):  # rewritten since the list was made: its folder will do
        name = d.name
    notes = [d.name] if d.name != name else []
    try:
        if inference.shipped_default().resolve() == d.resolve():
            notes.append("default")
    except (OSError, ValueError):   # no weights/DEFAULT, or an unreadable one (`default_problem` says so)
        pass
    env = os.environ.get("BT_WEIGHTS")
    if env and resolve_weights(env).resolve() == d.resolve():
        notes.append("BT_WEIGHTS")
    return f"{name} ({', '.join(notes)})" if notes else name


def weights_stamp(weights_dir: str | Path) -> tuple:
    """Cache key for a loaded model: its folder and the mtime and size of each file a Predictor
    reads (weights, card, gate, the list of files it trained on), so that fit-ood's new gate or
    card, or seen-files' list, is loaded, not missed."""
    d = Path(weights_dir).resolve()
    stamps = []
    for name in ("model.safetensors", "card.json", "ood.safetensors", SEEN_FILE):
        f = d / name
        info = f.stat() if f.is_file() else None
        stamps.append((info.st_mtime_ns, info.st_size) if info else None)
    return str(d), tuple(stamps)


def has_gate_file(weights_dir: str | Path) -> bool:
    """Whether a weights dir ships an out-of-distribution gate that checks pixels (what `Predictor`
    loads; a gate of the colour rule alone checks none)."""
    f = Path(weights_dir) / "ood.safetensors"
    if not f.is_file():
        return False
    try:
        return bool((load_card(weights_dir).get("ood") or {}).get("components"))
    except (OSError, ValueError):
        return False


def has_ood_gate(predictor: Predictor) -> bool:
    """Whether the model screens out images unlike its training data before answering (more than
    the colour rule every model has)."""
    gate = getattr(predictor, "gate", None)
    return gate is not None and bool(gate.components)


def no_gate_warning(predictor: Predictor, choices: list[Path] | None = None) -> str | None:
    """The standing warning for a model without an out-of-distribution gate (None with one),
    naming the first model of ``choices`` (the default comes first) that has a gate."""
    if has_ood_gate(predictor):
        return None
    text = ("**No out-of-distribution gate**: apart from refusing colour images, this model "
            "answers for any image, even one that is not a brain MRI.")
    choices = model_choices() if choices is None else choices
    here = Path(predictor.dir).resolve() if getattr(predictor, "dir", None) else None
    gated = next((d for d in choices if Path(d).resolve() != here and has_gate_file(d)), None)
    if gated is None:
        return text
    return text + f" Prefer {load_card(gated).get('name', Path(gated).name)}, which has one."


def no_rule_out_warning(classes: list[str]) -> str | None:
    """The standing warning for a model whose every class is a tumour type (None otherwise): it
    calls a healthy scan one of them, and nothing on the page said so."""
    return f"**Cannot rule a tumour out**: {text}" if (text := cannot_rule_out(classes)) else None


def one_source_warning(predictor: Predictor, choices: list[Path] | None = None) -> str | None:
    """The standing warning for a model that learnt from one collection only (None otherwise),
    naming the model of ``choices`` that learnt from the most."""
    sources = training_sources(predictor.card)
    if len(sources) != 1:
        return None
    text = (f"**Trained on one collection only ({source_label(sources[0])})**: it learnt that collection's look and was "
            "never tested on scans from other hospitals."
            + (" Such models call most tumour scans of other collections 'no tumour', without a flag "
               "(docs/generalisation.md)." if NO_TUMOUR in predictor.card.get("classes", [NO_TUMOUR]) else ""))
    cards = [(Path(d), load_card(d)) for d in (model_choices() if choices is None else choices)]
    best = max(cards, key=lambda dc: len(training_sources(dc[1])), default=None)
    if best is None or len(training_sources(best[1])) <= 1:
        return text
    return text + f" For such scans prefer {best[1].get('name', best[0].name)}."


def home_figures(predictor: Predictor) -> tuple[dict[str, str], str]:
    """The Home page's test figures ({label: value}) and what they are: at the card's operating
    point, over the test scans without a copy in training, as the Evaluation page shows them by
    default (Home showed the card's figures over every test image: 96.7 % beside an Evaluation
    page's 94.7 % for one model, and no specificity). The card's own figures when eval.json has
    no records."""
    ev = load_eval(predictor.dir) or {}
    kept, copies = without_copies(ev.get("predictions") or [])
    if not kept:
        return _card_figures(predictor, ev), ("At the card's operating point, on every test image (the card's "
                                               "figures).") + (f" {p}" if (p := eval_problem(predictor.dir)) else "")
    m = evaluation_at(kept, predictor.classes, predictor.threshold, None, predictor.referral)
    def pct(key: str) -> str:
        return f"{m[key]:.1%}" if m.get(key) is not None else "n/a"
    figures = {"Test scans": _count(m.get("n", len(kept))), "Accuracy": pct("accuracy"),
               "Sensitivity": pct("sensitivity"), "Specificity": pct("specificity"),
               "Tumours missed": f"{m['tumour_missed']:,} of {m['n_tumour']:,}" if m.get("n_tumour") else "n/a"}
    ranked = missed_by_source(predictor, kept, predictor.threshold) if predictor.is_tumour_model else []
    weakest = ""
    if len(ranked) > 1:   # the pooled sensitivity hides the collection read worst
        src, (n, missed) = ranked[0]
        # the source in the label: "94.2 % (LGG FLAIR)" as a value was cut to "94.2% (…" on a tablet
        figures[f"{source_label(src)} sensitivity"] = f"{1 - missed / n:.1%}"
        weakest = f" {source_label(src)} is the source whose test tumours it misses most."
    note = "At the card's operating point, on the held-out test scans"
    if copies:
        all_m = predictor.card.get("metrics") or {}
        note += (f" with no copy in training (as the Evaluation page shows them; {copies} more have one"
                 + (f", and with them the card reads accuracy {all_m['accuracy']:.1%}"
                    if finite_number(all_m.get("accuracy")) else "") + ")")
    return figures, note + _counted_words(m, kept, predictor) + "." + weakest


def _counted_words(m: dict, kept: list[dict], predictor: Predictor) -> str:
    """What Home's 'Accuracy' beside 'Test scans' is over, and how many missed tumours a flag still
    sent for review (a clinician's check of the figures); each said only where it holds."""
    from .dashboard import flag_words, gate_scored
    text = ""
    untyped = sum(r.get("label") == TUMOUR for r in kept)   # Br35H's: tumours of no known type
    if m.get("n_fine") and m.get("sensitivity") is not None and untyped and untyped == m.get("n", 0) - m["n_fine"]:
        text += (f". Accuracy is over the {m['n_fine']:,} scans labelled with a class of the model; the other "
                 f"{untyped:,} (tumours of a collection that gives no type) count in sensitivity alone")
    missed, silent = m.get("tumour_missed"), m.get("silent_misses")
    referral = getattr(predictor, "referral", None)
    if missed and silent is not None and (flags := flag_words(gate_scored(kept), bool(referral and referral.refers))):
        k = missed - silent
        text += (f". None of the {missed} tumours missed carried an {flags}" if k == 0 else
                 f". Of the {missed} tumours missed, {k} {'was' if k == 1 else 'were'} still sent for review "
                 f"(an {flags})")
    return text


def threshold_moved(threshold: float | None, card_point: float | None) -> bool:
    """Whether the sidebar's operating point differs from the card's: by more than the slider's
    step can leave from rounding."""
    return threshold is not None and card_point is not None and abs(float(threshold) - card_point) > 5e-4


def reset_threshold(card_point: float) -> None:
    """The sidebar's reset: the card's point, on a fresh slider (a new key: Streamlit keeps a
    widget's own value otherwise)."""
    st.session_state.update(threshold=card_point, _threshold_rev=st.session_state.get("_threshold_rev", 0) + 1)


def hand_threshold_note(predictor: Predictor, threshold: float | None) -> str | None:
    """Home's figures are at the card's operating point; when the sidebar's differs, say so and
    where the figures at it are (a clinician moved it to 1.000 and Home still read 98.5 %)."""
    if not threshold_moved(threshold, predictor.threshold):
        return None
    cost = threshold_cost(predictor, threshold)
    return (f"The sidebar's operating point is set by hand to {float(threshold):.3f}; the figures above are at "
            f"the card's {predictor.threshold:.3f}. The Diagnose and Evaluation pages use yours"
            + (f". {cost}" if cost else ": the Evaluation page shows what it costs."))


def threshold_cost(predictor: Predictor, threshold: float | None) -> str | None:
    """What a hand-set operating point costs on the test split (eval.json's records without a copy
    in training, as the Evaluation page counts them), beside the card's point: the sidebar and a
    report made at it gave only the card's figures, and a moved point read as a validated one."""
    if not threshold_moved(threshold, predictor.threshold) or not predictor.is_tumour_model:
        return None
    stored = load_eval(predictor.dir)
    kept = without_copies(stored["predictions"])[0] if stored else []
    if not kept:
        return None
    # the page's counts (`classification_metrics`, as `evaluation_at` reaches them) without its curves
    # and intervals: those took 190 ms a call, on every rerun of every page while the point is moved
    probs = np.array([[r["probs"][c] for c in predictor.classes] for r in kept])
    here, card = (classification_metrics(probs, [r["label"] for r in kept], predictor.classes, t)
                  for t in (float(threshold), predictor.threshold))
    # a side the split has no scan of is left out: "0 of 0 flagged" read as a clean record
    parts = [(f"{here['tumour_missed']:,} of {here['n_tumour']:,} tumours missed", str(card["tumour_missed"]))
             if here.get("n_tumour") else None,
             (f"{here['normal_flagged']:,} of {here['n_normal']:,} tumour-free scans called a tumour",
              str(card["normal_flagged"])) if here.get("n_normal") else None]
    parts = [p for p in parts if p]
    if not parts:
        return None
    return (f"On the test split (scans without a copy in training) at {float(threshold):.3f}: "
            f"{' and '.join(a for a, _ in parts)}; at the card's {predictor.threshold:.3f}: "
            f"{' and '.join(b for _, b in parts)}.")


def hand_set_warning(predictor: Predictor, threshold: float) -> str:
    """The sidebar's warning on an operating point set by hand, with what it costs."""
    cost = threshold_cost(predictor, threshold)
    return (f"Set by hand to {float(threshold):.3f} for this model, not the card's {predictor.threshold:.3f}."
            + (f" {cost}" if cost else ""))


def _count(v) -> str:
    """A count as the pages write it ('1,638'); a card's hand-edited value as it stands."""
    return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)


def _card_figures(predictor: Predictor, ev: dict) -> dict[str, str]:
    m = predictor.card.get("metrics") or {}
    missed = m.get("tumour_missed")
    return {"Test scans": _count(m.get("n", "n/a")),
            "Accuracy": f"{m['accuracy']:.1%}" if finite_number(m.get("accuracy")) else "n/a",
            "Macro F1": f"{m['macro_f1']:.3f}" if finite_number(m.get("macro_f1")) else "n/a",
            "Tumours missed": "n/a" if missed is None else
            f"{_count(missed)} of {ev['n_tumour']:,}" if ev.get("n_tumour") else _count(missed)}


def operating_point_text(card: dict, default: float) -> str:
    """The card's operating point with what it reached on validation, not only what it aimed at."""
    op = card.get("operating_point") or {}
    text = f"Card default {default:.3f}"
    target, sens, spec = op.get("target_sensitivity"), op.get("val_sensitivity"), op.get("val_specificity")
    if target is None:
        return text + "."
    # validation figures, all sources pooled: read beside the test figures, they were taken for them
    pooled = " (all sources pooled, not the test set)" if len(training_sources(card)) > 1 else " (not the test set)"
    text += f", aiming at sensitivity {target:.0%} on validation{pooled}"
    if sens is None:
        return text + "."
    from .engine import CAP_THRESHOLD, floor_unmet
    floor = op.get("min_specificity")
    short = floor_unmet({**op, "threshold": default})
    capped = short is not None
    # the numbers a sentence compares are written apart (96.96 % against a 97.00 % floor)
    spec_s, floor_s = apart(spec, floor, 1, True) if capped else (f"{spec:.1%}" if spec is not None else "", "")
    text += f"; it reached {sens:.1%} there" + (f" at specificity {spec_s}" if spec is not None else "")
    if capped:
        # pick_threshold never goes above the cap: there, the floor is still not met
        below = ("some source's validation specificity stays below it" if short[0] == "all sources pooled" else
                 f"the validation specificity of {source_label(short[0])} is {apart(short[1], floor, 1, True)[0]}")
        text += (f" (the specificity floor of {floor_s} in every source is not met: even at the threshold's "
                 f"{CAP_THRESHOLD} cap {below})")
    elif sens < target and (others := other_classes(card.get("classes", []))):
        # no threshold makes a tumour called 'stroke' a tumour call (`metrics.decide`)
        text += (f" (a tumour called {or_list(others)} is missed at any threshold"
                 + (f"; the threshold may also have been raised to keep healthy scans at {floor:.0%} "
                    "specificity or more in each source validated on 20 or more of them)" if floor else ")"))
    elif sens < target and floor:
        text += (f" (short of it: the threshold was raised to keep healthy scans at {floor:.0%} specificity or "
                 "more in each source validated on 20 or more of them)")
    return text + "."


def model_identity(predictor: Predictor) -> tuple:
    """What a stored or cached result depends on: the weights dir, its weights, card and gate."""
    return predictor.identity


def class_wording(classes: list[str]) -> str:
    """The classes in a sentence: 'a glioma, meningioma or pituitary tumour, or no tumour'."""
    types = [c for c in tumour_classes(classes) if c != TUMOUR]
    parts = [f"a {or_list(types)} tumour"] if types else ["a tumour"] if TUMOUR in classes else []
    if types and TUMOUR in classes:   # Brain_Glioma/ Brain_Menin/ Brain Tumor/: the named types, or another
        parts.append("another tumour")
    parts += [c.replace("_", " ") for c in classes if c not in (*tumour_classes(classes), NO_TUMOUR)]
    if NO_TUMOUR not in classes:
        return or_list(parts) if parts else "one of its classes"
    return f"{or_list(parts)}, or no tumour" if parts else "no tumour"


# ----------------------------------------------------------------------------- operating point
def records_at(records: list[dict], classes: list[str], threshold: float | None,
               rule: ReferralRule | None = None) -> list[dict]:
    """Evaluation records decided anew at ``threshold`` (copies): ``pred`` and its
    ``confidence`` (the called class's probability), and with the card's referral ``rule`` both
    flags, as `core.referral.at_threshold` does for one served prediction."""
    if not records:
        return []
    p = np.array([[r["probs"][c] for c in classes] for r in records])
    k = decide(p, classes, threshold)
    out = [{**r, "pred": classes[i], "confidence": float(p[j, i])} for j, (r, i) in enumerate(zip(records, k))]
    if rule is not None:
        for r, u, t in zip(out, *rule.flags(*_rule_inputs(records, rule, p, k, threshold), threshold)):
            r["uncertain"], r["type_uncertain"] = bool(u), bool(t)
    return out


def _rule_inputs(records: list[dict], rule: ReferralRule, probs: np.ndarray, pred: np.ndarray,
                 threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, calls) the referral ``rule`` judges: the model's own (``model_probs``) for
    records folded to tumour vs no tumour, as the served prediction's flags were judged (the rule's
    band, type share or top-class level mean nothing on the two folded probabilities)."""
    if not all("model_probs" in r for r in records):
        return probs, pred
    own = list(rule.classes)
    mp = np.array([[r["model_probs"][c] for c in own] for r in records])
    return mp, decide(mp, own, threshold)


def of_source(records: list[dict], source: str | None) -> list[dict]:
    """The records of one source, or all of them for ``None``."""
    return records if source is None else [r for r in records if source_of(r) == source]


def evaluation_view(records: list[dict], classes: list[str], threshold: float | None,
                    source: str | None = None, rule: ReferralRule | None = None) -> tuple[dict, list[dict]]:
    """(All metrics recomputed from the predictions at ``threshold``, the records as called there),
    for one source or all: the Evaluation page draws its curves and gallery from the same records."""
    shown = records_at(of_source(records, source), classes, threshold, rule)
    return evaluate_records(shown, classes, threshold), shown


def evaluation_at(records: list[dict], classes: list[str], threshold: float | None,
                  source: str | None = None, rule: ReferralRule | None = None) -> dict:
    """All metrics recomputed from the predictions at ``threshold``, for one source or all."""
    return evaluation_view(records, classes, threshold, source, rule)[0]


def accepted_note(ev: dict, records: list[dict], classes: list[str], threshold: float | None,
                  source: str | None = None, rule: ReferralRule | None = None) -> str | None:
    """What the page's figures (``ev``, `evaluation_at` of these arguments) are over the scans the
    gate accepts, when it refuses some: the figures count a refused scan's raw output (a cat photo
    in a 'no tumour' folder scored as a right 'no tumour'), and the app gives such a scan no call at
    all. None when none is refused."""
    if not ev.get("flagged_ood"):
        return None
    accepted = [r for r in of_source(records, source) if r.get("in_distribution", True)]
    if not accepted:
        return (f"All {ev['n']:,} scans here are refused by the out-of-distribution check: the figures above "
                "count only the model's raw output, and the app gives none of them a call.")
    kept = evaluation_at(accepted, classes, threshold, None, rule)
    parts = [f"accuracy {kept['accuracy']:.1%}" if kept.get("accuracy") is not None else None,
             f"tumours missed {kept['tumour_missed']:,} of {kept['n_tumour']:,}" if kept.get("n_tumour") else None,
             f"specificity {kept['specificity']:.1%}" if kept.get("specificity") is not None else None]
    said = ", ".join(p for p in parts if p)
    n = ev["flagged_ood"]
    return (f"{n:,} of these {ev['n']:,} scans {'is' if n == 1 else 'are'} refused by the out-of-distribution check and "
            "counted above by the model's raw output (the app gives them no call; the false-negative tab "
            "names them). Over the "
            f"{kept['n']:,} it accepts" + (f": {said}." if said else ", no figure can be given."))


def missed_by_source(predictor: Predictor, records: list[dict], threshold: float | None
                     ) -> list[tuple[str, tuple[int, int]]]:
    """[(source, (test tumours, called 'no tumour'))], worst rate first, over the records without a
    copy in training at ``threshold``: a reader skims the first figure, and the pooled sensitivity
    hides a collection the model reads worse."""
    per: dict[str, list[int]] = {}
    for r in records_at(without_copies(records)[0], predictor.classes, threshold):
        if is_tumour_label(r["label"]):
            n_missed = per.setdefault(source_of(r), [0, 0])
            n_missed[0] += 1
            n_missed[1] += not is_tumour_label(r["pred"])
    return sorted(((src, (n, m)) for src, (n, m) in per.items()), key=lambda kv: -kv[1][1] / kv[1][0])


def miss_note(predictor: Predictor, threshold: float | None) -> str | None:
    """For a 'no tumour' call: how many of its test tumours this model called 'no tumour' at this
    operating point, per source (eval.json records without copies in training, as the Evaluation
    page shows them). A clear call is not a clear scan, and the rate differs between collections."""
    stored = load_eval(predictor.dir)
    if not stored or not predictor.is_tumour_model:
        return None
    ranked = missed_by_source(predictor, stored["predictions"], threshold)
    if not ranked:
        return None
    parts = ", ".join(f"{source_label(src)} {m:,} of {n:,} ({m / n:.1%})" for src, (n, m) in ranked)
    if not any(m for _, (_, m) in ranked):
        return ("A call other than a tumour does not rule a tumour out: at this operating point the model called "
                f"every test tumour a tumour ({parts} missed), but test sets are small. Read the scan yourself.")
    missed = sum(m for _, (_, m) in ranked)   # "some" read oddly where it was every one
    n = sum(n for _, (n, _) in ranked)
    return ("A call other than a tumour does not rule a tumour out: at this operating point the model called "
            f"{missed:,} of {n:,} test tumours something other than a tumour: {parts} (Evaluation page, missed tumours). "
            "Read the scan yourself.")


def copies_note(predictor: Predictor) -> str | None:
    """Says that the card's test figures count scans Home and the Evaluation page leave out by
    default, and what those pages read without them: one model showed four sensitivities across
    the pages (a clinician's walkthrough)."""
    stored = load_eval(predictor.dir)
    kept, n_copies = without_copies(stored["predictions"]) if stored else ([], 0)
    if not n_copies:
        return None
    figures, _ = home_figures(predictor)
    # accuracy's own count where untyped tumours (Br35H's) are among the scans: '97.6 %' beside 1,397 is of 1,290
    typed = sum(r.get("label") in predictor.classes for r in kept)
    figures["Accuracy"] += f" (of {typed:,} typed)" if typed != len(kept) and figures["Accuracy"] != "n/a" else ""
    plain = {"Accuracy", "Sensitivity", "Specificity", "Tumours missed"}   # a source's name keeps its capitals
    shown = "; ".join(f"{k.lower() if k in plain else k} {v}" for k, v in figures.items() if k != "Test scans")
    return (f"Over all {len(stored['predictions']):,} test scans, including the {n_copies:,} with a copy "
            "(near duplicate, mirrored or turned) in training. Home and the Evaluation page leave those out "
            f"unless asked: over the other {len(kept):,}, {shown}.")


def sources_of(records: list[dict]) -> list[str]:
    return sorted({source_of(r) for r in records})


def load_eval(weights_dir: str | Path) -> dict | None:
    """The model's eval.json (parsed once per file version; callers must not modify it); None when
    absent or unreadable (`eval_problem` says why), as for history.json."""
    try:
        return _eval_json(weights_dir)
    except (OSError, ValueError):
        return None


def eval_problem(weights_dir: str | Path) -> str | None:
    """The sentence a page shows when eval.json is there but cannot be used (a hand edit, a copy
    cut short, results of other classes than the card's); None when it is fine or absent."""
    try:
        _eval_json(weights_dir)
    except OtherClasses as e:
        return str(e)
    except (OSError, ValueError) as e:
        return (f"{Path(weights_dir) / 'eval.json'} is unreadable ({e}): the per-image test results "
                "cannot be shown.")
    return None


def _eval_json(weights_dir: str | Path) -> dict | None:
    f = Path(weights_dir) / "eval.json"
    if not f.is_file():
        return None
    try:
        ours = tuple(load_card(weights_dir)["classes"])
    except (OSError, ValueError):  # no card to compare with: what cannot serve is said elsewhere
        ours = None
    return _read_json(str(f.resolve()), f.stat().st_mtime_ns, ours)


@functools.lru_cache(maxsize=8)
def _read_json(path: str, mtime_ns: int, classes: tuple[str, ...] | None) -> dict:
    """`evaluation.read_eval` once per file version."""
    return read_eval(path, classes)


def training_caption(card: dict, epochs: int) -> str:
    """One line on how the card's model was trained."""
    tr = card.get("training", {})
    kept, averaged = shipped_epoch(card)
    # train.py --keep last ships the final epoch whatever its validation loss (cards before it: best)
    why = "the final epoch, kept by choice" if tr.get("kept") == "last" else "the lowest validation loss"
    shipped = "."
    if kept and averaged:
        shipped = (f"; the weights shipped are epoch {kept}'s ({why}, dotted line) averaged "
                   f"with those of the run it continued ({(tr.get('weight_average') or {}).get('with', '?')}).")
    elif kept:
        shipped = f"; the weights shipped are epoch {kept}'s, {why} (dotted line)."
    minutes = f"{tr['train_time_s'] / 60:.1f} min" if tr.get("train_time_s") is not None else "a time not recorded"
    return (f"{tr.get('epochs_run') or epochs} epochs, {tr.get('optimizer', '?')} with {tr.get('schedule', '?')} schedule, "
            f"batch {tr.get('batch_size', '?')}, on {tr.get('device', '?')} in {minutes}"
            + (f"; stopped early, of {tr['epochs']} planned" if tr.get("stopped_early") and tr.get("epochs") else "")
            + shipped + "".join(f" {n}" for n in _training_notes(tr, epochs)))


def _training_notes(tr: dict, shown: int) -> list[str]:
    """What else the card records that changes how the curves read: a jump, a head start, two curves
    of different weights, epochs the history lacks."""
    notes = []
    if isinstance(tr.get("progressive"), dict) and finite_number(tr["progressive"].get("epochs")):
        p = tr["progressive"]
        notes.append(f"Epochs 1-{p['epochs']} ran at {p.get('small_img', '?')} px, the rest at {tr.get('img', '?')} px: "
                     "the curves jump where the size changes.")
    if isinstance(tr.get("init"), dict) and tr["init"].get("from"):
        parent = tr["init"]
        took = f", {parent['train_time_s'] / 60:.1f} min" if finite_number(parent.get("train_time_s")) else ""
        notes.append(f"It continued {parent['from']} ({parent.get('epochs_run', '?')} epochs{took}, not counted "
                     "above): epoch 1 here starts from a trained model.")
    if finite_number(tr.get("weight_ema")) and tr["weight_ema"]:
        notes.append(f"Validation is of the weights' moving average (decay {tr['weight_ema']:g}), training of the "
                     "raw weights: part of the gap between the curves is that.")
    if tr and tr.get("best_epoch") is None:
        notes.append("The card does not record which epoch's weights shipped (train.py keeps the lowest "
                     "validation loss unless told --keep last).")
    if finite_number(tr.get("epochs_run")) and tr["epochs_run"] != shown:
        notes.append(f"history.json holds {shown} of the {tr['epochs_run']} epochs run.")
    return notes


def shipped_epoch(card: dict) -> tuple[int | None, bool]:
    """(the epoch whose weights a run kept, whether they were then averaged with its parent's)."""
    tr = card.get("training", {})
    return tr.get("best_epoch"), (tr.get("weight_average") or {}).get("shipped") == "average"


def histories(dirs: list[str | Path]) -> dict[str, list[dict]]:
    """Each model's per-epoch history by the model chooser's name (`model_label`: two copies of one
    card are told apart, where the card's name let the last hide the first), for those that have one."""
    return {model_label(d): h for d in dirs if (h := load_history(d))}


def default_runs(runs: dict[str, list[dict]], predictor: Predictor | None) -> list[str]:
    """The runs the side-by-side curves open on: the loaded model, then the model it was
    fine-tuned from when that is shipped too, else the augmentation study's pair (cnn_bn with and
    without augmentation). Names as `histories` gives them."""
    study = [n for n in runs if n.startswith("cnn_bn")]
    if predictor is None:
        return study or list(runs)[:2]
    own = model_label(predictor.dir)
    parent = ((predictor.card.get("training") or {}).get("init") or {}).get("from")
    parent = model_label(resolve_weights(parent)) if parent and resolve_weights(parent).is_dir() else None
    pick = [own] + ([parent] if parent in runs else study)
    return list(dict.fromkeys(n for n in pick if n in runs))


def loss_note(training: dict) -> str | None:
    """Why the training loss can sit above the validation loss without underfitting."""
    if not finite_number(training.get("label_smoothing")) or not training["label_smoothing"]:
        return None
    augmented = (training.get("augmentation") or {}).get("strength", 1) != 0   # cnn_bn_noaug: 0
    return (f"The training loss is taken with label smoothing {training['label_smoothing']:g}"
            + (" on augmented images" if augmented else "")
            + ", the validation loss as plain cross-entropy" + (" on clean ones" if augmented else "")
            + ": the training curve sits above the other without meaning underfitting.")


def load_history(weights_dir: str | Path) -> list[dict] | None:
    """A run's per-epoch history; None when absent or unreadable (a run being written, a hand edit:
    every entry must be a record with a whole epoch number, its train and val records or null)."""
    f = Path(weights_dir) / "history.json"
    try:
        history = json.loads(f.read_text()) if f.is_file() else None
    except (OSError, ValueError):
        return None
    ok = isinstance(history, list) and all(
        isinstance(h, dict) and isinstance(h.get("epoch"), int) and not isinstance(h["epoch"], bool)
        and all(h.get(k) is None or isinstance(h[k], dict) for k in ("train", "val")) for h in history)
    return history if ok else None


def unreadable_note(card: dict) -> str | None:
    """The card's fields of the wrong type (a hand edit), left out of the page (`inference.shown_card`)."""
    bad = card.get("unreadable_fields")
    return (f"Some of this card's fields are of the wrong type and are not shown: {', '.join(bad)} "
            "(a hand edit? train.py, compare --record and saliency-check write them).") if bad else None


# ----------------------------------------------------------------------------- inputs
def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sample_scans() -> dict[str, Path]:
    """Built-in sample scans (assets/samples/<class>.jpg), name -> path."""
    return {p.name: p for p in sorted(SAMPLES_DIR.glob("*")) if p.is_file()}


def sample_files(names: list[str]) -> list[tuple[str, bytes]]:
    """The picked sample scans as uploads: ('sample/<name>', bytes)."""
    samples = sample_scans()
    return [(f"sample/{n}", samples[n].read_bytes()) for n in names]


# One batch of uploads, zips unpacked, held in memory at once: the cloud host has about 1 GB.
BATCH_BYTES = 200 * 2**20
# Labelled-zip scans kept for the Evaluation gallery after scoring; beyond it the gallery says so.
GALLERY_BYTES = 64 * 2**20


# Formats stored as zip archives that are documents, not folders of scans.
ZIP_DOCUMENTS = (".docx", ".xlsx", ".pptx", ".odt", ".ods", ".odp", ".epub", ".jar", ".apk", ".npz")


def expand_uploads(files: list[tuple[str, bytes]], budget: int = BATCH_BYTES) -> list[tuple[str, bytes | Exception]]:
    """Uploads with zips unpacked (in memory) into their members, in archive order. A member
    the archive reader left out, or a zip that cannot be used at all, becomes an entry holding its
    ScanError, and so does everything past ``budget`` bytes of the batch, or past what the
    batch's zips may inflate to for their weight (`core.archive.unpack_allowance`: the memory they
    add to the uploads); the others are still shown, and members past either are never inflated."""
    out: list = []
    used = inflated = zipped = 0
    over = (f"The batch is over {budget // 2**20} MB (zips unpacked): upload fewer files "
            "at a time.")
    for name, (_, data) in zip(unique_names([n for n, _ in files]), files):
        if sniff(data) != "zip" or name.lower().endswith(ZIP_DOCUMENTS):
            # by content, as the reader goes ("scans.ZIP.download" is a zip); documents that are
            # zips inside (.docx ...) are one file, which the reader refuses in one sentence
            fits = used + len(data) <= budget
            out.append((name, data if fits else ScanError(over)))
            used += len(data) if fits else 0
            continue
        zipped += len(data)
        allowed = unpack_allowance(zipped)
        room = min(budget - used, allowed - inflated)
        alone = zipped == len(data)   # the batch's first zip: speak of it alone
        why = over if room == budget - used else (
            (f"{name} unpacks to far more data than its size ({len(data) / 2**20:.1f} MB zipped, over "
             f"{allowed // 2**20} MB unpacked): this file, past that point, was not unpacked. Unzip it and "
             "upload the files themselves.") if alone else
            (f"The zips of this batch unpack to far more data than their size (over {allowed // 2**20} MB): "
             "this file was not unpacked. Upload the files unzipped, or fewer zips at a time."))
        try:
            members = read_zip(data, room, why)
        except ScanError as e:
            out.append((name, e))
            continue
        except Exception as e:  # never one zip's surprise for the whole batch
            out.append((name, ScanError(f"The zip archive could not be read ({type(e).__name__}).")))
            continue
        if not members.entries:
            out.append((name, ScanError("The zip archive contains no files.")))
            continue
        out += [(f"{name}/{m}", ScanError(c) if isinstance(c, str) else c) for m, c in members.entries]
        size = sum(len(c) for _, c in members)
        used += size
        inflated += size
    # once more over the whole list: members of one zip may clash ('a.png' and './a.png')
    return list(zip(unique_names([shown_path(n) for n, _ in out]), [c for _, c in out]))


def md_name(name: str) -> str:
    """A file name inside markdown (warnings, errors, expander labels) as literal text: a name is
    the uploader's, and '[sign in](https:/x)' or '![](https:/tracker)' must not become a link."""
    return "`" + str(name).replace("`", "'") + "`"


def gallery_blobs(items: list[tuple[str, str, bytes]], ev: dict,
                  budget: int = GALLERY_BYTES) -> dict[str, bytes]:
    """The scored scans of a labelled zip to keep for the gallery: failed files never, and none
    past ``budget`` bytes (their gallery tiles say the scan is not at hand)."""
    scored = {r["file"] for r in ev.get("predictions", [])}
    out, used = {}, 0
    for name, _, data in items:
        if name in scored and used + len(data) <= budget:
            out[name] = data
            used += len(data)
    return out


def saliency_choice_help(card: dict) -> str:
    """Why the saliency box opens on its method: the card's choice against tumour masks, or none."""
    from .saliency import default_method, measured_default
    first = default_method(card)
    if (sal := measured_default(card)):
        where = "validation" if (sal.get("measured") or {}).get("chosen_on") == "val" else "test"
        return (f"First: {first}, the method whose map pointed at the tumour mask most often on the LGG "
                f"{where} slices (the Model card page has its figures). Any method can be picked.")
    return f"First: {first}, the usual default: no method of this model was shown to point at tumours."


def labelled_zip(data: bytes, classes: list[str] | None = None
                 ) -> tuple[list[tuple[str, str, bytes]], list[dict], str | None, str | None]:
    """A class-per-folder zip as (file, label, bytes) items, the skipped files with why, a hint
    when its layout looks like a wrapper of classes (`core.data.one_folder_words`) or a folder names
    no tumour type beside typed ones (`core.data.untyped_tumour_note`), and which split folder was
    scored in a Training/Testing layout (Testing/, as `evaluate` scores it). Each file is
    labelled as `python -m core evaluate` labels the same tree (`core.archive.zip_to_labelled`);
    with the model's ``classes``, files of a folder it cannot be scored on are never inflated."""
    from .evaluation import scorable
    known = (lambda folder: scorable(normalise_label(folder), classes)) if classes else None
    try:
        # what it may inflate to for its weight, within the batch cap the Diagnose page keeps too
        members = zip_to_labelled(data, known, max(0, min(unpack_allowance(len(data)), BATCH_BYTES - len(data))))
    except ScanError:
        raise
    except Exception as e:  # the Evaluation page shows a ScanError as one sentence
        raise ScanError(f"The zip archive could not be read ({type(e).__name__}).") from e
    # names made unique, as an upload batch's are: 'glioma/a.jpg' and './glioma/a.jpg' were one
    # name, and the gallery, keyed by name, showed the other scan for a missed tumour
    names = unique_names([shown_path(name) for _, name, _ in members] + [shown_path(name) for name, _ in members.skipped])
    items = [(name, normalise_label(folder), content)
             for name, (folder, _, content) in zip(names, members)]
    skipped = [{"file": name, "error": why} for name, (_, why) in zip(names[len(items):], members.skipped)]
    from .data import Sample, untyped_tumour_note   # 'Brain Tumor/' beside 'Brain_Glioma/', as evaluate says
    untyped = untyped_tumour_note([Sample(path="", rel=name, label=label, original=folder)
                                   for (name, label, _), (folder, _, _) in zip(items, members)])
    return items, skipped, "; ".join(filter(None, (members.note, untyped))) or None, members.split_note


def volume_slices(data: bytes, name: str) -> tuple[int, int]:
    """(slices of a volume: NIfTI slices, DICOM frames, TIFF/GIF pages, the slice `read_scan` shows
    when none is asked for), (1, 0) for a plain image or an unreadable file (`read_scan` reports
    its problem with its own sentence). Found by content, as `read_scan` finds them: a TIFF stack
    or a raw DICOM uploaded without its suffix was shown as one image, while the report and the
    CLI read it as a stack; and the default is the reader's, so the page and the CLI show one slice."""
    try:
        info = cached_scan(data, name, item_key(name, data)).info   # the read `analyse_upload` reuses
        if info.get("n_frames", 1) is None:   # a large GIF, whose pages read_scan does not count
            return max(1, len(read_volume_slices(data, name))), 0
    except Exception:
        return 1, 0
    shown = shown_slice(info)
    return (1, 0) if shown is None else (max(int(info.get("n_slices") or 1), int(info.get("n_frames") or 1)), int(shown))


def read_upload(data: bytes | ScanImage | Exception, name: str, slice_index: int | None = None) -> ScanImage:
    """One upload (or one slice of it) as a ScanImage; raises ScanError with a plain sentence."""
    if isinstance(data, Exception):
        raise data if isinstance(data, ScanError) else ScanError(str(data))
    if isinstance(data, ScanImage):
        return data
    if slice_index is None:
        return read_scan(data, name)
    return read_scan(data, name, slice=slice_index)


def best_slice(predictor: Predictor, data: bytes, name: str) -> tuple[int | None, str]:
    """(index of the slice the model finds most tumour-like among those the out-of-distribution
    check accepts, a caption saying so) or, when no slice can be chosen (every slice empty, a
    damaged file), (None, why in one sentence)."""
    try:
        k, pred = most_tumour_like_slice(predictor, data, name,
                                         scores=cached_slice_scores(predictor, data, name))
    except ScanError as e:
        return None, str(e)
    except BaseException as e:  # a bug on one file must not stop the batch
        if not is_file_fault(e):
            raise
        return None, "No slice could be chosen: the file may be damaged, or a variant this reader does not handle."
    n = pred.info.get("n_slices", 1)
    if not pred.in_distribution:
        return k, (f"Slice {k} of 0-{n - 1}: the most tumour-like, but no slice the model scored "
                   "highest passes the out-of-distribution check.")
    return k, (f"Slice {k} of 0-{n - 1}: the highest tumour probability among the slices that pass "
               "the out-of-distribution check.")


def volume_alert(predictor: Predictor, data: bytes, name: str, threshold: float,
                 shown: int | None, shown_in_distribution: bool = True) -> str | None:
    """A warning when slices other than the one shown reach the operating point and the one shown
    does not (`hot_slices`): a tumour on slice 12 must not hide behind a clean middle slice, nor
    behind a refused one. None otherwise, and for a volume that cannot be read whole (`unchecked_note`)."""
    if not predictor.is_tumour_model or shown is None:
        return None
    try:
        scores = cached_slice_scores(predictor, data, name)
        hot = cached_hot_slices(predictor, data, name, threshold, shown, shown_in_distribution)
    except Exception:  # read_scan reports the file's problem with its own sentence
        return None
    if not hot:
        return None
    top = max(hot, key=scores.get)
    return (f"Other slices of this volume reach the operating point: {listed_slices(hot)} (highest tumour "
            f"probability {scores[top]:.3f}, slice {top}; before the out-of-distribution check). "
            + ("The slice shown does not" if shown_in_distribution else "The slice shown is out of distribution")
            + ": look at those slices before calling this volume clear.")


def unchecked_note(row: dict) -> str | None:
    """For the slice of a volume that could not be read whole (`analyse_upload`'s row): that only
    this slice was read; None otherwise. A 'no tumour' there says nothing of the other slices."""
    if not row.get("other_slices_unchecked"):
        return None
    return f"**Slice {shown_slice(row.get('info') or {})} only**: {UNCHECKED_TEXT}"


def display_image(scan: ScanImage, spec: dict) -> np.ndarray:
    """The image the model sees (cropped, padded, resized), the frame of the saliency map."""
    return prepare(scan.pixels, spec, scan.head_box)


# ----------------------------------------------------------------------------- results
def nbytes(value) -> int:
    """Memory held by a cached scan or map (its pixel array); 0 for small things."""
    if isinstance(value, ScanImage):
        return value.pixels.nbytes
    return value.nbytes if isinstance(value, np.ndarray) else 0


class LRU(OrderedDict):
    """A small least-recently-used store for per-session caches of predictions and maps.

    At most ``size`` entries and, when ``max_bytes`` is given, at most that many bytes of
    arrays (`nbytes`): a few large scans must not keep hundreds of MB per session. The newest
    entry always stays.
    """

    def __init__(self, size: int = 256, max_bytes: int | None = None):
        super().__init__()
        self.size, self.max_bytes, self.bytes = size, max_bytes, 0

    def get_or(self, key, make: Callable):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        self.bytes += nbytes(value)
        while len(self) > self.size or (self.max_bytes is not None and self.bytes > self.max_bytes
                                        and len(self) > 1):
            self.bytes -= nbytes(self.popitem(last=False)[1])
        return value


def result_row(name: str, pred: Prediction | None = None, error: str | None = None) -> dict:
    """One batch result in the shape of `core.inference.predict_many` output."""
    if pred is None:
        return {"file": name, "ok": False, "error": error or "The file could not be processed."}
    return {"file": name, "ok": True, **pred.to_json()}


def results_csv(rows: list[dict], predictor: Predictor) -> bytes:
    """The batch as a CSV download: the report's CSV (`report.build_csv`: every probability, the
    operating point, the slice of a volume and how it was chosen, the file's hash and the model),
    so a table read later still says why each call was made. Opens as UTF-8 in a spreadsheet."""
    return report.spreadsheet_csv(report.build_csv(rows, predictor.classes, predictor))


def evaluate_items(predictor: Predictor, items: list[tuple[str, str, bytes]],
                   predict: Callable[[str, bytes], Prediction],
                   progress: Callable[[float], None] | None = None) -> dict:
    """Evaluate labelled in-memory scans; unreadable ones are listed under ``errors``."""
    records, errors = [], []
    for k, (name, label, data) in enumerate(items):
        try:
            p = predict(name, data)
            records.append(prediction_record(name, "upload", label, p))
        except ScanError as e:
            errors.append({"file": name, "error": str(e)})
        except BaseException as e:  # one broken file never stops the evaluation
            errors.append({"file": name, "error": file_fault_error(e)})
        if progress:
            progress((k + 1) / max(1, len(items)))
    try:  # yes/no folders are scored as tumour vs no tumour, unknown folders listed (as the CLI)
        ev = score_labelled(records, predictor.classes, predictor.threshold, errors)
    except NothingToScore:
        return {"predictions": [], "errors": errors}
    ev["errors"] = errors
    return ev


def source_root(card: dict, source: str) -> Path | None:
    """Where a source's images live on this machine (card paths are relative to the repo)."""
    for s in card.get("sources", []):
        if s.get("name") == source and s.get("path"):
            p = Path(s["path"])
            return p if p.is_absolute() else (ROOT / p).resolve()
    return None


def record_scan_path(card: dict, record: dict) -> Path | None:
    """The scan behind an eval.json record when present on disk, else None."""
    root = source_root(card, source_of(record))
    if root is None:
        return None
    f = root / record["file"]
    return f if f.is_file() else None


def gallery_records(records: list[dict], kind: str) -> list[dict]:
    """'missed' tumours (predicted no tumour) or every 'misclassified' record, worst first."""
    from .dashboard import is_missed_tumour
    if kind == "missed":
        sel = [r for r in records if is_missed_tumour(r)]
        return sorted(sel, key=lambda r: r.get("tumour_probability") or 0.0)
    sel = [r for r in records if call_is_right(r, list(r["probs"])) is False]
    return sorted(sel, key=lambda r: -r["probs"].get(r["pred"], 0.0))


# ----------------------------------------------------------------------------- tumour masks
def record_mask_path(card: dict, record: dict) -> Path | None:
    """The tumour mask stored beside an eval.json record's scan (the LGG layout), if any."""
    from .saliency import mask_path_for
    path = record_scan_path(card, record)
    return mask_path_for(path) if path is not None else None


def mask_note(cam: np.ndarray, mask: np.ndarray) -> str:
    """Caption: does the map's peak fall on the tumour mask, and how much of its mass does."""
    from .saliency import POINTING_PX, mask_scores
    s = mask_scores(cam, mask, tolerance=POINTING_PX / max(mask.shape))
    if s["pointing_hit"] is None:
        return "the mask is empty in the model's view"
    if not np.nanmax(cam) > np.nanmin(cam):
        return "the map is flat: it points nowhere, so it cannot point at the tumour mask"
    where = ("on the tumour mask (or within {px} px of it)" if s["pointing_hit"] else
             "more than {px} px from the tumour mask").format(px=POINTING_PX)
    return f"map peak {where}, {s['energy_in_mask']:.0%} of its mass inside the mask"


# ----------------------------------------------------------------------------- Streamlit glue
# What follows is mostly Streamlit glue (caches, widgets, session state); the key and gallery
# helpers among it are plain Python too.
# Two models at most stay loaded (the chosen one and the one before, for switching back):
# each holds its weights (ResNet18: 45 MB) in a server with about 1 GB on Community Cloud.
@st.cache_resource(show_spinner="Loading the model...", max_entries=2)
def _load_predictor(path: str, stamps: tuple) -> Predictor:
    return Predictor(path)


def load_predictor(weights_dir: str | Path) -> Predictor:
    """The model, loaded once per process and per version of its files (`weights_stamp`)."""
    return _load_predictor(*weights_stamp(weights_dir))


def predictor_problem(weights_dir: str | Path) -> str | None:
    """The sentence saying why the model in ``weights_dir`` cannot be loaded (weights from another
    run, a truncated file, an unknown arch...); None when it loads (cached: `load_predictor`)."""
    try:
        load_predictor(weights_dir)
    except Exception as e:  # a broken weights dir must not take the app down
        return f"The model in {weights_dir} could not be loaded: {e}"
    return None


def current_predictor() -> Predictor | None:
    """The model chosen in the sidebar (None, with an error shown, when none can be loaded)."""
    wdir = st.session_state.get("weights_dir")
    if not wdir:
        return None
    if (problem := predictor_problem(wdir)):
        st.error(problem)
        return None
    return load_predictor(wdir)


def required_predictor(consequence: str = "") -> Predictor:
    """`current_predictor`, or stop the page with one error saying why (pages that need a model)."""
    if not st.session_state.get("weights_dir"):
        st.error(f"No model is loaded{consequence}. See the sidebar.")
        st.stop()
    predictor = current_predictor()
    if predictor is None:  # current_predictor has said why
        st.stop()
    return predictor


def keep_widget_value(target: str, widget: str) -> None:
    """Copy a widget's value to a plain session key, which survives pages without the widget."""
    st.session_state[target] = st.session_state[widget]


UPLOADS_KEPT, UPLOADS_BEFORE = "_uploads_kept", "_uploads_before"


def keep_uploads(widget: str) -> None:
    """The uploader's on_change: what it holds now, as (name, bytes), kept for `uploaded_files`."""
    st.session_state[UPLOADS_KEPT] = [(f.name, f.getvalue()) for f in st.session_state.get(widget) or []]


def uploaded_files(uploads) -> tuple[list[tuple[str, bytes]], int]:
    """(the files to show, how many of them are kept from before a visit to another page).
    Streamlit forgets a widget that a run of another page did not draw, so a clinician sent to
    the Evaluation page came back to an empty Diagnose page: an uploader that comes back empty
    without the user emptying it (`keep_uploads` saw no change) gives its files back, and files
    uploaded after that are added to them (they replaced them without a word)."""
    state = st.session_state
    if not uploads and state.get(UPLOADS_KEPT):
        state[UPLOADS_BEFORE] = (state.get(UPLOADS_BEFORE) or []) + state.pop(UPLOADS_KEPT)
    before = state.get(UPLOADS_BEFORE) or []
    return list(before) + [(f.name, f.getvalue()) for f in uploads or []], len(before)


def forget_uploads() -> None:
    for key in (UPLOADS_KEPT, UPLOADS_BEFORE):
        st.session_state.pop(key, None)


def follow_model_threshold(weights_dir: str, default: float) -> None:
    """Set the session's operating point for the chosen model: a model chosen again gets the point
    set for it, a new one its card's. A point never moved follows its card's ``default``, which
    train.py may rewrite while the app runs; a moved one stays. A change gets a fresh slider."""
    state = st.session_state
    kept = state.setdefault("_thresholds", {})  # weights dir -> (point, card default it started from)
    if state.get("_threshold_for") is not None and "threshold" in state:
        kept[state["_threshold_for"]] = (state["threshold"], state.get("_threshold_default"))
    point, seeded_from = kept.get(weights_dir, (default, default))
    now = {"threshold": default if point == seeded_from else point, "_threshold_for": weights_dir,
           "_threshold_default": default}
    if any(state.get(k) != v for k, v in now.items()):
        state.update(now, _threshold_rev=state.get("_threshold_rev", 0) + 1)


def session_threshold(predictor: Predictor) -> float | None:
    """The operating point chosen in the sidebar (the card's until the user moves it)."""
    t = card_threshold(predictor.card)
    return None if t is None else float(st.session_state.get("threshold", t))


def _cache(name: str, size: int, max_bytes: int | None = None) -> LRU:
    state = st.session_state
    if name not in state:
        state[name] = LRU(size, max_bytes)
    return state[name]


def cached_scan(data: bytes | ScanImage | Exception, name: str, key: str,
                slice_index: int | None = None) -> ScanImage:
    # Bounded by bytes, not by a small count: each rerun reads every row of a batch again, and
    # 16 entries made a 40-scan batch re-read 24+ files on every click.
    return _cache("_scans", 1024, 64 * 2**20).get_or((key, slice_index),
                                                     lambda: read_upload(data, name, slice_index))


def cached_volume_slices(data: bytes, name: str) -> tuple[int, int]:
    # the name counts too: a raw DICOM without its preamble may be told apart by its suffix
    return _cache("_slices", 64).get_or((digest(data), name.lower().endswith(VOLUME_SUFFIXES + STACK_SUFFIXES)),
                                        lambda: volume_slices(data, name))


def cached_hot_slices(predictor: Predictor, data: bytes, name: str, threshold: float | None, shown: int,
                      shown_in_distribution: bool = True) -> list[int]:
    """`inference.checked_hot_slices` on the cached scores; a refused slice's check of the others
    (a few predictions) is kept per file, model and threshold: the page asks again on every rerun."""
    scores = cached_slice_scores(predictor, data, name)
    if shown_in_distribution:
        return hot_slices(scores, threshold, shown)
    return _cache("_hot_checked", 64).get_or(
        (model_identity(predictor), digest(data), threshold, shown),
        lambda: checked_hot_slices(predictor, data, name, scores, threshold, shown, False))


def cached_slice_scores(predictor: Predictor, data: bytes, name: str) -> dict[int, float]:
    return cached_slice_profile(predictor, data, name)[0]


def cached_slice_profile(predictor: Predictor, data: bytes, name: str) -> tuple[dict[int, float], dict[int, float]]:
    """({slice: tumour probability of the non-empty slices}, {slice: head_share of every slice}) of a
    volume, scored once per file and model."""
    def profile():
        scans, _, scores = slice_scores(predictor, data, name)
        # every slice's share, the unscored (near-empty) ones too: the gate may accept such a slice
        return scores, {k: s.info["head_share"] for k, s in enumerate(scans) if "head_share" in s.info}
    return _cache("_slice_scores", 64).get_or((model_identity(predictor), digest(data)), profile)


def volume_profile(predictor: Predictor, data: bytes,
                   name: str) -> tuple[dict[int, float], dict[int, float]] | None:
    """The slice profile the Diagnose page plots, or None when every slice of the volume is empty
    (a blank volume is refused as out of distribution; there is nothing to plot) or the volume
    cannot be read whole: a 130-frame 512 px DICOM or a 300-page TIFF, whose one frame the page
    shows, ended the page (and the batch after it) with a traceback. The refusal is kept too: the
    page asks on every rerun, and each asking read (and decoded) the whole file again."""
    key, refused = (model_identity(predictor), digest(data)), _cache("_profile_refused", 64)
    if key in refused:
        return None
    try:
        return cached_slice_profile(predictor, data, name)
    except BaseException as e:
        if not is_file_fault(e):
            raise
        refused.get_or(key, lambda: True)
        return None


def cached_best_slice(predictor: Predictor, data: bytes, name: str) -> tuple[int | None, str]:
    return _cache("_best_slice", 64).get_or((model_identity(predictor), digest(data)),
                                            lambda: best_slice(predictor, data, name))


def cached_prediction(predictor: Predictor, scan: ScanImage, key: str,
                      slice_index: int | None = None) -> Prediction:
    """Prediction at the card's operating point, computed once per file content and model."""
    return _cache("_predictions", 1024).get_or((model_identity(predictor), key, slice_index),
                                               lambda: predictor.predict_scan(scan))


def cached_saliency(predictor: Predictor, scan: ScanImage, key: str, method: str,
                    target: str | None, slice_index: int | None = None) -> np.ndarray:
    from .saliency import is_class_agnostic, saliency_map
    # a class-agnostic map is one map whatever the class: one cache entry, not one per class
    return _cache("_saliency", 128, 32 * 2**20).get_or(
        (model_identity(predictor), key, slice_index, method, None if is_class_agnostic(method) else target),
        lambda: saliency_map(predictor, scan, method, target))


def _drop_report() -> None:
    """A held report was built with the saliency method on screen: a new method makes it stale."""
    if st.session_state.pop("_report", None) is not None:
        st.session_state["_report_dropped"] = True


def class_control(method: str) -> dict:
    """A class chooser's state for ``method``: off, and saying why, for a class-agnostic one."""
    from .saliency import is_class_agnostic
    off = is_class_agnostic(method)
    return {"disabled": off, "help": f"{method} draws one map whatever the class" if off else None}


def saliency_panel(predictor: Predictor, scan: ScanImage, key: str, pred: Prediction,
                   slice_index: int | None = None, mask: bytes | None = None, widget_key: str | None = None,
                   scope: bool = True) -> None:
    """Method, target class and opacity controls; overlay and raw map side by side.

    ``key`` caches the maps (content: the same file twice computes once); ``widget_key``
    (`widget_key`, default ``key``) names the controls, which must differ per place on the page.

    Runs as a fragment, so moving these controls never re-runs the page or the model. With a
    tumour ``mask`` of a 2D scan, both images carry its outline and a caption scores the map.
    The method offered first is the one the card measured best against tumour masks, and the class
    the call (for a 'no tumour' call, the likeliest tumour class: `saliency.explained_class`).
    """
    from .saliency import (METHODS, OUTLINE_WORDS, PEAK_WORDS, colour_map, contour_overlay, default_method,
                           explained_class, is_class_agnostic, overlay, peak_words)
    frame = input_mask(scan, mask, predictor.spec) if slice_index is None else None
    first = default_method(predictor.card)
    predicted = pred.pred
    explained = explained_class(predicted, pred.probs, predictor.classes)

    @st.fragment
    def panel() -> None:
        wkey = f"{widget_key or key}-{slice_index}"
        c1, c2, c3 = st.columns(3)
        method = c1.selectbox("Saliency method", list(METHODS), index=list(METHODS).index(first),
                              key=f"m-{wkey}", on_change=_drop_report, help=saliency_choice_help(predictor.card))
        if st.session_state.pop("_report_dropped", False):
            st.rerun()   # the report's download buttons lie outside this fragment: take them down
        others = [c for c in predictor.classes if c != explained]
        # keyed by the call too: a call moved by the operating point is explained afresh
        target = c2.selectbox("Explain class", [explained, *others], key=f"t-{wkey}-{predicted}",
                              format_func=lambda c: f"{class_label(c)} (predicted)" if c == predicted else
                              f"{class_label(c)} (likeliest tumour)" if c == explained else class_label(c),
                              **class_control(method))
        opacity = c3.slider("Opacity", 0.0, 1.0, 0.45, 0.05, key=f"o-{wkey}")
        try:
            cam = cached_saliency(predictor, scan, key, method, target, slice_index)
        except Exception as e:
            st.error(f"The saliency map could not be computed: {e}")
            return
        base = display_image(scan, predictor.spec)
        a, b, _ = st.columns([2, 2, 1])
        over, alone = overlay(base, cam, opacity), colour_map(cam)
        if frame is not None:
            over, alone = contour_overlay(over, frame), contour_overlay(alone, frame)
        what = "class-agnostic: the activations' first principal component" if is_class_agnostic(method) \
            else f"for '{class_word(target)}'" + (f", {u}" if (u := uncalled_words(pred, target)) else "")
        said = f"{method} saliency map ({what}), {peak_words(cam)}"   # the images' alt text: where it peaks
        a.image(over, caption=f"{method} ({what}) over the model input", width="stretch", alt=f"{said}, over the scan")
        b.image(alone, caption=f"map alone ({PEAK_WORDS})", width="stretch", alt=said)
        # ``scope``: where the maps were tested, once a page (a batch says it above its files, not under each)
        st.caption(saliency_caveat(predictor.classes) + (" " + saliency_scope(predictor.card) if scope else ""))
        if frame is not None:
            st.caption(f"{OUTLINE_WORDS.capitalize()}: the uploaded tumour mask; {mask_note(cam, frame)}.")
        elif mask is not None and slice_index is not None:
            st.caption("Tumour masks are outlined on 2D scans only: this volume's mask is not drawn.")
        elif mask is not None:
            st.caption("The uploaded mask cannot be read or does not fit this scan (size, or an empty mask): no outline.")
        if cam.max() <= 0:
            st.caption("The map is empty: nothing at this layer speaks for this class.")

    panel()


def analyse_upload(predictor: Predictor, name: str, data, threshold: float | None,
            slice_index: int | None = None, mask: bytes | None = None,
            slice_choice: str | None = None) -> tuple[dict, ScanImage | None, Prediction | None]:
    """Read and predict one upload (cached); a failure becomes an error row, never an exception.
    With its paired tumour ``mask``, a 'no tumour' call the mask contradicts is flagged in the row
    (the batch table and its CSV, as the detail view and the report). ``slice_choice``: how the
    page chose a volume's slice (`remembered_slice`), which the table and its CSV name."""
    key = item_key(name, data)
    try:
        scan = cached_scan(data, name, key, slice_index)
        pred = at_threshold(cached_prediction(predictor, scan, key, slice_index),
                            predictor.classes, threshold, predictor.referral)
    except BaseException as e:  # a bug on one file must not stop the batch
        row = result_row(name, error=str(e) if isinstance(e, ScanError) else file_fault_error(e))
        if (sha := failed_file_sha256(data)):
            row["sha256"] = sha   # read, not predicted: its CSV row is traced too, by the report's rule
        return row, None, None
    row = result_row(name, pred)
    shown = shown_slice(scan.info)
    if shown is not None and slice_choice:
        row["info"] = {**row["info"], "slice_choice": slice_choice}
    if isinstance(data, (bytes, bytearray)):
        row["sha256"] = key   # the CSV's file_sha256, as in the report and the audit log
        if predictor.seen_in_training(key):
            row["seen_in_training"] = True
    if shown is not None and predictor.is_tumour_model and isinstance(data, (bytes, bytearray)):
        try:  # the table, its CSV and the report flag a volume whose other slices reach the point
            row["hot_slices"] = cached_hot_slices(predictor, data, name, threshold, shown, pred.in_distribution)
            # a DICOM frame or stack page read alone has no head_share: the volume's read gives it
            if "head_share" not in pred.info and (share := cached_slice_profile(predictor, data, name)[1].get(shown)) is not None:
                pred = replace(pred, info={**pred.info, "head_share": share})
                row["info"] = {**row["info"], "head_share": share}
        except Exception as e:  # an empty volume, say: the slice shown stands alone
            if inference.whole_read_failed(e):   # ... or one that cannot be read whole: say its slices went unchecked
                row["other_slices_unchecked"] = True
    if mask is not None:   # the CSV names the mask, as the report's does
        row["mask_sha256"] = digest(mask)
        if mask_contradiction(pred, scan, mask, predictor.spec, slice_index):
            row["mask_contradicts"] = True
    return row, scan, pred


def item_key(name: str, data) -> str:
    """Cache key of an upload: its content hash (bytes), else its name."""
    return digest(data) if isinstance(data, (bytes, bytearray)) else f"{name}:{type(data).__name__}"


def widget_key(position: int, name: str, data) -> str:
    """Key stem for an upload's widgets: its place in the batch, then its cache key. The same
    scan twice in a batch shares its computations but needs widgets of its own."""
    return f"{position}-{item_key(name, data)}"


def evaluate_zip(predictor: Predictor, name: str, data: bytes,
                 progress: Callable[[float], None] | None = None) -> dict:
    """A labelled zip scored through the served path, as the Evaluation page holds it: its name,
    the evaluation, every file left out with why, and the scans kept for the gallery. Raises
    ScanError when the zip itself cannot be used."""
    items, skipped, layout_note, split_note = labelled_zip(data, predictor.classes)
    if not items and not skipped:   # it said 'Results of x.zip', then that no scan could be evaluated
        raise ScanError("The zip archive holds no files.")
    ev = evaluate_items(predictor, items,
                        lambda n, b: cached_prediction(predictor, read_upload(b, n), digest(b)),
                        progress=progress)
    seen = trained_file_names(predictor.dir)
    trained = {name for name, _, b in items if predictor.seen_in_training(digest(b))}   # by content, renamed too
    for r in ev["predictions"]:   # the public sets' own images: a zip of them scored 100 % with no word
        if Path(r["file"]).name in seen or r["file"] in trained:
            r["copy_in_training"] = True
    return {"name": name, "digest": digest(data), "ev": ev, "skipped": skipped + ev["errors"],
            "blobs": gallery_blobs(items, ev), "split_note": split_note,
            "layout_note": layout_note and layout_note[0].upper() + layout_note[1:] + "."}


def only_junk(skipped: list[dict]) -> bool:
    """Files were left out, each a hidden or system file (.DS_Store, __MACOSX/): said, not as an error."""
    from .archive import JUNK_REASONS
    return bool(skipped) and all(s["error"] in JUNK_REASONS for s in skipped)


def skipped_summary(skipped: list[dict]) -> str:
    """One line for the files a zip's evaluation left out, by reason, largest first: 20 red boxes
    for 30 files of an unknown class folder, then the figures of the 4 left, said nothing of the 30."""
    files = f"{len(skipped)} file{'s' * (len(skipped) != 1)}"
    if len(skipped) <= 3:   # few: by name
        return (f"{files} left out of these figures: "
                + "; ".join(f"{md_name(s['file'])}: {s['error'].rstrip('.')}" for s in skipped) + ".")
    why = Counter(s["error"] for s in skipped)
    parts = [f"{n} file{'s' * (n != 1)}: {reason[0].lower() + reason[1:].rstrip('.')}" for reason, n in why.most_common(3)]
    more = sum(n for _, n in why.most_common()[3:])
    return (f"{files} left out of these figures (listed below{', the first 200' if len(skipped) > 200 else ''}). "
            + "; ".join(parts)
            + (f"; {more} more for other reasons" if more > 0 else "") + ".")


def refused_lines(records: list[dict]) -> list[str]:
    """One markdown line per scan the out-of-distribution check refused: its file, label and why.
    The page gave only their count ('3 of 60'), and a user could not find which."""
    return [f"{md_name(r['file'])} (labelled {class_word(r['label'])}): {r.get('ood_reason') or PIXEL_OOD_REASON}"
            + (" It has a copy in training." if r.get("copy_in_training") else "")
            for r in records if not r.get("in_distribution", True)]


def unscored_upload(held: dict, up) -> str | None:
    """What to say when the zip now in the uploader (``up``, Streamlit's UploadedFile or None) is
    not the one whose results are held: those results, shown under the new zip's name, would pass
    for its own. The upload's id spares hashing a large zip on every rerun of the page."""
    if up is None or "digest" not in held:   # nothing uploaded; a result held from before digests
        return None
    if held.get("upload_id") is not None and held["upload_id"] == getattr(up, "file_id", None):
        return None
    name, data = up.name, up.getvalue()
    if held["digest"] == digest(data):
        held["upload_id"] = getattr(up, "file_id", None)
        return None
    return (f"{md_name(name or 'This zip')} is not evaluated yet: press Evaluate. The results held are of "
            f"{md_name(held['name'])}, another zip.")


def zip_view(held: dict, predictor: Predictor) -> tuple[list[str], "ReferralRule"]:
    """(classes, referral rule) to judge a held zip evaluation by: yes/no folders against a
    typed model are scored as tumour vs no tumour; the card's rule judges each record's own
    probabilities (`records_at`), so its referrals are the CLI's and the Diagnose page's."""
    return held["ev"]["classes"] if held["ev"].get("scored_as") else predictor.classes, predictor.referral


def remembered_slice(key: str, predictor: Predictor | None = None, data: bytes | None = None,
                     name: str = "") -> tuple[int | None, str | None]:
    """(slice, how it was chosen: `BEST_SLICE` or None for the slider) last shown of the volume
    whose widgets are keyed ``key`` (`widget_key`), (None, None) before: a big batch shows one
    file's details at a time, and the table and report must keep the slice chosen for each
    volume, and say so, not fall back to the reader's default one. A most tumour-like slice is
    ``predictor``'s own: one chosen by another model is chosen again (the table called another
    model's pick 'most tumour-like', which reads as a clear volume when this model's is not)."""
    index, choice, model = st.session_state.get("_slices_shown", {}).get(key, (None, None, None))
    if choice == BEST_SLICE and predictor is not None and model != model_identity(predictor):
        best, _ = cached_best_slice(predictor, data, name)
        index, choice = (best, BEST_SLICE) if best is not None else (None, None)
        remember_slice(key, index, choice, predictor)
    return index, choice


def remember_slice(key: str, index: int | None, choice: str | None = None,
                   predictor: Predictor | None = None) -> None:
    """``predictor``: the model that chose a `BEST_SLICE`."""
    st.session_state.setdefault("_slices_shown", {})[key] = (
        index, choice, model_identity(predictor) if predictor is not None else None)


def analyse_batch(predictor: Predictor, items: list[tuple[str, object]], threshold: float | None,
                  masks: dict[str, bytes]) -> tuple[dict[int, tuple[int | None, str | None]], list[dict]]:
    """(slice shown per position, result row per file) for a batch shown as a table: each volume
    at the slice last shown of it (the reader's default until then), as the report reads it."""
    slices = {k: remembered_slice(widget_key(k, name, data), predictor, data, name)
              for k, (name, data) in enumerate(items)}
    rows = [analyse_upload(predictor, name, data, threshold, slices[k][0], masks.get(name), slices[k][1])[0]
            for k, (name, data) in enumerate(items)]
    return slices, rows


def batch_problems(rows: list[dict]) -> list[tuple[str, str]]:
    """(kind, markdown) for each row a batch table alone would hide: 'error' for an unreadable
    file, 'warning' for a scan with no call (out of distribution: the table's cell is cut short) and
    for a volume whose other slices reach the operating point."""
    out = []
    for r in rows:
        if not r["ok"]:
            out.append(("error", f"**{md_name(r['file'])}**: {r['error']}"))
            continue
        if not r.get("in_distribution", True):
            out.append(("warning", f"**{md_name(r['file'])}**: out of distribution, no diagnosis. "
                        f"{r.get('ood_reason') or PIXEL_OOD_REASON}"))
        if r.get("hot_slices"):
            shown = ("the slice in the table does not" if r.get("in_distribution", True)
                     else "the slice in the table is out of distribution")
            out.append(("warning", f"**{md_name(r['file'])}**: slices {listed_slices(r['hot_slices'])} reach the "
                        f"operating point; {shown}. Show its details before calling it clear."))
    return out


def _sticky(key: str) -> tuple[str, Callable[[], None]]:
    """(widget key, on_change) that copy a widget's value into the plain session key ``key``:
    Streamlit forgets the state of a widget that a run does not draw, or whose options or label
    change, and a plain key survives both."""
    name = f"_{key}_widget"
    return name, functools.partial(keep_widget_value, key, name)


def metric_rows(figures: list[tuple], per_row: int = 3) -> None:
    """Headline figures, (label, value, help[, count]), as st.metric, ``per_row`` to a row: six in
    one row were cut to '9…' and 'Accu…' on a tablet (800 px, the sidebar open). A count ('965 of
    986') is written small and grey under its value, with no arrow: it is no change."""
    for start in range(0, len(figures), per_row):
        for col, (label, value, help_text, *count) in zip(st.columns(per_row), figures[start:start + per_row]):
            note = count[0] if count else None
            col.metric(label, value, help=help_text, **({"delta": note, "delta_color": "off",
                                                          "delta_arrow": "off"} if note else {}))


def sticky_choice(label: str, options: list, key: str, widget=None, **kw):
    """A radio (or ``widget=st.selectbox``) whose choice survives a visit to another page and a
    switch of model (`_sticky`). A choice missing from ``options`` (a source the new model has
    no scans of) falls back to the first."""
    name, on_change = _sticky(key)
    chosen = st.session_state.get(key, options[0])
    return (widget or st.radio)(label, options, index=options.index(chosen) if chosen in options else 0,
                                key=name, on_change=on_change, **kw)


def sticky_toggle(label: str, key: str, value: bool = True, **kw) -> bool:
    """A toggle whose state survives like `sticky_choice`'s (its label may carry a count)."""
    name, on_change = _sticky(key)
    return st.toggle(label, value=st.session_state.get(key, value), key=name, on_change=on_change, **kw)


def keep_result(name: str, predictor: Predictor, value: dict) -> None:
    """Store a result in the session with the identity of the model that made it."""
    st.session_state[name] = {**value, "model": model_identity(predictor)}


def held_result(name: str, predictor: Predictor) -> tuple[dict | None, bool]:
    """(the stored result, dropped): a result of another model is dropped, never shown as this
    one's (its classes may not even exist here)."""
    held = st.session_state.get(name)
    if held is None:
        return None, False
    if held.get("model") != model_identity(predictor):
        del st.session_state[name]
        return None, True
    return held, False


def report_downloads(items: list[tuple[str, object]], predictor: Predictor,
                     threshold: float | None, slices: dict[int, tuple[int | None, str | None]] | None = None,
                     rows: list[dict] | None = None, masks: dict[str, bytes] | None = None) -> None:
    """PDF/CSV report buttons from core.report, built on request and kept for these files.

    ``core.report.report_downloads_data(items, predictor, threshold)`` predicts and computes
    saliency again, so it runs behind a button, once per set of files, slices shown (``slices``:
    position -> (slice index of a volume, how it was chosen), `remembered_slice`), tumour masks
    paired with them (``masks``: name -> bytes, `pair_masks`) and operating point.
    """
    slices, masks = slices or {}, masks or {}
    # every listed upload, the unreadable ones too: a report must not hold fewer files than the page
    # each file's slice on screen, the saliency method chosen for it (`saliency_panel`'s widget)
    # a volume's hot slices as the page's row has them (``rows``, one per item: not scored again)
    # and its paired mask, which flags a 'no tumour' call it contradicts, as the page does
    def options(i: int, n: str, d) -> dict:
        index, choice = slices.get(i, (None, None))
        opts = {"slice_index": index, "slice_choice": choice,
                "method": st.session_state.get(f"m-{widget_key(i, n, d)}-{index}"),
                "hot_slices": rows[i].get("hot_slices", []) if rows and rows[i].get("ok") else None,
                "head_share": (rows[i].get("info") or {}).get("head_share") if rows and rows[i].get("ok") else None,
                "unchecked": rows[i].get("other_slices_unchecked") if rows and rows[i].get("ok") else None,
                "mask": masks.get(n)}
        return {k: v for k, v in opts.items() if v is not None}
    files = [(n, d, options(i, n, d)) for i, (n, d) in enumerate(items)]
    key = (model_identity(predictor), threshold,
           tuple((n, digest(d) if isinstance(d, (bytes, bytearray)) else str(d), kw.get("slice_index"),
                  kw.get("slice_choice"), kw.get("method"), tuple(kw.get("hot_slices") or ()), kw.get("mask") and digest(kw["mask"]))
                 for n, d, kw in files))
    held = st.session_state.get("_report")
    if held is None or held[0] != key:
        readable = any(isinstance(d, (bytes, bytearray)) for _, d, _ in files)
        slot = st.empty()   # the button goes once the report is built: not beside its downloads
        if not readable or not slot.button("Prepare a PDF and CSV report", key="report-build"):
            return
        with st.spinner("Building the report..."):
            try:
                held = (key, report.report_downloads_data(files, predictor, threshold))
            except Exception as e:  # a report bug must not hide the predictions above
                st.error(f"The report could not be built ({type(e).__name__}: {e}).")
                return
        slot.success("Report ready: its downloads are below.")   # a status a screen reader announces; the button is gone
        st.session_state["_report"] = held
    for col, (kind, (blob, mime, fname)) in zip(st.columns(len(held[1])), held[1].items()):
        col.download_button(f"Download the {kind.upper()} report", blob, fname, mime,
                            on_click="ignore", key=f"report-{kind}")


def gallery_scan(card: dict, record: dict, blobs: dict[str, bytes] | None = None) -> ScanImage | None:
    """The scan behind a record: from the uploaded zip held in memory, else from disk."""
    if blobs is not None and record["file"] in blobs:
        return read_scan(blobs[record["file"]], record["file"])
    path = record_scan_path(card, record)
    return read_scan(path) if path is not None else None


def gallery_key(record: dict, blobs: dict[str, bytes] | None = None) -> str:
    """Saliency cache key of a gallery scan: an uploaded one's content (two zips may both hold
    glioma/x.jpg), a stored one's source and path."""
    if blobs is not None and record["file"] in blobs:
        return digest(blobs[record["file"]])
    return f"{record.get('source', 'data')}/{record['file']}"


def gallery_target(record: dict, explain: str, classes: list[str]) -> str:
    """The class a gallery map explains for ``record[explain]`` ('label' or 'pred'): itself where it
    is a class of the model; a coarse 'tumor' (a Br35H label, a folded yes/no call) its likeliest
    type, never 'no tumour' (a missed Br35H tumour's 'true class' map was the no-tumour one)."""
    c = record[explain]
    if c in classes:
        return c
    if is_tumour_label(c):
        probs = record.get("model_probs") or record.get("probs") or {}
        types = [t for t in tumour_classes(classes) if t in probs]
        likeliest = record.get("tumour_type") or (max(types, key=probs.get) if types else None)
        if likeliest in classes:
            return likeliest
    return next(x for x in (record.get("pred_type"), record["pred"], *classes) if x in classes)


GALLERY_COLUMNS = 3


def gallery_caption(r: dict, threshold: float | None, mask_words: str = "") -> str:
    """What a gallery map's caption says of its scan after the name (plain text: it is the alt
    text too). The tumour probability is written apart from the operating point: a miss at 0.4996
    under 0.5 read "p(tumour) 0.50"."""
    if not r.get("in_distribution", True):   # refused: no call to explain, as on Diagnose and in the PDF
        return (f": true {class_word(r['label'])}, refused by the out-of-distribution "
                f"check (raw output {class_word(r['pred'])}): no map")
    tp = r.get("tumour_probability")
    p = None if tp is None else apart(tp, threshold, 2)[0] if threshold is not None else f"{tp:.2f}"
    return (f": true {class_word(r['label'])}, predicted {class_word(r['pred'])}"
            + (f", p(tumour) {p}" if p is not None else "")
            + ("; flagged 'uncertain, refer'" if r.get("uncertain") else "")   # a referred miss was no silent one
            + (f"; {mask_words}" if mask_words else "")
            + ("; a copy of it was in training" if r.get("copy_in_training") else ""))


def gallery(predictor: Predictor, records: list[dict], threshold: float | None, blobs: dict[str, bytes] | None = None,
            limit: int = 8) -> None:
    """Missed and misclassified scans with their saliency map (the card's default method) and,
    where a tumour mask lies beside the scan (LGG), its outline and a pointing-game note."""
    from .saliency import OUTLINE_WORDS, contour_overlay, default_method, is_class_agnostic, overlay, peak_words
    method = default_method(predictor.card)

    @st.fragment
    def panel() -> None:
        kind = st.radio("Show", ["missed", "misclassified"], horizontal=True, key="gallery-kind",
                        format_func={"missed": "missed tumours",
                                     "misclassified": "every misclassified scan"}.get)
        explain = st.radio(f"{method} for", ["pred", "label"], horizontal=True, key="gallery-explain",
                           format_func={"pred": "the predicted class", "label": "the true class"}.get,
                           **class_control(method))
        sel = gallery_records(records, kind)
        if not sel:
            st.success("None at this operating point.")
            return
        # only the scans on this machine are counted and offered: '13 scans; 8 shown' over no image at
        # all, on a fresh machine without the dataset (a review)
        on_hand = [r for r in sel if (blobs is not None and r["file"] in blobs) or record_scan_path(predictor.card, r)]
        kept = {id(r) for r in on_hand}
        absent = {source_of(r) for r in sel if id(r) not in kept}
        if not on_hand:
            return absent_notes(predictor.card, absent, blobs, len(sel))
        away = len(sel) - len(on_hand)
        sel = on_hand
        shown = len(sel) if len(sel) <= limit else st.slider(
            "Scans shown (each map takes a moment)", limit, len(sel), limit, key="gallery-count")
        st.caption(f"{len(sel)} scan{'s' * (len(sel) != 1)}, the most confident mistakes first; {shown} shown"
                   + (f" ({away} more {'not kept' if blobs is not None else 'not on this machine'})." if away else ".")
                   + (" A missed tumour's predicted class is 'no tumour': its map marks what spoke against a "
                      "tumour and need not point at the one missed; 'the true class' (above) shows what spoke "
                      "for it." if explain == "pred" and kind == "missed" and not is_class_agnostic(method) else "")
                   + " " + saliency_scope(predictor.card))   # as beside Diagnose's map: a map is not the lesion's place
        # three, not four: on a tablet four maps were 110 px wide under 10-line captions
        cols = st.columns(GALLERY_COLUMNS)
        for k, r in enumerate(sel[:shown]):
            try:
                scan = gallery_scan(predictor.card, r, blobs)
            except ScanError as e:
                cols[k % GALLERY_COLUMNS].error(f"{md_name(r['file'])}: {e}")
                continue
            if scan is None:
                absent.add(source_of(r))
                continue
            if not r.get("in_distribution", True):   # refused: no call to explain, as on Diagnose and in the PDF
                said = gallery_caption(r, threshold)
                cols[k % GALLERY_COLUMNS].image(display_image(scan, predictor.spec), clamp=True, width="stretch",
                                                caption=md_name(r["file"]) + said, alt=r["file"] + said)
                continue
            key = gallery_key(r, blobs)
            target = gallery_target(r, explain, predictor.classes)
            cam = cached_saliency(predictor, scan, key, method, target)
            img = overlay(display_image(scan, predictor.spec), cam, 0.4)
            on_disk = blobs is None or r["file"] not in blobs  # an uploaded zip has no masks
            frame = input_mask(scan, record_mask_path(predictor.card, r), predictor.spec) \
                if on_disk else None
            note = "" if frame is None else f"{OUTLINE_WORDS}: tumour mask, {mask_note(cam, frame)}"
            said = gallery_caption(r, threshold, note)
            cols[k % GALLERY_COLUMNS].image(img if frame is None else contour_overlay(img, frame), width="stretch",
                                            caption=md_name(r["file"]) + said,
                                            alt=f"{r['file']}{said}; saliency map {peak_words(cam)}")
        absent_notes(predictor.card, absent, blobs)

    panel()


def absent_notes(card: dict, sources: set[str], blobs: dict | None, n_all: int | None = None) -> None:
    """Why a gallery's scans of ``sources`` cannot be shown (``n_all``: none of its ``n_all`` can)."""
    if n_all:
        st.caption(f"{n_all} scan{'s' * (n_all != 1)} to show, none of them "
                   + ("kept (below)." if blobs is not None else "on this machine."))
    for src in sorted(sources):
        if blobs is not None and src == "upload":
            st.info(f"Only the zip's first {GALLERY_BYTES // 2**20} MB of scans are kept for this "
                    "gallery: the others cannot be shown.")
            continue
        root = source_root(card, src)
        st.info(f"The scans of source '{source_label(src)}' are not on this machine"
                + (f" (expected under {root})" if root else "") + ", so they cannot be shown: the public "
                "data sets are not part of the app (the README's 'Data' section says where they go).")
