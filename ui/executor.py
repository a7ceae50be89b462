"""The executor choice (local or Ray) and what it sees: workers, GPUs, nodes. Shown on the Model page."""
from __future__ import annotations

import streamlit as st

from shrink_core.errors import ShrinkError
from shrink_core.runtime.executors import EXECUTORS, ExecutorConfig, describe
from ui import state


@st.cache_data(ttl=60, show_spinner="Asking the executor what it sees...")
def _seen(config: dict) -> dict:
    return describe(ExecutorConfig.from_dict(config))


def executor_panel() -> None:
    current = state.executor()
    with st.expander(f"Executor: {current['kind']}", expanded=False):
        st.caption("Where split work runs (sweeps of plans x slices, evaluations on many slices): `local` runs its "
                   "units one after another in the job's worker process; `ray` sends each unit to a Ray cluster "
                   "(an address, `auto`, or empty for a local Ray started per job). Results land in this store either "
                   "way; the figures are the same.")
        cols = st.columns([1, 3])
        kind = cols[0].selectbox("Executor", EXECUTORS, index=EXECUTORS.index(current["kind"]), key="executor_kind")
        address = cols[1].text_input("Ray address", value=current.get("address", ""), key="executor_address",
                                     disabled=kind != "ray",
                                     placeholder="empty: a local Ray per job (or $SHRINK_RAY_ADDRESS)")
        try:
            config = ExecutorConfig(kind=kind, address=address.strip() if kind == "ray" else "")
        except ShrinkError as exc:
            st.error(str(exc))
            return
        state.set_executor(config.to_dict())
        try:
            seen = _seen(config.to_dict())
        except ShrinkError as exc:
            st.error(str(exc))
            return
        st.caption(f"**{seen['kind']}**{' at ' + seen['address'] if seen['address'] else ''}: {seen['workers']} "
                   f"worker slot{'s' if seen['workers'] != 1 else ''}, {seen['gpus']} GPU"
                   f"{'s' if seen['gpus'] != 1 else ''}, {seen['nodes']} node{'s' if seen['nodes'] != 1 else ''} "
                   f"({seen['note']}).")
