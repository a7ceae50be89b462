"""Why a plan does what it does, on one model: for each rule the modules it decides (first match wins), how many, and
which of its selectors let them through; rules that decide nothing (shadowed, or selecting nothing) and modules no rule
matches. Module lists are written per module as block ranges ("q_proj, k_proj in blocks 0-5, 9"), never name by name,
so a plan over hundreds of modules reads in a few lines. Pure functions over the inventory; the Plan page and
`plan explain` both show `explain(rows, plan)`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from shrink_core.model.inventory import BLOCK_INDEX, ModuleInfo
from shrink_core.plan.resolve import first_match
from shrink_core.plan.spec import Plan, Rule, compact_blocks

_META = set(".^$*+?{}[]()|\\")


# ---------------------------------------------------------------- module lists as block ranges


def name_parts(name: str) -> tuple[str, int | None, str]:
    """A module name around its block index: "model.layers.3.self_attn.q_proj" -> ("model.layers.", 3,
    ".self_attn.q_proj"); (name, None, "") outside blocks. The same index the inventory reads."""
    match = BLOCK_INDEX.search(name)
    if match is None:
        return name, None, ""
    return name[:match.start(1)], int(match[1]), name[match.end(1):]


def ranges(numbers) -> str:
    """"0-5, 9": runs of three or more as ranges, as plan files write blocks."""
    return ", ".join(str(b) for b in compact_blocks(sorted(set(numbers))))


def _site(name: str) -> str:
    head, block, tail = name_parts(name)
    return name if block is None else f"{head}#{tail}"


def _labels(sites) -> dict[str, str]:
    """The shortest name that tells a module apart within its block: "q_proj", or "experts.0.gate_proj" where several
    experts share a leaf (a suffix never starts at a bare index)."""
    split = {s: s.split(".") for s in sites}
    out = {}
    for site, parts in split.items():
        for n in range(1, len(parts) + 1):
            tail = parts[-n:]
            if tail[0].isdigit():
                continue
            if sum(p[-n:] == tail for p in split.values()) == 1:
                break
        out[site] = ".".join(tail).replace("#", "N")
    return out


def _collapse(labels: list[str]) -> list[str]:
    """One entry per name that differs only in an index: experts.0.gate_proj, experts.1.gate_proj ->
    experts.{0, 1}.gate_proj (a model with 64 experts stays readable)."""
    groups: dict[tuple, list[int]] = {}
    for label in labels:
        parts = label.split(".")
        i = next((j for j, p in enumerate(parts) if p.isdigit()), None)
        key = (label,) if i is None else (".".join(parts[:i]), ".".join(parts[i + 1:]))
        groups.setdefault(key, []).append(-1 if i is None else int(parts[i]))
    out = []
    for key, numbers in groups.items():
        if len(key) == 1 or len(numbers) == 1:
            out.append(key[0] if len(key) == 1 else ".".join(p for p in (key[0], str(numbers[0]), key[1]) if p))
        else:
            out.append(".".join(p for p in (key[0], "{" + ranges(numbers) + "}", key[1]) if p))
    return out


@dataclass(frozen=True)
class ModuleGroup:
    """Modules that share their blocks: labels ("q_proj") in `blocks`, or full names outside blocks (blocks None)."""

    modules: tuple[str, ...]
    blocks: tuple[int, ...] | None
    count: int

    def text(self) -> str:
        names = ", ".join(self.modules)
        if self.blocks is None:
            return names
        return f"{names} in block{'s' if len(self.blocks) > 1 else ''} {ranges(self.blocks)}"

    def to_dict(self) -> dict:
        return {"modules": list(self.modules), "blocks": None if self.blocks is None else ranges(self.blocks),
                "count": self.count}


def group_modules(names, labels: dict[str, str] | None = None) -> tuple[ModuleGroup, ...]:
    """Module names as groups of labels sharing the same blocks, in the names' order. `labels` (site -> label, from
    the whole inventory) keeps labels the same across lists; without it they are made from `names` alone."""
    names = list(names)
    labels = labels or _labels({_site(n) for n in names if name_parts(n)[1] is not None})
    blocks_of: dict[str, set[int]] = {}
    outside, count = [], {}
    for name in names:
        block = name_parts(name)[1]
        if block is None:
            outside.append(name)
            continue
        label = labels[_site(name)]
        blocks_of.setdefault(label, set()).add(block)
        count[label] = count.get(label, 0) + 1
    by_blocks: dict[tuple[int, ...], list[str]] = {}
    for label, blocks in blocks_of.items():
        by_blocks.setdefault(tuple(sorted(blocks)), []).append(label)
    groups = [ModuleGroup(tuple(_collapse(members)), blocks, sum(count[m] for m in members))
              for blocks, members in by_blocks.items()]
    if outside:
        groups.append(ModuleGroup(tuple(outside), None, len(outside)))
    return tuple(groups)


def groups_text(groups: tuple[ModuleGroup, ...]) -> str:
    return "; ".join(g.text() for g in groups) or "none"


# ---------------------------------------------------------------- rules as text


def literal_names(pattern: str) -> list[str] | None:
    """The module names a name pattern spells out literally (one name, or an alternation of escaped names), else
    None: such a pattern is shown grouped, not as one long regex."""
    names = []
    for alternative in pattern.split("|"):
        escaped = re.findall(r"\\(.)", alternative)
        if not alternative or any(c.isalnum() for c in escaped) or _META & set(re.sub(r"\\.", "", alternative)):
            return None
        names.append(re.sub(r"\\(.)", r"\1", alternative))
    return names


def selector_text(rule: Rule) -> str:
    """What a rule selects, for a person: "kind=q,k blocks=[0-5, 9]", a literal name list grouped by blocks."""
    parts = []
    if rule.kind:
        parts.append(f"kind={','.join(rule.kind)}")
    if rule.blocks is not None:
        parts.append(f"blocks=[{', '.join(str(b) for b in compact_blocks(rule.blocks))}]")
    if rule.name is not None:
        names = literal_names(rule.name)
        if names is None:
            parts.append(f"name='{rule.name}'")
        elif len(names) == 1:
            parts.append(f"module={names[0]}")
        else:
            parts.append(f"modules=({groups_text(group_modules(names))})")
    return " ".join(parts) or "every module"


def action_text(rule: Rule) -> str:
    if rule.keep:
        return "keep"
    return " + ".join(a for a in (rule.weights.label() if rule.weights else "", rule.prune.label() if rule.prune
                                  else "", f"act int{rule.activation_bits}" if rule.activation_bits else "",
                                  f"kv int{rule.kv_cache_bits}" if rule.kv_cache_bits else "") if a)


# ---------------------------------------------------------------- the explanation


@dataclass(frozen=True)
class RuleExplanation:
    rule: int  # 1-based position in the plan
    action: str
    selector: str
    selected: int  # modules its selectors let through, earlier rules aside
    count: int  # modules it decides: first match
    matched: tuple[ModuleGroup, ...]
    why: str  # each selector in turn, with how many modules pass it
    status: str  # "decides", "partly shadowed", "shadowed" or "selects nothing"
    note: str  # what the status means here, tied weights, the rule's own note

    def to_dict(self) -> dict:
        return {"rule": self.rule, "action": self.action, "selector": self.selector, "selected": self.selected,
                "count": self.count, "matched": [g.to_dict() for g in self.matched],
                "matched_text": groups_text(self.matched), "why": self.why, "status": self.status, "note": self.note}


@dataclass(frozen=True)
class PlanExplanation:
    plan: str
    modules: int  # plannable modules of the model (norms aside, as `resolve`)
    rules: tuple[RuleExplanation, ...]
    unmatched: tuple[ModuleGroup, ...]  # no rule matches them: left as loaded
    unmatched_count: int
    unmatched_note: str = ""

    @property
    def matched_count(self) -> int:
        return sum(r.count for r in self.rules)

    def summary(self) -> str:
        idle = [r.rule for r in self.rules if r.count == 0]
        return (f"{len(self.rules)} rule(s) over {self.modules} modules: {self.matched_count} matched, "
                f"{self.unmatched_count} left as loaded (no rule matches them)"
                + (f"; rule(s) {', '.join(map(str, idle))} decide nothing" if idle else "") + ".")

    def rows(self) -> list[dict]:
        """The table the Plan page shows: one row per rule, then the modules no rule matches."""
        out = [{"rule": str(r.rule), "action": r.action, "selector": r.selector, "count": r.count,
                "matched": groups_text(r.matched) if r.count else "nothing", "note": r.note} for r in self.rules]
        if self.unmatched_count:
            out.append({"rule": "none", "action": "left as loaded", "selector": "no rule matches",
                        "count": self.unmatched_count, "matched": groups_text(self.unmatched),
                        "note": self.unmatched_note})
        return out

    def to_dict(self) -> dict:
        return {"plan": self.plan, "modules": self.modules, "matched": self.matched_count,
                "rules": [r.to_dict() for r in self.rules],
                "unmatched": {"count": self.unmatched_count, "modules": [g.to_dict() for g in self.unmatched],
                              "text": groups_text(self.unmatched), "note": self.unmatched_note}}

    def to_text(self) -> str:
        lines = [f"Plan {self.plan!r}: {self.summary()}" if self.plan else self.summary()]
        for r in self.rules:
            lines.append(f"rule {r.rule}: {r.selector} -> {r.action}: {r.count} module(s)"
                         + (f" ({r.status})" if r.status != "decides" else ""))
            if r.count:
                lines.append(f"  matched: {groups_text(r.matched)}")
            lines.append(f"  why: {r.why}")
            if r.note:
                lines.append(f"  note: {r.note}")
        if self.unmatched_count:
            lines.append(f"no rule: {self.unmatched_count} module(s) left as loaded: {groups_text(self.unmatched)}")
            if self.unmatched_note:
                lines.append(f"  note: {self.unmatched_note}")
        return "\n".join(lines)


def _steps(rule: Rule, rows: list[ModuleInfo], block_count: int) -> list[tuple[str, int]]:
    """Each selector of the rule in turn (kind, blocks, name) with how many modules pass it and those before it;
    the last count is what `Rule.selects` lets through."""
    wanted = {b % block_count for b in rule.blocks} if rule.blocks is not None and block_count else set()
    blocks = ""
    if rule.blocks is not None:
        blocks = f"blocks {', '.join(str(b) for b in compact_blocks(rule.blocks))}"
        if block_count and set(rule.blocks) != wanted:  # negative (or too large) indices count round from the end
            blocks += f" (read as {ranges(wanted)} of 0-{block_count - 1})"
    tests = [(f"kind {', '.join(rule.kind)}", lambda i: i.kind in rule.kind) if rule.kind is not None else None,
             (blocks, lambda i: i.block is not None and i.block in wanted) if rule.blocks is not None else None,
             (f"name '{rule.name}'", lambda i: re.fullmatch(rule.name, i.name) is not None)
             if rule.name is not None else None]
    out, pool = [], rows
    for label, test in filter(None, tests):
        pool = [i for i in pool if test(i)]
        out.append((label, len(pool)))
    return out


def _nothing_reason(steps: list[tuple[str, int]], block_count: int) -> str:
    label, _ = next(s for s in steps if s[1] == 0)
    first = label == steps[0][0]
    where = "no module of this model" if first else "none of the modules before it"
    extra = f" (this model has blocks 0-{block_count - 1})" if label.startswith("blocks") and block_count else ""
    return f"selects nothing: {where} passes {label}{extra}; fix the rule or delete it"


def _tie_notes(table: dict[str, tuple[Rule | None, ModuleInfo]]) -> dict[int | None, list[str]]:
    """A shared (tied) weight follows the earlier of its two modules' rules (as `resolve` applies it): the note goes
    to the rule (None: no rule) that matched the module which follows the other's rule instead."""
    notes: dict[int | None, list[str]] = {}
    for name, (rule, info) in table.items():
        if not info.tied_to or info.tied_to not in table:
            continue
        owner_rule = table[info.tied_to][0]
        deciders = [r for r in (owner_rule, rule) if r is not None]
        if not deciders:
            continue
        decider = min(deciders, key=lambda r: r.index)
        for module, matched, other in ((name, rule, info.tied_to), (info.tied_to, owner_rule, name)):
            if matched is not decider:
                notes.setdefault(matched.index if matched else None, []).append(
                    f"{module} shares its weight with {other}, so rule {decider.index} decides it")
    return notes


