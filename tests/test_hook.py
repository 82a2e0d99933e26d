"""The registry hook: signature checks, the durable queue, and the whole loop against a real
``mlflow server`` (SQLite backend, webhooks on) and the real receiver process, including
what an operator meets: server restarts with a new key, crashes, big or bad bodies, old state."""

from __future__ import annotations

import http.client
import json
import os
import stat
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
from cryptography.fernet import Fernet
from mlflow import MlflowClient

from mlflow_recycle import SoftPrompt, TaskSpec
from mlflow_recycle.hook import Job, JobSpec, MigrationQueue, sign, verify
from mlflow_recycle.hook.maintenance import delivery_retention
from mlflow_recycle.hook.queue import default_queue_path, queue_path
from mlflow_recycle.hook.server import is_test_delivery, job_summary, jobs_for_event
from mlflow_recycle.hook.signature import DeliveryRejected
from mlflow_recycle.migrate import TAG_GATE, TAG_MIGRATION_KEY, pending_migrations
from mlflow_recycle.models import load_pretrained
from mlflow_recycle.registry import TAG_RECYCLED_FROM, log_prompt, model_uri, prompts_for, register_base_model, tie
from tests import servers

SECRET = "test-secret-do-not-log"


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    try:
        return servers.wait_until(predicate, timeout, what, interval)
    except TimeoutError as exc:
        pytest.fail(str(exc))


def wait_for_migration(receiver: servers.Receiver, predicate, what: str, base_model: str, version: str = "2"):
    """Wait while the receiver works on the migration: fails when it dies or the job fails, not on a clock."""
    try:
        return receiver.wait_while_working(predicate, what, base_model, version)
    except (TimeoutError, RuntimeError) as exc:
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


def test_versions_that_are_not_numbers_are_rejected_and_test_deliveries_recognised():
    events = {"model_version.created"}
    for version in ("abc", "2; drop", "-1", "1.5", "0", "007", "02", " 2", "", 0, -3):
        with pytest.raises(DeliveryRejected, match="is not a version number") as rejected:
            jobs_for_event("model_version.created", {"name": "lm", "version": version}, set(), events)
        assert rejected.value.status == 400 and "\n" not in rejected.value.reason
    assert jobs_for_event("model_version.created", {"name": "lm", "version": "12"}, set(), events)[0] == [
        JobSpec("lm", "12")
    ]
    assert jobs_for_event("model_version.created", {"name": "lm", "version": 3}, set(), events)[0] == [
        JobSpec("lm", "3")
    ]
    from mlflow.entities.webhook import WebhookEvent
    from mlflow.webhooks.types import get_example_payload_for_event

    example = get_example_payload_for_event(WebhookEvent.from_str("model_version.created"))
    assert is_test_delivery("model_version.created", example)
    assert not is_test_delivery("model_version.created", {**example, "version": "2"})


def test_jobs_show_only_the_type_of_an_error():
    job = Job("lm", "2", id=3, status="failed", error="MigrationError: /home/op/secret/path: Traceback ...")
    summary = job_summary(job)
    assert summary["error"] == "MigrationError" and "/home" not in json.dumps(summary)


def test_queue_prunes_old_deliveries_and_finished_jobs_and_remembers_deliveries(tmp_path):
    queue = MigrationQueue(tmp_path / "q.db")
    (reconciled,) = queue.enqueue([JobSpec("lm", "2")], origin="reconcile:periodic")
    assert not queue.was_delivered("lm", "2")
    assert queue.accept("d1", "model_version.created", [JobSpec("lm", "2")], "queued") == [reconciled]
    assert queue.was_delivered("lm", "2")  # the delivery joined the job reconcile had queued
    queue.enqueue([JobSpec("lm", "3")], origin="test")
    job = queue.claim("w", 60)
    queue.complete(job.id, "w", "{}")
    assert [queue.last_status("lm", v) for v in ("2", "3", "4")] == ["done", "queued", None]
    assert queue.prune(deliveries_older_than=60, finished_older_than=60) == (0, 0)  # all recent
    time.sleep(0.3)
    assert queue.prune(deliveries_older_than=0.1, finished_older_than=0.1) == (1, 1)
    assert [j.to_version for j in queue.jobs()] == ["3"]  # the queued job stays, whatever its age
    assert queue.counts()["deliveries"] == 0
    assert delivery_retention(300) > 2 * 300  # a replay is stale after 2 x tolerance


