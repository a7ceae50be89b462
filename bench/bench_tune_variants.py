"""Variants of the end-to-end scale tuning from one quantization: the plan applied once without its `tune`, then each
variant of the tuning on a copy of it, measured on bench_peers' windows (rows that pair with its runs).

  python bench/bench_tune_variants.py --plan PLAN.yaml --variants none,base,steps200,lr4e-3,rows256 \
      [--windows 4] [--slices en,...] [--octave 32] [--cache DIR] [--out DIR]

A variant is `none` (the untuned quantization) or `+`-joined overrides of the plan's tune spec (compression/tune.py):
`base` (the plan's own spec, or the default), `stepsN`, `lrX`, `holdoutN`, `batchN`, and `rowsN`: the tuning trains on
N rows of the plan's calibration mix drawn afresh (the recipe's seed, N sequences) instead of the rows the
quantization used, and `randN`: N rows of tokens drawn uniformly from the vocabulary added to the training rows
(text in no language: does it keep the languages outside the mix?), and `codesX`: the integer codes trained too, with
Adam step X in code units (`TunedCodes`: learned rounding end to end; a bench-only method). Each tuning is the engine's
own `tune_scales_`, held-out check included (a refused tuning measures as `none`; the row says so).

--octave K: the log8 scale grid's steps an octave (the format's LOG_STEPS_PER_OCTAVE, 32) patched for the whole run,
quantization included; the packed bytes are the same (an 8-bit offset a group below each row's top), the range
below a row's top is 256 / K octaves. A bench-only patch, to measure whether a finer grid pays before the format
changes.

--tune-mix MIX (e.g. `en=0.2,de=0.14,...`): the `rowsN` rows are drawn from this mix instead of the plan's, so the
quantization (and its cache) stays the plan's and only what the tuning trains on changes; its rows are named
`tune:VARIANT:tunemix` and record the mix.

--cache DIR: the untuned quantization (every target's weight, scale and zero) kept as safetensors keyed by the plan
text and the octave, so further variants skip gptq-seq.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_peers import SLICES, emit, final_hidden_states, measure, render, tune_fields  # noqa: E402


def parse_variant(name: str, spec):
    """(TuneSpec, {"rows": N, "rand": N, "codes": X}) for a variant name; `none` -> (None, {})."""
    rows = {}
    if name == "none":
        return None, rows
    for part in name.split("+"):
        if part == "base":
            continue
        for key, cast in (("steps", int), ("lr", float), ("holdout", int), ("batch", int), ("rows", int),
                          ("rand", int), ("codes", float)):
            if part.startswith(key):
                value = cast(part[len(key):])
                if key in ("rows", "rand", "codes"):
                    rows[key] = value
                else:
                    spec = replace(spec, **{key: value})
                break
        else:
            raise SystemExit(f"variant part '{part}' is not base, stepsN, lrX, holdoutN, batchN, rowsN, randN or "
                             "codesX")
    return spec, rows


def codes_tuner(codes_lr: float, built: list):
    """A `tune_scales_` tuner factory that also trains each module's integer codes (appended to `built`).

    The codes start at the quantization's (gptq-seq's) and move as code + delta, delta starting at 0, clamped to the
    code range and rounded in every forward with the gradient passed straight through (QAT's STE on the stored
    grid; AutoRound's learned rounding, trained end to end on the logits' KL instead of block by block). A code
    changes once its delta passes +-0.5, so the step bounds how many can: Adam's steps are about `codes_lr` each,
    cosine-decayed. The bytes are the format's; only which code is stored changes."""
    from shrink_core.compression.primitives import from_groups
    from shrink_core.compression.tune import TunedScales

    class TunedCodes(TunedScales):
        def __init__(self, weight, state):
            super().__init__(weight, state)
            self.top = 2 ** state.bits - 1
            self.register_buffer("zero3", state.zero.float()[..., None])
            self.register_buffer("codes", self.centred + self.zero3)
            del self.centred  # the codes and zero hold it
            self.delta = torch.nn.Parameter(torch.zeros_like(self.codes))

        def rounded(self) -> torch.Tensor:
            latent = (self.codes + self.delta).clamp(0, self.top)
            return latent + (torch.round(latent) - latent).detach()

        def weight(self) -> torch.Tensor:
            values = from_groups((self.rounded() - self.zero3) * self.scale()[..., None], self.columns)
            return values if self.rotation is None else self.rotation.invert(values)

        def trainable(self, lr):
            return [(lr, self.theta), (codes_lr, self.delta)]

        def reset(self):
            self.theta.zero_()
            self.delta.zero_()

        def changed(self) -> int:
            with torch.no_grad():
                return int((self.rounded() != self.codes).sum())

    def make(weight, state):
        tuner = TunedCodes(weight, state)
        built.append(tuner)
        return tuner

    return make