def explain(rows: list[ModuleInfo], plan: Plan) -> PlanExplanation:
    """The plan against the model's inventory (`inventory(model)` or the stored rows), first match wins."""
    plannable = [r for r in rows if r.kind != "norm"]
    block_count = max((r.block for r in plannable if r.block is not None), default=-1) + 1
    table = {info.name: (first_match(plan.rules, info, block_count), info) for info in plannable}
    labels = _labels({_site(i.name) for i in plannable if i.block is not None})
    ties = _tie_notes(table)
    out = []
    for rule in plan.rules:
        selected = [i for i in plannable if rule.selects(i, block_count)]
        decided = [i.name for i in selected if table[i.name][0] is rule]
        earlier = sorted({table[i.name][0].index for i in selected if table[i.name][0] is not rule})
        steps = _steps(rule, plannable, block_count)
        why = "; then ".join(f"{label}: {n}" for label, n in steps)
        if len(decided) != len(selected):
            why += f"; not decided by an earlier rule: {len(decided)}"
        earlier_text = f"earlier rule{'s' if len(earlier) > 1 else ''} {', '.join(map(str, earlier))}"
        if not selected:
            status, note = "selects nothing", _nothing_reason(steps, block_count)
        elif not decided:
            status, note = "shadowed", (f"shadowed: the {len(selected)} module(s) it selects are all decided by "
                                        f"{earlier_text} (first match wins); move it up or delete it")
        elif earlier:
            status, note = "partly shadowed", (f"{len(selected) - len(decided)} of the {len(selected)} module(s) it "
                                               f"selects are decided by {earlier_text} (first match wins)")
        else:
            status, note = "decides", ""
        notes = [n for n in [note, *ties.get(rule.index, []), rule.note] if n]
        out.append(RuleExplanation(rule.index, action_text(rule), selector_text(rule), len(selected), len(decided),
                                   group_modules(decided, labels), why, status, "; ".join(notes)))
    left = [name for name, (rule, _) in table.items() if rule is None]
    return PlanExplanation(plan.name, len(plannable), tuple(out), group_modules(left, labels), len(left),
                           "; ".join(ties.get(None, [])))
