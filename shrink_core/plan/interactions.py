"""A prediction of a whole plan's KL that accounts for interactions, fitted on measured plans.

The scan scores one module at a time; their sum (`predict.predict`) is the additive prediction. Quantization errors
compound: at 2-3 bits the sum underestimates what many modules do together, at 8 bits it overestimates nothing
measurable. The fitted model keeps the scan's per-module scores and corrects them with a few numbers measured on whole
plans:

    KL(plan, slice) ~= sum_c alpha_c * f_slice * S_c  +  gamma * (f_slice * S)**2

S_c is the sum of the scores of the modules the plan puts at bit-width c, S = sum_c S_c. f_slice is one factor per
slice (`slice_factors`): the scan's scores may carry a different scale on each slice (Gemma 3 270M: measured over
summed 0.10 on fr, 0.42 on code), and the worst-slice objective needs the slices' relative scale right before
anything else, or it protects the wrong slice. alpha_c scales each bit-width's scores (errors at low bits compound),
gamma is a rank-1 pairwise term: every pair of perturbed modules adds gamma * s_i * s_j, i.e. the cross terms of
S**2. Coefficients are non-negative (more error never predicts less KL) and fitted by least squares on relative
error, so a 0.01-KL plan counts as much as a 2-KL plan.
The linear part is what the MILP planner can optimise exactly (scores scaled per bit-width and slice); the quadratic
part is monotone in S, and the closed loop (`closed_loop`) measures what the planner then chooses.
Pure numpy/scipy: no torch, no model.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from shrink_core.plan.menu import PLANNER_SETTINGS

BIT_CLASSES = tuple(sorted({s.bits for s in PLANNER_SETTINGS.values()}, reverse=True))  # (8, 6, 4, 3, 2)


def bit_class(setting: str) -> int | None:
    """The bit-width a planner setting belongs to (a 2:4 + format setting: its format's); None for keep (no error)
    and anything off the menu."""
    spec = PLANNER_SETTINGS.get(setting)
    return None if spec is None else spec.bits


def features(choice: dict[str, str], scores: dict[tuple[str, str, str], float], slice_id: str) -> np.ndarray:
    """(len(BIT_CLASSES),) sums of the scan's scores per bit-width for one plan on one slice (keep adds nothing)."""
    out = np.zeros(len(BIT_CLASSES))
    for module, setting in choice.items():
        bits = bit_class(setting)
        if bits is None:
            continue
        value = scores.get((module, setting, slice_id))
        if value is None:
            raise KeyError(f"no score for {module} at {setting} on {slice_id}")
        out[BIT_CLASSES.index(bits)] += max(value, 0.0)
    return out


def slice_factors(totals, measured, slices) -> tuple[dict[str, float], float]:
    """One factor per slice: the geometric mean of measured / summed scores over that slice's observations (totals:
    each observation's summed scores, S). Also the pooled factor over every observation, for a slice none measured.
    Observations with nothing perturbed (S ~ 0) or no measured error say nothing about scale and are left out."""
    logs: dict[str, list[float]] = {}
    for total, value, slice_id in zip(totals, measured, slices):
        if total > 1e-9 and value > 1e-9:
            logs.setdefault(slice_id, []).append(math.log(value / total))
    pooled = [v for values in logs.values() for v in values]
    return ({s: math.exp(float(np.mean(v))) for s, v in logs.items()},
            math.exp(float(np.mean(pooled))) if pooled else 1.0)


def _design(x: np.ndarray) -> np.ndarray:
    """Regressors per observation: the per-bit-width sums and the square of their total."""
    x = np.atleast_2d(np.asarray(x, dtype=float))
    return np.hstack([x, x.sum(axis=1, keepdims=True) ** 2])


UNTRUSTED_FACTOR = 2.0


@dataclass(frozen=True)
class InteractionModel:
    alpha: tuple[float, ...]  # per BIT_CLASSES: scale of that bit-width's summed scores
    gamma: float  # pairwise term on the squared total
    observations: int  # (plan, slice) pairs fitted on
    plans: int  # measured plans they come from
    log_spread: float  # leave-one-plan-out RMS of log(measured / predicted): the interval's width
    classes: tuple[int, ...] = BIT_CLASSES
    slice_factor: tuple[tuple[str, float], ...] = ()  # (slice, f_slice); empty: one scale shared by every slice
    other_slices: float = 1.0  # the factor of a slice no measured plan covers (the pooled one)

    @staticmethod
    def additive() -> InteractionModel:
        """The scan's plain sum: alpha 1, no pairwise term, no measured plan behind it (no interval)."""
        return InteractionModel(tuple(1.0 for _ in BIT_CLASSES), 0.0, 0, 0, math.nan)

    @property
    def fitted(self) -> bool:
        return self.plans > 0

    def factor(self, slice_id: str) -> float:
        """The slice's scale on the scan's scores (1 when the model has none)."""
        return dict(self.slice_factor).get(slice_id, self.other_slices if self.slice_factor else 1.0)

    def predict(self, x: np.ndarray, slices) -> np.ndarray:
        """Predicted KL for rows of per-bit-width sums (n, classes), row i on slices[i] -> (n,)."""
        scaled = _scaled(x, [self.factor(s) for s in slices])
        return _design(scaled) @ np.array([*self.alpha, self.gamma])

    @property
    def interval_factor(self) -> float:
        """The 95% interval's factor either way, exp(1.96 * the held-out log spread); NaN when not fitted."""
        if not self.fitted or not math.isfinite(self.log_spread):
            return math.nan
        return math.exp(1.96 * self.log_spread)

    @property
    def untrusted(self) -> bool:
        """Its interval is wider than UNTRUSTED_FACTOR either way: the scan's scores do not describe how this model's
        errors combine (SmolLM2: x1.4; Gemma 3 270M: x4, docs/plan.md)."""
        return self.interval_factor > UNTRUSTED_FACTOR

    def interval(self, x: np.ndarray, slices) -> tuple[np.ndarray, np.ndarray]:
        """An approximate 95% interval: the prediction times and over `interval_factor`; NaN if not fitted."""
        value = self.predict(x, slices)
        factor = self.interval_factor
        return value / factor, value * factor

    def scale(self, setting: str, slice_id: str) -> float:
        """The factor the planner multiplies this setting's scores on this slice by (its bit-width's alpha times the
        slice's factor; keep: no error to scale)."""
        bits = bit_class(setting)
        return 1.0 if bits is None else self.alpha[self.classes.index(bits)] * self.factor(slice_id)

    def to_dict(self) -> dict:
        return {"alpha": dict(zip([f"{c}-bit" for c in self.classes], self.alpha)), "gamma": self.gamma,
                "slice_factor": dict(self.slice_factor), "observations": self.observations, "plans": self.plans,
                "log_spread": self.log_spread}


def _scaled(x, factors) -> np.ndarray:
    x = np.atleast_2d(np.asarray(x, dtype=float))
    return x * np.asarray(factors, dtype=float).reshape(-1, 1) if len(x) else x


def _solve(x: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """Non-negative least squares on relative error. `ridge` pulls each alpha toward 1 (the scan's own score), so a
    bit-width no measured plan used keeps its score as is, and a few plans move the alphas only as far as they show;
    gamma is free: a single measured plan is explained by compounding (gamma) before any bit-width is rescaled."""
    from scipy.optimize import nnls

    weight = 1.0 / np.maximum(y, 1e-4)  # relative error: each observation counts by its own size
    a = _design(x) * weight[:, None]
    b = y * weight
    k = len(BIT_CLASSES)
    if ridge > 0:
        a = np.vstack([a, np.hstack([np.sqrt(ridge) * np.eye(k), np.zeros((k, 1))])])
        b = np.concatenate([b, np.sqrt(ridge) * np.ones(k)])
    coef, _ = nnls(a, b)
    return coef


def _fit(x: np.ndarray, y: np.ndarray, slices, ridge: float) -> InteractionModel:
    """The coefficients (and, given each row's slice, the slice factors first) on these observations; no spread."""
    factors, pooled = slice_factors(x.sum(axis=1), y, slices) if slices is not None else ({}, 1.0)
    scaled = _scaled(x, [factors.get(s, pooled) for s in slices]) if factors else x
    coef = _solve(scaled, y, ridge)
    return InteractionModel(tuple(float(v) for v in coef[:-1]), float(coef[-1]), len(y), 0, math.nan,
                            slice_factor=tuple(sorted(factors.items())), other_slices=pooled)


def fit(x: np.ndarray, y: np.ndarray, plan_ids: list, slices: list | None = None,
        ridge: float = 0.05) -> InteractionModel:
    """x: (n, classes) per-bit-width score sums; y: (n,) measured KL; plan_ids: which plan each row came from (the
    held-out spread leaves whole plans out, since a plan's slices are not independent); slices: each row's slice,
    which fits one factor per slice first (None: one scale for every slice, the factors not fitted)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(y) == 0:
        return InteractionModel.additive()
    slices = None if slices is None else list(slices)
    model = _fit(x, y, slices, ridge)
    ids = list(dict.fromkeys(plan_ids))
    residuals = []
    if len(ids) >= 3:
        for held in ids:
            keep = np.array([p != held for p in plan_ids])
            without = _fit(x[keep], y[keep], None if slices is None else [s for s, k in zip(slices, keep) if k],
                           ridge)
            predicted = without.predict(x[~keep], [s for s, k in zip(slices or [""] * len(y), keep) if not k])
            residuals += list(np.log(np.maximum(y[~keep], 1e-6) / np.maximum(predicted, 1e-6)))
    spread = float(np.sqrt(np.mean(np.square(residuals)))) if residuals else math.nan
    return InteractionModel(model.alpha, model.gamma, len(y), len(ids), spread, slice_factor=model.slice_factor,
                            other_slices=model.other_slices)


def r_squared(predicted, measured) -> float:
    """1 - SS_res / SS_tot of the predictions as they are (not refitted to the measurements)."""
    predicted, measured = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    total = float(((measured - measured.mean()) ** 2).sum())
    return 1.0 - float(((measured - predicted) ** 2).sum()) / total if total > 0 else math.nan


class WorstSlice:
    """The worst slice of a measured plan's `predicted` and `measured` KL (slice -> value), and the error between."""
    predicted: dict[str, float]
    measured: dict[str, float]

    @property
    def worst_predicted(self) -> float:
        return max(self.predicted.values())

    @property
    def worst_measured(self) -> float:
        return max(self.measured.values())

    @property
    def error(self) -> float:
        """Relative error of the worst-slice prediction: (predicted - measured) / measured."""
        return (self.worst_predicted - self.worst_measured) / max(self.worst_measured, 1e-9)


@dataclass(frozen=True)
class Round(WorstSlice):
    """One closed-loop round: the plan the planner chose with the model of that round, and what it measured."""
    index: int
    choice: dict[str, str]
    predicted: dict[str, float]  # slice -> KL the round's model predicted
    measured: dict[str, float]  # slice -> KL measured
    model: dict  # InteractionModel.to_dict() the round planned with
    seconds: float


@dataclass
class LoopState:
    """What the loop has measured so far: the fitting data of the next round's model."""
    x: list = field(default_factory=list)
    y: list = field(default_factory=list)
    plan_ids: list = field(default_factory=list)
    slices: list = field(default_factory=list)

    def add(self, plan_id, rows: np.ndarray, measured: list[float], slices: list[str]) -> None:
        self.x += list(rows)
        self.y += list(measured)
        self.plan_ids += [plan_id] * len(measured)
        self.slices += list(slices)

    def fit(self) -> InteractionModel:
        """The model on everything measured so far (the slice factors included); additive before any plan."""
        return fit(np.array(self.x), np.array(self.y), self.plan_ids, self.slices) if self.y \
            else InteractionModel.additive()


def closed_loop(plan_with: Callable[[InteractionModel], dict[str, str]],
                measure: Callable[[dict[str, str]], dict[str, float]],
                rows_of: Callable[[dict[str, str]], dict[str, np.ndarray]],
                state: LoopState | None = None, rounds: int = 4, time_budget_s: float = 240.0,
                clock: Callable[[], float] | None = None,
                on_round: Callable[[Round], None] | None = None,
                known: dict | None = None) -> tuple[list[Round], InteractionModel]:
    """Plan with the current model, measure the plan, refit on everything measured, plan again; stop after
    `rounds`, when the time budget is spent, when the planner repeats a plan, or when the measured worst slice stops
    improving. `state` may hold plans measured before (a warm start). `known`: plans measured before, by
    tuple(sorted(choice.items())) -> slice -> KL, already in `state`: a round that plans one is not measured again,
    adds nothing to the fit, and ends the loop (the next round would plan the same). Returns the rounds and the last
    model.

    plan_with(model) -> module -> setting; measure(choice) -> slice -> measured KL;
    rows_of(choice) -> slice -> per-bit-width score sums (`features`)."""
    import time

    clock = clock or time.perf_counter
    state = state or LoopState()
    started = clock()
    model = state.fit()
    done: list[Round] = []
    seen: set = set()
    for index in range(rounds):
        round_start = clock()
        choice = plan_with(model)
        key = tuple(sorted(choice.items()))
        if key in seen:
            break
        seen.add(key)
        rows = rows_of(choice)
        reused = key in (known or {})
        measured = known[key] if reused else measure(choice)
        # a slice whose evaluation gives no KL (NaN, missing) is neither predicted nor fitted on
        slices = [s for s in rows if math.isfinite(float(measured.get(s, math.nan)))]
        if not slices:
            break
        predicted = dict(zip(slices, (float(v) for v in model.predict(np.array([rows[s] for s in slices]), slices))))
        result = Round(index, choice, predicted, {s: float(measured[s]) for s in slices}, model.to_dict(),
                       clock() - round_start)
        done.append(result)
        if on_round:
            on_round(result)
        if reused:
            break
        state.add(("loop", index), np.array([rows[s] for s in slices]), [measured[s] for s in slices], slices)
        model = state.fit()
        improving = len(done) < 2 or done[-1].worst_measured < min(r.worst_measured for r in done[:-1])
        if not improving or clock() - started > time_budget_s:
            break
    return done, model
