"""The evaluation runner: (model, slices, budget[, reference]) -> per-slice records with confidence intervals.

Protocol (fixed, documented in docs/evaluation.md; budgets, version and figure keys in protocol.py): items are chosen
in sha256 order of their group key, so the same budget always scores the same tokens, and parallel languages score the
same paragraphs. Logits are never stored: each batch is reduced on the fly to per-item NLL, top-1 hits and, against a
reference, KL. Bits per byte divide by the bytes of the text actually scored (a long document's first window).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from shrink_core.errors import ShrinkError
from shrink_core.evaluation import protocol
from shrink_core.evaluation import stats as metrics
from shrink_core.evaluation.protocol import LONG_BUCKETS, PROTOCOLS, Protocol, get_protocol  # noqa: F401 (re-exported)
from shrink_core.evaluation.slices import SliceInfo, load_rows

# ---------------------------------------------------------------- requests


@dataclass
class Request:
    """One sequence to score: positions >= score_from are predicted from everything before them."""

    item: int
    ids: list[int]
    score_from: int
    choice: int = 0
    keep_token_nll: bool = False


@dataclass
class Scored:
    nll: float = 0.0
    tokens: int = 0
    all_top1: bool = True
    top1_agree: int = 0
    kl_values: np.ndarray | None = None
    token_nll: np.ndarray | None = None


def _order_key(row: dict) -> str:
    key = row.get("group") or row.get("pair") or row.get("doc") or row["id"]
    return hashlib.sha256(str(key).encode()).hexdigest()


def select_items(rows: list[dict], limit: int | None, by_group: bool = False) -> list[dict]:
    """Deterministic subset: rows in sha256 order of their group key; whole groups when `by_group`."""
    ordered = sorted(rows, key=lambda r: (_order_key(r), r["id"]))
    if limit is None:
        return ordered
    if not by_group:
        return ordered[:limit]
    keys: list[str] = []
    for row in ordered:
        key = _order_key(row)
        if key not in keys:
            keys.append(key)
    chosen = set(keys[:limit])
    return [r for r in ordered if _order_key(r) in chosen]


def _prefix(tokenizer) -> list[int]:
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return [start] if start is not None else []


def text_requests(tokenizer, rows: list[dict], window: int, keep_token_nll: bool = False) -> list[Request]:
    """BOS + text; a row longer than the window is split, each later window re-reading a quarter window of context."""
    prefix = _prefix(tokenizer)
    context = window // 4
    requests = []
    for item, row in enumerate(rows):
        ids = prefix + tokenizer.encode(row["text"], add_special_tokens=False)
        if keep_token_nll or len(ids) <= window:
            requests.append(Request(item, ids[:window], 1, keep_token_nll=keep_token_nll))
            continue
        start = 1
        while start < len(ids):
            begin = max(0, start - context) if start > 1 else 0
            end = min(len(ids), begin + window)
            requests.append(Request(item, ids[begin:end], start - begin))
            start = end
    return requests


def _continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    ctx = tokenizer.encode(context, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenizer.encode(continuation, add_special_tokens=False)


def task_requests(tokenizer, rows: list[dict], window: int) -> list[Request]:
    prefix = _prefix(tokenizer)
    requests = []
    for item, row in enumerate(rows):
        options = row["choices"] if row["task"] == "mc" else [row["answer"]]
        for choice, continuation in enumerate(options):
            ctx, cont = _continuation(tokenizer, row["context"], continuation)
            ids = prefix + ctx + cont
            if len(ids) > window:  # long contexts keep their end, where the question is
                ids = prefix + ids[len(ids) - window + len(prefix):]
            requests.append(Request(item, ids, len(ids) - len(cont), choice=choice))
    return requests


# ---------------------------------------------------------------- scoring


def _softcap(model):
    config = getattr(model.config, "text_config", None) or model.config
    return getattr(config, "final_logit_softcapping", None)


def _logprobs(model, hidden, positions):
    """log-softmax of the LM head at the given flat positions (n, vocab), float32."""
    import torch

    cap = _softcap(model)
    logits = model.get_output_embeddings()(hidden.reshape(-1, hidden.shape[-1])[positions]).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


def _reduce(model, hidden, positions, targets, reference=None, ref_hidden=None,
            chunk: int = protocol.SCORED_POSITIONS) -> dict:
    """Per scored position: NLL and top-1 hit, and against a reference KL(reference || model) and top-1 agreement,
    a chunk of positions at a time: no (positions, vocab) tensor outlives its chunk (a batch of 1024 positions of a
    128k vocabulary would hold several float32 copies of 525 MB at once, two models' worth against a reference)."""
    import torch

    out = {"nll": [], "hit": [], "kl": [], "agree": []}
    for start in range(0, max(positions.shape[0], 1), chunk):  # a batch with nothing to score gives empty figures
        where, wanted = positions[start:start + chunk], targets[start:start + chunk]
        logp = _logprobs(model, hidden, where)
        out["nll"].append(-logp.gather(1, wanted[:, None])[:, 0])
        top1 = logp.argmax(dim=-1)
        out["hit"].append(top1 == wanted)
        if reference is not None:
            ref_logp = _logprobs(reference, ref_hidden, where)
            out["kl"].append((ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0))
            out["agree"].append(ref_logp.argmax(dim=-1) == top1)
            del ref_logp
        del logp
    return {key: torch.cat(parts) if parts else None for key, parts in out.items()}


def _batches(requests: list[Request], max_tokens: int):
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].ids))
    batch: list[int] = []
    for index in order:
        length = len(requests[batch[0]].ids) if batch else len(requests[index].ids)
        if batch and length * (len(batch) + 1) > max_tokens:
            yield batch
            batch = []
        batch.append(index)
    if batch:
        yield batch


