"""The worker: takes migration jobs from the durable queue and runs them, one at a time.

In-process by default (``migrate`` in this process); or each job as an MLflow Projects
run of this project's ``migrate`` entry point, on any backend MLflow supports (local,
Kubernetes, Databricks) when one machine is not enough. Either way the lease on the job
is renewed while it runs, and a failed job is retried up to ``max_attempts`` times, each
retry later than the one before (exponential backoff, capped).

Exactly once: the migration checks its lease before each side effect (a run, a
registration) and stops at the first check after another worker took the job over (this
worker was paused past its lease: a VM pause, a long GC, swapping); a Projects run is
cancelled then. The registration itself is idempotent by the migration key
(:func:`mlflow_recycle.registry.register_prompt`), so even a worker paused between its check
and the registration leaves one version per (source prompt, base version, policy).

A job taken over from a worker that died (``kill -9``, OOM) first closes the MLflow runs its
predecessor left ``RUNNING`` (:func:`close_abandoned_runs`), so the tracking UI never shows
a migration as running forever: a run that registered its prompt version ends ``FINISHED``
(the version counts as migrated), the others ``KILLED``. A job that reconcile queued and that
no webhook delivery ever asked for is logged as a warning when it migrates something: the
webhooks are not reaching the receiver.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import shlex
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..errors import RecycleError
from .maintenance import ORIGIN_PERIODIC_RECONCILE
from .queue import DONE, QUEUED, Job, MigrationQueue, retry_delay
from .secrets import public_overrides, secret_overrides_env

log = logging.getLogger(__name__)

#: Called before each side effect of a job; raises :class:`LeaseLost` once another worker has the job.
Guard = Callable[[], None]
Executor = Callable[[Job, Guard], str]
TakeoverHandler = Callable[[Job, float], object]

# Tags `migrate.migrate` sets on the run of one migration (its per-prompt runs are nested in it).
TAG_JOB, JOB_MIGRATE, TAG_BASE_MODEL = "mlflow_recycle.job", "migrate", "mlflow_recycle.base_model"
TAG_CLOSED_BY = "mlflow_recycle.closed_by"


class LeaseLost(Exception):  # noqa: N818 (not an error of the job: another worker runs it now)
    """The job's lease expired and another worker took the job over: this worker must stop."""


