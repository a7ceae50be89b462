"""A candidate sweep: plans x slices, each plan applied once and scored on every slice, on the chosen executor.

Units (runtime/executors.py): one `reference` per slice whose unplanned result is not stored yet, one `apply` per plan
(its candidate stays in the worker, or Ray's object store, for its evaluations) and one `eval` per plan x slice. The
units return payloads; this process (the driver) stores each as it arrives, with the same figure keys and provenance
as `eval --plan`, so a sweep's figures are the ones a one-plan evaluation would give on the same weights.
"""
from __future__ import annotations

import os
import platform
import time

from shrink_core import __version__
from shrink_core.errors import ShrinkError
from shrink_core.evaluation.evaluate import SliceResult, evaluate, get_protocol
from shrink_core.evaluation.protocol import eval_key
from shrink_core.evaluation.slices import get_slice
from shrink_core.results.store import Provenance, Store
from shrink_core.runtime.executors import ExecutorConfig, Unit, UnitFailure, UnitRef, failure_sentence, run_units, session

_MODELS: dict = {}  # per worker process: (spec, weights_hash or None) -> the loaded reference, read once per process
_LOADS: dict = {}  # per worker process: spec -> how many times it was loaded here (reported with every unit)


def worker_model(spec: str, weights_hash: str | None = None):
    """The model a unit works on, loaded once per worker process (and checked against the driver's weights)."""
    key = (spec, weights_hash)
    if key not in _MODELS:
        from shrink_core.model.load import load

        _MODELS.clear()  # one model per worker process at a time
        loaded = load(spec)
        _LOADS[spec] = _LOADS.get(spec, 0) + 1
        if weights_hash is not None and loaded.weights_hash != weights_hash:
            raise ShrinkError(f"This worker ({platform.node()}) reads other weights for {spec} "
                              f"({loaded.weights_hash[:12]}, the driver's are {weights_hash[:12]}); every node must "
                              f"see the same model files in the same dtype.")
        _MODELS[key] = loaded
    return _MODELS[key]


def worker_facts(spec: str) -> dict:
    """Where a unit ran, stored beside its figures (`executed`)."""
    from shrink_core.model.describe import device_label

    model = next((m.model for (held, _), m in _MODELS.items() if held == spec), None)
    return {"node": platform.node(), "pid": os.getpid(), "device": device_label(model), "code_version": __version__,
            "model_loads": _LOADS.get(spec, 0)}  # of this spec in this process: 1 when it was read once


def pinned_spec(spec: str) -> str:
    """The spec the workers load: its dtype fixed where the driver is, so a worker that sees a GPU does not turn
    `auto` into bf16 while the driver's figures are fp32 (the store keeps the user's spec). The device is left as
    asked: a worker with a GPU runs `auto` there, in the pinned dtype."""
    from shrink_core.model.load import DTYPES, resolve_dtype, split_device, with_dtype

    base, device = split_device(spec)
    suffix = base.rsplit("#", 1)[1] if "#" in base else "auto"
    if suffix in DTYPES and suffix != "auto":
        return spec
    # a device named outright fixes auto's dtype without being here: a CPU head sends work to GPU workers
    named = {"cpu": "fp32", "mps": "fp32"}.get(device, "bf16" if device.startswith("cuda") else None)
    return with_dtype(spec, named or resolve_dtype("auto"))


# Units: they run in a worker (this process, on the local executor) and return payloads; they never open the store.

def identify_unit(spec: str) -> dict:
    """The model's identity and facts for the driver, which never loads the model itself on Ray."""
    from shrink_core.model.describe import device_label
    from shrink_core.model.inventory import inventory
    from shrink_core.perf.footprint import facts_from_model
    from shrink_core.perf.workload import describe_model

    loaded = worker_model(spec)
    _MODELS[(spec, loaded.weights_hash)] = loaded
    return {"weights_hash": loaded.weights_hash, "device": device_label(loaded.model),
            "facts": facts_from_model(loaded.model), "workload": describe_model(loaded.model, name="reference"),
            "inventory": inventory(loaded.model), "worker": worker_facts(spec)}


