"""Sensitivity on the tiny seeded model: exhaustive probes, the fast Fisher estimate, records, store reuse, plans."""
from pathlib import Path

import numpy as np
import pytest
import torch

from shrink_core.compression import primitives
from shrink_core.errors import ShrinkError
from shrink_core.model.inventory import block_linears, inventory
from shrink_core.model.load import LoadedModel, ModelSpec
from shrink_core.model.toy import ByteTokenizer, tiny_llama
from shrink_core.plan import load_plan
from shrink_core.results.store import Store
from shrink_core.sensitivity import (
    SETTINGS,
    ProbeCache,
    fisher,
    probe,
    protect_plan_yaml,
    run_scan,
    sample_modules,
    spearman,
    stored_agreement,
    stored_records,
)
from shrink_core.sensitivity.probe import calib_tokens, eval_tokens, whole_model_kl
from shrink_core.sensitivity.settings import perturbed

from .fisher_oracle import estimate, kept_statistics


def tiny_loaded(seed: int = 0, tied: bool = True) -> LoadedModel:
    model = tiny_llama(seed=seed, vocab=258, tied=tied)
    return LoadedModel(ModelSpec("toy:tiny", "local", "toy"), model, ByteTokenizer(), Path("."), f"hash{seed}", 0.0,
                       False)


@pytest.fixture
def loaded():
    return tiny_loaded()


def linears(model):
    named = dict(model.named_modules())
    rows = block_linears(inventory(model))
    return rows, {r.name: named[r.name] for r in rows}, {r.name: r.block for r in rows}


def test_settings_perturb_as_named(tiny_model):
    weight = tiny_model.model.layers[0].mlp.up_proj.weight.detach()
    before = weight.clone()
    nm = perturbed(SETTINGS["nm24"], weight)
    assert ((nm.reshape(-1, 4) != 0).sum(-1) <= 2).all()
    assert (perturbed(SETTINGS["prune50"], weight) == 0).float().mean() == pytest.approx(0.5, abs=0.01)
    w2, w8 = perturbed(SETTINGS["w2g64"], weight), perturbed(SETTINGS["w8"], weight)
    assert (w2 - weight).abs().mean() > 10 * (w8 - weight).abs().mean() > 0
    assert torch.equal(weight, before)  # pure: the argument is untouched


def test_prefix_reuse_equals_full_recompute_and_restores_weights(loaded):
    model, tokenizer = loaded.model, loaded.tokenizer
    rows, modules, blocks = linears(model)
    cache = ProbeCache(model, eval_tokens(tokenizer, "toy_en", 6, 32), chunk=4)
    with torch.inference_mode():  # the cache's reference is the model's own full forward
        full = torch.log_softmax(model(cache.ids).logits[:, :-1].float(), -1)
    assert torch.allclose(full, cache.ref_logp, atol=1e-5)
    for name in ("model.layers.2.mlp.down_proj", "model.layers.1.self_attn.k_proj"):
        weight = modules[name].weight
        before, pointer = weight.detach().clone(), weight.data_ptr()
        reused = probe(cache, {name: modules[name]}, blocks, SETTINGS["w2g64"], reuse_prefix=True)
        recomputed = probe(cache, {name: modules[name]}, blocks, SETTINGS["w2g64"], reuse_prefix=False)
        assert reused.kl == recomputed.kl and reused.delta_nll == recomputed.delta_nll
        assert reused.kl > 0
        assert torch.equal(modules[name].weight, before) and modules[name].weight.data_ptr() == pointer
    # a stronger setting hurts more, and a whole block more than any one of its modules
    name = "model.layers.1.mlp.up_proj"
    mild = probe(cache, {name: modules[name]}, blocks, SETTINGS["w8"]).kl
    harsh = probe(cache, {name: modules[name]}, blocks, SETTINGS["w2g64"]).kl
    block = {n: m for n, m in modules.items() if blocks[n] == 1}
    whole = probe(cache, block, blocks, SETTINGS["w2g64"]).kl
    assert mild < harsh < whole


