"""The model server: real ``python -m ml.serving`` processes on loopback, following a real MLflow registry.

Versions are registered from models saved once per module: ``real`` predicts the breast cancer labels, ``inverted``
was trained on the flipped labels and predicts the opposite class, so an answer tells which version produced it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
from conftest import PYTHON, free_port, wait_for_http
from mlflow.models import infer_signature
from mlflow.types import ColSpec, Schema
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from stack import MLFLOW_NO_JOB_RUNNER

import mlflow
from ml import records, registry
from ml.serving.schema import InputError, InputSchema
from ml.settings import Settings

POLL_INTERVAL = 0.3
SWAP_DEADLINE = POLL_INTERVAL + 10.0  # a poll, plus loading a model on a busy two-core machine
FIRST_LOAD_DEADLINE = 60.0  # the first load also imports scikit-learn and skops in the fresh process
FEATURES = load_breast_cancer(as_frame=True).data
BATCH = FEATURES.iloc[::10]
JSON_HEADERS = {"content-type": "application/json"}
MAX_BODY_BYTES = 1_000_000
READ_TIMEOUT = 3.0
FLUSH_SECONDS = 0.2


@dataclass(frozen=True)
class SavedModel:
    path: Path
    predictions: list[int]


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SavedModel]:
    root = tmp_path_factory.mktemp("saved-models")
    labels = load_breast_cancer(as_frame=True).target
    models = {"real": labels, "inverted": 1 - labels}
    saved = {name: _save_model(root / name, target) for name, target in models.items()}
    assert saved["real"].predictions != saved["inverted"].predictions
    assert len(set(saved["real"].predictions)) == 2
    return saved


def _save_model(path: Path, target: pd.Series) -> SavedModel:
    pipeline = Pipeline([("scale", StandardScaler()), ("model", LogisticRegression(max_iter=1000))])
    pipeline.fit(FEATURES, target)
    example = FEATURES.head(3)
    mlflow.sklearn.save_model(
        pipeline,
        str(path),
        signature=infer_signature(example, pipeline.predict(example)),
        input_example=example,
        pip_requirements=[f"scikit-learn=={metadata.version('scikit-learn')}"],
        skops_trusted_types=["numpy.dtype"],
    )
    return SavedModel(path, pipeline.predict(BATCH).tolist())


def register(settings: Settings, source: Path | str) -> int:
    client = registry.client_for(settings)
    registry.ensure_registered_model(client, settings.model_name)
    return int(client.create_model_version(settings.model_name, str(source)).version)


def promote(settings: Settings, version: int) -> None:
    client = registry.client_for(settings)
    current = registry.production_version(client, settings.model_name, settings.production_alias)
    registry.promote(
        settings, version, expected_current=current.version if current else None, actor="test", reason="test"
    )


def promote_logged_model(settings: Settings, model: Path) -> int:
    """Log a saved model as a run's artifact through the tracking server, register it and put it in Production."""
    client = registry.client_for(settings)
    run = client.create_run(experiment_id="0")
    client.log_artifacts(run.info.run_id, str(model), "model")
    registry.ensure_registered_model(client, settings.model_name)
    version = int(
        client.create_model_version(settings.model_name, f"runs:/{run.info.run_id}/model", run.info.run_id).version
    )
    promote(settings, version)
    return version


@dataclass(frozen=True)
class ServerProcess:
    url: str
    log: Path
    data_store: Path | None = None
    pid: int = 0

    def predict(self, frame: pd.DataFrame = BATCH) -> httpx.Response:
        body = {"dataframe_split": {"columns": list(frame.columns), "data": frame.values.tolist()}}
        return httpx.post(f"{self.url}/invocations", json=body, timeout=10)

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(f"mlops_serving_{name} "):
                return float(line.split()[-1])
        raise AssertionError(f"no metric {name}")


@contextmanager
def model_server(
    settings: Settings, log_dir: Path, *options: str, env: dict[str, str] | None = None, port: int | None = None
) -> Iterator[ServerProcess]:
    port = port or free_port()
    log = log_dir / f"model-server-{port}.log"
    command = [
        PYTHON,
        "-m",
        "ml.serving",
        "--port",
        str(port),
        "--tracking-uri",
        settings.tracking_uri,
        "--model-name",
        settings.model_name,
        "--alias",
        settings.production_alias,
        "--poll-interval",
        str(POLL_INTERVAL),
        *options,
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(
            command,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/metrics", timeout=60, process=process)
        data_store = (env or {}).get("MLOPS_DATA_STORE")
        yield ServerProcess(f"http://127.0.0.1:{port}", log, Path(data_store) if data_store else None, process.pid)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``condition()`` held; fails the test after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def answering_version(server: ServerProcess) -> str:
    return server.predict(BATCH.head(1)).headers["x-model-version"]


# ----------------------------------------------------------------------------------------------------------------
# One server, serving version 1 throughout: formats, answers, bad input.


@pytest.fixture(scope="module")
def steady(saved_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("steady")
    settings = Settings.from_env({"MLOPS_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"})
    promote(settings, register(settings, saved_models["real"].path))
    recording = {"MLOPS_DATA_STORE": str(home / "datastore"), "MLOPS_RECORDING_FLUSH_SECONDS": str(FLUSH_SECONDS)}
    with model_server(
        settings, home, "--max-body-bytes", str(MAX_BODY_BYTES), "--read-timeout", str(READ_TIMEOUT), env=recording
    ) as server:
        wait_until(lambda: server.health()["status"] == "ok", FIRST_LOAD_DEADLINE, "loading version 1")
        yield server


@pytest.mark.slow
def test_serves_production_with_its_version_on_every_response(steady, saved_models):
    answer = steady.predict()
    assert answer.status_code == 200
    assert answer.json() == {"predictions": saved_models["real"].predictions}
    assert answer.headers["x-model-version"] == "1"

    for path in ("/ping", "/health", "/version", "/metrics", "/nowhere"):
        assert httpx.get(steady.url + path).headers["x-model-version"] == "1", path
    version = httpx.get(f"{steady.url}/version").json()
    assert {key: version[key] for key in ("name", "version", "alias")} == {
        "name": "breast_cancer_classifier",
        "version": 1,
        "alias": "production",
    }
    assert version["loaded_at"]
    health = steady.health()
    assert (health["status"], health["production_version"], health["registry"]["reachable"]) == ("ok", 1, True)
    assert steady.metric('model_version{name="breast_cancer_classifier"}') == 1
    assert steady.metric("invocation_seconds_count") >= 1


SPLIT = {"dataframe_split": {"columns": list(BATCH.columns), "data": BATCH.values.tolist()}}
SHUFFLED = BATCH[list(reversed(BATCH.columns))]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", SPLIT),
        (
            "application/json",
            {"dataframe_split": {"columns": list(SHUFFLED.columns), "data": SHUFFLED.values.tolist()}},
        ),
        ("application/json", {"dataframe_records": BATCH.to_dict(orient="records")}),
        ("application/json", {"instances": BATCH.to_dict(orient="records")}),
        ("application/json", {"instances": BATCH.values.tolist()}),
        ("application/json", {"inputs": BATCH.to_dict(orient="list")}),
        ("application/json; charset=utf-8", {"inputs": BATCH.values.tolist()}),
        ("text/csv", SHUFFLED.to_csv(index=False)),
    ],
    ids=[
        "split",
        "split-reordered",
        "records",
        "instances-records",
        "instances-rows",
        "inputs-columns",
        "inputs-rows",
        "csv",
    ],
)
def test_accepts_the_formats_of_mlflow_models_serve(steady, saved_models, content_type, body):
    content = body if isinstance(body, str) else json.dumps(body)
    answer = httpx.post(f"{steady.url}/invocations", content=content, headers={"content-type": content_type})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"predictions": saved_models["real"].predictions}


