"""Peak memory of a job before it runs, from the model's inventory and the job's settings (pure math), and the one
sentence that refuses a job that will not fit.

A prediction is the sum of named parts, so the page can say what dominates:
- process: Python, torch, transformers and a tokenizer (measured 0.39-0.46 GB on this machine);
- weights: every parameter at the dtype the model runs in;
- the job's working set: full-vocabulary logits of one batch (the largest transient of evaluation and of the fast
  scan's backward pass), the probe cache (every block's input for the probe sequences), kept Fisher statistics (or
  none, when streamed), GPTQ's Hessians and calibration activations, the float32 copy of the largest weight being
  quantized.
The factors on the logits and activations were fitted on bench/bench_scale.py's runs (docs/scale.md): 135M to 8B
parameters, fp32 and bf16; the test checks the prediction against measured peak RSS on the built-in model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from shrink_core.evaluation.protocol import SCORED_POSITIONS

PROCESS_BYTES = 500 * 1000**2
LOGITS_COPIES = 3.7  # logits float32 + log-softmax + the gathered / exp temporaries of one batch (fitted)
BACKWARD_COPIES = 3.2  # logits float32 + softmax + their gradient in the Fisher pass (fitted)
TUNE_LOGIT_COPIES = 8  # a tuning step's logit-sized tensors (tuning_phase; counted, and measured to within 2%)
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
# The memory limits the jobs keep to are defined here, once, and imported where they act:
STATS_BYTES_CAP = 2 << 30  # the fast scan streams its Fisher statistics above this (sensitivity/scan.py)
STACK_BYTES = 256 << 20  # a batch's per-sequence gradients of one module are stacked below this (sensitivity/fisher.py)
REFERENCE_CACHE_BYTES = 1 << 30  # probe caches keep reference log-probs below this (sensitivity/probe.py)
ROW_CHUNK_BYTES = 64 << 20  # float32 bytes of the rows quantized at once (compression/primitives.py)
RECOMPUTE_ABOVE = 1 << 30  # a Fisher batch's whole graph above this is recomputed block by block (sensitivity/fisher.py)
BACKWARD_BYTES = 2 << 30  # the Fisher pass's batch keeps at most this much autograd graph (sensitivity/scan.py)


@dataclass(frozen=True)
class ModelFacts:
    params: int
    dtype: str
    hidden: int
    intermediate: int
    vocab: int
    blocks: int
    linear_params: int  # block linears
    largest_linear: int  # elements of the largest block linear
    largest_input: int  # the widest input of a block linear (a Hessian is input x input)
    device: str = "cpu"  # where the job's tensors live: cpu, cuda, cuda:N or mps (its memory must hold them)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 4)

    @staticmethod
    def from_inventory(summary: dict, modules: list[dict], dtype: str | None = None, device: str = "cpu") -> ModelFacts:
        """From a stored model description (summary + inventory rows, as the Model page keeps them)."""
        linears = [m for m in modules if m.get("block") is not None and m["kind"] not in ("norm",)
                   and m.get("block") == m.get("block")]
        shapes = [tuple(int(x) for x in str(m["shape"]).split("x")) for m in linears]
        return ModelFacts(
            params=int(summary["parameters"]), dtype=dtype or str(summary.get("dtype") or "float32"),
            hidden=int(summary.get("hidden_size") or 0), intermediate=int(summary.get("intermediate_size") or 0),
            vocab=int(summary.get("vocab_size") or 0), blocks=int(summary.get("blocks") or 0),
            linear_params=sum(a * b for a, b in shapes), largest_linear=max((a * b for a, b in shapes), default=0),
            largest_input=max((b for _, b in shapes), default=0), device=device)


@dataclass(frozen=True)
class Footprint:
    job: str
    parts: dict[str, int]  # bytes per named part

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        top = max((k for k in self.parts if k != "process"), key=self.parts.get, default="weights")
        return f"about {self.total / 1e9:.1f} GB at peak (of which {top}: {self.parts[top] / 1e9:.1f} GB)"

    def to_dict(self) -> dict:
        return {"kind": "projected", "job": self.job, "total_bytes": self.total, "parts": self.parts,
                "from": "perf/footprint.py: inventory x dtype + the job's working set (factors fitted on "
                        "bench/bench_scale.py)"}


def _base(facts: ModelFacts) -> dict[str, int]:
    return {"process": PROCESS_BYTES, "weights": facts.params * facts.dtype_bytes}


def evaluation(facts: ModelFacts, max_batch_tokens: int = 1024, reference: bool = False) -> Footprint:
    """An evaluation run (a candidate against its reference doubles the weights and the logits). Log-probs exist a
    chunk of SCORED_POSITIONS at a time, whatever the batch."""
    parts = _base(facts)
    positions = min(max_batch_tokens, SCORED_POSITIONS)
    parts["logits"] = int(positions * facts.vocab * 4 * LOGITS_COPIES * (2 if reference else 1))
    if reference:
        parts["reference weights"] = facts.params * facts.dtype_bytes
    return Footprint("evaluation", parts)


def apply(facts: ModelFacts, calibration: tuple[int, int] | None = None, batch: int = 8,
          sequential: bool = False, tune: tuple[int, int] | None = None) -> Footprint:
    """Applying a plan: the float32 copy of the largest (stacked) weight being quantized; with calibration, each block's
    Hessians (input x input, float32, up to four inputs) and its calibration activations in and out. A sequential
    method (gptq-seq) adds the full-precision side: a copy of the block, a second stream of block inputs, the
    float32 inputs of every block linear's source for the whole calibration set (or, at the down stage, down's twice:
    the full-precision ones and those the output pass reuses), and the settled attention's outputs
    that the later stages reuse (compression/calibrate.py). `tune` (sequences a step, length): the plan's end-to-end
    tuning, a later phase; the larger of the two counts."""
    parts = _base(facts)
    # float32 working copies: a block of rows for RTN, a whole stack (gate + up) for GPTQ
    stack = max(facts.largest_linear, 2 * facts.intermediate * facts.hidden) if calibration else 0
    parts["quantizing"] = max(stack * 4 * 3, ROW_CHUNK_BYTES * 6)
    # every quantized module's float32 scale and zero (8 bytes a group), at the smallest group size the engine applies
    parts["quantization states"] = facts.linear_params * 8 // 32
    if calibration:
        sequences, length = calibration
        widest = max(facts.largest_input, facts.hidden)
        # a block's H for each input (three of hidden x hidden, one of the widest), and one more of the widest: the
        # batch's update while H accumulates, then the inverse's factor (H itself is permuted and damped in place)
        parts["hessians"] = 4 * (3 * facts.hidden**2 + widest**2) + 4 * widest**2
        parts["activations"] = 3 * sequences * length * facts.hidden * facts.dtype_bytes
        parts["block forward"] = int(min(sequences, batch) * length * max(facts.intermediate, facts.hidden) * 4 * 3)
        if sequential:
            parts["full-precision block"] = facts.linear_params // max(facts.blocks, 1) * facts.dtype_bytes
            parts["full-precision stream"] = sequences * length * facts.hidden * facts.dtype_bytes
            # every source's float32 inputs after the full-precision pass; at the down stage, down's beside the
            # compressed stream's own, kept for the output pass (calibrate.SettledChildren.tail)
            parts["full-precision inputs"] = sequences * length * max(3 * facts.hidden + widest, 2 * widest) * 4
            parts["settled attention outputs"] = sequences * length * facts.hidden * 4  # float32 at most
    calibrating = Footprint("apply", parts)
    if tune is None:
        return calibrating
    tuning = {**_base(facts), "quantization states": parts["quantization states"], **tuning_phase(facts, *tune)}
    return max(calibrating, Footprint("apply", tuning), key=lambda f: f.total)


def tuning_phase(facts: ModelFacts, sequences: int, length: int) -> dict[str, int]:
    """End-to-end scale tuning (compression/tune.py) beyond the model: each tuned linear's centred codes in float32,
    the weight built once when its parametrization is registered, rebuilt in float32 for every forward and cast,
    held for the backward; a step's graph; and the logits: the reference's with its log-softmax and probabilities,
    the candidate's with its log-softmax, the KL terms and their gradient (TUNE_LOGIT_COPIES). On SmolLM2 (2 x 512
    tokens, float32 forwards on an AMD EPYC) 4.85 GB predicted, 4.75 GB measured above the two resident models (peak
    RSS of the phase, bench/bench_tune_memory.py); with bfloat16 forwards (a Sapphire Rapids) 3.40 GB was measured,
    so the figure is an upper bound there."""
    tokens = sequences * length
    return {"tuned codes and weights": facts.linear_params * (4 + 4 + 4 + 2),
            "backward activations": backward_activations(facts, tokens),
            "tuning logits": int(tokens * facts.vocab * 4 * TUNE_LOGIT_COPIES)}


def backward_activations(facts: ModelFacts, tokens: int, recompute: bool = False) -> int:
    """Bytes autograd keeps for a forward over `tokens` tokens: attention's and the MLP's tensors in the model's dtype
    and the norms' float32 internals, per token and block (measured 2.2 GB for 4 x 64 tokens of an 8B in bf16).
    `recompute`: each block's input and its linears' inputs (which the scan's hooks hold), and one block's graph."""
    block = (10 * facts.hidden + 4 * facts.intermediate) * facts.dtype_bytes + 16 * facts.hidden
    if not recompute:
        return tokens * facts.blocks * block
    return tokens * (facts.blocks * (4 * facts.hidden + facts.intermediate) * facts.dtype_bytes + block)


def fisher_pass(facts: ModelFacts, sequences: int, length: int, chunk: int) -> tuple[int, bool]:
    """(sequences per forward, recompute) for the fast scan's Fisher pass: the depth's two chunks with their whole
    graph up to RECOMPUTE_ABOVE; above it each block is recomputed in the backwards (the same bits; no time cost
    measured on SmolLM2's `fast` depth, whose pass is the per-module reductions), and fewer sequences go at once
    where even that graph would pass BACKWARD_BYTES (at least one; the batches evened out). The labels drawn are
    the same whatever the batch (one generator, row by row), so a smaller batch changes rounding and time only."""
    batch = min(sequences, chunk * 2)
    if backward_activations(facts, batch * length) <= RECOMPUTE_ABOVE:
        return batch, False
    cap = max(1, min(batch, BACKWARD_BYTES // max(backward_activations(facts, length, True), 1)))
    return -(-sequences // -(-sequences // cap)), True  # as many batches as the cap needs, evened out


def fisher_phase(facts: ModelFacts, calib: tuple[int, int], chunk: int, whole_errors: bool = False) -> dict[str, int]:
    """The fast scan's Fisher pass beyond the model: its statistics, per-sequence gradients, logits and graph."""
    sequences, length = calib
    batch, recompute = fisher_pass(facts, sequences, length, chunk)
    kept = facts.linear_params * 4  # a batch's first-order gradients, held until each module's Fisher pass
    # streamed: a block of rows' gradient and error with the quantizer's temporaries (sensitivity/fisher.py)
    streamed = facts.largest_linear * 4 * 3 if whole_errors else ROW_CHUNK_BYTES * 8
    return {"fisher statistics": kept if kept <= STATS_BYTES_CAP else streamed,
            "per-sequence gradients": min(batch * facts.largest_linear * 4, STACK_BYTES),
            "backward logits": int(batch * length * facts.vocab * 4 * BACKWARD_COPIES),
            "backward activations": backward_activations(facts, batch * length, recompute)}


def scan(facts: ModelFacts, method: str, calib: tuple[int, int], probe: tuple[int, int], chunk: int,
         whole_errors: bool = False) -> Footprint:
    """A sensitivity scan on any number of slices (one at a time: an extra slice adds nothing that stays).
    whole_errors: a setting ranks a whole matrix (magnitude pruning), so streamed statistics meet its error whole,
    not a block of rows at a time."""
    parts = _base(facts)
    probe_sequences, probe_length = probe
    parts["probe cache"] = (facts.blocks + 1) * probe_sequences * probe_length * facts.hidden * facts.dtype_bytes
    reference = probe_sequences * (probe_length - 1) * facts.vocab * 4
    parts["probe logits"] = int(chunk * probe_length * facts.vocab * 4 * LOGITS_COPIES) + (
        reference if reference <= REFERENCE_CACHE_BYTES else 0)
    # the embedding's probe holds a perturbed copy of it, made a block of rows at a time
    parts["perturbed copy"] = facts.vocab * facts.hidden * facts.dtype_bytes + ROW_CHUNK_BYTES * 6
    if method == "fast":  # the Fisher pass, then the probes: the larger of the two is the peak
        fisher = fisher_phase(facts, calib, chunk, whole_errors)
        probes = ("probe cache", "probe logits", "perturbed copy")
        if sum(fisher.values()) > sum(parts[k] for k in probes):
            for key in probes:
                del parts[key]
            parts.update(fisher)
    return Footprint(f"{method} scan", parts)


def available_bytes(device: str = "cpu") -> int | None:
    """MemAvailable of this machine (Linux), capped by $SHRINK_MEMORY_LIMIT_GB where set (a share of a machine
    others use too); a CUDA GPU's free memory for `cuda`; None where neither is known (MPS shares the machine's memory
    and says nothing: then nothing is refused)."""
    import os

    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0] if torch.cuda.is_available() else None
    if device != "cpu":
        return None

    limit = os.environ.get("SHRINK_MEMORY_LIMIT_GB")
    cap = int(float(limit) * 1e9) if limit else None
    available = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return min(x for x in (available, cap) if x is not None) if (available or cap) else None


def refusal(footprint: Footprint, available: int | None, alternative: Footprint | None = None,
            alternative_label: str = "", resident: int = 0, where: str = "this machine",
            alternative_available: int | None = None) -> str | None:
    """One sentence when the job will not fit (None when it will): what it needs, what there is, what would fit.
    `resident`: bytes of the footprint this process already holds (a loaded model), which `available` excludes.
    `alternative_available`: the memory the alternative would use, where it runs elsewhere (the CPU for a GPU job)."""
    if available is None or footprint.total - resident <= available:
        return None
    fits = ""
    room = available if alternative_available is None else alternative_available
    if alternative is not None and room is not None and alternative.total - resident <= room:  # reloading frees it
        fits = f"; {alternative_label} would need {alternative.total / 1e9:.1f} GB and fits"
    return (f"This {footprint.job} would need {footprint.describe()}, and {where} has "
            f"{available / 1e9:.1f} GB available{fits or '; free memory or use a machine with more'}.")


def facts_from_description(description: dict) -> ModelFacts:
    # the device as the description names it ("cuda bf16 (NVIDIA H100, ...)"); descriptions before devices: cpu
    device = (description.get("device") or "cpu").split()[0]
    known = device in ("cpu", "mps") or re.fullmatch(r"cuda(:\d+)?", device)
    return ModelFacts.from_inventory(description["summary"], description["modules"], device=device if known else "cpu")


def facts_from_model(model) -> ModelFacts:
    from shrink_core.model.arch import model_device
    from shrink_core.model.inventory import inventory, summary

    rows = inventory(model)
    return ModelFacts.from_inventory(summary(model, rows), [r.row() for r in rows], device=str(model_device(model)))


def admit(make, facts: ModelFacts, available: int | None = None, loaded: bool = False) -> Footprint:
    """The job's footprint, or ShrinkError with the one sentence when it will not fit (an fp32 model is offered bf16,
    which halves the weights, when that would fit; a GPU job that fits neither way is offered the CPU, in the
    machine's memory). `loaded`: this process already holds the model, so its weights and the process are resident,
    not still to come out of the available memory. The memory is the device's: a CUDA GPU's free memory."""
    from dataclasses import replace

    from shrink_core.errors import ShrinkError

    footprint = make(facts)
    available = available_bytes(facts.device) if available is None else available
    resident = footprint.parts["process"] + footprint.parts["weights"] if loaded else 0
    where = "this machine" if facts.device == "cpu" else f"the {facts.device} device"
    alternative = make(replace(facts, dtype="bf16")) if facts.dtype_bytes == 4 else None
    bf16_fits = alternative is not None and (available is None or alternative.total - resident <= available)
    if facts.device == "cpu" or bf16_fits:
        sentence = refusal(footprint, available, alternative, "the model in bf16 (spec suffix #bf16)", resident, where)
    else:  # nothing fits on the device: the CPU, from a new load (its weights in host memory)
        on_cpu, host = make(replace(facts, device="cpu")), available_bytes("cpu")
        # `refusal` takes `resident` off the alternative: the room makes that "the CPU job less this process"
        process = footprint.parts["process"] if loaded else 0
        sentence = refusal(footprint, available, on_cpu if host is not None else None,
                           "on the CPU (spec suffix @cpu) it", resident, where,
                           alternative_available=None if host is None else host + process - resident)
    if sentence:
        raise ShrinkError(sentence)
    return footprint
