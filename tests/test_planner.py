"""The planner: exact answers on problems small enough to brute force, budgets, pins, and the plan it writes."""
import itertools
import math

import numpy as np
import pytest

from shrink_core.model.inventory import block_linears, inventory
from shrink_core.plan import dump_plan, load_plan, resolve
from shrink_core.plan.interactions import BIT_CLASSES
from shrink_core.plan.planner import PlannerError, PlannerProblem, build_problem, greedy, solution_plan, solve, uniform_choice


def random_problem(seed=0, modules=6, settings=3, slices=3):
    rng = np.random.default_rng(seed)
    bytes_ = np.sort(rng.integers(10, 100, size=(modules, settings)), axis=1)[:, ::-1].astype(float)
    loss = np.sort(rng.random((slices, modules, settings)), axis=2)
    loss[:, :, 0] = 0  # the biggest setting costs nothing
    return PlannerProblem(tuple(f"m{i}" for i in range(modules)), tuple(f"s{j}" for j in range(settings)),
                          tuple(f"slice{k}" for k in range(slices)), loss, bytes_, np.full(modules, 100.0),
                          np.ones((modules, settings), dtype=bool))


def brute_force(problem, budget):
    best, best_value = None, np.inf
    m, o = problem.bytes.shape
    for picks in itertools.product(range(o), repeat=m):
        idx = np.array(picks)
        if problem.bytes[np.arange(m), idx].sum() <= budget:
            value = problem.loss[:, np.arange(m), idx].sum(axis=1).max()
            if value < best_value:
                best, best_value = idx, value
    return best, best_value


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_worst_slice_is_optimal(seed):
    problem = random_problem(seed)
    budget = problem.bytes.min(axis=1).sum() + 0.4 * (problem.bytes.max(axis=1) - problem.bytes.min(axis=1)).sum()
    solution = solve(problem, budget_bytes=budget)
    _, best_value = brute_force(problem, budget)
    assert solution.total_bytes <= budget
    assert max(solution.predicted.values()) == pytest.approx(best_value, abs=1e-6)
    assert solution.status == "optimal" and solution.gap <= 1e-6
    # never worse than the greedy heuristic at the same budget
    pick = greedy(problem, budget)
    idx = np.array([problem.settings.index(pick[m]) for m in problem.modules])
    assert max(solution.predicted.values()) <= problem.loss[:, np.arange(len(idx)), idx].sum(axis=1).max() + 1e-9


def test_uniform_baseline_is_the_best_single_setting_that_fits_and_keeps_pins():
    problem = random_problem(4, settings=4)
    # the budget of setting s1 everywhere: s0 (the biggest) does not fit, s1, s2 and s3 do
    budget = problem.bytes[:, 1].sum()
    setting, choice = uniform_choice(problem, budget_bytes=budget)
    worst = {j: problem.loss[:, :, j].sum(axis=1).max() for j in (1, 2, 3)}
    assert setting == f"s{min(worst, key=worst.get)}" and set(choice.values()) == {setting}
    allowed = problem.allowed.copy()
    allowed[0] = [False, False, False, True]  # m0 pinned to s3: uniform plans keep the pin
    pinned = PlannerProblem(problem.modules, problem.settings, problem.slices, problem.loss, problem.bytes,
                            problem.params, allowed)
    setting, choice = uniform_choice(pinned, budget_bytes=budget)
    assert choice["m0"] == "s3" and {choice[m] for m in problem.modules[1:]} == {setting}
    # an average-bits budget below the smallest setting: no uniform plan
    assert uniform_choice(problem, average_bits=problem.bytes.min() * 8 / 100 / 2) is None
    # m1 may not take s1 and is not pinned: s1 is then no uniform plan
    allowed = problem.allowed.copy()
    allowed[1, 1] = False
    partial = PlannerProblem(problem.modules, problem.settings, problem.slices, problem.loss, problem.bytes,
                             problem.params, allowed)
    found = uniform_choice(partial, budget_bytes=problem.bytes.sum())
    assert found is not None and found[0] != "s1"