def test_queue_path_is_absolute_and_defaults_under_the_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_queue_path() == tmp_path / "data" / "mlflow-recycle" / "queue.db"
    assert queue_path(None) == default_queue_path()
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")  # not absolute: ignored, as the XDG spec says
    assert default_queue_path() == servers.Path.home() / ".local" / "share" / "mlflow-recycle" / "queue.db"
    monkeypatch.chdir(tmp_path)
    assert queue_path("q.db") == tmp_path / "q.db"


def test_encryption_key_is_kept_in_a_private_file(tmp_path):
    key_file = tmp_path / "conf" / "webhook-encryption.key"
    run = [str(servers.BIN / "mlflow-recycle"), "hook", "encryption-key", "-o", f"hook.encryption_key_file={key_file}"]
    first = servers.run_watched(run, check=True).stdout.strip()
    second = servers.run_watched(run, check=True).stdout.strip()
    assert first == second and Fernet(first.encode())  # the same valid key every time: restarts reuse it
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "command",
    [["reconcile", "--dry-run"], ["migrate", "lm", "2"], ["hook", "serve"]],
    ids=["reconcile", "migrate", "serve"],
)
def test_commands_refuse_an_implicit_local_store(tmp_path, command, monkeypatch):
    """In process (click's runner: the console script's start-up is tested elsewhere)."""
    from click.testing import CliRunner

    from mlflow_recycle.cli import main

    monkeypatch.chdir(tmp_path)
    env = {"MLFLOW_TRACKING_URI": None, "MLFLOW_RECYCLE_WEBHOOK_SECRET": SECRET}
    done = CliRunner().invoke(main, command, env=env)
    assert done.exit_code == 2, done.output
    assert "MLFLOW_TRACKING_URI" in done.stderr and "--tracking-uri" in done.stderr
    assert list(tmp_path.iterdir()) == []  # no ./mlflow.db, nothing at all


