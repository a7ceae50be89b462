"""One calibrated plan, one set of weights, one recorded recipe: apply, eval --plan (and the Plan page's run),
measure.

The plan is GPTQ on the tiny seeded Llama saved as a model directory with a byte-level tokenizer, and it names no
recipe of its own, so every entry point has to arrive at the same default.
"""
import json

import torch
from safetensors.torch import load_file

from shrink_core.cli.entry import main
from shrink_core.compression.candidate import from_plan
from shrink_core.evaluation.calibration import CalibrationRecipe
from shrink_core.model.load import load
from shrink_core.plan import load_plan
from shrink_core.results.eval_run import plan_candidate, run_eval
from shrink_core.results.store import Store

PLAN = """version: 1
name: toy gptq
rules:
  - kind: [q, k, v, o, gate, up, down]
    weights: {bits: 4, group_size: 32, symmetric: false, method: gptq}
"""


def test_one_plan_gives_the_same_weights_and_recipe_at_every_entry_point(toy_dir, tmp_path, shrink_home, capsys):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(PLAN)
    default = CalibrationRecipe().to_dict()
    assert load_plan(str(plan_file)).calibration is None  # the plan leaves the recipe to the entry point

    # apply: the CLI writes the candidate directory
    out = tmp_path / "applied"
    assert main(["apply", "--model", str(toy_dir), "--plan", str(plan_file), "--out", str(out), "--json"]) == 0
    applied_report = json.loads(capsys.readouterr().out)
    applied = load_file(str(out / "model.safetensors"))
    applied_recipe = json.loads((out / "provenance.json").read_text())["calibration"]

    # eval --plan and the Plan page's "Run this plan" (eval_job -> run_eval -> plan_candidate)
    loaded = load(str(toy_dir))
    evaluated, _, eval_recipe = plan_candidate(loaded, load_plan(str(plan_file)))
    eval_store = Store(tmp_path / "eval.db")
    report = run_eval(str(toy_dir), ["toy_en"], "fast", str(plan_file), store=eval_store)
    eval_rows = eval_store.results("eval", candidate_id=report["candidate_id"])
    eval_candidate = next(c for c in eval_store.candidates() if c["id"] == report["candidate_id"])

    # measure --calibrated: its weights (from_plan) and what the CLI records in the store
    measured = from_plan(loaded.model, str(plan_file), loaded.tokenizer, calibrated=True).model
    assert main(["measure", "--model", str(toy_dir), "--plan", str(plan_file), "--calibrated", "--batch", "1",
                 "--runs", "1", "--warmup", "0", "--prompt-tokens", "4", "--decode-tokens", "2", "--json"]) == 0
    measure_payload = json.loads(capsys.readouterr().out)
    measure_candidate = next(c for c in Store().candidates() if c["kind"] != "reference")

    # bit-identical weights (the tied lm_head is saved once, as the embedding)
    for name, weight in applied.items():
        assert torch.equal(evaluated.state_dict()[name], weight), name
        assert torch.equal(measured.state_dict()[name], weight), name
    assert not torch.equal(applied["model.layers.0.mlp.down_proj.weight"],
                           loaded.model.state_dict()["model.layers.0.mlp.down_proj.weight"])  # it was quantized

    # one recipe, recorded the same at every entry point: the default, since the plan names none
    recorded = [applied_recipe, applied_report["calibration"], eval_recipe, report["calibration"],
                eval_candidate["calibration"], *[r["payload"]["calibration"] for r in eval_rows],
                measure_payload["calibration"], measure_candidate["calibration"]]
    assert len(eval_rows) == 1 and all(r == default for r in recorded), recorded


def test_the_recipe_shrinks_full_statistics_by_default_and_a_stored_version_1_recipe_keeps_its_raw_ones():
    import pytest

    from shrink_core.evaluation.calibration import SHRINK_DEFAULT, CalibrationError

    fresh = CalibrationRecipe()
    assert fresh.shrink == SHRINK_DEFAULT and fresh.to_dict()["shrink"] == SHRINK_DEFAULT
    assert CalibrationRecipe.from_dict(fresh.to_dict()) == fresh
    # a recipe stored before `shrink` existed (version 1) computed raw statistics: it still does, under the same key
    stored = {"mix": {"en": 1.0}, "n_sequences": 16, "seq_len": 512, "seed": 0, "version": 1}
    old = CalibrationRecipe.from_dict(stored)
    assert old.shrink == 0.0 and old.to_dict() == stored and old.digest() != CalibrationRecipe(
        (("en", 1.0),)).digest()
    for bad, says in (({"shrink": 1.5}, "between 0 and 1"), ({"shrink": "lots"}, "between 0 and 1"),
                      ({"shrink": 0.3, "version": 1}, "version 1 calibration recipe reads the raw statistics"),
                      ({"version": 7}, "version 7 is not supported")):
        with pytest.raises(CalibrationError, match=says):
            CalibrationRecipe.from_dict({"mix": {"en": 1.0}, **bad})


