from shrink_core.model.inventory import LINEAR_KINDS, block_linears, inventory, summary


def test_tiny_inventory(tiny_model):
    rows = inventory(tiny_model)
    config = tiny_model.config
    assert len(block_linears(rows)) == 7 * config.num_hidden_layers
    kinds = {r.kind for r in rows}
    assert {"embedding", "q", "k", "v", "o", "gate", "up", "down", "lm_head", "norm"} <= kinds
    assert sum(r.params for r in rows) == sum(p.numel() for p in tiny_model.parameters())
    lm_head = next(r for r in rows if r.kind == "lm_head")
    assert lm_head.tied_to == "model.embed_tokens" and lm_head.params == 0 and lm_head.bytes == 0
    q = next(r for r in rows if r.name == "model.layers.1.self_attn.q_proj")
    assert q.block == 1 and q.shape == (64, 64) and q.bytes == 64 * 64 * 4


def test_summary(tiny_model):
    rows = inventory(tiny_model)
    facts = summary(tiny_model, rows)
    assert facts["blocks"] == 3 and facts["vocab_size"] == 256
    assert facts["tied_embeddings"] and facts["tied_modules"] == ["lm_head"]
    assert facts["bytes_fp32"] == 2 * facts["bytes_bf16"] == 4 * facts["parameters"]
    assert facts["block_linears"] == 21


def test_untied_model_counts_lm_head(tiny_model):
    from shrink_core.model.toy import tiny_llama

    model = tiny_llama()
    model.lm_head.weight = __import__("torch").nn.Parameter(model.lm_head.weight.detach().clone())
    rows = inventory(model)
    lm_head = next(r for r in rows if r.kind == "lm_head")
    assert lm_head.tied_to is None and lm_head.params == 256 * 64
    assert all(r.kind in LINEAR_KINDS for r in block_linears(rows))