def identify(spec: str, executor: ExecutorConfig, progress) -> dict:
    """Run the identify unit (inside a `session`): the driver learns the model without loading it itself."""
    identity: dict = {}
    failures = run_units([Unit("identify", "shrink_core.runtime.sweep:identify_unit", {"spec": spec})], executor,
                         lambda unit, payload: identity.update(payload), lambda f, m="": progress(0.0, m))
    if failures:
        raise ShrinkError(f"The model could not be loaded on a worker: {failures[0].reason}")
    theirs = identity["worker"]["code_version"]
    if theirs != __version__:  # other code would compute other figures under this code's keys
        raise ShrinkError(f"The Ray workers run shrink {theirs} and this driver {__version__}; install the same "
                          f"version on every node.")
    return identity


def reference_unit(spec: str, weights_hash: str, slice_id: str, budget: str) -> dict:
    from shrink_core.model.describe import device_label

    loaded = worker_model(spec, weights_hash)
    started = time.perf_counter()
    result = evaluate(loaded.model, loaded.tokenizer, [get_slice(slice_id)], budget)[0]
    return {"result": result.to_dict(with_items=True), "device": device_label(loaded.model),
            "seconds": time.perf_counter() - started, "worker": worker_facts(spec)}


def apply_unit(spec: str, weights_hash: str, plan_text: str) -> tuple[dict, object]:
    """(what the driver stores about the candidate, the candidate model for this plan's evaluations)."""
    from shrink_core.plan import load_plan
    from shrink_core.results.eval_run import candidate_workload, plan_candidate

    loaded = worker_model(spec, weights_hash)
    plan = load_plan(plan_text)
    started = time.perf_counter()
    candidate, report, recipe = plan_candidate(loaded, plan)
    info = {"totals": dict(report.totals), "notes": list(report.notes), "calibration": recipe,
            "workload": candidate_workload(candidate, report, plan.name), "seconds": time.perf_counter() - started,
            "worker": worker_facts(spec)}
    return info, candidate


def eval_unit(spec: str, weights_hash: str, candidate, slice_id: str, budget: str, reference: dict) -> dict:
    from shrink_core.model.describe import device_label

    loaded = worker_model(spec, weights_hash)
    base = SliceResult.from_dict(reference["result"])
    started = time.perf_counter()
    result = evaluate(candidate, loaded.tokenizer, [get_slice(slice_id)], budget, reference=loaded.model,
                      reference_results={slice_id: base})[0]
    return {"result": result.to_dict(with_items=True), "device": device_label(loaded.model),  # as `eval --plan`
            "seconds": time.perf_counter() - started, "worker": worker_facts(spec)}


def plan_unit(spec: str, weights_hash: str, plan_text: str, slice_ids: list[str], budget: str,
              **references: dict) -> dict:
    """A plan applied and scored on every slice in one worker: the candidate never leaves it."""
    info, candidate = apply_unit(spec, weights_hash, plan_text)
    return {"apply": info, "evals": {s: eval_unit(spec, weights_hash, candidate, s, budget, references[f"reference_{i}"])
                                     for i, s in enumerate(slice_ids)}}


# The driver.

SHIP_CANDIDATE_BYTES = 2 << 30  # above this, moving a candidate to each evaluation costs more than it saves

def plan_entries(entries: list[str], spec: str) -> list[tuple[str, str]]:
    """(label, plan text) for each entry: preset:NAME, a plan file or YAML text. Fails on the first bad one. The
    label names the candidate: the plan's name, a file's stem, else what `eval --plan` calls it."""
    from pathlib import Path

    from shrink_core.plan import dump_plan, load_plan

    out, labels = [], set()
    for index, entry in enumerate(entries):
        plan = load_plan(entry)
        one_line = "\n" not in entry and len(entry) < 200
        unnamed = f"{spec} + plan" if len(entries) == 1 else f"{spec} + plan {index + 1}"
        label = plan.name or (Path(entry).stem if one_line and Path(entry).is_file() else unnamed)
        if label in labels:
            raise ShrinkError(f"Two plans of the sweep are both named {label!r}; give each plan its own name.")
        labels.add(label)
        out.append((label, dump_plan(plan)))
    return out


