"""Plan page: edit a compression plan per module or in bulk, see its size and predicted impact at once,
let the planner fill a budget, and run the plan to compare predicted with measured."""
import numpy as np
import pandas as pd
import streamlit as st

from shrink_core.compression.calibrate import cpu_has_bf16
from shrink_core.compression.ggml.standard import STANDARD_MIXES, mix_name, standard_plan
from shrink_core.compression.tune import STEP_SECONDS_SMOLLM2
from shrink_core.errors import ShrinkError
from shrink_core.evaluation.calibration import mix_gaps, mix_gaps_sentence, recipe_for
from shrink_core.model.inventory import LINEAR_KINDS, modules_from_rows
from shrink_core.perf.hardware import DEFAULT_ROWS, DEFAULT_TARGET
from shrink_core.perf.hardware import get as get_hardware
from shrink_core.perf.roofline import project
from shrink_core.perf.workload import workload_from_rows
from shrink_core.plan import PlanError, dump_plan, load_plan, plan_to_dict, resolve, totals
from shrink_core.plan.budget import PlannerBudget, plan_within_budget, quant_specs
from shrink_core.plan.explain import explain
from shrink_core.plan.interactions import features
from shrink_core.plan.planner import PLANNER_SETTINGS, build_problem, solution_plan
from shrink_core.plan.predict import predict, score_table, settings_by_module
from shrink_core.plan.presets import PRESETS
from shrink_core.plan.spec import INT_METHODS, METHOD_DESCRIPTIONS
from shrink_core.results.eval_run import admit_eval
from shrink_core.results.method_ratios import method_label, method_score_table, scored_method
from shrink_core.results.prediction import fit_measured, plan_method, predicted_vs_measured
from shrink_core.runtime import jobs
from shrink_core.sensitivity.scan import stored_records
from ui import choices, plan_edit, state
from ui.data import store
from ui.jobs import memory_admission, show_job

NO_CHANGE = "(no change)"


def apply_edit(change, rows) -> None:
    """Apply a draft edit, or say in one sentence why it was refused (the draft stays as it was)."""
    refusal = plan_edit.try_apply(change, rows)
    if refusal:
        st.error(refusal)
    else:
        st.rerun()


METHODS_HELP = "  \n".join(f"**{m}**: {METHOD_DESCRIPTIONS[m]}" for m in INT_METHODS)
TUNE_HELP = ("After quantization, the group scales of every block linear quantized to integers are trained through "
             "the whole model so its next-token distribution matches the unquantized model's on the calibration "
             "rows (codes, zeros and bytes unchanged); kept only if the KL on held-out calibration rows falls. The "
             "step follows each layer's bit-width: 0.002 up to 3 bits, 0.0005 from 4 (the larger one overfits at 4 "
             "bits). On SmolLM2 (16 windows) it lowered KL on each of nine languages at 3 bits, 13-21% on the "
             "calibrated ones and 4% on Hindi (in no mix); at 4 bits 3-11%. On group 32 log8 scales (4 windows) it "
             "lowered the calibrated languages 8-20% and raised Hindi 5%: it trains on the mix's languages, so "
             "measure the ones outside it (docs/methods.md). Holds a "
             "second copy of the model while it runs; not with --onload.")
st.title("Plan")
db = store()
spec = state.model_spec()
described = db.latest_model(spec)
if described is None:
    st.info(f"Load `{spec}` on the Model page first: the plan is checked against its modules.")
    st.stop()
rows = modules_from_rows(described["modules"])
blocks = described["summary"]["blocks"] or 1

if state.plan_draft() is None:
    state.set_plan_draft(dump_plan(load_plan("preset:w4g64")))

# ------------------------------------------------------------------ source: presets, files, undo
top = st.columns([2, 2, 1, 1])
MIXES = {mix_name(ftype, imatrix): (ftype, imatrix) for ftype in STANDARD_MIXES for imatrix in (False, True)}
preset = top[0].selectbox("Start from a preset", ["(keep current)"] + list(PRESETS) + list(MIXES), key="plan_preset",
                          help="The llama.cpp entries are llama-quantize's type per tensor for this model.")
if preset in PRESETS:  # what it does, measured, and what it costs in time, before it replaces the draft
    top[0].caption(PRESETS[preset]["description"])
if top[0].button("Use preset", key="use_preset", disabled=preset == "(keep current)"):
    if preset in MIXES:
        try:
            mix = dump_plan(standard_plan(rows, described["summary"], *MIXES[preset]))
        except ShrinkError as exc:
            st.error(str(exc))
        else:
            plan_edit.push(mix, keep_name=True)
    else:
        plan_edit.push(dump_plan(load_plan(f"preset:{preset}")), keep_name=True)
