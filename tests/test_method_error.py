"""The layer-output ratio of a calibrated method's error to RTN's, per module and setting (sensitivity/method_error)."""
import torch

from shrink_core.model.inventory import block_linears, inventory
from shrink_core.plan.predict import scaled_scores
from shrink_core.sensitivity.local import OptionWeights, method_option_weights, option_weight
from shrink_core.sensitivity.method_error import input_hessians, output_error, output_ratios, slice_ratios


def test_input_hessians_are_each_modules_input_correlations(tiny_model):
    """H is X^T X / N of what the module reads, shared by the modules reading the same input (q/k/v)."""
    rows = block_linears(inventory(tiny_model))
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    hessians = input_hessians(tiny_model, rows, ids, batch_size=3)
    taken = []
    handle = tiny_model.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda module, args, output: taken.append(args[0].reshape(-1, args[0].shape[-1]).float()))
    with torch.inference_mode():
        tiny_model(input_ids=ids, use_cache=False)
    handle.remove()
    x = torch.cat(taken)
    assert torch.allclose(hessians["model.layers.1.mlp.down_proj"], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    assert hessians["model.layers.0.self_attn.q_proj"] is hessians["model.layers.0.self_attn.v_proj"]
    assert set(hessians) == {r.name for r in rows}
    delta = torch.randn(5, x.shape[1], generator=torch.Generator().manual_seed(1))
    assert abs(output_error(delta, hessians["model.layers.1.mlp.down_proj"])
               - float((x @ delta.T).pow(2).sum() / x.shape[0])) < 1e-3 * output_error(delta, torch.eye(x.shape[1]))


def test_gptq_leaves_less_output_error_than_rtn_and_rtn_is_its_own_unit(tiny_model):
    """On the calibration inputs GPTQ was fitted to, the first block's modules keep under RTN's output error at
    every setting (their inputs are the full-precision ones); the ratio of RTN against itself is exactly 1; the
    scan's scores scale by the ratio of their module-setting."""
    from shrink_core.compression.apply import apply_plan_
    from shrink_core.plan.planner import solution_plan

    all_rows = inventory(tiny_model)
    rows = block_linears(all_rows)
    names = [r.name for r in rows]
    originals = {n: tiny_model.get_submodule(n).weight.detach().clone() for n in names}
    calibration = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(2))
    options = ["keep", "w4g64", "w2g64"]
    table = method_option_weights(tiny_model, names, options, lambda model, option: apply_plan_(
        model, solution_plan(dict.fromkeys(names, option), all_rows, "gptq"), calibration), dtype=torch.float32)
    hessians = input_hessians(tiny_model, rows, calibration)
    rtn = OptionWeights(originals)
    ratios = output_ratios(originals, table, rtn, hessians, options)
    assert set(ratios) == {(n, o) for n in names for o in ("w4g64", "w2g64")}
    first = [n for n in names if n.startswith("model.layers.0.")]
    assert all(ratios[(n, o)] < 1 for n in first for o in ("w4g64", "w2g64")), ratios
    rtn_table = {n: {o: option_weight(o, originals[n]) for o in options} for n in names}
    assert all(r == 1.0 for r in output_ratios(originals, rtn_table, rtn, hessians, options).values())
    scores = {(first[0], "w2g64", "en"): 2.0, (first[0], "w2g64", "fr"): 3.0, ("model.norm", "w2g64", "en"): 5.0}
    scaled = scaled_scores(scores, ratios)
    assert scaled[(first[0], "w2g64", "fr")] == 3.0 * ratios[(first[0], "w2g64")]
    assert scaled[("model.norm", "w2g64", "en")] == 5.0
    per_slice = scaled_scores(scores, {**ratios, (first[0], "w2g64", "en"): 0.5})  # a slice's own ratio first
    assert per_slice[(first[0], "w2g64", "en")] == 1.0 and per_slice[(first[0], "w2g64", "fr")] == scaled[
        (first[0], "w2g64", "fr")]


def test_slice_ratios_take_each_slices_own_inputs(tiny_model):
    """A ratio per (module, option, slice) from that slice's tokens, equal to `output_ratios` on them; None for the
    slice gives the shared (module, option) keys."""
    rows = block_linears(inventory(tiny_model))[:4]
    originals = {r.name: tiny_model.get_submodule(r.name).weight.detach().clone() for r in rows}
    options = ["keep", "w2g64"]
    # a stand-in "method": RTN at 4 bits for the w2g64 option, so its error differs from RTN w2g64's
    table = {n: {"keep": w, "w2g64": option_weight("w4g64", w)} for n, w in originals.items()}
    rtn = OptionWeights(originals)
    ids = {s: torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(k)) for k, s in enumerate("ab")}
    seen = []
    ratios = slice_ratios(tiny_model, rows, originals, table, rtn, options, ids, lambda i, s: seen.append((i, s)))
    assert seen == [(0, "a"), (1, "b")] and set(ratios) == {(n, "w2g64", s) for n in originals for s in "ab"}
    for s, tokens in ids.items():
        alone = output_ratios(originals, table, rtn, input_hessians(tiny_model, rows, tokens), options)
        assert all(ratios[(*key, s)] == r for key, r in alone.items()) and all(0 < r < 1 for r in alone.values())
    assert ratios[(rows[0].name, "w2g64", "a")] != ratios[(rows[0].name, "w2g64", "b")]
    assert set(slice_ratios(tiny_model, rows, originals, table, rtn, options, {None: ids["a"]})) == {
        (n, "w2g64") for n in originals}