def sweep_units(spec: str, weights_hash: str, plans: list[tuple[str, str]], slice_ids: list[str], budget: str,
                stored_references: dict[str, dict], gpus: float = 0.0, memory: dict | None = None,
                group_by_plan: bool = False) -> list[Unit]:
    """The unit graph: references still missing, then per plan its apply and its evaluations (or, grouped, one
    unit per plan that does both)."""
    memory = memory or {}
    common = {"spec": spec, "weights_hash": weights_hash}
    units = [Unit(f"reference x {s}", "shrink_core.runtime.sweep:reference_unit",
                  {**common, "slice_id": s, "budget": budget}, gpus=gpus, memory_bytes=memory.get("eval"))
             for s in slice_ids if s not in stored_references]
    for label, text in plans:
        if group_by_plan:
            references = {f"reference_{i}": stored_references.get(s) or UnitRef(f"reference x {s}")
                          for i, s in enumerate(slice_ids)}  # keywords: Ray resolves refs only at the top level
            units.append(Unit(label, "shrink_core.runtime.sweep:plan_unit",
                              {**common, "plan_text": text, "slice_ids": slice_ids, "budget": budget, **references},
                              gpus=gpus, memory_bytes=memory.get("apply")))
            continue
        units.append(Unit(f"{label}: apply", "shrink_core.runtime.sweep:apply_unit", {**common, "plan_text": text},
                          outputs=2, gpus=gpus, memory_bytes=memory.get("apply")))
        for s in slice_ids:
            reference = stored_references.get(s) or UnitRef(f"reference x {s}")
            units.append(Unit(f"{label} x {s}", "shrink_core.runtime.sweep:eval_unit",
                              {**common, "candidate": UnitRef(f"{label}: apply", 1), "slice_id": s, "budget": budget,
                               "reference": reference}, gpus=gpus, memory_bytes=memory.get("eval")))
    return units


def _memory(facts, budget: str, plans: list[tuple[str, str]]) -> dict:
    """Each unit's memory request for Ray, from the memory model (perf/footprint.py)."""
    from shrink_core.perf import footprint
    from shrink_core.results.eval_run import apply_shape

    batch = get_protocol(budget).max_batch_tokens
    applying = []
    for _, text in plans:
        calibration, sequential, tune = apply_shape(text)
        applying.append(footprint.apply(facts, calibration, sequential=sequential, tune=tune).total
                        + facts.params * facts.dtype_bytes)  # the reference stays beside the candidate
    return {"eval": footprint.evaluation(facts, batch, reference=True).total, "apply": max(applying, default=0)}


def run_sweep(spec: str, plan_list: list[str], slice_ids: list[str], budget: str = "fast",
              executor: ExecutorConfig | None = None, store: Store | None = None, progress=None, part=None,
              job_id: int | None = None, group_by_plan: bool | None = None) -> dict:
    """Run the sweep and store every result as its unit finishes; returns the report the CLI prints.

    part(name, entry) is called per stored evaluation ("w4g64 x en"). Units that fail are named in one ShrinkError
    at the end, after every other unit has finished and been stored. group_by_plan: one unit per plan (apply, then
    every slice) instead of an apply unit and a unit per slice; None chooses by the model's size on Ray."""
    progress = progress or (lambda fraction, message="": None)
    part = part or (lambda name, entry: None)
    executor = executor or ExecutorConfig()
    get_protocol(budget)
    for s in slice_ids:
        get_slice(s)  # a bad slice fails before anything runs
    plans = plan_entries(plan_list, spec)
    store = store or Store()
    started = time.perf_counter()
    with session(executor):
        report = _sweep(spec, plans, slice_ids, budget, executor, store, progress, part, job_id, group_by_plan)
    report["seconds"] = round(time.perf_counter() - started, 2)
    if report["failed"]:
        raise SweepIncomplete(failure_sentence([UnitFailure(f["unit"], f["reason"]) for f in report["failed"]],
                                               report["units"]), report)
    progress(1.0, "done")
    return report


