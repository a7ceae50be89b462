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
from shrink_core.results.report import View, build_report, figures, write_png
from shrink_core.results.report_page import render_html, write_report
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
    code = ("import sys, shrink_core.results.report, shrink_core.cli.report, shrink_core.results.figures, "
            "shrink_core.results.summary, shrink_core.results.report_page; "
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


# ---------------------------------------------------------------- the summary (page 1) and the PDF


def _measured_and_projected(store):
    """w8 measured on a CPU (MEASURE), w4 carrying only the roofline projection stored at creation."""
    from .test_candidates import MEASURE, SPEC, W4, W8

    ids = {c["name"]: c["id"] for c in store.candidates()}
    store.add_result("measure", Provenance(SPEC, "h0", "test", "cpu X", plan=W8), MEASURE, candidate_id=ids["w8"])
    projection = {"source": "projected (roofline), not measured",
                  "projected": [{"target": "h100-sxm", "batch": 1, "decode_ms_per_token": 0.05, "model": "roofline"}],
                  "cost": [{"target": "h100-sxm", "batch": 4, "price_per_hour": 3.0, "utilisation": 0.5,
                            "output_dollars_per_million": 0.07}]}
    store.add_result("projection", Provenance(SPEC, "h0", "test", "cpu", plan=W4), projection, candidate_id=ids["w4"])


def _band(table, name, slice_id):
    row = table[(table["name"] == name) & (table["slice"] == slice_id)].iloc[0]
    return f"95% interval {row['ratio_low'] - 1:+.1%} to {row['ratio_high'] - 1:+.1%}"


def test_summary_recommends_the_smallest_within_the_limit_and_argues(store):
    from shrink_core.results.summary import summarize

    _measured_and_projected(store)
    report = build_report(store, View(limit=1.05, target="h100-sxm"))
    summary = summarize(report)
    # w4 (150 MB, worst +5.0%) and w8 (300 MB, +2.0%) qualify; en-star is off the frontier, w4-keep0 has no size
    assert (summary.recommended.name, summary.runner_up.name) == ("w4", "w8")
    assert summary.verdict.startswith("Recommended: w4 (#3), the smallest") and "Runner-up: w8 (#2)" in summary.verdict
    assert "on the Pareto frontier" in summary.rule and "smallest" in summary.rule
    context = dict(summary.context)
    assert context["Model"] == "toy:tiny" and context["Slices"] == "ar, en, mc (the worst of them counts)"
    assert context["Limit"].startswith("perplexity within +5% of the reference") and "fast" in context["Protocol"]
    w4, w8 = summary.recommended, summary.runner_up
    assert w4.size == "150 MB, computed from the packed format"
    assert w4.latency == "0.05 ms/token, projected for h100-sxm (roofline), not measured"  # projected, from what
    assert w8.latency.startswith("21.5 ms/token, measured on cpu X, torch int8")  # measured, on what
    assert w4.cost.startswith("$0.07 per million output tokens, projected for h100-sxm")
    assert w4.quality == f"worst slice ar: perplexity +5.0% vs the reference ({_band(report.table, 'w4', 'ar')})"
    # one line per slice of the view, worst first, the change with its interval and the runner-up's beside it
    assert [line.split(" ")[0] for line in summary.slice_lines] == ["ar", "en", "mc"]
    ar = summary.slice_lines[0]
    assert ar.startswith("ar (40 items): quality drops for w4: perplexity +5.0% vs the reference")
    assert _band(report.table, "w4", "ar") in ar and "the worst slice" in ar
    assert f"runner-up w8: perplexity +2.0% vs the reference ({_band(report.table, 'w8', 'ar')})" in ar
    assert summary.slice_lines[2].startswith("mc (40 items): no clear change for w4")  # its interval holds 0%
    caveats = " ".join(summary.caveats)
    assert "w4's worst slice has a 95% interval of" in caveats and "crosses the limit" in caveats  # 1.05 at the limit
    assert "w4's latency is projected for h100-sxm (roofline), not measured" in caveats
    assert "w4's cost is projected for h100-sxm" in caveats and "w8's latency" not in caveats
    assert "Beyond the acceptable limits on some slice (see Per-slice results): en-star." in summary.caveats
    assert "Not ranked, missing a weights or quality figure (never counted as zero): w4-keep0." in summary.caveats
    page = render_html(report, store)
    top = page[:page.index("<h2>Pareto frontier</h2>")]  # the summary comes before every detail
    assert 'id="summary"' in top and "Recommended: w4 (#3)" in top and "Where quality drops for w4" in top
    assert "<h2>Per-slice results</h2>" in page  # the details are still there


def test_summary_recommends_nothing_when_nothing_is_within_the_limit(store):
    from shrink_core.results.summary import summarize

    report = build_report(store, View(limit=1.01))
    summary = summarize(report)
    assert summary.recommended is None and summary.runner_up is None
    assert summary.verdict.startswith("No recommendation: no compressed candidate on the frontier is within the "
                                      "limit (perplexity within +1% of the reference)")
    assert summary.focus == "w8"  # the closest on the worst slice (+2.0%): how far off, per slice
    assert "beyond the limit; the worst slice" in summary.slice_lines[0]
    page = render_html(report, store)
    top = page[:page.index("<h2>Pareto frontier</h2>")]
    assert "No recommendation" in top and "Where quality drops for the closest, w8" in top
    assert "Recommended:" not in top
    unlimited = summarize(build_report(store, View(limit=None)))
    assert unlimited.recommended is None and "this view has no limit" in unlimited.verdict
    unmeasured = summarize(build_report(store, View(x="latency", limit=1.05)))  # nobody has a measured latency
    assert unmeasured.recommended is None and "no compressed candidate has both a decode latency figure" in \
        unmeasured.verdict


def test_summary_says_a_small_slice_has_no_interval(shrink_home):
    from shrink_core.results.summary import summarize

    from .test_candidates import _paired_store

    store = Store()
    ids = _paired_store(store, 4, {"en": 0.5})
    for cid, size in ((ids["reference"], 4e8), (ids["cand"], 1e8)):
        store.add_result("size", Provenance("toy:tiny", "h0", "test", "cpu"), {"total_packed_bytes": size},
                         candidate_id=cid)
    summary = summarize(build_report(store, View(limit=3.0)))
    assert summary.recommended.name == "cand" and summary.runner_up is None
    assert "No runner-up" in summary.verdict
    assert summary.recommended.latency == "not measured; no projection without a hardware target (--target)"
    assert len(summary.slice_lines) == 1
    assert "no interval: fewer than 20 items (n=4)" in summary.slice_lines[0]
    assert "Slice en: no interval: fewer than 20 items (n=4); its figures are point estimates, a hint rather than " \
           "evidence." in summary.caveats
    assert "cand has no latency figure" in " ".join(summary.caveats)


def test_chromium_failures_are_one_sentence(store, shrink_home, tmp_path, monkeypatch):
    from shrink_core.results import report as report_module
    from shrink_core.results.report import write_pdf

    page = "<html><body>x</body></html>"
    monkeypatch.setattr(report_module, "CHROMIUM", str(tmp_path / "no-chromium"))
    with pytest.raises(ShrinkError, match="PDF export needs Debian's chromium at .*apt-get install chromium"):
        write_pdf(page, tmp_path / "a.pdf")
    for name, body, match in (("fails", "exit 3", "exited with status 3 without writing the PDF"),
                              ("hangs", "sleep 60", "did not finish the PDF within 1 s")):
        fake = tmp_path / name
        fake.write_text(f"#!/bin/sh\n{body}\n")
        fake.chmod(0o755)
        monkeypatch.setattr(report_module, "CHROMIUM", str(fake))
        with pytest.raises(ShrinkError, match=match) as caught:
            write_pdf(page, tmp_path / "a.pdf", timeout=1)
        assert "\n" not in str(caught.value) and not (tmp_path / "a.pdf").exists()
    # the CLI: the HTML still written, then one line on stderr, no traceback
    out = tmp_path / "r.html"
    code = ("import sys; import shrink_core.results.report as r; r.CHROMIUM = '/nonexistent/chromium'; "
            "from shrink_core.cli.entry import main; sys.exit(main(sys.argv[1:]))")
    env = {**__import__("os").environ, "SHRINK_HOME": str(shrink_home)}
    result = subprocess.run([sys.executable, "-c", code, "report", "--out", str(out), "--pdf"], capture_output=True,
                            text=True, cwd=REPO_ROOT, env=env, timeout=300)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("error: PDF export needs Debian's chromium") and out.exists()


@pytest.mark.browser
@has_chromium
def test_cli_writes_the_pdf_beside_the_html(store, shrink_home, tmp_path):
    out = tmp_path / "r.html"
    result = _cli("report", "--out", str(out), "--pdf", home=shrink_home)  # no PATH: r.pdf beside r.html
    assert result.returncode == 0, result.stderr
    assert "Recommended: w4 (#3)" in result.stdout and f"wrote {tmp_path / 'r.pdf'}" in result.stdout
    data = (tmp_path / "r.pdf").read_bytes()
    assert data[:4] == b"%PDF" and len(data) > 20_000
    pages = re.search(rb"/Type /Pages\s*/Count (\d+)", data)
    assert pages and int(pages.group(1)) >= 2  # the summary breaks the page: the details follow on page 2 on
