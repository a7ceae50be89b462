"""Plan editing for the Plan page: table edits and bulk edits become rules; an undo history of YAML drafts.

Every edit goes through `load_plan`, so an invalid edit is refused with the engine's own sentence.
"""
from __future__ import annotations

import re

import pandas as pd
import streamlit as st

from shrink_core.plan import PlanError, dump_plan, load_plan, plan_to_dict
from shrink_core.plan.menu import setting_name
from shrink_core.plan.planner import SETTINGS

SETTING_CHOICES = ["keep", "fp16"] + list(SETTINGS)
PRUNE_CHOICES = {"none": None, "50% unstructured": {"structure": "unstructured", "amount": 0.5, "criterion": "magnitude"},
                 "2:4": {"structure": "nm", "n": 2, "m": 4, "criterion": "magnitude"}}


def setting_of(row: dict) -> str:
    """The table's name for a resolved module's weight setting (the menu's own naming)."""
    group = None if row["group"] in (None, "channel") else row["group"]
    return setting_name(row["bits"], group, bool(row["symmetric"]), bool(row["keep"]))


def weights_rule(setting: str, method: str) -> dict:
    if setting == "keep":
        return {"keep": True}
    if setting == "fp16":
        return {"weights": {"bits": 16}}
    spec = dict(SETTINGS[setting])
    spec["group_size"] = "channel" if spec["group_size"] is None else spec["group_size"]
    return {"weights": {**spec, "method": method}}


def push(yaml_text: str) -> None:
    """Validate and make `yaml_text` the draft, keeping the previous draft for undo."""
    load_plan(yaml_text)  # raises PlanError with the reason
    history = st.session_state.setdefault("plan_history", [])
    current = st.session_state.get("plan_draft")
    if current is not None and current != yaml_text:
        history.append(current)
        del history[:-50]
    st.session_state["plan_draft"] = yaml_text


def undo() -> bool:
    history = st.session_state.get("plan_history") or []
    if not history:
        return False
    st.session_state["plan_draft"] = history.pop()
    return True


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


def table_edits(before: pd.DataFrame, after: pd.DataFrame, method: str) -> list[dict]:
    """Per-module override rules for the rows whose setting, prune or method changed."""
    rules = []
    for (_, old), (_, new) in zip(before.iterrows(), after.iterrows()):
        if (old["setting"], old["prune"], old["method"]) == (new["setting"], new["prune"], new["method"]):
            continue
        rule = {"name": re.escape(new["module"])}
        rule.update(weights_rule(new["setting"], new["method"] or method) if not new["setting"].startswith("custom")
                    else {})
        prune = PRUNE_CHOICES.get(new["prune"])
        if prune and not rule.get("keep"):
            rule["prune"] = prune
        if len(rule) > 1:
            rules.append(rule)
    return rules


def try_apply(make_yaml) -> str | None:
    """Runs an edit; returns the refusal sentence, or None when the new draft was accepted."""
    try:
        push(make_yaml())
    except PlanError as exc:
        return str(exc)
    return None
