"""The project's methods and the peers side by side: the same windows, the same KL, exact bits per weight.

  python bench/bench_peers.py [--model builtin:smollm2-135m] [--slices en,fr,de,es,ru,zh,ja,ar,hi]
                              [--windows 16] [--seq-len 512] [--methods rtn-w4g64,q4_k,...] [--out DIR] [--quick]
                              [--calibration en=1] [--calib-sequences 64] [--calib-len 512]
  python bench/bench_peers.py --render DIR/peers.jsonl ...  # the markdown table of runs (a run writes table.md)
  python bench/bench_peers.py --paired DIR/peers.jsonl... A B  # per slice, B minus A on the same windows, 95% CI
  [--plan FILE.yaml ...]: also a whole plan (the planner's, bench_mixed.py), as one row, with its own calibration
  [--preset NAME,...]: also the engine's presets by name, each as the Plan page applies it (its own calibration,
  rotation and tuning), a row `preset:NAME`
  [--table]: every peer (RTN, HQQ, llama.cpp's types with and without an imatrix, llm-compressor) and every preset
  that quantizes every block linear: the whole per-language table in one run (docs/methods.md; hours on 2 cores)
  [--shrink A]: GPTQ's full statistics (1 - A) M + A diag(M) (default: the recipe's; 0: raw, as before 2026-12-03)
  [--device cuda]: the models on a GPU, float32 without TF32; the engine's own plans only (the peers and the
  bench-only patches are skipped there). Not yet run on a GPU: no session with one has had the model's weights there
  (SmolLM2's 270 MB exceed the device tool's 64 MiB a call; files carried in earlier calls stay on a warm machine).

Every method quantizes all block linears (the embedding and the tied head stay fp32, as the peers keep them) of a
fresh copy of the model; each slice's windows are `--windows` x `--seq-len` tokens of its EVAL rows
(shrink_core.sensitivity.probe.eval_tokens, the fixed evaluation order). Per method x slice: mean KL(reference || q)
per scored token (nats), the p99 of per-token KL, top-1 agreement with the reference, and a bootstrap 95% CI of the
mean over windows; per method the exact bits per weight of the quantized modules (codes, scales and zeros as stored)
and the wall seconds the quantization took. Logits go through the evaluation runner's own head path
(shrink_core.evaluation.evaluate._logprobs). A slice outside the calibration mix (hi: UDHR) is reported
with `calibrated: false`. --quick: 2 windows x 128 tokens, en and fr, rtn-w4g64 and q4_k (a smoke run).

Methods: the project's RTN, GPTQ and GPTQ-seq (w4g64, w3g64), llama.cpp's types through the engine's bit-exact codecs
with llama.cpp's reference quantizer (`q4_k`) and with an importance matrix from the calibration mix (`q4_k-imatrix`),
HQQ (the `hqq` package, g64) and llm-compressor's GPTQ when installed (requirements-bench.txt, `./run bench-peers`);
a peer that is not installed prints one `skipped` line. Tried and not adopted (docs/methods.md), measured only when
named in --methods: AWQ-style scaling before RTN or GPTQ-seq (`awq-*`, bench/awq_fold.py) and learned rounding
(`signround-w4g64`, `signround-w3g64`, bench/signround.py; `SIGNROUND_STEPS`, default 100), gptq-seq's codes
refined by it on gptq-seq's own grid (`gptq-seq-signround-w4g64`, `-w3g64`), and inputs rotated by random orthogonal
matrices before RTN, GPTQ or gptq-seq and folded back after (`rot-gptq-seq-w3g64`, ...; bench/rotate_fold.py), and
the engine's own input rotation (`had-...`: the plan's `rotate: hadamard`, a signed Hadamard Kronecker a small random
orthogonal matrix, which a runtime can apply fast; shrink_core/compression/rotate.py), and gptq-seq with the group
scales then tuned end to end against the reference's logits (`e2e-gptq-seq-w3g64`, `e2e-had-gptq-seq-w3g64`, ...: the
plan's `tune: scales`, shrink_core/compression/tune.py; `E2E_STEPS`, default 100, `E2E_LR`, default: by bit-width, tune.auto_lr).
Every calibrated method (gptq, gptq-seq, imatrix, awq, signround) draws the same calibration tokens: the default
recipe's mix, `--calib-sequences` x `--calib-len` tokens (default: the w4g64 preset's recipe), or the mix given
with --calibration.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_fair import bootstrap  # noqa: E402

SLICES = ("en", "fr", "de", "es", "ru", "zh", "ja", "ar", "hi")
GGML_TYPES = ("Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q3_K", "IQ4_XS")
INSTALL = "./run bench-peers (pip install -c requirements.txt -r requirements-bench.txt)"
# --table: every peer issue 17 names and every quantization preset, one row each (docs/methods.md, "The table")
TABLE_METHODS = ("rtn-w4g64,rtn-w3g64,hqq-w4g64,hqq-w3g64,gptq-w4g64,gptq-w3g64,llmcompressor-gptq-w4a16,"
                 + ",".join(f"{t.lower()}{s}" for s in ("", "-imatrix") for t in GGML_TYPES))
TABLE_PRESETS = ("w8,w4g128,w4g64,w4g64-hq,w4g64-rot,w4g64-rot-tuned,w4-log8-rot,w4-log8-rot-tuned,w3g64,w3g64-rot,"
                 "w3g64-rot-tuned,w3g32-log8-rot,w3g32-log8-rot-tuned,w3-log8-rot-tuned-hq")  # not keep-ends, pruning


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # plan (the engine: project methods and llama.cpp types), planfile, signround, hqq, llmcompressor
    weights: dict | None = None  # the plan rule's weights (family plan)
    bits: int | None = None  # hqq, signround
    group_size: int | None = None  # hqq, signround
    path: str | None = None  # planfile: a plan YAML over the block linears
    preset: str | None = None  # planfile: an engine preset by name (shrink_core.plan.presets), its own calibration
    awq: bool = False  # plan: AWQ-style scales folded in first (bench/awq_fold.py), searched at the rule's format
    refine: bool = False  # plan: the rule's codes then refined by learned rounding on its grid (bench/signround.py)
    # plan: inputs rotated first, folded back: "orthogonal" (dense, bench/rotate_fold.py) or "hadamard" (the engine's
    # plan option `rotate: hadamard`)
    rotate: str | None = None
    e2e: bool = False  # plan: then the group scales tuned end to end (the engine's plan option `tune: scales`)
    lut: bool = False  # plan: per-row codebooks in place of the uniform grid (bench/lut_quant.py; group_size channel)
    default: bool = True  # measured by a run without --methods (tried-and-not-adopted methods run only when named)


def methods() -> dict[str, Method]:
    """Every method, in the order a full run measures them: the project's, HQQ, llama.cpp's types, then with imatrix."""
    out = [Method(f"{method}-w{bits}g64", "plan", {"bits": bits, "group_size": 64, "method": method})
           for method in ("rtn", "gptq", "gptq-seq") for bits in (4, 3)]
    out += [Method(f"awq-{method}-w{bits}g64", "plan", {"bits": bits, "group_size": 64, "method": method},
                   awq=True, default=False)
            for method in ("rtn", "gptq-seq") for bits in (4, 3)]
    out += [Method(f"{prefix}-{method}-w{bits}g64", "plan", {"bits": bits, "group_size": 64, "method": method},
                   rotate=kind, default=False)
            for prefix, kind in (("rot", "orthogonal"), ("had", "hadamard"))
            for method in ("rtn", "gptq", "gptq-seq") for bits in (4, 3)]
    out += [Method(f"{prefix}lut-gptq-seq-w{bits}", "plan", {"bits": bits, "group_size": "channel",
                                                               "method": "gptq-seq"},
                   rotate=rotate, lut=True, default=False)
            for prefix, rotate in (("", None), ("had-", "hadamard")) for bits in (3, 2)]
    out += [Method(f"e2e-{prefix}gptq-seq-w{bits}g64", "plan", {"bits": bits, "group_size": 64, "method": "gptq-seq"},
                   rotate=rotate, e2e=True, default=False)
            for prefix, rotate in (("", None), ("had-", "hadamard")) for bits in (4, 3)]
    # the other group sizes, rotated and tuned: what a finer or coarser grid buys at 3 bits (bits per weight differ)
    out += [Method(f"{prefix}had-gptq-seq-w3g{group}", "plan", {"bits": 3, "group_size": group, "method": "gptq-seq"},
                   rotate="hadamard", e2e=e2e, default=False)
            for prefix, e2e in (("", False), ("e2e-", True)) for group in (32, 128)]
    # the same with log8 group scales (the plan's `scales: log8`): g32 fits in w3 g64's 3.375 bits per weight
    out += [Method(f"{prefix}had-gptq-seq-w3g{group}-s8", "plan", {"bits": 3, "group_size": group,
                                                                  "method": "gptq-seq", "scales": "log8"},
                   rotate="hadamard", e2e=e2e, default=False)
            for prefix, e2e in (("", False), ("e2e-", True)) for group in (32, 64)]
    out += [Method(f"signround-w{bits}g64", "signround", bits=bits, group_size=64, default=False) for bits in (4, 3)]
    out += [Method(f"gptq-seq-signround-w{bits}g64", "plan", {"bits": bits, "group_size": 64, "method": "gptq-seq"},
                   refine=True, default=False) for bits in (4, 3)]
    out += [Method(f"hqq-w{bits}g64", "hqq", bits=bits, group_size=64) for bits in (4, 3)]
    out += [Method("llmcompressor-gptq-w4a16", "llmcompressor")]
    out += [Method(f"{ggml.lower()}{suffix}", "plan", {"ggml": ggml, "method": method})
            for method, suffix in (("rtn", ""), ("imatrix", "-imatrix")) for ggml in GGML_TYPES]
    return {m.name: m for m in out}


# ---------------------------------------------------------------- pure arithmetic (tests/test_bench_peers.py)


def token_kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(ref || p), the definition of probe.kl_and_nll and bench_fair before their per-sequence mean, and
    whether the two top-1 tokens agree: (n,), (n,) from log-probs (n, vocab)."""
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0)  # (n,)
    return kl, ref_logp.argmax(-1) == logp.argmax(-1)


