"""Pruning: masks (magnitude, Wanda, N:M, SparseGPT) and structured surgery that shrinks the model."""
import pytest
import torch

from shrink_core.compression.apply import apply_plan_
from shrink_core.compression.obs import obs_compress
from shrink_core.compression.prune import kept_channels, magnitude_mask, mask_for, nm_mask, row_mask, wanda_scores
from shrink_core.model.toy import tiny_llama
from shrink_core.plan import load_plan, resolve


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_nm_mask_pattern_is_exact(n, m):
    torch.manual_seed(0)
    scores = torch.rand(16, 64)
    mask = nm_mask(scores, n, m)
    per_group = mask.reshape(16, 64 // m, m).sum(dim=-1)
    assert (per_group == n).all()
    kept = scores.reshape(16, -1, m)[mask.reshape(16, -1, m)].reshape(16, -1, n)
    dropped = scores.reshape(16, -1, m)[~mask.reshape(16, -1, m)].reshape(16, -1, m - n)
    assert (kept.min(dim=-1).values >= dropped.max(dim=-1).values).all()


def test_magnitude_and_wanda_masks():
    torch.manual_seed(0)
    weight = torch.randn(32, 64)
    mask = magnitude_mask(weight, 0.5)
    assert int(mask.sum()) == 32 * 32
    assert float(weight[mask].abs().min()) >= float(weight[~mask].abs().max())
    norms = torch.ones(64)
    norms[:8] = 1e6  # very active inputs: Wanda keeps their weights even when small
    wanda = row_mask(wanda_scores(weight, norms), 0.5)
    assert (wanda.sum(dim=1) == 32).all() and wanda[:, :8].all()


def test_sparsegpt_hits_exact_sparsity_and_beats_magnitude_on_output_error():
    torch.manual_seed(0)
    mixing = torch.eye(64) + 0.3 * torch.randn(64, 64) / 8
    x = torch.randn(512, 64) @ mixing * torch.rand(64) * 3  # mildly correlated inputs of uneven scale (tokens, in)
    weight = torch.randn(32, 64)
    hessian = x.T @ x
    pruned, _, _, keep = obs_compress(weight, hessian, sparsity=0.5)
    assert int((pruned == 0).sum()) == int((~keep).sum()) == 32 * 64 // 2  # exactly the share asked, not about it
    assert (pruned[~keep] == 0).all()
    magnitude = weight * magnitude_mask(weight, 0.5)
    error = lambda w: float((x @ (w - weight).T).pow(2).mean())
    assert error(pruned) < 0.7 * error(magnitude)
    nm_pruned, _, _, nm_keep = obs_compress(weight, hessian, nm=(2, 4))
    assert (nm_keep.reshape(32, 16, 4).sum(-1) == 2).all() and (nm_pruned[~nm_keep] == 0).all()


def test_structured_pruning_shrinks_shapes_and_model_runs():
    model = tiny_llama()
    tokens = torch.randint(0, 256, (2, 32))
    plan = load_plan("""
version: 1
rules:
  - {blocks: [1], prune: {structure: blocks}}
  - {kind: [q, k, v, o], prune: {structure: heads, amount: 0.5}}
  - {kind: [gate, up, down], prune: {structure: channels, amount: 0.5}}
""")
    before = sum(p.numel() for p in model.parameters())
    report = apply_plan_(model, plan)
    layers = model.model.layers
    assert len(layers) == 2 and model.config.num_hidden_layers == 2
    assert layers[0].mlp.gate_proj.weight.shape == (64, 64) and layers[0].mlp.down_proj.weight.shape == (64, 64)
    assert layers[0].self_attn.q_proj.weight.shape == (32, 64) and layers[0].self_attn.o_proj.weight.shape == (64, 32)
    assert layers[0].self_attn.k_proj.weight.shape == (32, 64)  # KV heads kept
    assert model.config.intermediate_size == 64 and model.config.num_attention_heads == 2
    assert sum(p.numel() for p in model.parameters()) < 0.7 * before
    with torch.no_grad():
        logits = model(tokens).logits
    assert logits.shape == (2, 32, 256) and torch.isfinite(logits).all()
    rows = {m.name: m for m in report.modules}
    assert rows["model.layers.1.mlp.up_proj"].action == "remove" and rows["model.layers.2.mlp.up_proj"].new_shape == (64, 64)
    assert report.current_names["model.layers.2.mlp.up_proj"] == "model.layers.1.mlp.up_proj"


def test_kept_channels_stay_group_aligned():
    assert kept_channels(1536, 0.5) == 768 and kept_channels(1536, 0.3) % 32 == 0 and kept_channels(10, 0.5) == 5


def test_mask_for_respects_amount():
    weight = torch.randn(16, 32)
    from shrink_core.plan import PruneSpec

    mask = mask_for(weight, PruneSpec("unstructured", 0.25))
    assert int((~mask).sum()) == 16 * 32 // 4


def test_mask_for_refuses_wanda_without_statistics():
    from shrink_core.plan import PruneSpec

    with pytest.raises(ValueError, match="wanda needs the input activation statistics"):
        mask_for(torch.randn(8, 16), PruneSpec("unstructured", 0.5, criterion="wanda"))


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_calibrated_pruning_without_statistics_says_it_used_magnitude(criterion, tmp_path):
    """lm_head gets no calibration statistics (they are collected for block linears): it is pruned by magnitude,
    and the plan table, the report's row, its notes and the saved provenance all say so."""
    from shrink_core.compression.export import save_candidate
    from tests.test_export import tiny_tokenizer

    model = tiny_llama(tied=False)
    head_before = model.lm_head.weight.detach().clone()
    plan = load_plan(f"version: 1\nrules:\n  - {{kind: [lm_head], prune: {{amount: 0.5, criterion: {criterion}}}}}\n"
                     f"  - {{kind: [up], prune: {{amount: 0.5, criterion: {criterion}}}}}\n")
    resolved = {r.name: r for r in resolve(model, plan)}
    assert "this prunes by magnitude (fallback: no calibration statistics)" in resolved["lm_head"].note
    assert "fallback" not in resolved["model.layers.0.mlp.up_proj"].note
    report = apply_plan_(model, plan, torch.randint(0, 256, (2, 16)))
    assert torch.equal(model.lm_head.weight, head_before * magnitude_mask(head_before, 0.5))  # what the label says
    rows = {m.name: m for m in report.modules}
    assert rows["lm_head"].action == f"prune unstructured 50% magnitude (fallback: no calibration statistics for {criterion})"
    assert "fallback: no calibration statistics" in rows["lm_head"].note
    assert rows["model.layers.0.mlp.up_proj"].action == f"prune unstructured 50% {criterion}"  # statistics were there
    assert any(f"lm_head: pruned by magnitude instead of {criterion}" in n for n in report.notes)
    out = save_candidate(model, tiny_tokenizer(), plan, tmp_path / "c", {}, report)
    saved = (out / "provenance.json").read_text()
    assert f"lm_head: pruned by magnitude instead of {criterion}" in saved


def test_gptq_on_the_embedding_is_labelled_rtn():
    model = tiny_llama(tied=False)
    plan = load_plan("version: 1\nrules:\n  - {kind: [embedding, q], weights: {bits: 4, group_size: 32, method: gptq}}\n")
    report = apply_plan_(model, plan, torch.randint(0, 256, (2, 16)))
    rows = {m.name: m for m in report.modules}
    assert rows["model.embed_tokens"].action == "int4 g32 asym rtn (fallback: no calibration statistics for gptq)"
    assert rows["model.layers.0.self_attn.q_proj"].action == "int4 g32 asym gptq"
