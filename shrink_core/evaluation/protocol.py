"""The evaluation protocol in one place, and the key that ties every stored figure to what determined it.

A stored figure (an evaluation result, a sensitivity score) is reused only when the key stored with it equals the key
this code would write for the same request: the protocol version and a sha256 over every input of the figure
(protocol parameters, slice content, model weights, plan, calibration recipe, method). A fix to how a figure is
computed bumps PROTOCOL_VERSION (every figure) or the kind's own version (that kind only); stored figures of the old
version then stop matching and are computed again. `shrink_core.__version__` plays no part: it never moved.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import asdict, dataclass
from functools import lru_cache

from shrink_core.errors import ShrinkError
from shrink_core.evaluation.slices import SliceInfo

# Bump on any change to how a stored figure is computed (selection, windows, scoring, statistics, estimators).
# 1: until the bpb fix; 2: bits per byte of a truncated long document divide by the bytes of the text scored.
PROTOCOL_VERSION = 2
# Per kind, for a change that touches one kind of figure only.
# method_ratios 2: keyed by the scored method (with the plan's input rotation); a version-1 row may hold a rotated
# draft's ratios under the plain method's name, so none is read again
FIGURE_VERSIONS = {"eval": 1, "sensitivity": 1, "size": 1, "measure": 1, "method_ratios": 2}
# Positions whose full-vocabulary log-probs exist at once while a batch is reduced (a memory bound, not part of the
# protocol: a 128k vocabulary is 131 MB of float32 per copy at 256 positions, 525 MB at a whole 1024-token batch).
SCORED_POSITIONS = 256


@dataclass(frozen=True)
class Protocol:
    name: str
    text_rows: int | None  # rows of a text slice (parallel languages: the same groups in every language)
    task_items: int | None  # questions of a task slice
    long_docs: int | None  # documents of the long slice, and long-context questions
    window: int  # tokens per window for text rows (longer rows are split with overlap)
    long_window: int  # tokens of a long document scored in one window
    max_batch_tokens: int = 1024  # measured: smaller batches stay in cache on a 2-core CPU (~15% faster than 4096)


PROTOCOLS = {
    "fast": Protocol("fast", text_rows=120, task_items=200, long_docs=3, window=512, long_window=4096),
    "standard": Protocol("standard", text_rows=480, task_items=1000, long_docs=10, window=1024, long_window=8192),
    "full": Protocol("full", text_rows=None, task_items=None, long_docs=None, window=1024, long_window=8192),
}
LONG_BUCKETS = (0, 512, 1024, 2048, 4096, 8192)  # token positions of the long slice's perplexity-by-position


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ShrinkError(f"Unknown evaluation protocol '{name}'; choose one of: {', '.join(PROTOCOLS)}.")
    return PROTOCOLS[name]


def eval_protocol(budget: Protocol) -> dict:
    """The parameters of the evaluation protocol that a budget fixes (the rest is code, under PROTOCOL_VERSION)."""
    return {"budget": asdict(budget), "long_buckets": list(LONG_BUCKETS)}


# ---------------------------------------------------------------- keys


@lru_cache(maxsize=256)
def _content_sha256(path: str, stamp: str) -> str:
    digest = hashlib.sha256()
    with gzip.open(path, "rb") as handle:  # the rows, not the gzip header (which carries a timestamp)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def slice_fingerprint(info: SliceInfo) -> dict:
    """What a slice contributes to a key: its id, kind, metric and a sha256 of its rows (every split)."""
    stat = info.path.stat()
    return {"id": info.id, "kind": info.kind, "metric": info.metric,
            "sha256": _content_sha256(str(info.path), f"{stat.st_size}:{stat.st_mtime_ns}")}


def figure_key(kind: str, *, weights_hash: str, protocol: dict, slice_info: SliceInfo | None = None,
               plan: dict | None = None, calibration: dict | None = None, method: str | None = None) -> str:
    """'<kind>/p<PROTOCOL_VERSION>.<kind version>/<sha256>': equal exactly when every input of the figure is equal."""
    if kind not in FIGURE_VERSIONS:
        raise ValueError(f"unknown figure kind {kind!r}; known: {sorted(FIGURE_VERSIONS)}")
    version = f"p{PROTOCOL_VERSION}.{FIGURE_VERSIONS[kind]}"
    body = {"kind": kind, "version": version, "weights_hash": weights_hash, "protocol": protocol,
            "slice": slice_fingerprint(slice_info) if slice_info is not None else None, "plan": plan,
            "calibration": calibration, "method": method}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return f"{kind}/{version}/{hashlib.sha256(text.encode()).hexdigest()}"


def eval_key(weights_hash: str, info: SliceInfo, budget: Protocol | str, plan: dict | None = None,
             calibration: dict | None = None) -> str:
    """The key of one slice's evaluation result: of the model itself (no plan), or of a plan applied to it."""
    budget = get_protocol(budget) if isinstance(budget, str) else budget
    return figure_key("eval", weights_hash=weights_hash, protocol=eval_protocol(budget), slice_info=info, plan=plan,
                      calibration=calibration)
