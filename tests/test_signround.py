"""bench/signround.py: learned rounding beats round-to-nearest on the model's output and stays in the stored format."""
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from signround import signround_  # noqa: E402

from shrink_core.compression.primitives import fake_quantize  # noqa: E402
from shrink_core.model.toy import tiny_llama  # noqa: E402


def _kl(reference, model, ids) -> float:
    with torch.no_grad():
        p = reference(input_ids=ids).logits.log_softmax(-1)
        q = model(input_ids=ids).logits.log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_learned_rounding_lowers_the_kl_below_round_to_nearest_with_at_most_2_to_the_bits_levels_per_group():
    reference = tiny_llama(seed=1).eval()
    model, rtn = copy.deepcopy(reference), copy.deepcopy(reference)
    head = reference.get_output_embeddings().weight.shape
    with torch.no_grad():
        for m in rtn.modules():
            if isinstance(m, torch.nn.Linear) and m.weight.shape != head:
                m.weight.copy_(fake_quantize(m.weight, 3, 32, False))
    calibration = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    out = signround_(model, calibration, 3, 32, steps=50, minibatch=4, log=lambda _: None)
    assert len(out["blocks"]) == 3
    assert all(b["last_loss"] < b["first_loss"] for b in out["blocks"])
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    assert _kl(reference, model, ids) < 0.9 * _kl(reference, rtn, ids)
    tuned = [m.weight.detach() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert tuned
    for weight in tuned:
        levels = max(len(torch.unique(group)) for group in weight.reshape(-1, 32))
        assert levels <= 2 ** 3