def test_single_slice_and_pins():
    problem = random_problem(3)
    allowed = problem.allowed.copy()
    allowed[0] = [True, False, False]  # pin m0 to the largest setting
    pinned = PlannerProblem(problem.modules, problem.settings, problem.slices, problem.loss, problem.bytes,
                            problem.params, allowed)
    budget = problem.bytes.min(axis=1).sum() + (problem.bytes[0, 0] - problem.bytes[0].min()) + 30
    solution = solve(pinned, budget_bytes=budget, objective="slice1")
    assert solution.choice["m0"] == "s0"
    assert solution.total_bytes <= budget


def test_impossible_budget_is_one_sentence():
    problem = random_problem(4)
    with pytest.raises(PlannerError, match="No plan fits the budget"):
        solve(problem, budget_bytes=1.0)
    with pytest.raises(PlannerError, match="Unknown objective"):
        solve(problem, budget_bytes=1e9, objective="klingon")


def test_plan_from_solution_resolves_exactly(tiny_model):
    rows = inventory(tiny_model)
    linears = block_linears(rows)
    rng = np.random.default_rng(0)
    scores = {(r.name, s, sl): float(rng.random()) * (1 if s == "w8" else 5)
              for r in linears for s in ("w8", "w4g64") for sl in ("en", "fr")}
    problem = build_problem(rows, scores, ["en", "fr"], ["w8", "w4g64"], pinned={linears[0].name: "keep"})
    budget = problem.bytes[:, 1:].min(axis=1).sum() * 1.3
    solution = solve(problem, budget_bytes=budget)
    plan = load_plan(dump_plan(solution_plan(solution.choice, rows)))  # through YAML, as a user would save it
    resolved = {r.name: r for r in resolve(tiny_model, plan)}
    assert resolved[linears[0].name].keep
    for module, setting in solution.choice.items():
        got = resolved[module]
        assert (got.keep and setting == "keep") or (got.bits == {"w8": 8, "w4g64": 4}[setting])
    planned_bytes = sum(resolved[m].packed_bytes for m in solution.choice)
    assert planned_bytes == solution.total_bytes  # the planner's accounting is the engine's


