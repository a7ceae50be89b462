"""Plotly figure builders. Each takes a DataFrame and returns a figure; no data loading here."""
from __future__ import annotations

import pandas as pd
import plotly.express as px

KIND_ORDER = ["embedding", "q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "linear", "lm_head", "norm"]


def size_by_kind(modules: pd.DataFrame):
    data = modules.groupby("kind", as_index=False)["params"].sum()
    data["MB (fp32)"] = data["params"] * 4 / 1e6
    data = data[data["params"] > 0]
    order = [k for k in KIND_ORDER if k in set(data["kind"])]
    fig = px.bar(data, x="kind", y="MB (fp32)", category_orders={"kind": order}, hover_data={"params": ":,"},
                 title="Weight size by module kind (fp32; tied weights counted once)")
    fig.update_layout(height=340, margin=dict(t=50, b=10))
    return fig


def size_by_block(modules: pd.DataFrame):
    blocks = modules[modules["block"].notna()].copy()
    blocks["block"] = blocks["block"].astype(int)
    data = blocks.groupby(["block", "kind"], as_index=False)["params"].sum()
    data["MB (fp32)"] = data["params"] * 4 / 1e6
    order = [k for k in KIND_ORDER if k in set(data["kind"])]
    fig = px.bar(data, x="block", y="MB (fp32)", color="kind", category_orders={"kind": order},
                 title="Weight size by block and kind (fp32)")
    fig.update_layout(height=340, margin=dict(t=50, b=10), barmode="stack")
    return fig


def slice_bars(results: pd.DataFrame, value: str, low: str, high: str, title: str, y_title: str | None = None):
    """One bar per slice with its 95% bootstrap interval as an error bar; `y_title` says what was measured where."""
    data = results.sort_values(value)
    fig = px.bar(data, x="slice", y=value, title=title, hover_data=["items", "tokens", "budget"],
                 error_y=data[high] - data[value], error_y_minus=data[value] - data[low])
    fig.update_layout(height=360, margin=dict(t=50, b=10), yaxis_title=y_title or value)
    return fig