def test_a_whole_changed_copy_measures_what_the_probe_measures_for_the_same_weights(loaded):
    """The closed loop's probe rounds: a copy with a whole mixed plan applied, through its own forward, gives the
    KL the probe gives for the same weights swapped in; an unchanged copy gives zero."""
    import copy

    model, tokenizer = loaded.model, loaded.tokenizer
    rows, modules, blocks = linears(model)
    cache = ProbeCache(model, eval_tokens(tokenizer, "toy_en", 6, 32), chunk=4)
    assert whole_model_kl(cache, copy.deepcopy(model)).kl < 1e-6
    plan = {name: SETTINGS["w2g64" if i % 3 == 0 else "w4g64"] for i, name in enumerate(modules)}
    changed = copy.deepcopy(model)
    for name, setting in plan.items():
        changed.get_submodule(name).weight.data = perturbed(setting, modules[name].weight.detach())
    whole = whole_model_kl(cache, changed)
    swapped = probe(cache, modules, blocks, plan)
    assert whole.kl == pytest.approx(swapped.kl, rel=1e-4) and whole.kl > 1e-3
    assert whole.delta_nll == pytest.approx(swapped.delta_nll, rel=1e-3, abs=1e-5)
    assert whole.sequences == swapped.sequences == 6


def test_per_sequence_gradient_matches_autograd(loaded):
    """The passes' hooks give each sequence's weight gradient: with the text's labels, their sum and their squares'
    sum are autograd's, one sequence at a time."""
    model = loaded.model
    _, modules, _ = linears(model)
    ids = calib_tokens(loaded.tokenizer, "toy_en", 2, 16)
    stats = kept_statistics(model, ids, modules, batch=2, first_order=True)
    name = "model.layers.1.self_attn.o_proj"
    squares = torch.zeros_like(modules[name].weight)
    total = torch.zeros_like(modules[name].weight)
    for row in ids:  # one sequence at a time, autograd's own weight gradient
        model.zero_grad()
        logits = model(row[None]).logits[0, :-1]
        torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").backward()
        grad = modules[name].weight.grad.detach()
        squares += grad * grad
        total += grad
    model.zero_grad()
    assert torch.allclose(stats.gradient[name], total, rtol=1e-4, atol=1e-6)
    assert torch.allclose(stats.empirical[name], squares, rtol=1e-4, atol=1e-8)
    assert stats.tokens == 2 * 15
    assert all(not p.requires_grad or p.grad is None for p in model.parameters() if p is not modules[name].weight)


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 6, 40).astype(float), rng.normal(size=40)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 400]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert np.isnan(spearman([1, 2], [2, 1]))


def test_sample_spreads_over_blocks_and_kinds(loaded):
    rows, _, _ = linears(loaded.model)
    sample = sample_modules(rows, 12)
    assert len(sample) == len({r.name for r in sample}) == 12
    assert {r.block for r in sample} == {0, 1, 2} and len({r.kind for r in sample}) == 7


