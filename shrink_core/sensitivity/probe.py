"""Exhaustive probes: perturb one module (or a block's modules), rerun only the blocks from it on, measure, restore.

The unperturbed run of a slice's probe tokens is done once: each block's input hidden states and the reference
log-probabilities are cached, so a probe of a module in block b runs blocks b..L-1 and the head, never the prefix.
Starting from block 0 on the cached embedding output is the full recompute; both paths run the very same ops, so
they agree bit for bit (tests check it). The embedding and lm_head are probed the same way: the embedding (and a
head tied to it) from the token ids, i.e. a full forward (block -1); an untied lm_head on the cached output of the
last block (block L).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from shrink_core.evaluation.calibration import CalibrationRecipe, calibration_tokens
from shrink_core.evaluation.evaluate import _softcap, select_items
from shrink_core.evaluation.slices import get_slice, load_rows
from shrink_core.model.arch import (
    block_kwargs,
    decoder_layers,
    final_hidden,
    first_block_input,
    model_device,
    run_layer,
)
from shrink_core.perf.footprint import REFERENCE_CACHE_BYTES
from shrink_core.sensitivity.settings import Setting, perturbed


@dataclass(frozen=True)
class ScanDepth:
    name: str
    sequences: int  # eval sequences of the probe set (exhaustive)
    seq_len: int
    calib_sequences: int  # calibration sequences of the fast (Fisher) pass
    calib_len: int
    check_modules: int  # exhaustive sample size for the fast-vs-exhaustive agreement check
    chunk: int = 4  # sequences per forward in a probe
    stop_rel_error: float | None = None  # stop a probe once KL's standard error over chunks is below this share
    version: int = 3  # 2: fast scores use sampled-label Fisher; 3: fast dNLL adds the text's first-order term

    def __post_init__(self):
        if min(self.sequences, self.seq_len, self.calib_sequences, self.calib_len, self.chunk) < 1:
            raise ValueError("budget sizes must be positive")


SCAN_DEPTHS = {
    "quick": ScanDepth("quick", sequences=4, seq_len=64, calib_sequences=4, calib_len=64, check_modules=12),
    "fast": ScanDepth("fast", sequences=8, seq_len=128, calib_sequences=8, calib_len=128, check_modules=32),
    "standard": ScanDepth("standard", sequences=16, seq_len=256, calib_sequences=16, calib_len=256,
                           check_modules=48, stop_rel_error=0.05),
}


def eval_tokens(tokenizer, slice_id: str, sequences: int, seq_len: int) -> torch.Tensor:
    """(sequences, seq_len) ids from the slice's eval rows in the fixed evaluation order (BOS + text + EOS, chunked)."""
    rows = select_items(load_rows(get_slice(slice_id), split="eval"), None, by_group=True)
    text_rows = [r.get("text") or r.get("context", "") for r in rows]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    stream: list[int] = []
    needed = sequences * seq_len
    index = 0
    while len(stream) < needed and text_rows:  # small slices repeat rather than fall short
        stream += [start] + tokenizer.encode(text_rows[index % len(text_rows)], add_special_tokens=False)
        index += 1
    return torch.tensor(stream[:needed], dtype=torch.long).reshape(sequences, seq_len)


def calib_tokens(tokenizer, slice_id: str, sequences: int, seq_len: int) -> torch.Tensor:
    """(sequences, seq_len) ids from the slice's calibration rows only (never its eval rows). Recipe version 2's draw:
    stored scan scores are keyed by slice and depth, not by the draw, so the probe rows must not move (one slice,
    so the mix's order cannot matter here)."""
    return calibration_tokens(tokenizer, CalibrationRecipe(((slice_id, 1.0),), sequences, seq_len, 0, version=2))


def log_probs(model, hidden: torch.Tensor) -> torch.Tensor:
    """Final norm + head + log-softmax at every position but the last: (n, T - 1, vocab)."""
    logits = model.get_output_embeddings()(final_hidden(model, hidden[:, :-1])).float()
    cap = _softcap(model)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


