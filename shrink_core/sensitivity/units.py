"""The sensitivity scan split into units for an executor (runtime/executors.py).

Units: one Fisher pass per slice for the fast method (it hooks every block linear in one forward and two backwards:
split by module it would repeat the whole pass), and exhaustive probes per slice x module group (one block's linears;
the embedding decisions; the agreement check's sample). A worker builds a slice's probe cache once and keeps it for
the next unit of that slice. The driver asks the store what is already there, runs only what is missing, and stores
each unit's scores as it arrives, under the keys `run_scan` writes; rows of one key merge on read, so a scan split
this way gives the heatmaps, the planner and the agreement check the records a one-process scan gives.
"""
from __future__ import annotations

import time
from dataclasses import asdict

from shrink_core.errors import ShrinkError
from shrink_core.evaluation.slices import get_slice
from shrink_core.model.inventory import block_linears
from shrink_core.perf import footprint
from shrink_core.results.store import Store
from shrink_core.runtime.executors import ExecutorConfig, Unit, failure_sentence, run_units, session
from shrink_core.runtime.sweep import identify, pinned_spec, worker_facts, worker_model
from shrink_core.sensitivity.probe import ProbeCache, eval_tokens
from shrink_core.sensitivity.scan import (
    EMBEDDING_KINDS,
    METHODS,
    METRICS,
    Agreement,
    ModelId,
    ScanTargets,
    admit_scan,
    cached_values,
    embedding_rows,
    fisher_values,
    get_depth,
    probe_values,
    run_scan,
    sample_modules,
    save_values,
    scan_provenance,
    scores_key,
    select_modules,
    spearman,
)
from shrink_core.sensitivity.settings import get_setting, row_independent

_TARGETS: dict = {}  # per worker process: the model's scan targets and the last slice's probe cache


def _targets(spec: str, weights_hash: str) -> tuple:
    loaded = worker_model(spec, weights_hash)
    if _TARGETS.get("model") is not loaded:
        _TARGETS.clear()
        _TARGETS.update(model=loaded, targets=ScanTargets.of(loaded.model))
    return loaded, _TARGETS["targets"]


def _probe_cache(loaded, slice_id: str, budget: str) -> ProbeCache:
    key = (slice_id, budget)
    if _TARGETS.get("cache_key") != key:
        _TARGETS.pop("cache", None)  # the previous slice's activations go before the next ones are made
        depth = get_depth(budget)
        ids = eval_tokens(loaded.tokenizer, slice_id, depth.sequences, depth.seq_len)
        _TARGETS.update(cache=ProbeCache(loaded.model, ids, depth.chunk), cache_key=key)
    return _TARGETS["cache"]


# Units: they run in a worker and return payloads; they never open the store.

def fisher_unit(spec: str, weights_hash: str, slice_id: str, settings: list[str], budget: str) -> dict:
    loaded, targets = _targets(spec, weights_hash)
    values, seconds, tokens, _ = fisher_values(loaded, targets.modules, slice_id,
                                               [get_setting(s) for s in settings], get_depth(budget), None)
    return {"values": values, "seconds": seconds, "tokens": tokens, "worker": worker_facts(spec)}


def probe_unit(spec: str, weights_hash: str, slice_id: str, settings: list[str], modules: list[str],
               budget: str) -> dict:
    loaded, targets = _targets(spec, weights_hash)
    cache = _probe_cache(loaded, slice_id, budget)
    started = time.perf_counter()
    values = {s: probe_values(cache, targets.probed, targets.blocks, modules, get_setting(s), get_depth(budget))
              for s in settings}
    return {"values": values, "seconds": time.perf_counter() - started, "tokens": cache.tokens,
            "worker": worker_facts(spec)}


# The driver.

