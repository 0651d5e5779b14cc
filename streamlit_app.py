"""Brain-tumour MRI classifier: the app's entry point, router and home page.

Run with ``streamlit run streamlit_app.py``. The sidebar holds the two settings every page
shares: which model, and the operating point (threshold on the tumour probability).
"""
from pathlib import Path

import streamlit as st

from core import runtime  # first: process memory settings, before torch is imported
from core.app_support import (card_threshold, class_wording, current_predictor, default_file_problem,
                              env_weights_problem, follow_model_threshold, hand_set_warning, hand_threshold_note, home_figures, keep_widget_value,
                              metric_rows, model_choices, model_label, one_source_warning, operating_point_text,
                              predictor_problem, reset_threshold, threshold_moved, training_sources)
from core.inference import load_card
from core.labels import class_label, source_label

# Pages relative to this file, not to the entry point: cloud/streamlit_app.py runs this file too.
HERE = Path(__file__).resolve().parent
st.set_page_config(page_title="Brain tumour MRI classifier", page_icon=":material/neurology:", layout="wide")

PAGES = {
    "diagnose": st.Page(HERE / "app_pages/diagnose.py", title="Diagnose", icon=":material/search:"),
    "evaluation": st.Page(HERE / "app_pages/evaluation.py", title="Evaluation", icon=":material/analytics:"),
    "training": st.Page(HERE / "app_pages/training.py", title="Training", icon=":material/show_chart:"),
    "card": st.Page(HERE / "app_pages/model_card.py", title="Model card", icon=":material/description:"),
}


def sidebar() -> None:
    """Model chooser (when there is a choice) and the shared operating point.

    The values live in plain session keys ('weights_dir', 'threshold') that every page reads;
    the widgets only write to them, so the choice holds whatever page is shown.
    """
    state = st.session_state
    if (problem := env_weights_problem()):
        st.sidebar.warning(problem, icon=":material/warning:")
    choices = [str(d) for d in model_choices()]
    if not choices:
        st.sidebar.error("No trained model found. Train one with `python train.py` "
                         "(it writes weights/<name>/) or set BT_WEIGHTS to a weights folder.")
        state.pop("weights_dir", None)
        return
    if (problem := default_file_problem()):
        st.sidebar.warning(problem, icon=":material/warning:")
    if state.get("weights_dir") not in choices:
        state["weights_dir"] = choices[0]
    if len(choices) > 1:
        st.sidebar.selectbox("Model", choices, index=choices.index(state["weights_dir"]),
                             key="_model_widget", on_change=keep_widget_value, args=("weights_dir", "_model_widget"),
                             format_func=model_label)
    if (problem := predictor_problem(state["weights_dir"])):  # no operating point for a model that cannot run
        st.sidebar.error(problem, icon=":material/error:")
        return
    card = load_card(state["weights_dir"])
    default = card_threshold(card)
    if default is None:
        st.sidebar.caption("This model has no tumour/no-tumour classes: no operating point.")
        return
    follow_model_threshold(state["weights_dir"], default)
    widget = f"_threshold_widget_{state.get('_threshold_rev', 0)}"  # new key = fresh widget
    st.sidebar.slider("Operating point: flag a tumour when its probability is at least",
                      0.0, 1.0, value=float(state["threshold"]), step=0.001, format="%.3f", key=widget,
                      on_change=keep_widget_value, args=("threshold", widget),
                      help="Lower it to miss fewer tumours at the cost of more false alarms.")
    if threshold_moved(state["threshold"], default):   # kept per model: coming back to one brings it back
        st.sidebar.warning(hand_set_warning(current_predictor(), state["threshold"]), icon=":material/tune:")
    st.sidebar.caption(operating_point_text(card, default))
    st.sidebar.button("Reset to the card's value", on_click=reset_threshold, args=(default,))


def home() -> None:
    st.title("Brain tumour MRI classifier")
    st.warning("A research and teaching demo, **not a medical device**. It must not be used to "
               "diagnose, triage or treat anyone. Every result needs review by a qualified "
               "clinician.", icon=":material/warning:")
    pred = current_predictor()
    # The chosen model's own classes: a tumour/no-tumour model names no tumour type.
    shows = (f"whether it shows **{class_wording(pred.classes)}**" if pred is not None
             else "which of its classes it shows")
    st.markdown(
        "Upload a brain MRI slice (JPEG, PNG, DICOM, NIfTI or a zip of them) and the model "
        f"estimates {shows}, "
        "with calibrated probabilities, flags for scans it should not judge, and a saliency "
        "map of the regions that drove the answer. It sees one 2D slice at a time, knows "
        "only the classes it was trained on, and can be confidently wrong on scans unlike "
        "its training data.")
    if pred is not None:
        card = pred.card
        st.header(f"Loaded model: {pred.name} ({card.get('arch', '?')})")
        figures, note = home_figures(pred)
        metric_rows([(label, value, None) for label, value in figures.items()])
        st.caption(f"{note} Classes: {', '.join(map(class_label, pred.classes))} · input {pred.spec['size']} px grey · "
                   f"trained on {', '.join(map(source_label, training_sources(card))) or 'n/a'}")
        if (moved := hand_threshold_note(pred, st.session_state.get("threshold"))):
            st.info(moved, icon=":material/tune:")
        if (narrow := one_source_warning(pred)):
            st.warning(narrow, icon=":material/warning:")
    st.header("Pages")
    for page, what in ((PAGES["diagnose"], "upload scans, see predictions, flags and saliency"),
                       (PAGES["evaluation"], "confusion matrix, ROC, missed tumours, calibration"),
                       (PAGES["training"], "learning curves and a comparison of every model"),
                       (PAGES["card"], "intended use, data, preprocessing, limits")):
        # the page's name alone as the link: "Diagnose: upload scans, ..." was cut mid-word on a phone
        st.page_link(page, label=page.title, icon=page.icon)
        st.caption(what)


sidebar()
nav = st.navigation([st.Page(home, title="Home", icon=":material/home:", default=True), *PAGES.values()])
try:
    nav.run()
finally:  # st.stop() and reruns end a run by raising
    runtime.trim()  # an idle server keeps no freed memory of its last run
