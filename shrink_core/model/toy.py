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
