"""The model server: serves ``models:/<name>@<alias>`` and follows the alias as it moves.

Start it with ``mlops serve`` or ``python -m ml.serving`` (``--help`` lists the options). Endpoints, compatible with
``mlflow models serve`` clients:

- ``POST /invocations``: JSON (``dataframe_split``, ``dataframe_records``, ``instances``, ``inputs``) or ``text/csv``;
  answers ``{"predictions": [...]}``. Bad input gets a 4xx ``{"error_code": ..., "message": ...}`` naming the problem
  (see :mod:`ml.serving.schema`); a body over ``--max-body-bytes`` gets 413.
- ``GET /ping`` (and ``HEAD``): 200 once a version is loaded, 503 before.
- ``GET /health``: the same status codes, with details: ``ok``, ``loading``, ``degraded`` (a version failed to load,
  the registry is unreachable or has no Production version; the loaded version keeps serving) or ``unavailable``.
- ``GET /version``: name, version, run_id, loaded_at and alias of the version answering.
- ``GET /metrics``: Prometheus text format (:mod:`ml.serving.metrics`).
- ``POST /feedback``: the true labels of answered requests, by request id (:mod:`ml.serving.feedback`).

Every response carries ``X-Model-Version``: the version that answered (``none`` before any is loaded). Every
``/invocations`` response carries ``X-Request-Id``: the client's, when it sends a short safe one, else one the server
makes. Every ``GET`` endpoint answers ``HEAD`` too. Answered requests are recorded in the data store off the request
path (:mod:`ml.serving.recorder`, :mod:`ml.records`).

Authentication: with a token configured (``MLOPS_SERVING_TOKEN``), every endpoint but the probes ``/ping`` and
``/health`` needs ``Authorization: Bearer <token>`` (401 otherwise). Without one the server listens on loopback only:
it refuses to start on another address unless ``--allow-unauthenticated`` says so. A client must send its whole
request (headers and body) within ``--read-timeout`` seconds, or gets 408 and the connection is closed, so slow or
stalled clients cannot hold connections for ever. Credentials in the tracking URI never appear in responses or logs.

A plain ASGI application on uvicorn, without a web framework: a single-row request spends about a millisecond in
the model, so per-request framework overhead would be a visible share of the latency. Predictions run on the event
loop's thread: scikit-learn holds the GIL for most of a small predict, so a thread pool would add a hand-off per
request without adding parallelism.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import uvicorn

import mlflow
from ml import object_store, records
from ml.redaction import mask_credentials, mask_logging_credentials
from ml.serving import feedback, metrics, webhook
from ml.serving.follower import ProductionFollower
from ml.serving.loader import LoadedModel
from ml.serving.protocol import MAX_REQUEST_HEAD_BYTES, read_timeout_protocol
from ml.serving.recorder import Recorder
from ml.serving.schema import InputError
from ml.settings import ConfigurationError, Settings, local_store_problem

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_PORT = 5001
DEFAULT_POLL_INTERVAL = 2.0
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_READ_TIMEOUT = 30.0
JSON_CONTENT_TYPE = "application/json"
VERSION_HEADER = b"x-model-version"
REQUEST_ID_HEADER = b"x-request-id"
ROUTES = {
    "/invocations": "POST",
    "/feedback": "POST",
    "/ping": "GET",
    "/health": "GET",
    "/version": "GET",
    "/metrics": "GET",
    webhook.PATH: "POST",
}
# Probes answer without a token: orchestrators' health checks carry none, and they reveal no data or secret.
OPEN_PATHS = frozenset({"/ping", "/health"})
# Authenticated by MLflow's signature instead of the bearer token, which MLflow cannot send.
SIGNED_PATHS = frozenset({webhook.PATH})
HIDDEN_ERROR = "an error; send the bearer token for its text"


def _without_error_texts(health: dict[str, Any]) -> dict[str, Any]:
    """``/health`` for a caller without the token: the states alone. An error's text names internal addresses, paths
    and user names, which an open probe must not hand out."""
    registry, recording = dict(health["registry"]), dict(health["recording"])
    events = recording["window_events"] = dict(recording.get("window_events", {}))
    for part in (registry, recording, events):
        if part.get("last_error"):
            part["last_error"] = HIDDEN_ERROR
    last_error = HIDDEN_ERROR if health.get("last_error") else None
    return {**health, "registry": registry, "recording": recording, "last_error": last_error}


# The follower is its own retry loop: it polls again within seconds and retries a failed load with backoff. The MLflow
# client's retries (seven, with exponential backoff, and a 120 s timeout by default) would only hold a poll for
# minutes before /health could report an unreachable registry, and log a warning per retry.
REGISTRY_CLIENT_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = JSON_CONTENT_TYPE
    error_code: str | None = None
    headers: tuple[tuple[bytes, bytes], ...] = ()


def json_response(status: int, payload: Any) -> Response:
    return Response(status, json.dumps(payload, default=_json_default).encode())


def error_response(
    status: int, error_code: str, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> Response:
    body = json.dumps({"error_code": error_code, "message": mask_credentials(message)}).encode()
    return Response(status, body, error_code=error_code, headers=headers)


class ModelServer:
    """The ASGI application."""

    def __init__(
        self,
        follower: ProductionFollower,
        recorder: Recorder,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        *,
        token: str = "",
        webhook_secret: str = "",
    ) -> None:
        self.follower = follower
        self.recorder = recorder
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics.ServingMetrics(follower, recorder)
        self.deliveries = webhook.DeliveryVerifier(webhook_secret) if webhook_secret else None
        self._expected_authorization = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started, received_at = time.perf_counter(), time.time()
        model = self.follower.current  # read once: the answer and its version header come from this one model
        path = scope["path"]
        request_id = self._request_id(scope) if path == "/invocations" else None
        try:
            if request_id is None and path == "/invocations":
                raise InputError(feedback.REQUEST_ID_RULE, error_code="INVALID_REQUEST_ID")
            response = await self._route(scope, receive, model, request_id, received_at)
        except InputError as error:
            response = error_response(error.status, error.error_code, error.message)
        except Exception:
            log.exception("unexpected error answering %s %s", scope["method"], path)
            response = error_response(500, "INTERNAL_ERROR", "unexpected server error; see the server's log")
        version = str(model.version) if model else "none"
        identified = ((REQUEST_ID_HEADER, request_id.encode()),) if request_id else ()
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [
                    (b"content-type", response.content_type.encode()),
                    (b"content-length", str(len(response.body)).encode()),
                    (VERSION_HEADER, version.encode()),
                    *identified,
                    *response.headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else response.body})
        label = path if path in ROUTES else "other"
        self.metrics.record(label, response.status, response.error_code, version, time.perf_counter() - started)

    @staticmethod
    def _request_id(scope: Scope) -> str | None:
        """The client's request id, a new one when it sent none, None when the one it sent is not safe to keep."""
        given = _header(scope, REQUEST_ID_HEADER)
        if not given:
            return uuid.uuid4().hex
        return given if feedback.REQUEST_ID.fullmatch(given) else None

    async def _route(
        self, scope: Scope, receive: Receive, model: LoadedModel | None, request_id: str | None, received_at: float
    ) -> Response:
        path, method = scope["path"], scope["method"]
        if path not in ROUTES:
            return error_response(404, "NOT_FOUND", f"no endpoint {path}; try {', '.join(ROUTES)}")
        allowed = ROUTES[path]
        if method != allowed and not (method == "HEAD" and allowed == "GET"):
            answers = f"{allowed} and HEAD" if allowed == "GET" else allowed
            return error_response(405, "METHOD_NOT_ALLOWED", f"{path} answers {answers}, not {method}")
        if path in SIGNED_PATHS:
            return self._registry_event(await _read_body(scope, receive, self.max_body_bytes), scope)
        if path not in OPEN_PATHS and not self._authorized(scope):
            return error_response(
                401,
                "UNAUTHENTICATED",
                f"{path} needs the header 'Authorization: Bearer <token>' with the server's token",
                headers=((b"www-authenticate", b'Bearer realm="model server"'),),
            )
        if path == "/invocations":
            body = await _read_body(scope, receive, self.max_body_bytes)
            return self._invocations(body, _header(scope, b"content-type"), model, str(request_id), received_at)
        if path == "/feedback":
            return await self._feedback(await _read_body(scope, receive, feedback.MAX_FEEDBACK_BYTES), model)
        if path == "/metrics":
            return Response(200, self.metrics.render(), content_type=metrics.CONTENT_TYPE)
        if path == "/health":
            health = {**self.follower.health(), "recording": self.recorder.status()}
            if not self._authorized(scope):
                health = _without_error_texts(health)
            return Response(200 if model else 503, mask_credentials(json.dumps(health)).encode())
        if model is None:
            return error_response(503, "MODEL_NOT_LOADED", self._not_loaded_message())
        if path == "/version":
            return json_response(200, model.describe())
        return json_response(200, {"status": "ok", "version": model.version})

    def _invocations(
        self, body: bytes, content_type: str, model: LoadedModel | None, request_id: str, received_at: float
    ) -> Response:
        if model is None:
            return error_response(503, "MODEL_NOT_LOADED", self._not_loaded_message())
        frame = model.schema.parse(body, content_type)
        try:
            predictions = model.predict(frame)
        except Exception as error:  # input the checks let through but the model refuses
            log.warning("version %s could not score a request: %s", model.version, error)
            raise InputError(_unscorable(frame, error)) from error
        answers = _jsonable(predictions)
        if isinstance(answers, list):
            self.recorder.offer(request_id, received_at, model, frame, answers)
            if model.classes is not None:
                self.metrics.count_predictions(model.version, answers)
        return json_response(200, {"predictions": answers})

    async def _feedback(self, body: bytes, model: LoadedModel | None) -> Response:
        """Check the labels, find the requests they name, and write them to the data store before answering."""
        if not self.recorder.enabled:
            return error_response(
                404, "NOT_FOUND", "/feedback is off: the server records no requests (MLOPS_RECORDING)"
            )
        labels = feedback.parse_feedback(body, model.classes if model else None)
        ids = {label.request_id for label in labels}
        found = self.recorder.recent(ids)
        if missing := ids - set(found):
            try:
                found |= await asyncio.to_thread(self.recorder.stored, missing)
            except Exception as error:
                log.warning("could not look for recorded requests in the data store: %s", mask_credentials(str(error)))
        if problem := feedback.unknown_problem(labels, found, self.recorder.feedback_window.total_seconds() / 3600):
            return error_response(404, "UNKNOWN_REQUEST_ID", problem)
        rows = records.labels_frame(
            [(label.request_id, label.row, label.label, found[label.request_id].version) for label in labels],
            self.follower.name,
        )
        try:
            await asyncio.to_thread(records.write_feedback, self.recorder.data_store, rows)
        except Exception as error:
            log.warning("could not write %d labels to the data store: %s", len(rows), mask_credentials(str(error)))
            return error_response(
                503, "STORE_UNAVAILABLE", "the data store did not take the labels; nothing was kept: send them again"
            )
        self.recorder.labels += len(rows)
        return json_response(200, {"accepted": len(rows)})

    def _registry_event(self, body: bytes, scope: Scope) -> Response:
        """A webhook delivery from the MLflow server: a verified move of our alias wakes the follower."""
        if self.deliveries is None:
            return error_response(404, "NOT_FOUND", f"{webhook.PATH} is off: MLOPS_SERVING_WEBHOOK_SECRET is not set")
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        try:
            payload = self.deliveries.verify(body, headers)
        except webhook.RefusedDelivery as error:
            log.warning("refused a webhook delivery: %s", error)
            return error_response(401, "UNAUTHENTICATED", f"refused: {error}")
        if webhook.moves_alias(payload, self.follower.name, self.follower.alias):
            log.info("the registry says the %r alias moved; reading it now", self.follower.alias)
            self.follower.wake()
        return json_response(200, {"status": "received"})

    def _authorized(self, scope: Scope) -> bool:
        """Whether the request carries the server's token; every request is, without one."""
        if self._expected_authorization is None:
            return True
        given = _header(scope, b"authorization").encode("latin-1")
        return hmac.compare_digest(given, self._expected_authorization)

    def _not_loaded_message(self) -> str:
        reason = self.follower.health()["last_error"]
        return "no model version is loaded yet" + (f": {reason}" if reason else "")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.follower.start()
                self.recorder.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.follower.stop()
                await asyncio.to_thread(self.recorder.stop)
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    too_large = InputError(f"the body is larger than {limit} bytes", status=413, error_code="REQUEST_TOO_LARGE")
    declared = _header(scope, b"content-length")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":  # e.g. closed by the read timeout (ml.serving.protocol)
            raise InputError("the client disconnected before sending the whole body", error_code="DISCONNECTED")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _unscorable(frame: pd.DataFrame, error: Exception) -> str:
    """Why the model refused input that fits its signature. A missing value (null, NaN, an empty CSV cell) is one the
    service's own models fill in, with the training data's median (``ml.training``), and answer; a model registered
    without an imputer refuses it, and the refusal names the first empty cell."""
    missing = frame.isna().to_numpy()
    if missing.any():
        row, column = (int(index) for index in np.argwhere(missing)[0])
        return (
            f"column {frame.columns[column]!r} has no value in row {row}, and this model does not fill in missing "
            "values: send a number"
        )
    return f"the model could not score the input: {type(error).__name__}: {error}"


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def _jsonable(predictions: Any) -> Any:
    if isinstance(predictions, pd.DataFrame):
        return predictions.to_dict(orient="records")
    if isinstance(predictions, (np.ndarray, pd.Series)):
        return predictions.tolist()
    return predictions


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def parse_arguments(argv: list[str] | None, settings: Settings) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mlops serve",
        description="Serve the Production model version and follow its alias as it moves.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (default: %(default)s)")
    parser.add_argument("--model-name", default=settings.model_name, help="registered model (default: %(default)s)")
    parser.add_argument("--alias", default=settings.production_alias, help="alias to follow (default: %(default)s)")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=DEFAULT_POLL_INTERVAL,
        help="seconds between reads of the alias (default: %(default)s)",
    )
    parser.add_argument(
        "--tracking-uri", default=settings.tracking_uri, help="MLflow tracking URI (default: %(default)s)"
    )
    parser.add_argument(
        "--registry-uri", default=settings.registry_uri, help="MLflow registry URI (default: the tracking URI)"
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help="largest request body accepted; larger ones get 413 (default: %(default)s)",
    )
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=DEFAULT_READ_TIMEOUT,
        help="seconds a client has to send a whole request, headers and body; slower ones get 408 and are "
        "disconnected (default: %(default)s)",
    )
    parser.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="serve without a token on a non-loopback address (by default the server refuses: set "
        "MLOPS_SERVING_TOKEN so that clients must send 'Authorization: Bearer <token>')",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default="INFO",
        help="logging level (default: %(default)s)",
    )
    arguments = parser.parse_args(argv)
    if arguments.poll_interval <= 0:
        parser.error("--poll-interval must be positive")
    if arguments.max_body_bytes <= 0:
        parser.error("--max-body-bytes must be positive")
    if not arguments.read_timeout > 0:
        parser.error("--read-timeout must be positive")
    return arguments


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _subscribe_to_registry_events(settings: Settings) -> None:
    """Subscribe to the registry's alias events where the store is an MLflow server and the webhook is configured;
    polling alone otherwise, or where the subscription fails (logged once)."""
    if not settings.serving_webhook_url:
        return
    if problem := webhook.subscription_problem(settings):
        log.info("%s: following the registry by polling alone", problem)
        return
    try:
        webhook.subscribe(settings)
    except Exception as error:  # a registry without webhooks (older than MLflow 3.3), or refusing this URL
        log.warning("not subscribed to the registry's alias events (%s); following it by polling alone", error)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    mask_logging_credentials()
    try:
        settings = Settings.from_env()
        arguments = parse_arguments(argv, settings)
        settings = settings.with_values(
            {
                "model_name": arguments.model_name,
                "production_alias": arguments.alias,
                "tracking_uri": arguments.tracking_uri,
                "registry_uri": arguments.registry_uri,
            }
        )
    except ConfigurationError as error:
        log.error("%s", error)
        return 2
    if not settings.serving_token and not is_loopback(arguments.host) and not arguments.allow_unauthenticated:
        log.error(
            "refusing to serve on %s without authentication: set MLOPS_SERVING_TOKEN (clients then send "
            "'Authorization: Bearer <token>'), listen on 127.0.0.1, or pass --allow-unauthenticated",
            arguments.host,
        )
        return 2
    try:
        # A local store must be there: MLflow would create an empty one where a mistyped home points, and the server
        # would wait on it for ever. A tracking server may come up after the model server, which waits for it.
        for uri in dict.fromkeys(filter(None, (settings.tracking_uri, settings.registry_uri))):
            if problem := local_store_problem(uri):
                raise ConfigurationError(problem)
        # Its records go to the data store with the keys of the S3 connection the tasks use, if one is named.
        object_store.use_for_this_process(settings)
    except ConfigurationError as error:
        log.error("%s", error)
        return 2
    logging.getLogger().setLevel(arguments.log_level)
    for name, value in REGISTRY_CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.registry_uri or settings.tracking_uri)
    log.info(
        "serving models:/%s@%s from %s on http://%s:%s (%s)",
        settings.model_name,
        settings.production_alias,
        mask_credentials(settings.tracking_uri),
        arguments.host,
        arguments.port,
        "a bearer token is required" if settings.serving_token else "no authentication",
    )
    with tempfile.TemporaryDirectory(prefix="mlops-serving-") as downloads:
        follower = ProductionFollower(settings, arguments.poll_interval, Path(downloads))
        recorder = Recorder(settings)
        if recorder.enabled:
            log.info(
                "recording %g of answered requests%s in %s",
                recorder.sample_rate,
                "" if recorder.with_features else " (without their features)",
                mask_credentials(records.records_uri(settings.data_store)),
            )
        server = ModelServer(
            follower,
            recorder,
            arguments.max_body_bytes,
            token=settings.serving_token,
            webhook_secret=settings.serving_webhook_secret,
        )
        _subscribe_to_registry_events(settings)
        config = uvicorn.Config(
            server,
            host=arguments.host,
            port=arguments.port,
            http=read_timeout_protocol(arguments.read_timeout),
            h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,
            lifespan="on",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=5,
        )
        uvicorn.Server(config).run()
    return 0
