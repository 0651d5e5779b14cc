"""Diagnose: upload scans (or pick built-in samples) and see each prediction with its evidence."""
import streamlit as st

from core import app_support as app
from core.dashboard import (CALL_PROBABILITY, HIGHEST_TUMOUR_PROBABILITY, PLAIN_CHART, TUMOUR_PROBABILITY, batch_table,
                            probability_bar, series_table, slice_profile, slice_profile_caption, tumour_gauge)
from core.inference import BEST_SLICE
from core.labels import class_label, class_word, is_tumour_call
from core.metrics import apart
from core.report import tp_column_format, volume_words

DETAILED = 6  # batches up to this size show every file in full; larger ones show one chosen file

st.title("Diagnose")
predictor = app.required_predictor(", so nothing can be predicted")
threshold = app.session_threshold(predictor)
st.caption("Research demo, not a medical device: every result needs a clinician's review. "
           "Files are processed in memory and never stored.")
for warning in filter(None, (app.no_rule_out_warning(predictor.classes), app.no_gate_warning(predictor),
                             app.one_source_warning(predictor))):
    st.warning(warning, icon=":material/warning:")

# No type filter: scanner exports often have no extension; the reader goes by content.
uploads = st.file_uploader("Upload scans: JPG, PNG, BMP, TIFF, WebP, GIF, DICOM, NIfTI or a zip",
                           accept_multiple_files=True, help=app.UPLOAD_HELP, key="diagnose_uploads",
                           on_change=app.keep_uploads, args=("diagnose_uploads",))
files, kept = app.uploaded_files(uploads)
if kept:
    left, right = st.columns([3, 1])
    left.caption(f"{kept} file(s) below were uploaded before you left this page"
                 + (", the others since." if kept < len(files) else "."))
    right.button("Clear them", on_click=app.forget_uploads)
samples = app.sample_scans()
picked = st.multiselect("...or try built-in sample scans (one per class, from the test split)",
                        list(samples))
files += app.sample_files(picked)
if not files:
    st.info("Upload one or more scans, or pick a sample, to see a prediction.")
    st.stop()


def pick_slice(pos: int, name: str, data) -> tuple[int | None, str | None]:
    """Slice slider (at the slice the reader shows by default, as the CLI does) and 'most
    tumour-like' toggle for volumes: (slice, how it was chosen), (None, None) for a 2D image."""
    n, default = app.cached_volume_slices(data, name) if isinstance(data, bytes) else (1, 0)
    if n <= 1:
        return None, None
    key = app.widget_key(pos, name, data)
    too_long = n > app.MAX_SLICES   # not scored whole: there is no most tumour-like slice to find
    if st.toggle("Most tumour-like slice", key=f"best-{key}", disabled=too_long,
                 help=f"Not for a volume of more than {app.MAX_SLICES} slices: move the slider." if too_long else None):
        best, text = app.cached_best_slice(predictor, data, name)
        if best is not None:
            st.caption(text)
            app.remember_slice(key, best, BEST_SLICE, predictor)
            return best, BEST_SLICE
        st.warning(text)
    last, _ = app.remembered_slice(key)
    k = st.slider(f"Slice or frame (of {n}, numbered from 0)", 0, n - 1, default if last is None else last,
                  key=f"s-{key}")
    app.remember_slice(key, k)
    return k, None


def show_refusal(pred, key: str, unchecked: str | None = None) -> None:
    """An out-of-distribution scan gets no call of any kind (no gauge, referral or saliency):
    the warning, and the raw output folded away."""
    st.warning(f"**Out of distribution**: {pred.ood_reason or app.PIXEL_OOD_REASON} "
               "Its output is **not a diagnosis**.", icon=":material/block:")
    if unchecked:   # the volume's other slices: not scored
        st.warning(unchecked, icon=":material/warning:")
    with st.expander("Raw model output, not a diagnosis"):
        st.plotly_chart(probability_bar(pred.probs), key=f"p-{key}", config=PLAIN_CHART)
        st.caption(app.probabilities_text(pred.probs))