def _with_value(row: int, column: str, value: Any) -> dict[str, Any]:
    records = BATCH.head(3).to_dict(orient="records")
    records[row][column] = value
    return {"dataframe_records": records}


ONE_ROW = BATCH.head(1)
BAD_INPUTS = {
    "missing-column": (
        json.dumps(
            {"dataframe_split": {"columns": list(ONE_ROW.columns[1:]), "data": ONE_ROW.iloc[:, 1:].values.tolist()}}
        ),
        "application/json",
        400,
        "missing columns: mean radius",
    ),
    "unknown-column": (
        json.dumps({"dataframe_records": [ONE_ROW.iloc[0].to_dict() | {"colour": 1.0}]}),
        "application/json",
        400,
        "unknown columns: colour",
    ),
    "string-in-double": (
        json.dumps(_with_value(1, "mean texture", "12.5")),
        "application/json",
        400,
        "column 'mean texture' expects double, got string '12.5' in row 1",
    ),
    "boolean-in-double": (json.dumps(_with_value(0, "mean area", True)), "application/json", 400, "'mean area'"),
    "text-in-csv": (ONE_ROW.to_csv(index=False).replace("17.99", "big"), "text/csv", 400, "'mean radius' expects"),
    "short-row": (json.dumps({"instances": [[1.0, 2.0]]}), "application/json", 400, "row 0 must be a list of 30"),
    "malformed-json": ('{"dataframe_split": {', "application/json", 400, "malformed JSON"),
    "not-utf8": (b"\xff\xfe{", "application/json", 400, "malformed JSON"),
    "empty-body": ("", "application/json", 400, "the body is empty"),
    "no-format-key": (json.dumps({"data": [[1.0]]}), "application/json", 400, "exactly one of the keys"),
    "two-format-keys": (
        json.dumps({"instances": [], "inputs": []}),
        "application/json",
        400,
        "exactly one of the keys",
    ),
    "empty-batch": (json.dumps({"dataframe_records": []}), "application/json", 400, "empty batch"),
    "empty-split": (
        json.dumps({"dataframe_split": {"columns": list(BATCH.columns), "data": []}}),
        "application/json",
        400,
        "empty batch",
    ),
    "header-only-csv": (",".join(BATCH.columns) + "\n", "text/csv", 400, "empty batch"),
    "infinity": (
        json.dumps(_with_value(1, "mean area", float("inf"))),
        "application/json",
        400,
        "column 'mean area' holds an infinite number in row 1",
    ),
    "infinity-in-csv": (
        ONE_ROW.to_csv(index=False).replace("17.99", "-inf"),
        "text/csv",
        400,
        "column 'mean radius' holds an infinite number in row 0",
    ),
    # This model has no imputer, unlike the service's own (tests/test_settings_and_training.py): named, not opaque.
    "missing-value-the-model-cannot-fill-in": (
        json.dumps(_with_value(1, "mean area", None)),
        "application/json",
        400,
        "column 'mean area' has no value in row 1, and this model does not fill in missing values",
    ),
    "unsupported-type": ("a=1", "application/x-www-form-urlencoded", 415, "not supported"),
    "oversized": (json.dumps({"instances": [[1.0] * 30] * 10_000}), "application/json", 413, "larger than"),
    "deeply-nested": ('{"instances": ' + "[" * 100_000 + "]" * 100_000 + "}", "application/json", 400, "too deeply"),
    "integer-beyond-the-digit-limit": (
        '{"instances": [[' + "9" * 5000 + ", " + ", ".join(["1.0"] * 29) + "]]}",
        "application/json",
        400,
        "a number too large to read",
    ),
    "integer-beyond-double": (json.dumps(_with_value(0, "mean area", 10**400)), "application/json", 400, "do not fit"),
}


