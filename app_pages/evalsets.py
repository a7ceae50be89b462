"""Eval sets page: browse slices, add your own, run the loaded model's baseline with confidence intervals."""
import pandas as pd
import streamlit as st

from shrink_core.errors import ShrinkError
from shrink_core.evaluation.evaluate import PROTOCOLS
from shrink_core.evaluation.slices import add_user_slice, list_slices, load_rows
from shrink_core.evaluation.stats import MIN_INTERVAL_ITEMS, interval_note
from shrink_core.results.eval_run import admit_eval
from shrink_core.runtime import jobs
from ui import charts, choices, state
from ui.data import store
from ui.jobs import memory_admission, show_job

st.title("Eval sets")
db = store()
spec = state.model_spec()
infos = list_slices()
by_id = {s.id: s for s in infos}

st.caption(
    f"{len(infos)} slices of real text and labeled tasks, extracted from registry packages (evalsets/README.md). "
    "Each slice has a calibration part disjoint from its evaluation part."
)
table = pd.DataFrame([s.row() for s in infos])
st.dataframe(
    table[["id", "title", "kind", "metric", "languages", "rows_eval", "rows_calib", "tokens", "license", "source"]],
    key="slices_table", hide_index=True,
    column_config={"tokens": st.column_config.NumberColumn("tokens (SmolLM2)", format="localized")},
)

with st.expander("Look inside a slice"):
    chosen = st.selectbox("Slice", list(by_id), key="peek_slice")
    info = by_id[chosen]
    st.markdown(f"**{info.title}**: {info.description}")
    st.caption(f"Protocol: {info.protocol}  \nSource: {', '.join(info.source)}. License: {info.license}.")
    for number, row in enumerate(load_rows(info, "eval")[:3], 1):  # as text, line breaks kept (not JSON escapes)
        with st.container(border=True):
            content = {f: v for f, v in row.items() if f in ("text", "context", "choices", "answer")}
            st.caption(f"Row {number}: " + ", ".join(f"{f} {v}" for f, v in row.items() if f not in content))
            for field, value in content.items():
                if isinstance(value, list):  # choices, numbered as `answer` counts them
                    value = "\n".join(f"{i}. {v.strip()}" for i, v in enumerate(value))
                st.markdown(f"**{field}**")
                st.text(str(value))

with st.expander("Add your own slice (JSONL, JSON, CSV or TXT)"):
    st.caption("Text rows need `text`; tasks need `context` and `answer`, plus `choices` (a list) for multiple choice. "
               "A bad file is refused with the row at fault and never touches the slices already here.")
    upload = st.file_uploader("File", type=["jsonl", "json", "csv", "txt"], key="slice_upload")
    new_id = st.text_input("Slice id (optional)", key="slice_upload_id", placeholder="user_<file name>")
    if upload is not None and st.button("Add slice", key="add_slice"):
        try:
            added = add_user_slice(upload.name, upload.getvalue(), slice_id=new_id.strip() or None)
        except ShrinkError as exc:
            st.error(str(exc))
        except OSError as exc:
            st.error(f"The slice could not be saved ({exc.strerror or exc}); check that $SHRINK_HOME is writable.")
        else:
            st.success(f"Added slice '{added.id}' with {added.rows} rows ({added.kind}).")

st.markdown(f"#### Baseline of `{spec}`")
left, right = st.columns([3, 1])
picked = left.multiselect("Slices to evaluate", list(by_id), default=choices.defaults(("en", "fr"), list(by_id)),
                          key="eval_slices")
budget = right.radio("Protocol", list(PROTOCOLS), horizontal=True, key="eval_budget",
                     help="fast: 120 text rows / 200 questions per slice; standard: 480 / 1000; full: everything.")