def slice_figures(kl: np.ndarray, agree: np.ndarray) -> dict:
    """kl, agree: (windows, scored tokens per window). Mean KL per token, its p99, top-1 agreement, and a bootstrap 95%
    CI of the mean over windows (windows have equal length, so the mean of window means is the mean per token)."""
    return {"kl": round(float(kl.mean()), 5), "kl_p99": round(float(np.percentile(kl, 99)), 5),
            "top1_agree": round(float(agree.mean()), 5), "ci95": bootstrap(kl.mean(axis=1)),
            "windows": int(kl.shape[0]), "tokens": int(kl.size),
            "window_kl": [round(float(v), 6) for v in kl.mean(axis=1)]}  # for paired differences between rows


def paired(paths: list[Path], first: str, second: str) -> dict[str, dict]:
    """Per slice, the second method's KL minus the first's over the same windows: the mean difference and a bootstrap
    95% CI over windows (rows measured on the same windows share their noise; separate CIs overstate it). Runs with
    the same --seq-len read the same windows in the same order (probe.eval_tokens' fixed stream), so the two rows may
    come from different runs, and a run of more windows pairs with one of fewer over the windows they share. Methods
    are named as in the runs' lines (`plan:FILE` for a plan); `METHOD@FILE` reads that row from FILE only (the same
    method from two runs)."""
    found: dict[str, dict[str, np.ndarray]] = {first: {}, second: {}}
    per_window: dict[str, dict[str, float]] = {first: {}, second: {}}
    for label in found:
        method, _, only = label.partition("@")
        for path in [Path(only)] if only else paths:
            for line in path.read_text().splitlines():
                part = json.loads(line)
                if part.get("part") == "slice" and part["method"] == method and "window_kl" in part:
                    found[label][part["slice"]] = np.array(part["window_kl"])
                    if part.get("tokens") and part.get("windows"):
                        per_window[label][part["slice"]] = part["tokens"] / part["windows"]
    missing = [m for m in found if not found[m]]
    if missing:
        raise SystemExit(f"{', '.join(map(str, paths))}: no per-window KL for {', '.join(missing)} (runs before "
                         "2026-12-03 kept none).")
    out = {}
    for s in found[first]:
        if s in found[second]:
            a, b = found[first][s], found[second][s]
            lengths = {per_window[first].get(s), per_window[second].get(s)}
            if len(a) != len(b) and (None in lengths or len(lengths) > 1):
                raise SystemExit(f"{first} and {second} were measured on different windows of {s}; pair runs made "
                                 "with the same --seq-len.")
            n = min(len(a), len(b))  # the windows both runs read
            diff = b[:n] - a[:n]
            out[s] = {"difference": round(float(diff.mean()), 5), "ci95": bootstrap(diff),
                      "ratio": round(float(b[:n].mean() / a[:n].mean()), 4), "windows": n}
    return out


