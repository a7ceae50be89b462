"""The path through the app as steps (model, baseline, scan, plan, candidates): what is done and what to do next.

Pure: it reads the store's counts (`Store.overview`) and returns sentences; the status strip on every page draws it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    key: str  # the page it links to: model, evalsets, sensitivity, plan, results
    label: str
    done: bool
    detail: str  # what is there, in a few words
    todo: str  # what to do there and why, when it is the next step


def steps(counts: dict) -> list[Step]:
    baseline, scanned, candidates = counts["baseline_slices"], counts["scanned_slices"], counts["candidates"]
    return [
        Step("model", "Model", counts["described"], "loaded" if counts["described"] else "not loaded",
             "Load a model on the Model page: every other page works on it."),
        Step("evalsets", "Baseline", baseline > 0, _count(baseline, "slice"),
             "Run a baseline on Eval sets: the uncompressed model's figures that every candidate is compared with."),
        Step("sensitivity", "Scan", scanned > 0, _count(scanned, "slice"),
             "Run a sensitivity scan: the heatmaps show which layers break first, per slice, and feed the planner."),
        Step("plan", "Plan", counts["draft"] or candidates > 0,
             "draft saved" if counts["draft"] else "plans run" if candidates else "none yet",
             "Make a plan on the Plan page, by hand or with the planner under a size budget, and run it."),
        Step("results", "Candidates", candidates > 0, str(candidates) if candidates else "none yet",
             "Compare candidates on the Results page: quality per slice against size, latency and cost."),
    ]


def next_step(all_steps: list[Step]) -> Step | None:
    """The first step not done yet; None when every step has something."""
    return next((s for s in all_steps if not s.done), None)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}" if n else "none yet"
