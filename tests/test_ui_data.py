"""The pages' data layer: reads cached on the store's change counter, and an unreadable store offered a fresh one."""
import functools

from streamlit.testing.v1 import AppTest

from shrink_core.paths import REPO_ROOT
from shrink_core.results import candidates as cands
from shrink_core.results.store import Store

from .test_candidates import seed_store

RESULTS_PAGE = str(REPO_ROOT / "app_pages" / "results.py")


def test_change_counter_moves_on_every_write_from_anywhere_and_not_on_reads(shrink_home):
    mine, other = Store(), Store()
    start = mine.change_counter()
    mine.candidates(), mine.results("eval"), other.candidates()
    assert mine.change_counter() == start
    mine.save_plan("a", "rules: []")
    after_own = mine.change_counter()
    assert after_own != start
    other.save_plan("b", "rules: []")  # another connection (a worker process is the same to SQLite)
    assert mine.change_counter() != after_own


def _count_reads(monkeypatch, calls: list):
    """Record every real read of the store (the methods still run; only the calls are written down)."""
    for name in ("results", "candidates", "latest_model"):
        original = getattr(Store, name)

        @functools.wraps(original)
        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls.append((_name, args, tuple(sorted(kwargs.items()))))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(Store, name, counted)


def test_results_page_reads_each_thing_once_and_nothing_on_a_rerun_without_changes(shrink_home, monkeypatch):
    ids = seed_store(Store())
    calls = []
    _count_reads(monkeypatch, calls)
    at = AppTest.from_file(RESULTS_PAGE, default_timeout=60).run()
    assert not at.exception, at.exception
    assert calls and len(calls) == len(set(calls)), "the same read ran twice in one rerun"
    calls.clear()
    at.run()
    assert not at.exception and calls == []  # nothing changed: nothing re-read, nothing re-parsed
    cands.rename(Store(), ids["w8"], "w8 renamed")  # a write from another connection, as a worker's would be
    at.run()
    assert calls, "a change in the store was not seen"
    assert "w8 renamed" in set(next(d.value for d in at.dataframe if "on_frontier" in d.value.columns)["name"])


def test_unreadable_store_offers_a_new_one_beside_it_and_never_touches_it(shrink_home, monkeypatch):
    damaged = shrink_home / "shrink.db"
    shrink_home.mkdir(parents=True, exist_ok=True)
    damaged.write_bytes(b"not a database at all\n" * 300)
    before = damaged.read_bytes()
    monkeypatch.setenv("SHRINK_DB", str(damaged))  # the page switches it; monkeypatch puts it back afterwards
    at = AppTest.from_file(RESULTS_PAGE, default_timeout=60).run()
    assert not at.exception, at.exception
    (error,) = at.error
    assert error.value.startswith(f"The store {damaged} cannot be read (file is not a database)")
    assert "Traceback" not in error.value
    button = at.button(key="start_fresh_store")
    assert "Start a new store beside it (shrink-" in button.label
    assert damaged.read_bytes() == before
    button.click().run()
    assert not at.exception, at.exception
    assert not at.error and any("No evaluated candidates yet" in i.value for i in at.info)
    (fresh,) = list(shrink_home.glob("shrink-*.db"))
    assert any(f"Started a new store at {fresh}" in s.value and "SHRINK_DB=" in s.value for s in at.success)
    assert damaged.read_bytes() == before and Store(fresh).candidates() == []


def test_a_queued_job_shows_its_place_in_the_queue(shrink_home, monkeypatch):
    import time

    from shrink_core.runtime import jobs

    monkeypatch.delenv("SHRINK_MAX_JOBS", raising=False)
    store = Store()
    tick = "shrink_core.runtime.diagnostics:tick_job"
    running = jobs.submit(store, "tick", tick, {}, spawn=False)
    me, created = jobs._process_identity()  # stands for a live worker holding the only slot
    store.execute("UPDATE jobs SET status = 'running', started = ?, heartbeat = ?, pid = ?, pid_created = ? WHERE id = ?",
                  (time.time(), time.time(), me, created, running))
    queued = jobs.submit(store, "eval", tick, {}, spawn=False)
    at = AppTest.from_file(str(REPO_ROOT / "app_pages" / "evalsets.py"), default_timeout=60)
    at.session_state["job:eval"] = queued
    at.run()
    assert not at.exception, at.exception
    texts = [p.proto.text for p in at.get("progress")]
    assert any("Queued: position 1 in the queue; 1 of 1 job slot busy (set SHRINK_MAX_JOBS" in t for t in texts), texts
