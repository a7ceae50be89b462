"""Pareto figures: the main frontier plot and the per-slice small multiples. DataFrames in, Plotly figures out.

No streamlit here (the report export in `shrink_core.results.report` builds the same figures outside the app). Points come
from `shrink_core.results.report.view_points` / `slice_points`: candidate_id, name, x, y, y_low, y_high, on_frontier,
acceptable, hover, and interval_note (why a point has no interval, shown in place of its error bar).
"""
from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from shrink_core.results import pareto

DIMMED = "rgba(140, 140, 140, 0.35)"
ACCEPT_FILL = "rgba(46, 160, 67, 0.10)"


def _palette(names: list[str]) -> dict[str, str]:
    colors = qualitative.Plotly + qualitative.D3
    return {name: colors[i % len(colors)] for i, name in enumerate(sorted(set(names)))}


def _errors(data: pd.DataFrame) -> dict | None:
    if "y_low" not in data or data["y_low"].isna().all():
        return None
    return dict(type="data", symmetric=False, array=(data["y_high"] - data["y"]).fillna(0).tolist(),
                arrayminus=(data["y"] - data["y_low"]).fillna(0).tolist(), thickness=1.2, width=4)


def _frontier_line(data: pd.DataFrame, higher_is_better: bool) -> pd.DataFrame:
    return data.iloc[pareto.frontier_path(data["x"].tolist(), data["y"].tolist(), higher_is_better)]


def _text_sides(group: pd.DataFrame, shown: pd.DataFrame) -> list[str]:
    """Labels to the right of a point, except near the right edge where they would be clipped."""
    low, high = shown["x"].min(), shown["x"].max()
    edge = low + 0.75 * (high - low) if high > low else math.inf
    return ["top left" if x > edge else "top right" for x in group["x"]]


def _constraint(fig, limit: float | None, higher_is_better: bool, ys: list[float], row=None, col=None) -> None:
    if limit is None or not ys:
        return
    low, high = min(ys + [limit]), max(ys + [limit])
    pad = (high - low) * 0.15 or abs(limit) * 0.05 or 0.05
    y0, y1 = (limit, high + pad) if higher_is_better else (low - pad, limit)
    where = {} if row is None else {"row": row, "col": col}
    fig.add_hrect(y0=y0, y1=y1, fillcolor=ACCEPT_FILL, line_width=0, layer="below", **where)
    fig.add_hline(y=limit, line_dash="dash", line_color="rgb(46, 160, 67)", **where)