uploaded = top[1].file_uploader("Load a plan file", type=["yaml", "yml", "json"], key="plan_upload")
if uploaded is not None and top[1].button("Load file", key="load_plan_file"):
    refusal = plan_edit.try_apply(lambda: dump_plan(load_plan(uploaded.getvalue().decode("utf-8", "replace"))),
                                  keep_name=True)
    if refusal:
        st.error(refusal)
if top[2].button("Undo", key="plan_undo", disabled=not st.session_state.get("plan_history")):
    plan_edit.undo()
top[3].download_button("Save plan.yaml", state.plan_draft(), file_name="plan.yaml", key="save_plan")

plan = load_plan(state.plan_draft())
given = st.text_input("Plan name", plan.name, key=f"plan_name_{hash(state.plan_draft())}",
                      help="After each edit the name says what the plan does; a name typed here stays until a "
                           "preset or a file replaces the plan (empty it to go back to the derived name).")
if given.strip() != plan.name:
    st.session_state[plan_edit.USER_NAME] = given.strip() or None
    apply_edit(lambda: state.plan_draft(), rows)


def show_explanation(expanded: bool = False) -> None:
    """What each rule of the draft decides on this model (first match wins) and why: shrink_core.plan.explain."""
    found = explain(rows, plan)
    with st.expander("Explain rules", expanded=expanded):
        st.dataframe(pd.DataFrame(found.rows()), key="explain_rules", hide_index=True)
        st.caption(f"{found.summary()} Modules are listed by name within a block, with the blocks as ranges; a rule "
                   "decides only the modules no earlier rule selects.")


try:
    resolved = resolve(rows, plan)
except PlanError as exc:  # e.g. a rule that matches nothing on this model
    st.error(str(exc))
    show_explanation(expanded=True)  # which rule is shadowed or selects nothing, and by what
    if st.button("Reset to preset w4g64", key="reset_plan"):
        plan_edit.push(dump_plan(load_plan("preset:w4g64")), keep_name=True)
        st.rerun()
    st.stop()
table = pd.DataFrame([r.row() for r in resolved])
table["setting"] = [plan_edit.setting_of(r) for r in table.to_dict("records")]


def tied(row: dict) -> bool:
    """A tied head is its owner's weight. pandas holds "not tied" as NaN, which is truthy: test for a name."""
    return isinstance(row["tied_to"], str)

def show_fitted_prediction(by_module: dict, scores: dict, slices: list[str], metric: str):
    """The prediction corrected by the plans measured so far (interaction model), with its interval and the error
    of the newest measured plan; None when this plan or metric cannot have one."""
    method = plan_method(resolved)
    if metric != "kl" or method is None:
        st.caption("Fitted prediction: shown for KL, on plans that quantize with one method and prune nothing.")
        return None
    measured_fit = measured_fit_of(method)
    model = measured_fit.model
    if not model.fitted:
        st.caption(f"Fitted prediction: no measured {fitted_label(method)} plan of this model yet. Run a plan "
                   "(below): each measured plan corrects the additive sum for how errors compound.")
        return measured_fit
    try:
        x = np.array([features(by_module, scores, s) for s in slices])
    except KeyError as exc:
        st.caption(f"Fitted prediction: {exc.args[0]}; scan that setting to see it.")
        return measured_fit
    values = model.predict(x, slices)
    low, high = model.interval(x, slices)
    i = int(np.argmax(values))
    interval = (f"95% interval {low[i]:.3f}-{high[i]:.3f}" if np.isfinite(low[i])
                else f"no interval: {model.plans} measured plan(s), an interval needs 3")
    fit_cols = st.columns(2)
    fit_cols[0].metric(f"Fitted worst slice ({slices[i]}), nats/token", f"+{values[i]:.3f} KL", help=interval)
    last = measured_fit.last
    if last:
        fit_cols[1].metric("Newest measured plan: prediction error", f"{last['error']:+.0%}",
                           help=f"{last['candidate']}, slice {last['slice']}: predicted {last['predicted']:.4f} by the "
                                f"fit on the {last['fitted_on_plans']} plan(s) measured before it, measured "
                                f"{last['measured']:.4f} KL")
    alphas = ", ".join(f"{k} x{v:.2f}" for k, v in model.to_dict()["alpha"].items())
    factors = ", ".join(f"{s} x{v:.2f}" for s, v in model.slice_factor)
    st.caption(f"Fitted: KL = sum over bit-widths of alpha x the slice's factor x the scan's scores + gamma x (their "
               f"total)^2, fitted on {model.plans} measured {fitted_label(method)} plans of this model "
               f"({model.observations} slice results): slice factors {factors or 'none'}; {alphas}; gamma "
               f"{model.gamma:.3g}. {interval}, from the spread of each plan predicted by a fit without it. Projected, "
               "not measured.")
    if model.untrusted:
        st.warning(f"On this model the fit predicts a held-out measured plan only to within x{model.interval_factor:.1f} "
                   "either way: "
                   "the scan's scores do not describe how its errors combine (docs/plan.md: Gemma 3 270M, where "
                   "errors stacked in the last blocks measure above their sum). Trust measured figures: the closed "
                   "loop (below) also measures uniform under the same budget and keeps it when no plan beats it.")
    return measured_fit


