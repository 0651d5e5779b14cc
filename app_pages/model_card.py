"""Model card: what the loaded model is for, what it was trained on, how well it does, limits."""
import streamlit as st

from core import app_support as app
from core import dashboard as dash
from core.labels import class_word

st.title("Model card")
predictor = app.required_predictor()
card = predictor.card
st.header(f"{card.get('name', predictor.dir.name)} ({card.get('arch')}, {card.get('version', '')})")
if (note := app.unreadable_note(card)):
    st.warning(note)

st.markdown("### Intended use")
st.write(card.get("intended_use", "Research and teaching demo; not for diagnosis."))
st.markdown("### Limits")
st.markdown(
    "- Not a medical device; never a substitute for a radiologist.\n"
    f"- Knows only these classes: {', '.join(map(class_word, card['classes']))}. Other pathology (metastases, "
    "stroke, haemorrhage...) will be forced into one of them unless flagged.\n"
    + (f"- {no_rule_out}\n" if (no_rule_out := app.no_rule_out_warning(card['classes'])) else "") +
    "- One 2D slice at a time; no patient history, no other sequences.\n"
    "- Trained on public datasets whose scanners, sequences and populations may differ from "
    "yours; numbers below hold for data like the test split only.")

st.markdown("### Data and sources")
sources = dash.sources_readable(card)   # a table, not a grid: nothing cut off
st.table(sources.set_index("source") if "source" in sources else sources)
st.markdown("\n".join(f"- {line}" for line in dash.source_notes(card)))
split = card.get("split", {})
st.markdown(f"**Split**: {dash.split_text(split)}")
if (untested := (card.get("data_notes") or {}).get("classes_not_tested")):
    st.warning(f"**Classes with no validation or test image**: {untested}")
with st.expander("How the split was made"):
    st.write(split.get("method", "n/a"))

st.markdown("### Test results")
if (copies := app.copies_note(predictor)):
    st.caption(copies)
if (problem := app.eval_problem(predictor.dir)):
    st.warning(problem)
st.dataframe(dash.metrics_readable(card), hide_index=True, placeholder="—")
st.caption("At the card's operating point; '—': not defined for that set (no tumour scans, no tumour-free ones, or "
           "no tumour types). Sensitivity: tumour scans called tumour; specificity: tumour-free scans "
           "called tumour-free; missed with no flag: tumours called 'no tumour' with no referral or "
           "out-of-distribution flag; calibration error (ECE): how far stated probabilities are from observed rates "
           "(of the called class; of the tumour probability for a set with no tumour types).")

st.markdown("### How a scan is read and called")
lines = [("Preprocessing", dash.preprocessing_text(predictor.spec)), ("Calibration", dash.calibration_line(card)),
         ("Operating point", app.operating_point_text(card, predictor.threshold) if predictor.threshold is not None
          else "none: the top class is the call."), ("Referral", dash.referral_text(card))]
st.markdown("\n".join(f"- **{k}**: {v}" for k, v in lines))
with st.expander("The card's raw fields"):
    st.json({k: card.get(k) for k in ("preprocessing", "calibration", "tta", "operating_point", "uncertainty",
                                       "metrics") if card.get(k) is not None})

ood = card.get("ood")
st.markdown("### Out-of-distribution gate")
if not ood:
    st.write("This model has no out-of-distribution gate: only colour, blank and nearly empty images, marks "
             "drawn in colour and several slices in one image are refused; every other grey upload gets a "
             "prediction, whatever it shows.")
else:
    st.write(dash.ood_summary(ood))
    st.dataframe(dash.ood_table(card), hide_index=True)
st.caption(dash.CAPTURE_RULES)

for line in dash.saliency_and_speed(card):
    st.write(line)

st.markdown("### How it was made")
st.code(card.get("command", "n/a"), language="bash")
st.caption(dash.build_caption(card, predictor.weights_sha256))
st.download_button("Download card.json", (predictor.dir / "card.json").read_bytes(), "card.json",
                   "application/json", on_click="ignore")
