"""Predicted against measured, per slice: the table the Plan page shows after "Run this plan" and `eval --plan` prints.

Predicted: the additive sum of one-module-at-a-time scan scores (`plan/predict.py`) for the plan's settings, scaled
by a calibrated method's stored output-error ratios where the closed loop measured them (`method_ratios.py`).
Measured: the candidate's stored evaluation against the reference's, on the same slice and protocol.
"""
from __future__ import annotations

from dataclasses import dataclass

from shrink_core.evaluation.stats import format_interval
from shrink_core.plan.predict import predict, score_table, settings_by_module


def reference_payloads(store, spec: str, measured: dict[str, dict]) -> dict[str, dict]:
    """slice -> the reference model's stored payload on the protocol each measured result used."""
    reference = {}
    for slice_id, row in measured.items():
        refs = [r for r in store.results("eval", model_spec=spec, slice=slice_id, budget=row["budget"])
                if r["plan"] is None]
        if refs:
            reference[slice_id] = refs[0]["payload"]
    return reference


def predicted_vs_measured(store, spec: str, candidate_id: int, resolved, records) -> list[dict]:
    """One row per measured slice: perplexity with its interval, measured and predicted ΔNLL, KL, top-1 agreement."""
    measured = {r["slice"]: r for r in store.results("eval", candidate_id=candidate_id)}
    reference = reference_payloads(store, spec, measured)
    predicted = {}
    if records:
        predictions = predict(settings_by_module(resolved), _candidate_scores(store, spec, candidate_id, resolved,
                                                                              score_table(records, "dnll")),
                              list(measured), "dnll")
        predicted = {p.slice: p.value for p in predictions if p.scored}
    rows = []
    for slice_id, row in measured.items():
        payload, ref = row["payload"], reference.get(slice_id)
        rows.append({
            "slice": slice_id, "ppl": payload.get("ppl"),
            "ppl_ci": format_interval(payload.get("ppl_ci"), payload.get("items", 0)),
            "reference ppl": ref.get("ppl") if ref else None,
            "measured ΔNLL": payload["nll"] - ref["nll"] if ref and "nll" in payload and "nll" in ref else None,
            "predicted ΔNLL": predicted.get(slice_id),
            "KL": payload.get("kl"), "top-1 agree": payload.get("top1_agree"),
            "protocol": row["budget"], "device": row.get("device"),
        })
    return rows


def _candidate_scores(store, spec: str, candidate_id: int, resolved, scores: dict) -> dict:
    """The scores a candidate's prediction sums: scaled by its method's stored output-error ratios for its calibration
    recipe where the closed loop measured them (`results/method_ratios.py`), else the scan's RTN scores."""
    from shrink_core.errors import ShrinkError
    from shrink_core.evaluation.calibration import recipe_for
    from shrink_core.plan.io import load_plan
    from shrink_core.results.method_ratios import method_score_table, scored_method

    candidate = next((c for c in store.candidates(include_deleted=True) if c["id"] == candidate_id), None)
    if candidate is None or not candidate["plan"]:
        return scores
    try:
        plan = load_plan(candidate["plan"])
    except ShrinkError:  # a stored plan this code no longer reads: no recipe to match ratios with
        return scores
    return method_score_table(store, spec, candidate["weights_hash"], scored_method(plan_method(resolved), plan.rotate),
                              recipe_for(plan).to_dict(), scores)[0]


def plan_method(resolved) -> str | None:
    """The one quantization method of a plan's quantized modules ("rtn", "gptq"); None if it mixes methods, prunes,
    or quantizes nothing (such a plan is not one the interaction model can be fitted on)."""
    if any(r.prune for r in resolved):
        return None
    methods = {r.method for r in resolved if r.method}
    return methods.pop() if len(methods) == 1 else None


@dataclass(frozen=True)
class MeasuredFit:
    model: object  # plan.interactions.InteractionModel
    observations: list  # one dict per (candidate, slice) fitted on
    last: dict | None  # the newest measured plan's worst slice, predicted by a fit without that plan, and measured