def _sweep(spec, plans, slice_ids, budget, executor, store, progress, part, job_id, group_by_plan) -> dict:
    from shrink_core.plan import load_plan, plan_to_dict
    from shrink_core.results.eval_run import (
        plan_kind,
        projection_payload,
        public_entry,
        reference_candidate_for,
        size_key_for,
        stored_reference,
    )

    progress(0.0, "loading the model on a worker")
    load_spec = pinned_spec(spec)  # what the workers load; the store keeps `spec`
    identity = identify(load_spec, executor, progress)
    weights_hash = identity["weights_hash"]

    def provenance(device: str, plan: dict | None = None, slice_id: str | None = None) -> Provenance:
        return Provenance(spec, weights_hash, __version__, device, plan=plan, slice=slice_id, budget=budget)

    reference_id = reference_candidate_for(store, spec, weights_hash, identity["device"], identity["workload"])
    references = {s: {"result": payload} for s in slice_ids
                  if (payload := stored_reference(store, spec, weights_hash, s, budget)) is not None}
    gpus = 1.0 if identity["device"].startswith("cuda") else 0.0
    facts = identity["facts"]
    if group_by_plan is None:  # a candidate too big to ship to each evaluation is scored where it was made
        group_by_plan = executor.kind == "ray" and facts.params * facts.dtype_bytes > SHIP_CANDIDATE_BYTES
    units = sweep_units(load_spec, weights_hash, plans, slice_ids, budget, references, gpus,
                        _memory(facts, budget, plans) if executor.kind == "ray" else None, group_by_plan)
    plan_dicts = {label: plan_to_dict(load_plan(text)) for label, text in plans}
    candidates: dict[str, tuple[int, dict | None]] = {}  # label -> (candidate id, calibration recipe)
    plan_texts = dict(plans)
    early: list[tuple[str, str, dict]] = []  # evaluations that arrived before their plan's apply record
    report = {"model": spec, "weights_hash": weights_hash, "budget": budget, "executor": executor.to_dict(),
              "plans": [label for label, _ in plans], "slices": slice_ids, "candidates": {}, "results": {},
              "units": len(units), "workers": set()}

    def executed(payload: dict) -> dict:
        report["workers"].add(f"{payload['worker']['node']}:{payload['worker']['pid']}")
        return {"executor": executor.kind, **payload["worker"], "seconds": round(payload["seconds"], 3)}

    def store_reference(slice_id: str, payload: dict) -> None:
        store.add_result("eval", provenance(payload["device"], None, slice_id),
                         {**payload["result"], "calibration": None, "executed": executed(payload),
                          "figure_key": eval_key(weights_hash, get_slice(slice_id), budget)},
                         candidate_id=reference_id, job_id=job_id)
        report["results"][f"reference x {slice_id}"] = {"ppl": payload["result"]["ppl"]}
        part(f"reference x {slice_id}", report["results"][f"reference x {slice_id}"])

    def store_candidate(label: str, payload: dict) -> None:
        plan_dict = plan_dicts[label]
        candidate_id = store.upsert_candidate(
            name=label, kind=plan_kind(load_plan(plan_texts[label])), model_spec=spec, weights_hash=weights_hash,
            code_version=__version__, plan=plan_dict, calibration=payload["calibration"], parent_id=reference_id)
        candidates[label] = (candidate_id, payload["calibration"])
        report["candidates"][label] = candidate_id
        device = payload["worker"]["device"]
        store.add_result("projection", provenance(device, plan_dict), projection_payload(payload["workload"]),
                         candidate_id=candidate_id)
        # Packed size is computed from the plan's storage format (exact bytes), not measured memory.
        store.add_result("size", provenance(device, plan_dict),
                         {"source": "computed from the packed format", **payload["totals"], "notes": payload["notes"],
                          "figure_key": size_key_for(weights_hash, plan_dict), "executed": executed(payload)},
                         job_id=job_id, candidate_id=candidate_id)
        for waiting in [e for e in early if e[0] == label]:
            early.remove(waiting)
            store_eval(*waiting)

    def store_eval(label: str, slice_id: str, payload: dict) -> None:
        if label not in candidates:  # on Ray an evaluation may arrive before its plan's apply record
            early.append((label, slice_id, payload))
            return
        candidate_id, calibration = candidates[label]
        plan_dict = plan_dicts[label]
        store.add_result("eval", provenance(payload["device"], plan_dict, slice_id),
                         {**payload["result"], "calibration": calibration, "executed": executed(payload),
                          "figure_key": eval_key(weights_hash, get_slice(slice_id), budget, plan_dict, calibration)},
                         job_id=job_id, candidate_id=candidate_id)
        entry = public_entry(SliceResult.from_dict(payload["result"]))
        report["results"][f"{label} x {slice_id}"] = entry
        part(f"{label} x {slice_id}", entry)

    def on_result(unit: Unit, payload: dict) -> None:
        function = unit.function.rsplit(":", 1)[1]
        if function == "reference_unit":
            store_reference(unit.args["slice_id"], payload)
        elif function == "apply_unit":
            store_candidate(unit.key.removesuffix(": apply"), payload)
        elif function == "plan_unit":
            store_candidate(unit.key, payload["apply"])
            for slice_id, evaluation in payload["evals"].items():
                store_eval(unit.key, slice_id, evaluation)
        else:
            label, slice_id = unit.key.rsplit(" x ", 1)
            store_eval(label, slice_id, payload)

    for slice_id, stored in references.items():  # a reference already stored is a part done from the start
        report["results"][f"reference x {slice_id}"] = {"ppl": stored["result"]["ppl"], "reused": True}
        part(f"reference x {slice_id}", report["results"][f"reference x {slice_id}"])
    failures = run_units(units, executor, on_result, progress)
    report["workers"] = sorted(report["workers"])
    report["failed"] = [{"unit": f.key, "reason": f.reason} for f in failures]
    return report


