"""How well does a plan's predicted KL hold? Random mixed-precision plans, measured whole, against two predictions.

  python bench/bench_predict.py collect [--model builtin:smollm2-135m] [--fit-plans 10] [--test-plans 24]
                                        [--out bench/results/predict-DATE/plans.jsonl]
  python bench/bench_predict.py collect --resume FILE [--fit-plans N] [--test-plans M]
  python bench/bench_predict.py analyse bench/results/predict-DATE/plans.jsonl

collect: the fast scan (one module at a time, Fisher KL for the block linears, exhaustive for the embedding) at every
  quantizing menu setting on en, fr, zh, code and arith (a task slice); then random plans whose block linears average
  2.5-6 bits per weight (each plan draws a target width, each module a setting near it), the tied embedding fixed at
  w8 in every plan (stated: it is not what varies). Each plan is MEASURED whole (every module perturbed at once, RTN
  as scored) on its own text: 8 x 256 tokens of each slice's eval rows, KL(reference || plan) per token.
  Two disjoint sets: --fit-plans to fit the interaction model on, --test-plans to report on (different seeds).
analyse: Spearman and R^2 of predicted vs measured worst-slice KL on the test plans only, for the additive
  prediction (the sum of the scan's scores), the interaction model fitted with one scale shared by the slices, the sum
  times one factor per slice fitted on the fit plans, and the product's model (`plan/interactions.py`: the slice
  factors, then per-bit-width alphas and gamma); how often each names the measured worst slice, and how often each
  fitted model's 95% interval holds the measured worst slice.
Prints JSON lines; each carries the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from shrink_core.plan.interactions import BIT_CLASSES, features, fit, r_squared, slice_factors  # noqa: E402
from shrink_core.plan.menu import MENU, QUANT_SETTINGS  # noqa: E402

SLICES = ("en", "fr", "zh", "code", "arith")
EMBEDDING_SETTING = "w8"


def emit(figures: dict) -> None:
    print(json.dumps({**figures, "load_average": [round(x, 2) for x in os.getloadavg()]}), flush=True)


def random_plans(linears: list[str], bits: np.ndarray, settings: list[str], count: int, seed: int) -> list[dict]:
    """count plans: a target width uniform in [2.5, 6] bits, then each module a setting drawn with weight
    exp(-(bits - target)^2 / 2 sigma^2), sigma 0.75 bits: plans that mix neighbouring widths around their target."""
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(count):
        target = rng.uniform(2.5, 6.0)
        weights = np.exp(-0.5 * ((bits - target) / 0.75) ** 2)  # (modules, settings)
        weights /= weights.sum(axis=1, keepdims=True)
        picks = [rng.choice(len(settings), p=w) for w in weights]
        plans.append({"target_bits": round(float(target), 3),
                      "choice": {m: settings[j] for m, j in zip(linears, picks)}})
    return plans


def collect(args) -> None:
    import torch

    from shrink_core.model.inventory import block_linears, inventory
    from shrink_core.model.load import load
    from shrink_core.plan.planner import setting_bytes
    from shrink_core.plan.predict import score_table
    from shrink_core.results.store import Store
    from shrink_core.sensitivity.probe import ProbeCache, eval_tokens, probe
    from shrink_core.sensitivity.scan import embedding_rows, run_scan

    torch.manual_seed(0)
    done, header = [], None
    if args.resume:  # the file's scan and its measured plans are kept; the plans not yet measured are added
        lines = [json.loads(line) for line in Path(args.resume).read_text().splitlines()]
        header, done = lines[0], lines[1:]
        args.model, args.out = header["model"], args.resume
    loaded = load(args.model)
    rows = inventory(loaded.model)
    linears = [r.name for r in block_linears(rows)]
    embeddings = [r.name for r in embedding_rows(rows)]
    if header is not None:
        if header["weights_hash"] != loaded.weights_hash:
            raise SystemExit(f"{args.resume} was collected on other weights than {args.model} has now.")
        settings = list(header["settings"])
        scores = {(m, s, sl): v for m, s, sl, v in header["scores_table"]}
    else:
        settings = list(QUANT_SETTINGS)
        with tempfile.TemporaryDirectory() as home:
            report = run_scan(loaded, list(SLICES), settings, "fast", "fast", store=Store(Path(home) / "shrink.db"))
        scores = score_table(report.records, "kl")
        emit({"part": "scan", "model": args.model, "settings": settings, "slices": SLICES, "seconds": report.seconds,
              "timings": {k: round(v, 2) for k, v in report.timings.items()}, "records": len(report.records)})
    by_name = {r.name: r for r in rows}
    params = np.array([by_name[m].params for m in linears], dtype=float)
    bits = setting_bytes(rows, linears, settings) * 8 / params[:, None]
    plans = ([{"set": "fit", **p} for p in random_plans(linears, bits, settings, args.fit_plans, seed=1)]
             + [{"set": "test", **p} for p in random_plans(linears, bits, settings, args.test_plans, seed=2)])
    modules = {m: loaded.model.get_submodule(m) for m in linears + embeddings}
    blocks = {m: (by_name[m].block if by_name[m].block is not None else -1) for m in modules}
    caches = {s: ProbeCache(loaded.model, eval_tokens(loaded.tokenizer, s, args.sequences, args.seq_len))
              for s in SLICES}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    measure = (f"{args.sequences} x {args.seq_len} tokens of each slice's eval rows, KL(reference || plan) per token, "
               "RTN, every module perturbed at once")
    if header is not None and header["measure"] != measure:
        raise SystemExit(f"{args.resume} measured plans on {header['measure']}; resume with the same --sequences "
                         "and --seq-len.")
    # the plans are drawn in order from fixed seeds, so the first ones of a resumed file are the same plans
    for plan, record in zip(plans, done):
        if record["set"] != plan["set"] or any(record["choice"][m] != s for m, s in plan["choice"].items()):
            raise SystemExit(f"{args.resume}'s plan {record['index']} is not the one these --fit-plans draw; "
                             "resume with the --fit-plans it was collected with (or fewer than it has measured).")
    with out.open("a" if header is not None else "w") as handle:
        if header is None:
            handle.write(json.dumps({"header": True, "model": args.model, "weights_hash": loaded.weights_hash,
                                     "slices": SLICES, "settings": settings, "embedding": EMBEDDING_SETTING,
                                     "measure": measure,
                                     "scores": "fast scan, budget fast (Fisher KL; embedding exhaustive)",
                                     "scores_table": [[m, s, sl, v] for (m, s, sl), v in scores.items()]}) + "\n")
        for index, plan in enumerate(plans):
            if index < len(done):
                continue
            choice = {**plan["choice"], **dict.fromkeys(embeddings, EMBEDDING_SETTING)}
            started = time.perf_counter()
            per_module = {m: MENU[s] for m, s in choice.items()}
            measured = {s: probe(caches[s], modules, blocks, per_module).kl for s in SLICES}
            picks = np.array([settings.index(plan["choice"][m]) for m in linears])
            record = {**plan, "index": index, "choice": choice,
                      "avg_bits": round(float((bits[np.arange(len(linears)), picks] * params).sum() / params.sum()), 4),
                      "counts": {s: list(choice.values()).count(s) for s in settings},
                      "features": {s: features(choice, scores, s).tolist() for s in SLICES},
                      "measured": measured, "seconds": round(time.perf_counter() - started, 1)}
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            emit({"part": "plan", "set": plan["set"], "index": index, "avg_bits": record["avg_bits"],
                  "worst_measured": round(max(measured.values()), 5), "seconds": record["seconds"]})


def analyse(path: str) -> None:
    from shrink_core.sensitivity.scan import spearman

    lines = [json.loads(line) for line in Path(path).read_text().splitlines()]
    plans = [r for r in lines if not r.get("header")]
    # features recomputed from each plan's choice and the header's scores: the stored vectors have the bit classes of
    # the menu they were collected with (llama.cpp types later added a 5-bit class)
    scores = {(m, s, sl): v for m, s, sl, v in lines[0]["scores_table"]}
    for r in plans:
        r["x"] = {s: features(r["choice"], scores, s) for s in r["measured"]}
    fitting = [r for r in plans if r["set"] == "fit"]
    testing = [r for r in plans if r["set"] == "test"]
    x = [r["x"][s] for r in fitting for s in r["measured"]]
    y = [r["measured"][s] for r in fitting for s in r["measured"]]
    ids = [r["index"] for r in fitting for s in r["measured"]]
    slices = [s for r in fitting for s in r["measured"]]
    fitted = fit(np.array(x), np.array(y), ids)  # one scale shared by the slices
    product = fit(np.array(x), np.array(y), ids, slices)  # the product's model: one factor per slice first
    measured = [max(r["measured"].values()) for r in testing]
    # one factor per slice alone (which slice is worst depends on the slices' relative scale, which the
    # per-bit-width alphas share across slices)
    factor, _ = slice_factors([v.sum() for v in x], y, slices)

    def by_model(model):
        return lambda r: {s: float(model.predict(np.array([r["x"][s]]), [s])[0]) for s in r["measured"]}

    per_slice = {"additive": lambda r: {s: float(r["x"][s].sum()) for s in r["measured"]},
                 "fitted": by_model(fitted),
                 "slice_scaled": lambda r: {s: factor[s] * float(r["x"][s].sum()) for s in r["measured"]},
                 "fitted_sliced": by_model(product)}
    figures = {}
    for label, predict in per_slice.items():
        predictions = [predict(r) for r in testing]
        predicted = [max(p.values()) for p in predictions]
        figures[label] = {"spearman": round(spearman(predicted, measured), 4),
                          "r2": round(r_squared(predicted, measured), 4),
                          "median_abs_rel_error": round(float(np.median(
                              np.abs(np.array(predicted) - measured) / np.array(measured))), 4),
                          "worst_slice_named": sum(max(p, key=p.get) == max(r["measured"], key=r["measured"].get)
                                                   for p, r in zip(predictions, testing))}
    figures["slice_factor"] = {s: round(v, 4) for s, v in factor.items()}
    coverage = {}
    for label, model in (("fitted", fitted), ("fitted_sliced", product)):
        worst = [max(r["measured"], key=r["measured"].get) for r in testing]
        low, high = model.interval(np.array([r["x"][w] for r, w in zip(testing, worst)]), worst)
        coverage[label] = round(float(np.mean((np.array(measured) >= low) & (np.array(measured) <= high))), 3)
    emit({"part": "analyse", "file": path, "fit_plans": len(fitting), "test_plans": len(testing),
          "test_avg_bits": [min(r["avg_bits"] for r in testing), max(r["avg_bits"] for r in testing)],
          "test_worst_measured": [round(min(measured), 5), round(max(measured), 5)],
          "classes": [f"{c}-bit" for c in BIT_CLASSES], "model": fitted.to_dict(),
          "model_sliced": product.to_dict(), **figures, "interval_coverage_on_worst_slice": coverage})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--model", default="builtin:smollm2-135m")
    c.add_argument("--fit-plans", type=int, default=10)
    c.add_argument("--test-plans", type=int, default=24)
    c.add_argument("--sequences", type=int, default=8)
    c.add_argument("--seq-len", type=int, default=256)
    c.add_argument("--resume", help="a collect file to continue: its scan and measured plans kept, the rest measured")
    c.add_argument("--out", default=f"bench/results/predict-{time.strftime('%Y-%m-%d')}/plans.jsonl")
    a = sub.add_parser("analyse")
    a.add_argument("path")
    args = parser.parse_args()
    if args.part == "collect":
        collect(args)
        analyse(args.out)
    else:
        analyse(args.path)


if __name__ == "__main__":
    main()