def measured_observations(store, spec: str, weights_hash: str, rows, records, method: str, metric: str = "kl",
                          scores: dict | None = None):
    """(candidate id, per-bit-width score sums, measured value, what it is) for each measured slice of this model's
    candidates whose plan uses `method` (a `scored_method`: a rotated or tuned plan's is not the plain method's) on
    menu settings only and whose slices have scores. scores: the table the
    sums are taken over (a calibrated method's scaled scores, `results/method_ratios.py`), else the records'."""
    from shrink_core.errors import ShrinkError
    from shrink_core.plan.interactions import features
    from shrink_core.plan.io import load_plan
    from shrink_core.plan.menu import PLANNER_SETTINGS
    from shrink_core.plan.resolve import resolve
    from shrink_core.results.method_ratios import scored_method

    scores = score_table(records, metric) if scores is None else scores
    for candidate in store.candidates():
        if candidate["model_spec"] != spec or candidate["weights_hash"] != weights_hash or not candidate["plan"]:
            continue
        try:
            plan = load_plan(candidate["plan"])
            resolved = resolve(rows, plan)
        except ShrinkError:  # a plan that does not fit this layout: no evidence about it
            continue
        choice = settings_by_module(resolved)
        if (scored_method(plan_method(resolved), plan.rotate, plan.tune) != method
                or any(s != "keep" and s not in PLANNER_SETTINGS for s in choice.values())):
            continue  # another method, or a format off the menu that no scan scored (fp16, custom)
        for row in store.results("eval", candidate_id=candidate["id"]):
            value = row["payload"].get(metric)
            if value is None:
                continue
            try:
                x = features(choice, scores, row["slice"])
            except KeyError:  # a setting or slice the scan did not score
                continue
            yield candidate["id"], x, float(value), {"candidate": candidate["name"], "slice": row["slice"],
                                                     "measured": float(value), "protocol": row["budget"]}


def fit_measured(store, spec: str, weights_hash: str, rows, records, method: str, metric: str = "kl",
                 scores: dict | None = None) -> MeasuredFit:
    """The interaction model (`plan/interactions.py`) fitted on this model's measured candidates of one method.

    Each measured slice of a candidate (`measured_observations`) is one observation: the scan's score sums per
    bit-width against the measured KL, with its slice (each slice gets its own factor). GPTQ candidates fit their
    own model: the same RTN scan scores, scaled to what GPTQ measured. `last` is the closed loop's error: the newest
    plan predicted by the model fitted on the plans measured before it. scores: the table whose sums are the
    features (as `measured_observations`); what is predicted with the model must be summed over the same table."""
    import numpy as np

    from shrink_core.plan.interactions import InteractionModel, fit

    found = list(measured_observations(store, spec, weights_hash, rows, records, method, metric, scores))
    if not found:
        return MeasuredFit(InteractionModel.additive(), [], None)
    ids = [f[0] for f in found]
    x, y = np.array([f[1] for f in found]), np.array([f[2] for f in found])
    used = [f[3] for f in found]
    slices = [u["slice"] for u in used]
    newest = max(ids)
    mine = np.array([i == newest for i in ids])
    before = (fit(x[~mine], y[~mine], [i for i in ids if i != newest], [s for s, m in zip(slices, mine) if not m])
              if (~mine).any() else InteractionModel.additive())
    predicted = before.predict(x[mine], [s for s, m in zip(slices, mine) if m])
    worst = int(np.argmax(y[mine]))
    newest_used = [u for u, i in zip(used, ids) if i == newest]
    last = {"candidate": newest_used[worst]["candidate"], "slice": newest_used[worst]["slice"],
            "predicted": float(predicted[worst]), "measured": float(y[mine][worst]),
            "error": float((predicted[worst] - y[mine][worst]) / max(y[mine][worst], 1e-9)),
            "fitted_on_plans": before.plans}
    return MeasuredFit(fit(x, y, ids, slices), used, last)