def markdown_table(rows: list[dict], calibrated: dict[str, bool]) -> str:
    """The per-language table (one row per method, a column per slice, the worst calibrated and overall slice) from
    the `table` part's rows: KL mean, the slices outside the calibration mix marked with *."""
    slices = list(calibrated)
    head = ["method", "bits/weight", "quantize s"] + [s if calibrated[s] else f"{s}*" for s in slices]
    head += ["worst calibrated", "worst"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        kl = row["kl"]
        inside = {s: kl[s] for s in slices if calibrated[s] and s in kl}
        worst_in = max(inside, key=inside.get) if inside else None
        worst = max(kl, key=kl.get)
        cells = [row["method"], f"{row['bits_per_weight']:.3f}", f"{row['quantize_seconds']:.0f}"]
        cells += [f"{kl[s]:.3f}" if s in kl else "" for s in slices]
        cells += [f"{inside[worst_in]:.3f} ({worst_in})" if worst_in else "", f"{kl[worst]:.3f} ({worst})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CALIBRATED = ("gptq", "gptq-seq", "imatrix")


def row_label(method: str, recipe: dict | None) -> str:
    """A calibrated method's row names its calibration where a run used another than the default (the w4g64
    preset's: 64 x 512 tokens of the default mix, statistics shrunk by the default share), so runs at other sizes
    render as rows of their own; a recipe stored before `shrink` existed (version 1) computed raw statistics (the
    imatrix reads only their diagonals, which shrinking keeps, so its rows do not say)."""
    from shrink_core.evaluation.calibration import RECIPE_KEYS
    from shrink_core.plan.presets import QUANT_RECIPE
    from shrink_core.plan.spec import HESSIAN_METHODS

    spec = methods().get(method)
    if recipe is None or spec is None or spec.weights is None or spec.weights.get("method") not in CALIBRATED:
        return method
    shrink = recipe.get("shrink", 0.0)
    full = spec.weights.get("method") in HESSIAN_METHODS  # the imatrix reads diagonals, which shrinking keeps
    statistics = ("" if not full or shrink == QUANT_RECIPE["shrink"] else ", raw statistics" if not shrink
                  else f", shrink {shrink}")
    tokens = [k for k in RECIPE_KEYS if k not in ("shrink", "version")]  # what decides the calibration tokens
    if not statistics and all(recipe.get(k) == QUANT_RECIPE[k] for k in tokens):
        return method
    mix = "" if recipe.get("mix") == QUANT_RECIPE["mix"] else ", " + ",".join(f"{k}={v}" for k, v in recipe["mix"].items())
    return f"{method} ({recipe['n_sequences']}x{recipe['seq_len']}{mix}{statistics})"


def render(*paths: Path) -> str:
    """The markdown table of one or more runs' peers.jsonl, from their per-slice lines, so a run stopped before its
    closing table (killed, or cut short to free the machine) still renders; a method's row needs every slice, and
    the last file that measured a method (at the same calibration) gives its row."""
    rows: dict[str, dict] = {}
    calibrated: dict[str, bool] = {}
    for path in paths:
        recipe, seen = None, set()
        for line in path.read_text().splitlines():
            part = json.loads(line)
            if part.get("part") == "setup":
                recipe = part.get("calibration")
            if part.get("part") != "slice":
                continue
            calibrated.setdefault(part["slice"], part["calibrated"])
            label = row_label(part["method"], recipe)
            if label not in seen:  # a later run of the same method and recipe replaces the earlier row whole
                seen.add(label)
                rows[label] = {"method": label, "kl": {}, "bits_per_weight": part["bits_per_weight"],
                               "quantize_seconds": part["quantize_seconds"]}
            rows[label]["kl"][part["slice"]] = part["kl"]
    complete = [row for row in rows.values() if set(row["kl"]) == set(calibrated)]
    return markdown_table(complete, calibrated)


def bits_per_weight(stored_bytes: int, params: int) -> float:
    return round(stored_bytes * 8 / params, 5)


def hqq_stored_bytes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, meta_bytes: int = 2) -> int:
    """What an HQQLinear holds: the bit-packed codes as packed (3-bit packs 10 codes per int32) and a float16 scale and
    zero per group (HQQ keeps its meta-data in the compute dtype, float16 by default)."""
    return codes.numel() * codes.element_size() + (scale.numel() + zero.numel()) * meta_bytes


# ---------------------------------------------------------------- quantization


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def quantize_plan(model, method: Method, kinds: list[str], calibration, recipe, reference=None) -> dict:
    from shrink_core.compression.apply import apply_plan_
    from shrink_core.plan import plan_from_dict

    data = {"version": 1, "name": method.name, "rules": [{"kind": kinds, "weights": method.weights}]}
    if method.rotate == "hadamard":
        data["rotate"] = "hadamard"
    if method.e2e:
        data["tune"] = {"kind": "scales", "steps": E2E_STEPS, **({"lr": E2E_LR} if E2E_LR else {})}
    plan = plan_from_dict(data)
    if plan.needs_calibration:
        data["calibration"] = recipe.to_dict()
        plan = plan_from_dict(data)
    started = time.perf_counter()
    report = apply_plan_(model, plan, calibration() if plan.needs_calibration else None, reference=reference)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "spec": plan.rules[0].weights, "states": report.quant_states, "tuning": report.tuning,
            "engine_bytes": {m.name: m.packed_bytes for m in report.modules if m.bits}}