described = db.latest_model(spec)
refused = memory_admission(lambda: admit_eval(described, None, budget, None), described)
if st.button("Run baseline", type="primary", key="run_baseline", disabled=not picked or refused):
    state.set_job_id("eval", jobs.submit(db, "eval", "shrink_core.runtime.sweep:eval_job",
                                         {"spec": spec, "slices": picked, "budget": budget,
                                          **state.executor_params()}))
running = show_job(state.job_id("eval"), f"Evaluating {spec}")
# Slices of a running baseline that are not stored yet: shown as pending rows, each replaced as soon as it is done.
pending = ([s for s in running.params.get("slices", []) if s not in running.parts]
           if running is not None and running.active and running.params.get("plan") is None else [])
pending_budget = running.params.get("budget", "fast") if pending else None

rows = [r for r in db.results("eval", model_spec=spec) if r["plan"] is None]
if not rows:
    if pending:
        st.info(f"Running: each slice appears here as soon as it is done ({', '.join(pending)} pending).")
    else:
        st.info("No baseline results for this model yet: pick slices (English and one other language is a good "
                "start) and press Run baseline. The baseline is what every compressed candidate is compared with.")
    st.stop()
latest = {}
for r in rows:  # newest first: keep the newest per (slice, budget)
    latest.setdefault((r["slice"], r["budget"]), r)
records = []
for (slice_id, run_budget), r in latest.items():
    p = r["payload"]
    too_few = interval_note(p["items"])  # no interval below the minimum, even one stored before there was one
    ppl_ci, acc_ci = (None, None) if too_few else (p.get("ppl_ci"), p.get("accuracy_ci"))
    records.append({
        "slice": slice_id, "budget": run_budget, "items": p["items"], "tokens": p["tokens"], "ppl": p["ppl"],
        "ppl_low": (ppl_ci or [None])[0], "ppl_high": (ppl_ci or [None, None])[1], "bpb": p.get("bpb"),
        "accuracy": p.get("accuracy"), "acc_low": (acc_ci or [None])[0],
        "acc_high": (acc_ci or [None, None])[1], "interval": too_few or "95% bootstrap", "device": r["device"],
        "status": "earlier run; rerunning" if slice_id in pending and run_budget == pending_budget else "done",
    })
records += [{"slice": s, "budget": pending_budget, "status": "pending", "device": None} for s in pending
            if (s, pending_budget) not in latest]
results = pd.DataFrame(records)
shown_budget = st.radio("Show budget", sorted(results["budget"].unique()), horizontal=True, key="show_budget")
view = results[results["budget"] == shown_budget]
devices = ", ".join(sorted(set(view["device"].dropna()))) or "nothing yet"
st.caption(f"Measured on {devices}; intervals are 95% bootstrap over items (1,000 resamples); "
           f"none below {MIN_INTERVAL_ITEMS} items. Pending rows fill in as the running job finishes each slice.")
st.dataframe(view.drop(columns=["device"]), key="baseline_table", hide_index=True)
done = view[view["status"] != "pending"]
text_view = done[done["accuracy"].isna()]
task_view = done[done["accuracy"].notna()]
if len(text_view):
    st.plotly_chart(charts.slice_bars(text_view, "ppl", "ppl_low", "ppl_high", "Perplexity per slice (lower is better)",
                                      "perplexity (measured)"), key="ppl_chart")
    st.caption(f"How to read: perplexity of the uncompressed model per slice, measured on {devices}; slices differ "
               "in language and tokenizer fit, so compare a slice with itself across candidates, not slices with "
               "each other. Whiskers: the 95% bootstrap interval over items.")
if len(task_view):
    st.plotly_chart(charts.slice_bars(task_view, "accuracy", "acc_low", "acc_high", "Task accuracy per slice",
                                      "accuracy (measured)"), key="acc_chart")
    st.caption("How to read: the share of task items answered right (the gold choice has the lowest NLL). Whiskers: "
               "the 95% bootstrap interval; a candidate whose accuracy falls inside it is not distinguishable here.")
