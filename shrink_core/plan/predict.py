"""Predicted impact of a plan from per-module sensitivity scores (additive), shown on every edit.

Additivity ignores interactions between modules; the Plan page shows predicted next to measured once a plan runs.
"""
from __future__ import annotations

from dataclasses import dataclass

from shrink_core.plan.menu import setting_name


@dataclass(frozen=True)
class Prediction:
    slice: str
    metric: str
    value: float  # summed predicted increase over the scored modules
    scored: int  # modules whose setting had a score
    unscored: int  # modules changed by the plan with no score for their setting (not counted in value)


def score_table(records, metric: str) -> dict[tuple[str, str, str], float]:
    """(module, setting, slice) -> value, from sensitivity records (`shrink_core.sensitivity.scan.Record`), listed
    newest first as the store gives them: the newest scan of a key wins, not the oldest."""
    table: dict[tuple[str, str, str], float] = {}
    for r in records:
        if r.metric == metric:
            table.setdefault((r.module, r.setting, r.slice), float(r.value))
    return table


def predict(settings_by_module: dict[str, str], scores: dict[tuple[str, str, str], float], slices: list[str],
            metric: str) -> list[Prediction]:
    """settings_by_module: module -> setting name ("keep" modules cost nothing)."""
    out = []
    for slice_id in slices:
        total, scored, unscored = 0.0, 0, 0
        for module, setting in settings_by_module.items():
            if setting == "keep":
                continue
            key = (module, setting, slice_id)
            if key in scores:
                total += max(scores[key], 0.0)
                scored += 1
            else:
                unscored += 1
        out.append(Prediction(slice_id, metric, total, scored, unscored))
    return out


def settings_by_module(resolved) -> dict[str, str]:
    """module -> menu setting name for a resolved plan; a tied head is scored at its owner, so it is left out."""
    return {r.name: setting_name(r.bits, r.group_size, r.weights.symmetric if r.weights else False, r.keep,
                                 r.weights.ggml if r.weights else None, r.prune,
                                 r.weights.scales if r.weights else "fp16")
            for r in resolved if not r.tied_to}


def scaled_scores(scores: dict[tuple[str, str, str], float],
                  ratios: dict[tuple, float]) -> dict[tuple[str, str, str], float]:
    """The scan's (module, setting, slice) scores with each scaled by a calibrated method's output-error ratio over
    RTN's (`sensitivity/method_error.py`): keyed (module, setting, slice) when taken on each slice's own inputs (a
    method fitted on a mix without code keeps more of RTN's error on code), else (module, setting); 1 where there is
    none."""
    return {(m, s, sl): v * ratios.get((m, s, sl), ratios.get((m, s), 1.0)) for (m, s, sl), v in scores.items()}