def quantize_hqq(linears: dict[str, torch.nn.Module], method: Method) -> dict:
    from hqq.core.quantize import Quantizer, hqq_base_quant_config

    params = dict(hqq_base_quant_config(nbits=method.bits, group_size=method.group_size)["weight_quant_params"])
    params.pop("view_as_float", None)
    started = time.perf_counter()
    stored = {}
    with torch.no_grad():
        for name, module in linears.items():
            weight = module.weight.data
            codes, meta = Quantizer.quantize(weight, **params, compute_dtype=torch.float16, device="cpu")
            meta["scale"], meta["zero"] = meta["scale"].half(), meta["zero"].half()  # as HQQLinear stores them
            stored[name] = hqq_stored_bytes(codes, meta["scale"], meta["zero"])
            meta = {**meta, "scale": meta["scale"].float(), "zero": meta["zero"].float(),
                    "compute_dtype": torch.float32}
            module.weight.data = Quantizer.dequantize(codes, meta).reshape(weight.shape).to(weight.dtype)
    return {"seconds": time.perf_counter() - started, "stored": stored}


SIGNROUND_STEPS = int(os.environ.get("SIGNROUND_STEPS", "100"))
E2E_STEPS = int(os.environ.get("E2E_STEPS", "100"))  # `tune: scales`: optimizer steps of 2 sequences
E2E_LR = float(os.environ.get("E2E_LR", "0")) or None  # Adam on log-scale offsets, cosine-decayed; unset: by bits


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def quantize_signround(model, method: Method, rows, calibration: torch.Tensor) -> dict:
    """Learned rounding (bench/signround.py) on the recipe's calibration tokens; stored in the project's asymmetric
    format (float16 scale and 8-bit zero per group), so its bytes are those of the same plan rule."""
    from signround import signround_

    from shrink_core.formats import weight_bytes

    done = signround_(model, calibration, method.bits, method.group_size, steps=SIGNROUND_STEPS,
                      log=_stderr)
    stored = {r.name: weight_bytes(r.shape, method.bits, method.group_size, False, None) for r in rows}
    return {"seconds": done["seconds"], "stored": stored,
            "losses": [[round(b["first_loss"], 6), round(b["last_loss"], 6)] for b in done["blocks"]]}


