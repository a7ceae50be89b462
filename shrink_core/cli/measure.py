"""`measure`: memory, measured latency here (reference side by side), projected latency on a target, cost."""
from __future__ import annotations

from shrink_core.cli.entry import add_model_args, print_json
from shrink_core.errors import ShrinkError


def add_parser(sub) -> None:
    parser = sub.add_parser("measure", help="measure memory and latency here; project latency and cost on a target")
    add_model_args(parser)
    parser.add_argument("--plan", help="plan to apply first: preset:NAME, a .yaml/.json file or YAML text")
    parser.add_argument("--calibrated", action="store_true",
                        help="run the plan's calibrated methods (gptq, ...) instead of rtn/magnitude stand-ins")
    parser.add_argument("--target", help="hardware row to project on (see --list-targets; default: the one the pages "
                        "start with, h100-sxm)")
    parser.add_argument("--table", help="YAML/JSON hardware table replacing the built-in one")
    parser.add_argument("--list-targets", action="store_true", help="print the hardware table and exit")
    parser.add_argument("--batch", type=int, default=4, help="the larger batch size measured beside batch 1")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per figure (median and spread reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for this command and its timings (default 1: stable on a shared machine)")
    parser.add_argument("--context", type=int, default=2048, help="context length for the KV-cache bytes")
    parser.add_argument("--utilisation", type=float, default=0.5, help="share of paid hours serving, for cost")
    parser.add_argument("--runtime", default="torch", choices=("torch", "llama.cpp"),
                        help="torch (default): the model as loaded here; llama.cpp: benchmark --gguf with llama-bench "
                             "(build it first with `tools llama-cpp`)")
    parser.add_argument("--gguf", help="with --runtime llama.cpp: the GGUF file to benchmark")
    parser.add_argument("--candidate", type=int,
                        help="with --runtime llama.cpp: the candidate id (see `candidates list`) the figures belong to")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.set_defaults(run=run)


def _check(args) -> None:
    for name in ("batch", "prompt_tokens", "decode_tokens", "runs", "threads", "context"):
        if getattr(args, name) < 1:
            raise ShrinkError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}.")
    if not 0 < args.utilisation <= 1:
        raise ShrinkError(f"--utilisation must be a share in (0, 1], not {args.utilisation}.")


