"""The shrink dashboard: builds the navigation and nothing else."""
import streamlit as st

st.set_page_config(page_title="shrink", page_icon="🗜️", layout="wide")
pages = [
    st.Page("app_pages/model.py", title="Model", icon="🧱", default=True),
    st.Page("app_pages/evalsets.py", title="Eval sets", icon="📚"),
    st.Page("app_pages/sensitivity.py", title="Sensitivity", icon="🌡️"),
    st.Page("app_pages/plan.py", title="Plan", icon="🎛️"),
    st.Page("app_pages/distill.py", title="Distill", icon="⚗️"),
    st.Page("app_pages/results.py", title="Results", icon="📈"),
]
st.navigation(pages).run()
