"""A local MLflow tracking server with webhooks on, and a receiver process, on loopback.

For the integration tests and the latency benchmark (``bench/`` imports it as
``tests.servers``): both run as real processes (``mlflow server``, ``mlflow-recycle hook
serve``), exactly as deployed, with the settings MLflow needs to call a receiver on loopback.
Waits follow progress (:meth:`Receiver.wait_while_working`) rather than a fixed wall clock,
so they hold on a loaded machine.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import requests

from mlflow_recycle.hook.queue import MigrationQueue

T = TypeVar("T")
BIN = Path(sys.executable).parent


def run_watched(
    command: Sequence[str], *, stall: float = 600, check: bool = False, **popen: Any
) -> subprocess.CompletedProcess:
    """``subprocess.run(command, capture_output=True, text=True)`` that times out on silence, not on
    the wall clock: the command is killed only after ``stall`` seconds without a line on its stdout
    or stderr, so a loaded machine slows a test down without failing it, and a hung one still fails."""
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen
    )
    out: list[str] = []
    err: list[str] = []
    heard = [time.monotonic()]

    def pump(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)
            heard[0] = time.monotonic()

    streams = ((process.stdout, out), (process.stderr, err))
    pumps = [threading.Thread(target=pump, args=pair, daemon=True) for pair in streams]
    for thread in pumps:
        thread.start()
    while process.poll() is None:
        if time.monotonic() - heard[0] > stall:
            process.kill()
            process.wait()
            raise subprocess.TimeoutExpired(command, stall, "".join(out), "".join(err))
        time.sleep(0.2)
    for thread in pumps:
        thread.join()
    result = subprocess.CompletedProcess(command, process.returncode, "".join(out), "".join(err))
    if check:
        result.check_returncode()
    return result


_TEMPLATE_STORE: list[Path] = []


def seeded_store(directory: str | os.PathLike, name: str = "mlflow.db", default_artifacts: str | None = None) -> str:
    """The URI of a SQLite tracking store at ``directory/name``, as MLflow makes a new one.

    MLflow builds a new store through every schema migration, about 2 s here, and the suite makes
    dozens: the tables are made once per process and copied. The copy is the store MLflow would make
    in ``directory``: its Default experiment keeps artifacts in ``directory/mlruns/0``, or under
    ``default_artifacts`` (a server's ``mlflow-artifacts:/0``). A store already there is kept as is.
    """
    path = Path(directory) / name
    if not path.exists():
        if not _TEMPLATE_STORE:
            from mlflow import MlflowClient

            root = Path(tempfile.mkdtemp(prefix="mlflow-store-"))
            atexit.register(shutil.rmtree, root, True)
            MlflowClient(f"sqlite:///{root}/template.db").search_experiments()
            _TEMPLATE_STORE.append(root / "template.db")
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_TEMPLATE_STORE[0], path)
        location = default_artifacts or str(Path(directory).resolve() / "mlruns" / "0")
        with contextlib.closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (location,))
    return f"sqlite:///{path}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.2) -> T:
    """Poll ``predicate`` until it returns something truthy; TimeoutError after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def queue_is_writable(path: Path, timeout: float = 0.5) -> bool:
    """Whether a write transaction on the queue file can start now (no process holds its write lock)."""
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError:
        return False
    finally:
        conn.close()


def pause_outside_queue_lock(process: subprocess.Popen, queue: Path, tries: int = 100) -> None:
    """SIGSTOP ``process``, at a moment it does not hold the queue's write lock: paused holding it (a few
    milliseconds per lease renewal) it would block every other process's queue writes until resumed."""
    for _ in range(tries):
        process.send_signal(signal.SIGSTOP)
        if queue_is_writable(queue):
            return
        process.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    raise RuntimeError(f"process {process.pid} holds the write lock of {queue} all the time")


def _get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    try:
        response = requests.get(url, headers=headers, timeout=10)
        return response.json() if response.ok else None
    except (requests.RequestException, ValueError):
        return None


def _stop(process: subprocess.Popen | None, grace: float = 120) -> None:
    """SIGTERM, and SIGKILL if it has not exited after ``grace`` seconds (a loaded machine is slow to exit);
    a paused (SIGSTOP) process is resumed first, or it could not act on the SIGTERM."""
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class TrackingServer:
    """``mlflow server`` on a free port with a SQLite backend in ``root`` and webhooks enabled."""

    def __init__(self, root: Path, encryption_key: str | None = None) -> None:
        from cryptography.fernet import Fernet

        self.root, self.port = Path(root), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.starts = 0
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": encryption_key or Fernet.generate_key().decode(),
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",  # the receiver is plain http on loopback
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            "MLFLOW_WEBHOOK_CACHE_TTL": "0",  # a webhook created a moment ago fires at once
        }
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 600) -> TrackingServer:
        """Start ``mlflow server``; wait for ``/health`` while the process lives (a generous ceiling)."""
        store = seeded_store(self.root, default_artifacts="mlflow-artifacts:/0")
        command = [str(BIN / "mlflow"), "server", "--backend-store-uri", store]
        command += ["--artifacts-destination", str(self.root / "artifacts")]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.starts += 1
        log = open(self.root / f"server-{self.starts}.log", "w")  # noqa: SIM115 (the process keeps it)
        self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)

        def up() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.process.returncode}: see {log.name}")
            return self.healthy()

        wait_until(up, timeout, "the MLflow server")
        return self

    def restart(self, encryption_key: str | None = None) -> TrackingServer:
        """Stop and start again on the same port and store; with ``encryption_key``, a new webhook key."""
        self.stop()
        if encryption_key:
            self.env["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"] = encryption_key
        return self.start()

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=2).ok
        except requests.RequestException:
            return False

    def stop(self) -> None:
        _stop(self.process)