def exact_bytes(rows, result: dict) -> dict[str, int]:
    """Stored bytes per quantized module from shrink_core.formats (the planner's numbers), or HQQ's tensors."""
    from shrink_core.formats import weight_bytes

    if "stored" in result:
        return result["stored"]
    spec = result["spec"]
    out = {r.name: weight_bytes(r.shape, spec.bits, spec.group_size, spec.symmetric, spec.ggml, spec.scales)
           for r in rows}
    if out != result["engine_bytes"]:
        raise SystemExit(f"formats and the engine disagree on the bytes of {result['spec'].label()}")
    return out


def stored_types(rows, spec) -> dict[str, float] | None:
    """llama.cpp types: the share of weights per type actually stored (rows too narrow for a K-quant fall back)."""
    from shrink_core.formats import ggml_row_type

    if spec is None or spec.ggml is None:
        return None
    total = sum(r.params for r in rows)
    shares: dict[str, float] = {}
    for r in rows:
        stored = ggml_row_type(spec.ggml, r.shape[1])
        shares[stored] = shares.get(stored, 0) + r.params / total
    return {k: round(v, 4) for k, v in shares.items()}


def quantize_plan_file(model, method: Method, tokenizer) -> dict:
    """A whole plan (mixed settings), calibrated with its own recipe; every module it compresses must be a block
    linear (the embedding and the head stay fp32 here, as every other row keeps them)."""
    from shrink_core.compression.apply import apply_plan_
    from shrink_core.evaluation.calibration import plan_calibration
    from shrink_core.plan import load_plan

    if method.preset:
        from shrink_core.plan.presets import preset

        plan = preset(method.preset)
    else:
        plan = load_plan(Path(method.path).read_text())
    started = time.perf_counter()
    report = apply_plan_(model, plan, plan_calibration(plan, tokenizer)[0])
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "stored": {m.name: m.packed_bytes for m in report.modules if m.bits},
            "calibration": plan.calibration.to_dict() if plan.calibration else None, "tuning": report.tuning}


def tune_fields(tuning: dict) -> dict:
    """The plan's `tune:` report as row fields: what the held-out check saw and whether it kept the tuned scales."""
    return {f"tune_{k}": round(v, 6) if isinstance(v, float) else v for k, v in tuning.items()}


