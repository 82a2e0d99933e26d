"""Exactly once when a receiver pauses or crashes, nothing dropped from later migrations, no secret
in any record, and a receiver that refuses every malformed body (issue 45).

Against a real ``mlflow server`` (SQLite backend) and real receiver processes: a receiver paused
(SIGSTOP) past its lease while a second one takes its job over, a worker killed (SIGKILL) right
after it registered a version, secrets given with ``-o`` to a receiver whose migrations are
MLflow Projects runs, and signed bodies of every wrong shape.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_recycle.hook import JobSpec, MigrationQueue
from mlflow_recycle.hook.maintenance import ORIGIN_PERIODIC_RECONCILE, reconcile_into
from mlflow_recycle.hook.queue import retry_delay
from mlflow_recycle.hook.secrets import (
    SECRET_OVERRIDES_ENV,
    is_secret_override,
    public_overrides,
    secret_overrides_env,
    secret_overrides_from_env,
)
from mlflow_recycle.hook.server import jobs_for_event, parse_delivery
from mlflow_recycle.hook.signature import DeliveryRejected
from mlflow_recycle.hook.worker import TAG_CLOSED_BY, Worker, is_transient
from mlflow_recycle.migrate import TAG_MIGRATION_KEY, pending_migrations, previous_version_with_prompts
from mlflow_recycle.registry import (
    load_prompt,
    log_prompt,
    model_uri,
    prompts_for,
    register_base_model,
    register_prompt,
    versions_with_key,
)
from tests import servers, test_hook
from tests.test_hook import (
    SECRET,
    SETTINGS,
    assert_migrated_once,
    base_with_prompts,
    event_body,
    signed_headers,
    wait_for_migration,
)

MIGRATIONS_EXPERIMENT = "mlflow-recycle-migrations"


def wait_until(predicate, what: str, timeout: float = 900, interval: float = 0.2):
    """Poll for progress; the timeout is a generous ceiling for a loaded machine, not an expectation."""
    return test_hook.wait_until(predicate, timeout, what, interval)


# ---------------------------------------------------------------------- units: no server
def test_secret_overrides_are_recognised_by_one_helper():
    secrets = ["hook.secret=s", "hook.jobs_token=t", "+db.password=p", "hook.encryption_key_file=/k", "a.API_KEY=x"]
    public = ["eval.limit_val=24", "prompt.n_tokens=10", "policy=recycle", "hook.lease_seconds=3", "keyword=1"]
    assert [is_secret_override(o) for o in secrets] == [True] * len(secrets)
    assert [is_secret_override(o) for o in public] == [False] * len(public)
    assert public_overrides([*secrets, *public]) == public
    env = secret_overrides_env([*public, *secrets])
    assert set(env) == {SECRET_OVERRIDES_ENV} and secret_overrides_from_env(env) == secrets
    smuggled = {SECRET_OVERRIDES_ENV: json.dumps(["mlflow.tracking_uri=sqlite:///x", "hook.secret=s"])}
    assert secret_overrides_from_env(smuggled) == ["hook.secret=s"]  # only secrets travel this way
    assert secret_overrides_env(public) == {} and secret_overrides_from_env({SECRET_OVERRIDES_ENV: "{oops"}) == []


def test_the_cli_takes_secret_overrides_from_the_environment(monkeypatch):
    """What a Projects run's `mlflow-recycle migrate` does with the secrets its worker passed in the environment."""
    from mlflow_recycle.cli import _config

    monkeypatch.setenv(SECRET_OVERRIDES_ENV, json.dumps(["hook.jobs_token=from-env"]))
    cfg, merged = _config(["hook.lease_seconds=7"], tracking_uri="http://127.0.0.1:1")
    assert (cfg.hook.jobs_token, cfg.hook.lease_seconds) == ("from-env", 7)
    cfg, _ = _config(["hook.jobs_token=from-o"], tracking_uri="http://127.0.0.1:1")
    assert cfg.hook.jobs_token == "from-o"  # the command line wins


