"""A calibrated method's output error over RTN's (`sensitivity/method_error.py`), stored per slice so that whatever predicts that
method's plans reads the same figures: the closed loop measures them (`loop.py`, method_scores) and reuses them on its
next run; the Plan page predicts a GPTQ draft, and plans for GPTQ, on the scan's scores scaled by them.

One result row per slice (kind "method_ratios"), keyed like every stored figure (`figure_key`): the model's weights,
the slice's content, the depth of the calibration rows H came from, the scored method (`scored_method`: the method and
the plan's input rotation, if any) and its calibration recipe. Rows
written under another key (other slice text, another recipe, an older code version of the figure) are left out, not
misapplied.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, is_dataclass

import numpy as np

from shrink_core import __version__
from shrink_core.errors import ShrinkError
from shrink_core.evaluation.protocol import figure_key
from shrink_core.evaluation.slices import get_slice
from shrink_core.plan.predict import scaled_scores
from shrink_core.plan.spec import TUNE_KINDS
from shrink_core.results.store import Provenance, Store

KIND = "method_ratios"


def scored_method(method: str | None, rotate=None, tune=None) -> str | None:
    """What a plan's errors are scored as: its quantization method, the input rotation when the plan rotates, and the
    end-to-end tuning when it tunes ('gptq', 'rtn+hadamard:0', 'gptq-seq+hadamard:0+scales:100'). A rotated method's
    error is not the plain one's: on SmolLM2 RTN after the rotation measured 13-66% worse per language
    (docs/methods.md). Tuning lowered the calibrated languages' KL 8-20% and raised one outside the mix 5%. So plain
    RTN is the only method whose errors are the scan's own. The ratios are keyed without `tune` (their table is
    applied untuned); the fitted model learns from the plans of the whole key."""
    if method is None:
        return None
    key = method if rotate is None else f"{method}+{rotate.kind}:{rotate.seed}"
    return key if tune is None else f"{key}+{tune.kind}:{tune.steps}"


def method_label(scored: str | None) -> str:
    """'gptq', 'rtn with rotated inputs (hadamard, seed 0)', 'gptq-seq with scales tuned (100 steps)': a scored
    method as a caption names it."""
    if scored is None or "+" not in scored:
        return str(scored)
    method, *parts = scored.split("+")
    said = []
    for part in parts:
        kind, _, value = part.partition(":")
        said.append(f"{kind} tuned ({value} steps)" if kind in TUNE_KINDS else f"rotated inputs ({kind}, seed {value})")
    return f"{method} with {' and '.join(said)}"


def ratios_key(weights_hash: str, slice_id: str, depth, method: str, calibration: dict) -> str:
    """The figure key of one slice's ratios; depth: the `ScanDepth` (or its fields) whose calibration rows gave H."""
    return figure_key(KIND, weights_hash=weights_hash, protocol={"depth": asdict(depth) if is_dataclass(depth) else depth},
                      slice_info=get_slice(slice_id), calibration=calibration, method=method)


@dataclass(frozen=True)
class StoredRatios:
    """The newest current ratio of each (module, setting, slice) of one method and recipe."""

    method: str
    calibration: dict
    ratios: dict  # (module, setting, slice) -> tr(dW_method H dW_method^T) / tr(dW_rtn H dW_rtn^T)
    created: float  # when the newest row was written (epoch seconds)

    @property
    def slices(self) -> list[str]:
        return sorted({s for _, _, s in self.ratios})

    def covers(self, modules, settings, slices) -> bool:
        """Has a ratio for every quantizing (module, setting, slice) asked for."""
        return all((m, o, s) in self.ratios for m in modules for o in settings if o != "keep" for s in slices)

    def scaled(self, scores: dict) -> dict:
        """The scan's (module, setting, slice) scores, each scaled by its ratio (1, i.e. RTN's, where none)."""
        return scaled_scores(scores, self.ratios)

    def coverage(self, scores: dict) -> tuple[int, int]:
        """(scores with a ratio, scores): how much of a score table these ratios reach."""
        return sum(k in self.ratios for k in scores), len(scores)

    def medians(self, slices=None) -> str:
        """'en 0.55, zh 0.61': the median ratio per slice (of `slices`, else every one stored), for a caption."""
        return ", ".join(f"{s} {np.median([r for (_, _, sl), r in self.ratios.items() if sl == s]):.2f}"
                         for s in (slices or self.slices) if s in self.slices)


def save_ratios(store: Store, spec: str, weights_hash: str, device: str, depth, method: str, calibration: dict,
                ratios: dict, job_id: int | None = None) -> None:
    """Store (module, setting, slice) -> ratio as one row per slice."""
    by_slice: dict[str, dict] = {}
    for (module, setting, slice_id), ratio in ratios.items():
        by_slice.setdefault(slice_id, {}).setdefault(module, {})[setting] = float(ratio)
    for slice_id, values in by_slice.items():
        payload = {"type": "ratios", "method": method, "calibration": calibration, "depth": asdict(depth),
                   "values": values, "figure_key": ratios_key(weights_hash, slice_id, depth, method, calibration)}
        store.add_result(KIND, Provenance(spec, weights_hash, __version__, device, slice=slice_id, budget=depth.name),
                         payload, job_id=job_id)


def stored_ratios(store: Store, spec: str, weights_hash: str, method: str, calibration: dict) -> StoredRatios | None:
    """The current stored ratios of this model, method and calibration recipe (newest first wins), or None. Rows of any
    calibration-row depth count: each is a measurement of the same ratio, on more or fewer rows."""
    ratios, created, keys = {}, 0.0, {}
    for row in store.results(KIND, model_spec=spec, weights_hash=weights_hash):
        p = row["payload"]
        if p.get("method") != method or p.get("calibration") != calibration:
            continue
        inputs = (row["slice"], json.dumps(p.get("depth"), sort_keys=True))
        if inputs not in keys:
            try:
                keys[inputs] = ratios_key(weights_hash, row["slice"], p.get("depth"), method, calibration)
            except ShrinkError:  # a slice that no longer exists
                keys[inputs] = None
        if p.get("figure_key") != keys[inputs]:
            continue
        created = max(created, row["created"])
        for module, by_setting in p["values"].items():
            for setting, ratio in by_setting.items():
                ratios.setdefault((module, setting, row["slice"]), float(ratio))
    return StoredRatios(method, calibration, ratios, created) if ratios else None


def method_score_table(store: Store, spec: str, weights_hash: str, method: str | None, calibration: dict,
                       scores: dict) -> tuple[dict, StoredRatios | None]:
    """The score table to predict (and plan) `method`'s plans on (a `scored_method`): the scan's RTN scores scaled by
    this method's stored ratios for this recipe where there are some, else the scan's own; with the ratios used
    (None: none)."""
    if method in (None, "rtn") or not scores:
        return scores, None
    stored = stored_ratios(store, spec, weights_hash, method, calibration)
    if stored is None:
        return scores, None
    return stored.scaled(scores), stored
