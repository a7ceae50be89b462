"""The closed loop on the real model: each round's plan is run for real (at the protocol: stored as a candidate; on
the calibration rows: only the kept plan is then run at the protocol and stored), and fitted on."""
import sqlite3

import pytest

from shrink_core.errors import ShrinkError
from shrink_core.evaluation.calibration import recipe_for
from shrink_core.model.inventory import modules_from_rows
from shrink_core.plan import dump_plan, load_plan
from shrink_core.results.method_ratios import stored_ratios
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
                       dump_plan(load_plan("preset:w4g64")), rounds=2, progress=lambda f, m="": seen.append(m),
                       measure_on="protocol", baseline=False)
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


def test_probe_rounds_and_local_steps_then_only_the_kept_plan_runs_at_the_protocol(scanned_home):
    store = Store()
    parts = []
    before = {c["id"] for c in store.candidates()}
    result = plan_loop(store, SPEC, ["user_notes"], ["w4g64", "w3g64"],
                       {"kind": "bits_per_weight", "value": 3.8}, dump_plan(load_plan("preset:w4g64")), rounds=1,
                       local_steps=2, local_changes=16, part=parts.append)
    fitted = [r for r in result["rounds"] if r["kind"] == "fitted"]
    (uniform,) = [r for r in result["rounds"] if r["kind"] == "uniform"]
    local = [r for r in result["rounds"] if r["kind"] == "local"]
    (verified,) = [r for r in result["rounds"] if r["kind"] == "verified"]
    assert len(fitted) == 1 and 1 <= len(local) <= 2 and result["rounds"][-1] is verified
    assert result["measure_on"] == "probe" and parts[-1] == "verified" and len(parts) == len(result["rounds"])
    # the baseline: every planned module at the one setting that fits 3.8 bits per weight (w3g64, not w4g64)
    # measured first: the fit's first plan (each slice's scale), so round 1 plans on it
    assert uniform["name"].startswith("uniform w3g64") and result["rounds"].index(uniform) == 0
    assert fitted[0]["fitted_on_plans"] == 1 and uniform["fitted_on_plans"] == 0
    assert [r["round"] for r in result["rounds"]] == list(range(1, len(result["rounds"]) + 1))
    # the local steps start from the better of the rounds' best and uniform, and must beat it
    best = min(fitted[0]["measured_worst"], uniform["measured_worst"])
    assert any("keeps uniform" in n for n in result["notes"]) == (uniform["measured_worst"] < fitted[0]["measured_worst"])
    for r in fitted + [uniform] + local:  # measured on the calibration rows: nothing stored for them
        assert r["candidate_id"] is None and r["measured_worst"] > 0
    for r in local:  # kept only when it measured better than the best so far
        assert r["name"].startswith("local step") and r["changes"] <= r["max_changes"] <= 16
        assert r["kept"] == (r["measured_worst"] < best)
        best = min(best, r["measured_worst"]) if r["kept"] else best
    # the plan run at the protocol is the best one measured, and it alone is a stored candidate
    assert verified["probe_worst"] == best
    assert verified["of"] == next(r["name"] for r in fitted + [uniform] + local if r["measured_worst"] == best)
    (candidate,) = [c for c in store.candidates() if c["id"] not in before and c["kind"] != "reference"]
    assert candidate["id"] == verified["candidate_id"] and load_plan(candidate["plan"]).rules
    (row,) = store.results("eval", candidate_id=verified["candidate_id"])
    assert row["slice"] == "user_notes" and row["payload"]["kl"] == verified["measured_worst"] > 0
    assert result["seconds"] >= result["loop_seconds"] > 0


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
                                  rounds=1, executor={"kind": "ray", "local_cpus": 2} if kind == "ray" else None,
                                  measure_on="protocol", baseline=False)
        (row,) = db.results("eval", candidate_id=results[kind]["rounds"][0]["candidate_id"])
        results[kind]["plan"] = row["plan"]
        results[kind]["executed"] = row["payload"].get("executed", {}).get("executor")
    local, remote = results["local"]["rounds"][0], results["ray"]["rounds"][0]
    assert results["ray"]["plan"] == results["local"]["plan"]
    assert remote["measured_worst"] == local["measured_worst"] > 0
    assert remote["predicted_worst"] == local["predicted_worst"]
    assert results["ray"]["executed"] == "ray" and results["local"]["executed"] is None


def test_a_round_that_plans_uniform_itself_is_not_measured_again(scanned_home):
    """With w3g64 the only setting and a budget it alone fills, the round's plan is the uniform plan, measured first:
    the round reuses the uniform row's measurement (same figure, same plan) instead of applying and measuring it
    twice, and the loop ends there (nothing new to fit)."""
    store = Store()
    parts = []
    result = plan_loop(store, SPEC, ["user_notes"], ["w3g64"], {"kind": "bits_per_weight", "value": 3.38},
                       dump_plan(load_plan("preset:w4g64")), rounds=1, part=parts.append)
    kinds = [r["kind"] for r in result["rounds"]]
    assert kinds == ["uniform", "fitted", "verified"], kinds
    uniform, fitted, verified = result["rounds"]
    assert uniform["measured_worst"] == fitted["measured_worst"] > 0 and uniform["name"] == fitted["name"]
    assert any(n.startswith("Round 1 planned uniform w3g64 itself") for n in result["notes"]), result["notes"]
    assert len(parts) == len(result["rounds"])  # every part the job expected is recorded
    assert verified["probe_worst"] == fitted["measured_worst"]