@pytest.mark.slow
@pytest.mark.parametrize(("body", "content_type", "status", "message"), BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_gets_a_4xx_naming_the_problem(steady, body, content_type, status, message):
    answer = httpx.post(f"{steady.url}/invocations", content=body, headers={"content-type": content_type})
    assert answer.status_code == status, answer.text
    assert message in answer.json()["message"]
    assert answer.json()["error_code"]
    assert answer.headers["x-model-version"] == "1"
    assert steady.predict().status_code == 200


@pytest.mark.slow
def test_wrong_method_and_path(steady):
    assert httpx.get(f"{steady.url}/invocations").status_code == 405
    assert httpx.post(f"{steady.url}/ping").status_code == 405
    assert httpx.head(f"{steady.url}/invocations").status_code == 405
    assert httpx.get(f"{steady.url}/predict").status_code == 404


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/ping", "/health", "/version", "/metrics"])
def test_head_answers_as_get_without_a_body(steady, path):
    head, get = httpx.head(steady.url + path), httpx.get(steady.url + path)
    assert (head.status_code, head.headers["x-model-version"]) == (get.status_code, "1")
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


# ----------------------------------------------------------------------------------------------------------------
# Recording what is served, and the true labels told afterwards (the steady server records, flushing every 0.2 s).

REQUEST_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
RECORD_FILE = re.compile(
    r"records/version=1/date=(\d{4}-\d{2}-\d{2})/hour=(\d{2})/\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{12}\.parquet$"
)


def recorded(store: Path, request_ids: set[str], timeout: float = 10.0) -> pd.DataFrame:
    """The records of these requests, once every one of them is in the store."""
    window = (pd.Timestamp.now(tz="UTC") - pd.Timedelta(hours=2), pd.Timestamp.now(tz="UTC") + pd.Timedelta(hours=1))
    found = pd.DataFrame()

    def all_in() -> bool:
        nonlocal found
        found = records.read_records(str(store), *window)
        found = found[found["request_id"].isin(request_ids)]
        return set(found["request_id"]) == request_ids

    wait_until(all_in, timeout, f"records of {sorted(request_ids)}")
    return found


def scrape(server: ServerProcess) -> dict[str, Any]:
    """/metrics parsed by Prometheus' own parser: each family by name."""
    page = httpx.get(f"{server.url}/metrics", timeout=10)
    assert page.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {family.name: family for family in text_string_to_metric_families(page.text)}


def sample(families: dict[str, Any], family: str, **labels: str) -> float:
    return sum(
        item.value
        for item in families[family].samples
        if item.name == f"{family}_total" or item.name == family
        if all(item.labels.get(key) == value for key, value in labels.items())
    )


@pytest.mark.slow
def test_answered_requests_are_recorded_with_the_request_id_of_their_answer(steady, saved_models):
    started = pd.Timestamp.now(tz="UTC")
    three = steady.predict(BATCH.head(3))
    chosen = httpx.post(
        f"{steady.url}/invocations",
        json={"dataframe_split": {"columns": list(BATCH.columns), "data": BATCH.iloc[3:4].values.tolist()}},
        headers={"x-request-id": "client-order-7.a_b"},
    )
    assert three.status_code == chosen.status_code == 200
    assert REQUEST_ID_PATTERN.fullmatch(three.headers["x-request-id"])
    assert chosen.headers["x-request-id"] == "client-order-7.a_b"

    found = recorded(steady.data_store, {three.headers["x-request-id"], "client-order-7.a_b"})
    mine = found[found["request_id"] == three.headers["x-request-id"]].sort_values("row")
    assert mine["row"].tolist() == [0, 1, 2]
    assert mine["prediction"].tolist() == [str(label) for label in saved_models["real"].predictions[:3]]
    assert set(mine["version"]) == {1} and set(mine["model_name"]) == {"breast_cancer_classifier"}
    assert ((mine["received_at"] >= started) & (mine["received_at"] <= pd.Timestamp.now(tz="UTC"))).all()
    pd.testing.assert_frame_equal(
        records.features_of(mine).reset_index(drop=True), BATCH.head(3).reset_index(drop=True), check_dtype=False
    )
    theirs = found[found["request_id"] == "client-order-7.a_b"]
    assert theirs["row"].tolist() == [0] and theirs["prediction"].tolist() == [str(saved_models["real"].predictions[3])]

    files = sorted(str(path) for path in (steady.data_store / "records").rglob("*.parquet"))
    assert files and all(RECORD_FILE.search(path) for path in files), files
    received = mine["received_at"].iloc[0]
    assert (f"{received:%Y-%m-%d}", f"{received:%H}") in {RECORD_FILE.search(path).groups() for path in files}


@pytest.mark.slow
@pytest.mark.parametrize("given", ["../../etc/passwd", "a" * 65, "-starts-with-a-dash", "has space"])
def test_a_request_id_that_is_no_short_safe_token_gets_400(steady, given):
    answer = httpx.post(
        f"{steady.url}/invocations", content=json.dumps(SPLIT), headers=JSON_HEADERS | {"x-request-id": given}
    )
    assert answer.status_code == 400
    assert answer.json()["error_code"] == "INVALID_REQUEST_ID"
    assert "X-Request-Id must be 1 to 64 letters" in answer.json()["message"]
    assert "x-request-id" not in answer.headers


@pytest.mark.slow
def test_feedback_is_written_beside_the_records_it_labels(steady, saved_models):
    answer = steady.predict(BATCH.head(2))
    request_id = answer.headers["x-request-id"]
    told = {"feedback": [{"request_id": request_id, "label": 0}, {"request_id": request_id, "row": 1, "label": 1}]}
    accepted = httpx.post(f"{steady.url}/feedback", json=told)
    assert (accepted.status_code, accepted.json()) == (200, {"accepted": 2})

    now = pd.Timestamp.now(tz="UTC")
    labels = records.read_feedback(str(steady.data_store), now - pd.Timedelta(hours=1), now + pd.Timedelta(minutes=1))
    mine = labels[labels["request_id"] == request_id].sort_values("row")
    assert mine[["row", "label", "version"]].values.tolist() == [[0, "0", 1], [1, "1", 1]]
    files = list((steady.data_store / "feedback").rglob("*"))
    assert files and all(path.is_dir() or path.match("feedback/date=*/hour=*/*Z-*.parquet") for path in files), files
    joined = records.with_labels(recorded(steady.data_store, {request_id}), labels)
    assert joined.sort_values("row")["label"].tolist() == ["0", "1"]
    assert joined.sort_values("row")["prediction"].tolist() == [str(p) for p in saved_models["real"].predictions[:2]]


@pytest.mark.slow
def test_feedback_finds_a_request_in_the_store_that_another_server_recorded(steady):
    """A replica sharing the data store recorded it: the id is not in this server's memory, but in the store."""
    answered = records.Answered("recorded-by-a-replica", time.time(), "breast_cancer_classifier", 1, [1, 0], None)
    records.write_records(str(steady.data_store), [answered])
    told = {"feedback": [{"request_id": "recorded-by-a-replica", "row": 1, "label": 0}]}
    accepted = httpx.post(f"{steady.url}/feedback", json=told)
    assert (accepted.status_code, accepted.json()) == (200, {"accepted": 1})
    told["feedback"][0]["row"] = 2
    beyond = httpx.post(f"{steady.url}/feedback", json=told)
    assert beyond.status_code == 404 and "scored 2 rows; there is no row 2" in beyond.json()["message"]


def _labels(*items: dict[str, Any]) -> str:
    return json.dumps({"feedback": list(items)})


BAD_FEEDBACK = {
    "malformed-json": (lambda known: '{"feedback": [', 400, "the body is not valid JSON"),
    "not-an-object": (lambda known: "[]", 400, 'one key, "feedback"'),
    "empty": (lambda known: _labels(), 400, '"feedback" must be a non-empty list'),
    "too-many-items": (
        lambda known: _labels(*[{"request_id": known, "label": 0}] * 1001),
        413,
        '"feedback" holds 1001 labels; send at most 1000',
    ),
    "oversized-body": (
        lambda known: _labels({"request_id": known, "label": "x" * 1_100_000}),
        413,
        "larger than 1048576 bytes",
    ),
    "unknown-id": (
        lambda known: _labels({"request_id": known, "label": 0}, {"request_id": "nobody-sent-this", "label": 1}),
        404,
        "feedback[1]: request 'nobody-sent-this' is not one this server recorded",
    ),
    "row-out-of-range": (
        lambda known: _labels({"request_id": known, "row": 5, "label": 0}),
        404,
        "feedback[0]: request '{known}' scored 2 rows; there is no row 5",
    ),
    "label-of-another-type": (
        lambda known: _labels({"request_id": known, "label": 0}, {"request_id": known, "row": 1, "label": "1"}),
        400,
        'feedback[1]: label must be a number, as the model\'s classes are, got "1"',
    ),
    "unknown-class": (
        lambda known: _labels({"request_id": known, "label": 7}),
        400,
        "feedback[0]: label 7 is not a class the model knows (0, 1)",
    ),
    "boolean-label": (
        lambda known: _labels({"request_id": known, "label": True}),
        400,
        "feedback[0]: label must be a number or a string, got true",
    ),
    "not-a-number": (lambda known: f'{{"feedback": [{{"request_id": "{known}", "label": NaN}}]}}', 400, "NaN"),
    "no-label": (lambda known: _labels({"request_id": known}), 400, "feedback[0] has no label"),
    "unknown-key": (
        lambda known: _labels({"request_id": known, "labl": 0}),
        400,
        "feedback[0] has unknown keys 'labl'",
    ),
    "unsafe-id": (
        lambda known: _labels({"request_id": "../x", "label": 0}),
        400,
        'feedback[0]: request_id must be the X-Request-Id of an answer, got "../x"',
    ),
    "labelled-twice": (
        lambda known: _labels({"request_id": known, "label": 0}, {"request_id": known, "row": 0, "label": 1}),
        400,
        "feedback[1]: request '{known}' row 0 is labelled twice",
    ),
}


@pytest.fixture(scope="module")
def known_request(steady) -> str:
    """A request of two rows the steady server answered and recorded."""
    return steady.predict(BATCH.head(2)).headers["x-request-id"]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_FEEDBACK))
