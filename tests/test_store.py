import sqlite3

import pytest

from shrink_core.errors import ShrinkError
from shrink_core.results.store import SCHEMA_VERSION, Provenance, Store


def test_fresh_store_is_migrated_and_in_wal_mode(shrink_home):
    store = Store()
    assert store.path == shrink_home / "shrink.db"
    assert store.schema_version == SCHEMA_VERSION
    assert store.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in store.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"models", "plans", "jobs", "runs", "metrics", "results"} <= tables


def test_reopening_keeps_data(shrink_home):
    prov = Provenance("builtin:x", "abc", "0.1.0", "cpu", plan={"rules": []}, slice="en", budget="fast")
    first = Store()
    rid = first.add_result("eval", prov, {"ppl": 13.0})
    first.close()
    again = Store()
    (row,) = again.results("eval", slice="en")
    assert row["id"] == rid and row["payload"] == {"ppl": 13.0} and row["plan"] == {"rules": []}
    assert row["model_spec"] == "builtin:x" and row["budget"] == "fast" and row["device"] == "cpu"
    with pytest.raises(ValueError):
        again.results("eval", colour="red")


def test_newer_schema_is_refused(shrink_home):
    Store().close()
    conn = sqlite3.connect(shrink_home / "shrink.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    with pytest.raises(ShrinkError, match="newer than this code"):
        Store()


def test_model_upsert_and_metrics(shrink_home):
    store = Store()
    description = {"spec": "s", "weights_hash": "h", "summary": {"parameters": 1}, "modules": [{"name": "a"}],
                   "load_seconds": 1.0, "from_cache": False}
    first = store.save_model(description)
    description["summary"] = {"parameters": 2}
    assert store.save_model(description) == first
    assert store.latest_model("s")["summary"] == {"parameters": 2}
    assert store.latest_model("s")["device"] is None  # described before devices were kept: read as the CPU
    description["device"] = "cuda:1 bf16 (NVIDIA H100 80GB HBM3, torch 2.13.0)"  # where a page's figures would run
    store.save_model(description)
    assert store.latest_model("s")["device"] == description["device"]
    run = store.create_run("distill", "r1", {"steps": 3})
    store.log_metrics(run, 1, {"loss": 2.5, "lr": 1e-3})
    store.log_metrics(run, 2, {"loss": 2.0})
    assert [m["value"] for m in store.metrics(run) if m["key"] == "loss"] == [2.5, 2.0]


def test_two_connections_write_concurrently(shrink_home):
    a, b = Store(), Store()
    prov = Provenance("m", "h", "v", "cpu")
    for i in range(20):
        a.add_result("k", prov, {"i": i})
        b.add_result("k", prov, {"i": -i})
    assert len(a.results("k")) == 40


def test_v1_database_is_migrated_in_place(shrink_home):
    from shrink_core.results.store import MIGRATIONS

    shrink_home.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(shrink_home / "shrink.db")
    conn.executescript(MIGRATIONS[0])
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO results (kind, model_spec, weights_hash, code_version, device, payload_json, created)"
                 " VALUES ('eval', 'm', 'h', 'v', 'cpu', '{\"ppl\": 2.0}', 0)")
    conn.commit()
    conn.close()
    store = Store()
    assert store.schema_version == SCHEMA_VERSION >= 2
    (row,) = store.results("eval")
    assert row["payload"] == {"ppl": 2.0} and row["candidate_id"] is None


def test_candidates_have_identity_and_lineage(shrink_home):
    store = Store()
    ref = store.upsert_candidate(name="ref", kind="reference", model_spec="m", weights_hash="h", code_version="v")
    assert store.upsert_candidate(name="again", kind="reference", model_spec="m", weights_hash="h", code_version="v") == ref
    child = store.upsert_candidate(name="w4", kind="quantized", model_spec="m", weights_hash="h", code_version="v",
                                   plan={"rules": [{"bits": 4}]}, calibration={"mix": {"en": 1.0}}, parent_id=ref)
    assert child != ref
    store.update_candidate(child, name="w4 renamed", tags="keep")
    rows = {c["id"]: c for c in store.candidates()}
    assert rows[child]["parent_id"] == ref and rows[child]["plan"] == {"rules": [{"bits": 4}]}
    assert rows[child]["name"] == "w4 renamed" and rows[child]["calibration"] == {"mix": {"en": 1.0}}
    store.update_candidate(child, deleted=1.0)
    assert [c["id"] for c in store.candidates()] == [ref]
    with pytest.raises(ValueError):
        store.update_candidate(ref, model_spec="x")


def test_concurrent_upserts_of_one_candidate_agree_on_one_row(shrink_home):
    """Two writers that both looked before either inserted: one row, one id, no IntegrityError."""
    import threading

    Store().close()
    blocker = Store()
    blocker.execute("BEGIN IMMEDIATE")  # holds the write lock: both upserts read first, then queue up to write
    ids, errors = [], []

    def upsert():
        try:
            ids.append(Store().upsert_candidate(name="w4", kind="quantized", model_spec="m", weights_hash="h",
                                                code_version="v", plan={"rules": [{"bits": 4}]}))
        except Exception as exc:  # the race the test is about
            errors.append(exc)

    threads = [threading.Thread(target=upsert) for _ in range(2)]
    for thread in threads:
        thread.start()
    import time

    time.sleep(0.5)
    blocker.execute("COMMIT")
    for thread in threads:
        thread.join(timeout=30)
    assert errors == [] and len(ids) == 2 and ids[0] == ids[1]
    assert [c["id"] for c in Store().candidates()] == [ids[0]]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_store_is_one_sentence_left_untouched_with_a_fresh_one_offered(shrink_home, damage, capsys,
                                                                                  monkeypatch):
    from shrink_core.cli.entry import main

    path = shrink_home / "shrink.db"
    if damage == "garbage":
        shrink_home.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"this is not a database\n" * 400)
    else:
        store = Store()
        for i in range(100):
            store.save_plan(f"p{i}", "x" * 2000)
        store.close()
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = path.read_bytes()
    assert main(["candidates", "list"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith(f"error: The store {path} cannot be read (")
    fresh = err.split("run with SHRINK_DB=")[1].split(" ")[0]
    assert fresh.startswith(str(shrink_home / "shrink-")) and fresh.endswith(".db")
    assert path.read_bytes() == before  # never overwritten
    # The offered command works: a new store beside the damaged one.
    monkeypatch.setenv("SHRINK_DB", fresh)
    assert main(["candidates", "list"]) == 0
    assert "no candidates yet" in capsys.readouterr().out
    assert path.read_bytes() == before and Store(fresh).schema_version == SCHEMA_VERSION