MALFORMED = {
    "tags a list": {"name": "lm", "version": "2", "tags": ["a", "b"]},
    "tags a string": {"name": "lm", "version": "2", "tags": "mlflow_recycle.kind"},
    "tag value not a string": {"name": "lm", "version": "2", "tags": {"k": {"nested": 1}}},
    "name a number": {"name": 7, "version": "2"},
    "name missing": {"version": "2"},
    "version a list": {"name": "lm", "version": ["2"]},
    "version a bool": {"name": "lm", "version": True},
    "version zero": {"name": "lm", "version": "0"},
    "version with leading zeros": {"name": "lm", "version": "007"},
}


def envelope(data) -> bytes:
    return json.dumps({"entity": "model_version", "action": "created", "timestamp": "t", "data": data}).encode()


BAD_BODIES = {
    **{name: envelope(data) for name, data in MALFORMED.items()},
    "data a list": envelope([1, 2]),
    "data a string": envelope("lm v2"),
    "entity missing": json.dumps({"action": "created", "data": {"name": "lm", "version": "2"}}).encode(),
    "action a number": json.dumps({"entity": "model_version", "action": 1, "data": {}}).encode(),
    "not an object": b"[1, 2, 3]",
    "not JSON": b"{'name': 'lm'}",
    "not UTF-8": b'{"entity": "\xff\xfe"}',
    "deeply nested": b'{"entity": "model_version", "action": "created", "data": '
    + b"[" * 100_000
    + b"]" * 100_000
    + b"}",
    "nested tags": envelope({"name": "lm", "version": "2", "tags": {"k": json.loads("[" * 50 + "]" * 50)}}),
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_every_malformed_body_is_a_400_with_a_one_line_reason(body):
    with pytest.raises(DeliveryRejected) as rejected:
        event, data = parse_delivery(body)
        jobs_for_event(event, data, set(), {"model_version.created"})
    assert rejected.value.status == 400
    assert "\n" not in rejected.value.reason and len(rejected.value.reason) < 200, rejected.value.reason


def test_well_formed_bodies_pass_the_schema():
    event, data = parse_delivery(envelope({"name": "lm", "version": "12", "tags": {"a": "b"}, "extra": [1]}))
    assert jobs_for_event(event, data, set(), {"model_version.created"}) == ([JobSpec("lm", "12")], "queued")
    event, data = parse_delivery(json.dumps({"entity": "prompt", "action": "created", "data": {"x": 1}}).encode())
    assert jobs_for_event(event, data, set(), {"model_version.created"}) == ([], "event prompt.created is not handled")


def test_failed_jobs_back_off_exponentially_capped(tmp_path):
    assert [retry_delay(n, 10, 300) for n in range(1, 8)] == [10, 20, 40, 80, 160, 300, 300]
    assert retry_delay(1000, 10, 300) == 300 and retry_delay(3, 0, 300) == 0
    queue = MigrationQueue(tmp_path / "q.db")
    queue.enqueue([JobSpec("lm", "2")], origin="test")
    calls = []

    def flaky(job, guard):
        guard()
        calls.append(job.attempts)
        raise ConnectionError("the tracking server is restarting")

    # seconds of backoff, so that a loaded machine cannot reach the next run_once only after it has passed
    worker = Worker(queue, flaky, max_attempts=3, retry_backoff_seconds=2, retry_backoff_max_seconds=3)
    delays = []
    for attempt in (1, 2, 3):
        wait_until(worker.run_once, f"attempt {attempt} to be claimed", timeout=300, interval=0.05)
        with sqlite3.connect(queue.path) as conn:
            delays.append(conn.execute("SELECT not_before - updated_at FROM jobs").fetchone()[0])
        if attempt < 3:
            assert not worker.run_once()  # backing off: not claimed again at once
    assert calls == [1, 2, 3]
    assert delays[:2] == pytest.approx([2, 3])  # doubled, then capped
    (job,) = queue.jobs()
    assert job.status == "failed" and job.transient and job.error.startswith("ConnectionError")


def test_transient_errors_are_told_apart():
    from mlflow.exceptions import MlflowException

    from mlflow_recycle.errors import RecycleError

    try:
        try:
            raise ConnectionRefusedError(111, "refused")
        except OSError as exc:
            raise MlflowException("API request to http://x/api failed with exception ...") from exc
    except MlflowException as wrapped:
        assert is_transient(wrapped)
    assert is_transient(TimeoutError()) and not is_transient(RecycleError("lm has no version 7"))
    assert not is_transient(MlflowException("RESOURCE_DOES_NOT_EXIST: no such model"))


PAUSABLE_WORKER = textwrap.dedent(
    """
    import sys, time
    from mlflow_recycle.hook.queue import MigrationQueue
    from mlflow_recycle.hook.worker import Worker

    effects = open(sys.argv[2], "a")

    def execute(job, guard):
        for step in range(100000):
            guard()  # the lease checked before each side effect, as a migration does
            effects.write(f"{step}\\n")
            effects.flush()
            time.sleep(0.02)
        return "{}"

    Worker(MigrationQueue(sys.argv[1]), execute, lease_seconds=1.5).run_once()
    """
)


def test_a_paused_worker_stops_at_its_next_step_once_another_took_its_job(tmp_path):
    """A worker process paused (SIGSTOP) past its lease while another takes its job over makes at most
    the one side effect it had checked for before the pause, then stops; the job stays the other's."""
    queue, effects = MigrationQueue(tmp_path / "q.db"), tmp_path / "effects.txt"
    queue.enqueue([JobSpec("lm", "2")], origin="test")
    script = tmp_path / "worker.py"
    script.write_text(PAUSABLE_WORKER)
    first = subprocess.Popen(
        [sys.executable, str(script), str(queue.path), str(effects)], stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: effects.exists() and len(effects.read_text().split()) >= 3, "the first worker's steps")
        servers.pause_outside_queue_lock(first, queue.path)
        before = len(effects.read_text().split())
        second = Worker(queue, lambda job, guard: json.dumps({"by": "second"}), lease_seconds=60)
        wait_until(second.run_once, "the second worker to take the job over", interval=0.1)
    finally:
        first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=900)
    assert "stopped before its next step" in stderr, stderr[-3000:]
    assert len(effects.read_text().split()) - before <= 1  # at most the step checked just before the pause
    (job,) = queue.jobs()
    assert (job.status, job.attempts, json.loads(job.result)) == ("done", 2, {"by": "second"})


