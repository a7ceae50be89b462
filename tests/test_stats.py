"""Pure statistics: resampling p-values are never 0, Holm-Bonferroni across slices, no interval over too few items."""
import numpy as np
import pytest

from shrink_core.evaluation import stats


def test_paired_bootstrap_p_is_never_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(3.0, 0.1, 200)
    b = a + 1.0  # every item one nat worse: no resample of the null comes near it
    p = stats.paired_bootstrap_p(b, a)
    assert p > 0 and p == pytest.approx(1 / (stats.PAIRED_TEST_SAMPLES + 1))  # 2000 resamples cannot show less
    assert stats.paired_bootstrap_p(a, a.copy()) == 1.0  # no difference at all: every null draw is as extreme


def test_holm_adjust_matches_the_step_down_by_hand():
    # sorted 0.01, 0.03, 0.04, 0.5 over m=4: 0.04, max(0.04, 0.09), max(0.09, 0.08), max(0.09, 0.5)
    adjusted = stats.holm_adjust([0.04, 0.01, None, 0.5, 0.03])
    assert adjusted == pytest.approx([0.09, 0.04, None, 0.5, 0.09]) and adjusted[2] is None
    assert stats.holm_adjust([0.3, 0.6]) == pytest.approx([0.6, 0.6])
    assert stats.holm_adjust([0.9, 0.8, 0.7]) == pytest.approx([1.0, 1.0, 1.0])  # capped at 1
    # one slice at 0.02 and two at 0.5: significant alone, not after looking at three slices
    assert stats.holm_adjust([0.02, 0.5, 0.5])[0] == pytest.approx(0.06)


def test_no_interval_below_the_minimum_items():
    few = np.ones(3, dtype=bool)  # 3 right out of 3 would resample to the "interval" [1, 1]
    assert stats.accuracy_ci(few) is None
    assert stats.ppl_ci(np.array([20.0, 22.0, 25.0]), np.array([10, 10, 10])) is None
    assert stats.interval_note(3) == "n=3 items: too few for an interval (fewer than 20)"
    assert stats.format_interval(None, 3) == stats.interval_note(3)
    assert stats.format_interval((0.9, 1.0), 3) == stats.interval_note(3)  # one stored before there was a minimum
    enough = np.array([True, False] * (stats.MIN_INTERVAL_ITEMS // 2))
    low, high = stats.accuracy_ci(enough)
    assert low < 0.5 < high and stats.interval_note(len(enough)) is None
    assert stats.format_interval((low, high), len(enough)) == f"[{low:.3f}, {high:.3f}]"
