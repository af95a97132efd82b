"""The production stack as native processes: the databases, folders and processes of one stack, started the way
docker-compose.yaml starts its services (the commands and environment of ``tests/stack.py``), and REST clients for it.

``tests/test_stack.py`` proves the stack with it; ``bench/stack_bench.py`` measures on it; ``tests/test_compose.py``
compares the environment it passes with compose's. PostgreSQL (127.0.0.1:5432, trust auth, user postgres) and Redis
(127.0.0.1:6379) must be running: :func:`missing_services` says which is not.
"""

from __future__ import annotations

import base64
import dataclasses
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import stack
from airflow_api import Airflow
from s3 import S3Credentials, WeedServer, free_ports
from stack import SERVICES, Placement, Process, StackValues

REPO = stack.REPO
BIN = Path(sys.executable).parent
PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_DB = 7  # the stack test's and bench's; each stack also has its own Celery queue, so two never share tasks
MODEL_NAME = "breast_cancer_classifier"
STARTUP_TIMEOUT = 300
RUN_TIMEOUT = 600
# Two Celery workers, as on two hosts: each has its own working folder, HOME, TMPDIR, AIRFLOW_HOME and DAGs folder, and
# they share no folder; the second has its own Celery node name and log server port, as a second host would.
WORKERS = ("airflow-worker", "airflow-worker-2")
# The benchmarks' DAGs (bench/dags/), linked into the stack's DAGs folder beside the service's.
STUB_DAGS = ("stub_pipeline", "stub_fanout")


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _admin_sql(*statements: str) -> None:
    import psycopg

    with psycopg.connect(host=PG_HOST, port=PG_PORT, user="postgres", dbname="postgres", autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


class NativeStack:
    """Databases, folders and processes of one stack; everything it creates it removes again."""

    def __init__(self, root: Path, s3: WeedServer | None = None, *, worker_concurrency: int = 2) -> None:
        """``s3``: the S3 server that holds the stack's bucket (snapshots and MLflow's artifacts); without one, the
        stack is only described (tests/test_compose.py compares its environment). ``worker_concurrency``: how many
        tasks each Celery worker runs at once."""
        self.root = root
        self.s3 = s3
        self.worker_concurrency = worker_concurrency
        self.suffix = secrets.token_hex(4)
        self.databases = {
            "airflow": f"mlops_stack_{self.suffix}",
            "mlflow": f"mlops_stack_{self.suffix}_mlflow",
            "auth": f"mlops_stack_{self.suffix}_auth",
        }
        names = ("airflow-apiserver", "mlflow", "serving", "scheduler", "logs", "logs-2")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))
        self.api_url = f"http://127.0.0.1:{self.ports['airflow-apiserver']}"
        self.mlflow_url = f"http://127.0.0.1:{self.ports['mlflow']}"
        self.processes: dict[str, Process] = {}
        self.logs = root / "logs"
        self.dags = root / "dags"
        self.bucket = f"mlops-stack-{self.suffix}"
        self.data_store = f"s3://{self.bucket}/datastore"
        self.artifacts = f"s3://{self.bucket}/artifacts"
        keys = s3.service if s3 else S3Credentials("<access key>", "<secret key>")
        self.admin = ("admin", secrets.token_urlsafe(12))
        self.mlflow_user = ("mlops", secrets.token_urlsafe(12))
        self.mlflow_reader = ("reader", secrets.token_urlsafe(12))
        self.values = StackValues(
            sql_alchemy_conn=self._pg("postgresql+psycopg", "airflow"),
            broker_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}",
            result_backend=self._pg("db+postgresql", "airflow"),
            dags_folder=str(self.dags),
            execution_api_url=f"{self.api_url}/execution/",
            jwt_secret=secrets.token_urlsafe(32),
            api_secret_key=secrets.token_urlsafe(32),
            fernet_key=base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
            admin_username=self.admin[0],
            admin_password=self.admin[1],
            passwords_file=str(root / "auth" / "passwords.json"),
            scheduler_health_port=str(self.ports["scheduler"]),
            worker_log_server_port=str(self.ports["logs"]),
            default_queue=f"mlops_stack_{self.suffix}",
            mlflow_tracking_uri=self.mlflow_url,
            mlflow_username=self.mlflow_user[0],
            mlflow_password=self.mlflow_user[1],
            mlflow_reader_username=self.mlflow_reader[0],
            mlflow_reader_password=self.mlflow_reader[1],
            # psycopg2, not psycopg 3: with psycopg 3, MLflow 3.17's registry binds model versions as VARCHAR and
            # PostgreSQL rejects `integer <> character varying` when a promotion archives the previous version
            # (mlflow/mlflow#24592).
            mlflow_backend_store_uri=self._pg("postgresql+psycopg2", "mlflow"),
            mlflow_auth_database_uri=self._pg("postgresql+psycopg2", "auth"),
            mlflow_auth_config_path=str(root / "mlflow-auth" / "basic_auth.ini"),
            mlflow_flask_secret_key=secrets.token_urlsafe(32),
            mlflow_allowed_hosts="127.0.0.1,127.0.0.1:*,localhost,localhost:*",
            data_store=self.data_store,
            s3_endpoint_url=s3.endpoint if s3 else "http://127.0.0.1:0",
            s3_access_key_id=keys.access_key,
            s3_secret_access_key=keys.secret_key,
            s3_conn_id=stack.NATIVE_S3_CONNECTION,
            airflow_api_url="",
            airflow_api_username="",
            airflow_api_password="",
            model_name=MODEL_NAME,
            serving_token=secrets.token_urlsafe(24),
            serving_webhook_url=f"http://127.0.0.1:{self.ports['serving']}/webhooks/mlflow",
            serving_webhook_secret=secrets.token_urlsafe(24),
        )

    def _pg(self, scheme: str, database: str) -> str:
        return f"{scheme}://postgres@{PG_HOST}:{PG_PORT}/{self.databases[database]}"

    # --- set-up and tear-down ---

    def create(self) -> None:
        for folder in (self.logs, self.dags):
            folder.mkdir(parents=True, exist_ok=True)
        if self.s3 is not None:
            self.s3.filesystem(self.s3.admin).mkdir(self.bucket)
        # The stack's DAGs folder: the service's DAG and the benchmarks' stubs, nothing else.
        (self.dags / "mlops_pipeline.py").symlink_to(REPO / "dags" / "mlops_pipeline.py")
        for stub in STUB_DAGS:
            (self.dags / f"{stub}.py").symlink_to(REPO / "bench" / "dags" / f"{stub}.py")
        _admin_sql(*(f'CREATE DATABASE "{name}"' for name in self.databases.values()))

    def destroy(self) -> None:
        for name in reversed(list(self.processes)):
            self.processes[name].stop()
        try:
            _admin_sql(*(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)' for name in self.databases.values()))
        except Exception as error:
            print(f"could not drop the stack's databases {sorted(self.databases.values())}: {error}")
        try:
            import redis

            client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
            keys = list(client.scan_iter(match=f"*{self.values.default_queue}*"))
            if keys:
                client.delete(*keys)
        except Exception as error:
            print(f"could not clean Redis queue {self.values.default_queue}: {error}")

    def print_logs(self, lines: int = 80) -> None:
        for process in self.processes.values():
            state = "running" if process.popen.poll() is None else f"exited {process.popen.returncode}"
            print(f"\n===== {process.name} ({state}): last {lines} lines of {process.log} =====")
            print(process.tail(lines))

    # --- processes ---

    def placement(self, name: str) -> Placement:
        return Placement(
            host="127.0.0.1",
            port=self.ports.get(name, 0),
            workers=1,
            artifacts=self.artifacts,
            source=str(REPO),
        )

    def env(self, name: str) -> dict[str, str]:
        home = self.root / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        service = "airflow-worker" if name in WORKERS else name
        env = {**stack.base_env(BIN), **stack.service_env(service, self.values)}
        if service in stack.AIRFLOW_SERVICES:
            env.update(
                AIRFLOW_HOME=str(home),
                AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False",
                AIRFLOW__CELERY__WORKER_CONCURRENCY=str(self.worker_concurrency),
                AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT="20",
                AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL="2",
                MLOPS_RETRY_DELAY_SECONDS="5",
            )
        if service in stack.S3_CONNECTION_READERS:
            env = stack.keys_as_a_connection(env, self.values)
        if service in ("mlflow", "serving"):
            env["AIRFLOW_HOME"] = str(home)  # where the connection's lookup keeps Airflow's files, not ~/airflow
        if name in WORKERS:
            env.update(self.worker_folders(name))
            if name != WORKERS[0]:
                env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] = str(self.ports["logs-2"])
        env.update(MLFLOW_ENABLE_TELEMETRY="false", DO_NOT_TRACK="true")
        return env

    def worker_folders(self, name: str) -> dict[str, str]:
        """A worker's own folders, as on a host of its own: its working folder (AIRFLOW_HOME, the task logs), HOME,
        TMPDIR, and a DAGs folder with the DAG files (a host has them in its image)."""
        home = self.root / "homes" / name
        folders = {"HOME": home / "home", "TMPDIR": home / "tmp", "AIRFLOW__CORE__DAGS_FOLDER": home / "dags"}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        for dag_file in self.dags.glob("*.py"):
            if not (folders["AIRFLOW__CORE__DAGS_FOLDER"] / dag_file.name).exists():
                (folders["AIRFLOW__CORE__DAGS_FOLDER"] / dag_file.name).symlink_to(dag_file.resolve())
        return {"AIRFLOW_HOME": str(home), **{key: str(folder) for key, folder in folders.items()}}

    def start(self, name: str, overrides: Mapping[str, str] | None = None) -> Process:
        """Start a service; ``overrides`` replace some of its environment (a worker's data store, say)."""
        service = SERVICES["airflow-worker" if name in WORKERS else name]
        argv = service.argv(self.placement(name), native=True)
        if name in WORKERS[1:]:
            argv += ["--celery-hostname", f"{name}@%h"]  # Celery's node names must differ; hosts' would
        cwd = self.root / "homes" / name
        process = stack.start(name, argv, {**self.env(name), **(overrides or {})}, self.logs, cwd=cwd)
        self.processes[name] = process
        return process

    def watched(self) -> list[Process]:
        """The processes that must stay alive: every one started but the one-shot airflow-init."""
        return [process for name, process in self.processes.items() if name != "airflow-init"]

    def stop(self, name: str) -> None:
        """Stop a service, as its host would at a warm shutdown: a worker first finishes the tasks it runs."""
        self.processes.pop(name).stop(grace=60)

    def start_polling_server(self, port: int) -> Process:
        """A second model server, as compose's but without the webhook's secret: it follows Production by polling
        alone, at the default interval."""
        env = {key: value for key, value in self.env("serving").items() if key != "MLOPS_SERVING_WEBHOOK_SECRET"}
        placement = dataclasses.replace(self.placement("serving"), port=port)
        argv = SERVICES["serving"].argv(placement, native=True)
        process = stack.start("serving-polling", argv, env, self.logs, cwd=self.root / "homes" / "serving")
        self.processes[process.name] = process
        return process

    def run_one_shot(self, name: str, timeout: float) -> None:
        process = self.start(name)
        try:
            code = process.popen.wait(timeout=timeout)
        except Exception:
            raise TimeoutError(f"{name} did not finish within {timeout} s") from None
        if code != 0:
            raise RuntimeError(f"{name} failed with exit code {code}:\n{process.tail()}")

    def health_shell(self, name: str, hostname: str) -> None:
        """Run the service's compose health check command natively."""
        command = SERVICES[name].health_shell
        env = {**self.env(name), "HOSTNAME": hostname}
        result = subprocess.run(
            ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=120, cwd=self.root
        )
        assert result.returncode == 0, f"health check of {name} failed: {command}\n{result.stdout}\n{result.stderr}"


