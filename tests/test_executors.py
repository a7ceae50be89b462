"""The executors: local and Ray give the same figures; a lost Ray worker is retried once, then reported by unit;
cancel stops the remote tasks. The Ray tests run on a local Ray cluster this module starts and stops (2 CPUs, no
dashboard)."""
import os
import signal
import time

import psutil
import pytest

from shrink_core.errors import JobCancelled, ShrinkError
from shrink_core.results.store import Store
from shrink_core.runtime.executors import ExecutorConfig, Unit, UnitRef, failure_sentence, run_units
from shrink_core.runtime.sweep import run_sweep

SLEEP = "shrink_core.runtime.diagnostics:sleep_unit"
PLANS = ["preset:w8",
         "version: 1\nname: rtn-w4g32\nrules:\n  - kind: [q, k, v, o, gate, up, down]\n"
         "    weights: {bits: 4, group_size: 32, method: rtn}\n",
         "version: 1\nname: rtn-w3g32\nrules:\n  - kind: [q, k, v, o, gate, up, down]\n"
         "    weights: {bits: 3, group_size: 32, method: rtn}\n"]
SLICES = ["toy_en", "toy_mc"]


def test_config_is_checked_in_one_sentence():
    with pytest.raises(ShrinkError, match="Unknown executor 'slurm'"):
        ExecutorConfig(kind="slurm")
    with pytest.raises(ShrinkError, match="only applies to --executor ray"):
        ExecutorConfig(kind="local", address="auto")
    with pytest.raises(ShrinkError, match="Unknown executor settings: gpus"):
        ExecutorConfig.from_dict({"kind": "ray", "gpus": 2})
    assert ExecutorConfig.from_dict(ExecutorConfig(kind="ray", address="auto").to_dict()).ray_address == "auto"


def test_units_must_come_after_their_inputs():
    with pytest.raises(ValueError, match="needs"):
        run_units([Unit("b", SLEEP, {"seconds": 0, "value": UnitRef("a")})], ExecutorConfig(), print, print)


def test_local_reports_a_failed_unit_and_what_depended_on_it(tmp_path):
    units = [Unit("fine", SLEEP, {"seconds": 0, "value": 1}),
             Unit("broken", SLEEP, {"seconds": "soon", "value": 2}),  # time.sleep("soon") raises TypeError
             Unit("after", SLEEP, {"seconds": 0, "value": UnitRef("broken")})]
    got = []
    failures = run_units(units, ExecutorConfig(), lambda unit, out: got.append((unit.key, out["value"])),
                         lambda f, m="": None)
    assert got == [("fine", 1)]
    assert [f.key for f in failures] == ["broken", "after"]
    assert "TypeError" in failures[0].reason and "input broken failed" in failures[1].reason
    assert failure_sentence(failures, 3).startswith("2 of 3 units failed (broken: TypeError")


def _figures(store: Store) -> dict:
    """Every stored eval figure of the store by (candidate name, slice): the payload without where it ran."""
    names = {c["id"]: c["name"] for c in store.candidates()}
    return {(names[r["candidate_id"]], r["slice"]): {k: v for k, v in r["payload"].items() if k != "executed"}
            for r in store.results("eval")}


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the ray executor is optional; ./run test installs it")
    from shrink_core.runtime.executors import LOCAL_SYSTEM_CONFIG

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _system_config=LOCAL_SYSTEM_CONFIG)
    yield ray
    ray.shutdown()


@pytest.mark.integration
def test_a_sweep_gives_bit_identical_figures_on_local_and_ray(toy_dir, tmp_path, ray_cluster):
    stores = {run: Store(tmp_path / f"{run}.db") for run in ("local", "ray", "ray-by-plan")}
    reports = {run: run_sweep(str(toy_dir), PLANS, SLICES, "fast", ExecutorConfig(kind=run.split("-")[0]),
                              store=store, group_by_plan=run == "ray-by-plan") for run, store in stores.items()}
    local, remote, by_plan = (_figures(stores[k]) for k in ("local", "ray", "ray-by-plan"))
    assert len(local) == 3 * 2 + 2  # 3 candidates and the reference, 2 slices each
    assert local == remote == by_plan  # ppl, KL, top-1, flips and every per-item array, to the last bit
    assert reports["ray"]["results"] == reports["local"]["results"] == reports["ray-by-plan"]["results"]
    assert reports["ray"]["units"] == 2 + 3 * 3 and reports["ray-by-plan"]["units"] == 2 + 3
    for store in stores.values():  # every evaluation stored once (the dict above would hide a duplicate)
        assert len(store.results("eval")) == 8 and len(store.results("size")) == 3
    # Ray may reuse one worker for toy units that take milliseconds; never more than the cluster's 2 CPUs
    assert 1 <= len(reports["ray"]["workers"]) <= 2 and len(reports["local"]["workers"]) == 1
    executed = [r["payload"]["executed"] for r in stores["ray"].results("eval")]
    assert {e["executor"] for e in executed} == {"ray"}
    assert {e["model_loads"] for e in executed} == {1}  # each worker read the weights once, for all its units
    # each plan is applied once: one size record per candidate, made by one apply unit
    assert sorted(r["plan"]["name"] for r in stores["ray"].results("size")) == ["rtn-w3g32", "rtn-w4g32", "w8"]


def _pid_from(path, old: int | None = None, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text() and int(path.read_text()) != old:
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"no unit wrote its pid to {path}")


def _run_in_thread(units, config):
    import threading

    box = {}

    def target():
        got = {}
        box["failures"] = run_units(units, config, lambda unit, out: got.update({unit.key: out["value"]}),
                                    lambda f, m="": None)
        box["got"] = got

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