def run_scan_units(spec: str, slice_ids: list[str], setting_ids: list[str], method: str = "fast",
                   budget: str = "fast", check: int = 0, executor: ExecutorConfig | None = None,
                   store: Store | None = None, progress=None, part=None, job_id: int | None = None,
                   embeddings: bool = True, modules: str | None = None) -> dict:
    """`run_scan`'s work as units on `executor`. part(slice_id) once every unit of a slice is stored. Units that
    fail are named in one ShrinkError at the end, after the others are stored."""
    progress = progress or (lambda fraction, message="": None)
    part = part or (lambda slice_id: None)
    if method not in METHODS:
        raise ShrinkError(f"Unknown method '{method}'; use fast or exhaustive.")
    depth = get_depth(budget)
    settings = [get_setting(s) for s in setting_ids]
    for slice_id in slice_ids:
        get_slice(slice_id)
    executor = executor or ExecutorConfig()
    store = store or Store()
    started = time.perf_counter()
    with session(executor):
        progress(0.0, "loading the model on a worker")
        load_spec = pinned_spec(spec)  # what the workers load; the store keeps `spec`
        identity = identify(load_spec, executor, progress)
        model = ModelId(spec, identity["weights_hash"], identity["device"])
        every = block_linears(identity["inventory"])  # the fast pass scores them all, as `run_scan` does
        chosen = select_modules(every + embedding_rows(identity["inventory"]), modules, embeddings)
        rows = [r for r in chosen if r.kind not in EMBEDDING_KINDS]
        embedding = [r for r in chosen if r.kind in EMBEDDING_KINDS]
        quantized = [s for s in settings if s.bits is not None]  # masks are not offered for embeddings
        check_setting = next((s for s in settings if s.id == "w3g64"), settings[0])
        sample = sample_modules(every, check) if check and method == "fast" else []
        memory = footprint.scan(identity["facts"], method, (depth.calib_sequences, depth.calib_len),
                                (depth.sequences, depth.seq_len), depth.chunk,
                                not all(row_independent(s) for s in settings)).total
        gpus = 1.0 if identity["device"].startswith("cuda") else 0.0

        def missing(slice_id, chosen_settings, chosen_rows, kind) -> tuple[list[str], list[str]]:
            """(settings with any module missing, the modules missing under any of them) for one unit."""
            want, names = [], set()
            for s in chosen_settings:
                have = cached_values(store, model, slice_id, s, kind, depth)
                lacking = [r.name for r in chosen_rows if r.name not in have]
                if lacking:
                    want.append(s.id)
                    names.update(lacking)
            return want, [r.name for r in chosen_rows if r.name in names]

        units, per_slice = [], dict.fromkeys(slice_ids, 0)
        common = {"spec": load_spec, "weights_hash": model.weights_hash, "budget": budget}
        for slice_id in slice_ids:
            groups = []
            if method == "fast":
                want, _ = missing(slice_id, settings, every, "fast")
                if want:
                    units.append(Unit(f"{slice_id}: fisher", "shrink_core.sensitivity.units:fisher_unit",
                                      {**common, "slice_id": slice_id, "settings": want}, gpus=gpus,
                                      memory_bytes=memory))
                    per_slice[slice_id] += 1
            else:
                for block in sorted({r.block for r in rows}):
                    groups.append((f"block {block}", settings, [r for r in rows if r.block == block]))
            if embedding and quantized:
                groups.append(("embedding", quantized, embedding))
            if sample:
                groups.append(("agreement check", [check_setting], sample))
            for name, chosen_settings, chosen_rows in groups:
                want, names = missing(slice_id, chosen_settings, chosen_rows, "exhaustive")
                if want:
                    units.append(Unit(f"{slice_id}: {name}", "shrink_core.sensitivity.units:probe_unit",
                                      {**common, "slice_id": slice_id, "settings": want, "modules": names},
                                      gpus=gpus, memory_bytes=memory))
                    per_slice[slice_id] += 1

        report = {"model": spec, "weights_hash": model.weights_hash, "method": method, "budget": budget,
                  "executor": executor.to_dict(), "units": len(units), "agreement": [], "workers": set()}

        def finish(slice_id: str) -> None:
            if sample:
                report["agreement"] += _agreement(store, model, slice_id, check_setting, sample, depth, budget,
                                                  job_id)
            part(slice_id)

        for slice_id in slice_ids:
            if per_slice[slice_id] == 0:
                finish(slice_id)  # everything already stored

        def on_result(unit: Unit, payload: dict) -> None:
            slice_id = unit.args["slice_id"]
            kind = "fast" if unit.function.endswith(":fisher_unit") else "exhaustive"
            executed = {"executor": executor.kind, **payload["worker"], "seconds": round(payload["seconds"], 3)}
            report["workers"].add(f"{payload['worker']['node']}:{payload['worker']['pid']}")
            for setting_id, values in payload["values"].items():
                save_values(store, model, slice_id, get_setting(setting_id), kind, depth, values, payload["seconds"],
                            payload["tokens"], job_id, executed)
            per_slice[slice_id] -= 1
            if per_slice[slice_id] == 0:
                finish(slice_id)

        failures = run_units(units, executor, on_result, progress)
    report["workers"] = sorted(report["workers"])
    report["seconds"] = round(time.perf_counter() - started, 2)
    report["failed"] = [{"unit": f.key, "reason": f.reason} for f in failures]
    if failures:
        raise ShrinkError(failure_sentence(failures, len(units)))
    progress(1.0, "done")
    return report


