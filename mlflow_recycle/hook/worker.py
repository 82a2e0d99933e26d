"""The worker: takes migration jobs from the durable queue and runs them, one at a time.

In-process by default (``migrate`` in this process); or each job as an MLflow Projects
run of this project's ``migrate`` entry point, on any backend MLflow supports (local,
Kubernetes, Databricks) when one machine is not enough. Either way the lease on the job
is renewed while it runs, and a failed job is retried up to ``max_attempts`` times.

A job taken over from a worker that died (``kill -9``, OOM) first closes the MLflow runs its
predecessor left ``RUNNING`` (:func:`close_abandoned_runs`), so the tracking UI never shows
a migration as running forever. A job that reconcile queued and that no webhook delivery
ever asked for is logged as a warning when it migrates something: the webhooks are not
reaching the receiver.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import threading
import time
import uuid
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from .maintenance import ORIGIN_PERIODIC_RECONCILE
from .queue import DONE, Job, MigrationQueue

log = logging.getLogger(__name__)

Executor = Callable[[Job], str]
TakeoverHandler = Callable[[Job, float], object]

# Tags `migrate.migrate` sets on the run of one migration (its per-prompt runs are nested in it).
TAG_JOB, JOB_MIGRATE, TAG_BASE_MODEL = "mlflow_recycle.job", "migrate", "mlflow_recycle.base_model"
TAG_CLOSED_BY = "mlflow_recycle.closed_by"


def close_abandoned_runs(job: Job, before: float) -> list[str]:
    """Mark KILLED the runs of ``job``'s migration still RUNNING that started before ``before``.

    Called when a job is taken over: the lease guarantees its previous worker is gone (or has
    lost the job), so its runs will never be ended by it. The runs are found by the tags
    ``migrate`` sets, in any experiment (``MLFLOW_EXPERIMENT_ID`` may have chosen another
    than ``mlflow.experiment``), with their nested per-prompt runs. Returns the closed run ids.
    """
    import mlflow
    from mlflow import MlflowClient

    base = job.base_model.replace("\\", "\\\\").replace("'", "\\'")
    running = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{TAG_JOB}` = '{JOB_MIGRATE}' AND tags.`{TAG_BASE_MODEL}` = '{base}'"
        " AND attributes.status = 'RUNNING'",
        output_format="list",
    )
    client, closed = MlflowClient(), []
    for run in running:
        # A run killed before it logged its parameters has no to_version: it can only be this job's.
        if run.info.start_time >= before * 1000 or run.data.params.get("to_version", job.to_version) != job.to_version:
            continue
        children = client.search_runs(
            [run.info.experiment_id],
            f"tags.`mlflow.parentRunId` = '{run.info.run_id}' AND attributes.status = 'RUNNING'",
        )
        for abandoned in [*children, run]:
            client.set_tag(abandoned.info.run_id, TAG_CLOSED_BY, f"job {job.id} attempt {job.attempts}")
            client.set_terminated(abandoned.info.run_id, status="KILLED")
            closed.append(abandoned.info.run_id)
    if closed:
        log.warning("Job %d: marked KILLED the runs its dead predecessor left running: %s", job.id, closed)
    return closed


def in_process_executor(cfg: DictConfig) -> Executor:
    """Run each job with :func:`mlflow_recycle.migrate.migrate` in this process."""
    from ..migrate import migrate

    def execute(job: Job) -> str:
        report = migrate(job.base_model, job.to_version, job.from_version, cfg=cfg)
        return json.dumps(
            {
                "from_version": report.from_version,
                "created": report.created,
                "prompts": [
                    {"source": p.source, "target": p.target, "gate": p.gate, "stage": p.stage} for p in report.prompts
                ],
            }
        )

    return execute


def projects_executor(cfg: DictConfig, overrides: list[str]) -> Executor:
    """Run each job as an MLflow Projects run (entry point ``migrate``) on ``hook.projects.backend``."""
    import mlflow.projects

    projects = cfg.hook.projects

    def execute(job: Job) -> str:
        submitted = mlflow.projects.run(
            uri=str(projects.uri),
            entry_point="migrate",
            parameters={
                "base_model": job.base_model,
                "to_version": job.to_version,
                "from_version": job.from_version or "",
                "overrides": " ".join(shlex.quote(o) for o in overrides),
            },
            experiment_name=cfg.mlflow.experiment,
            backend=projects.backend,
            backend_config=OmegaConf.to_container(projects.backend_config) if projects.backend_config else None,
            env_manager=projects.env_manager,
            synchronous=True,
        )
        return json.dumps({"run_id": submitted.run_id})

    return execute


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
        on_takeover: TakeoverHandler | None = None,
    ) -> None:
        self.queue, self.execute, self.on_takeover = queue, execute, on_takeover
        self.lease_seconds, self.max_attempts, self.poll_seconds = lease_seconds, max_attempts, poll_seconds
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
        done = threading.Event()
        renew = threading.Thread(target=self._renew, args=(job.id, done), daemon=True)
        renew.start()
        try:
            if job.taken_over and self.on_takeover is not None:
                self.on_takeover(job, claimed_at)
            result = self.execute(job)
        except Exception as exc:  # any failure is recorded on the job, never lost
            status = self.queue.fail(job.id, self.owner, f"{type(exc).__name__}: {exc}", self.max_attempts)
            log.exception("Job %d failed (%s)", job.id, status)
        else:
            self.queue.complete(job.id, self.owner, result)
            log.info("Job %d %s: %s", job.id, DONE, result)
            self._warn_if_undelivered(job, result)
        finally:
            done.set()
            renew.join()
        return True

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

    def _renew(self, job_id: int, done: threading.Event) -> None:
        while not done.wait(self.lease_seconds / 3):
            if not self.queue.heartbeat(job_id, self.owner, self.lease_seconds):
                log.warning("Job %d: lease lost to another worker", job_id)
                return

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
