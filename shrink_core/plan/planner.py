"""The planner: per-module settings that minimise predicted loss under a memory, bits or projected-latency budget.

An exact mixed-integer program (SciPy's HiGHS): one binary per (module, setting), one setting per module, the budget
as a linear constraint (projected latency is linear: each module's own roofline time on the target, plus a fixed part
for KV cache, attention and launches; see `perf.roofline.module_step_seconds`), and for the worst-slice objective an
epigraph variable t >= loss(slice) for every slice.
HiGHS reports its own optimality gap, so the answer says how far from optimal it can be.

The embedding (one decision with a head tied to it) and an untied lm_head are modules like the block linears when the
scan scored them (exhaustive probes): their bytes come from the same `resolve`, and the plan names them like any
other module, so apply quantizes them as chosen (round-to-nearest: calibrated methods apply to block linears only).

Predicted loss is additive over modules (sensitivity of one module at a time); interactions between modules are
not modelled, which is why a plan is then run for real and predicted vs measured is shown.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
import time
from dataclasses import dataclass, replace

import numpy as np

from shrink_core.errors import ShrinkError
from shrink_core.plan.menu import PLANNER_SETTINGS, QUANT_SETTINGS
from shrink_core.plan.spec import CALIBRATED_METHODS, Plan, PruneSpec, Rule, WeightSpec, with_index

# Weight formats alone, as WeightSpec fields (the per-module table's weight column). The planner's choices besides
# "keep" (which leaves the module as loaded; its loss is 0 by definition) are PLANNER_SETTINGS: these, and the ones
# that also mask (2:4 + a format), which it takes only where the user lists them.
SETTINGS = QUANT_SETTINGS

# Below 3 bits, errors of modules in one block compound: on Gemma 3 270M the 2-bit modules of one block measured
# together up to 1.8x the sum of their scores (docs/plan.md). One-module scores cannot see it; the user may cap how
# many share a block. Measured, the cap is a lever, not a fix: better on SmolLM2, worse on Gemma (docs/plan.md).
LOW_BITS = 2


class PlannerError(ShrinkError):
    """A budget or objective the planner cannot meet."""


# HiGHS's MIP code printf()s a debug line on some solves ("HighsMipSolverData::transformNewIntegerFeasibleSolution
# tmpSolver.run();", seen on Gemma's 3.5-bit plans), straight to file descriptor 1, whatever sys.stdout is: a caller
# reading `shrink plan --json` from stdout would get it inside its JSON. While the solver runs, fd 1 points at stderr.
# Counted under a lock so that solves in concurrent threads (the app's jobs) restore the real stdout once, last out.
_fd_lock = threading.Lock()
_fd_depth = 0
_fd_saved: int | None = None


def _flush_c_stdio() -> None:
    with contextlib.suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(None).fflush(None)  # C's stdout buffer (full when fd 1 is a pipe) goes where fd 1 points now


@contextlib.contextmanager
def solver_stdout_to_stderr():
    global _fd_depth, _fd_saved
    with _fd_lock:
        if _fd_depth == 0:
            with contextlib.suppress(AttributeError, ValueError, OSError):
                sys.stdout.flush()
            _flush_c_stdio()
            try:
                _fd_saved = os.dup(1)
                os.dup2(2, 1)
            except OSError:  # no fd 1 or 2 (a detached process): nothing to protect
                _fd_saved = None
        _fd_depth += 1
    try:
        yield
    finally:
        with _fd_lock:
            _fd_depth -= 1
            if _fd_depth == 0 and _fd_saved is not None:
                _flush_c_stdio()
                os.dup2(_fd_saved, 1)
                os.close(_fd_saved)
                _fd_saved = None


@dataclass(frozen=True)
class PlannerProblem:
    modules: tuple[str, ...]
    settings: tuple[str, ...]  # includes "keep" when keeping is allowed
    slices: tuple[str, ...]
    loss: np.ndarray  # (slices, modules, settings) predicted loss increase; 0 for keep
    bytes: np.ndarray  # (modules, settings) packed bytes
    params: np.ndarray  # (modules,) weights per module, for average bits
    allowed: np.ndarray  # (modules, settings) bool: pinned/kept modules allow one setting only
    seconds: np.ndarray | None = None  # (modules, settings) projected decode-step seconds on `target`
    target: str | None = None
    blocks: tuple[int | None, ...] | None = None  # (modules,) transformer block per module, None outside blocks

    def __post_init__(self):
        s, m, o = len(self.slices), len(self.modules), len(self.settings)
        if self.loss.shape != (s, m, o) or self.bytes.shape != (m, o) or self.allowed.shape != (m, o):
            raise ValueError("planner arrays do not match (slices, modules, settings)")
        if self.seconds is not None and self.seconds.shape != (m, o):
            raise ValueError("planner seconds do not match (modules, settings)")
        if self.blocks is not None and len(self.blocks) != m:
            raise ValueError("planner blocks do not match modules")
        if not self.allowed.any(axis=1).all():
            raise PlannerError("A module has no allowed setting; unpin it or allow another setting.")


@dataclass(frozen=True)
class PlannerSolution:
    choice: dict[str, str]  # module -> setting
    predicted: dict[str, float]  # slice -> predicted loss increase (sum over modules)
    objective: float
    total_bytes: int
    average_bits: float
    status: str
    gap: float  # relative MIP gap HiGHS proved (0 = optimal)
    seconds: float
    solver: str = "HiGHS MILP (scipy.optimize.milp)"
    projected_seconds: float | None = None  # planned modules' projected decode-step seconds (problem.seconds)


def _bits_per_weight(problem: PlannerProblem) -> np.ndarray:
    return problem.bytes * 8 / np.maximum(problem.params, 1)[:, None]  # (modules, settings)


def solve(problem: PlannerProblem, *, budget_bytes: float | None = None, average_bits: float | None = None,
          budget_seconds: float | None = None, objective: str = "worst", weights: dict[str, float] | None = None,
          time_limit: float = 20.0, offset: np.ndarray | None = None, near: dict[str, str] | None = None,
          max_changes: int | None = None, low_per_block: int | None = None,
          low_bits: int = LOW_BITS) -> PlannerSolution:
    """Minimise the predicted loss (worst slice, weighted mix, or one slice) under the budget.

    budget_seconds: projected decode-step seconds left for the planned modules (the fixed part already taken off).
    offset: (slices,) a constant per slice added to its loss (a measured plan's KL when `loss` holds changes from
    it, `plan/local.py`); near + max_changes: at most that many modules differ from the choice `near` (a trust
    region around the plan the changes were estimated at).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    started = time.perf_counter()
    s, m, o = problem.loss.shape
    n = m * o
    worst = objective == "worst"
    if not worst:
        mix = weights or ({objective: 1.0} if objective in problem.slices else None)
        if mix is None:
            raise PlannerError(f"Unknown objective '{objective}'; use worst, a slice id, or weights per slice.")
        w = np.array([mix.get(name, 0.0) for name in problem.slices], dtype=float)
        if w.sum() <= 0:
            raise PlannerError("The objective's slice weights are all zero; give at least one slice a weight.")
        w = w / w.sum()
    cost = np.zeros(n + 1)
    if worst:
        cost[n] = 1.0
    else:
        cost[:n] = np.tensordot(w, problem.loss, axes=1).reshape(n)
    rows, lower, upper = [], [], []
    one_hot = np.zeros((m, n + 1))
    for module in range(m):
        one_hot[module, module * o:(module + 1) * o] = 1
    rows.append(one_hot), lower.append(np.ones(m)), upper.append(np.ones(m))
    if budget_bytes is not None:
        row = np.zeros((1, n + 1))
        row[0, :n] = problem.bytes.reshape(n)
        rows.append(row), lower.append([-np.inf]), upper.append([budget_bytes])
    if average_bits is not None:
        row = np.zeros((1, n + 1))
        row[0, :n] = (problem.bytes * 8).reshape(n)
        rows.append(row), lower.append([-np.inf]), upper.append([average_bits * problem.params.sum()])
    if budget_seconds is not None:
        if problem.seconds is None:
            raise PlannerError("A latency budget needs projected times per setting; build the problem with a target.")
        row = np.zeros((1, n + 1))
        row[0, :n] = problem.seconds.reshape(n) * 1e6  # microseconds: HiGHS's feasibility tolerance is absolute
        rows.append(row), lower.append([-np.inf]), upper.append([budget_seconds * 1e6])
    offset = np.zeros(s) if offset is None else np.asarray(offset, dtype=float)
    if near is not None and max_changes is not None:
        row = np.zeros((1, n + 1))
        for module, setting in near.items():
            row[0, problem.modules.index(module) * o + problem.settings.index(setting)] = 1
        rows.append(row), lower.append([m - max_changes]), upper.append([np.inf])
    if low_per_block is not None:
        stacked = stacking_rows(problem, low_bits)
        if len(stacked):
            rows.append(np.hstack([stacked, np.zeros((len(stacked), 1))]))
            lower.append(np.full(len(stacked), -np.inf)), upper.append(np.full(len(stacked), float(low_per_block)))
    if worst:
        epigraph = np.zeros((s, n + 1))
        epigraph[:, :n] = problem.loss.reshape(s, n)
        epigraph[:, n] = -1
        rows.append(epigraph), lower.append(np.full(s, -np.inf)), upper.append(-offset)
    upper_x = np.append(problem.allowed.reshape(n).astype(float), np.inf)
    lower_t = -np.inf if worst else 0  # t is the worst slice's loss, negative where it holds changes that help
    integrality = np.append(np.ones(n), 0)
    with solver_stdout_to_stderr():
        result = milp(cost, constraints=LinearConstraint(np.vstack(rows), np.concatenate(lower),
                                                         np.concatenate(upper)),
                      integrality=integrality, bounds=Bounds(np.append(np.zeros(n), lower_t), upper_x),
                      options={"time_limit": time_limit, "mip_rel_gap": 1e-6})
    if result.x is None:
        if budget_seconds is not None:
            fastest = np.where(problem.allowed, problem.seconds, np.inf).min(axis=1).sum()
            raise PlannerError(f"No plan fits the latency budget: the fastest allowed settings of the planned modules "
                               f"alone project to {fastest * 1e3:,.3f} ms on {problem.target}; raise the budget or "
                               "unpin modules.")
        smallest = np.where(problem.allowed, problem.bytes, np.inf).min(axis=1).sum()
        raise PlannerError(
            f"No plan fits the budget: the smallest allowed settings need {smallest / 1e6:,.3f} MB; raise the budget or "
            "unpin modules."
        )
    x = result.x[:n].reshape(m, o).round().astype(bool)
    picks = x.argmax(axis=1)
    chosen_loss = problem.loss[:, np.arange(m), picks]  # (slices, modules)
    predicted = {name: float(offset[i] + chosen_loss[i].sum()) for i, name in enumerate(problem.slices)}
    total_bytes = int(problem.bytes[np.arange(m), picks].sum())
    gap = float(getattr(result, "mip_gap", 0.0) or 0.0)
    return PlannerSolution(
        choice={problem.modules[i]: problem.settings[picks[i]] for i in range(m)},
        predicted=predicted,
        objective=float(result.fun),
        total_bytes=total_bytes,
        average_bits=float(total_bytes * 8 / problem.params.sum()),
        status="optimal" if result.status == 0 else result.message,
        gap=gap,
        seconds=time.perf_counter() - started,
        projected_seconds=None if problem.seconds is None else float(problem.seconds[np.arange(m), picks].sum()),
    )


