"""Evaluation: the model's test-set results (eval.json) or a labelled zip, at the session's
operating point: confusion, per-class scores, ROC/PR, missed tumours, calibration."""
import streamlit as st

from core import app_support as app
from core import dashboard as dash

st.title("Evaluation")
predictor = app.required_predictor()
threshold = app.session_threshold(predictor)
classes, rule = predictor.classes, predictor.referral

where = app.sticky_choice("Data", ["card", "zip"], "eval_data", horizontal=True, format_func={
    "card": "the model's held-out test set (eval.json)",
    "zip": "a labelled zip of my own (one folder per class)"}.get)
blobs = None
if where == "card":
    stored = app.load_eval(predictor.dir)
    if stored is None:
        st.warning(app.eval_problem(predictor.dir)
                   or f"{predictor.dir}/eval.json is missing: train.py writes it after training.")
        st.stop()
    records = stored["predictions"]
else:
    up = st.file_uploader("Labelled zip: <class>/<image> inside", type=["zip"])
    if up is not None and st.button("Evaluate", type="primary"):
        bar = st.progress(0.0, text="Evaluating the zip's scans...")
        try:
            held = app.evaluate_zip(predictor, up.name, up.getvalue(),
                                    progress=lambda f: bar.progress(f, text=f"{f:.0%} evaluated"))
        except app.ScanError as e:
            st.error(f"{app.md_name(up.name)}: {e}")
            st.stop()
        app.keep_result("zip_eval", predictor, held)
    held, dropped = app.held_result("zip_eval", predictor)  # another model's results are dropped
    if held is None:
        st.info(("The zip's results came from another model and were cleared: "
                 + ("press Evaluate to run it through this one." if up is not None else
                    "upload it again and press Evaluate.")) if dropped else
                "Upload a zip with one folder per class (e.g. glioma/, notumor/) and press Evaluate.")
        st.stop()
    if stale := app.unscored_upload(held, up):
        st.info(stale)
        st.stop()
    st.caption(f"Results of {app.md_name(held['name'])}.")
    if held["skipped"]:
        (st.caption if app.only_junk(held["skipped"]) else st.error)(app.skipped_summary(held["skipped"]))
        with st.expander("The files left out"):
            for s in held["skipped"][:200]:
                st.markdown(f"{app.md_name(s['file'])}: {s['error']}")
    records, blobs = held["ev"]["predictions"], held["blobs"]
    classes, rule = app.zip_view(held, predictor)
    if held.get("layout_note"):
        st.warning(held["layout_note"], icon=":material/warning:")
    if held.get("split_note"):
        st.caption(held["split_note"])
    if held["ev"].get("scored_as"):
        st.caption(f"Folders without a tumour type: scored {held['ev']['scored_as']}.")
    if not records:
        st.error(f"No scan in {app.md_name(held['name'])} could be evaluated.")
        st.stop()

kept, n_copies = app.without_copies(records)
if n_copies and where == "zip":
    st.warning(f"{n_copies} of the zip's scans have the file name or the very bytes of an image the model trained "
               "or was validated on: most likely the same images, which score higher than new patients' scans would.",
               icon=":material/warning:")
if n_copies and app.sticky_toggle(f"Leave out the {n_copies} {'test ' if where == 'card' else ''}scans with a copy "
                                  "in training", "eval_no_copies",
                                  help="The public sets hold near duplicates and mirrored, turned, re-framed or "
                               "re-contrasted copies of their own images, across collections too; a test "
                               "scan whose copy was trained on is a scan the model has already seen, not a "
                               "new patient's."):
    records = kept
if not records:
    st.info(f"Every {'test ' if where == 'card' else ''}scan here has a copy in training: switch the toggle off "
            "to see them.")
    st.stop()
sources = app.sources_of(records)
source = app.sticky_choice("Source", [None, *sources], "eval_source", st.selectbox,
                           format_func=dash.source_text) if len(sources) > 1 else None
ev, shown = app.evaluation_view(records, classes, threshold, source, rule)

gated, refers = dash.gate_scored(shown), bool(rule and rule.refers)   # which flags these misses could carry
app.metric_rows(dash.headline_metrics(ev, gated, refers))
st.caption(f"All numbers at the operating point {threshold:.3f} (sidebar)." if threshold is not None
           else "This model has no operating point: plain top-class predictions.")
if note := dash.scans_help(ev):   # in plain sight: the confusion matrix below covers fewer scans than the headline
    st.caption(note)
if note := dash.one_side_note(ev):   # 100 % on BRISC's tumour-free scans is a specificity, not a perfect model
    st.info(note)
if note := app.accepted_note(ev, records, classes, threshold, source, rule):
    st.caption(note)

t1, t2, t3, t4 = st.tabs(["Confusion", "ROC and PR", "False negatives", "Calibration"])
with t1:
    if ev.get("confusion"):
        st.plotly_chart(dash.confusion_heatmap(ev["confusion"], classes), key="cm", config=dash.CHART_CONFIG)
        st.dataframe(dash.per_class_table(ev), hide_index=True, placeholder="—")
    else:
        st.info(dash.scans_help(ev) or "These labels name no model class: see the false-negative tab.")
with t2:
    a, b = st.columns(2)
    a.plotly_chart(dash.roc_figure(shown, classes), key="roc", config=dash.CHART_CONFIG)
    b.plotly_chart(dash.pr_figure(shown, classes), key="pr", config=dash.CHART_CONFIG)
with t3:
    if "threshold_curve" in ev:
        app.metric_rows(dash.miss_metrics(ev, gated, refers), per_row=2)
        st.plotly_chart(dash.threshold_figure(ev["threshold_curve"], threshold), key="thr",
                        config=dash.CHART_CONFIG)
    else:
        st.info(dash.no_miss_analysis(classes))
    if (refused := app.refused_lines(shown)):   # named whatever the model: the page's note points here
        with st.expander(f"The {len(refused)} scan{'s' * (len(refused) != 1)} refused as out of distribution"):
            st.caption("The check judges how a scan looks, not whether the classifier trained on it: it "
                       "refuses up to about 2 % of each source's brain MRI, training images included.")
            st.markdown("\n".join(f"- {line}" for line in refused))
    app.gallery(predictor, shown, threshold, blobs)
with t4:
    a, b = st.columns(2)
    for col, (label, value, help_text) in zip((a, b), dash.referral_metrics(ev, classes, rule)):
        col.metric(label, value, help=help_text)
    if ev.get("reliability"):
        a.plotly_chart(dash.reliability_figure(ev["reliability"], ev.get("ece")), key="rel", config=dash.CHART_CONFIG)
        if (mid := dash.reliability_note(ev["reliability"])):
            a.caption(mid)
    elif ev.get("tumour_reliability"):
        a.plotly_chart(dash.reliability_figure(ev["tumour_reliability"], ev.get("tumour_ece"), tumour=True),
                       key="rel", config=dash.CHART_CONFIG)
    if (why := dash.calibration_note(ev)):
        a.info(why)
    if ev.get("risk_coverage"):
        b.plotly_chart(dash.risk_coverage_figure(ev["risk_coverage"]), key="rc", config=dash.CHART_CONFIG)
        b.caption("Scans ranked by the probability of the class called at the operating point (for sets "
                  "without types, of the tumour / no-tumour side called), the least sure referred first. "
                  "At full coverage it reads the accuracy above (for sets without types, the share of right "
                  "tumour / no-tumour calls: on a set of tumours alone, the sensitivity), so it moves with the "
                  "operating point.")
