"""Plan edits outside the page: the calibration mix replaced in a plan's text."""
import pytest

from shrink_core.plan import PlanError, dump_plan, load_plan
from shrink_core.plan.edit import with_calibration_mix

RTN_GPTQ = ("version: 1\nrules:\n- kind: [q, k, v, o, gate, up, down]\n"
            "  weights: {bits: 4, group_size: 64, symmetric: false, method: gptq}\n")


def test_a_plan_without_a_recipe_gets_the_default_recipes_counts_and_the_new_mix():
    plan = load_plan(with_calibration_mix(RTN_GPTQ, "en=0.3,fr=0.1,code=0.1,arith=0.1"))
    assert dict(plan.calibration.mix) == {"en": 0.3, "fr": 0.1, "code": 0.1, "arith": 0.1}
    assert (plan.calibration.n_sequences, plan.calibration.seq_len, plan.calibration.seed) == (16, 512, 0)
    assert plan.rules == load_plan(RTN_GPTQ).rules


def test_a_presets_counts_are_kept_and_bad_mixes_are_refused_as_plan_errors():
    text = dump_plan(load_plan("preset:w4g64"))
    assert load_plan(with_calibration_mix(text, "en")).calibration.n_sequences == 64
    with pytest.raises(PlanError, match="There is no slice 'nope'"):
        with_calibration_mix(text, "en=1,nope=1")
    with pytest.raises(PlanError, match="is not a number"):
        with_calibration_mix(text, "en=lots")
    with pytest.raises(PlanError, match="must be positive"):
        with_calibration_mix(text, "en=0")


def test_rotation_is_set_and_cleared_and_nothing_else_moves():
    from shrink_core.plan.edit import with_rotation

    plan = load_plan(with_rotation(RTN_GPTQ, True, seed=5))
    assert plan.rotate.kind == "hadamard" and plan.rotate.seed == 5
    assert plan.rules == load_plan(RTN_GPTQ).rules and plan.calibration == load_plan(RTN_GPTQ).calibration
    assert load_plan(with_rotation(dump_plan(plan), False)) == load_plan(RTN_GPTQ)


def test_with_tuning_sets_and_clears_the_plans_tune():
    from shrink_core.plan.edit import with_tuning
    from shrink_core.plan.spec import TuneSpec

    plan = load_plan(with_tuning(RTN_GPTQ, True))
    assert plan.tune == TuneSpec() and plan.rules == load_plan(RTN_GPTQ).rules
    assert load_plan(with_tuning(dump_plan(plan), False)) == load_plan(RTN_GPTQ)
