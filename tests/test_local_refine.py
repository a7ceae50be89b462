"""Local refinement: scores taken at a plan, the planner's trust region, and the measured step that keeps only gains."""
import copy

import numpy as np
import pytest
import torch

from shrink_core.model.inventory import block_linears, inventory
from shrink_core.plan.local import local_problem, local_search
from shrink_core.plan.planner import PlannerProblem, solve
from shrink_core.sensitivity import fisher
from shrink_core.sensitivity.local import OptionWeights, local_scores, option_weight, set_choice_
from shrink_core.sensitivity.settings import SETTINGS


def _setup(tiny_model):
    rows = inventory(tiny_model)
    names = [r.name for r in block_linears(rows)]
    originals = {n: tiny_model.get_submodule(n).weight.detach().clone() for n in names}
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(1))
    return rows, names, originals, ids


def _kl(reference, model, ids) -> float:
    with torch.inference_mode():
        ref = torch.log_softmax(reference(ids).logits[:, :-1].float(), -1)
        logp = torch.log_softmax(model(ids).logits[:, :-1].float(), -1)
    return float((ref.exp() * (ref - logp)).sum(-1).mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kept_llama_cpp_blocks_decode_to_the_weight_the_option_gives(dtype):
    """Local scores reuse each llama.cpp type's blocks (its scale search is slow) instead of quantizing on every
    pass: what they decode to is bit-identical to quantizing afresh, on a width the type tiles (512) and one it
    falls back from (96); RTN options are not kept."""
    generator = torch.Generator().manual_seed(0)
    originals = {"wide": (torch.randn(8, 512, generator=generator) * 0.02).to(dtype),
                 "narrow": (torch.randn(8, 96, generator=generator) * 0.02).to(dtype)}
    cache = OptionWeights(originals)
    for name in originals:
        for option in ("q4_k", "q3_k", "iq4_xs", "q8_0", "w3g64", "keep"):
            expected = option_weight(option, originals[name])
            for _ in range(2):  # the first call quantizes, the second decodes the kept blocks
                assert torch.equal(cache(name, option), expected), (name, option)
    assert {option for _, option in cache.blocks} == {"q4_k", "q3_k", "iq4_xs", "q8_0"}
    capped = OptionWeights(originals, max_bytes=0)  # nothing kept past the cap: the same weights, quantized each time
    assert torch.equal(capped("wide", "q4_k"), option_weight("q4_k", originals["wide"])) and not capped.blocks


def test_at_the_original_model_the_local_scores_are_the_fast_scans_kl(tiny_model):
    """At an all-keep plan the gradient of KL(reference || plan) is zero, so a move's score is the second-order
    term alone: the fast scan's KL estimate, with the same sampled labels."""
    rows, names, originals, ids = _setup(tiny_model)
    at_plan = copy.deepcopy(tiny_model)
    local = local_scores(tiny_model, at_plan, originals, dict.fromkeys(names, "keep"), ["keep", "w4g64", "w2g64"],
                         {"en": ids}, batch=4)
    scan = fisher.fisher_scores(tiny_model, ids, {n: tiny_model.get_submodule(n) for n in names},
                                [SETTINGS["w4g64"], SETTINGS["w2g64"]], batch=4, first_order=False)
    assert local.deltas.shape == (1, len(names), 3) and np.all(local.deltas[0, :, 0] == 0)
    for j, setting in ((1, "w4g64"), (2, "w2g64")):
        expected = np.array([scan.values[setting][n][0] for n in names])
        assert np.all(expected > 0)
        assert local.deltas[0, :, j] == pytest.approx(expected, rel=1e-3)


def test_local_scores_predict_moves_measured_at_a_low_bit_plan(tiny_model):
    """Around a plan with every linear at w2g64, the score of moving one module to w4g64 tracks the measured change
    of KL, sign included (each module's error interacts with all the others')."""
    rows, names, originals, ids = _setup(tiny_model)
    choice = dict.fromkeys(names, "w2g64")
    at_plan = copy.deepcopy(tiny_model)
    set_choice_(at_plan, originals, choice)
    base = _kl(tiny_model, at_plan, ids)
    local = local_scores(tiny_model, at_plan, originals, choice, ["w2g64", "w4g64"], {"en": ids}, batch=4)
    predicted, measured = local.deltas[0, :, 1], []
    for name in names:
        moved = copy.deepcopy(at_plan)
        set_choice_(moved, originals, {name: "w4g64"})
        measured.append(_kl(tiny_model, moved, ids) - base)
    measured = np.array(measured)
    assert np.all(np.sign(predicted) == np.sign(measured))
    assert np.corrcoef(predicted, measured)[0, 1] > 0.9
    # some moves to more bits measure worse here (errors that were cancelling); a one-module-at-a-time score, never
    # negative for more bits, cannot say so; the scores at the plan do
    assert np.any(measured > 0)
    # the plan's own weights were left as they were
    for name in names:
        assert torch.equal(at_plan.get_submodule(name).weight, option_weight("w2g64", originals[name]))


def test_a_calibrated_methods_moves_are_scored_with_its_own_weights(tiny_model):
    """At a plan applied by GPTQ (every linear w2g64), moving one module to GPTQ's w4g64 weight (from the method's
    weight table): the scores taken with that table and the whole Fisher track the measured changes; the table
    holds what a uniform GPTQ application gives each module."""
    from shrink_core.compression.apply import apply_plan_
    from shrink_core.plan.planner import solution_plan
    from shrink_core.sensitivity.local import method_option_weights

    rows, names, originals, ids = _setup(tiny_model)
    calibration = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2))

    # GPTQ on its raw statistics: errors shaped against the input correlations. With the recipe's default shrink
    # (0.3) the whole Fisher's agreement on this tiny random model falls to 0.57 (0.1: 0.75; 0.5: 0.17); the product
    # leaves local steps off for calibrated methods (docs/plan.md)
    recipe = {"mix": {"en": 1.0}, "shrink": 0.0}

    def apply_at(model, option):
        apply_plan_(model, solution_plan(dict.fromkeys(names, option), rows, "gptq"), calibration, recipe=recipe)

    table = method_option_weights(tiny_model, names, ["keep", "w4g64", "w2g64"], apply_at, dtype=torch.float32)
    uniform = copy.deepcopy(tiny_model)
    apply_at(uniform, "w4g64")
    for name in names:
        assert torch.equal(table[name]["w4g64"], uniform.get_submodule(name).weight)
        assert torch.equal(table[name]["keep"], originals[name])
        assert not torch.equal(table[name]["w4g64"], option_weight("w4g64", originals[name]))  # not RTN's
    at_plan = copy.deepcopy(tiny_model)
    apply_at(at_plan, "w2g64")
    choice = dict.fromkeys(names, "w2g64")
    base = _kl(tiny_model, at_plan, ids)
    measured = []
    for name in names:
        moved = copy.deepcopy(at_plan)
        moved.get_submodule(name).weight.data = table[name]["w4g64"].clone()
        measured.append(_kl(tiny_model, moved, ids) - base)
    agreement = {}
    for quadratic in ("diagonal", "sequence"):
        local = local_scores(tiny_model, at_plan, originals, choice, ["w2g64", "w4g64"], {"en": ids}, batch=4,
                             weights=table, quadratic=quadratic)
        agreement[quadratic] = np.corrcoef(local.deltas[0, :, 1], measured)[0, 1]
    # GPTQ's errors are shaped against the input correlations: the whole Fisher (per-sequence gradients) sees
    # them, its diagonal does not
    assert agreement["sequence"] > 0.8 > 0.5 > agreement["diagonal"]


