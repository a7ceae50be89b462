"""Results views and the stakeholder report.

A `View` says what to plot (x axis, quality metric, worst slice / one slice / weighted mix, target, budget, limit).
`view_points` and `slice_points` turn the candidate tables into plot points (pure pandas over `shrink_core.results.pareto`);
`write_png` renders the main figure to PNG and `write_pdf` prints a page to PDF, both with Debian's headless Chromium;
the report file itself (the summary first, then these views) is `report_page`. The figure builders live in
`ui/pareto_charts.py`, which imports plotly only (never streamlit), so the CLI and the page draw the same figures.
"""
from __future__ import annotations

import html
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from shrink_core.errors import ShrinkError
from shrink_core.evaluation.stats import ALPHA, MIN_INTERVAL_ITEMS
from shrink_core.results import pareto
from shrink_core.results.candidates import (
    candidates_frame,
    reference_tests,
    slices_frame,
)
from shrink_core.results.store import Store

X_COLUMNS = {"memory": "memory_bytes", "latency": "latency_ms", "projected": "projected_ms", "cost": "cost_per_million"}
X_SOURCES = {"memory": "memory_source", "latency": "latency_source", "projected": "projected_source",
             "cost": "cost_source"}
DEFAULT_LIMITS = {name: metric.default_limit for name, metric in pareto.METRICS.items()}
CHROMIUM = "/usr/bin/chromium"
PPL_NOTE = ("Perplexity is per token: slices with different tokenizations (languages, code) are not comparable side by "
            "side; compare ratios to the reference on the same slice (or bits per byte), not raw perplexities.")


@dataclass(frozen=True)
class View:
    x: str = "memory"  # memory | latency | projected | cost
    y: str = "worst"  # worst | mix | a slice id
    metric: str = "ppl_ratio"
    target: str | None = None  # hardware row for projected latency and cost
    budget: str | None = None
    candidates: tuple[int, ...] | None = None  # None: every candidate
    slices: tuple[str, ...] | None = None  # slices the worst / mix runs over; None: every slice the metric applies to
    weights: tuple[tuple[str, float], ...] = ()  # for y = mix
    limit: float | None = None  # acceptable when the y value is on the good side of this
    batch: int = 1
    version: int = 1

    def __post_init__(self):
        pareto.get_axis(self.x)
        pareto.get_metric(self.metric)
        if self.x in ("projected", "cost") and not self.target:
            raise ShrinkError(f"The x axis '{self.x}' needs a hardware target (e.g. --target h100-sxm).")
        if self.y == "mix" and not self.weights:
            raise ShrinkError("A weighted mix needs slice weights, e.g. en=2,fr=1.")

    @property
    def higher_is_better(self) -> bool:
        return pareto.METRICS[self.metric].higher_is_better


def _text(value, default: str) -> str:
    return default if value is None or pd.isna(value) or value == "" else html.escape(str(value))


def _hover(c: pd.Series, view: View, extra: str) -> str:
    esc = html.escape
    lines = [f"<b>{esc(str(c['name']))}</b> (#{c['id']}, {esc(c['kind'])})", extra,
             f"plan: {esc(str(c['plan_summary']))[:300]}",
             f"parent: {_text(c['parent_name'], '-')}; calibration: {esc(str(c['calibration']))}",
             f"x: {_text(c[X_SOURCES[view.x]], 'missing')}",
             f"{esc(str(view.budget))} protocol; code {esc(str(c['code_version']))}; model {esc(str(c['model_spec']))}"]
    return "<br>".join(line for line in lines if line)


def _values(table: pd.DataFrame, candidate_id: int, metric: str, slices: list[str]) -> dict:
    rows = table[(table["candidate_id"] == candidate_id) & table["slice"].isin(slices)]
    return {r["slice"]: (None if pd.isna(r[metric]) else float(r[metric])) for _, r in rows.iterrows()}