def _batch_tensors(requests: list[Request], batch: list[int]):
    """(ids, attention mask, scored flat positions, their targets, the request each position belongs to)."""
    import torch

    width = max(len(requests[i].ids) for i in batch)
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    positions, targets, owners = [], [], []
    for row, index in enumerate(batch):
        request = requests[index]
        length = len(request.ids)
        ids[row, :length] = torch.tensor(request.ids)
        mask[row, :length] = 1
        span = range(request.score_from, length)
        positions += [row * width + t - 1 for t in span]  # logits at t-1 predict token t
        targets += [request.ids[t] for t in span]
        owners += [index] * len(span)
    return ids, mask, positions, targets, owners


def _hidden_states(model, batches: list, device, onload, progress=None):
    """Each batch's last hidden state: a forward per batch where the model is, or (onloaded) every batch through
    one block at a time, each block sent to the onload device once."""
    from shrink_core.model.arch import onloaded_hidden

    if model is None:
        return (None for _ in batches)
    pairs = [(ids.to(device), mask.to(device)) for ids, mask, *_ in batches]
    if onload is None:
        decoder = model.get_decoder()
        return (decoder(input_ids=ids, attention_mask=mask).last_hidden_state for ids, mask in pairs)
    return iter(onloaded_hidden(model, pairs, onload, progress))


def score(model, requests: list[Request], reference=None, max_batch_tokens: int = 1024, progress=None) -> list[Scored]:
    """Runs every request through the model (and the reference, in lock step) and reduces on the fly. Inside
    `arch.onloading(device)` the blocks visit that device in turn while the model stays in host memory."""
    import torch

    from shrink_core.model.arch import model_device, outside_blocks_on
    from shrink_core.model.load import onload_for

    results = [Scored() for _ in requests]
    done_tokens, total_tokens = 0, sum(len(r.ids) for r in requests) or 1
    onload = onload_for(model)
    report = progress or (lambda fraction: None)
    # onloaded, the blocks' passes are 90% of the work (the model's, then the reference's), the reduction the rest
    share = (0.9, 0.1) if onload is not None else (0.0, 1.0)
    models = 2 if reference is not None else 1
    with torch.inference_mode(), outside_blocks_on(model, onload), outside_blocks_on(reference, onload):
        batches = [(*_batch_tensors(requests, batch), batch) for batch in _batches(requests, max_batch_tokens)]
        device = model_device(model)
        hidden_states = _hidden_states(model, batches, device, onload, lambda f: report(share[0] * f / models))
        ref_states = _hidden_states(reference, batches, device, onload,
                                    lambda f: report(share[0] * (1 + f) / models))
        for (_, _, positions, targets, owners, batch), hidden, ref_hidden in zip(batches, hidden_states, ref_states):
            positions_t = torch.tensor(positions, dtype=torch.long, device=device)
            targets_t = torch.tensor(targets, dtype=torch.long, device=device)
            reduced = _reduce(model, hidden, positions_t, targets_t, reference, ref_hidden)
            token_nll, hit, kl, agree = reduced["nll"], reduced["hit"], reduced["kl"], reduced["agree"]
            owners_t = np.asarray(owners)
            nll_np, hit_np = token_nll.double().cpu().numpy(), hit.cpu().numpy()  # off a GPU once per batch
            kl_np, agree_np = (None, None) if reference is None else (kl.double().cpu().numpy(), agree.cpu().numpy())
            for index in batch:
                sel = owners_t == index
                out = results[index]
                out.nll += float(nll_np[sel].sum())
                out.tokens += int(sel.sum())
                out.all_top1 = out.all_top1 and bool(hit_np[sel].all())
                if requests[index].keep_token_nll:
                    out.token_nll = nll_np[sel]
                if reference is not None:
                    values = kl_np[sel]
                    out.kl_values = values if out.kl_values is None else np.concatenate([out.kl_values, values])
                    out.top1_agree += int(agree_np[sel].sum())
            done_tokens += sum(len(requests[i].ids) for i in batch)
            report(share[0] + share[1] * done_tokens / total_tokens)
    return results