@contextmanager
def native_stack(root: Path, s3: WeedServer, *, worker_concurrency: int = 2) -> Iterator[NativeStack]:
    the_stack = NativeStack(root, s3, worker_concurrency=worker_concurrency)
    the_stack.create()
    try:
        yield the_stack
    except BaseException:
        the_stack.print_logs()
        raise
    finally:
        the_stack.destroy()


# --- REST clients ---


class Mlflow:
    def __init__(self, url: str, username: str, password: str) -> None:
        import httpx

        self.http = httpx.Client(base_url=f"{url}/api/2.0/mlflow", auth=(username, password), timeout=30)

    def production_version(self, name: str, alias: str = "production") -> int | None:
        response = self.http.get("/registered-models/alias", params={"name": name, "alias": alias})
        if response.status_code in (400, 404) and response.json().get("error_code") == "RESOURCE_DOES_NOT_EXIST":
            return None
        assert response.status_code == 200, f"alias lookup: {response.status_code} {response.text}"
        return int(response.json()["model_version"]["version"])

    def set_alias(self, name: str, alias: str, version: int) -> float:
        """Point ``alias`` at ``version``; returns when the registry confirmed it (time.monotonic())."""
        response = self.http.post(
            "/registered-models/alias", json={"name": name, "alias": alias, "version": str(version)}
        )
        assert response.status_code == 200, f"setting the alias: {response.status_code} {response.text}"
        return time.monotonic()

    def version_tags(self, name: str, version: int) -> dict[str, str]:
        response = self.http.get("/model-versions/get", params={"name": name, "version": str(version)})
        response.raise_for_status()
        return {tag["key"]: tag["value"] for tag in response.json()["model_version"].get("tags", [])}