def test_an_empty_tracking_uri_is_one_line_naming_the_setting(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mlflow_recycle.cli import main

    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(main, ["reconcile", "--dry-run", "-o", "mlflow.tracking_uri="])
    assert done.exit_code == 2 and "Traceback" not in done.output
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert "mlflow.tracking_uri" in line and "is empty" in line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- against a real tracking server
@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """A real `mlflow server` (its store's files are read to look for secrets)."""
    server = servers.TrackingServer(tmp_path_factory.mktemp("server")).start()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(server.url)
    mlflow.set_experiment("exactly-once-tests")
    yield server
    mlflow.set_tracking_uri(previous)
    server.stop()


@pytest.fixture
def receivers(tracking, tmp_path):
    """Receivers watching one base model each, on a short lease and small evaluation sets."""
    made = []

    def make(base_model: str, *overrides: str, secret: str = SECRET, **options) -> servers.Receiver:
        settings = [f"hook.watch=[{base_model}]", *SETTINGS, *overrides]
        root = tmp_path / f"receiver-{len(made)}"
        made.append(servers.Receiver(tracking.url, root, secret, settings, **options))
        return made[-1]

    yield make
    for receiver in made:
        receiver.stop()
        assert SECRET not in receiver.logs()


def test_two_workers_racing_to_register_one_migration_leave_one_version(tracking, model_dir, data_dir):
    """Both pass the look-up before either creates its version (a barrier holds them there): the
    first version stands, the other worker deletes its own and returns the first."""
    (source,) = base_with_prompts("lm-race", model_dir, data_dir, n_prompts=1)
    prompt = load_prompt(model_uri(source.name, source.version))
    barrier, results, errors = threading.Barrier(2, timeout=600), [], []

    def register() -> None:
        try:
            with mlflow.start_run(run_name="racing worker"):
                info = log_prompt(prompt, "recycled_prompt")
            tags = {TAG_MIGRATION_KEY: "sha256:race"}
            results.append(
                register_prompt(info.model_uri, source.name, prompt, tags=tags, before_register=barrier.wait)
            )
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=register) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    (kept,) = versions_with_key(source.name, "sha256:race")
    assert [r.version for r in results] == [kept.version] * 2
    again = register_prompt(results[0].source, source.name, prompt, tags={TAG_MIGRATION_KEY: "sha256:race"})
    assert again.version == kept.version and len(versions_with_key(source.name, "sha256:race")) == 1


