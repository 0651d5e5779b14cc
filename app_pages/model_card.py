"""Model card: what the loaded model is for, what it was trained on, how well it does, limits."""
import streamlit as st

from core import app_support as app
from core import dashboard as dash
from core.inference import calibration_text

st.title("Model card")
predictor = app.required_predictor()
card = predictor.card
st.subheader(f"{card.get('name', predictor.dir.name)} ({card.get('arch')}, {card.get('version', '')})")
if (note := app.unreadable_note(card)):
    st.warning(note)

st.markdown("#### Intended use")
st.write(card.get("intended_use", "Research and teaching demo; not for diagnosis."))
st.markdown("#### Limits")
st.markdown(
    "- Not a medical device; never a substitute for a radiologist.\n"
    f"- Knows only these classes: {', '.join(card['classes'])}. Other pathology (metastases, "
    "stroke, haemorrhage...) will be forced into one of them unless flagged.\n"
    "- One 2D slice at a time; no patient history, no other sequences.\n"
    "- Trained on public datasets whose scanners, sequences and populations may differ from "
    "yours; numbers below hold for data like the test split only.")

st.markdown("#### Data and sources")
st.dataframe(dash.sources_table(card), hide_index=True)
split = card.get("split", {})
sizes = dash.readable(split.get("sizes"))
st.markdown(f"**Split**: {split.get('method', 'n/a')}" + (f"; sizes {sizes}" if sizes else ""))

a, b = st.columns(2)
with a:
    st.markdown("#### Preprocessing")
    st.json(card.get("preprocessing", {}))
    st.markdown("#### Calibration")
    st.markdown(calibration_text(card))
    st.json(card.get("calibration", {}) | ({"test_time_augmentation": card["tta"]} if card.get("tta") else {}))
with b:
    st.markdown("#### Operating point and uncertainty")
    st.json({"operating_point": card.get("operating_point", {}),
             "uncertainty": card.get("uncertainty", {})})
    st.markdown("#### Test metrics")
    if (copies := app.copies_note(predictor.dir)):
        st.caption(copies)
    if (problem := app.eval_problem(predictor.dir)):
        st.warning(problem)
    st.json(dash.overall_metrics(card))
    if card.get("metrics", {}).get("per_source"):
        with st.expander("Per source"):
            st.json(card["metrics"]["per_source"])

ood = card.get("ood")
st.markdown("#### Out-of-distribution gate")
if not ood:
    st.write("This model has no out-of-distribution gate: only colour, blank and nearly empty images "
             "are refused; every other grey upload gets a prediction, whatever it shows.")
else:
    st.write(dash.ood_summary(ood))
    st.dataframe(dash.ood_table(card), hide_index=True)

for line in dash.saliency_and_speed(card):
    st.write(line)

st.markdown("#### How it was made")
st.code(card.get("command", "n/a"), language="bash")
st.caption(dash.build_caption(card, predictor.weights_sha256))
st.download_button("Download card.json", (predictor.dir / "card.json").read_bytes(), "card.json",
                   "application/json", on_click="ignore")
