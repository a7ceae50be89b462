"""The planner against uniform quantization on equal terms: same bytes, same method, the embedding at the same setting
on both sides, so the planner can only win by how it spreads bits over the block linears.

  python bench/bench_fair.py --from bench/results/predict-DATE/plans.jsonl [--sizes w4g128,w4g64,w3g64,3.5]
                             [--methods rtn,gptq] [--loop-rounds 3] [--local-steps 3]
                             [--sequences 24] [--seq-len 256]

--from: a `bench_predict.py collect` file: its scan scores (fast scan, every quantizing menu setting, en fr zh code
  arith) and its measured random plans, on which the interaction model is fitted (the same model weights are checked).
Per size: uniform = every block linear at that setting; the planner gets the block linears' packed bytes of that
  uniform plan (for "3.5": 3.5 bits per block-linear weight, against the largest uniform setting that fits).
  Embedding (tied head) at --embedding on both sides. Three planner variants: additive scores; the fitted interaction
  model; the fitted model plus a closed loop (plan, measure the plan whole with RTN on calibration text, refit, plan
  again); "local": from the best loop plan, local refinement (scores re-estimated at the measured plan itself, at
  most --local-changes modules moved per step, each step measured and kept only if the worst slice improved;
  `plan/local.py`, `sensitivity/local.py`), --local-steps measured steps on the same calibration text;
  "local-uniform": the same local steps (RTN) from the uniform plan itself, so no step is kept unless it measures
  better than uniform on the calibration text; "local-uniform-gptq": the same from uniform with GPTQ's moves and
  measurements as in "local-gptq" (the product's closed loop for a calibrated method, when uniform measures best);
  "local-gptq": the same from the best plan so far (or --local-from's plan), with each plan applied by GPTQ when it
  is measured and scored at, each move's error GPTQ's (`method_option_weights`: the model at each setting by GPTQ)
  and its quadratic term the whole Fisher's (per-sequence gradients: GPTQ's errors sit where the diagonal cannot
  see);
  "loop-gptq": the product's closed loop for a calibrated method: each round's plan applied by GPTQ and measured on
  calibration text, from the scan's sums (no RTN-measured plan in the fit); "gscan-loop": the same loop planning on
  GPTQ's own scan (each block linear moved alone to each setting's GPTQ weight, whole-Fisher scores), its first
  round reported as "gscan"; "rscan-loop": the same loop on the RTN scan with each module-setting's score scaled by
  the layer-output ratio tr(dW_gptq H dW_gptq^T) / tr(dW_rtn H dW_rtn^T) (H from GPTQ's calibration inputs;
  `sensitivity/method_error.py`), its first round "rscan"; "rslice-loop": the same with H from each slice's
  calibration rows, a ratio per slice (a slice outside GPTQ's mix keeps more of RTN's error), its first round "rslice".
  "rslice-uloop": the product's closed loop as it runs with its uniform baseline: uniform measured by GPTQ on the
  calibration rows first, so round 1 plans on that plan's slice factors, then --loop-rounds rounds on rslice's
  scores, at most the first --low-per-block modules a block at 2 bits; uniform is kept when no round beats it on
  the calibration rows; named rslice-uloop<N>.
  "capped": the additive plan with at most --low-per-block modules of one block at 2 bits (`planner.stacking_rows`),
  one plan per cap, named capped<N>; "rslice-capped": the same on rslice's scores; "rslice-sliced-capped": on
  rslice's scores times the slice factors below (GPTQ's per-module error, RTN-measured plans' per-slice compounding).
  "sliced": the additive plan on the scan's scores times one factor per slice, the geometric mean of measured / summed
  KL over the --from file's measured plans (which slice is worst is the scores' per-slice scale); "sliced-capped":
  the same with each --low-per-block cap, named sliced-capped<N>. "fitted-sliced": the product's fitted model (the
  slice factors, then per-bit-width alphas and gamma on the scaled scores); "fitted-sliced-capped": the same with
  each cap, named fitted-sliced-capped<N>. ("fitted" is the model with one scale shared by the slices.)
  --scan-more: menu settings the --from file did not scan (e.g. the 2:4 + format ones), scanned here the same way
  (fast scan, budget fast; the scan's gradients are the same for every setting, so the scores are comparable);
  "fitted-sliced-pruned": "fitted-sliced" with those settings also on the planner's menu (every other variant plans
  without them), so the pair shows what allowing pruning buys at the same bytes (a masked setting counts at its
  sparse format's bytes). A --scan-more setting that --settings also names is on every variant's menu, and in the
  method tables (e.g. w3g32-log8, which the scores files written before 2026-12-05 lack).
  "gfit-capped": the product's fitted model (slice factors, then per-bit-width alphas and gamma) fitted on
  --gfit-plans random plans (bench_predict's draw, seed 3) measured under GPTQ, on rslice's scores, then planned with
  each --low-per-block cap (gfit-capped<N>). Each random plan takes every module's weight from GPTQ's uniform table
  (as the local steps' moves do: a module's inputs those of the model at that setting, not the plan's; the "gfit-check"
  line measures the first plan applied by GPTQ itself beside it) and is measured on --gfit-sequences eval sequences a
  slice after the --sequences the fair figures use, so the fit never sees the rows the plans are judged on and fits
  the eval rows' distribution, not the calibration rows' (on Gemma they rank fr and code the other way round).
  "rotslice" (needs --rotate): the additive plan on the RTN scan scaled per slice by the output error RTN leaves
  under the Hadamard input rotation over plain RTN's (the same ratio as rslice's, the method's weights being RTN's in
  the rotated basis folded back, Q(W R^T) R, in float32), so the plan is chosen on the errors the rotated plan makes.
  --rotate: every plan measured (uniform and planner) and every method weight table applied with the plan's
  Hadamard input rotation (seed 0, `compression/rotate.py`); the scan's scores stay unrotated RTN's.
  --calib-sequences: calibration sequences per slice for all of these. Every plan is applied with the method (RTN
  or GPTQ with the default calibration recipe, or --calibration's mix) and MEASURED on --sequences x --seq-len tokens
  of each slice's eval rows: mean KL(reference || plan) per token, a bootstrap 95% CI over sequences, and the paired
  CI of planner - uniform.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shrink_core.plan.interactions import LoopState, closed_loop, features, fit, slice_factors  # noqa: E402
from shrink_core.plan.menu import MENU, QUANT_SETTINGS  # noqa: E402


def emit(figures: dict) -> None:
    print(json.dumps({**figures, "load_average": [round(x, 2) for x in os.getloadavg()]}), flush=True)


def bootstrap(values: np.ndarray, resamples: int = 2000, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return [round(float(np.percentile(means, 2.5)), 5), round(float(np.percentile(means, 97.5)), 5)]


LOOPED = ("loop", "loop-gptq", "gscan-loop", "rscan-loop", "rslice-loop", "rslice-uloop", "local", "local-gptq", "local-uniform",
          "local-uniform-gptq")
VARIANTS = ("additive", "fitted", "loop", "loop-gptq", "gscan-loop", "rscan-loop", "rslice-loop", "rslice-uloop", "local",
            "local-gptq", "local-uniform", "local-uniform-gptq", "capped", "rslice-capped", "rslice-sliced-capped",
            "sliced", "sliced-capped", "fitted-sliced", "fitted-sliced-capped", "fitted-sliced-pruned", "rotslice",
            "gfit-capped")


def per_sequence_kl(reference, models: dict, ids: torch.Tensor, chunk: int = 2) -> dict[str, np.ndarray]:
    """Mean KL(reference || model) per token of each sequence, for each model, on the same tokens."""
    out = {label: [] for label in models}
    with torch.inference_mode():
        for part in ids.split(chunk):
            ref = torch.log_softmax(reference(part).logits[:, :-1].float(), dim=-1)
            for label, model in models.items():
                logp = torch.log_softmax(model(part).logits[:, :-1].float(), dim=-1)
                out[label].append((ref.exp() * (ref - logp)).sum(-1).clamp_min(0).mean(-1).double().numpy())
    return {label: np.concatenate(parts) for label, parts in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True)
    parser.add_argument("--sizes", default="w4g128,w4g64,w3g64,3.5")
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--embedding", default="w8", help="the embedding's setting on both sides (or keep)")
    parser.add_argument("--variants", default="additive,fitted,loop,local")
    parser.add_argument("--loop-rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=3)
    parser.add_argument("--local-changes", type=int, default=40)
    parser.add_argument("--quadratic", default="diagonal", choices=["diagonal", "sequence"],
                        help="the 'local' variant's second-order term: the Fisher's diagonal or the whole Fisher")
    parser.add_argument("--settings", default="",
                        help="the planner's menu, a subset of the scores file's settings (default: all of them)")
    parser.add_argument("--calib-sequences", type=int, default=8,
                        help="calibration sequences per slice the loops and local steps measure and score on")
    parser.add_argument("--calibration", default=None,
                        help="GPTQ's calibration mix on both sides, e.g. en=0.3,fr=0.1,code=0.1 (default: the default "
                             "recipe's multilingual mix)")
    parser.add_argument("--low-per-block", default="1",
                        help="the capped variants: at most this many modules of a block at 2 bits (a comma list "
                        "plans once per cap)")
    parser.add_argument("--local-from", default="",
                        help="the local and local-gptq variants start from this variant's plan (planned before them "
                        "in --variants, e.g. rslice-sliced-capped0)")
    parser.add_argument("--scan-more", default="",
                        help="settings to scan here: offered to the *-pruned variants, and to every variant where "
                        "--settings names them too")
    parser.add_argument("--rotate", action="store_true",
                        help="apply every plan and method table with a Hadamard input rotation (seed 0)")
    parser.add_argument("--table-cache", default="",
                        help="a folder to keep the method weight tables in (safetensors, keyed by the model's weights, "
                        "the options, the method's recipe and the rotation), so a rerun skips GPTQ's minutes per option; "
                        "empty it after changing the method's code")
    parser.add_argument("--gfit-plans", type=int, default=8,
                        help="the gfit variants: random plans measured under GPTQ to fit the product's model on")
    parser.add_argument("--gfit-sequences", type=int, default=8,
                        help="the gfit variants measure their random plans on this many eval sequences of each slice "
                        "after the --sequences the fair figures use (held out from them)")
    parser.add_argument("--sequences", type=int, default=24)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:  # refused before the model loads (rscan and rslice are the first rounds of their -loop variants)
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}.")
    listed = args.variants.split(",")
    local_variants = ("local", "local-gptq", "local-uniform", "local-uniform-gptq")
    if args.local_from and not any(args.local_from.startswith(v) and v not in local_variants for v in listed):
        raise SystemExit(f"--local-from {args.local_from}: list the variant that plans it before the local one in "
                         "--variants.")
    if "rotslice" in args.variants.split(",") and not args.rotate:
        raise SystemExit("the rotslice variant plans for rotated plans; add --rotate so they are measured rotated.")
    unrotated = sorted(set(args.variants.split(",")) & {"loop", "local", "local-uniform"})
    if args.rotate and unrotated:  # their rounds and steps are RTN probes of the unrotated settings
        raise SystemExit(f"--rotate: {', '.join(unrotated)} measure their rounds unrotated; leave them out.")

    from shrink_core.compression.apply import apply_plan_
    from shrink_core.evaluation.calibration import CalibrationRecipe, calibration_tokens
    from shrink_core.model.inventory import block_linears, inventory
    from shrink_core.model.load import load
    from shrink_core.plan.local import local_problem, local_search
    from shrink_core.plan.planner import build_problem, setting_bytes, solve
    from shrink_core.plan.planner import solution_plan as unrotated_plan
    from shrink_core.plan.spec import RotateSpec
    from shrink_core.sensitivity.local import OptionWeights, local_scores, method_option_weights, set_choice_
    from shrink_core.sensitivity.probe import ProbeCache, calib_tokens, eval_tokens, probe, whole_model_kl
    from shrink_core.sensitivity.scan import embedding_rows

    def solution_plan(choice, rows, method="rtn", name="planner"):
        plan = unrotated_plan(choice, rows, method, name)
        return dataclasses.replace(plan, rotate=RotateSpec()) if args.rotate else plan

    lines = [json.loads(line) for line in Path(args.source).read_text().splitlines()]
    header = lines[0]
    measured_plans = lines[1:]
    loaded = load(header["model"])
    if loaded.weights_hash != header["weights_hash"]:
        raise SystemExit(f"{args.source} was collected on other weights than {header['model']} has now.")
    slices = list(header["slices"])
    scores = {(m, s, sl): v for m, s, sl, v in header["scores_table"]}
    rows = inventory(loaded.model)
    linears = [r.name for r in block_linears(rows)]
    embeddings = [r.name for r in embedding_rows(rows)]
    linear_scores = {k: v for k, v in scores.items() if k[0] in set(linears)}
    settings = list(header["settings"])  # what the scores file scanned (the menu has grown since: llama.cpp types)
    more = [s for s in args.scan_more.split(",") if s]
    if args.settings:  # a --scan-more setting named here joins every variant's menu (scanned below)
        unknown = sorted(set(args.settings.split(",")) - set(settings) - set(more))
        if unknown:
            raise SystemExit(f"{args.source} has no scores for {', '.join(unknown)}; choose from {', '.join(settings)}, "
                             "or scan them here with --scan-more.")
        settings = [s for s in dict.fromkeys(settings + more) if s in args.settings.split(",")]  # once each
    # recomputed from each plan's choice: the bit classes grow with the menu (llama.cpp types added 5-bit)
    if more:
        import tempfile

        from shrink_core.plan.predict import score_table
        from shrink_core.results.store import Store
        from shrink_core.sensitivity.scan import run_scan

        unknown = sorted(set(more) - set(MENU))
        if unknown:
            raise SystemExit(f"--scan-more: unknown setting(s) {', '.join(unknown)}; choose from {', '.join(MENU)}.")
        with tempfile.TemporaryDirectory() as home:
            # the embedding is fixed at --embedding on both sides here, so its exhaustive probes (most of a scan's
            # time) would score choices no variant makes
            report = run_scan(loaded, slices, more, "fast", "fast", store=Store(Path(home) / "shrink.db"),
                              embeddings=False)
        found = {k: v for k, v in score_table(report.records, "kl").items() if k[1] in more}
        scores.update(found)
        linear_scores.update({k: v for k, v in found.items() if k[0] in set(linears)})
        emit({"part": "scan-more", "settings": more, "seconds": report.seconds, "records": len(report.records)})
    x = [features(r["choice"], scores, s) for r in measured_plans for s in slices]
    y = [r["measured"][s] for r in measured_plans for s in slices]
    ids = [r["index"] for r in measured_plans for s in slices]
    slice_of = [s for r in measured_plans for s in slices]
    fitted = fit(np.array(x), np.array(y), ids)  # one scale shared by the slices (the model before slice factors)
    product = fit(np.array(x), np.array(y), ids, slice_of)  # the product's model: slice factors first
    emit({"part": "model", "fitted_on_plans": fitted.plans, "model": fitted.to_dict(), "source": args.source,
          "fitted_sliced": product.to_dict()})

    by_name = {r.name: r for r in rows}
    params = np.array([by_name[m].params for m in linears], dtype=float)
    per_setting = setting_bytes(rows, linears, settings).sum(axis=0)  # uniform block-linear bytes per setting
    embedding_choice = dict.fromkeys(embeddings, args.embedding)
    modules = {m: loaded.model.get_submodule(m) for m in linears + embeddings}
    blocks = {m: (by_name[m].block if by_name[m].block is not None else -1) for m in modules}
    loop_caches = {s: ProbeCache(loaded.model, calib_tokens(loaded.tokenizer, s, args.calib_sequences, 256))
                   for s in slices}
    eval_ids = {s: eval_tokens(loaded.tokenizer, s, args.sequences, args.seq_len) for s in slices}
    recipe = CalibrationRecipe.parse(args.calibration) if args.calibration else CalibrationRecipe()
    calibration = calibration_tokens(loaded.tokenizer, recipe)

    def loop_measure(choice):  # whole plan, RTN as scored, on calibration text (never the eval text)
        full = {**choice, **embedding_choice}
        per_module = {m: MENU[s] for m, s in full.items() if s != "keep"}
        return {s: probe(loop_caches[s], {m: modules[m] for m in per_module}, blocks, per_module).kl for s in slices}

    originals = {m: modules[m].weight.detach().clone() for m in linears + embeddings}
    at_plan = copy.deepcopy(loaded.model)  # the operating point the local scores are taken at
    set_choice_(at_plan, originals, embedding_choice)
    options = ["keep", *settings]

    rtn_weights = OptionWeights(originals)  # llama.cpp types quantized once, not on every pass of every step

    def scores_at(choice):
        set_choice_(at_plan, originals, choice, rtn_weights)
        local = local_scores(loaded.model, at_plan, originals, choice, options,
                             {s: loop_caches[s].ids for s in slices}, quadratic=args.quadratic,
                             option_weights=rtn_weights)
        return local_problem(rows, local.deltas, linears, options, slices)

    gptq = {}  # built on first use: the GPTQ weight table, and the last plan applied by GPTQ (scored where measured)

    def gptq_applied(choice):
        key = tuple(sorted(choice.items()))
        if gptq.get("key") != key:
            model = copy.deepcopy(loaded.model)
            apply_plan_(model, solution_plan({**choice, **embedding_choice}, rows, "gptq"), calibration)
            gptq.update(key=key, model=model.eval())
        return gptq["model"]

    def gptq_measure(choice):  # the whole plan by GPTQ, on calibration text
        model = gptq_applied(choice)
        return {s: whole_model_kl(loop_caches[s], model).kl for s in slices}

    def cached_table(kind, build):
        """method_option_weights, kept under --table-cache: safetensors, one file per model, options, recipe, rotation
        and embedding setting (the tables are applied with the embedding at it). Each option's column is built from
        a uniform plan at that option alone, so a cached table on fewer options gives its columns and only the
        missing options are built (`build(missing)`)."""
        if not args.table_cache:
            return build(options)
        import hashlib

        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        def key_of(opts):
            return json.dumps([kind, loaded.weights_hash, opts, recipe.to_dict(), args.rotate, args.embedding])

        key = key_of(options)
        path = Path(args.table_cache) / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
        if path.exists():
            flat = load_file(str(path))
            return {m: {o: flat[f"{m}|{o}"] for o in options} for m in linears}
        have = {}  # option -> the cached file holding its column, from tables on other option lists
        for other in sorted(Path(args.table_cache).glob(f"{kind}-*.safetensors")):
            with safe_open(str(other), "pt") as f:
                cached = json.loads((f.metadata() or {}).get("key", "null"))
            if cached and len(cached) == 6 and key_of(cached[2]) == json.dumps(cached):
                have.update({o: other for o in cached[2] if o in options and o not in have})
        missing = [o for o in options if o not in have]
        table = build(missing) if missing else {m: {} for m in linears}
        for other in set(have.values()):  # only the columns taken from each file are read
            with safe_open(str(other), "pt") as f:
                for m in linears:
                    table[m].update({o: f.get_tensor(f"{m}|{o}") for o, src in have.items() if src == other})
        emit({"part": "table-cache", "kind": kind, "reused": [o for o in options if o in have], "built": missing})
        table = {m: {o: table[m][o] for o in options} for m in linears}
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"{m}|{o}": w.contiguous() for m, by_option in table.items() for o, w in by_option.items()},
                  str(path), metadata={"key": key})
        return table

    def gptq_table():
        if "table" not in gptq:
            t0 = time.perf_counter()
            gptq["table"] = cached_table("gptq", lambda opts: method_option_weights(
                loaded.model, linears, opts,
                lambda model, option: apply_plan_(model, solution_plan(
                    {**dict.fromkeys(linears, option), **embedding_choice}, rows, "gptq"), calibration)))
            emit({"part": "gptq-table", "options": options, "seconds": round(time.perf_counter() - t0, 1)})
        return gptq["table"]

    def gptq_scores_at(choice):
        local = local_scores(loaded.model, gptq_applied(choice), originals, choice, options,
                             {s: loop_caches[s].ids for s in slices}, weights=gptq_table(), quadratic="sequence")
        return local_problem(rows, local.deltas, linears, options, slices)

    def gptq_scan():
        """The fast scan with GPTQ's errors: each block linear moved alone from the original (the embedding at its
        fixed setting) to each setting's GPTQ weight, scored with the whole Fisher (sequence gradients)."""
        if "scan" not in gptq:
            t0 = time.perf_counter()
            start = dict.fromkeys(linears, "keep")
            at = copy.deepcopy(loaded.model)
            set_choice_(at, originals, embedding_choice)
            local = local_scores(loaded.model, at, originals, start, options, {s: loop_caches[s].ids for s in slices},
                                 weights=gptq_table(), quadratic="sequence")
            del at
            gptq["scan"] = {(m, o, sl): float(local.deltas[k, i, j]) for k, sl in enumerate(slices)
                            for i, m in enumerate(linears) for j, o in enumerate(options) if o != "keep"}
            emit({"part": "gptq-scan", "seconds": round(time.perf_counter() - t0, 1), "tokens": local.tokens})
        return gptq["scan"]

    def rotated_table():  # RTN in the rotated basis, folded back: exact per module, so one uniform apply per option
        if "rot-table" not in gptq:
            t0 = time.perf_counter()
            gptq["rot-table"] = method_option_weights(
                loaded.model, linears, options,
                lambda model, option: apply_plan_(model, solution_plan(
                    {**dict.fromkeys(linears, option), **embedding_choice}, rows, "rtn")), dtype=torch.float32)
            emit({"part": "rotated-table", "options": options, "seconds": round(time.perf_counter() - t0, 1)})
        return gptq["rot-table"]

    def ratio_scan(per_slice=False, rotated=False):
        """The RTN scan's scores, each module-setting scaled by the output error GPTQ (rotated: rotated RTN) leaves
        over RTN's on the calibration inputs (`sensitivity/method_error.py`): the method's weights from its table, H
        from one forward; per_slice: H from each slice's own calibration rows, a ratio per slice."""
        key = ("rot-" if rotated else "") + ("rscan-slice" if per_slice else "rscan")
        if key not in gptq:
            from shrink_core.plan.predict import scaled_scores
            from shrink_core.sensitivity.method_error import slice_ratios

            table = rotated_table() if rotated else gptq_table()
            t0 = time.perf_counter()
            sources = {s: loop_caches[s].ids for s in slices} if per_slice else {None: calibration}
            ratios = slice_ratios(loaded.model, [by_name[m] for m in linears], {m: originals[m] for m in linears},
                                  table, rtn_weights, options, sources)
            by_kind = {}
            for ratio_key, r in ratios.items():
                m, o, sl = ratio_key if per_slice else (*ratio_key, None)
                by_kind.setdefault(str(sl), {}).setdefault(o, {}).setdefault(by_name[m].kind, []).append(r)
            gptq[key] = scaled_scores(linear_scores, ratios)
            spread = {sl: [round(float(np.percentile([r for v in by_option.values() for rs in v.values() for r in rs], q)),
                                 4) for q in (10, 50, 90)] for sl, by_option in by_kind.items()}
            emit({"part": "ratio-scan", "per_slice": per_slice, "rotated": rotated,
                  "seconds": round(time.perf_counter() - t0, 1), "ratio_p10_p50_p90": spread,
                  "median_ratio": {sl: {o: {k: round(float(np.median(v)), 4) for k, v in kinds.items()}
                                        for o, kinds in by_option.items()} for sl, by_option in by_kind.items()}})
        return gptq[key]

    def gfit_model():
        """The product's model fitted on GPTQ-measured random plans (held-out eval rows), on rslice's scores."""
        if "gfit" not in gptq:
            from bench_predict import random_plans

            t0 = time.perf_counter()
            table, gscores = gptq_table(), {**scores, **ratio_scan(True)}
            held = {s: eval_tokens(loaded.tokenizer, s, args.sequences + args.gfit_sequences, args.seq_len)[
                args.sequences:] for s in slices}
            bits = setting_bytes(rows, linears, settings) * 8 / params[:, None]
            drawn = random_plans(linears, bits, settings, args.gfit_plans, seed=3)
            gx, gy, gids, gslices = [], [], [], []
            for i, drawn_plan in enumerate(drawn):
                choice = drawn_plan["choice"]
                model = copy.deepcopy(loaded.model)
                set_choice_(model, originals, embedding_choice)
                set_choice_(model, originals, choice, lambda m, o: table[m][o])
                models = {"table": model.eval()}
                if i == 0:  # how far the table's weights are from GPTQ applying this plan itself
                    exact = copy.deepcopy(loaded.model)
                    apply_plan_(exact, solution_plan({**choice, **embedding_choice}, rows, "gptq"), calibration)
                    models["applied"] = exact.eval()
                kl = {s: per_sequence_kl(loaded.model, models, held[s]) for s in slices}
                measured = {s: float(kl[s]["table"].mean()) for s in slices}
                if i == 0:
                    emit({"part": "gfit-check", "target_bits": drawn_plan["target_bits"],
                          "table": {s: round(v, 5) for s, v in measured.items()},
                          "applied": {s: round(float(kl[s]["applied"].mean()), 5) for s in slices}})
                for s in slices:
                    gx.append(features({**choice, **embedding_choice}, gscores, s))
                    gy.append(measured[s])
                    gids.append(i)
                    gslices.append(s)
                emit({"part": "gfit-plan", "index": i, "target_bits": drawn_plan["target_bits"],
                      "measured": {s: round(v, 5) for s, v in measured.items()},
                      "summed": {s: round(float(gx[-len(slices) + k].sum()), 5) for k, s in enumerate(slices)}})
                del models, model
            gptq["gfit"] = fit(np.array(gx), np.array(gy), gids, gslices)
            emit({"part": "gfit-model", "plans": len(drawn), "model": gptq["gfit"].to_dict(),
                  "seconds": round(time.perf_counter() - t0, 1)})
        return gptq["gfit"]

    def round_rows(rounds):
        return [{"round": r.index, "worst_predicted": round(r.worst_predicted, 5),
                 "worst_measured": round(r.worst_measured, 5), "error": round(r.error, 4),
                 "measured": {sl: round(v, 5) for sl, v in r.measured.items()},
                 "seconds": round(r.seconds, 1)} for r in rounds]

    def rows_of(choice):
        full = {**choice, **embedding_choice}
        return {s: features(full, scores, s) for s in slices}

    for size in args.sizes.split(","):
        if size in QUANT_SETTINGS:
            budget, uniform = float(per_setting[settings.index(size)]), size
        else:
            budget = float(size) * params.sum() / 8
            fits = [s for s in settings if per_setting[settings.index(s)] <= budget]
            uniform = max(fits, key=lambda s: per_setting[settings.index(s)])
        size_label = f"uniform {size}" if size in QUANT_SETTINGS else f"{size} bits per weight (uniform: {uniform})"
        choices, loop_rounds = {}, []

        def plan_with(model, budget=budget, table=linear_scores, cap=None, extra=()):
            problem = build_problem(rows, table, slices, settings + list(extra), model=model)
            return solve(problem, budget_bytes=budget, objective="worst", low_per_block=cap).choice

        started = time.perf_counter()
        for variant in args.variants.split(","):
            t0 = time.perf_counter()
            if variant == "additive":
                choices[variant] = plan_with(None)
            elif variant == "rotslice":
                choices[variant] = plan_with(None, table=ratio_scan(True, rotated=True))
            elif variant == "fitted":
                choices[variant] = plan_with(fitted)
            elif variant == "fitted-sliced-pruned":
                if not more:
                    raise SystemExit("fitted-sliced-pruned needs --scan-more (the settings it may also choose).")
                choices[variant] = plan_with(product, extra=[s for s in more if s not in settings])
            elif variant in ("fitted-sliced", "fitted-sliced-capped"):
                if variant == "fitted-sliced":
                    choices[variant] = plan_with(product)
                for cap in args.low_per_block.split(",") if variant == "fitted-sliced-capped" else []:
                    choices[f"{variant}{cap}"] = plan_with(product, cap=int(cap))
            elif variant in ("sliced", "sliced-capped", "rslice-sliced-capped"):
                factor, _ = slice_factors([xi.sum() for xi in x], y, slice_of)
                emit({"part": "slice-scale", "factor": {s: round(v, 4) for s, v in factor.items()},
                      "plans": len(measured_plans)})
                base = ratio_scan(True) if variant == "rslice-sliced-capped" else linear_scores
                table = {k: v * factor[k[2]] for k, v in base.items()}
                if variant == "sliced":
                    choices[variant] = plan_with(None, table=table)
                for cap in args.low_per_block.split(",") if variant.endswith("-capped") else []:
                    choices[f"{variant}{cap}"] = plan_with(None, table=table, cap=int(cap))
            elif variant == "gfit-capped":
                for cap in args.low_per_block.split(","):
                    choices[f"{variant}{cap}"] = plan_with(gfit_model(), table=ratio_scan(True), cap=int(cap))
            elif variant in ("capped", "rslice-capped"):  # additive, at most --low-per-block 2-bit modules a block
                table = ratio_scan(True) if variant == "rslice-capped" else linear_scores
                for cap in args.low_per_block.split(","):
                    choices[f"{variant}{cap}"] = plan_with(None, table=table, cap=int(cap))
            elif variant == "loop":
                state = LoopState(list(np.array(x)), list(y), list(ids), list(slice_of))
                rounds, _ = closed_loop(plan_with, loop_measure, rows_of, state=state, rounds=args.loop_rounds,
                                        time_budget_s=3600)  # the page's 4 minutes is one Gemma round
                best = min(rounds, key=lambda r: r.worst_measured)
                choices[variant] = best.choice
                loop_rounds = round_rows(rounds)
            elif variant in ("loop-gptq", "gscan-loop", "rscan-loop", "rslice-loop"):
                # the product's loop for a calibrated method: rounds measured with the plan applied by GPTQ, from
                # the additive model (no RTN-measured plan in the fit); "gscan-loop" plans on GPTQ's own scan,
                # "rscan-loop" on the RTN scan scaled by GPTQ's layer-output error ratios
                table = {"gscan-loop": gptq_scan, "rscan-loop": ratio_scan, "rslice-loop": lambda: ratio_scan(True)
                         }.get(variant, lambda: linear_scores)()

                def plan_g(model, table=table):
                    return plan_with(model, table=table)

                def rows_g(choice, table=table):
                    return {s: features(choice, table, s) for s in slices}

                rounds, _ = closed_loop(plan_g, gptq_measure, rows_g, rounds=args.loop_rounds, time_budget_s=3600)
                best = min(rounds, key=lambda r: r.worst_measured)
                choices[variant] = best.choice
                if variant != "loop-gptq":
                    choices[variant.split("-")[0]] = rounds[0].choice
                loop_rounds = round_rows(rounds)
            elif variant == "rslice-uloop":
                table, cap = ratio_scan(True), int(args.low_per_block.split(",")[0])
                start = dict.fromkeys(linears, uniform)

                def plan_u(model, table=table, cap=cap):
                    return plan_with(model, table=table, cap=cap)

                def rows_u(choice, table=table):
                    return {s: features(choice, table, s) for s in slices}

                at_uniform, x_uniform = gptq_measure(start), rows_u(start)
                state = LoopState()
                state.add("uniform", np.array([x_uniform[s] for s in slices]), [at_uniform[s] for s in slices], slices)
                rounds, _ = closed_loop(plan_u, gptq_measure, rows_u, state=state, rounds=args.loop_rounds,
                                        time_budget_s=3600, known={tuple(sorted(start.items())): at_uniform})
                best = min(rounds, key=lambda r: r.worst_measured) if rounds else None
                beats = best is not None and best.worst_measured < max(at_uniform.values())
                choices[f"{variant}{cap}"] = best.choice if beats else start
                loop_rounds = [{"round": 0, "uniform": uniform, "worst_measured": round(max(at_uniform.values()), 5),
                                "measured": {s: round(v, 5) for s, v in at_uniform.items()}}, *round_rows(rounds)]
            elif variant in local_variants:
                if args.local_from and not variant.startswith("local-uniform") and args.local_from not in choices:
                    raise SystemExit(f"--local-from {args.local_from}: plan that variant before {variant} in "
                                     "--variants.")
                start = (dict.fromkeys(linears, uniform) if variant.startswith("local-uniform")
                         else choices.get(args.local_from) or choices.get("loop") or choices.get("fitted")
                         or plan_with(fitted))
                measure, at = ((gptq_measure, gptq_scores_at) if variant.endswith("-gptq")
                               else (loop_measure, scores_at))
                steps = local_search(start, measure(start), at, measure, limits={"budget_bytes": budget},
                                     steps=args.local_steps, max_changes=args.local_changes, time_budget_s=3600)
                kept = [s for s in steps if s.accepted]
                choices[variant] = kept[-1].choice if kept else start
                loop_rounds = [{"step": s.index, "max_changes": s.max_changes, "changes": s.changes,
                                "worst_predicted": round(s.worst_predicted, 5), "worst_measured": round(s.worst_measured, 5),
                                "error": round(s.error, 4), "accepted": s.accepted, "seconds": round(s.seconds, 1)}
                               for s in steps]
            for name in [v for v in choices if v == variant or v.startswith(variant) and v[len(variant):].isdigit()]:
                emit({"part": "plan", "size_of": size_label, "variant": name,
                      "seconds": round(time.perf_counter() - t0, 1),
                      "settings": {s: list(choices[name].values()).count(s) for s in settings + more
                                   if s in choices[name].values()},
                      "bytes": float(sum(setting_bytes(rows, [m], [choices[name][m]])[0, 0] for m in linears)),
                      "budget": budget, **({"rounds": loop_rounds} if variant in LOOPED else {})})
        plan_seconds = time.perf_counter() - started

        for method in args.methods.split(","):
            plans = {"uniform": solution_plan({**dict.fromkeys(linears, uniform), **embedding_choice}, rows, method,
                                              f"uniform {uniform}")}
            plans.update({f"planner-{v}": solution_plan({**c, **embedding_choice}, rows, method, f"planner {v}")
                          for v, c in choices.items()})
            models, applied = {}, {}
            for label, plan in plans.items():
                model = copy.deepcopy(loaded.model)
                report = apply_plan_(model, plan, calibration if method == "gptq" else None)
                models[label], applied[label] = model.eval(), report
            kl = {s: per_sequence_kl(loaded.model, models, eval_ids[s]) for s in slices}
            figures = {label: {s: {"kl": round(float(kl[s][label].mean()), 5), "ci95": bootstrap(kl[s][label])}
                               for s in slices} for label in plans}
            worst = {label: max(slices, key=lambda s: kl[s][label].mean()) for label in plans}
            paired = {label: {s: {"diff": round(float((kl[s][label] - kl[s]["uniform"]).mean()), 5),
                                  "ci95": bootstrap(kl[s][label] - kl[s]["uniform"])} for s in slices}
                      for label in plans if label != "uniform"}
            uniform_worst = float(kl[worst["uniform"]]["uniform"].mean())
            emit({"part": "fair", "model": header["model"], "size_of": size_label, "method": method,
                  "embedding": args.embedding, "calibration": recipe.to_dict() if method == "gptq" else None,
                  "eval": f"{args.sequences} x {args.seq_len} tokens of each slice's eval "
                  "rows, KL(reference || plan) per token, measured on CPU",
                  "packed_bytes": {label: r.totals["total_packed_bytes"] for label, r in applied.items()},
                  "packed_sparse_bytes": {label: r.totals["total_packed_sparse_bytes"] for label, r in applied.items()},
                  "per_slice": figures, "worst_slice": {label: {"slice": s, "kl": figures[label][s]["kl"],
                                                                "ci95": figures[label][s]["ci95"]}
                                                        for label, s in worst.items()},
                  "ratio_to_uniform_worst": {label: round(figures[label][worst[label]]["kl"] / uniform_worst, 4)
                                             for label in plans if label != "uniform"},
                  "paired_minus_uniform": paired, "planning_seconds": round(plan_seconds, 1)})
            del models


if __name__ == "__main__":
    main()