def quantized_copy(reference, method: Method, rows, calibration, recipe, tokenizer=None) -> tuple[object, dict]:
    """A copy of the model with every block linear quantized by `method`, and what it cost: bits per weight, seconds."""
    model = copy.deepcopy(reference)
    extra = {}
    if method.family == "planfile":
        result = quantize_plan_file(model, method, tokenizer)
        spec, extra = None, {"plan_calibration": result["calibration"]}
        if result["tuning"]:
            extra.update(tune_fields(result["tuning"]))
        outside = sorted(set(result["stored"]) - {r.name for r in rows})
        if outside:
            raise SystemExit(f"{method.path or method.preset} compresses {outside[0]}, which is not a block linear; "
                             "this table keeps the embedding and the head fp32, so plan the block linears only.")
    elif method.family == "hqq":
        result = quantize_hqq({r.name: model.get_submodule(r.name) for r in rows}, method)
        spec = None
    elif method.family == "signround":
        result, spec = quantize_signround(model, method, rows, calibration()), None
        extra = {"signround_steps": SIGNROUND_STEPS, "signround_losses": result.pop("losses")}
    else:
        folded = None
        if method.awq:
            from awq_fold import awq_fold_

            folded = awq_fold_(model, calibration(), method.weights["bits"], method.weights["group_size"])
            extra = {"awq_seconds": round(folded["seconds"], 1),
                     "awq_alphas": [round(g["alpha"], 2) for g in folded["groups"]]}
        rotated = None
        if method.rotate == "orthogonal":
            from rotate_fold import rotate_

            rotated = rotate_(model, rows)
            probe_ids = calibration()[:2, :128]
            with torch.no_grad():
                before, after = reference(input_ids=probe_ids).logits, model(input_ids=probe_ids).logits
            extra = {"rotation_sources": rotated["sources"],
                     "rotated_logits_rel_diff": float((after - before).norm() / before.norm())}
        if method.lut:
            from lut_quant import lut_bytes, lut_engine

            with lut_engine(method.weights["bits"]):
                result = quantize_plan(model, method, list(dict.fromkeys(r.kind for r in rows)), calibration, recipe)
            result["stored"] = {r.name: lut_bytes(r.shape, method.weights["bits"]) for r in rows}
        else:
            result = quantize_plan(model, method, list(dict.fromkeys(r.kind for r in rows)), calibration, recipe,
                                   reference)
        if folded:
            result["seconds"] += folded["seconds"]
        if rotated:
            from rotate_fold import unrotate_

            result["seconds"] += rotated["seconds"] + unrotate_(rotated)
        if method.refine:
            from signround import signround_

            done = signround_(model, calibration(), method.weights["bits"], method.weights["group_size"],
                              steps=SIGNROUND_STEPS, reference=reference,
                              grids={name: (s.scale, s.zero) for name, s in result.pop("states").items()},
                              log=_stderr)
            result["seconds"] += done["seconds"]
            extra = {"signround_steps": SIGNROUND_STEPS, "signround_seconds": round(done["seconds"], 1),
                     "signround_blocks": [{k: round(v, 6) if isinstance(v, float) else v for k, v in b.items()}
                                          for b in done["blocks"]]}
        if method.e2e:
            extra = tune_fields(result["tuning"])
        spec = result["spec"]
    stored = exact_bytes(rows, result)
    if len(stored) != len(rows):
        raise SystemExit(f"{method.name} quantized {len(stored)} modules, not the {len(rows)} block linears")
    params = sum(r.params for r in rows)
    return model.eval(), {"method": method.name, "bits_per_weight": bits_per_weight(sum(stored.values()), params),
                          "quantize_seconds": round(result["seconds"], 1), "stored_as": stored_types(rows, spec),
                          **extra}


# ---------------------------------------------------------------- measurement


def flat_positions(windows: int, length: int) -> torch.Tensor:
    """Every position but each window's last, in the (windows * length) flattening: the positions that predict."""
    return (torch.arange(windows)[:, None] * length + torch.arange(length - 1)).reshape(-1)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def final_hidden_states(model, ids: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model.get_decoder()(input_ids=part.to(model_device(model))).last_hidden_state
                for part in ids.split(chunk)]


def measure(reference, model, ids: torch.Tensor, ref_hidden: list[torch.Tensor], chunk: int) -> dict:
    from shrink_core.evaluation.evaluate import _logprobs
    from shrink_core.evaluation.protocol import SCORED_POSITIONS

    kl_parts, agree_parts = [], []
    with torch.inference_mode():
        for part, ref_part in zip(ids.split(chunk), ref_hidden):
            hidden = model.get_decoder()(input_ids=part.to(model_device(model))).last_hidden_state
            positions = flat_positions(part.shape[0], part.shape[1]).to(hidden.device)
            pairs = [token_kl(_logprobs(reference, ref_part, where), _logprobs(model, hidden, where))
                     for where in positions.split(SCORED_POSITIONS)]
            kl, agree = (torch.cat(values).cpu() for values in zip(*pairs))
            kl_parts.append(kl.double().numpy().reshape(part.shape[0], -1))
            agree_parts.append(agree.numpy().reshape(part.shape[0], -1))
    return slice_figures(np.concatenate(kl_parts), np.concatenate(agree_parts))