def kl_and_nll(ref_logp: torch.Tensor, logp: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence mean KL(ref || p) and mean NLL: (n,), (n,) from (n, T-1, vocab) and targets (n, T-1)."""
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0)  # (n, T-1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (n, T-1)
    return kl.mean(-1), nll.mean(-1)


class ProbeCache:
    """One slice's probe tokens through the unperturbed model: block inputs and reference log-probs, kept once."""

    def __init__(self, model, ids: torch.Tensor, chunk: int = 4):
        ids = ids.to(model_device(model))  # everything the cache keeps is on the model's device
        self.model, self.ids, self.chunk = model, ids, chunk
        self.layers = list(decoder_layers(model))
        started = time.perf_counter()
        with torch.inference_mode():
            # each block's keyword arguments (mask, positions, rotary tables) from one sequence: they broadcast over
            # any chunk, since every probe sequence has the same length and no padding
            self.kwargs = block_kwargs(model, ids[:1])
            hidden = torch.cat([first_block_input(model, part)[0] for part in ids.split(chunk)])  # (n, T, hidden)
            self.block_inputs = []  # [block] -> (n, T, hidden); [L] is the last block's output (the head's input)
            for layer, kwargs in zip(self.layers, self.kwargs):
                self.block_inputs.append(hidden)
                hidden = torch.cat([run_layer(layer, part, kwargs) for part in hidden.split(chunk)])
            self.block_inputs.append(hidden)
            self.targets = ids[:, 1:]
            # full-vocabulary log-probs are kept only while small (Gemma 3's 262k vocabulary at `standard` would be
            # 4.3 GB); otherwise each chunk's are recomputed from the cached last output: the same numbers
            keep = ids.shape[0] * (ids.shape[1] - 1) * model.get_output_embeddings().weight.shape[0] * 4
            parts, nll = [], []
            for start in range(0, ids.shape[0], chunk):
                logp = log_probs(model, hidden[start:start + chunk])
                nll.append(-logp.gather(-1, self.targets[start:start + chunk].unsqueeze(-1)).squeeze(-1).mean(-1))
                if keep <= REFERENCE_CACHE_BYTES:
                    parts.append(logp)
            self.ref_logp = torch.cat(parts) if parts else None
            self.ref_nll = torch.cat(nll)  # (n,)
        self.seconds = time.perf_counter() - started

    def reference(self, start: int, stop: int) -> torch.Tensor:
        """The unperturbed log-probs of sequences [start, stop): kept, or from the cached last block output (the
        head must hold its original weights when they are recomputed)."""
        if self.ref_logp is not None:
            return self.ref_logp[start:stop]
        return log_probs(self.model, self.block_inputs[-1][start:stop])

    @property
    def tokens(self) -> int:
        return int(self.targets.numel())

    def run_from(self, block: int, start: int, stop: int) -> torch.Tensor:
        """Hidden states after the last block for sequences [start, stop), starting at `block`'s cached input;
        block -1 starts from the token ids (the embedding lookup), block L returns the cached last output."""
        if block < 0:
            hidden = first_block_input(self.model, self.ids[start:stop])[0]
            block = 0
        else:
            hidden = self.block_inputs[block][start:stop]
        for layer, kwargs in zip(self.layers[block:], self.kwargs[block:]):
            hidden = run_layer(layer, hidden, kwargs)
        return hidden


@dataclass(frozen=True)
class ProbeResult:
    kl: float  # mean KL(reference || perturbed) per scored token (nats)
    delta_nll: float  # mean NLL change per scored token (nats)
    sequences: int  # sequences actually scored (fewer when the budget stopped early)
    seconds: float


def probe(cache: ProbeCache, modules: dict[str, torch.nn.Module], blocks: dict[str, int],
          setting: Setting | dict[str, Setting], reuse_prefix: bool = True,
          stop_rel_error: float | None = None) -> ProbeResult:
    """Perturb `modules` (name -> nn.Linear or nn.Embedding) together, score the probe set, restore the original
    weight tensors. `blocks`: name -> block, -1 for the embedding, L for an untied lm_head. `setting`: one for all
    modules, or one per module (a mixed-precision plan measured as a whole)."""
    per_module = setting if isinstance(setting, dict) else dict.fromkeys(modules, setting)
    started = time.perf_counter()
    originals = {name: m.weight.data for name, m in modules.items()}
    first = min(blocks[name] for name in modules)
    first = first if reuse_prefix else min(first, 0)
    kls, nlls = [], []
    try:
        with torch.inference_mode():
            changed = {name: perturbed(per_module[name], originals[name]) for name in modules}
            n = cache.ids.shape[0]
            for start in range(0, n, cache.chunk):
                stop = min(n, start + cache.chunk)
                reference = cache.reference(start, stop)  # before the swap: a recomputed one needs the original head
                for name, module in modules.items():
                    module.weight.data = changed[name]
                logp = log_probs(cache.model, cache.run_from(first, start, stop))
                for name, module in modules.items():
                    module.weight.data = originals[name]
                kl, nll = kl_and_nll(reference, logp, cache.targets[start:stop])
                kls.append(kl)
                nlls.append(nll - cache.ref_nll[start:stop])
                if stop_rel_error and _settled(torch.cat(kls), stop_rel_error) and stop < n:
                    break
    finally:
        for name, module in modules.items():
            module.weight.data = originals[name]  # the very same tensor objects: bit-identical by construction
    kl_all, dnll_all = torch.cat(kls).double(), torch.cat(nlls).double()
    return ProbeResult(float(kl_all.mean()), float(dnll_all.mean()), int(kl_all.numel()),
                       time.perf_counter() - started)


def whole_model_kl(cache: ProbeCache, model) -> ProbeResult:
    """KL(reference || `model`) on the cache's probe set, `model` a changed copy of the cache's model (a whole plan
    applied, blocks removed included): its own forward, against the reference log-probs kept once."""
    started = time.perf_counter()
    kls, nlls = [], []
    n = cache.ids.shape[0]
    with torch.inference_mode():
        for start in range(0, n, cache.chunk):
            stop = min(n, start + cache.chunk)
            logits = model(input_ids=cache.ids[start:stop], use_cache=False).logits[:, :-1].float()
            kl, nll = kl_and_nll(cache.reference(start, stop), torch.log_softmax(logits, dim=-1),
                                 cache.targets[start:stop])
            kls.append(kl)
            nlls.append(nll - cache.ref_nll[start:stop])
    kl_all, dnll_all = torch.cat(kls).double(), torch.cat(nlls).double()
    return ProbeResult(float(kl_all.mean()), float(dnll_all.mean()), int(kl_all.numel()),
                       time.perf_counter() - started)


def _settled(values: torch.Tensor, rel_error: float) -> bool:
    """Has the mean settled: standard error below `rel_error` of the mean (at least 8 sequences)?"""
    if values.numel() < 8:
        return False
    mean = float(values.double().mean())
    return mean > 0 and float(values.double().std()) / math.sqrt(values.numel()) < rel_error * mean
