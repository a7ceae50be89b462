"""The attention head width on the Plan page's latency model comes from the config, not hidden // heads.

Gemma 3 270m: hidden 640, 4 heads of 256 (hidden // heads would say 160, 0.625x). A tiny Gemma 3 with the same trait:
hidden 64, 4 query heads and 1 KV head of 32 (hidden // heads = 16).
"""
import pytest
import torch


@pytest.fixture(scope="module")
def gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=32)
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


def test_stored_inventory_gives_the_configured_head_dim(gemma3):
    from shrink_core.model.inventory import inventory, summary
    from shrink_core.perf.workload import describe_model, workload_from_rows

    rows = inventory(gemma3)
    facts = summary(gemma3, rows)
    from_rows = workload_from_rows(rows, facts)
    assert from_rows.head_dim == 32 == describe_model(gemma3).head_dim
    # K and V of one token: 2 (K, V) x 2 layers x 1 KV head x 32 wide x 2 bytes = 256 bytes at 16 bits
    assert from_rows.kv_bytes_per_token(16) == 256
    # a summary stored before head_dim was recorded: the query projection's width per head still gives 32
    older = {k: v for k, v in facts.items() if k != "head_dim"}
    assert workload_from_rows(rows, older).head_dim == 32


def test_plan_latency_model_counts_the_real_kv_cache(gemma3):
    """The planner's fixed part (KV cache, attention, unplanned modules) equals the roofline's for the live model."""
    from shrink_core.model.inventory import inventory, summary
    from shrink_core.perf.hardware import get
    from shrink_core.perf.roofline import fixed_step_seconds
    from shrink_core.perf.workload import describe_model
    from shrink_core.plan.planner import latency_model

    rows = inventory(gemma3)
    hardware = get("h100-sxm")
    planned = {r.name for r in rows if r.kind not in ("norm", "embedding")}
    model = latency_model(rows, summary(gemma3, rows), hardware, planned)
    expected = fixed_step_seconds(describe_model(gemma3), hardware, 1, 64 + 16 / 2)
    assert model.fixed_seconds == pytest.approx(expected, rel=1e-12)


def test_gemma3_270m_config_gives_256_wide_heads():
    """The real gemma3-270m config (from the converted built-in's cache; skipped when it is not there), on the meta
    device: no weights are read."""
    import glob
    import os

    from transformers import AutoConfig, AutoModelForCausalLM

    from shrink_core.model.inventory import inventory, summary
    from shrink_core.perf.workload import workload_from_rows

    found = glob.glob(os.path.join(os.environ["SHRINK_MODEL_CACHE"], "gemma-3-270m*", "config.json"))
    if not found:
        pytest.skip("the gemma3-270m built-in has not been converted on this machine")
    config = AutoConfig.from_pretrained(os.path.dirname(found[0]))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    rows = inventory(model)
    workload = workload_from_rows(rows, summary(model, rows))
    assert (workload.hidden, workload.heads, workload.head_dim) == (640, 4, 256)
    assert workload.kv_bytes_per_token(16) == 2 * 18 * 1 * 256 * 2  # K and V, 18 layers, one KV head, 2 bytes