def targets_of(model, states: dict) -> dict:
    """What apply's `_tune_` trains: the plain Linear block linears with an integer QuantState."""
    from shrink_core.compression.apply import QuantState

    return {name: (model.get_submodule(name), state) for name, state in states.items()
            if isinstance(state, QuantState) and type(model.get_submodule(name)) is torch.nn.Linear}


def save_cache(path: Path, model, states: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors, info = {}, {}
    for name, state in states.items():
        tensors[f"{name}.weight"] = model.get_submodule(name).weight.detach().contiguous()
        tensors[f"{name}.scale"], tensors[f"{name}.zero"] = state.scale.contiguous(), state.zero.contiguous()
        rotation = state.rotation
        info[name] = {"bits": state.bits, "group_size": state.group_size, "symmetric": state.symmetric,
                      "scales": state.scales, "rotation": None if rotation is None else
                      [rotation.seed, rotation.block, rotation.source, rotation.size]}
    save_file(tensors, str(path), metadata={"states": json.dumps(info), "meta": json.dumps(meta)})


def cache_file(cache: str, weights_hash: str, plan_text: str, octave: int) -> Path:
    """Where the untuned quantization of this plan text, on these weights and this log8 grid, is cached."""
    key = hashlib.sha256(f"{weights_hash}|{plan_text}|{octave}".encode()).hexdigest()[:16]
    return Path(cache) / f"{key}.safetensors"


def load_cache(path: Path, model) -> tuple[dict, dict]:
    from safetensors import safe_open

    from shrink_core.compression.apply import QuantState
    from shrink_core.compression.rotate import Rotation

    states = {}
    with safe_open(str(path), "pt") as f:
        info, meta = json.loads(f.metadata()["states"]), json.loads(f.metadata()["meta"])
        with torch.no_grad():
            for name, fields in info.items():
                model.get_submodule(name).weight.copy_(f.get_tensor(f"{name}.weight"))
                rotation = None if fields["rotation"] is None else Rotation(*fields["rotation"])
                states[name] = QuantState(fields["bits"], fields["group_size"], fields["symmetric"],
                                          f.get_tensor(f"{name}.scale"), f.get_tensor(f"{name}.zero"),
                                          rotation=rotation, scales=fields["scales"])
    return states, meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--plan", required=True, help="the plan; its `tune`, if any, is the `base` variant's spec")
    parser.add_argument("--variants", default="none,base")
    parser.add_argument("--slices", default=",".join(SLICES))
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=2)
    parser.add_argument("--octave", type=int, default=None, help="patch the log8 grid's steps an octave (32)")
    parser.add_argument("--tune-mix", default=None, help="the mix the rowsN rows are drawn from (default: the plan's)")
    parser.add_argument("--cache", default=None, help="folder for the untuned quantization (safetensors)")
    parser.add_argument("--out", default=f"bench/results/tune-variants-{time.strftime('%Y-%m-%d')}")
    args = parser.parse_args()

    import shrink_core.compression.primitives as primitives
    from shrink_core.compression import calibrate
    from shrink_core.compression.apply import apply_plan_
    from shrink_core.compression.tune import TunedScales, tune_scales_
    from shrink_core.evaluation.calibration import CalibrationRecipe, calibration_tokens, plan_calibration, recipe_for
    from shrink_core.formats import weight_bytes
    from shrink_core.model.load import load
    from shrink_core.plan import load_plan
    from shrink_core.plan.spec import TuneSpec
    from shrink_core.sensitivity.probe import eval_tokens

    if args.octave:
        primitives.LOG_STEPS_PER_OCTAVE = args.octave  # log_levels / from_log_levels read the module global
    text = Path(args.plan).read_text()
    plan = load_plan(text)
    base_spec = plan.tune or TuneSpec()
    untuned = replace(plan, tune=None)
    variants = [(name, *parse_variant(name, base_spec)) for name in args.variants.split(",")]
    if args.tune_mix and any(spec is not None and not rows.get("rows") for _, spec, rows in variants):
        raise SystemExit("--tune-mix draws the rowsN rows: give every tuned variant a rowsN part (e.g. base+rows64).")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = (out_dir / "peers.jsonl").open("a")

    loaded = load(args.model)
    reference = loaded.model.eval()
    slices = args.slices.split(",")
    recipe = recipe_for(plan)
    mix = dict(recipe.mix)
    tune_recipe = replace(recipe, mix=CalibrationRecipe.parse(args.tune_mix).mix) if args.tune_mix else recipe
    calibration = plan_calibration(plan, loaded.tokenizer)[0]
    ids = {s: eval_tokens(loaded.tokenizer, s, args.windows, args.seq_len) for s in slices}
    ref_hidden = {s: final_hidden_states(reference, ids[s], args.chunk) for s in slices}
    octave = args.octave or primitives.LOG_STEPS_PER_OCTAVE
    cached = cache_file(args.cache, loaded.weights_hash, text, octave) if args.cache else None
    quantized = copy.deepcopy(reference)
    if cached and cached.is_file():
        states, meta = load_cache(cached, quantized)
        quantize_seconds = meta["seconds"]
    else:
        started = time.perf_counter()
        report = apply_plan_(quantized, untuned, calibration, reference=reference)
        quantize_seconds = time.perf_counter() - started
        states = {n: state for n, (_, state) in targets_of(quantized, report.quant_states).items()}
        if cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            save_cache(cached, quantized, states, {"seconds": quantize_seconds})
    stored = sum(weight_bytes(tuple(quantized.get_submodule(n).weight.shape), s.bits, s.group_size, s.symmetric,
                              None, s.scales) for n, s in states.items())
    params = sum(quantized.get_submodule(n).weight.numel() for n in states)
    common = {"plan": args.plan, "octave": octave, "quantize_seconds": round(quantize_seconds, 1),
              "bits_per_weight": round(stored * 8 / params, 5), "modules": len(states)}
    autocast = calibrate.fast_forward_dtype(quantized)
    for name, spec, rows in variants:
        model = copy.deepcopy(quantized)
        extra = {}
        if spec is not None:
            train = calibration
            if rows.get("rows"):
                train = calibration_tokens(loaded.tokenizer, replace(tune_recipe, n_sequences=rows["rows"]))
            if rows.get("rand"):
                noise = torch.randint(0, reference.config.vocab_size, (rows["rand"], train.shape[1]),
                                      generator=torch.Generator().manual_seed(2))
                train = torch.cat([train, noise.to(train.dtype)])
            built = []
            tuner = codes_tuner(rows["codes"], built) if rows.get("codes") else TunedScales
            done = tune_scales_(model, reference, targets_of(model, states), train, spec, autocast=autocast,
                                tuner=tuner)
            done.pop("states")
            extra = {"tune_spec": {"steps": spec.steps, "lr": spec.lr, "batch": spec.batch, "holdout": spec.holdout,
                                   "rows": len(train)},
                     **tune_fields(done)}
            if rows.get("codes"):
                total = sum(t.codes.numel() for t in built)
                extra["codes_changed"] = {"lr": rows["codes"], "changed": sum(t.changed() for t in built),
                                          "of": total}
            if args.tune_mix:
                extra["tune_mix"] = dict(tune_recipe.mix)
        method = f"tune:{name}" + (f":octave{octave}" if args.octave else "") + (":tunemix" if args.tune_mix else "")
        for s in slices:
            t0 = time.perf_counter()
            figures = measure(reference, model, ids[s], ref_hidden[s], args.chunk)
            emit({"part": "slice", "method": method, **common, **extra, "slice": s, "calibrated": s in mix,
                  **figures, "eval_seconds": round(time.perf_counter() - t0, 1)}, handle)
        del model
    handle.close()
    (out_dir / "table.md").write_text(render(out_dir / "peers.jsonl"))
    print((out_dir / "table.md").read_text(), end="")


if __name__ == "__main__":
    main()
