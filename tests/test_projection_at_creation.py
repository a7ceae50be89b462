"""Every candidate `eval` creates carries a roofline projection (latency and cost on each hardware row), so the
projected-latency and cost axes plot from the first run, labelled projected."""
import math

from shrink_core.perf.hardware import DEFAULT_TARGET
from shrink_core.results import candidates as cands
from shrink_core.results.eval_run import run_eval
from shrink_core.results.figures import pareto_figure
from shrink_core.results.report import View, build_report
from shrink_core.results.store import Store

PLAN = "version: 1\nname: toy w4\nrules:\n  - kind: [q, k, v, o, gate, up, down]\n    weights: {bits: 4, group_size: 32}\n"


def test_eval_stores_a_projection_with_every_candidate(toy_dir, shrink_home):
    store = Store()
    report = run_eval(str(toy_dir), ["toy_en"], "fast", PLAN, store=store)
    rows = store.results("projection", candidate_id=report["candidate_id"])
    assert len(rows) == 1
    entry = next(p for p in rows[0]["payload"]["projected"] if p["target"] == DEFAULT_TARGET)
    assert entry["kind"] == "projected" and entry["hardware"]["name"] == DEFAULT_TARGET
    table = cands.candidates_frame(store, target=DEFAULT_TARGET).set_index("kind")
    for kind in ("reference", "quantized"):
        assert table.loc[kind, "projected_ms"] > 0 and "projected" in table.loc[kind, "projected_source"]
        assert table.loc[kind, "cost_per_million"] > 0 and "projected" in table.loc[kind, "cost_source"]
    assert table.loc["quantized", "projected_ms"] < table.loc["reference", "projected_ms"]  # 4-bit weights read less
    assert DEFAULT_TARGET in cands.targets(store)
    points = build_report(store, View(x="cost", target=DEFAULT_TARGET)).points
    assert points["x"].notna().all() and (points["x"] > 0).all()


def test_axes_start_at_zero_and_an_empty_axis_is_not_minus_one():
    import pandas as pd

    empty = pd.DataFrame({"candidate_id": [1], "name": ["a"], "x": [math.nan], "y": [1.0], "y_low": [math.nan],
                          "y_high": [math.nan], "interval_note": [None], "on_frontier": [False], "acceptable": [None],
                          "hover": [""]})
    figure = pareto_figure(empty, "cost", "ppl", False)
    assert list(figure.layout.xaxis.range) == [0, 1]
    full = pareto_figure(empty.assign(x=[3.0]), "cost", "ppl", False)
    assert full.layout.xaxis.rangemode == "tozero"
