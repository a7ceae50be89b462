"""A sensitivity scan: modules x settings x slices -> flat records, stored and reused by their figure key (weights
hash, setting, slice content, budget, method, protocol version: evaluation/protocol.py). Block linears are scored by
the chosen method; the embedding (with a head tied to it) and an untied lm_head are always probed exhaustively, one
full forward per setting and slice (method "exhaustive" on their records), so the planner can choose their precision
too. The CLI calls `run_scan` inline; the Sensitivity page runs `sensitivity_job` (sensitivity/units.py)
in a worker: same code path, same records."""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from shrink_core import __version__
from shrink_core.errors import ShrinkError
from shrink_core.evaluation.protocol import figure_key
from shrink_core.evaluation.slices import get_slice
from shrink_core.model.arch import decoder_layers
from shrink_core.model.describe import device_label
from shrink_core.model.inventory import LINEAR_KINDS, ModuleInfo, block_linears, inventory
from shrink_core.perf import footprint
from shrink_core.perf.footprint import STATS_BYTES_CAP  # above it, a slice's statistics are streamed
from shrink_core.perf.memory import release_freed_memory
from shrink_core.results.store import Provenance, Store
from shrink_core.sensitivity.fisher import ROBUST_CAP, fisher_scores, stats_bytes
from shrink_core.sensitivity.probe import SCAN_DEPTHS, ProbeCache, ScanDepth, calib_tokens, eval_tokens, probe
from shrink_core.sensitivity.settings import Setting, get_setting, row_independent

EMBEDDING_KINDS = ("embedding", "lm_head")

METHODS = ("fast", "exhaustive")
METRICS = ("kl", "dnll")
METHOD_LABELS = {
    "fast": "fast: diagonal Fisher (sampled labels) x RTN/mask error + first-order term, from calibration rows",
    "exhaustive": "exhaustive: module perturbed alone, KL/dNLL measured on eval rows (prefix reused)",
}


@dataclass(frozen=True)
class Record:
    module: str
    block: int
    kind: str
    setting: str
    slice: str
    metric: str  # "kl" (mean KL(reference || perturbed) per token, nats) | "dnll" (mean NLL change per token)
    value: float
    method: str
    depth: str = ""  # the scan depth (quick, fast, standard) the value was computed at


@dataclass(frozen=True)
class Agreement:
    """How far to trust the fast view: Spearman of fast vs exhaustive over a sample of modules."""

    slice: str
    setting: str
    metric: str
    spearman: float
    modules: int
    budget: str


@dataclass
class ScanReport:
    model: str
    weights_hash: str
    budget: str
    method: str
    records: list[Record] = field(default_factory=list)
    agreement: list[Agreement] = field(default_factory=list)
    computed: int = 0  # (module, setting, slice) values computed in this run
    reused: int = 0  # values taken from the store
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k not in ("records", "agreement")},
                "records": [asdict(r) for r in self.records], "agreement": [asdict(a) for a in self.agreement]}


def get_depth(name: str) -> ScanDepth:
    if name not in SCAN_DEPTHS:
        raise ShrinkError(f"Unknown scan depth '{name}'; choose one of: {', '.join(SCAN_DEPTHS)}.")
    return SCAN_DEPTHS[name]


# ---------------------------------------------------------------- pure helpers


def ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranked = np.empty(len(values))
    ranked[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranked[tied] = ranked[tied].mean()
    return ranked


def spearman(a, b) -> float:
    """Spearman rank correlation (Pearson on average ranks); nan for fewer than 3 points or a constant side."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b):
        raise ValueError("spearman needs two sequences of the same length")
    if len(a) < 3:
        return float("nan")
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def sample_modules(rows: list[ModuleInfo], count: int) -> list[ModuleInfo]:
    """`count` modules spread evenly over blocks while cycling through kinds (deterministic)."""
    blocks = sorted({r.block for r in rows})
    kinds = [k for k in LINEAR_KINDS if any(r.kind == k for r in rows)]
    by_key = {(r.block, r.kind): r for r in rows}
    chosen: list[ModuleInfo] = []
    for i in range(min(count, len(rows))):
        block = blocks[round(i * (len(blocks) - 1) / max(count - 1, 1))]
        for shift in range(len(kinds)):
            row = by_key.get((block, kinds[(i + shift) % len(kinds)]))
            if row is not None and row not in chosen:
                chosen.append(row)
                break
    return chosen


# ---------------------------------------------------------------- the store


@dataclass(frozen=True)
class ModelId:
    """What a stored score names its model by: a loaded model here, or one that a worker elsewhere loaded."""
    spec: str
    weights_hash: str
    device: str

    @staticmethod
    def of(loaded) -> ModelId:
        return ModelId(loaded.spec.raw, loaded.weights_hash, device_label(loaded.model))


# The fast scores' estimator beyond the budget's version: each calibration sequence's KL term capped at ROBUST_CAP
# times their median (fisher.winsorized_sum).
FAST_ESTIMATOR = {"kl": "winsorized per sequence", "cap": ROBUST_CAP}


def scan_provenance(model: ModelId, slice_id: str, budget: str) -> Provenance:
    return Provenance(model.spec, model.weights_hash, __version__, model.device, slice=slice_id, budget=budget)


def scores_key(weights_hash: str, slice_id: str, setting: Setting, method: str, budget: ScanDepth) -> str:
    """The figure key of the scores of one (model, slice, setting, method, budget). Fast scores also carry their
    estimator, so a change to it recomputes them and leaves the (costly) exhaustive probes served from the store."""
    protocol = {"setting": setting.key_fields(), "budget": asdict(budget)}
    if method == "fast":
        protocol["estimator"] = FAST_ESTIMATOR
    return figure_key("sensitivity", weights_hash=weights_hash, slice_info=get_slice(slice_id), protocol=protocol,
                      method=method)


def cached_values(store: Store, model: ModelId, slice_id: str, setting: Setting, method: str,
                  budget: ScanDepth) -> dict[str, tuple[float, float]]:
    """module -> (kl, dnll) already stored under the key this code would write for the same inputs."""
    out: dict[str, tuple[float, float]] = {}
    key = scores_key(model.weights_hash, slice_id, setting, method, budget)
    for row in store.results("sensitivity", model_spec=model.spec, weights_hash=model.weights_hash,
                             slice=slice_id, budget=budget.name):
        p = row["payload"]
        if p.get("type") == "scores" and p.get("figure_key") == key:
            for module, pair in p["values"].items():
                out.setdefault(module, tuple(pair))  # newest first
    return out


def covering_depth(store: Store, loaded, slice_ids: list[str], setting_ids: list[str]) -> str | None:
    """The deepest scan depth at which the store holds fast scores of every block linear under every setting on every
    slice, so planning on it scans nothing; None when no depth covers them all."""
    model, wanted = ModelId.of(loaded), len(block_linears(inventory(loaded.model)))
    settings = [get_setting(s) for s in setting_ids]
    for depth in reversed(list(SCAN_DEPTHS.values())):  # deepest first
        if all(len(cached_values(store, model, slice_id, s, "fast", depth)) >= wanted
               for slice_id in slice_ids for s in settings):
            return depth.name
    return None


def save_values(store: Store, model: ModelId, slice_id: str, setting: Setting, method: str, budget: ScanDepth,
                values: dict, seconds: float, tokens: int, job_id: int | None, executed: dict | None = None) -> None:
    """One scores row: a unit's modules under one setting on one slice (rows of one key merge on read)."""
    payload = {"type": "scores", "method": method, "method_label": METHOD_LABELS[method], "setting": setting.id,
               "setting_label": setting.label, "setting_version": setting.version, "budget_version": budget.version,
               "tokens": tokens, "seconds": round(seconds, 3), "values": {m: list(v) for m, v in values.items()},
               "figure_key": scores_key(model.weights_hash, slice_id, setting, method, budget)}
    if executed:
        payload["executed"] = executed
    store.add_result("sensitivity", scan_provenance(model, slice_id, budget.name), payload, job_id=job_id)


def stored_agreement(store: Store, model_spec: str, weights_hash: str | None = None) -> list[Agreement]:
    """The newest agreement figures per (slice, setting, metric, budget) for a model."""
    where = {"model_spec": model_spec, **({"weights_hash": weights_hash} if weights_hash else {})}
    seen: dict[tuple, Agreement] = {}
    for row in store.results("sensitivity", **where):
        p = row["payload"]
        if p.get("type") == "agreement":
            a = Agreement(**p["agreement"])
            seen.setdefault((a.slice, a.setting, a.metric, a.budget), a)
    return list(seen.values())


# ---------------------------------------------------------------- the scan


def embedding_rows(rows: list[ModuleInfo]) -> list[ModuleInfo]:
    """The embedding and lm_head decisions: a tied weight is one decision, made at its owner (the embedding)."""
    return [r for r in rows if r.kind in EMBEDDING_KINDS and not r.tied_to]


def select_modules(rows: list[ModuleInfo], pattern: str | None, embeddings: bool = True) -> list[ModuleInfo]:
    candidates = block_linears(rows) + (embedding_rows(rows) if embeddings else [])
    if not pattern:
        return candidates
    try:
        chosen = [r for r in candidates if re.search(pattern, r.name)]
    except re.error as exc:
        raise ShrinkError(f"The module pattern {pattern!r} is not a valid regex ({exc}).") from None
    if not chosen:
        raise ShrinkError(f"The module pattern {pattern!r} matches no block linear or embedding; try e.g. "
                          "'layers\\.3\\.'.")
    return chosen


@dataclass(frozen=True)
class ScanTargets:
    """What a scan scores in a loaded model: its block linears (the Fisher pass hooks them), the embedding decisions,
    and each probed module with the block its probe restarts from."""
    rows: list[ModuleInfo]
    embeddings: list[ModuleInfo]
    modules: dict  # name -> module, block linears
    probed: dict  # name -> module, block linears and embeddings
    blocks: dict  # name -> the block a probe starts from (-1: the embedding; layers: an untied head)

    @staticmethod
    def of(model) -> ScanTargets:
        everything = inventory(model)
        rows, embeddings = block_linears(everything), embedding_rows(everything)
        named = dict(model.named_modules())
        modules = {r.name: named[r.name] for r in rows}
        layers = len(decoder_layers(model))  # embedding: from the ids; untied head: after the blocks
        return ScanTargets(rows, embeddings, modules, {**modules, **{r.name: named[r.name] for r in embeddings}},
                           {r.name: r.block for r in rows} | {
                               r.name: -1 if r.kind == "embedding" else layers for r in embeddings})


def fisher_values(loaded, modules: dict, slice_id: str, settings: list[Setting], depth: ScanDepth, progress):
    """The fast method on one slice: setting id -> module -> (kl, dnll), the pass's seconds and tokens, and how many
    per-sequence estimates the robust cap lowered. Each calibration sequence's KL term is kept apart and capped at
    ROBUST_CAP times their median (`fisher.winsorized_sum`); the first-order gradients are held for one batch (4
    bytes a weight) where that stays under STATS_BYTES_CAP, else each weight error is computed twice per batch."""
    ids = calib_tokens(loaded.tokenizer, slice_id, depth.calib_sequences, depth.calib_len)
    batch, recompute = fisher_pass_of(loaded, depth)
    scores = fisher_scores(loaded.model, ids, modules, settings, batch=batch, progress=progress, recompute=recompute,
                           robust=ROBUST_CAP, hold_gradients=not fisher_streamed(modules))
    return scores.values, scores.seconds, scores.tokens, scores.capped


def fisher_pass_of(loaded, depth: ScanDepth) -> tuple[int, bool]:
    """(batch, recompute) of the Fisher pass on this model: a large model's graph is recomputed block by block, and
    fewer sequences go at once where even that is large (`footprint.fisher_pass`)."""
    return footprint.fisher_pass(footprint.facts_from_model(loaded.model), depth.calib_sequences, depth.calib_len,
                                 depth.chunk)


def fisher_streamed(modules: dict) -> bool:
    """True when a batch's first-order gradients of every module would pass STATS_BYTES_CAP and are not held."""
    return stats_bytes(modules, first_order=False) > STATS_BYTES_CAP


def probe_values(cache: ProbeCache, probed: dict, blocks: dict, names: list[str], setting: Setting,
                 depth: ScanDepth, tick=None) -> dict[str, tuple[float, float]]:
    """Each named module perturbed alone under `setting`: module -> (kl, dnll). tick(i, name) after each."""
    out = {}
    for i, name in enumerate(names):
        result = probe(cache, {name: probed[name]}, blocks, setting, stop_rel_error=depth.stop_rel_error)
        out[name] = (result.kl, result.delta_nll)
        if tick:
            tick(i, name)
    return out


class _Scanner:
    def __init__(self, loaded, store, budget: ScanDepth, report: ScanReport, job_id):
        self.loaded, self.store, self.budget, self.report, self.job_id = loaded, store, budget, report, job_id
        self.model = ModelId.of(loaded)
        targets = ScanTargets.of(loaded.model)
        self.rows, self.embeddings = targets.rows, targets.embeddings
        self.modules, self.probed, self.blocks = targets.modules, targets.probed, targets.blocks
        self.cache: tuple[str, ProbeCache] | None = None

    def _probe_cache(self, slice_id: str) -> ProbeCache:
        if self.cache is None or self.cache[0] != slice_id:
            self.cache = None  # free the previous slice's activations first
            release_freed_memory()
            ids = eval_tokens(self.loaded.tokenizer, slice_id, self.budget.sequences, self.budget.seq_len)
            cache = ProbeCache(self.loaded.model, ids, self.budget.chunk)
            self.report.timings["probe_cache_s"] = self.report.timings.get("probe_cache_s", 0) + cache.seconds
            self.cache = (slice_id, cache)
        return self.cache[1]

    def fast(self, slice_ids: list[str], settings: list[Setting], progress) -> dict[str, dict[str, dict]]:
        """slice -> setting id -> module -> (kl, dnll), computing what the store does not have."""
        out: dict[str, dict[str, dict]] = {}
        missing: dict[str, list[Setting]] = {}
        for slice_id in slice_ids:
            out[slice_id] = {}
            for s in settings:
                values = cached_values(self.store, self.model, slice_id, s, "fast", self.budget)
                out[slice_id][s.id] = values
                if len(values) < len(self.rows):
                    missing.setdefault(slice_id, []).append(s)
                else:
                    self.report.reused += len(values)
        # One slice at a time, each batch reduced at once (fisher_scores): memory does not grow with the slices.
        self.report.timings["fisher_streamed"] = fisher_streamed(self.modules)
        if missing:
            batch, recompute = fisher_pass_of(self.loaded, self.budget)
            self.report.timings.update(fisher_batch=batch, fisher_recomputed=recompute)
        for n, (slice_id, group) in enumerate(missing.items()):
            def tick(f, m, _n=n, _id=slice_id):
                progress(0.95 * (_n + 0.9 * f) / len(missing), f"{_id}: {m}")

            fresh, seconds, tokens, capped = fisher_values(self.loaded, self.modules, slice_id, group, self.budget,
                                                           tick)
            self.report.timings["capped_sequences"] = self.report.timings.get("capped_sequences", 0) + capped
            self.report.timings["gradients_s"] = self.report.timings.get("gradients_s", 0) + seconds
            for setting in group:
                values = fresh[setting.id]
                save_values(self.store, self.model, slice_id, setting, "fast", self.budget, values, seconds,
                            tokens, self.job_id)
                out[slice_id][setting.id] = values
                self.report.computed += len(values)
            release_freed_memory()  # the next slice starts from the same resident size
        return out

    def exhaustive(self, slice_id: str, settings: list[Setting], rows: list[ModuleInfo], tick) -> dict[str, dict]:
        out = {}
        for n, s in enumerate(settings):
            values = cached_values(self.store, self.model, slice_id, s, "exhaustive", self.budget)
            todo = [r for r in rows if r.name not in values]
            self.report.reused += len(rows) - len(todo)
            if todo:
                cache = self._probe_cache(slice_id)
                started = time.perf_counter()
                count = len(todo)

                def probed(i, name, _n=n, _s=s, _k=count):  # called within this iteration
                    tick((_n + (i + 1) / _k) / len(settings), f"{_s.id}: probe {i + 1}/{_k} ({name})")

                values.update(probe_values(cache, self.probed, self.blocks, [r.name for r in todo], s, self.budget,
                                           probed))
                seconds = time.perf_counter() - started
                self.report.timings["probes_s"] = self.report.timings.get("probes_s", 0) + seconds
                self.report.timings["probes"] = self.report.timings.get("probes", 0) + len(todo)
                save_values(self.store, self.model, slice_id, s, "exhaustive", self.budget, values, seconds,
                            cache.tokens, self.job_id)
                self.report.computed += len(todo)
            out[s.id] = values
        return out


def _records(rows, values, setting_id, slice_id, method, metrics, depth: str = "") -> list[Record]:
    out = []
    for r in rows:
        if r.name in values:
            block = -1 if r.block is None else r.block  # -1: embedding / lm_head, outside the blocks
            for metric in metrics:
                value = values[r.name][METRICS.index(metric)]
                out.append(Record(r.name, block, r.kind, setting_id, slice_id, metric, float(value), method, depth))
    return out


def run_scan(loaded, slice_ids: list[str], setting_ids: list[str], method: str = "fast", budget: str = "fast",
             modules: str | None = None, check: int = 0, metrics: tuple[str, ...] = METRICS,
             store: Store | None = None, progress=None, job_id: int | None = None,
             embeddings: bool = True, part=None) -> ScanReport:
    """Score modules under settings on slices; `check` > 0 also samples that many modules exhaustively and stores the
    fast-vs-exhaustive Spearman per slice (for W3 g64 when scanned, else the first setting). `embeddings`: also
    probe the embedding / untied lm_head exhaustively under the quantization settings (whatever the method).
    `part(slice_id, records)` is called once a slice's figures are all stored."""
    progress = progress or (lambda fraction, message="": None)
    part = part or (lambda slice_id, records: None)
    if method not in METHODS:
        raise ShrinkError(f"Unknown method '{method}'; use fast or exhaustive.")
    scan_depth = get_depth(budget)
    footprint_ = admit_scan(footprint.facts_from_model(loaded.model), method, budget, setting_ids,
                            loaded=True)  # or refuses
    settings = [get_setting(s) for s in setting_ids]
    for slice_id in slice_ids:
        get_slice(slice_id)
    if loaded.tokenizer is None:
        raise ShrinkError("This model has no tokenizer, so it cannot be scanned; load a directory that includes one.")
    store = store or Store()
    started = time.perf_counter()
    report = ScanReport(loaded.spec.raw, loaded.weights_hash, budget, method)
    report.timings["predicted_peak_bytes"] = footprint_.total  # beside the measured figures, for the record
    scanner = _Scanner(loaded, store, scan_depth, report, job_id)
    chosen = select_modules(scanner.rows + scanner.embeddings, modules, embeddings)
    chosen_embeddings = [r for r in chosen if r.kind in EMBEDDING_KINDS]
    chosen = [r for r in chosen if r.kind not in EMBEDDING_KINDS]
    quantized = [s for s in settings if s.bits is not None]  # masks are not offered for embeddings
    check_setting = next((s for s in settings if s.id == "w3g64"), settings[0])
    checking = bool(check) and method == "fast"
    # One slice at a time, everything for it (scores, embedding probes, agreement check) stored before the next
    # starts: a page shows each slice's heatmap as soon as it is done, and a cancel keeps the finished slices.
    probing = bool(chosen_embeddings and quantized) or checking
    for index, slice_id in enumerate(slice_ids):
        start = 0.5 if method == "fast" and probing else 0.0

        def tick(fraction, message, _i=index, _id=slice_id, _start=start):
            progress(min(0.99, (_i + _start + (1 - _start) * fraction) / len(slice_ids)), f"{_id}: {message}")
        if method == "fast":
            share = start or 1.0
            values = scanner.fast([slice_id], settings,
                                  lambda f, m, _i=index, _s=share: progress(min(0.99, (_i + _s * f) / len(slice_ids)), m)
                                  )[slice_id]
        else:
            values = scanner.exhaustive(slice_id, settings, chosen, tick) if chosen else {s.id: {} for s in settings}
        for s in settings:
            report.records += _records(chosen, values[s.id], s.id, slice_id, method, metrics, scan_depth.name)
        if chosen_embeddings and quantized:
            started_embeddings = time.perf_counter()
            exact = scanner.exhaustive(slice_id, quantized, chosen_embeddings,
                                       lambda f, m: tick(f, f"embedding {m}"))
            report.timings["embedding_s"] = report.timings.get("embedding_s", 0) + time.perf_counter() - started_embeddings
            for s in quantized:
                report.records += _records(chosen_embeddings, exact[s.id], s.id, slice_id, "exhaustive", metrics,
                                           scan_depth.name)
        if checking:
            sample = sample_modules(scanner.rows, check)  # block linears: the embedding is exhaustive already
            exact = scanner.exhaustive(slice_id, [check_setting], sample,
                                       lambda f, m: tick(f, f"agreement check {m}"))[check_setting.id]
            for metric_index, metric in enumerate(METRICS):
                estimates = [values[check_setting.id][r.name][metric_index] for r in sample]
                measured = [exact[r.name][metric_index] for r in sample]
                agreement = Agreement(slice_id, check_setting.id, metric, spearman(estimates, measured),
                                      len(sample), budget)
                report.agreement.append(agreement)
                store.add_result("sensitivity", scan_provenance(scanner.model, slice_id, budget),
                                 {"type": "agreement", "agreement": asdict(agreement),
                                  "figure_key": scores_key(loaded.weights_hash, slice_id, check_setting, "agreement",
                                                           scan_depth),
                                  "sample": [r.name for r in sample],
                                  "pairs": [[r.name, e, m] for r, e, m in zip(sample, estimates, measured)]},
                                 job_id=job_id)
        scanner.cache = None
        part(slice_id, [r for r in report.records if r.slice == slice_id])
    report.seconds = round(time.perf_counter() - started, 3)
    progress(1.0, "done")
    return report


def _current(row: dict, keys: dict) -> bool:
    """Was this stored scores row written under the key this code would write for its inputs?"""
    p = row["payload"]
    inputs = (row["weights_hash"], row["slice"], p.get("setting"), p.get("method"), row["budget"])
    if inputs not in keys:
        try:
            keys[inputs] = scores_key(row["weights_hash"], row["slice"], get_setting(p["setting"]), p["method"],
                                      get_depth(row["budget"]))
        except (ShrinkError, KeyError):  # a setting, slice or budget that no longer exists
            keys[inputs] = None
    return keys[inputs] is not None and p.get("figure_key") == keys[inputs]


def stored_records(store: Store, model_spec: str, weights_hash: str | None = None) -> list[Record]:
    """Every current stored score of a model as records (newest value per module, setting, slice, method, budget);
    scores stored under another key (an older protocol, other slice content) are left out."""
    where = {"model_spec": model_spec, **({"weights_hash": weights_hash} if weights_hash else {})}
    seen: set = set()
    out = []
    keys: dict = {}
    for row in store.results("sensitivity", **where):
        p = row["payload"]
        if p.get("type") != "scores" or not _current(row, keys):
            continue
        for module, pair in p["values"].items():
            key = (module, p["setting"], row["slice"], p["method"], row["budget"])
            if key in seen:
                continue
            seen.add(key)
            block, kind = _block_kind(module)
            for metric, value in zip(METRICS, pair):
                out.append(Record(module, block, kind, p["setting"], row["slice"], metric, float(value), p["method"],
                                  row["budget"]))
    return out


def _block_kind(name: str) -> tuple[int, str]:
    from shrink_core.model.inventory import BLOCK_INDEX, LEAF_KINDS

    match = BLOCK_INDEX.search(name)
    return (int(match.group(1)) if match else -1), LEAF_KINDS.get(name.rsplit(".", 1)[-1], "linear")


def admit_scan(facts, method: str, budget: str, setting_ids, loaded: bool = False):
    """The scan's predicted peak memory, or ShrinkError with one sentence when it will not fit (`loaded`: the model
    is already in this process)."""
    depth = get_depth(budget)
    whole = not all(row_independent(get_setting(s)) for s in setting_ids)
    return footprint.admit(lambda f: footprint.scan(f, method, (depth.calib_sequences, depth.calib_len),
                                                    (depth.sequences, depth.seq_len), depth.chunk, whole), facts,
                           loaded=loaded)


def stored_agreement_pairs(store: Store, model_spec: str, slice_id: str, setting_id: str) -> list[dict]:
    """The newest agreement sample for a slice and setting: module, fast (KL), exhaustive (KL)."""
    for row in store.results("sensitivity", model_spec=model_spec, slice=slice_id):
        p = row["payload"]
        if p.get("type") == "agreement" and p["agreement"]["setting"] == setting_id and p["agreement"]["metric"] == "kl":
            return [{"module": m, "fast": f, "exhaustive": e} for m, f, e in p.get("pairs", [])]
    return []
