"""Sensitivity figures (Plotly only, no streamlit): the page and the report draw the same ones.

Records are a DataFrame with columns module, block, kind, setting, slice, metric, value, method and, when known,
the scan depth.
A module heatmap is a full block x kind grid: one row per block, one column per kind, every one labelled, the axes
fixed to the grid (no padding rows), and cells that were not probed (an exhaustive scan samples modules) left blank
and named as missing in the hover. Over the colours lies an invisible marker per cell, so a click selects a module
(st.plotly_chart on_select); the selected cell gets an outline.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import sequential

KIND_ORDER = ["q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "linear"]
METRIC_NAMES = {"kl": "KL", "dnll": "ΔNLL"}
METRIC_LABELS = {"kl": "KL(reference || perturbed), nats/token", "dnll": "ΔNLL, nats/token"}
# Inferno, except its first colour: Streamlit's front end replaces #000001..#000010 (its chart colour placeholders)
# with theme colours, which painted the lowest scores pink; #03020c looks the same and is left alone.
COLORSCALE = [[i / (len(sequential.Inferno) - 1), c] for i, c in enumerate(["#03020c"] + sequential.Inferno[1:])]
MISSING_COLOR = "#e9e9ee"  # the plot background: what a cell with no score shows
ROW_PX = 22  # one block row; 30 blocks + title and axis labels fit a 1000 px tall window


def grid(records: pd.DataFrame) -> tuple[list[int], list[str]]:
    """The block x kind grid of a model's scored modules (every block from 0 to the last, kinds in KIND_ORDER)."""
    inside = records[records["block"] >= 0]
    if inside.empty:
        return [], []
    kinds = set(inside["kind"])
    ordered = [k for k in KIND_ORDER if k in kinds] + sorted(kinds - set(KIND_ORDER))
    return list(range(int(inside["block"].max()) + 1)), ordered


def _log_color(values: np.ndarray) -> np.ndarray:
    """log10 of the magnitude, so values spanning decades stay readable (the hover shows the exact value)."""
    return np.log10(np.maximum(np.abs(values), 1e-9))


def _cells(color: np.ndarray) -> list[list[float | None]]:
    """Plain lists with None for a missing cell (a gap), so the figure's JSON reads as a table, not base64."""
    return [[float(v) if np.isfinite(v) else None for v in row] for row in color]


def _colorbar(z: np.ndarray, metric: str) -> dict:
    """A colour bar in the metric's own units (ticks at powers of ten, and at 2x and 5x, or every digit, when few
    decades are shown) under a two-line title that fits its width."""
    finite = [v for row in z for v in row if v is not None and np.isfinite(v)]
    low, high = (min(finite), max(finite)) if finite else (-3.0, 0.0)
    steps = (1,) if high - low > 2 else (1, 2, 5) if high - low > 1 else range(1, 10)
    ticks = [e + math.log10(m) for e in range(math.floor(low), math.ceil(high) + 1) for m in steps
             if low <= e + math.log10(m) <= high]
    return dict(title=dict(text=f"|{METRIC_NAMES.get(metric, metric)}|<br>nats/token", side="top"),
                tickvals=ticks, ticktext=[f"{10 ** t:.2g}" for t in ticks], thickness=14, len=1.0, y=0.5,
                yanchor="middle")


def _block_range(blocks: list[int]) -> list[float] | None:
    """Reversed (block 0 on top) and exactly the grid: no padding rows above or below."""
    return [max(blocks) + 0.5, min(blocks) - 0.5] if blocks else None


def _provenance(row: pd.Series) -> str:
    depth = f", {row['depth']} depth" if isinstance(row.get("depth"), str) and row.get("depth") else ""
    return f"{row['method']}, {row['setting']}, slice {row['slice']}{depth}"


