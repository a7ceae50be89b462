"""A tiny seeded Llama built from a config: the model of the unit tests and quick benches (no download)."""
from __future__ import annotations


def tiny_llama(seed: int = 0, layers: int = 3, hidden: int = 64, vocab: int = 256, tied: bool = True):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


class ByteTokenizer:
    """UTF-8 bytes as tokens (0-255) plus BOS/EOS, for tiny_llama(vocab=258): enough tokenizer for unit tests."""

    bos_token_id = 256
    eos_token_id = 257
    vocab_size = 258

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# Tiny configs of the families the tool supports (docs/architectures.md): 3 blocks (a preset may keep the ends),
# hidden 64, 4 heads (2 KV heads where the family has GQA), vocabulary 258 (ByteTokenizer), seeded random weights.
# Gemma's sliding window is 16 so
# that its local and global blocks differ on any probe longer than that.
_COMMON = dict(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=256, eos_token_id=257,
               pad_token_id=0)
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},  # q/k/v biases
    "qwen3": {},  # q/k norms
    "gemma2": dict(sliding_window=16),
    "gemma3_text": dict(sliding_window=16, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "phi3": {},  # fused qkv_proj and gate_up_proj
    "gpt2": dict(n_embd=64, n_layer=3, n_head=4, n_positions=512, n_inner=128),  # Conv1D, transposed weights
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64, pad_token_id=1),  # biases, out_proj, fc1/fc2, learned positions
    "gpt_neox": dict(),  # fused query_key_value, dense_h_to_4h / dense_4h_to_h
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[]),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                      mlp_only_layers=[]),
}
_NO_COMMON = {"gpt2": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim", "max_position_embeddings", "pad_token_id"),
              "opt": ("intermediate_size", "num_key_value_heads", "head_dim"),
              "gpt_neox": ("num_key_value_heads", "head_dim")}


def tiny_family(family: str, seed: int = 0):
    """A tiny seeded model of `family` (a key of FAMILIES), built from its transformers config, in the canonical
    layout that loading gives (model/arch.py)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from shrink_core.model.arch import canonicalize_

    kwargs = {k: v for k, v in _COMMON.items() if k not in _NO_COMMON.get(family, ())} | FAMILIES[family]
    config = AutoConfig.for_model(family, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    canonicalize_(model)
    model.eval()
    return model