def show_method_scores(method: str | None) -> None:
    """Which scores a calibrated (or rotated) method's prediction stands on: its own measured ratios, or RTN's scan."""
    key = scored_method(method, plan.rotate)
    if key in (None, "rtn"):
        return
    found, label = _tables[key][1], method_label(key)
    if found is None:
        st.caption(f"This draft quantizes with {label}, but the scores are plain RTN's: no {label} error ratios are "
                   "stored for this model and calibration mix, so the prediction is plain RTN's"
                   + (" and likely too high" if plan.rotate is None else "") + f". In the planner (below), choose "
                   f"{method} as the Method and tick \"Plan on {label}'s own error\" for the closed loop once; it "
                   "measures them, and this prediction then uses them.")
        return
    reached, total = found.coverage(scores)
    st.caption(f"Scores scaled by {label}'s own output error over RTN's, per module, setting and slice (median "
               f"ratio {found.medians(scored_slices)}; measured by the closed loop "
               f"{pd.Timestamp(found.created, unit='s'):%Y-%m-%d %H:%M} UTC for this calibration mix; {reached} of "
               f"{total} scores have a ratio, the rest stay RTN's). Projected, not measured.")


# ------------------------------------------------------------------ instant prediction
records = stored_records(db, spec, described["weights_hash"])
_fits: dict = {}


def scores_of(method: str | None) -> dict:
    """The scan's scores to predict and plan `method`'s plans on: scaled by the method's stored output-error ratios
    for the draft's calibration recipe and rotation when the closed loop measured them, else RTN's
    (`method_ratios`)."""
    key = scored_method(method, plan.rotate)
    if key not in _tables:
        _tables[key] = method_score_table(db, spec, described["weights_hash"], key, recipe_for(plan).to_dict(), scores)
    return _tables[key][0]


def fitted_label(method: str) -> str:
    """The method the fitted model learns from, in words: the draft's method as rotated and tuned as the draft is."""
    return method_label(scored_method(method, plan.rotate, plan.tune))


def measured_fit_of(method: str):
    """The interaction model fitted on this model's measured plans of `method` (rotated and tuned as the draft is):
    fitted once per page run, however many sections ask (the fitted-prediction metrics and the planner's checkbox),
    on the scores `scores_of` gives."""
    key = scored_method(method, plan.rotate, plan.tune)
    if key not in _fits:
        _fits[key] = fit_measured(db, spec, described["weights_hash"], rows, records, key,
                                  scores=scores_of(method) if metric == "kl" else None)
    return _fits[key]
metric = st.radio("Predicted quality metric", ["kl", "dnll"], horizontal=True, key="predict_metric",
                  format_func=lambda m: {"dnll": "ΔNLL (nats/token)", "kl": "KL"}[m])
scores = score_table(records, metric)
_tables: dict = {}
draft_method = plan_method(resolved)
scored_slices = sorted({s for _, _, s in scores})
linears = table[table["kind"].isin(LINEAR_KINDS + ("embedding",))]
# the whole model as `eval` counts it: a masked module (2:4, unstructured) at its sparse format's bytes, which the
# format really stores, plus what no rule covers (norms) as it is
packed = totals(resolved, rows)["total_packed_sparse_bytes"]
sparse_formats = sorted({f for f in table["sparse_format"] if isinstance(f, str)})
params = sum(r.params for r in rows)
targets = [r.name for r in DEFAULT_ROWS]
hardware = get_hardware(st.selectbox("Projection target (latency is projected for it, not measured)", targets,
                                     index=targets.index(DEFAULT_TARGET), key="plan_target"))
specs = quant_specs(resolved)
projection = project(workload_from_rows(rows, described["summary"], specs), hardware)
cols = st.columns(5)
cols[0].metric("Packed size", f"{packed / 1e6:,.1f} MB", f"{(packed / described['summary']['bytes_fp32'] - 1):+.0%} vs fp32",
               delta_color="inverse", help="Pruned modules count as stored sparse: " + "; ".join(sparse_formats)
               if sparse_formats else None)