def close_abandoned_runs(job: Job, before: float) -> list[str]:
    """End the runs of ``job``'s migration still RUNNING that started before ``before``.

    Called when a job is taken over: the lease guarantees its previous worker is gone (or has
    lost the job and stops at its next step), so its runs will never be ended by it. A run
    that registered a prompt version ends FINISHED (its version stands and counts as migrated),
    any other KILLED; each is tagged ``closed_by``. The runs are found by the tags ``migrate``
    sets, in any experiment (``MLFLOW_EXPERIMENT_ID`` may have chosen another than
    ``mlflow.experiment``), with their nested per-prompt runs. Returns the closed run ids.
    """
    import mlflow
    from mlflow import MlflowClient

    from ..registry import filter_value

    running = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{TAG_JOB}` = '{JOB_MIGRATE}' AND attributes.status = 'RUNNING'"
        f" AND tags.`{TAG_BASE_MODEL}` = '{filter_value(job.base_model)}'",
        output_format="list",
    )
    client, closed = MlflowClient(), {}
    for run in running:
        # A run killed before it logged its parameters has no to_version: it can only be this job's.
        if run.info.start_time >= before * 1000 or run.data.params.get("to_version", job.to_version) != job.to_version:
            continue
        children = client.search_runs(
            [run.info.experiment_id],
            f"tags.`mlflow.parentRunId` = '{filter_value(run.info.run_id)}' AND attributes.status = 'RUNNING'",
        )
        for abandoned in [*children, run]:
            registered = client.search_model_versions(f"run_id = '{filter_value(abandoned.info.run_id)}'")
            client.set_tag(abandoned.info.run_id, TAG_CLOSED_BY, f"job {job.id} attempt {job.attempts}")
            closed[abandoned.info.run_id] = "FINISHED" if registered else "KILLED"
            client.set_terminated(abandoned.info.run_id, status=closed[abandoned.info.run_id])
    if closed:
        log.warning("Job %d: ended the runs its dead predecessor left running: %s", job.id, closed)
    return list(closed)


def release_memory() -> None:
    """Free what a migration loaded: the cached base models, the reference cycles that hold models and
    transfer caches, and the allocator's free pages (glibc keeps them from the system otherwise)."""
    models = sys.modules.get("mlflow_recycle.models")  # not imported (the projects worker): nothing loaded
    if models is not None:
        models.load_base_model.cache_clear()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def in_process_executor(cfg: DictConfig) -> Executor:
    """Run each job with :func:`mlflow_recycle.migrate.migrate` in this process (the worker releases
    what it loaded after each job: :func:`release_memory`)."""
    from ..migrate import migrate

    def execute(job: Job, guard: Guard) -> str:
        report = migrate(job.base_model, job.to_version, job.from_version, cfg=cfg, guard=guard)
        prompts = [{"source": p.source, "target": p.target, "gate": p.gate, "stage": p.stage} for p in report.prompts]
        return json.dumps({"from_version": report.from_version, "created": report.created, "prompts": prompts})

    return execute


def projects_executor(cfg: DictConfig, overrides: list[str], poll_seconds: float = 1.0) -> Executor:
    """Run each job as an MLflow Projects run (entry point ``migrate``) on ``hook.projects.backend``.

    Secret overrides (:func:`~mlflow_recycle.hook.secrets.is_secret_override`) never go into the
    run's ``overrides`` parameter (recorded by the run, shown on its command line): the runs
    inherit them from this process's environment. The run is cancelled when the lease is lost.
    """
    import mlflow.projects
    from mlflow import MlflowClient

    projects = cfg.hook.projects
    os.environ.update(secret_overrides_env(overrides))  # the Projects run's process inherits it
    public = " ".join(shlex.quote(o) for o in public_overrides(overrides))

    shards = int(projects.get("shards") or 1)

    def submit(job: Job, shard: str) -> Any:
        return mlflow.projects.run(
            uri=str(projects.uri),
            entry_point="migrate",
            parameters={
                "base_model": job.base_model,
                "to_version": job.to_version,
                "from_version": job.from_version or "",
                "overrides": " ".join(filter(None, (public, shard))),
            },
            experiment_name=cfg.mlflow.experiment,
            backend=projects.backend,
            backend_config=OmegaConf.to_container(projects.backend_config) if projects.backend_config else None,
            env_manager=projects.env_manager,
            synchronous=False,
        )

    def execute(job: Job, guard: Guard) -> str:
        """One run, or ``hook.projects.shards`` runs side by side, each migrating its shard of the prompts."""
        guard()
        submitted = [submit(job, f"shard={i}/{shards}" if shards > 1 else "") for i in range(shards)]
        failed = []
        for i, run in enumerate(submitted):
            try:
                _wait_for_project(run, guard, poll_seconds)
            except RecycleError as exc:
                failed.append(str(exc))
            except LeaseLost:
                for other in submitted[i + 1 :]:  # the job is another worker's now: stop the other shards too
                    other.cancel()
                    MlflowClient().set_terminated(other.run_id, status="KILLED")
                raise
        if failed:
            raise RecycleError("; ".join(failed))
        ids = [run.run_id for run in submitted]
        return json.dumps({"run_id": ids[0]} if shards == 1 else {"run_ids": ids})

    return execute


def _wait_for_project(submitted, guard: Guard, poll_seconds: float) -> None:
    """Wait for a submitted Projects run, checking the lease meanwhile: cancelled (KILLED) when it is lost."""
    from mlflow import MlflowClient

    while submitted.get_status() not in ("FINISHED", "FAILED", "KILLED"):
        try:
            guard()
        except LeaseLost:
            submitted.cancel()
            MlflowClient().set_terminated(submitted.run_id, status="KILLED")
            raise
        time.sleep(poll_seconds)
    if not submitted.wait():
        raise RecycleError(f"MLflow Projects run {submitted.run_id} ended {submitted.get_status()}: see its log")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) may go away by itself: the tracking server or
    the network unreachable or overloaded, a timeout, the queue file busy. A retry later can succeed."""
    import requests
    from mlflow.exceptions import MlflowException

    transient_codes = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ConnectionError | TimeoutError | requests.ConnectionError | requests.Timeout):
            return True
        if isinstance(exc, sqlite3.OperationalError):
            return True
        if isinstance(exc, MlflowException) and (
            exc.error_code in transient_codes or str(exc.message).startswith("API request to")
        ):
            return True  # "API request to ... failed with exception ...": the server did not answer
        exc = exc.__cause__ or exc.__context__
    return False


class _Lease:
    """A job's lease, renewed in the background while the job runs; :meth:`check` is the job's guard."""

    def __init__(self, queue: MigrationQueue, job_id: int, owner: str, seconds: float) -> None:
        self.queue, self.job_id, self.owner, self.seconds = queue, job_id, owner, seconds
        self.lost, self._done = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True)

    def _renew(self) -> None:
        while not self._done.wait(self.seconds / 3):
            if not self.queue.heartbeat(self.job_id, self.owner, self.seconds):
                self.lost.set()
                log.warning("Job %d: lease lost to another worker", self.job_id)
                return

    def check(self) -> None:
        """Return while the lease is this worker's, renewing it first when less than a third is left (a read
        otherwise: no write lock); raise :class:`LeaseLost` (ending this thread's active runs KILLED, as the
        worker that took the job over marked them) when another worker has the job."""
        if not self.lost.is_set():
            left = self.queue.lease_left(self.job_id, self.owner)
            if left is None or (
                left < self.seconds / 3 and not self.queue.heartbeat(self.job_id, self.owner, self.seconds)
            ):
                self.lost.set()
        if self.lost.is_set():
            mlflow = sys.modules.get("mlflow")  # not imported: no run was started
            while mlflow is not None and mlflow.active_run() is not None:
                mlflow.end_run("KILLED")
            raise LeaseLost(f"job {self.job_id}: lease lost to another worker")

    def __enter__(self) -> _Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


class Worker:
    """Claims jobs under a renewed lease and runs them with ``execute``."""

    def __init__(
        self,
        queue: MigrationQueue,
        execute: Executor,
        *,
        lease_seconds: float = 60.0,
        max_attempts: int = 3,
        poll_seconds: float = 1.0,
        retry_backoff_seconds: float = 10.0,
        retry_backoff_max_seconds: float = 300.0,
        on_takeover: TakeoverHandler | None = None,
    ) -> None:
        self.queue, self.execute, self.on_takeover = queue, execute, on_takeover
        self.lease_seconds, self.max_attempts, self.poll_seconds = lease_seconds, max_attempts, poll_seconds
        self.backoff = (float(retry_backoff_seconds), float(retry_backoff_max_seconds))
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> bool:
        """Run the next job, if any; True when one was run."""
        job = self.queue.claim(self.owner, self.lease_seconds)
        if job is None:
            return False
        claimed_at = time.time()
        log.info("Job %d: migrate %s to version %s (attempt %d)", job.id, job.base_model, job.to_version, job.attempts)
        with _Lease(self.queue, job.id, self.owner, self.lease_seconds) as lease:
            try:
                if job.taken_over and self.on_takeover is not None:
                    self.on_takeover(job, claimed_at)
                result = self.execute(job, lease.check)
            except LeaseLost:
                log.warning("Job %d: lease lost to another worker; stopped before its next step", job.id)
            except Exception as exc:  # any failure is recorded on the job, never lost
                self._failed(job, exc)
            else:
                if self.queue.complete(job.id, self.owner, result):
                    log.info("Job %d %s: %s", job.id, DONE, result)
                    self._warn_if_undelivered(job, result)
                else:
                    log.warning("Job %d: finished after another worker took it over: %s", job.id, result)
        release_memory()  # here, once the job's exception (and the frames it holds) is gone too
        return True

    def _failed(self, job: Job, exc: Exception) -> None:
        """Record the failure (called in the ``except`` block: the traceback goes to the log)."""
        transient, delay = is_transient(exc), retry_delay(job.attempts, *self.backoff)
        error = f"{type(exc).__name__}: {exc}"
        status = self.queue.fail(job.id, self.owner, error, self.max_attempts, retry_in=delay, transient=transient)
        again = f"; retried in {delay:.0f} s" if status == QUEUED else ""
        log.exception("Job %d failed (%s, %s error%s)", job.id, status, "transient" if transient else "an", again)

    def _warn_if_undelivered(self, job: Job, result: str) -> None:
        if job.origin != ORIGIN_PERIODIC_RECONCILE or self.queue.was_delivered(job.base_model, job.to_version):
            return
        try:
            created = json.loads(result).get("created")
        except (ValueError, AttributeError):
            created = None
        if created != 0:  # unknown (projects worker) or something was migrated
            log.warning(
                "Job %d: %s v%s was migrated by the periodic reconcile, but no webhook delivery for it ever "
                "arrived: MLflow's webhooks are not reaching this receiver (run `mlflow-recycle hook check`).",
                job.id,
                job.base_model,
                job.to_version,
            )

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                ran = self.run_once()
            except Exception:  # the queue itself failed (disk full?): keep the receiver alive, retry
                log.exception("Worker error")
                ran = False
            if not ran:
                self._stop.wait(self.poll_seconds)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mlflow-recycle-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
