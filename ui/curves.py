"""Live training curves: the store's metrics rows as a DataFrame, and Plotly figures built from it."""
from __future__ import annotations

import pandas as pd
import plotly.express as px


def metrics_frame(rows: list[dict]) -> pd.DataFrame:
    """Store metrics rows (step, key, value, t) -> one row per step, one column per key (newest value wins)."""
    if not rows:
        return pd.DataFrame(columns=["step"])
    data = pd.DataFrame(rows).sort_values("t")
    return data.pivot_table(index="step", columns="key", values="value", aggfunc="last").reset_index()


def loss_curves(frame: pd.DataFrame, title: str):
    """Train loss (every step) and held-out loss (every eval_every steps) against step."""
    columns = [c for c in ("train_loss", "heldout_loss") if c in frame]
    data = frame.melt(id_vars="step", value_vars=columns, var_name="curve", value_name="loss").dropna()
    fig = px.line(data, x="step", y="loss", color="curve", markers=True, title=title)
    fig.update_layout(height=340, margin=dict(t=50, b=10))
    return fig


def throughput_curve(frame: pd.DataFrame, title: str):
    data = frame[["step", "tokens_per_s"]].dropna() if "tokens_per_s" in frame else pd.DataFrame(columns=["step"])
    fig = px.line(data, x="step", y="tokens_per_s", title=title, labels={"tokens_per_s": "tokens / s"})
    fig.update_layout(height=300, margin=dict(t=50, b=10))
    return fig