if sparse_formats:
    st.caption(f"Packed size counts {int(table['sparse_bytes'].notna().sum())} pruned modules at their sparse format "
               f"({'; '.join(sparse_formats)}), {int(table['packed_bytes'].sum()) / 1e6:,.1f} MB if stored dense.")
cols[1].metric("Bits per weight", f"{packed * 8 / max(params, 1):.2f}")
cols[2].metric("Modules changed", int((~table["keep"]).sum()))
cols[4].metric("Projected decode", f"{projection.decode_ms_per_token:.3f} ms",
               help=f"ms per token at batch 1 on {hardware.name}: projected by the roofline model, not measured")
by_module = settings_by_module(resolved)  # a tied head is scored at its owner
if scores:
    predictions = predict(by_module, scores_of(draft_method), scored_slices, metric)
    worst = max(predictions, key=lambda p: p.value)
    name = {"kl": "KL", "dnll": "ΔNLL"}[metric]
    cols[3].metric(f"Predicted worst slice ({worst.slice}), nats/token", f"+{worst.value:.3f} {name}",
                   help=f"+{worst.value:.4g} nats/token {name} on slice {worst.slice}: predicted from the stored scan, "
                        "not measured")
    st.dataframe(pd.DataFrame([p.__dict__ for p in predictions]), key="prediction_table", hide_index=True)
    st.caption("Predicted: the sum of one-module-at-a-time sensitivity scores from the stored scan (additive; "
               "interactions between modules are not modelled). Modules whose setting has no score are counted as "
               "'unscored', not as zero loss. Sizes are computed from the packed format (exact bytes), not measured. "
               f"Latency is projected, not measured: batch-1 decode, {projection.model}; pruning is not counted.")
    show_method_scores(draft_method)
    show_fitted_prediction(by_module, scores_of(draft_method), scored_slices, metric)
else:
    cols[3].metric("Predicted quality", "no scan yet")
    st.caption("Run a sensitivity scan (Sensitivity page) to see predicted quality per slice on every edit. "
               "Sizes are computed from the packed format (exact bytes), not measured. "
               f"Latency is projected, not measured: batch-1 decode, {projection.model}; pruning is not counted.")

# ------------------------------------------------------------------ bulk edits
with st.expander("Bulk edit: by kind and block range"):
    form = st.columns([2, 2, 1, 1, 1])
    kinds = form[0].multiselect("Kinds", list(LINEAR_KINDS[:-1]) + ["embedding", "lm_head"],
                                default=list(LINEAR_KINDS[:-1]), key="bulk_kinds")  # whole blocks, by default
    block_range = form[1].slider("Blocks", 0, blocks - 1, (0, blocks - 1), key="bulk_blocks")
    setting = form[2].selectbox("Setting", [NO_CHANGE] + plan_edit.SETTING_CHOICES, index=0, key="bulk_setting")
    method = form[3].selectbox("Method", list(INT_METHODS), key="bulk_method", help=METHODS_HELP)
    if form[4].button("Apply", key="bulk_apply", disabled=not kinds or setting == NO_CHANGE,
                      help="Choose a setting first: Apply changes the chosen modules to it."):
        rule = {"kind": kinds, **plan_edit.weights_rule(setting, method)}
        if block_range != (0, blocks - 1) and not set(kinds) & {"embedding", "lm_head"}:
            rule["blocks"] = list(range(block_range[0], block_range[1] + 1))
        apply_edit(lambda: plan_edit.with_rules_first(state.plan_draft(), [rule], rows=rows), rows)

# ------------------------------------------------------------------ per-module table and rules
left, right = st.columns([3, 2])
with left:
    st.markdown("**Per module** (edit setting, method or pruning; first match wins, so edits become rules on top)")
    view = table[["module", "block", "kind", "shape", "rule", "setting", "method", "prune", "packed_bytes"]].copy()
    view["prune"] = view["prune"].fillna("none")
    view["method"] = view["method"].fillna("rtn")
    edited = st.data_editor(
        view, key="plan_table", hide_index=True, disabled=["module", "block", "kind", "shape", "rule", "packed_bytes"],
        column_config={
            "setting": st.column_config.SelectboxColumn("setting", options=plan_edit.SETTING_CHOICES + sorted(
                {s for s in view["setting"] if s.startswith("custom")})),
            "method": st.column_config.SelectboxColumn("method", options=list(INT_METHODS), help=METHODS_HELP),
            "prune": st.column_config.SelectboxColumn("prune", options=sorted(set(plan_edit.PRUNE_CHOICES) | set(view["prune"]))),
            "packed_bytes": st.column_config.NumberColumn("packed bytes", format="localized"),
        },
    )
    changes = plan_edit.table_edits(view, edited, method="rtn")
    if changes:
        refusal = plan_edit.try_apply(lambda: plan_edit.with_rules_first(
            state.plan_draft(), changes, replace_names={c["name"] for c in changes}, rows=rows), rows)
        if refusal:
            st.error(refusal)
        else:
            st.session_state.pop("plan_table", None)  # the table re-renders from the new plan
            st.rerun()
