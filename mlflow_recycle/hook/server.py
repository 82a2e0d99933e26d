"""The webhook receiver: verify, filter, persist, answer; the worker migrates behind it.

``POST /webhook`` takes MLflow model-registry webhook deliveries. A body larger than
``hook.max_body_bytes`` is refused with ``413`` before it is read in full or parsed. A
delivery with a bad or missing signature, a stale timestamp or a replayed delivery id is
rejected and queues nothing; so is a signed body that is not an MLflow webhook payload
(:class:`Envelope`, :class:`VersionEvent`: wrong types, nested deeper than
:data:`MAX_DEPTH`) or whose version is not a version number (a positive integer without
leading zeros): ``400`` with a one-line reason. MLflow's own test delivery
(``mlflow-recycle hook check``) is acknowledged as such. One for a base model the receiver
does not watch (or for a soft-prompt version) is acknowledged and ignored; any other is
stored in the durable queue together with its migration job, and only then answered ``202``.

``GET /health`` says only whether the receiver works (``200 ok`` or ``503``). ``GET /jobs``
lists the jobs with a short status; it needs ``Authorization: Bearer <hook.jobs_token>``
and is off (``404``) while no token is set. Full error texts go to the log only.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from omegaconf import DictConfig
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from ..errors import RecycleError
from ..registry import KIND_PROMPT, TAG_KIND
from .maintenance import ORIGIN_START_RECONCILE, receiver_maintenance, reconcile_into
from .queue import Job, JobSpec, MigrationQueue
from .signature import DELIVERY_ID_HEADER, DeliveryRejected, verify
from .worker import Worker

log = logging.getLogger(__name__)

SUPPORTED_EVENTS = ("model_version.created", "model_version_alias.created")
TEST_DELIVERY = "test delivery"
_VERSION = re.compile(r"[1-9][0-9]*")  # MLflow numbers versions from 1: no 0, no leading zeros
#: Deepest nesting of objects and arrays a payload may have (MLflow's have 3 levels).
MAX_DEPTH = 32
bearer = HTTPBearer(auto_error=False)  # module level: the endpoints' annotations are resolved in this namespace


class Envelope(BaseModel):
    """An MLflow webhook body: ``{"entity", "action", "timestamp", "data": {...}}``."""

    model_config = ConfigDict(extra="ignore")
    entity: StrictStr = Field(min_length=1)
    action: StrictStr = Field(min_length=1)
    timestamp: StrictStr | None = None
    data: dict[str, Any]


class VersionEvent(BaseModel):
    """The ``data`` of the events that migrate (``model_version.created``, ``model_version_alias.created``)."""

    model_config = ConfigDict(extra="ignore")
    name: StrictStr = Field(min_length=1)
    version: str | int
    tags: dict[str, StrictStr] | None = None

    @field_validator("version", mode="before")
    @classmethod
    def _string_or_integer(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise PydanticCustomError("version_type", "Input should be a version number (a string or an integer)")
        return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _validated(model: type[BaseModel], value: Any, where: str = "") -> Any:
    """``model`` validated from ``value``, or :class:`DeliveryRejected` (400) naming the first wrong field."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        field = ".".join(str(part) for part in (where, *first["loc"]) if part != "") or "body"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        reason = f"body is not an MLflow webhook payload: {field}: {first['msg']}{more}"
        raise DeliveryRejected(400, " ".join(reason.split())) from None


def _too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects or arrays deeper than ``limit`` (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        if children and depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_delivery(body: bytes) -> tuple[str, dict[str, Any]]:
    """``(event, data)`` of a signed body, e.g. ``("model_version.created", {...})``; 400 for anything else."""
    try:
        payload = json.loads(body)
    except RecursionError:
        raise DeliveryRejected(400, f"body is not an MLflow webhook payload: nested deeper than {MAX_DEPTH}") from None
    except ValueError:  # UnicodeDecodeError included
        raise DeliveryRejected(400, "body is not an MLflow webhook payload: not JSON") from None
    if not isinstance(payload, dict):
        raise DeliveryRejected(400, "body is not an MLflow webhook payload: not a JSON object")
    if _too_deep(payload, MAX_DEPTH):
        raise DeliveryRejected(400, f"body is not an MLflow webhook payload: nested deeper than {MAX_DEPTH}")
    envelope = _validated(Envelope, payload)
    return f"{envelope.entity}.{envelope.action}", envelope.data


class BodyTooLarge(DeliveryRejected):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"body larger than {limit} bytes (hook.max_body_bytes)")


def is_test_delivery(event: str, data: Mapping[str, Any]) -> bool:
    """Whether ``data`` is MLflow's example payload, which its test-webhook API sends."""
    from mlflow.entities.webhook import WebhookEvent
    from mlflow.webhooks.types import get_example_payload_for_event

    try:
        return dict(data) == dict(get_example_payload_for_event(WebhookEvent.from_str(event)))
    except Exception:  # an event MLflow does not know has no example payload
        return False


def jobs_for_event(event: str, data: Mapping[str, Any], watch: set[str], events: set[str]) -> tuple[list[JobSpec], str]:
    """The migrations an event asks for, and why (``queued`` or the reason it is ignored).

    Raises :class:`DeliveryRejected` (400) for an event whose ``data`` is not a model version
    (:class:`VersionEvent`) or whose version is not a version number.
    """
    if event not in events:
        return [], f"event {event} is not handled"
    fields = _validated(VersionEvent, data, "data")
    name, version = fields.name, str(fields.version)
    if not _VERSION.fullmatch(version):
        raise DeliveryRejected(
            400,
            f"model version {_short(fields.version)} of {_short(name)} is not a version number "
            "(a positive integer without leading zeros)",
        )
    if (fields.tags or {}).get(TAG_KIND) == KIND_PROMPT:
        return [], f"{name} v{version} is a soft prompt, not a base model"
    if watch and name not in watch:
        return [], f"{name} is not a watched base model"
    return [JobSpec(name, version)], "queued"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) one over ``limit`` bytes by its Content-Length or as it streams in."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise DeliveryRejected(400, f"malformed Content-Length {declared!r}")
        if int(declared) > limit:
            raise BodyTooLarge(limit)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(limit)
    return bytes(body)


