"""bench/compact_scales.py: log-grid scales and small zeros, so group 32 fits in w3 g64's bytes."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from compact_scales import STEPS_PER_OCTAVE, compact_bytes, compact_engine, to_grid  # noqa: E402

from shrink_core.compression import primitives  # noqa: E402
from shrink_core.compression.apply import apply_plan_  # noqa: E402
from shrink_core.model.toy import tiny_llama  # noqa: E402
from shrink_core.plan import load_plan  # noqa: E402


def on_grid(scale: torch.Tensor) -> bool:
    level = torch.log2(scale) * STEPS_PER_OCTAVE
    return bool(((level - level.round()).abs() < 1e-3).all())


def test_grid_rounds_within_half_a_step_and_keeps_each_row_within_256_levels():
    scale = torch.tensor([[1.0, 0.37, 0.0021, 1e-9], [3.0, 2.9, 2.8, 2.7]])
    grid = to_grid(scale)
    assert on_grid(grid)
    off = torch.log2(grid / scale).abs() * STEPS_PER_OCTAVE  # in grid steps
    assert bool((off[:, :2] <= 0.5 + 1e-4).all()) and bool((off[1] <= 0.5 + 1e-4).all())
    levels = torch.log2(grid[0]) * STEPS_PER_OCTAVE  # 0.0021 and 1e-9 lie more than 255 steps below 1.0: raised
    assert torch.allclose(levels[2:], levels[0] - 255) and bool((grid[0, 2:] > scale[0, 2:]).all())


def test_three_bit_group_32_fits_in_the_bytes_of_today_w3_g64():
    for shape in ((576, 576), (1536, 576), (576, 1536)):
        today = primitives.packed_weight_bytes(shape, 3, 64, False)["total"]
        assert compact_bytes(shape, 3, 32) <= today
    assert compact_bytes((1, 576), 3, 32) * 8 == 576 * 3 + 18 * 11 + 16 + 2  # rounded up to whole bytes


def test_the_engine_stores_grid_scales_inside_the_context_and_float16_after():
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    text = ("version: 1\nrules:\n- {kind: [q, k, v, o, gate, up, down], weights: {bits: 3, group_size: 32, "
            "method: gptq-seq}}\ntune: {kind: scales, steps: 3, holdout: 1}\n")
    name = "model.layers.1.mlp.down_proj"
    with compact_engine():
        model = tiny_llama(seed=2)
        state = apply_plan_(model, load_plan(text), ids, reference=tiny_llama(seed=2)).quant_states[name]
    assert on_grid(state.scale) and int(state.zero.max()) <= 7
    weight = model.get_submodule(name).weight.detach()
    decoded = primitives.dequantize(primitives.quantize(weight, state.scale, state.zero, 3, 32), state.scale,
                                    state.zero, 32)
    assert torch.allclose(decoded, weight, atol=1e-6)  # the model holds exactly what the format stores
    model = tiny_llama(seed=2)
    plain = apply_plan_(model, load_plan(text), ids, reference=tiny_llama(seed=2)).quant_states[name]
    assert not on_grid(plain.scale) and torch.equal(plain.scale, plain.scale.half().float())
