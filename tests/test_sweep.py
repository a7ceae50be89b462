"""The sweep from its three doors: the CLI, a background job on the Ray executor (cancel included), and the pages
(the Results page's control, the Model page's executor box)."""
import json
import os
import re
import subprocess
import sys
import time

import psutil
import pytest
from streamlit.testing.v1 import AppTest

from shrink_core.paths import REPO_ROOT
from shrink_core.results.store import Store
from shrink_core.runtime import jobs

from .jobwait import wait_job

W4 = ("version: 1\nname: rtn-w4g32\nrules:\n  - kind: [q, k, v, o, gate, up, down]\n"
      "    weights: {bits: 4, group_size: 32, method: rtn}\n")


def cli(*args, home):
    env = dict(os.environ, SHRINK_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "shrink_core", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=env, timeout=600)


@pytest.mark.integration
def test_cli_sweep_streams_each_evaluation_and_stores_a_candidate_per_plan(toy_dir, tmp_path, shrink_home):
    plan_file = tmp_path / "w4.yaml"
    plan_file.write_text(W4)
    result = cli("sweep", "--model", str(toy_dir), "--plans", f"preset:w8,{plan_file}", "--slices", "toy_en,toy_mc",
                 "--json", home=shrink_home)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    parts = [line["part"] for line in lines[:-1]]
    assert set(parts) == {"reference x toy_en", "reference x toy_mc", "w8 x toy_en", "w8 x toy_mc",
                          "rtn-w4g32 x toy_en", "rtn-w4g32 x toy_mc"}
    report = lines[-1]
    assert set(report["candidates"]) == {"w8", "rtn-w4g32"} and report["executor"]["kind"] == "local"
    assert report["results"]["rtn-w4g32 x toy_en"]["kl"] > report["results"]["w8 x toy_en"]["kl"] > 0
    stored = Store(shrink_home / "shrink.db").results("eval")
    assert len(stored) == 6 and all(r["payload"]["executed"]["executor"] == "local" for r in stored)


@pytest.mark.parametrize("args, words", [
    (["--plans", "preset:w8", "--ray-address", "auto"], "only applies to --executor ray"),
    (["--plans", "preset:w99"], "Unknown plan preset 'w99'"),
    (["--plans", "preset:w8", "--slices", "klingon"], "no slice 'klingon'"),
])
def test_cli_sweep_bad_input_is_one_sentence(args, words, shrink_home):
    result = cli("sweep", *args, home=shrink_home)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and lines[-1].startswith("error: ") and words in lines[-1], result.stderr


def _ray_processes_under(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.integration
def test_a_sweep_job_on_ray_stores_its_parts_and_a_cancel_stops_its_cluster(toy_dir, shrink_home):
    pytest.importorskip("ray", reason="the ray executor is optional; ./run test installs it")
    store = Store()
    executor = {"kind": "ray", "local_cpus": 2}
    job_id = jobs.submit(store, "sweep", "shrink_core.runtime.sweep:sweep_job",
                         {"spec": str(toy_dir), "plans": ["preset:w8", W4], "slices": ["toy_en"], "budget": "fast",
                          "executor": executor})
    row = wait_job(shrink_home, job_id)
    assert sorted(json.loads(row["parts_json"])) == ["rtn-w4g32 x toy_en", "w8 x toy_en"]
    assert json.loads(row["result_json"])["executor"]["kind"] == "ray"
    assert {r["payload"]["executed"]["executor"] for r in store.results("eval")} == {"ray"}

    # a long sweep (the full protocol on 3 slices) cancelled once its local Ray runs: the job ends cancelled and
    # the Ray it started (raylet, GCS, workers: the job worker's children) is gone with it
    job_id = jobs.submit(store, "sweep", "shrink_core.runtime.sweep:sweep_job",
                         {"spec": "builtin:smollm2-135m", "plans": ["preset:w8"], "slices": ["en", "fr", "zh"],
                          "budget": "full", "executor": executor})
    worker = None
    for _ in range(1200):  # until the sweep's own units run (identify's "of 1 units" comes first)
        job = jobs.get(store, job_id)
        worker = job.pid
        found = re.search(r"of (\d+) units done", job.message or "")
        if job.status == "running" and found and int(found.group(1)) > 1:
            break
        assert job.active, job.error
        time.sleep(0.25)
    children = _ray_processes_under(worker)
    assert children, "the job's local Ray should run under its worker"
    assert jobs.cancel(store, job_id)
    row = wait_job(shrink_home, job_id, expect="cancelled")
    assert "Cancelled" in row["error"]
    psutil.wait_procs([psutil.Process(p) for p in children if psutil.pid_exists(p)], timeout=60)
    assert not [p for p in children if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]


def test_results_page_sweep_control_submits_plans_x_slices_on_the_sessions_executor(shrink_home):
    at = AppTest.from_file(str(REPO_ROOT / "app_pages" / "results.py"), default_timeout=60).run()
    assert not at.exception
    at.multiselect(key="sweep_plans").set_value(["preset:w8"])
    at.multiselect(key="sweep_slices").set_value(["en", "fr"]).run()
    at.button(key="sweep_run").click().run()
    assert not at.exception
    job_id = at.session_state["job:sweep"]
    job = jobs.get(Store(), job_id)
    assert job.kind == "sweep" and job.params["plans"] == ["preset:w8"] and job.params["slices"] == ["en", "fr"]
    assert job.params["executor"]["kind"] == "local"
    jobs.cancel(Store(), job_id)  # what the job computes is the CLI's and the job tests' business


def test_model_page_shows_the_executor_and_what_it_sees(shrink_home):
    from tests.test_page_model import _modules, _summary

    pytest.importorskip("ray", reason="the ray executor is optional; ./run test installs it")
    Store().save_model({"spec": "builtin:smollm2-135m", "weights_hash": "h", "summary": _summary(),
                        "modules": _modules(), "load_seconds": 1.0, "from_cache": True})
    at = AppTest.from_file(str(REPO_ROOT / "app_pages" / "model.py"), default_timeout=60).run()
    assert any("**local**: 1 worker slot" in c.value for c in at.caption)
    at.selectbox(key="executor_kind").set_value("ray").run()
    assert not at.exception
    assert at.session_state["executor"]["kind"] == "ray"
    assert any(f"**ray** at local: {os.cpu_count()} worker slot" in c.value for c in at.caption), \
        [c.value for c in at.caption]


@pytest.mark.integration
def test_a_scan_job_on_ray_stores_each_slice_as_a_part(toy_dir, shrink_home):
    pytest.importorskip("ray", reason="the ray executor is optional; ./run test installs it")
    from shrink_core.sensitivity import stored_records

    store = Store()
    job_id = jobs.submit(store, "sensitivity", "shrink_core.sensitivity:sensitivity_job",
                         {"spec": str(toy_dir), "slices": ["toy_en", "toy_mc"], "settings": ["w4g64"],
                          "budget": "quick", "executor": {"kind": "ray", "local_cpus": 2}})
    row = wait_job(shrink_home, job_id)
    assert sorted(json.loads(row["parts_json"])) == ["toy_en", "toy_mc"]
    assert json.loads(row["result_json"])["units"] == 4  # per slice: the Fisher pass and the embedding's probes
    records = stored_records(store, str(toy_dir))
    assert {r.slice for r in records} == {"toy_en", "toy_mc"} and len(records) == 2 * 2 * (3 * 7 + 1)
    assert {r["payload"]["executed"]["executor"] for r in store.results("sensitivity")} == {"ray"}
