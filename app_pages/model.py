"""Model page: load a model from a spec and see its layer inventory."""
import json
import re
from pathlib import Path

import pandas as pd
import streamlit as st

from shrink_core.errors import ShrinkError
from shrink_core.model.load import (
    BUILTINS,
    DEFAULT_SPEC,
    DEVICES,
    DTYPES,
    ModelSpec,
    resolve_device,
    source_quantization,
    with_device,
    with_dtype,
)
from shrink_core.perf.footprint import facts_from_description
from shrink_core.runtime import jobs
from shrink_core.sensitivity.scan import admit_scan
from ui import charts, state
from ui.data import store
from ui.executor import executor_panel
from ui.jobs import job_outcome, job_panel, memory_admission

QUICK_START = {"slices": ["en", "fr"], "settings": ["w4g64", "w3g64"], "method": "fast", "budget": "quick", "check": 0}

st.title("Model")
st.caption(
    "Load a built-in model (offline), a local Hugging Face directory, a .gguf file or a Hub id. "
    "Built-ins: " + ", ".join(f"`builtin:{name}`" for name in BUILTINS)
)
db = store()

with st.form("load_form", border=False):
    spec_text = st.text_input("Model spec", value=state.model_spec(), key="model_spec_input")
    dtype_column, device_column = st.columns(2)
    dtype = dtype_column.selectbox("dtype", DTYPES, key="model_dtype",
                                   help="What the model runs in: auto is fp32 on the CPU, bf16 on a GPU. A non-default "
                                        "dtype becomes a #suffix of the spec, so its figures are kept apart from the "
                                        "fp32 ones.")
    device = device_column.selectbox("Device", DEVICES, key="model_device",
                                     help="Where it runs: auto is a CUDA GPU where torch sees one, else the CPU. A "
                                          "non-default device becomes an @suffix of the spec (@cuda:1 for another "
                                          "GPU), so its figures are kept apart.")
    with st.expander("Safety options"):
        allow_pickle = st.checkbox("Allow pickle checkpoints (can run code from the file)", key="allow_pickle")
        trust_remote_code = st.checkbox("Trust the model's own code (auto_map)", key="trust_remote_code")
    submitted = st.form_submit_button("Load", type="primary")