def test_reconcile_retries_a_job_that_failed_on_a_transient_error(tracking, tmp_path, model_dir, data_dir):
    base_with_prompts("lm-retry", model_dir, data_dir, n_prompts=1)
    register_base_model(str(model_dir("small-a-early")), "lm-retry")
    queue = MigrationQueue(tmp_path / "q.db")

    def failed_job(transient: bool) -> None:
        (job_id,) = queue.enqueue([JobSpec("lm-retry", "2")], origin="test")
        assert queue.claim("w", 60).id == job_id
        assert queue.fail(job_id, "w", "boom", max_attempts=1, transient=transient) == "failed"

    failed_job(transient=True)
    retried = reconcile_into(queue, ["lm-retry"], ORIGIN_PERIODIC_RECONCILE)
    assert len(retried) == 1 and queue.last_job("lm-retry", "2").status == "queued"
    queue.claim("w", 60)
    queue.fail(retried[0], "w", "RecycleError: bad settings", max_attempts=1, transient=False)
    assert reconcile_into(queue, ["lm-retry"], ORIGIN_PERIODIC_RECONCILE) == []  # a failure that stays: not retried


def test_the_takeover_finishes_runs_that_registered_and_kills_the_rest(tracking):
    """The state a worker killed right after registering leaves (its runs RUNNING, one with a version):
    the takeover ends the run of the registered version FINISHED and the others KILLED, and that version
    counts: it is a completed prompt, a source of the next migration."""
    import torch

    from mlflow_recycle import SoftPrompt
    from mlflow_recycle.hook import Job
    from mlflow_recycle.hook.worker import JOB_MIGRATE, TAG_BASE_MODEL, TAG_JOB, close_abandoned_runs

    client = MlflowClient()
    experiment = mlflow.set_experiment("takeover-state").experiment_id
    parent = client.create_run(experiment, tags={TAG_JOB: JOB_MIGRATE, TAG_BASE_MODEL: "lm-state"}, run_name="migrate")
    children = [client.create_run(experiment, tags={"mlflow.parentRunId": parent.info.run_id}) for _ in range(2)]
    prompt = SoftPrompt(torch.randn(4, 8), base_model="lm-state", base_model_version="2")
    with mlflow.start_run(run_id=children[0].info.run_id):
        version = log_prompt(prompt, "recycled_prompt", "lm-state-prompt", tags={TAG_MIGRATION_KEY: "sha256:state"})
    client.update_run(children[0].info.run_id, status="RUNNING")  # killed before its run ended
    mlflow.set_experiment("exactly-once-tests")
    closed = close_abandoned_runs(Job("lm-state", "2", id=9, attempts=2), before=time.time() + 1)
    assert set(closed) == {parent.info.run_id, *(c.info.run_id for c in children)}
    statuses = [client.get_run(r.info.run_id).info.status for r in (children[0], children[1], parent)]
    assert statuses == ["FINISHED", "KILLED", "KILLED"]
    assert client.get_run(children[0].info.run_id).data.tags[TAG_CLOSED_BY] == "job 9 attempt 2"
    assert [v.version for v in prompts_for("lm-state", 2, completed=True)] == [version.version]
    client.update_run(children[0].info.run_id, status="KILLED")  # whatever became of its run: the version counts
    assert [v.version for v in prompts_for("lm-state", 2, completed=True)] == [version.version]


