"""Local refinement of a measured plan: re-estimate every module's options around the plan itself, let the exact
planner move at most K modules, measure, keep the step only if the worst slice got better (else halve K).

Why: the scan scores each module alone around the original model; the planner then puts its low bits where that sum
is lowest, and there the sum is most wrong (predicted 1.27, measured 1.88 at SmolLM2's W3 g64 size). Scores taken
at the plan (`sensitivity/local.local_scores`: the gradient of KL at the plan carries each module's interactions with
the rest of it) are right near the plan; the trust region keeps a step near it, the measurement keeps only steps that
help. A trust-region method in the plan's discrete space, with the planner's MILP as the step. Pure: the scores and
the measurement come in as callables.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shrink_core.plan.interactions import WorstSlice
from shrink_core.plan.planner import PlannerProblem, setting_bytes, setting_seconds, solve


@dataclass(frozen=True)
class Step(WorstSlice):
    """One measured step: the plan the trust region allowed, what it predicted and what it measured."""
    index: int
    max_changes: int  # the trust region: modules allowed to move
    changes: int  # modules that moved
    choice: dict[str, str]
    predicted: dict[str, float]  # slice -> measured KL of the plan it started from + the predicted changes
    measured: dict[str, float]
    accepted: bool  # the worst slice improved: the next step starts here
    seconds: float  # scores (when this step re-estimated them) + solve + measurement


def local_problem(rows, deltas: np.ndarray, modules: list[str], options: list[str], slices: list[str],
                  pinned: dict[str, str] | None = None, hardware=None) -> PlannerProblem:
    """The planner's problem with loss = the predicted KL change of each (module, option) from the current plan
    (negative where a move helps); bytes (and projected seconds on `hardware`) as in `build_problem`."""
    by_name = {r.name: r for r in rows}
    allowed = np.ones((len(modules), len(options)), dtype=bool)
    for i, module in enumerate(modules):
        if module in (pinned or {}):
            allowed[i] = [o == pinned[module] for o in options]
    return PlannerProblem(tuple(modules), tuple(options), tuple(slices), np.asarray(deltas, dtype=float),
                          setting_bytes(rows, modules, options), np.array([by_name[m].params for m in modules],
                                                                          dtype=float), allowed,
                          None if hardware is None else setting_seconds(rows, modules, options, hardware),
                          None if hardware is None else hardware.name, tuple(by_name[m].block for m in modules))


def local_search(start: dict[str, str], measured: dict[str, float],
                 scores_at: Callable[[dict[str, str]], PlannerProblem],
                 measure: Callable[[dict[str, str]], dict[str, float]], *, limits: dict, steps: int = 3,
                 max_changes: int = 40, min_changes: int = 4,
                 time_budget_s: float = 300.0, clock: Callable[[], float] | None = None,
                 on_step: Callable[[Step], None] | None = None) -> list[Step]:
    """From `start` (module -> option for exactly the problem's modules, with its `measured` KL per slice):
    scores_at(plan) -> the local problem at that plan (`local_problem`); each step solves it under `limits` (`solve`'s
    budget arguments, `budget.limits`) with at most K modules moved, measures the
    result, and keeps it if the worst slice improved (scores are then re-estimated at the new plan), else halves K.
    Stops after `steps` measured steps, when K falls below `min_changes`, when the planner predicts no improvement,
    or when the time budget is spent."""
    clock = clock or time.perf_counter
    started = clock()
    current, current_measured = dict(start), dict(measured)
    problem, limit, done = None, max_changes, []
    while len(done) < steps and limit >= min_changes and clock() - started < time_budget_s:
        step_start = clock()
        if problem is None:
            problem = scores_at(current)
        slices = list(problem.slices)
        offset = np.array([current_measured[s] for s in slices])
        solution = solve(problem, objective="worst", offset=offset, near=current, max_changes=limit, **limits)
        if solution.objective >= max(offset) - 1e-9 or solution.choice == current:
            break  # no move the estimates say helps within the trust region
        result = {s: float(v) for s, v in measure(solution.choice).items() if math.isfinite(float(v))}
        accepted = bool(result) and max(result.values()) < max(current_measured.values())
        step = Step(len(done), limit, sum(solution.choice[m] != current[m] for m in current), solution.choice,
                    solution.predicted, result, accepted, clock() - step_start)
        done.append(step)
        if on_step:
            on_step(step)
        if accepted:
            current, current_measured, problem = solution.choice, result, None
        else:
            limit //= 2
    return done
