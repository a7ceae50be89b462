"""The planner's budget arithmetic (one function for the Plan page and `plan`) and the predicted-vs-measured table."""
import pytest
from streamlit.testing.v1 import AppTest

from shrink_core.errors import ShrinkError
from shrink_core.evaluation.slices import add_user_slice
from shrink_core.model.inventory import inventory, summary
from shrink_core.model.toy import tiny_llama
from shrink_core.paths import REPO_ROOT
from shrink_core.perf.hardware import get as get_hardware
from shrink_core.plan import load_plan, resolve
from shrink_core.plan.budget import PlannerBudget, plan_within_budget
from shrink_core.plan.planner import build_problem
from shrink_core.results.prediction import predicted_vs_measured
from shrink_core.results.store import Provenance, Store
from shrink_core.sensitivity.scan import Record


def _problem(rows, blocks=(0,), hardware=None):
    """Scores for the chosen blocks' linears only, so the other modules are fixed by the base plan."""
    scored = [r for r in rows if r.block in blocks and r.kind in ("q", "k", "v", "o", "gate", "up", "down")]
    scores = {(r.name, s, "en"): loss for r in scored for s, loss in (("w8", 0.01), ("w4g64", 0.1), ("w2g64", 1.0))}
    return build_problem(rows, scores, ["en"], ["w8", "w4g64", "w2g64"], hardware=hardware)


def test_modules_outside_the_problem_keep_the_base_plans_bytes():
    model = tiny_llama(hidden=128)
    rows = inventory(model)
    problem = _problem(rows)
    as_loaded = plan_within_budget(problem, rows, summary(model, rows), PlannerBudget("size_mb", 100.0))
    assert as_loaded.fixed_bytes == sum(r.bytes for r in rows if r.name not in problem.modules)
    base = resolve(rows, load_plan("preset:w8"))
    with_base = plan_within_budget(problem, rows, summary(model, rows), PlannerBudget("size_mb", 100.0),
                                   base_resolved=base)
    saved_by_w8 = sum(r.dense_bytes - r.packed_bytes for r in base if r.name not in problem.modules)
    assert saved_by_w8 > 0  # the other blocks' linears are int8 in the base plan
    assert as_loaded.fixed_bytes - with_base.fixed_bytes == saved_by_w8
    assert with_base.total_bytes == with_base.solution.total_bytes + with_base.fixed_bytes


def test_the_size_budget_holds_for_the_whole_model_and_zero_is_a_budget():
    model = tiny_llama(hidden=128)
    rows = inventory(model)
    problem = _problem(rows)
    loose = plan_within_budget(problem, rows, summary(model, rows), PlannerBudget("size_mb", 100.0))
    assert set(loose.solution.choice.values()) == {"keep"}  # room for everything: nothing is quantized
    smallest = sum(min(b for b in problem.bytes[i]) for i in range(len(problem.modules)))
    target = (loose.fixed_bytes + smallest * 1.05) / 1e6
    tight = plan_within_budget(problem, rows, summary(model, rows), PlannerBudget("size_mb", target))
    assert tight.total_bytes <= target * 1e6
    assert "w2g64" in tight.solution.choice.values()
    with pytest.raises(ShrinkError):  # 0 MB is a budget no plan meets, not "no budget"
        plan_within_budget(problem, rows, summary(model, rows), PlannerBudget("size_mb", 0.0))


def test_budget_kinds_and_latency_need_a_target():
    with pytest.raises(ShrinkError, match="Unknown budget kind"):
        PlannerBudget("tokens", 3)
    with pytest.raises(ShrinkError, match=">= 0"):
        PlannerBudget("size_mb", -1)
    model = tiny_llama(hidden=128)
    rows = inventory(model)
    with pytest.raises(ShrinkError, match="hardware target"):
        plan_within_budget(_problem(rows), rows, summary(model, rows), PlannerBudget("latency_ms", 1.0))
    h100 = get_hardware("h100-sxm")
    planned = plan_within_budget(_problem(rows, hardware=h100), rows, summary(model, rows),
                                 PlannerBudget("latency_ms", 1000.0), hardware=h100)
    assert planned.projected_ms is not None and planned.projected_ms <= 1000.0 and planned.target == "h100-sxm"


