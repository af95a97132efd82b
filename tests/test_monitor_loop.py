"""The loop on real processes: a model server serves v1 and records its traffic, shifted traffic arrives with a shifted
batch of data, mlops_monitor sees the drift and starts mlops_pipeline, which promotes v2, and the server follows it;
the store holds the records of both versions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from airflow_harness import run_existing
from conftest import use_fresh_home
from test_serving import model_server, wait_until

from ml import data, ingest, records
from ml.airflow_runner import run_dag
from ml.settings import Settings


def send(url: str, frame) -> list[str]:
    """One request per row; the request ids of the answers."""
    ids = []
    with httpx.Client(timeout=10) as client:
        for index in range(len(frame)):
            row = frame.iloc[[index]]
            body = {"dataframe_split": {"columns": list(row.columns), "data": row.values.tolist()}}
            answer = client.post(f"{url}/invocations", json=body)
            assert answer.status_code == 200, answer.text
            ids.append(answer.headers["x-request-id"])
    return ids


@pytest.mark.slow
def test_shifted_traffic_retrains_and_the_server_swaps_to_the_new_version(airflow_db, tmp_path, monkeypatch):
    use_fresh_home(monkeypatch, tmp_path / "mlops")
    monkeypatch.setenv("MLOPS_DATA_SOURCE", str(tmp_path / "incoming"))
    settings = Settings.from_env()
    assert ingest.land(settings)["landed"]
    first = run_dag("mlops_pipeline")
    assert first.state == "success" and first.result("deploy_model")["deployed"], first.note

    bundled = data.load_source("sklearn:breast_cancer").drop(columns=[settings.label_column])
    recording = {"MLOPS_DATA_STORE": settings.data_store, "MLOPS_RECORDING_FLUSH_SECONDS": "0.2"}
    with model_server(settings, tmp_path, env=recording) as server:
        wait_until(lambda: server.health()["status"] == "ok", 60, "loading version 1")
        send(server.url, bundled.sample(60, random_state=0))
        shifted = ingest.apply_shift(
            bundled.sample(120, random_state=1), ingest.parse_shift({"*": 1.6}, list(bundled.columns))
        )
        send(server.url, shifted)
        # The world changed: the data that comes in is shifted too.
        assert ingest.land(settings, shift={"*": 1.6})["landed"]
        end = (datetime.now(UTC) + timedelta(seconds=30)).replace(microsecond=0)
        wait_until(
            lambda: len(records.read_records(settings.data_store, end - timedelta(hours=1), end)) == 180,
            10,
            "the records of 180 requests",
        )
        monitored = run_dag("mlops_monitor", conf={"window_end": end.isoformat()})
        judged = monitored.result("judge_window")
        assert judged["trigger_run_id"], monitored.note
        assert "drift in" in judged["reason"]
        retrained = run_existing("mlops_pipeline", judged["trigger_run_id"])
        assert retrained.state == "success"
        assert retrained.result("deploy_model")["deployed"] and retrained.result("deploy_model")["version"] == 2
        assert "Started because: mlops_monitor" in retrained.note
        wait_until(lambda: (server.health()["model"] or {}).get("version") == 2, 60, "the server swapping to version 2")
        send(server.url, shifted.head(20))
        stored = lambda: set(records.read_records(settings.data_store, end - timedelta(hours=2), end)["version"])  # noqa: E731
        wait_until(lambda: stored() == {1, 2}, 10, "records of both versions in the store")
