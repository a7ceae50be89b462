"""Results page: Pareto plots per slice, side-by-side comparison, candidate management and the stakeholder report."""
import tempfile
from dataclasses import replace
from pathlib import Path

import streamlit as st

from shrink_core.errors import ShrinkError
from shrink_core.evaluation.stats import ALPHA
from shrink_core.perf.hardware import DEFAULT_ROWS, DEFAULT_TARGET
from shrink_core.results import candidates as cands
from shrink_core.results import pareto
from shrink_core.results.report import (
    PPL_NOTE,
    View,
    beyond_limits,
    build_report,
    figures,
    method_notes,
    slice_choice,
    view_sentence,
    write_pdf,
    write_png,
)
from shrink_core.results.report_page import render_html
from shrink_core.results.summary import summarize
from ui import state
from ui.data import store
from ui.sweep import sweep_panel

st.title("Results")
db = store()
sweep_panel(state.model_spec())
everyone = cands.candidates_frame(db)
found_budgets = cands.budgets(db)
if everyone.empty or not found_budgets:
    st.info("No evaluated candidates yet: evaluate a plan (Eval sets page, or `python -m shrink_core eval --plan "
            "preset:w8 --slices en,fr`) and its candidate appears here.")
    st.stop()


def _weights(text: str) -> tuple[tuple[str, float], ...]:
    try:
        return tuple((k.strip(), float(v)) for k, v in (i.split("=") for i in text.split(",") if i.strip()))
    except ValueError:
        raise ShrinkError(f"Slice weights look like en=2,fr=1, not '{text}'.") from None


known_targets = [row.name for row in DEFAULT_ROWS]
ids = [int(i) for i in everyone["id"]]
labels = {int(cid): f"#{cid} {name}" for cid, name in zip(everyone["id"], everyone["name"])}

top = st.columns(4)
budget = top[0].selectbox("Protocol", found_budgets, key="res_budget")
table = cands.slices_frame(db, budget)
metric = top[1].selectbox("Quality (y)", list(pareto.METRICS), key="res_metric",
                          format_func=lambda m: pareto.METRICS[m].label)
slice_ids = sorted(table.dropna(subset=[metric])["slice"].unique())  # where the metric is defined
y = top[2].selectbox("Over", ["worst", "mix"] + slice_ids, key="res_y",
                     format_func=lambda v: {"worst": "worst slice", "mix": "weighted mix"}.get(v, f"slice {v}"))
x = top[3].selectbox("Cost (x)", list(pareto.AXES), key="res_x", format_func=lambda a: {
    "memory": "memory (weights)", "latency": "latency (measured)", "projected": "latency (projected)",
    "cost": "cost per million tokens"}[a])
more = st.columns(4)
target_options = sorted(set(cands.targets(db)) | set(known_targets))
target = more[0].selectbox("Target (projected latency, cost)", target_options, key="res_target",
                           index=target_options.index(DEFAULT_TARGET), disabled=x not in ("projected", "cost"))
choice = slice_choice(table, metric)  # by default, the slices every candidate shares
over = more[1].multiselect("Worst over slices", slice_ids, default=list(choice.shared) or slice_ids,
                           key=f"res_slices_{metric}_{budget}", disabled=y != "worst")
weights_text = more[2].text_input("Mix weights", value=",".join(f"{s}=1" for s in slice_ids[:2]), key="res_weights",
                                  disabled=y != "mix")
chosen_metric = pareto.METRICS[metric]
use_limit = more[3].checkbox("Constraint line", value=chosen_metric.default_limit is not None,
                             key=f"res_use_limit_{metric}")
limit = more[3].number_input(f"Acceptable at ({chosen_metric.unit})", value=float(
    chosen_metric.default_limit if chosen_metric.default_limit is not None else 0.5), step=0.01, format="%.3f",
                             key=f"res_limit_{metric}", disabled=not use_limit,
                             help="on the good side of this line is acceptable: "
                                  + chosen_metric.describe_limit(chosen_metric.default_limit or 0.5))