def test_predicted_vs_measured_pairs_the_candidate_with_its_reference(shrink_home):
    rows = inventory(tiny_llama(hidden=128))
    store = Store()
    spec = "toy:tiny"
    reference = Provenance(spec, "h", "v", "cpu", slice="en", budget="fast")
    store.add_result("eval", reference, {"nll": 2.0, "ppl": 7.389})
    plan = load_plan("preset:w8")
    candidate = store.upsert_candidate(name="w8", kind="quantized", model_spec=spec, weights_hash="h", code_version="v",
                                       plan={"version": 1, "rules": []})
    measured = Provenance(spec, "h", "v", "cpu", plan={"version": 1, "rules": []}, slice="en", budget="fast")
    store.add_result("eval", measured, {"nll": 2.25, "ppl": 9.49, "ppl_ci": [9.0, 10.0], "items": 30, "kl": 0.2},
                     candidate_id=candidate)
    resolved = resolve(rows, plan)
    linear = [r for r in resolved if r.kind == "q"]
    records = [Record(r.name, r.block, r.kind, "w8", "en", "dnll", 0.05, "fast") for r in linear]
    table = predicted_vs_measured(store, spec, candidate, resolved, records)
    assert len(table) == 1
    row = table[0]
    assert row["measured ΔNLL"] == pytest.approx(0.25)
    assert row["predicted ΔNLL"] == pytest.approx(0.05 * len(linear))
    assert row["reference ppl"] == pytest.approx(7.389) and row["ppl_ci"] == "[9.000, 10.000]"
    assert predicted_vs_measured(store, spec, candidate, resolved, [])[0]["predicted ΔNLL"] is None


def test_pages_offer_the_users_own_slices(shrink_home):
    add_user_slice("notes.txt", (("A paragraph of the user's own text. " * 20 + "\n\n") * 30).encode(), slice_id="my_notes")
    at = AppTest.from_file(str(REPO_ROOT / "app_pages" / "sensitivity.py"), default_timeout=60).run()
    assert not at.exception
    assert "my_notes" in at.multiselect(key="sens_slices").options
    at = AppTest.from_file(str(REPO_ROOT / "app_pages" / "evalsets.py"), default_timeout=60).run()
    assert "my_notes" in at.multiselect(key="eval_slices").options


def test_eval_cli_prints_the_same_predicted_vs_measured_table(tmp_path, shrink_home, capsys):
    import json

    from shrink_core.cli.entry import main
    from shrink_core.model.load import load
    from shrink_core.sensitivity import run_scan
    from tests.test_evaluate import byte_level_tokenizer

    directory = tmp_path / "toy-model"
    tiny_llama(vocab=258).save_pretrained(directory, safe_serialization=True)
    byte_level_tokenizer().save_pretrained(directory)
    run_scan(load(str(directory)), ["toy_en"], ["w4g64"], "fast", "quick", store=Store())
    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\nrules:\n  - kind: [q, k, v, o, gate, up, down]\n"
                    "    weights: {bits: 4, group_size: 64, symmetric: false, method: rtn}\n")
    assert main(["eval", "--model", str(directory), "--slices", "toy_en", "--plan", str(plan), "--json"]) == 0
    part, report = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert part["part"] == "toy_en" and part["kl"] == report["slices"]["toy_en"]["kl"]  # streamed, then the report
    (row,) = report["predicted_vs_measured"]
    assert row["slice"] == "toy_en" and row["predicted ΔNLL"] is not None and row["measured ΔNLL"] is not None


def test_the_2bit_cap_per_block_travels_with_the_budget():
    """The cap is part of the budget (the page, the CLI and the closed loop pass it through `limits`): with block 0's
    linears scored and a budget only 2-bit meets for most of them, the cap bounds the block's 2-bit modules."""
    model = tiny_llama(hidden=128)
    rows = inventory(model)
    problem = _problem(rows)
    loose = plan_within_budget(problem, rows, summary(model, rows), PlannerBudget("size_mb", 100.0))
    smallest = sum(min(b for b in problem.bytes[i]) for i in range(len(problem.modules)))
    target = (loose.fixed_bytes + smallest * 1.3) / 1e6
    free = plan_within_budget(problem, rows, summary(model, rows), PlannerBudget("size_mb", target))
    assert list(free.solution.choice.values()).count("w2g64") > 2
    capped = plan_within_budget(problem, rows, summary(model, rows), PlannerBudget("size_mb", target * 1.2, 2))
    assert list(capped.solution.choice.values()).count("w2g64") <= 2
    assert capped.total_bytes <= target * 1.2e6
    with pytest.raises(ShrinkError, match="whole number >= 0"):
        PlannerBudget("size_mb", 1.0, -1)
    with pytest.raises(ShrinkError, match="whole number >= 0"):
        PlannerBudget("size_mb", 1.0, 1.5)
