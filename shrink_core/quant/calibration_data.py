"""Calibration tokens from a recipe: `shrink_core.slices.calibration_tokens` when it exists, else a direct read of
`evalsets/data/<slice>.jsonl.gz` rows with split == "calib" (same recipe fields, recorded with the result)."""
from __future__ import annotations

import gzip
import json
import random

import torch

from ..errors import ShrinkError
from ..paths import REPO_ROOT


def slice_texts(slice_name: str, split: str) -> list[str]:
    path = REPO_ROOT / "evalsets" / "data" / f"{slice_name}.jsonl.gz"
    if not path.is_file():
        raise ShrinkError(f"The eval slice file {path} does not exist; build the evalsets or pick another slice.")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [row["text"] for row in rows if row.get("split") == split and row.get("text")]


def token_windows(tokenizer, texts: list[str], n_sequences: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """Concatenate texts (shuffled by seed) and cut n_sequences windows of seq_len tokens: (n, seq_len)."""
    order = list(texts)
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for text in order:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else []))
        if len(stream) >= n_sequences * seq_len:
            break
    if len(stream) < n_sequences * seq_len:
        n_sequences = max(1, len(stream) // seq_len)
    if len(stream) < seq_len:
        raise ShrinkError(f"The calibration text has only {len(stream)} tokens; lower seq_len or add text.")
    return torch.tensor(stream[: n_sequences * seq_len], dtype=torch.long).reshape(n_sequences, seq_len)


def calibration_from_recipe(tokenizer, recipe: dict) -> torch.Tensor:
    mix, n, seq_len, seed = recipe["mix"], recipe["n_sequences"], recipe["seq_len"], recipe.get("seed", 0)
    try:
        from ..slices import CalibrationRecipe as SliceRecipe, calibration_tokens
    except ImportError:
        calibration_tokens = None
    if calibration_tokens is not None:  # the slice registry's recipe: weights normalised to sum to 1
        total = sum(mix.values())
        slice_recipe = SliceRecipe(tuple((k, v / total) for k, v in mix.items()), n, seq_len, seed)
        return calibration_tokens(tokenizer, slice_recipe)
    total = sum(mix.values())
    parts, counts = [], [max(1, round(n * share / total)) for share in mix.values()]
    for (slice_name, _), count in zip(mix.items(), counts):
        parts.append(token_windows(tokenizer, slice_texts(slice_name, "calib"), count, seq_len, seed))
    return torch.cat(parts)[:n]
