"""The closed loop on the real model: each round's plan is run for real, stored as a candidate, and fitted on."""
import sqlite3

import pytest

from shrink_core.model.inventory import modules_from_rows
from shrink_core.plan import dump_plan, load_plan
from shrink_core.results.prediction import fit_measured
from shrink_core.results.store import Store
from shrink_core.sensitivity.loop import plan_loop
from shrink_core.sensitivity.scan import stored_records

SPEC = "builtin:smollm2-135m"


def test_each_round_is_a_measured_candidate_and_the_next_round_plans_with_its_fit(scanned_home):
    store = Store()
    described = store.latest_model(SPEC)
    seen = []
    result = plan_loop(store, SPEC, ["user_notes"], ["w4g64", "w3g64"], {"kind": "bits_per_weight", "value": 4.0},
                       dump_plan(load_plan("preset:w4g64")), rounds=2, progress=lambda f, m="": seen.append(m))
    rounds = result["rounds"]
    assert 1 <= len(rounds) <= 2 and any(m.startswith("round 1/2") for m in seen)
    for r in rounds:  # every round is a stored candidate whose measured KL is the round's measured worst slice
        (row,) = store.results("eval", candidate_id=r["candidate_id"])
        assert row["slice"] == "user_notes" and row["payload"]["kl"] == r["measured_worst"] > 0
        assert r["name"].startswith(f"closed loop round {r['round']}")
    assert rounds[0]["fitted_on_plans"] == 0  # nothing measured before: the first round plans on the scan's sums
    if len(rounds) == 2:
        assert rounds[1]["fitted_on_plans"] == 1
    rows = modules_from_rows(described["modules"])
    fitted = fit_measured(store, SPEC, described["weights_hash"], rows,
                          stored_records(store, SPEC, described["weights_hash"]), "rtn")
    assert fitted.model.plans == len(rounds)  # the Plan page's prediction now learns from the loop's rounds
    assert result["model"]["plans"] == len(rounds)


def test_local_steps_start_from_the_best_round_and_keep_only_what_measures_better(scanned_home):
    store = Store()
    result = plan_loop(store, SPEC, ["user_notes"], ["w4g64", "w3g64"],
                       {"kind": "bits_per_weight", "value": 3.8}, dump_plan(load_plan("preset:w4g64")), rounds=1,
                       local_steps=2, local_changes=16)
    fitted = [r for r in result["rounds"] if r["kind"] == "fitted"]
    local = [r for r in result["rounds"] if r["kind"] == "local"]
    assert len(fitted) == 1 and 1 <= len(local) <= 2
    best = fitted[0]["measured_worst"]
    for r in local:  # each step is a stored candidate, kept only when it measured better than the best so far
        (row,) = store.results("eval", candidate_id=r["candidate_id"])
        assert row["payload"]["kl"] == r["measured_worst"] and r["name"].startswith("local step")
        assert r["changes"] <= r["max_changes"] <= 16
        assert r["kept"] == (r["measured_worst"] < best)
        best = min(best, r["measured_worst"]) if r["kept"] else best
        stored = {c["id"]: c for c in store.candidates()}[r["candidate_id"]]
        assert load_plan(stored["plan"]).rules  # the step's plan is stored as rules a person can read


@pytest.mark.integration
def test_a_round_verified_on_ray_measures_what_the_local_round_measures(scanned_home, tmp_path):
    """The same first round (same fit, same plan) run on the local executor and as a one-plan sweep on Ray: the
    same candidate plan and the same measured KL, to the bit."""
    pytest.importorskip("ray", reason="the ray executor is optional; ./run test installs it")
    store = Store()
    copy = tmp_path / "copy.db"
    with sqlite3.connect(copy) as target:  # the backup API: a WAL database's pages included
        store.conn.backup(target)
    results = {}
    for kind, db in (("local", store), ("ray", Store(copy))):
        results[kind] = plan_loop(db, SPEC, ["user_notes"], ["w4g64", "w3g64"],
                                  {"kind": "bits_per_weight", "value": 4.0}, dump_plan(load_plan("preset:w4g64")),
                                  rounds=1, executor={"kind": "ray", "local_cpus": 2} if kind == "ray" else None)
        (row,) = db.results("eval", candidate_id=results[kind]["rounds"][0]["candidate_id"])
        results[kind]["plan"] = row["plan"]
        results[kind]["executed"] = row["payload"].get("executed", {}).get("executor")
    local, remote = results["local"]["rounds"][0], results["ray"]["rounds"][0]
    assert results["ray"]["plan"] == results["local"]["plan"]
    assert remote["measured_worst"] == local["measured_worst"] > 0
    assert remote["predicted_worst"] == local["predicted_worst"]
    assert results["ray"]["executed"] == "ray" and results["local"]["executed"] is None
