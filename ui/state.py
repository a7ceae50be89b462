"""Typed accessors for st.session_state, so pages never spell keys by hand."""
from __future__ import annotations

import streamlit as st

from shrink_core.model.load import DEFAULT_SPEC
from ui.data import store


def model_spec() -> str:
    return st.session_state.get("model_spec", DEFAULT_SPEC)


def set_model_spec(spec: str) -> None:
    st.session_state["model_spec"] = spec


def job_id(slot: str) -> int | None:
    return st.session_state.get(f"job:{slot}")


def set_job_id(slot: str, job_id: int | None) -> None:
    st.session_state[f"job:{slot}"] = job_id


def plan_draft() -> str | None:
    """The plan being edited, as YAML text (what the plan file will say); pages hand plans to each other here.

    A new session (a browser reload) or another model starts from that model's draft saved in the store."""
    spec = model_spec()
    if st.session_state.get("plan_draft_spec") != spec:
        st.session_state["plan_draft"] = store().draft(spec)
        st.session_state["plan_draft_spec"] = spec
        st.session_state["plan_history"] = []  # undo steps belong to the draft they were taken on
    return st.session_state.get("plan_draft")


def set_plan_draft(yaml_text: str | None) -> None:
    """Sets the draft without an undo step or saving it (the page's first default); edits go through plan_edit.push."""
    plan_draft()  # load this model's saved draft first, so a later read does not replace what is set here
    st.session_state["plan_draft"] = yaml_text


def executor() -> dict:
    """Where this session's split jobs (sweeps, multi-slice evaluations) run: an ExecutorConfig as a dict; the
    default is $SHRINK_EXECUTOR, else local."""
    from shrink_core.errors import ShrinkError
    from shrink_core.runtime.executors import ExecutorConfig, default_executor

    if "executor" not in st.session_state:
        try:
            st.session_state["executor"] = default_executor().to_dict()
        except ShrinkError as exc:  # a bad $SHRINK_EXECUTOR: said once, and the local executor is used
            st.error(f"{exc} Using the local executor.")
            st.session_state["executor"] = ExecutorConfig().to_dict()
    return st.session_state["executor"]


def set_executor(config: dict) -> None:
    st.session_state["executor"] = config


def executor_params() -> dict:
    """The job parameter that sends a job's units to Ray; nothing for the local executor (a job's default)."""
    config = executor()
    return {"executor": config} if config["kind"] != "local" else {}
