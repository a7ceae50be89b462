"""A job's progress bar, ETA and Cancel button, polled in a fragment so the page stays responsive."""
from __future__ import annotations

import streamlit as st

from shrink_core.errors import ShrinkError
from shrink_core.runtime import jobs
from shrink_core.runtime.jobs import log_path, log_tail

from .data import store

PART_NOUNS = {"eval": "slices", "sweep": "evaluations", "sensitivity": "slices", "plan_loop": "rounds", "llama_mixes": "mixes"}


def _parts_key(job_id: int) -> str:
    return f"parts-shown:{job_id}"


def _eta(seconds: float | None) -> str:
    if seconds is None:  # the job's ETA comes from its measured rate, once there is enough progress to measure
        return "estimating"
    if seconds < 90:
        return f"about {seconds:.0f} s left"
    return f"about {seconds / 60:.0f} min left"


@st.fragment(run_every=1.0)
def job_panel(job_id: int, label: str) -> None:
    """Shows a running job; reruns the whole page once it ends so the page can show the result."""
    db = store()
    jobs.reap(db)
    job = jobs.get(db, job_id)
    if job is None:
        return
    if job.active:
        if job.status == "queued":  # waits for a free slot: say where it stands, not a made-up ETA
            try:
                text = f"{label}: {jobs.queue_message(db, job_id) or 'queued'}"
            except ShrinkError as exc:
                text = f"{label}: queued; {exc}"
        else:
            text = f"{label}: {job.message or job.status} ({job.progress:.0%}, {_eta(job.eta_s)})"
        parts = job.parts_text(PART_NOUNS.get(job.kind, "parts"))
        st.progress(job.progress, text=f"{text}. {parts}" if parts else text)
        if len(job.parts) > st.session_state.get(_parts_key(job_id), len(job.parts)):
            st.rerun(scope="app")  # a part was stored: the page shows it now, not when the whole job ends
        if job.cancel_requested:
            st.caption("Cancelling...")
        elif st.button("Cancel", key=f"cancel-{job_id}"):
            jobs.cancel(db, job_id)
            st.rerun(scope="fragment")
        return
    st.session_state[f"seen-end:{job_id}"] = True
    if not st.session_state.get(f"rerun-done:{job_id}"):
        st.session_state[f"rerun-done:{job_id}"] = True
        st.rerun(scope="app")


def job_outcome(job_id: int) -> None:
    """One sentence for a failed or cancelled job (and which of its parts it kept), with the log behind a toggle."""
    job = jobs.get(store(), job_id)
    if job is None or job.status == "done" or job.active:
        return
    kept = job.parts_text(PART_NOUNS.get(job.kind, "parts"))
    kept = f" {kept[0].upper()}{kept[1:]}; those are stored and shown." if job.parts else ""
    if job.status == "cancelled":
        st.warning((job.error or "Cancelled.") + kept)
        return
    st.error((job.error or "The job failed.") + kept)
    if st.toggle("Show details", key=f"details-{job_id}"):
        st.caption(f"The last lines of {log_path(job_id)}:")
        st.code(log_tail(job_id), language="text")


def show_job(job_id: int | None, label: str):
    """The progress panel while a job runs, its one-sentence outcome once it ended; returns the job (or None)."""
    if job_id is None:
        return None
    job = jobs.get(store(), job_id)
    if job and job.active:
        st.session_state[_parts_key(job_id)] = len(job.parts)  # what this run of the page shows already
        job_panel(job_id, label)
    job_outcome(job_id)
    return job


def memory_admission(predict, description: dict | None) -> bool:
    """The job's predicted peak memory as a caption beside its button, or its one refusing sentence; True when
    refused (the button is then disabled). `predict` returns a Footprint or raises ShrinkError."""
    if description is None:
        return False  # the model is not described yet (it is loading): nothing to predict from
    from shrink_core.perf.footprint import available_bytes, facts_from_description

    try:
        need = predict()
    except ShrinkError as exc:
        st.error(str(exc))
        return True
    device = facts_from_description(description).device  # a GPU job's room is the GPU's
    available = available_bytes(device)
    room = f" of {available / 1e9:.1f} GB available{'' if device == 'cpu' else ' on ' + device}" if available else ""
    st.caption(f"Predicted peak memory: {need.describe()}{room} (projected from the inventory and the settings; "
               "perf/footprint.py).")
    return False
