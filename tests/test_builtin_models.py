"""Integration: the real built-in models, loaded offline from their PyPI packages."""
import time

import pytest
import torch

from shrink_core.model.inventory import block_linears, inventory, summary
from shrink_core.model.load import load

pytestmark = pytest.mark.integration


def test_smollm2_facts(smollm2):
    rows = inventory(smollm2.model)
    facts = summary(smollm2.model, rows)
    assert facts["parameters"] == 134_515_008
    assert facts["blocks"] == 30 and len(block_linears(rows)) == 210
    assert sum(r.params for r in rows) == 134_515_008  # tied embedding counted once
    assert facts["vocab_size"] == 49_152 and facts["hidden_size"] == 576
    assert "dequantized" in " ".join(smollm2.notes)


def test_smollm2_generates_and_reloads_from_cache(smollm2):
    tok = smollm2.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    assert ids.input_ids[0, 0].item() != tok.convert_tokens_to_ids("<|im_start|>")  # no stray BOS (docs/models.md)
    with torch.inference_mode():
        out = smollm2.model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])
    started = time.perf_counter()
    again = load("builtin:smollm2-135m")
    assert again.from_cache and again.weights_hash == smollm2.weights_hash
    assert time.perf_counter() - started < 60  # sanity bound only; the timing target lives in bench/
    for a, b in zip(again.model.parameters(), smollm2.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_gemma3_loads():
    loaded = load("builtin:gemma3-270m")
    facts = summary(loaded.model, inventory(loaded.model))
    assert facts["parameters"] == 268_098_176
    assert facts["vocab_size"] == 262_144
    text = "The quick brown fox jumps over the lazy dog. " * 4
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        loss = loaded.model(ids, labels=ids).loss
    assert torch.isfinite(loss) and loss.exp() < 60  # a broken tokenizer gives perplexity in the thousands
