"""The model server: serves ``models:/<name>@<alias>`` and follows the alias as it moves.

Start it with ``mlops serve`` or ``python -m ml.serving`` (``--help`` lists the options). Endpoints, compatible with
``mlflow models serve`` clients:

- ``POST /invocations``: JSON (``dataframe_split``, ``dataframe_records``, ``instances``, ``inputs``) or ``text/csv``;
  answers ``{"predictions": [...]}``. Bad input gets a 4xx ``{"error_code": ..., "message": ...}`` naming the problem
  (see :mod:`ml.serving.schema`); a body over ``--max-body-bytes`` gets 413.
- ``GET /ping``: 200 once a version is loaded, 503 before.
- ``GET /health``: the same status codes, with details: ``ok``, ``loading``, ``degraded`` (a version failed to load,
  the registry is unreachable or has no Production version; the loaded version keeps serving) or ``unavailable``.
- ``GET /version``: name, version, run_id, loaded_at and alias of the version answering.
- ``GET /metrics``: Prometheus text format.

Every response carries ``X-Model-Version``: the version that answered (``none`` before any is loaded).

A plain ASGI application on uvicorn, without a web framework: a single-row request spends about a millisecond in
the model, so per-request framework overhead would be a visible share of the latency. Predictions run on the event
loop's thread: scikit-learn holds the GIL for most of a small predict, so a thread pool would add a hand-off per
request without adding parallelism.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import uvicorn

import mlflow
from ml.serving import metrics
from ml.serving.follower import ProductionFollower
from ml.serving.loader import LoadedModel
from ml.serving.schema import InputError
from ml.settings import ConfigurationError, Settings

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

DEFAULT_PORT = 5001
DEFAULT_POLL_INTERVAL = 2.0
DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
JSON_CONTENT_TYPE = "application/json"
VERSION_HEADER = b"x-model-version"
ROUTES = {"/invocations": "POST", "/ping": "GET", "/health": "GET", "/version": "GET", "/metrics": "GET"}

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


def json_response(status: int, payload: Any) -> Response:
    return Response(status, json.dumps(payload, default=_json_default).encode())


def error_response(status: int, error_code: str, message: str) -> Response:
    return Response(status, json.dumps({"error_code": error_code, "message": message}).encode(), error_code=error_code)


class ModelServer:
    """The ASGI application."""

    def __init__(self, follower: ProductionFollower, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.follower = follower
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics.ServingMetrics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        model = self.follower.current  # read once: the answer and its version header come from this one model
        path = scope["path"]
        try:
            response = await self._route(scope, receive, model)
        except InputError as error:
            response = error_response(error.status, error.error_code, error.message)
        except Exception:
            log.exception("unexpected error answering %s %s", scope["method"], path)
            response = error_response(500, "INTERNAL_ERROR", "unexpected server error; see the server's log")
        version = str(model.version).encode() if model else b"none"
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [
                    (b"content-type", response.content_type.encode()),
                    (b"content-length", str(len(response.body)).encode()),
                    (VERSION_HEADER, version),
                ],
            }
        )
        await send({"type": "http.response.body", "body": response.body})
        label = path if path in ROUTES else "other"
        self.metrics.record(label, response.status, response.error_code, time.perf_counter() - started)

    async def _route(self, scope: Scope, receive: Receive, model: LoadedModel | None) -> Response:
        path, method = scope["path"], scope["method"]
        if path not in ROUTES:
            return error_response(404, "NOT_FOUND", f"no endpoint {path}; try {', '.join(ROUTES)}")
        if method != ROUTES[path]:
            return error_response(405, "METHOD_NOT_ALLOWED", f"{path} answers {ROUTES[path]}, not {method}")
        if path == "/invocations":
            body = await _read_body(scope, receive, self.max_body_bytes)
            return self._invocations(body, _header(scope, b"content-type"), model)
        if path == "/metrics":
            page = self.metrics.render(model, self.follower.status)
            return Response(200, page.encode(), content_type=metrics.CONTENT_TYPE)
        if path == "/health":
            return json_response(200 if model else 503, self.follower.health())
        if model is None:
            return error_response(503, "MODEL_NOT_LOADED", self._not_loaded_message())
        if path == "/version":
            return json_response(200, model.describe())
        return json_response(200, {"status": "ok", "version": model.version})

    def _invocations(self, body: bytes, content_type: str, model: LoadedModel | None) -> Response:
        if model is None:
            return error_response(503, "MODEL_NOT_LOADED", self._not_loaded_message())
        frame = model.schema.parse(body, content_type)
        try:
            predictions = model.predict(frame)
        except Exception as error:  # input the checks let through but the model refuses, e.g. infinities
            log.warning("version %s could not score a request: %s", model.version, error)
            raise InputError(f"the model could not score the input: {type(error).__name__}: {error}") from error
        return json_response(200, {"predictions": _jsonable(predictions)})

    def _not_loaded_message(self) -> str:
        reason = self.follower.health()["last_error"]
        return "no model version is loaded yet" + (f": {reason}" if reason else "")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.follower.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.follower.stop()
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
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


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
    return arguments


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    logging.getLogger().setLevel(arguments.log_level)
    for name, value in REGISTRY_CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.registry_uri or settings.tracking_uri)
    log.info(
        "serving models:/%s@%s from %s on http://%s:%s",
        settings.model_name,
        settings.production_alias,
        settings.tracking_uri,
        arguments.host,
        arguments.port,
    )
    with tempfile.TemporaryDirectory(prefix="mlops-serving-") as downloads:
        follower = ProductionFollower(settings, arguments.poll_interval, Path(downloads))
        server = ModelServer(follower, arguments.max_body_bytes)
        config = uvicorn.Config(
            server,
            host=arguments.host,
            port=arguments.port,
            lifespan="on",
            access_log=False,
            log_config=None,
            timeout_graceful_shutdown=5,
        )
        uvicorn.Server(config).run()
    return 0
