"""Checks that a deployment serves: the Production alias, the model behind it, the model server, a user's hook.

Also the quick probe of the tracking server, so that an unreachable server is reported at once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ml import data, evaluation, registry, tracking
from ml.hooks import call_hook
from ml.redaction import mask_credentials
from ml.results import TransformResult
from ml.settings import Settings

log = logging.getLogger(__name__)


class TrackingServerUnavailable(RuntimeError):
    """The tracking server did not answer; worth a retry, unlike a configuration error."""


def probe_tracking_server(uri: str) -> None:
    """One quick request, so that an unreachable server is reported at once, not after the client's backoff."""
    import httpx

    try:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as error:
        raise TrackingServerUnavailable(
            f"MLflow tracking server {mask_credentials(uri)} does not answer: {mask_credentials(str(error))}"
        ) from error


def check_deployment(settings: Settings, version: int, split: TransformResult, validated_accuracy: float) -> list[str]:
    """Load what the Production alias now serves and check it is this version and predicts as validated.

    Returns the problems found; none means the deployment is healthy.
    """
    if not settings.post_deploy_check:
        return []
    mlflow = tracking.connect(settings)
    client = registry.client_for(settings)
    name, alias = settings.model_name, settings.production_alias
    served = registry.production_version(client, name, alias)
    if served is None or served.version != version:
        return [f"alias {alias!r} points at {served.version if served else 'nothing'}, not version {version}"]
    model_uri = f"models:/{name}@{alias}"
    problems = []
    try:
        model = tracking.load_model(mlflow, model_uri)
        test_frame = data.read_frame(split.test_uri)
        features = test_frame[split.feature_names]
        predictions = model.predict(features)
        served_accuracy = evaluation.score(predictions, test_frame[split.label_column])["accuracy"]
        if abs(served_accuracy - validated_accuracy) > 1e-9:
            problems.append(f"{model_uri} scores {served_accuracy:.4f}, validated {validated_accuracy:.4f}")
        elif settings.serving_url:
            problems.extend(
                check_model_server(
                    settings.serving_url,
                    version,
                    features,
                    predictions,
                    settings.serving_timeout,
                    settings.serving_token,
                )
            )
    except Exception as error:
        problems.append(f"{model_uri} does not serve: {type(error).__name__}: {error}")
    if not problems and settings.deploy_check_hook:
        problems.extend(run_deploy_check_hook(settings.deploy_check_hook, model_uri, version))
    return problems


def check_model_server(
    url: str, version: int, features: Any, expected: Any, timeout: float, token: str = ""
) -> list[str]:
    """Wait for the model server to follow Production to ``version``, then check it answers as the model does.

    ``token`` is the server's bearer token (``MLOPS_SERVING_TOKEN``), sent when set."""
    import httpx

    base = url.rstrip("/")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    deadline = time.monotonic() + timeout
    serving = None
    while time.monotonic() < deadline:
        try:
            serving = httpx.get(f"{base}/version", headers=headers, timeout=5).json().get("version")
        except (httpx.HTTPError, ValueError):
            serving = None
        if serving == version:
            break
        time.sleep(0.5)
    else:
        return [f"model server {base} still serves version {serving} {timeout:.0f} s after the promotion"]
    sample = features.head(20)
    response = httpx.post(
        f"{base}/invocations",
        json={"dataframe_split": sample.to_dict(orient="split", index=False)},
        headers=headers,
        timeout=30,
    )
    answered_by = response.headers.get("X-Model-Version")
    if response.status_code != 200 or answered_by != str(version):
        return [f"model server {base} answered HTTP {response.status_code} from version {answered_by}"]
    served = [str(p) for p in response.json()["predictions"]]
    if served != [str(p) for p in list(expected[: len(sample)])]:
        return [f"model server {base} predicts differently from version {version} loaded from the registry"]
    log.info("model server %s serves version %s and answers as validated", base, version)
    return []


def run_deploy_check_hook(hook: str, model_uri: str, version: int) -> list[str]:
    """A user's extra check of the deployment; an exception means the check failed."""
    try:
        call_hook(hook, model_uri=model_uri, version=version)
    except Exception as error:
        return [f"deploy check hook {hook} failed: {type(error).__name__}: {error}"]
    return []