def _interval(table: pd.DataFrame, candidate_id: int, slice_id: str | None, metric: str):
    """(low, high, why there is none) of the y value on one slice."""
    if slice_id is None or metric not in ("ppl_ratio", "accuracy"):
        return None, None, None
    row = table[(table["candidate_id"] == candidate_id) & (table["slice"] == slice_id)]
    if row.empty:
        return None, None, None
    low, high = ("ratio_low", "ratio_high") if metric == "ppl_ratio" else ("acc_low", "acc_high")
    note = row.iloc[0].get("interval_note")
    return row.iloc[0][low], row.iloc[0][high], note if isinstance(note, str) else None


def metric_slices(table: pd.DataFrame, metric: str) -> list[str]:
    """Every slice the metric has a value on (task slices only for a task metric)."""
    data = table.dropna(subset=[metric]) if metric in table else table
    if pareto.METRICS[metric].task_only:
        data = data[data["slice_kind"] == "task"]
    return sorted(data["slice"].unique())


def slice_choice(table: pd.DataFrame, metric: str) -> pareto.SliceChoice:
    """The default worst-slice set (the slices every candidate with a value shares) and the slices left out."""
    data = table[table["slice"].isin(metric_slices(table, metric))].dropna(subset=[metric])
    coverage = {str(name): set(group["slice"]) for name, group in data.groupby("name")}
    return pareto.shared_slices(coverage)


def view_slices(table: pd.DataFrame, view: View) -> list[str]:
    """The slices a view aggregates over: the chosen ones; for the worst slice by default the slices every candidate
    shares (see `slice_choice`), else every slice the metric is defined on."""
    if view.slices:
        return list(view.slices)
    if view.y == "worst":
        shared = slice_choice(table, view.metric).shared
        if shared:
            return list(shared)
    return metric_slices(table, view.metric)


def _x_values(candidates: pd.DataFrame, view: View) -> pd.Series:
    values = candidates[X_COLUMNS[view.x]].astype(float)
    return values / 1e6 if view.x == "memory" else values


def view_points(candidates: pd.DataFrame, table: pd.DataFrame, view: View) -> pd.DataFrame:
    """One point per candidate: x, the aggregated y with its interval, frontier membership and acceptability."""
    if view.candidates:
        candidates = candidates[candidates["id"].isin(view.candidates)]
    slices = view_slices(table, view)
    xs = _x_values(candidates, view)
    out = []
    for (_, c), x in zip(candidates.iterrows(), xs):
        values = _values(table, c["id"], view.metric, slices)
        worst = None
        if view.y == "worst":
            worst, y = pareto.worst_slice(values, slices, view.higher_is_better)
            detail = f"worst slice: {worst}" if worst else f"missing on some of: {', '.join(slices)}"
        elif view.y == "mix":
            y = pareto.weighted_mix(_values(table, c["id"], view.metric, [s for s, _ in view.weights]),
                                    dict(view.weights))
            detail = "weighted mix of " + ", ".join(f"{s}x{w:g}" for s, w in view.weights)
        else:
            y, worst = values.get(view.y), view.y
            detail = f"slice {view.y}"
        low, high, note = _interval(table, c["id"], worst, view.metric)
        value = "missing" if y is None else f"{y:.4g}"
        if note:
            detail += f"; {note}"
        out.append({"candidate_id": c["id"], "name": c["name"], "kind": c["kind"], "x": x, "y": y, "y_low": low,
                    "y_high": high, "interval_note": note, "worst_slice": worst,
                    "hover": _hover(c, view, f"{pareto.METRICS[view.metric].label}: {value} ({detail})")})
    points = pd.DataFrame(out, columns=["candidate_id", "name", "kind", "x", "y", "y_low", "y_high", "interval_note",
                                        "worst_slice", "hover"])
    return _mark(points, view)


