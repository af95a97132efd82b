"""Being told: MLflow's registry webhooks (MLflow 3.3 and newer) wake the follower the moment the alias moves.

Where the tracking store is an MLflow server and ``MLOPS_SERVING_WEBHOOK_URL`` says where that server reaches this
one, the model server registers a webhook for alias changes (``model_version_alias.created`` and ``.deleted``) with
the secret ``MLOPS_SERVING_WEBHOOK_SECRET``, and MLflow POSTs to ``/webhooks/mlflow`` whenever an alias moves. An
event is only a hint: a valid one for our model and alias makes the follower read the registry at once instead of at
its next poll, so even an event that got through could move nothing the registry does not say. Polling stays, as
the fallback (a lost delivery, a registry without webhooks) and for a local store.

A delivery is accepted only with MLflow's HMAC-SHA256 signature over ``<delivery id>.<timestamp>.<body>`` (header
``X-MLflow-Signature: v1,<base64>``), a timestamp within :data:`MAX_AGE_SECONDS` of now, and a delivery id not seen
before: a forged event fails the signature, a replayed one the timestamp or the id.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from ml.settings import Settings

log = logging.getLogger(__name__)

PATH = "/webhooks/mlflow"
SIGNATURE_HEADER = "x-mlflow-signature"
TIMESTAMP_HEADER = "x-mlflow-timestamp"
DELIVERY_ID_HEADER = "x-mlflow-delivery-id"
SIGNATURE_VERSION = "v1"
# How old a delivery may be; MLflow retries a failed one for about a minute.
MAX_AGE_SECONDS = 300
# How many delivery ids are remembered against replays: more than MLflow sends within MAX_AGE_SECONDS here.
REMEMBERED_DELIVERIES = 10_000
ALIAS_EVENTS = ("model_version_alias.created", "model_version_alias.deleted")


class RefusedDelivery(ValueError):
    """A delivery that is not MLflow's, or not fresh: it moves nothing."""


class DeliveryVerifier:
    """Checks each delivery's signature, age and id; thread-safe."""

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def verify(self, body: bytes, headers: Mapping[str, str], now: float | None = None) -> dict[str, Any]:
        """The delivery's JSON payload, once it is proven MLflow's and new; raises :class:`RefusedDelivery`."""
        delivery_id = headers.get(DELIVERY_ID_HEADER, "")
        timestamp = headers.get(TIMESTAMP_HEADER, "")
        signature = headers.get(SIGNATURE_HEADER, "")
        if not (delivery_id and timestamp and signature):
            raise RefusedDelivery("the delivery lacks MLflow's signature, timestamp or delivery id")
        signed = f"{delivery_id}.{timestamp}.".encode() + body
        expected = base64.b64encode(hmac.new(self._secret, signed, hashlib.sha256).digest()).decode()
        if not hmac.compare_digest(signature.encode(), f"{SIGNATURE_VERSION},{expected}".encode()):
            raise RefusedDelivery("the signature does not match the webhook's secret")
        now = time.time() if now is None else now
        if not timestamp.isdigit() or abs(now - int(timestamp)) > MAX_AGE_SECONDS:
            raise RefusedDelivery(f"the delivery is older than {MAX_AGE_SECONDS} s (or from the future)")
        with self._lock:
            if delivery_id in self._seen:
                raise RefusedDelivery(f"delivery {delivery_id} was received before")
            self._seen[delivery_id] = now
            while len(self._seen) > REMEMBERED_DELIVERIES:
                self._seen.popitem(last=False)
        try:
            payload = json.loads(body)
        except ValueError as error:
            raise RefusedDelivery(f"the body is not JSON: {error}") from error
        if not isinstance(payload, dict):
            raise RefusedDelivery("the body is not a JSON object")
        return payload


def moves_alias(payload: Mapping[str, Any], model_name: str, alias: str) -> bool:
    """Whether a verified delivery says that ``alias`` of ``model_name`` moved (was set or removed)."""
    data = payload.get("data")
    return (
        f"{payload.get('entity')}.{payload.get('action')}" in ALIAS_EVENTS
        and isinstance(data, dict)
        and data.get("name") == model_name
        and data.get("alias") == alias
    )


def webhook_name(settings: Settings) -> str:
    return f"mlops-serving-{settings.model_name}-{settings.production_alias}"


def subscription_problem(settings: Settings) -> str | None:
    """Why this configuration cannot subscribe to the registry's alias events, or None when it can."""
    if not (settings.serving_webhook_url and settings.serving_webhook_secret):
        return "MLOPS_SERVING_WEBHOOK_URL and MLOPS_SERVING_WEBHOOK_SECRET must both be set to subscribe"
    if not settings.tracking_uri.startswith(("http://", "https://")):
        return "the registry is a local store, which sends no webhooks"
    return None


def subscribe(settings: Settings) -> str:
    """Register (or update) this server's webhook on the MLflow server; returns the webhook's id.

    One webhook per model and alias, found by name, so a restarted server updates its own instead of adding one.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)
    name = webhook_name(settings)
    existing = [hook for hook in client.list_webhooks() if hook.name == name]
    fields: dict[str, Any] = {
        "url": settings.serving_webhook_url,
        "events": list(ALIAS_EVENTS),
        "secret": settings.serving_webhook_secret,
        "description": f"the model server of models:/{settings.model_name}@{settings.production_alias}",
    }
    if existing:
        hook = client.update_webhook(existing[0].webhook_id, status="ACTIVE", **fields)
    else:
        hook = client.create_webhook(name=name, **fields)
    log.info("subscribed to the registry's alias events as webhook %s (%s)", hook.webhook_id, name)
    return str(hook.webhook_id)
