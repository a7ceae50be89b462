"""One evaluation run, end to end: load, apply a plan (if any), evaluate against the reference, store.

The CLI calls `run_eval` inline; the Eval sets page runs `eval_job` in a worker. Same code path, same records.
Every stored result carries its figure key (evaluation/protocol.py) and the calibration recipe of its weights; a
reference result is reused only when its key equals the key this code would write.
"""
from __future__ import annotations

import copy
import time

from shrink_core import __version__
from shrink_core.evaluation.calibration import plan_calibration
from shrink_core.evaluation.evaluate import SliceResult, evaluate, get_protocol
from shrink_core.evaluation.protocol import PROTOCOL_VERSION, eval_key, figure_key
from shrink_core.evaluation.slices import get_slice
from shrink_core.model.describe import device_label
from shrink_core.model.load import load
from shrink_core.results.store import Provenance, Store


def eval_payload(loaded, info, result: SliceResult, budget: str, plan: dict | None = None,
                 calibration: dict | None = None) -> dict:
    """What is stored for one slice's result: its figures and per-item arrays, the calibration recipe that made the
    weights (None: uncalibrated), and the key that a later run compares before reusing it."""
    return {**result.to_dict(with_items=True), "calibration": calibration,
            "figure_key": eval_key(loaded.weights_hash, info, budget, plan, calibration)}


def size_key(loaded, plan: dict) -> str:
    """The key of a packed-size record: the model's weights and the plan (bytes do not depend on calibration)."""
    return size_key_for(loaded.weights_hash, plan)


def size_key_for(weights_hash: str, plan: dict) -> str:
    return figure_key("size", weights_hash=weights_hash, protocol={}, plan=plan)


def reference_results(store: Store, loaded, slice_ids: list[str], budget: str, progress=None,
                      on_result=None, job_id: int | None = None) -> dict[str, SliceResult]:
    """The unplanned model's results, reused from the store only when their figure key equals today's (same weights,
    slice content, budget and protocol version). Each fresh slice is stored as soon as it is scored, and
    `on_result(result)` is called per slice (reused ones first), so a page can show it while the rest run."""
    on_result = on_result or (lambda result: None)
    out, missing = {}, []
    for slice_id in slice_ids:
        payload = stored_reference(store, loaded.spec.raw, loaded.weights_hash, slice_id, budget)
        if payload is not None:
            out[slice_id] = SliceResult.from_dict(payload)
            on_result(out[slice_id])
        else:
            missing.append(slice_id)
    candidate_id = reference_candidate(store, loaded) if missing else None
    for index, slice_id in enumerate(missing):
        def sub(fraction, message="", _i=index):
            if progress:
                progress((_i + fraction) / len(missing), message)
        info = get_slice(slice_id)
        result = evaluate(loaded.model, loaded.tokenizer, [info], budget, progress=sub)[0]
        store.add_result("eval", _provenance(loaded, None, result.slice, budget),
                         eval_payload(loaded, info, result, budget), candidate_id=candidate_id, job_id=job_id)
        out[slice_id] = result
        on_result(result)
    return {s: out[s] for s in slice_ids}


def stored_reference(store: Store, spec: str, weights_hash: str, slice_id: str, budget: str) -> dict | None:
    """The stored payload of the unplanned model on a slice, when its figure key equals the one this code writes."""
    key = eval_key(weights_hash, get_slice(slice_id), budget)
    rows = store.results("eval", model_spec=spec, weights_hash=weights_hash, slice=slice_id, budget=budget)
    match = next((r for r in rows if r["plan"] is None and r["payload"].get("figure_key") == key), None)
    return None if match is None else match["payload"]


def reference_candidate(store: Store, loaded) -> int:
    from shrink_core.perf.workload import describe_model

    return reference_candidate_for(store, loaded.spec.raw, loaded.weights_hash, device_label(loaded.model),
                                   lambda: describe_model(loaded.model, name="reference"))


