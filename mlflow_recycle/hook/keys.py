"""The tracking server's webhook encryption key, kept in a file so that restarts reuse it.

``mlflow server`` encrypts each webhook's secret with ``MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY``
(a Fernet key). Started with another key, it can no longer decrypt them: every delivery
fails (``Failed to deliver webhook``, ``InvalidToken`` in its log only) and the webhook API
answers 500 (``Error in _list_webhooks: .`` in its log). So the key is
generated once, kept in ``hook.encryption_key_file`` (readable only by its owner), and
every start of the server reads it from there (``mlflow-recycle hook encryption-key``).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import RecycleError


def default_key_file() -> Path:
    """``$XDG_CONFIG_HOME/mlflow-recycle/webhook-encryption.key`` (``~/.config/...`` by default)."""
    config_home = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(config_home) if Path(config_home).is_absolute() else Path.home() / ".config"
    return base / "mlflow-recycle" / "webhook-encryption.key"


def keep_encryption_key(path: str | Path | None = None) -> str:
    """The key kept in ``path`` (default :func:`default_key_file`); a new one is created there on first use."""
    from cryptography.fernet import Fernet

    path = Path(path).expanduser() if path else default_key_file()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Fernet.generate_key()
        try:  # O_EXCL: two first uses at once cannot write two different keys
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(key + b"\n")
    key = path.read_text().strip()
    try:
        Fernet(key.encode())
    except ValueError:
        raise RecycleError(f"{path} (hook.encryption_key_file) does not hold a Fernet key.") from None
    return key