def module_heatmap(records: pd.DataFrame, title: str, metric: str, blocks: list[int] | None = None,
                   kinds: list[str] | None = None, selected: str | None = None) -> go.Figure:
    """Blocks (rows) x module kinds (columns) for one slice, setting, metric and method, on the full grid."""
    data = records[records["block"] >= 0]
    if blocks is None or kinds is None:
        blocks, kinds = grid(data)
    cells = {(int(r.block), r.kind): r for r in data.itertuples(index=False)}
    names = dict(zip(zip(data["block"].astype(int), data["kind"]), data["module"]))
    z = np.full((len(blocks), len(kinds)), np.nan)
    points = []
    name = METRIC_NAMES.get(metric, metric)
    for i, block in enumerate(blocks):
        for j, kind in enumerate(kinds):
            record = cells.get((block, kind))
            module = names.get((block, kind), f"block {block}, {kind}")
            if record is None:
                text = f"{module}<br>not probed in this view"
            else:
                z[i, j] = record.value
                provenance = _provenance(pd.Series(record._asdict()))
                text = f"{module}<br>{name} = {record.value:.6g} nats/token<br>{provenance}"
            points.append((kind, block, module, text))
    color = _log_color(z)
    fig = go.Figure(go.Heatmap(
        z=_cells(color), x=kinds, y=blocks, colorscale=COLORSCALE, colorbar=_colorbar(color, metric), hoverinfo="skip",
        xgap=1, ygap=1,
    ))
    kind_of, block_of, module_of, text_of = zip(*points) if points else ((), (), (), ())
    fig.add_trace(go.Scatter(  # the click targets: one invisible square per cell; a selected one is outlined
        x=list(kind_of), y=list(block_of), mode="markers", customdata=list(module_of),
        text=list(text_of), hovertemplate="%{text}<extra></extra>", showlegend=False,
        marker=dict(symbol="square-open", size=ROW_PX - 6, color="#3cf", opacity=0, line=dict(width=3)),
        selected=dict(marker=dict(opacity=1)), unselected=dict(marker=dict(opacity=0)),
        selectedpoints=[k for k, m in enumerate(module_of) if m == selected] if selected else None,
    ))
    fig.update_layout(
        title=dict(text=title, x=0, xanchor="left"), height=len(blocks) * ROW_PX + 130,
        margin=dict(t=80, b=10, l=60, r=10), clickmode="event+select", hovermode="closest", hoverdistance=-1,
        plot_bgcolor=MISSING_COLOR, dragmode=False,
        xaxis=dict(type="category", categoryorder="array", categoryarray=kinds, tickvals=kinds, ticktext=kinds,
                   range=[-0.5, len(kinds) - 0.5], side="top", showgrid=False, fixedrange=True),
        yaxis=dict(tickvals=blocks, ticktext=[str(b) for b in blocks], range=_block_range(blocks),
                   autorange=False, showgrid=False, zeroline=False, fixedrange=True, title="block"),
    )
    return fig


def layer_slice_heatmap(records: pd.DataFrame, title: str, metric: str, blocks: list[int] | None = None) -> go.Figure:
    """Blocks (rows) x slices (columns): the sum over the block's scored modules (the diagonal-estimate block score)."""
    data = records[records["block"] >= 0]
    if blocks is None:
        blocks = grid(data)[0]
    slices = list(dict.fromkeys(data["slice"]))
    sums = data.groupby(["block", "slice"])["value"].agg(["sum", "count"])
    z = np.full((len(blocks), len(slices)), np.nan)
    hover = []
    for i, block in enumerate(blocks):
        row_text = []
        for j, slice_id in enumerate(slices):
            if (block, slice_id) in sums.index:
                total, count = sums.loc[(block, slice_id)]
                z[i, j] = total
                row_text.append(f"block {block}, slice {slice_id}<br>sum of {METRIC_NAMES.get(metric, metric)} over "
                                f"{int(count)} scored modules = {total:.6g} nats/token")
            else:
                row_text.append(f"block {block}, slice {slice_id}<br>not probed in this view")
        hover.append(row_text)
    color = _log_color(z)
    fig = go.Figure(go.Heatmap(z=_cells(color), x=slices, y=blocks, colorscale=COLORSCALE, text=hover, hoverongaps=True,
                               hovertemplate="%{text}<extra></extra>", colorbar=_colorbar(color, metric),
                               xgap=1, ygap=1))
    fig.update_layout(
        title=dict(text=title, x=0, xanchor="left"), height=len(blocks) * ROW_PX + 130,
        margin=dict(t=80, b=10, l=60, r=10), plot_bgcolor=MISSING_COLOR,
        xaxis=dict(type="category", tickvals=slices, ticktext=slices, range=[-0.5, len(slices) - 0.5], side="top",
                   showgrid=False),
        yaxis=dict(tickvals=blocks, ticktext=[str(b) for b in blocks], range=_block_range(blocks),
                   autorange=False, showgrid=False, zeroline=False, title="block"),
    )
    return fig


def agreement_scatter(pairs: pd.DataFrame, title: str) -> go.Figure:
    """Fast estimate vs exhaustive measurement for the sampled modules (log-log)."""
    fig = go.Figure(go.Scatter(x=pairs["exhaustive"], y=pairs["fast"], mode="markers", text=pairs["module"],
                               hovertemplate="%{text}<br>exhaustive %{x:.4g}<br>fast %{y:.4g}<extra></extra>"))
    fig.update_layout(title=title, height=360, margin=dict(t=50, b=10), xaxis=dict(type="log", title="exhaustive"),
                      yaxis=dict(type="log", title="fast estimate"))
    return fig
