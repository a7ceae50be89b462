"""Pure perf math: KV-cache bytes, packed bytes, roofline, sparsity rule, cost, hardware table validation."""
import math

import pytest

from shrink_core.formats import WeightFormat, weight_bytes
from shrink_core.perf.cost import cost_estimate, dollars_per_million
from shrink_core.perf.hardware import DEFAULT_ROWS, Hardware, HardwareTableError, get, load_table, table_from_rows
from shrink_core.perf.memory import kv_cache_bytes, memory_report
from shrink_core.perf.roofline import calibrate, module_format, project, step_cost
from shrink_core.perf.workload import ModuleWeights, Workload


def _hw(**changes) -> Hardware:
    row = dict(name="toy", kind="gpu", memory_bytes=10**9, bandwidth_bytes_per_s=1e9, peak_flops={"bf16": 1e12},
               float_dtype="bf16", launch_overhead_s=1e-6, price_per_hour=2.0, bandwidth_efficiency=1.0,
               compute_efficiency=1.0)
    row.update(changes)
    return Hardware(**row)


def _module(bits=16, shape=(1000, 1000), pattern=None, share=0.0, group=None):
    return ModuleWeights("m", "up", shape, math.prod(shape), bits, group, False,
                         weight_bytes(shape, bits, group, False), True, share, pattern)


def _workload(*modules, layers=1, ops=10):
    return Workload("w", layers, 64, 4, 2, 16, 100, tuple(modules), "computed from bits per module", ops)


def test_kv_cache_bytes_matches_hand_computation_for_smollm2():
    # SmolLM2-135M: 30 layers, 3 KV heads of 64; K and V; 2048 tokens; batch 2; fp16 = 2 bytes
    assert kv_cache_bytes(30, 3, 64, 2048, 2, 16) == 2 * 30 * 3 * 64 * 2048 * 2 * 2 == 94_371_840


def test_memory_report_uses_the_workload_shape():
    report = memory_report(_workload(_module(), layers=3), context=100, batch=2, kv_bits=32)
    assert report.kv_cache_bytes == 2 * 3 * 2 * 16 * 100 * 2 * 4
    assert report.weight_bytes == 1000 * 1000 * 2
    fits = report.fits(_hw(memory_bytes=10**6), overhead_bytes=0)
    assert fits == {**fits, "fits": False, "kind": "projected"}


def test_stored_bytes_counted_by_hand():
    # (576, 1536) int4 g64 asymmetric: 576 x 768 code bytes + 576 x 24 groups x (2-byte scale + 1-byte zero)
    assert weight_bytes((576, 1536), 4, 64, False) == 442_368 + 13_824 * 3
    # (192, 576) int3 g32 symmetric: 192 x 216 code bytes + 192 x 18 scales, no zeros
    assert weight_bytes((192, 576), 3, 32, True) == 41_472 + 3_456 * 2
    assert weight_bytes((10, 70), 8, None, True) == 700 + 10 * 2  # per output channel: one scale per row
    assert weight_bytes((4, 8), 32, None, True) == 128 and weight_bytes((4, 8), 16, None, True) == 64
    assert WeightFormat(4, 64).stored_bytes((576, 1536)) == weight_bytes((576, 1536), 4, 64, False)


def test_decode_is_bytes_over_bandwidth_plus_launches():
    hw = _hw()
    workload = _workload(_module(16), ops=10)
    cost, notes = step_cost(workload, hw, batch=1, new_tokens=1, context=0, kv_bits=16)
    kv = 1 * 1 * workload.kv_bytes_per_token(16)
    assert cost.bytes == 2_000_000 + kv and cost.launches == 15 and notes == ()
    p = project(workload, hw, batch=1, prompt_tokens=8, decode_tokens=0, kv_bits=16)
    decode_cost, _ = step_cost(workload, hw, 1, 1, 8, 16)
    assert p.decode_ms_per_token == pytest.approx(1000 * (decode_cost.bytes / 1e9 + 15e-6))
    assert p.decode_bound == "memory"


def test_big_prefill_is_compute_bound():
    hw = _hw(peak_flops={"bf16": 1e9})  # slow compute
    p = project(_workload(_module(16)), hw, batch=8, prompt_tokens=512, decode_tokens=16)
    assert p.prefill_bound == "compute"
    cost, _ = step_cost(_workload(_module(16)), hw, 8, 512, 0)
    assert p.prefill_ms_per_token == pytest.approx(1000 * (cost.flops / 1e9 + cost.launches * 1e-6) / (8 * 512))


def test_lowbit_counts_only_where_the_target_has_a_kernel():
    module = _module(bits=4, group=64)
    read, factor, note = module_format(module, _hw(lowbit_weight_bits=(4, 8)))
    assert read == module.read_bytes < 1000 * 1000 and note is None
    read, factor, note = module_format(module, _hw(lowbit_weight_bits=(8,)))
    assert read == 2_000_000 and "no fast kernel" in note