def slice_points(candidates: pd.DataFrame, table: pd.DataFrame, view: View) -> pd.DataFrame:
    """One point per (candidate, slice) with a frontier per slice, for the small multiples."""
    frames = []
    for slice_id in metric_slices(table, view.metric):
        one = View(**{**asdict(view), "y": slice_id, "slices": None, "weights": ()})
        points = view_points(candidates, table, one)
        points["slice"] = slice_id
        frames.append(points)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["candidate_id", "name", "x", "y", "slice", "on_frontier", "acceptable", "hover"])


def _mark(points: pd.DataFrame, view: View) -> pd.DataFrame:
    points = points.copy()
    points["x"] = points["x"].astype(float)
    points["y"] = pd.to_numeric(points["y"], errors="coerce").astype(float)
    points["y_low"] = pd.to_numeric(points["y_low"], errors="coerce").astype(float)
    points["y_high"] = pd.to_numeric(points["y_high"], errors="coerce").astype(float)
    points["on_frontier"] = pareto.frontier_mask(points["x"].tolist(), points["y"].tolist(), view.higher_is_better)
    points["acceptable"] = [pareto.acceptable(y, view.limit, view.higher_is_better) for y in points["y"]]
    return points


def x_title(candidates: pd.DataFrame, view: View) -> str:
    """The x axis title, saying how the figure was obtained."""
    axis = pareto.AXES[view.x]
    sources = sorted({str(s) for s in candidates[X_SOURCES[view.x]].dropna()})
    if view.x == "latency":
        devices = sorted({s.split(",")[0].removeprefix("measured on ") for s in sources})
        how = f"measured on {', '.join(devices)}" if devices else "not measured yet"
    elif view.x == "projected":
        how = f"projected for {view.target}"
    elif view.x == "cost":
        how = f"{'measured' if any(s.startswith('measured') for s in sources) else 'projected'} for {view.target}"
    else:
        how = "; ".join(sources) or "no size recorded"
    return f"{axis.label} ({axis.unit}), {how}"


def y_title(table: pd.DataFrame, view: View) -> str:
    label = pareto.METRICS[view.metric].label
    devices = sorted({str(d).split(" (")[0] for d in table["device"].dropna()}) if len(table) else []
    where = f"{view.budget} protocol, measured on {', '.join(devices)}" if devices else f"{view.budget} protocol"
    if view.y == "worst":
        return f"{label}, worst slice ({where})"
    if view.y == "mix":
        return f"{label}, weighted mix ({where})"
    return f"{label} on {view.y} ({where})"


def limit_label(view: View) -> str:
    if view.limit is None:
        return ""
    return "acceptable: " + pareto.METRICS[view.metric].describe_limit(view.limit)


def _show(metric: str, value: float) -> str:
    label = pareto.METRICS[metric].label.split(" (")[0]
    return f"perplexity {value - 1:+.0%}" if metric == "ppl_ratio" else f"{label} {value:.3g}"


def beyond_limits(table: pd.DataFrame, limits: dict[str, float | None] | None = None) -> pd.DataFrame:
    """Rows of the per-slice table (references aside) on the wrong side of a metric's limit, one row per
    (candidate, slice) with every metric it breaks; limits default to each metric's default limit."""
    limits = {**DEFAULT_LIMITS, **(limits or {})}
    out = []
    for _, row in table[table["kind"] != "reference"].sort_values(["name", "slice"]).iterrows():
        broken = [f"{_show(m, float(row[m]))} (limit: {pareto.METRICS[m].describe_limit(limit)})"
                  for m, limit in limits.items() if m in row and limit is not None
                  and pareto.acceptable(row[m], limit, pareto.METRICS[m].higher_is_better) is False]
        if broken:
            out.append({"candidate_id": row["candidate_id"], "name": row["name"], "slice": row["slice"],
                        "beyond": "; ".join(broken)})
    return pd.DataFrame(out, columns=["candidate_id", "name", "slice", "beyond"])