def reference_candidate_for(store: Store, spec: str, weights_hash: str, device: str, workload) -> int:
    """The unplanned model's candidate row, with its projection on first use; `workload` is the reference's
    Workload, or a function that makes it (only called when the projection is missing)."""
    candidate_id = store.upsert_candidate(name=f"{spec} (reference)", kind="reference", model_spec=spec,
                                          weights_hash=weights_hash, code_version=__version__)
    if not store.results("projection", candidate_id=candidate_id):
        workload = workload() if callable(workload) else workload
        store.add_result("projection", Provenance(spec, weights_hash, __version__, device),
                         projection_payload(workload), candidate_id=candidate_id)
    return candidate_id


def projection_payload(workload, rows=None, batch: int = 1) -> dict:
    """The roofline's decode latency (and cost, where the row has a price) on every hardware row of the table:
    projected, never measured; each entry carries the row it was projected for."""
    from shrink_core.perf.cost import cost_estimate
    from shrink_core.perf.hardware import DEFAULT_ROWS
    from shrink_core.perf.roofline import project

    projected, cost = [], []
    for row in rows or DEFAULT_ROWS:
        if row.name == "this-machine":  # a placeholder until `measure` calibrates it here
            continue
        p = project(workload, row, batch)
        projected.append({**p.to_dict(), "hardware": row.to_dict()})
        if row.price_per_hour is not None:
            cost.append(cost_estimate(row.name, row.price_per_hour, p.prefill_tokens_per_s, p.decode_tokens_per_s,
                                      batch, "projected").to_dict())
    return {"source": "projected (roofline), not measured", "weight_source": workload.weight_source,
            "projected": projected, "cost": cost}


def candidate_workload(model, apply_report, name: str = ""):
    """The workload of a planned model as the plan engine stored it (formats, packed bytes, sparse patterns)."""
    from shrink_core.perf.workload import describe_model

    now = apply_report.current_names or {}
    bits = {now.get(n, n): q.weight_format() for n, q in apply_report.quant_states.items()}
    packed = {now.get(m.name, m.name): m.packed_bytes for m in apply_report.modules if m.new_shape != (0, 0)}
    sparse = {now.get(m.name, m.name): "2:4" if m.sparse_format.startswith("2:4") else "unstructured"
              for m in apply_report.modules if m.sparse_format}
    return describe_model(model, bits, name, packed, sparse)


def store_projection(store: Store, loaded, candidate_id: int, workload, plan_dict: dict | None = None) -> int:
    return store.add_result("projection", _provenance(loaded, plan_dict, None, None), projection_payload(workload),
                            candidate_id=candidate_id)


def plan_kind(plan) -> str:
    quantizes = any(r.weights is not None for r in plan.rules)
    prunes = any(r.prune is not None for r in plan.rules)
    return "mixed" if quantizes and prunes else "pruned" if prunes else "quantized"


def _provenance(loaded, plan_dict, slice_id, budget) -> Provenance:
    return Provenance(loaded.spec.raw, loaded.weights_hash, __version__, device_label(loaded.model), plan=plan_dict,
                      slice=slice_id, budget=budget)


def apply_shape(plan_text: str) -> tuple[tuple[int, int] | None, bool, tuple[int, int] | None]:
    """What applying a plan costs in the memory model's terms: its calibration (sequences, length) or None, whether
    a sequential method (gptq-seq) runs, and its end-to-end tuning's step (sequences, length) or None."""
    from shrink_core.evaluation.calibration import recipe_for
    from shrink_core.plan import load_plan
    from shrink_core.plan.spec import SEQUENTIAL_METHODS

    plan = load_plan(plan_text)
    if not plan.needs_calibration:
        return None, False, None
    recipe = recipe_for(plan)
    sequential = any(r.weights is not None and r.weights.method in SEQUENTIAL_METHODS for r in plan.rules)
    tune = None if plan.tune is None else (plan.tune.batch, recipe.seq_len)
    return (recipe.n_sequences, recipe.seq_len), sequential, tune


