"""Secrets given as ``-o`` overrides never leave the process as text.

Any override whose key names a secret, a token, a key, a password or credentials
(``hook.secret``, ``hook.jobs_token``, ``+db.password``) is kept out of what is logged or
handed to another process on its command line (an MLflow Projects run's ``overrides``
parameter, which the run also records). The projects worker passes such overrides to its
runs through the environment instead (:data:`SECRET_OVERRIDES_ENV`, read back by the CLI).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping

#: The environment variable carrying secret overrides (a JSON list) to a child ``mlflow-recycle``.
SECRET_OVERRIDES_ENV = "MLFLOW_RECYCLE_SECRET_OVERRIDES"

_SECRET_WORD = re.compile(r"(?:^|[._/-])(secrets?|token|key|apikey|passwords?|passwd|credentials?)(?:$|[._/-])", re.I)


def is_secret_override(override: str) -> bool:
    """Whether the override's key names a secret, token, key, password or credentials (``hook.secret=...``)."""
    key = override.split("=", 1)[0].lstrip("+~").strip()
    return bool(_SECRET_WORD.search(key))


def public_overrides(overrides: Iterable[str]) -> list[str]:
    """The overrides that may be logged or put on a command line: those that are not secrets."""
    return [o for o in overrides if not is_secret_override(o)]


def secret_overrides(overrides: Iterable[str]) -> list[str]:
    """The overrides that are secrets, in their order."""
    return [o for o in overrides if is_secret_override(o)]


def secret_overrides_env(overrides: Iterable[str]) -> dict[str, str]:
    """The environment that passes the secret ``overrides`` to a child process (empty when there are none)."""
    secrets = secret_overrides(overrides)
    return {SECRET_OVERRIDES_ENV: json.dumps(secrets)} if secrets else {}


def secret_overrides_from_env(environ: Mapping[str, str] | None = None) -> list[str]:
    """The secret overrides a parent process passed in :data:`SECRET_OVERRIDES_ENV` (only secret ones are taken)."""
    text = (os.environ if environ is None else environ).get(SECRET_OVERRIDES_ENV, "")
    try:
        values = json.loads(text) if text else []
    except ValueError:
        return []
    return [v for v in values if isinstance(v, str) and is_secret_override(v)] if isinstance(values, list) else []