def test_fast_scan_records_agreement_and_store_reuse(loaded, shrink_home, monkeypatch):
    store = Store()
    report = run_scan(loaded, ["toy_en"], ["w8", "w2g64"], "fast", "quick", check=12, store=store)
    assert len(report.records) == (21 + 1) * 2 * 2  # (linears + the tied embedding) x settings x metrics
    record = report.records[0]
    assert (record.method, record.slice, record.metric) == ("fast", "toy_en", "kl") and record.block == 0
    embedding = [r for r in report.records if r.kind == "embedding"]
    assert {(r.module, r.block, r.method) for r in embedding} == {("model.embed_tokens", -1, "exhaustive")}
    assert not [r for r in report.records if r.kind == "lm_head"]  # tied: one decision, at the embedding
    w2 = {r.module: r.value for r in report.records if r.setting == "w2g64" and r.metric == "kl"}
    w8 = {r.module: r.value for r in report.records if r.setting == "w8" and r.metric == "kl"}
    assert all(w2[m] > w8[m] > 0 for m in w2)
    assert report.computed == 21 * 2 + 12 + 2 and report.reused == 0
    assert {(a.slice, a.setting, a.metric) for a in report.agreement} == {("toy_en", "w8", "kl"),
                                                                        ("toy_en", "w8", "dnll")}
    assert all(-1 <= a.spearman <= 1 and a.modules == 12 for a in report.agreement)
    assert len(stored_agreement(store, "toy:tiny")) == 2

    def boom(*args, **kwargs):
        raise AssertionError("recomputed instead of reusing the store")

    monkeypatch.setattr("shrink_core.sensitivity.scan.fisher_scores", boom)
    monkeypatch.setattr("shrink_core.sensitivity.scan.probe", boom)
    again = run_scan(loaded, ["toy_en"], ["w8", "w2g64"], "fast", "quick", check=12, store=store)
    assert again.computed == 0 and again.reused == 21 * 2 + 12 + 2
    assert [(r.module, r.value) for r in again.records] == [(r.module, r.value) for r in report.records]
    other = tiny_loaded(seed=1)  # a different weights hash is never served from the first model's scores
    monkeypatch.undo()
    assert run_scan(other, ["toy_en"], ["w8"], "fast", "quick", store=store).computed == 21 + 1
    assert run_scan(other, ["toy_en"], ["nm24"], "fast", "quick", store=store).computed == 21  # no masks on it


def test_exhaustive_scan_probes_only_missing_modules(loaded, shrink_home):
    store = Store()
    first = run_scan(loaded, ["toy_en"], ["w4g64"], "exhaustive", "quick", modules=r"layers\.0\.", store=store,
                     metrics=("kl",))
    assert len(first.records) == 7 and first.computed == 7
    second = run_scan(loaded, ["toy_en"], ["w4g64"], "exhaustive", "quick", modules=r"layers\.[01]\.", store=store,
                      metrics=("kl",))
    assert second.computed == 7 and second.reused == 7 and len(second.records) == 14
    assert {r.method for r in stored_records(store, "toy:tiny")} == {"exhaustive"}


def test_scan_errors_are_one_sentence(loaded, shrink_home):
    with pytest.raises(ShrinkError, match="Unknown setting 'w5'"):
        run_scan(loaded, ["toy_en"], ["w5"], store=Store())
    with pytest.raises(ShrinkError, match="matches no block linear"):
        run_scan(loaded, ["toy_en"], ["w8"], modules="nothing_here", store=Store())


def test_protect_plan_is_valid_and_selects_exactly_the_top_modules(loaded):
    rows = inventory(loaded.model)
    top = [("model.layers.2.mlp.down_proj", 0.5), ("model.layers.0.self_attn.v_proj", 0.2)]
    plan = load_plan(protect_plan_yaml(top, "w3g64", "en"))
    assert [r.keep for r in plan.rules] == [True, True, False]
    assert plan.rules[-1].weights.bits == 3 and plan.rules[-1].weights.group_size == 64
    for rule, (name, _) in zip(plan.rules, top):
        assert [r.name for r in rows if rule.selects(r, 3)] == [name]
    held = load_plan(protect_plan_yaml(top, "nm24", "en", protect="w8"))
    assert held.rules[0].weights.bits == 8 and held.rules[-1].prune.structure == "nm"


def test_cli_choices_match_the_library():
    import argparse

    from shrink_core.cli import sensitivity as command
    from shrink_core.sensitivity import METHODS, SCAN_DEPTHS

    sub = argparse.ArgumentParser().add_subparsers()
    command.add_parser(sub)
    parser = sub.choices["sensitivity"]
    options = {a.dest: a for a in parser._actions}
    assert list(options["method"].choices) == list(METHODS)
    assert list(options["depth"].choices) == list(SCAN_DEPTHS)
    assert all(s in options["settings"].help for s in SETTINGS)


