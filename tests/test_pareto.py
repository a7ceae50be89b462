"""Pure Pareto math: dominance, the frontier, the worst slice, the weighted mix, the acceptance line."""
import pytest

from shrink_core.errors import ShrinkError
from shrink_core.results import pareto

# Candidates with known dominance (x = MB, y = worst-slice ppl ratio, lower is better on both):
#   ref   (270, 1.00)  frontier: the best quality
#   w8    (140, 1.01)  frontier
#   w4    ( 80, 1.20)  frontier: the smallest
#   bad   (150, 1.30)  dominated by w8 (smaller and better)
#   twin  (140, 1.01)  equal to w8: neither dominates the other, both on the frontier
#   w5    (100, 1.25)  dominated by w4 (smaller and better)
XS = [270, 140, 80, 150, 140, 100]
YS = [1.00, 1.01, 1.20, 1.30, 1.01, 1.25]


def test_dominates_needs_strictly_better_on_one():
    assert pareto.dominates((1, 1), (2, 2))
    assert pareto.dominates((1, 2), (2, 2))
    assert not pareto.dominates((1, 1), (1, 1))
    assert not pareto.dominates((1, 3), (2, 2))
    # higher-is-better y (accuracy): (1, 0.9) dominates (2, 0.8), not the reverse
    assert pareto.dominates((1, 0.9), (2, 0.8), y_higher_is_better=True)
    assert not pareto.dominates((2, 0.8), (1, 0.9), y_higher_is_better=True)


def test_frontier_of_known_candidates():
    assert pareto.frontier_mask(XS, YS) == [True, True, True, False, True, False]


def test_frontier_flips_with_higher_is_better():
    accuracy = [0.60, 0.59, 0.40, 0.30, 0.59, 0.35]  # same order as the ratios, mirrored
    assert pareto.frontier_mask(XS, accuracy, y_higher_is_better=True) == [True, True, True, False, True, False]
    # read as lower-is-better, the picture changes: the worst-accuracy 'bad' becomes a frontier point
    assert pareto.frontier_mask(XS, accuracy)[3] is True


def test_missing_values_are_never_on_the_frontier_and_never_dominate():
    xs = [None, 100, 200, float("nan")]
    ys = [0.5, 1.2, 1.1, 0.1]
    mask = pareto.frontier_mask(xs, ys)
    assert mask == [False, True, True, False]  # the missing ones would dominate everything if read as 0


def test_frontier_path_is_ordered_by_x():
    path = pareto.frontier_path(XS, YS)
    assert [XS[i] for i in path] == [80, 140, 140, 270]


def test_worst_slice_is_the_max_ratio_and_needs_every_slice():
    values = {"en": 1.02, "fr": 1.04, "ar": 1.31}
    assert pareto.worst_slice(values, ["en", "fr", "ar"], higher_is_better=False) == ("ar", 1.31)
    assert pareto.worst_slice({"en": 0.6, "mc": 0.3}, ["en", "mc"], higher_is_better=True) == ("mc", 0.3)
    # a candidate missing a slice has no worst slice (not judged on fewer slices)
    assert pareto.worst_slice({"en": 1.0}, ["en", "ar"], higher_is_better=False) == (None, None)


def test_worst_slice_view_changes_the_frontier():
    # 'en_star' wins on en (smallest and best there) but collapses on ar: the worst-slice view dominates it.
    per_candidate = {
        "ref": ({"en": 1.00, "ar": 1.00}, 270),
        "en_star": ({"en": 1.01, "ar": 1.60}, 120),
        "balanced": ({"en": 1.03, "ar": 1.05}, 120),
    }
    names = list(per_candidate)
    xs = [per_candidate[n][1] for n in names]
    en_only = [per_candidate[n][0]["en"] for n in names]
    worst = [pareto.worst_slice(per_candidate[n][0], ["en", "ar"], False)[1] for n in names]
    assert pareto.frontier_mask(xs, en_only) == [True, True, False]
    assert pareto.frontier_mask(xs, worst) == [True, False, True]


def test_weighted_mix():
    values = {"en": 1.0, "fr": 2.0, "ar": 4.0}
    assert pareto.weighted_mix(values, {"en": 3, "fr": 1}) == pytest.approx(1.25)
    assert pareto.weighted_mix(values, {"en": 1, "ar": 0}) == pytest.approx(1.0)  # zero weight: ignored
    assert pareto.weighted_mix({"en": 1.0}, {"en": 1, "fr": 1}) is None
    with pytest.raises(ValueError):
        pareto.weighted_mix(values, {"en": -1})


def test_acceptable():
    assert pareto.acceptable(1.04, 1.05, higher_is_better=False) is True
    assert pareto.acceptable(1.06, 1.05, higher_is_better=False) is False
    assert pareto.acceptable(0.55, 0.5, higher_is_better=True) is True
    assert pareto.acceptable(None, 1.05, False) is None and pareto.acceptable(1.0, None, False) is None


def test_unknown_metric_and_axis_are_one_sentence_errors():
    with pytest.raises(ShrinkError, match="Unknown quality metric 'bleu'"):
        pareto.get_metric("bleu")
    with pytest.raises(ShrinkError, match="Unknown x axis 'speed'"):
        pareto.get_axis("speed")


def test_default_worst_slice_set_is_what_every_candidate_shares():
    from shrink_core.results.pareto import shared_slices

    choice = shared_slices({"reference": {"en", "fr", "hi"}, "w8": {"en", "fr", "hi"}, "w4": {"en", "fr"},
                            "not run here": set()})
    assert choice.shared == ("en", "fr")
    assert choice.note() == "not in the worst-slice set: hi (only reference, w8)"
    assert shared_slices({"a": {"en"}, "b": {"fr"}}).shared == ()  # nothing in common: nothing shared
    assert shared_slices({"a": {"en"}}).note() == ""


def test_each_metric_has_its_own_limit_in_its_unit():
    from shrink_core.results.pareto import METRICS

    assert METRICS["kl"].default_limit == 0.05 and METRICS["top1_agree"].default_limit == 0.9
    assert METRICS["kl"].describe_limit(0.05) == "KL to reference <= 0.05 nats/token"
    assert METRICS["ppl_ratio"].describe_limit(1.05) == "perplexity within +5% of the reference"