# ---------------------------------------------------------------- per-slice results


@dataclass
class SliceResult:
    slice: str
    kind: str
    metric: str
    budget: str
    items: int
    tokens: int
    nll: float  # mean NLL per scored token (nats)
    ppl: float
    ppl_ci: tuple[float, float] | None  # None below stats.MIN_INTERVAL_ITEMS items
    bpb: float | None = None
    accuracy: float | None = None
    accuracy_ci: tuple[float, float] | None = None
    accuracy_norm: float | None = None
    kl: float | None = None
    kl_p99: float | None = None
    top1_agree: float | None = None
    flips: dict | None = None
    breakdown: dict = field(default_factory=dict)
    per_item: dict = field(default_factory=dict)  # arrays for paired tests: item ids, nll, tokens, correct

    def to_dict(self, with_items: bool = False) -> dict:
        data = asdict(self)
        if not with_items:
            data.pop("per_item")
        return data

    @staticmethod
    def from_dict(payload: dict) -> SliceResult:
        """A stored payload back as a result; what is stored beside the figures (key, calibration) is left out."""
        data = {k: v for k, v in payload.items() if k in SliceResult.__dataclass_fields__}
        data["ppl_ci"] = tuple(data["ppl_ci"]) if data.get("ppl_ci") else None  # none below the minimum items
        if data.get("accuracy_ci"):
            data["accuracy_ci"] = tuple(data["accuracy_ci"])
        return SliceResult(**data)


def _breakdown_key(rows: list[dict]) -> str | None:
    for key in ("perturbation", "format", "lang", "subtask", "domain", "subset"):
        if len({r.get(key) for r in rows}) > 1:
            return key
    return None


def _aggregate(info: SliceInfo, budget: Protocol, rows, item_nll, item_tokens, item_bytes, scored, correct=None,
               correct_norm=None) -> SliceResult:
    kls = [s.kl_values for s in scored if s.kl_values is not None]
    kl_all = np.concatenate(kls) if kls else None
    agree = sum(s.top1_agree for s in scored)
    result = SliceResult(
        slice=info.id, kind=info.kind, metric=info.metric, budget=budget.name, items=len(rows),
        tokens=int(item_tokens.sum()), nll=float(item_nll.sum() / max(item_tokens.sum(), 1)),
        ppl=metrics.perplexity(item_nll, item_tokens), ppl_ci=metrics.ppl_ci(item_nll, item_tokens),
        bpb=metrics.bits_per_byte(item_nll, item_bytes) if item_bytes is not None else None,
    )
    if kl_all is not None and len(kl_all):
        result.kl = float(kl_all.mean())
        result.kl_p99 = float(np.percentile(kl_all, 99))
        result.top1_agree = agree / max(len(kl_all), 1)
    if correct is not None:
        result.accuracy = float(correct.mean())
        result.accuracy_ci = metrics.accuracy_ci(correct)
        if correct_norm is not None:
            result.accuracy_norm = float(correct_norm.mean())
    key = _breakdown_key(rows)
    if key:
        for value in sorted({str(r.get(key)) for r in rows}):
            sel = np.array([str(r.get(key)) == value for r in rows])
            entry = {"items": int(sel.sum()), "ppl": metrics.perplexity(item_nll[sel], item_tokens[sel])}
            if correct is not None:
                entry["accuracy"] = float(correct[sel].mean())
            result.breakdown[f"{key}={value}"] = entry
    result.per_item = {
        "ids": [r["id"] for r in rows],
        "nll": item_nll.tolist(),
        "tokens": item_tokens.tolist(),
        **({"correct": correct.astype(int).tolist()} if correct is not None else {}),
    }
    return result


