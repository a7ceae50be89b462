"""The candidate table: every evaluated candidate with its lineage, per-slice quality, size, latency and cost.

Reads the store, returns DataFrames built from small frozen records. A figure that was not measured stays missing
(NaN / None), never zero, and every size, latency and cost carries a label saying how it was obtained.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from shrink_core.errors import ShrinkError
from shrink_core.evaluation.stats import ALPHA, holm_adjust, interval_note
from shrink_core.results.store import Store


@dataclass(frozen=True)
class Performance:
    """One candidate's cost figures for the x axis, each with how it was obtained (None = missing)."""

    memory_bytes: int | None = None
    memory_source: str | None = None
    latency_ms: float | None = None  # measured decode ms/token
    latency_source: str | None = None  # "measured on <device>, <runtime>, <runs> runs, batch <b>"
    projected_ms: float | None = None  # projected decode ms/token on the chosen target
    projected_source: str | None = None  # "projected for <target> (<model>)"
    cost_per_million: float | None = None  # $ per million output tokens on the chosen target
    cost_source: str | None = None


@dataclass(frozen=True)
class CandidateRow:
    id: int
    name: str
    kind: str
    parent_id: int | None
    parent_name: str | None
    model_spec: str
    weights_hash: str
    plan_summary: str
    weight_format: str  # the formats the weights are stored in, and so which runtime can run them as scored
    calibration: str
    budgets: str
    code_version: str
    tags: str
    notes: str
    created: float
    memory_bytes: int | None
    memory_source: str | None
    latency_ms: float | None
    latency_source: str | None
    projected_ms: float | None
    projected_source: str | None
    cost_per_million: float | None
    cost_source: str | None


@dataclass(frozen=True)
class SliceRow:
    candidate_id: int
    name: str
    kind: str
    slice: str
    slice_kind: str
    budget: str
    items: int
    tokens: int
    ppl: float
    ppl_low: float | None  # None (NaN in the frame) below stats.MIN_INTERVAL_ITEMS items
    ppl_high: float | None
    interval_note: str | None  # why there is no interval ("n=3 items: too few for an interval"), else None
    reference_ppl: float | None
    ppl_ratio: float | None
    ratio_low: float | None
    ratio_high: float | None
    ratio_interval: str | None  # how the ratio's interval was obtained
    kl: float | None
    kl_p99: float | None
    top1_agree: float | None
    accuracy: float | None
    acc_low: float | None
    acc_high: float | None
    flips_total: int | None
    flips_lost: int | None
    flips_gained: int | None
    flip_rate: float | None
    device: str
    code_version: str


# ---------------------------------------------------------------- small readers


def get_candidate(store: Store, candidate_id: int) -> dict:
    for row in store.candidates():
        if row["id"] == candidate_id:
            return row
    raise ShrinkError(f"No candidate with id {candidate_id}; see `python -m shrink_core candidates list`.")


def _rules(plan: dict) -> list[tuple[str, str]]:
    """(what a rule selects, what it does) for each rule of a stored plan, readable: blocks as ranges, a name
    pattern that lists modules grouped by blocks (plan/explain.py), never one long alternation."""
    from shrink_core.plan import plan_from_dict
    from shrink_core.plan.explain import action_text, selector_text

    return [(selector_text(rule), action_text(rule)) for rule in plan_from_dict(plan).rules]


def _rotation(plan: dict, words: str) -> list[str]:
    """The stored plan's input rotation and scale tuning as readable items, or none."""
    rotate, tune = plan.get("rotate"), plan.get("tune")
    items = [f"{words} ({rotate.get('kind', 'hadamard')}, seed {rotate.get('seed', 0)})"] if rotate else []
    return items + ([f"scales tuned end to end ({tune.get('steps', 100)} steps)"] if tune else [])


def plan_summary(plan: dict | None) -> str:
    """One line per rule: what it selects and what it does; "unchanged (reference)" without a plan."""
    if plan is None:
        return "unchanged (reference)"
    return "; ".join([f"{what}: {action}" for what, action in _rules(plan)] + _rotation(plan, "inputs rotated"))