def start_load(spec: str) -> None:
    """Loads in the background; the model in use (state.model_spec) changes only once the load succeeded."""
    job_id = jobs.submit(db, "describe", "shrink_core.model.describe:describe_job",
                         {"spec": spec, "allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code})
    state.set_job_id("model", job_id)


if submitted:
    try:
        # cheap checks (path exists, builtin known, the device is here) first
        spec = ModelSpec.parse(with_device(with_dtype(spec_text, dtype), device)).raw
        resolve_device(ModelSpec.parse(spec).device)
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
    if job and job.status == "done":
        state.set_model_spec(job.params["spec"])  # the new model is in use from here on
        state.set_job_id("model", None)
        spec = state.model_spec()
    else:
        job_outcome(job_id)  # a failed load: its one sentence; the last model that loaded stays in use

described = db.latest_model(spec)
if described is None:
    st.info("No model loaded yet: enter a spec and press Load.")
    st.stop()

summary = described["summary"]
st.subheader(described["spec"])
source = source_quantization(described["spec"])
fp32_mb, bf16_mb = summary["bytes_fp32"] / 1e6, summary["bytes_bf16"] / 1e6
found = re.match(r"\S+ (fp32|bf16|fp16) ", described.get("device") or "")
run_dtype = found.group(1) if found else "fp32"  # descriptions stored before the dtype choice ran in fp32
reference = (f"fp32, dequantized from {source}" if source else "fp32 (the weights as loaded, upcast)") \
    if run_dtype == "fp32" else f"{run_dtype} (the weights as loaded, cast to {run_dtype})"
top = st.columns(4)
top[0].metric("Architecture", summary["architecture"].replace("ForCausalLM", ""))
top[1].metric("Parameters", f"{summary['parameters'] / 1e6:,.1f} M")
top[2].metric("Blocks", summary["blocks"])
top[3].metric("Reference", f"{run_dtype} ← {source}" if source else run_dtype,
              help=f"Reference: {reference}. Every KL, ΔNLL and size saving is measured against this model"
                   + (f"; it is the {source} GGUF's quantized weights expanded to fp32, not the original bf16 release."
                      if source else "."))
st.caption(f"Runs on {described.get('device') or 'cpu'}: every figure computed on this model is stored with it.")
bottom = st.columns(4)
bottom[0].metric("Size fp32", f"{fp32_mb:,.0f} MB", help=f"{summary['bytes_fp32']:,} bytes of weights in fp32")
bottom[1].metric("Size bf16", f"{bf16_mb:,.0f} MB", help=f"{summary['bytes_bf16']:,} bytes of weights in bf16")
bottom[2].metric("Vocabulary", f"{summary['vocab_size']:,}")
bottom[3].metric("Context length", f"{summary['context_length']:,}")
cache = Path(described.get("source_dir") or "/nonexistent") / "shrink-cache.json"
if source and cache.is_file():  # the GGUF the reference came from: its size, as a saving against fp32 and bf16
    gguf_mb = json.loads(cache.read_text())["source_bytes"] / 1e6
    st.caption(f"Reference: {reference}. The {source} GGUF file is {gguf_mb:,.0f} MB: "
               f"{1 - gguf_mb / fp32_mb:.0%} smaller than fp32 ({fp32_mb:,.0f} MB), "
               f"{1 - gguf_mb / bf16_mb:.0%} smaller than bf16 ({bf16_mb:,.0f} MB).")
else:
    st.caption(f"Reference: {reference}. Sizes: {fp32_mb:,.0f} MB in fp32, {bf16_mb:,.0f} MB in bf16.")
tied = ", ".join(summary["tied_modules"]) or "none"
st.caption(
    f"{summary['parameters']:,} parameters; {summary['block_linears']} linear modules in blocks; tied weights: {tied} "
    "(counted once). Sizes are exact byte counts of the weights (computed from shapes and dtype, not measured memory). "
    f"Load took {described['load_seconds']:.1f} s on this machine"
    f"{' from the fp32 cache' if described['from_cache'] else ''}; weights sha256 {described['weights_hash'][:12]}."
)

executor_panel()

if summary.get("experts") or summary.get("fused_kinds"):
    st.caption(f"Layout: {summary.get('experts') or 'no'} experts per MoE layer (one inventory row each, the router "
               f"kept); fused kinds: {', '.join(summary.get('fused_kinds') or []) or 'none'} (one setting each).")
if summary.get("uncovered"):  # module types the inventory does not know: said, never skipped silently
    st.warning(summary["uncovered"])

if not db.overview(spec)["scanned_slices"]:  # the first run's one click from a loaded model to a heatmap
    with st.container(border=True):
        st.markdown("**Quick start: which layers break first, in English and in French?**")
        st.caption(f"Scans en and fr at {', '.join(QUICK_START['settings'])} at the **quick** depth (4 sequences "
                   "x 64 tokens per slice): a first look to orient by, not figures to decide on; rerun at the fast "
                   "or standard depth on the Sensitivity page before planning.")
        refused = memory_admission(
            lambda: admit_scan(facts_from_description(described), "fast", "quick", QUICK_START["settings"]), described)
        if st.button("Quick start: scan en and fr", type="primary", key="quick_start", disabled=refused):
            state.set_job_id("sensitivity", jobs.submit(db, "sensitivity", "shrink_core.sensitivity:sensitivity_job",
                                                        {"spec": spec, **QUICK_START,
                                                         **state.executor_params()}))
            st.switch_page("app_pages/sensitivity.py")  # the heatmaps appear there, slice by slice

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
