"""`explain`: what each rule of a plan decides on a model (first match wins), why, and what no rule matches, written as
block ranges per module; `plan explain` on the CLI. Toy models only (seconds)."""
import json

import pytest

from shrink_core.model.inventory import block_linears, inventory
from shrink_core.model.toy import tiny_family, tiny_llama
from shrink_core.plan import dump_plan, load_plan
from shrink_core.plan.explain import explain, group_modules, groups_text, ranges, selector_text
from shrink_core.plan.planner import solution_plan
from shrink_core.plan.resolve import first_match
from shrink_core.results.candidates import plan_lines

from .test_cli import cli

PLAN = """version: 1
name: demo
rules:
- {kind: [q, k], blocks: [0-5, 9], keep: true}
- {kind: [q], blocks: [1], weights: {bits: 8}}
- {kind: [qkv], weights: {bits: 8}}
- {kind: [v, o, gate, up, down], weights: {bits: 4}, note: the rest of the block}
"""


@pytest.fixture(scope="module")
def rows():
    return inventory(tiny_llama(layers=12, tied=False))


def test_counts_shadowed_nothing_and_unmatched(rows):
    plan = load_plan(PLAN)
    found = explain(rows, plan)
    plannable = [r for r in rows if r.kind != "norm"]
    decided = [i for i in plannable if first_match(plan.rules, i, 12) is not None]
    assert found.modules == len(plannable) == 12 * 7 + 2
    assert [r.count for r in found.rules] == [14, 0, 0, 60]
    assert found.matched_count == sum(r.count for r in found.rules) == len(decided) == 74
    assert found.unmatched_count == found.modules - found.matched_count == 12
    first, shadowed, nothing, rest = found.rules
    assert groups_text(first.matched) == "q_proj, k_proj in blocks 0-5, 9"
    assert first.why == "kind q, k: 24; then blocks 0-5, 9: 14" and first.status == "decides"
    assert shadowed.status == "shadowed" and shadowed.selected == 1
    assert "decided by earlier rule 1 (first match wins)" in shadowed.note
    assert nothing.status == "selects nothing" and "passes kind qkv" in nothing.note
    assert groups_text(rest.matched) == "v_proj, o_proj, gate_proj, up_proj, down_proj in blocks 0-11"
    assert rest.note == "the rest of the block"
    assert groups_text(found.unmatched) == "q_proj, k_proj in blocks 6-8, 10, 11; model.embed_tokens, lm_head"
    text = found.to_text()
    assert "model.layers." not in text  # block modules by name within the block, never by full name
    assert "rule(s) 2, 3 decide nothing" in text and "12 module(s) left as loaded" in text
    table = found.rows()
    assert [r["rule"] for r in table] == ["1", "2", "3", "4", "none"]
    assert sum(r["count"] for r in table) == found.modules
    assert json.loads(json.dumps(found.to_dict()))["rules"][1]["status"] == "shadowed"


def test_ranges_and_groups_are_compressed():
    assert ranges([9, 0, 1, 2, 3, 4, 5]) == "0-5, 9" and ranges([0, 1, 3]) == "0, 1, 3"
    names = [f"model.layers.{b}.self_attn.{k}_proj" for b in range(30) for k in "qk"] + ["lm_head"]
    assert groups_text(group_modules(names)) == "q_proj, k_proj in blocks 0-29; lm_head"


def test_selectors_read_as_blocks_and_names_never_as_one_long_regex():
    """A name pattern that lists modules (as old or hand-written plans do) reads as them grouped, in the explanation
    and in the report's plan lines; blocks read as ranges."""
    names = "|".join(rf"model\.layers\.{b}\.self_attn\.{k}_proj" for b in range(30) for k in "qk")
    plan = {"version": 1, "rules": [{"name": names, "keep": True}, {"kind": ["up", "down"], "weights": {"bits": 3}},
                                    {"kind": "q", "blocks": [0, 1, 2, 3, 9], "weights": {"bits": 8}}]}
    rules = load_plan(plan).rules
    assert selector_text(rules[0]) == "modules=(q_proj, k_proj in blocks 0-29)"
    assert plan_lines(plan) == ["modules=(q_proj, k_proj in blocks 0-29) -> keep", "kind=up,down -> int3 g64 asym rtn",
                                "kind=q blocks=[0-3, 9] -> int8 g64 asym rtn"]
    one = load_plan({"version": 1, "rules": [{"name": r"model\.layers\.3\.mlp\.up_proj", "keep": True}]}).rules[0]
    assert selector_text(one) == "module=model.layers.3.mlp.up_proj"
    regex = load_plan({"version": 1, "rules": [{"name": r"model\.layers\.\d+\.mlp\..*", "keep": True}]}).rules[0]
    assert selector_text(regex) == r"name='model\.layers\.\d+\.mlp\..*'"  # a real pattern is shown as written


def test_tied_weight_and_negative_blocks():
    rows = inventory(tiny_llama(layers=3, tied=True))
    plan = load_plan({"version": 1, "rules": [{"kind": "lm_head", "weights": {"bits": 8}},
                                              {"kind": "down", "blocks": [-1], "keep": True}]})
    found = explain(rows, plan)
    assert "model.embed_tokens shares its weight with lm_head, so rule 1 decides it" in found.unmatched_note
    assert found.rules[1].why == "kind down: 3; then blocks -1 (read as 2 of 0-2): 1"
    assert groups_text(found.rules[1].matched) == "down_proj in block 2"


def test_planner_plan_on_experts_reads_in_a_few_lines():
    rows = inventory(tiny_family("mixtral"))
    choice = {r.name: "w8" if r.expert is None else "w4g64" if r.expert in (0, 2) else "keep"
              for r in block_linears(rows)}
    found = explain(rows, solution_plan(choice, rows))
    assert found.matched_count == len(choice) and all(r.status == "decides" for r in found.rules)
    lines = {groups_text(r.matched) for r in found.rules}
    assert "experts.{0, 2}.gate_proj, experts.{0, 2}.up_proj, experts.{0, 2}.down_proj in blocks 0-2" in lines
    assert "q_proj, k_proj, v_proj, o_proj in blocks 0-2" in lines


def test_cli_explain_text_json_and_bad_input(tmp_path, rows):
    tiny_llama(layers=12, tied=False).save_pretrained(tmp_path / "tiny")
    choice = {r.name: "keep" if r.block in (0, 1, 11) else "w8" if r.kind in ("q", "k") else "w4g64"
              for r in block_linears(rows)}
    (tmp_path / "plan.yaml").write_text(dump_plan(solution_plan(choice, rows)))
    args = ("plan", "explain", "--model", str(tmp_path / "tiny"), "--plan", str(tmp_path / "plan.yaml"))
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert "matched: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj in blocks 0, 1, 11" in result.stdout
    assert "q_proj, k_proj in blocks 2-10" in result.stdout and "model.embed_tokens, lm_head" in result.stdout
    result = cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert sum(r["count"] for r in report["rules"]) == report["matched"] == 84
    assert report["unmatched"]["count"] == 2
    result = cli("plan", "explain", "--model", str(tmp_path / "tiny"), "--plan", str(tmp_path / "missing.yaml"))
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: The plan file") and "does not exist" in lines[0]
