"""Sensitivity on the real built-in model: the CLI's records and the page's job, on the quick budget."""
import json

import pytest

from shrink_core.cli.entry import main
from shrink_core.results.store import Store
from shrink_core.runtime import jobs

pytestmark = pytest.mark.integration


def test_cli_prints_one_record_per_module_setting_slice(shrink_home, capsys):
    assert main(["sensitivity", "--slices", "toy_en", "--settings", "w8,w3g64", "--depth", "quick", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == {"part": "toy_en", "records": (210 + 1) * 2, "seconds_so_far": lines[0]["seconds_so_far"]}
    out = lines[-1]  # JSON lines: one per finished slice, then the whole report
    assert len(out["records"]) == (210 + 1) * 2  # block linears (fast) + the tied embedding (exhaustive)
    embedding = [r for r in out["records"] if r["kind"] == "embedding"]
    assert {(r["module"], r["method"], r["block"]) for r in embedding} == {("model.embed_tokens", "exhaustive", -1)}
    first = out["records"][0]
    assert set(first) == {"module", "block", "kind", "setting", "slice", "metric", "value", "method", "depth"}
    assert first["depth"] == "quick"
    assert out["seconds"] > 0 and out["method"] == "fast"
    by = {(r["module"], r["setting"]): r["value"] for r in out["records"]}
    harsher = sum(by[(m, "w3g64")] > by[(m, "w8")] for m, s in by if s == "w8")
    assert harsher >= 200  # 3-bit hurts more than 8-bit almost everywhere
    again = json.loads((main(["sensitivity", "--slices", "toy_en", "--settings", "w8", "--depth", "quick", "--json"]),
                        capsys.readouterr().out)[1].splitlines()[-1])
    assert again["computed"] == 0 and again["reused"] == 210 + 1


def test_cli_refuses_unknown_setting_in_one_sentence(shrink_home, capsys):
    assert main(["sensitivity", "--settings", "w5g64"]) == 1
    assert capsys.readouterr().err.strip().startswith("error: Unknown setting 'w5g64'; choose from:")


def test_page_job_stores_records(shrink_home):
    store = Store()
    job_id = jobs.submit(store, "sensitivity", "shrink_core.sensitivity:sensitivity_job",
                         {"spec": "builtin:smollm2-135m", "slices": ["toy_en"], "settings": ["w4g64"],
                          "budget": "quick", "check": 0}, spawn=False)
    job = jobs.run_job(store, job_id, heartbeat=False)
    assert job.status == "done", job.error
    rows = store.results("sensitivity", model_spec="builtin:smollm2-135m", slice="toy_en", budget="quick")
    by_method = {r["payload"]["method"]: r for r in rows}
    assert len(rows) == 2 and len(by_method["fast"]["payload"]["values"]) == 210
    assert list(by_method["exhaustive"]["payload"]["values"]) == ["model.embed_tokens"]
    assert all(r["job_id"] == job_id for r in rows)
