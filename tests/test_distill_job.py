"""Distillation runs end to end on a tiny saved teacher: in a worker process with metrics in the store, a worker killed
with SIGKILL that resumes to the same weights as an uninterrupted run, the stored candidate's lineage, and the CLI."""
import json
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from shrink_core.distill import DistillConfig
from shrink_core.distill.run import read_run, run_dir, run_distill
from shrink_core.distill.toy import save_toy_teacher
from shrink_core.distill.train import has_checkpoint
from shrink_core.errors import ShrinkError
from shrink_core.results.store import Store
from shrink_core.runtime import jobs

from .jobwait import HANG_S, job_row, log_tail, wait_job

TARGET = "shrink_core.distill.run:distill_job"


def toy_config(teacher, **overrides):
    base = dict(teacher=str(teacher), drop_count=2, mix=(("toy_en", 1.0),), seq_len=32, batch_size=2,
                pool_sequences=8, heldout_sequences=2, steps=12, lr=3e-3, warmup_steps=2, checkpoint_every=4,
                eval_every=4)
    return DistillConfig(**{**base, **overrides})


def student_weights(name):
    return load_file(str(run_dir(name) / "student" / "model.safetensors"))


def wait_while_running(home, job_id, predicate):
    """Until `predicate` holds while the job runs; a job that ends first fails the test with its log tail."""
    deadline = time.time() + HANG_S
    while not predicate():
        row = job_row(home, job_id)
        if row["status"] not in ("queued", "running") or time.time() > deadline:
            raise AssertionError(f"job {job_id} is {row['status']} ({row['error']}):\n{log_tail(home, job_id)}")
        time.sleep(0.1)


def test_job_runs_in_a_worker_logs_metrics_and_stores_a_distilled_candidate(shrink_home, tmp_path):
    teacher = save_toy_teacher(tmp_path / "teacher")
    store = Store()
    params = {"config": toy_config(teacher).to_dict(), "name": "w1", "slices": ["toy_en"], "budget": "fast"}
    job_id = jobs.submit(store, "distill", TARGET, params)
    wait_job(shrink_home, job_id)  # fails with the job's error and log tail unless it is done
    job = jobs.get(store, job_id)
    run_id = job.result["run_id"]
    keys = {m["key"] for m in store.metrics(run_id)}
    assert {"train_loss", "heldout_loss", "tokens_per_s", "lr"} <= keys
    assert max(m["step"] for m in store.metrics(run_id)) == 12
    candidate = next(c for c in store.candidates() if c["id"] == job.result["candidate_id"])
    reference = next(c for c in store.candidates() if c["id"] == candidate["parent_id"])
    assert candidate["kind"] == "distilled" and reference["kind"] == "reference"
    assert candidate["calibration"]["distill"]["steps"] == 12
    assert (tmp_path / "teacher").resolve() != candidate["artifact_dir"]
    assert os.path.isfile(os.path.join(candidate["artifact_dir"], "config.json"))
    evals = store.results("eval", candidate_id=candidate["id"])
    assert [r["slice"] for r in evals] == ["toy_en"] and evals[0]["payload"]["kl"] >= 0


@pytest.mark.slow
def test_killed_worker_resumes_to_the_same_weights_as_an_uninterrupted_run(shrink_home, tmp_path):
    teacher = save_toy_teacher(tmp_path / "teacher")
    config = toy_config(teacher, steps=150, checkpoint_every=10, eval_every=50)
    run_distill(config, name="straight", slices=[], evaluate_at_end=False)

    store = Store()
    params = {"config": config.to_dict(), "name": "killed", "slices": [], "budget": "fast"}
    job_id = jobs.submit(store, "distill", TARGET, params)
    run_id = lambda: (read_run("killed") or {}).get("run_id")  # noqa: E731 (the store's run, once the worker made it)
    wait_while_running(shrink_home, job_id, lambda: bool(run_id()) and any(m["step"] >= 25
                                                                          for m in store.metrics(run_id())))
    os.kill(jobs.get(store, job_id).pid, signal.SIGKILL)
    assert jobs.wait(store, job_id, timeout=HANG_S).status == "failed"  # jobs.wait reaps: the store notes the death
    assert not (run_dir("killed") / "student").exists()

    resumed_id = jobs.submit(store, "distill", TARGET, {**params, "resume": True})
    wait_job(shrink_home, resumed_id)
    resumed = jobs.get(store, resumed_id)
    expected, got = student_weights("straight"), student_weights("killed")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    steps = [m["step"] for m in store.metrics(resumed.result["run_id"]) if m["key"] == "train_loss"]
    assert steps == list(range(1, 151))  # steps redone after the checkpoint are not logged twice


def test_resume_refuses_an_unknown_run_and_a_name_clash(shrink_home, tmp_path):
    teacher = save_toy_teacher(tmp_path / "teacher")
    with pytest.raises(ShrinkError, match="no run 'nope' to resume"):
        run_distill(toy_config(teacher), name="nope", resume=True)
    run_distill(toy_config(teacher, steps=2), name="once", slices=[], evaluate_at_end=False)
    with pytest.raises(ShrinkError, match="already exists"):
        run_distill(toy_config(teacher, steps=2), name="once", slices=[])


def test_a_resumed_run_keeps_its_own_evaluation_slices(shrink_home, tmp_path):
    teacher = save_toy_teacher(tmp_path / "teacher")
    config = toy_config(teacher, steps=4, checkpoint_every=2)
    assert not run_distill(config, name="own", slices=["toy_mc"], stop_after=2)["finished"]
    report = run_distill(config, name="own", resume=True)  # as the page's Resume: no slices given
    assert report["finished"] and list(report["slices"]) == ["toy_mc"]
    # the saved student ends the run: its resume state (3x the student) is gone, its last step still shown
    assert not has_checkpoint(run_dir("own")) and read_run("own")["checkpoint_step"] == 4
    with pytest.raises(ShrinkError, match="'own' is finished: its student is saved in"):
        run_distill(config, name="own", resume=True)


def test_cli_distill_drops_listed_blocks_and_writes_a_loadable_student(shrink_home, tmp_path, capsys):
    from shrink_core.cli.entry import main
    from shrink_core.model.load import load

    teacher = save_toy_teacher(tmp_path / "teacher")
    code = main(["distill", "--teacher", str(teacher), "--drop-blocks", "1,2", "--steps", "3", "--mix", "toy_en",
                 "--seq-len", "32", "--batch-size", "2", "--slices", "toy_en", "--out", str(tmp_path / "out"),
                 "--name", "cli", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dropped_blocks"] == [1, 2] and report["finished"] and "toy_en" in report["slices"]
    student = load(str(tmp_path / "out"))
    assert student.model.config.num_hidden_layers == 2
    assert main(["distill", "--teacher", str(teacher), "--drop-blocks", "x,y"]) == 1
    assert "neither a count" in capsys.readouterr().err
