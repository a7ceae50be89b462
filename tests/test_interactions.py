"""The interaction model of a plan's KL: exact recovery on data it can express, honest intervals, the closed loop."""
import math

import numpy as np
import pytest

from shrink_core.plan.interactions import BIT_CLASSES, InteractionModel, closed_loop, features, fit, r_squared


def test_features_sum_scores_per_bit_width_and_keep_adds_nothing():
    scores = {("a", "w4g64", "en"): 0.5, ("b", "w4g32", "en"): 0.25, ("c", "w2g64", "en"): 2.0,
              ("d", "w8", "en"): -0.01}  # a slightly negative estimate counts as 0, as in the additive prediction
    x = features({"a": "w4g64", "b": "w4g32", "c": "w2g64", "d": "w8", "e": "keep"}, scores, "en")
    assert x[BIT_CLASSES.index(4)] == 0.75 and x[BIT_CLASSES.index(2)] == 2.0 and x[BIT_CLASSES.index(8)] == 0.0
    with pytest.raises(KeyError, match="no score for a at w3g64"):
        features({"a": "w3g64"}, scores, "en")


def test_fit_recovers_a_model_it_can_express():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 0.5, size=(40, len(BIT_CLASSES)))
    alpha = np.linspace(1.0, 2.5, len(BIT_CLASSES))  # one scale per bit-width class
    y = x @ alpha + 0.4 * x.sum(axis=1) ** 2
    model = fit(x, y, plan_ids=[i // 4 for i in range(40)], ridge=0.0)
    assert np.allclose(model.alpha, alpha, rtol=1e-6) and model.gamma == pytest.approx(0.4, rel=1e-6)
    assert model.plans == 10 and model.observations == 40
    assert model.log_spread < 1e-6  # left-out plans are predicted exactly too
    low, high = model.interval(x[:3], ["en"] * 3)
    assert np.allclose(low, y[:3], rtol=1e-5) and np.allclose(high, y[:3], rtol=1e-5)


def test_the_additive_model_is_the_plain_sum_with_no_interval():
    x = np.linspace(0.0, 0.4, len(BIT_CLASSES))[None, :]
    model = InteractionModel.additive()
    assert model.predict(x, ["en"])[0] == pytest.approx(x.sum())
    assert not model.fitted and all(math.isnan(v) for v in np.concatenate(model.interval(x, ["en"])))


def test_a_fit_whose_held_out_plans_miss_by_more_than_x2_is_flagged_untrusted():
    x = np.linspace(0.0, 0.4, len(BIT_CLASSES))[None, :]
    ones = tuple(1.0 for _ in BIT_CLASSES)
    smollm2, gemma = InteractionModel(ones, 0.0, 35, 7, 0.16), InteractionModel(ones, 0.0, 35, 7, 0.70)
    assert smollm2.interval_factor == pytest.approx(math.exp(1.96 * 0.16)) and not smollm2.untrusted
    assert gemma.interval_factor == pytest.approx(3.94, abs=0.01) and gemma.untrusted
    low, high = gemma.interval(x, ["en"])
    assert high[0] / gemma.predict(x, ["en"])[0] == pytest.approx(gemma.interval_factor) and low[0] < high[0]
    assert not InteractionModel.additive().untrusted and math.isnan(InteractionModel.additive().interval_factor)


def test_noisy_fit_gives_an_interval_that_covers_held_out_plans():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 0.5, size=(200, len(BIT_CLASSES)))
    truth = x @ np.linspace(1, 3, len(BIT_CLASSES)) + 0.2 * x.sum(axis=1) ** 2
    y = truth * np.exp(rng.normal(0, 0.1, size=200))  # 10% multiplicative noise
    model = fit(x[:100], y[:100], plan_ids=list(range(100)))
    assert 0.05 < model.log_spread < 0.2
    low, high = model.interval(x[100:], ["en"] * 100)
    assert 0.85 < np.mean((y[100:] >= low) & (y[100:] <= high)) <= 1.0
    en = ["en"] * 100
    assert r_squared(model.predict(x[100:], en), y[100:]) > r_squared(InteractionModel.additive().predict(x[100:], en),
                                                                      y[100:])


def test_r_squared_of_predictions_as_they_are():
    assert r_squared([1, 2, 3], [1, 2, 3]) == 1.0
    assert r_squared([2, 3, 4], [1, 2, 3]) == pytest.approx(1 - 3 / 2)  # perfectly ranked, still penalised


def test_closed_loop_learns_the_compounding_and_stops_when_the_plan_repeats():
    """Two modules, each at w8 or w2g64. Measured KL compounds (true alpha at 2 bits is 3x the scan's score), so
    the additive model's choice is wrong about its own KL; after one measured round the fit corrects it."""
    scores = {("a", "w8", "en"): 0.01, ("a", "w2g64", "en"): 0.2, ("b", "w8", "en"): 0.01, ("b", "w2g64", "en"): 0.3}

    def rows_of(choice):
        return {"en": features(choice, scores, "en")}

    def measure(choice):  # the "true" model: 2-bit errors cost 3x their score
        x = rows_of(choice)["en"]
        return {"en": float(x[BIT_CLASSES.index(8)] + 3 * x[BIT_CLASSES.index(2)])}

    def plan_with(model):  # one module must be at 2 bits (a budget); choose the one the model predicts cheaper
        options = [{"a": "w2g64", "b": "w8"}, {"a": "w8", "b": "w2g64"}]
        return min(options, key=lambda c: model.predict(rows_of(c)["en"][None], ["en"])[0])

    ticks = iter(range(100))
    rounds, model = closed_loop(plan_with, measure, rows_of, rounds=5, clock=lambda: next(ticks))
    assert rounds[0].choice == {"a": "w2g64", "b": "w8"}
    assert rounds[0].predicted["en"] == pytest.approx(0.21) and rounds[0].measured["en"] == pytest.approx(0.61)
    assert rounds[0].error < -0.6  # the additive model under-predicted by two thirds
    assert len(rounds) == 1  # the refitted model picks the same plan: nothing left to learn from this budget
    predicted = model.predict(rows_of(rounds[0].choice)["en"][None], ["en"])[0]
    assert abs(predicted - 0.61) / 0.61 < 0.1


def test_closed_loop_respects_its_time_budget():
    scores = {("a", s, "en"): v for s, v in (("w8", 0.01), ("w4g64", 0.1), ("w2g64", 1.0))}
    choices = iter([{"a": "w2g64"}, {"a": "w4g64"}, {"a": "w8"}])
    clock = iter([0.0, 0.0, 10.0, 10.0, 500.0, 500.0, 900.0])
    kls = iter([0.5, 0.4, 0.3])  # improving every round: only the clock can stop it
    rounds, _ = closed_loop(lambda model: next(choices), lambda c: {"en": next(kls)},
                            lambda c: {"en": features(c, scores, "en")}, rounds=3, time_budget_s=100,
                            clock=lambda: next(clock))
    assert [r.index for r in rounds] == [0, 1]  # the second round ended past the budget


def test_fit_measured_uses_this_models_plans_of_one_method_and_reports_the_newest_plans_error(tmp_path, tiny_model):
    """A real store: RTN plans fit the RTN model, the GPTQ plan its own, a pruned plan neither; `last` is the newest
    RTN plan predicted by the fit on the plans measured before it."""
    from shrink_core.model.inventory import block_linears, inventory
    from shrink_core.results.prediction import fit_measured
    from shrink_core.results.store import Provenance, Store
    from shrink_core.sensitivity.scan import Record

    rows = inventory(tiny_model)
    linears = block_linears(rows)
    kinds = ["q", "k", "v", "o", "gate", "up", "down"]
    records = [Record(r.name, r.block, r.kind, setting, "en", "kl", value, "fast")
               for r in linears for setting, value in (("w4g64", 0.01), ("w2g64", 0.1))]

    def rule(bits, method="rtn", blocks=None):
        return {"kind": kinds, **({"blocks": blocks} if blocks else {}),
                "weights": {"bits": bits, "group_size": 64, "symmetric": False, "method": method}}

    plans = {  # name -> (plan rules, measured KL on en)
        "w4 rtn": ([rule(4)], 0.2),
        "w2 rtn": ([rule(2)], 9.0),  # 21 modules x 0.1 = 2.1 predicted: errors compound
        "mixed rtn": ([rule(2, blocks=[0]), rule(4, blocks=[1])], 1.5),
        "w4 gptq": ([rule(4, "gptq")], 0.1),
        "pruned": ([{"kind": kinds, "prune": {"structure": "nm", "n": 2, "m": 4, "criterion": "magnitude"}}], 0.5),
        "w3 rtn": ([{"kind": kinds, "weights": {"bits": 3, "group_size": 16, "method": "rtn"}}], 0.7),  # off menu
        "w4 rtn rotated": ([rule(4)], 0.6, {"rotate": {"kind": "hadamard", "seed": 0}}),  # another scored method
        "w4 gptq tuned": ([rule(4, "gptq")], 0.05, {"tune": {"kind": "scales", "steps": 100}}),
    }
    store = Store(tmp_path / "shrink.db")
    for name, (rules, kl, *extra) in plans.items():
        plan = {"version": 1, "name": name, "rules": rules, **(extra[0] if extra else {})}
        cid = store.upsert_candidate(name=name, kind="quantized", model_spec="toy", weights_hash="h", code_version="t",
                                     plan=plan)
        store.add_result("eval", Provenance("toy", "h", "t", "cpu", plan=plan, slice="en", budget="fast"),
                         {"kl": kl, "nll": 3.0}, candidate_id=cid)
    other = store.upsert_candidate(name="other weights", kind="quantized", model_spec="toy", weights_hash="h2",
                                   code_version="t", plan={"version": 1, "rules": [rule(4)]})
    store.add_result("eval", Provenance("toy", "h2", "t", "cpu", slice="en", budget="fast"), {"kl": 50.0},
                     candidate_id=other)

    rtn = fit_measured(store, "toy", "h", rows, records, "rtn")
    assert [o["candidate"] for o in rtn.observations] == ["w4 rtn", "w2 rtn", "mixed rtn"]
    assert rtn.model.plans == 3
    scores = {(r.module, r.setting, r.slice): r.value for r in records}
    x = np.array([features({r.name: s for r in linears}, scores, "en") for s in ("w4g64", "w2g64")])
    measured = np.array([0.2, 9.0])

    def error(model):
        return float(np.abs(np.log(model.predict(x, ["en", "en"]) / measured)).mean())

    assert error(rtn.model) < 0.5 * error(InteractionModel.additive())  # compounding learnt from the measurements
    assert rtn.last["candidate"] == "mixed rtn" and rtn.last["fitted_on_plans"] == 2
    assert rtn.last["measured"] == 1.5
    gptq = fit_measured(store, "toy", "h", rows, records, "gptq")
    assert [o["candidate"] for o in gptq.observations] == ["w4 gptq"]
    assert gptq.last["fitted_on_plans"] == 0  # the only plan: predicted by the additive sum (0.21 for 0.1 measured)
    assert gptq.last["predicted"] == pytest.approx(0.21)
    assert not fit_measured(store, "toy", "h", rows, [], "rtn").model.fitted  # no scores: nothing to fit
    # a rotated or tuned plan errs as its own method: it fits that method's model, never the plain one's
    assert [o["candidate"] for o in fit_measured(store, "toy", "h", rows, records, "rtn+hadamard:0").observations] == [
        "w4 rtn rotated"]
    assert [o["candidate"] for o in fit_measured(store, "toy", "h", rows, records, "gptq+scales:100").observations] == [
        "w4 gptq tuned"]


def test_closed_loop_leaves_out_a_slice_that_measured_no_kl():
    scores = {("a", "w4g64", s): 0.1 for s in ("en", "arith")}
    rounds, model = closed_loop(lambda m: {"a": "w4g64"}, lambda c: {"en": 0.2, "arith": float("nan")},
                                lambda c: {s: features(c, scores, s) for s in ("en", "arith")}, rounds=2)
    assert list(rounds[0].measured) == ["en"] and list(rounds[0].predicted) == ["en"]
    assert model.observations == 1  # the NaN never reached the fit


def test_fit_with_slices_learns_each_slices_scale_and_holds_it_out_honestly():
    """Measured KL = the slice's factor x the scan's sum (fr overstated tenfold, code fourfold less). With each
    observation's slice, the fit recovers the factors exactly and leaves the alphas at 1; without, one shared scale
    cannot say which slice is worst."""
    from shrink_core.plan.interactions import slice_factors

    rng = np.random.default_rng(2)
    truth = {"en": 0.2, "fr": 0.1, "code": 0.4}
    x = rng.uniform(0, 0.5, size=(30, len(BIT_CLASSES)))
    slices = [("en", "fr", "code")[i % 3] for i in range(30)]
    y = x.sum(axis=1) * np.array([truth[s] for s in slices])
    model = fit(x, y, [i // 3 for i in range(30)], slices, ridge=0.0)
    assert dict(model.slice_factor) == pytest.approx(truth) and np.allclose(model.alpha, 1.0)
    assert model.log_spread < 1e-6 and model.to_dict()["slice_factor"] == dict(model.slice_factor)
    assert model.predict(x[:3], slices[:3]) == pytest.approx(y[:3])
    assert model.other_slices == pytest.approx(math.exp(np.mean(np.log(list(truth.values())))))
    assert model.factor("zh") == model.other_slices  # a slice no plan measured: the pooled scale
    assert model.scale("w4g64", "code") == pytest.approx(0.4) and model.scale("keep", "code") == 1.0
    shared = fit(x, y, [i // 3 for i in range(30)], ridge=0.0)
    assert shared.slice_factor == () and shared.log_spread > 0.3
    # one factor per slice: nothing perturbed and nothing measured are no evidence of scale
    assert slice_factors([0.0, 2.0, 1.0], [0.5, 1.0, 0.0], ["en", "en", "fr"]) == ({"en": 0.5}, 0.5)


def test_closed_loop_fits_slice_factors_from_its_rounds():
    scores = {("a", s, sl): v for s, v in (("w8", 0.01), ("w2g64", 1.0)) for sl in ("en", "code")}
    rounds, model = closed_loop(lambda m: {"a": "w2g64"}, lambda c: {"en": 0.5, "code": 2.0},
                                lambda c: {s: features(c, scores, s) for s in ("en", "code")}, rounds=2)
    assert len(rounds) == 1 and dict(model.slice_factor) == pytest.approx({"code": 2.0, "en": 0.5})
    assert model.predict(np.array([features({"a": "w2g64"}, scores, "code")]), ["code"])[0] == pytest.approx(2.0)
