"""Credentials in the tracking URI never reach what the command line prints: real ``mlops`` processes, a real
``mlflow server`` on loopback (which ignores the credentials, as any server without auth does)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest
from conftest import BIN

PASSWORD = "hunter2-cli-password"


def mlops(*arguments: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "mlops"), *arguments], env={**os.environ, **env}, capture_output=True, text=True, timeout=300
    )


def test_mlops_env_leaves_the_tracking_credentials_out(tmp_path):
    env = {"MLOPS_HOME": str(tmp_path), "MLFLOW_TRACKING_URI": f"https://ops:{PASSWORD}@mlflow.example:5000/"}
    printed = mlops("env", env=env)
    assert printed.returncode == 0, printed.stderr
    assert PASSWORD not in printed.stdout + printed.stderr
    assert "export MLFLOW_TRACKING_URI=https://mlflow.example:5000/\n" in printed.stdout
    assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in printed.stdout


@pytest.mark.slow
def test_mlops_status_masks_the_tracking_credentials(mlflow_server, tmp_path):
    env = {
        "MLOPS_HOME": str(tmp_path),
        "MLFLOW_TRACKING_URI": mlflow_server.url.replace("://", f"://ops:{PASSWORD}@"),
    }
    for arguments in (("status",), ("status", "--json"), ("-v", "status")):
        printed = mlops(*arguments, env=env)
        assert printed.returncode == 0, printed.stderr
        assert PASSWORD not in printed.stdout + printed.stderr, arguments
    assert f"at {mlflow_server.url.replace('://', '://ops:***@')}" in mlops("status", env=env).stdout


# As written in a URL (percent-encoded) and as the server receives it (decoded): neither form may show anywhere.
URL_PASSWORD = "S3cr%2Ft%40Pass-27"
PASSWORD_FORMS = (URL_PASSWORD, "S3cr/t@Pass-27")
# A failed task is retried after a second, and MLflow's client gives up on a closed port at once, not after minutes.
FAST_FAILURE = {
    "MLOPS_RETRY_DELAY_SECONDS": "1",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
CLOSED_PORT = "127.0.0.1:1"


def every_text_in(database: Path) -> str:
    """Every value of every table of an SQLite database, as text."""
    with contextlib.closing(sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True)) as connection:
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return "\n".join(
            repr(row) for table in tables for row in connection.execute(f'SELECT * FROM "{table}"').fetchall()
        )


def leaks(text: str) -> list[str]:
    return [form for form in PASSWORD_FORMS if form in text]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("down", "env"),
    [
        ("tracking server", {"MLFLOW_TRACKING_URI": f"http://admin:{URL_PASSWORD}@{CLOSED_PORT}"}),
        (
            "data source",
            {
                "MLOPS_DATA_SOURCE": f"postgresql+psycopg://admin:{URL_PASSWORD}@{CLOSED_PORT}/sales",
                "MLOPS_DATA_QUERY": "SELECT * FROM sales",
            },
        ),
    ],
)
def test_a_run_failing_on_a_password_protected_store_shows_the_password_nowhere(airflow_db, tmp_path, down, env):
    """The run fails as it should; its output, task logs, Airflow's database (XCom, the run note, rendered fields) and
    the MLflow store hold neither form of the password; the terminal shows one line per failed try, no traceback, and
    the summary names the reason, while the traceback stays in the task log."""
    home = tmp_path / "home"
    printed = mlops("run", env={"MLOPS_HOME": str(home), **FAST_FAILURE, **env})
    output = printed.stdout + printed.stderr
    assert printed.returncode == 1, output[-3000:]
    run_id = re.search(r"DAG run mlops_pipeline / (\S+): failed", printed.stdout)[1]
    logs = sorted((airflow_db / "logs" / "dag_id=mlops_pipeline" / f"run_id={run_id}").rglob("*.log"))
    assert [log.parent.name for log in logs] == ["task_id=extract_data"] * 2 + (
        ["task_id=rollback_model"] * 2 if down == "tracking server" else ["task_id=rollback_model"]
    )
    stores = [airflow_db / "airflow.db"] + ([home / "mlflow.db"] if down == "data source" else [])
    assert leaks(output) == []
    for log in logs:
        assert leaks(log.read_text()) == [], log
    for store in stores:
        assert leaks(every_text_in(store)) == [], store

    assert "Traceback" not in output
    reason = "TrackingServerUnavailable" if down == "tracking server" else "DataSourceUnavailableError"
    for attempt in (1, 2):
        assert f"extract_data failed on try {attempt}: {reason}: " in output
        assert re.search(rf"  extract_data, try {attempt} +: {reason}: ", printed.stdout)
        assert f"task_id=extract_data/attempt={attempt}.log" in output
    failure = json.loads(next(line for line in logs[0].read_text().splitlines() if "error_detail" in line))
    assert reason in [stack["exc_type"] for stack in failure["error_detail"]]


@pytest.mark.slow
def test_a_run_tracked_with_a_password_does_not_print_it(mlflow_server, mlops_env, capfd):
    """MLflow prints each run's link, built from the tracking URI, on stdout: not when the URI carries a password."""
    from dataclasses import replace

    from ml import tracking

    settings = replace(mlops_env, tracking_uri=mlflow_server.url.replace("://", f"://admin:{URL_PASSWORD}@"))
    mlflow = tracking.connect(settings)
    with mlflow.start_run():
        mlflow.log_param("family", "logistic_regression")
    captured = capfd.readouterr()
    assert leaks(captured.out + captured.err) == []


def test_every_credential_of_the_settings_is_masked_by_airflow_and_by_the_project(mlops_env, monkeypatch):
    """Registered once, a credential is masked in any text, whoever wrote it, in each form a URL may show it."""
    from dataclasses import replace

    from airflow.sdk._shared.secrets_masker import redact

    from ml.redaction import mask_credentials, register_secrets, secrets_of

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3-secret-key-27")
    settings = replace(
        mlops_env,
        data_source=f"postgresql+psycopg://admin:{URL_PASSWORD}@db.example/sales",
        serving_token="serving-token-27",
    )
    register_secrets(secrets_of(settings))
    for secret in (*PASSWORD_FORMS, "s3-secret-key-27", "serving-token-27"):
        text = f"a library's message quoting {secret} bare"
        assert secret not in str(redact(text)), secret
        assert mask_credentials(text) == "a library's message quoting *** bare"
