"""Pareto math, pure: dominance, the frontier, per-slice quality aggregated to one number, the acceptance line.

No I/O, no pandas, no plotting: plain floats in, plain values out. A value of None (or NaN) means "not measured";
such a point is never on the frontier and never acceptable, and it is never treated as zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from shrink_core.errors import ShrinkError


@dataclass(frozen=True)
class Metric:
    """A per-slice quality figure that can go on the y axis."""

    name: str  # column in the per-slice table
    label: str
    higher_is_better: bool
    task_only: bool = False  # defined only on task slices (accuracy, flips)
    unit: str = ""
    default_limit: float | None = None  # the acceptable line this metric starts with (None: no default line)

    def describe_limit(self, limit: float) -> str:
        """"perplexity within +5% of the reference", "KL <= 0.05 nats/token": the limit in the metric's unit."""
        if self.name == "ppl_ratio":
            return f"perplexity within {limit - 1:+.0%} of the reference"
        return f"{self.label.split(' (')[0]} {'>=' if self.higher_is_better else '<='} {limit:g} {self.unit}".strip()


METRICS = {
    "ppl_ratio": Metric("ppl_ratio", "perplexity / reference", higher_is_better=False, unit="ratio to reference",
                        default_limit=1.05),
    "kl": Metric("kl", "KL to reference (nats/token)", higher_is_better=False, unit="nats/token", default_limit=0.05),
    "top1_agree": Metric("top1_agree", "top-1 agreement with reference", higher_is_better=True,
                         unit="share of tokens", default_limit=0.9),
    "accuracy": Metric("accuracy", "task accuracy", higher_is_better=True, task_only=True, unit="share correct"),
    "flip_rate": Metric("flip_rate", "answers flipped vs reference (share)", higher_is_better=False, task_only=True,
                        unit="share of answers", default_limit=0.05),
}


@dataclass(frozen=True)
class Axis:
    """A cost figure that can go on the x axis; all of them are lower-is-better."""

    name: str
    label: str
    unit: str


AXES = {
    "memory": Axis("memory", "weights", "MB"),
    "latency": Axis("latency", "decode latency", "ms/token"),
    "projected": Axis("projected", "decode latency", "ms/token"),
    "cost": Axis("cost", "cost", "$ per million output tokens"),
}


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise ShrinkError(f"Unknown quality metric '{name}'; choose one of: {', '.join(METRICS)}.")
    return METRICS[name]


def get_axis(name: str) -> Axis:
    if name not in AXES:
        raise ShrinkError(f"Unknown x axis '{name}'; choose one of: {', '.join(AXES)}.")
    return AXES[name]


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def dominates(a: tuple[float, float], b: tuple[float, float], y_higher_is_better: bool = False) -> bool:
    """Point a = (x, y) dominates b: no worse on both (x lower is better) and strictly better on one."""
    ax, ay = a
    bx, by = b
    if y_higher_is_better:
        ay, by = -ay, -by
    return ax <= bx and ay <= by and (ax < bx or ay < by)


def frontier_mask(xs: list, ys: list, y_higher_is_better: bool = False) -> list[bool]:
    """True for each point no other point dominates; points with a missing x or y are never on it.

    Equal points are all on the frontier (neither dominates the other)."""
    if len(xs) != len(ys):
        raise ValueError("xs and ys must have the same length")
    points = [None if missing(x) or missing(y) else (float(x), float(y)) for x, y in zip(xs, ys)]
    out = []
    for i, p in enumerate(points):
        if p is None:
            out.append(False)
            continue
        out.append(not any(q is not None and j != i and dominates(q, p, y_higher_is_better)
                           for j, q in enumerate(points)))
    return out


def frontier_path(xs: list, ys: list, y_higher_is_better: bool = False) -> list[int]:
    """Indices of the frontier points ordered by x (then by y, best first): the staircase to draw."""
    mask = frontier_mask(xs, ys, y_higher_is_better)
    sign = -1.0 if y_higher_is_better else 1.0
    return sorted((i for i, on in enumerate(mask) if on), key=lambda i: (float(xs[i]), sign * float(ys[i])))


def worst_slice(values: dict, slices: list[str], higher_is_better: bool) -> tuple[str | None, float | None]:
    """(slice, value) of the worst of `slices`; (None, None) when any of them is missing for this candidate.

    A candidate not evaluated on every slice has no known worst slice: it is not silently judged on fewer."""
    if not slices or any(missing(values.get(s)) for s in slices):
        return None, None
    pick = min if higher_is_better else max
    worst = pick(slices, key=lambda s: float(values[s]))
    return worst, float(values[worst])


def weighted_mix(values: dict, weights: dict) -> float | None:
    """Weighted mean of per-slice values (weights need not sum to 1); None when a weighted slice is missing."""
    used = {s: float(w) for s, w in weights.items() if w}
    if not used or any(w < 0 for w in used.values()):
        raise ValueError("weights must be non-negative with at least one positive")
    if any(missing(values.get(s)) for s in used):
        return None
    return sum(float(values[s]) * w for s, w in used.items()) / sum(used.values())


def acceptable(value, limit: float | None, higher_is_better: bool) -> bool | None:
    """Within the constraint (e.g. ppl ratio <= 1.05)? None when there is no limit or no value."""
    if limit is None or missing(value):
        return None
    return float(value) >= limit if higher_is_better else float(value) <= limit



@dataclass(frozen=True)
class SliceChoice:
    """The default slice set of a worst-slice view: the slices every plotted candidate has a value on."""

    shared: tuple[str, ...]
    left_out: tuple[tuple[str, tuple[str, ...]], ...]  # (slice, the candidates that have it), for those not shared

    def note(self) -> str:
        """"not in the worst-slice set: hi (only w8)"; "" when every slice is shared."""
        if not self.left_out:
            return ""
        return "not in the worst-slice set: " + "; ".join(
            f"{slice_id} (only {', '.join(names)})" for slice_id, names in self.left_out)


def shared_slices(coverage: dict[str, set]) -> SliceChoice:
    """coverage: candidate name -> the slices it has a value on (candidates with none are not plotted and ignored).

    A worst slice over a slice some candidate lacks drops that candidate from the plot, so the default set is the
    intersection; the other slices are named with who has them. With no slice in common, nothing is shared."""
    covered = {name: set(slices) for name, slices in coverage.items() if slices}
    if not covered:
        return SliceChoice((), ())
    shared = set.intersection(*covered.values())
    every = set.union(*covered.values())
    left_out = tuple((s, tuple(sorted(n for n, have in covered.items() if s in have))) for s in sorted(every - shared))
    return SliceChoice(tuple(sorted(shared)), left_out)
