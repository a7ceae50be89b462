"""The status strip on every page: where the loaded model stands on the path, each step a link to its page."""
from __future__ import annotations

import streamlit as st

from shrink_core.results.overview import next_step, steps

from . import state
from .data import store

DONE_ICON, TODO_ICON = ":material/check_circle:", ":material/radio_button_unchecked:"


def status_strip(pages: dict) -> None:
    """`pages`: step key -> st.Page. One row of links, then one sentence on the next step (none when all are done)."""
    spec = state.model_spec()
    all_steps = steps(store().overview(spec))
    columns = st.columns(len(all_steps))
    for column, step in zip(columns, all_steps):
        column.page_link(pages[step.key], label=f"{step.label}: {step.detail}",
                         icon=DONE_ICON if step.done else TODO_ICON)
    upcoming = next_step(all_steps)
    if upcoming is not None:
        st.caption(f"`{spec}` · next: {upcoming.todo}")
