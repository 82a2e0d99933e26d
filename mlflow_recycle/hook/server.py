"""The webhook receiver: verify, filter, persist, answer; the worker migrates behind it.

``POST /webhook`` takes MLflow model-registry webhook deliveries. A delivery with a bad or
missing signature, a stale timestamp or a replayed delivery id is rejected and queues
nothing; one for a base model the receiver does not watch (or for a soft-prompt version)
is acknowledged and ignored; any other is stored in the durable queue together with its
migration job, and only then answered ``202``. ``GET /health`` reports the queue.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from omegaconf import DictConfig

from ..errors import RecycleError
from ..registry import KIND_PROMPT, TAG_KIND
from .queue import JobSpec, MigrationQueue
from .signature import DeliveryRejected, verify
from .worker import Worker

log = logging.getLogger(__name__)

SUPPORTED_EVENTS = ("model_version.created", "model_version_alias.created")


def jobs_for_event(event: str, data: Mapping[str, Any], watch: set[str], events: set[str]) -> tuple[list[JobSpec], str]:
    """The migrations an event asks for, and why (``queued`` or the reason it is ignored)."""
    if event not in events:
        return [], f"event {event} is not handled"
    name, version = data.get("name"), data.get("version")
    if not name or not version:
        return [], "event without model name and version"
    if (data.get("tags") or {}).get(TAG_KIND) == KIND_PROMPT:
        return [], f"{name} v{version} is a soft prompt, not a base model"
    if watch and name not in watch:
        return [], f"{name} is not a watched base model"
    return [JobSpec(str(name), str(version))], "queued"


def create_app(cfg: DictConfig, queue: MigrationQueue, worker: Worker | None = None) -> FastAPI:
    """The receiver app; with a ``worker``, it reconciles (if configured) and migrates in the background."""
    hook = cfg.hook
    if not hook.secret:
        raise RecycleError(
            "No webhook secret: set MLFLOW_RECYCLE_WEBHOOK_SECRET (or -o hook.secret=...) to the secret the MLflow "
            "webhook was created with (`mlflow-recycle hook install` uses the same variable)."
        )
    unknown = set(hook.events) - set(SUPPORTED_EVENTS)
    if unknown:
        raise RecycleError(f"hook.events {sorted(unknown)} are not supported; choose from {list(SUPPORTED_EVENTS)}.")
    secret, watch, events = str(hook.secret), set(hook.watch), set(hook.events)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if worker is not None:
            if hook.reconcile_on_start:
                await run_in_threadpool(reconcile_into, queue, sorted(watch) or None)
            worker.start()
        yield
        if worker is not None:
            worker.stop(timeout=5)

    app = FastAPI(title="mlflow-recycle webhook receiver", lifespan=lifespan)

    @app.post("/webhook")
    async def webhook(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            delivery_id = verify(secret, request.headers, body, tolerance_seconds=hook.tolerance_seconds)
            payload = json.loads(body)
            event, data = f"{payload['entity']}.{payload['action']}", payload["data"]
        except DeliveryRejected as rejected:
            log.warning("Rejected delivery %s: %s", request.headers.get("X-MLflow-Delivery-Id"), rejected.reason)
            return JSONResponse({"error": rejected.reason}, status_code=rejected.status)
        except (ValueError, KeyError, TypeError):
            return JSONResponse({"error": "body is not an MLflow webhook payload"}, status_code=400)
        specs, outcome = jobs_for_event(event, data, watch, events)
        ids = await run_in_threadpool(queue.accept, delivery_id, event, specs, outcome)
        if ids is None:
            log.warning("Rejected replayed delivery %s", delivery_id)
            return JSONResponse({"error": f"delivery {delivery_id} was already received"}, status_code=409)
        log.info("Delivery %s (%s): %s %s", delivery_id, event, outcome, ids or "")
        return JSONResponse({"status": outcome, "jobs": ids}, status_code=202 if ids else 200)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **await run_in_threadpool(queue.counts)}

    @app.get("/jobs")
    async def jobs() -> list[dict[str, Any]]:
        return [asdict(job) for job in await run_in_threadpool(queue.jobs)]

    return app


def reconcile_into(queue: MigrationQueue, base_models: list[str] | None) -> list[int]:
    """Queue every migration the registry shows as pending (missed while the receiver was down)."""
    from ..migrate import pending_migrations

    pending = pending_migrations(base_models)
    ids = queue.enqueue([JobSpec(base, version) for base, version in pending], origin="reconcile")
    if pending:
        log.info("Reconcile queued %d missed migrations: %s", len(pending), pending)
    return ids
