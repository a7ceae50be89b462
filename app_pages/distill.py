"""Distill page: configure a student (size projected before starting), launch, watch live curves, cancel, resume."""
import streamlit as st

from shrink_core.distill import DistillConfig, projected_shape
from shrink_core.distill.run import active_job, latest_job, list_runs, new_run_name, read_run, teacher_config
from shrink_core.errors import ShrinkError
from shrink_core.evaluation.calibration import CalibrationRecipe
from shrink_core.runtime import jobs
from ui import choices, curves, state
from ui.data import store
from ui.jobs import job_outcome, job_panel, show_job

TARGET = "shrink_core.distill.run:distill_job"


def rerun_once_listed(name: str) -> None:
    """Polled while a just-started job has not written its run directory yet; reruns the page once it has."""
    if read_run(name) is not None:
        st.rerun(scope="app")


st.title("Distill")
db = store()
spec = state.model_spec()
st.caption("Train a smaller student to match the teacher's temperature-softened logits (KL, optionally plus next-token "
           "and hidden-state losses) on calibration rows only, never on evaluation rows. Checkpoints let a run that "
           "was stopped, killed or interrupted by a restart resume exactly where its last checkpoint left it.")


@st.cache_resource(show_spinner=False)
def _teacher_config(model_spec: str):
    return teacher_config(model_spec, store())


config = _teacher_config(spec)
if config is None:  # not opened yet: don't keep that answer, or opening the model later would not be seen here
    _teacher_config.clear()
st.markdown(f"#### Teacher `{spec}`")
source = st.radio("Student", ["From the teacher (drop blocks, prune width)", "A stored candidate (recovery)"],
                  horizontal=True, key="distill_source")