def show_call(pred, key: str, level: str, contradiction: str | None = None, unchecked: str | None = None) -> None:
    """The call under a heading of ``level`` ('##' alone, '###' under a batch's own H2), with its
    referral flags, probabilities and the tumour gauge; ``contradiction``:
    what an uploaded tumour mask says against a 'no tumour' call; ``unchecked``: that a volume's
    other slices were not scored (`app.unchecked_note`)."""
    if pred.uncertain:   # read before the call: an uncertain call is a referral first
        st.warning("**Uncertain — refer for review**: "
                   f"{predictor.referral.describe_call(pred, uncertain=True)}.", icon=":material/warning:")
    # a type in doubt must not read as firmly as the call: the tumour is called, its type suggested
    st.markdown(f"{level} Prediction: **Tumour**, type uncertain (likeliest: {class_word(pred.pred)})" if pred.type_uncertain
                else f"{level} Prediction: **{class_label(pred.pred)}**")
    if why := app.call_note(pred, predictor.classes):   # the call is the tumour decision, not the top bar
        st.caption(why)
    if unchecked:   # under the call: a clear slice is no clear volume
        st.warning(unchecked, icon=":material/warning:")
    flagged = is_tumour_call(pred.pred, predictor.classes)   # the call itself (decided in float64)
    if pred.tumour_probability is not None and not flagged and (note := app.miss_note(predictor, threshold)):
        st.warning(note, icon=":material/warning:")   # under the call, not below the charts: a missed tumour is the worst error
    if contradiction:
        st.error(contradiction, icon=":material/error:")
    if note := app.end_slice_note(pred.info, pred.pred, predictor.classes):   # the call shown, at this threshold
        st.info(note, icon=":material/help:")
    if pred.type_uncertain:
        st.info("**Tumour — type uncertain**: "
                f"{predictor.referral.describe_call(pred, type_uncertain=True)}. The tumour call stands; "
                "read the type as a suggestion.", icon=":material/help:")
    st.plotly_chart(probability_bar(pred.probs, pred.pred), key=f"p-{key}", config=PLAIN_CHART)
    st.caption(app.probabilities_text(pred.probs))   # the bars' figures as text: a chart alone reaches no screen reader
    if pred.tumour_probability is not None:
        st.plotly_chart(tumour_gauge(pred.tumour_probability, threshold, flagged, pred.uncertain),
                        key=f"g-{key}", config=PLAIN_CHART)
        tp, op = apart(pred.tumour_probability, threshold)   # enough decimals to differ: never "0.995 ... 0.995"
        # where to move it: on a phone the sidebar is a small icon, and nothing on the page said so
        st.caption(f"Tumour probability {tp}, operating point {op} (the vertical mark; set in the sidebar): "
                   + ("**tumour flagged**" if flagged else "not flagged")
                   + ("; **referred for review**" if pred.uncertain else ""))


def show(pos: int, name: str, data, shown: tuple[int | None, str | None], mask: bytes | None, alone: bool) -> dict:
    """One file in full: image, prediction, flags, probabilities, saliency. Returns its row.
    ``pos`` (its place in the batch) keys the widgets: the same scan may come twice. ``shown``:
    a volume's slice and how it was chosen (`pick_slice`); ``mask``: its paired tumour mask;
    ``alone``: the only file (not one of a batch)."""
    slice_index = shown[0]
    row, scan, pred = app.analyse_upload(predictor, name, data, threshold, slice_index, mask, shown[1])
    if scan is None:
        st.error(f"**{app.md_name(name)}**: {row['error']}")
        return row
    if (read := volume_words(scan.info)):   # a 4D file: a series in time, or several sequences
        st.info(f"**{app.md_name(name)}** holds {scan.info['n_volumes']} volumes: {read}. "
                "Export the volume you mean as its own file to read another.", icon=":material/info:")
    wkey = app.widget_key(pos, name, data)
    left, right = st.columns([1, 2])
    said = f" ({scan.kind}, {scan.pixels.shape[1]} x {scan.pixels.shape[0]} px)"
    left.image(scan.pixels, clamp=True, width="stretch", caption=app.md_name(name) + said,
               alt=f"The uploaded scan, {name}{said}")
    with right:
        if row.get("seen_in_training"):
            st.info(f"**Seen in training**: {app.SEEN_TEXT}", icon=":material/school:")
        if pred.in_distribution:
            show_call(pred, f"{wkey}-{slice_index}", "##" if alone else "###",
                      app.mask_contradiction(pred, scan, mask, predictor.spec, slice_index),
                      app.unchecked_note(row))
        else:
            show_refusal(pred, f"{wkey}-{slice_index}", app.unchecked_note(row))
    if pred.in_distribution:
        app.saliency_panel(predictor, scan, app.item_key(name, data), pred, slice_index,
                           mask=mask, widget_key=wkey, scope=alone)
    if slice_index is not None:  # after the result: scoring every slice of a volume takes seconds
        with st.spinner("Checking the volume's other slices..."):
            alert = app.volume_alert(predictor, data, name, threshold, slice_index, pred.in_distribution)
        if alert:
            st.warning(alert, icon=":material/warning:")
        profile = app.volume_profile(predictor, data, name) if predictor.is_tumour_model and row.get("ok") else None
        if profile:
            with st.expander("Tumour probability across the slices", expanded=bool(alert)):
                scores, shares = profile
                st.plotly_chart(slice_profile(scores, threshold, slice_index, shares),
                                key=f"profile-{wkey}-{slice_index}", config=PLAIN_CHART)
                st.caption(slice_profile_caption())
    return row