def test_bad_feedback_gets_a_4xx_naming_the_item_and_nothing_is_kept(steady, known_request, case):
    body, status, message = BAD_FEEDBACK[case]
    before = scrape(steady)
    answer = httpx.post(f"{steady.url}/feedback", content=body(known_request), headers=JSON_HEADERS)
    assert answer.status_code == status, answer.text
    assert message.format(known=known_request) in answer.json()["message"]
    assert sample(scrape(steady), "mlops_serving_feedback_labels") == sample(before, "mlops_serving_feedback_labels")


@pytest.mark.slow
def test_metrics_parse_as_prometheus_text_with_every_family(steady):
    steady.predict(BATCH.head(5))
    httpx.post(f"{steady.url}/invocations", content=b"{", headers=JSON_HEADERS)
    wait_until(lambda: sample(scrape(steady), "mlops_serving_records_flushed") >= 5, 10, "records flushed")
    families = scrape(steady)
    assert sample(families, "mlops_serving_requests", path="/invocations", code="200", version="1") >= 1
    assert sample(families, "mlops_serving_errors", path="/invocations", error_code="BAD_REQUEST", version="1") >= 1
    assert families["mlops_serving_invocation_seconds"].type == "histogram"
    histogram = {item.name: item.value for item in families["mlops_serving_invocation_seconds"].samples}
    assert histogram["mlops_serving_invocation_seconds_count"] >= 2
    predicted = sum(sample(families, "mlops_serving_predictions", version="1", **{"class": c}) for c in ("0", "1"))
    assert predicted >= 5
    assert sample(families, "mlops_serving_records_recorded") >= sample(families, "mlops_serving_records_flushed") >= 5
    assert sample(families, "mlops_serving_records_dropped", reason="queue_full") == 0
    assert sample(families, "mlops_serving_records_dropped", reason="store_error") == 0
    assert sample(families, "mlops_serving_recording_enabled") == 1
    for family in ("model_version", "production_version", "model_swaps", "registry_up", "feedback_labels"):
        assert f"mlops_serving_{family}" in families, family