def admit_eval(description: dict | None, loaded, budget: str, plan_text: str | None):
    """Refuse, before any work, an evaluation that will not fit in memory (one sentence, what would fit)."""
    from shrink_core.perf import footprint

    if description is None and loaded is None:
        return None  # a model never described here: nothing to predict from before loading it
    facts = footprint.facts_from_description(description) if description else footprint.facts_from_model(
        loaded.model)
    batch = get_protocol(budget).max_batch_tokens
    calibration, sequential, tune = apply_shape(plan_text) if plan_text else (None, False, None)

    def make(f):
        need = footprint.evaluation(f, batch, reference=bool(plan_text))
        if plan_text:  # the candidate is made beside the reference: the larger of the two phases counts
            applying = footprint.apply(f, calibration, sequential=sequential, tune=tune)
            applying.parts["reference weights"] = f.params * f.dtype_bytes
            need = max(need, applying, key=lambda x: x.total)
        return need

    return footprint.admit(make, facts, loaded=description is None)


def run_eval(spec: str, slice_ids: list[str], budget: str = "fast", plan_text: str | None = None,
             store: Store | None = None, progress=None, job_id: int | None = None, loaded=None, part=None,
             **load_flags) -> dict:
    """Evaluate a model (and a plan applied to it) on slices; returns the JSON the CLI prints.

    Each slice's result is stored as soon as it is done and `part(slice_id, entry)` is called then, so pages and the
    CLI's JSON lines show it while the others run, and a cancel keeps it. With a plan, each slice runs the reference
    (unless stored) and then the candidate before the next slice starts.
    loaded: the model already loaded from `spec` (the CLI keeps it for the predicted-vs-measured table)."""
    progress = progress or (lambda fraction, message="": None)
    part = part or (lambda slice_id, entry: None)
    get_protocol(budget)
    slices = [get_slice(s) for s in slice_ids]  # fail on a bad slice before loading anything
    store = store or Store()
    started = time.perf_counter()
    admit_eval(store.latest_model(spec) if loaded is None else None, loaded, budget, plan_text)
    progress(0.01, "loading model")
    loaded = loaded or load(spec, **load_flags)
    report = {"model": loaded.spec.raw, "weights_hash": loaded.weights_hash, "budget": budget, "plan": None,
              "device": device_label(loaded.model), "code_version": __version__, "protocol_version": PROTOCOL_VERSION,
              "slices": {}}
    if plan_text is None:
        def done(result):
            report["slices"][result.slice] = public_entry(result)
            part(result.slice, report["slices"][result.slice])

        reference_results(store, loaded, slice_ids, budget, progress=lambda f, m="": progress(0.05 + 0.95 * f, m),
                          on_result=done, job_id=job_id)
    else:
        from shrink_core.plan import load_plan, plan_to_dict

        plan = load_plan(plan_text)
        progress(0.05, "applying plan")
        candidate, apply_report, recipe = plan_candidate(loaded, plan)
        plan_dict = plan_to_dict(plan)
        report["plan"] = plan_dict
        report["calibration"] = recipe
        report["size"] = dict(apply_report.totals)
        report["apply_notes"] = list(apply_report.notes)  # e.g. a calibrated method that fell back
        candidate_id = store.upsert_candidate(
            name=plan.name or f"{loaded.spec.raw} + plan", kind=plan_kind(plan), model_spec=loaded.spec.raw,
            weights_hash=loaded.weights_hash, code_version=__version__, plan=plan_dict, calibration=recipe,
            parent_id=reference_candidate(store, loaded))
        report["candidate_id"] = candidate_id
        store_projection(store, loaded, candidate_id, candidate_workload(candidate, apply_report, plan.name),
                         plan_dict)
        # Packed size is computed from the plan's storage format (exact bytes), not measured memory.
        store.add_result("size", _provenance(loaded, plan_dict, None, None),
                         {"source": "computed from the packed format", **apply_report.totals,
                          "notes": list(apply_report.notes), "figure_key": size_key(loaded, plan_dict)},
                         job_id=job_id, candidate_id=candidate_id)
        for index, info in enumerate(slices):
            def span(fraction, message, _i=index):
                progress(0.3 + 0.68 * (_i + fraction) / len(slices), message)

            reference = reference_results(store, loaded, [info.id], budget, job_id=job_id,
                                          progress=lambda f, m="": span(0.5 * f, f"reference {m}"))[info.id]
            result = evaluate(candidate, loaded.tokenizer, [info], budget, reference=loaded.model,
                              reference_results={info.id: reference},
                              progress=lambda f, m="": span(0.5 + 0.5 * f, f"candidate {m}"))[0]
            store.add_result("eval", _provenance(loaded, plan_dict, result.slice, budget),
                             eval_payload(loaded, info, result, budget, plan_dict, recipe), job_id=job_id,
                             candidate_id=candidate_id)
            entry = public_entry(result)
            entry["reference_ppl"] = reference.ppl
            if reference.accuracy is not None:
                entry["reference_accuracy"] = reference.accuracy
            report["slices"][result.slice] = entry
            part(result.slice, entry)
    report["seconds"] = round(time.perf_counter() - started, 2)
    progress(1.0, "done")
    return report


