"""The experiment store: one SQLite database (WAL) under $SHRINK_HOME, with versioned migrations.

Every result carries its provenance (model spec + weights hash, plan, slice, budget, code version, device),
so a figure on any page can say where it came from.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from shrink_core.errors import ShrinkError
from shrink_core.paths import shrink_home

STORE_ENV = "SHRINK_DB"  # a store file other than $SHRINK_HOME/shrink.db (e.g. a fresh one beside a corrupt one)

# Append-only: migration i takes the schema from version i to i + 1. Never edit a released entry.
MIGRATIONS = [
    """
    CREATE TABLE models (
        id INTEGER PRIMARY KEY,
        spec TEXT NOT NULL,
        weights_hash TEXT NOT NULL,
        source_dir TEXT,
        summary_json TEXT NOT NULL,
        modules_json TEXT NOT NULL,
        load_seconds REAL,
        from_cache INTEGER,
        created REAL NOT NULL,
        UNIQUE (spec, weights_hash)
    );
    CREATE TABLE plans (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        body TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        target TEXT NOT NULL,
        params_json TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        progress REAL NOT NULL DEFAULT 0,
        message TEXT NOT NULL DEFAULT '',
        eta_s REAL,
        pid INTEGER,
        heartbeat REAL,
        cancel_requested REAL,
        error TEXT,
        result_json TEXT,
        created REAL NOT NULL,
        started REAL,
        finished REAL
    );
    CREATE INDEX jobs_status ON jobs (status);
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        job_id INTEGER REFERENCES jobs (id),
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        params_json TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE TABLE metrics (
        run_id INTEGER NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        step INTEGER NOT NULL,
        key TEXT NOT NULL,
        value REAL NOT NULL,
        t REAL NOT NULL
    );
    CREATE INDEX metrics_run ON metrics (run_id, key, step);
    CREATE TABLE results (
        id INTEGER PRIMARY KEY,
        job_id INTEGER REFERENCES jobs (id),
        kind TEXT NOT NULL,
        model_spec TEXT NOT NULL,
        weights_hash TEXT NOT NULL,
        plan_json TEXT,
        slice TEXT,
        budget TEXT,
        code_version TEXT NOT NULL,
        device TEXT NOT NULL,
        payload_json TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE INDEX results_lookup ON results (kind, model_spec, weights_hash, slice, budget);
    """,
    # v2: candidates (every evaluated model variant, with lineage) and results attached to them.
    """
    CREATE TABLE candidates (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('reference', 'quantized', 'pruned', 'mixed', 'distilled', 'planner',
                                           'imported')),
        parent_id INTEGER REFERENCES candidates (id),
        model_spec TEXT NOT NULL,
        weights_hash TEXT NOT NULL,
        plan_json TEXT,
        calibration_json TEXT,
        artifact_dir TEXT,
        code_version TEXT NOT NULL,
        tags TEXT NOT NULL DEFAULT '',
        notes TEXT NOT NULL DEFAULT '',
        created REAL NOT NULL,
        deleted REAL
    );
    CREATE UNIQUE INDEX candidates_identity ON candidates (model_spec, weights_hash, COALESCE(plan_json, ''))
        WHERE deleted IS NULL;
    ALTER TABLE results ADD COLUMN candidate_id INTEGER REFERENCES candidates (id);
    CREATE INDEX results_candidate ON results (candidate_id, kind, slice);
    """,
    # v3: a job's worker is known by pid and process create time, so a pid reused by another process is not "alive".
    """
    ALTER TABLE jobs ADD COLUMN pid_created REAL;
    """,
    # v4: a multi-part job (slices, candidates) records each part it finished and stored, so pages show it at once.
    """
    ALTER TABLE jobs ADD COLUMN parts_json TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE jobs ADD COLUMN parts_total INTEGER;
    """,
    # v5: where and in what dtype a model was described ("cuda:0 bf16 (...)"): the Model page and memory admission
    # read it (older rows: NULL, read as the CPU in fp32, where every earlier description ran)
    """
    ALTER TABLE models ADD COLUMN device TEXT;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
DRAFT_PREFIX = "draft:"  # the plans table holds each model's Plan page draft under this prefix + the model spec


