"""The report file: one self-contained HTML page (the summary's one-page argument first, then the Pareto figures with
plotly.js inlined, per-slice tables with intervals, paired tests, sizes, plans and provenance), optionally with the
main figure as PNG and the page as PDF (`report.write_png` / `write_pdf`, headless Chromium).

Kept apart from `report` (the views: points, titles, limits, figures) so that `summary`, which argues from those views,
and this page, which shows the summary, import in one direction only.
"""
from __future__ import annotations

import html
import time
from pathlib import Path

import pandas as pd

from shrink_core import __version__
from shrink_core.evaluation.stats import ALPHA
from shrink_core.results.candidates import calibration_summary, get_candidate, plan_lines, provenance
from shrink_core.results.report import (
    PPL_NOTE,
    Report,
    View,
    beyond_limits,
    build_report,
    figures,
    method_notes,
    view_sentence,
    write_pdf,
    write_png,
)
from shrink_core.results.store import Store
from shrink_core.results.summary import SUMMARY_STYLE, summarize, summary_html


def _interval_cell(row: pd.Series, low: str, high: str, value: str) -> str:
    """"[low, high]", or why there is no interval where it would have been ("n=3 items: too few ...")."""
    if isinstance(row.get("interval_note"), str):
        return row["interval_note"]
    if pd.isna(row[value]):
        return "missing"
    if pd.isna(row[low]) or pd.isna(row[high]):
        return "no interval recorded"
    return f"[{row[low]:.4g}, {row[high]:.4g}]"


def interval_table(table: pd.DataFrame) -> pd.DataFrame:
    """The per-slice table of the report: each 95% interval as one cell, or the reason there is none."""
    frame = table.sort_values(["slice", "name"])
    intervals = {"ppl 95%": ("ppl_low", "ppl_high", "ppl"), "ppl_ratio 95%": ("ratio_low", "ratio_high", "ppl_ratio"),
                 "accuracy 95%": ("acc_low", "acc_high", "accuracy")}
    out = frame[["name", "slice", "items", "ppl"]].copy()
    out["ppl 95%"] = [_interval_cell(r, *intervals["ppl 95%"]) for _, r in frame.iterrows()]
    out["ppl_ratio"] = frame["ppl_ratio"]
    out["ppl_ratio 95%"] = [_interval_cell(r, *intervals["ppl_ratio 95%"]) for _, r in frame.iterrows()]
    for column in ("kl", "kl_p99", "top1_agree", "accuracy"):
        out[column] = frame[column]
    out["accuracy 95%"] = [_interval_cell(r, *intervals["accuracy 95%"]) if pd.notna(r["accuracy"]) else "missing"
                           for _, r in frame.iterrows()]
    out["flips_total"] = frame["flips_total"]
    return out


PAGE_STYLE = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1200px;
color:#222}table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ddd;padding:3px 6px;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}pre{background:#f7f7f7;
padding:1em;overflow-x:auto;font-size:12px}.note{color:#555}"""


def _table_html(frame: pd.DataFrame) -> str:
    frame = frame.astype(object).where(frame.notna(), "missing")
    return frame.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, escape=True)


