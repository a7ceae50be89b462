"""bench/rotate_fold.py: the rotated model computes what it did, GPTQ sees rotated inputs, and folding back leaves a
plain model whose weights are the quantized rotated ones turned back."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from rotate_fold import rotate_, unrotate_  # noqa: E402

from shrink_core.compression.apply import apply_plan_  # noqa: E402
from shrink_core.model.inventory import block_linears, inventory  # noqa: E402
from shrink_core.model.toy import tiny_llama  # noqa: E402
from shrink_core.plan import load_plan  # noqa: E402

GPTQ = {"version": 1, "name": "gptq", "rules": [{"kind": ["q", "k", "v", "o", "gate", "up", "down"],
                                                   "weights": {"bits": 3, "group_size": 32, "method": "gptq"}}]}


def test_rotation_keeps_the_function_and_folds_back_to_a_plain_model():
    model = tiny_llama(seed=1).eval()
    rows = block_linears(inventory(model))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    rotated = rotate_(model, rows)
    assert rotated["sources"] == 4 * 3  # q/k/v, o, gate/up and down in each of three blocks
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    q = model.get_submodule(rows[0].name)
    assert not torch.allclose(q.weight, before[rows[0].name + ".weight"], atol=1e-3)  # the weight is W R^T
    unrotate_(rotated)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(torch.allclose(p, before[n], atol=1e-5) for n, p in model.named_parameters())


def test_gptq_on_the_rotated_model_quantizes_the_rotated_weight():
    model = tiny_llama(seed=2).eval()
    rows = block_linears(inventory(model))
    rotated = rotate_(model, rows)
    report = apply_plan_(model, load_plan(GPTQ), torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1)))
    # the codes sit on the rotated weight's grid: each quantized rotated weight is its group scales times integers
    name = rows[0].name
    state, weight = report.quant_states[name], model.get_submodule(name).weight.detach()
    codes = weight.reshape(weight.shape[0], -1, 32) / state.scale[..., None] + state.zero[..., None]
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    unrotate_(rotated)
    turned_back = model.get_submodule(name).weight.detach()
    assert not torch.allclose(turned_back.reshape(weight.shape[0], -1, 32) / state.scale[..., None]
                              + state.zero[..., None], codes, atol=1e-2)  # folded back: off the grid in this basis
