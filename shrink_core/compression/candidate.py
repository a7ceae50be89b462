"""A plan applied to a copy of a model, described for measurement (`perf.report.measure`).

Calibrated methods (gptq, wanda, sparsegpt, activation) are swapped for their calibration-free stand-ins (rtn,
magnitude) unless asked otherwise: the formats, shapes and bytes are the plan's, only the weight values differ, and
latency and memory depend on the format alone. The swap is recorded in the candidate's notes. Asked for calibrated
weights, the tokens come from the plan's own recipe, as at every other entry point.
"""
from __future__ import annotations

import copy
from dataclasses import replace

from shrink_core.compression.apply import apply_plan_
from shrink_core.errors import ShrinkError
from shrink_core.evaluation.calibration import plan_calibration
from shrink_core.perf.candidate import Candidate
from shrink_core.plan import load_plan


def _calibration_free(plan):
    rules = []
    for rule in plan.rules:
        weights = replace(rule.weights, method="rtn") if rule.weights and not rule.weights.is_float else rule.weights
        prune = replace(rule.prune, criterion="magnitude") if rule.prune and rule.prune.calibrated else rule.prune
        rules.append(replace(rule, weights=weights, prune=prune))
    return replace(plan, rules=tuple(rules), calibration=None)


def from_plan(model, plan_text, tokenizer=None, calibrated: bool = False) -> Candidate:
    """Apply `plan_text` (preset:NAME, a file, YAML/JSON text, or a loaded Plan) to a deep copy of `model`."""
    plan = load_plan(plan_text)
    notes, calibration = [], None
    if plan.needs_calibration and calibrated:
        if tokenizer is None:
            raise ShrinkError("This calibrated plan needs the model's tokenizer to draw its calibration tokens.")
        calibration, _ = plan_calibration(plan, tokenizer)
    elif plan.needs_calibration:
        plan = _calibration_free(plan)
        notes.append("calibrated methods replaced by rtn/magnitude: same formats, shapes and bytes, other weight values")
    candidate = copy.deepcopy(model)
    report = apply_plan_(candidate, plan, calibration)
    now = report.current_names or {}
    bits = {now.get(name, name): state.weight_format()
            for name, state in report.quant_states.items()}
    states = {now.get(name, name): state for name, state in report.quant_states.items()}
    packed = {now.get(m.name, m.name): m.packed_bytes for m in report.modules if m.new_shape != (0, 0)}
    sparse = {now.get(m.name, m.name): "2:4" if m.sparse_format.startswith("2:4") else "unstructured"
              for m in report.modules if m.sparse_format}
    notes += list(report.notes)
    if any(m.sparse_format for m in report.modules):
        notes.append("masked (sparse) weights are stored and run dense by PyTorch: the measured latency has no sparsity speedup")
    name = plan.name or (plan_text if isinstance(plan_text, str) else "plan")
    return Candidate(name, candidate, bits, packed, sparse, states, tuple(notes))