def _agreement(store, model: ModelId, slice_id, setting, sample, depth, budget, job_id) -> list[dict]:
    """The fast-vs-exhaustive Spearman on the sample, from the stored scores, stored as `run_scan` stores it."""
    fast = cached_values(store, model, slice_id, setting, "fast", depth)
    exact = cached_values(store, model, slice_id, setting, "exhaustive", depth)
    out = []
    for metric_index, metric in enumerate(METRICS):
        estimates = [fast[r.name][metric_index] for r in sample]
        measured = [exact[r.name][metric_index] for r in sample]
        agreement = Agreement(slice_id, setting.id, metric, spearman(estimates, measured), len(sample), budget)
        store.add_result("sensitivity", scan_provenance(model, slice_id, budget),
                         {"type": "agreement", "agreement": asdict(agreement),
                          "figure_key": scores_key(model.weights_hash, slice_id, setting, "agreement", depth),
                          "sample": [r.name for r in sample],
                          "pairs": [[r.name, e, m] for r, e, m in zip(sample, estimates, measured)]}, job_id=job_id)
        out.append(asdict(agreement))
    return out


def sensitivity_job(ctx, spec: str, slices: list[str], settings: list[str], method: str = "fast",
                    budget: str = "fast", check: int = 0, executor: dict | None = None) -> dict:
    """Job: the Sensitivity page's scan: `run_scan` in the job's process, or on the ray executor as units (the same
    records)."""
    from shrink_core.model.load import load

    if executor and executor.get("kind") == "ray":
        ctx.expect_parts(len(slices))
        report = run_scan_units(spec, slices, settings, method, budget, check, ExecutorConfig.from_dict(executor),
                                store=ctx.store, progress=ctx.progress, part=ctx.part_done, job_id=ctx.job_id)
        return {"units": report["units"], "seconds": report["seconds"], "workers": report["workers"],
                "executor": report["executor"]}

    description = ctx.store.latest_model(spec)
    if description:  # refuse before loading anything when the scan will not fit in memory
        admit_scan(footprint.facts_from_description(description), method, budget, settings)
    ctx.expect_parts(len(slices))
    ctx.progress(0.01, "loading model")
    loaded = load(spec)
    report = run_scan(loaded, slices, settings, method, budget, check=check, store=ctx.store,
                      progress=lambda f, m="": ctx.progress(0.05 + 0.95 * f, m), job_id=ctx.job_id,
                      part=lambda slice_id, records: ctx.part_done(slice_id))
    return {"records": len(report.records), "computed": report.computed, "reused": report.reused,
            "seconds": report.seconds}
