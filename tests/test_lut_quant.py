"""bench/lut_quant.py: per-row codebooks fitted by weighted k-means, and GPTQ rounding to them."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from lut_quant import fit_codebooks, lut_bytes, lut_engine  # noqa: E402

from shrink_core.compression.apply import apply_plan_  # noqa: E402
from shrink_core.compression.obs import obs_compress  # noqa: E402
from shrink_core.model.toy import tiny_llama  # noqa: E402
from shrink_core.plan import load_plan  # noqa: E402


def test_codebooks_are_sorted_float16_values_and_beat_a_uniform_grid_on_gaussian_rows():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 512, generator=generator)
    importance = torch.ones(512)
    codebook = fit_codebooks(weight, importance, 8)
    assert codebook.shape == (32, 8) and torch.equal(codebook, codebook.half().float())
    assert bool((codebook.diff(dim=1) > 0).all())  # every level in use, in order
    nearest = codebook.gather(1, (weight.unsqueeze(-1) - codebook.unsqueeze(1)).abs().argmin(-1))
    low, high = weight.min(1, keepdim=True).values, weight.max(1, keepdim=True).values
    step = (high - low) / 7
    uniform = ((weight - low) / step).round() * step + low
    assert (nearest - weight).pow(2).mean() < 0.7 * (uniform - weight).pow(2).mean()


def test_importance_pulls_the_levels_towards_the_columns_that_matter():
    weight = torch.linspace(-1, 1, 256).repeat(4, 1)
    heavy = torch.ones(256)
    heavy[200:] = 100.0  # the last columns (weights near +1) matter most
    plain, weighted = fit_codebooks(weight, torch.ones(256), 8), fit_codebooks(weight, heavy, 8)
    assert (weighted > 0.5).sum() > (plain > 0.5).sum()


def test_gptq_rounds_every_weight_to_its_rows_codebook():
    generator = torch.Generator().manual_seed(1)
    weight, x = torch.randn(16, 64, generator=generator), torch.randn(256, 64, generator=generator)
    codebook = fit_codebooks(weight, torch.ones(64), 4)
    new, _, _, _ = obs_compress(weight, x.T @ x, codebook=codebook, act_order=True)
    assert bool(((new.unsqueeze(-1) - codebook.unsqueeze(1)).abs().min(-1).values < 1e-6).all())
    rounded = codebook.gather(1, (weight.unsqueeze(-1) - codebook.unsqueeze(1)).abs().argmin(-1))
    assert (x @ (new - weight).T).pow(2).sum() < (x @ (rounded - weight).T).pow(2).sum()  # error fed forward pays


def test_the_engine_runs_gptq_seq_to_codebooks_inside_the_context_only():
    model = tiny_llama(seed=2)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    plan = load_plan("version: 1\nrules:\n- {kind: [q, k, v, o, gate, up, down], weights: {bits: 3, group_size: "
                     "channel, method: gptq-seq}}\n")
    with lut_engine(3):
        report = apply_plan_(model, plan, ids)
    name = "model.layers.1.mlp.down_proj"
    codebook, weight = report.quant_states[name].scale, model.get_submodule(name).weight.detach()
    assert codebook.shape == (weight.shape[0], 8)
    assert bool(((weight.unsqueeze(-1) - codebook.unsqueeze(1)).abs().min(-1).values < 1e-6).all())
    assert lut_bytes(tuple(weight.shape), 3) == weight.numel() * 3 // 8 + weight.shape[0] * 8 * 2
    plain = apply_plan_(tiny_llama(seed=2), plan, ids)  # outside: the engine's grid again, scale per row
    assert plain.quant_states[name].scale.shape == (weight.shape[0], 1)