@pytest.mark.integration
def test_a_ray_worker_killed_mid_task_is_retried_once(tmp_path, ray_cluster):
    pid_file = tmp_path / "victim.pid"
    units = [Unit("victim", SLEEP, {"seconds": 3, "value": 7, "pid_file": str(pid_file)}),
             Unit("bystander", SLEEP, {"seconds": 1, "value": 8})]
    thread, box = _run_in_thread(units, ExecutorConfig(kind="ray"))
    os.kill(_pid_from(pid_file), signal.SIGKILL)
    thread.join(timeout=300)
    assert box["failures"] == [] and box["got"] == {"victim": 7, "bystander": 8}


@pytest.mark.integration
def test_a_unit_whose_worker_is_lost_twice_is_reported_and_the_rest_finish(tmp_path, ray_cluster):
    pid_file = tmp_path / "victim.pid"
    units = [Unit("victim", SLEEP, {"seconds": 5, "value": 7, "pid_file": str(pid_file)}),
             Unit("bystander", SLEEP, {"seconds": 1, "value": 8}),
             Unit("after victim", SLEEP, {"seconds": 0, "value": UnitRef("victim")})]
    thread, box = _run_in_thread(units, ExecutorConfig(kind="ray"))
    first = _pid_from(pid_file)
    os.kill(first, signal.SIGKILL)
    os.kill(_pid_from(pid_file, old=first), signal.SIGKILL)  # the retry
    thread.join(timeout=300)
    assert box["got"] == {"bystander": 8}
    reasons = {f.key: f.reason for f in box["failures"]}
    assert set(reasons) == {"victim", "after victim"}
    assert "lost 2 times" in reasons["victim"] and reasons["after victim"] == "its input victim failed"


@pytest.mark.integration
def test_cancel_stops_the_remote_tasks(tmp_path, ray_cluster):
    pid_files = [tmp_path / f"unit{i}.pid" for i in range(2)]
    units = [Unit(f"long {i}", SLEEP, {"seconds": 120, "value": i, "pid_file": str(p)})
             for i, p in enumerate(pid_files)]
    started = {}

    def progress(fraction, message=""):
        if all(p.exists() and p.read_text() for p in pid_files):
            started["pids"] = [int(p.read_text()) for p in pid_files]
            raise JobCancelled()

    with pytest.raises(JobCancelled):
        run_units(units, ExecutorConfig(kind="ray"), lambda unit, out: None, progress)
    deadline = time.time() + 60
    while time.time() < deadline and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                         for p in started["pids"]):
        time.sleep(0.2)
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in started["pids"])


@pytest.mark.integration
@pytest.mark.parametrize("method, check", [("fast", 4), ("exhaustive", 0)])
def test_a_scan_split_into_units_stores_what_a_one_process_scan_stores(toy_dir, tmp_path, ray_cluster, method,
                                                                       check):
    """The Fisher pass per slice, the probes per slice x block (embedding, agreement sample): the records and
    agreement figures of `run_scan` in one process, to the bit on the local executor; on Ray to the bit for the
    probes and to float rounding for the Fisher scores (its workers run 1 thread, the job 2)."""
    from shrink_core.model.load import load
    from shrink_core.sensitivity import run_scan, stored_records
    from shrink_core.sensitivity.scan import stored_agreement
    from shrink_core.sensitivity.units import run_scan_units

    settings = ["w4g64", "w3g64"]
    stores = {kind: Store(tmp_path / f"{kind}.db") for kind in ("inline", "local", "ray")}
    run_scan(load(str(toy_dir)), SLICES, settings, method, "quick", check=check, store=stores["inline"])
    reports = {kind: run_scan_units(str(toy_dir), SLICES, settings, method, "quick", check, ExecutorConfig(kind=kind),
                                    store=stores[kind]) for kind in ("local", "ray")}

    def records(store):
        return sorted((r.module, r.setting, r.slice, r.metric, r.method, r.value)
                      for r in stored_records(store, str(toy_dir)))

    inline = records(stores["inline"])
    # slices x settings x metrics x (block linears + embedding), and the check's exhaustive sample under w3g64
    assert len(inline) == 2 * 2 * 2 * (3 * 7 + 1) + 2 * 2 * check
    local, remote = records(stores["local"]), records(stores["ray"])
    assert local == inline  # the same process and threads: to the bit
    # Ray's units run on 1 thread, the job on 2: probes (forward only) stay bit-identical, the Fisher pass's
    # backward reduces in another order (measured: up to 3e-5 of a score); the same records either way
    assert [r[:5] for r in remote] == [r[:5] for r in inline]
    for got, want in zip(remote, inline):
        assert got[5] == (want[5] if got[4] == "exhaustive" else pytest.approx(want[5], rel=1e-4, abs=1e-9)), got
    agreements = {k: sorted((a.slice, a.metric, a.spearman) for a in stored_agreement(s, str(toy_dir)))
                  for k, s in stores.items()}
    assert agreements["local"] == agreements["inline"]
    assert [a[:2] for a in agreements["ray"]] == [a[:2] for a in agreements["inline"]]
    assert [a[2] for a in agreements["ray"]] == pytest.approx([a[2] for a in agreements["inline"]], abs=1e-6)
    assert len(agreements["inline"]) == (4 if check else 0)
    units = 2 * (1 + 1 + 1) if method == "fast" else 2 * (3 + 1)  # per slice: fisher, embedding, check | 3 blocks
    assert reports["ray"]["units"] == units and 1 <= len(reports["ray"]["workers"]) <= 2
    # a second run finds everything stored: no unit runs
    assert run_scan_units(str(toy_dir), SLICES, settings, method, "quick", check, ExecutorConfig(kind="ray"),
                          store=stores["ray"])["units"] == 0
