"""Training: learning curves of the loaded model and a comparison of every shipped model."""
import streamlit as st

from core import app_support as app
from core.compare import COPIES_NOTE
from core.dashboard import CHART_CONFIG, RATE_COLUMNS, history_figures, models_table, overlay_histories

st.title("Training")
predictor = app.current_predictor()
if predictor is not None:
    st.header(f"Learning curves: {predictor.name}")
    if (note := app.unreadable_note(predictor.card)):
        st.warning(note)
    history = app.load_history(predictor.dir)
    if history:
        figs = history_figures(history, *app.shipped_epoch(predictor.card))
        a, b, c = st.columns(3)
        a.plotly_chart(figs["loss"], key="loss", config=CHART_CONFIG)
        b.plotly_chart(figs["acc"], key="acc", config=CHART_CONFIG)
        c.plotly_chart(figs["lr"], key="lr", config=CHART_CONFIG)
        st.caption(app.training_caption(predictor.card, len(history)))
        if (note := app.loss_note(predictor.card.get("training", {}))):
            st.caption(note)
    else:
        st.info(f"No readable history.json in {predictor.dir}.")

st.header("Every model")
dirs = [str(d) for d in app.model_choices()]
if dirs:
    st.dataframe(models_table(dirs), hide_index=True, placeholder="—", column_config={
        c: st.column_config.NumberColumn(format="%.3f") for c in RATE_COLUMNS})
    st.caption("The rows of `python -m core compare weights/*`, from each card's held-out test split at "
               f"its own operating point. {COPIES_NOTE} Rows with different test-set codes were tested on different "
               "images, so a gap between them is not a paired comparison: `python -m core compare A B "
               "--paired` compares two models on the images both were tested on. Accuracy, macro F1 and ECE count the "
               "typed test images only (Br35H's tumours have no type: they count in the tumour figures). A yes/no model's benchmark accuracy cells "
               "read '—': its two-class accuracy is no figure to rank beside four-class ones. Latency as recorded "
               "by `compare --record` (1 thread; cards recorded before 2026-12-03 timed the fp32 forward alone).")

    st.header("Learning curves side by side")
    runs = app.histories(dirs)
    chosen = st.multiselect("Runs", list(runs), default=app.default_runs(runs, predictor),
                            help="e.g. cnn_bn_aug against cnn_bn_noaug: the augmentation study")
    if chosen:
        hist = {n: runs[n] for n in chosen}
        a, b = st.columns(2)
        a.plotly_chart(overlay_histories(hist, "acc"), key="cmp_acc", config=CHART_CONFIG)
        b.plotly_chart(overlay_histories(hist, "loss"), key="cmp_loss", config=CHART_CONFIG)
else:
    st.info("No trained models under weights/ yet.")