if y == "worst" and choice.left_out:
    left_out = [s for s, _ in choice.left_out if s not in over]
    if left_out:
        st.info(pareto.SliceChoice(choice.shared, tuple((s, n) for s, n in choice.left_out if s in left_out)).note()
                .capitalize() + ". Adding one drops every candidate without it from the plot.")

try:
    view = View(x=x, y=y, metric=metric, target=target if x in ("projected", "cost") else None, budget=budget,
                slices=tuple(over) if y == "worst" and over else None,
                weights=_weights(weights_text) if y == "mix" else (), limit=limit if use_limit else None)
    report = build_report(db, view)
except ShrinkError as exc:
    st.error(str(exc))
    st.stop()

main, multiples = figures(report)
if x == "latency" and report.candidates["latency_ms"].isna().all():
    st.info("No candidate has a measured latency yet (`python -m shrink_core measure`); every candidate carries a "
            "projected one: choose 'latency (projected)'.")
st.plotly_chart(main, key="pareto_main", width="stretch")
better = "up" if chosen_metric.higher_is_better else "down"
st.caption(f"How to read: each point is a candidate; further {better} and further left is better (less quality "
           "lost, smaller, faster or cheaper). The line joins the frontier: a candidate off it is beaten on both axes "
           "by one on it. Whiskers: the 95% bootstrap interval over items on the y value; two candidates whose "
           "whiskers overlap are not distinguishable on these slices. Axis titles say whether a value was measured "
           "(and where) or projected; hover a point for its provenance.")
for note in method_notes(report.candidates, report.table, report.view):
    st.caption(note)
points = report.points[["candidate_id", "name", "x", "y", "y_low", "y_high", "interval_note", "worst_slice",
                        "on_frontier", "acceptable"]]
st.dataframe(points, key="pareto_points", hide_index=True)
beyond = beyond_limits(report.table, {metric: limit if use_limit else None})
if len(beyond):
    st.warning(f"{beyond['name'].nunique()} candidate(s) beyond the acceptable limits on {len(beyond)} slice(s): "
               + "; ".join(f"{r.name} on {r.slice}: {r.beyond}" for r in beyond.head(8).itertuples())
               + (" ..." if len(beyond) > 8 else ""))
    st.dataframe(beyond.drop(columns=["candidate_id"]), key="beyond_limits", hide_index=True)

st.markdown("#### Every slice")
st.plotly_chart(multiples, key="pareto_slices", width="stretch")
st.caption("How to read: one panel per slice, the same candidates and x axis; compression error is rarely uniform, so "
           "look for the slice where a candidate that looks fine on average falls away. " + PPL_NOTE)

st.markdown("#### Compare")
chosen = st.multiselect("Candidates (2 to 5; the first is the baseline)", ids,
                        default=ids[:3], max_selections=5, key="res_compare",
                        format_func=lambda cid: labels.get(cid, str(cid)))
if len(chosen) >= 2:
    compare = cands.compare_frame(db, [int(c) for c in chosen], budget)
    st.dataframe(compare, key="compare_table", hide_index=True)
    st.caption("p-values: paired bootstrap over items for NLL (never below 1/(resamples + 1)), McNemar for "
               "accuracy; only when both were scored on the same items. flips_vs_baseline: answers that changed "
               "between the two. interval_note: why a slice has no interval.")
    adjusted = compare.dropna(subset=["holm"]) if "holm" in compare else compare.iloc[:0]
    if len(adjusted):
        over = "; ".join(f"{name}: {how}" for name, how in
                         adjusted.drop_duplicates("name")[["name", "holm"]].itertuples(index=False))
        st.caption(f"nll_p and accuracy_p are raw; *_holm are Holm-adjusted over each candidate's tests on the "
                   f"slices shown ({over}); significant = an adjusted p below {ALPHA:g}.")
    with_target = cands.candidates_frame(db, target=target).set_index("id").loc[chosen].reset_index()
    st.dataframe(with_target[["id", "name", "weight_format", "memory_bytes", "memory_source", "latency_ms",
                              "latency_source", "projected_ms", "projected_source", "cost_per_million", "cost_source"]],
                 key="compare_perf", hide_index=True)
    specs = set(everyone.set_index("id").loc[chosen, "model_spec"])
    spec = sorted(specs)[0]
    model = db.latest_model(spec)
    if model and model["modules"] and len(specs) == 1:
        plans = {labels[cid]: c["plan"] for cid in chosen for c in [cands.get_candidate(db, int(cid))]}
        try:
            diff = cands.plan_diff(model["modules"], plans)
        except ShrinkError as exc:
            st.warning(f"What changed cannot be resolved against {spec}: {exc}")
        else:
            st.markdown(f"What changed, layer by layer ({len(diff)} modules differ)")
            st.dataframe(diff, key="plan_diff", hide_index=True)
    else:
        st.info(f"Load {spec} on the Model page to see what changed layer by layer.")
