"""The restore probe's groups: each kind across every block, blocks in contiguous ranges that cover every block once,
one named range; a part it does not know is refused in one sentence; the rendered table states each group's share of
the KL removed per 1% of the weights, and a probe a killed run left partial is left out."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_restore_probe import groups_for, render  # noqa: E402

from shrink_core.model.inventory import block_linears, inventory  # noqa: E402
from shrink_core.model.toy import tiny_llama  # noqa: E402


def test_kinds_and_block_ranges_partition_the_modules():
    rows = block_linears(inventory(tiny_llama(layers=7)))
    names = [r.name for r in rows]
    groups = groups_for("kinds,blocks3,block:2-3", rows, 7)
    kinds = ["kind:down", "kind:gate", "kind:k", "kind:o", "kind:q", "kind:up", "kind:v"]
    assert sorted(groups) == ["block:0-1", "block:2-3", "block:2-4", "block:5-6", *kinds]
    assert groups["kind:q"] == [f"model.layers.{b}.self_attn.q_proj" for b in range(7)]
    assert sorted(sum((groups[k] for k in kinds), [])) == sorted(names)
    ranges = groups["block:0-1"] + groups["block:2-4"] + groups["block:5-6"]
    assert sorted(ranges) == sorted(names)
    assert groups["block:2-3"] == [n for n in names if ".2." in n or ".3." in n] and len(groups["block:2-3"]) == 14
    with pytest.raises(SystemExit, match="'heads' is not kinds, blocksN or block:A-B"):
        groups_for("heads", rows, 7)


def test_render_states_the_share_removed_per_percent_of_weights(tmp_path):
    lines = [{"probe": "none", "share": 0.0, "slice": "hi", "kl": 0.4, "kl_none": 0.4},
             {"probe": "none", "share": 0.0, "slice": "de", "kl": 0.5, "kl_none": 0.5},
             {"probe": "kind:q", "share": 0.1, "slice": "hi", "kl": 0.3, "kl_none": 0.4},
             {"probe": "kind:q", "share": 0.1, "slice": "de", "kl": 0.45, "kl_none": 0.5},
             {"probe": "kind:k", "share": 0.1, "slice": "hi", "kl": 0.3, "kl_none": 0.4}]  # killed before its de
    path = tmp_path / "peers.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    table = render(path)
    assert "| kind:q | 10.0 | 0.300 | 2.50 | 0.450 | 1.00 |" in table  # 25% of hi's KL off with 10% of the weights
    assert "| none | 0.0 | 0.400 |  | 0.500 |  |" in table
    assert "kind:k" not in table
