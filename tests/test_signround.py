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


def test_refining_gptq_seq_keeps_its_grid_moves_codes_by_at_most_one_level_and_only_where_the_block_gains():
    from shrink_core.compression.apply import apply_plan_
    from shrink_core.compression.primitives import to_groups
    from shrink_core.plan import load_plan

    reference = tiny_llama(seed=1).eval()
    calibration = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    plan = ("version: 1\nrules:\n  - {kind: [q, k, v, o, gate, up, down], "
            "weights: {bits: 3, group_size: 32, method: gptq-seq}}\n")
    model = copy.deepcopy(reference)
    states = apply_plan_(model, load_plan(plan), calibration).quant_states
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    out = signround_(model, calibration, 3, 32, steps=30, minibatch=4, reference=reference,
                     grids={name: (s.scale, s.zero) for name, s in states.items()}, log=lambda _: None)
    assert [b["kept"] for b in out["blocks"]] == [b["end"] < b["start"] for b in out["blocks"]]
    moved = 0
    for name, state in states.items():
        weight = dict(model.named_parameters())[f"{name}.weight"].detach()
        block = int(name.split(".")[2])
        codes = to_groups(weight, 32) / state.scale[..., None] + state.zero[..., None]
        before = to_groups(start[f"{name}.weight"], 32) / state.scale[..., None] + state.zero[..., None]
        assert (codes - codes.round()).abs().max() < 1e-3 and codes.min() > -1e-3 and codes.max() < 7 + 1e-3
        assert (codes.round() - before.round()).abs().max() <= 1
        if not out["blocks"][block]["kept"]:
            assert torch.equal(weight, start[f"{name}.weight"])
        moved += int((codes.round() != before.round()).sum())
    assert any(b["kept"] for b in out["blocks"]) == (moved > 0)