def stacking_rows(problem: PlannerProblem, low_bits: int = LOW_BITS) -> np.ndarray:
    """(blocks, modules * settings) 0/1 rows: entry (b, module k, setting j) is 1 when k is in block b and j has at
    most `low_bits` bits; a row times the one-hot choice counts block b's modules at that depth."""
    if problem.blocks is None:
        raise PlannerError("A per-block low-bit cap needs each module's block; build the problem from the inventory.")
    m, o = problem.bytes.shape
    low = np.array([s in PLANNER_SETTINGS and PLANNER_SETTINGS[s].bits <= low_bits for s in problem.settings])
    found = sorted({b for b in problem.blocks if b is not None})
    out = np.zeros((len(found), m * o))
    for k, block in enumerate(problem.blocks):
        if block is not None:
            out[found.index(block), k * o:(k + 1) * o] = low
    return out


def uniform_choice(problem: PlannerProblem, *, budget_bytes: float | None = None, average_bits: float | None = None,
                   budget_seconds: float | None = None, low_per_block: int | None = None,
                   low_bits: int = LOW_BITS) -> tuple[str, dict[str, str]] | None:
    """The baseline a mixed plan must beat: every planned module at one setting (a module pinned to one setting keeps
    it), the setting among those that fit the budget and the per-block low-bit cap whose scores predict the lowest
    worst slice. (setting, choice), or None when no single setting fits. `solve`'s budget arguments. A setting that
    masks is never the baseline: uniform is the plain weight format a user would otherwise ship."""
    m, o = problem.bytes.shape
    pinned = problem.allowed.sum(axis=1) == 1
    stacked = stacking_rows(problem, low_bits) if low_per_block is not None else None
    best = None
    for j, setting in enumerate(problem.settings):
        masks = setting in PLANNER_SETTINGS and PLANNER_SETTINGS[setting].masks
        if setting == "keep" or masks or not problem.allowed[:, j].any():
            continue
        picks = np.where(problem.allowed[:, j], j, problem.allowed.argmax(axis=1))
        if not (problem.allowed[:, j] | pinned).all():
            continue  # a module that may not take it and is not pinned: not a uniform plan
        if stacked is not None and len(stacked):
            one_hot = np.zeros(m * o)
            one_hot[np.arange(m) * o + picks] = 1
            if (stacked @ one_hot).max() > low_per_block:
                continue
        index = np.arange(m)
        total = problem.bytes[index, picks].sum()
        fits = ((budget_bytes is None or total <= budget_bytes + 0.5)
                and (average_bits is None or total * 8 <= average_bits * problem.params.sum() + 1e-6)
                and (budget_seconds is None or (problem.seconds is not None
                                                and problem.seconds[index, picks].sum() <= budget_seconds + 1e-12)))
        worst = float(problem.loss[:, index, picks].sum(axis=1).max())
        if fits and (best is None or worst < best[0]):
            best = (worst, setting, {problem.modules[i]: problem.settings[picks[i]] for i in range(m)})
    return None if best is None else (best[1], best[2])


