"""Plans: rules, weight formats with exact bytes, presets, resolution against a model, the planner, predictions.

The names below are the package's public API; modules inside `plan/` import each other directly.
"""
from shrink_core.evaluation.calibration import CalibrationRecipe
from shrink_core.plan.io import load_plan
from shrink_core.plan.presets import PRESETS, preset, preset_names
from shrink_core.plan.resolve import ResolvedModule, resolve, resolve_rows, totals
from shrink_core.plan.spec import (
                                   CALIBRATED_METHODS,
                                   GROUP_SIZES,
                                   PLAN_VERSION,
                                   PLANNABLE_KINDS,
                                   WEIGHT_BITS,
                                   WEIGHT_METHODS,
                                   Plan,
                                   PlanError,
                                   PruneSpec,
                                   Rule,
                                   WeightSpec,
                                   dump_plan,
                                   dump_plan_json,
                                   plan_from_dict,
                                   plan_to_dict,
                                   with_index,
)

__all__ = [
    "CalibrationRecipe", "load_plan", "PRESETS", "preset", "preset_names", "ResolvedModule", "resolve",
    "resolve_rows", "totals", "CALIBRATED_METHODS", "GROUP_SIZES", "PLAN_VERSION", "PLANNABLE_KINDS", "WEIGHT_BITS",
    "WEIGHT_METHODS", "Plan", "PlanError", "PruneSpec", "Rule", "WeightSpec", "dump_plan", "dump_plan_json",
    "plan_from_dict", "plan_to_dict", "with_index",
]