def plan_lines(plan: dict | None) -> list[str]:
    """The plan as readable rules, one per line: "kind=q,k,v blocks=[0-5, 9] -> int4 g64 asym rtn"."""
    if plan is None:
        return ["unchanged (reference): weights as loaded"]
    rotated = _rotation(plan, "quantized linears' inputs rotated first")
    return [f"{what} -> {action}" for what, action in _rules(plan)] + rotated or ["no rules: weights as loaded"]


def format_summary(plan: dict | None) -> str:
    """The stored formats a plan's weights take, for a person choosing a runtime: "llama.cpp Q4_K, Q6_K (GGUF
    blocks, quality scored on the exact file values)", "int4 g64 asym (engine packed)", "as loaded"."""
    if plan is None:
        return "as loaded"
    ggml, ints, floats = set(), set(), set()
    for rule in (plan.get("rules") or []):
        weights = rule.get("weights") or {}
        if weights.get("ggml"):
            ggml.add(str(weights["ggml"]).upper())
        elif weights.get("bits") in (16, 32):
            floats.add(f"fp{weights['bits']}")
        elif weights.get("bits"):
            group = weights.get("group_size", 64)
            stored = "" if weights.get("scales", "fp16") == "fp16" else f" {weights['scales']}"
            ints.add(f"int{weights['bits']} {'channel' if group in (None, 'channel') else f'g{group}'}{stored} "
                     f"{'sym' if weights.get('symmetric') else 'asym'}")
    parts = []
    if ggml:
        parts.append(f"llama.cpp {', '.join(sorted(ggml))} (GGUF blocks; quality scored on the file's exact values)")
    if ints and plan.get("rotate"):
        parts.append(f"{', '.join(sorted(ints))} with inputs rotated ({plan['rotate'].get('kind', 'hadamard')}; "
                     "engine packed, a runtime must rotate each layer's input; no GGUF or compressed-tensors)")
    elif ints and any(" log8 " in f for f in ints):
        parts.append(f"{', '.join(sorted(ints))} (engine packed; no compressed-tensors: it stores float scales)")
    elif ints:
        parts.append(f"{', '.join(sorted(ints))} (engine packed; compressed-tensors for int4/int8)")
    if floats:
        parts.append(", ".join(sorted(floats)))
    return "; ".join(parts) or "as loaded (no weight format changed)"


def calibration_summary(calibration: dict | None) -> str:
    if not calibration:
        return "none"
    mix = calibration.get("mix")
    if isinstance(mix, (list, tuple)):
        mix = dict(mix)
    mix_text = ", ".join(f"{k} {float(v):.0%}" for k, v in (mix or {}).items())
    return (f"{mix_text}; {calibration.get('n_sequences', '?')} x {calibration.get('seq_len', '?')} tokens, "
            f"seed {calibration.get('seed', '?')}")


def _measured_entry(payload: dict, is_reference: bool, batch: int) -> dict | None:
    rows = [m for m in payload.get("latency", {}).get("measured", []) if m.get("batch") == batch]
    rows = [m for m in rows if (m.get("candidate") == "reference") == is_reference]
    return rows[0] if rows else None