def test_sampled_label_fisher_is_seeded_and_has_no_first_order_term(loaded):
    _, modules, _ = linears(loaded.model)
    ids = calib_tokens(loaded.tokenizer, "toy_en", 2, 16)
    name = "model.layers.0.mlp.gate_proj"
    one, setting = {name: modules[name]}, SETTINGS["w3g64"]
    a, b = (fisher.fisher_scores(loaded.model, ids, one, [setting], first_order=False) for _ in range(2))
    (kl, dnll) = a.values["w3g64"][name]
    assert a.values == b.values and kl > 0 and dnll == kl
    data = kept_statistics(loaded.model, ids, one, first_order=True)  # the text's labels: the empirical Fisher
    kl_data, dnll_data = estimate(modules[name].weight, data.empirical[name], data.gradient[name], data.tokens, setting)
    assert kl_data != pytest.approx(kl, rel=1e-3) and dnll_data != kl_data


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_streamed_fisher_scores_equal_the_kept_statistics(family):
    """fisher_scores reduces each batch at once and keeps nothing the size of the weights: same estimates (experts
    included, whose tokens are a routed subset of each sequence)."""
    from shrink_core.model.toy import tiny_family

    model = tiny_family(family)
    _, modules, _ = linears(model)
    ids = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(3))
    settings = [SETTINGS["w4g64"], SETTINGS["w2g64"], SETTINGS["nm24"]]
    stats = kept_statistics(model, ids, modules, batch=4, first_order=True)
    streamed = fisher.fisher_scores(model, ids, modules, settings, batch=4)
    assert fisher.stats_bytes(modules) == 8 * sum(m.weight.numel() for m in modules.values())
    for s in settings:
        for name, module in modules.items():
            kept = estimate(module.weight, stats.fisher[name], stats.gradient[name], stats.tokens, s)
            # dNLL = first-order sum + KL: float32 sums of opposite signs, so its tolerance follows KL's size
            assert streamed.values[s.id][name] == pytest.approx(kept, rel=1e-4, abs=1e-3 * kept[0]), (s.id, name)
    assert all(v[0] > 0 for v in streamed.values["w2g64"].values())


def test_probes_without_the_reference_cache_give_the_same_figures(monkeypatch):
    import sys

    probe_module = sys.modules["shrink_core.sensitivity.probe"]  # the package re-exports the function `probe`
    model = tiny_loaded(tied=False).model
    named = dict(model.named_modules())
    ids = eval_tokens(ByteTokenizer(), "toy_en", 6, 32)
    targets = {"model.embed_tokens": -1, "model.layers.1.self_attn.v_proj": 1, "lm_head": 3}
    kept = ProbeCache(model, ids, chunk=4)
    monkeypatch.setattr(probe_module, "REFERENCE_CACHE_BYTES", 0)
    recomputed = ProbeCache(model, ids, chunk=4)
    assert kept.ref_logp is not None and recomputed.ref_logp is None
    assert torch.equal(kept.ref_nll, recomputed.ref_nll)
    for name in targets:
        a, b = (probe(c, {name: named[name]}, targets, SETTINGS["w3g64"]) for c in (kept, recomputed))  # noqa: B023
        assert (a.kl, a.delta_nll) == (b.kl, b.delta_nll) and a.kl > 0, name