def evaluate_slice(model, tokenizer, info: SliceInfo, budget: Protocol, reference=None, progress=None) -> SliceResult:
    if tokenizer is None:
        raise ShrinkError("This model has no tokenizer, so it cannot be evaluated; load a directory that includes one.")
    all_rows = load_rows(info, split="eval")
    if info.kind == "task":
        long_context = info.id == "long_qa"
        limit = budget.long_docs * 5 if long_context and budget.long_docs else budget.task_items
        rows = select_items(all_rows, limit)
        window = budget.long_window if long_context else budget.window
        requests = task_requests(tokenizer, rows, window)
    else:
        long_docs = info.id == "long"
        limit = budget.long_docs if long_docs else budget.text_rows
        rows = select_items(all_rows, limit, by_group=True)
        requests = text_requests(tokenizer, rows, budget.long_window if long_docs else budget.window,
                                 keep_token_nll=long_docs)
    if not rows:
        raise ShrinkError(f"The slice '{info.id}' has no evaluation rows.")
    scored = score(model, requests, reference, budget.max_batch_tokens, progress)
    n = len(rows)
    item_nll, item_tokens = np.zeros(n), np.zeros(n)
    for request, out in zip(requests, scored):
        if info.kind == "task" and rows[request.item]["task"] == "mc" and request.choice != rows[request.item]["answer"]:
            continue  # the item's NLL is that of its gold continuation
        item_nll[request.item] += out.nll
        item_tokens[request.item] += out.tokens
    if info.kind != "task":
        item_bytes = scored_bytes(tokenizer, rows, budget.long_window if long_docs else None)
        result = _aggregate(info, budget, rows, item_nll, item_tokens, item_bytes, scored)
        if info.id == "long":
            result.breakdown.update(_position_buckets([s.token_nll for s in scored if s.token_nll is not None]))
        if info.kind == "pairs":
            result.breakdown.update(_pair_gaps(rows, item_nll, item_tokens))
        return result
    correct, correct_norm = _task_correct(rows, requests, scored)
    return _aggregate(info, budget, rows, item_nll, item_tokens, None, scored, correct, correct_norm)


def covered_bytes(tokenizer, text: str, ids: list[int], n: int) -> int:
    """UTF-8 bytes of `text` covered by its first `n` tokens (`ids`: the text's tokens). A fast tokenizer's character
    offsets give them to the character; otherwise the decoded prefix does (a decoder may normalise spaces). Either way
    a cut inside a multi-byte character may count up to that character's bytes."""
    if n >= len(ids):
        return len(text.encode("utf-8"))
    if n <= 0:
        return 0
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(encoded["input_ids"]) == list(ids):
            return len(text[:encoded["offset_mapping"][n - 1][1]].encode("utf-8"))
    return len(tokenizer.decode(ids[:n]).encode("utf-8"))


def scored_bytes(tokenizer, rows: list[dict], window: int | None = None) -> np.ndarray:
    """The bits-per-byte denominator per row: the bytes of the text scored. Text rows are scored whole (split into
    windows); a long document (`window` given) only up to its first window, prefix included."""
    if window is None:
        return np.array([len(r["text"].encode("utf-8")) for r in rows], dtype=float)
    room = window - len(_prefix(tokenizer))
    return np.array([covered_bytes(tokenizer, r["text"], tokenizer.encode(r["text"], add_special_tokens=False), room)
                     for r in rows], dtype=float)


