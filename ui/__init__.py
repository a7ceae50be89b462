"""Streamlit helpers: session state, cached readers, job widgets, figure builders. Pages stay thin."""