def task_timeline(task_instances: Iterable[dict[str, Any]]) -> str:
    """Each task's wait (scheduling, queueing, forking) and run time, in the order the tasks started; a mapped task's
    instances each under their map index."""
    spans = sorted(
        (
            datetime.fromisoformat(ti["start_date"]),
            datetime.fromisoformat(ti["end_date"]),
            ti["task_id"] if ti.get("map_index", -1) < 0 else f"{ti['task_id']}[{ti['map_index']}]",
        )
        for ti in task_instances
        if ti["start_date"] and ti["end_date"]
    )
    parts, previous_end = [], None
    for started, ended, task_id in spans:
        gap = (started - previous_end).total_seconds() if previous_end else None
        wait = "" if gap is None else f"+{gap:.1f} " if gap >= 0 else "(alongside) "
        parts.append(f"{task_id} {wait}{(ended - started).total_seconds():.1f}")
        previous_end = max(previous_end or ended, ended)
    return ", ".join(parts)


def missing_services() -> list[str]:
    """PostgreSQL and Redis, where the stack needs them and they do not answer."""
    return [
        f"{what} at {host}:{port}"
        for what, host, port in (("PostgreSQL", PG_HOST, PG_PORT), ("Redis", REDIS_HOST, REDIS_PORT))
        if not reachable(host, port)
    ]