def method_notes(candidates: pd.DataFrame, table: pd.DataFrame, view: View) -> list[str]:
    notes = [f"Quality: {pareto.METRICS[view.metric].label}; {view.budget} protocol; evaluated on "
             f"{', '.join(sorted(table['device'].dropna().unique())) or 'no device'}; intervals are 95% bootstrap over "
             "items (ratios to the reference: a paired bootstrap when both were scored on the same items). A slice "
             f"scored on fewer than {MIN_INTERVAL_ITEMS} items gets no interval (its row says so): the bootstrap "
             "cannot find the tails of so few.",
             "Paired tests: a bootstrap over items for NLL, an exact McNemar test for accuracy, both against the "
             f"candidate's reference on the same items. Significant: a p-value below {ALPHA:g} after a Holm-Bonferroni "
             "adjustment over all of that candidate's tests on the slices shown; both raw and adjusted p-values are "
             "listed. A bootstrap p-value is never below 1/(resamples + 1).",
             "Worst slice: by default over the slices every candidate was evaluated on; a candidate missing any of "
             "the chosen slices has no worst-slice value and is not plotted.",
             PPL_NOTE,
             "Frontier: a candidate is on it when no other is at most as large/slow/costly and at least as good, "
             "and strictly better on one of the two. It uses point values: where intervals overlap, the order is not "
             "significant (see the paired tests)."]
    for column, what in (("memory_source", "Size"), ("latency_source", "Latency"), ("projected_source", "Projection"),
                         ("cost_source", "Cost")):
        if column in ("projected_source", "cost_source") and not view.target:
            notes.append(f"{what}: for a hardware target; choose the x axis 'latency (projected)' or 'cost' "
                         "(--x projected / cost --target NAME).")
            continue
        sources = sorted({str(s) for s in candidates[column].dropna()})
        notes.append(f"{what}: " + ("; ".join(sources) if sources else "not recorded for these candidates (missing, "
                                                                       "not zero)") + ".")
    return notes


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class Report:
    view: View
    candidates: pd.DataFrame = field(repr=False)
    table: pd.DataFrame = field(repr=False)
    points: pd.DataFrame = field(repr=False)
    per_slice: pd.DataFrame = field(repr=False)
    created: float = 0.0
    tests: pd.DataFrame | None = field(default=None, repr=False)  # paired tests vs the reference, Holm-adjusted


def build_report(store: Store, view: View) -> Report:
    from shrink_core.results.candidates import budgets

    if view.budget is None:
        found = budgets(store)
        if not found:
            raise ShrinkError("No evaluated candidates in the store yet; run `python -m shrink_core eval --plan ...` first.")
        view = View(**{**asdict(view), "budget": found[0]})
    candidates = candidates_frame(store, target=view.target, batch=view.batch)
    table = slices_frame(store, view.budget)
    if view.candidates:
        unknown = set(view.candidates) - set(candidates["id"])
        if unknown:
            raise ShrinkError(f"No candidate with id {sorted(unknown)[0]}; see `python -m shrink_core candidates list`.")
        candidates = candidates[candidates["id"].isin(view.candidates)]
        table = table[table["candidate_id"].isin(view.candidates)]
    if table.empty:
        raise ShrinkError(f"None of these candidates has results at the '{view.budget}' protocol.")
    if view.y not in ("worst", "mix") and view.y not in set(table["slice"]):
        raise ShrinkError(f"No results on slice '{view.y}'; choose one of: {', '.join(sorted(set(table['slice'])))}.")
    tests = reference_tests(store, view.budget, [int(i) for i in candidates["id"]])
    return Report(view, candidates, table, view_points(candidates, table, view), slice_points(candidates, table, view),
                  time.time(), tests)


