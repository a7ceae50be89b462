"""The evaluation engine on the toy model and toy slices: exactness against a plain forward, determinism, statistics."""
import gzip
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from shrink_core.evaluation import stats as metrics
from shrink_core.evaluation.evaluate import (
    PROTOCOLS,
    Request,
    compare,
    covered_bytes,
    evaluate,
    get_protocol,
    score,
    select_items,
)
from shrink_core.evaluation.slices import SliceInfo, get_slice
from shrink_core.model.toy import ByteTokenizer, tiny_llama


@pytest.fixture(scope="module")
def toy():
    return tiny_llama(vocab=258), ByteTokenizer()


def test_score_matches_a_plain_forward_pass(toy):
    model, _ = toy
    ids = [256] + list(b"the quick brown fox jumps")
    (out,) = score(model, [Request(0, ids, 1)])
    with torch.inference_mode():
        loss = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert out.tokens == len(ids) - 1
    assert out.nll / out.tokens == pytest.approx(loss, rel=1e-5)


def test_padding_and_batching_do_not_change_scores(toy):
    model, _ = toy
    requests = [Request(i, [256] + list(text.encode()), 1) for i, text in enumerate(["a", "hello there", "xyz" * 20])]
    together = score(model, requests, max_batch_tokens=4096)
    alone = [score(model, [r], max_batch_tokens=4096)[0] for r in requests]
    for a, b in zip(together, alone):
        assert a.nll == pytest.approx(b.nll, rel=1e-4) and a.tokens == b.tokens


def test_reference_against_itself_has_zero_kl(toy):
    model, _ = toy
    (out,) = score(model, [Request(0, [256] + list(b"some text here"), 1)], reference=model)
    assert np.allclose(out.kl_values, 0, atol=1e-6) and out.top1_agree == out.tokens


def test_evaluate_toy_slices(toy):
    model, tokenizer = toy
    infos = [get_slice("toy_en"), get_slice("toy_mc"), get_slice("toy_exact")]
    results = {r.slice: r for r in evaluate(model, tokenizer, infos, "fast")}
    text = results["toy_en"]
    assert math.isfinite(text.ppl) and text.ppl_ci is None  # 4 rows: too few items for an interval
    assert 0 < text.bpb < 20 and text.tokens > 0
    mc = results["toy_mc"]
    assert 0 <= mc.accuracy <= 1 and mc.accuracy_ci is None
    assert len(mc.per_item["correct"]) == mc.items
    again = {r.slice: r for r in evaluate(model, tokenizer, infos, "fast")}
    assert again["toy_en"].to_dict() == text.to_dict()  # same budget, same tokens, same figures


def test_candidate_against_reference_reports_kl_and_flips(toy):
    model, tokenizer = toy
    noisy = tiny_llama(vocab=258)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    infos = [get_slice("toy_en"), get_slice("toy_mc")]
    ref = {r.slice: r for r in evaluate(model, tokenizer, infos, "fast")}
    cand = {r.slice: r for r in evaluate(noisy, tokenizer, infos, "fast", reference=model, reference_results=ref)}
    assert cand["toy_en"].kl > 0 and cand["toy_en"].kl_p99 >= cand["toy_en"].kl
    assert 0 <= cand["toy_en"].top1_agree <= 1
    assert set(cand["toy_mc"].flips) == {"lost", "gained", "total"}
    verdict = compare(ref["toy_en"], cand["toy_en"])
    assert 0 <= verdict["nll_p"] <= 1 and verdict["ppl_ratio"] == pytest.approx(cand["toy_en"].ppl / ref["toy_en"].ppl)


def test_selection_is_deterministic_and_keeps_groups():
    rows = [{"id": f"r{i}", "group": f"g{i // 2}"} for i in range(20)]
    chosen = select_items(rows, 3, by_group=True)
    assert len(chosen) == 6 and len({r["group"] for r in chosen}) == 3
    assert select_items(list(reversed(rows)), 3, by_group=True) == chosen


def test_budgets():
    assert set(PROTOCOLS) == {"fast", "standard", "full"}
    from shrink_core.errors import ShrinkError

    with pytest.raises(ShrinkError, match="Unknown evaluation protocol 'quick'"):
        get_protocol("quick")


