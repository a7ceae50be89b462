"""The planner's llama.cpp-type plan against the mixes people ship (Q4_K_M, IQ4_XS, each with and without an
importance matrix), on the same slices, as real GGUF files measured on llama.cpp (issue 16's table).

  nice python bench/bench_llamacpp_mixes.py [--model builtin:smollm2-135m] [--slices en,fr,zh,code,arc]
        [--protocol fast] [--depth fast] [--threads 2] [--lock /tmp/cpu.lock] [--out bench/results/llamacpp-DATE]

Everything runs through the CLI, as a user would, in the current $SHRINK_HOME (stored figures are reused by key):
1. `plan llama-cpp --mix M [--imatrix]` for each mix, and `eval --plan` of each on the slices (KL, top-1; accuracy
   on task slices).
2. The planner gets Q4_K_M's packed bytes (`--budget-mb`), the llama.cpp settings only, the worst slice as its
   objective, and the imatrix method (`--method gptq`, which llama.cpp types take as their imatrix path); it plans
   from a fast scan of those settings on the same slices. Its plan is evaluated the same way.
3. Each plan is exported (`export --format gguf`, bit for bit the evaluated candidate) and benchmarked
   (`measure --runtime llama.cpp`, llama-bench prompt and generation tokens/s at --threads).
4. Cross-check: llama-perplexity's KL of two of the files against the reference exported as F32, on --kld-chunks x
   --kld-ctx tokens of the first slice's eval text, beside the engine's own KL on the very same tokens (read back
   from llama-perplexity's base file) and positions (the second half of each chunk).
Prints JSON lines; writes them and a markdown table to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GGML_SETTINGS = "q8_0,q6_k,q5_k,q5_0,q4_k,q4_0,iq4_xs,q3_k,q2_k"
MIXES = (("Q4_K_M", False), ("Q4_K_M", True), ("IQ4_XS", False), ("IQ4_XS", True))
LOG: list[dict] = []


def emit(figures: dict, out: Path | None = None) -> None:
    line = {**figures, "load_average": [round(x, 2) for x in os.getloadavg()]}
    LOG.append(line)
    print(json.dumps(line), flush=True)
    if out is not None:
        with open(out / "results.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


def cli(*args: str, lock: str | None = None) -> list[dict]:
    """Run `python -m shrink_core ARGS --json`; its JSON lines (the last one is the whole report). `lock`: hold that
    flock file while it runs (the timed steps: other work on the machine waits instead of sharing the cores)."""
    cmd = [*(["flock", lock] if lock else []), sys.executable, "-m", "shrink_core", *args, "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    try:  # one indented document (print_json) or JSON lines (print_json_line)
        return [json.loads(done.stdout)]
    except json.JSONDecodeError:
        return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def evaluate(name: str, plan: Path, args, out: Path) -> dict:
    started = time.perf_counter()
    report = cli("eval", "--model", args.model, "--slices", args.slices, "--protocol", args.protocol,
                 "--plan", str(plan))[-1]
    row = {"row": name, "plan": str(plan), "candidate_id": report.get("candidate_id"),
           "packed_bytes": report["size"]["total_packed_bytes"], "eval_s": round(time.perf_counter() - started, 1),
           "slices": {s: {k: v.get(k) for k in ("kl", "kl_p99", "top1_agree", "accuracy", "ppl", "tokens", "items")}
                      for s, v in report["slices"].items()}}
    row["worst_kl"] = max(v["kl"] for v in row["slices"].values() if v["kl"] is not None)
    row["worst_slice"] = max((v["kl"], s) for s, v in row["slices"].items() if v["kl"] is not None)[1]
    return row


def export_and_bench(row: dict, args, out: Path) -> None:
    gguf = out / (re.sub(r"[^A-Za-z0-9_.-]+", "_", row["row"]).strip("_") + ".gguf")
    written = cli("export", "--model", args.model, "--plan", row["plan"], "--format", "gguf", "--out", str(gguf))[-1]
    row["gguf"] = str(gguf)
    row["gguf_bytes"] = gguf.stat().st_size
    row["export_packed_bytes"] = written["total_packed_bytes"]
    measured = cli("measure", "--runtime", "llama.cpp", "--gguf", str(gguf), "--candidate", str(row["candidate_id"]),
                   "--threads", str(args.threads), lock=args.lock)[-1]
    bench = measured["llama_bench"]
    row["llama_bench"] = {"prompt_tps": bench["prompt"]["tokens_per_s"],
                          "prompt_tps_sd": bench["prompt"]["tokens_per_s_stddev"],
                          "gen_tps": bench["generation"]["tokens_per_s"],
                          "gen_tps_sd": bench["generation"]["tokens_per_s_stddev"], "threads": bench["threads"],
                          "runtime": measured["runtime"], "result_id": measured["result_id"]}


def engine_kl_on_tokens(spec: str, plan_path: str, chunks: list[list[int]], add_bos: int | None) -> dict:
    """The engine's KL(reference || candidate) and top-1 agreement on llama-perplexity's own chunks and positions:
    logits at positions ctx/2 .. ctx-2 of each chunk (each predicting the next token), as perplexity.cpp scores."""
    import torch

    from shrink_core.model.load import load
    from shrink_core.plan import load_plan
    from shrink_core.results.eval_run import plan_candidate

    loaded = load(spec)
    candidate, _, _ = plan_candidate(loaded, load_plan(Path(plan_path).read_text()))
    kls, same = [], []
    with torch.inference_mode():
        for chunk in chunks:
            ids = torch.tensor([chunk])
            if add_bos is not None:
                ids[0, 0] = add_bos
            n_ctx = ids.shape[1]
            first = n_ctx // 2
            ref = torch.log_softmax(loaded.model(ids).logits[0, first:n_ctx - 1].double(), dim=-1)
            cand = torch.log_softmax(candidate(ids).logits[0, first:n_ctx - 1].double(), dim=-1)
            kls.append((ref.exp() * (ref - cand)).sum(-1))
            same.append((ref.argmax(-1) == cand.argmax(-1)).double())
    kl = torch.cat(kls)
    return {"mean_kld": round(float(kl.mean()), 6), "kld_p99": round(float(torch.quantile(kl, 0.99)), 6),
            "same_top_p": round(float(torch.cat(same).mean()), 6), "tokens_scored": int(kl.numel())}


def cross_check(rows: list[dict], args, out: Path) -> list[dict]:
    from gguf import GGUFReader

    from shrink_core.evaluation.slices import get_slice, load_rows
    from shrink_core.perf import llamacpp

    tools = llamacpp.require_tools(llamacpp.default_home())
    reference = out / "reference_f32.gguf"
    empty = out / "reference.yaml"
    empty.write_text("version: 1\nname: reference, every tensor kept as F32\nrules:\n- name: '.*'\n  keep: true\n")
    cli("export", "--model", args.model, "--plan", str(empty), "--format", "gguf", "--out", str(reference))
    slice_id = args.slices.split(",")[0]
    text = out / f"{slice_id}-eval.txt"
    rows_text = [r["text"] for r in load_rows(get_slice(slice_id)) if r.get("text")]
    text.write_text("\n\n".join(rows_text), encoding="utf-8")
    field = GGUFReader(str(reference)).get_field("tokenizer.ggml.add_bos_token")
    add_bos = bool(field.contents()) if field is not None else False
    bos = None
    if add_bos:
        bos = int(GGUFReader(str(reference)).get_field("tokenizer.ggml.bos_token_id").contents())
    checks = []
    for row in rows:
        base = out / "reference.kld"
        started = time.perf_counter()
        llama = llamacpp.kl_divergence(tools, reference, row["gguf"], text, ctx=args.kld_ctx, threads=args.threads,
                                       chunks=args.kld_chunks, keep_base=base)
        llama_s = time.perf_counter() - started
        n_ctx, chunks = llamacpp.kld_base_tokens(base)
        started = time.perf_counter()
        ours = engine_kl_on_tokens(args.model, row["plan"], chunks, bos)
        check = {"check": "kl cross-check", "row": row["row"], "slice": slice_id, "ctx": n_ctx, "chunks": len(chunks),
                 "llama_perplexity": {k: llama[k] for k in ("mean_kld", "mean_kld_uncertainty", "same_top_p",
                                                            "same_top_p_uncertainty", "tokens_scored")},
                 "engine": ours, "llama_s": round(llama_s, 1), "engine_s": round(time.perf_counter() - started, 1),
                 "relative_difference": round(llama["mean_kld"] / ours["mean_kld"] - 1, 4)}
        checks.append(check)
        emit(check, out)
        base.unlink()
    text.unlink()  # the slice's own text, rebuilt from the slice on the next run
    return checks


def table(rows: list[dict], slices: list[str], checks: list[dict]) -> str:
    head = ["row", *[f"{s} KL / top-1" for s in slices], "worst KL", "packed MB", "GGUF MB", "pp tok/s", "tg tok/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["row"]]
        for s in slices:
            v = row["slices"][s]
            cell = f"{v['kl']:.4f} / {100 * v['top1_agree']:.1f}%"
            if v.get("accuracy") is not None:
                cell += f" (acc {100 * v['accuracy']:.1f}%)"
            cells.append(cell)
        bench = row.get("llama_bench", {})
        cells += [f"{row['worst_kl']:.4f} ({row['worst_slice']})", f"{row['packed_bytes'] / 1e6:.2f}",
                  f"{row['gguf_bytes'] / 1e6:.2f}" if "gguf_bytes" in row else "",
                  f"{bench['prompt_tps']:.0f} ± {bench['prompt_tps_sd']:.0f}" if bench else "",
                  f"{bench['gen_tps']:.1f} ± {bench['gen_tps_sd']:.1f}" if bench else ""]
        lines.append("| " + " | ".join(cells) + " |")
    for c in checks:
        lp, en = c["llama_perplexity"], c["engine"]
        lines.append(f"\nKL cross-check, {c['row']}, {c['slice']}, {c['chunks']} x {c['ctx']} tokens "
                     f"({lp['tokens_scored']} scored): llama-perplexity {lp['mean_kld']:.5f} ± "
                     f"{lp['mean_kld_uncertainty']:.5f} (same top {100 * lp['same_top_p']:.2f}%), engine "
                     f"{en['mean_kld']:.5f} (same top {100 * en['same_top_p']:.2f}%): "
                     f"{100 * c['relative_difference']:+.1f}%")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--slices", default="en,fr,zh,code,arc")
    parser.add_argument("--protocol", default="fast")
    parser.add_argument("--depth", default="fast", help="the scan's depth (quick, fast, standard)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lock", default="/tmp/cpu.lock",
                        help="flock file held around each llama-bench run (timings on a machine left to them)")
    parser.add_argument("--kld-ctx", type=int, default=512)
    parser.add_argument("--kld-chunks", type=int, default=16)
    parser.add_argument("--resume", action="store_true",
                        help="reuse the rows already evaluated in --out's results.jsonl (export, bench, cross-check)")
    parser.add_argument("--out", default=f"bench/results/llamacpp-{time.strftime('%Y-%m-%d')}")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    earlier = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] \
        if args.resume and (out / "results.jsonl").exists() else []
    if not args.resume:
        (out / "results.jsonl").unlink(missing_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    emit({"bench": "llamacpp_mixes", "args": vars(args), "commit": commit,
          "shrink_home": os.environ.get("SHRINK_HOME", "(default)")}, out)
    started = time.perf_counter()

    rows = [line for line in earlier if "slices" in line and "row" in line]
    if len(rows) == len(MIXES) + 1:  # --resume: every row was evaluated; export, bench and cross-check them
        rows.sort(key=lambda r: not r["row"].startswith("planner"))
        emit({"resumed": [r["row"] for r in rows]}, out)
    else:
        rows = evaluate_rows(args, out)
    finish(rows, args, out, started)


def evaluate_rows(args, out: Path) -> list[dict]:
    rows = []
    for ftype, imatrix in MIXES:
        name = f"{ftype}{' imatrix' if imatrix else ''}"
        plan = out / f"{ftype}{'-imatrix' if imatrix else ''}.yaml"
        subprocess.run([sys.executable, "-m", "shrink_core", "plan", "llama-cpp", "--model", args.model, "--mix", ftype,
                        *(["--imatrix"] if imatrix else []), "--out", str(plan)], check=True, capture_output=True)
        rows.append(evaluate(name, plan, args, out))
        emit(rows[-1], out)

    budget = next(r for r in rows if r["row"] == "Q4_K_M imatrix")["packed_bytes"]
    scan_started = time.perf_counter()
    scan = cli("sensitivity", "--model", args.model, "--slices", args.slices, "--settings", GGML_SETTINGS,
               "--method", "fast", "--depth", args.depth)[-1]
    emit({"scan": {"seconds": round(time.perf_counter() - scan_started, 1), "settings": GGML_SETTINGS,
                   "depth": args.depth, "keys": sorted(scan)[:12]}}, out)
    planned = out / "planner.yaml"
    summary = cli("plan", "--model", args.model, "--budget-mb", f"{budget / 1e6:.6f}", "--objective", "worst",
                  "--slices", args.slices, "--settings", GGML_SETTINGS, "--method", "gptq", "--metric", "kl",
                  "--out", str(planned))[-1]
    emit({"planner": {k: summary.get(k) for k in ("planned_bytes", "solver", "predicted")},
          "budget_bytes": budget}, out)
    rows.insert(0, evaluate("planner (Q4_K_M size, worst slice)", planned, args, out))
    emit(rows[0], out)
    return rows


def finish(rows: list[dict], args, out: Path, started: float) -> None:
    for row in rows:
        export_and_bench(row, args, out)
        emit({"row": row["row"], "gguf_bytes": row["gguf_bytes"], "llama_bench": row["llama_bench"]}, out)

    checks = cross_check([r for r in rows if r["row"] in ("planner (Q4_K_M size, worst slice)", "Q4_K_M imatrix")],
                         args, out)
    slices = args.slices.split(",")
    markdown = table(rows, slices, checks)
    (out / "table.md").write_text(markdown, encoding="utf-8")
    reference = next(r for r in rows if r["row"] == "Q4_K_M imatrix")
    emit({"done": True, "seconds": round(time.perf_counter() - started, 1),
          "planner_beats_q4_k_m_imatrix_on_worst": rows[0]["worst_kl"] < reference["worst_kl"],
          "planner_worst_kl": rows[0]["worst_kl"], "q4_k_m_imatrix_worst_kl": reference["worst_kl"],
          "planner_gguf_bytes": rows[0]["gguf_bytes"], "q4_k_m_gguf_bytes": reference["gguf_bytes"]}, out)
    for gguf in out.glob("*.gguf"):  # the files are 100+ MB each: the figures and plans stay, the files go
        gguf.unlink()
    print(markdown)


if __name__ == "__main__":
    main()
