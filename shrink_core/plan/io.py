"""Reading a plan from wherever users keep one: a preset name, a file, YAML/JSON text, a dict."""
from __future__ import annotations

from pathlib import Path

import yaml

from shrink_core.plan.presets import PRESETS, preset
from shrink_core.plan.spec import Plan, PlanError, plan_from_dict


def load_plan(text_or_path) -> Plan:
    """A plan from "preset:NAME", a .yaml/.yml/.json path, YAML/JSON text, a dict, or a Plan (returned as is)."""
    if isinstance(text_or_path, Plan):
        return text_or_path
    if isinstance(text_or_path, dict):
        return plan_from_dict(text_or_path)
    text = str(text_or_path)
    if text.startswith("preset:"):
        return preset(text.split(":", 1)[1])
    looks_like_file = text.strip().lower().endswith((".yaml", ".yml", ".json")) and "\n" not in text
    if isinstance(text_or_path, Path) or looks_like_file:
        path = Path(text).expanduser()
        if not path.is_file():
            raise PlanError(f"The plan file {path} does not exist; check the path or use preset:NAME.")
        text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PlanError(f"The plan is not valid YAML or JSON: {str(exc).splitlines()[0]}.") from None
    if not isinstance(data, dict):
        if text.strip() in PRESETS:
            raise PlanError(f"'{text.strip()}' is a preset name; write preset:{text.strip()}.")
        raise PlanError("The plan is neither a preset:NAME, a .yaml/.json file nor YAML text with `version: 1` and "
                        "`rules:`; check the spelling or the path.")
    return plan_from_dict(data)
