"""The receiver's timers: periodic reconcile and pruning of the queue.

MLflow delivers webhooks fire-and-forget: a delivery it could not make (the receiver was
down, or the server can no longer decrypt the webhook's secret) is gone. Reconcile finds
the base versions whose prompts were never migrated and queues them; the receiver runs it
at start-up and every ``hook.reconcile_interval_seconds``; the periodic one also retries a
migration whose last job failed on a transient error (the tracking server was unreachable),
not one that failed otherwise (a restart or ``mlflow-recycle reconcile`` retries those).
Pruning drops delivery ids too old to be replayed and finished jobs older than
``hook.keep_finished_seconds``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from .queue import FAILED, JobSpec, MigrationQueue

log = logging.getLogger(__name__)

#: Origins of the jobs reconcile queues: at the receiver's start-up, and on its timer.
ORIGIN_START_RECONCILE, ORIGIN_PERIODIC_RECONCILE = "reconcile:start", "reconcile:periodic"


def reconcile_into(
    queue: MigrationQueue, base_models: Sequence[str] | None, origin: str = ORIGIN_START_RECONCILE
) -> list[int]:
    """Queue every migration the registry shows as pending (missed deliveries, or made while down)."""
    from ..migrate import pending_migrations

    pending = pending_migrations(list(base_models) if base_models else None)
    if origin == ORIGIN_PERIODIC_RECONCILE:  # no retry loop every interval for a failure that stays
        last = {p: queue.last_job(*p) for p in pending}
        failed = [p for p in pending if last[p] and last[p].status == FAILED and not last[p].transient]
        if failed:
            log.warning("Not retrying migrations whose last job failed (see the log above): %s", failed)
        pending = [p for p in pending if p not in failed]
    ids = queue.enqueue([JobSpec(base, version) for base, version in pending], origin=origin)
    if pending:
        log.info("Reconcile (%s) queued %d pending migrations: %s", origin, len(pending), pending)
    return ids


def delivery_retention(tolerance_seconds: float) -> float:
    """How long a delivery id must be remembered to reject its replay.

    A delivery is accepted only while its timestamp is within the tolerance of now, and the
    timestamp itself may be up to the tolerance ahead of the time it was received: after
    2 × tolerance a replay is rejected as stale anyway. One more tolerance is margin.
    """
    return 3 * float(tolerance_seconds)


class Maintenance:
    """A daemon thread running each task every ``interval`` seconds (an interval of 0 or None: never)."""

    def __init__(self, tasks: Sequence[tuple[str, float | None, Callable[[], object]]]) -> None:
        self.tasks = [(name, float(interval), task) for name, interval, task in tasks if interval]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        due = {name: time.monotonic() + interval for name, interval, _ in self.tasks}
        while not self._stop.is_set():
            now = time.monotonic()
            for name, interval, task in self.tasks:
                if now < due[name]:
                    continue
                try:
                    task()
                except Exception:  # the tracking server is down, the disk is full...: try again next time
                    log.exception("Periodic %s failed; retrying in %.0f s", name, interval)
                due[name] = time.monotonic() + interval
            self._stop.wait(max(0.05, min(due.values()) - time.monotonic()))

    def start(self) -> None:
        if self.tasks:
            self._thread = threading.Thread(target=self._loop, name="mlflow-recycle-maintenance", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def receiver_maintenance(hook, queue: MigrationQueue, watch: Sequence[str] | None) -> Maintenance:
    """The receiver's timers, from the ``hook`` settings."""

    def prune() -> None:
        deliveries, jobs = queue.prune(delivery_retention(hook.tolerance_seconds), float(hook.keep_finished_seconds))
        if deliveries or jobs:
            log.info("Pruned %d old delivery ids and %d finished jobs", deliveries, jobs)

    return Maintenance(
        [
            (
                "reconcile",
                hook.reconcile_interval_seconds,
                lambda: reconcile_into(queue, watch, ORIGIN_PERIODIC_RECONCILE),
            ),
            ("prune", hook.prune_interval_seconds, prune),
        ]
    )
