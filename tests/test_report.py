"""The stakeholder report: view points, a self-contained HTML file that renders offline, the PNG, and the CLI."""
import json
import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from shrink_core.errors import ShrinkError
from shrink_core.paths import REPO_ROOT
from shrink_core.results.report import View, build_report, figures, render_html, write_png, write_report
from shrink_core.results.store import Provenance, Store

from .browser import CHROMEDRIVER, CHROMIUM, chromium, wait_for
from .test_candidates import seed_store

has_chromium = pytest.mark.skipif(not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
                                  reason="Debian's chromium and chromium-driver are not installed")


@pytest.fixture
def store(shrink_home):
    store = Store()
    seed_store(store)
    return store


def test_worst_slice_view_and_single_slice_view(store):
    report = build_report(store, View(limit=1.05))
    points = report.points.set_index("name")
    assert report.view.budget == "fast"  # the most used budget, filled in
    assert list(points.index[points["on_frontier"]]) == ["reference", "w8", "w4"]
    assert points.loc["en-star", "worst_slice"] == "ar" and not points.loc["en-star", "acceptable"]
    assert points.loc["w8", "acceptable"] and points.loc["w8", "y_low"] < points.loc["w8", "y"]
    assert not points.loc["w4-keep0", "on_frontier"]  # no size recorded: never on the frontier
    per_slice = report.per_slice
    en = per_slice[per_slice["slice"] == "en"].set_index("name")
    assert en.loc["en-star", "on_frontier"] and not en.loc["w4", "on_frontier"]
    accuracy = build_report(store, View(metric="accuracy", y="worst"))
    assert set(accuracy.per_slice["slice"]) == {"mc"}  # accuracy is defined on task slices only
    mix = build_report(store, View(y="mix", weights=(("en", 3.0), ("ar", 1.0)))).points.set_index("name")
    assert mix.loc["en-star", "y"] == pytest.approx((3 * 1.01 + 1.6) / 4)


def test_bad_views_are_one_sentence_errors(store):
    with pytest.raises(ShrinkError, match="needs a hardware target"):
        View(x="projected")
    with pytest.raises(ShrinkError, match="No results on slice 'zh'"):
        build_report(store, View(y="zh"))
    with pytest.raises(ShrinkError, match="No candidate with id 99"):
        build_report(store, View(candidates=(1, 99)))


def test_html_is_self_contained(store):
    report = build_report(store, View(limit=1.05))
    page = render_html(report, store)
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)\s*=", page, re.I)  # nothing fetched
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", page, re.S)
    bundle = max(scripts, key=len)
    assert "plotly.js v" in bundle[:200] and len(bundle) > 3_000_000  # plotly.js inlined
    # Outside the library (whose URLs are defaults for map/geo traces this page never draws): no URL at all.
    rest = page.replace(bundle, "")
    assert not re.findall(r"https?://|@import|@font-face|url\(", rest)
    assert "Plotly.newPlot" in rest
    assert 'id="pareto-main"' in page and 'id="pareto-slices"' in page
    for text in ("en-star", "int4 g64 asym rtn", "-&gt; keep", "Method notes", "computed from the packed format",
                 "perplexity within +5% of the reference", "Provenance"):
        assert text in page, text


def test_report_reads_as_text_not_raw_json(store):
    """Sizes in MB, plans as one readable rule per line, the view and provenance in words: no dicts, no raw bytes."""
    report = build_report(store, View(limit=1.05))
    page = render_html(report, store)
    bundle = max(re.findall(r"<script[^>]*>(.*?)</script>", page, re.S), key=len)
    text = re.sub(r"<script.*?</script>", "", page.replace(bundle, ""), flags=re.S)
    assert not re.search(r"\{\s*(&quot;|&#x27;|\"|')", text), "a raw dict in the report"
    assert "300000000" not in text and "1000000000" not in text  # byte counts are shown in MB
    sizes = text.split("<h2>Size, latency, cost</h2>")[1].split("<h2>")[0]
    assert "<th>weights (MB)</th>" in sizes
    assert re.search(r"<td>w8</td>\s*<td>quantized</td>\s*<td>300</td>", sizes)  # 300 MB, not 300000000
    plans = text.split("<h2>Plans</h2>")[1]
    assert "<li>kind=up,down -&gt; int3 g64 asym rtn</li>" in plans  # one rule per line: what -> setting
    assert "worst slice over the slices every candidate shares" in text  # the view in words


