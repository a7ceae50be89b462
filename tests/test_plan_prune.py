"""Pruning on the planner's menu: a 2:4 mask on top of a weight format, chosen only where the user lists it, at its
sparse format's bytes, scored as the engine applies it, and written as a rule that applies exactly that."""
import numpy as np
import pytest
import torch

from shrink_core.model.inventory import block_linears, inventory
from shrink_core.plan import dump_plan, load_plan, resolve
from shrink_core.plan.menu import MENU, PLANNER_SETTINGS, QUANT_SETTINGS, setting_name
from shrink_core.plan.planner import PlannerError, build_problem, setting_bytes, solution_plan, solve, uniform_choice
from shrink_core.plan.predict import settings_by_module
from shrink_core.plan.spec import PruneSpec
from shrink_core.sensitivity.settings import perturbed

MASKED = [s for s in PLANNER_SETTINGS if PLANNER_SETTINGS[s].masks]


def test_masked_settings_are_planner_choices_and_not_weight_formats():
    assert MASKED == ["w8+nm24", "w6g64+nm24", "w4g64+nm24"]
    assert not set(MASKED) & set(QUANT_SETTINGS)  # the table's weight column names formats alone
    assert "nm24" not in PLANNER_SETTINGS and "prune50" not in PLANNER_SETTINGS  # a mask alone never fits below w8
    assert MENU["w4g64+nm24"].plan_action() == {
        "weights": {"bits": 4, "group_size": 64, "symmetric": False, "method": "rtn"},
        "prune": {"structure": "nm", "n": 2, "m": 4, "criterion": "magnitude"}}


def test_masked_bytes_are_the_sparse_formats_and_w4g64_2of4_costs_what_w3g64_does(tiny_model):
    rows = inventory(tiny_model)
    names = [r.name for r in block_linears(rows)]
    settings = ["w3g64", "w4g64", "w8", *MASKED]
    table = setting_bytes(rows, names, settings)
    by_name = {r.name: r for r in rows}
    for k, name in enumerate(names):
        out_dim, in_dim = by_name[name].shape
        assert in_dim % 64 == 0  # so the bytes below are exact
        numel, groups = out_dim * in_dim, out_dim * in_dim // 64
        kept = numel // 2
        index = kept * 2 // 8  # 2 bits of position per kept value (log2 4)
        # kept 4-bit codes + a float16 scale and a uint8 zero per group of 64 + the index
        assert table[k, settings.index("w4g64+nm24")] == kept * 4 // 8 + groups * 3 + index
        assert table[k, settings.index("w4g64+nm24")] == table[k, settings.index("w3g64")]  # 3.375 bits each
        assert table[k, settings.index("w8+nm24")] == kept + out_dim * 2 + index  # a float16 scale per row
        assert table[k, settings.index("w6g64+nm24")] == table[k, settings.index("w4g64")]  # 4.375 bits each


@pytest.mark.parametrize("setting", MASKED)
def test_scored_perturbation_is_what_the_plan_applies(tiny_model, setting):
    """The scan scores a masked setting on exactly the weight the planner's rule leaves (RTN, magnitude mask)."""
    from shrink_core.compression.apply import apply_plan_

    rows = inventory(tiny_model)
    names = [r.name for r in block_linears(rows)][:3]
    before = {n: tiny_model.get_submodule(n).weight.detach().clone() for n in names}
    plan = load_plan(dump_plan(solution_plan(dict.fromkeys(names, setting), rows)))
    apply_plan_(tiny_model, plan, torch.randint(0, 256, (2, 16)))
    for n in names:
        after = tiny_model.get_submodule(n).weight.detach()
        expected = perturbed(MENU[setting], before[n])
        assert torch.allclose(after, expected, atol=1e-6, rtol=0), n
        assert (after.reshape(-1, 4) != 0).sum(dim=1).max() <= 2  # 2:4 holds after rounding


def test_planner_prunes_only_where_listed_and_where_it_pays(tiny_model):
    """At w3g64's bytes, modules whose score at w4g64+nm24 is lower take it; without it listed, none is pruned. The
    written plan resolves at exactly the planner's bytes (sparse), and scores back as the same choice."""
    rows = inventory(tiny_model)
    linears = [r.name for r in block_linears(rows)]
    prunable = set(linears[::2])  # where the mask costs less than a bit of precision
    scores = {}
    for m in linears:
        for sl in ("en", "fr"):
            scores[(m, "w4g64", sl)] = 1.0
            scores[(m, "w3g64", sl)] = 3.0
            scores[(m, "w4g64+nm24", sl)] = 2.0 if m in prunable else 9.0
    plain = build_problem(rows, scores, ["en", "fr"], ["w4g64", "w3g64"], allow_keep=False)
    budget = plain.bytes[:, plain.settings.index("w3g64")].sum()
    without = solve(plain, budget_bytes=budget)
    assert set(without.choice.values()) == {"w3g64"}
    problem = build_problem(rows, scores, ["en", "fr"], ["w4g64", "w3g64", "w4g64+nm24"], allow_keep=False)
    solution = solve(problem, budget_bytes=budget)
    assert {m for m, s in solution.choice.items() if s == "w4g64+nm24"} == prunable
    assert max(solution.predicted.values()) < max(without.predicted.values())
    # the baseline stays the plain format, even where the mask would predict better
    assert uniform_choice(problem, budget_bytes=budget)[0] == "w3g64"
    plan = load_plan(dump_plan(solution_plan(solution.choice, rows)))
    resolved = resolve(rows, plan)
    assert sum(r.stored_bytes for r in resolved if r.name in solution.choice) == solution.total_bytes
    assert {m: s for m, s in settings_by_module(resolved).items() if m in solution.choice} == solution.choice
    assert len(plan.rules) <= 4  # one rule per (setting, kinds sharing blocks), not one per module


