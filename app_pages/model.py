"""Model page: load a model from a spec and see its layer inventory."""
import pandas as pd
import streamlit as st

from shrink_core.errors import ShrinkError
from shrink_core.model.load import BUILTINS, DEFAULT_SPEC, ModelSpec
from shrink_core.runtime import jobs
from ui import charts, state
from ui.data import store
from ui.jobs import job_outcome, job_panel

st.title("Model")
st.caption(
    "Load a built-in model (offline), a local Hugging Face directory, a .gguf file or a Hub id. "
    "Built-ins: " + ", ".join(f"`builtin:{name}`" for name in BUILTINS)
)
db = store()

with st.form("load_form", border=False):
    spec_text = st.text_input("Model spec", value=state.model_spec(), key="model_spec_input")
    with st.expander("Safety options"):
        allow_pickle = st.checkbox("Allow pickle checkpoints (can run code from the file)", key="allow_pickle")
        trust_remote_code = st.checkbox("Trust the model's own code (auto_map)", key="trust_remote_code")
    submitted = st.form_submit_button("Load", type="primary")


def start_load(spec: str) -> None:
    job_id = jobs.submit(db, "describe", "shrink_core.model.describe:describe_job",
                         {"spec": spec, "allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code})
    state.set_job_id("model", job_id)
    state.set_model_spec(spec)


if submitted:
    try:
        spec = ModelSpec.parse(spec_text).raw  # cheap checks (path exists, builtin known) before any work starts
    except ShrinkError as exc:
        st.error(str(exc))
    else:
        start_load(spec)

spec = state.model_spec()
job_id = state.job_id("model")
if job_id is None and spec == DEFAULT_SPEC and db.latest_model(spec) is None:
    start_load(spec)  # first visit: the dashboard opens on the default built-in model
    job_id = state.job_id("model")

if job_id is not None:
    job = jobs.get(db, job_id)
    if job and job.active:
        job_panel(job_id, f"Loading {job.params['spec']}")
        st.stop()
    job_outcome(job_id)

described = db.latest_model(spec)
if described is None:
    st.info("No model loaded yet: enter a spec and press Load.")
    st.stop()

summary = described["summary"]
st.subheader(described["spec"])
cols = st.columns(6)
cols[0].metric("Architecture", summary["architecture"].replace("ForCausalLM", ""))
cols[1].metric("Parameters", f"{summary['parameters'] / 1e6:,.1f} M")
cols[2].metric("Blocks", summary["blocks"])
cols[3].metric("Size fp32 / bf16", f"{summary['bytes_fp32'] / 1e6:,.0f} / {summary['bytes_bf16'] / 1e6:,.0f} MB")
cols[4].metric("Vocabulary", f"{summary['vocab_size']:,}")
cols[5].metric("Context length", f"{summary['context_length']:,}")
tied = ", ".join(summary["tied_modules"]) or "none"
st.caption(
    f"{summary['parameters']:,} parameters; {summary['block_linears']} linear modules in blocks; tied weights: {tied} "
    "(counted once). Sizes are exact byte counts of the weights (computed from shapes and dtype, not measured memory). "
    f"Load took {described['load_seconds']:.1f} s on this machine"
    f"{' from the fp32 cache' if described['from_cache'] else ''}; weights sha256 {described['weights_hash'][:12]}."
)

modules = pd.DataFrame(described["modules"])
left, right = st.columns(2)
left.plotly_chart(charts.size_by_kind(modules), key="size_by_kind")
right.plotly_chart(charts.size_by_block(modules), key="size_by_block")

st.markdown("#### Inventory")
kinds = st.multiselect("Kinds", sorted(modules["kind"].unique()), key="inventory_kinds", placeholder="all kinds")
shown = modules[modules["kind"].isin(kinds)] if kinds else modules
st.dataframe(
    shown[["name", "block", "kind", "shape", "params", "bytes", "dtype", "tied_to"]],
    key="inventory_table",
    hide_index=True,
    column_config={
        "params": st.column_config.NumberColumn("params", format="localized"),
        "bytes": st.column_config.NumberColumn("bytes", format="localized"),
        "block": st.column_config.NumberColumn("block", format="%d"),
    },
)
