"""The candidate table from a store seeded with known results: quality ratios, missing figures, compare, plan diff."""
import json
import math

import numpy as np
import pandas as pd
import pytest

from shrink_core.errors import ShrinkError
from shrink_core.results import candidates as cands
from shrink_core.results.store import Provenance, Store

SPEC = "toy:tiny"
ITEMS = 40
W8 = {"version": 1, "name": "w8", "rules": [{"kind": ["q", "k", "v", "o", "gate", "up", "down"],
                                             "weights": {"bits": 8, "group_size": "channel", "symmetric": True,
                                                         "method": "rtn"}}]}
W4 = {"version": 1, "name": "w4", "rules": [{"kind": ["q", "k", "v", "o", "gate", "up", "down"],
                                             "weights": {"bits": 4, "group_size": 64, "method": "rtn"}}]}
W4_KEEP0 = {"version": 1, "name": "w4-keep0", "rules": [
    {"kind": ["q", "k", "v", "o", "gate", "up", "down"], "blocks": [0], "keep": True},
    {"kind": ["q", "k", "v", "o", "gate", "up", "down"], "weights": {"bits": 4, "group_size": 64, "method": "rtn"}}]}
EN_STAR = {"version": 1, "name": "en-star", "rules": [{"kind": ["up", "down"],
                                                       "weights": {"bits": 3, "group_size": 64, "method": "rtn"}}]}


