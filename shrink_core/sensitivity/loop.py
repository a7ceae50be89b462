"""The planner's closed loop, as a job: plan with the model fitted on what was measured, run the plan, refit, plan
again (`plan/interactions.closed_loop`); then local steps from the best plan measured (worst-slice objective):
scores re-estimated at that plan applied by its method (`sensitivity/local.py`; a calibrated method's moves are its
own weights), at most K modules moved by the planner, the step run and kept only if the worst slice improved
(`plan/local.local_search`).

With a calibrated method, `method_scores` plans on the scan's RTN scores scaled by the output error the method leaves
over RTN's on each slice's calibration inputs (`sensitivity/method_error.py`): GPTQ removes about three quarters of
RTN's attention error on the slices of its calibration mix and, on SmolLM2, none of down_proj's on a slice outside it
(code, before the default mix had code), so the RTN scan misjudges which slice a GPTQ plan breaks first (docs/plan.md:
at uniform W3 g64's size, 0.715x uniform's worst slice against 0.74x without; 0.68x with code in the mix).
It costs one application of the method per setting before the first round (minutes; not counted in the time
budget), and that weight table is the one the local steps use. The ratios are stored (`results/method_ratios.py`);
once they cover a loop's modules, settings and slices for its method and recipe, every later loop plans on them,
with `method_scores` or without, as the Plan page's prediction and planner do. A draft that rotates its inputs
(`rotate`) is scored as its own method (`method_ratios.scored_method`), RTN included: RTN in the rotated basis errs
differently from the RTN the scan scored, so its ratios are measured and stored apart from the plain method's. The
table applies the draft without its end-to-end tuning (`tune`: 100 training steps per setting would be hours), so a
tuned draft plans on its untuned method's ratios.

Where the rounds are measured (`measure_on`):
- "probe" (the default, minutes): each round's whole plan applied as `run_eval` applies it, its KL against the
  reference on each slice's calibration rows at the scan depth (never the eval rows). Only the plan the loop keeps is
  then run at the evaluation protocol (`run_eval`) and stored as a candidate: the figure that is reported, on text
  the loop never chose on. The fit starts empty (calibration-text KL is not the protocol's figure).
- "protocol": every round run exactly as "Run this plan" runs one, stored as a candidate (Results page); the fit
  starts from every measured plan of this model and method in the store. Many times slower.

Before the rounds the uniform plan under the same budget is measured the same way (`baseline`: every planned module at
the one setting that fits and scores best, `planner.uniform_choice`); it is also the fit's first plan, so round 1
plans on each slice's measured scale. A mixed plan is only worth shipping if it beats
that, and on some models the scan's scores lead the planner to plans that measure worse (Gemma 3 at the bytes of
W3 g64, docs/plan.md): then the loop keeps uniform, and the local steps start from it, so what the loop returns never
measures worse than uniform on the rows it measures on.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from shrink_core.errors import ShrinkError
from shrink_core.evaluation.calibration import recipe_for
from shrink_core.model.arch import model_device
from shrink_core.model.describe import device_label
from shrink_core.model.inventory import modules_from_rows
from shrink_core.perf import footprint
from shrink_core.plan import dump_plan, load_plan, plan_to_dict, resolve
from shrink_core.plan.budget import PlannerBudget, limits, plan_within_budget
from shrink_core.plan.edit import with_rules_first
from shrink_core.plan.interactions import LoopState, closed_loop, features
from shrink_core.plan.local import local_problem, local_search
from shrink_core.plan.planner import build_problem, solution_plan, uniform_choice
from shrink_core.plan.predict import score_table, settings_by_module
from shrink_core.results.method_ratios import method_label, save_ratios, scored_method, stored_ratios
from shrink_core.results.prediction import measured_observations
from shrink_core.results.store import Store
from shrink_core.sensitivity.scan import stored_records


def plan_loop(store: Store, spec: str, slices: list[str], settings: list[str], budget: dict, plan: str,
              method: str = "rtn", objective: str = "worst", pinned: dict | None = None,
              exclude: list[str] | None = None, target: str | None = None, eval_budget: str = "fast",
              rounds: int = 3, time_budget_s: float = 240.0, progress=None, job_id: int | None = None,
              part=None, executor: dict | None = None, local_steps: int = 0, local_changes: int = 40,
              measure_on: str = "probe", baseline: bool = True, method_scores: bool = False) -> dict:
    """Rounds of plan -> run -> refit under one planner budget ({"kind": ..., "value": ...}); `plan` is the draft the
    planner's rules go in front of, `pinned`/`exclude` what the Plan page pins or leaves to hand-written rules.
    `part(name)` is called as each round's candidate is stored, so the Results page has it before the loop ends.
    On the ray executor a protocol run (every round's, or the kept plan's) is a one-plan sweep (its slices are
    units), one Ray for all of them; probe rounds run here."""
    if measure_on not in ("probe", "protocol"):
        raise ShrinkError(f"measure_on is 'probe' or 'protocol', not {measure_on!r}.")
    if method_scores and scored_method(method, load_plan(plan).rotate) == "rtn":
        raise ShrinkError("Scores scaled by the method's own error need a calibrated method (gptq, ...) or rotated "
                          "inputs: with plain rtn the scan's scores are already the method's; untick it or choose a "
                          "calibrated method.")
    from shrink_core.runtime.executors import ExecutorConfig, session

    config = ExecutorConfig.from_dict(executor)
    with session(config):
        return _plan_loop(store, spec, slices, settings, budget, plan, method, objective, pinned, exclude, target,
                          eval_budget, rounds, time_budget_s, progress, job_id, part, config, local_steps, local_changes,
                          measure_on, baseline, method_scores)


def _plan_loop(store, spec, slices, settings, budget, plan, method, objective, pinned, exclude, target, eval_budget,
               rounds, time_budget_s, progress, job_id, part, executor, local_steps, local_changes, measure_on,
               baseline, method_scores) -> dict:
    from shrink_core.model.load import load
    from shrink_core.perf.hardware import get as get_hardware
    from shrink_core.results.eval_run import plan_candidate, run_eval
    from shrink_core.runtime.sweep import run_sweep
    from shrink_core.sensitivity.probe import SCAN_DEPTHS, ProbeCache, calib_tokens, whole_model_kl

    progress = progress or (lambda fraction, message="": None)
    part = part or (lambda name: None)
    described = store.latest_model(spec)
    if described is None:
        raise ShrinkError(f"Load `{spec}` on the Model page first: the loop plans against its modules.")
    rows = modules_from_rows(described["modules"])
    weights_hash = described["weights_hash"]
    records = stored_records(store, spec, weights_hash)
    excluded = set(exclude or [])
    all_scores = score_table(records, "kl")  # every scored module: the fit sees the whole plan that is run
    scores = {k: v for k, v in all_scores.items() if k[1] in settings and k[0] not in excluded}
    if not scores:
        raise ShrinkError("The closed loop needs KL sensitivity scores for these settings: run a scan first.")
    hardware = get_hardware(target) if target else None
    draft = load_plan(plan)
    base_resolved = resolve(rows, draft)
    scored = scored_method(method, draft.rotate)  # what the ratios and the local moves are of
    fitted_as = scored_method(method, draft.rotate, draft.tune)  # the measured plans the fit learns from
    limit = PlannerBudget(budget["kind"], float(budget["value"]), budget.get("low_per_block"))
    # on Ray the workers load it for protocol runs; probe rounds and local steps need it here
    here = (executor.kind == "local" or measure_on == "probe" or (local_steps and objective == "worst")
            or method_scores)
    loaded = load(spec) if here else None
    progress(0.02, "loaded the model" if loaded else f"planning; rounds run on {executor.kind}")
    began = time.perf_counter()
    texts: dict[tuple, str] = {}

    def plan_with(model) -> dict[str, str]:
        problem = build_problem(rows, scores, slices, settings, pinned=pinned, hardware=hardware,
                                model=model if model.fitted else None)
        solution = plan_within_budget(problem, rows, described["summary"], limit, objective=objective,
                                      base_resolved=base_resolved, hardware=hardware).solution
        texts[tuple(sorted(solution.choice.items()))] = plan_to_dict(solution_plan(solution.choice, rows, method))["rules"]
        return solution.choice

    def whole_plan(choice) -> str:
        """The planner's rules in front of the draft: the plan that is run, modules outside the planner included."""
        key = tuple(sorted(choice.items()))
        if key not in texts:  # a local step's choice
            texts[key] = plan_to_dict(solution_plan(choice, rows, method))["rules"]
        return with_rules_first(plan, texts[key], rows=rows)

    def rows_of(choice):
        every = settings_by_module(resolve(rows, load_plan(whole_plan(choice))))
        try:
            return {s: features(every, all_scores, s) for s in slices}
        except KeyError as exc:
            raise ShrinkError(f"The closed loop predicts the whole plan, but there is {exc.args[0]}; scan that "
                              "setting on that slice, or change the draft's rule for that module.") from None

    done: list[dict] = []

    # a step is kept when the worst slice improves: the worst-slice objective's
    local_steps = local_steps if objective == "worst" else 0
    probing = measure_on == "probe"
    total = rounds + baseline + local_steps + probing  # the kept plan's protocol run is the last part
    phase = {"local": False, "rounds": 0, "uniform": None, "round": 0}
    # each slice's calibration rows at the scan depth named like the protocol: probe rounds measure on them and
    # local steps score on them (tokenized once; the references once)
    depth = SCAN_DEPTHS.get(eval_budget, SCAN_DEPTHS["fast"])
    ids = ({s: calib_tokens(loaded.tokenizer, s, depth.calib_sequences, depth.calib_len) for s in slices}
           if loaded is not None else None)
    caches = {s: ProbeCache(loaded.model, ids[s], chunk=depth.chunk) for s in slices} if probing else None
    planned = sorted({m for m, _, _ in scores}, key=[r.name for r in rows].index)
    notes = []
    # RTN's and the calibrated method's weight at every option: built once, for the scaled scores and the local steps
    weights = _MethodWeights(loaded, planned, ["keep", *settings], whole_plan, scored) if loaded is not None else None
    # a calibrated method's ratios are measured once per model, method and recipe (`method_scores`), then read from
    # the store whenever they cover this loop, ticked or not: the Plan page predicts and plans on the same table
    recipe = recipe_for(draft).to_dict()
    stored = stored_ratios(store, spec, weights_hash, scored, recipe) if scored != "rtn" else None
    if stored is not None and not stored.covers(planned, settings, slices):
        stored = None
    if stored is not None:
        notes.append(f"Planned on the scan's scores scaled by {method_label(scored)}'s output error over RTN's, per slice "
                     f"(median ratio {stored.medians(slices)}): the ratios stored "
                     f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(stored.created))} for this model, method and "
                     "calibration recipe, not measured again.")
    elif method_scores:
        refused = table_refusal(loaded.model, planned, len(settings) + 1, method_label(scored),
                                what=f"Planned on the scan's RTN scores, not {method_label(scored)}'s own")
        if refused:
            notes.append(refused)
        else:
            ratios, summary = _method_ratios(weights, rows, ids, progress)
            save_ratios(store, spec, weights_hash, device_label(loaded.model), depth, scored, recipe, ratios,
                        job_id=job_id)
            stored = stored_ratios(store, spec, weights_hash, scored, recipe)
            notes.append(summary)
    if stored is not None:
        mine = set(planned)
        scaled = stored.scaled({k: v for k, v in all_scores.items() if k[0] in mine})
        all_scores.update(scaled)
        scores.update({k: scaled[k] for k in scores if k in scaled})
    started = time.perf_counter()  # the time budget is the rounds' and steps'; the table above is outside it

    def run_protocol(choice, name, where):
        """The plan run at the evaluation protocol and stored as a candidate: (candidate id, slice -> KL)."""
        data = plan_to_dict(load_plan(whole_plan(choice)))
        data["name"] = name
        index = len(done)
        base = 0.05 + 0.9 * index / total

        def step(fraction, message=""):
            progress(base + 0.9 / total * fraction, f"{where}: {message}")

        if executor.kind != "local":
            report = run_sweep(spec, [dump_plan(load_plan(data))], slices, eval_budget, executor, store=store,
                               progress=step, job_id=job_id)
            return report["candidates"][name], {s: report["results"][f"{name} x {s}"].get("kl", np.nan)
                                                for s in slices}
        report = run_eval(spec, slices, eval_budget, dump_plan(load_plan(data)), store=store, progress=step,
                          job_id=job_id, loaded=loaded)
        return report["candidate_id"], {s: report["slices"][s].get("kl", np.nan) for s in slices}

    last = {}

    def applied(choice):
        """The whole plan applied by its method to a copy of the model; the last one is kept (a probe round and
        the local step after it use the same)."""
        key = tuple(sorted(choice.items()))
        if last.get("key") != key:
            last.clear()  # one copy at a time
            last.update(key=key, model=plan_candidate(loaded, load_plan(whole_plan(choice)))[0].eval())
        return last["model"]

    def measure(choice) -> dict[str, float]:
        index = len(done)
        if not (phase["uniform"] or phase["local"]):
            phase["round"] += 1
        label = (f"uniform {phase['uniform']}" if phase["uniform"] else
                 f"local step {index + 1 - phase['rounds']}" if phase["local"] else f"closed loop round {phase['round']}")
        name = f"{label} ({limit.kind} {limit.value:g}, {method})"
        where = (f"uniform {phase['uniform']} under the same budget" if phase["uniform"] else
                 f"local step {index + 1 - phase['rounds']}/{local_steps}" if phase["local"]
                 else f"round {phase['round']}/{rounds}")
        if probing:
            progress(0.05 + 0.9 * index / total, f"{where}: applying the plan, KL on the calibration rows")
            candidate = applied(choice)
            kl = {s: whole_model_kl(caches[s], candidate).kl for s in slices}
            candidate_id = None
        else:
            candidate_id, kl = run_protocol(choice, name, where)
        done.append({"candidate_id": candidate_id, "name": name, "choice": choice})
        part(f"round {index + 1}")
        return kl

    state = LoopState()
    if not probing:  # warm start: every plan of this model and method measured before, at a protocol
        for candidate_id, x, y, used in measured_observations(store, spec, weights_hash, rows, records, fitted_as,
                                                              scores=all_scores):
            state.add(candidate_id, np.array([x]), [y], [used["slice"]])
    # the uniform plan first: the baseline a mixed plan must beat, and the first measured plan the fit learns each
    # slice's scale from, so round 1 already plans on it (on Gemma 3 270M the scan's scale differs fourfold between
    # slices; docs/plan.md)
    uniform, known, out = None, {}, []
    if baseline:
        problem = build_problem(rows, scores, slices, settings, pinned=pinned, hardware=hardware)
        found = uniform_choice(problem, **limits(set(problem.modules), rows, described["summary"], limit,
                                                 base_resolved=base_resolved, hardware=hardware).solve_kwargs)
        if found is None:
            notes.append("No single setting fits this budget, so there is no uniform plan to compare with.")
        else:
            setting, choice = found
            choice = {m: choice[m] for m in problem.modules}
            t0 = time.perf_counter()
            model = state.fit()
            phase["uniform"] = setting
            measured = {s: float(v) for s, v in measure(choice).items() if np.isfinite(float(v))}
            phase["uniform"] = None
            if measured:
                rows_x = rows_of(choice)
                predicted = dict(zip(measured, model.predict(np.array([rows_x[s] for s in measured]),
                                                             list(measured))))
                worst = max(measured.values())
                out.append({"round": 1, "kind": "uniform", "candidate_id": done[-1]["candidate_id"],
                            "name": done[-1]["name"], "predicted_worst": float(max(predicted.values())),
                            "measured_worst": worst, "error": (max(predicted.values()) - worst) / max(worst, 1e-9),
                            "fitted_on_plans": model.plans, "seconds": round(time.perf_counter() - t0, 1)})
                state.add(("uniform", setting), np.array([rows_x[s] for s in measured]), list(measured.values()),
                          list(measured))
                uniform = (setting, choice, measured, done[-1])
                known[tuple(sorted(choice.items()))] = measured
    first_round = len(done)  # the uniform plan's entry, if it was measured, comes before (even with no finite KL)
    loop_rounds, model = closed_loop(plan_with, measure, rows_of, state=state, rounds=rounds,
                                     time_budget_s=max(time_budget_s - (time.perf_counter() - started), 0.0),
                                     known=known)
    measured_rounds = iter(done[first_round:])
    for r in loop_rounds:
        reused = uniform is not None and r.choice == uniform[1]
        stored = uniform[3] if reused else next(measured_rounds)
        if reused:
            notes.append(f"Round {r.index + 1} planned uniform {uniform[0]} itself; its measurement is the uniform "
                         "row's, not repeated.")
            part(f"round {r.index + 1} (uniform)")
        out.append({"round": len(out) + 1, "kind": "fitted", "candidate_id": stored["candidate_id"],
                    "name": stored["name"], "predicted_worst": r.worst_predicted, "measured_worst": r.worst_measured,
                    "error": r.error, "fitted_on_plans": r.model["plans"], "seconds": round(r.seconds, 1)})
    best = min(loop_rounds, key=lambda r: r.worst_measured) if loop_rounds else None
    start = (best.choice, best.measured) if best else None
    if uniform is not None:
        setting, choice, measured, _ = uniform
        worst = max(measured.values())
        if best is None or worst < best.worst_measured:
            if best is not None:
                notes.append(f"Uniform {setting} under the same budget measured better than every planned round "
                             f"({worst:.4f} against {best.worst_measured:.4f}): the scan's scores misled the "
                             "planner here, so the loop keeps uniform"
                             + (" and its local steps start from it." if local_steps else "."))
            start = (choice, measured)
    left = time_budget_s - (time.perf_counter() - started)
    if local_steps and scored != "rtn":  # the method's weight table (`method_option_weights`) must fit
        refused = (table_refusal(loaded.model, planned, len(settings) + 1, method_label(scored))
                   if not weights.built else None)
        if refused:
            notes.append(refused)
            local_steps = 0
    if local_steps and start and left > 0:
        phase.update(local=True, rounds=len(done))
        steps = local_search(
            {m: start[0][m] for m in planned}, start[1],
            _local_scorer(loaded, rows, planned, ["keep", *settings], {s: ids[s] for s in start[1]},
                          footprint.fisher_pass(footprint.facts_from_model(loaded.model), depth.calib_sequences,
                                                depth.calib_len, depth.chunk),
                          pinned, hardware, applied, method, weights),
            measure, limits=limits(set(planned), rows, described["summary"], limit, base_resolved=base_resolved,
                                   hardware=hardware).solve_kwargs,
            steps=local_steps, max_changes=local_changes, time_budget_s=left)
        before = len(out)  # the rounds and the uniform row
        for s, stored in zip(steps, done[phase["rounds"]:]):
            out.append({"round": before + s.index + 1, "kind": "local", "candidate_id": stored["candidate_id"],
                        "name": stored["name"], "predicted_worst": s.worst_predicted, "measured_worst": s.worst_measured,
                        "error": s.error, "max_changes": s.max_changes, "changes": s.changes, "kept": s.accepted,
                        "seconds": round(s.seconds, 1)})
    loop_seconds = time.perf_counter() - started
    if probing and out:
        # the plan kept (the lowest measured worst slice: a refused step measured higher), run at the protocol
        kept = min((r for r in out if r.get("kept", True)), key=lambda r: r["measured_worst"])
        choice = next(d["choice"] for d in done if d["name"] == kept["name"])
        verify_started = time.perf_counter()
        name = f"closed loop result ({limit.kind} {limit.value:g}, {method}; {kept['name'].split(' (')[0]})"
        candidate_id, kl = run_protocol(choice, name, f"the kept plan at the {eval_budget} protocol")
        finite = [v for v in kl.values() if np.isfinite(v)]
        out.append({"round": len(out) + 1, "kind": "verified", "candidate_id": candidate_id, "name": name,
                    "of": kept["name"], "probe_worst": kept["measured_worst"],
                    "measured_worst": max(finite) if finite else np.nan,
                    "seconds": round(time.perf_counter() - verify_started, 1)})
        part("verified")
    progress(1.0, "done")
    return {"rounds": out, "model": model.to_dict(), "seconds": round(time.perf_counter() - began, 1),
            "loop_seconds": round(loop_seconds, 1), "eval_budget": eval_budget, "method": method,
            "measure_on": measure_on, "notes": notes}