def test_projects_runs_get_no_secret_on_their_command_line_params_or_store(tracking, capfd, monkeypatch, model_dir):
    """hook.worker=projects with secrets given as overrides: the Projects run (`mlflow run`, then
    `mlflow-recycle migrate`) gets them in its environment, never as its `overrides` parameter."""
    from mlflow_recycle.config import compose
    from mlflow_recycle.hook.worker import projects_executor

    secret, token = "s3cr3t-from-o-fast", "t0ken-from-o-fast"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.url)  # the project run's processes inherit it
    monkeypatch.setenv("PATH", f"{servers.BIN}:{os.environ['PATH']}")
    monkeypatch.setenv(SECRET_OVERRIDES_ENV, "")  # restored afterwards: the executor sets it in this process
    register_base_model(str(model_dir("small-a")), "lm-projects-secret")  # no prompts: a quick migration
    overrides = ["hook.worker=projects", "evaluate=false", f"hook.secret={secret}", f"+extra.api_key={token}"]
    queue = MigrationQueue(Path(tracking.root) / "projects-queue.db")
    queue.enqueue([JobSpec("lm-projects-secret", "1")], origin="test")
    cfg = compose(overrides, config_name="migrate")
    assert Worker(queue, projects_executor(cfg, overrides, poll_seconds=0.2), max_attempts=1).run_once()
    (job,) = queue.jobs()
    assert job.status == "done", job.error
    run = MlflowClient().get_run(json.loads(job.result)["run_id"])
    assert run.info.status == "FINISHED" and "hook.worker=projects evaluate=false" in run.data.params["overrides"]
    output = "".join(capfd.readouterr())
    assert "=== Running command" in output and "No version of lm-projects-secret before 1" in output
    for text in (secret, token):
        assert text not in output and text not in json.dumps([run.data.params, run.data.tags])
        assert not [p for p in store_files(tracking.root) if text.encode() in p.read_bytes()]


def test_signed_malformed_bodies_get_400_and_queue_nothing(receivers):
    receiver = receivers("lm-door400", "hook.max_body_bytes=2000000").start()
    before = receiver.queue().counts()
    for name, body in BAD_BODIES.items():
        answer = receiver.post(body, signed_headers(body))
        assert answer.status_code == 400, (name, answer.status_code, answer.text)
        assert "\n" not in answer.json()["error"], name
    assert receiver.queue().counts()["queued"] == before["queued"] and receiver.jobs() == []
    assert "Traceback" not in receiver.logs() and receiver.health() == {"status": "ok"}


KILL_AFTER_FIRST_REGISTRATION = textwrap.dedent(
    """
    import os, signal, sys
    from mlflow_recycle import registry
    from mlflow_recycle.config import compose
    from mlflow_recycle.hook.queue import MigrationQueue
    from mlflow_recycle.hook.worker import Worker, in_process_executor

    register = registry.register_prompt

    def register_then_die(*args, **kwargs):
        version = register(*args, **kwargs)
        print("registered", version.name, version.version, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 right after the version is registered

    registry.register_prompt = register_then_die
    cfg = compose(sys.argv[2:], config_name="migrate")
    Worker(MigrationQueue(sys.argv[1]), in_process_executor(cfg), lease_seconds=3).run_once()
    """
)