def test_latency_budget_is_exact_and_matches_the_roofline(tiny_model):
    """Per-module projected seconds are linear; the chosen plan's projected total is the roofline's own figure."""
    from shrink_core.formats import WeightFormat
    from shrink_core.model.inventory import summary
    from shrink_core.perf.hardware import get
    from shrink_core.perf.roofline import project
    from shrink_core.perf.workload import describe_model
    from shrink_core.plan.planner import SETTINGS, latency_model

    hardware = get("raspberry-pi-5")  # int4/int8 kernels there: w4g64 and w8 are faster, w3g64 is read as fp32
    rows = inventory(tiny_model)
    linears = block_linears(rows)
    rng = np.random.default_rng(1)
    scores = {(r.name, s, sl): float(rng.random()) / SETTINGS[s]["bits"]
              for r in linears for s in ("w8", "w4g64", "w3g64") for sl in ("en", "fr")}
    problem = build_problem(rows, scores, ["en", "fr"], ["w8", "w4g64", "w3g64"], hardware=hardware)
    assert problem.seconds.shape == problem.bytes.shape and problem.target == "raspberry-pi-5"
    keep, w4, w3 = (problem.settings.index(s) for s in ("keep", "w4g64", "w3g64"))
    assert (problem.seconds[:, w4] < problem.seconds[:, keep]).all()
    assert np.allclose(problem.seconds[:, w3], problem.seconds[:, keep])  # no 3-bit kernel: no projected gain
    latency = latency_model(rows, summary(tiny_model, rows), hardware, set(problem.modules))
    assert "projected, not measured" in latency.basis and "raspberry-pi-5" in latency.basis
    budget = latency.fixed_seconds + problem.seconds[:, keep].sum() * 0.6 + problem.seconds[:, w4].sum() * 0.4
    solution = solve(problem, budget_seconds=budget - latency.fixed_seconds)
    assert solution.status == "optimal" and latency.fixed_seconds + solution.projected_seconds <= budget + 1e-12
    chosen = {m: WeightFormat(SETTINGS[s]["bits"], SETTINGS[s]["group_size"], SETTINGS[s]["symmetric"])
              for m, s in solution.choice.items() if s != "keep"}
    projected = project(describe_model(tiny_model, chosen), hardware).decode_ms_per_token
    assert latency.total_ms(solution.projected_seconds) == pytest.approx(projected, rel=1e-6)
    with pytest.raises(PlannerError, match="No plan fits the latency budget"):
        solve(problem, budget_seconds=1e-9)


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_is_a_planner_decision_with_exact_bytes_and_applies_as_chosen(tied):
    """A tied embedding is one decision (the head follows it); an untied one and its lm_head are two. Bytes are the
    packed format's; pins hold; the written plan quantizes the embedding exactly as chosen (RTN)."""
    import torch

    from shrink_core.compression.apply import apply_plan_
    from shrink_core.compression.primitives import fake_quantize
    from shrink_core.model.toy import tiny_llama

    model = tiny_llama(tied=tied)
    rows = inventory(model)
    outside = [r for r in rows if r.kind in ("embedding", "lm_head") and not r.tied_to]
    assert [r.kind for r in outside] == (["embedding"] if tied else ["embedding", "lm_head"])
    rng = np.random.default_rng(0)
    settings = ["w8", "w4g64", "w2g64"]
    scores = {(r.name, s, sl): float(rng.random()) * {"w8": 1, "w4g64": 4, "w2g64": 30}[s]
              for r in block_linears(rows) + outside for s in settings for sl in ("en", "fr")}
    for r in outside:  # the embedding is far more sensitive below 8 bits: the planner must buy it w8
        scores.update({(r.name, "w4g64", sl): 50.0 for sl in ("en", "fr")})
        scores.update({(r.name, "w2g64", sl): 500.0 for sl in ("en", "fr")})
    problem = build_problem(rows, scores, ["en", "fr"], settings)
    for r in outside:
        k = problem.modules.index(r.name)
        assert r.shape == (256, 64)  # counted by hand below
        assert problem.bytes[k, problem.settings.index("keep")] == 256 * 64 * 4  # fp32
        assert problem.bytes[k, problem.settings.index("w8")] == 256 * 64 + 256 * 2  # codes + a float16 scale per row
        # 4-bit codes + per group of 64 (one per row) a float16 scale and a uint8 zero
        assert problem.bytes[k, problem.settings.index("w4g64")] == 256 * 64 // 2 + 256 * (2 + 1)
    names = {r.name for r in outside}
    budget = sum(problem.bytes[k, problem.settings.index("w8" if m in names else "w4g64")]
                 for k, m in enumerate(problem.modules))  # room for int8 there, w4g64 (or a mix) elsewhere
    solution = solve(problem, budget_bytes=budget)
    assert all(solution.choice[r.name] == "w8" for r in outside)
    before = {r.name: dict(model.named_modules())[r.name].weight.detach().clone() for r in outside}
    plan = load_plan(dump_plan(solution_plan(solution.choice, rows, method="gptq")))  # embedding: RTN whatever the method
    resolved = {r.name: r for r in resolve(model, plan)}
    assert sum(resolved[m].packed_bytes for m in solution.choice) == solution.total_bytes <= budget
    if tied:
        assert resolved["lm_head"].bits == 8 and resolved["lm_head"].packed_bytes == 0
    apply_plan_(model, plan, torch.randint(0, 256, (2, 32)))
    for r in outside:
        after = dict(model.named_modules())[r.name].weight.detach()
        assert torch.equal(after, fake_quantize(before[r.name], 8, None, True))
    pinned = build_problem(rows, scores, ["en", "fr"], settings, pinned={outside[0].name: "keep"})
    kept = solve(pinned, budget_bytes=budget + outside[0].bytes)
    assert kept.choice[outside[0].name] == "keep"


