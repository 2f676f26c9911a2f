"""Verify MLflow registry webhooks (MLflow 3 signing scheme). Pure: no server, no Prefect.

MLflow signs each delivery with HMAC-SHA256 over "<delivery id>.<timestamp>.<raw body>" using the
webhook's secret, and sends:
    X-MLflow-Signature: v1,<base64 digest>
    X-MLflow-Delivery-Id: <uuid>
    X-MLflow-Timestamp: <unix seconds>
A receiver must check the signature on the raw bytes and reject old timestamps (replays).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Mapping

MAX_SKEW_SECONDS = 300


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The header value MLflow would send for this delivery."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()


def verify(secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None,
           max_skew_s: float = MAX_SKEW_SECONDS) -> str | None:
    """Return None if the delivery is authentic and fresh, else why it is not (for the 401 reply)."""
    sent = headers.get("X-MLflow-Signature", "")
    delivery_id = headers.get("X-MLflow-Delivery-Id", "")
    timestamp = headers.get("X-MLflow-Timestamp", "")
    if not (sent.startswith("v1,") and delivery_id and timestamp.isdigit()):
        return "missing or malformed X-MLflow-Signature/Delivery-Id/Timestamp headers"
    if abs((time.time() if now is None else now) - int(timestamp)) > max_skew_s:
        return "timestamp outside the allowed window (replayed or clock skew)"
    if not hmac.compare_digest(sent, signature(secret, delivery_id, timestamp, body)):
        return "signature does not match the shared secret"
    return None


def new_model_version(payload: Mapping) -> tuple[str, str] | None:
    """(registered model name, version) if the payload announces a created model version."""
    if (payload.get("entity"), payload.get("action")) != ("model_version", "created"):
        return None
    data = payload.get("data") or {}
    return str(data["name"]), str(data["version"])