items, masks = app.pair_masks(app.expand_uploads(files))  # X_mask.tif outlines X.tif
if masks:
    st.caption(f"{len(masks)} tumour mask(s) paired with their scans (X_mask.* beside X.*, or a two-valued X.png beside X.jpg): "
               "outlined on the saliency maps, not predicted.")
# the slice on screen per volume, and how it was chosen: the table and the report show the same
slices: dict[int, tuple[int | None, str | None]] = {}
if len(items) == 1:
    slices[0] = pick_slice(0, *items[0])
    results = [show(0, *items[0], slices[0], masks.get(items[0][0]), alone=True)]
elif len(items) <= DETAILED:
    summary, results = st.container(), []
    for pos, (name, data) in enumerate(items):
        with st.expander(app.md_name(name), expanded=True):
            slices[pos] = pick_slice(pos, name, data)
            results.append(show(pos, name, data, slices[pos], masks.get(name), alone=False))
else:
    summary = st.container()
    slices, results = app.analyse_batch(predictor, items, threshold, masks)
    problems = st.container()   # filled below: from the rows as the details leave them
    ok = [k for k, r in enumerate(results) if r["ok"]]
    if ok:
        k = st.selectbox("Show the details of", ok, format_func=lambda i: items[i][0])
        with st.container(border=True):
            slices[k] = pick_slice(k, *items[k])
            results[k] = show(k, *items[k], slices[k], masks.get(items[k][0]), alone=False)  # the table follows the slice shown
    with problems:
        for kind, text in app.batch_problems(results):
            if kind == "error":
                st.error(text)
            else:
                st.warning(text, icon=":material/warning:")
if len(items) > 1:
    with summary:
        st.header(f"{len(items)} files, {sum(r['ok'] for r in results)} read")
        st.caption(f"Saliency maps: {app.saliency_scope(predictor.card)}")   # once, not under each file's map
        table = batch_table(results)
        tp_format = tp_column_format(results)  # decimals enough to tell each from its threshold
        st.dataframe(table, hide_index=True, placeholder="—", column_config={   # an unreadable file's empty cells
            # long names pushed the call's probability, or on a tablet the flags, off the table's right
            "file": st.column_config.TextColumn(width="medium"),
            "slice": st.column_config.TextColumn("slice (numbered from 0)"),
            TUMOUR_PROBABILITY: st.column_config.ProgressColumn(format=tp_format, min_value=0, max_value=1),
            CALL_PROBABILITY: st.column_config.NumberColumn(format="%.3f")})
        st.download_button("Download the table (CSV)", app.results_csv(results, predictor), "predictions.csv",
                           "text/csv", on_click="ignore")
        series = series_table(results)
        if len(series):
            st.markdown("**DICOM series** (several files of one series, one slice each)")
            st.caption("A tumour called on any slice is a tumour call for the series, however "
                       "clear its other slices look. Slices are named by Instance Number.")
            st.dataframe(series, hide_index=True, placeholder="—", column_config={
                HIGHEST_TUMOUR_PROBABILITY: st.column_config.NumberColumn(format=tp_format)})

if any(r["ok"] for r in results):  # a report of nothing but unreadable files helps no one
    app.report_downloads(items, predictor, threshold, slices, results, masks)