@dataclass(frozen=True)
class Provenance:
    """Where a result came from; stored with every result."""

    model_spec: str
    weights_hash: str
    code_version: str
    device: str
    plan: dict | None = None
    slice: str | None = None
    budget: str | None = None


def default_path() -> Path:
    """`$SHRINK_DB` if set, else `$SHRINK_HOME/shrink.db`."""
    override = os.environ.get(STORE_ENV)
    return Path(override).expanduser() if override else shrink_home() / "shrink.db"


def fresh_path_beside(path: Path) -> Path:
    """A name for a new store next to `path` that no file has yet: shrink.db -> shrink-20260101-120000.db."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = path.with_name(f"{path.stem}-{stamp}{path.suffix}"), 1
    while candidate.exists() or candidate.with_name(candidate.name + "-wal").exists():
        candidate, n = path.with_name(f"{path.stem}-{stamp}-{n}{path.suffix}"), n + 1
    return candidate


class StoreUnreadable(ShrinkError):
    """The store file is not a readable SQLite database; it is never touched, a new store can start beside it."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason, self.fresh = path, reason, fresh_path_beside(path)
        super().__init__(
            f"The store {path} cannot be read ({reason}) and was left as it is; to start a new store beside it, "
            f"run with {STORE_ENV}={self.fresh} (e.g. `{STORE_ENV}={self.fresh} python -m shrink_core ...`)."
        )


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """Not a database / malformed, as opposed to a busy or locked one (OperationalError is a DatabaseError too)."""
    name = getattr(exc, "sqlite_errorname", "")
    return name in ("SQLITE_NOTADB", "SQLITE_CORRUPT") or (name == "" and type(exc) is sqlite3.DatabaseError)