def table_refusal(model, planned: list[str], options: int, method: str, what: str = "No local steps") -> str | None:
    """Why a calibrated method's weight table (for its local steps or its own scores: 2 bytes a weight an option)
    cannot be built here (it would take over half the free memory), or None."""
    from shrink_core.perf.footprint import available_bytes

    need = 2 * options * sum(model.get_submodule(m).weight.numel() for m in planned)
    free = available_bytes(str(model_device(model)))  # the table sits where the model does
    if free is None or need <= free // 2:
        return None
    return (f"{what}: {method}'s weight at every setting for each planned module takes {need / 2**30:.2f} GiB, "
            f"over half the {free / 2**30:.2f} GiB free; choose fewer settings.")


class _MethodWeights:
    """The planned modules' originals, RTN's weight at each option (`OptionWeights`: llama.cpp types quantized once,
    in at most a quarter of the free memory) and, built on first use, the calibrated method's weight at each option
    (`method_option_weights`: the whole plan at that option applied by the method, as a round applies it, without
    its end-to-end tuning). method: the `scored_method` (a rotated draft's RTN has a table of its own)."""

    def __init__(self, loaded, planned: list[str], options: list[str], whole_plan, method: str):
        from shrink_core.perf.footprint import available_bytes
        from shrink_core.sensitivity.local import OptionWeights

        self.loaded, self.planned, self.options, self.whole_plan, self.method = (loaded, planned, options, whole_plan,
                                                                                 method)
        self.originals = {m: loaded.model.get_submodule(m).weight.detach() for m in planned}
        free = available_bytes(str(model_device(loaded.model)))  # the weights sit where the model does
        self.rtn = OptionWeights(self.originals, max_bytes=None if free is None else free // 4)
        self._table: dict = {}

    @property
    def built(self) -> bool:
        return bool(self._table)

    def table(self, progress=None) -> dict | None:
        """The method's weights, module -> option -> weight; None for plain rtn (its weights are `rtn`'s)."""
        if self.method == "rtn":
            return None
        if not self._table:
            from shrink_core.compression.apply import apply_plan_
            from shrink_core.evaluation.calibration import plan_calibration
            from shrink_core.sensitivity.local import method_option_weights

            def apply_at(model, option):
                plan = replace(load_plan(self.whole_plan(dict.fromkeys(self.planned, option))), tune=None)
                apply_plan_(model, plan, plan_calibration(plan, self.loaded.tokenizer)[0])

            self._table.update(method_option_weights(self.loaded.model, self.planned, self.options, apply_at,
                                                     progress=progress))
        return self._table


def _method_ratios(weights: _MethodWeights, rows, ids: dict, progress) -> tuple[dict, str]:
    """(module, setting, slice) -> the method's output error over RTN's, a ratio per slice from that slice's
    calibration rows `ids` (`method_error`), and a note that says so with the median ratio per slice."""
    from shrink_core.sensitivity.method_error import slice_ratios

    t0 = time.perf_counter()
    label = method_label(weights.method)
    table = weights.table(lambda i, n, option: progress(
        0.02 + 0.03 * i / n, f"{label} at {option} ({i + 1}/{n}), for the method's own scores"))
    ratios = slice_ratios(weights.loaded.model, rows, weights.originals, table, weights.rtn, weights.options, ids,
                          lambda i, s: progress(0.05, f"{label}'s output error over RTN's on {s}'s "
                                                      f"calibration rows ({i + 1}/{len(ids)})"))
    medians = ", ".join(f"{s} {np.median([r for (_, _, sl), r in ratios.items() if sl == s]):.2f}" for s in ids)
    return ratios, (f"Planned on the scan's scores scaled by {label}'s output error over RTN's, per slice "
                    f"(median ratio {medians}; from each slice's calibration rows): {label} applied once "
                    f"per setting, {time.perf_counter() - t0:.0f} s before the first round. Stored: the Plan page "
                    f"predicts {label} plans from them, and the next loop reuses them.")


def _local_scorer(loaded, rows, planned, options, ids, passes, pinned, hardware, applied, method, weights):
    """scores_at(choice) for `local_search`: the whole plan applied by its method (`applied`, as a round runs it),
    the planned modules' moves scored there on each slice's calibration rows `ids`. A calibrated method's moves are
    its own weights at each option (`weights.table()`, built at the first step unless the scaled scores built it).
    passes: the Fisher pass's (batch, recompute), as the scan runs it (`footprint.fisher_pass`)."""
    from shrink_core.sensitivity.local import local_scores

    slices = list(ids)

    def scores_at(choice):
        # a calibrated method's errors are shaped against the input correlations: the whole Fisher sees them
        local = local_scores(loaded.model, applied(choice), weights.originals, choice, options, ids, batch=passes[0],
                             recompute=passes[1],
                             weights=weights.table(), quadratic="diagonal" if method == "rtn" else "sequence",
                             option_weights=weights.rtn)
        fixed = {**(pinned or {}), **{m: choice[m] for m in local.fixed}}  # unscored here: they stay
        return local_problem(rows, local.deltas, planned, options, slices, pinned=fixed, hardware=hardware)

    return scores_at


def plan_loop_job(ctx, spec: str, slices: list[str], settings: list[str], budget: dict, plan: str, method: str = "rtn",
                  objective: str = "worst", pinned: dict | None = None, exclude: list[str] | None = None,
                  target: str | None = None, eval_budget: str = "fast", rounds: int = 3,
                  time_budget_s: float = 240.0, executor: dict | None = None, local_steps: int = 0,
                  local_changes: int = 40, measure_on: str = "probe", baseline: bool = True,
                  method_scores: bool = False) -> dict:
    """Job: the Plan page's "Plan, run, refit (closed loop)"; a round or local step is a part (it may stop early on
    its budget)."""
    ctx.expect_parts(rounds + baseline + (local_steps if objective == "worst" else 0)
                     + (measure_on == "probe"))
    return plan_loop(ctx.store, spec, slices, settings, budget, plan, method, objective, pinned, exclude, target,
                     eval_budget, rounds, time_budget_s, progress=ctx.progress, job_id=ctx.job_id,
                     part=ctx.part_done, executor=executor, local_steps=local_steps, local_changes=local_changes,
                     measure_on=measure_on, baseline=baseline, method_scores=method_scores)