def test_score_table_keeps_the_newest_scan():
    from shrink_core.plan.predict import score_table
    from shrink_core.sensitivity.scan import Record

    newest = Record("m", 0, "q", "w4g64", "en", "kl", 0.5, "exhaustive")
    older = Record("m", 0, "q", "w4g64", "en", "kl", 0.1, "fast")
    assert score_table([newest, older], "kl") == {("m", "w4g64", "en"): 0.5}  # records come newest first


def test_planner_rules_are_few_readable_and_exact():
    """One rule per (setting, group of kinds sharing blocks), blocks written as ranges, no alternation over names; the
    rules resolve to exactly the chosen setting of every module."""
    from shrink_core.model.toy import tiny_llama

    rows = inventory(tiny_llama(layers=6, tied=False))
    choice = {}
    for r in block_linears(rows):
        choice[r.name] = ("keep" if r.block == 0 else "w8" if r.kind in ("q", "k") or r.block == 5
                          else "w4g64" if r.kind != "down" else "w3g64")
    choice["model.embed_tokens"] = "w8"
    text = dump_plan(solution_plan(choice, rows))
    assert "|" not in text and "\\." not in text  # no module names at all
    assert "kind: [q, k, v, o, gate, up, down]\n  blocks: [0]\n  keep: true" in text
    assert "kind: [q, k]\n  blocks: [1-5]" in text and "kind: [v, o, gate, up]\n  blocks: [1-4]" in text
    assert "kind: [down]\n  blocks: [1-4]" in text and "kind: [embedding]" in text
    plan = load_plan(text)
    assert len(plan.rules) == 6  # keep; w3g64 down; w4g64 v,o,gate,up; w8: q,k / block 5's others / the embedding
    resolved = {r.name: r for r in resolve(rows, plan)}
    bits = {"keep": None, "w8": 8, "w4g64": 4, "w3g64": 3}
    for module, setting in choice.items():
        assert resolved[module].keep if setting == "keep" else resolved[module].bits == bits[setting], module
    assert resolved["lm_head"].rule is None  # not chosen: no rule selects it


def test_planner_names_modules_where_kind_and_block_do_not_single_them_out():
    """Two experts' gate projections in one block, at different settings: a kind+blocks rule would take both, so the
    planner names them (exactly, as a regex that matches that name only)."""
    from shrink_core.model.inventory import ModuleInfo

    rows = [ModuleInfo(f"model.layers.0.mlp.experts.{e}.gate_proj", 0, "gate", (8, 8), 64, 256, "float32")
            for e in range(2)]
    choice = {rows[0].name: "w8", rows[1].name: "w4g64"}
    plan = load_plan(dump_plan(solution_plan(choice, rows)))
    assert [r.name for r in plan.rules] == [r"model\.layers\.0\.mlp\.experts\.1\.gate_proj",
                                             r"model\.layers\.0\.mlp\.experts\.0\.gate_proj"]
    resolved = {r.name: r.bits for r in resolve(rows, plan)}
    assert resolved == {rows[0].name: 8, rows[1].name: 4}


