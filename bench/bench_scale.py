"""How the costs grow with model size: random-weight Llama models of real shapes, in bf16, through each stage.

  python bench/bench_scale.py [--shapes 1b,3b,8b] [--stages build,load,rtn,gptq,scan,scan2,eval]
                              [--gptq-blocks 2] [--calib 16x512] [--device cpu] [--out FILE.jsonl]
                              [--shard-gb 5] [--onload cuda]

Shapes (hidden, MLP width, blocks, heads / KV heads, vocabulary; `tiny` is a smoke run): 1b = Llama-3.2-1B (2048,
8192, 16, 32/8, 128256, tied), 3b = Llama-3.2-3B (3072, 8192, 28, 24/8, 128256, tied), 8b = Llama-3-8B (4096, 14336,
32, 32/8, 128256).
Weights are seeded random (normal, std 0.02), built directly in bf16 (no fp32 copy); tokens are random ids below
49152 (the SmolLM2 tokenizer's range, used for the text slices), so quality figures mean nothing here: only time and
memory are measured. One process per shape builds the model once and runs the stages in turn, each with its own peak
RSS (VmHWM reset before it: the model's resident bytes are in every stage's peak):
  build  make the model in memory (its time and peak are on every row: build_s, peak_of_build_gb)
  load   load a saved bf16 checkpoint through shrink's loader (safetensors, memory-mapped), in a process of its
         own; skipped when the disk cannot hold the checkpoint (said in the output)
  rtn    int4 g64 RTN on every block linear (later stages then run on the quantized weights: same costs)
  gptq   int4 g64 GPTQ on the first --gptq-blocks blocks, --calib calibration tokens (sequences x length); the
         whole-model time is extrapolated per block (stated)
  scan   the fast scan at depth `quick` on one slice (en), one setting (w4g64): Fisher scores for every block
         linear (streamed above 2 GiB of statistics) and the embedding's exhaustive probe
  scan2  the same on two slices (en, fr): the memory an extra slice costs is scan2 - scan
  eval   the `fast` protocol's text rows of en (120 windows of up to 512 tokens)
--device cuda builds the model on the GPU and adds each stage's GPU peak (`peak_gpu_gb`, the allocator's).
--onload cuda builds it in host memory and runs rtn, gptq and eval with each block visiting the GPU in turn
(sequential onloading, `apply --onload`, `eval --onload`): `peak_gpu_gb` is then about one block and its
activations (for eval: with the embedding, the head and every window's hidden states), not the model.
Figures: wall seconds, peak RSS and the RSS before the stage, in GB, with the load average. The last line
fits, per stage, time and peak memory against the parameter count (power law: exponent and constant).
A model spec as a shape (`--shapes builtin:smollm2-135m`) runs the stages on that model as loaded (fp32).
Run it alone (`flock /tmp/cpu.lock python bench/bench_scale.py ...`): the 8b shape needs about 17 GB of RAM.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPES = {
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, vocab_size=128256, tie_word_embeddings=True),  # a smoke run
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}
STAGES = ("build", "load", "rtn", "gptq", "scan", "scan2", "eval")
TOKEN_RANGE = 49152


def emit(figures: dict, out=None) -> None:
    line = json.dumps({**figures, "load_average": [round(x, 2) for x in os.getloadavg()]})
    print(line, flush=True)
    if out:
        with open(out, "a") as handle:
            handle.write(line + "\n")


def rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KB on Linux


def build(shape: str, device: str = "cpu"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from shrink_core.model.arch import canonicalize_

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # parameters are made in bf16: no fp32 copy of the model, ever
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    canonicalize_(model)
    return model.eval()


def tokenizer():
    from transformers import AutoTokenizer

    from shrink_core.model.load import load
    from shrink_core.paths import model_cache_dir

    def found():
        return sorted((p for p in model_cache_dir().glob("*/tokenizer.json") if "smollm2" in str(p).lower()),
                      key=lambda p: p.stat().st_mtime)

    if not found():
        load("builtin:smollm2-135m")  # makes the cache (and its tokenizer) once
    return AutoTokenizer.from_pretrained(str(found()[-1].parent))


def loaded_model(model, shape: str):
    from shrink_core.model.load import LoadedModel, ModelSpec

    return LoadedModel(ModelSpec(f"random:{shape}", "local", shape), model, tokenizer(), Path("."),
                       f"random-{shape}-{next(model.parameters()).dtype}", 0.0, False)


def child(shape: str, stages: list[str], args) -> list[dict]:
    """Build (or load) the model once, then run `stages` in order, each with its own peak RSS (VmHWM reset)."""
    from shrink_core.perf.memory import measure_peak_rss, release_freed_memory

    started = time.perf_counter()
    base = {"shape": shape}
    if "load" in stages or ":" in shape:  # a saved checkpoint, or a model spec (builtin:smollm2-135m, in fp32)
        from shrink_core.model.load import load, with_device

        model = load(with_device(shape if ":" in shape else f"{args.checkpoint}#bf16", args.device)).model
        base["load_s"] = round(time.perf_counter() - started, 2)
        if args.checkpoint:
            base["shards"] = len(list(Path(args.checkpoint).glob("*.safetensors")))
    elif args.onload:  # made on the onload device (seconds, against minutes on a CPU), then kept in host memory
        import torch

        model = build(shape, args.onload).to("cpu")
        torch.cuda.empty_cache()
    else:
        model = build(shape, args.device)
    params = sum(p.numel() for p in model.parameters())
    base.update(params=params, bf16_gb=round(params * 2 / 1e9, 3), build_s=round(time.perf_counter() - started, 2),
                rss_after_build_gb=round(rss_gb(), 3), peak_of_build_gb=round(peak_gb(), 3))
    rows = []
    for stage in stages:
        release_freed_memory()
        figures = {**base, "stage": stage}
        t0 = time.perf_counter()
        gpu = args.device.startswith("cuda") or (args.onload or "").startswith("cuda")
        if gpu:  # device memory: the allocator's peak over the stage (RSS is the host's)
            import torch

            torch.cuda.reset_peak_memory_stats()
        peak = measure_peak_rss(lambda f=figures, s=stage: f.update(_stage(model, shape, s, args)))
        if gpu:
            figures["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
        figures.update(stage_s=round(time.perf_counter() - t0, 2), rss_before_gb=round(peak.rss_before_bytes / 1e9, 3),
                       peak_rss_gb=round(peak.peak_rss_bytes / 1e9, 3), peak_method=peak.method,
                       rss_end_gb=round(rss_gb(), 3))
        print(json.dumps(figures), flush=True)
        rows.append(figures)
    return rows


def _stage(model, shape: str, stage: str, args) -> dict:
    """One stage on the model (RTN and GPTQ change it in place: later stages see quantized random weights, which
    costs them the same time and memory)."""
    import torch

    from shrink_core.compression.apply import apply_plan_
    from shrink_core.plan import load_plan

    figures = {"threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    if stage == "rtn":
        report = apply_plan_(model, load_plan({"version": 1, "name": "rtn", "rules": [{"kind": [
            "q", "k", "v", "o", "gate", "up", "down"], "weights": {"bits": 4, "group_size": 64, "method": "rtn"}}]}),
            onload=args.onload)
        figures.update(modules=sum(1 for m in report.modules if m.bits == 4), onload=args.onload)
    elif stage == "gptq":
        sequences, length = (int(x) for x in args.calib.split("x"))
        ids = torch.randint(0, TOKEN_RANGE, (sequences, length), generator=torch.Generator().manual_seed(0))
        blocks = list(range(args.gptq_blocks))
        report = apply_plan_(model, load_plan({"version": 1, "name": "gptq", "rules": [{"blocks": blocks, "kind": [
            "q", "k", "v", "o", "gate", "up", "down"], "weights": {"bits": 4, "group_size": 64, "method": "gptq"}}]}),
            ids.to(args.device), batch_size=4, onload=args.onload)
        layers = len(model.model.layers)
        per_block = (time.perf_counter() - t0) / len(blocks)
        figures.update(calibration=args.calib, blocks_done=len(blocks), seconds_per_block=round(per_block, 2),
                       onload=args.onload,
                       whole_model_s_extrapolated=round(per_block * layers, 1),
                       fell_back=sum(1 for m in report.modules if "fallback" in m.action))
    elif stage in ("scan", "scan2"):
        from shrink_core.results.store import Store
        from shrink_core.sensitivity.scan import run_scan

        loaded = loaded_model(model, shape)  # its tokenizer from the machine's cache: not a first load in the stage
        home, before = tempfile.mkdtemp(prefix="scale-home-"), os.environ.get("SHRINK_HOME")
        os.environ["SHRINK_HOME"] = home
        try:
            slices = ["en"] if stage == "scan" else ["en", "fr"]
            report = run_scan(loaded, slices, ["w4g64"], "fast", "quick", metrics=("kl",),
                              store=Store(Path(home) / "store.sqlite"))
        finally:  # later stages find the tokenizer in the machine's own cache again
            os.environ.pop("SHRINK_HOME") if before is None else os.environ.update(SHRINK_HOME=before)
        figures.update(slices=slices, records=len(report.records), timings=report.timings)
        shutil.rmtree(home, ignore_errors=True)
    elif stage == "eval":
        from shrink_core.evaluation.evaluate import evaluate
        from shrink_core.evaluation.slices import get_slice
        from shrink_core.model.arch import onloading

        with onloading(args.onload):
            (result,) = evaluate(model, tokenizer(), [get_slice("en")], "fast")
        figures.update(tokens=result.tokens, onload=args.onload)
    return figures


def fit(rows: list[dict]) -> dict:
    """Per stage: time and peak memory ~ c * params^k, least squares in log space (needs two sizes or more)."""
    import numpy as np

    out = {}
    for stage in STAGES:
        points = [r for r in rows if r.get("stage") == stage and "stage_s" in r]
        if len({r["params"] for r in points}) < 2:
            continue
        x = np.log([r["params"] for r in points])
        fits = {}
        for key in ("stage_s", "peak_rss_gb"):
            k, c = np.polyfit(x, np.log([max(r[key], 1e-3) for r in points]), 1)
            fits[key] = {"exponent": round(float(k), 3), "at_1b_params": round(float(np.exp(c) * 1e9 ** k), 3)}
        out[stage] = fits
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="1b,3b,8b")
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--gptq-blocks", type=int, default=2)
    parser.add_argument("--calib", default="16x512")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--onload", default=None, help="rtn and gptq with each block onloaded to this device (cuda)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--shard-gb", type=float, default=None,
                        help="the load stage's checkpoint in safetensors shards of this size (default: one file)")
    parser.add_argument("--child", nargs=2, metavar=("SHAPE", "STAGES"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1].split(","), args)  # prints one line per stage as it ends
        return
    rows = []
    for shape in args.shapes.split(","):
        stages = args.stages.split(",")
        groups = [[s] for s in stages if s == "load" and ":" not in shape] + [
            [s for s in stages if s not in ("build", "load") or ":" in shape] or ["build"]]
        for group in groups:
            extra = []
            if group == ["load"]:
                shards = f"-{args.shard_gb:g}gb" if args.shard_gb else ""
                checkpoint = Path(tempfile.gettempdir()) / f"shrink-scale-{shape}{shards}"
                bytes_needed = _params(shape) * 2 * 1.05
                if not (checkpoint / "config.json").is_file():
                    if shutil.disk_usage(checkpoint.parent).free < bytes_needed + (2 << 30):
                        emit({"shape": shape, "stage": "load", "skipped": f"the disk has "
                              f"{shutil.disk_usage(checkpoint.parent).free / 1e9:.1f} GB free, the checkpoint needs "
                              f"{bytes_needed / 1e9:.1f} GB"}, args.out)
                        continue
                    _save(shape, checkpoint, args.shard_gb)
                extra = ["--checkpoint", str(checkpoint)]
            run = subprocess.run([sys.executable, __file__, "--child", shape, ",".join(group), "--gptq-blocks",
                                  str(args.gptq_blocks), "--calib", args.calib, "--device", args.device, *extra,
                                  *(["--onload", args.onload] if args.onload else [])],
                                 capture_output=True, text=True)
            for line in run.stdout.strip().splitlines():
                if line.startswith("{"):
                    rows.append(json.loads(line))
                    emit(rows[-1], args.out)
            if run.returncode != 0:
                emit({"shape": shape, "stages": group, "failed": run.stderr.strip().splitlines()[-1:]}, args.out)
    emit({"fit": fit(rows)}, args.out)


def _params(shape: str) -> int:
    s = SHAPES[shape]
    h, i, layers, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = s["num_key_value_heads"] * s["head_dim"]
    attention = h * s["num_attention_heads"] * s["head_dim"] * 2 + 2 * h * kv
    return layers * (attention + 3 * h * i + 2 * h) + v * h * (1 if s["tie_word_embeddings"] else 2) + h


def _save(shape: str, checkpoint: Path, shard_gb: float | None = None) -> None:
    model = build(shape)
    shards = {"max_shard_size": f"{int(shard_gb * 1000)}MB"} if shard_gb else {}  # as the Hub's 8B releases ship
    model.save_pretrained(checkpoint, safe_serialization=True, **shards)
    tokenizer().save_pretrained(checkpoint)
    del model


if __name__ == "__main__":
    main()