def run(args) -> int:
    from shrink_core.perf.hardware import DEFAULT_ROWS, DEFAULT_TARGET, get, load_table

    table = load_table(args.table) if args.table else DEFAULT_ROWS
    if args.list_targets:
        print_json([row.to_dict() for row in table])
        return 0
    args.target = args.target or DEFAULT_TARGET  # recorded with the result, so the default is spelled out
    _check(args)
    if args.runtime == "llama.cpp":
        return _run_llamacpp(args)
    if args.gguf or args.candidate is not None:
        raise ShrinkError("--gguf and --candidate go with --runtime llama.cpp; add it, or use --model and --plan.")
    target = get(args.target, table)

    plan = None
    if args.plan:  # refuse a bad plan before the model loads
        from shrink_core.plan import load_plan

        plan = load_plan(args.plan)
    import torch

    torch.set_num_threads(args.threads)  # the command's entry point: preparation runs like the timings
    from shrink_core.compression.candidate import from_plan
    from shrink_core.model.load import load
    from shrink_core.perf.candidate import reference
    from shrink_core.perf.report import measure

    loaded = load(args.model, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    model = loaded.model.eval()
    candidate = from_plan(model, plan, loaded.tokenizer, args.calibrated) if plan else reference(model)
    batches = (1,) if args.batch == 1 else (1, args.batch)
    report = measure(model, candidate, target, batches, args.prompt_tokens, args.decode_tokens, args.runs,
                     args.warmup, args.threads, args.context, args.utilisation, table)
    payload = {"spec": loaded.spec.raw, "weights_hash": loaded.weights_hash, "plan": args.plan, **report.to_dict()}
    recipe = _recipe(plan)
    payload["calibration"] = recipe if args.calibrated else None  # None: rtn/magnitude stand-ins, or no calibration
    payload["figure_key"] = _key(loaded, plan, payload["calibration"], args, table)
    payload["result_id"] = _store(loaded, plan, payload, recipe)
    if args.json:
        print_json(payload)
        return 0
    _print_text(report)
    return 0


def _print_text(report) -> None:
    memory = report.memory
    print(f"{report.candidate}: weights {memory.weight_bytes / 1e6:.1f} MB ({memory.weight_source}), KV cache "
          f"{memory.kv_cache_bytes / 1e6:.1f} MB at {memory.context} tokens x batch {memory.batch}; "
          f"fits {report.fits['target']}: {report.fits['fits']}")
    if memory.peak:
        print(f"  peak resident (measured): {memory.peak.peak_rss_bytes / 1e6:.0f} MB")
    for m in report.measured:
        print(f"  measured  {m.candidate:<12} b{m.batch}: prefill {m.prefill_ms_per_token.median_ms:.3f} ms/token "
              f"(spread {m.prefill_ms_per_token.spread:.0%}), decode {m.decode_ms_per_token.median_ms:.2f} ms/token "
              f"(spread {m.decode_ms_per_token.spread:.0%}); {m.runtime}, {m.threads} threads, {m.runs} runs")
    for p in report.projected:
        print(f"  projected {p.target:<12} b{p.batch}: prefill {p.prefill_ms_per_token:.4f} ms/token, decode "
              f"{p.decode_ms_per_token:.3f} ms/token ({p.decode_bound}-bound)")
    for c in report.cost:
        print(f"  cost ({c.basis}) {c.target} b{c.batch}: ${c.input_dollars_per_million:.4f}/M input, "
              f"${c.output_dollars_per_million:.4f}/M output at {c.utilisation:.0%} utilisation")
    for note in report.notes:
        print(f"  note: {note}")


def _recipe(plan) -> dict | None:
    """The calibration recipe of the plan's calibrated weights, as every entry point records it (None: not needed)."""
    from shrink_core.evaluation.calibration import recipe_for

    return recipe_for(plan).to_dict() if plan is not None and plan.needs_calibration else None


def _key(loaded, plan, calibration: dict | None, args, table) -> str:
    """The figure key of a measurement: weights, plan, calibration, the workload and where it was measured."""
    from shrink_core.evaluation.protocol import figure_key
    from shrink_core.model.describe import device_label
    from shrink_core.plan import plan_to_dict

    protocol = {name: getattr(args, name) for name in ("target", "batch", "prompt_tokens", "decode_tokens", "runs",
                                                        "warmup", "threads", "context", "utilisation")}
    protocol.update(device=device_label(), table=[row.to_dict() for row in table])
    return figure_key("measure", weights_hash=loaded.weights_hash, protocol=protocol,
                      plan=plan_to_dict(plan) if plan else None, calibration=calibration,
                      method=None if _recipe(plan) is None else "calibrated" if args.calibrated else "stand-ins")


def _store(loaded, plan, payload: dict, recipe: dict | None = None) -> int:
    """Keep the figures with the candidate they describe, so the Results page can plot them."""
    from shrink_core import __version__
    from shrink_core.model.describe import device_label
    from shrink_core.plan import plan_to_dict
    from shrink_core.results.eval_run import plan_kind, reference_candidate
    from shrink_core.results.store import Provenance, Store

    store = Store()
    parent = reference_candidate(store, loaded)
    plan_dict = plan_to_dict(plan) if plan else None
    candidate_id = parent if plan is None else store.upsert_candidate(
        name=plan.name or f"{loaded.spec.raw} + plan", kind=plan_kind(plan), model_spec=loaded.spec.raw,
        weights_hash=loaded.weights_hash, code_version=__version__, plan=plan_dict, calibration=recipe,
        parent_id=parent)
    provenance = Provenance(loaded.spec.raw, loaded.weights_hash, __version__, device_label(loaded.model), plan=plan_dict)
    return store.add_result("measure", provenance, payload, candidate_id=candidate_id)


# ---------------------------------------------------------------- --runtime llama.cpp

def _run_llamacpp(args) -> int:
    """llama-bench on a GGUF file, stored as a measured-latency result (of a candidate when --candidate is given)."""
    import os
    from pathlib import Path

    from shrink_core import __version__
    from shrink_core.evaluation.protocol import figure_key
    from shrink_core.model.load import weights_hash
    from shrink_core.perf import llamacpp
    from shrink_core.results.candidates import get_candidate
    from shrink_core.results.store import Provenance, Store

    if not args.gguf:
        raise ShrinkError("--runtime llama.cpp needs --gguf FILE, the GGUF file to benchmark.")
    if args.plan:
        raise ShrinkError("--plan does not apply to --runtime llama.cpp, which measures the --gguf file as it is; "
                          "drop --plan.")
    tools = llamacpp.require_tools(llamacpp.default_home())
    store = Store()
    candidate = get_candidate(store, args.candidate) if args.candidate is not None else None  # refused before the run
    before = round(os.getloadavg()[0], 2)
    figures = llamacpp.bench(tools, args.gguf, args.threads, args.prompt_tokens, args.decode_tokens, args.runs)
    after = round(os.getloadavg()[0], 2)
    gguf = Path(figures["file"]).resolve()
    file_hash = weights_hash([gguf])  # memoised sha256 of the file: what the figures are about
    label = (("reference" if candidate["kind"] == "reference" else candidate["name"]) if candidate else gguf.name)
    entry = llamacpp.measured_entry(figures, label, (before, after))
    payload = {
        "spec": candidate["model_spec"] if candidate else str(gguf), "gguf": str(gguf), "gguf_sha256": file_hash,
        "file_bytes": figures["file_bytes"], "runtime": entry["runtime"], "device": entry["device"],
        "memory": {"weights": {"bytes": figures["file_bytes"], "source": "the GGUF file's size"}},
        "latency": {"measured": [entry], "projected": []}, "llama_bench": figures, "plan": None, "calibration": None,
    }
    protocol = {"runtime": entry["runtime"], "gguf_sha256": file_hash, "threads": args.threads,
                "prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens, "runs": args.runs,
                "device": entry["device"]}
    provenance = (Provenance(candidate["model_spec"], candidate["weights_hash"], __version__, entry["device"],
                             plan=candidate["plan"]) if candidate
                  else Provenance(str(gguf), file_hash, __version__, entry["device"]))
    payload["figure_key"] = figure_key("measure", weights_hash=provenance.weights_hash, protocol=protocol,
                                       plan=provenance.plan)
    payload["result_id"] = store.add_result("measure", provenance, payload,
                                            candidate_id=candidate["id"] if candidate else None)
    if args.json:
        print_json(payload)
        return 0
    prompt, gen = figures["prompt"], figures["generation"]
    print(f"{label}: {figures['file_bytes'] / 1e6:.1f} MB {figures['model_type']}; prompt {prompt['tokens_per_s']:.1f} "
          f"± {prompt['tokens_per_s_stddev']:.1f} tokens/s ({prompt['tokens']} tokens), generation "
          f"{gen['tokens_per_s']:.1f} ± {gen['tokens_per_s_stddev']:.1f} tokens/s ({gen['tokens']} tokens); "
          f"{entry['runtime']}, {entry['device']}, {figures['repetitions']} runs")
    where = f"candidate #{candidate['id']}" if candidate else "no candidate (give --candidate ID to attach it)"
    print(f"  stored as result #{payload['result_id']} for {where}")
    return 0