def job_summary(job: Job) -> dict[str, Any]:
    """What ``/jobs`` shows of a job: its state, its result and the error's type, never the error text."""
    try:
        result = json.loads(job.result) if job.result else None
    except ValueError:
        result = None
    return {
        "id": job.id,
        "base_model": job.base_model,
        "to_version": job.to_version,
        "from_version": job.from_version,
        "origin": job.origin,
        "status": job.status,
        "attempts": job.attempts,
        "error": job.error.split(":", 1)[0] if job.error else None,
        "result": result,
    }


def _check_settings(hook: DictConfig) -> None:
    """Refuse settings the receiver cannot run with, naming them."""
    if not hook.secret:
        raise RecycleError(
            "No webhook secret: set MLFLOW_RECYCLE_WEBHOOK_SECRET (or -o hook.secret=...) to the secret the MLflow "
            "webhook was created with (`mlflow-recycle hook install` uses the same variable)."
        )
    unknown = set(hook.events) - set(SUPPORTED_EVENTS)
    if unknown:
        raise RecycleError(f"hook.events {sorted(unknown)} are not supported; choose from {list(SUPPORTED_EVENTS)}.")
    if int(hook.max_body_bytes) <= 0:
        raise RecycleError(f"hook.max_body_bytes must be a positive number of bytes, got {hook.max_body_bytes}.")


def _lifespan(hook: DictConfig, queue: MigrationQueue, worker: Worker | None, watch: list[str] | None) -> Callable:
    """Start-up reconcile, the worker and the timers while the app runs (nothing without a worker)."""
    maintenance = receiver_maintenance(hook, queue, watch) if worker is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if worker is not None:
            if hook.reconcile_on_start:
                await run_in_threadpool(reconcile_into, queue, watch, ORIGIN_START_RECONCILE)
            worker.start()
            maintenance.start()
        yield
        if worker is not None:
            maintenance.stop(timeout=5)
            worker.stop(timeout=5)

    return lifespan


def _add_webhook(app: FastAPI, hook: DictConfig, queue: MigrationQueue, watch: set[str]) -> None:
    """``POST /webhook``: read (bounded), verify, validate, filter, queue, answer."""
    secret, events, max_body = str(hook.secret), set(hook.events), int(hook.max_body_bytes)

    @app.post("/webhook")
    async def webhook(request: Request) -> JSONResponse:
        delivery_id = request.headers.get(DELIVERY_ID_HEADER)
        try:
            body = await read_body(request, max_body)
            delivery_id = verify(secret, request.headers, body, tolerance_seconds=hook.tolerance_seconds)
            event, data = parse_delivery(body)
            if is_test_delivery(event, data):
                specs, outcome = [], TEST_DELIVERY
            else:
                specs, outcome = jobs_for_event(event, data, watch, events)
        except DeliveryRejected as rejected:
            log.warning("Rejected delivery %s: %s", _short(delivery_id), rejected.reason)
            return JSONResponse({"error": rejected.reason}, status_code=rejected.status)
        ids = await run_in_threadpool(queue.accept, delivery_id, event, specs, outcome)
        if ids is None:
            log.warning("Rejected replayed delivery %s", delivery_id)
            return JSONResponse({"error": f"delivery {delivery_id} was already received"}, status_code=409)
        log.info("Delivery %s (%s): %s %s", delivery_id, event, outcome, ids or "")
        return JSONResponse({"status": outcome, "jobs": ids}, status_code=202 if ids else 200)


def _add_status(app: FastAPI, queue: MigrationQueue, worker: Worker | None, jobs_token: str | None) -> None:
    """``GET /health`` (ok or not, nothing more) and ``GET /jobs`` (behind the bearer token)."""

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            await run_in_threadpool(queue.counts)
        except Exception:
            log.exception("Health check: the queue cannot be read")
            return JSONResponse({"status": "unavailable"}, status_code=503)
        if worker is not None and not worker.alive:
            log.error("Health check: the worker thread is not running")
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/jobs")
    async def jobs(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> JSONResponse:
        if jobs_token is None:
            return JSONResponse(
                {"error": "/jobs is off: set MLFLOW_RECYCLE_JOBS_TOKEN (hook.jobs_token) to enable it"}, status_code=404
            )
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), jobs_token.encode()):
            return JSONResponse(
                {"error": "/jobs needs Authorization: Bearer <hook.jobs_token>"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return JSONResponse([job_summary(job) for job in await run_in_threadpool(queue.jobs)])


def create_app(cfg: DictConfig, queue: MigrationQueue, worker: Worker | None = None) -> FastAPI:
    """The receiver app; with a ``worker``, it reconciles (if configured), migrates and prunes in the background."""
    hook = cfg.hook
    _check_settings(hook)
    watch = set(hook.watch)
    app = FastAPI(
        title="mlflow-recycle webhook receiver", lifespan=_lifespan(hook, queue, worker, sorted(watch) or None)
    )
    _add_webhook(app, hook, queue, watch)
    _add_status(app, queue, worker, str(hook.jobs_token) if hook.jobs_token else None)
    return app