def emit(figures: dict, handle) -> None:
    line = json.dumps({**figures, "load_average": [round(x, 2) for x in os.getloadavg()]})
    print(line, flush=True)
    handle.write(line + "\n")
    handle.flush()


def skip_reason(method: Method, device: str = "cpu") -> str | None:
    if device != "cpu" and (method.family not in ("plan", "planfile") or method.awq or method.refine or method.lut
                            or method.rotate == "orthogonal"):
        return (f"on --device {device} only the engine's own plans run (the peers and the bench-only patches assume "
                "the CPU); run this method with --device cpu")
    if method.family == "hqq" and not installed("hqq"):
        return f"the hqq package is not installed; install it with {INSTALL}"
    if method.family == "llmcompressor":
        if not installed("llmcompressor"):
            return ("llmcompressor is not installed, and no release installs beside requirements.txt's pins "
                    "(0.14.0.1 needs transformers<=5.17.0; older ones pyyaml<=6.0.3 or numpy<2); see "
                    f"requirements-bench.txt; the bench's optional peers install with {INSTALL}")
        return ("llmcompressor imports, but this bench has no runner for it yet: it could not be installed beside "
                "requirements.txt to write and check one")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--slices", default=",".join(SLICES))
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--methods", default=None, help="comma list (default: every method; peers not installed "
                                                        "print a skipped line)")
    parser.add_argument("--calibration", default=None,
                        help="calibration mix for the calibrated methods, e.g. en=1 or en=0.5,fr=0.5 (default: the "
                             "default recipe's multilingual mix)")
    parser.add_argument("--calib-sequences", type=int, default=None, help="calibration windows (default: the w4g64 preset's)")
    parser.add_argument("--calib-len", type=int, default=None, help="calibration window tokens (default: the w4g64 preset's)")
    parser.add_argument("--shrink", type=float, default=None,
                        help="the share of GPTQ's full statistics' off-diagonal part removed (default: the recipe's, "
                             "evaluation/calibration.SHRINK_DEFAULT; 0: the raw statistics)")
    parser.add_argument("--chunk", type=int, default=2, help="windows per forward")
    parser.add_argument("--device", default="cpu",
                        help="where the models run (cuda: the engine's own plans only, float32 without TF32, so the "
                             "figures are the CPU's up to summation order)")
    parser.add_argument("--out", default=None, help="folder for peers.jsonl (default bench/results/peers-DATE)")
    parser.add_argument("--render", nargs="+", default=None, metavar="PEERS_JSONL",
                        help="print the markdown table of one or more runs' peers.jsonl and exit")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 x 128 tokens, en,fr, rtn-w4g64,q4_k")
    parser.add_argument("--table", action="store_true",
                        help="every peer and every preset that quantizes every block linear (TABLE_METHODS, "
                             "TABLE_PRESETS): the whole table")
    parser.add_argument("--plan", action="append", default=[], metavar="PLAN_YAML",
                        help="also measure this plan (mixed settings over the block linears, its own calibration); "
                             "its row is plan:PATH")
    parser.add_argument("--preset", action="append", default=[], metavar="NAMES",
                        help="also measure these engine presets (comma list; each with its own calibration and "
                             "tuning, as the Plan page's preset menu applies it); a row is preset:NAME")
    parser.add_argument("--paired", nargs="+", default=None, metavar="PEERS_JSONL... A B",
                        help="print method B minus method A per slice over the same windows (95%% CI), from one or "
                             "more runs' peers.jsonl (or A and B as METHOD@FILE), and exit")
    args = parser.parse_args()
    if args.render:
        print(render(*map(Path, args.render)), end="")
        return
    if args.paired:
        if len(args.paired) < 3 and not all("@" in m for m in args.paired[-2:]):
            parser.error("--paired takes one or more peers.jsonl files, then the two methods to compare (or two "
                         "METHOD@FILE)")
        print(json.dumps(paired([Path(p) for p in args.paired[:-2]], *args.paired[-2:]), indent=1))
        return
    missing = [p for p in args.plan if not Path(p).is_file()]
    if missing:
        raise SystemExit(f"--plan {missing[0]}: no such file; give the plan.yaml bench_mixed.py wrote.")
    from shrink_core.plan.presets import preset_names

    if args.table:
        args.methods = ",".join(filter(None, [args.methods, TABLE_METHODS]))
        args.preset.append(TABLE_PRESETS)
    presets = [name for names in args.preset for name in names.split(",") if name]
    unknown = [name for name in presets if name not in preset_names()]
    if unknown:
        raise SystemExit(f"--preset {unknown[0]}: no such preset; choose from {', '.join(preset_names())}.")
    if args.quick:
        args.windows, args.seq_len, args.slices, args.methods = 2, 128, "en,fr", args.methods or "rtn-w4g64,q4_k"
    menu = methods()
    named = args.methods or ("" if args.plan or presets else ",".join(n for n, m in menu.items() if m.default))
    chosen = named.split(",")
    chosen = [m for m in chosen if m]
    unknown = [m for m in chosen if m not in menu]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(menu)}")
    for path in args.plan:
        menu[f"plan:{path}"] = Method(f"plan:{path}", "planfile", path=path)
        chosen.append(f"plan:{path}")
    for name in presets:
        menu[f"preset:{name}"] = Method(f"preset:{name}", "planfile", preset=name)
        chosen.append(f"preset:{name}")

    from shrink_core.evaluation.calibration import CalibrationRecipe, calibration_tokens
    from shrink_core.model.inventory import block_linears, inventory
    from shrink_core.model.load import load
    from shrink_core.plan.presets import preset
    from shrink_core.sensitivity.probe import eval_tokens

    out_dir = Path(args.out or f"bench/results/peers-{time.strftime('%Y-%m-%d')}")
    out_dir.mkdir(parents=True, exist_ok=True)
    handle = (out_dir / "peers.jsonl").open("w")
    if args.device != "cpu":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 as on the CPU
    loaded = load(args.model)
    reference = loaded.model.eval().to(args.device)
    where = "CPU" if args.device == "cpu" else f"{args.device} ({torch.cuda.get_device_name()})"
    rows = block_linears(inventory(reference))
    kinds = list(dict.fromkeys(r.kind for r in rows))
    params = sum(r.params for r in rows)
    slices = args.slices.split(",")
    default = preset("w4g64").calibration or CalibrationRecipe()  # the recipe the 4-bit preset calibrates with
    recipe = CalibrationRecipe.parse(args.calibration or ",".join(f"{k}={v}" for k, v in default.mix),
                                     args.calib_sequences or default.n_sequences, args.calib_len or default.seq_len)
    if args.shrink is not None:
        from dataclasses import replace

        recipe = replace(recipe, shrink=args.shrink)
    mix = dict(recipe.mix)
    ids = {s: eval_tokens(loaded.tokenizer, s, args.windows, args.seq_len) for s in slices}
    started = time.perf_counter()
    ref_hidden = {s: final_hidden_states(reference, ids[s], args.chunk) for s in slices}
    emit({"part": "setup", "model": args.model, "weights_hash": loaded.weights_hash, "quantized_modules": len(rows),
          "quantized_params": params, "kinds": kinds, "kept_fp32": "embedding and the tied head",
          "eval": f"{args.windows} x {args.seq_len} tokens of each slice's eval rows (probe.eval_tokens); "
                  f"KL(reference || q) per scored token, nats; {where} fp32",
          "slices": {s: {"calibrated": s in mix} for s in slices}, "calibration": recipe.to_dict(),
          "reference_seconds": round(time.perf_counter() - started, 1), "torch_threads": torch.get_num_threads(),
          "device": where},
         handle)
    calibration_cache: list = []

    def calibration():
        if not calibration_cache:
            calibration_cache.append(calibration_tokens(loaded.tokenizer, recipe))
        return calibration_cache[0]

    table, complete = [], False
    try:  # an interrupted run (Ctrl+C) still ends with the table of the methods it measured
        for name in chosen:
            method = menu[name]
            reason = skip_reason(method, args.device)
            if reason:
                emit({"method": name, "skipped": reason}, handle)
                continue
            model, common = quantized_copy(reference, method, rows, calibration, recipe, loaded.tokenizer)
            per_slice = {}
            for s in slices:
                t0 = time.perf_counter()
                figures = measure(reference, model, ids[s], ref_hidden[s], args.chunk)
                per_slice[s] = figures
                emit({"part": "slice", **common, "slice": s, "calibrated": s in mix, **figures,
                      "eval_seconds": round(time.perf_counter() - t0, 1)}, handle)
            worst = max(per_slice, key=lambda s: per_slice[s]["kl"])
            table.append({**common, "kl": {s: f["kl"] for s, f in per_slice.items()},
                          "kl_p99": {s: f["kl_p99"] for s, f in per_slice.items()},
                          "top1_agree": {s: f["top1_agree"] for s, f in per_slice.items()},
                          "worst": {"slice": worst, "kl": per_slice[worst]["kl"]}})
            del model
        complete = True
    finally:
        emit({"part": "table", "complete": complete, "model": args.model, "windows": args.windows,
              "seq_len": args.seq_len, "slices": {s: {"calibrated": s in mix} for s in slices}, "rows": table}, handle)
        handle.close()
        (out_dir / "table.md").write_text(render(out_dir / "peers.jsonl"))


if __name__ == "__main__":
    main()
