"""The registry hook: signature checks, the durable queue, and the whole loop against a real
``mlflow server`` (SQLite backend, webhooks on) and the real receiver process."""

from __future__ import annotations

import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_recycle import SoftPrompt, TaskSpec
from mlflow_recycle.hook import JobSpec, MigrationQueue, local, sign, verify
from mlflow_recycle.hook.server import jobs_for_event
from mlflow_recycle.hook.signature import DeliveryRejected
from mlflow_recycle.migrate import TAG_GATE, TAG_MIGRATION_KEY, pending_migrations
from mlflow_recycle.models import load_pretrained
from mlflow_recycle.registry import TAG_RECYCLED_FROM, log_prompt, model_uri, prompts_for, register_base_model, tie

SECRET = "test-secret-do-not-log"


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    try:
        return local.wait_until(predicate, timeout, what, interval)
    except TimeoutError as exc:
        pytest.fail(str(exc))


def signed_headers(body: bytes, delivery_id: str | None = None, timestamp: int | None = None, secret: str = SECRET):
    delivery_id = delivery_id or str(uuid.uuid4())
    timestamp = str(int(time.time()) if timestamp is None else timestamp)
    return {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": timestamp,
        "X-MLflow-Signature": sign(secret, delivery_id, timestamp, body),
    }


def event_body(name: str, version: str | int, tags: dict | None = None) -> bytes:
    data = {"name": name, "version": str(version), "source": "models:/x", "run_id": None, "tags": tags or {}}
    payload = {"entity": "model_version", "action": "created", "timestamp": "2026-01-01T00:00:00Z", "data": data}
    return json.dumps(payload).encode()


# ---------------------------------------------------------------------- units
def test_signature_matches_mlflows_own_signing():
    from mlflow.webhooks.delivery import _generate_hmac_signature

    body = event_body("lm", 2)
    assert sign(SECRET, "d-1", "1700000000", body) == _generate_hmac_signature(
        SECRET, "d-1", "1700000000", body.decode()
    )
    headers = signed_headers(body, "d-1", 1700000000)
    assert verify(SECRET, headers, body, tolerance_seconds=300, now=1700000100) == "d-1"


@pytest.mark.parametrize(
    ("change", "status", "reason"),
    [
        ({"secret": "wrong"}, 401, "bad signature"),
        ({"drop": "X-MLflow-Signature"}, 401, "missing X-MLflow-Signature"),
        ({"timestamp": 1700000000 - 301}, 400, "stale delivery"),
        ({"timestamp": 1700000000 + 400}, 400, "stale delivery"),
        ({"tamper": True}, 401, "bad signature"),
    ],
)
def test_bad_deliveries_are_rejected(change, status, reason):
    body = event_body("lm", 2)
    headers = signed_headers(body, timestamp=change.get("timestamp", 1700000000), secret=change.get("secret", SECRET))
    headers.pop(change.get("drop", ""), None)
    if change.get("tamper"):
        body = body.replace(b'"2"', b'"3"')
    with pytest.raises(DeliveryRejected, match=reason) as rejected:
        verify(SECRET, headers, body, tolerance_seconds=300, now=1700000000)
    assert rejected.value.status == status


def test_events_are_filtered():
    watch, events = {"lm"}, {"model_version.created"}
    assert jobs_for_event("model_version.created", {"name": "lm", "version": "2"}, watch, events)[0] == [
        JobSpec("lm", "2")
    ]
    assert jobs_for_event("model_version.created", {"name": "other", "version": "2"}, watch, events) == (
        [],
        "other is not a watched base model",
    )
    prompt_tags = {"tags": {"mlflow_recycle.kind": "soft_prompt"}}
    assert (
        jobs_for_event("model_version.created", {"name": "lm", "version": "3", **prompt_tags}, set(), events)[0] == []
    )
    assert jobs_for_event("model_version_alias.created", {"name": "lm", "version": "2"}, watch, events)[0] == []


def test_queue_is_durable_deduplicated_and_leased(tmp_path):
    queue = MigrationQueue(tmp_path / "q.db")
    assert queue.accept("d1", "model_version.created", [JobSpec("lm", "2")], "queued") == [1]
    assert queue.accept("d1", "model_version.created", [JobSpec("lm", "2")], "queued") is None  # replay
    assert queue.accept("d2", "model_version.created", [JobSpec("lm", "2")], "queued") == [1]  # same active job
    assert MigrationQueue(tmp_path / "q.db").counts()["queued"] == 1  # survives a new process
    job = queue.claim("worker-a", lease_seconds=0.2)
    assert (job.id, job.status, job.attempts) == (1, "running", 1)
    assert queue.claim("worker-b", lease_seconds=0.2) is None  # leased
    time.sleep(0.3)
    taken = queue.claim("worker-b", lease_seconds=60)  # worker-a died: its lease expired
    assert (taken.id, taken.attempts) == (1, 2)
    assert not queue.heartbeat(1, "worker-a", 60)  # worker-a lost it
    assert queue.fail(1, "worker-b", "boom", max_attempts=3) == "queued"
    assert queue.claim("worker-b", 60).attempts == 3
    assert queue.fail(1, "worker-b", "boom again", max_attempts=3) == "failed"
    assert queue.jobs("failed")[0].error == "boom again"
    (new,) = queue.enqueue([JobSpec("lm", "2")], origin="reconcile")  # a failed job does not block a new one
    assert new != 1 and [j.id for j in queue.jobs("queued")] == [new]


