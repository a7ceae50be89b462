"""The held-out correction bench's parts: its rows never touch the windows bench_peers judges on, and the ratios it
plans on must cover the menu (read through bench_mixed's reader, which keeps only what was asked). Its KL is the
product's `whole_model_kl`, tested in test_sensitivity.py."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_mixed import read_ratios  # noqa: E402
from bench_slicefix import BENCH_WINDOWS, WINDOW, holdout_tokens  # noqa: E402

from shrink_core.sensitivity.probe import eval_tokens  # noqa: E402


class ByteTokenizer:
    """Bytes as token ids: enough for eval_tokens' stream (BOS + text, chunked)."""
    bos_token_id = 1
    eos_token_id = 2

    def encode(self, text, add_special_tokens=False):
        return list(text.encode("utf-8"))


def test_holdout_rows_start_after_the_judged_windows_and_a_gap():
    tok = ByteTokenizer()
    held = holdout_tokens(tok, "en", 3)
    stream = eval_tokens(tok, "en", BENCH_WINDOWS + 1 + 3, WINDOW).reshape(-1)
    judged = eval_tokens(tok, "en", BENCH_WINDOWS, WINDOW).reshape(-1)
    assert held.shape == (3, WINDOW)
    start = (BENCH_WINDOWS + 1) * WINDOW
    assert torch.equal(held.reshape(-1), stream[start:])
    assert torch.equal(stream[:judged.numel()], judged)  # the same stream: the judged tokens end a window before


def test_ratios_must_cover_the_menu_and_only_the_asked_part_is_kept(tmp_path):
    rows = [[m, o, s, 0.5] for m in ("a", "b") for o in ("w3g64", "w8") for s in ("en", "fr")]
    path = tmp_path / "ratios.json"
    path.write_text(json.dumps(rows))
    kept = read_ratios(str(path), ["a", "b"], ["w3g64"], ["en", "fr"])
    assert set(kept) == {(m, "w3g64", s) for m in ("a", "b") for s in ("en", "fr")}
    with pytest.raises(SystemExit, match="does not cover"):
        read_ratios(str(path), ["a", "b"], ["w4g64"], ["en"])
