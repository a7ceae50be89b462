"""A tiny saved teacher (tiny_llama + a byte-level tokenizer) that `models.load(DIR)` reads: for tests and demos."""
from __future__ import annotations

from pathlib import Path


def byte_tokenizer():
    """A real (saveable) byte-level BPE tokenizer with no merges: 256 byte tokens + <eos> (id 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: index for index, char in enumerate(alphabet)} | {"<eos>": 256}
    backend = Tokenizer(models.BPE(vocab, [], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", bos_token="<eos>")


def save_toy_teacher(directory, seed: int = 0, layers: int = 4, hidden: int = 64) -> Path:
    """Write tiny_llama(vocab=258) and the byte tokenizer to `directory`; returns it."""
    from shrink_core.model.toy import tiny_llama

    directory = Path(directory)
    model = tiny_llama(seed=seed, layers=layers, hidden=hidden, vocab=258)
    model.save_pretrained(directory, safe_serialization=True)
    byte_tokenizer().save_pretrained(directory)
    return directory
