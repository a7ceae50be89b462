"""Sensitivity page: which modules break the model under a setting, per slice; protect the worst in the Plan."""
import pandas as pd
import streamlit as st

from shrink_core.errors import ShrinkError
from shrink_core.perf.footprint import facts_from_description
from shrink_core.plan.menu import SCAN_DEFAULT
from shrink_core.results import heatmaps
from shrink_core.runtime import jobs
from shrink_core.sensitivity import (
    METHOD_LABELS,
    SCAN_DEPTHS,
    SETTINGS,
    protect_plan_yaml,
    stored_agreement,
    stored_agreement_pairs,
    stored_records,
)
from shrink_core.sensitivity.scan import admit_scan
from ui import choices, plan_edit, state
from ui.data import store
from ui.jobs import memory_admission, show_job

st.title("Sensitivity")
db = store()
spec = state.model_spec()
st.caption("How much does quantizing or pruning one module (all others untouched) change the model? "
           "KL(reference || perturbed) and ΔNLL per token, per slice. **fast**: diagonal Fisher (labels sampled from the "
           "model) plus a first-order term from the text, one forward and two backwards per calibration batch "
           "(calibration rows only), each calibration sequence's KL term capped at 10x their median so one fragile "
           "sequence cannot carry a module (docs/sensitivity.md); the embedding is always probed exhaustively. "
           "**exhaustive**: each module perturbed and measured on the slice's eval rows, reusing the unperturbed "
           "activations before its block.")

with st.expander("Run a scan", expanded=not stored_records(db, spec)):
    left, middle, right = st.columns(3)
    scannable = choices.slice_ids("text")  # the scan scores running text: built-in and user text slices
    slices = left.multiselect("Slices", scannable, default=choices.defaults(("en", "fr", "zh"), scannable),
                              key="sens_slices")
    settings = middle.multiselect("Settings", list(SETTINGS), default=list(SCAN_DEFAULT), key="sens_settings",
                                  format_func=lambda s: f"{s}: {SETTINGS[s].label}")
    method = right.radio("Method", ["fast", "exhaustive"], horizontal=True, key="sens_method",
                         help="exhaustive probes every module one by one: minutes per slice and setting.")
    budget = left.radio("Scan depth", list(SCAN_DEPTHS), index=1, horizontal=True, key="sens_budget",
                        help=", ".join(f"{b.name}: {b.sequences}x{b.seq_len} tokens" for b in SCAN_DEPTHS.values()))
    check = middle.number_input("Agreement check (modules probed exhaustively per slice)", 0, 210,
                                SCAN_DEPTHS[budget].check_modules if method == "fast" else 0, key="sens_check",
                                disabled=method != "fast")
    described = db.latest_model(spec)
    refused = memory_admission(lambda: admit_scan(facts_from_description(described), method, budget, settings), described)
    if right.button("Run scan", type="primary", key="run_scan", disabled=not (slices and settings) or refused):
        params = {"spec": spec, "slices": slices, "settings": settings, "method": method, "budget": budget,
                  "check": int(check) if method == "fast" else 0, **state.executor_params()}
        state.set_job_id("sensitivity", jobs.submit(db, "sensitivity", "shrink_core.sensitivity:sensitivity_job",
                                                    params))
running = show_job(state.job_id("sensitivity"), f"Scanning {spec}")
scanning = ([s for s in running.params.get("slices", []) if s not in running.parts]
            if running and running.active else [])

records = pd.DataFrame([r.__dict__ for r in stored_records(db, spec)])
if records.empty:
    if scanning:
        st.info(f"Scanning: each slice's heatmap appears here as soon as that slice is done ({', '.join(scanning)} "
                "pending).")
    else:
        st.info("No sensitivity scores for this model yet: pick slices and settings and press Run scan. "
                "Results are stored and reused for the same model, setting, slice and depth; the heatmaps show "
                "which layers break first, per slice, and feed the Plan page's planner.")
    st.stop()

# one value per module, setting, slice, metric and method: the newest depth's (stored_records lists it first)
records = records.drop_duplicates(["module", "setting", "slice", "metric", "method"])
blocks, kinds = heatmaps.grid(records)  # the model's full block x kind grid, whichever method is viewed
names = records[records["block"] >= 0].drop_duplicates(["block", "kind"]).set_index(["block", "kind"])["module"]
all_records = records
c1, c2, c3, c4 = st.columns(4)
methods = sorted(records["method"].unique(), key=lambda m: m != "fast")  # the full fast view first
view_method = c1.radio("Method", methods, horizontal=True, key="view_method")
outside = records[(records["block"] == -1) & (records["method"] == "exhaustive")]  # embedding / untied lm_head
records = records[records["method"] == view_method]
view_setting = c2.selectbox("Setting", sorted(records["setting"].unique()), key="view_setting")
metric = c3.radio("Metric", ["kl", "dnll"], horizontal=True, key="view_metric",
                  format_func=lambda m: {"kl": "KL", "dnll": "ΔNLL"}[m])
view = records[(records["setting"] == view_setting) & (records["metric"] == metric)]
slice_ids = sorted(view["slice"].unique())
pending = [s for s in scanning if s not in slice_ids]  # slices of the running scan with nothing stored yet
agreement = {(a.slice, a.setting, a.metric): a for a in stored_agreement(db, spec)}


def trust(slice_id: str) -> str:
    if view_method == "exhaustive":
        return "measured (exhaustive probes on eval rows)"
    found = agreement.get((slice_id, view_setting, metric)) or next(
        (a for (s, _, m), a in agreement.items() if s == slice_id and m == metric), None)
    if found is None:
        return "estimated; not checked against exhaustive probes (run with an agreement check)"
    return (f"estimated; Spearman {found.spearman:.2f} vs exhaustive over {found.modules} modules "
            f"({found.setting}, {found.budget} depth)")


