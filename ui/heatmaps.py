"""Sensitivity heatmaps. Each takes a DataFrame of records (module, block, kind, setting, slice, metric, value, method)
and returns a figure. Cells are square scatter markers so a click selects a module (st.plotly_chart on_select)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

KIND_ORDER = ["q", "k", "v", "o", "gate", "up", "down", "linear"]
METRIC_LABELS = {"kl": "KL(reference || perturbed), nats/token", "dnll": "ΔNLL, nats/token"}


def _color(values: pd.Series) -> np.ndarray:
    """log10 of the magnitude, so values spanning decades stay readable (the hover shows the exact value)."""
    return np.log10(np.maximum(values.abs().to_numpy(dtype=float), 1e-9))


def _cells(data: pd.DataFrame, x: str, y: str, x_order: list, text: pd.Series, title: str, metric: str,
           height: int) -> go.Figure:
    rows = max(data[y].nunique(), 1)
    size = max(6, min(26, int((height - 90) / rows) - 2))
    fig = go.Figure(go.Scatter(
        x=data[x], y=data[y], mode="markers",
        marker=dict(symbol="square", size=size, color=_color(data["value"]), colorscale="Inferno",
                    colorbar=dict(title=f"log10 |{metric}|")),
        customdata=np.stack([data["module"].astype(str), text], axis=-1),
        hovertemplate="%{customdata[0]}<br>%{customdata[1]}<extra></extra>",
    ))
    fig.update_layout(title=title, height=height, margin=dict(t=60, b=10, l=10, r=10), clickmode="event+select",
                      xaxis=dict(categoryorder="array", categoryarray=x_order, type="category", side="top"),
                      yaxis=dict(autorange="reversed", title="block", dtick=1 if rows <= 32 else None))
    return fig


def module_heatmap(records: pd.DataFrame, title: str, metric: str, height: int = 620) -> go.Figure:
    """Blocks (rows) x module kinds (columns) for one slice, setting, metric and method."""
    data = records.sort_values(["block", "kind"])
    text = data.apply(lambda r: f"{r['metric']} = {r['value']:.4g} ({r['method']}, {r['setting']}, {r['slice']})",
                      axis=1)
    order = [k for k in KIND_ORDER if k in set(data["kind"])]
    return _cells(data, "kind", "block", order, text, title, METRIC_LABELS.get(metric, metric), height)


def layer_slice_heatmap(records: pd.DataFrame, title: str, metric: str, height: int = 620) -> go.Figure:
    """Blocks (rows) x slices (columns): the sum over the block's modules (the diagonal-estimate block score)."""
    data = records.groupby(["block", "slice", "method", "setting"], as_index=False)["value"].sum()
    data["module"] = "block " + data["block"].astype(str)
    text = data.apply(lambda r: f"sum of {metric} over the block = {r['value']:.4g} ({r['method']}, {r['setting']})",
                      axis=1)
    order = list(dict.fromkeys(records["slice"]))
    return _cells(data, "slice", "block", order, text, title, METRIC_LABELS.get(metric, metric), height)


def agreement_scatter(pairs: pd.DataFrame, title: str) -> go.Figure:
    """Fast estimate vs exhaustive measurement for the sampled modules (log-log)."""
    fig = go.Figure(go.Scatter(x=pairs["exhaustive"], y=pairs["fast"], mode="markers", text=pairs["module"],
                               hovertemplate="%{text}<br>exhaustive %{x:.4g}<br>fast %{y:.4g}<extra></extra>"))
    fig.update_layout(title=title, height=360, margin=dict(t=50, b=10), xaxis=dict(type="log", title="exhaustive"),
                      yaxis=dict(type="log", title="fast estimate"))
    return fig