def test_two_four_sparsity_speeds_up_only_on_targets_that_run_it():
    module = _module(16, pattern="2:4", share=0.5)
    read, factor, note = module_format(module, _hw(sparse_patterns=("2:4",)))
    assert read == pytest.approx(2_000_000 * 0.5625) and factor == 0.5 and note is None
    read, factor, note = module_format(module, _hw(sparse_patterns=()))
    assert read == 2_000_000 and factor == 1.0 and "no speedup" in note
    dense, sparse = _workload(_module(16)), _workload(module)
    pi = get("raspberry-pi-5")
    assert project(sparse, pi).decode_ms_per_token == project(dense, pi).decode_ms_per_token
    h100 = get("h100-sxm")
    assert project(sparse, h100, batch=64, prompt_tokens=512).prefill_ms_per_token < \
        project(dense, h100, batch=64, prompt_tokens=512).prefill_ms_per_token


def test_unstructured_sparsity_needs_the_targets_threshold():
    cpu = _hw(kind="cpu", sparse_patterns=("unstructured",), unstructured_min_sparsity=0.7)
    read, factor, note = module_format(_module(16, pattern="unstructured", share=0.5), cpu)
    assert (read, factor) == (2_000_000, 1.0) and "no speedup" in note
    read, factor, note = module_format(_module(16, pattern="unstructured", share=0.8), cpu)
    assert read == pytest.approx(1e6 * 0.2 * 32 / 8) and factor == pytest.approx(0.2) and note is None


@pytest.mark.parametrize("overlap, measured_bandwidth", [(True, None), (False, None), (False, 15e9)])
def test_calibration_recovers_a_known_machine(overlap, measured_bandwidth):
    from shrink_core.perf.latency import MeasuredLatency, Timing

    truth = _hw(kind="cpu", bandwidth_bytes_per_s=15e9, peak_flops={"fp32": 80e9}, float_dtype="fp32",
                launch_overhead_s=20e-6, overlap=overlap)
    workloads = [_workload(_module(32, shape=(2000, 2000)), layers=4, ops=30),
                 _workload(_module(32, shape=(1000, 2000)), layers=4, ops=30)]
    pairs = []
    for workload in workloads:
        for batch in (1, 4):
            p = project(workload, truth, batch, 64, 16, kv_bits=32)
            pairs.append((workload, MeasuredLatency("c", "cpu", "rt", 1, batch, 64, 16, 1, 0,
                                                    Timing((p.prefill_ms_per_token,)), Timing((p.decode_ms_per_token,)),
                                                    (0.0, 0.0))))
    fitted = calibrate(pairs[:2], get("this-machine"), measured_bandwidth)
    assert fitted.calibrated_from and "fitted to 4" in fitted.calibrated_from
    assert fitted.overlap is overlap
    for workload, measured in pairs:  # the second workload was not in the fit
        p = project(workload, fitted, measured.batch, 64, 16, kv_bits=32)
        assert p.decode_ms_per_token == pytest.approx(measured.decode_ms_per_token.median_ms, rel=0.15)
        assert p.prefill_ms_per_token == pytest.approx(measured.prefill_ms_per_token.median_ms, rel=0.15)


def test_cost_per_million_tokens():
    assert dollars_per_million(3.6, 1000) == pytest.approx(1.0)
    assert dollars_per_million(3.6, 1000, utilisation=0.5) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        dollars_per_million(1.0, 0)
    estimate = cost_estimate("l4", 0.8, prefill_tokens_per_s=8000, decode_tokens_per_s=400, batch=4, basis="projected")
    row = estimate.to_dict()
    assert row["kind"] == "projected" and row["output_dollars_per_million"] > row["input_dollars_per_million"]
    assert any("50%" in a for a in row["assumptions"])


def test_default_table_has_the_required_targets():
    names = {row.name for row in DEFAULT_ROWS}
    assert {"h100-sxm", "a100-80gb", "l4", "a10g", "rtx-4090", "x86-server-cpu", "apple-m3-max", "raspberry-pi-5",
            "this-machine"} <= names
    assert all("2:4" in get(n).sparse_patterns for n in ("h100-sxm", "a100-80gb", "l4", "a10g", "rtx-4090"))
    assert "2:4" not in get("raspberry-pi-5").sparse_patterns


@pytest.mark.parametrize("change, words", [
    ({"bandwidth_bytes_per_s": -1}, "bandwidth_bytes_per_s must be a positive number"),
    ({"float_dtype": "fp8"}, "has no entry in peak_flops"),
    ({"sparse_patterns": ["3:7"]}, "sparse_patterns"),
    ({"speed": 3}, "unknown field(s) speed"),
])
def test_a_bad_table_row_is_one_sentence(change, words):
    row = {**get("a10g").to_dict(), "name": "mine", **change}  # a10g lists no fp8
    with pytest.raises(HardwareTableError) as info:
        table_from_rows([row])
    message = str(info.value)
    assert words in message and "\n" not in message and message.endswith(".")


def test_table_file_round_trip_and_duplicate_names(tmp_path):
    import yaml

    rows = [get("l4").to_dict(), {**get("l4").to_dict(), "name": "l4-cheap", "price_per_hour": 0.5}]
    path = tmp_path / "table.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "rows": rows}))
    table = load_table(path)
    assert get("l4-cheap", table).price_per_hour == 0.5 and get("l4", table) == get("l4")
    with pytest.raises(HardwareTableError, match="repeats the name 'l4'"):
        table_from_rows([rows[0], rows[0]])
    with pytest.raises(HardwareTableError, match="Unknown target 'nope'"):
        get("nope", table)