def plan_candidate(loaded, plan):
    """(a copy of the model with `plan` applied, the apply report, the calibration recipe as recorded): the weights
    of `eval --plan` and the Plan page's "Run this plan", calibrated exactly as `apply` and `measure` calibrate."""
    from shrink_core.compression.apply import apply_plan_

    candidate = copy.deepcopy(loaded.model)
    calibration, recipe = plan_calibration(plan, loaded.tokenizer)
    return candidate, apply_plan_(candidate, plan, calibration, recipe=recipe, reference=loaded.model), recipe


def public_entry(result: SliceResult) -> dict:
    data = result.to_dict()
    return {k: v for k, v in data.items() if v is not None and v != {}}


def eval_job(ctx, spec: str, slices: list[str], budget: str = "fast", plan: str | None = None) -> dict:
    """Job: the Eval sets page's "Run baseline" (and, with a plan, a candidate evaluation)."""
    ctx.expect_parts(len(slices))
    report = run_eval(spec, slices, budget, plan, store=ctx.store, progress=ctx.progress, job_id=ctx.job_id,
                      part=lambda slice_id, entry: ctx.part_done(slice_id))
    return {"slices": list(report["slices"]), "seconds": report["seconds"], "candidate_id": report.get("candidate_id")}


def standard_mixes_job(ctx, spec: str, slices: list[str], budget: str = "fast",
                       mixes: list | None = None) -> dict:
    """Job: llama-quantize's standard mixes for this model (each with and without an importance matrix by default),
    each stored as a candidate scored on `slices`, so a user's plan is compared with what they would otherwise ship.
    One part per mix; the model loads once."""
    from shrink_core.compression.ggml.standard import STANDARD_MIXES, mix_name, standard_plan
    from shrink_core.model.inventory import inventory, summary
    from shrink_core.plan import dump_plan

    mixes = [tuple(m) for m in (mixes or [(ftype, imatrix) for ftype in STANDARD_MIXES for imatrix in (False, True)])]
    ctx.expect_parts(len(mixes))
    loaded = load(spec)
    rows = inventory(loaded.model)
    facts = summary(loaded.model, rows)
    done = []
    for index, (ftype, imatrix) in enumerate(mixes):
        name = mix_name(ftype, imatrix)

        def step(fraction, message="", index=index, name=name):
            ctx.progress((index + fraction) / len(mixes), f"{name}: {message}")

        report = run_eval(spec, slices, budget, dump_plan(standard_plan(rows, facts, ftype, imatrix)),
                          store=ctx.store, progress=step, job_id=ctx.job_id, loaded=loaded)
        done.append({"mix": name, "candidate_id": report.get("candidate_id")})
        ctx.part_done(name)
    return {"mixes": done, "slices": slices}