def test_planner_rules_for_experts_are_few_exact_and_name_no_module_one_by_one():
    """Experts of one kind share a block, so kind+blocks cannot single them out: the planner writes one rule per
    (place, kinds sharing blocks), experts differing only in their index in one rule, the block index left to
    `blocks`; only a lone module is named. Each module resolves to its chosen setting."""
    from shrink_core.model.toy import tiny_family

    rows = inventory(tiny_family("qwen2_moe"))  # 4 experts and a shared expert per block
    choice = {}
    for r in block_linears(rows):
        lone = r.expert == 3 and r.kind == "down" and r.block == 1
        choice[r.name] = ("w8" if r.expert is None else "w4g64" if r.expert in (0, 2) else "w3g64" if lone
                          else "keep")
    plan = load_plan(dump_plan(solution_plan(choice, rows)))
    assert len(plan.rules) == 7  # keep: expert 1; expert 3's gate+up; its down in blocks 0, 2 / the lone w3g64 /
    # w4g64: experts 0 and 2 / w8: attention; the shared expert
    names = [r.name for r in plan.rules if r.name is not None]
    assert [n for n in names if "\\d+" not in n] == [r"model\.layers\.1\.mlp\.experts\.3\.down_proj"]
    assert r"model\.layers\.\d+\.mlp\.experts\.(?:0|2)\..+" in names
    assert all(n.count("|") <= 1 for n in names)  # an index alternation at most, never one over module names
    bits = {"keep": None, "w8": 8, "w4g64": 4, "w3g64": 3}
    resolved = {r.name: r for r in resolve(rows, plan)}
    for module, setting in choice.items():
        assert resolved[module].keep if setting == "keep" else resolved[module].bits == bits[setting], module
    assert {r.name for r in resolved.values() if r.rule is None} == {"model.embed_tokens", "lm_head"}


def test_low_bit_cap_per_block_is_exact_and_binding():
    """At most N modules of one block at 2 bits: the solver's answer equals brute force under the same rule, and the
    cap changes the answer where the uncapped optimum stacks 2-bit modules into one block."""
    settings = ("keep", "w8", "w4g64", "w2g64")
    modules, blocks = tuple(f"m{i}" for i in range(6)), (0, 0, 0, 1, 1, None)
    rng = np.random.default_rng(3)
    bits = np.array([32, 8, 4.25, 2.25])
    bytes_ = np.outer(np.full(6, 100.0), bits / 8)
    loss = np.zeros((2, 6, 4))
    loss[:, :, 1] = rng.random((2, 6)) * 0.01
    loss[:, :, 2] = rng.random((2, 6)) * 0.1 + 0.05
    loss[:, :3, 3] = 0.06  # block 0's modules are cheap at 2 bits: the uncapped plan stacks them
    loss[:, 3:, 3] = rng.random((2, 3)) * 0.5 + 0.4
    problem = PlannerProblem(modules, settings, ("a", "b"), loss, bytes_, np.full(6, 100.0),
                             np.ones((6, 4), dtype=bool), blocks=blocks)
    budget = float(bytes_[:, 2].sum())  # everything at 4 bits
    free = solve(problem, budget_bytes=budget)
    assert sum(free.choice[m] == "w2g64" for m in modules[:3]) >= 2
    for cap in (0, 1):
        capped = solve(problem, budget_bytes=budget, low_per_block=cap)
        best_value = np.inf
        for picks in itertools.product(range(4), repeat=6):
            idx = np.array(picks)
            per_block = [sum(idx[k] == 3 for k in range(6) if blocks[k] == b) for b in (0, 1)]
            if bytes_[np.arange(6), idx].sum() <= budget and max(per_block) <= cap:
                best_value = min(best_value, loss[:, np.arange(6), idx].sum(axis=1).max())
        assert max(capped.predicted.values()) == pytest.approx(best_value, abs=1e-6)
        for b in (0, 1):
            assert sum(capped.choice[m] == "w2g64" for m, blk in zip(modules, blocks) if blk == b) <= cap
        assert max(capped.predicted.values()) >= max(free.predicted.values()) - 1e-9
    # uniform 2-bit stacks every module of a block: no uniform plan under the cap where only 2 bits fit
    tight = float(bytes_[:, 3].sum())
    assert uniform_choice(problem, budget_bytes=tight)[0] == "w2g64"
    assert uniform_choice(problem, budget_bytes=tight, low_per_block=1) is None
    assert uniform_choice(problem, budget_bytes=budget, low_per_block=1)[0] == "w4g64"
    # without blocks the rule is refused in a sentence
    unblocked = PlannerProblem(modules, settings, ("a", "b"), loss, bytes_, np.full(6, 100.0),
                               np.ones((6, 4), dtype=bool))
    with pytest.raises(PlannerError, match="needs each module's block"):
        solve(unblocked, budget_bytes=budget, low_per_block=1)


