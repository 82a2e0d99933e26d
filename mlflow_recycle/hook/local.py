"""A local MLflow tracking server with webhooks on, and a receiver process, on loopback.

For trying the hook on one machine, for the integration tests and for the latency
benchmark: both run as real processes (``mlflow server``, ``mlflow-recycle hook serve``),
exactly as deployed, with the settings MLflow needs to call a receiver on loopback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import requests

T = TypeVar("T")
BIN = Path(sys.executable).parent


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


def _get_json(url: str) -> Any:
    try:
        response = requests.get(url, timeout=2)
        return response.json() if response.ok else None
    except (requests.RequestException, ValueError):
        return None


class TrackingServer:
    """``mlflow server`` on a free port with a SQLite backend in ``root`` and webhooks enabled."""

    def __init__(self, root: Path) -> None:
        from cryptography.fernet import Fernet

        self.root, self.port = Path(root), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": Fernet.generate_key().decode(),
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",  # the receiver is plain http on loopback
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            "MLFLOW_WEBHOOK_CACHE_TTL": "0",  # a webhook created a moment ago fires at once
        }
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> TrackingServer:
        self.root.mkdir(parents=True, exist_ok=True)
        command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db"]
        command += ["--artifacts-destination", str(self.root / "artifacts")]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        log = open(self.root / "server.log", "w")  # noqa: SIM115 (the process keeps it)
        self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.healthy, timeout, "the MLflow server")
        return self

    def healthy(self) -> bool:
        try:
            return requests.get(f"{self.url}/health", timeout=2).ok
        except requests.RequestException:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)


class Receiver:
    """``mlflow-recycle hook serve`` as its own process: start, kill, restart on the same queue."""

    def __init__(self, tracking_uri: str, root: Path, secret: str, overrides: Sequence[str] = ()) -> None:
        self.tracking_uri, self.root, self.secret = tracking_uri, Path(root), secret
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.overrides = [f"hook.port={self.port}", f"hook.queue={self.root / 'queue.db'}", *overrides]
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 90) -> Receiver:
        self.root.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_RECYCLE_WEBHOOK_SECRET": self.secret}
        command = [str(BIN / "mlflow-recycle"), "hook", "serve", *[f"-o{o}" for o in self.overrides]]
        self.starts += 1
        log = open(self.root / f"receiver-{self.starts}.log", "w")  # noqa: SIM115 (the process keeps it)
        self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.health, timeout, "the receiver")
        return self

    def health(self) -> dict | None:
        return _get_json(f"{self.url}/health")

    def jobs(self) -> list[dict]:
        return _get_json(f"{self.url}/jobs") or []

    def post(self, body: bytes, headers: dict[str, str]) -> requests.Response:
        return requests.post(f"{self.url}/webhook", data=body, headers=headers, timeout=30)

    def install_webhook(self, name: str | None = None) -> str:
        """``mlflow-recycle hook install`` pointing at this receiver; returns the webhook name."""
        name = name or f"recycle-{self.port}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_RECYCLE_WEBHOOK_SECRET": self.secret}
        command = [str(BIN / "mlflow-recycle"), "hook", "install", "--url", f"{self.url}/webhook", "--name", name]
        subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=True)
        return name

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as in a crash or an OOM kill."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(15)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)

    def logs(self) -> str:
        return "".join((self.root / f"receiver-{i}.log").read_text() for i in range(1, self.starts + 1))
