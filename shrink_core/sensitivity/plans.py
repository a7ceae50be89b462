"""Sensitivity -> plan rules the user can still edit on the Plan page (keep the k most sensitive modules)."""
from __future__ import annotations

import re

import yaml

from shrink_core.plan import load_plan
from shrink_core.plan.presets import BLOCK_LINEARS
from shrink_core.sensitivity.settings import get_setting


def protect_plan_yaml(modules: list[tuple[str, float]], setting_id: str, slice_id: str, metric: str = "kl",
                      protect: str = "keep") -> str:
    """A plan: the given (module, value) pairs kept (`protect="keep"`) or held at int8 (`"w8"`), every other
    block linear under the scanned setting. Validated by the plan loader before it is returned."""
    setting = get_setting(setting_id)
    rules = []
    for name, value in modules:
        note = f"sensitivity {metric}={value:.3g} on {slice_id} under {setting_id}"
        rule = {"name": re.escape(name), "note": note}
        rule.update({"keep": True} if protect == "keep" else get_setting("w8").plan_action())
        rules.append(rule)
    rules.append({"kind": list(BLOCK_LINEARS), **setting.plan_action(), "note": f"the scanned setting ({setting.label})"})
    plan = {"version": 1, "name": f"sensitivity: protect top {len(modules)} ({slice_id}, {setting_id})",
            "description": f"From the Sensitivity page: the {len(modules)} modules with the highest {metric} on "
                           f"{slice_id} under {setting_id} are {'kept' if protect == 'keep' else 'held at int8'}.",
            "rules": rules}
    text = yaml.safe_dump(plan, sort_keys=False, allow_unicode=True)
    load_plan(text)  # refuse to hand over a plan the Plan page would reject
    return text
