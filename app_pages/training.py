"""Training: learning curves of the loaded model and a comparison of every shipped model."""
import streamlit as st

from core import app_support as app
from core.dashboard import history_figures, models_table

st.title("Training")
predictor = app.current_predictor()
if predictor is not None:
    st.subheader(f"Learning curves: {predictor.name}")
    history = app.load_history(predictor.dir)
    if history:
        figs = history_figures(history)
        a, b, c = st.columns(3)
        a.plotly_chart(figs["loss"], key="loss")
        b.plotly_chart(figs["acc"], key="acc")
        c.plotly_chart(figs["lr"], key="lr")
        tr = predictor.card.get("training", {})
        st.caption(f"{len(history)} epochs, {tr.get('optimizer', '?')} with {tr.get('schedule', '?')}"
                   f" schedule, batch {tr.get('batch_size', '?')}, on {tr.get('device', '?')}"
                   f" in {tr.get('train_time_s', 0) / 60:.1f} min.")
    else:
        st.info(f"No history.json in {predictor.dir}.")

st.subheader("Every model")
cards = app.all_cards()
if cards:
    st.dataframe(models_table(cards), hide_index=True, column_config={
        "accuracy": st.column_config.NumberColumn(format="%.3f"),
        "macro F1": st.column_config.NumberColumn(format="%.3f"),
        "sensitivity": st.column_config.NumberColumn(format="%.3f"),
        "specificity": st.column_config.NumberColumn(format="%.3f")})
    st.caption("Metrics from each card's held-out test split at its own operating point; "
               "different cards may use different test data.")
else:
    st.info("No trained models under weights/ yet.")
