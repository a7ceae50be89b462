"""Plan edits that both the Plan page and background jobs make: new rules in front of a plan, shadowed rules out."""
from __future__ import annotations

import dataclasses

from shrink_core.errors import ShrinkError
from shrink_core.evaluation.calibration import CalibrationRecipe, recipe_for
from shrink_core.evaluation.slices import get_slice
from shrink_core.plan.io import load_plan
from shrink_core.plan.spec import PlanError, RotateSpec, TuneSpec, dump_plan, plan_to_dict


def with_rules_first(yaml_text: str, new_rules: list[dict], replace_names: set[str] = frozenset(), rows=None) -> str:
    """New rules go first (first match wins); an older single-module rule for the same module is dropped, and with
    the model's `rows`, so is every older rule the new ones now shadow entirely (e.g. a bulk edit over all blocks)."""
    data = plan_to_dict(load_plan(yaml_text))
    kept = [r for r in data["rules"] if r.get("name") not in replace_names]
    data["rules"] = new_rules + kept
    text = dump_plan(load_plan(data))
    return text if rows is None else without_shadowed(text, rows)


def without_shadowed(yaml_text: str, rows) -> str:
    """Drops rules that decide no module any more (first match wins), e.g. the preset rule under the planner's rules;
    `resolve` refuses such rules, so keeping them would break the draft."""
    from shrink_core.plan.resolve import first_match

    plan = load_plan(yaml_text)
    plannable = [r for r in rows if r.kind != "norm"]
    block_count = max((r.block for r in plannable if r.block is not None), default=-1) + 1
    used = {rule.index for rule in (first_match(plan.rules, info, block_count) for info in plannable) if rule}
    data = plan_to_dict(plan)
    data["rules"] = [d for rule, d in zip(plan.rules, data["rules"]) if rule.index in used]
    return dump_plan(load_plan(data))


def with_calibration_mix(yaml_text: str, mix_text: str) -> str:
    """The plan with its calibration mix replaced, e.g. 'en=0.3,fr=0.1,code=0.1' (its sequences, length, seed and
    statistics' shrink kept, else the default recipe's); a slice that does not exist or a bad weight is refused with
    the reason."""
    plan = load_plan(yaml_text)
    base = recipe_for(plan)
    try:
        recipe = dataclasses.replace(base, mix=CalibrationRecipe.parse(mix_text).mix)
        for name, _ in recipe.mix:
            get_slice(name)
    except ShrinkError as exc:
        raise PlanError(str(exc)) from None
    return dump_plan(dataclasses.replace(plan, calibration=recipe))


def with_rotation(yaml_text: str, rotate: bool, seed: int = 0) -> str:
    """The plan with its block linears' inputs rotated before quantization (`rotate: hadamard`), or without."""
    plan = load_plan(yaml_text)
    return dump_plan(dataclasses.replace(plan, rotate=RotateSpec(seed=seed) if rotate else None))


def with_tuning(yaml_text: str, tune: bool) -> str:
    """The plan with its integer-quantized block linears' scales tuned end to end after quantization (`tune:
    scales`, default schedule), or without."""
    plan = load_plan(yaml_text)
    return dump_plan(dataclasses.replace(plan, tune=TuneSpec() if tune else None))
