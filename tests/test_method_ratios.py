"""Stored method ratios (`sensitivity/method_ratios.py`) in a real store: matched by method and recipe, newest
first, and left out once their figure key no longer matches (other slice text, a new version of the figure)."""
import pytest

from shrink_core.evaluation import protocol
from shrink_core.evaluation.calibration import CalibrationRecipe
from shrink_core.plan import load_plan
from shrink_core.plan.spec import RotateSpec, TuneSpec
from shrink_core.results.method_ratios import method_label, method_score_table, save_ratios, scored_method, stored_ratios
from shrink_core.results.store import Store
from shrink_core.sensitivity.probe import SCAN_DEPTHS

SPEC, HASH = "builtin:smollm2-135m", "h"
MIX = CalibrationRecipe().to_dict()


def test_ratios_scale_the_scores_of_their_method_and_mix_newest_first(shrink_home):
    store = Store()
    scores = {("a", "w3g64", "en"): 2.0, ("b", "w3g64", "en"): 1.0, ("a", "w3g64", "zh"): 4.0}
    save_ratios(store, SPEC, HASH, "cpu", SCAN_DEPTHS["fast"], "gptq", MIX, {("a", "w3g64", "en"): 0.9})
    save_ratios(store, SPEC, HASH, "cpu", SCAN_DEPTHS["fast"], "gptq", MIX,
                {("a", "w3g64", "en"): 0.5, ("a", "w3g64", "zh"): 0.25})
    found = stored_ratios(store, SPEC, HASH, "gptq", MIX)
    assert found.ratios == {("a", "w3g64", "en"): 0.5, ("a", "w3g64", "zh"): 0.25}  # the newer row wins
    table, used = method_score_table(store, SPEC, HASH, "gptq", MIX, scores)
    assert used is not None and table == {("a", "w3g64", "en"): 1.0, ("b", "w3g64", "en"): 1.0,
                                          ("a", "w3g64", "zh"): 1.0}  # b has no ratio: RTN's score
    assert found.coverage(scores) == (2, 3) and found.medians(["en", "zh"]) == "en 0.50, zh 0.25"
    assert found.covers(["a"], ["keep", "w3g64"], ["en", "zh"]) and not found.covers(["a", "b"], ["w3g64"], ["en"])
    # another method, another mix, rtn itself: the scan's own scores
    for method, mix in (("gptq-seq", MIX), ("gptq", CalibrationRecipe.parse("en=1").to_dict()), ("rtn", MIX)):
        assert method_score_table(store, SPEC, HASH, method, mix, scores) == (scores, None)


def test_ratios_under_a_stale_figure_key_are_left_out(shrink_home, monkeypatch):
    store = Store()
    save_ratios(store, SPEC, HASH, "cpu", SCAN_DEPTHS["fast"], "gptq", MIX, {("a", "w3g64", "en"): 0.5})
    assert stored_ratios(store, SPEC, HASH, "gptq", MIX) is not None
    monkeypatch.setitem(protocol.FIGURE_VERSIONS, "method_ratios", protocol.FIGURE_VERSIONS["method_ratios"] + 1)
    assert stored_ratios(store, SPEC, HASH, "gptq", MIX) is None


def test_a_rotated_method_is_scored_apart_from_the_plain_one_rtn_included(shrink_home):
    """A draft that rotates its inputs errs differently from the plain method: its ratios are stored and read under
    its own name, never for the plain method, and rotated RTN gets ratios where plain RTN is the scan itself."""
    assert scored_method("gptq", None) == "gptq" and scored_method(None, RotateSpec()) is None
    assert scored_method("gptq", RotateSpec()) == "gptq+hadamard:0"
    assert scored_method("rtn", RotateSpec(seed=3)) == "rtn+hadamard:3"
    assert method_label("rtn+hadamard:3") == "rtn with rotated inputs (hadamard, seed 3)" and method_label("gptq") == "gptq"
    tuned = scored_method("gptq-seq", RotateSpec(), TuneSpec(steps=50))  # the fitted model's key; ratios omit tune
    assert tuned == "gptq-seq+hadamard:0+scales:50"
    assert method_label(tuned) == "gptq-seq with rotated inputs (hadamard, seed 0) and scales tuned (50 steps)"
    store = Store()
    scores = {("a", "w3g64", "en"): 2.0}
    save_ratios(store, SPEC, HASH, "cpu", SCAN_DEPTHS["fast"], "gptq+hadamard:0", MIX, {("a", "w3g64", "en"): 0.25})
    save_ratios(store, SPEC, HASH, "cpu", SCAN_DEPTHS["fast"], "rtn+hadamard:0", MIX, {("a", "w3g64", "en"): 1.5})
    assert stored_ratios(store, SPEC, HASH, "gptq", MIX) is None  # the plain method has none of its own yet
    assert method_score_table(store, SPEC, HASH, "gptq+hadamard:0", MIX, scores)[0] == {("a", "w3g64", "en"): 0.5}
    assert method_score_table(store, SPEC, HASH, "rtn+hadamard:0", MIX, scores)[0] == {("a", "w3g64", "en"): 3.0}
    assert method_score_table(store, SPEC, HASH, "rtn+hadamard:1", MIX, scores) == (scores, None)  # another seed
    assert method_score_table(store, SPEC, HASH, "rtn", MIX, scores) == (scores, None)