def test_slice_factors_make_the_worst_slice_objective_protect_the_slice_that_measures_worst(tiny_model):
    """Block 0's modules score high on en, block 1's on code, and the scan overstates en fourfold (as Gemma's
    overstates fr against code). On the raw scores the planner protects en and puts its low bits in block 1; with the
    fitted slice factors it protects code instead, and the MILP's losses are the scores times alpha times the factor."""
    from shrink_core.plan.interactions import InteractionModel

    rows = inventory(tiny_model)
    linears = [r for r in block_linears(rows) if r.block in (0, 1)]
    heavy = {0: {"en": 4.0, "code": 0.5}, 1: {"en": 1.0, "code": 2.0}}  # scan scores at w2g64, per module
    scores = {(r.name, s, sl): (heavy[r.block][sl] if s == "w2g64" else 0.0)
              for r in linears for s in ("w8", "w2g64") for sl in ("en", "code")}
    model = InteractionModel(tuple(1.0 for _ in BIT_CLASSES), 0.0, 10, 2, math.nan,
                             slice_factor=(("code", 1.0), ("en", 0.25)))

    def low_bits_per_block(with_model):
        problem = build_problem(rows, scores, ["en", "code"], ["w8", "w2g64"], allow_keep=False,
                                model=model if with_model else None)
        budget = (problem.bytes[:, 0].sum() + problem.bytes[:, 1].sum()) / 2
        choice = solve(problem, budget_bytes=budget, objective="worst").choice
        return {b: sum(choice[r.name] == "w2g64" for r in linears if r.block == b) for b in (0, 1)}, problem

    raw, _ = low_bits_per_block(False)
    scaled, problem = low_bits_per_block(True)
    assert raw[1] > raw[0] and scaled[0] > scaled[1]
    i, k = problem.slices.index("en"), problem.modules.index(linears[0].name)
    assert problem.loss[i, k, problem.settings.index("w2g64")] == pytest.approx(4.0 * 0.25)


SOLVER_NOISE_SCRIPT = r"""
import ctypes, json, sys
import scipy.optimize
sys.path.insert(0, sys.argv[1])
from test_planner import random_problem
from shrink_core.plan.planner import solve

real = scipy.optimize.milp
def noisy(*args, **kwargs):  # what HiGHS's MIP code does on some solves: a C printf to fd 1
    ctypes.CDLL(None).printf(b"HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();\n")
    return real(*args, **kwargs)
scipy.optimize.milp = noisy
print("before", flush=True)
solution = solve(random_problem(seed=3), budget_bytes=200)
print(json.dumps({"choice": solution.choice}))
"""


def test_the_solvers_own_printf_goes_to_stderr_not_into_stdout(tmp_path):
    """`shrink plan --json` prints the plan on stdout; a line HiGHS printf()s during the solve must not land in it
    (stdout a pipe, so C's buffer is flushed only later: the case a JSON reader has)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "noisy_solve.py"
    script.write_text(SOLVER_NOISE_SCRIPT)
    done = subprocess.run([sys.executable, str(script), str(Path(__file__).parent)], capture_output=True, text=True,
                          timeout=600, check=True)  # a hang guard, not a deadline: torch imports slowly on a busy machine
    lines = done.stdout.splitlines()
    assert lines[0] == "before" and len(lines) == 2, done.stdout
    assert set(json.loads(lines[1])["choice"]) == {f"m{i}" for i in range(6)}
    assert "transformNewIntegerFeasibleSolution" in done.stderr