def test_shrinking_a_statistic_scales_its_off_diagonal_and_keeps_its_diagonal():
    from shrink_core.compression.calibrate import shrink_towards_diagonal_

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    h = x.T @ x
    expected = 0.7 * h + 0.3 * torch.diag(torch.diagonal(h))
    out = shrink_towards_diagonal_(h.clone(), 0.3)
    assert torch.allclose(out, expected, atol=1e-5) and torch.equal(out.diagonal(), h.diagonal())
    assert torch.equal(shrink_towards_diagonal_(h.clone(), 0.0), h)
    diagonal_only = torch.ones(8)
    assert torch.equal(shrink_towards_diagonal_(diagonal_only, 0.3), torch.ones(8))


def test_gptq_reads_the_recipes_shrink_and_records_it():
    """The same tokens, the same plan: the raw statistics (a version 1 recipe) and shrunk ones give other weights,
    and each report records what it used (a version 1 recipe as it always was: no shrink)."""
    from shrink_core.compression.apply import apply_plan_
    from shrink_core.model.toy import tiny_llama

    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    plan = load_plan(PLAN)
    weights, reports = {}, {}
    for shrink, recipe in ((0.0, {"mix": {"en": 1.0}, "version": 1}), (0.3, {"mix": {"en": 1.0}, "shrink": 0.3})):
        model = tiny_llama()
        reports[shrink] = apply_plan_(model, plan, tokens, recipe=recipe)
        weights[shrink] = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    assert reports[0.0].calibration["version"] == 1 and "shrink" not in reports[0.0].calibration
    assert reports[0.3].calibration["shrink"] == 0.3
    assert not torch.equal(weights[0.0], weights[0.3])


def test_mix_gaps_name_scored_slices_in_languages_the_mix_never_shows_apart_from_other_slices_outside_it():
    from shrink_core.evaluation.calibration import mix_gaps, mix_gaps_sentence
    from shrink_core.plan.presets import WORLD_RECIPE

    default = CalibrationRecipe()
    gaps = mix_gaps(default, ["en", "hi", "udhr_world", "long", "naughty", "no_such_slice", "hi"])
    assert gaps.unseen_language == ("hi", "udhr_world")  # Hindi and 29 UDHR languages: none in the mix
    assert gaps.outside == ("long", "naughty")  # English documents; strings of no one language; the unknown: nothing
    sentence = mix_gaps_sentence(gaps)
    assert "languages of hi, udhr_world" in sentence and "e.g. hi=0.1" in sentence
    assert "long, naughty are outside the mix too" in sentence
    # udhr_indic's languages are all udhr_world's: outside the mix, not unseen; Hindi still unseen
    world = mix_gaps(CalibrationRecipe.from_dict(WORLD_RECIPE), ["en", "hi", "udhr_indic", "code", "arith"])
    assert world == type(world)(("hi",), ("udhr_indic",))
    assert mix_gaps_sentence(mix_gaps(default, ["en", "code", "arith", "zh"])) is None
    # code is written in programming languages: out of the mix, no slice of it shows them
    assert mix_gaps(CalibrationRecipe.parse("en=1"), ["code", "math"]).unseen_language == ("code",)


def test_eval_of_a_calibrated_plan_notes_the_scored_slices_its_mix_leaves_out(toy_dir, tmp_path, shrink_home, capsys):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(PLAN + "calibration: {mix: {toy_en: 1}, n_sequences: 2, seq_len: 16}\n")
    assert main(["eval", "--model", str(toy_dir), "--slices", "toy_en,toy_mc", "--plan", str(plan_file),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["calibration_gaps"] == {"unseen_language": [], "outside": ["toy_mc"]}
    assert main(["eval", "--model", str(toy_dir), "--slices", "toy_mc", "--plan", str(plan_file)]) == 0
    assert "\nnote: toy_mc is outside the mix: a domain left out" in capsys.readouterr().out
    assert main(["eval", "--model", str(toy_dir), "--slices", "toy_en", "--plan", str(plan_file)]) == 0
    assert "note:" not in capsys.readouterr().out
