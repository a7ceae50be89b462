"""Plan editing for the Plan page: table edits and bulk edits become rules; an undo history of YAML drafts.

Every change of the draft goes through `push` (one undo history, saved in the store per model), and every edit
through `load_plan`, so an invalid edit is refused with the engine's own sentence. After an edit the plan's name
says what the plan does, unless the user named it on the page.
"""
from __future__ import annotations

import re

import pandas as pd
import streamlit as st

from shrink_core.plan import PlanError, dump_plan, load_plan, plan_to_dict, resolve
from shrink_core.plan.edit import with_calibration_mix, with_rotation, with_rules_first, with_tuning, without_shadowed  # noqa: F401 (the page calls them here)
from shrink_core.plan.menu import setting_name
from shrink_core.plan.planner import SETTINGS
from shrink_core.plan.presets import PRESETS
from ui import state
from ui.data import store

USER_NAME = "plan_user_name"  # session key: the name the user gave the plan on the page (None: derived)
HAND_EDIT = "hand edit"  # the note on a rule made in the per-module table

SETTING_CHOICES = ["keep", "fp16"] + list(SETTINGS)
PRUNE_CHOICES = {"none": None, "50% unstructured": {"structure": "unstructured", "amount": 0.5, "criterion": "magnitude"},
                 "2:4": {"structure": "nm", "n": 2, "m": 4, "criterion": "magnitude"}}


def setting_of(row: dict) -> str:
    """The table's name for a resolved module's weight setting (the menu's own naming)."""
    group = None if row["group"] in (None, "channel") else row["group"]
    return setting_name(row["bits"], group, bool(row["symmetric"]), bool(row["keep"]), row.get("ggml"),
                        scales=row.get("scales") or "fp16")


def weights_rule(setting: str, method: str) -> dict:
    if setting == "keep":
        return {"keep": True}
    if setting == "fp16":
        return {"weights": {"bits": 16}}
    spec = dict(SETTINGS[setting])
    if "ggml" in spec:  # a llama.cpp type names its format; a calibrated method is its imatrix path
        return {"weights": {"ggml": spec["ggml"], "method": "imatrix" if method in ("gptq", "imatrix") else "rtn"}}
    spec["group_size"] = "channel" if spec["group_size"] is None else spec["group_size"]
    return {"weights": {**spec, "method": method}}


def derived_name(resolved) -> str:
    """What the plan does, in a few words: e.g. "mixed w3g64/w4g64 rtn, 10 kept" or "w8 rtn, 2:4 on 7"."""
    modules = [r for r in resolved if r.kind != "norm" and not r.tied_to]
    quantized = [r for r in modules if r.weights is not None and not r.keep]
    formats = sorted({setting_name(r.bits, r.group_size, r.weights.symmetric, ggml=r.weights.ggml,
                                   scales=r.weights.scales) for r in quantized},
                     key=lambda f: (len(f), f))
    methods = sorted({r.method for r in quantized if r.method})
    parts = []
    if formats:
        parts.append(("mixed " if len(formats) > 1 else "") + "/".join(formats) + (f" {'/'.join(methods)}"
                                                                                   if methods else ""))
    pruned: dict[str, int] = {}
    for r in modules:
        if r.prune is not None:
            pruned[r.prune.pattern()] = pruned.get(r.prune.pattern(), 0) + 1
    parts += [f"{label} on {count}" for label, count in sorted(pruned.items())]
    kept = sum(r.keep for r in modules if r.block is not None)
    if kept:
        parts.append(f"{kept} kept")
    return ", ".join(parts) or "no change"


def _named(yaml_text: str, rows) -> str:
    """The draft with its name following its content (or the user's own name for it)."""
    plan = load_plan(yaml_text)
    try:
        name = st.session_state.get(USER_NAME) or (derived_name(resolve(rows, plan))
                                                    + (", inputs rotated" if plan.rotate else "")
                                                    + (", scales tuned" if plan.tune else ""))
    except PlanError:  # e.g. a rule that matches nothing: the page says so; the name stays until it resolves
        return yaml_text
    data = plan_to_dict(plan)
    if name == data.get("name"):
        return yaml_text
    data["name"] = name
    if data.get("description") in {p["description"] for p in PRESETS.values()}:
        data.pop("description")  # a preset's description no longer describes the edited plan
    return dump_plan(load_plan(data))


def push(yaml_text: str, rows=None, *, keep_name: bool = False) -> None:
    """Validate and make `yaml_text` the draft, keeping the previous draft for undo and saving it for the model.

    With the model's `rows`, the name follows the content (an edit); `keep_name` (a preset, a file, a plan handed
    over by another page) keeps the plan's own name and forgets the one the user gave the previous draft."""
    load_plan(yaml_text)  # raises PlanError with the reason
    if keep_name:
        st.session_state[USER_NAME] = None
    elif rows is not None:
        yaml_text = _named(yaml_text, rows)
    current = state.plan_draft()  # (loads the saved draft first in a new session)
    history = st.session_state.setdefault("plan_history", [])
    if current is not None and current != yaml_text:
        history.append(current)
        del history[:-50]
    st.session_state["plan_draft"] = yaml_text
    store().save_draft(state.model_spec(), yaml_text)


def undo() -> bool:
    history = st.session_state.get("plan_history") or []
    if not history:
        return False
    st.session_state["plan_draft"] = history.pop()
    store().save_draft(state.model_spec(), st.session_state["plan_draft"])
    return True


def hand_pinned(plan, resolved) -> dict[str, str]:
    """Modules decided by a rule naming them (a hand edit in the table, a module protected on the Sensitivity page),
    not by the planner: module -> its setting. The planner leaves them out, so their rules survive it."""
    rules = {rule.index: rule for rule in plan.rules}
    pinned = {}
    for r in resolved:
        rule = rules.get(r.rule)
        if rule is not None and rule.name is not None and not rule.note.startswith("planner"):
            pinned[r.name] = setting_name(r.bits, r.group_size, bool(r.weights and r.weights.symmetric), r.keep,
                                         r.weights.ggml if r.weights else None, r.prune,
                                         r.weights.scales if r.weights else "fp16")
    return pinned


def table_edits(before: pd.DataFrame, after: pd.DataFrame, method: str) -> list[dict]:
    """Per-module override rules for the rows whose setting, prune or method changed."""
    rules = []
    for (_, old), (_, new) in zip(before.iterrows(), after.iterrows()):
        if (old["setting"], old["prune"], old["method"]) == (new["setting"], new["prune"], new["method"]):
            continue
        rule = {"name": re.escape(new["module"]), "note": HAND_EDIT}
        rule.update(weights_rule(new["setting"], new["method"] or method) if not new["setting"].startswith("custom")
                    else {})
        prune = PRUNE_CHOICES.get(new["prune"])
        if prune and not rule.get("keep"):
            rule["prune"] = prune
        if len(rule) > 2:
            rules.append(rule)
    return rules


def try_apply(make_yaml, rows=None, *, keep_name: bool = False) -> str | None:
    """Runs an edit; returns the refusal sentence, or None when the new draft was accepted."""
    try:
        push(make_yaml(), rows, keep_name=keep_name)
    except PlanError as exc:
        return str(exc)
    return None