@pytest.mark.slow  # ~70 s: a worker process killed, a receiver taking its job over
def test_a_worker_killed_right_after_registering_leaves_that_version_in_the_next_migration(
    tracking, receivers, tmp_path, model_dir, data_dir
):
    sources = base_with_prompts("lm-kill9", model_dir, data_dir, n_prompts=3)
    register_base_model(str(model_dir("small-a-early")), "lm-kill9")
    # Not judged (no gate verdict, so every version is a source whatever the policy's threshold); not started
    # yet: a worker process of its queue runs the job first.
    receiver = receivers("lm-kill9", "evaluate=false")
    receiver.queue().enqueue([JobSpec("lm-kill9", "2")], origin="test")
    script = tmp_path / "worker.py"
    script.write_text(KILL_AFTER_FIRST_REGISTRATION)
    overrides = [f"mlflow.tracking_uri={tracking.url}", *SETTINGS, "evaluate=false"]
    died = servers.run_watched([sys.executable, str(script), str(receiver.queue_path), *overrides], env=receiver.env)
    assert died.returncode == -9 and "registered lm-kill9-prompt-" in died.stdout, died.stderr[-3000:]
    (first,) = prompts_for("lm-kill9", 2)
    client = MlflowClient()
    assert client.get_run(first.run_id).info.status == "RUNNING"  # killed before its run ended
    receiver.start()  # takes the job over once the dead worker's lease expired
    wait_for_migration(receiver, lambda: len(prompts_for("lm-kill9", 2)) >= 3, "the rest of the migration", "lm-kill9")
    wait_until(lambda: receiver.queue().last_status("lm-kill9", "2") == "done", "the job")
    assert_migrated_once("lm-kill9", sources)
    run = client.get_run(first.run_id)  # its version was registered: FINISHED, not KILLED
    assert run.info.status == "FINISHED" and run.data.tags[TAG_CLOSED_BY].startswith("job ")
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "KILLED"  # the migration itself was cut short
    # Every registered prompt is a source of the next migration, the one registered just before the kill too.
    assert first.version in {v.version for v in prompts_for("lm-kill9", 2, completed=True)}
    assert len(prompts_for("lm-kill9", 2, completed=True)) == 3 and pending_migrations(["lm-kill9"]) == []
    register_base_model(str(model_dir("small-b")), "lm-kill9")
    assert previous_version_with_prompts("lm-kill9", "3") == "2" and ("lm-kill9", "3") in pending_migrations(
        ["lm-kill9"]
    )


def running_prompt_runs(base_model: str) -> list:
    """The per-prompt runs of ``base_model``'s migrations now RUNNING."""
    experiment = MlflowClient().get_experiment_by_name(MIGRATIONS_EXPERIMENT)
    if experiment is None:
        return []
    running = f"attributes.run_name LIKE '{base_model}-prompt-%' AND attributes.status = 'RUNNING'"
    return MlflowClient().search_runs([experiment.experiment_id], running)


@pytest.mark.slow  # ~60 s: two receivers; the fast version is test_a_paused_worker_stops_at_its_next_step...
def test_a_paused_receiver_that_lost_its_lease_registers_nothing(tracking, receivers, model_dir, data_dir):
    """Receiver 1 is paused (SIGSTOP) in the middle of its first prompt, past its lease; receiver 2 takes
    the job over, marks receiver 1's runs KILLED and migrates every prompt; receiver 1, resumed, stops
    at its next step and leaves its runs KILLED: one version per prompt, nothing running."""
    sources = base_with_prompts("lm-pause", model_dir, data_dir, n_prompts=2)
    first = receivers("lm-pause", "hook.reconcile_on_start=false").start()
    register_base_model(str(model_dir("small-a-early")), "lm-pause")
    body = event_body("lm-pause", 2)
    assert first.post(body, signed_headers(body)).status_code == 202
    wait_until(lambda: running_prompt_runs("lm-pause"), "receiver 1 to migrate its first prompt", interval=0.05)
    first.pause()
    try:
        assert prompts_for("lm-pause", 2) == [], "receiver 1 registered before the pause: the test proves nothing"
        second = receivers("lm-pause", queue_path=first.queue_path).start()
        wait_for_migration(second, lambda: len(prompts_for("lm-pause", 2)) >= 2, "the migration", "lm-pause")
        wait_until(lambda: first.queue().last_status("lm-pause", "2") == "done", "the job")
    finally:
        first.resume()
    wait_until(lambda: "stopped before its next step" in first.logs(), "receiver 1 to stop")
    assert_migrated_once("lm-pause", sources)
    assert "ended the runs its dead predecessor left running" in second.logs()
    client = MlflowClient()
    migrations = client.get_experiment_by_name(MIGRATIONS_EXPERIMENT).experiment_id
    closed = client.search_runs([migrations], f"tags.`{TAG_CLOSED_BY}` LIKE 'job %'")
    of_first = [r for r in closed if "lm-pause" in r.info.run_name]  # receiver 1's: it registered nothing
    assert of_first and all(r.info.status == "KILLED" for r in of_first)  # and left them as receiver 2 did
    assert not client.search_runs([migrations], "attributes.status = 'RUNNING'")