def _task_correct(rows, requests, scored) -> tuple[np.ndarray, np.ndarray | None]:
    n = len(rows)
    if rows[0]["task"] == "exact":
        correct = np.zeros(n, dtype=bool)
        for request, out in zip(requests, scored):
            correct[request.item] = out.all_top1
        return correct, None
    loglik = [dict() for _ in range(n)]
    for request, out in zip(requests, scored):
        loglik[request.item][request.choice] = -out.nll
    correct = np.array([max(ll, key=ll.get) == rows[i]["answer"] for i, ll in enumerate(loglik)])
    normed = np.array([
        max(ll, key=lambda c: ll[c] / max(len(rows[i]["choices"][c]), 1)) == rows[i]["answer"]
        for i, ll in enumerate(loglik)
    ])
    return correct, normed


def _position_buckets(token_nll: list[np.ndarray]) -> dict:
    """Perplexity by token position: does quality fall off late in long documents?"""
    out = {}
    for low, high in zip(LONG_BUCKETS, LONG_BUCKETS[1:]):
        values = [t[low:high] for t in token_nll if len(t) > low]
        if values:
            joined = np.concatenate(values)
            out[f"position={low}-{high}"] = {"tokens": int(len(joined)), "ppl": float(math.exp(joined.mean()))}
    return out


def _pair_gaps(rows, item_nll, item_tokens) -> dict:
    """Perplexity of each perturbation over that of the clean twin of the same rows."""
    clean = {r["pair"]: i for i, r in enumerate(rows) if r.get("perturbation") == "clean"}
    out = {}
    for kind in sorted({r.get("perturbation") for r in rows} - {"clean", None}):
        pairs = [(i, clean[r["pair"]]) for i, r in enumerate(rows) if r.get("perturbation") == kind and r["pair"] in clean]
        if pairs:
            pert, base = np.array([p for p, _ in pairs]), np.array([b for _, b in pairs])
            ratio = metrics.perplexity(item_nll[pert], item_tokens[pert]) / metrics.perplexity(item_nll[base], item_tokens[base])
            out[f"gap={kind}"] = {"items": len(pairs), "ppl_ratio_to_clean": ratio}
    return out


def evaluate(model, tokenizer, slices: list[SliceInfo], budget: str | Protocol = "fast", reference=None,
             reference_results: dict | None = None, progress=None) -> list[SliceResult]:
    """Evaluates each slice; with a reference model adds KL, top-1 agreement and flips against it."""
    budget = get_protocol(budget) if isinstance(budget, str) else budget
    results = []
    for index, info in enumerate(slices):
        def sub(fraction, _i=index, _id=info.id):
            if progress:
                progress((_i + fraction) / len(slices), f"{_id}: {fraction:.0%}")
        result = evaluate_slice(model, tokenizer, info, budget, reference, sub)
        base = (reference_results or {}).get(info.id)
        if base is not None and result.per_item.get("correct") is not None:
            ref_correct = np.array(base.per_item["correct"], dtype=bool)
            result.flips = metrics.flips(ref_correct, np.array(result.per_item["correct"], dtype=bool))
        results.append(result)
    return results


def compare(a: SliceResult, b: SliceResult) -> dict:
    """Is b different from a on this slice? Paired over the same items."""
    if a.per_item["ids"] != b.per_item["ids"]:
        raise ShrinkError(f"Results for '{a.slice}' were scored on different items (budgets differ?); "
                          "rerun with the same budget.")
    tokens = np.array(a.per_item["tokens"], dtype=float)
    per_token_a = np.array(a.per_item["nll"]) / np.maximum(tokens, 1)
    per_token_b = np.array(b.per_item["nll"]) / np.maximum(tokens, 1)
    out = {"slice": a.slice, "ppl_a": a.ppl, "ppl_b": b.ppl, "ppl_ratio": b.ppl / a.ppl,
           "nll_p": metrics.paired_bootstrap_p(per_token_b, per_token_a, weights=tokens)}
    if "correct" in a.per_item:
        ca, cb = np.array(a.per_item["correct"], dtype=bool), np.array(b.per_item["correct"], dtype=bool)
        out.update(accuracy_a=float(ca.mean()), accuracy_b=float(cb.mean()), accuracy_p=metrics.mcnemar_p(ca, cb),
                   flips=metrics.flips(ca, cb))
    out["significant"] = min(out["nll_p"], out.get("accuracy_p", 1.0)) < 0.05
    return out
