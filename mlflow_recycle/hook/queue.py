"""A durable migration queue in SQLite.

The receiver stores each accepted delivery and its migration job in one transaction
*before* answering 2xx, so an event MLflow considers delivered is never lost (MLflow
delivers fire-and-forget: a few retries, no history). Delivery ids are remembered to
reject replays. A job is claimed under a lease that the worker renews while it runs; a
worker that dies leaves a job whose lease expires, and the next worker takes it over. A job
that failed is queued again after a delay that doubles with each attempt (:func:`retry_delay`),
up to its last attempt.
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
    not_before REAL,
    transient INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_job_per_key ON jobs(key) WHERE status IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status, id);
"""

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
FINISHED = (DONE, FAILED)
#: Columns added since the first queue files: created in an older file when it is opened.
_ADDED_COLUMNS = {"delivered_at": "REAL", "not_before": "REAL", "transient": "INTEGER NOT NULL DEFAULT 0"}


def retry_delay(attempts: int, base_seconds: float, max_seconds: float) -> float:
    """Seconds before attempt ``attempts + 1``: ``base_seconds`` doubled per attempt made, at most ``max_seconds``."""
    if base_seconds <= 0:
        return 0.0
    return float(min(max_seconds, base_seconds * 2 ** min(max(attempts - 1, 0), 32)))


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
    transient: bool = False  # its last failure was transient (the tracking server unreachable...)
    not_before: float | None = None  # queued again after a failure: not claimed before this time


class MigrationQueue:
    """Deliveries and migration jobs in one SQLite file (WAL, full sync); safe across processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn:
            conn.executescript(SCHEMA)
            columns = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
            for column, kind in _ADDED_COLUMNS.items():  # a queue file from before these were tracked
                if column not in columns:
                    conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    def _connect(self, durable: bool = True) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # committed means on disk: the 2xx promise. A lease renewal need not be (lost, the lease is only
        # shorter) and must hold the write lock as briefly as possible: a worker paused while it holds it
        # (SIGSTOP, a VM pause) blocks every other process's writes until it resumes.
        conn.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
        return conn

    @contextmanager
    def _transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        with closing(self._connect(durable)) as conn:
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
        """Take the oldest queued job whose retry delay is over, or a running one whose lease expired
        (its worker died)."""
        now = time.time()
        claimable = (
            "SELECT id, status FROM jobs WHERE (status = ? AND (not_before IS NULL OR not_before <= ?))"
            " OR (status = ? AND lease_until < ?) ORDER BY id LIMIT 1"
        )
        with closing(self._connect()) as conn:  # a read first: an idle worker's poll takes no write lock
            if conn.execute(claimable, (QUEUED, now, RUNNING, now)).fetchone() is None:
                return None
        with self._transaction() as conn:
            row = conn.execute(claimable, (QUEUED, now, RUNNING, now)).fetchone()
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
        with self._transaction(durable=False) as conn:
            cursor = conn.execute(
                "UPDATE jobs SET lease_until = ?, updated_at = ? WHERE id = ? AND lease_owner = ? AND status = ?",
                (now + lease_seconds, now, job_id, owner, RUNNING),
            )
            return cursor.rowcount == 1

    def lease_left(self, job_id: int, owner: str) -> float | None:
        """Seconds left on ``owner``'s lease of the job (negative: expired, not yet taken over); None when
        the job is no longer ``owner``'s. Only reads: takes no write lock."""
        with closing(self._connect()) as conn:
            row = conn.execute(
                "SELECT lease_until FROM jobs WHERE id = ? AND lease_owner = ? AND status = ?", (job_id, owner, RUNNING)
            ).fetchone()
        return None if row is None or row["lease_until"] is None else row["lease_until"] - time.time()

    def complete(self, job_id: int, owner: str, result: str) -> bool:
        """Mark the job done; False (nothing changed) when it is no longer ours."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE jobs SET status = ?, result = ?, error = NULL, lease_until = NULL, updated_at = ?"
                " WHERE id = ? AND lease_owner = ? AND status = ?",
                (DONE, result, time.time(), job_id, owner, RUNNING),
            )
            return cursor.rowcount == 1

    def fail(
        self, job_id: int, owner: str, error: str, max_attempts: int, *, retry_in: float = 0.0, transient: bool = False
    ) -> str:
        """Record an error; the job is queued again, not to be claimed for ``retry_in`` seconds, until it has
        had ``max_attempts``. ``transient``: the error may go away by itself (the periodic reconcile retries
        such a failed job). Returns its new status (unchanged when the job is no longer ours)."""
        now = time.time()
        with self._transaction() as conn:
            job = self._job(conn, job_id)
            status = QUEUED if job.attempts < max_attempts else FAILED
            cursor = conn.execute(
                "UPDATE jobs SET status = ?, error = ?, transient = ?, not_before = ?, lease_until = NULL,"
                " updated_at = ? WHERE id = ? AND lease_owner = ? AND status = ?",
                (status, error[-4000:], int(transient), now + retry_in, now, job_id, owner, RUNNING),
            )
            return status if cursor.rowcount == 1 else job.status

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
            transient=bool(row["transient"]),
            not_before=row["not_before"],
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
        job = self.last_job(base_model, to_version)
        return job.status if job else None

    def last_job(self, base_model: str, to_version: str) -> Job | None:
        """The newest job for this migration, if any."""
        with closing(self._connect()) as conn:
            row = conn.execute(
                "SELECT id FROM jobs WHERE base_model = ? AND to_version = ? ORDER BY id DESC LIMIT 1",
                (base_model, to_version),
            ).fetchone()
            return self._job(conn, row["id"]) if row else None

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
