"""A durable migration queue in SQLite.

The receiver stores each accepted delivery and its migration job in one transaction
*before* answering 2xx, so an event MLflow considers delivered is never lost (MLflow
delivers fire-and-forget: a few retries, no history). Delivery ids are remembered to
reject replays. A job is claimed under a lease that the worker renews while it runs; a
worker that dies leaves a job whose lease expires, and the next worker takes it over.
At most one job per (base model, version) is queued or running at a time, so a burst of
duplicate events runs the migration once.

Nothing grows without bound: :meth:`MigrationQueue.prune` drops delivery ids too old to be
replayed and finished jobs past their retention; the receiver calls it on a timer.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id TEXT PRIMARY KEY,
    event TEXT NOT NULL,
    outcome TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    base_model TEXT NOT NULL,
    to_version TEXT NOT NULL,
    from_version TEXT,
    origin TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL,
    error TEXT,
    result TEXT,
    delivered_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_job_per_key ON jobs(key) WHERE status IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status, id);
"""

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
FINISHED = (DONE, FAILED)


def default_queue_path() -> Path:
    """``$XDG_DATA_HOME/mlflow-recycle/queue.db`` (``~/.local/share/mlflow-recycle/queue.db`` by default)."""
    data_home = os.environ.get("XDG_DATA_HOME", "")
    base = Path(data_home) if Path(data_home).is_absolute() else Path.home() / ".local" / "share"
    return base / "mlflow-recycle" / "queue.db"


def queue_path(setting: str | Path | None) -> Path:
    """The queue file for ``hook.queue``: the default when unset, always absolute."""
    return Path(setting).expanduser().resolve() if setting else default_queue_path()


@dataclass(frozen=True)
class JobSpec:
    """A migration to run: every prompt of ``from_version`` (default: the newest earlier one) to ``to_version``."""

    base_model: str
    to_version: str
    from_version: str | None = None

    @property
    def key(self) -> str:
        return f"{self.base_model}\x1f{self.to_version}\x1f{self.from_version or ''}"


@dataclass(frozen=True)
class Job(JobSpec):
    id: int = 0
    origin: str = ""
    status: str = QUEUED
    attempts: int = 0
    error: str | None = None
    result: str | None = None
    taken_over: bool = False  # claimed from a worker whose lease expired (it crashed or hung)