def performance(store: Store, candidate: dict, target: str | None = None, batch: int = 1) -> Performance:
    """Size (computed), measured latency, projected latency and cost on `target`, from the store; missing stays None."""
    fields: dict = {}
    is_reference = candidate["kind"] == "reference"
    size = store.results("size", candidate_id=candidate["id"])
    if size and size[0]["payload"].get("total_packed_bytes") is not None:
        fields.update(memory_bytes=int(size[0]["payload"]["total_packed_bytes"]),
                      memory_source=size[0]["payload"].get("source", "computed from the packed format"))
    elif is_reference:
        model = store.latest_model(candidate["model_spec"])
        if model and model["weights_hash"] == candidate["weights_hash"] and model["summary"].get("bytes_fp32"):
            fields.update(memory_bytes=int(model["summary"]["bytes_fp32"]),
                          memory_source="fp32 weights, computed from the inventory")
        else:  # a child's packed-size record also counts the unplanned model's dense bytes exactly
            sizes = [r["payload"] for r in store.results("size", model_spec=candidate["model_spec"],
                                                         weights_hash=candidate["weights_hash"])
                     if r["payload"].get("dense_bytes_before") is not None]
            if sizes:
                fields.update(memory_bytes=int(sizes[0]["dense_bytes_before"]),
                              memory_source="dense weights before any plan, computed by the plan engine")
    measures = store.results("measure", candidate_id=candidate["id"])
    if measures:
        payload = measures[0]["payload"]
        if "memory_bytes" not in fields and payload.get("memory", {}).get("weights", {}).get("bytes") is not None:
            weights = payload["memory"]["weights"]
            fields.update(memory_bytes=int(weights["bytes"]), memory_source=f"computed ({weights.get('source', '')})")
        entry = _measured_entry(payload, is_reference, batch)
        if entry and entry.get("decode_ms_per_token", {}).get("median_ms") is not None:
            fields.update(latency_ms=float(entry["decode_ms_per_token"]["median_ms"]),
                          latency_source=f"measured on {entry.get('device', '?')}, {entry.get('runtime', '?')}, "
                                         f"{entry.get('runs', '?')} runs, batch {batch}")
        if target:
            projected = [p for p in payload.get("latency", {}).get("projected", [])
                         if p.get("target") == target and p.get("batch") == batch]
            if projected:
                p = projected[0]
                fields.update(projected_ms=float(p["decode_ms_per_token"]),
                              projected_source=f"projected for {target} ({p.get('model', 'roofline')})")
            costs = [c for c in payload.get("cost", []) if c.get("target") == target]
            if costs:
                c = max(costs, key=lambda c: c.get("batch", 0))
                fields.update(cost_per_million=float(c["output_dollars_per_million"]),
                              cost_source=f"{c.get('kind', 'projected')} for {target}, batch {c.get('batch')}, "
                                          f"${c.get('price_per_hour')}/h at {c.get('utilisation', 0):.0%} utilisation")
    projections = store.results("projection", candidate_id=candidate["id"])
    if target and projections:  # stored when the candidate was created: the roofline, never measured
        payload = projections[0]["payload"]
        projected = [p for p in payload.get("projected", []) if p.get("target") == target and p.get("batch") == batch]
        if projected and "projected_ms" not in fields:
            p = projected[0]
            fields.update(projected_ms=float(p["decode_ms_per_token"]),
                          projected_source=f"projected for {target} ({p.get('model', 'roofline')}), not measured")
        costs = [c for c in payload.get("cost", []) if c.get("target") == target]
        if costs and "cost_per_million" not in fields:
            c = max(costs, key=lambda c: c.get("batch", 0))
            fields.update(cost_per_million=float(c["output_dollars_per_million"]),
                          cost_source=f"projected for {target} (roofline), batch {c.get('batch')}, "
                                      f"${c.get('price_per_hour')}/h at {c.get('utilisation', 0):.0%} utilisation")
    return Performance(**fields)


def targets(store: Store) -> list[str]:
    """Hardware targets that any stored measurement or creation-time projection projected onto."""
    found = {p.get("target") for r in store.results("measure")
             for p in r["payload"].get("latency", {}).get("projected", [])}
    found |= {p.get("target") for r in store.results("projection") for p in r["payload"].get("projected", [])}
    return sorted(t for t in found if t)


# ---------------------------------------------------------------- tables


def candidates_frame(store: Store, target: str | None = None, batch: int = 1, spec: str | None = None) -> pd.DataFrame:
    """One row per (not deleted) candidate: lineage, plan summary, calibration, budgets, size, latency, cost."""
    rows = store.candidates()
    names = {r["id"]: r["name"] for r in store.candidates(include_deleted=True)}
    out = []
    for c in rows:
        if spec and c["model_spec"] != spec:
            continue
        budgets = sorted({r["budget"] for r in store.results("eval", candidate_id=c["id"]) if r["budget"]})
        perf = performance(store, c, target, batch)
        out.append(CandidateRow(
            id=c["id"], name=c["name"], kind=c["kind"], parent_id=c["parent_id"], parent_name=names.get(c["parent_id"]),
            model_spec=c["model_spec"], weights_hash=c["weights_hash"], plan_summary=plan_summary(c["plan"]),
            weight_format=format_summary(c["plan"]),
            calibration=calibration_summary(c["calibration"]), budgets=", ".join(budgets),
            code_version=c["code_version"], tags=c["tags"], notes=c["notes"], created=c["created"], **asdict(perf)))
    columns = [f.name for f in CandidateRow.__dataclass_fields__.values()]
    return pd.DataFrame([asdict(r) for r in out], columns=columns)


