"""The sweep control: a list of plans x slices -> candidates on the Results page, on the session's executor."""
from __future__ import annotations

import streamlit as st

from shrink_core.evaluation.slices import list_slices
from shrink_core.plan.presets import preset_names
from shrink_core.runtime import jobs
from ui import state
from ui.data import store
from ui.jobs import show_job


def sweep_panel(spec: str) -> None:
    db = store()
    executor = state.executor()
    running = show_job(state.job_id("sweep"), "Sweep")
    with st.expander("Sweep: score many plans on many slices", expanded=running is not None and running.active):
        saved = {f"saved: {p['name']}": p["body"] for p in db.plans()}
        draft = state.plan_draft()
        options = [f"preset:{name}" for name in preset_names()] + list(saved) + (["the Plan page's draft"]
                                                                                  if draft else [])
        cols = st.columns([3, 2, 1])
        chosen = cols[0].multiselect("Plans", options, key="sweep_plans",
                                     help="presets, saved plans (the planner's at several budgets: save each from the "
                                          "Plan page) and the current draft; each becomes one candidate")
        slices = cols[1].multiselect("Slices", [s.id for s in list_slices()], default=["en"], key="sweep_slices")
        protocol = cols[2].selectbox("Protocol", ["fast", "standard", "full"], key="sweep_protocol")
        st.caption(f"Runs on the **{executor['kind']}** executor (change it on the Model page): each plan is applied "
                   f"once, then scored on each slice; every result is stored as it arrives.")
        busy = running is not None and running.active
        if st.button("Run the sweep", key="sweep_run", disabled=busy or not chosen or not slices):
            bodies = [saved.get(c) or (draft if c == "the Plan page's draft" else c) for c in chosen]
            state.set_job_id("sweep", jobs.submit(db, "sweep", "shrink_core.runtime.sweep:sweep_job", {
                "spec": spec, "plans": bodies, "slices": slices, "budget": protocol, "executor": executor}))
            st.rerun()