def store_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.mark.slow  # ~1.5 min: an MLflow Projects run (two more processes) per migration
def test_no_secret_given_with_o_reaches_the_store_the_run_params_or_the_log(tracking, receivers, model_dir, data_dir):
    webhook_secret, jobs_token = "s3cr3t-webhook-from-o", "t0ken-jobs-from-o"
    base_with_prompts("lm-secret", model_dir, data_dir, n_prompts=1)
    register_base_model(str(model_dir("small-a-early")), "lm-secret")
    overrides = [
        "hook.worker=projects",
        "evaluate=false",
        f"hook.secret={webhook_secret}",
        f"hook.jobs_token={jobs_token}",
    ]
    receiver = receivers("lm-secret", *overrides, "hook.reconcile_on_start=false", jobs_token=None).start()
    body = event_body("lm-secret", 2)
    assert receiver.post(body, signed_headers(body)).status_code == 401  # the -o secret is the receiver's
    assert receiver.post(body, signed_headers(body, secret=webhook_secret)).status_code == 202
    receiver.jobs_token = jobs_token  # /jobs answers the -o token
    wait_for_migration(receiver, lambda: len(prompts_for("lm-secret", 2)) == 1, "the Projects run", "lm-secret")
    (job,) = wait_until(lambda: [j for j in receiver.jobs() if j["status"] == "done"], "the job")
    run = MlflowClient().get_run(job["result"]["run_id"])
    assert (
        run.data.tags["mlflow.project.entryPoint"] == "migrate"
        and "hook.worker=projects" in run.data.params["overrides"]
    )
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    for text in (webhook_secret, jobs_token):
        assert text not in receiver.logs()
        assert not [r.info.run_id for r in runs if text in json.dumps([r.data.params, r.data.tags])]
        assert not [p for p in store_files(tracking.root) if text.encode() in p.read_bytes()]


@pytest.mark.slow  # ~5 min: 20 migrations through a real receiver
def test_receiver_memory_stays_flat_over_many_migrations(tracking, receivers, model_dir, data_dir):
    """20 migrations of one prompt each (tiny models): the receiver's RSS after the last 15 grows far
    less than the ~31 MB per migration it grew by before (a generous bound: no flaky threshold)."""
    base_with_prompts("lm-memory", model_dir, data_dir, n_prompts=1)
    receiver = receivers("lm-memory", "hook.reconcile_on_start=false").start()
    client, rss = MlflowClient(), []
    template = client.get_model_version("lm-memory", "1")
    for version in range(2, 22):  # the same weights as new versions: a copy of v1's registration
        mlflow.register_model(template.source, "lm-memory", tags=template.tags)
        body = event_body("lm-memory", version)
        assert receiver.post(body, signed_headers(body)).status_code == 202
        wait_for_migration(
            receiver, lambda v=version: len(prompts_for("lm-memory", v)) == 1, f"v{version}", "lm-memory", str(version)
        )
        wait_until(lambda v=version: receiver.queue().last_status("lm-memory", str(v)) == "done", "the job")
        rss.append(receiver.rss_bytes())
    print("receiver RSS (MB) after each migration:", [round(r / 2**20) for r in rss])
    assert rss[-1] - rss[4] < 15 * 10 * 2**20, [round(r / 2**20) for r in rss]