def test_a_streamed_scan_gives_the_kept_scan_figures(shrink_home, monkeypatch):
    kept = run_scan(tiny_loaded(), ["toy_en"], ["w2g64"], "fast", "quick", metrics=("kl",), store=Store())
    monkeypatch.setattr("shrink_core.sensitivity.scan.STATS_BYTES_CAP", 0)
    streamed = run_scan(tiny_loaded(), ["toy_en"], ["w2g64"], "fast", "quick", metrics=("kl",), store=Store(
        shrink_home / "other.sqlite"))
    assert streamed.timings["fisher_streamed"] and not kept.timings["fisher_streamed"]
    assert [r.module for r in streamed.records] == [r.module for r in kept.records]
    assert [r.value for r in streamed.records] == pytest.approx([r.value for r in kept.records], rel=1e-4)


def test_fisher_estimate_tracks_exhaustive_kl_on_the_same_tokens(loaded):
    """The second-order estimate is the measured KL's Taylor term: right scale and right order across modules."""
    _, modules, blocks = linears(loaded.model)
    ids = eval_tokens(loaded.tokenizer, "toy_en", 16, 32)
    cache = ProbeCache(loaded.model, ids, chunk=8)
    scores = fisher.fisher_scores(loaded.model, ids, modules, [SETTINGS["w4g64"], SETTINGS["w2g64"]], batch=8,
                                  first_order=False)
    for setting in ("w4g64", "w2g64"):
        estimated = [scores.values[setting][n][0] for n in modules]
        measured = [probe(cache, {n: m}, blocks, SETTINGS[setting]).kl for n, m in modules.items()]
        ratios = sorted(e / m for e, m in zip(estimated, measured))
        assert spearman(estimated, measured) > 0.9
        assert 0.5 < ratios[len(ratios) // 2] < 2


def test_compare_slices_counts_shared_top_modules_and_rank_agreement():
    from shrink_core.sensitivity.compare import compare_slices, top_modules
    from shrink_core.sensitivity.scan import Record

    def records(slice_id, values):
        return [Record(f"m{i}", i, "q", "w3g64", slice_id, "kl", v, "fast") for i, v in enumerate(values)]

    rows = records("en", [5, 4, 3, 2, 1]) + records("zh", [1, 4, 3, 2, 5]) + records("fr", [5, 4, 3, 2, 1])
    rows += [Record("m0", 0, "q", "w8", "en", "kl", 9.0, "fast")]  # another setting is ignored
    assert top_modules(rows, "en", "w3g64", k=2) == ["m0", "m1"]
    assert top_modules(rows, "zh", "w3g64", k=2) == ["m4", "m1"]
    by_pair = {(c.slice_a, c.slice_b): c for c in compare_slices(rows, "w3g64", k=2)}
    assert list(by_pair) == [("en", "zh"), ("en", "fr"), ("zh", "fr")]
    assert by_pair[("en", "fr")].spearman == pytest.approx(1.0) and by_pair[("en", "fr")].shared_top == 2
    assert by_pair[("en", "zh")].shared_top == 1 and by_pair[("en", "zh")].spearman == pytest.approx(-0.6)
    assert by_pair[("en", "zh")].modules == 5


def test_first_order_pass_adds_the_text_gradient_to_the_sampled_fisher(loaded):
    """One forward, two backwards: F as with sampled labels alone, and the scores' dNLL minus KL is the text
    gradient's first-order term."""
    _, modules, _ = linears(loaded.model)
    ids = calib_tokens(loaded.tokenizer, "toy_en", 4, 16)
    both = kept_statistics(loaded.model, ids, modules, batch=2, first_order=True)
    sampled = kept_statistics(loaded.model, ids, modules, batch=2)
    for name in modules:
        assert torch.allclose(both.fisher[name], sampled.fisher[name], rtol=1e-5, atol=1e-10)
    name = "model.layers.2.mlp.down_proj"
    scores = fisher.fisher_scores(loaded.model, ids, {name: modules[name]}, [SETTINGS["w3g64"]], batch=2)
    (kl, dnll) = scores.values["w3g64"][name]
    delta = perturbed(SETTINGS["w3g64"], modules[name].weight.detach()) - modules[name].weight.detach()
    assert kl == pytest.approx(float((both.fisher[name] * delta.square()).sum()) / (2 * both.tokens), rel=1e-4)
    assert dnll - kl == pytest.approx(float((both.gradient[name] * delta).sum()) / both.tokens, rel=1e-4)


def test_embedding_probe_is_a_full_forward_and_an_untied_head_reuses_the_blocks():
    """The tied embedding is probed from the token ids (input and head both perturbed, as the engine applies it);
    an untied lm_head on the cached last-block output, bit for bit what a full recompute gives."""
    from shrink_core.sensitivity.probe import kl_and_nll, log_probs

    tied = tiny_loaded()
    model = tied.model
    cache = ProbeCache(model, eval_tokens(tied.tokenizer, "toy_en", 6, 32), chunk=4)
    embed = model.get_input_embeddings()
    before = embed.weight.detach().clone()
    result = probe(cache, {"model.embed_tokens": embed}, {"model.embed_tokens": -1}, SETTINGS["w3g64"])
    assert torch.equal(embed.weight, before) and model.lm_head.weight is embed.weight
    with torch.inference_mode():
        embed.weight.data = perturbed(SETTINGS["w3g64"], before)
        logp = torch.log_softmax(model(cache.ids).logits[:, :-1].float(), -1)
        embed.weight.data = before
    kl, nll = kl_and_nll(cache.ref_logp, logp, cache.targets)
    assert result.kl == pytest.approx(float(kl.double().mean()), rel=1e-4) and result.kl > 0
    assert result.delta_nll == pytest.approx(float((nll - cache.ref_nll).double().mean()), rel=1e-3, abs=1e-6)

    untied = tiny_loaded(tied=False).model
    cache = ProbeCache(untied, eval_tokens(tied.tokenizer, "toy_en", 6, 32), chunk=4)
    head, layers = untied.lm_head, len(untied.model.layers)
    reused = probe(cache, {"lm_head": head}, {"lm_head": layers}, SETTINGS["w2g64"])
    recomputed = probe(cache, {"lm_head": head}, {"lm_head": layers}, SETTINGS["w2g64"], reuse_prefix=False)
    assert reused.kl == recomputed.kl > 0 and reused.delta_nll == recomputed.delta_nll
    with torch.inference_mode():
        assert torch.equal(cache.run_from(-1, 0, 4), cache.block_inputs[layers][:4])  # ids -> the cached output
        assert torch.equal(log_probs(untied, cache.block_inputs[layers][:4]), cache.ref_logp[:4])


def test_untied_embedding_and_head_are_two_exhaustive_decisions(shrink_home):
    report = run_scan(tiny_loaded(tied=False), ["toy_en"], ["w4g64"], "fast", "quick", metrics=("kl",),
                      store=Store())
    outside = {(r.module, r.kind, r.block, r.method) for r in report.records if r.block == -1}
    assert outside == {("model.embed_tokens", "embedding", -1, "exhaustive"), ("lm_head", "lm_head", -1, "exhaustive")}
    assert all(r.value > 0 for r in report.records if r.block == -1)
    only = run_scan(tiny_loaded(tied=False), ["toy_en"], ["w4g64"], "exhaustive", "quick", modules="lm_head",
                    metrics=("kl",), store=Store())
    assert [r.module for r in only.records] == ["lm_head"] and only.reused == 1  # served from the store


def test_partial_last_group_is_scored_as_the_engine_applies_it():
    from shrink_core.compression.primitives import fake_quantize

    weight = torch.randn(8, 96, generator=torch.Generator().manual_seed(0))  # 96 = 64 + 32: partial last group
    scored = perturbed(SETTINGS["w4g64"], weight)
    assert torch.equal(scored, fake_quantize(weight, 4, 64, False))
    assert not torch.equal(scored, fake_quantize(weight, 4, None, False))  # not the old per-channel fallback


def test_perturbing_by_blocks_of_rows_gives_the_same_weight(monkeypatch):
    from shrink_core.compression import primitives

    weight = torch.randn(300, 128, generator=torch.Generator().manual_seed(0))
    names = ("w4g64", "w3g32", "w8", "nm24", "prune50")
    whole = {(s, dtype): perturbed(SETTINGS[s], weight.to(dtype)) for s in names
             for dtype in (torch.float32, torch.bfloat16)}
    monkeypatch.setattr(primitives, "ROW_CHUNK_BYTES", 4 * 128 * 7)  # 7 rows at a time
    for (setting, dtype), expected in whole.items():
        assert torch.equal(perturbed(SETTINGS[setting], weight.to(dtype)), expected), (setting, dtype)


def test_winsorized_sum_caps_one_overshooting_sequence():
    # ru, block 0's v_proj at W3 g64 (docs/sensitivity.md): seven sequences near 0.04, the eighth at 36.7
    ru = [0.079, 0.041, 0.03, 0.053, 0.033, 0.042, 0.038, 36.743]
    total, capped = fisher.winsorized_sum(ru, 10.0)
    assert capped == 1 and total == pytest.approx(sum(ru[:7]) + 10 * 0.0415)
    assert total < 1 < sum(ru)  # the plain sum is 37.06
    assert fisher.winsorized_sum([1.0, 2.0, 3.0, 4.0], 10.0) == (10.0, 0)  # nothing past 10x the median
    # an expert two sequences route to: too few positive values for a median, summed as they are
    assert fisher.winsorized_sum([0.0, 0.0, 0.0, 5.0, 500.0], 10.0) == (505.0, 0)
    assert fisher.winsorized_sum([0.0, 1.0, 1.0, 1.0, 100.0], 10.0) == (13.0, 1)  # the median of the positive ones


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_robust_scores_with_a_loose_cap_equal_the_plain_ones(family, monkeypatch):
    """Per-sequence terms sum to the diagonal's total (stacked, or one sequence at a time for large modules), and
    holding the first-order gradients for the Fisher pass changes nothing but the weight errors' count."""
    from shrink_core.model.toy import tiny_family

    model = tiny_family(family)
    _, modules, _ = linears(model)
    ids = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(3))
    settings = [SETTINGS["w4g64"], SETTINGS["w2g64"]]
    plain = fisher.fisher_scores(model, ids, modules, settings, batch=4)
    robust = fisher.fisher_scores(model, ids, modules, settings, batch=4, robust=1e9, hold_gradients=True)
    stacked = fisher.fisher_scores(model, ids, modules, settings, batch=4, quadratic="sequence")
    monkeypatch.setattr(fisher, "STACK_BYTES", 0)
    # row blocks of a few rows: every module's errors and gradients are made and reduced block by block
    monkeypatch.setattr(primitives, "ROW_CHUNK_BYTES", 4 * 8 * max(m.weight.shape[1] for m in modules.values()))
    assert all(len(range(0, m.weight.shape[0], primitives.chunk_rows(m.weight.shape[1]))) > 1
               for m in modules.values())
    shapes, error = set(), fisher.weight_error
    monkeypatch.setattr(fisher, "weight_error", lambda s, w: shapes.add(tuple(w.shape)) or error(s, w))
    one_by_one = fisher.fisher_scores(model, ids, modules, settings, batch=4, robust=1e9)
    assert shapes.isdisjoint(tuple(m.weight.shape) for m in modules.values())  # never a whole weight's error
    held_by_rows = fisher.fisher_scores(model, ids, modules, settings, batch=4, robust=1e9, hold_gradients=True)
    by_rows = fisher.fisher_scores(model, ids, modules, settings, batch=4, quadratic="sequence")
    assert robust.capped == one_by_one.capped == held_by_rows.capped == 0
    for s in settings:
        for name in modules:
            assert by_rows.values[s.id][name] == pytest.approx(stacked.values[s.id][name], rel=1e-4,
                                                               abs=1e-3 * stacked.values[s.id][name][0])
            for other in (robust, one_by_one, held_by_rows):
                assert other.values[s.id][name] == pytest.approx(plain.values[s.id][name], rel=1e-4,
                                                                 abs=1e-3 * plain.values[s.id][name][0]), (s.id, name)