def _payload(slice_id: str, ppl: float, seed: int, accuracy: float | None = None, kl: float | None = None,
             flips: int | None = None) -> dict:
    """An eval payload whose per-item NLLs give exactly `ppl` (10 tokens per item) with a symmetric spread."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 0.3, ITEMS // 2)
    nll = (math.log(ppl) * 10 + np.concatenate([noise, -noise])).tolist()
    payload = {"slice": slice_id, "kind": "task" if accuracy is not None else "text", "metric": "ppl", "budget": "fast",
               "items": ITEMS, "tokens": ITEMS * 10, "nll": math.log(ppl), "ppl": ppl,
               "ppl_ci": [ppl * 0.97, ppl * 1.03], "bpb": None, "accuracy": None, "accuracy_ci": None,
               "accuracy_norm": None, "kl": kl, "kl_p99": kl * 8 if kl is not None else None,
               "top1_agree": 1 - kl * 10 if kl is not None else None, "flips": None, "breakdown": {},
               "per_item": {"ids": [f"{slice_id}-{i}" for i in range(ITEMS)], "nll": nll, "tokens": [10] * ITEMS}}
    if accuracy is not None:
        correct = [1] * round(accuracy * ITEMS) + [0] * (ITEMS - round(accuracy * ITEMS))
        payload.update(accuracy=accuracy, accuracy_ci=[accuracy - 0.1, accuracy + 0.1])
        payload["per_item"]["correct"] = correct
        if flips is not None:
            payload["flips"] = {"lost": flips, "gained": 0, "total": flips}
    return payload


def _candidate(store, name, kind, plan, parent, size_bytes, quality, kl, seed):
    cid = store.upsert_candidate(name=name, kind=kind, model_spec=SPEC, weights_hash="h0", code_version="test",
                                 plan=plan, parent_id=parent,
                                 calibration={"mix": {"en": 0.5, "ar": 0.5}, "n_sequences": 8, "seq_len": 64,
                                              "seed": 0} if plan else None)
    if size_bytes is not None:
        store.add_result("size", Provenance(SPEC, "h0", "test", "cpu", plan=plan),
                         {"source": "computed from the packed format", "total_packed_bytes": size_bytes},
                         candidate_id=cid)
    for index, (slice_id, value) in enumerate(quality.items()):
        if slice_id == "mc":
            payload = _payload("mc", 5.0, seed + index, accuracy=value, kl=kl,
                               flips=None if kind == "reference" else round(abs(0.6 - value) * ITEMS))
        else:
            payload = _payload(slice_id, value, seed + index, kl=kl)
        store.add_result("eval", Provenance(SPEC, "h0", "test", "cpu (test)", plan=plan, slice=slice_id, budget="fast"),
                         payload, candidate_id=cid)
    return cid


def seed_store(store: Store, inventory_rows: list[dict] | None = None) -> dict[str, int]:
    """Reference + four candidates with known dominance on (size, worst-slice ppl ratio):
    w8 (300 MB, worst 1.02), w4 (150 MB, worst 1.05), en-star (150 MB, en 1.01 but ar 1.6: dominated on worst),
    w4-keep0 (no size recorded: missing, not zero)."""
    store.save_model({"spec": SPEC, "weights_hash": "h0", "summary": {"bytes_fp32": 1_000_000_000},
                      "modules": inventory_rows or []})
    ref = _candidate(store, "reference", "reference", None, None, None, {"en": 20.0, "ar": 30.0, "mc": 0.6}, None, 0)
    ids = {"reference": ref}
    ids["w8"] = _candidate(store, "w8", "quantized", W8, ref, 300_000_000,
                           {"en": 20.2, "ar": 30.6, "mc": 0.6}, 0.001, 10)
    ids["w4"] = _candidate(store, "w4", "quantized", W4, ref, 150_000_000,
                           {"en": 20.8, "ar": 31.5, "mc": 0.55}, 0.01, 20)
    ids["en-star"] = _candidate(store, "en-star", "quantized", EN_STAR, ref, 150_000_000,
                                {"en": 20.2, "ar": 48.0, "mc": 0.5}, 0.05, 30)
    ids["w4-keep0"] = _candidate(store, "w4-keep0", "quantized", W4_KEEP0, ids["w4"], None,
                                 {"en": 20.6, "ar": 31.0, "mc": 0.575}, 0.008, 40)
    return ids


MEASURE = {"latency": {
    "measured": [{"kind": "measured", "candidate": "reference", "device": "cpu X", "runtime": "torch eager",
                  "runs": 5, "batch": 1, "decode_ms_per_token": {"median_ms": 30.0}},
                 {"kind": "measured", "candidate": "w8", "device": "cpu X", "runtime": "torch int8", "runs": 5,
                  "batch": 1, "decode_ms_per_token": {"median_ms": 21.5}}],
    "projected": [{"kind": "projected", "target": "h100-sxm", "batch": 1, "decode_ms_per_token": 0.08,
                   "model": "roofline"}]},
    "cost": [{"kind": "projected", "target": "h100-sxm", "batch": 4, "price_per_hour": 3.0, "utilisation": 0.5,
              "output_dollars_per_million": 0.12}],
    "memory": {"weights": {"kind": "computed", "bytes": 299_000_000, "source": "engine packed bytes"}}}


@pytest.fixture
def seeded(shrink_home):
    store = Store()
    ids = seed_store(store)
    store.add_result("measure", Provenance(SPEC, "h0", "test", "cpu X", plan=W8), MEASURE, candidate_id=ids["w8"])
    return store, ids


def test_candidates_frame_has_lineage_sizes_and_missing_figures(seeded):
    store, ids = seeded
    table = cands.candidates_frame(store, target="h100-sxm").set_index("name")
    assert list(table.index) == ["reference", "w8", "w4", "en-star", "w4-keep0"]
    assert table.loc["w4-keep0", "parent_name"] == "w4" and table.loc["w8", "parent_name"] == "reference"
    assert table.loc["reference", "memory_bytes"] == 1_000_000_000
    assert "inventory" in table.loc["reference", "memory_source"]
    assert table.loc["w8", "memory_bytes"] == 300_000_000  # the packed size wins over the measure's estimate
    assert math.isnan(table.loc["w4-keep0", "memory_bytes"])  # missing, not zero
    assert table.loc["w8", "latency_ms"] == 21.5 and "measured on cpu X" in table.loc["w8", "latency_source"]
    assert math.isnan(table.loc["w4", "latency_ms"]) and pd.isna(table.loc["w4", "latency_source"])
    assert table.loc["w8", "projected_ms"] == 0.08 and "projected for h100-sxm" in table.loc["w8", "projected_source"]
    assert table.loc["w8", "cost_per_million"] == 0.12
    assert "en 50%" in table.loc["w8", "calibration"] and table.loc["w8", "budgets"] == "fast"
    assert "int8 channel sym rtn" in table.loc["w8", "plan_summary"]
    assert cands.targets(store) == ["h100-sxm"]


def test_reference_size_without_a_stored_inventory(shrink_home):
    store = Store()
    ref = store.upsert_candidate(name="ref", kind="reference", model_spec="m", weights_hash="h", code_version="t")
    assert cands.performance(store, cands.get_candidate(store, ref)).memory_bytes is None  # missing, not zero
    child = store.upsert_candidate(name="w8", kind="quantized", model_spec="m", weights_hash="h", code_version="t",
                                   plan=W8, parent_id=ref)
    store.add_result("size", Provenance("m", "h", "t", "cpu", plan=W8),
                     {"total_packed_bytes": 150, "dense_bytes_before": 500}, candidate_id=child)
    perf = cands.performance(store, cands.get_candidate(store, ref))
    assert perf.memory_bytes == 500 and "computed" in perf.memory_source


def test_slices_frame_ratios_to_the_reference(seeded):
    store, ids = seeded
    table = cands.slices_frame(store, "fast")
    row = table[(table["name"] == "en-star") & (table["slice"] == "ar")].iloc[0]
    assert row["ppl_ratio"] == pytest.approx(1.6) and row["reference_ppl"] == 30.0
    # paired over the same items: contains the ratio, and tighter than the candidate's own interval / reference ppl
    assert row["ratio_low"] < 1.6 < row["ratio_high"] and row["ratio_interval"].startswith("95% paired")
    assert row["ratio_high"] - row["ratio_low"] < 48 * 0.06 / 30
    ref = table[(table["name"] == "reference") & (table["slice"] == "mc")].iloc[0]
    assert ref["ppl_ratio"] == 1.0 and ref["kl"] == 0.0 and ref["flips_total"] == 0
    mc = table[(table["name"] == "w4") & (table["slice"] == "mc")].iloc[0]
    assert mc["flips_total"] == 2 and mc["flip_rate"] == pytest.approx(2 / ITEMS)
    assert cands.budgets(store) == ["fast"]


def test_unpaired_items_fall_back_to_an_unpaired_interval(seeded):
    store, ids = seeded
    cid = store.upsert_candidate(name="other-items", kind="imported", model_spec=SPEC, weights_hash="h0",
                                 code_version="test", plan=EN_STAR | {"name": "other"}, parent_id=ids["reference"])
    payload = _payload("en", 22.0, 99)
    payload["per_item"]["ids"] = [f"x{i}" for i in range(ITEMS)]
    store.add_result("eval", Provenance(SPEC, "h0", "test", "cpu", slice="en", budget="fast"), payload,
                     candidate_id=cid)
    row = cands.slices_frame(store, "fast").set_index("name").loc["other-items"]
    assert row["ratio_low"] == pytest.approx(22 * 0.97 / 20) and "not paired" in row["ratio_interval"]
    compare = cands.compare_frame(store, [ids["w8"], cid], "fast")
    en = compare[(compare["slice"] == "en") & (compare["name"] == "other-items")].iloc[0]
    assert "not paired" in en["paired_test"] and pd.isna(en.get("nll_p"))


def test_compare_pairs_on_the_same_items(seeded):
    store, ids = seeded
    table = cands.compare_frame(store, [ids["w8"], ids["en-star"]], "fast")
    ar = table[(table["slice"] == "ar") & (table["name"] == "en-star")].iloc[0]
    assert ar["delta_ppl"] == pytest.approx(48.0 - 30.6)
    assert ar["nll_p"] < 0.05 and ar["significant"]  # a 57% jump in ppl on every item is no accident
    mc = table[(table["slice"] == "mc") & (table["name"] == "en-star")].iloc[0]
    assert mc["flips_vs_baseline"] == 4 and 0 <= mc["accuracy_p"] <= 1
    assert set(table[table["role"] == "baseline"]["name"]) == {"w8"}
    with pytest.raises(ShrinkError, match="2 to 5 candidates"):
        cands.compare_frame(store, [ids["w8"]], "fast")


def test_plan_diff_layer_by_layer(tiny_model):
    from shrink_core.model.inventory import inventory

    rows = [r.row() for r in inventory(tiny_model)]
    diff = cands.plan_diff(rows, {"w4": W4, "w4-keep0": W4_KEEP0, "reference": None})
    block0 = diff[diff["block"] == 0]
    assert set(block0["w4-keep0"]) == {"kept (rule 1)"}
    assert set(block0["w4"]) == {"int4 g64 asym rtn"}
    assert set(diff["reference"]) == {"unchanged"}
    # only modules where the plans differ: w4 vs w4-keep0 differ on block 0 only, the reference differs on every linear
    two = cands.plan_diff(rows, {"w4": W4, "w4-keep0": W4_KEEP0})
    assert set(two["block"]) == {0} and len(two) == 7


def test_rename_tag_delete_and_export(seeded):
    store, ids = seeded
    cands.rename(store, ids["w4"], "w4 g64 rtn")
    assert cands.set_tags(store, ids["w4"], "slides, keep ,slides") == "slides,keep"
    files = cands.export_files(store, ids["w4-keep0"])
    assert "keep: true" in files["plan.yaml"]
    prov = json.loads(files["provenance.json"])
    assert [p["name"] for p in prov["lineage"]] == ["w4 g64 rtn", "reference"]
    assert prov["calibration"]["mix"] == {"en": 0.5, "ar": 0.5}
    assert {r["kind"] for r in prov["results"]} == {"eval"}
    cands.delete(store, ids["en-star"])
    assert "en-star" not in set(cands.candidates_frame(store)["name"])
    assert "plan.yaml" not in cands.export_files(store, ids["reference"])
    with pytest.raises(ShrinkError, match="No candidate with id 999"):
        cands.rename(store, 999, "x")


def _paired_store(store: Store, n_items: int, shifts: dict[str, float], stored_ci: bool = True) -> dict[str, int]:
    """A reference and one candidate scored on the same `n_items` items of each slice; the candidate's per-token NLL
    is the reference's plus `shift` plus a fixed symmetric spread (sd 1 nat/token), so its p-value is known."""
    rng = np.random.default_rng(7)
    half = rng.normal(0, 1, n_items // 2)
    spread = np.concatenate([half, -half])
    spread = spread / spread.std()
    ids = {}
    for name, kind in (("reference", "reference"), ("cand", "quantized")):
        cid = store.upsert_candidate(name=name, kind=kind, model_spec=SPEC, weights_hash="h0", code_version="test",
                                     plan=None if kind == "reference" else W8 | {"name": name},
                                     parent_id=ids.get("reference"))
        ids[name] = cid
        for index, (slice_id, shift) in enumerate(shifts.items()):
            payload = _payload(slice_id, 20.0, index)
            nll = np.array(payload["per_item"]["nll"][:n_items])
            if kind != "reference":
                nll = nll + 10 * (shift + spread)  # 10 tokens per item
            ppl = math.exp(nll.sum() / (10 * n_items))
            payload.update(items=n_items, tokens=10 * n_items, nll=math.log(ppl), ppl=ppl,
                           ppl_ci=[ppl * 0.9, ppl * 1.1] if stored_ci else None,  # as stored before the minimum
                           per_item={"ids": payload["per_item"]["ids"][:n_items], "nll": nll.tolist(),
                                     "tokens": [10] * n_items})
            store.add_result("eval", Provenance(SPEC, "h0", "test", "cpu", slice=slice_id, budget="fast"), payload,
                             candidate_id=cid)
    return ids


def test_compare_holm_adjusts_over_the_slices_shown(shrink_home):
    store = Store()
    ids = _paired_store(store, ITEMS, {"en": 0.35, "fr": 0.0, "de": 0.0})
    table = cands.compare_frame(store, [ids["reference"], ids["cand"]], "fast").set_index(["name", "slice"])
    en = table.loc[("cand", "en")]
    assert 0.01 < en["nll_p"] < 0.05  # alone, en would look significant ...
    assert en["nll_p_holm"] == pytest.approx(3 * en["nll_p"])  # ... but three slices were looked at
    assert not en["significant"] and en["holm"] == "Holm-adjusted over 3 tests on 3 slices"
    assert table.loc[("cand", "fr"), "nll_p"] == 1.0 and not table.loc[("cand", "fr"), "significant"]
    assert pd.isna(table.loc[("reference", "en"), "nll_p_holm"])  # the baseline is not tested against itself
    # the reference tests of the report run the same family
    tests = cands.reference_tests(store, "fast").set_index("slice")
    assert tests.loc["en", "nll_p_holm"] == pytest.approx(en["nll_p_holm"]) and not tests.loc["en", "significant"]


def test_strong_differences_stay_significant_after_adjustment(seeded):
    store, ids = seeded
    table = cands.compare_frame(store, [ids["w8"], ids["en-star"]], "fast")
    ar = table[(table["slice"] == "ar") & (table["name"] == "en-star")].iloc[0]
    assert ar["nll_p"] > 0 and ar["nll_p_holm"] < 0.05 and ar["significant"]
    assert ar["holm"] == "Holm-adjusted over 4 tests on 3 slices"  # NLL on en, ar, mc and accuracy on mc


def test_no_interval_for_a_slice_of_few_items(shrink_home):
    store = Store()
    _paired_store(store, 4, {"en": 0.5})
    table = cands.slices_frame(store, "fast").set_index("name")
    for name in ("reference", "cand"):
        assert pd.isna(table.loc[name, "ppl_low"]) and pd.isna(table.loc[name, "ppl_high"])  # stored one dropped
        assert table.loc[name, "interval_note"] == "n=4 items: too few for an interval (fewer than 20)"
    cand = table.loc["cand"]
    assert pd.isna(cand["ratio_low"]) and cand["ratio_interval"].startswith("n=4 items: too few")