@pytest.mark.browser
@has_chromium
def test_exported_html_renders_offline(store, tmp_path):
    out = tmp_path / "report.html"
    written = write_report(store, View(limit=1.05), out)
    assert written["frontier"] == ["reference", "w8", "w4"] and written["not_plotted"] == ["w4-keep0"]
    driver = chromium(offline=True)
    try:
        driver.get(out.as_uri())
        traces = wait_for(driver, lambda d: d.find_elements("css selector", "#pareto-main .scatterlayer .trace"), 60,
                          "the Pareto plot's traces")
        assert len(traces) >= 2
        labels = [e.get_attribute("textContent") for e in
                  driver.find_elements("css selector", "#pareto-main .scatterlayer .textpoint")]
        assert {"w8", "w4", "en-star"} <= set(labels)
        assert driver.find_elements("css selector", "#pareto-slices .scatterlayer .point")
        assert driver.execute_script("return typeof Plotly") == "object"
    finally:
        driver.quit()


@pytest.mark.browser
@has_chromium
def test_png_of_the_main_figure(store, tmp_path):
    from shrink_core.results.report import figures

    main, _ = figures(build_report(store, View(limit=1.05)))
    path = write_png(main, tmp_path / "pareto.png", width=900, height=500)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (900, 500) and len(data) > 10_000  # a drawn chart, not a blank page


