"""bench/awq_fold.py: the folded model computes what it did, and the search never returns worse than no scaling."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from awq_fold import awq_fold_, search_scale  # noqa: E402

from shrink_core.compression.primitives import fake_quantize  # noqa: E402
from shrink_core.model.toy import tiny_llama  # noqa: E402


def test_folding_keeps_the_full_precision_function_and_changes_the_weights():
    model = tiny_llama(seed=1).eval()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    out = awq_fold_(model, torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1)), 3, 32)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert len(out["groups"]) == 3 * 3  # three groups per block, three blocks
    moved = [g for g in out["groups"] if g["alpha"] > 0]
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert moved and changed  # a block whose search chose a scale has folded it in


def test_the_search_is_at_most_the_unscaled_error_and_finds_a_salient_channel():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=generator)
    x[:, 5] *= 30  # one channel carries most of the output
    weight = torch.randn(16, 64, generator=generator)
    s, alpha, error, base = search_scale(x, weight, 3, 32)
    plain = (x @ fake_quantize(weight, 3, 32, False).T - x @ weight.T).pow(2).mean().item()
    assert abs(base - plain) < 1e-6 * max(1.0, plain)
    assert error < 0.9 * base and alpha > 0
    assert s[5] == s.max()
