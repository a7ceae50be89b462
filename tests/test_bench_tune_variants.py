"""The tuning-variants benchmark's parts on a tiny model: variant names parse to tune specs, and the cached untuned
quantization comes back exactly (weights, scales, zeros and rotations), so later variants start from the same model,
and the `codesX` variant's tuner trains codes that stay on the format's grid."""
import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_tune_variants import codes_tuner, load_cache, parse_variant, save_cache, targets_of  # noqa: E402

from shrink_core.compression.apply import apply_plan_  # noqa: E402
from shrink_core.compression.tune import tune_scales_  # noqa: E402
from shrink_core.model.toy import tiny_llama  # noqa: E402
from shrink_core.plan import load_plan  # noqa: E402
from shrink_core.plan.spec import TuneSpec  # noqa: E402


def test_variant_names_override_the_plans_tune_spec():
    base = TuneSpec(steps=100, lr=None)
    assert parse_variant("none", base) == (None, {})
    assert parse_variant("base", base) == (base, {})
    spec, rows = parse_variant("steps200+lr4e-3+rows256+rand16", base)
    assert (spec.steps, spec.lr, spec.batch, spec.holdout) == (200, 4e-3, 2, 8)
    assert rows == {"rows": 256, "rand": 16}
    assert parse_variant("base+codes0.01", base) == (base, {"codes": 0.01})
    with pytest.raises(SystemExit, match="'epochs3' is not base"):
        parse_variant("epochs3", base)


def test_the_cached_quantization_comes_back_exactly(tmp_path):
    model = tiny_llama(seed=3, hidden=96).eval()
    plan = load_plan("version: 1\nrotate: hadamard\nrules:\n"
                     "- {kind: [q, k, v, o, gate, up, down], weights: {bits: 3, group_size: 32, scales: log8}}\n")
    fresh = copy.deepcopy(model)
    states = apply_plan_(model, plan).quant_states
    targets = targets_of(model, states)
    assert len(targets) == 21 and all(state.rotation is not None for _, state in targets.values())
    save_cache(tmp_path / "q.safetensors", model, {name: state for name, (_, state) in targets.items()}, {"seconds": 1.5})
    loaded, meta = load_cache(tmp_path / "q.safetensors", fresh)
    assert meta == {"seconds": 1.5} and loaded.keys() == targets.keys()
    for name, (module, state) in targets.items():
        assert torch.equal(fresh.get_submodule(name).weight, module.weight)
        back = loaded[name]
        assert torch.equal(back.scale, state.scale) and torch.equal(back.zero, state.zero)
        assert (back.bits, back.group_size, back.scales, back.rotation) == (3, 32, "log8", state.rotation)


def test_trained_codes_move_by_whole_steps_inside_the_code_range_under_the_tuned_scales():
    reference = tiny_llama(seed=2).eval()
    model = copy.deepcopy(reference)
    plan = load_plan("version: 1\nrotate: hadamard\nrules:\n"
                     "- {kind: [q, k, v, o, gate, up, down], weights: {bits: 3, group_size: 32}}\n")
    states = apply_plan_(model, plan).quant_states
    calibration = torch.randint(0, 256, (24, 24), generator=torch.Generator().manual_seed(7))
    built = []
    done = tune_scales_(model, reference, targets_of(model, states), calibration,
                        TuneSpec(steps=40, lr=0.01, holdout=4), tuner=codes_tuner(0.03, built))
    assert done["kept"] and done["held_kl_end"] < done["held_kl_start"]
    assert sorted(done["lr"]) == [[0.01, 21], [0.03, 21]]  # the scales' step and the codes'
    assert 0 < sum(t.changed() for t in built) < 0.05 * sum(t.codes.numel() for t in built)
    for name, (module, state) in targets_of(model, states).items():
        basis = state.rotation.apply(module.weight.detach())
        codes = basis.reshape(basis.shape[0], -1, 32) / done["states"][name].scale[..., None] + state.zero[..., None]
        assert torch.allclose(codes, codes.round(), atol=1e-3)
        assert codes.round().min() >= 0 and codes.round().max() <= 7