def test_masked_setting_names_round_trip_and_an_unscanned_mask_is_not_scored_as_its_format():
    nm = PruneSpec(structure="nm", n=2, m=4)
    assert setting_name(4, 64, False, prune=nm) == "w4g64+nm24"
    assert setting_name(None, None, False, prune=nm) == "nm24"
    assert setting_name(None, None, False, prune=PruneSpec(amount=0.5)) == "prune50"
    # a mask the scan did not measure (wanda, 4:8, 3-bit + 2:4) is custom: never scored as its weight format alone
    assert setting_name(4, 64, False, prune=PruneSpec(structure="nm", n=2, m=4, criterion="wanda")).startswith("custom")
    assert setting_name(4, 64, False, prune=PruneSpec(structure="nm", n=4, m=8)).startswith("custom")
    assert setting_name(3, 64, False, prune=nm).startswith("custom")
    assert setting_name(4, 64, False) == "w4g64"


def test_unknown_planner_setting_is_one_sentence(tiny_model):
    rows = inventory(tiny_model)
    scores = {(r.name, "w4g64", "en"): 1.0 for r in block_linears(rows)}
    with pytest.raises(PlannerError, match=r"Unknown setting 'nm24'; use .*w4g64\+nm24"):
        build_problem(rows, scores, ["en"], ["w4g64", "nm24"])


def test_masked_setting_is_timed_as_its_dense_format(tiny_model):
    """No sparse kernel is assumed: 2:4 on top of w4g64 projects w4g64's time, not a speedup."""
    from shrink_core.perf.hardware import get

    rows = inventory(tiny_model)
    scores = {(r.name, s, "en"): 1.0 for r in block_linears(rows) for s in ("w4g64", "w4g64+nm24")}
    problem = build_problem(rows, scores, ["en"], ["w4g64", "w4g64+nm24"], hardware=get("raspberry-pi-5"))
    dense, masked = (problem.settings.index(s) for s in ("w4g64", "w4g64+nm24"))
    assert np.array_equal(problem.seconds[:, dense], problem.seconds[:, masked])
    assert (problem.bytes[:, masked] < problem.bytes[:, dense]).all()


def test_the_cli_plans_with_masked_settings_it_scans_and_writes_a_plan_that_applies_them(shrink_home, toy_dir,
                                                                                        tmp_path):
    """`shrink plan --settings ...,w4g64+nm24` scans the masked setting like any other, and the plan it writes is
    what it reports: the same settings per module, at the bytes it planned (pruned modules stored sparse)."""
    import json

    from shrink_core.model.load import load
    from tests.test_cli import cli

    out = tmp_path / "plan.yaml"
    done = cli("plan", "--model", str(toy_dir), "--budget-bits", "3.375", "--settings", "w4g64,w3g64,w4g64+nm24",
               "--slices", "en", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["status"] == "optimal" and summary["average_bits_planned_modules"] <= 3.375 + 1e-9
    rows = inventory(load(str(toy_dir)).model)
    resolved = resolve(rows, load_plan(out.read_text()))
    chosen = {m: s for m, s in settings_by_module(resolved).items() if s != "keep"}
    assert {s: list(chosen.values()).count(s) for s in set(chosen.values())} == summary["settings"]
    assert set(summary["settings"]) <= {"w4g64", "w3g64", "w4g64+nm24"}
    assert sum(r.stored_bytes for r in resolved if r.name in chosen) * 8 == pytest.approx(
        summary["average_bits_planned_modules"] * sum(r.params for r in rows if r.name in chosen))


def test_a_pruned_module_is_scored_at_its_mask_never_as_kept_or_as_its_format_alone(tiny_model):
    """Before, a 2:4-only module scored as keep (nothing) and a 2:4 + w4g64 one as w4g64; now each is its setting,
    and a mask the scan has no setting for (wanda) is unscored: counted as such, never as a smaller error."""
    from shrink_core.plan.predict import predict

    rows = inventory(tiny_model)
    q, k, v = (next(r.name for r in block_linears(rows) if r.kind == kind and r.block == 0) for kind in "qkv")
    plan = load_plan(dump_plan(load_plan({"version": 1, "rules": [
        {"name": q.replace(".", r"\."), "prune": {"structure": "nm", "n": 2, "m": 4, "criterion": "magnitude"}},
        {"name": k.replace(".", r"\."), "weights": {"bits": 4, "group_size": 64},
         "prune": {"structure": "nm", "n": 2, "m": 4, "criterion": "magnitude"}},
        {"name": v.replace(".", r"\."), "weights": {"bits": 4, "group_size": 64},
         "prune": {"structure": "nm", "n": 2, "m": 4, "criterion": "wanda"}}]})))
    named = settings_by_module(resolve(rows, plan))
    assert (named[q], named[k]) == ("nm24", "w4g64+nm24") and named[v].startswith("custom")
    scores = {(q, "nm24", "en"): 1.0, (k, "w4g64+nm24", "en"): 2.0, (k, "w4g64", "en"): 0.5, (v, "w4g64", "en"): 0.5}
    (found,) = predict(named, scores, ["en"], "kl")
    assert (found.value, found.scored, found.unscored) == (3.0, 2, 1)
