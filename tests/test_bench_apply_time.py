"""bench/bench_apply_time.py: the weight hash that shows a speed change left every weight as it was."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_apply_time import code_version, weights_sha256  # noqa: E402


def small() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    model.register_buffer("codes", torch.arange(6, dtype=torch.uint8))
    return model


def test_the_hash_sees_one_changed_value_in_any_parameter_or_buffer_and_nothing_else():
    first, second = small(), small()
    assert weights_sha256(first) == weights_sha256(second)
    with torch.no_grad():
        second[0].weight[1, 2] += 2.0 ** -20
    assert weights_sha256(first) != weights_sha256(second)
    third = small()
    third.codes[5] = 9
    assert weights_sha256(first) != weights_sha256(third)
    fourth = small()
    fourth.codes = fourth.codes.to(torch.int32)  # the same values in another dtype are other bytes
    assert weights_sha256(first) != weights_sha256(fourth)


def test_the_code_version_names_this_checkout():
    version = code_version()
    assert Path(version["shrink_core"]) == Path(__file__).resolve().parents[1]
    assert version["commit"] is None or len(version["commit"]) >= 7