def _reference_for(candidates: list[dict], candidate: dict) -> dict | None:
    for c in candidates:
        if (c["kind"] == "reference" and c["model_spec"] == candidate["model_spec"]
                and c["weights_hash"] == candidate["weights_hash"]):
            return c
    return None


def latest_eval(store: Store, candidate_id: int, budget: str | None = None) -> dict[tuple[str, str], dict]:
    """Newest eval result per (slice, budget) of one candidate."""
    latest: dict = {}
    for r in store.results("eval", candidate_id=candidate_id):  # newest first
        if budget is None or r["budget"] == budget:
            latest.setdefault((r["slice"], r["budget"]), r)
    return latest


def ratio_interval(payload: dict, reference: dict | None, is_reference: bool):
    """(low, high, how) of the ppl ratio to the reference: a paired bootstrap over items when both were scored on the
    same items and tokens (the usual case: far tighter than either interval alone), else the candidate's interval
    over the reference's point value. Below stats.MIN_INTERVAL_ITEMS items: (None, None, the reason)."""
    if reference is None:
        return None, None, None
    if is_reference:
        return 1.0, 1.0, "the reference itself"
    too_few = interval_note(payload["items"])
    mine, theirs = payload.get("per_item") or {}, reference.get("per_item") or {}
    if mine.get("ids") and mine.get("ids") == theirs.get("ids") and mine.get("tokens") == theirs.get("tokens"):
        from shrink_core.evaluation.stats import bootstrap_ratio_ci

        diff = np.array(mine["nll"], dtype=float) - np.array(theirs["nll"], dtype=float)
        interval = bootstrap_ratio_ci(diff, np.array(mine["tokens"], dtype=float), transform=np.exp)
        if interval is None:
            return None, None, interval_note(len(diff))
        return interval[0], interval[1], "95% paired bootstrap over items"
    if too_few or not payload.get("ppl_ci"):
        return None, None, too_few or "no interval recorded"
    ref_ppl = reference["ppl"]
    return (payload["ppl_ci"][0] / ref_ppl, payload["ppl_ci"][1] / ref_ppl,
            "candidate's 95% interval over the reference's point value (not paired: different items)")


def slices_frame(store: Store, budget: str | None = None, spec: str | None = None) -> pd.DataFrame:
    """One row per (candidate, slice, budget): quality with intervals, ratios to the reference, KL, flips."""
    candidates = store.candidates()
    out = []
    for c in candidates:
        if spec and c["model_spec"] != spec:
            continue
        reference = _reference_for(candidates, c)
        ref_eval = latest_eval(store, reference["id"], budget) if reference else {}
        is_reference = c["kind"] == "reference"
        for (slice_id, run_budget), r in latest_eval(store, c["id"], budget).items():
            p = r["payload"]
            ref = ref_eval.get((slice_id, run_budget))
            ref_ppl = ref["payload"]["ppl"] if ref else None
            ratio = p["ppl"] / ref_ppl if ref_ppl else None
            low, high, interval = ratio_interval(p, ref["payload"] if ref else None, is_reference)
            flips = p.get("flips") or {}
            has_accuracy = p.get("accuracy") is not None
            if is_reference:  # against itself, by definition
                kl, kl_p99, top1 = 0.0, 0.0, 1.0
                flips = {"total": 0, "lost": 0, "gained": 0} if has_accuracy else {}
            else:
                kl, kl_p99, top1 = p.get("kl"), p.get("kl_p99"), p.get("top1_agree")
            too_few = interval_note(p["items"])  # also blanks intervals stored before there was a minimum
            acc_ci = (None, None) if too_few else p.get("accuracy_ci") or (None, None)
            ppl_ci = (None, None) if too_few else p.get("ppl_ci") or (None, None)
            out.append(SliceRow(
                candidate_id=c["id"], name=c["name"], kind=c["kind"], slice=slice_id, slice_kind=p["kind"],
                budget=run_budget, items=p["items"], tokens=p["tokens"], ppl=p["ppl"], ppl_low=ppl_ci[0],
                ppl_high=ppl_ci[1], interval_note=too_few, reference_ppl=ref_ppl, ppl_ratio=ratio, ratio_low=low,
                ratio_high=high,
                ratio_interval=interval,
                kl=kl, kl_p99=kl_p99, top1_agree=top1, accuracy=p.get("accuracy"), acc_low=acc_ci[0],
                acc_high=acc_ci[1], flips_total=flips.get("total"), flips_lost=flips.get("lost"),
                flips_gained=flips.get("gained"),
                flip_rate=flips["total"] / p["items"] if flips.get("total") is not None and p["items"] else None,
                device=r["device"], code_version=r["code_version"]))
    columns = [f.name for f in SliceRow.__dataclass_fields__.values()]
    return pd.DataFrame([asdict(r) for r in out], columns=columns)