def greedy(problem: PlannerProblem, budget_bytes: float) -> dict[str, str]:
    """The usual heuristic (cheapest loss per byte saved first), kept to show what the exact solver gains."""
    m, o = problem.bytes.shape
    loss = problem.loss.max(axis=0)  # worst slice per (module, setting)
    current = np.array([int(np.argmax(np.where(problem.allowed[i], problem.bytes[i], -1))) for i in range(m)])
    total = problem.bytes[np.arange(m), current].sum()
    while total > budget_bytes:
        best, best_ratio = None, np.inf
        for i in range(m):
            for j in range(o):
                saved = problem.bytes[i, current[i]] - problem.bytes[i, j]
                if problem.allowed[i, j] and saved > 0:
                    ratio = (loss[i, j] - loss[i, current[i]]) / saved
                    if ratio < best_ratio:
                        best, best_ratio = (i, j), ratio
        if best is None:
            break
        total -= problem.bytes[best[0], current[best[0]]] - problem.bytes[best]
        current[best[0]] = best[1]
    return {problem.modules[i]: problem.settings[current[i]] for i in range(m)}


def solution_plan(choice: dict[str, str], rows, method: str = "rtn", name: str = "planner") -> Plan:
    """The planner's choice as rules a person can read and edit: per setting, one rule per group of kinds that share
    the same blocks (blocks as ranges), and one per other module kind. A rule is kept only if it selects exactly its
    modules among `rows` (the whole inventory); where it would not (say several experts' projections of one kind in a
    block), `_split_rules` writes as few exact rules as it can for those modules."""
    by_setting: dict[str, list[str]] = {}
    for module, setting in choice.items():
        by_setting.setdefault(setting, []).append(module)
    info = {r.name: r for r in rows}
    block_count = max((r.block for r in rows if r.block is not None), default=-1) + 1
    kind_order = {k: i for i, k in enumerate(dict.fromkeys(r.kind for r in rows))}
    rules = []
    for setting in sorted(by_setting, key=lambda s: (s != "keep", s)):
        action = setting_action(setting, method)
        note = f"planner: {setting}"
        in_blocks: dict[str, list[str]] = {}  # kind -> its modules in blocks at this setting
        others: dict[str, list[str]] = {}  # kind -> its modules outside blocks (embedding, lm_head)
        for module in by_setting[setting]:
            (others if info[module].block is None else in_blocks).setdefault(info[module].kind, []).append(module)
        groups: dict[tuple[int, ...], list[str]] = {}  # the same blocks -> the kinds that share them
        for kind in sorted(in_blocks, key=kind_order.get):
            groups.setdefault(tuple(sorted({info[m].block for m in in_blocks[kind]})), []).append(kind)
        candidates = [(Rule(kind=tuple(kinds), blocks=blocks, note=note, **action),
                       {m for k in kinds for m in in_blocks[k]}) for blocks, kinds in groups.items()]
        candidates += [(Rule(kind=(kind,), note=note, **action), set(others[kind]))
                       for kind in sorted(others, key=kind_order.get)]
        for rule, members in candidates:
            if {r.name for r in rows if rule.selects(r, block_count)} == members:
                rules.append(rule)
            else:
                rules.extend(_split_rules(members, rows, block_count, kind_order, Rule(kind=rule.kind, note=note,
                                                                                        **action)))
    return with_index(Plan(rules=tuple(rules), name=name,
                           description="Mixed precision chosen by the planner (exact MILP over predicted loss)."))


