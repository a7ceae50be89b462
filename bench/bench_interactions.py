"""Where a plan's measured KL departs from the sum of its modules' scores: parts of the planner's plan perturbed
together, against the sum of their scan scores and, for the lowest bit-width, each module probed alone.

  python bench/bench_interactions.py --from bench/results/predict-DATE/plans.jsonl [--size w3g64] [--slice code]
                                     [--sequences 8] [--seq-len 128] [--no-modules]

--from: a `bench_predict.py collect` file (its scan scores; the same model weights are checked). The plan is the
additive planner's at the block-linear bytes of uniform --size, the embedding at the file's setting (w8) in every
measurement. Each part is perturbed with the engine's RTN (`Setting.perturbed`, as the scan and the engine do; the
engine's own application of the plan is measured too, as a check) and measured whole: KL(reference || perturbed)
per token on --sequences x --seq-len tokens of the slice's CALIBRATION rows (`probe.probe`). Parts: uniform --size;
the plan; its lowest width's modules alone and the rest alone; the lowest width's modules by block, each block
alone and the first and second half of those blocks together; with --modules (default), each lowest-width module
probed alone, its scan score beside it. One JSON line per part: modules, measured KL, the sum of scan scores.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def emit(figures: dict) -> None:
    print(json.dumps({**figures, "load_average": [round(x, 2) for x in os.getloadavg()]}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True)
    parser.add_argument("--size", default="w3g64", help="the plan gets the block-linear bytes of this uniform setting")
    parser.add_argument("--slice", default="code")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--no-modules", dest="modules", action="store_false",
                        help="skip probing each lowest-width module alone")
    args = parser.parse_args()

    from shrink_core.compression.apply import apply_plan_
    from shrink_core.model.inventory import block_linears, inventory
    from shrink_core.model.load import load
    from shrink_core.plan.menu import MENU
    from shrink_core.plan.planner import build_problem, setting_bytes, solution_plan, solve
    from shrink_core.sensitivity.probe import ProbeCache, calib_tokens, probe, whole_model_kl
    from shrink_core.sensitivity.scan import embedding_rows

    header = json.loads(Path(args.source).read_text().splitlines()[0])
    loaded = load(header["model"])
    if loaded.weights_hash != header["weights_hash"]:
        raise SystemExit(f"{args.source} was collected on other weights than {header['model']} has now.")
    settings, slices = list(header["settings"]), list(header["slices"])
    if args.size not in settings or args.slice not in slices:
        raise SystemExit(f"{args.source} scanned settings {', '.join(settings)} on slices {', '.join(slices)}; "
                         f"choose --size and --slice from those.")
    scores = {(m, s, sl): v for m, s, sl, v in header["scores_table"]}
    rows = inventory(loaded.model)
    linears = [r.name for r in block_linears(rows)]
    by_name = {r.name: r for r in rows}
    embedding = dict.fromkeys((r.name for r in embedding_rows(rows)), header.get("embedding", "w8"))
    table = {k: v for k, v in scores.items() if k[0] in set(linears)}
    budget = float(setting_bytes(rows, linears, settings).sum(axis=0)[settings.index(args.size)])
    plan = solve(build_problem(rows, table, slices, settings), budget_bytes=budget, objective="worst").choice
    modules = {m: loaded.model.get_submodule(m) for m in [*linears, *embedding]}
    blocks = {m: (by_name[m].block if by_name[m].block is not None else -1) for m in modules}
    cache = ProbeCache(loaded.model, calib_tokens(loaded.tokenizer, args.slice, args.sequences, args.seq_len))

    def measure(label: str, choice: dict[str, str], **extra) -> float:
        t0 = time.perf_counter()
        full = {**choice, **embedding}
        per = {m: MENU[s] for m, s in full.items() if s != "keep"}
        kl = probe(cache, {m: modules[m] for m in per}, blocks, per).kl
        emit({"part": label, "modules": len(choice), "kl": round(kl, 5),
              "score_sum": round(sum(scores[(m, s, args.slice)] for m, s in choice.items()), 5),
              "seconds": round(time.perf_counter() - t0, 1), **extra})
        return kl

    emit({"part": "setup", "model": header["model"], "source": args.source, "slice": args.slice,
          "tokens": f"{args.sequences} x {args.seq_len} calibration tokens", "size_of": f"uniform {args.size}",
          "plan": {s: list(plan.values()).count(s) for s in settings if s in plan.values()}})
    measure("embedding only", {})
    measure(f"uniform {args.size}", dict.fromkeys(linears, args.size))
    measure("plan", plan)
    lowest = min(MENU[s].bits for s in plan.values())
    low = {m: s for m, s in plan.items() if MENU[s].bits == lowest}
    measure(f"plan: its {lowest}-bit modules only", low)
    measure(f"plan: all but its {lowest}-bit modules", {m: s for m, s in plan.items() if m not in low})
    low_blocks = sorted({blocks[m] for m in low})
    for b in low_blocks:
        measure(f"plan: block {b}'s {lowest}-bit modules", {m: s for m, s in low.items() if blocks[m] == b}, block=b)
    half = len(low_blocks) // 2
    for part in (low_blocks[:half], low_blocks[half:]):
        if part:
            measure(f"plan: blocks {part[0]}-{part[-1]}'s {lowest}-bit modules together",
                    {m: s for m, s in low.items() if blocks[m] in part})
    for label, choice in ((f"engine: uniform {args.size}", dict.fromkeys(linears, args.size)), ("engine: plan", plan)):
        model = copy.deepcopy(loaded.model)
        apply_plan_(model, solution_plan({**choice, **embedding}, rows, "rtn"), None)
        emit({"part": label, "kl": round(whole_model_kl(cache, model.eval()).kl, 5)})
        del model
    if args.modules:
        for m, s in low.items():
            measure(f"alone: {m}", {m: s}, module=m, setting=s)


if __name__ == "__main__":
    main()
