"""Asset events posted to Airflow's REST API, for what happens outside Airflow's tasks: the model server's completed
windows of recorded traffic, a batch ``mlops ingest`` lands from the command line.

``MLOPS_AIRFLOW_API_URL`` names the API server; ``MLOPS_AIRFLOW_API_USERNAME`` and ``MLOPS_AIRFLOW_API_PASSWORD`` (from
the environment) log in on its ``/auth/token`` for a JWT. Each event asks for a new token: events are rare (one a
window, one a landed batch), and a fresh token never expires midway. The asset is found by its URI
(``GET /api/v2/assets``), then ``POST /api/v2/assets/events`` creates the event, which queues the DAGs scheduled on it.
"""

from __future__ import annotations

from typing import Any

from ml.redaction import mask_credentials
from ml.settings import Settings

TIMEOUT_SECONDS = 10.0


class AssetEventError(RuntimeError):
    """Airflow's API server did not take an asset event."""


def configured(settings: Settings) -> bool:
    return bool(settings.airflow_api_url)


def post_asset_event(settings: Settings, uri: str, extra: dict[str, Any]) -> int:
    """Post an event of the asset ``uri`` with ``extra``; the event's id. AssetEventError says what failed, where."""
    import httpx

    base = settings.airflow_api_url.rstrip("/")
    shown = mask_credentials(base)
    try:
        with httpx.Client(base_url=base, timeout=TIMEOUT_SECONDS) as client:
            login = {"username": settings.airflow_api_username, "password": settings.airflow_api_password}
            token = client.post("/auth/token", json=login)
            _expect(token, 201, f"logging in to Airflow at {shown} as MLOPS_AIRFLOW_API_USERNAME")
            client.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
            found = client.get("/api/v2/assets", params={"uri_pattern": uri, "limit": 100})
            _expect(found, 200, f"looking up asset {uri} in Airflow at {shown}")
            ids = [asset["id"] for asset in found.json()["assets"] if asset["uri"] == uri]
            if not ids:
                raise AssetEventError(
                    f"Airflow at {shown} knows no asset {uri}: no parsed DAG is scheduled on it or produces it "
                    "(do the DAG processor and this process share MLOPS_DATA_STORE and MLOPS_DATA_SOURCE?)"
                )
            posted = client.post("/api/v2/assets/events", json={"asset_id": ids[0], "extra": extra})
            _expect(posted, 200, f"posting an event of asset {uri} to Airflow at {shown}")
            event_id: int = posted.json()["id"]
            return event_id
    except httpx.HTTPError as error:
        problem = mask_credentials(f"{type(error).__name__}: {error}")
        raise AssetEventError(f"Airflow's API server at {shown} did not answer: {problem}") from None


def _expect(response: Any, status: int, doing: str) -> None:
    if response.status_code != status:
        raise AssetEventError(f"{doing} failed: HTTP {response.status_code} {response.text[:300]}")
