"""Do slices disagree on which modules matter? Pure comparisons of one scan's records across slices."""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

from shrink_core.sensitivity.scan import Record, spearman


@dataclass(frozen=True)
class SliceComparison:
    slice_a: str
    slice_b: str
    setting: str
    metric: str
    spearman: float  # rank correlation of the two slices' scores over the modules both have
    shared_top: int  # how many of each slice's k most sensitive modules the other's top k also holds
    k: int
    modules: int


def top_modules(records: list[Record], slice_id: str, setting: str, metric: str = "kl", k: int = 10) -> list[str]:
    """The k modules with the largest score for one slice and setting, most sensitive first (ties by name)."""
    rows = [r for r in records if r.slice == slice_id and r.setting == setting and r.metric == metric]
    return [r.module for r in sorted(rows, key=lambda r: (-r.value, r.module))[:k]]


def compare_slices(records: list[Record], setting: str, metric: str = "kl", k: int = 10) -> list[SliceComparison]:
    """Every pair of slices in `records` (in order of first appearance) for one setting and metric."""
    slices = list(dict.fromkeys(r.slice for r in records if r.setting == setting and r.metric == metric))
    scores = {s: {r.module: r.value for r in records if r.slice == s and r.setting == setting and r.metric == metric}
              for s in slices}
    out = []
    for a, b in combinations(slices, 2):
        common = [m for m in scores[a] if m in scores[b]]
        shared = set(top_modules(records, a, setting, metric, k)) & set(top_modules(records, b, setting, metric, k))
        out.append(SliceComparison(a, b, setting, metric, spearman([scores[a][m] for m in common],
                                                                   [scores[b][m] for m in common]),
                                   len(shared), k, len(common)))
    return out