def _split_rules(members: set[str], rows, block_count: int, kind_order: dict, template: Rule) -> list[Rule]:
    """Exact rules for modules that kind and blocks alone do not single out (several experts' projections of one kind
    in a block): per place inside the block (`mlp.experts.0`), its kinds that share blocks; places that differ only in
    one index (the expert) share a rule whose `name` spells that index, leaving the block index to `blocks`. Where
    such a rule would still take another module, and for a lone module, the rule names the module."""
    import re

    from shrink_core.plan.explain import name_parts

    kinds = {r.name: r.kind for r in rows}
    order = {r.name: i for i, r in enumerate(rows)}
    places: dict[tuple[str, str], dict[str, list[str]]] = {}  # (name before the block index, path after it)
    outside = []
    for module in sorted(members, key=order.get):
        head, block, tail = name_parts(module)
        if block is None:
            outside.append(module)
        else:
            places.setdefault((head, tail.rpartition(".")[0]), {}).setdefault(kinds[module], []).append(module)
    entries: dict[tuple, dict[str, list[str]]] = {}  # (head, kinds, blocks, path with its first index as #)
    for (head, path), by_kind in places.items():
        same_blocks: dict[tuple[int, ...], list[str]] = {}
        for kind in sorted(by_kind, key=kind_order.get):
            same_blocks.setdefault(tuple(sorted(name_parts(m)[1] for m in by_kind[kind])), []).append(kind)
        skeleton = re.sub(r"\.\d+(?=\.|$)", ".#", path, count=1)
        for blocks, kind_group in same_blocks.items():
            entry = entries.setdefault((head, tuple(kind_group), blocks, skeleton), {})
            entry[path] = [m for k in kind_group for m in by_kind[k]]
    rules = []
    for (head, kind_group, blocks, skeleton), paths in entries.items():
        chosen = {m for modules in paths.values() for m in modules}
        before, _, after = skeleton.partition("#")
        indices = "|".join(p[len(before):len(p) - len(after)] for p in paths)
        pattern = (re.escape(next(iter(paths))) if len(paths) == 1
                   else f"{re.escape(before)}(?:{indices}){re.escape(after)}")
        tries = [] if len(chosen) == 1 else [
            replace(template, kind=kind_group, blocks=blocks),
            replace(template, kind=kind_group, blocks=blocks, name=f"{re.escape(head)}\\d+{pattern}\\..+")]
        exact = next((r for r in tries if {x.name for x in rows if r.selects(x, block_count)} == chosen), None)
        if exact is not None:
            rules.append(exact)
        else:
            rules.extend(replace(template, kind=None, name=re.escape(m)) for m in sorted(chosen, key=order.get))
    return rules + [replace(template, kind=None, name=re.escape(m)) for m in outside]