def budgets(store: Store) -> list[str]:
    """Budgets with stored candidate evaluations, most used first."""
    counts: dict[str, int] = {}
    for r in store.results("eval"):
        if r["candidate_id"] is not None and r["budget"]:
            counts[r["budget"]] = counts.get(r["budget"], 0) + 1
    return sorted(counts, key=lambda b: -counts[b])


# ---------------------------------------------------------------- management


def rename(store: Store, candidate_id: int, name: str) -> None:
    get_candidate(store, candidate_id)
    if not name.strip():
        raise ShrinkError("A candidate name cannot be empty.")
    store.update_candidate(candidate_id, name=name.strip())


def set_tags(store: Store, candidate_id: int, tags: list[str] | str) -> str:
    get_candidate(store, candidate_id)
    items = tags.split(",") if isinstance(tags, str) else tags
    text = ",".join(dict.fromkeys(t.strip() for t in items if t.strip()))
    store.update_candidate(candidate_id, tags=text)
    return text


def delete(store: Store, candidate_id: int) -> None:
    """Soft delete: the candidate leaves every list; its results stay in the store for the record."""
    get_candidate(store, candidate_id)
    store.update_candidate(candidate_id, deleted=time.time())


def provenance(store: Store, candidate_id: int) -> dict:
    """Everything needed to say where a candidate came from: lineage, plan, calibration, results' provenance."""
    candidate = get_candidate(store, candidate_id)
    everyone = {c["id"]: c for c in store.candidates(include_deleted=True)}
    lineage, parent = [], candidate["parent_id"]
    while parent is not None and parent in everyone and len(lineage) < 50:
        lineage.append({"id": parent, "name": everyone[parent]["name"], "kind": everyone[parent]["kind"]})
        parent = everyone[parent]["parent_id"]
    results = [{"id": r["id"], "kind": r["kind"], "slice": r["slice"], "budget": r["budget"], "device": r["device"],
                "code_version": r["code_version"], "created": r["created"]}
               for kind in ("eval", "size", "measure") for r in store.results(kind, candidate_id=candidate_id)]
    return {"candidate": {k: candidate[k] for k in ("id", "name", "kind", "model_spec", "weights_hash", "code_version",
                                                     "artifact_dir", "tags", "notes", "created")},
            "lineage": lineage, "plan": candidate["plan"], "calibration": candidate["calibration"], "results": results}


def export_files(store: Store, candidate_id: int) -> dict[str, str]:
    """{"plan.yaml": ..., "provenance.json": ...} for one candidate (the reference has no plan file)."""
    candidate = get_candidate(store, candidate_id)
    files = {"provenance.json": json.dumps(provenance(store, candidate_id), indent=1, default=str)}
    if candidate["plan"] is not None:
        from shrink_core.plan import dump_plan, plan_from_dict

        files["plan.yaml"] = dump_plan(plan_from_dict(candidate["plan"]))
    return files


# ---------------------------------------------------------------- compare


def _slice_result(payload: dict):
    from shrink_core.evaluation.evaluate import SliceResult

    return SliceResult.from_dict(payload)  # a payload also carries its figure key and calibration