st.caption(f"Method: {METHOD_LABELS[view_method]}. Computed on {', '.join(db.devices('sensitivity', spec))}. "
           "Hover a cell for the exact value; click it for details.")
tabs = st.tabs([f"Slice {s}" for s in slice_ids] + [f"Slice {s} (pending)" for s in pending]
               + ["Layer x slice", "How far to trust the fast view"])
layer_slice, trust_tab = tabs[-2:]
for tab, slice_id in zip(tabs[len(slice_ids):], pending):
    with tab:
        st.info(f"{slice_id} is still being scanned; its heatmap appears here as soon as it is done.")
clicks = {}  # slice -> the module whose cell is selected in its heatmap
for tab, slice_id in zip(tabs, slice_ids):
    data = view[view["slice"] == slice_id]
    with tab:
        depths = ", ".join(sorted(set(data["depth"]))) or "unknown"
        depth_label = f"{depths} depth" + (" (a first look)" if depths == "quick" else "")
        event = st.plotly_chart(heatmaps.module_heatmap(data, f"{slice_id}: {view_setting}, {view_method}, "
                                                        f"{depth_label}", metric, blocks, kinds),
                                key=f"heat-{slice_id}", on_select="rerun", selection_mode="points")
        st.caption(f"How to read: each cell is the damage ({'KL' if metric == 'kl' else 'ΔNLL'} per token on "
                   f"{slice_id}) when only that module is set to {view_setting}, on a log colour scale; the brightest "
                   f"cells break the model first, and a bright row is a fragile block. {slice_id}: {trust(slice_id)}."
                   + (" Grey cells: modules this method did not probe." if data["module"].nunique() < len(names)
                      else ""))
        points = event["selection"]["points"] if event else []
        if points:  # a clicked cell: its kind (x) and block (y) name the module
            clicks[slice_id] = names.get((int(points[0].get("y", -1)), points[0].get("x")))
with layer_slice:
    st.plotly_chart(heatmaps.layer_slice_heatmap(view, f"Blocks x slices: {view_setting}", metric, blocks),
                    key="heat-layers")
    st.caption("Each cell sums the block's module scores (independent-perturbation approximation of the block).")
with trust_tab:
    rows = []
    for a in stored_agreement(db, spec):
        rows.append({"slice": a.slice, "setting": a.setting, "metric": a.metric, "spearman": round(a.spearman, 3),
                     "modules": a.modules, "depth": a.budget})
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, key="agreement_table")
        pairs = pd.DataFrame(stored_agreement_pairs(db, spec, slice_ids[0], view_setting))
        if not pairs.empty:
            st.plotly_chart(heatmaps.agreement_scatter(pairs, f"{slice_ids[0]}: fast vs exhaustive KL"),
                            key="agreement_scatter")
    else:
        st.info("No agreement check yet: run a fast scan with an agreement check above 0.")

modules = sorted(view["module"].unique(), key=lambda m: (int(view[view["module"] == m]["block"].iloc[0]), m))
detail_modules = [names[cell] for cell in sorted(names.index, key=lambda c: (c[0], kinds.index(c[1])))]  # the grid
for slice_id in slice_ids:  # a new click moves "Module detail" to the clicked cell; later picks in the box stay
    clicked = clicks.get(slice_id)
    if clicked != st.session_state.get(f"clicked-{slice_id}"):
        st.session_state[f"clicked-{slice_id}"] = clicked
        if clicked in detail_modules:
            st.session_state["detail_module"] = clicked
picked = st.selectbox("Module detail", detail_modules, key="detail_module")
detail = all_records[all_records["module"] == picked].pivot_table(index=["method", "setting", "metric"],
                                                                  columns="slice", values="value").reset_index()
st.dataframe(detail, hide_index=True, key="detail_table")

st.markdown("#### Protect the most sensitive modules")
a1, a2, a3 = st.columns(3)
k = int(a1.number_input("k", 1, max(len(modules), 1), min(10, len(modules)), key="protect_k"))
rank_by = a2.selectbox("Rank by", ["worst over slices"] + slice_ids, key="rank_by")
ranked = view if rank_by == "worst over slices" else view[view["slice"] == rank_by]
top = ranked.groupby("module")["value"].max().sort_values(ascending=False).head(k)
a3.caption("Most sensitive: " + ", ".join(m.replace("model.layers.", "L") for m in top.index[:5]) + (" ..." if k > 5 else ""))
label = "all scanned slices" if rank_by == "worst over slices" else rank_by
b1, b2 = st.columns(2)
for column, action, protect in ((b1, "Protect top-k (keep them)", "keep"), (b2, "Send to plan (top-k at int8)", "w8")):
    if column.button(action, key=f"plan-{protect}"):
        try:
            # through the one undo history (Undo on the Plan page brings the previous draft back), saved for the model
            plan_edit.push(protect_plan_yaml(list(top.items()), view_setting, label, metric, protect), keep_name=True)
        except ShrinkError as exc:
            st.error(str(exc))
        else:
            st.success(f"The plan draft now holds {len(top)} rules for these modules plus one for the rest; "
                       "edit it on the Plan page (Undo there brings the previous draft back).")
if not outside.empty:
    st.dataframe(outside[outside["metric"] == metric].pivot_table(index=["module", "setting"], columns="slice",
                                                                  values="value"), key="embedding_scores")
    st.caption(f"{metric.upper()} per slice. Embedding (with a tied lm_head) and untied lm_head: always probed "
               "exhaustively, one full forward per setting and slice (method 'exhaustive'); the planner chooses "
               "their precision from these.")
if state.plan_draft():
    with st.expander("Plan draft"):
        st.code(state.plan_draft(), language="yaml")