with right:
    st.markdown("**Rules** (what the plan file will say)")
    text = st.text_area("plan.yaml", state.plan_draft(), height=420, key=f"rules_text_{hash(state.plan_draft())}",
                        label_visibility="collapsed")
    if text != state.plan_draft():
        try:  # a name changed in the YAML is the user's name for the plan
            if load_plan(text).name != plan.name:
                st.session_state[plan_edit.USER_NAME] = load_plan(text).name or None
        except PlanError:
            pass  # refused below, with the reason
        apply_edit(lambda: dump_plan(load_plan(text)), rows)
    if plan.needs_calibration:
        current = ",".join(f"{name}={weight:g}" for name, weight in recipe_for(plan).mix)
        calib_cols = st.columns([2, 1], vertical_alignment="bottom")
        mix_text = calib_cols[0].text_input(
            "Calibration mix", current, key=f"calib_mix_{hash(current)}",
            help="The slices the calibrated methods fit to, with weights (normalised). The default covers 8 "
                 "languages, code and arithmetic: on SmolLM2 without code=0.1,arith=0.1 the w4g64 preset's KL on "
                 "code was 0.205 (its worst slice) against 0.108 with them, for +5% on en and +10% on zh "
                 "(docs/plan.md). A slice left out is where the method's error stays at RTN's. For text outside "
                 "the handbook's languages, udhr_world (the UDHR in 29 other languages and 21 scripts) at 0.1, taken "
                 "from code and arith (0.05 each), took 11% off Hindi, which no mix holds, at 3 bits (the other "
                 "languages level or lower) for +11% on code and +29% on arith; taken from en it cost en 11% "
                 "(docs/methods.md). Stored with every result of this plan.")
        if calib_cols[1].button("Use this mix", key="use_calib_mix", disabled=mix_text.strip() == current):
            apply_edit(lambda: plan_edit.with_calibration_mix(state.plan_draft(), mix_text), rows)
        gaps = mix_gaps(recipe_for(plan), scored_slices)
        gap_sentence = mix_gaps_sentence(gaps)
        if gap_sentence:
            (st.warning if gaps.unseen_language else st.caption)(gap_sentence)
    rotate = st.checkbox(
        "Rotate inputs (Hadamard) before quantizing", plan.rotate is not None, key=f"rotate_{plan.rotate}",
        help="Every block linear quantized to integers reads its input through a fixed random rotation (a signed "
             "Hadamard Kronecker a small orthogonal matrix), so outlier channels are spread before rounding. On "
             "SmolLM2 with gptq-seq g64 it lowered KL on all nine languages measured, 9-21% at 4 bits and 7-14% at "
             "3 bits (docs/methods.md). Same bytes; the codes are in the rotated basis, so a runtime must rotate "
             "each such layer's input: the GGUF and compressed-tensors exports refuse such a candidate.")
    if plan.rotate is not None:
        st.caption("The scan scored its settings unrotated. Until the closed loop measures the rotated method's own "
                   "error (\"Plan on ... own error\", below, once), the predictions here do not count the rotation: "
                   "on SmolLM2 it lowered gptq-seq's KL 7-19% per language and raised RTN's 13-66% (docs/methods.md).")
    if rotate != (plan.rotate is not None):
        apply_edit(lambda: plan_edit.with_rotation(state.plan_draft(), rotate), rows)
    tune = st.checkbox(
        "Tune scales end to end after quantizing", plan.tune is not None, key=f"tune_{plan.tune}",
        help=TUNE_HELP)
    if plan.tune is not None:
        forward = "bfloat16" if cpu_has_bf16() else "float32"
        st.caption(f"Adds about {plan.tune.steps} training steps through the whole model (on SmolLM2, 2 CPU cores: "
                   f"about {STEP_SECONDS_SMOLLM2['bfloat16']:.0f} s a step with bfloat16 forwards, "
                   f"{STEP_SECONDS_SMOLLM2['float32']:.0f} s in float32; this CPU runs them in {forward}); the "
                   "predictions on this page do not count its gain; measure the candidate to see it.")
    if tune != (plan.tune is not None):
        apply_edit(lambda: plan_edit.with_tuning(state.plan_draft(), tune), rows)
show_explanation()

# ------------------------------------------------------------------ planner
st.markdown("#### Planner")
if not scores:
    st.info("The planner needs sensitivity scores for this model: run a scan on the Sensitivity page.")