def _problem(loss, bytes_, slices=("a", "b")):
    m, o = bytes_.shape
    return PlannerProblem(tuple(f"m{i}" for i in range(m)), tuple(f"s{j}" for j in range(o)), slices, loss, bytes_,
                          np.ones(m), np.ones((m, o), dtype=bool))


def test_the_trust_region_bounds_the_moves_and_the_offset_is_the_measured_start():
    # 5 modules, option s0 (current, 0 change) or s1 (each helps slice a by 0.1, costs slice b 0.01), same bytes
    loss = np.zeros((2, 5, 2))
    loss[0, :, 1], loss[1, :, 1] = -0.1, 0.01
    problem = _problem(loss, np.ones((5, 2)))
    current = {f"m{i}": "s0" for i in range(5)}
    free = solve(problem, budget_bytes=5, offset=np.array([1.0, 0.5]))
    assert list(free.choice.values()).count("s1") == 5 and free.predicted == pytest.approx({"a": 0.5, "b": 0.55})
    near = solve(problem, budget_bytes=5, offset=np.array([1.0, 0.5]), near=current, max_changes=2)
    assert list(near.choice.values()).count("s1") == 2
    assert near.predicted == pytest.approx({"a": 0.8, "b": 0.52}) and near.objective == pytest.approx(0.8)