# ---------------------------------------------------------------------- the real loop
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real `mlflow server` with webhooks enabled for a loopback receiver."""
    tracking = servers.TrackingServer(tmp_path_factory.mktemp("server")).start()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking.url)
    mlflow.set_experiment("hook-tests")  # MLflow keeps the active experiment of an earlier store otherwise
    yield tracking.url
    mlflow.set_tracking_uri(previous)
    tracking.stop()


#: Recycling alone (the policy's later stages are tested in test_migrate.py and test_policy.py), judged on small sets.
SETTINGS = ["hook.lease_seconds=3", "hook.poll_seconds=0.2", "policy=recycle"]
SETTINGS += ["eval.limit_val=24", "eval.limit_test=24", "eval.random_prompt_draws=1"]


@pytest.fixture
def receiver_factory(server, tmp_path):
    """Receivers watching one base model each, on a small evaluation set and a short lease."""
    receivers = []

    def make(base_model: str, *overrides: str, tracking_uri: str | None = None, **options) -> servers.Receiver:
        settings = [f"hook.watch=[{base_model}]", *SETTINGS, *overrides]
        root = tmp_path / f"receiver-{len(receivers)}"
        receivers.append(servers.Receiver(tracking_uri or server, root, SECRET, settings, **options))
        return receivers[-1]

    yield make
    for receiver in receivers:
        assert SECRET not in receiver.logs()  # the secret is never logged
        receiver.stop()


@pytest.fixture
def webhook(server):
    """`mlflow-recycle hook install` for a receiver; deleted afterwards."""
    names = []

    def install(receiver: servers.Receiver) -> None:
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


#: The default policy with budgets a test can afford (the figures of test_policy's carry-over test).
POLICY = ["policy=fast", "eval.limit_val=48", "policy.stages.refine.steps=60", "policy.stages.refine.eval_every=10"]
POLICY += ["policy.gate.margin_se=0"]  # on 48 examples a standard error is 7 points
POLICY += ["policy.stages.refine.texts=960", "policy.stages.refine.batch_size=8", "policy.stages.retune.steps=60"]
POLICY += ["policy.stages.retune.eval_every=10", "policy.stages.retune.limit_train=960"]
POLICY += ["policy.stages.retune.batch_size=8", "prompt.optimizer.lr=0.03"]  # retune tunes with prompt.optimizer
# The stages as test_policy's carry-over test runs them, where the default differs (it skips refinement, stops it on
# a plateau and refines at lr 0.1).
POLICY += ["policy.stages.refine.skip=false", "policy.stages.refine.patience=null", "policy.stages.refine.lr=0.01"]
TUNED = Path(__file__).parent / "assets" / "sst2-prompt-small-a"


@pytest.mark.slow  # ~1 min: every stage through a real receiver; the stages are covered in-process by test_migrate
def test_the_migration_policy_end_to_end(receiver_factory, webhook, model_dir, data_dir, reexport):
    """A tuned prompt and one whose data is gone, through two new base versions: another seed (the map
    loses the task, later stages bring it back) and a re-export of it (identity passes at once)."""
    v1 = register_base_model(str(model_dir("small-a")), "lm-policy")
    good = SoftPrompt.load(TUNED)
    good = good.replace(task=good.task.replace(data=str(data_dir("sst2"))))
    log_prompt(tie(good, v1), "prompt", "lm-policy-good")
    log_prompt(tie(good.replace(task=good.task.replace(data="/gone/sst2")), v1), "prompt", "lm-policy-nodata")
    receiver = receiver_factory("lm-policy", *POLICY).start()
    webhook(receiver)
    for version, path in ((2, model_dir("small-b")), (3, reexport("small-b"))):
        register_base_model(str(path), "lm-policy")
        done = lambda v=version: len(prompts_for("lm-policy", v)) == 2  # noqa: E731
        wait_for_migration(receiver, done, f"two prompts on v{version}", "lm-policy", str(version))
    on_v2 = {v.name: v.tags for v in prompts_for("lm-policy", 2)}
    on_v3 = {v.name: v.tags for v in prompts_for("lm-policy", 3)}
    # v2, another seed: linear fails the gate, refinement or re-tuning from it passes, within budget
    assert on_v2["lm-policy-good"][TAG_GATE] == "passed", on_v2["lm-policy-good"]
    assert on_v2["lm-policy-good"]["mlflow_recycle.stage"] in ("refine", "retune")
    (good_v2,) = [v for v in prompts_for("lm-policy", 2) if v.name == "lm-policy-good"]
    detail = MlflowClient().get_run(good_v2.run_id).data.metrics  # the version's run holds every metric
    assert detail["policy/recycle/gate_accuracy"] <= detail["policy/gate_threshold"]
    # v3, the same weights again: identity passes at recycle, no training
    assert (on_v3["lm-policy-good"][TAG_GATE], on_v3["lm-policy-good"]["mlflow_recycle.stage"]) == ("passed", "recycle")
    assert on_v3["lm-policy-good"]["mlflow_recycle.recycler"].startswith("identity")
    assert float(on_v3["lm-policy-good"]["mlflow_recycle.metric.policy/steps"]) == 0
    for tags in (on_v2["lm-policy-nodata"], on_v3["lm-policy-nodata"]):  # recycled, not judged, and why
        assert tags[TAG_GATE] == "unevaluated" and "'/gone/sst2' is not reachable" in tags["mlflow_recycle.gate_reason"]
    again = servers.run_watched(
        [str(servers.BIN / "mlflow-recycle"), "migrate", "lm-policy", "3", "--tracking-uri", mlflow.get_tracking_uri(),
         *[f"-o{o}" for o in [*SETTINGS, *POLICY]]],
        env={**os.environ, "MLFLOW_RECYCLE_WEBHOOK_SECRET": SECRET},
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert "0 new prompt versions" in again.stdout
    assert "(existing): passed at recycle" in again.stdout and len(prompts_for("lm-policy", 3)) == 2


def test_registering_a_new_base_version_migrates_every_prompt(receiver_factory, webhook, model_dir, data_dir):
    sources = base_with_prompts("lm-hook", model_dir, data_dir)
    receiver = receiver_factory("lm-hook").start()
    webhook(receiver)
    register_base_model(str(model_dir("small-a-early")), "lm-hook")  # version 2: nothing else is done
    wait_for_migration(receiver, lambda: len(prompts_for("lm-hook", 2)) == 3, "three recycled prompts", "lm-hook")
    for version in assert_migrated_once("lm-hook", sources):
        assert version.tags[TAG_MIGRATION_KEY]
        run = MlflowClient().get_run(version.run_id)  # the version's run holds every metric
        metrics = run.data.metrics
        passed = metrics["validation/recycled_accuracy"] > metrics["policy/gate_threshold"]
        assert version.tags[TAG_GATE] == ("passed" if passed else "failed")  # decided on validation
        assert {"test/recycled_accuracy", "test/zero_shot_accuracy", "test/random_prompt_accuracy"} <= set(metrics)
    done = wait_until(
        lambda: [j for j in receiver.jobs() if j["to_version"] == "2" and j["status"] == "done"], 600, "the job"
    )
    assert done[0]["origin"].startswith("webhook:")


def test_bad_signature_stale_timestamp_and_replay_queue_nothing(receiver_factory):
    receiver = receiver_factory("lm-reject").start()
    body = event_body("lm-reject", 2)
    before = receiver.queue().counts()
    assert receiver.post(body, signed_headers(body, secret="wrong")).status_code == 401
    assert receiver.post(body, signed_headers(body, timestamp=int(time.time()) - 3600)).status_code == 400
    headers = signed_headers(body)
    unsigned = {k: v for k, v in headers.items() if k != "X-MLflow-Signature"}
    assert receiver.post(body, unsigned).status_code == 401
    assert receiver.queue().counts() == before
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


def test_the_door_refuses_big_bodies_bad_versions_and_strangers(receiver_factory):
    receiver = receiver_factory("lm-door", "hook.max_body_bytes=4096").start()
    before = receiver.queue().counts()
    # A declared 100 MB body is refused from its Content-Length, before a byte of it is read.
    connection = http.client.HTTPConnection("127.0.0.1", receiver.port, timeout=60)
    connection.putrequest("POST", "/webhook")
    connection.putheader("Content-Length", str(100 * 2**20))
    connection.endheaders()
    answer = connection.getresponse()
    assert answer.status == 413 and "hook.max_body_bytes" in json.loads(answer.read())["error"]
    connection.close()
    # A chunked body (no Content-Length) is counted as it streams in, and refused before parsing.
    chunks = (b"x" * 1024 for _ in range(5))
    streamed = servers.requests.post(f"{receiver.url}/webhook", data=chunks, timeout=60)
    assert streamed.status_code == 413
    # A signed event whose version is not a number: 400 at the door, nothing queued.
    bad = event_body("lm-door", "abc")
    rejected = receiver.post(bad, signed_headers(bad))
    assert rejected.status_code == 400 and "not a version number" in rejected.json()["error"]
    assert receiver.queue().counts() == before
    # /health says only ok; /jobs wants the bearer token and shows no error texts.
    assert receiver.health() == {"status": "ok"}
    jobs_url = f"{receiver.url}/jobs"
    assert servers.requests.get(jobs_url, timeout=10).status_code == 401
    wrong = servers.requests.get(jobs_url, headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    good = event_body("lm-door", 2)
    assert receiver.post(good, signed_headers(good)).status_code == 202
    (job,) = receiver.jobs()
    assert set(job) == {
        "id",
        "base_model",
        "to_version",
        "from_version",
        "origin",
        "status",
        "attempts",
        "error",
        "result",
    }


@pytest.mark.slow  # ~20 s: pruning waits out its tolerance
def test_old_deliveries_and_finished_jobs_are_pruned_and_the_queue_is_absolute(receiver_factory, tmp_path):
    data_home = tmp_path / "xdg-data"
    receiver = receiver_factory(
        "lm-prune",
        "hook.tolerance_seconds=2",
        "hook.prune_interval_seconds=0.5",
        "hook.keep_finished_seconds=1",
        jobs_token=None,
        data_home=data_home,
    ).start()
    expected = data_home / "mlflow-recycle" / "queue.db"
    assert receiver.queue_path == expected and expected.exists()  # the default: under XDG_DATA_HOME
    assert f"queue {expected}" in receiver.logs()  # printed at start-up
    off = servers.requests.get(f"{receiver.url}/jobs", timeout=10)
    assert off.status_code == 404 and "MLFLOW_RECYCLE_JOBS_TOKEN" in off.json()["error"]
    ignored, queued = event_body("other", 3), event_body("lm-prune", 3)  # lm-prune has no prompts: a quick job
    assert receiver.post(ignored, signed_headers(ignored)).status_code == 200
    assert receiver.post(queued, signed_headers(queued)).status_code == 202
    counts = receiver.queue().counts()
    assert counts["deliveries"] == 2 and counts["queued"] + counts["running"] + counts["done"] == 1
    # Pruned after 3 x tolerance (deliveries) and keep_finished_seconds after the job is done.
    wait_until(lambda: not receiver.alive or receiver.queue().counts()["deliveries"] == 0, 600, "pruned deliveries")
    wait_until(lambda: not receiver.alive or not receiver.queue().jobs(), 600, "the pruned finished job")
    assert receiver.alive and "Pruned" in receiver.logs()


@pytest.mark.slow  # ~3.5 min: two receiver processes, a kill -9 and a lease takeover
def test_receiver_killed_mid_migration_completes_it_exactly_once(receiver_factory, webhook, model_dir, data_dir):
    sources = base_with_prompts("lm-crash", model_dir, data_dir)
    # A full SST-2 evaluation per prompt leaves seconds between versions to kill the receiver in.
    receiver = receiver_factory("lm-crash", "eval.limit_test=null").start()
    webhook(receiver)
    register_base_model(str(model_dir("small-a-early")), "lm-crash")
    wait_for_migration(receiver, lambda: len(prompts_for("lm-crash", 2)) >= 1, "the first recycled prompt", "lm-crash")
    receiver.kill()
    assert len(prompts_for("lm-crash", 2)) < 3, "the migration finished before the kill: the test proves nothing"
    migrations = MlflowClient().get_experiment_by_name("mlflow-recycle-migrations").experiment_id
    of_crash = "tags.`mlflow_recycle.base_model` = 'lm-crash'"
    (left_running,) = MlflowClient().search_runs([migrations], f"{of_crash} AND attributes.status = 'RUNNING'")
    assert MlflowClient().search_runs([migrations], f"tags.`mlflow.parentRunId` = '{left_running.info.run_id}'")
    receiver.start()  # same queue: the job's lease expires and the new worker takes it over
    wait_for_migration(receiver, lambda: len(prompts_for("lm-crash", 2)) >= 3, "the rest of the migration", "lm-crash")
    (job,) = wait_until(
        lambda: [j for j in receiver.jobs() if j["status"] == "done" and j["to_version"] == "2"], 600, "the job"
    )
    assert job["attempts"] == 2
    assert_migrated_once("lm-crash", sources)
    # The dead worker's runs (the migration's and the prompt's it was on) are closed, not RUNNING forever.
    client = MlflowClient()
    killed = client.get_run(left_running.info.run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["mlflow_recycle.closed_by"].startswith("job ")
    children = client.search_runs([migrations], f"tags.`mlflow.parentRunId` = '{left_running.info.run_id}'")
    assert children and all(c.info.status != "RUNNING" for c in children)
    assert not client.search_runs([migrations], f"{of_crash} AND attributes.status = 'RUNNING'")


@pytest.mark.slow  # ~1 min: a receiver restart; reconcile is also covered by the dry-run and start-up tests
def test_version_registered_while_the_receiver_is_down_is_reconciled(receiver_factory, server, model_dir, data_dir):
    sources = base_with_prompts("lm-down", model_dir, data_dir)
    receiver = receiver_factory("lm-down")  # not running, no webhook: the event is lost
    dry_run = ["reconcile", "--dry-run", "--base-model", "lm-down"]
    assert receiver.cli(*dry_run).stdout == "nothing pending\n"
    register_base_model(str(model_dir("small-a-early")), "lm-down")
    assert ("lm-down", "2") in pending_migrations(["lm-down"])
    assert receiver.cli(*dry_run).stdout.startswith("pending: lm-down v2\n")
    receiver.start()  # reconciles at start-up
    wait_for_migration(receiver, lambda: len(prompts_for("lm-down", 2)) == 3, "the reconciled migration", "lm-down")
    assert_migrated_once("lm-down", sources)
    assert [j["origin"] for j in receiver.jobs()] == ["reconcile:start"]
    assert pending_migrations(["lm-down"]) == []


@pytest.mark.slow  # ~3.5 min: two tracking-server restarts and a periodic reconcile
def test_server_restarted_with_another_key_is_caught_by_check_and_reconcile(
    receiver_factory, tmp_path, model_dir, data_dir
):
    """The operator's story: the webhook server restarts with a new encryption key, deliveries fail
    silently on its side; `hook check` says so, and the periodic reconcile migrates what it missed."""
    kept = Fernet.generate_key().decode()
    tracking = servers.TrackingServer(tmp_path / "rekeyed-server", encryption_key=kept).start()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking.url)
    try:
        mlflow.set_experiment("hook-rekey")
        sources = base_with_prompts("lm-rekey", model_dir, data_dir, n_prompts=1)
        receiver = receiver_factory("lm-rekey", "hook.reconcile_interval_seconds=2", tracking_uri=tracking.url).start()
        name = receiver.install_webhook()  # installs and checks
        ok = receiver.cli("hook", "check", "--name", name)
        assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stderr
        tracking.restart(encryption_key=Fernet.generate_key().decode())  # what `$(python -c ...)` in a README does
        broken = receiver.cli("hook", "check", "--name", name)
        assert broken.returncode == 1
        (line,) = [line for line in broken.stderr.splitlines() if line.startswith("Error:")]
        assert "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY" in line and "500" in line
        reinstall = receiver.cli("hook", "install", "--url", f"{receiver.url}/webhook", "--name", name)
        assert reinstall.returncode == 1 and line in reinstall.stderr  # the same one line, not minutes of retries
        register_base_model(str(model_dir("small-a-early")), "lm-rekey")  # its delivery fails on the server
        wait_for_migration(
            receiver, lambda: len(prompts_for("lm-rekey", 2)) == 1, "the migration reconcile found", "lm-rekey"
        )
        assert_migrated_once("lm-rekey", sources)
        (job,) = wait_until(
            lambda: [j for j in receiver.jobs() if j["to_version"] == "2" and j["status"] == "done"], 600, "the job"
        )
        assert job["origin"] == "reconcile:periodic" and job["result"]["created"] == 1
        wait_until(lambda: "no webhook delivery for it ever arrived" in receiver.logs(), 600, "the warning")
        tracking.restart(encryption_key=kept)  # the kept key: the stored secret is readable again
        assert receiver.cli("hook", "check", "--name", name).returncode == 0
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.set_experiment("hook-tests")  # the module server's: the next tests log there
        tracking.stop()


@pytest.mark.slow  # ~40 s: concurrency of the queue, stable since issue 18
def test_a_burst_of_concurrent_events_creates_no_duplicates(receiver_factory, model_dir, data_dir):
    sources = base_with_prompts("lm-burst", model_dir, data_dir)
    receiver = receiver_factory("lm-burst").start()
    register_base_model(str(model_dir("small-a-early")), "lm-burst")
    body = event_body("lm-burst", 2)
    with ThreadPoolExecutor(max_workers=25) as pool:
        answers = list(pool.map(lambda _: receiver.post(body, signed_headers(body)).status_code, range(50)))
    assert answers.count(202) == 50
    wait_for_migration(receiver, lambda: len(prompts_for("lm-burst", 2)) >= 3, "the migration", "lm-burst")
    wait_until(lambda: all(j["status"] == "done" for j in receiver.jobs()), 600, "every queued job")
    assert_migrated_once("lm-burst", sources)
    assert receiver.queue().counts()["deliveries"] == 50


@pytest.mark.slow  # ~40 s: two MLflow Projects runs
def test_projects_worker_runs_each_migration_as_mlflow_projects_one_per_shard(
    tmp_path, model_dir, data_dir, monkeypatch
):
    """hook.worker=projects with hook.projects.shards=2: the job becomes two MLflow Projects runs of the `migrate`
    entry point, side by side on the local backend, each migrating its shard; every prompt migrates once."""
    from mlflow_recycle.config import compose
    from mlflow_recycle.hook.worker import Worker, projects_executor

    uri = servers.seeded_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the project run's child process inherits it
    monkeypatch.setenv("PATH", f"{servers.BIN}{os.pathsep}{os.environ['PATH']}")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("projects-worker")
    sources = base_with_prompts("lm-projects", model_dir, data_dir, n_prompts=4)
    register_base_model(str(model_dir("small-a-early")), "lm-projects")
    overrides = ["evaluate=false", "hook.worker=projects", "hook.projects.shards=2"]
    queue = MigrationQueue(tmp_path / "queue.db")
    queue.enqueue([JobSpec("lm-projects", "2")], origin="test")
    worker = Worker(queue, projects_executor(compose(overrides, config_name="migrate"), overrides), max_attempts=1)
    assert worker.run_once()
    (job,) = queue.jobs()
    assert job.status == "done", job.error
    runs = [MlflowClient().get_run(run_id) for run_id in json.loads(job.result)["run_ids"]]
    assert [r.data.tags["mlflow.project.entryPoint"] for r in runs] == ["migrate", "migrate"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(f"shard={i}/2" in run.data.params["overrides"] for i, run in enumerate(runs))
    recycled = assert_migrated_once("lm-projects", sources)
    assert {v.run_id for v in recycled} <= {
        r.info.run_id for r in mlflow.search_runs(search_all_experiments=True, output_format="list")
    }