else:
    scored_settings = sorted({s for _, s, _ in scores} & set(PLANNER_SETTINGS))
    form = st.columns([1, 1, 2, 2, 1])
    budget_kind = form[0].radio("Budget", ["MB", "bits/weight", "ms/token"], key="planner_budget_kind",
                                format_func=lambda k: {"ms/token": f"projected ms/token on {hardware.name}"}.get(k, k))
    default_mb = float(sum(r.packed_bytes for r in resolve(rows, load_plan("preset:w4g64")))) / 1e6
    default = {"MB": round(default_mb, 1), "bits/weight": 4.5,
               "ms/token": round(projection.decode_ms_per_token, 4)}[budget_kind]
    budget = form[1].number_input("Value", value=default, min_value=0.0001, format="%.4f" if budget_kind == "ms/token"
                                  else "%.1f", key=f"planner_budget_{budget_kind}")
    objective = form[2].selectbox("Objective", ["worst"] + scored_slices, key="planner_objective",
                                  format_func=lambda o: "worst slice" if o == "worst" else f"slice {o}")
    chosen_settings = form[3].multiselect(
        "Settings", scored_settings, default=[s for s in scored_settings if not PLANNER_SETTINGS[s].masks],
        key="planner_settings",
        help="What the planner may choose for each module. Settings with +nm24 also prune (a 2:4 magnitude mask, "
             "then the format), counted at their sparse format's bytes as the size above counts them: pruning is "
             "chosen only where you add them here (scan them on the Sensitivity page first). The latency budget "
             "times them as their dense format: no sparse kernel is assumed.")
    method = form[4].selectbox("Method", list(INT_METHODS), key="planner_method", help=METHODS_HELP)
    # kept linears stay kept; the embedding / lm_head only when a rule keeps it explicitly (presets leave it untouched)
    pinned = {r["module"]: "keep" for r in table.to_dict("records") if r["keep"] and (
        r["kind"] in LINEAR_KINDS or (r["kind"] in ("embedding", "lm_head") and pd.notna(r["rule"])
                                      and not tied(r) and any(k[0] == r["module"] for k in scores)))}
    by_hand = plan_edit.hand_pinned(plan, resolved)  # their own rules decide them; the planner leaves them out
    pinned = {m: s for m, s in pinned.items() if m not in by_hand}
    st.caption(f"Modules kept by the current plan stay kept ({len(pinned)} pinned); modules with a rule of their own "
               f"(edited in the table, protected on the Sensitivity page: {len(by_hand)}) keep it. The embedding (with a tied "
               "lm_head) is one decision when the scan scored it (exhaustive probes). "
               "Solver: exact mixed-integer program (HiGHS); its optimality gap is reported."
               + (f" The latency budget is projected, not measured: {projection.model}." if budget_kind == "ms/token"
                  else ""))
    planner_fit = measured_fit_of(method)
    can_fit = planner_fit.model.fitted and metric == "kl"
    use_fit = st.checkbox(f"Correct the KL scores with the fit on {planner_fit.model.plans} measured "
                          f"{fitted_label(method)} plan(s)",
                          value=can_fit, disabled=not can_fit, key=f"planner_use_fit_{method}_{can_fit}",
                          help="Scales each score by its bit-width's fitted alpha (errors at low bits compound) and "
                               "its slice's fitted factor (the scan's scale can differ per slice), the part of the "
                               "fitted model the exact solver can optimise. Needs the KL metric and "
                               "measured plans (Run this plan, below).")
    low_cap = st.columns([1, 3])[0].selectbox(
        "2-bit modules per block", [None, 0, 1, 2, 3, 4], index=0, key="planner_low_per_block",
        format_func=lambda n: "no cap" if n is None else f"at most {n}",
        help="At most this many modules of one transformer block at 2 bits, for the planner, the closed loop and its "
             "local steps: one-module scores miss how 2-bit errors in one block compound. Measured at uniform W3 g64's "
             "size (RTN, docs/plan.md): on SmolLM2 a cap of 1 took the planner from 0.91x to 0.86x uniform's worst "
             "slice; on Gemma 3 270M it made it worse (1.43x to 1.61x), unless the scores were first scaled per slice "
             "to the measured plans: then no 2-bit module at all gave 0.77x uniform. A lever to try: measure the plan.")
    if st.button("Run planner", type="primary", key="run_planner", disabled=not chosen_settings):
        kind = {"MB": "size_mb", "bits/weight": "bits_per_weight", "ms/token": "latency_ms"}[budget_kind]
        try:
            problem = build_problem(rows, {k: v for k, v in scores_of(method).items() if k[1] in chosen_settings
                                           and k[0] not in by_hand}, scored_slices,
                                    chosen_settings, pinned=pinned, hardware=hardware,
                                    model=planner_fit.model if use_fit else None)
            planned = plan_within_budget(problem, rows, described["summary"], PlannerBudget(kind, budget, low_cap),
                                         objective=objective, base_resolved=resolved, hardware=hardware)
        except ShrinkError as exc:
            st.error(str(exc))
        else:
            solution = planned.solution
            rules = plan_to_dict(solution_plan(solution.choice, rows, method=method))["rules"]
            plan_edit.push(plan_edit.with_rules_first(state.plan_draft(), rules, rows=rows), rows)
            st.session_state["planner_result"] = {
                "status": solution.status, "gap": solution.gap, "seconds": solution.seconds,
                "predicted": solution.predicted, "bytes": planned.total_bytes,
                "projected_ms": planned.projected_ms, "target": planned.target}
            st.rerun()
    loop_cols = st.columns([1, 1, 1, 1])
    loop_rounds = loop_cols[0].number_input("Closed-loop rounds", 1, 6, 2, key="loop_rounds")
    local_steps = loop_cols[1].number_input(
        "Local steps", 0, 6, 2 if objective == "worst" and method == "rtn" else 0,
        key=f"loop_local_steps_{method}_{objective}",
        disabled=objective != "worst",
        help="After the rounds, from the best plan measured: every module's options scored again at that plan "
             "(the gradient of KL there carries how its error interacts with the others'), the planner moves at most "
             "40 modules, the step is run and kept only if the worst slice improved (else at most half as many "
             "move). The worst-slice objective only. With a calibrated method the first step first applies the "
             "method once per setting (each move's error is the method's own): minutes more; and in our GPTQ "
             "benchmark the steps improved the calibration rows but not the eval rows (docs/plan.md), so they are "
             "off by default there.")
    measure_on = loop_cols[2].selectbox(
        "Measure rounds on", ["probe", "protocol"], key="loop_measure_on",
        format_func={"probe": "calibration rows (minutes)", "protocol": "the eval protocol (slow)"}.get,
        help="Calibration rows: each round's plan applied and its KL taken on each slice's calibration rows (the "
             "scan's depth); only the plan the loop keeps is then run at the protocol and stored as a candidate. "
             "The eval protocol: every round is a stored candidate and feeds the page's fit, about 3-6 minutes "
             "a round on 2 cores.")
    loop_scored = scored_method(method, plan.rotate)
    method_scores = loop_scored != "rtn" and st.checkbox(
        f"Plan on {method_label(loop_scored)}'s own error (applies {method} once per setting first: minutes)",
        value=False, key=f"loop_method_scores_{loop_scored}",
        help=f"The scan scores each module at RTN's weights. {method} removes more of that error on some modules and "
             "slices than on others (on SmolLM2, GPTQ removes about three quarters of RTN's attention error on the "
             "slices of its calibration mix and none of down_proj's on a slice outside it). Ticked, the loop first "
             f"applies {method} at every chosen setting, measures its output error over RTN's on each slice's "
             "calibration rows, and plans on the scan's scores scaled by that ratio: at the size of uniform W3 g64 "
             "the GPTQ plan's worst slice measured 0.68x uniform's (0.715x with code outside the mix), against "
             "0.74x on the RTN scan (docs/plan.md). "
             "That table is also the one the local steps use; its time is outside the loop's 4 minutes. The ratios "
             f"are stored per calibration mix and rotation: once measured, every {method_label(loop_scored)} loop "
             f"plans on them (ticked or not) and this page predicts such drafts with them. With rotated inputs the "
             "ratio is taken against the unrotated RTN the scan scored, so RTN gets the option too: rotated RTN "
             "errs differently, module by module, from the RTN the scan scored (docs/plan.md).")
    if loop_cols[3].button("Plan, run, refit (closed loop)", key="run_loop", disabled=not chosen_settings,
                           help="Each round: the planner (scores corrected by the fit), the plan run for real on the "
                                "scored slices, the fit updated; then the local steps. Stops when the measured worst "
                                "slice stops improving, the planner repeats itself, or after 4 minutes; then the "
                                "kept plan runs at the protocol."):
        kind = {"MB": "size_mb", "bits/weight": "bits_per_weight", "ms/token": "latency_ms"}[budget_kind]
        state.set_job_id("plan_loop", jobs.submit(db, "plan_loop", "shrink_core.sensitivity.loop:plan_loop_job", {
            "spec": spec, "slices": scored_slices, "settings": chosen_settings,
            "budget": {"kind": kind, "value": budget, "low_per_block": low_cap}, "plan": state.plan_draft(),
            "method": method,
            "objective": objective, "pinned": pinned, "exclude": sorted(by_hand),
            "target": hardware.name if budget_kind == "ms/token" else None, "rounds": int(loop_rounds),
            "local_steps": int(local_steps), "time_budget_s": 240.0, "measure_on": measure_on,
            "method_scores": bool(method_scores),
            **state.executor_params()}))
    loop_job = show_job(state.job_id("plan_loop"), "Closed loop: plan, run, refit")
    if loop_job is not None and loop_job.status == "done" and loop_job.result.get("rounds"):
        result = loop_job.result
        st.dataframe(pd.DataFrame(result["rounds"]), key="loop_rounds_table", hide_index=True)
        for note in result.get("notes", []):
            st.info(note)
        steps = [r for r in result["rounds"] if r["kind"] != "verified"]
        where = ("the calibration rows of each scored slice" if result.get("measure_on") == "probe"
                 else f"the scored slices at the {result['eval_budget']} protocol, each a candidate (Results page)")
        verified = [r for r in result["rounds"] if r["kind"] == "verified"]
        kept = (f" The kept plan ({verified[0]['of']}) at the {result['eval_budget']} protocol: worst slice "
                f"{verified[0]['measured_worst']:.4f} (on the calibration rows {verified[0]['probe_worst']:.4f}), "
                f"stored as a candidate." if verified else "")
        st.caption(f"Measured ({result['method']}): KL on {where}. Predicted: for a fitted round, the fit on the "
                   f"plans measured before it; for a local step, the measured KL of the plan it started from plus "
                   f"the changes scored at that plan (kept: it measured better). Uniform: every planned module at "
                   f"the one setting that fits the budget, measured the same way; the baseline a mixed plan must "
                   f"beat (the loop keeps it when none does). Last row's error "
                   f"{steps[-1]['error']:+.0%}.{kept} Loop {result.get('loop_seconds', result['seconds']):.0f} s, "
                   f"{result['seconds']:.0f} s in all.")
    result = st.session_state.get("planner_result")
    if result:
        st.success(f"Planner: {result['status']} (gap {result['gap']:.1e}) in {result['seconds']:.2f} s; "
                   f"{result['bytes'] / 1e6:,.1f} MB; projected {result['projected_ms']:.4f} ms/token on "
                   f"{result['target']} (roofline, not measured); predicted worst {max(result['predicted'].values()):.4f}.")