def render_html(report: Report, store: Store) -> str:
    """One self-contained HTML page: the summary first, then interactive figures (plotly.js inlined), tables, plans,
    provenance, notes."""
    main, multiples = figures(report)
    config = {"displaylogo": False, "responsive": True}
    main_html = main.to_html(full_html=False, include_plotlyjs=True, config=config, div_id="pareto-main")
    multiples_html = multiples.to_html(full_html=False, include_plotlyjs=False, config=config,
                                       div_id="pareto-slices")
    per_slice = interval_table(report.table)
    tests = report.tests if report.tests is not None else pd.DataFrame()
    tests_html = (_table_html(tests.drop(columns=["candidate_id"], errors="ignore")) if len(tests) else
                  "<p>No candidate has a reference scored on the same slices with this protocol.</p>")
    sizes = report.candidates[["id", "name", "kind", "weight_format", "memory_bytes", "latency_ms", "projected_ms",
                               "cost_per_million", "memory_source", "latency_source", "projected_source"]].copy()
    sizes.insert(3, "weights (MB)", [_megabytes(b) for b in sizes.pop("memory_bytes")])
    sizes = sizes.rename(columns={"latency_ms": "measured ms/token", "projected_ms": "projected ms/token",
                                  "cost_per_million": "$ per M output tokens"})
    plans, sources = [], []
    for cid, name in zip(report.candidates["id"], report.candidates["name"]):
        rules = "".join(f"<li>{html.escape(line)}</li>" for line in plan_lines(get_candidate(store, int(cid))["plan"]))
        plans.append(f"<h3>{html.escape(str(name))} (#{cid})</h3><ul>{rules}</ul>")
        sources.append(_provenance_row(provenance(store, int(cid))))
    esc = html.escape
    view = view_sentence(report.view)
    notes = "".join(f"<li>{esc(n)}</li>" for n in method_notes(report.candidates, report.table, report.view))
    beyond = beyond_limits(report.table, {report.view.metric: report.view.limit})
    beyond_html = (f"<p><b>{beyond['name'].nunique()} candidate(s) beyond the acceptable limits:</b></p>"
                   + _table_html(beyond.drop(columns=["candidate_id"])) if len(beyond)
                   else "<p>Every candidate is within the acceptable limits on every slice.</p>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>shrink report</title><style>{PAGE_STYLE}{SUMMARY_STYLE}</style>
</head><body>
<h1>shrink: compression candidates</h1>
<p class="note">Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(report.created))} by shrink {esc(__version__)};
{esc(view)}.</p>
{summary_html(summarize(report))}
<h2>Pareto frontier</h2>{main_html}
<h2>Per slice</h2>{multiples_html}
<h2>Per-slice results</h2><p class="note">{esc(PPL_NOTE)}</p>{beyond_html}{_table_html(per_slice)}
<h2>Paired tests against the reference</h2>
<p class="note">Raw p-values and Holm-adjusted ones (over each candidate's tests on the slices shown);
significant = an adjusted p-value below {ALPHA:g}.</p>{tests_html}
<h2>Size, latency, cost</h2>{_table_html(sizes)}
<h2>Method notes</h2><ul>{notes}</ul>
<h2>Plans</h2>{''.join(plans)}
<h2>Provenance</h2>{_table_html(pd.DataFrame(sources))}
</body></html>"""


def _megabytes(value) -> float | None:
    return None if value is None or pd.isna(value) else round(float(value) / 1e6, 1)


def _provenance_row(record: dict) -> dict:
    """One candidate's provenance as readable cells (no raw dicts)."""
    c = record["candidate"]
    kinds: dict[str, int] = {}
    for r in record["results"]:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    devices = sorted({str(r["device"]) for r in record["results"] if r.get("device")})
    return {"id": c["id"], "name": c["name"], "kind": c["kind"], "model": c["model_spec"],
            "weights hash": str(c["weights_hash"])[:12], "code version": c["code_version"],
            "lineage": " <- ".join(f"{p['name']} (#{p['id']})" for p in record["lineage"]) or "-",
            "calibration": calibration_summary(record["calibration"]),
            "results": ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "none",
            "devices": ", ".join(devices) or "-",
            "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(c["created"])) if c.get("created") else "-"}


def write_report(store: Store, view: View, out: Path | str, png: Path | str | None = None,
                 pdf: Path | str | None = None) -> dict:
    """Writes the HTML report (and optionally the main figure's PNG and the page as a PDF); returns what was written,
    with the summary's recommendation and runner-up (None when nothing is within the limit)."""
    report = build_report(store, view)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = render_html(report, store)
    out.write_text(page, encoding="utf-8")
    summary = summarize(report)
    written = {"html": str(out), "candidates": [int(i) for i in report.candidates["id"]],
               "recommended": summary.recommended.name if summary.recommended else None,
               "runner_up": summary.runner_up.name if summary.runner_up else None, "verdict": summary.verdict,
               "budget": report.view.budget, "frontier": [str(n) for n in report.points.loc[
                   report.points["on_frontier"], "name"]],
               "not_plotted": [str(n) for n in report.points.loc[
                   report.points["x"].isna() | report.points["y"].isna(), "name"]]}
    if png:
        written["png"] = str(write_png(figures(report)[0], png))
    if pdf:
        written["pdf"] = str(write_pdf(page, pdf))
    return written