def setting_action(setting: str, method: str = "rtn") -> dict:
    """The rule fields that apply a planner setting: keep, a weight format, and a magnitude mask where it masks."""
    if setting == "keep":
        return {"keep": True}
    menu = PLANNER_SETTINGS[setting]
    action = {"weights": WeightSpec(method=setting_method(setting, method), **menu.weights())}
    if menu.masks:
        action["prune"] = PruneSpec(**menu.prune_fields())
    return action


def setting_bytes(rows, modules: list[str], settings: list[str]) -> np.ndarray:
    """Bytes of each module under each setting, from the engine's own accounting (`resolve`): packed, or for a
    setting that masks, its sparse format's (what `eval` and the Plan page count as the model's size)."""
    from shrink_core.plan.resolve import resolve

    by_name = {r.name: r for r in rows}
    subset = [by_name[m] for m in modules]
    out = np.zeros((len(modules), len(settings)))
    for j, setting in enumerate(settings):
        if setting == "keep":
            out[:, j] = [r.bytes for r in subset]
            continue
        plan = Plan(rules=(Rule(kind=tuple(sorted({r.kind for r in subset})), **setting_action(setting)),))
        resolved = {r.name: r for r in resolve(subset, plan)}
        out[:, j] = [resolved[m].stored_bytes for m in modules]
    return out