# ---------------------------------------------------------------------- the real loop
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` with webhooks enabled for a loopback receiver."""
    tracking = local.TrackingServer(tmp_path_factory.mktemp("server")).start()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking.url)
    mlflow.set_experiment("hook-tests")  # MLflow keeps the active experiment of an earlier store otherwise
    yield tracking.url
    mlflow.set_tracking_uri(previous)
    tracking.stop()


@pytest.fixture
def receiver_factory(server, tmp_path):
    """Receivers watching one base model each, on a small evaluation set and a short lease."""
    receivers = []

    def make(base_model: str, *overrides: str) -> local.Receiver:
        settings = [f"hook.watch=[{base_model}]", "hook.lease_seconds=3", "hook.poll_seconds=0.2"]
        settings += ["eval.limit_test=24", "eval.random_prompt_draws=1", *overrides]
        receivers.append(local.Receiver(server, tmp_path / f"receiver-{len(receivers)}", SECRET, settings))
        return receivers[-1]

    yield make
    for receiver in receivers:
        assert SECRET not in receiver.logs()  # the secret is never logged
        receiver.stop()


@pytest.fixture
def webhook(server):
    """`mlflow-recycle hook install` for a receiver; deleted afterwards."""
    names = []

    def install(receiver: local.Receiver) -> None:
        names.append(receiver.install_webhook())

    yield install
    client = MlflowClient()
    for webhook_id in [w.webhook_id for w in client.list_webhooks() if w.name in names]:
        client.delete_webhook(webhook_id)


def base_with_prompts(base_model: str, model_dir, data_dir, n_prompts: int = 3):
    """``base_model`` v1 = small-a, with ``n_prompts`` registered prompts tied to it."""
    v1 = register_base_model(str(model_dir("small-a")), base_model)
    model, _ = load_pretrained(str(model_dir("small-a")))
    task = TaskSpec("sst2", "{text} This movie is", (" bad", " great"), data=str(data_dir("sst2")), max_length=96)
    rows = model.get_input_embeddings().weight.detach()
    sources = []
    for i in range(n_prompts):
        prompt = SoftPrompt(
            rows[1000 + 10 * i : 1010 + 10 * i] * 2,
            tokenizer_fingerprint=v1.tags["mlflow_recycle.tokenizer_fingerprint"],
            task=task,
        )
        sources.append(log_prompt(tie(prompt, v1), "prompt", f"{base_model}-prompt-{i}"))
    return sources


def assert_migrated_once(base_model: str, sources, version: int = 2) -> list:
    recycled = prompts_for(base_model, version)
    by_source = {}
    for v in recycled:
        by_source.setdefault(v.tags[TAG_RECYCLED_FROM], []).append(v)
    assert sorted(by_source) == sorted(model_uri(s.name, s.version) for s in sources)
    assert all(len(v) == 1 for v in by_source.values()), {k: [x.version for x in v] for k, v in by_source.items()}
    return recycled


def test_registering_a_new_base_version_migrates_every_prompt(receiver_factory, webhook, model_dir, data_dir):
    sources = base_with_prompts("lm-hook", model_dir, data_dir)
    receiver = receiver_factory("lm-hook").start()
    webhook(receiver)
    register_base_model(str(model_dir("small-a-early")), "lm-hook")  # version 2: nothing else is done
    wait_until(lambda: len(prompts_for("lm-hook", 2)) == 3, 180, "three recycled prompts")
    for version in assert_migrated_once("lm-hook", sources):
        assert version.tags[TAG_GATE] in ("passed", "failed") and version.tags[TAG_MIGRATION_KEY]
        assert 0 <= float(version.tags["mlflow_recycle.metric.test/recycled_accuracy"]) <= 1
        run = MlflowClient().get_run(version.run_id)
        assert {"test/recycled_accuracy", "test/zero_shot_accuracy", "test/random_prompt_accuracy"} <= set(
            run.data.metrics
        )
    done = wait_until(
        lambda: [j for j in receiver.jobs() if j["to_version"] == "2" and j["status"] == "done"], 60, "the job"
    )
    assert done[0]["origin"].startswith("webhook:")


def test_bad_signature_stale_timestamp_and_replay_queue_nothing(receiver_factory):
    receiver = receiver_factory("lm-reject").start()
    body = event_body("lm-reject", 2)
    before = receiver.health()
    assert receiver.post(body, signed_headers(body, secret="wrong")).status_code == 401
    assert receiver.post(body, signed_headers(body, timestamp=int(time.time()) - 3600)).status_code == 400
    headers = signed_headers(body)
    unsigned = {k: v for k, v in headers.items() if k != "X-MLflow-Signature"}
    assert receiver.post(body, unsigned).status_code == 401
    after_rejects = receiver.health()
    assert after_rejects["deliveries"] == before["deliveries"] and after_rejects["queued"] == before["queued"]
    assert receiver.post(body, headers).status_code == 202  # genuine: queued
    jobs = len(receiver.jobs())
    replay = receiver.post(body, headers)
    assert replay.status_code == 409 and "already received" in replay.json()["error"]
    assert len(receiver.jobs()) == jobs
    ignored = event_body("not-watched", 5)
    assert receiver.post(ignored, signed_headers(ignored)).json() == {
        "status": "not-watched is not a watched base model",
        "jobs": [],
    }


def test_receiver_killed_mid_migration_completes_it_exactly_once(receiver_factory, webhook, model_dir, data_dir):
    sources = base_with_prompts("lm-crash", model_dir, data_dir)
    # A full SST-2 evaluation per prompt leaves seconds between versions to kill the receiver in.
    receiver = receiver_factory("lm-crash", "eval.limit_test=null").start()
    webhook(receiver)
    register_base_model(str(model_dir("small-a-early")), "lm-crash")
    wait_until(lambda: len(prompts_for("lm-crash", 2)) >= 1, 180, "the first recycled prompt", interval=0.05)
    receiver.kill()
    assert len(prompts_for("lm-crash", 2)) < 3, "the migration finished before the kill: the test proves nothing"
    receiver.start()  # same queue: the job's lease expires and the new worker takes it over
    wait_until(lambda: len(prompts_for("lm-crash", 2)) >= 3, 240, "the rest of the migration")
    time.sleep(2)  # let any stray duplicate surface
    assert_migrated_once("lm-crash", sources)
    (job,) = wait_until(
        lambda: [j for j in receiver.jobs() if j["status"] == "done" and j["to_version"] == "2"], 60, "the job"
    )
    assert job["attempts"] == 2


def test_version_registered_while_the_receiver_is_down_is_reconciled(receiver_factory, model_dir, data_dir):
    sources = base_with_prompts("lm-down", model_dir, data_dir)
    receiver = receiver_factory("lm-down")  # not running, no webhook: the event is lost
    register_base_model(str(model_dir("small-a-early")), "lm-down")
    assert ("lm-down", "2") in pending_migrations(["lm-down"])
    receiver.start()  # reconciles at start-up
    wait_until(lambda: len(prompts_for("lm-down", 2)) == 3, 180, "the reconciled migration")
    assert_migrated_once("lm-down", sources)
    assert [j["origin"] for j in receiver.jobs()] == ["reconcile"]
    assert pending_migrations(["lm-down"]) == []


def test_a_burst_of_concurrent_events_creates_no_duplicates(receiver_factory, model_dir, data_dir):
    sources = base_with_prompts("lm-burst", model_dir, data_dir)
    receiver = receiver_factory("lm-burst").start()
    register_base_model(str(model_dir("small-a-early")), "lm-burst")
    body = event_body("lm-burst", 2)
    with ThreadPoolExecutor(max_workers=25) as pool:
        answers = list(pool.map(lambda _: receiver.post(body, signed_headers(body)).status_code, range(50)))
    assert answers.count(202) == 50
    wait_until(lambda: len(prompts_for("lm-burst", 2)) >= 3, 180, "the migration")
    wait_until(lambda: all(j["status"] == "done" for j in receiver.jobs()), 120, "every queued job")
    assert_migrated_once("lm-burst", sources)
    assert receiver.health()["deliveries"] == 50


def test_projects_worker_runs_each_migration_as_an_mlflow_project(tmp_path, model_dir, data_dir, monkeypatch):
    """hook.worker=projects: the job becomes an MLflow Projects run of the `migrate` entry point."""
    from mlflow_recycle.config import compose
    from mlflow_recycle.hook.worker import Worker, projects_executor

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the project run's child process inherits it
    monkeypatch.setenv("PATH", f"{local.BIN}{os.pathsep}{os.environ['PATH']}")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("projects-worker")
    sources = base_with_prompts("lm-projects", model_dir, data_dir, n_prompts=2)
    register_base_model(str(model_dir("small-a-early")), "lm-projects")
    overrides = ["evaluate=false", "hook.worker=projects"]
    queue = MigrationQueue(tmp_path / "queue.db")
    queue.enqueue([JobSpec("lm-projects", "2")], origin="test")
    worker = Worker(queue, projects_executor(compose(overrides, config_name="migrate"), overrides), max_attempts=1)
    assert worker.run_once()
    (job,) = queue.jobs()
    assert job.status == "done", job.error
    run = MlflowClient().get_run(json.loads(job.result)["run_id"])
    assert run.data.tags["mlflow.project.entryPoint"] == "migrate" and run.info.status == "FINISHED"
    recycled = assert_migrated_once("lm-projects", sources)
    assert {v.run_id for v in recycled} <= {
        r.info.run_id for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
    }
