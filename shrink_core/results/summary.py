"""The report's first page: the question, the recommendation, and the argument for it in words.

Pure functions over a built `report.Report` (no store, no I/O). The rule, stated once here and in the text it writes:
among the compressed candidates (the reference aside) on the Pareto frontier whose quality value (worst slice, mix or
slice, as the view says) is within the view's limit, recommend the one lowest on the view's x axis (smallest, fastest
or cheapest; ties go to the better quality); the runner-up is the next by the same order. No limit, or nothing within
it: recommend nothing and say so. Every figure keeps its source (measured on what, or projected from what), and each
slice's change carries its 95% interval or the reason there is none.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

import pandas as pd

from shrink_core.evaluation.stats import MIN_INTERVAL_ITEMS
from shrink_core.results import pareto
from shrink_core.results.report import Report, View, beyond_limits, slice_choice, view_slices, x_title

ADJECTIVES = {"memory": "smallest", "latency": "fastest (measured)", "projected": "fastest (projected)",
              "cost": "cheapest"}
INTERVALS = {"ppl_ratio": ("ratio_low", "ratio_high"), "accuracy": ("acc_low", "acc_high")}
NO_CHANGE = {"ppl_ratio": 1.0, "kl": 0.0, "top1_agree": 1.0, "flip_rate": 0.0}  # accuracy: the reference's own value
SUMMARY_STYLE = """.summary{border:2px solid #444;border-radius:6px;padding:0 1.2em 1em;margin:1em 0 2em}
.summary td,.summary th{text-align:left;vertical-align:top}.summary .verdict{font-size:1.15em}
@media print{body{margin:0;max-width:none}.summary{break-after:page;font-size:12px}}"""


@dataclass(frozen=True)
class Choice:
    """A candidate the summary argues about, its figures already in words with their sources."""

    candidate_id: int
    name: str
    size: str
    latency: str
    cost: str
    quality: str


@dataclass(frozen=True)
class Summary:
    question: str
    context: tuple[tuple[str, str], ...]  # (label, text): model, protocol, limit, slices, ranking axis
    rule: str
    verdict: str
    recommended: Choice | None
    runner_up: Choice | None
    focus: str | None  # whose per-slice changes are listed: the recommended one, else the closest to the limit
    slice_lines: tuple[str, ...]
    caveats: tuple[str, ...]
    version: int = 1


def _missing(value) -> bool:
    return value is None or bool(pd.isna(value))


def _is_true(value) -> bool:
    return not _missing(value) and bool(value)


def summary_slices(table: pd.DataFrame, view: View) -> list[str]:
    """The slices the view's quality value is taken over: these are the ones that matter."""
    if view.y == "mix":
        return [s for s, _ in view.weights]
    if view.y == "worst":
        return view_slices(table, view)
    return [view.y]


def ranked(points: pd.DataFrame, higher_is_better: bool) -> pd.DataFrame:
    """The candidates that qualify under the rule, best first: compressed, on the frontier, within the limit; ordered
    by x, ties by the better quality."""
    qualify = points["on_frontier"].map(_is_true) & points["acceptable"].map(_is_true) & (points["kind"] != "reference")
    return points[qualify].sort_values(["x", "y"], ascending=[True, not higher_is_better])


def _over(view: View) -> str:
    return {"worst": "worst slice", "mix": "weighted mix of slices"}.get(view.y, f"quality on slice {view.y}")


def rule_text(view: View) -> str:
    axis = pareto.AXES[view.x]
    return (f"Rule: a compressed candidate (the reference aside) qualifies when it is on the Pareto frontier and its "
            f"{_over(view)} is within the limit; the recommended one is the {ADJECTIVES[view.x]} of those (lowest "
            f"{axis.label} in {axis.unit}, ties to the better quality), the runner-up the next by the same order. "
            "When nothing qualifies, nothing is recommended.")


def _interval_words(metric: str, row: pd.Series) -> str:
    """"95% interval +3.8% to +6.3%", or why there is none."""
    if isinstance(row.get("interval_note"), str):
        return f"no interval: fewer than {MIN_INTERVAL_ITEMS} items (n={int(row['items'])})"
    if metric not in INTERVALS:
        return "no interval for this metric"
    low, high = (row.get(c) for c in INTERVALS[metric])
    if _missing(low) or _missing(high):
        return "no interval recorded"
    if metric == "ppl_ratio":
        return f"95% interval {low - 1:+.1%} to {high - 1:+.1%}"
    return f"95% interval {low:.1%} to {high:.1%}"


def _value_words(metric: str, value: float, baseline: float | None) -> str:
    if metric == "ppl_ratio":
        return f"perplexity {value - 1:+.1%} vs the reference"
    if metric == "accuracy":
        if baseline is None:
            return f"accuracy {value:.1%}"
        return f"accuracy {value:.1%} vs {baseline:.1%} for the reference, {(value - baseline) * 100:+.1f} points"
    if metric == "kl":
        return f"KL to the reference {value:.3g} nats/token"
    if metric == "top1_agree":
        return f"top-1 agreement with the reference {value:.1%}"
    return f"{value:.1%} of answers flipped vs the reference"


def _lead(metric: str, value: float, row: pd.Series, baseline: float | None) -> str:
    """"quality drops", "no clear change" (the interval holds no change) or "no drop"."""
    if baseline is None:
        return "change unknown (no reference on this slice)"
    low, high = (row.get(c) for c in INTERVALS.get(metric, ("-", "-")))
    if not isinstance(row.get("interval_note"), str) and not _missing(low) and not _missing(high) and \
            low <= baseline <= high:
        return "no clear change"
    worse = value < baseline if pareto.METRICS[metric].higher_is_better else value > baseline
    return "quality drops" if worse else "no drop"


def _baseline(table: pd.DataFrame, reference_ids: set, metric: str, slice_id: str) -> float | None:
    if metric in NO_CHANGE:
        return NO_CHANGE[metric]
    rows = table[table["candidate_id"].isin(reference_ids) & (table["slice"] == slice_id)]
    return None if rows.empty or _missing(rows.iloc[0][metric]) else float(rows.iloc[0][metric])


def _row(table: pd.DataFrame, candidate_id: int, slice_id: str) -> pd.Series | None:
    rows = table[(table["candidate_id"] == candidate_id) & (table["slice"] == slice_id)]
    return None if rows.empty else rows.iloc[0]


def _size(c: pd.Series) -> str:
    if _missing(c["memory_bytes"]):
        return "not recorded"
    return f"{float(c['memory_bytes']) / 1e6:,.0f} MB, {c['memory_source']}"


def _latency(c: pd.Series, target: str | None) -> str:
    """Measured where measured (the source names device, runtime, runs); else projected (the source names the model)."""
    if not _missing(c["latency_ms"]):
        return f"{float(c['latency_ms']):.3g} ms/token, {c['latency_source']}"
    if not _missing(c["projected_ms"]):
        return f"{float(c['projected_ms']):.3g} ms/token, {c['projected_source']}"
    return "not measured; " + (f"no projection stored for {target}" if target else
                               "no projection without a hardware target (--target)")


def _cost(c: pd.Series, target: str | None) -> str:
    if not _missing(c["cost_per_million"]):
        return f"${float(c['cost_per_million']):.3g} per million output tokens, {c['cost_source']}"
    return f"not estimated for {target}" if target else "not estimated: no hardware target in this view (--target)"


def _choice(report: Report, point: pd.Series, reference_ids: set) -> Choice:
    view = report.view
    c = report.candidates[report.candidates["id"] == point["candidate_id"]].iloc[0]
    slice_id = point["worst_slice"]
    row = _row(report.table, int(point["candidate_id"]), slice_id) if isinstance(slice_id, str) else None
    if row is None:
        quality = f"{_over(view)} {point['y']:.4g} (no interval for a weighted mix)"
    else:
        baseline = _baseline(report.table, reference_ids, view.metric, slice_id)
        quality = (f"{'worst slice' if view.y == 'worst' else 'slice'} {slice_id}: "
                   f"{_value_words(view.metric, float(row[view.metric]), baseline)} "
                   f"({_interval_words(view.metric, row)})")
    return Choice(int(point["candidate_id"]), str(point["name"]), _size(c), _latency(c, view.target),
                  _cost(c, view.target), quality)


def _slice_line(report: Report, slice_id: str, focus: pd.Series, other: pd.Series | None, reference_ids: set) -> str:
    """One slice in plain words: does quality drop for the focus candidate, by how much, how sure; the runner-up's."""
    view, table = report.view, report.table
    row = _row(table, int(focus["candidate_id"]), slice_id)
    if row is None or _missing(row[view.metric]):
        return f"{slice_id}: {focus['name']} has no result on this slice."
    value, baseline = float(row[view.metric]), _baseline(table, reference_ids, view.metric, slice_id)
    line = (f"{slice_id} ({int(row['items'])} items): {_lead(view.metric, value, row, baseline)} for {focus['name']}: "
            f"{_value_words(view.metric, value, baseline)} ({_interval_words(view.metric, row)})")
    if pareto.acceptable(value, view.limit, view.higher_is_better) is False:
        line += ", beyond the limit"
    if view.y == "worst" and slice_id == focus["worst_slice"]:
        line += "; the worst slice"
    runner = _row(table, int(other["candidate_id"]), slice_id) if other is not None else None
    if runner is not None and not _missing(runner[view.metric]):
        line += (f"; runner-up {other['name']}: {_value_words(view.metric, float(runner[view.metric]), baseline)} "
                 f"({_interval_words(view.metric, runner)})")
    return line + "."


def _sort_key(report: Report, focus: pd.Series, slice_id: str) -> float:
    """Worst first; slices without a result last."""
    row = _row(report.table, int(focus["candidate_id"]), slice_id)
    if row is None or _missing(row[report.view.metric]):
        return float("inf")
    value = float(row[report.view.metric])
    return value if report.view.higher_is_better else -value


def _crosses(view: View, point: pd.Series) -> str | None:
    """The point value is within the limit but its interval reaches past it."""
    low, high = point["y_low"], point["y_high"]
    if view.limit is None or _missing(low) or _missing(high) or not low <= view.limit <= high or low == high:
        return None
    shown = (f"{low - 1:+.1%} to {high - 1:+.1%}" if view.metric == "ppl_ratio" else f"{low:.4g} to {high:.4g}")
    return (f"{point['name']}'s {_over(view)} has a 95% interval of {shown}, which crosses the limit: it is within "
            "the limit at its point value, not with 95% confidence.")


def _not_measured(source) -> str:
    return str(source) if str(source).endswith("not measured") else f"{source}, not measured"


def _figure_caveats(choice: Choice, c: pd.Series) -> list[str]:
    out = []
    if _missing(c["latency_ms"]) and not _missing(c["projected_ms"]):
        out.append(f"{choice.name}'s latency is {_not_measured(c['projected_source'])}: run "
                   "`python -m shrink_core measure` on the deployment hardware to confirm it.")
    elif _missing(c["latency_ms"]):
        out.append(f"{choice.name} has no latency figure: {choice.latency}.")
    if not _missing(c["cost_per_million"]) and not str(c["cost_source"]).startswith("measured"):
        out.append(f"{choice.name}'s cost is {_not_measured(c['cost_source'])}.")
    return out


def caveats(report: Report, chosen: list[pd.Series], choices: list[Choice], slices: list[str]) -> list[str]:
    """What the reader should hold the recommendation against: intervals at the limit, projected or missing figures,
    small slices, candidates beyond limits, candidates not ranked, slices left out of the worst slice."""
    view, table, points = report.view, report.table, report.points
    out = [text for point in chosen if (text := _crosses(view, point))]
    for choice in choices:
        c = report.candidates[report.candidates["id"] == choice.candidate_id].iloc[0]
        out += _figure_caveats(choice, c)
    if len(chosen) == 2 and not any(_missing(p[k]) for p in chosen for k in ("y_low", "y_high")):
        first, second = chosen
        if first["y_low"] <= second["y_high"] and second["y_low"] <= first["y_high"]:
            out.append(f"The 95% intervals of {first['name']} and {second['name']} on their {_over(view)} overlap: "
                       "which of the two is better in quality is not significant.")
    small = table[table["slice"].isin(slices) & table["interval_note"].map(lambda n: isinstance(n, str))]
    for slice_id, rows in small.groupby("slice"):
        out.append(f"Slice {slice_id}: no interval: fewer than {MIN_INTERVAL_ITEMS} items "
                   f"(n={int(rows['items'].min())}); its figures are point estimates, a hint rather than evidence.")
    beyond = beyond_limits(table, {view.metric: view.limit})
    chosen_ids = {int(p["candidate_id"]) for p in chosen}
    for row in beyond[beyond["candidate_id"].isin(chosen_ids)].itertuples():
        out.append(f"{row.name} on {row.slice} is beyond a limit: {row.beyond}.")
    others = sorted(set(beyond.loc[~beyond["candidate_id"].isin(chosen_ids), "name"]))
    if others:
        out.append(f"Beyond the acceptable limits on some slice (see Per-slice results): {', '.join(others)}.")
    unranked = points[(points["kind"] != "reference") & (points["x"].isna() | points["y"].isna())]
    if len(unranked):
        out.append(f"Not ranked, missing a {pareto.AXES[view.x].label} or quality figure (never counted as zero): "
                   f"{', '.join(unranked['name'])}.")
    if view.y == "worst" and not view.slices:
        note = slice_choice(table, view.metric).note()
        if note:
            out.append(f"Slices {note}: the worst slice is taken over the slices every candidate shares.")
    return out


def _verdict(view: View, points: pd.DataFrame, recommended: Choice | None, runner_up: Choice | None,
             focus: pd.Series | None) -> str:
    if view.limit is None:
        return ("No recommendation: this view has no limit, so nothing can be judged acceptable; set one (--limit, "
                "or the constraint line on the Results page).")
    compressed = points[points["kind"] != "reference"]
    if not (compressed["x"].notna() & compressed["y"].notna()).any():
        axis = pareto.AXES[view.x]
        return (f"No recommendation: no compressed candidate has both a {axis.label} figure and a quality figure to "
                "rank; record the missing figures (see the caveats) or choose another x axis.")
    if recommended is None:
        closest = f" The closest is {focus['name']} (see below)." if focus is not None else ""
        return (f"No recommendation: no compressed candidate on the frontier is within the limit "
                f"({pareto.METRICS[view.metric].describe_limit(view.limit)}); keep the reference, or relax the "
                f"limit.{closest}")
    text = (f"Recommended: {recommended.name} (#{recommended.candidate_id}), the {ADJECTIVES[view.x]} compressed "
            "candidate on the frontier within the limit. ")
    if runner_up is None:
        return text + "No runner-up: no other compressed candidate on the frontier is within the limit."
    return text + f"Runner-up: {runner_up.name} (#{runner_up.candidate_id})."


def _context(report: Report, slices: list[str]) -> tuple[tuple[str, str], ...]:
    view, table = report.view, report.table
    devices = ", ".join(sorted({str(d) for d in table["device"].dropna()})) or "no device recorded"
    limit = (pareto.METRICS[view.metric].describe_limit(view.limit) + f", on the {_over(view)}"
             if view.limit is not None else "none set")
    how = {"worst": "the worst of them counts", "mix": "weighted " + ", ".join(f"{s} x{w:g}" for s, w in view.weights)
           }.get(view.y, "this slice alone")
    return (("Model", ", ".join(sorted({str(m) for m in report.candidates["model_spec"]}))),
            ("Protocol", f"{view.budget}, quality evaluated on {devices}"),
            ("Limit", limit),
            ("Slices", f"{', '.join(slices) or 'none'} ({how})"),
            ("Ranked by", x_title(report.candidates, view)))


def summarize(report: Report) -> Summary:
    """The one-page argument of a built report (see the module docstring for the rule)."""
    view, points = report.view, report.points
    slices = summary_slices(report.table, view)
    order = ranked(points, view.higher_is_better) if view.limit is not None else points.iloc[:0]
    chosen = [order.iloc[i] for i in range(min(2, len(order)))]
    reference_ids = set(report.candidates.loc[report.candidates["kind"] == "reference", "id"])
    choices = [_choice(report, p, reference_ids) for p in chosen]
    focus = chosen[0] if chosen else None
    if focus is None:  # nothing qualifies: show how far the best compressed one is
        scored = points[(points["kind"] != "reference") & points["y"].notna()]
        if len(scored):
            focus = scored.sort_values(["y", "x"], ascending=[not view.higher_is_better, True]).iloc[0]
    other = chosen[1] if len(chosen) > 1 else None
    lines = [] if focus is None else [_slice_line(report, s, focus, other, reference_ids) for s in
                                      sorted(slices, key=lambda s: _sort_key(report, focus, s))]
    models = ", ".join(sorted({str(m) for m in report.candidates["model_spec"]}))
    question = (f"Which compressed version of {models} should ship: the {ADJECTIVES[view.x]} one whose {_over(view)} "
                "stays within the limit?")
    return Summary(question, _context(report, slices), rule_text(view),
                   _verdict(view, points, choices[0] if choices else None, choices[1] if len(choices) > 1 else None,
                            focus),
                   choices[0] if choices else None, choices[1] if len(choices) > 1 else None,
                   None if focus is None else str(focus["name"]), tuple(lines),
                   tuple(caveats(report, chosen, choices, slices)))


def summary_html(summary: Summary) -> str:
    """The summary as the first section of the report page (escaped; no scripts, no links)."""
    esc = html.escape
    context = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in summary.context)
    picks = [(label, c) for label, c in (("Recommended", summary.recommended), ("Runner-up", summary.runner_up)) if c]
    choices = ""
    if picks:
        head = "".join(f"<th>{label}: {esc(c.name)} (#{c.candidate_id})</th>" for label, c in picks)
        rows = "".join(f"<tr><th>{what}</th>" + "".join(f"<td>{esc(getattr(c, field))}</td>" for _, c in picks)
                       + "</tr>" for what, field in (("Size", "size"), ("Latency", "latency"), ("Cost", "cost"),
                                                     ("Quality", "quality")))
        choices = f'<table class="choices"><tr><th></th>{head}</tr>{rows}</table>'
    drops = "".join(f"<li>{esc(line)}</li>" for line in summary.slice_lines)
    whose = "for " + ("" if summary.recommended else "the closest, ") + esc(summary.focus or "")
    drops_html = (f"<h3>Where quality drops {whose}</h3><ul>{drops}</ul>" if drops else
                  "<p>No compressed candidate has a quality figure on these slices.</p>")
    caveats = "".join(f"<li>{esc(c)}</li>" for c in summary.caveats) or "<li>None found.</li>"
    return f"""<section class="summary" id="summary"><h2>Summary</h2>
<p><b>Question.</b> {esc(summary.question)}</p><table class="context">{context}</table>
<p class="verdict"><b>{esc(summary.verdict)}</b></p>{choices}
<p class="note">{esc(summary.rule)}</p>{drops_html}
<h3>Caveats</h3><ul>{caveats}</ul></section>"""