def test_statistics():
    nll = np.tile([10.0, 20.0, 30.0], 10)  # 30 items: enough for an interval
    tokens = np.full(30, 10)
    assert metrics.perplexity(nll, tokens) == pytest.approx(math.exp(2.0))
    low, high = metrics.ppl_ci(nll, tokens)
    assert low < math.exp(2.0) < high
    assert metrics.ppl_ci(nll[:3], tokens[:3]) is None
    assert metrics.bits_per_byte(np.array([math.log(2) * 8]), np.array([8])) == pytest.approx(1.0)
    same = np.arange(50, dtype=float)
    assert metrics.paired_bootstrap_p(same, same) == 1.0
    assert metrics.paired_bootstrap_p(same + 5, same) < 0.01
    a = np.array([True] * 30 + [False] * 10)
    b = np.array([True] * 10 + [False] * 30)
    assert metrics.mcnemar_p(a, b) < 0.001 and metrics.mcnemar_p(a, a) == 1.0
    assert metrics.flips(a, b) == {"lost": 20, "gained": 0, "total": 20}


# ---------------------------------------------------------------- bits per byte of the text actually scored


def byte_level_tokenizer():
    """A fast (Rust) tokenizer with one token per UTF-8 byte plus <s>=256, </s>=257: tiny_llama(vocab=258) reads it,
    and it has character offsets like the real models' tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()} | {"<s>": 256, "</s>": 257}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def long_slice(tmp_path, texts: list[str]) -> SliceInfo:
    """A slice with the id of the long-documents slice (the one cut to one window), in a temporary file."""
    path = tmp_path / "long.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": f"d{i}", "doc": f"d{i}", "split": "eval", "text": text}) + "\n")
    return SliceInfo(id="long", title="long", kind="text", metric="ppl", languages=("en",), source=(), license="-",
                     rows=len(texts), rows_calib=0, rows_eval=len(texts), tokens=0, path=path)


@pytest.mark.parametrize("make_tokenizer", [ByteTokenizer, byte_level_tokenizer], ids=["decode", "offsets"])
def test_long_document_bpb_divides_by_the_bytes_scored(tmp_path, toy, make_tokenizer):
    model, _ = toy
    tokenizer = make_tokenizer()
    texts = ["The long road goes on and on. " * 10, "Another document, a little shorter. " * 7]  # 300 and 252 bytes
    budget = replace(PROTOCOLS["fast"], long_window=64)  # BOS + 63 scored tokens of each document: 63 bytes each here
    result = evaluate(model, tokenizer, [long_slice(tmp_path, texts)], budget)[0]
    assert result.tokens == 2 * 63
    nll_bits = result.nll * result.tokens / math.log(2)
    assert result.bpb == pytest.approx(nll_bits / (2 * 63))
    assert result.bpb > 4 * nll_bits / sum(len(t) for t in texts)  # what it was: the bytes of the whole documents


def test_covered_bytes_follow_the_offsets_not_the_decoded_text():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "émile": 1, "beta": 2, "gamma": 3}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words)
    text = "émile  beta\n\ngamma beta"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert covered_bytes(tokenizer, text, ids, 2) == len("émile  beta".encode())  # 12 bytes: two spaces, a 2-byte é
    assert len(tokenizer.decode(ids[:2]).encode()) == 11  # the decoded prefix would lose a space
    assert covered_bytes(tokenizer, text, ids, len(ids)) == len(text.encode())


def test_scores_reduced_a_chunk_of_positions_at_a_time_equal_one_pass_and_an_empty_batch_scores_nothing(toy):
    """Evaluation holds one chunk's full-vocabulary log-probs at a time (memory at a 128k vocabulary); the chunk size
    must not change any figure, and a batch with no scored position gives empty figures, not an error."""
    from shrink_core.evaluation.evaluate import _reduce

    model, _ = toy
    reference = tiny_llama(seed=1, vocab=258)
    ids = torch.randint(0, 258, (3, 20), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(3 * 20 - 1)
    targets = ids.reshape(-1)[positions + 1]
    with torch.inference_mode():
        hidden, ref_hidden = (m.get_decoder()(input_ids=ids).last_hidden_state for m in (model, reference))
        whole = _reduce(model, hidden, positions, targets, reference, ref_hidden, chunk=1000)
        chunked = _reduce(model, hidden, positions, targets, reference, ref_hidden, chunk=7)
        empty = _reduce(model, hidden, positions[:0], targets[:0], reference, ref_hidden, chunk=7)
    for key in ("nll", "hit", "kl", "agree"):
        assert whole[key].shape == (59,) and torch.allclose(whole[key].float(), chunked[key].float(), atol=1e-6)
        assert empty[key].shape == (0,)
    assert float(whole["kl"].sum()) > 0 and bool((whole["nll"] > 0).all())
