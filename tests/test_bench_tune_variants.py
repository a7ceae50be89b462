"""The tuning-variants benchmark's parts on a tiny model: variant names parse to tune specs, and the cached untuned
quantization comes back exactly (weights, scales, zeros and rotations), so later variants start from the same model."""
import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_tune_variants import load_cache, parse_variant, save_cache, targets_of  # noqa: E402

from shrink_core.compression.apply import apply_plan_  # noqa: E402
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
