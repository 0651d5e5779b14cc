"""Plotly figures and tables for the app's pages: plain functions of cards, records and metrics.

Nothing here imports Streamlit, so every figure can be built (and tested) without the app.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

from .inference import END_SLICE_SHARE, finite_number, shown_slice
from .labels import (FINE_TUMOURS, NO_TUMOUR, TUMOUR, call_label, class_label, has_tumour_decision, is_tumour_label,
                     source_label, tumour_classes)
from .referral import ReferralRule
from .report import flag_labels, refused_by_header, slice_words, untested_words, volume_words

# Okabe-Ito's colour-blind-safe set, in the roles of the plotly colours it replaced (blue, orange,
# green, red first), then plotly's brown: plotly's green and red were 7.5 apart in CIELAB to a
# deuteranope, its green and orange 3.9 to a protanope (an accessibility review, session 51)
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#8C564B"]
# Plotly's own toolbar keeps only "download as PNG" (and full screen, Streamlit's): its zoom, pan and
# select buttons cost seven Tab stops a chart and sat over chart titles on touch screens
CHART_CONFIG = {"displaylogo": False,
                "modeBarButtonsToRemove": ["zoom", "pan", "select", "lasso", "zoomIn", "zoomOut",
                                           "autoScale", "resetScale"]}
# the small charts beside a call: nothing there worth saving apart from the page itself
PLAIN_CHART = {"displayModeBar": False}


# The operating point's line on a chart: black vanished on the dark theme (1.16:1), and the theme a
# script reads (st.context.theme) may be stale after the reader switches it, with no rerun: a grey
# that reads on both, 3.9:1 on white and 4.8:1 on the dark theme's #0e1117
MARK = "#808080"
# the gauge keeps a black mark on a light track of its own, whatever the theme: black reads on that
# track and on each bar colour (5.4:1 on vermilion, 10:1 on amber; white on amber was 2.25:1)
GAUGE_MARK, GAUGE_TRACK = "black", "#f0f2f6"


# A legend under its plot: beside it, six runs' names took half of a half-width chart, and on a
# tablet the ROC legend covered the curves of a 60 px wide plot (clinicians' walkthroughs)
LEGEND_BELOW = dict(orientation="h", yanchor="top", y=-0.25, xanchor="left", x=0)


def _layout(fig: go.Figure, title: str, height: int = 320, **kw) -> go.Figure:
    kw.setdefault("margin", dict(l=10, r=10, t=40, b=10))
    fig.update_layout(title=title, height=height, template="plotly_white", **kw)
    return fig


# ----------------------------------------------------------------------------- one prediction
def probability_bar(probs: dict[str, float], predicted: str | None = None) -> go.Figure:
    """Calibrated probability of every class; the predicted class in a stronger colour."""
    names = list(probs)
    colours = [PALETTE[3] if c == predicted else "#9ecae1" for c in names]
    fig = go.Figure(go.Bar(x=[probs[c] for c in names], y=[class_label(c) for c in names], orientation="h",
                           marker_color=colours, text=[f"{probs[c]:.1%}" for c in names],
                           textposition="auto", insidetextfont={"color": "black"}))   # white on vermilion: 3.7:1
    fig.update_xaxes(range=[0, 1], tickformat=".0%", dtick=0.25)   # auto ticks stopped at 80 %: a 99 % bar ran past the scale
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, "Class probabilities (calibrated)", height=60 + 40 * len(names))


def tumour_gauge(p: float, threshold: float | None, called: bool | None = None, referred: bool = False) -> go.Figure:
    """Tumour probability as a bullet gauge with the operating point as its threshold line;
    ``called``: whether the call is a tumour (its colour; compared again it could contradict the call).
    A ``referred`` call's bar is amber: green read as 'safe' where the page asks for review. The
    state is also in words under the title: colour alone does not carry it."""
    called = (threshold is not None and p >= threshold) if called is None else called
    gauge = {"shape": "bullet", "axis": {"range": [0, 1], "tickformat": ".0%"},
             "bar": {"color": PALETTE[1] if referred else PALETTE[3] if called else PALETTE[2]},
             "bgcolor": GAUGE_TRACK}
    if threshold is not None:
        gauge["threshold"] = {"value": threshold, "line": {"color": GAUGE_MARK, "width": 3},
                              "thickness": 0.9}
    fig = go.Figure(go.Indicator(mode="number+gauge", value=p, number={"valueformat": ".1%"},
                                 gauge=gauge, domain={"x": [0.25, 1], "y": [0, 1]},
                                 title={"text": f"any tumour<br><span style='font-size:11px'>{gauge_state(called, referred)}"
                                                "</span>", "font": {"size": 14}}))
    return _layout(fig, "", height=90, margin=dict(l=10, r=20, t=10, b=20))


def gauge_state(called: bool, referred: bool) -> str:
    """The gauge's state in words, as its colour shows it."""
    return "refer" if referred else "flagged" if called else "not flagged"