class Store:
    """A thin, typed door to the database. Safe to open from many processes at once (WAL + busy timeout)."""

    def __init__(self, path: Path | str | None = None):
        self.path = Path(path) if path else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        try:
            # Read the header and the schema before anything writes, so a damaged file is refused untouched.
            self.conn.execute("PRAGMA user_version").fetchone()
            self.conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA busy_timeout=30000")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            self.conn.close()
            if _is_corruption(exc):
                raise StoreUnreadable(self.path, str(exc)) from None
            raise

    def _migrate(self) -> None:
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ShrinkError(
                f"The store {self.path} has schema version {version}, newer than this code's {SCHEMA_VERSION}; "
                "update shrink or point SHRINK_HOME elsewhere."
            )
        for index in range(version, SCHEMA_VERSION):
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                # Another process may have migrated while we waited for the lock.
                if self.conn.execute("PRAGMA user_version").fetchone()[0] != index:
                    self.conn.execute("ROLLBACK")
                    continue
                for statement in MIGRATIONS[index].split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {index + 1}")
                self.conn.execute("COMMIT")
            except Exception:
                self.conn.execute("ROLLBACK")
                raise

    @property
    def schema_version(self) -> int:
        return self.conn.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        self.conn.close()

    def change_counter(self) -> tuple[int, int]:
        """Changes whenever the store was written: by another connection (PRAGMA data_version) or by this one
        (rows it changed). Equal counters mean nothing changed, so cached reads keyed on it are still right."""
        return self.conn.execute("PRAGMA data_version").fetchone()[0], self.conn.total_changes

    def execute(self, sql: str, params: tuple | dict = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    # ------------------------------------------------------------ models

    def save_model(self, description: dict) -> int:
        """Upsert a model description (summary + inventory) as produced by `modelinfo.describe`."""
        self.conn.execute(
            """INSERT INTO models (spec, weights_hash, source_dir, summary_json, modules_json, load_seconds,
                                   from_cache, created, device)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (spec, weights_hash) DO UPDATE SET
                   summary_json = excluded.summary_json, modules_json = excluded.modules_json,
                   source_dir = excluded.source_dir, load_seconds = excluded.load_seconds,
                   from_cache = excluded.from_cache, created = excluded.created, device = excluded.device""",
            (
                description["spec"],
                description["weights_hash"],
                description.get("source_dir"),
                json.dumps(description["summary"]),
                json.dumps(description["modules"]),
                description.get("load_seconds"),
                int(bool(description.get("from_cache"))),
                time.time(),
                description.get("device"),
            ),
        )
        row = self.conn.execute(
            "SELECT id FROM models WHERE spec = ? AND weights_hash = ?", (description["spec"], description["weights_hash"])
        ).fetchone()
        return row["id"]

    def latest_model(self, spec: str) -> dict | None:
        row = self.conn.execute(
            "SELECT * FROM models WHERE spec = ? ORDER BY created DESC LIMIT 1", (spec,)
        ).fetchone()
        if row is None:
            return None
        return {
            "id": row["id"],
            "spec": row["spec"],
            "weights_hash": row["weights_hash"],
            "source_dir": row["source_dir"],
            "summary": json.loads(row["summary_json"]),
            "modules": json.loads(row["modules_json"]),
            "load_seconds": row["load_seconds"],
            "from_cache": bool(row["from_cache"]),
            "created": row["created"],
            "device": row["device"],
        }

    def model_specs(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT spec FROM models GROUP BY spec ORDER BY MAX(created) DESC")]

    # ------------------------------------------------------------ plans

    def save_plan(self, name: str, body: str) -> int:
        cursor = self.conn.execute("INSERT INTO plans (name, body, created) VALUES (?, ?, ?)", (name, body, time.time()))
        return cursor.lastrowid

    def plans(self) -> list[dict]:
        """Saved plans (a model's working draft, named DRAFT_PREFIX + spec, is not one of them)."""
        return [dict(r) for r in self.conn.execute("SELECT * FROM plans WHERE name NOT LIKE ? ORDER BY created DESC",
                                                   (DRAFT_PREFIX + "%",))]

    def save_draft(self, model_spec: str, body: str) -> None:
        """Keep the Plan page's draft for `model_spec` (one row per spec), so a reload or a restart finds it."""
        name = DRAFT_PREFIX + model_spec
        with self.conn:  # one transaction: readers never see the spec without a draft
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.execute("DELETE FROM plans WHERE name = ?", (name,))
            self.conn.execute("INSERT INTO plans (name, body, created) VALUES (?, ?, ?)", (name, body, time.time()))

    def draft(self, model_spec: str) -> str | None:
        """The last saved draft for `model_spec`, or None."""
        row = self.conn.execute("SELECT body FROM plans WHERE name = ? ORDER BY id DESC LIMIT 1",
                                (DRAFT_PREFIX + model_spec,)).fetchone()
        return row["body"] if row else None

    # ------------------------------------------------------------ runs and metrics (live curves)

    def create_run(self, kind: str, name: str, params: dict, job_id: int | None = None) -> int:
        cursor = self.conn.execute(
            "INSERT INTO runs (job_id, kind, name, params_json, created) VALUES (?, ?, ?, ?, ?)",
            (job_id, kind, name, json.dumps(params), time.time()),
        )
        return cursor.lastrowid

    def log_metrics(self, run_id: int, step: int, values: dict[str, float]) -> None:
        now = time.time()
        self.conn.executemany(
            "INSERT INTO metrics (run_id, step, key, value, t) VALUES (?, ?, ?, ?, ?)",
            [(run_id, step, key, float(value), now) for key, value in values.items()],
        )

    def metrics(self, run_id: int) -> list[dict]:
        return [
            dict(r)
            for r in self.conn.execute("SELECT step, key, value, t FROM metrics WHERE run_id = ? ORDER BY step", (run_id,))
        ]

    # ------------------------------------------------------------ candidates

    def upsert_candidate(self, *, name: str, kind: str, model_spec: str, weights_hash: str, code_version: str,
                         plan: dict | None = None, calibration: dict | None = None, parent_id: int | None = None,
                         artifact_dir: str | None = None) -> int:
        """The candidate with this identity (model + plan), created if new; lineage is set on creation.

        One statement: two writers upserting the same identity at once get the same row, never a duplicate or an
        IntegrityError. An existing candidate keeps its name, kind, lineage and notes."""
        plan_json = json.dumps(plan, sort_keys=True) if plan is not None else None
        rows = self.conn.execute(
            """INSERT INTO candidates (name, kind, parent_id, model_spec, weights_hash, plan_json, calibration_json,
                                       artifact_dir, code_version, created)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (model_spec, weights_hash, COALESCE(plan_json, '')) WHERE deleted IS NULL
               DO UPDATE SET model_spec = candidates.model_spec
               RETURNING id""",
            (name, kind, parent_id, model_spec, weights_hash, plan_json,
             json.dumps(calibration, sort_keys=True) if calibration is not None else None, artifact_dir, code_version,
             time.time()),
        ).fetchall()  # read to the end: the statement (and its write lock) ends here, not when garbage-collected
        return rows[0]["id"]

    def candidates(self, include_deleted: bool = False) -> list[dict]:
        sql = "SELECT * FROM candidates" + ("" if include_deleted else " WHERE deleted IS NULL") + " ORDER BY id"
        out = []
        for row in self.conn.execute(sql):
            item = dict(row)
            item["plan"] = json.loads(item.pop("plan_json")) if row["plan_json"] else None
            item["calibration"] = json.loads(item.pop("calibration_json")) if row["calibration_json"] else None
            out.append(item)
        return out

    def update_candidate(self, candidate_id: int, **fields) -> None:
        allowed = {"name", "tags", "notes", "deleted"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"cannot update candidate fields {sorted(unknown)}")
        for key, value in fields.items():
            self.conn.execute(f"UPDATE candidates SET {key} = ? WHERE id = ?", (value, candidate_id))

    # ------------------------------------------------------------ results

    def add_result(self, kind: str, provenance: Provenance, payload: dict, job_id: int | None = None,
                   candidate_id: int | None = None) -> int:
        cursor = self.conn.execute(
            """INSERT INTO results (job_id, kind, model_spec, weights_hash, plan_json, slice, budget, code_version,
                                    device, payload_json, created, candidate_id)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                job_id,
                kind,
                provenance.model_spec,
                provenance.weights_hash,
                json.dumps(provenance.plan, sort_keys=True) if provenance.plan is not None else None,
                provenance.slice,
                provenance.budget,
                provenance.code_version,
                provenance.device,
                json.dumps(payload),
                time.time(),
                candidate_id,
            ),
        )
        return cursor.lastrowid

    def overview(self, model_spec: str) -> dict:
        """How far a model has come along the path (counts only, cheap enough for every page render): described,
        baseline slices, scanned slices, a plan draft, candidates beyond the reference."""
        def count(sql: str) -> int:
            return self.conn.execute(sql, (model_spec,)).fetchone()[0]

        baseline = count("SELECT COUNT(DISTINCT slice) FROM results WHERE kind = 'eval' AND model_spec = ?"
                         " AND plan_json IS NULL")
        scanned = count("SELECT COUNT(DISTINCT slice) FROM results WHERE kind = 'sensitivity' AND model_spec = ?")
        return {
            # a job that loaded the model (a baseline, a scan) counts as loaded too, Model page visited or not
            "described": bool(count("SELECT COUNT(*) FROM models WHERE spec = ?") or baseline or scanned),
            "baseline_slices": baseline,
            "scanned_slices": scanned,
            "draft": self.draft(model_spec) is not None,
            "candidates": count("SELECT COUNT(*) FROM candidates WHERE model_spec = ? AND kind != 'reference'"
                                " AND deleted IS NULL"),
        }

    def devices(self, kind: str, model_spec: str) -> list[str]:
        """The devices (with dtype) a model's results of one kind were computed on, for a page's provenance line."""
        rows = self.conn.execute("SELECT DISTINCT device FROM results WHERE kind = ? AND model_spec = ? ORDER BY 1",
                                 (kind, model_spec))
        return [r[0] for r in rows]

    def results(self, kind: str | None = None, **where) -> list[dict]:
        """Results, newest first, filtered by kind and any of model_spec, weights_hash, slice, budget, job_id."""
        allowed = {"model_spec", "weights_hash", "slice", "budget", "job_id", "plan_json", "candidate_id"}
        unknown = set(where) - allowed
        if unknown:
            raise ValueError(f"cannot filter results by {sorted(unknown)}")
        clauses, params = [], []
        if kind is not None:
            clauses.append("kind = ?")
            params.append(kind)
        for key, value in where.items():
            clauses.append(f"{key} = ?")
            params.append(value)
        sql = "SELECT * FROM results" + (" WHERE " + " AND ".join(clauses) if clauses else "") + " ORDER BY id DESC"
        rows = []
        for row in self.conn.execute(sql, params):
            item = dict(row)
            item["payload"] = json.loads(item.pop("payload_json"))
            plan_json = item.pop("plan_json")
            item["plan"] = json.loads(plan_json) if plan_json else None
            rows.append(item)
        return rows