def test_the_batch_changes_no_draw_only_rounding():
    """The Fisher pass draws each position's label from one generator, row by row, so a smaller batch (the scan's,
    where a large model's graph would not fit) scores the same draws."""
    from shrink_core.model.toy import tiny_family

    model = tiny_family("llama")
    _, modules, _ = linears(model)
    ids = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(5))
    settings = [SETTINGS["w3g64"]]
    whole, split = (fisher.fisher_scores(model, ids, modules, settings, batch=b, robust=1e9) for b in (6, 2))
    other_seed = fisher.fisher_scores(model, ids, modules, settings, batch=6, robust=1e9, seed=1)
    for name in modules:
        kl = whole.values["w3g64"][name][0]
        assert split.values["w3g64"][name] == pytest.approx(whole.values["w3g64"][name], rel=1e-4, abs=1e-3 * kl)
    assert any(other_seed.values["w3g64"][n][0] != pytest.approx(whole.values["w3g64"][n][0], rel=1e-3)
               for n in modules)  # the draws matter: the agreement above is not a tolerance too loose to fail


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3", "gpt2", "opt", "gpt_neox", "mixtral", "qwen3_moe"])
def test_recomputed_blocks_give_the_same_bits(family):
    """A large model's Fisher pass recomputes each block in the backwards instead of keeping its activations: the
    hooks see the same inputs and gradients, so the figures are equal, not close; the blocks are put back after."""
    from shrink_core.model.arch import decoder_layers
    from shrink_core.model.toy import tiny_family

    model = tiny_family(family)
    _, modules, _ = linears(model)
    ids = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(3))
    settings = [SETTINGS["w4g64"], SETTINGS["w2g64"]]
    kept, recomputed = (fisher.fisher_scores(model, ids, modules, settings, batch=3, robust=1e9, recompute=r)
                        for r in (False, True))
    assert recomputed.values == kept.values
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))


