"""Verifying MLflow webhook deliveries: HMAC signature and timestamp.

MLflow signs ``"{delivery_id}.{timestamp}.{raw body}"`` with HMAC-SHA256 and the webhook's
secret and sends ``X-MLflow-Signature: v1,<base64 digest>`` with ``X-MLflow-Delivery-Id``
and ``X-MLflow-Timestamp`` (Unix seconds). A delivery is genuine when the signature
matches, and fresh when its timestamp is within the tolerance of now; replayed delivery
ids are caught by the queue, which remembers them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"


class DeliveryRejected(Exception):
    """A delivery that must not be queued; ``status`` is the HTTP answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends for this delivery."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, *, tolerance_seconds: float, now: float | None = None
) -> str:
    """Return the delivery id of a genuine, fresh delivery; raise :class:`DeliveryRejected` otherwise."""
    delivery_id = headers.get(DELIVERY_ID_HEADER)
    timestamp = headers.get(TIMESTAMP_HEADER)
    signature = headers.get(SIGNATURE_HEADER)
    if not delivery_id or not timestamp or not signature:
        missing = [
            h
            for h, v in (
                (DELIVERY_ID_HEADER, delivery_id),
                (TIMESTAMP_HEADER, timestamp),
                (SIGNATURE_HEADER, signature),
            )
            if not v
        ]
        raise DeliveryRejected(401, f"missing {', '.join(missing)}: configure the webhook with a secret")
    if not hmac.compare_digest(signature.encode(), sign(secret, delivery_id, timestamp, body).encode()):
        raise DeliveryRejected(401, "bad signature: the webhook's secret differs from the receiver's")
    try:
        age = (time.time() if now is None else now) - int(timestamp)
    except ValueError:
        raise DeliveryRejected(400, f"malformed {TIMESTAMP_HEADER} {timestamp!r}") from None
    if abs(age) > tolerance_seconds:
        raise DeliveryRejected(
            400, f"stale delivery: timestamp is {age:.0f} s from now (tolerance {tolerance_seconds:.0f} s)"
        )
    return delivery_id