def _paired(base: dict, mine: dict) -> dict:
    """Raw paired p-values and flips of `mine` against `base` (two stored eval payloads) on one slice, or why not."""
    from shrink_core.evaluation.evaluate import compare

    a, b = base.get("per_item") or {}, mine.get("per_item") or {}
    if not (a.get("ids") and a.get("ids") == b.get("ids")):
        return {"paired_test": "not paired: different items (budgets or code differ)"}
    test = compare(_slice_result(base), _slice_result(mine))
    return {"nll_p": test["nll_p"], "accuracy_p": test.get("accuracy_p"),
            "flips_vs_baseline": (test.get("flips") or {}).get("total"), "paired_test": "paired over the same items"}


def holm_over_slices(records: list[dict]) -> list[dict]:
    """Adds Holm-adjusted p-values to paired-test records (dicts with candidate_id, slice, nll_p, accuracy_p).

    The family is every test of one candidate against its baseline over the slices shown (NLL and accuracy alike),
    so "significant" (an adjusted p below ALPHA on either test) is corrected for looking at many slices at once.
    Adds nll_p_holm, accuracy_p_holm, significant and holm (what the adjustment ran over); raw p-values stay."""
    keys = ("nll_p", "accuracy_p")
    for cid in dict.fromkeys(r["candidate_id"] for r in records):
        tests = [(r, k) for r in records if r["candidate_id"] == cid for k in keys if _is_p(r.get(k))]
        if not tests:
            continue
        adjusted = holm_adjust([float(r[k]) for r, k in tests])
        slices = {r["slice"] for r, _ in tests}
        label = (f"Holm-adjusted over {len(tests)} test{'s' * (len(tests) > 1)} on {len(slices)} "
                 f"slice{'s' * (len(slices) > 1)}")
        for (record, key), value in zip(tests, adjusted):
            record[f"{key}_holm"] = value
        for record in {id(r): r for r, _ in tests}.values():
            record["significant"] = any(record.get(f"{k}_holm") is not None and record[f"{k}_holm"] < ALPHA
                                        for k in keys)
            record["holm"] = label
    return records


def _is_p(value) -> bool:
    return value is not None and value == value  # not missing, not NaN


def compare_frame(store: Store, candidate_ids: list[int], budget: str) -> pd.DataFrame:
    """Per slice, one row per candidate: quality, delta against the first candidate, paired p-values and flips
    between the two (when both were scored on the same items), KL tail; the first row of each slice is the baseline.
    p-values come raw and Holm-adjusted over each candidate's tests on the slices shown (`holm_over_slices`);
    `significant` uses the adjusted ones."""
    if not 2 <= len(candidate_ids) <= 5:
        raise ShrinkError(f"Compare takes 2 to 5 candidates, not {len(candidate_ids)}.")

    table = slices_frame(store, budget)
    names = {c["id"]: c["name"] for c in store.candidates()}
    evals = {cid: latest_eval(store, get_candidate(store, cid)["id"], budget) for cid in candidate_ids}
    base_id, out = candidate_ids[0], []
    for slice_id in sorted({s for e in evals.values() for s, _ in e}):
        base = evals[base_id].get((slice_id, budget))
        for cid in candidate_ids:
            row = table[(table["candidate_id"] == cid) & (table["slice"] == slice_id)]
            record = {"slice": slice_id, "candidate_id": cid, "name": names.get(cid), "role":
                      "baseline" if cid == base_id else "vs baseline"}
            if row.empty:
                record["paired_test"] = "not evaluated on this slice at this budget"
                out.append(record)
                continue
            r = row.iloc[0]
            record.update({k: r[k] for k in ("ppl", "ppl_low", "ppl_high", "interval_note", "ppl_ratio", "accuracy",
                                              "kl", "kl_p99", "top1_agree", "flips_total")})
            mine = evals[cid].get((slice_id, budget))
            if cid != base_id and base is not None and mine is not None:
                record["delta_ppl"] = mine["payload"]["ppl"] - base["payload"]["ppl"]
                if base["payload"].get("accuracy") is not None and mine["payload"].get("accuracy") is not None:
                    record["delta_accuracy"] = mine["payload"]["accuracy"] - base["payload"]["accuracy"]
                record.update(_paired(base["payload"], mine["payload"]))
            out.append(record)
    holm_over_slices(out)
    order = ["slice", "name", "role", "ppl_ratio", "delta_ppl", "nll_p", "nll_p_holm", "accuracy", "delta_accuracy",
             "accuracy_p", "accuracy_p_holm", "flips_vs_baseline", "significant", "holm", "kl", "kl_p99",
             "top1_agree", "flips_total", "ppl", "ppl_low", "ppl_high", "interval_note", "paired_test", "candidate_id"]
    frame = pd.DataFrame(out)
    return frame[[c for c in order if c in frame.columns]]