def test_local_search_keeps_only_steps_that_measure_better_and_halves_the_region_otherwise():
    """Measured KL of a plan = 1 - 0.1 per module at s1, but any plan with more than 2 modules at s1 measures worse
    than the start: the first step (4 moves) is refused, the second (2 moves) kept, then the estimates are taken
    again at the new plan."""
    modules = [f"m{i}" for i in range(6)]
    taken_at = []

    def scores_at(choice):
        taken_at.append(dict(choice))
        loss = np.zeros((1, 6, 2))
        for i, m in enumerate(modules):
            loss[0, i, 1 if choice[m] == "s0" else 0] = -0.1 if choice[m] == "s0" else 0.1
        return _problem(loss, np.ones((6, 2)), slices=("a",))

    def measure(choice):
        moved = sum(v == "s1" for v in choice.values())
        return {"a": 1 - 0.1 * moved if moved <= 2 else 2.0}

    start = dict.fromkeys(modules, "s0")
    steps = local_search(start, {"a": 1.0}, scores_at, measure, limits={"budget_bytes": 6}, steps=3, max_changes=4,
                         min_changes=1)
    assert [(s.max_changes, s.changes, s.accepted) for s in steps][:2] == [(4, 4, False), (2, 2, True)]
    assert steps[0].worst_predicted == pytest.approx(0.6) and steps[0].worst_measured == 2.0
    assert steps[1].worst_measured == pytest.approx(0.8) and len(taken_at) >= 2 and taken_at[1] == steps[1].choice
    assert all(not s.accepted for s in steps[2:])  # every later move overshoots: refused, the region shrinks


def test_local_problem_takes_the_engines_bytes(tiny_model):
    rows = inventory(tiny_model)
    names = [r.name for r in block_linears(rows)][:3]
    problem = local_problem(rows, np.zeros((1, 3, 3)), names, ["keep", "w8", "w4g64"], ["en"], pinned={names[0]: "w8"})
    assert problem.bytes[:, 0].tolist() == [r.bytes for r in rows if r.name in names]
    assert np.all(problem.bytes[:, 2] < problem.bytes[:, 1]) and problem.allowed[0].tolist() == [False, True, False]


def test_a_calibrated_methods_weight_table_that_would_not_fit_is_refused_with_a_sentence(tiny_model, monkeypatch):
    from shrink_core.sensitivity.loop import table_refusal

    rows, names, _, _ = _setup(tiny_model)
    need = 2 * 8 * sum(tiny_model.get_submodule(n).weight.numel() for n in names)
    monkeypatch.setenv("SHRINK_MEMORY_LIMIT_GB", str(4 * need / 2**30))  # twice the table: it fits
    assert table_refusal(tiny_model, names, 8, "gptq") is None
    monkeypatch.setenv("SHRINK_MEMORY_LIMIT_GB", str(1.5 * need / 2**30))  # under twice: refused, and why
    refused = table_refusal(tiny_model, names, 8, "gptq")
    assert refused.startswith("No local steps: gptq's weight at every setting") and "choose fewer settings" in refused
    what = "Planned on the scan's RTN scores, not gptq's own"  # the same table refused for the method's own scores
    assert table_refusal(tiny_model, names, 8, "gptq", what=what).startswith(what + ": gptq's weight")
