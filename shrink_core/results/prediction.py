"""Predicted against measured, per slice: the table the Plan page shows after "Run this plan" and `eval --plan` prints.

Predicted: the additive sum of one-module-at-a-time scan scores (`plan/predict.py`) for the plan's settings.
Measured: the candidate's stored evaluation against the reference's, on the same slice and protocol.
"""
from __future__ import annotations

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
        predictions = predict(settings_by_module(resolved), score_table(records, "dnll"), list(measured), "dnll")
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