def reference_tests(store: Store, budget: str, candidate_ids: list[int] | None = None) -> pd.DataFrame:
    """Per (candidate, slice): paired p-values against the candidate's own reference on the same items, raw and
    Holm-adjusted over that candidate's slices (`holm_over_slices`). The reference itself has no row."""
    candidates = store.candidates()
    out = []
    for c in candidates:
        if c["kind"] == "reference" or (candidate_ids is not None and c["id"] not in candidate_ids):
            continue
        reference = _reference_for(candidates, c)
        ref_eval = latest_eval(store, reference["id"], budget) if reference else {}
        for (slice_id, run_budget), r in sorted(latest_eval(store, c["id"], budget).items()):
            ref = ref_eval.get((slice_id, run_budget))
            if ref is None:
                continue
            record = {"candidate_id": c["id"], "name": c["name"], "slice": slice_id,
                      "ppl_ratio": r["payload"]["ppl"] / ref["payload"]["ppl"]}
            record.update(_paired(ref["payload"], r["payload"]))
            out.append(record)
    holm_over_slices(out)
    order = ["name", "slice", "ppl_ratio", "nll_p", "nll_p_holm", "accuracy_p", "accuracy_p_holm", "flips_vs_baseline",
             "significant", "holm", "paired_test", "candidate_id"]
    frame = pd.DataFrame(out, columns=[c for c in order if any(c in r for r in out)] or order)
    return frame.rename(columns={"flips_vs_baseline": "flips_vs_reference"})


# ---------------------------------------------------------------- what changed


def _inventory(rows: list[dict]):
    from shrink_core.model.inventory import ModuleInfo

    return [ModuleInfo(name=r["name"], block=r["block"], kind=r["kind"],
                       shape=tuple(int(s) for s in str(r["shape"]).split("x") if s), params=r["params"],
                       bytes=r["bytes"], dtype=r["dtype"], tied_to=r.get("tied_to")) for r in rows]


def _module_label(resolved) -> str:
    if resolved.removed:
        return "removed (block)"
    if resolved.rule is None:
        return "unchanged"
    if resolved.keep:
        return f"kept (rule {resolved.rule})"
    parts = [resolved.weights.label() if resolved.weights else "", resolved.prune.label() if resolved.prune else "",
             f"act int{resolved.activation_bits}" if resolved.activation_bits else "",
             f"kv int{resolved.kv_cache_bits}" if resolved.kv_cache_bits else ""]
    return " + ".join(p for p in parts if p) or "unchanged"


def plan_diff(inventory_rows: list[dict], plans: dict[str, dict | None], only_changed: bool = True) -> pd.DataFrame:
    """Layer by layer: what each candidate's plan does to each module (resolved against the model's inventory).

    `plans` maps a column name (the candidate's label) to its plan dict (None = the reference: unchanged). With
    `only_changed`, only modules where the candidates differ are kept."""
    from shrink_core.plan import plan_from_dict, resolve

    modules = _inventory(inventory_rows)
    table = pd.DataFrame({"module": [m.name for m in modules], "block": [m.block for m in modules],
                          "kind": [m.kind for m in modules]})
    for label, plan in plans.items():
        if plan is None:
            table[label] = "unchanged"
            continue
        by_name = {r.name: _module_label(r) for r in resolve(modules, plan_from_dict(plan))}
        table[label] = [by_name.get(m.name, "unchanged") for m in modules]
    if only_changed and len(plans) > 1:
        columns = list(plans)
        table = table[table[columns].nunique(axis=1) > 1]
    return table.reset_index(drop=True)