@pytest.mark.parametrize("depth", ["quick", "standard"])
def test_the_depth_is_part_of_the_key_but_any_current_depth_is_read(shrink_home, depth):
    store = Store()
    save_ratios(store, SPEC, HASH, "cpu", SCAN_DEPTHS[depth], "gptq", MIX, {("a", "w3g64", "en"): 0.5})
    assert stored_ratios(store, SPEC, HASH, "gptq", MIX).ratios == {("a", "w3g64", "en"): 0.5}


def test_the_cli_planner_plans_a_calibrated_method_on_its_stored_ratios(shrink_home, toy_dir, tmp_path):
    """`shrink plan --method gptq` sums the scan's scores scaled by GPTQ's stored ratios for the default recipe (the
    one the plan it writes calibrates with), and says which scores it planned on."""
    import json

    from tests.test_cli import cli

    args = ("plan", "--model", str(toy_dir), "--budget-bits", "6", "--settings", "w4g64,w8", "--slices", "en",
            "--method", "gptq", "--out", str(tmp_path / "plan.yaml"), "--json")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    rtn = json.loads(first.stdout)
    assert rtn["scores"] == "the fast scan's RTN scores" and rtn["depth"] == "fast" and rtn["computed_scores"] > 0
    rows = [r for r in Store().results("sensitivity", slice="en") if r["payload"].get("setting") == "w4g64"]
    modules = {m for r in rows for m in r["payload"]["values"]}
    row = rows[0]
    save_ratios(Store(), row["model_spec"], row["weights_hash"], "cpu", SCAN_DEPTHS["fast"], "gptq", MIX,
                {(m, "w4g64", "en"): 0.25 for m in modules})
    second = cli(*args)
    assert second.returncode == 0, second.stderr
    scaled = json.loads(second.stdout)
    assert scaled["scores"].startswith("the fast scan's scores scaled by gptq's stored output error") and "en 0.25" in \
        scaled["scores"]
    assert scaled["computed_scores"] == 0  # the first call's scan is reused
    # w4g64's error is a quarter of RTN's: the same budget buys a lower predicted KL
    assert scaled["predicted"]["en"] < rtn["predicted"]["en"]
    # --rotate writes a rotated plan, which plain gptq's ratios do not describe, until its own are stored
    rotated = json.loads(cli(*args, "--rotate").stdout)
    assert rotated["scores"].startswith("the fast scan's plain RTN scores: no gptq with rotated inputs (hadamard, "
                                        "seed 0) error ratios are stored")
    assert rotated["predicted"] == rtn["predicted"]
    plan = load_plan((tmp_path / "plan.yaml").read_text())
    assert plan.rotate == RotateSpec() and plan.name.endswith(", inputs rotated")
    save_ratios(Store(), row["model_spec"], row["weights_hash"], "cpu", SCAN_DEPTHS["fast"], "gptq+hadamard:0", MIX,
                {(m, "w4g64", "en"): 0.5 for m in modules})
    rotated = json.loads(cli(*args, "--rotate").stdout)
    assert "scaled by gptq with rotated inputs (hadamard, seed 0)'s stored output error" in rotated["scores"]
    assert scaled["predicted"]["en"] < rotated["predicted"]["en"] < rtn["predicted"]["en"]


def test_the_cli_planner_plans_on_the_scan_the_user_ran(shrink_home, toy_dir, tmp_path):
    """After `sensitivity --depth quick`, `plan` reuses that scan instead of scanning again at fast depth; an
    explicit `--depth fast` scans at that depth."""
    import json

    from tests.test_cli import cli

    scan = cli("sensitivity", "--model", str(toy_dir), "--slices", "en", "--settings", "w4g64,w8", "--depth", "quick")
    assert scan.returncode == 0, scan.stderr
    args = ("plan", "--model", str(toy_dir), "--budget-bits", "6", "--settings", "w4g64,w8", "--slices", "en",
            "--out", str(tmp_path / "plan.yaml"), "--json")
    reused = json.loads(cli(*args).stdout)
    assert (reused["depth"], reused["computed_scores"]) == ("quick", 0)
    assert reused["scores"] == "the quick scan's RTN scores"
    deeper = cli(*args, "--depth", "fast")
    assert deeper.returncode == 0, deeper.stderr
    fast = json.loads(deeper.stdout)
    assert fast["depth"] == "fast" and fast["computed_scores"] > 0
    # both depths are stored now: without --depth, the deeper one is planned on
    assert json.loads(cli(*args).stdout)["depth"] == "fast"