@dataclasses.dataclass
class Running:
    """A stack that is up: REST clients as its admin and pipeline user, and the processes that must stay alive."""

    airflow: Airflow
    mlflow: Mlflow
    watched: list[Process]
    startup_seconds: float


def bring_up(s: NativeStack, workers: tuple[str, ...] = WORKERS, dag_ids: tuple[str, ...] = ()) -> Running:
    """Start the stack as compose does: MLflow (basic-auth, PostgreSQL, proxied artifacts) beside airflow-init, then
    the api-server, scheduler, dag-processor and ``workers``; wait until each answers, and unpause ``dag_ids`` once
    parsed."""
    import httpx

    began = time.monotonic()
    mlflow_process = s.start("mlflow")
    s.run_one_shot("airflow-init", timeout=STARTUP_TIMEOUT)
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", *workers):
        s.start(name)
    watched = s.watched()
    stack.wait_until(
        lambda: httpx.get(f"{s.mlflow_url}/health", timeout=5).status_code == 200,
        STARTUP_TIMEOUT,
        "MLflow /health",
        [mlflow_process],
    )
    api = SERVICES["airflow-apiserver"]
    stack.wait_until(
        lambda: httpx.get(f"{s.api_url}{api.health_path}", timeout=5).status_code == 200,
        STARTUP_TIMEOUT,
        "Airflow api-server",
        watched,
    )
    scheduler_health = f"http://127.0.0.1:{s.ports['scheduler']}{SERVICES['airflow-scheduler'].health_path}"
    stack.wait_until(
        lambda: httpx.get(scheduler_health, timeout=5).status_code == 200,
        STARTUP_TIMEOUT,
        "scheduler health",
        watched,
    )
    airflow = Airflow(s.api_url, *s.admin)
    for dag_id in dag_ids:
        stack.wait_until(
            lambda dag_id=dag_id: airflow.http.get(f"/dags/{dag_id}").status_code == 200,
            STARTUP_TIMEOUT,
            f"{dag_id} to be parsed",
            watched,
            interval=1,
        )
        airflow.unpause(dag_id)
    return Running(airflow, Mlflow(s.mlflow_url, *s.mlflow_user), watched, time.monotonic() - began)
