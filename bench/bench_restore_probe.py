"""Where does each language feel a quantization's error? Restore one group of block linears to full precision inside
the whole quantized model, and measure every slice's KL again (leave-one-group-out: the other groups' errors stay, so
interactions count, unlike the sensitivity scan's one-module-from-fp probes).

  python bench/bench_restore_probe.py --plan PLAN.yaml --cache DIR [--groups kinds,blocks5] [--windows 16] \
      [--slices en,de,hi] [--out DIR]

The quantization is bench_tune_variants' cached untuned one (the same key: give the same plan file and --cache; run
bench_tune_variants with `--variants none` first if it is not there). Groups: `kinds` (each kind of block linear
across every block), `blocksN` (the blocks in N contiguous ranges, every kind), `block:A-B` (one range). Each line of
peers.jsonl is a slice of one probe: the KL with the group restored, the group's share of the quantized weights, and
`kl_none` (nothing restored); `--render` prints the share of each slice's KL each group removes, per 1% of weights.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_peers import emit, final_hidden_states, measure  # noqa: E402
from bench_tune_variants import cache_file, load_cache  # noqa: E402


def groups_for(spec: str, rows: list, blocks: int) -> dict[str, list[str]]:
    """Probe name -> module names, for a comma list of `kinds`, `blocksN` and `block:A-B`, from the quantized
    modules' inventory rows (their block and kind, as plan rules name them)."""
    out: dict[str, list[str]] = {}
    for part in spec.split(","):
        if part == "kinds":
            for row in rows:
                out.setdefault(f"kind:{row.kind}", []).append(row.name)
        elif part.startswith("blocks"):
            n = int(part[len("blocks"):])
            edges = [round(i * blocks / n) for i in range(n + 1)]
            for lo, hi in zip(edges, edges[1:]):
                out[f"block:{lo}-{hi - 1}"] = [r.name for r in rows if lo <= r.block < hi]
        elif part.startswith("block:"):
            lo, _, hi = part[len("block:"):].partition("-")
            lo, hi = int(lo), int(hi or lo)
            out[part] = [r.name for r in rows if lo <= r.block <= hi]
        else:
            raise SystemExit(f"--groups part '{part}' is not kinds, blocksN or block:A-B.")
    return out


def render(path: Path) -> str:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    slices = list(dict.fromkeys(p["slice"] for p in lines))
    probes = list(dict.fromkeys(p["probe"] for p in lines))
    by = {(p["probe"], p["slice"]): p for p in lines}
    rows = ["| restored | % of weights | " + " | ".join(f"{s} KL | {s} % off per 1%" for s in slices) + " |",
            "|---|---|" + "---|---|" * len(slices)]
    for probe in [p for p in probes if all((p, s) in by for s in slices)]:  # a killed run's last probe is partial
        share = 100 * by[(probe, slices[0])]["share"]
        cells = []
        for s in slices:
            p = by[(probe, s)]
            off = 100 * (1 - p["kl"] / p["kl_none"])
            cells += [f"{p['kl']:.3f}", f"{off / share:.2f}" if share else ""]
        rows.append(f"| {probe} | {share:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--plan")
    parser.add_argument("--cache")
    parser.add_argument("--groups", default="kinds,blocks5")
    parser.add_argument("--slices", default="en,de,hi")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=2)
    parser.add_argument("--octave", type=int, default=None,
                        help="the octave the cache was keyed with (default: the format's, as bench_tune_variants)")
    parser.add_argument("--out", default=f"bench/results/restore-{time.strftime('%Y-%m-%d')}")
    parser.add_argument("--render", default=None, metavar="PEERS_JSONL")
    args = parser.parse_args()
    if args.render:
        print(render(Path(args.render)), end="")
        return
    if not (args.plan and args.cache):
        raise SystemExit("give --plan and --cache (the untuned quantization bench_tune_variants cached for that plan).")
    if not Path(args.plan).is_file():
        raise SystemExit(f"--plan {args.plan}: no such file; give the plan file bench_tune_variants quantized.")

    import shrink_core.compression.primitives as primitives
    from shrink_core.model.inventory import inventory
    from shrink_core.model.load import load
    from shrink_core.sensitivity.probe import eval_tokens

    text = Path(args.plan).read_text()
    loaded = load(args.model)
    reference = loaded.model.eval()
    cached = cache_file(args.cache, loaded.weights_hash, text, args.octave or primitives.LOG_STEPS_PER_OCTAVE)
    if not cached.is_file():
        raise SystemExit(f"{cached}: no cached quantization of this plan; run bench_tune_variants.py --plan "
                         f"{args.plan} --variants none --cache {args.cache} first.")
    quantized = copy.deepcopy(reference)
    states, _ = load_cache(cached, quantized)
    rows = [r for r in inventory(reference) if r.name in states]
    total = sum(quantized.get_submodule(r.name).weight.numel() for r in rows)
    groups = groups_for(args.groups, rows, reference.config.num_hidden_layers)
    slices = args.slices.split(",")
    ids = {s: eval_tokens(loaded.tokenizer, s, args.windows, args.seq_len) for s in slices}
    ref_hidden = {s: final_hidden_states(reference, ids[s], args.chunk) for s in slices}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = (out_dir / "peers.jsonl").open("a")
    none = {s: measure(reference, quantized, ids[s], ref_hidden[s], args.chunk)["kl"] for s in slices}
    for probe, members in {"none": [], **groups}.items():
        saved = {}
        with torch.no_grad():
            for name in members:
                module = quantized.get_submodule(name)
                saved[name] = module.weight.detach().clone()
                module.weight.copy_(reference.get_submodule(name).weight)
        share = sum(saved[n].numel() for n in members) / total
        for s in slices:
            kl = none[s] if probe == "none" else measure(reference, quantized, ids[s], ref_hidden[s], args.chunk)["kl"]
            emit({"part": "probe", "plan": args.plan, "probe": probe, "modules": len(members), "share": share,
                  "slice": s, "windows": args.windows, "kl": kl, "kl_none": none[s]}, handle)
        with torch.no_grad():
            for name, weight in saved.items():
                quantized.get_submodule(name).weight.copy_(weight)
    handle.close()
    (out_dir / "table.md").write_text(render(out_dir / "peers.jsonl"))
    print((out_dir / "table.md").read_text(), end="")


if __name__ == "__main__":
    main()
