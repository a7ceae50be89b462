"""The planner's budget arithmetic, one function for the Plan page and the `plan` command.

"Budget" here always means the planner's limit on the compressed model: packed megabytes, average bits per weight
over the planned modules, or projected decode ms/token on a hardware row. (How many tokens an evaluation scores is
its protocol, `evaluation/protocol.py`; how much a scan probes is its scan depth.)

Modules the planner does not decide keep what a base plan gives them (the Plan page's draft); without a base plan,
they stay as loaded. Their bytes and projected time are taken off the budget before the solver sees it.
"""
from __future__ import annotations

from dataclasses import dataclass

from shrink_core.errors import ShrinkError
from shrink_core.plan.planner import PlannerProblem, PlannerSolution, latency_model, solve

BUDGET_KINDS = {"size_mb": "MB (packed)", "bits_per_weight": "bits/weight (planned modules)",
                "latency_ms": "ms/token (projected)"}


@dataclass(frozen=True)
class PlannerBudget:
    kind: str  # one of BUDGET_KINDS
    value: float
    low_per_block: int | None = None  # at most this many modules of one block at 2 bits (`planner.stacking_rows`)

    def __post_init__(self):
        if self.kind not in BUDGET_KINDS:
            raise ShrinkError(f"Unknown budget kind '{self.kind}'; use one of {', '.join(BUDGET_KINDS)}.")
        if not isinstance(self.value, (int, float)) or isinstance(self.value, bool) or self.value < 0:
            raise ShrinkError(f"A planner budget must be a number >= 0, not {self.value!r}.")
        cap = self.low_per_block
        if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 0):
            raise ShrinkError(f"The cap on 2-bit modules per block must be a whole number >= 0, not {cap!r}.")


@dataclass(frozen=True)
class BudgetedPlan:
    solution: PlannerSolution
    total_bytes: int  # the whole model's packed bytes: planned modules plus everything else
    fixed_bytes: int  # the modules the planner did not decide
    projected_ms: float | None  # whole-model projected decode ms/token on `target` (None without a target)
    target: str | None
    basis: str | None  # what the projection rests on


def quant_specs(resolved) -> dict:
    """module -> perf WeightFormat of a resolved plan's integer-quantized modules (the roofline's input)."""
    from shrink_core.formats import WeightFormat

    return {r.name: WeightFormat(r.bits, r.group_size, r.weights.symmetric, r.weights.ggml, r.weights.scales)
            for r in resolved
            if r.weights is not None and not r.weights.is_float and not r.keep and not r.removed}


@dataclass(frozen=True)
class Limits:
    """A budget as the solver takes it for one set of planned modules (`solve`'s keyword arguments)."""
    solve_kwargs: dict
    fixed_bytes: int  # the modules the planner does not decide
    latency: object | None  # planner.LatencyModel on the target, when there is one


def limits(planned: set[str], rows, summary: dict, budget: PlannerBudget, *, base_resolved=None,
           hardware=None) -> Limits:
    """Take off the budget what the modules outside `planned` cost (their base plan's bytes and projected time)."""
    base = {r.name: r for r in base_resolved} if base_resolved is not None else {}
    fixed_bytes = int(sum(base[r.name].stored_bytes if r.name in base else r.bytes  # a tied head: 0, at its owner
                          for r in rows if r.name not in planned))
    if budget.kind == "latency_ms" and hardware is None:
        raise ShrinkError("A latency budget needs a hardware target to project on; pick one (`measure --list-targets`).")
    latency = None
    if hardware is not None:
        others = {m: q for m, q in quant_specs(base_resolved or []).items() if m not in planned}
        latency = latency_model(rows, summary, hardware, planned, others)
    kwargs = {"budget_bytes": budget.value * 1e6 - fixed_bytes if budget.kind == "size_mb" else None,
              "average_bits": budget.value if budget.kind == "bits_per_weight" else None,
              "budget_seconds": (budget.value / 1000 - latency.fixed_seconds) if budget.kind == "latency_ms" else None,
              "low_per_block": budget.low_per_block}
    return Limits(kwargs, fixed_bytes, latency)


def plan_within_budget(problem: PlannerProblem, rows, summary: dict, budget: PlannerBudget, *, objective: str = "worst",
                       base_resolved=None, hardware=None) -> BudgetedPlan:
    """Solve `problem` under `budget`; rows/summary: the model's inventory; base_resolved: the resolved base plan."""
    limit = limits(set(problem.modules), rows, summary, budget, base_resolved=base_resolved, hardware=hardware)
    solution = solve(problem, objective=objective, **limit.solve_kwargs)
    latency = limit.latency
    projected = latency.total_ms(solution.projected_seconds) if latency and solution.projected_seconds is not None else None
    return BudgetedPlan(solution, solution.total_bytes + limit.fixed_bytes, limit.fixed_bytes, projected,
                        latency.target if latency else None, latency.basis if latency else None)
