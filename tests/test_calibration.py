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
