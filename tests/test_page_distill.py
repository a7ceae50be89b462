"""The Distill page with AppTest: projected student size before starting, start a job, curves and Resume of a run."""

from streamlit.testing.v1 import AppTest

from shrink_core.distill import DistillConfig
from shrink_core.distill.run import run_distill
from shrink_core.distill.toy import save_toy_teacher
from shrink_core.paths import REPO_ROOT
from shrink_core.results.store import Store
from shrink_core.runtime import jobs

PAGE = str(REPO_ROOT / "app_pages" / "distill.py")


def page(teacher):
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["model_spec"] = str(teacher)
    return at.run()


def test_student_size_is_projected_before_starting_and_start_queues_a_job(shrink_home, tmp_path):
    teacher = save_toy_teacher(tmp_path / "teacher", layers=4)
    at = page(teacher)
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Blocks"] == "3 of 4"  # a third of 4 blocks dropped by default -> 1 dropped
    assert any("Projected" in c.value and "not measured" in c.value for c in at.caption)
    at.slider(key="distill_drop_count").set_value(2).run()
    assert {m.label: m.value for m in at.metric}["Blocks"] == "2 of 4"
    assert any("No distillation runs yet" in i.value for i in at.info)
    at.text_input(key="distill_mix").set_value("toy_en=1")
    at.number_input(key="distill_steps").set_value(3)
    at.button(key="distill_start").click().run()
    assert not at.exception
    # the worker writes the run's directory only once it has started: until then the job itself is shown
    assert not any("No distillation runs yet" in i.value for i in at.info)
    job = jobs.get(Store(), at.session_state["job:distill"])
    assert job.kind == "distill" and job.params["config"]["drop_count"] == 2
    assert job.params["config"]["mix"] == {"toy_en": 1.0}
    jobs.cancel(Store(), job.id)


def test_a_stopped_run_shows_its_curves_and_a_resume_button(shrink_home, tmp_path):
    teacher = save_toy_teacher(tmp_path / "teacher", layers=4)
    config = DistillConfig(teacher=str(teacher), drop_count=1, mix=(("toy_en", 1.0),), seq_len=32, batch_size=2,
                           pool_sequences=8, heldout_sequences=2, steps=10, lr=3e-3, warmup_steps=2,
                           checkpoint_every=3, eval_every=2)
    run_distill(config, name="half", slices=[], stop_after=7, evaluate_at_end=False)
    at = page(teacher)
    assert not at.exception
    assert at.selectbox(key="distill_run").value == "half"
    assert any("stopped at checkpoint step 6 of 10" in c.value for c in at.caption)
    assert len(at.get("plotly_chart")) == 2
    assert any("Measured during training" in c.value for c in at.caption)
    at.button(key="distill_resume").click().run()
    job = jobs.get(Store(), at.session_state["job:distill"])
    assert job.params["resume"] is True and job.params["name"] == "half"
    assert "slices" not in job.params  # a resumed run keeps the slices it was started with
    jobs.cancel(Store(), job.id)


def test_a_run_whose_job_still_evaluates_the_student_says_running(shrink_home, tmp_path):
    """The student is saved before its job evaluates it: until the job ends the run is running, not finished (the
    page said "finished" while the student's figures were not stored yet, and a test read them)."""
    teacher = save_toy_teacher(tmp_path / "teacher", layers=4)
    config = DistillConfig(teacher=str(teacher), drop_count=1, mix=(("toy_en", 1.0),), seq_len=32, batch_size=2,
                           pool_sequences=8, heldout_sequences=2, steps=2, warmup_steps=1, checkpoint_every=2)
    run_distill(config, name="saved", slices=[], evaluate_at_end=False)  # the student is on disk
    job_id = jobs.submit(Store(), "distill", "shrink_core.distill.run:distill_job",
                         {"config": config.to_dict(), "name": "saved", "slices": ["toy_en"]},
                         spawn=False)  # its job has not ended (here: not started; a worker evaluating looks the same)
    at = page(teacher)
    assert not at.exception
    state = next(c.value for c in at.caption if "state in $SHRINK_HOME/distill/saved/" in c.value)
    assert state.startswith("running;"), state
    assert not any("stored as the candidate" in c.value for c in at.caption)
    jobs.cancel(Store(), job_id)
