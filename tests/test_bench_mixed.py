"""bench_mixed's robust aggregation: one overshooting sequence is capped, the rest averaged as they are."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_mixed import winsorized_mean  # noqa: E402


def test_winsorized_mean_caps_one_outlier_sequence_per_row():
    # ru, block 0's v_proj at W3 g64 (docs/sensitivity.md): seven sequences near 0.04, the eighth at 36.7
    values = np.array([[0.079, 0.041, 0.03, 0.053, 0.033, 0.042, 0.038, 36.743],
                       [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    out = winsorized_mean(values, 10.0)
    median = np.median(values[0])  # 0.0415
    assert out[0] == pytest.approx((values[0, :7].sum() + 10 * median) / 8)
    assert out[0] < 0.1 < values[0].mean()  # the plain mean is 4.63
    assert out[1] == pytest.approx(values[1].mean())  # nothing above 10x the median: the plain mean
