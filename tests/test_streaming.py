"""Streaming results: a multi-part job stores each part as soon as it is done, says so on the job row, and a cancel
keeps what was finished. Toy model and toy slices; the page side is in test_page_evalsets.py."""
import pytest

from shrink_core.errors import JobCancelled
from shrink_core.results.eval_run import run_eval
from shrink_core.results.store import Store
from shrink_core.runtime import jobs
from shrink_core.sensitivity import run_scan, stored_records
from tests.test_protocol import tiny_loaded

PLAN = ("version: 1\nrules:\n  - kind: [q, k, v, o, gate, up, down]\n"
        "    weights: {bits: 4, group_size: 64, symmetric: false, method: rtn}\n")


@pytest.mark.parametrize("plan", [None, PLAN], ids=["baseline", "candidate"])
def test_each_slice_is_stored_before_the_next_one_starts(toy_dir, shrink_home, plan):
    store, seen = Store(), []

    def part(slice_id, entry):  # what a page polling the store would find at this moment
        stored = {r["slice"] for r in store.results("eval") if (r["plan"] is None) == (plan is None)}
        seen.append((slice_id, sorted(stored), entry["ppl"]))

    report = run_eval(str(toy_dir), ["toy_en", "toy_mc"], "fast", plan, store=store, part=part)
    assert [s for s, _, _ in seen] == ["toy_en", "toy_mc"]
    assert seen[0][1] == ["toy_en"] and seen[1][1] == ["toy_en", "toy_mc"]  # the second is not stored yet at the first
    assert [p for _, _, p in seen] == [report["slices"][s]["ppl"] for s in ("toy_en", "toy_mc")]
    if plan:
        assert "kl" in report["slices"]["toy_en"] and report["slices"]["toy_en"]["reference_ppl"] > 0


def test_a_job_records_its_parts_and_a_cancel_keeps_the_finished_ones(toy_dir, shrink_home, monkeypatch):
    store = Store()
    job_id = jobs.submit(store, "eval", "shrink_core.results.eval_run:eval_job",
                         {"spec": str(toy_dir), "slices": ["toy_en", "toy_mc", "toy_exact"], "budget": "fast"},
                         spawn=False)
    original = jobs.JobContext.part_done

    def cancel_after_first(self, name):
        original(self, name)
        jobs.cancel(self.store, self.job_id)  # the user presses Cancel right after the first slice

    monkeypatch.setattr(jobs.JobContext, "part_done", cancel_after_first)
    job = jobs.run_job(store, job_id, heartbeat=False)
    assert job.status == "cancelled"
    assert job.parts == ("toy_en",) and job.parts_total == 3
    assert job.parts_text("slices") == "1 of 3 slices done (toy_en)"
    kept = store.results("eval", job_id=job_id)
    assert [r["slice"] for r in kept] == ["toy_en"]  # stored with the job that made it, and not lost by the cancel


def test_a_finished_job_lists_every_part(toy_dir, shrink_home):
    store = Store()
    job_id = jobs.submit(store, "eval", "shrink_core.results.eval_run:eval_job",
                         {"spec": str(toy_dir), "slices": ["toy_en", "toy_mc"], "budget": "fast", "plan": PLAN},
                         spawn=False)
    job = jobs.run_job(store, job_id, heartbeat=False)
    assert job.status == "done" and job.parts == ("toy_en", "toy_mc") and job.parts_total == 2
    assert {r["slice"] for r in store.results("eval", job_id=job_id) if r["plan"]} == {"toy_en", "toy_mc"}


def test_a_scan_reports_each_slice_once_all_its_scores_are_stored(shrink_home):
    store, loaded, seen = Store(), tiny_loaded(), []

    def part(slice_id, records):
        stored = {r.slice for r in stored_records(store, loaded.spec.raw)}
        seen.append((slice_id, len(records), sorted(stored)))

    report = run_scan(loaded, ["toy_en", "en"], ["w4g64"], "fast", "quick", store=store, part=part)
    assert [s for s, _, _ in seen] == ["toy_en", "en"]
    assert seen[0][2] == ["toy_en"]  # the second slice's scores did not exist yet when the first was reported
    assert sum(n for _, n, _ in seen) == len(report.records)


def test_progress_never_goes_back_across_slices(toy_dir, shrink_home):
    fractions = []
    run_eval(str(toy_dir), ["toy_en", "toy_mc"], "fast", PLAN, store=Store(),
             progress=lambda f, m="": fractions.append(f))
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_part_done_on_a_cancelled_job_still_records(shrink_home):
    """A part stored just as the user cancels is still listed: the row says what the store holds."""
    store = Store()
    job_id = jobs.submit(store, "tick", "shrink_core.runtime.diagnostics:tick_job", {}, spawn=False)
    ctx = jobs.JobContext(store, job_id)
    ctx.expect_parts(2)
    jobs.cancel(store, job_id)
    ctx.part_done("a")
    assert jobs.get(store, job_id).parts == ("a",)
    with pytest.raises(JobCancelled):
        ctx.check_cancel()