@pytest.fixture(scope="module")
def recording_variants(saved_models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    """Servers on one registry, started at once: sampling nothing, recording off, recording without features with
    room for three waiting requests, and writing only when it stops."""
    home = tmp_path_factory.mktemp("recording")
    settings = Settings.from_env({"MLOPS_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"})
    promote(settings, register(settings, saved_models["real"].path))
    variants = {
        "sampling-nothing": {"MLOPS_RECORDING_SAMPLE_RATE": "0"},
        "off": {"MLOPS_RECORDING": "false"},
        "narrow": {"MLOPS_RECORDING_FEATURES": "false", "MLOPS_RECORDING_QUEUE_SIZE": "3"},
        "on-stop": {"MLOPS_RECORDING_FLUSH_SECONDS": "600"},
    }
    servers: dict[str, ServerProcess] = {}
    with ExitStack() as stack:

        def start(name: str) -> None:
            env = {"MLOPS_RECORDING_FLUSH_SECONDS": "0.5", **variants[name], "MLOPS_DATA_STORE": str(home / name)}
            # Version 1 stays in Production: a slow poll leaves the two cores to the other tests.
            servers[name] = stack.enter_context(model_server(settings, home, "--poll-interval", "5", env=env))

        starting = [threading.Thread(target=start, args=(name,)) for name in variants]
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join()
        assert set(servers) == set(variants), "a server did not start; see the logs in " + str(home)
        for server in servers.values():
            wait_until(lambda server=server: server.health()["status"] == "ok", FIRST_LOAD_DEADLINE, "loading")
        yield servers


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sampling-nothing", "off"])
def test_sampling_nothing_or_recording_off_records_nothing(recording_variants, variant):
    server = recording_variants[variant]
    answers = [server.predict(BATCH.head(2)) for _ in range(5)]
    assert all(answer.status_code == 200 and answer.headers["x-request-id"] for answer in answers)
    time.sleep(1.0)  # two flush intervals
    assert not server.data_store.exists() or not list(server.data_store.rglob("*.parquet"))
    families = scrape(server)
    assert sample(families, "mlops_serving_records_recorded") == 0
    assert sample(families, "mlops_serving_recording_enabled") == (variant != "off")
    told = httpx.post(
        f"{server.url}/feedback", json={"feedback": [{"request_id": answers[0].headers["x-request-id"], "label": 0}]}
    )
    assert told.status_code == 404
    assert ("is not one this server recorded" if variant != "off" else "/feedback is off") in told.json()["message"]


@pytest.mark.slow
def test_recording_without_features_then_a_full_queue_and_a_broken_store_drop_records_not_requests(
    recording_variants, saved_models
):
    server = recording_variants["narrow"]
    first = server.predict(BATCH.head(2))
    found = recorded(server.data_store, {first.headers["x-request-id"]})
    assert list(found.columns) == list(records.RECORD_COLUMNS)
    assert found.sort_values("row")["prediction"].tolist() == [str(p) for p in saved_models["real"].predictions[:2]]

    # The store breaks: where its records folder was, there is now a file.
    (server.data_store / "records").rename(server.data_store / "records-before")
    (server.data_store / "records").write_text("not a folder")
    answers = [server.predict(BATCH.head(1)) for _ in range(20)]
    assert [answer.status_code for answer in answers] == [200] * 20

    def dropped(reason: str) -> float:
        return sample(scrape(server), "mlops_serving_records_dropped", reason=reason)

    wait_until(lambda: dropped("store_error") >= 1, 10, "records dropped by the broken store")
    assert dropped("queue_full") >= 1
    health = server.health()["recording"]
    assert health["dropped"]["store_error"] >= 1 and "Not a directory" in health["last_error"]
    assert str(server.data_store / "records") in health["last_error"]
    wait_until(lambda: "the data store refused" in server.log.read_text(), 10, "the log line saying records are lost")
    assert server.predict(BATCH.head(1)).status_code == 200


@pytest.mark.slow
def test_what_waits_is_written_when_the_server_stops(recording_variants):
    server = recording_variants["on-stop"]
    request_id = server.predict(BATCH.head(3)).headers["x-request-id"]
    time.sleep(0.5)
    assert not server.data_store.exists()  # the flush interval is 10 minutes away
    os.killpg(server.pid, signal.SIGTERM)
    assert len(recorded(server.data_store, {request_id}, timeout=30)) == 3


# ----------------------------------------------------------------------------------------------------------------
# Following Production.


@pytest.mark.slow
def test_follows_production_from_none_through_promotion_and_rollback(mlops_env, saved_models, tmp_path):
    real = register(mlops_env, saved_models["real"].path)
    inverted = register(mlops_env, saved_models["inverted"].path)
    with model_server(mlops_env, tmp_path) as server:
        wait_until(lambda: server.health()["registry"]["reachable"], 30, "a first poll")
        ping = httpx.get(f"{server.url}/ping")
        assert (ping.status_code, ping.headers["x-model-version"]) == (503, "none")
        assert server.predict().status_code == 503
        assert server.health()["status"] == "unavailable"
        assert "no version with the 'production' alias" in server.health()["last_error"]

        promote(mlops_env, real)
        wait_until(lambda: httpx.get(f"{server.url}/ping").status_code == 200, SWAP_DEADLINE, "a first load")
        assert server.predict().json()["predictions"] == saved_models["real"].predictions

        promote(mlops_env, inverted)
        wait_until(lambda: answering_version(server) == str(inverted), SWAP_DEADLINE, "the promotion")
        assert server.predict().json()["predictions"] == saved_models["inverted"].predictions

        registry.restore(mlops_env, failed_version=inverted, restore_to=real, actor="test", reason="bad")
        # The version served before is kept loaded: a rollback costs one poll, not a load.
        elapsed = wait_until(lambda: answering_version(server) == str(real), POLL_INTERVAL + 3.0, "the rollback")
        assert server.predict().json()["predictions"] == saved_models["real"].predictions
        assert server.metric("model_swaps_total") == 3
        assert server.health()["status"] == "ok"
    log = server.log.read_text()
    assert "swapped breast_cancer_classifier from version 1 to version 2: promoted by test" in log
    assert "swapped breast_cancer_classifier from version 2 to version 1: rolled_back by test" in log
    assert elapsed < POLL_INTERVAL + 3.0


@pytest.mark.slow
def test_concurrent_requests_across_swaps_all_answer_from_the_version_in_their_header(
    mlops_env, saved_models, tmp_path
):
    # Alternating sources, so that consecutive versions answer differently and every swap is a fresh load.
    sources = ["real", "inverted", "real", "inverted"]
    versions = {register(mlops_env, saved_models[name].path): name for name in sources}
    promote(mlops_env, 1)
    body = json.dumps(SPLIT)
    answers: list[tuple[int, str, Any]] = []
    stop = threading.Event()

    def client(url: str) -> None:
        with httpx.Client(base_url=url, headers=JSON_HEADERS, timeout=10) as session:
            while not stop.is_set():
                try:
                    answer = session.post("/invocations", content=body)
                    answers.append((answer.status_code, answer.headers.get("x-model-version", ""), answer.json()))
                except httpx.HTTPError as error:
                    answers.append((0, "", repr(error)))

    with model_server(mlops_env, tmp_path) as server:
        wait_until(lambda: server.health()["status"] == "ok", FIRST_LOAD_DEADLINE, "loading version 1")
        threads = [threading.Thread(target=client, args=(server.url,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        try:
            for version in (2, 3, 4):
                time.sleep(0.5)
                promote(mlops_env, version)
                wait_until(lambda v=version: server.health()["model"]["version"] == v, SWAP_DEADLINE, f"v{version}")
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join()

    failures = [answer for answer in answers if answer[0] != 200]
    assert not failures, failures[:3]
    mismatched = [
        (version, payload)
        for _, version, payload in answers
        if payload["predictions"] != saved_models[versions[int(version)]].predictions
    ]
    assert not mismatched, mismatched[:3]
    assert {version for _, version, _ in answers} == {"1", "2", "3", "4"}
    assert len(answers) > 100


@pytest.mark.slow
def test_a_version_that_cannot_load_is_not_swapped_in(mlops_env, saved_models, tmp_path):
    promote(mlops_env, register(mlops_env, saved_models["real"].path))
    broken = register(mlops_env, tmp_path / "deleted-model")
    with model_server(mlops_env, tmp_path) as server:
        wait_until(lambda: server.health()["status"] == "ok", FIRST_LOAD_DEADLINE, "loading version 1")
        promote(mlops_env, broken)
        wait_until(lambda: server.health()["status"] == "degraded", SWAP_DEADLINE, "the failure")
        health = server.health()
        assert health["model"]["version"] == 1
        assert (health["production_version"], health["failed_version"]) == (broken, broken)
        assert f"version {broken} failed to load" in health["last_error"]
        assert (answering_version(server), server.predict().status_code) == ("1", 200)

        time.sleep(3)  # some thirty polls: backoff allows two more attempts at most
        assert 1 <= server.metric("model_load_failures_total") <= 3

        fixed = register(mlops_env, saved_models["inverted"].path)
        promote(mlops_env, fixed)
        wait_until(lambda: answering_version(server) == str(fixed), SWAP_DEADLINE, "the next good version")
        assert server.health()["status"] == "ok"
    assert f"version {broken} failed to load" in server.log.read_text()


@pytest.mark.slow
def test_keeps_serving_while_the_registry_is_unreachable(mlflow_server, server_env, saved_models, tmp_path):
    promote_logged_model(server_env, saved_models["real"].path)

    with model_server(server_env, tmp_path) as server:
        wait_until(lambda: server.health()["status"] == "ok", FIRST_LOAD_DEADLINE, "loading version 1")
        mlflow_server.stop()
        wait_until(lambda: server.health()["registry"]["reachable"] is False, 30, "noticing the outage")
        health = server.health()
        assert health["status"] == "degraded"
        assert "registry is unreachable" in health["last_error"]
        assert server.predict().status_code == 200
        assert server.metric("registry_up") == 0

        mlflow_server.start()
        wait_until(lambda: server.health()["status"] == "ok", 30, "recovery")
        assert server.predict().json()["predictions"] == saved_models["real"].predictions


# ----------------------------------------------------------------------------------------------------------------
# Input checks in-process, for column types the breast cancer model does not have.


def test_schema_types_optional_columns_and_mixed_types():
    columns = [ColSpec("long", "count"), ColSpec("double", "ratio", required=False), ColSpec("boolean", "flag")]
    schema = InputSchema.from_signature(Schema([*columns, ColSpec("string", "label")]))

    parsed = schema.parse(
        json.dumps({"dataframe_records": [{"count": 3, "flag": True, "label": "x"}]}).encode(), "application/json"
    )
    assert parsed.dtypes.astype(str).tolist()[:3] == ["int64", "float64", "bool"]
    assert parsed["label"].tolist() == ["x"]
    assert np.isnan(parsed.loc[0, "ratio"])

    with pytest.raises(InputError, match=re.escape("column 'count' expects long, got number 1.5")):
        schema.parse(
            json.dumps({"inputs": {"count": [1.5], "flag": [True], "label": ["x"]}}).encode(), "application/json"
        )
    with pytest.raises(InputError, match="column 'flag' expects boolean, got string 'maybe'"):
        schema.parse(b"count,flag,label\n1,maybe,x\n", "text/csv")


@pytest.mark.slow
def test_oversized_body_without_a_declared_length_gets_413(steady):
    chunks = (b" " * 100_000 for _ in range(MAX_BODY_BYTES // 100_000 + 1))
    answer = httpx.post(f"{steady.url}/invocations", content=chunks, headers=JSON_HEADERS)
    assert answer.status_code == 413
    assert steady.predict().status_code == 200


# ----------------------------------------------------------------------------------------------------------------
# Hostile clients: stalled requests, no token, and credentials that must never show.

PARTIAL_REQUESTS = {
    "nothing-sent": b"",
    "half-a-request-line": b"POST /invocati",
    "headers-never-end": b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n",
    "body-never-ends": b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b'Content-Length: 1000\r\n\r\n{"instances": [[',
}


@pytest.mark.slow
@pytest.mark.parametrize("sent", PARTIAL_REQUESTS.values(), ids=PARTIAL_REQUESTS.keys())
def test_a_stalled_client_gets_408_and_is_disconnected_after_the_read_timeout(steady, sent):
    import socket

    host, port = steady.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=READ_TIMEOUT + 10) as connection:
        connection.sendall(sent)
        started = time.monotonic()
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
        waited = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"REQUEST_TIMEOUT" in answer
    assert READ_TIMEOUT - 0.5 <= waited < READ_TIMEOUT + 5
    assert steady.predict().status_code == 200


@pytest.mark.slow
def test_a_header_too_large_gets_431_and_the_client_reads_it(steady):
    answer = httpx.post(
        f"{steady.url}/invocations", content=json.dumps(SPLIT), headers=JSON_HEADERS | {"x-padding": "a" * 1_000_000}
    )
    assert answer.status_code == 431, answer.text
    assert answer.json()["message"] == "the request line and headers are larger than 16,384 bytes"
    assert steady.predict().status_code == 200


@pytest.mark.slow
def test_a_client_that_sends_in_time_is_not_cut_off(steady, saved_models):
    import socket

    body = json.dumps(SPLIT).encode()
    head = f"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    host, port = steady.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=READ_TIMEOUT + 10) as connection:
        connection.sendall(head.encode() + b"\r\nConnection: close\r\n\r\n" + body[:100])
        time.sleep(READ_TIMEOUT / 3)
        connection.sendall(body[100:])
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["predictions"] == saved_models["real"].predictions


TOKEN = "correct-horse-battery-staple-7f3a"


@pytest.mark.slow
def test_with_a_token_only_the_probes_answer_without_it(mlops_env, saved_models, tmp_path, monkeypatch):
    promote(mlops_env, register(mlops_env, saved_models["real"].path))
    monkeypatch.setenv("MLOPS_SERVING_TOKEN", TOKEN)
    with model_server(mlops_env, tmp_path) as server:
        wait_until(lambda: server.health()["status"] == "ok", FIRST_LOAD_DEADLINE, "loading version 1")
        body = json.dumps(SPLIT)
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
            answer = httpx.post(f"{server.url}/invocations", content=body, headers=JSON_HEADERS | headers)
            assert answer.status_code == 401, headers
            assert answer.json()["error_code"] == "UNAUTHENTICATED"
            assert answer.headers["www-authenticate"].startswith("Bearer")
        for path in ("/version", "/metrics"):
            assert httpx.get(server.url + path).status_code == 401, path
        assert httpx.post(f"{server.url}/feedback", json={"feedback": []}).status_code == 401
        bearer = {"authorization": f"Bearer {TOKEN}"}
        answer = httpx.post(f"{server.url}/invocations", content=body, headers=JSON_HEADERS | bearer)
        assert answer.status_code == 200
        assert answer.json()["predictions"] == saved_models["real"].predictions
        assert httpx.get(f"{server.url}/version", headers=bearer).json()["version"] == 1
        assert httpx.get(f"{server.url}/ping").status_code == 200
        assert httpx.get(f"{server.url}/health").status_code == 200
    assert TOKEN not in server.log.read_text()


def test_without_a_token_the_server_refuses_to_listen_beyond_loopback(mlops_env, monkeypatch):
    monkeypatch.delenv("MLOPS_SERVING_TOKEN", raising=False)
    refused = subprocess.run(
        [PYTHON, "-m", "ml.serving", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    assert "refusing to serve on 0.0.0.0 without authentication: set MLOPS_SERVING_TOKEN" in refused.stderr


@pytest.mark.slow
def test_tracking_uri_credentials_never_show_in_responses_or_logs(mlflow_server, server_env, saved_models, tmp_path):
    promote_logged_model(server_env, saved_models["real"].path)
    password = "hunter2-tracking-password"
    with_credentials = replace(server_env, tracking_uri=mlflow_server.url.replace("://", f"://ops:{password}@"))

    with model_server(with_credentials, tmp_path) as server:
        wait_until(lambda: server.health()["status"] == "ok", FIRST_LOAD_DEADLINE, "loading version 1")
        mlflow_server.stop()
        wait_until(lambda: server.health()["registry"]["reachable"] is False, 30, "noticing the outage")
        answers = [httpx.get(server.url + path).text for path in ("/health", "/version", "/metrics", "/nowhere")]
        mlflow_server.start()
    shown = "\n".join([*answers, server.log.read_text()])
    assert "registry is unreachable" in answers[0]
    assert "ops:***@" in shown, "the outage is reported with the masked URI"
    assert password not in shown


@pytest.mark.slow
def test_the_open_probe_leaves_error_texts_to_callers_with_the_token(
    mlflow_server, server_env, saved_models, tmp_path, monkeypatch
):
    """/health answers without a token (orchestrators' probes carry none), so it says what state the server is in but
    not the errors' texts, which name internal addresses and user names."""
    promote_logged_model(server_env, saved_models["real"].path)
    monkeypatch.setenv("MLOPS_SERVING_TOKEN", TOKEN)
    with model_server(server_env, tmp_path) as server:
        wait_until(lambda: server.health()["status"] == "ok", FIRST_LOAD_DEADLINE, "loading version 1")
        mlflow_server.stop()
        wait_until(lambda: server.health()["registry"]["reachable"] is False, 30, "noticing the outage")
        open_probe = httpx.get(f"{server.url}/health", timeout=10).json()
        with_token = httpx.get(f"{server.url}/health", headers={"authorization": f"Bearer {TOKEN}"}, timeout=10).json()
        mlflow_server.start()
    assert (open_probe["status"], open_probe["registry"]["reachable"]) == ("degraded", False)
    assert open_probe["registry"]["last_error"] == "an error; send the bearer token for its text"
    assert str(mlflow_server.port) not in json.dumps(open_probe)
    assert f"127.0.0.1:{mlflow_server.port}" in with_token["registry"]["last_error"]


@pytest.fixture
def basic_auth_mlflow(tmp_path) -> Iterator[dict[str, Any]]:
    """MLflow with basic-auth started as the stack's image starts it (mlflow/entrypoint.sh), with a read-only user."""
    root = tmp_path / "mlflow-auth"
    root.mkdir()
    port = free_port()
    admin, reader = ("admin", "admin-password-0123"), ("reader", "reader-password-0123")
    env = {
        **os.environ,
        "PATH": f"{Path(PYTHON).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
        "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{root / 'auth.db'}",
        "MLFLOW_AUTH_ADMIN_USERNAME": admin[0],
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
        "MLFLOW_AUTH_READER_USERNAME": reader[0],
        "MLFLOW_AUTH_READER_PASSWORD": reader[1],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-secret-key-for-this-test-only",
        "MLFLOW_SERVER_ALLOWED_HOSTS": "127.0.0.1,127.0.0.1:*,localhost,localhost:*",
        **MLFLOW_NO_JOB_RUNNER,
    }
    command = [
        "sh",
        str(Path(__file__).resolve().parent.parent / "mlflow" / "entrypoint.sh"),
        *("mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port)),
        *("--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
        *("--serve-artifacts", "--artifacts-destination", str(root / "artifacts")),
    ]
    log = root / "mlflow-server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", timeout=180, process=process)
        yield {"url": f"http://127.0.0.1:{port}", "admin": admin, "reader": reader, "log": log}
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.mark.slow
def test_read_only_registry_credentials_serve_production_and_cannot_move_it(
    basic_auth_mlflow, mlops_env, saved_models, tmp_path, monkeypatch
):
    from mlflow.exceptions import MlflowException

    url, admin, reader = basic_auth_mlflow["url"], basic_auth_mlflow["admin"], basic_auth_mlflow["reader"]
    settings = replace(mlops_env, tracking_uri=url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
    client = registry.client_for(settings)
    run = client.create_run(experiment_id="0")
    client.log_artifacts(run.info.run_id, str(saved_models["real"].path), "model")
    registry.ensure_registered_model(client, settings.model_name)
    for _ in range(2):
        client.create_model_version(settings.model_name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    promote(settings, 1)

    credentials = {"MLFLOW_TRACKING_USERNAME": reader[0], "MLFLOW_TRACKING_PASSWORD": reader[1]}
    with model_server(settings, tmp_path, env=credentials) as server:
        wait_until(lambda: server.health()["status"] == "ok", FIRST_LOAD_DEADLINE, "loading version 1 as the reader")
        assert server.predict().json()["predictions"] == saved_models["real"].predictions

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", reader[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", reader[1])
    as_reader = registry.client_for(settings)
    assert registry.production_version(as_reader, settings.model_name, settings.production_alias).version == 1
    for move in (
        lambda: as_reader.set_registered_model_alias(settings.model_name, settings.production_alias, "2"),
        lambda: as_reader.transition_model_version_stage(settings.model_name, "2", "Production"),
        lambda: as_reader.delete_registered_model_alias(settings.model_name, settings.production_alias),
    ):
        with pytest.raises(MlflowException, match=r"PERMISSION_DENIED|Permission denied"):
            move()
    assert markers_of(settings) == (1, [1])
    assert "read-only user 'reader' is ready" in basic_auth_mlflow["log"].read_text()


def markers_of(settings: Settings) -> tuple[int | None, list[int]]:
    client = registry.client_for(settings)
    aliased = registry.production_version(client, settings.model_name, settings.production_alias)
    staged = [v.version for v in registry.list_versions(client, settings.model_name) if v.stage == "Production"]
    return (aliased.version if aliased else None), staged


# ----------------------------------------------------------------------------------------------------------------
# Told by the registry: MLflow's webhooks.

WEBHOOK_SECRET = "webhook-secret-5f1c"


def signed_delivery(payload: dict[str, Any], secret: str = WEBHOOK_SECRET, **header: str) -> tuple[bytes, dict]:
    """A delivery signed as MLflow signs one (mlflow.webhooks.delivery), with headers as given overriding."""
    import base64
    import hashlib
    import hmac
    import json
    import uuid

    body = json.dumps(payload).encode()
    delivery_id, timestamp = str(uuid.uuid4()), str(int(time.time()))
    digest = hmac.new(secret.encode(), f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    headers = {
        "x-mlflow-delivery-id": delivery_id,
        "x-mlflow-timestamp": timestamp,
        "x-mlflow-signature": "v1," + base64.b64encode(digest).decode(),
    }
    return body, headers | header


def alias_moved(settings: Settings, version: str = "1") -> dict[str, Any]:
    return {
        "entity": "model_version_alias",
        "action": "created",
        "timestamp": "2026-12-04T06:00:00+00:00",
        "data": {"name": settings.model_name, "alias": settings.production_alias, "version": version},
    }


def test_a_delivery_is_accepted_once_only_with_mlflows_signature_and_a_fresh_timestamp(mlops_env):
    from ml.serving.webhook import DeliveryVerifier, RefusedDelivery, moves_alias

    verifier = DeliveryVerifier(WEBHOOK_SECRET)
    body, headers = signed_delivery(alias_moved(mlops_env))
    assert moves_alias(verifier.verify(body, headers), mlops_env.model_name, mlops_env.production_alias)
    with pytest.raises(RefusedDelivery, match="was received before"):
        verifier.verify(body, headers)
    forged_body, forged = signed_delivery(alias_moved(mlops_env), secret="guessed")
    with pytest.raises(RefusedDelivery, match="signature does not match"):
        verifier.verify(forged_body, forged)
    with pytest.raises(RefusedDelivery, match="older than 300 s"):
        verifier.verify(*signed_delivery(alias_moved(mlops_env)), now=time.time() + 600)
    with pytest.raises(RefusedDelivery, match="lacks MLflow's signature"):
        verifier.verify(body, {})
    other = alias_moved(mlops_env) | {"data": {"name": "another_model", "alias": mlops_env.production_alias}}
    assert not moves_alias(verifier.verify(*signed_delivery(other)), mlops_env.model_name, "production")


@pytest.mark.slow
def test_told_by_the_registrys_webhook_it_swaps_at_once_and_a_forged_event_moves_nothing(
    mlflow_server, server_env, saved_models, tmp_path
):
    settings = server_env
    promote_logged_model(settings, saved_models["real"].path)
    port = free_port()
    told = {
        "MLOPS_SERVING_WEBHOOK_URL": f"http://127.0.0.1:{port}/webhooks/mlflow",
        "MLOPS_SERVING_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    # Polling once a minute: a swap within seconds can only come from the webhook.
    with model_server(settings, tmp_path, "--poll-interval", "60", env=told, port=port) as server:
        wait_until(lambda: server.health()["status"] == "ok", FIRST_LOAD_DEADLINE, "loading version 1")
        webhooks = registry.client_for(settings).list_webhooks()
        assert [hook.url for hook in webhooks] == [told["MLOPS_SERVING_WEBHOOK_URL"]]

        forged_body, forged = signed_delivery(alias_moved(settings, "2"), secret="guessed")
        refused = httpx.post(f"{server.url}/webhooks/mlflow", content=forged_body, headers=forged, timeout=10)
        assert refused.status_code == 401 and "signature does not match" in refused.json()["message"]

        version = promote_logged_model(settings, saved_models["inverted"].path)
        seconds = wait_until(lambda: answering_version(server) == str(version), 20, "the swap on the webhook")
        assert server.predict().json()["predictions"] == saved_models["inverted"].predictions
        log_text = server.log.read_text()
        assert "the registry says the 'production' alias moved; reading it now" in log_text
        assert "refused a webhook delivery: the signature does not match" in log_text
        assert WEBHOOK_SECRET not in log_text
        print(f"alias moved -> served by the webhook in {seconds:.2f} s (polling every 60 s)")


def test_the_open_probe_hides_the_text_of_a_window_event_error():
    """The window events' last error names Airflow's address and user: shown, like the others, to the token only."""
    from ml.serving.app import HIDDEN_ERROR, _without_error_texts

    error = "logging in to Airflow at http://10.0.0.5:8080 as MLOPS_AIRFLOW_API_USERNAME failed: HTTP 401"
    health = {
        "registry": {"last_error": None},
        "recording": {"last_error": None, "window_events": {"failed": 1, "last_error": error}},
        "last_error": None,
    }
    shown = _without_error_texts(health)
    assert shown["recording"]["window_events"] == {"failed": 1, "last_error": HIDDEN_ERROR}
    assert health["recording"]["window_events"]["last_error"] == error, "the server's own figures are left as they are"
