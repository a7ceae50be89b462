"""The shrink dashboard: builds the navigation and nothing else."""
import streamlit as st

st.set_page_config(page_title="shrink", page_icon="🗜️", layout="wide")
pages = [
    st.Page("pages/model.py", title="Model", icon="🧱", default=True),
    st.Page("pages/evalsets.py", title="Eval sets", icon="📚"),
    st.Page("pages/sensitivity.py", title="Sensitivity", icon="🌡️"),
    st.Page("pages/plan.py", title="Plan", icon="🎛️"),
    st.Page("pages/distill.py", title="Distill", icon="⚗️"),
    st.Page("pages/results.py", title="Results", icon="📈"),
]
st.navigation(pages).run()