else:
    st.info("Pick at least two candidates to compare.")

st.markdown("#### Candidates")
st.dataframe(everyone[["id", "name", "kind", "parent_name", "weight_format", "plan_summary", "calibration", "budgets",
                       "code_version", "tags", "memory_bytes", "latency_ms", "notes"]], key="candidates_table",
             hide_index=True)
picked = st.selectbox("Candidate", ids, key="res_manage", format_func=lambda c: labels.get(c, str(c)))
row = everyone[everyone["id"] == picked].iloc[0]
left, middle, right = st.columns(3)
new_name = left.text_input("Name", value=row["name"], key=f"res_name_{picked}")
if left.button("Rename", key="res_rename"):
    cands.rename(db, int(picked), new_name)
    st.rerun()
new_tags = middle.text_input("Tags (comma-separated)", value=row["tags"] or "", key=f"res_tags_{picked}")
if middle.button("Save tags", key="res_save_tags"):
    cands.set_tags(db, int(picked), new_tags)
    st.rerun()
sure = right.checkbox(f"Yes, delete {labels[picked]}", key=f"res_confirm_{picked}")
if right.button("Delete", key="res_delete", disabled=not sure):
    cands.delete(db, int(picked))
    st.rerun()
for filename, text in cands.export_files(db, int(picked)).items():
    st.download_button(f"Export {filename}", text, file_name=f"candidate-{picked}-{filename}",
                       key=f"res_export_{filename}")

st.markdown("#### Report")
st.caption("One HTML file that opens with a one-page summary (the recommended candidate and the runner-up by a stated "
           "rule, where quality drops on each slice, the caveats), then the frontier, the per-slice table, the plans, "
           "the provenance and the method notes; plotly.js is inlined, so it opens with no server and no network. The "
           "PDF is the same page printed by headless Chromium, the summary on page 1.")
if st.button("Build report", key="res_build_report"):
    # The summary states latency and cost, so the file is built for the chosen target even on a memory axis.
    full = report if report.view.target else build_report(db, replace(view, target=target))
    page = render_html(full, db)
    st.session_state["res_report_html"] = page
    with tempfile.TemporaryDirectory() as tmp, st.spinner("Rendering the PNG and the PDF in headless Chromium ..."):
        for key, render in (("res_report_png", lambda: write_png(main, Path(tmp) / "pareto.png")),
                            ("res_report_pdf", lambda: write_pdf(page, Path(tmp) / "report.pdf"))):
            try:
                st.session_state[key] = render().read_bytes()
            except ShrinkError as exc:
                st.session_state[key] = None
                st.warning(str(exc))
    st.session_state["res_report_view"] = view_sentence(full.view)
    st.session_state["res_report_verdict"] = summarize(full).verdict
if st.session_state.get("res_report_html"):
    st.info(st.session_state.get("res_report_verdict"))
    st.download_button("Download report.html", st.session_state["res_report_html"], file_name="shrink-report.html",
                       mime="text/html", key="res_download_html")
    if st.session_state.get("res_report_pdf"):
        st.download_button("Download the report (PDF)", st.session_state["res_report_pdf"],
                           file_name="shrink-report.pdf", mime="application/pdf", key="res_download_pdf")
    if st.session_state.get("res_report_png"):
        st.download_button("Download the main figure (PNG)", st.session_state["res_report_png"],
                           file_name="pareto.png", mime="image/png", key="res_download_png")
    st.caption(f"Report view: {st.session_state.get('res_report_view')}.")