def slice_profile(scores: dict[int, float], threshold: float | None, shown: int | None,
                  shares: dict[int, float] | None = None, end_share: float = END_SLICE_SHARE) -> go.Figure:
    """A volume's tumour probability slice by slice: the operating point as a dashed line, the
    slice shown as a dotted one, and slices under ``end_share`` of the head's widest cross-section
    (``shares``: slice -> head_share) shaded grey. A run of hot slices at the top of a healthy head
    reads differently from one in the middle of the brain."""
    ks = sorted(scores)
    fig = go.Figure(go.Scatter(x=ks, y=[scores[k] for k in ks], mode="lines+markers", name="tumour probability",
                               marker={"size": 4, "color": PALETTE[0]},
                               hovertemplate="slice %{x}<br>tumour probability %{y:.3f}<extra></extra>"))
    for lo, hi in _runs([k for k in ks if (shares or {}).get(k, 1.0) < end_share]):
        # 0.18 was 1.23:1 against white; named on the chart too, not only in the caption's "grey"
        fig.add_vrect(x0=lo - 0.5, x1=hi + 0.5, fillcolor="grey", opacity=0.35, line_width=0,
                      annotation_text="end" if hi - lo < 3 else "end slices", annotation_position="bottom left",
                      annotation_font_size=10)
    if threshold is not None:
        fig.add_hline(y=threshold, line_dash="dash", line_color=MARK,
                      annotation_text=f"operating point {threshold:.3f}", annotation_position="top left")
    if shown is not None:
        fig.add_vline(x=shown, line_dash="dot", line_color=PALETTE[3],
                      annotation_text=f"slice {shown}", annotation_position="top right")
    fig.update_xaxes(title="slice (numbered from 0)", tickformat="d", dtick=max(1, len(ks) // 10))   # whole slices: no 0.5 ticks
    fig.update_yaxes(title="tumour probability", range=[0, 1.02])
    return _layout(fig, "", height=240, margin=dict(l=10, r=10, t=20, b=10), showlegend=False)


def slice_profile_caption(end_share: float = END_SLICE_SHARE) -> str:
    """What `slice_profile`'s grey bands are, said under the chart."""
    share = "half" if end_share == 0.5 else f"{end_share:.0%}"
    return ("Every non-empty slice, before the out-of-distribution check. Grey: end slices "
            f"(under {share} of the head's widest cross-section), where the model has called healthy "
            "heads glioma: read a tumour call there with caution.")


def _runs(ks: list[int]) -> list[tuple[int, int]]:
    """Sorted slice numbers as (first, last) runs of consecutive ones."""
    out: list[tuple[int, int]] = []
    for k in ks:
        if out and k == out[-1][1] + 1:
            out[-1] = (out[-1][0], k)
        else:
            out.append((k, k))
    return out


# ----------------------------------------------------------------------------- evaluation
def confusion_heatmap(cm: list[list[int]], classes: list[str]) -> go.Figure:
    """Rows are the true class; each cell gives its count and its share of the row (recall on the
    diagonal), coloured by that share. One chart, not a counts chart beside a row-normalised one:
    on a tablet the two were squashed to 6 px percentages. A class without test scans has no row
    to show ('n/a', not a recall of 0 %)."""
    counts = np.asarray(cm, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.full_like(counts, np.nan), where=totals > 0)
    text = [[f"{int(n)}<br>" + ("n/a" if np.isnan(v) else f"{v:.0%}") for n, v in zip(*rows)]
            for rows in zip(counts, share)]
    shown = [class_label(c) for c in classes]
    fig = go.Figure(go.Heatmap(z=share, x=shown, y=shown, colorscale="Blues", zmin=0, zmax=1, text=text,
                               texttemplate="%{text}", showscale=False,
                               hovertemplate="true %{y}<br>predicted %{x}<br>%{text}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title="true")
    fig.update_xaxes(title="predicted", side="bottom")
    return _layout(fig, "Confusion matrix (count and row %)", height=140 + 60 * len(classes))


def _method_for(method: str, key: str) -> str:
    """The part of an evaluation's ``ci95_method`` ("accuracy, sensitivity: bootstrap ...; specificity:
    Wilson over patients ...") that says how ``key``'s interval was drawn; the whole text if none names it."""
    for part in method.split("; "):
        keys, sep, how = part.partition(": ")
        if sep and key in keys.split(", "):
            return how
    return method


def interval_text(ev: dict, key: str) -> str | None:
    """The 95 % interval of one rate of an evaluation, in words (a metric's help)."""
    lo_hi = ev.get("ci95", {}).get(key)
    if not lo_hi:
        return None
    method = _method_for(ev.get("ci95_method") or "", key)
    if method:   # over patients (LGG): the method says how, and that a slice is not the sample
        return f"95 % interval {lo_hi[0]:.1%} to {lo_hi[1]:.1%} ({method})."
    return (f"95 % interval {lo_hi[0]:.1%} to {lo_hi[1]:.1%} (Wilson): with this many scans, "
            "a few images either way move the figure by this much.")


def headline_metrics(ev: dict, gated: bool = True, refers: bool = True) -> list[tuple[str, str, str | None, str | None]]:
    """The Evaluation page's six headline figures as (label, value, help, count); 'n/a' where not
    defined. The count ('1 of 1') goes under a rate: a zip of 10 new scans read 'Sensitivity 100.0%'
    in large type over one tumour, its interval in a tooltip."""
    def shown(key: str, fmt: str) -> str:
        return format(ev[key], fmt) if ev.get(key) is not None else "n/a"

    def of(right: int | None, n: int | None) -> str | None:
        return f"{right:,} of {n:,}" if right is not None and n else None
    n_t, n_n, n_f = ev.get("n_tumour"), ev.get("n_normal"), ev.get("n_fine")
    acc = ev.get("accuracy")
    return [("Scans", f"{ev.get('n', 0):,}", scans_help(ev), None),
            ("Accuracy", shown("accuracy", ".1%"), interval_text(ev, "accuracy"),
             of(round(acc * n_f) if acc is not None and n_f else None, n_f)),
            ("Macro F1", shown("macro_f1", ".3f"), "Over the classes this set has images of; none for a set of one class", None),
            ("Tumours missed", shown("tumour_missed", "d"), missed_help(ev, gated, refers), of(ev.get("tumour_missed"), n_t)),
            ("Sensitivity", shown("sensitivity", ".1%"), interval_text(ev, "sensitivity"),
             of(n_t - ev["tumour_missed"] if n_t and ev.get("tumour_missed") is not None else None, n_t)),
            ("Specificity", shown("specificity", ".1%"), interval_text(ev, "specificity"),
             of(n_n - ev["normal_flagged"] if n_n and ev.get("normal_flagged") is not None else None, n_n))]


def flag_words(gated: bool, refers: bool) -> str | None:
    """The flags that can send a call for review, as a sentence names them: a model without a gate
    refuses only colour and blank images, one without a rule refers nothing (a review)."""
    names = [w for w, ok in (("'uncertain, refer'", refers), ("out-of-distribution", gated)) if ok]
    return " or ".join(names) + " flag" if names else None


def missed_help(ev: dict, gated: bool = True, refers: bool = True) -> str:
    """What 'tumours missed' counts: every tumour scan called 'no tumour', flagged or not, with how
    many of them a flag still sent for review (a clinician read 13 missed as 13 told 'no tumour')."""
    text = "Tumour scans predicted 'no tumour' at the sidebar's operating point, flagged or not"
    missed, silent = ev.get("tumour_missed"), ev.get("silent_misses")
    if missed and silent is not None:
        if (flags := flag_words(gated, refers)):
            k = missed - silent
            text += f": {k} of the {missed} {'carries' if k == 1 else 'carry'} an {flags}, {silent} none (silent misses)"
        else:
            text += ": this model has neither a gate nor a referral rule, so every one is a silent miss"
    return text + "."


def gate_scored(records: list[dict]) -> bool:
    """Whether an out-of-distribution gate scored these records (a model without one leaves
    ``ood_score`` empty, and refuses only colour and blank images)."""
    return any(r.get("ood_score") is not None for r in records)


def miss_metrics(ev: dict, gated: bool, refers: bool = True) -> list[tuple[str, str, str | None]]:
    """The false-negative tab's four figures as (label, value, help)."""
    refused = f"{ev.get('flagged_ood', 0):,} of {ev['n']:,}"
    if gated:
        ood = ("Out of distribution", refused,
               "Refused by the model's gate: the app gives these scans no call. Every figure on this page "
               "still counts the model's raw output for them."
               + (f" {ev['not_mri_flagged']} of them {'is' if ev['not_mri_flagged'] == 1 else 'are'} among the "
                  f"{ev['not_mri']} CT{'s' * (ev['not_mri'] != 1)} that the source filed as MRI (core/not_mri.txt), "
                  "where a flag is right." if ev.get("not_mri") else ""))
    else:
        ood = ("Refused (no gate)", refused,
               "This model has no out-of-distribution gate: only colour, blank and nearly empty images, marks "
               "drawn in colour and several slices in one image are refused, and any other image gets a call, "
               "whatever it shows.")
    # '0 of 0' read as a perfect record on a set with no scans of that side (Br35H's test tumours)
    n_t, n_n = ev.get("n_tumour"), ev.get("n_normal")
    return [("Tumours missed here", f"{ev['tumour_missed']:,} of {n_t:,}" if n_t else "n/a",
             missed_help(ev, gated, refers) if n_t else "No tumour scans here: none can be missed."),
            ("Normal scans flagged", f"{ev['normal_flagged']:,} of {n_n:,}" if n_n else "n/a",
             None if n_n else "No tumour-free scans here: none can be flagged."),
            ("Silent misses", f"{ev['silent_misses']:,} of {n_t:,}" if n_t and ev.get("silent_misses") is not None else "n/a",
             "Missed tumours with no out-of-distribution or uncertainty flag"
             + ("" if gated and refers else " (no gate here: only the uncertainty flag can speak)" if refers else
                " (no referral rule here: only the gate can speak)" if gated else
                " (neither a gate nor a referral rule here: no flag can speak)")),
            ood]


def referral_metrics(ev: dict, classes: list[str], rule: ReferralRule) -> list[tuple[str, str, str | None]]:
    """The calibration tab's two referral counts as (label, value, help); a set judged on fewer than
    two tumour types (``classes``), or a rule that never judges a type (`ReferralRule.judges_type`),
    has no type to be unsure of."""
    types = [c for c in tumour_classes(classes) if c != TUMOUR]
    judged = len(types) > 1 and rule.judges_type
    return [("Uncertain — refer for review", f"{ev.get('referred_uncertain', 0):,} of {ev['n']:,}",
             "The tumour / no-tumour call is not confident (tumour probability inside the card's referral "
             "band; top-class confidence for older cards)"),
            ("Tumour — type uncertain",
             f"{ev.get('referred_type_uncertain', 0):,} of {called:,} tumour calls" if judged and (called := tumour_calls(ev)) is not None
             else f"{ev.get('referred_type_uncertain', 0):,} of {ev['n']:,}" if judged else "n/a",
             "Called tumour, but the most likely type holds too little of the tumour probability (e.g. scans "
             "labelled only 'tumour')" if judged else
             _no_type_reason(types, rule))]


def tumour_calls(ev: dict) -> int | None:
    """How many scans were called tumour (found tumours plus flagged normals): a type can be in doubt
    only on those ('144 of 1397' read as a share of every scan)."""
    n_t, missed, flagged = ev.get("n_tumour"), ev.get("tumour_missed"), ev.get("normal_flagged")
    return None if None in (n_t, missed, flagged) else n_t - missed + flagged


def _no_type_reason(types: list[str], rule: ReferralRule) -> str:
    """Why the type-uncertain count is n/a: a set scored tumour vs no tumour (a yes/no zip) is judged
    on the call alone, though the model names types; else the model names none, or sets no level."""
    if len(types) < 2 and rule.judges_type:   # the model names types and judges them: not here
        return ("These scans are scored tumour vs no tumour (folders without a tumour type), so a tumour's "
                "type is not judged here; `python -m core evaluate` counts the model's type flags on them "
                "(referred_type_uncertain).")
    named = [c for c in tumour_classes(list(rule.classes) or types) if c != TUMOUR]
    return "This model names no tumour type." if len(named) < 2 else "This model's card sets no type-confidence level."


def no_miss_analysis(classes: list[str]) -> str:
    """Why the false-negative tab is empty: the model cannot call 'no tumour', or no label says."""
    if not has_tumour_decision(classes):
        return ("This model has no 'no tumour' class: every call names a class, none says the scan is "
                "clear, so there is no tumour it can miss that way and no false-negative analysis.")
    return "No tumour/no-tumour labels here, so no false-negative analysis."


def one_side_note(ev: dict) -> str | None:
    """A sentence for a set that holds one side only (BRISC's test scans are all tumour-free,
    Br35H's all tumours): its accuracy read as a perfect model, though it measures one rate."""
    n_t, n_n = ev.get("n_tumour") or 0, ev.get("n_normal") or 0
    if n_t and not n_n:
        return (("The one scan here is a tumour" if n_t == 1 else f"All {n_t} scans here are tumours")
                + ": nothing here says how often the model flags a healthy scan (no specificity).")
    if n_n and not n_t:
        return (("The one scan here is tumour-free" if n_n == 1 else f"All {n_n} scans here are tumour-free")
                + ": accuracy here is the share called 'no tumour' (the specificity); nothing here says how many "
                "tumours the model finds.")
    return None


def source_text(name: str | None) -> str:
    """A source as the Evaluation page's selector names it: its name and what it is."""
    if name is None:
        return "all sources"
    return f"{source_label(name)}: {SOURCE_NOTES[name]}" if name in SOURCE_NOTES else name


def scans_help(ev: dict) -> str | None:
    """The scans accuracy is over, where fewer than all: a label without a tumour type (Br35H's
    'yes') says nothing of the class, so such scans count in the tumour figures only."""
    n, n_fine = ev.get("n", 0), ev.get("n_fine")
    if not n_fine and n:  # a yes/no set (Br35H: 'yes' and a few 'no'), judged on the call alone (0 or absent)
        return (f"These {n:,} scans are labelled tumour / no tumour without a tumour type: they are judged on "
                "the tumour call alone (sensitivity, specificity, tumours missed); no accuracy, confusion "
                "matrix or calibration over the model's classes.")
    n_fine = n_fine or 0
    if n_fine == n:
        return None
    return (f"Accuracy, macro F1, the confusion matrix and the calibration are over the {n_fine:,} scans "
            f"labelled with a class of the model; the other {n - n_fine:,} are labelled only 'tumour' "
            "(type unknown) and count in sensitivity and tumours missed alone.")


def calibration_note(ev: dict) -> str | None:
    """Why an evaluation has no class reliability diagram: no scan's label names a class of the model."""
    if ev.get("reliability") or not ev.get("n"):
        return None
    return ("These scans are labelled without a tumour type, so whether the model's class is right "
            "cannot be judged: the calibration shown is the tumour probability's (does a scan given "
            "tumour probability p hold a tumour with frequency p?)" if ev.get("tumour_reliability")
            else "No reliability diagram or ECE: these scans carry no label the model's classes can judge.")


MID_CONFIDENCE = 0.9   # below it a top-class probability is "mid-range" for `reliability_note`


MIN_VERDICT = 20   # scans under the cut before the reliability note calls them over- or underconfident


def reliability_note(bins: list[dict]) -> str | None:
    """What the class reliability diagram says of the probabilities below `MID_CONFIDENCE`: few
    scans and, on the shipped models, overconfident. An ECE of 0.007 is a mean over bins where
    nearly every scan sits at 0.99, and a reader took a '66 %' at its word."""
    # whole bins below the cut (a bin's mean may sit above it while some of its scans do not)
    low = [b for b in bins if b.get("n") and b["hi"] <= MID_CONFIDENCE + 1e-9]
    n_low, total = sum(b["n"] for b in low), sum(b.get("n") or 0 for b in bins)
    if not n_low:
        return None
    cut = max(b["hi"] for b in low)
    conf = sum(b["confidence"] * b["n"] for b in low) / n_low
    right = sum(b["accuracy"] * b["n"] for b in low) / n_low
    reads = ("overconfident: read such a probability as less sure than it says" if right < conf - 0.05 else
             "underconfident: the model was right more often than it says" if right > conf + 0.05 else
             "about as often right as it says")
    # one scan 'right 0 % of the time' is no verdict on the model (a zip of 60 read 'overconfident')
    verdict = (f"so a mid-range probability here is {reads}" if n_low >= MIN_VERDICT else
               f"too few to say how far such a probability can be trusted (a verdict needs {MIN_VERDICT})")
    return (f"{n_low:,} of {total:,} scans ({n_low / total:.0%}) have a top-class probability under "
            f"{cut:.0%}: stated {conf:.0%} on average, right {right:.0%} of the time, {verdict}. "
            "Marker size: scans per bin (hover for the count).")


def per_class_table(ev: dict) -> pd.DataFrame:
    """Precision, recall, F1, specificity and support per class; '—' where a figure is not defined
    (a class with no scans has no recall: 'None' read as a finding)."""
    rows = [{"class": class_label(c), **{k: (f"{m[k]:.3f}" if finite_number(m.get(k)) else "—")
                            for k in ("precision", "recall", "f1", "specificity")}, "support": m.get("support", 0)}
            for c, m in ev.get("per_class", {}).items()]
    return pd.DataFrame(rows)


def _score_sets(records: list[dict], classes: list[str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, y_true, score) for each class one-vs-rest and for tumour vs no tumour; a tumour / no
    tumour model's (or a yes/no set's) is the last alone: its two one-vs-rest curves are that one
    (three identical curves in the legend)."""
    out = []
    fine = [r for r in records if r["label"] in classes]
    for c in ([] if len(classes) == 2 and NO_TUMOUR in classes else classes):
        y = np.array([r["label"] == c for r in fine])
        if 0 < y.sum() < len(y):
            out.append((class_label(c), y, np.array([r["probs"][c] for r in fine])))
    types = tumour_classes(classes)

    def t_prob(r: dict) -> float | None:   # a record written without it: the tumour classes' sum
        if r.get("tumour_probability") is not None:
            return r["tumour_probability"]
        return float(sum(r["probs"][c] for c in types)) if types and all(c in r["probs"] for c in types) else None
    known = [(r, t) for r in records if is_tumour_label(r["label"]) is not None and (t := t_prob(r)) is not None]
    y = np.array([bool(is_tumour_label(r["label"])) for r, _ in known])
    if known and 0 < y.sum() < len(y):
        out.append(("tumour vs no tumour", y, np.array([t for _, t in known])))
    return out


def roc_figure(records: list[dict], classes: list[str]) -> go.Figure:
    fig = go.Figure()
    for k, (name, y, s) in enumerate(_score_sets(records, classes)):
        fpr, tpr, _ = roc_curve(y, s)
        fig.add_scatter(x=fpr, y=tpr, mode="lines", name=f"{name} (AUC {auc(fpr, tpr):.3f})",
                        line=dict(color=PALETTE[k % len(PALETTE)],
                                  width=3 if name.startswith("tumour") else 1.5))
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="grey"),
                    showlegend=False)
    fig.update_xaxes(title="false positive rate", range=[0, 1])
    fig.update_yaxes(title="true positive rate", range=[0, 1.02])
    _say_if_empty(fig, records, classes)
    return _layout(fig, "ROC, one class against the rest", height=380 + 22 * len(fig.data), legend=LEGEND_BELOW)


def _say_if_empty(fig: go.Figure, records: list[dict], classes: list[str]) -> None:
    """An empty curve plot says why, instead of showing blank axes."""
    if not _score_sets(records, classes):
        fig.add_annotation(x=0.5, y=0.5, showarrow=False,
                           text="No curve: it needs scans of a class and of others (this set has one class)")


def pr_figure(records: list[dict], classes: list[str]) -> go.Figure:
    fig = go.Figure()
    for k, (name, y, s) in enumerate(_score_sets(records, classes)):
        prec, rec, _ = precision_recall_curve(y, s)
        fig.add_scatter(x=rec, y=prec, mode="lines",
                        name=f"{name} (AP {average_precision_score(y, s):.3f})",
                        line=dict(color=PALETTE[k % len(PALETTE)],
                                  width=3 if name.startswith("tumour") else 1.5))
    fig.update_xaxes(title="recall", range=[0, 1])
    fig.update_yaxes(title="precision", range=[0, 1.02])
    _say_if_empty(fig, records, classes)
    return _layout(fig, "Precision-recall", height=380 + 22 * len(fig.data), legend=LEGEND_BELOW)


def threshold_figure(curve: list[dict], threshold: float | None) -> go.Figure:
    """Miss rate and false-alarm rate against the threshold, the operating point marked."""
    t = [r["threshold"] for r in curve]
    fig = go.Figure()
    fig.add_scatter(x=t, y=[r["miss_rate"] for r in curve], name="missed tumours (miss rate)",
                    line=dict(color=PALETTE[3], width=3))
    fig.add_scatter(x=t, y=[r["false_alarm_rate"] for r in curve],
                    name="normal scans flagged (false-alarm rate)", line=dict(color=PALETTE[0]))
    if threshold is not None:
        # the label on the line's inner side: right of 0.9 it ran off the chart
        fig.add_vline(x=threshold, line=dict(color=MARK, dash="dash"),
                      annotation_text=f"operating point {threshold:.3f}",
                      annotation_position="top left" if threshold > 0.6 else "top right")
    fig.update_xaxes(title="threshold on the tumour probability", range=[0, 1])
    top = rate_axis_top(curve, threshold)
    fig.update_yaxes(title="rate" if top > 1 else f"rate (to {top:.0%}; double-click for all)",
                     range=[0, top], tickformat=".0%")
    return _layout(fig, "False negatives against the operating point", height=360, legend=LEGEND_BELOW)


def rate_axis_top(curve: list[dict], threshold: float | None) -> float:
    """Where the threshold chart's rate axis ends: 0-100 % laid a good model's 1.5 % miss rate and
    1.7 % false alarms flat on zero, so moving the point showed nothing (a clinician's check); the
    axis ends at the first of 5, 10, 20, 50 % that holds 3 times the rates at the operating point."""
    if threshold is None or not curve:
        return 1.02
    near = min(curve, key=lambda r: abs(r["threshold"] - threshold))
    worst = max(near.get("miss_rate") or 0.0, near.get("false_alarm_rate") or 0.0)
    return next((top for top in (0.05, 0.1, 0.2, 0.5) if 3 * worst <= top), 1.02)


def reliability_figure(bins: list[dict], ece: float | None, tumour: bool = False) -> go.Figure:
    """Reliability diagram of the top-class confidence, or with ``tumour`` of the tumour probability
    (bins of `metrics.reliability`: mean probability against the share right / the share tumours)."""
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="grey"),
                    name="perfect calibration")
    fig.add_scatter(x=[b["confidence"] for b in bins], y=[b["accuracy"] for b in bins],
                    mode="lines+markers", name="model", text=[f"n={b['n']}" for b in bins],
                    marker=dict(size=[6 + 14 * np.sqrt(b["n"] / max(1, max(x["n"] for x in bins)))
                                      for b in bins]), cliponaxis=False)   # the (1, 1) bin's marker whole
    fig.update_xaxes(title="tumour probability" if tumour else "confidence (top-class probability)", range=[0, 1])
    fig.update_yaxes(title="share that hold a tumour" if tumour else "accuracy", range=[0, 1.02])
    title = ("Tumour-probability reliability" if tumour else "Reliability") + (
        f" (ECE {ece:.3f})" if ece is not None and ece == ece else "")
    return _layout(fig, title, height=380, legend=LEGEND_BELOW)


def risk_coverage_figure(rows: list[dict]) -> go.Figure:
    fig = go.Figure(go.Scatter(x=[r["coverage"] for r in rows], y=[r["accuracy"] for r in rows],
                               mode="lines+markers",
                               text=[f"refer below confidence {r['min_confidence']:.2f}" for r in rows]))
    fig.update_xaxes(title="coverage (share of scans answered)", tickformat=".0%")
    # gridlines 0.5 % apart on a good model: whole percents labelled 99.5 % as "100%"; a flat line at
    # 100 % (a small zip) was drawn on an axis running to 200 %: no accuracy lies above 1
    lo = min((r["accuracy"] for r in rows if r.get("accuracy") is not None), default=0.0)
    pad = max(0.005, (1.0 - lo) * 0.1)
    fig.update_traces(cliponaxis=False)   # the points at 100 % drawn whole on an axis that ends there
    fig.update_yaxes(title="accuracy of the answered scans", tickformat=".1%", range=[max(0.0, lo - pad), 1.0])
    return _layout(fig, "Risk-coverage: refer the least confident", height=360)


# ----------------------------------------------------------------------------- training
def history_figures(history: list[dict], shipped_epoch: int | None = None,
                    averaged: bool = False) -> dict[str, go.Figure]:
    """Loss, accuracy and learning rate per epoch (train and validation); ``shipped_epoch``, the
    epoch whose weights were kept (the card's best_epoch; ``averaged``: then averaged with the
    parent run's), is marked on the loss and accuracy."""
    ep = [h["epoch"] for h in history]
    figs = {}
    for key, title in (("loss", "Loss"), ("acc", "Accuracy")):
        fig = go.Figure()
        for split, colour in (("train", PALETTE[0]), ("val", PALETTE[1])):
            ys = [(h.get(split) or {}).get(key) for h in history]   # "val": null where a run had none
            if any(y is not None for y in ys):
                fig.add_scatter(x=ep, y=ys, mode="lines+markers", name=split,
                                line=dict(color=colour))
        fig.update_xaxes(title="epoch")
        if shipped_epoch is not None:
            fig.add_vline(x=shipped_epoch, line=dict(color="grey", dash="dot"),
                          annotation_text=f"shipped: epoch {shipped_epoch}" + (" + parent" if averaged else ""),
                          # where the curves are not by then: losses fall, accuracies rise
                          annotation_position="top left" if key == "loss" else "bottom left")
        figs[key] = _layout(fig, title)
    lr = go.Figure(go.Scatter(x=ep, y=[h.get("lr") for h in history], mode="lines+markers"))
    lr.update_xaxes(title="epoch")
    lr.update_yaxes(title="learning rate", exponentformat="e")
    figs["lr"] = _layout(lr, "Learning rate")
    return figs


def overlay_histories(histories: dict[str, list[dict]], key: str = "acc") -> go.Figure:
    """One metric of several runs on one plot: validation solid, training dotted (seed 004's
    with/without augmentation figure)."""
    fig = go.Figure()
    for i, (name, history) in enumerate(histories.items()):
        colour = PALETTE[i % len(PALETTE)]
        ep = [h["epoch"] for h in history]
        # past the palette, another pair of dashes: the 8th run drew the 1st run's lines
        styles = [("val", "solid"), ("train", "dot")] if i < len(PALETTE) else [("val", "dash"), ("train", "dashdot")]
        for split, dash in styles:
            ys = [(h.get(split) or {}).get(key) for h in history]
            if any(y is not None for y in ys):
                fig.add_scatter(x=ep, y=ys, mode="lines", name=f"{name} ({split})",
                                line=dict(color=colour, dash=dash))
    fig.update_xaxes(title="epoch")
    return _layout(fig, {"acc": "Accuracy", "loss": "Loss"}.get(key, key), height=320 + 22 * len(histories),
                   legend=LEGEND_BELOW)


def benchmark_accuracy(row: dict, key: str = "accuracy") -> float | None:
    """4-class accuracy on the benchmark part of a model's test split: the per-source figure, or
    the overall one of a model that saw the benchmark alone. None for a model with other classes
    (a yes/no model's two-class accuracy is no figure to rank beside four-class ones).
    ``key``: "copy_free_accuracy" for the figures without copies in training."""
    if sorted(row.get("classes") or []) != sorted([*FINE_TUMOURS, NO_TUMOUR]):
        return None
    per = (row.get(f"{key}_per_source") or {}).get("benchmark")
    return per if per is not None else row.get(key) if row.get("sources") == ["benchmark"] else None


# models_table's columns that are rates (0-1), for the page's number format
RATE_COLUMNS = ("accuracy", "benchmark accuracy", "macro F1", "ECE", "copy-free accuracy", "copy-free benchmark accuracy")


def models_table(dirs: list[str | Path]) -> pd.DataFrame:
    """The `python -m core compare` rows (read from the cards, no timing) as a sortable table."""
    from .compare import compare_rows
    rows = []
    for r in compare_rows(dirs, latency=False):
        size, params, t = r.get("weights_file_bytes"), r.get("parameters"), r.get("train_time_s")
        # the figures the caption says to compare on come first: at laptop width the columns after
        # the tenth were off screen (a clinician's review)
        rows.append({"model": r["name"],
                     "copy-free accuracy": r.get("copy_free_accuracy"),
                     "copy-free benchmark accuracy": benchmark_accuracy(r, "copy_free_accuracy"),
                     "copy-free benchmark missed": r.get("copy_free_benchmark_missed"),
                     # every source's misses beside the benchmark's: '0 missed' read as the model's
                     # whole record where it missed 13, 10 of them LGG (a clinician's walkthrough)
                     "tumours missed": r.get("tumour_missed"), "of tumour scans": r.get("n_tumour"),
                     "classes": len(r["classes"]), "sources": "+".join(map(source_label, r["sources"])),
                     "test images": r.get("test_images"),
                     # accuracy's own count: Br35H's untyped tumours are in 'test images', not in it
                     "typed test images": r.get("typed_test_images"), "test set": r.get("test_set"),
                     "accuracy": r.get("accuracy"),
                     "benchmark accuracy": benchmark_accuracy(r),
                     "copies in training": r.get("copies_in_training"),
                     "macro F1": r.get("macro_f1"), "benchmark missed": r.get("benchmark_missed"),
                     "ECE": r.get("ece"), "parameters (M)": round(params / 1e6, 2) if params else None,
                     "size (MiB)": round(size / 2**20, 1) if size else None,
                     "CPU latency (ms)": r.get("latency_ms"),
                     "training (min)": round(t / 60, 1) if t else None,
                     "device": r.get("device"), "settings": r.get("settings")})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- batches
NO_CALL_OOD, NO_CALL_UNREADABLE = "no call: not like its training scans", "no call: unreadable"
NO_CALL_HEADER = "no call: its DICOM header says it is no brain MRI"


# The called class's calibrated probability, as the batch table heads it: 'confidence 0.883' beside
# 'uncertain, refer' read as a contradiction (a clinician's walkthrough). The CSV keeps 'confidence'.
CALL_PROBABILITY = "probability of the call"
TUMOUR_PROBABILITY, HIGHEST_TUMOUR_PROBABILITY = "tumour probability", "highest tumour probability"   # the pages format them


def batch_table(results: list[dict]) -> pd.DataFrame:
    """File, prediction, flags, tumour probability and confidence for a batch (errors included);
    with a volume in the batch, the slice each row is about and how it was chosen. A scan with no
    call says why in its prediction cell: an empty one read 'None', which reads as 'no finding'."""
    # a file of a series uploaded one file per slice: which series, which slice (the series table
    # says 'highest at #12', and nothing led from there to a file)
    in_series = {i: f"series {k}, instance {'?' if inst is None else inst}"
                 for i, (k, inst) in series_positions(results).items()}
    rows = []
    for r in results:
        if not r.get("ok"):
            rows.append({"file": r["file"], "prediction": NO_CALL_UNREADABLE, "slice": "", TUMOUR_PROBABILITY: None,
                         CALL_PROBABILITY: None, "flags": "error: " + r.get("error", "")})
            continue
        # the report's words (one vocabulary for the table, its CSV, the PDF and the CLI); an
        # out-of-distribution scan has no referral or type flag (no call to refer or doubt), only
        # the other-slices and seen-in-training notes beside it
        flags = flag_labels(r)
        called = r.get("in_distribution", True)  # a refused scan's raw output is no result to list
        info = r.get("info") or {}
        where = ", ".join(w for w in (slice_words(info), volume_words(info, short=True)) if w)
        if id(r) in in_series:
            where = in_series[id(r)]
        rows.append({"file": r["file"], "slice": where if shown_slice(info) is not None or id(r) in in_series else "",
                     "prediction": (call_label(r["pred"], r.get("type_uncertain", False)) if called
                                    else NO_CALL_HEADER if refused_by_header(r) else NO_CALL_OOD),
                     TUMOUR_PROBABILITY: r.get("tumour_probability") if called else None,
                     CALL_PROBABILITY: _call_probability(r) if called else None, "flags": ", ".join(flags)})
    # the call's probability (a narrow bar) and its flags beside it: at laptop width (1400 px) the
    # columns after a long flag were off screen
    columns = ["file", "prediction", TUMOUR_PROBABILITY, "flags", "slice", CALL_PROBABILITY]
    if not any(row.get("slice") for row in rows):   # no volume: no column of blanks
        columns.remove("slice")
    return pd.DataFrame(rows, columns=columns)


def _call_probability(row: dict) -> float | None:
    """The probability of what the row calls: a tumour of uncertain type is called on the tumour
    probability, not on its likeliest type's share of it."""
    return row.get("tumour_probability") if row.get("type_uncertain") else row.get("confidence")


SERIES_COLUMNS = ["series", "files", "tumour called", "slices called tumour", HIGHEST_TUMOUR_PROBABILITY,
                  "highest at", "out of distribution", "uncertain"]


def _slice_label(row: dict) -> str:
    instance = (row.get("info") or {}).get("instance")
    return f"#{instance}" if instance is not None else row["file"]


def series_groups(results: list[dict]) -> list[list[dict]]:
    """The DICOM series with two or more files in a batch, in order of first upload, each by
    Instance Number: 'series 1' of the series table is the first."""
    groups: dict[str, dict[str, dict]] = {}
    for r in results:
        key = (r.get("info") or {}).get("series") if r.get("ok") else None
        if key:  # a file given twice, under one name or two (its content hash where known), is one slice
            groups.setdefault(key, {}).setdefault(r.get("sha256") or r["file"], r)
    order = lambda r: ((r.get("info") or {}).get("instance", float("inf")), r["file"])  # noqa: E731
    return [sorted(m.values(), key=order) for m in groups.values() if len(m) > 1]


def series_positions(results: list[dict]) -> dict[int, tuple[int, object]]:
    """{id(row): (its series' number in the batch, its Instance Number or None)} for the files of
    `series_groups`: the batch table, its CSV and the PDF pages name them alike."""
    return {id(r): (k, (r.get("info") or {}).get("instance"))
            for k, members in enumerate(series_groups(results), 1) for r in members}


def series_table(results: list[dict], listed: int = 8) -> pd.DataFrame:
    """One row per DICOM series that has two or more files in a batch (a series exported one
    file per slice): how many slices are called tumour, and which, by Instance Number; the
    highest tumour probability and where; the slices refused or referred. A tumour called on
    any slice is a tumour call for the scan, however clear the others look."""
    rows = []
    for members in series_groups(results):
        called = [r for r in members if r.get("in_distribution", True)]
        tumour = [_slice_label(r) for r in called if is_tumour_label(r["pred"])]
        scored = [r for r in called if r.get("tumour_probability") is not None]
        best = max(scored, key=lambda r: r["tumour_probability"], default=None)
        rows.append({"series": f"series {len(rows) + 1}", "files": len(members), "tumour called": len(tumour),
                     "slices called tumour": ", ".join(tumour[:listed]) + (", ..." if len(tumour) > listed else ""),
                     HIGHEST_TUMOUR_PROBABILITY: best["tumour_probability"] if best else None,
                     "highest at": _slice_label(best) if best else None,
                     "out of distribution": len(members) - len(called),
                     "uncertain": sum(bool(r.get("uncertain")) for r in called)})
    return pd.DataFrame(rows, columns=SERIES_COLUMNS)


def is_missed_tumour(record: dict) -> bool:
    """A tumour the call does not name as one: 'no tumour', or a class that is neither (a 'stroke')."""
    return bool(is_tumour_label(record["label"])) and not is_tumour_label(record["pred"])


def readable(value, unit: str = "") -> str | None:
    """A card value as text for a reader: {'train': 3996, 'val': 855} -> 'train 3996, val 855';
    None (and an empty dict or list) -> None, so that the caller leaves the line out."""
    if value is None or (isinstance(value, (dict, list, tuple)) and not value):
        return None
    if isinstance(value, dict):
        parts = [f"{k} {readable(v, unit)}" for k, v in value.items() if readable(v) is not None]
        return ", ".join(parts) or None
    if isinstance(value, (list, tuple)):
        return ", ".join(t for v in value if (t := readable(v, unit)) is not None) or None
    if isinstance(value, float):
        return f"{value:g}{unit}"
    return f"{value}{unit}"


# What the served path refuses besides the gate (core.inference.marks_reason, panels_reason)
CAPTURE_RULES = ("With or without a gate, a scan is also refused when a reader's marks are drawn on it in colour, "
                 "or when it holds several slices side by side (a viewer's layout or a montage): the model reads "
                 "marks as lesions, and one slice at a time.")


# each part of a gate's method in plain words (the Model card named `cnn+head+colour` and no more)
GATE_PARTS = {"cnn": "a small network trained to tell brain MRI slices from other images",
              "head": "a check on the classifier's own features, trained the same way",
              "colour": "a rule refusing colour images",
              "mahalanobis": "the distance of the classifier's features from the training scans'",
              "knn": "the distance of the classifier's features from their nearest training scans'",
              "energy": "how strongly the classifier answers at all (its logits' energy)",
              "maxprob": "the classifier's top probability"}


def ood_summary(ood: dict) -> str:
    """The gate in sentences, from its card section; a measurement the card lacks is left out."""
    method = ood.get("method", "n/a")
    parts = [GATE_PARTS[m] for m in method.split("+") if m in GATE_PARTS]
    text = (f"Method `{method}`" + (f" ({'; '.join(parts)})" if parts else "")
            + ". Flags at most 2 % of each source's validation MRI.")
    measured = ood.get("measured") or {}
    flagged = readable({source_label(k): v for k, v in (measured.get("test_mri_flagged_pct") or {}).items()}, " %")
    if flagged:
        text += f" Test MRI flagged per source: {flagged}."
    elif measured.get("max_test_mri_flagged_pct") is not None:  # a version-1 card
        text += f" Test MRI flagged: at most {measured['max_test_mri_flagged_pct']} % in any source."
    if measured.get("unseen_mean_pct") is not None:  # version 1: categories the gate never trained on
        text += (f" Kinds of image it never trained on, flagged: mean {measured['unseen_mean_pct']} %, "
                 f"worst {measured.get('unseen_min_pct', 'n/a')} %.")
    est = ood.get("held_out_estimate") or {}
    rates = readable({"mean": est.get("non_brain_mean_pct", est.get("mean_pct")),
                      "worst": est.get("non_brain_min_pct", est.get("min_pct"))}, " %")
    if rates:
        text += (" Images that are not brain MRI, each kind measured by a gate that never saw it, "
                 f"flagged: {rates}.")
    return text


# What the shared sources are, for a reader who does not know the datasets by their short names
SOURCE_NOTES = {
    "benchmark": "public 4-class set (figshare, SARTAJ, Br35H), mostly T1 with contrast",
    "br35h": "Br35H scans: tumours of a type not given, and 12 tumour-free (a split may hold none of these in test)",
    "lgg": "TCGA lower-grade glioma FLAIR slices of three sites, tumour and tumour-free slices of the same patients",
    "brisc": "BRISC 2025 tumour-free scans, mostly T1, three planes",
}


def sources_readable(card: dict) -> pd.DataFrame:
    """The card's sources for a reader: images per split, a narrow table (`source_notes` says the rest:
    with its sentences and folder maps the table needed a sideways scroll on a phone)."""
    return pd.DataFrame([{"source": source_label(s.get("name", "?")),
                          **{f"{k} images": v for k, v in (s.get("images") or {}).items()}}
                         for s in card.get("sources", [])])


def source_notes(card: dict) -> list[str]:
    """One markdown line a source: what it is and which folder trains which class."""
    out = []
    for s in card.get("sources", []):
        folders = ", ".join(f"{k} → {class_label(v)}" for k, v in (s.get("label_map") or {}).items())
        what = SOURCE_NOTES.get(s.get("name"), "")
        out.append(f"**{source_label(s.get('name', '?'))}**: " + (f"{what}. " if what else "")
                   + (f"Folders → classes: {folders}." if folders else ""))
    return out


def preprocessing_text(spec: dict) -> str:
    """The card's preprocessing in one sentence."""
    crop = "cropped to the head, " if spec.get("crop", "head") == "head" else ""
    return (f"Read as greyscale (the card's rule: {spec.get('grey', 'luminance')}); {crop}resized to "
            f"{spec.get('size')} x {spec.get('size')} px; intensities normalised with mean {spec.get('mean')} "
            f"and standard deviation {spec.get('std')}, as in training.")


def calibration_line(card: dict) -> str:
    """`calibration_text` for the Model card, with what temperature scaling does in plain words
    (the PDF's one-line cell keeps the short form)."""
    from .inference import calibration_text, temperature
    return calibration_text(card) + "." + (
        " Temperature scaling: one number, fitted on the validation scans, rescales the model's scores so "
        "that a stated 80 % is right about 80 % of the time." if temperature(card) is not None else "")


def referral_text(card: dict) -> str:
    """The card's 'uncertain, refer' rule in words, with what it did on validation."""
    u = card.get("uncertainty") or {}
    def pct(key: str) -> str:
        return f"{u[key]:.1%}" if finite_number(u.get(key)) else "?"
    if not (finite_number(u.get("lo")) and finite_number(u.get("hi"))):
        return (f"Uncertain, refer: when the probability of the class called is below {u['min_confidence']:.3f}"
                + (f" (on validation: {pct('val_referred')} of scans referred)" if finite_number(u.get("val_referred"))
                   else "") + "." if finite_number(u.get("min_confidence")) else
                "This model has no 'uncertain, refer' rule.")
    text = (f"Uncertain, refer: when the tumour probability lies between {u['lo']:.3f} and {u['hi']:.3f}, "
            f"a band around the operating point, set on validation so that few calls outside it are wrong (there: "
            f"{pct('val_referred')} of scans referred, {pct('val_error_kept')} wrong among the rest).")
    if finite_number(u.get("min_type_confidence")):
        text += (f" Tumour type uncertain: when the likeliest type holds less than {u['min_type_confidence']:.0%} "
                 f"of the tumour probability ({pct('type_val_referred')} of validation tumours).")
    return text


# (label, format) of each test figure the Model card page lists; '—' where a set has none (a
# source of tumour-free scans has no sensitivity, one without tumour types no accuracy)
METRIC_COLUMNS = {"n": ("scans", ",d"), "accuracy": ("accuracy", ".1%"), "sensitivity": ("sensitivity", ".1%"),
                  "specificity": ("specificity", ".1%"), "tumour_missed": ("tumours missed", "d"),
                  "silent_misses": ("missed with no flag", "d"), "ece": ("calibration error", ".3f")}


def metrics_readable(card: dict) -> pd.DataFrame:
    """The card's test figures, all sources then each, one row each, as text ('—': not defined)."""
    m = card.get("metrics") or {}
    rows = [("all sources", m)] + [(source_label(k), v) for k, v in sorted((m.get("per_source") or {}).items())]
    def cell(r: dict, k: str, fmt: str) -> str:
        v = r.get(k)
        if k == "accuracy" and not finite_number(r.get("sensitivity")) and finite_number(r.get("specificity")):
            return "—"   # tumour-free scans only (BRISC): its '100 %' is the specificity, not an accuracy
        if k == "accuracy" and finite_number(v) and finite_number(r.get("n_fine")) and r["n_fine"] != r.get("n"):
            return f"{v:.1%} (of {r['n_fine']:,} typed)"   # untyped tumours (Br35H) are in 'scans', not in this
        if k == "ece" and not finite_number(v) and finite_number(r.get("tumour_ece")):
            return f"{r['tumour_ece']:.3f} (tumour prob.)"   # no types (Br35H): the tumour probability's, as the README
        return format(v, fmt) if finite_number(v) else "—"
    return pd.DataFrame([{"test set": name, **{label: cell(r, k, fmt) for k, (label, fmt) in METRIC_COLUMNS.items()}}
                         for name, r in rows if isinstance(r, dict)])


def split_text(split: dict) -> str:
    """How the card's split kept copies apart, from its recorded method: older splits grouped near
    duplicates and patients only, not mirrored copies (their test sets hold many copies)."""
    method = str(split.get("method", ""))
    kept = ("near duplicates, mirrored or turned copies and one patient's slices" if "mirrored" in method else
            "near duplicates and one patient's slices (not mirrored or turned copies)")
    sizes = readable(split.get("sizes"))
    return f"by groups, not by image: {kept} go to one side" + (f"; sizes {sizes}" if sizes else "") + "."


def saliency_and_speed(card: dict) -> list[str]:
    """The card's saliency default with its check against tumour masks, and its recorded CPU latency:
    what the Diagnose page uses and how fast it serves, said on the Model card page."""
    from .compare import card_latency
    from .saliency import default_method, measured_default
    lines = []
    sal = card.get("saliency") or {}
    if measured_default(card):
        m = sal.get("measured") or {}
        checked = (f": its map peaks within {m.get('dilate_px', '?')} px of the {source_label(m.get('source', '?'))} tumour mask on "
                   f"{m['pointing_game']:.0%} of {m.get('n_slices', '?')} test slices, with {m['energy_in_mask']:.0%} "
                   "of its mass inside" + (" (it points at a lesion; most of its weight lies outside it, so it "
                                           "is no outline of one)" if m["energy_in_mask"] < 0.5 else "")
                   if finite_number(m.get("pointing_game")) and finite_number(m.get("energy_in_mask")) else "")
        chosen = (", chosen on the validation patients' slices (every method's figures: the model's "
                  "saliency_eval.json, docs/generalisation.md)" if m.get("chosen_on") == "val" else "")
        lines.append(f"Saliency: {sal['default_method']} by default{checked}{chosen} (`python -m core saliency-check`). "
                     + untested_words(card))
    elif sal.get("default_method") and sal.get("beats_floors") is False:
        m = sal.get("measured") or {}
        score = f" ({m['pointing_game']:.0%})" if finite_number(m.get("pointing_game")) else ""
        lines.append(f"Saliency: {sal['default_method']} scored best against tumour masks{score}, but no better than "
                     f"a map that ignores the model; {default_method(card)} is shown by default, and no map of this "
                     "model is known to point at tumours.")
    else:
        lines.append("Saliency: no method was checked against tumour masks for this model (or the card names one "
                     f"this version lacks); {default_method(card)} is shown by default.")
    if (ms := card_latency(card)) is not None:
        what = (card.get("benchmark") or {}).get("what", "single-image CPU pass")
        lines.append(f"Speed: {ms:.1f} ms, {what} (`python -m core compare --record`).")
    return lines


def build_caption(card: dict, weights_sha256: str) -> str:
    """Size, weights hash, libraries and date of a model, in one line."""
    libraries = readable(card.get("libraries"))
    params, size = card.get("parameters"), card.get("weights_file_bytes")
    return ((f"{params / 1e6:.2f} M parameters" if params is not None else "parameters not recorded")
            + ", weights " + (f"{size / 2**20:.1f} MiB" if size is not None else "of unrecorded size")
            + f", sha256 {weights_sha256[:16]}..."
            + (f", libraries {libraries}" if libraries else "") + f", built {card.get('date', '?')}")


# The gate's outlier categories (core/outliers.py) for a reader; "drawn" ones are generated images.
OUTLIER_NAMES = {
    "blank": "blank images", "noise": "noise", "gradient": "gradients", "shapes": "drawn shapes",
    "text": "text", "pattern": "patterns", "photo": "photos", "photo_unseen": "photos, a second set",
    "mri_inverted": "brain MRI, inverted", "mri_patch": "a patch cut from a brain MRI",
    "mri_solarised": "brain MRI, solarised", "head_ct": "head CT look-alikes (drawn)",
    "real_head_ct": "a real head CT", "real_head_ct_top": "a real head CT, its upper slices",
    "scan_ct": "head CTs filed as MRI in the sources", "scan_ct_test": "those head CTs, test files",
    "ultrasound": "ultrasound (drawn)", "chart": "charts", "screenshot": "screenshots",
    "scanned_document": "scanned documents", "medical_photo": "medical photos (microscopy, retina)",
    "chest_xray": "chest X-rays (drawn)", "abdominal_ct": "abdominal CT (drawn)",
    "shepp_logan": "Shepp-Logan phantom", "elevation_map": "elevation maps",
    "real_medical": "real non-brain DICOM images",
}


def ood_table(card: dict) -> pd.DataFrame:
    """The gate's rate per outlier category: as shipped (on fresh draws) and held out (measured by
    a gate that never trained on that category), so that a reader sees what it has never seen."""
    ood = card.get("ood") or {}
    shipped = (ood.get("measured") or {}).get("outliers_flagged_pct", {})
    held = (ood.get("held_out_estimate") or {}).get("per_category", {})
    on = ood.get("trained_on") or {}
    # gates fitted before the key was renamed record it as negatives_seen_categories
    trained = set(on.get("negative_categories") or on.get("negatives_seen_categories") or [])
    return pd.DataFrame([{"category": OUTLIER_NAMES.get(c, c.replace("_", " ")), "trained on": c in trained,
                          "% flagged, held out": held.get(c), "% flagged, shipped gate": shipped.get(c)}
                         for c in dict.fromkeys([*held, *shipped])])