def pareto_figure(points: pd.DataFrame, x_title: str, y_title: str, higher_is_better: bool,
                  limit: float | None = None, limit_label: str = "", title: str = "", log_x: bool = False):
    """Frontier candidates in colour joined by the frontier line, dominated ones dimmed, 95% intervals as error
    bars, the acceptable region shaded; hover shows the plan and provenance."""
    shown = points.dropna(subset=["x", "y"])
    fig = go.Figure()
    line = _frontier_line(shown, higher_is_better)
    if len(line) > 1:
        fig.add_trace(go.Scatter(x=line["x"], y=line["y"], mode="lines", name="Pareto frontier",
                                 line=dict(color="rgb(31, 119, 180)", width=2, shape="hv"), hoverinfo="skip"))
    colors = _palette(shown["name"].tolist())
    for on, group in ((False, shown[~shown["on_frontier"]]), (True, shown[shown["on_frontier"]])):
        if group.empty:
            continue
        fig.add_trace(go.Scatter(
            x=group["x"], y=group["y"], mode="markers+text", text=group["name"], textposition=_text_sides(group, shown),
            name="on the frontier" if on else "dominated", customdata=group[["hover"]].to_numpy(),
            hovertemplate="%{customdata[0]}<extra></extra>", error_y=_errors(group),
            marker=dict(size=13 if on else 10, color=[colors[n] for n in group["name"]] if on else DIMMED,
                        line=dict(width=1, color="white")),
            textfont=dict(color="black" if on else "gray"), opacity=1.0 if on else 0.55, cliponaxis=False))
    ys = [v for v in pd.concat([shown["y"], shown.get("y_low", pd.Series(dtype=float)),
                                shown.get("y_high", pd.Series(dtype=float))]).dropna().tolist() if math.isfinite(v)]
    _constraint(fig, limit, higher_is_better, ys)
    if limit is not None and limit_label:
        fig.add_annotation(xref="paper", x=1, y=limit, text=limit_label, showarrow=False, xanchor="right",
                           yanchor="bottom", font=dict(color="rgb(46, 160, 67)"))
    bare = shown[shown["interval_note"].notna()] if "interval_note" in shown else shown.iloc[:0]
    if len(bare):  # say why a point has no error bar, where the bar would have been
        fig.add_annotation(xref="paper", yref="paper", x=0, y=1.02, showarrow=False, xanchor="left", yanchor="bottom",
                           text="no interval: " + "; ".join(f"{n} ({note})" for n, note in
                                                            zip(bare["name"].astype(str), bare["interval_note"])),
                           font=dict(size=11, color="gray"))
    missing = points[points["x"].isna() | points["y"].isna()]
    if len(missing):
        fig.add_annotation(xref="paper", yref="paper", x=1, y=1.02, showarrow=False, xanchor="right", yanchor="bottom",
                           text="not plotted (missing figure): " + ", ".join(missing["name"].astype(str)),
                           font=dict(size=11, color="gray"))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, height=540,
                      legend=dict(orientation="h", yanchor="top", y=-0.2), margin=dict(t=60, b=120, r=110),
                      hoverlabel=dict(align="left"))  # the legend below the x axis title, not over it
    if log_x:
        fig.update_xaxes(type="log")
    else:  # sizes, latencies and costs start at 0; with nothing to plot, 0..1 rather than plotly's -1..6
        fig.update_xaxes(rangemode="tozero", **({} if len(shown) else {"range": [0, 1]}))
    return fig


def small_multiples(points: pd.DataFrame, x_title: str, y_title: str, higher_is_better: bool,
                    limit: float | None = None, columns: int = 4, title: str = ""):
    """The same frontier for every slice side by side; a candidate keeps its colour in every panel, so one that
    wins on one slice and collapses on another stands out."""
    slices = sorted(points["slice"].unique())
    cols = max(1, min(columns, len(slices)))
    rows = max(1, math.ceil(len(slices) / cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=slices, horizontal_spacing=0.06,
                        vertical_spacing=0.12 if rows > 1 else 0.1)
    colors = _palette(points["name"].tolist())
    legend_done: set[str] = set()
    for index, slice_id in enumerate(slices):
        row, col = index // cols + 1, index % cols + 1
        data = points[points["slice"] == slice_id].dropna(subset=["x", "y"])
        line = _frontier_line(data, higher_is_better)
        if len(line) > 1:
            fig.add_trace(go.Scatter(x=line["x"], y=line["y"], mode="lines", showlegend=False, hoverinfo="skip",
                                     line=dict(color="rgb(31, 119, 180)", width=1.5, shape="hv")), row=row, col=col)
        for _, p in data.iterrows():
            name = str(p["name"])
            fig.add_trace(go.Scatter(
                x=[p["x"]], y=[p["y"]], mode="markers", name=name, legendgroup=name,
                showlegend=name not in legend_done, customdata=[[p["hover"]]],
                hovertemplate="%{customdata[0]}<extra></extra>",
                marker=dict(size=11 if p["on_frontier"] else 8, color=colors[name],
                            opacity=1.0 if p["on_frontier"] else 0.35,
                            symbol="circle" if p["on_frontier"] else "circle-open")), row=row, col=col)
            legend_done.add(name)
        ys = [v for v in data["y"].tolist() if math.isfinite(v)]
        _constraint(fig, limit, higher_is_better, ys, row=row, col=col)
    fig.update_layout(title=title, height=300 * rows + 110, margin=dict(t=80, b=90))
    fig.update_xaxes(rangemode="tozero", **({} if points["x"].notna().any() else {"range": [0, 1]}))
    fig.add_annotation(xref="paper", yref="paper", x=0.5, y=0, yshift=-45, yanchor="top", showarrow=False,
                       text=f"x: {x_title}   y: {y_title}", font=dict(size=12))
    return fig