def figures(report: Report):
    """(main figure, small multiples) for a report."""
    from shrink_core.results.figures import pareto_figure, small_multiples

    view = report.view
    xt, yt = x_title(report.candidates, view), y_title(report.table, view)
    main = pareto_figure(report.points, xt, yt, view.higher_is_better, view.limit, limit_label(view),
                         title="Quality vs " + pareto.AXES[view.x].label)
    multiples = small_multiples(report.per_slice, xt, pareto.METRICS[view.metric].label, view.higher_is_better,
                                view.limit, title="Per slice: the same frontier on every slice")
    return main, multiples


def view_sentence(view: View) -> str:
    """The view in words: what is plotted against what, over which slices, with which limit."""
    metric = pareto.METRICS[view.metric]
    over = {"worst": "worst slice", "mix": "weighted mix of " + ", ".join(f"{s} x{w:g}" for s, w in view.weights)
            }.get(view.y, f"slice {view.y}")
    if view.y == "worst":
        over += " over " + (", ".join(view.slices) if view.slices else "the slices every candidate shares")
    axis = pareto.AXES[view.x]
    parts = [f"{metric.label} ({over}) against {axis.label} ({axis.unit})", f"{view.budget} protocol"]
    if view.target:
        parts.append(f"target {view.target}")
    parts.append("acceptable: " + metric.describe_limit(view.limit) if view.limit is not None else "no limit line")
    return "; ".join(parts)


def figure_page(figure, width: int = 1200, height: int = 700) -> str:
    """A page holding only `figure` at a fixed size, no mode bar: what the PNG export screenshots."""
    figure = figure.update_layout(width=width, height=height)
    return figure.to_html(full_html=True, include_plotlyjs=True, config={"staticPlot": True, "displayModeBar": False})


def _chromium(page: str, path: Path | str, what: str, output_flag: str, flags: list[str], timeout: float) -> Path:
    """Loads `page` (self-contained HTML) in headless Chromium, which writes the PNG or PDF to the file given to
    `output_flag`; copies it to `path`. Every failure is one ShrinkError sentence: what is wrong, how to fix it."""
    path = Path(path)
    instead = "or share the HTML report instead"
    if not shutil.which(CHROMIUM):
        raise ShrinkError(f"{what} export needs Debian's chromium at {CHROMIUM}; install it (apt-get install chromium) "
                          f"{instead}.")
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "page.html", Path(tmp) / f"out.{what.lower()}"
        source.write_text(page, encoding="utf-8")
        command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   "--disable-background-networking", f"--user-data-dir={tmp}/profile", "--virtual-time-budget=10000",
                   f"{output_flag}={out}", *flags, source.as_uri()]
        try:  # its own session, so a hung Chromium is killed with the renderers it started
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       start_new_session=True)
        except OSError as exc:
            raise ShrinkError(f"Chromium at {CHROMIUM} could not start ({exc.strerror or exc}); reinstall it "
                              f"(apt-get install --reinstall chromium) {instead}.") from None
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise ShrinkError(f"Chromium did not finish the {what} within {timeout:g} s; retry when the machine is "
                              f"less busy {instead}.") from None
        if not out.exists() or out.stat().st_size == 0:
            raise ShrinkError(f"Chromium exited with status {code} without writing the {what}; check that "
                              f"`{CHROMIUM} --headless --no-sandbox --version` runs on this machine, {instead}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, path)
    return path


def write_png(figure, path: Path | str, width: int = 1200, height: int = 700, timeout: float = 60) -> Path:
    """The figure as a PNG for slides, rendered by headless Chromium from its self-contained HTML (no kaleido)."""
    return _chromium(figure_page(figure, width, height), path, "PNG", "--screenshot",
                     [f"--window-size={width},{height}"], timeout)


def write_pdf(page: str, path: Path | str, timeout: float = 120) -> Path:
    """The report page as a PDF (the summary on page 1), printed by headless Chromium with no header or footer."""
    return _chromium(page, path, "PDF", "--print-to-pdf", ["--no-pdf-header-footer"], timeout)