from_teacher = source.startswith("From")
drop_blocks, drop_count, mlp_prune, student_dir = (), 0, 0.0, None
if from_teacher:
    if config is None:
        st.info("Open this model on the Model page first, so its shape is known here.")
        st.stop()
    total = config.num_hidden_layers
    how = st.radio("Blocks to drop", ["Chosen by block influence (measured on the data mix)", "Chosen by hand"],
                   horizontal=True, key="distill_drop_mode")
    if how.startswith("Chosen by block"):
        drop_count = st.slider("How many blocks to drop", 0, total - 1, min(total // 3, total - 1), key="distill_drop_count",
                               help="Block influence = 1 - cos(input, output) of each block; the least influential "
                                    "are dropped (block 0 is always kept).")
    else:
        drop_blocks = tuple(st.multiselect("Blocks to drop", list(range(total)), key="distill_drop_list"))
    mlp_prune = st.slider("MLP channels removed in every kept block", 0.0, 0.75, 0.0, 0.05, key="distill_mlp")
    shape = projected_shape(config, drop_blocks or drop_count, mlp_prune)
    teacher_shape = projected_shape(config)
    cols = st.columns(4)
    cols[0].metric("Blocks", f"{shape['blocks']} of {total}")
    cols[1].metric("Parameters", f"{shape['params'] / 1e6:.1f} M",
                   delta=f"{shape['params'] / teacher_shape['params'] - 1:.0%}", delta_color="off")
    cols[2].metric("Size fp32", f"{shape['fp32_bytes'] / 1e6:.0f} MB")
    cols[3].metric("Size bf16", f"{shape['bf16_bytes'] / 1e6:.0f} MB")
    st.caption("Projected: computed from the shapes (parameters x bytes per weight), not measured; tied embeddings "
               "counted once.")
else:
    stored = [c for c in db.candidates() if c["artifact_dir"] and c["kind"] != "reference"]
    if not stored:
        st.info("No stored candidate with a saved directory yet: apply a plan (Plan page or `apply --out`) first.")
        st.stop()
    labels = {f"{c['id']}: {c['name']} ({c['kind']})": c["artifact_dir"] for c in stored}
    student_dir = labels[st.selectbox("Candidate", list(labels), key="distill_candidate")]
    st.caption("Quantized students train with a straight-through estimator: the forward pass sees the weights "
               "snapped to their round-to-nearest grid, gradients update the float weights, and the result is snapped "
               "back onto the grid when saved.")

st.markdown("#### Training")
left, middle, right = st.columns(3)
mix_text = left.text_input("Data mix (calibration rows)", "en=1", key="distill_mix",
                           help="slice=weight pairs, e.g. en=0.6,code=0.2,fr=0.2; only calibration rows are used.")
steps = middle.number_input("Steps", 1, 100_000, 200, key="distill_steps")
lr = right.number_input("Learning rate", 1e-6, 1e-2, 1e-4, format="%.6f", key="distill_lr")
temperature = left.number_input("Temperature", 0.5, 8.0, 2.0, 0.5, key="distill_temperature")
batch_size = middle.number_input("Batch (sequences)", 1, 64, 4, key="distill_batch")
seq_len = right.number_input("Sequence length", 32, 2048, 256, 32, key="distill_seq_len")
with st.expander("Loss weights, checkpoints, device"):
    a, b, c = st.columns(3)
    ce_weight = a.number_input("Next-token loss weight", 0.0, 10.0, 0.0, 0.1, key="distill_ce")
    hidden_weight = b.number_input("Hidden-state loss weight", 0.0, 10.0, 0.0, 0.1, key="distill_hidden",
                                   disabled=not from_teacher)
    checkpoint_every = c.number_input("Checkpoint every N steps", 1, 10_000, 50, key="distill_ckpt")
    device = a.selectbox("Device", ["cpu", "auto", "cuda"], key="distill_device",
                         help="auto uses a CUDA GPU when torch sees one; the same code runs on both.")
    seed = b.number_input("Seed", 0, 2**31 - 1, 0, key="distill_seed")
slice_ids = choices.slice_ids()
eval_slices = st.multiselect("Evaluate the student at the end on", slice_ids,
                             default=choices.defaults(("en",), slice_ids), key="distill_slices")

if st.button("Start distillation", type="primary", key="distill_start"):
    try:
        run_config = DistillConfig(
            teacher=spec, drop_blocks=tuple(sorted(drop_blocks)), drop_count=int(drop_count), mlp_prune=mlp_prune,
            student_dir=student_dir, mix=CalibrationRecipe.parse(mix_text).mix, seq_len=int(seq_len),
            batch_size=int(batch_size), steps=int(steps), lr=float(lr), warmup_steps=min(10, int(steps)),
            temperature=float(temperature), ce_weight=float(ce_weight), hidden_weight=float(hidden_weight),
            checkpoint_every=int(checkpoint_every), seed=int(seed), device=device)
    except ShrinkError as exc:
        st.error(str(exc))
    else:
        params = {"config": run_config.to_dict(), "name": new_run_name(), "slices": eval_slices, "budget": "fast"}
        state.set_job_id("distill", jobs.submit(db, "distill", TARGET, params))

def run_state(name: str, running: bool) -> None:
    """The run's one-line state, re-read from its directory: a live run writes its student's shape after it starts."""
    run = read_run(name) or {}
    done_step, steps = run.get("checkpoint_step") or 0, run.get("config", {}).get("steps")
    # running first: the student is saved before the job evaluates it, and "finished" means its figures are stored
    status = ("running" if running else "finished" if run.get("finished") else
              f"stopped at checkpoint step {done_step} of {steps}" if done_step else "not started")
    shape = (f"dropped blocks {run['dropped'] or 'none'}; student {run['student_params']:,} parameters"
             if run.get("student_params") else "student being built (blocks to drop, parameters: shown once chosen)")
    st.caption(f"{status}; {shape}; state in $SHRINK_HOME/distill/{name}/")


st.markdown("#### Runs")
job_id = state.job_id("distill")
current = jobs.get(db, job_id) if job_id is not None else None
if current is not None and read_run(current.params["name"]) is None:
    # The worker writes the run's directory once it has started (a few seconds); until then show the job itself.
    show_job(current.id, f"Starting {current.params['name']}")
    if current.active:
        st.fragment(run_every=1.0)(rerun_once_listed)(current.params["name"])
        st.stop()
runs = list_runs()
if not runs:
    st.info("No distillation runs yet: configure a student and press Start distillation.")
    st.stop()
names = [r["name"] for r in runs]
default = names.index(current.params["name"]) if current and current.params.get("name") in names else 0
chosen = st.selectbox("Run", names, index=default, key="distill_run")
run = runs[names.index(chosen)]
cfg = run["config"]
running = active_job(db, chosen)
if running is not None:
    job_panel(running.id, f"Distilling {chosen}")
else:
    last = latest_job(db, chosen)  # after an app restart the session forgot its job; the store did not
    if last is not None:
        job_outcome(last.id)
if running is not None:  # re-read with the curves: a starting run writes its student's shape a little later
    st.fragment(run_every=5.0)(run_state)(chosen, True)
else:
    run_state(chosen, False)
if run["finished"] and running is None:
    st.caption(f"The student is stored as the candidate 'distilled {chosen}': the Results page plots it per slice.")
if not run["finished"] and running is None and st.button(
        "Resume", key="distill_resume", help="Continue from the last checkpoint with the run's own config."):
        params = {"config": cfg, "name": chosen, "resume": True}  # the run keeps its own slices and budget
        state.set_job_id("distill", jobs.submit(db, "distill", TARGET, params))
        st.rerun()


def show_curves(name: str) -> None:
    fresh = read_run(name)  # re-read: the store run id appears only after the teacher has loaded
    run_id = fresh["run_id"] if fresh else None
    frame = curves.metrics_frame(db.metrics(run_id) if run_id else [])
    if len(frame) == 0 or "train_loss" not in frame:
        st.caption("No steps logged yet.")
        return
    st.plotly_chart(curves.loss_curves(frame, "Loss (train: this step's batch; held-out: windows never trained on)"),
                    key=f"distill_loss_{name}")
    st.plotly_chart(curves.throughput_curve(frame, "Training throughput (teacher forward + student forward/backward)"),
                    key=f"distill_tps_{name}")
    median = frame["tokens_per_s"].median()
    st.caption(f"Measured during training on {fresh['device'] or 'cpu'}: median {median:,.0f} tokens/s over "
               f"{len(frame)} steps (one measurement per step, wall clock). Loss is KL at the run's temperature.")


if running is not None:
    # every 5 s: redrawing two charts costs the server CPU the training shares on a small machine
    st.fragment(run_every=5.0)(show_curves)(chosen)
else:
    show_curves(chosen)