def setting_method(setting: str, method: str) -> str:
    """The plan method for a menu setting: llama.cpp types take their imatrix path where a calibrated method (gptq)
    was asked for, and their reference quantizer otherwise."""
    if setting not in PLANNER_SETTINGS or PLANNER_SETTINGS[setting].ggml is None:
        return method
    return "imatrix" if method in CALIBRATED_METHODS else "rtn"


def _module_weights(row, setting: str, head_tied: bool):
    from shrink_core.formats import weight_bytes
    from shrink_core.perf.workload import ModuleWeights

    ggml, scales = None, "fp16"
    if setting == "keep":
        bits, group, symmetric = (8 * (row.bytes // row.params) if row.params else 32), None, True
    else:  # a mask is timed as its dense format: no sparse kernel is assumed (none runs 2:4 on a CPU)
        spec = PLANNER_SETTINGS[setting]
        bits, group, symmetric, ggml, scales = spec.bits, spec.group_size, spec.symmetric, spec.ggml, spec.scales
    streamed = row.kind != "embedding" or head_tied  # a tied head streams the shared weight; lookups read few rows
    return ModuleWeights(row.name, row.kind, row.shape, row.params, bits, group, symmetric,
                         weight_bytes(row.shape, bits, group, symmetric, ggml, scales), streamed=streamed, ggml=ggml,
                         scales=scales)


def setting_seconds(rows, modules: list[str], settings: list[str], hardware) -> np.ndarray:
    """Projected decode-step seconds of each module under each setting on `hardware` (batch 1, its own roofline)."""
    from shrink_core.perf.roofline import module_step_seconds

    by_name = {r.name: r for r in rows}
    owners = {r.tied_to for r in rows if r.tied_to}
    return np.array([[module_step_seconds(_module_weights(by_name[m], s, m in owners), hardware) for s in settings]
                     for m in modules])


@dataclass(frozen=True)
class LatencyModel:
    """Projected decode ms/token = fixed part + the planned modules' own times (linear, so it fits the MILP)."""

    target: str
    fixed_seconds: float  # KV cache, attention, launches, and the streamed modules the planner does not choose for
    basis: str  # what the projection rests on, shown with every figure

    def total_ms(self, planned_seconds: float) -> float:
        return 1000 * (self.fixed_seconds + planned_seconds)


def latency_model(rows, summary: dict, hardware, planned: set[str], bits: dict | None = None,
                  prompt_tokens: int = 64, decode_tokens: int = 16) -> LatencyModel:
    """rows, summary: the stored inventory and `inventory.summary`; bits: WeightFormat of unplanned quantized modules.

    Decode at batch 1 after prompt_tokens + decode_tokens / 2 of context, the point `perf.roofline.project` uses.
    """
    from shrink_core.perf.roofline import EXTRA_LAUNCHES, basis, fixed_step_seconds, module_step_seconds
    from shrink_core.perf.workload import workload_from_rows

    planned = planned | {r.name for r in rows if r.tied_to in planned}  # a tied head is timed at its owner
    workload = workload_from_rows(rows, summary, bits)
    fixed = fixed_step_seconds(workload, hardware, 1, prompt_tokens + decode_tokens / 2)
    fixed += sum(module_step_seconds(m, hardware) for m in workload.modules if m.streamed and m.name not in planned)
    launches = workload.layers * workload.ops_per_layer + EXTRA_LAUNCHES
    return LatencyModel(hardware.name, fixed, f"projected, not measured: decode at batch 1, context "
                        f"{prompt_tokens + decode_tokens // 2}, per-module {basis(hardware, launches)}")


def build_problem(rows, scores: dict[tuple[str, str, str], float], slices: list[str], settings: list[str],
                  pinned: dict[str, str] | None = None, allow_keep: bool = True, hardware=None,
                  model=None) -> PlannerProblem:
    """rows: inventory; scores[(module, setting, slice)] = predicted loss increase, for block linears and, when
    scanned, the embedding / untied lm_head (every scored module is a decision); pinned: module -> setting;
    hardware: a `perf.hardware.Hardware` row, for a projected-latency budget on that target; model: an
    `interactions.InteractionModel` whose per-bit-width and per-slice scales correct the scores (its linear part:
    what a MILP can optimise exactly)."""
    pinned = pinned or {}
    modules = sorted({m for m, _, _ in scores}, key=[r.name for r in rows].index)
    options = (["keep"] if allow_keep or "keep" in pinned.values() else []) + [s for s in settings if s != "keep"]
    unknown = [s for s in options if s != "keep" and s not in PLANNER_SETTINGS]
    if unknown:
        raise PlannerError(f"Unknown setting '{unknown[0]}'; use {', '.join(PLANNER_SETTINGS)} or keep.")
    for module, setting in pinned.items():
        if module not in modules:
            raise PlannerError(f"The pinned module '{module}' has no sensitivity scores; scan it or unpin it.")
        if setting not in options:
            raise PlannerError(f"The pinned setting '{setting}' for {module} is not among the planner's settings.")
    loss = np.zeros((len(slices), len(modules), len(options)))
    for i, slice_id in enumerate(slices):
        for k, module in enumerate(modules):
            for j, setting in enumerate(options):
                if setting == "keep":
                    continue
                key = (module, setting, slice_id)
                if key not in scores:
                    raise PlannerError(f"No sensitivity score for {module} at {setting} on '{slice_id}'; run the scan "
                                       "for that setting and slice first.")
                loss[i, k, j] = max(scores[key], 0.0) * (1.0 if model is None else model.scale(setting, slice_id))
    allowed = np.ones((len(modules), len(options)), dtype=bool)
    for k, module in enumerate(modules):
        if module in pinned:
            allowed[k] = [s == pinned[module] for s in options]
    by_name = {r.name: r for r in rows}
    params = np.array([by_name[m].params for m in modules], dtype=float)
    seconds = None if hardware is None else setting_seconds(rows, modules, options, hardware)
    return PlannerProblem(tuple(modules), tuple(options), tuple(slices), loss, setting_bytes(rows, modules, options),
                          params, allowed, seconds, None if hardware is None else hardware.name,
                          tuple(by_name[m].block for m in modules))