class Receiver:
    """``mlflow-recycle hook serve`` as its own process: start, kill, restart on the same queue."""

    def __init__(
        self,
        tracking_uri: str,
        root: Path,
        secret: str,
        overrides: Sequence[str] = (),
        jobs_token: str | None = "test-jobs-token",
        data_home: Path | None = None,
        queue_path: Path | None = None,
    ) -> None:
        """``data_home``: leave ``hook.queue`` at its default, under this ``XDG_DATA_HOME``;
        ``queue_path``: the queue file (another receiver's, to take its jobs over), else one in ``root``."""
        self.tracking_uri, self.root, self.secret, self.jobs_token = tracking_uri, Path(root), secret, jobs_token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_home = data_home
        if data_home is None:
            self.queue_path = Path(queue_path) if queue_path else self.root / "queue.db"
            self.overrides = [f"hook.port={self.port}", f"hook.queue={self.queue_path}", *overrides]
        else:
            self.queue_path = Path(data_home) / "mlflow-recycle" / "queue.db"
            self.overrides = [f"hook.port={self.port}", *overrides]
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def env(self) -> dict[str, str]:
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_RECYCLE_WEBHOOK_SECRET": self.secret}
        # Not inherited from the test process: its jobs token, queue, data home and active experiment.
        for name in ("MLFLOW_RECYCLE_JOBS_TOKEN", "MLFLOW_RECYCLE_QUEUE", "XDG_DATA_HOME", "MLFLOW_EXPERIMENT_ID"):
            env.pop(name, None)
        if self.data_home is not None:
            env["XDG_DATA_HOME"] = str(self.data_home)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `mlflow run` and `mlflow-recycle` for Projects runs
        return {**env, "MLFLOW_RECYCLE_JOBS_TOKEN": self.jobs_token} if self.jobs_token else env

    def start(self, timeout: float = 300) -> Receiver:
        """Start ``hook serve`` and wait for ``/health`` while the process lives (start-up reconcile included)."""
        self.root.mkdir(parents=True, exist_ok=True)
        command = [str(BIN / "mlflow-recycle"), "hook", "serve", *[f"-o{o}" for o in self.overrides]]
        self.starts += 1
        log = open(self.root / f"receiver-{self.starts}.log", "w")  # noqa: SIM115 (the process keeps it)
        self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)

        def up() -> bool:
            if not self.alive:
                raise RuntimeError(f"the receiver exited with {self.process.returncode}:\n{self.logs()[-3000:]}")
            return self.health() == {"status": "ok"}

        wait_until(up, timeout, "the receiver")
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def health(self) -> dict | None:
        return _get_json(f"{self.url}/health")

    def jobs(self) -> list[dict]:
        """``GET /jobs`` with the bearer token."""
        return _get_json(f"{self.url}/jobs", {"Authorization": f"Bearer {self.jobs_token}"}) or []

    def queue(self) -> MigrationQueue:
        """The receiver's queue file, read directly (full job errors, delivery counts)."""
        return MigrationQueue(self.queue_path)

    def post(self, body: bytes, headers: dict[str, str]) -> requests.Response:
        return requests.post(f"{self.url}/webhook", data=body, headers=headers, timeout=30)

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """``mlflow-recycle ARGS`` against this receiver's tracking server and secret."""
        command = [str(BIN / "mlflow-recycle"), *args]
        return run_watched(command, env=env or self.env)

    def install_webhook(self, name: str | None = None) -> str:
        """``mlflow-recycle hook install`` pointing at this receiver (it checks it too); returns the webhook name."""
        name = name or f"recycle-{self.port}"
        done = self.cli("hook", "install", "--url", f"{self.url}/webhook", "--name", name)
        if done.returncode != 0:
            raise RuntimeError(f"hook install failed ({done.returncode}): {done.stdout}{done.stderr[-3000:]}")
        return name

    def wait_while_working(
        self, predicate: Callable[[], T], what: str, base_model: str, version: str, ceiling: float = 1800
    ) -> T:
        """Poll ``predicate`` while the receiver lives and its job for (base_model, version) is not over.

        Fails at once when the receiver died or the job failed (with the job's full error),
        and only after a generous ``ceiling`` otherwise: no fixed wall-clock guess of how
        long a migration takes on a busy machine.
        """

        def progress() -> T | None:
            value = predicate()
            if value:
                return value
            if not self.alive:
                raise RuntimeError(f"the receiver exited while waiting for {what}:\n{self.logs()[-3000:]}")
            jobs = [j for j in self.queue().jobs() if (j.base_model, j.to_version) == (base_model, version)]
            if jobs and all(j.status == "failed" for j in jobs):
                raise RuntimeError(f"the job for {base_model} v{version} failed: {jobs[-1].error}")
            if jobs and all(j.status == "done" for j in jobs):
                value = predicate()  # done just now
                if not value:
                    raise RuntimeError(f"the job for {base_model} v{version} is done but not {what}")
            return value

        return wait_until(progress, ceiling, what, interval=0.1)

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as in a crash or an OOM kill."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: every thread stops where it is, as in a VM pause, a long GC or a swapped-out process
        (outside the queue's write lock: :func:`pause_outside_queue_lock`)."""
        pause_outside_queue_lock(self.process, self.queue_path)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self.process.send_signal(signal.SIGCONT)

    def rss_bytes(self) -> int:
        """The receiver process's resident memory now (Linux ``/proc``)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc: not Linux?")

    def stop(self) -> None:
        _stop(self.process)

    def logs(self) -> str:
        return "".join((self.root / f"receiver-{i}.log").read_text() for i in range(1, self.starts + 1))
