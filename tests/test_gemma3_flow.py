"""Gemma 3 270M through the whole flow, as a user drives it from the CLI: describe, scan, plan under a budget,
evaluate the plan against the reference, find the candidate. (Its 262k vocabulary, sliding-window blocks and soft-
capped logits are what Llama-only code gets wrong.)"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
SPEC = "builtin:gemma3-270m"


def cli(*args, home: Path) -> dict:
    run = subprocess.run([sys.executable, "-m", "shrink_core", *args, "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=1800, env={**os.environ, "SHRINK_HOME": str(home)})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1] if args[0] in ("eval", "sensitivity") else run.stdout)


def test_gemma3_model_to_results(shrink_home, tmp_path):
    seconds = {}
    started = time.perf_counter()
    described = cli("inspect", "--model", SPEC, home=shrink_home)
    seconds["inspect"] = time.perf_counter() - started
    assert described["summary"]["model_type"] == "gemma3_text" and described["summary"]["block_linears"] == 126
    started = time.perf_counter()
    # one slice: the family's plumbing is what is at stake here, not a second language (each CLI call loads afresh)
    scan = cli("sensitivity", "--model", SPEC, "--slices", "en", "--settings", "w4g64,w3g64", "--depth", "quick",
               home=shrink_home)
    seconds["scan"] = time.perf_counter() - started
    assert scan["timings"]["fisher_streamed"] is False and scan["timings"]["predicted_peak_bytes"] > 0
    assert len({r["module"] for r in scan["records"]}) == 126 + 1  # the block linears and the tied embedding
    plan_file = tmp_path / "plan.yaml"
    started = time.perf_counter()
    plan = cli("plan", "--model", SPEC, "--budget-bits", "3.5", "--objective", "worst", "--slices", "en",
               "--settings", "w4g64,w3g64", "--out", str(plan_file), home=shrink_home)
    seconds["plan"] = time.perf_counter() - started
    assert plan_file.is_file() and (plan["depth"], plan["computed_scores"]) == ("quick", 0)  # the scan above, reused
    started = time.perf_counter()
    result = cli("eval", "--model", SPEC, "--slices", "en", "--plan", str(plan_file), home=shrink_home)
    seconds["eval"] = time.perf_counter() - started
    en = result["slices"]["en"]
    assert 0 < en["kl"] < 5 and result["device"].startswith("cpu fp32")
    candidates = cli("candidates", "list", home=shrink_home)
    assert any(c.get("candidate_id") == result["candidate_id"] or c.get("id") == result["candidate_id"]
               for c in (candidates if isinstance(candidates, list) else candidates.get("candidates", [])))
    print(json.dumps({"gemma3_flow_seconds": {k: round(v, 1) for k, v in seconds.items()}, "en_kl": en["kl"]}))