def test_gptq_rounds_plan_on_the_scan_scaled_by_gptqs_own_output_error_per_slice(scanned_home):
    """method_scores: GPTQ applied once per setting, its output error over RTN's on each slice's calibration rows
    scales the scan's scores before round 1 (a note gives the median ratio); the round's prediction is those scaled
    sums, the rounds then run as before. Blocks 0-1 planned (the rest left to the draft) to keep GPTQ's table small."""
    store = Store()
    described = store.latest_model(SPEC)
    names = [m["name"] for m in described["modules"]]
    planned = [n for n in names if n.startswith(("model.layers.0.", "model.layers.1.")) and n.endswith("_proj")]
    seen = []
    common = dict(rounds=1, baseline=False, exclude=[n for n in names if n not in planned], method="gptq")
    draft = ("version: 1\nrules:\n- kind: [q, k, v, o, gate, up, down]\n"
             "  weights: {bits: 4, group_size: 64, symmetric: false, method: rtn}\n")  # GPTQ only where planned
    args = (store, SPEC, ["user_notes"], ["w4g64", "w3g64"], {"kind": "bits_per_weight", "value": 4.0}, draft)
    plain = plan_loop(*args, **common)  # no ratios stored yet: the scan's RTN scores
    assert not any(n.startswith("Planned on the scan's scores scaled") for n in plain["notes"]), plain["notes"]
    scaled = plan_loop(*args, method_scores=True, progress=lambda f, m="": seen.append(m), **common)
    (note,) = [n for n in scaled["notes"] if n.startswith("Planned on the scan's scores scaled by gptq's")]
    ratio = float(note.split("median ratio user_notes ")[1].split(";")[0])
    assert 0 < ratio < 1, note  # GPTQ leaves less output error than RTN on the slice's own inputs
    assert any(m.startswith("gptq at w3g64") for m in seen) and any("output error over RTN's" in m for m in seen)
    fitted, verified = scaled["rounds"]
    assert fitted["kind"] == "fitted" and verified["kind"] == "verified" and fitted["measured_worst"] > 0
    # the first round's prediction is the scaled scan's sum: below the RTN scan's for a GPTQ plan of the same budget
    assert 0 < fitted["predicted_worst"] < plain["rounds"][0]["predicted_worst"]
    # the ratios are stored for this model, method and the draft's recipe (the Plan page predicts GPTQ drafts on them)
    stored = stored_ratios(store, SPEC, described["weights_hash"], "gptq", recipe_for(load_plan(draft)).to_dict())
    assert stored.covers(planned, ["w4g64", "w3g64"], ["user_notes"]) and stored.medians() == f"user_notes {ratio:.2f}"
    # every later GPTQ loop plans on them, ticked or not, without applying GPTQ per setting again
    seen.clear()
    again = plan_loop(*args, progress=lambda f, m="": seen.append(m), **common)
    assert not any(m.startswith("gptq at") or "output error over RTN's" in m for m in seen), seen
    assert any("not measured again" in n for n in again["notes"]), again["notes"]
    assert again["rounds"][0]["predicted_worst"] == pytest.approx(fitted["predicted_worst"])
    with pytest.raises(ShrinkError, match="need a calibrated method"):
        plan_loop(*args, rounds=1, method_scores=True)


def test_a_rotated_rtn_draft_plans_on_its_own_error_stored_apart_from_plain_rtn(scanned_home):
    """With rotated inputs even RTN is not the method the scan scored: method_scores applies the rotated RTN once per
    setting, scales the scan by its output error over plain RTN's, and stores those ratios under the rotated name. The
    kept plan's candidate feeds the rotated method's fit, not plain RTN's; plain RTN still has nothing to measure."""
    store = Store()
    described = store.latest_model(SPEC)
    names = [m["name"] for m in described["modules"]]
    planned = [n for n in names if n.startswith(("model.layers.0.", "model.layers.1.")) and n.endswith("_proj")]
    common = dict(rounds=1, baseline=False, exclude=[n for n in names if n not in planned])
    rules = "rules:\n- kind: [q, k, v, o, gate, up, down]\n  weights: {bits: 4, group_size: 64, symmetric: false}\n"
    draft = "version: 1\nrotate: hadamard\n" + rules
    args = (store, SPEC, ["user_notes"], ["w4g64", "w3g64"], {"kind": "bits_per_weight", "value": 4.0}, draft)
    result = plan_loop(*args, method_scores=True, **common)
    label = "rtn with rotated inputs (hadamard, seed 0)"
    (note,) = [n for n in result["notes"] if n.startswith(f"Planned on the scan's scores scaled by {label}'s")]
    ratio = float(note.split("median ratio user_notes ")[1].split(";")[0])
    assert ratio > 0 and ratio != 1.0, note  # a rotated weight's RTN error is not the plain one's
    recipe = recipe_for(load_plan(draft)).to_dict()
    stored = stored_ratios(store, SPEC, described["weights_hash"], "rtn+hadamard:0", recipe)
    assert stored.covers(planned, ["w4g64", "w3g64"], ["user_notes"]) and stored.medians() == f"user_notes {ratio:.2f}"
    assert stored_ratios(store, SPEC, described["weights_hash"], "rtn", recipe) is None
    rows = modules_from_rows(described["modules"])
    records = stored_records(store, SPEC, described["weights_hash"])
    fits = {m: fit_measured(store, SPEC, described["weights_hash"], rows, records, m).model.plans
            for m in ("rtn", "rtn+hadamard:0")}
    assert fits == {"rtn": 0, "rtn+hadamard:0": 1}, fits  # the kept plan, run at the protocol, is a rotated candidate
    with pytest.raises(ShrinkError, match="or rotated inputs"):
        plan_loop(store, SPEC, ["user_notes"], ["w4g64"], {"kind": "bits_per_weight", "value": 4.0},
                  "version: 1\n" + rules, rounds=1, method_scores=True)