class SweepIncomplete(ShrinkError):
    """Some units failed; the report says which, and what the others stored."""

    def __init__(self, sentence: str, report: dict):
        super().__init__(sentence)
        self.report = report


def sweep_job(ctx, spec: str, plans: list[str], slices: list[str], budget: str = "fast",
              executor: dict | None = None) -> dict:
    """Job: the Results page's sweep. One part per plan x slice evaluation."""
    ctx.expect_parts(len(plans) * len(slices))

    def part(name: str, entry: dict) -> None:
        if not name.startswith("reference x "):
            ctx.part_done(name)

    report = run_sweep(spec, plans, slices, budget, ExecutorConfig.from_dict(executor), store=ctx.store,
                       progress=ctx.progress, part=part, job_id=ctx.job_id)
    return {"candidates": report["candidates"], "seconds": report["seconds"], "workers": report["workers"],
            "executor": report["executor"]}


def eval_job(ctx, spec: str, slices: list[str], budget: str = "fast", plan: str | None = None,
             executor: dict | None = None) -> dict:
    """Job: an evaluation on many slices (the Eval sets page's baseline, the Plan page's "Run this plan") on the
    session's executor. Local: results/eval_run.py's job as before. Ray: the slices are units of a one-plan sweep
    (no plan: the reference units only), with the same figures; one part per slice either way."""
    config = ExecutorConfig.from_dict(executor)
    if config.kind == "local":
        from shrink_core.results.eval_run import eval_job as local_eval_job

        return local_eval_job(ctx, spec, slices, budget, plan)
    ctx.expect_parts(len(slices))

    def part(name: str, entry: dict) -> None:
        if name.startswith("reference x ") == (plan is None):
            ctx.part_done(name.rsplit(" x ", 1)[1])

    report = run_sweep(spec, [plan] if plan else [], slices, budget, config, store=ctx.store, progress=ctx.progress,
                       part=part, job_id=ctx.job_id)
    return {"slices": slices, "seconds": report["seconds"], "candidate_id": next(iter(report["candidates"].values()),
                                                                                  None), "executor": report["executor"]}