class MigrationQueue:
    """Deliveries and migration jobs in one SQLite file (WAL, full sync); safe across processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn:
            conn.executescript(SCHEMA)
            columns = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
            if "delivered_at" not in columns:  # a queue file from before deliveries were tracked per job
                conn.execute("ALTER TABLE jobs ADD COLUMN delivered_at REAL")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # committed means on disk: the 2xx promise
        return conn

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")  # take the write lock now: no lost updates between processes
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @staticmethod
    def _insert(conn: sqlite3.Connection, spec: JobSpec, origin: str, now: float) -> int:
        conn.execute(
            "INSERT OR IGNORE INTO jobs"
            " (key, base_model, to_version, from_version, origin, status, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (spec.key, spec.base_model, spec.to_version, spec.from_version, origin, QUEUED, now, now),
        )
        row = conn.execute(
            "SELECT id FROM jobs WHERE key = ? AND status IN (?, ?)", (spec.key, QUEUED, RUNNING)
        ).fetchone()
        return int(row["id"])

    def accept(self, delivery_id: str, event: str, specs: Sequence[JobSpec], outcome: str) -> list[int] | None:
        """Record a delivery and queue its jobs atomically; None when the delivery id was seen before (a replay)."""
        now = time.time()
        with self._transaction() as conn:
            try:
                conn.execute(
                    "INSERT INTO deliveries (delivery_id, event, outcome, received_at) VALUES (?, ?, ?, ?)",
                    (delivery_id, event, outcome, now),
                )
            except sqlite3.IntegrityError:
                return None
            ids = [self._insert(conn, spec, f"webhook:{delivery_id}", now) for spec in specs]
            for job_id in ids:  # also when the delivery joined a job that reconcile had queued
                conn.execute("UPDATE jobs SET delivered_at = ? WHERE id = ? AND delivered_at IS NULL", (now, job_id))
            return ids

    def enqueue(self, specs: Sequence[JobSpec], origin: str) -> list[int]:
        """Queue jobs found by other means (reconcile, CLI); an identical active job is reused."""
        now = time.time()
        with self._transaction() as conn:
            return [self._insert(conn, spec, origin, now) for spec in specs]

    def claim(self, owner: str, lease_seconds: float) -> Job | None:
        """Take the oldest queued job, or a running one whose lease expired (its worker died)."""
        now = time.time()
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT id, status FROM jobs WHERE status = ? OR (status = ? AND lease_until < ?) ORDER BY id LIMIT 1",
                (QUEUED, RUNNING, now),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET status = ?, lease_owner = ?, lease_until = ?, attempts = attempts + 1, updated_at = ?"
                " WHERE id = ?",
                (RUNNING, owner, now + lease_seconds, now, row["id"]),
            )
            return self._job(conn, row["id"], taken_over=row["status"] == RUNNING)

    def heartbeat(self, job_id: int, owner: str, lease_seconds: float) -> bool:
        """Extend the lease; False when the job is no longer ours (it expired and was taken over)."""
        now = time.time()
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET lease_until = ?, updated_at = ? WHERE id = ? AND lease_owner = ? AND status = ?",
                (now + lease_seconds, now, job_id, owner, RUNNING),
            )
            return cursor.rowcount == 1

    def complete(self, job_id: int, owner: str, result: str) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE jobs SET status = ?, result = ?, error = NULL, lease_until = NULL, updated_at = ?"
                " WHERE id = ? AND lease_owner = ?",
                (DONE, result, time.time(), job_id, owner),
            )

    def fail(self, job_id: int, owner: str, error: str, max_attempts: int) -> str:
        """Record an error; the job is queued again until it has had ``max_attempts``. Returns its new status."""
        with self._transaction() as conn:
            job = self._job(conn, job_id)
            status = QUEUED if job.attempts < max_attempts else FAILED
            conn.execute(
                "UPDATE jobs SET status = ?, error = ?, lease_until = NULL, updated_at = ?"
                " WHERE id = ? AND lease_owner = ?",
                (status, error[-4000:], time.time(), job_id, owner),
            )
            return status

    @staticmethod
    def _job(conn: sqlite3.Connection, job_id: int, taken_over: bool = False) -> Job:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job(
            base_model=row["base_model"],
            to_version=row["to_version"],
            from_version=row["from_version"],
            id=row["id"],
            origin=row["origin"],
            status=row["status"],
            attempts=row["attempts"],
            error=row["error"],
            result=row["result"],
            taken_over=taken_over,
        )

    def jobs(self, status: str | None = None) -> list[Job]:
        with closing(self._connect()) as conn:
            query, args = (
                ("SELECT id FROM jobs WHERE status = ? ORDER BY id", (status,))
                if status
                else ("SELECT id FROM jobs ORDER BY id", ())
            )
            return [self._job(conn, row["id"]) for row in conn.execute(query, args).fetchall()]

    def counts(self) -> dict[str, int]:
        with closing(self._connect()) as conn:
            counts = {s: 0 for s in (QUEUED, RUNNING, DONE, FAILED)}
            counts.update(
                {
                    row["status"]: row["n"]
                    for row in conn.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
                }
            )
            counts["deliveries"] = conn.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0]
            return counts

    def was_delivered(self, base_model: str, to_version: str) -> bool:
        """Whether a webhook delivery ever asked for this migration (the queue's memory of it)."""
        with closing(self._connect()) as conn:
            row = conn.execute(
                "SELECT 1 FROM jobs WHERE base_model = ? AND to_version = ? AND delivered_at IS NOT NULL LIMIT 1",
                (base_model, to_version),
            ).fetchone()
            return row is not None

    def last_status(self, base_model: str, to_version: str) -> str | None:
        """The status of the newest job for this migration, if any."""
        with closing(self._connect()) as conn:
            row = conn.execute(
                "SELECT status FROM jobs WHERE base_model = ? AND to_version = ? ORDER BY id DESC LIMIT 1",
                (base_model, to_version),
            ).fetchone()
            return row["status"] if row else None

    def prune(self, deliveries_older_than: float, finished_older_than: float) -> tuple[int, int]:
        """Drop delivery ids received more than ``deliveries_older_than`` seconds ago (too old to be
        replayed: the timestamp check rejects them anyway) and done or failed jobs last updated more
        than ``finished_older_than`` seconds ago. Returns how many of each were dropped."""
        now = time.time()
        with self._transaction() as conn:
            deliveries = conn.execute(
                "DELETE FROM deliveries WHERE received_at < ?", (now - deliveries_older_than,)
            ).rowcount
            jobs = conn.execute(
                "DELETE FROM jobs WHERE status IN (?, ?) AND updated_at < ?", (*FINISHED, now - finished_older_than)
            ).rowcount
            return deliveries, jobs