# ------------------------------------------------------------------ run the plan
st.markdown("#### Run this plan")
run_cols = st.columns([3, 1, 1])
run_options = choices.slice_ids()
slices_to_run = run_cols[0].multiselect("Slices", run_options, key="run_slices",  # scored slices: predicted vs measured
                                        default=choices.defaults(scored_slices, run_options, fallback=4))
run_budget = run_cols[1].radio("Protocol", ["fast", "standard"], key="run_budget")
described = db.latest_model(spec)
refused = memory_admission(lambda: admit_eval(described, None, run_budget, state.plan_draft()), described)
if run_cols[2].button("Run this plan", type="primary", key="run_plan", disabled=not slices_to_run or refused):
    state.set_job_id("plan_run", jobs.submit(db, "eval", "shrink_core.runtime.sweep:eval_job",
                                             {"spec": spec, "slices": slices_to_run, "budget": run_budget,
                                              "plan": state.plan_draft(), **state.executor_params()}))
mix_cols = st.columns([3, 1])
mix_cols[0].caption(f"Compare with what you would otherwise ship: llama-quantize's {', '.join(STANDARD_MIXES)} for "
                    "this model, each with and without an importance matrix, scored on the same slices and protocol "
                    "(8 candidates on the Results page).")
if mix_cols[1].button("Evaluate llama.cpp mixes", key="run_mixes", disabled=not slices_to_run or refused):
    state.set_job_id("llama_mixes", jobs.submit(db, "llama_mixes", "shrink_core.results.eval_run:standard_mixes_job",
                                                {"spec": spec, "slices": slices_to_run, "budget": run_budget}))
show_job(state.job_id("llama_mixes"), "Evaluating llama.cpp's standard mixes")
job = show_job(state.job_id("plan_run"), "Applying and evaluating the plan")
if job is not None and job.status == "done" and job.result.get("candidate_id"):
    compare_rows = predicted_vs_measured(db, spec, job.result["candidate_id"], resolved, records)
    st.dataframe(pd.DataFrame(compare_rows), key="predicted_vs_measured", hide_index=True)
    if compare_rows:
        st.caption(f"Measured on {compare_rows[0]['device']} ({compare_rows[0]['protocol']} protocol); predicted ΔNLL is "
                   "the additive sum of the scan's one-module scores (scaled by a calibrated method's stored error ratios "
                   "where measured; empty where the plan's settings were not scanned); "
                   "stored as a candidate with its plan and lineage (see Results).")
