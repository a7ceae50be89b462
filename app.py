"""The shrink dashboard: builds the navigation and the status strip every page shares, and nothing else."""
import streamlit as st

from ui.status import status_strip

st.set_page_config(page_title="shrink", page_icon=":material/compress:", layout="wide")
# Material icons: they ship with Streamlit's font, so they render in every browser (emoji glyphs are missing in some).
pages = {
    "model": st.Page("app_pages/model.py", title="Model", icon=":material/deployed_code:", default=True),
    "evalsets": st.Page("app_pages/evalsets.py", title="Eval sets", icon=":material/library_books:"),
    "sensitivity": st.Page("app_pages/sensitivity.py", title="Sensitivity", icon=":material/thermostat:"),
    "plan": st.Page("app_pages/plan.py", title="Plan", icon=":material/tune:"),
    "distill": st.Page("app_pages/distill.py", title="Distill", icon=":material/science:"),
    "results": st.Page("app_pages/results.py", title="Results", icon=":material/monitoring:"),
}
current = st.navigation(list(pages.values()))
status_strip(pages)
current.run()