def test_a_tight_cap_lowers_the_estimates_it_caps():
    from shrink_core.model.toy import tiny_family

    model = tiny_family("llama")
    _, modules, _ = linears(model)
    ids = torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(4))
    settings = [SETTINGS["w2g64"]]
    plain = fisher.fisher_scores(model, ids, modules, settings, batch=4, first_order=False)
    capped = fisher.fisher_scores(model, ids, modules, settings, batch=4, first_order=False, robust=1.0)
    pairs = [(capped.values["w2g64"][n][0], plain.values["w2g64"][n][0]) for n in modules]
    assert capped.capped > 0 and all(0 < c <= p * (1 + 1e-6) for c, p in pairs)
    assert sum(c < p * 0.999 for c, p in pairs) >= len(pairs) // 2  # at cap 1, every module above its median


def test_only_fast_scores_change_key_with_the_estimator(monkeypatch):
    from shrink_core.sensitivity import scan
    from shrink_core.sensitivity.probe import SCAN_DEPTHS

    before = {m: scan.scores_key("h", "toy_en", SETTINGS["w3g64"], m, SCAN_DEPTHS["quick"]) for m in ("fast", "exhaustive")}
    monkeypatch.setattr(scan, "FAST_ESTIMATOR", {**scan.FAST_ESTIMATOR, "cap": 5.0})
    after = {m: scan.scores_key("h", "toy_en", SETTINGS["w3g64"], m, SCAN_DEPTHS["quick"]) for m in ("fast", "exhaustive")}
    assert before["fast"] != after["fast"] and before["exhaustive"] == after["exhaustive"]