def _cli(*args, home):
    env = {**__import__("os").environ, "SHRINK_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "shrink_core", *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          env=env, timeout=300)


def test_cli_report_and_candidates(store, shrink_home, tmp_path):
    out = tmp_path / "r.html"
    result = _cli("report", "--out", str(out), "--candidates", "1,2,3", "--y", "ar", "--json", home=shrink_home)
    assert result.returncode == 0, result.stderr
    written = json.loads(result.stdout)
    assert written["candidates"] == [1, 2, 3] and out.stat().st_size > 3_000_000
    bad = _cli("report", "--out", str(out), "--x", "projected", "--target", "cray-1", home=shrink_home)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "cray-1" in bad.stderr
    # no --target: the pages' default target, named in the report (the figures there are projected, not measured)
    projected = _cli("report", "--out", str(out), "--x", "projected", home=shrink_home)
    assert projected.returncode == 0, projected.stderr
    assert "projected for h100-sxm" in out.read_text()
    listing = _cli("candidates", "list", "--json", home=shrink_home)
    rows = {r["name"]: r for r in json.loads(listing.stdout)}
    assert rows["w4-keep0"]["memory_bytes"] is None and rows["w8"]["memory_bytes"] == 300_000_000
    assert _cli("candidates", "tag", "2", "slides", home=shrink_home).returncode == 0
    refused = _cli("candidates", "delete", "4", home=shrink_home)
    assert refused.returncode == 1 and "--yes" in refused.stderr
    assert _cli("candidates", "delete", "4", "--yes", home=shrink_home).returncode == 0
    names = {c["name"]: c for c in Store().candidates()}
    assert "en-star" not in names and names["w8"]["tags"] == "slides"
    exported = _cli("candidates", "export", "3", "--out", str(tmp_path / "x"), home=shrink_home)
    assert exported.returncode == 0 and (tmp_path / "x" / "candidate-3-plan.yaml").exists()


def test_report_never_imports_streamlit():
    code = ("import sys, shrink_core.results.report, shrink_core.cli.report, shrink_core.results.figures; "
            "assert 'streamlit' not in sys.modules, 'streamlit imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 0, result.stderr


def _first_table(page: str) -> pd.DataFrame:
    """The first HTML table in `page` as text cells (the standard library's parser: no lxml here)."""
    from html.parser import HTMLParser

    class Cells(HTMLParser):
        def __init__(self):
            super().__init__()
            self.rows, self.cell, self.done = [], None, False

        def handle_starttag(self, tag, attrs):
            if not self.done and tag == "tr":
                self.rows.append([])
            elif not self.done and tag in ("td", "th"):
                self.cell = ""

        def handle_endtag(self, tag):
            if tag in ("td", "th") and self.cell is not None:
                self.rows[-1].append(self.cell.strip())
                self.cell = None
            elif tag == "table":
                self.done = True

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    parser = Cells()
    parser.feed(page)
    return pd.DataFrame(parser.rows[1:], columns=parser.rows[0])


def test_report_says_why_a_small_slice_has_no_interval(shrink_home):
    from .test_candidates import _paired_store

    store = Store()
    ids = _paired_store(store, 4, {"en": 0.5})
    for cid, size in ((ids["reference"], 4e8), (ids["cand"], 1e8)):  # plotted: both need an x
        store.add_result("size", Provenance("toy:tiny", "h0", "test", "cpu"), {"total_packed_bytes": size},
                         candidate_id=cid)
    report = build_report(store, View())
    note = "n=4 items: too few for an interval (fewer than 20)"
    points = report.points.set_index("name")
    assert pd.isna(points.loc["cand", "y_low"]) and points.loc["cand", "interval_note"] == note
    assert note in points.loc["cand", "hover"]
    page = render_html(report, store)
    table = _first_table(page[page.index("<h2>Per-slice results</h2>"):]).set_index("name")
    assert table.loc["cand", "ppl 95%"] == note and table.loc["cand", "ppl_ratio 95%"] == note  # where it would be
    main = figures(report)[0]
    assert any(note in (a.text or "") for a in main.layout.annotations)  # in place of the missing error bar


def test_report_lists_raw_and_holm_adjusted_p_values(shrink_home):
    from .test_candidates import _paired_store

    store = Store()
    _paired_store(store, 40, {"en": 0.35, "fr": 0.0, "de": 0.0})
    report = build_report(store, View())
    en = report.tests.set_index("slice").loc["en"]
    assert en["nll_p"] < 0.05 < en["nll_p_holm"] and not en["significant"]
    page = render_html(report, store)
    section = page[page.index("<h2>Paired tests against the reference</h2>"):]
    tests = _first_table(section)
    assert {"nll_p", "nll_p_holm"} <= set(tests.columns)
    assert set(tests["holm"]) == {"Holm-adjusted over 3 tests on 3 slices"}
    assert "Holm-Bonferroni" in page[page.index("<h2>Method notes</h2>"):]


def test_report_worst_slice_defaults_to_shared_slices_and_flags_rows_beyond_limits(store):
    from shrink_core.results.report import beyond_limits

    from .test_candidates import SPEC, _payload

    ids = {c["name"]: c["id"] for c in store.candidates()}
    for name, ppl in (("reference", 9.0), ("w8", 9.1)):  # only these two were also run on 'hi'
        store.add_result("eval", Provenance(SPEC, "h0", "test", "cpu (test)", slice="hi", budget="fast"),
                         _payload("hi", ppl, 99, kl=0.001), candidate_id=ids[name])
    points = build_report(store, View(limit=1.05)).points.set_index("name")
    assert points.loc["w4", "y"] == pytest.approx(1.05) and points.loc["w4", "on_frontier"]  # not dropped over 'hi'
    report = build_report(store, View(limit=1.05))
    beyond = beyond_limits(report.table).set_index(["name", "slice"])
    assert "perplexity +60%" in beyond.loc[("en-star", "ar"), "beyond"]
    top1 = "top-1 agreement with reference 0.5 (limit: top-1 agreement with reference >= 0.9 share of tokens)"
    assert top1 in beyond.loc[("en-star", "en"), "beyond"]
    assert ("w8", "en") not in beyond.index and "reference" not in set(beyond.reset_index()["name"])
    page = render_html(report, store)
    assert "candidate(s) beyond the acceptable limits" in page and "Perplexity is per token" in page
