"""The production stack described once: each service's command, port, health check, dependencies and environment.

Two consumers read this module, so they cannot drift apart:

- ``tests/test_stack.py`` starts the services as native processes on this machine (PostgreSQL and Redis already
  running) with :func:`service_env` and :meth:`Service.argv`, and runs the pipeline through them;
- ``tests/test_compose.py`` checks that ``docker-compose.yaml`` runs the same commands, exposes the same ports, checks
  the same health endpoints and sets the same environment variables (the values differ: host names, paths, secrets).

Standard library only: the compose test imports it without starting anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Where things live inside the containers (docker-compose.yaml and the two Dockerfiles use the same paths).
CONTAINER_SOURCE = "/opt/mlops/src"  # the project's source tree in the Airflow image (scripts, pyproject)
CONTAINER_DAGS = "/opt/airflow/dags"
CONTAINER_DATA_STORE = "/opt/mlops/datastore"  # the image's default data store, for a container run on its own
CONTAINER_PASSWORDS_FILE = "/opt/airflow/auth/passwords.json"  # the named volume `airflow-auth`
# In compose, snapshots and MLflow's artifacts live in the S3 bucket of the `s3` service, which `s3-init` creates:
# nothing else is shared between the Airflow containers and the workers.
COMPOSE_BUCKET = "${S3_BUCKET:-mlops}"
COMPOSE_DATA_STORE = f"s3://{COMPOSE_BUCKET}/datastore"
COMPOSE_ARTIFACTS = f"s3://{COMPOSE_BUCKET}/artifacts"
COMPOSE_S3_ENDPOINT = "http://s3:8333"
CONTAINER_AUTH_CONFIG = "/tmp/mlflow-auth/basic_auth.ini"

AIRFLOW_SERVICES = (
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
)

# Values that are the same natively and in compose.
FIXED_ENV = {
    "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
    "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
    "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "True",
    # Celery workers import the pipeline's libraries once, before they fork tasks (ml/celery_worker.py).
    "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": "ml.celery_worker.CELERY_CONFIG",
    # A task supervisor can miss its task's exit and sleep until the next heartbeat tick (default 5 s) before it
    # reports the end: up to 5 s lost per task.
    "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
}

# Set natively only, each for a stated reason; compose leaves them at their defaults.
NATIVE_ONLY_ENV = {
    "AIRFLOW_HOME": "a temporary home per process (the image's is /opt/airflow)",
    "PATH": "the virtual environment's bin/ first, so components that spawn `airflow` find it",
    "HOME": "inherited; a worker's own (tests/test_stack.py, as on a host of its own)",
    "TMPDIR": "a worker's own, as on a host of its own",
    "LANG": "inherited",
    "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "no @daily run on unpause: the test triggers every run itself",
    "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2 shared cores on the test machine; 1 in bench/stack_bench.py",
    "MLOPS_RETRY_DELAY_SECONDS": "a failed task retries after 5 s instead of 5 min",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "a killed worker's task is retried after 20 s, not 5 min",
    "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "looked for every 2 s, not 10 s",
    "MLFLOW_ENABLE_TELEMETRY": "no telemetry from tests",
    "DO_NOT_TRACK": "no telemetry from tests",
}

# Set in compose only.
COMPOSE_ONLY_ENV = {
    "DUMB_INIT_SETSID": "the worker's warm shutdown in the official image (docker-stack docs, signal propagation)",
    "CONNECTION_CHECK_MAX_COUNT": "the model server and its subscription step have no Airflow database to wait for",
}

# Natively the services that read an Airflow connection get the S3 keys as one, in place of AWS_ACCESS_KEY_ID and
# AWS_SECRET_ACCESS_KEY (:func:`keys_as_a_connection`): AIRFLOW_CONN_<ID> holds them, MLOPS_S3_CONN_ID names it. The
# MLflow server is started through the launcher that reads it (python -m ml.object_store), which its image in compose
# does not carry (no Airflow there): compose passes .env's keys.
NATIVE_S3_CONNECTION = "mlops_s3"
S3_KEY_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
NATIVE_S3_CONNECTION_ENV = {
    f"AIRFLOW_CONN_{NATIVE_S3_CONNECTION.upper()}": "the S3 keys, as an Airflow connection of type aws",
    "MLOPS_S3_CONN_ID": "names it; in compose an optional setting of the Airflow services and the model server",
}
S3_CONNECTION_READERS = (*AIRFLOW_SERVICES, "mlflow", "serving")

# The MLflow server delivers its webhooks to the model server over plain HTTP on a private network (compose's) or
# loopback (natively): MLflow allows only https to public addresses by default. It also caches each event's webhook
# list for 60 s, so an alias event within a minute of serving-subscribe would reach no one; alias events are rare, so
# reading the list again after 1 s costs nothing.
MLFLOW_WEBHOOK_ENV = {
    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    "MLFLOW_WEBHOOK_CACHE_TTL": "1",
}
# MLflow's server job runner (GenAI scorers, trace roll-ups) is seven more Python processes that the registry and the
# tracking API never use: without it the server answers in about 6 s instead of 27 s on this machine, with less memory.
MLFLOW_NO_JOB_RUNNER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@dataclass(frozen=True)
class Service:
    """One service of the stack.

    ``command`` is the argv in compose and natively, with ``{host}``, ``{port}``, ``{workers}``, ``{artifacts}`` and
    ``{source}`` filled in from :class:`Placement`. ``native_prefix`` is what the image's ENTRYPOINT adds and a native
    run must add itself. ``health_path`` is an HTTP path answered on ``health_port`` (default: ``port``);
    ``health_shell`` a shell command that exits 0 when healthy, run with ``HOSTNAME`` set.
    """

    name: str
    command: tuple[str, ...]
    port: int | None = None
    health_path: str | None = None
    health_port: int | None = None
    health_shell: str | None = None
    depends_on: Mapping[str, str] = field(default_factory=dict)
    native_prefix: tuple[str, ...] = ()
    native: bool = True
    one_shot: bool = False

    def argv(self, placement: Placement, *, native: bool) -> list[str]:
        values = {f.name: getattr(placement, f.name) for f in fields(placement)}
        rendered = [part.format(**values) for part in self.command]
        if native:
            return [*(part.format(**values) for part in self.native_prefix), *rendered]
        return rendered


@dataclass(frozen=True)
class Placement:
    """Where a service listens and finds its files: natively (loopback, free ports, temp folders) or in compose."""

    host: str
    port: int
    workers: int
    artifacts: str
    source: str


def compose_placement(service: Service) -> Placement:
    return Placement(
        host="0.0.0.0",
        port=service.port or 0,
        workers=2,
        artifacts=COMPOSE_ARTIFACTS,
        source=CONTAINER_SOURCE,
    )


_HEALTHY = "service_healthy"
_STARTED = "service_started"
_DONE = "service_completed_successfully"
_INFRA = {"postgres": _HEALTHY, "redis": _HEALTHY}
_AIRFLOW_DEPENDS = {**_INFRA, "airflow-init": _DONE}

SERVICES: dict[str, Service] = {
    service.name: service
    for service in (
        Service(
            name="airflow-init",
            command=("bash", "{source}/docker/airflow-init.sh"),
            depends_on=_INFRA,
            one_shot=True,
        ),
        Service(
            name="airflow-apiserver",
            command=("airflow", "api-server", "--host", "{host}", "--port", "{port}"),
            port=8080,
            health_path="/api/v2/version",
            depends_on=_AIRFLOW_DEPENDS,
        ),
        Service(
            name="airflow-scheduler",
            command=("airflow", "scheduler"),
            health_path="/health",
            health_port=8974,
            depends_on=_AIRFLOW_DEPENDS,
        ),
        Service(
            name="airflow-dag-processor",
            command=("airflow", "dag-processor"),
            health_shell='airflow jobs check --job-type DagProcessorJob --hostname "${HOSTNAME}"',
            depends_on=_AIRFLOW_DEPENDS,
        ),
        Service(
            name="airflow-triggerer",
            command=("airflow", "triggerer"),
            health_shell='airflow jobs check --job-type TriggererJob --hostname "${HOSTNAME}"',
            depends_on=_AIRFLOW_DEPENDS,
            native=False,  # the pipeline defers nothing; the stack test saves the CPU
        ),
        Service(
            name="airflow-worker",
            command=("airflow", "celery", "worker"),
            health_shell=(
                "celery --app airflow.providers.celery.executors.celery_executor.app"
                ' inspect ping -d "celery@${HOSTNAME}"'
            ),
            depends_on={**_AIRFLOW_DEPENDS, "airflow-apiserver": _HEALTHY, "mlflow": _HEALTHY, "s3-init": _DONE},
        ),
        Service(
            name="mlflow",
            command=(
                "mlflow",
                "server",
                "--app-name",
                "basic-auth",
                "--host",
                "{host}",
                "--port",
                "{port}",
                "--workers",
                "{workers}",
                "--serve-artifacts",
                "--artifacts-destination",
                "{artifacts}",
            ),
            port=5000,
            health_path="/health",
            depends_on={"postgres": _HEALTHY, "s3-init": _DONE},
            # The image's entrypoint, behind the launcher that puts the S3 connection's keys in its environment.
            native_prefix=("python", "-m", "ml.object_store", "sh", "{source}/mlflow/entrypoint.sh"),
        ),
        Service(
            name="serving",
            # `python -m ml.serving`, the model server's own entry point (`mlops serve` wraps it).
            command=("python", "-m", "ml.serving", "--host", "{host}", "--port", "{port}"),
            port=5001,
            health_path="/ping",
            depends_on={"mlflow": _HEALTHY},
        ),
        Service(
            # MLflow lets only admins create webhooks and the model server reads as a read-only user: this step
            # subscribes it to the registry's alias events with the admin's credentials, then exits.
            name="serving-subscribe",
            command=("python", "-m", "ml.serving.subscribe"),
            depends_on={"mlflow": _HEALTHY},
            one_shot=True,
        ),
    )
}


@dataclass(frozen=True)
class StackValues:
    """The values the services' environment is built from; natively filled by the stack test."""

    sql_alchemy_conn: str  # postgresql+psycopg://...
    broker_url: str  # redis://.../<db>
    result_backend: str  # db+postgresql://...
    dags_folder: str
    execution_api_url: str  # http://<api server>/execution/
    jwt_secret: str
    api_secret_key: str
    fernet_key: str
    admin_username: str
    admin_password: str
    passwords_file: str
    scheduler_health_port: str
    worker_log_server_port: str
    default_queue: str
    mlflow_tracking_uri: str
    mlflow_username: str
    mlflow_password: str
    mlflow_reader_username: str  # the model server's read-only MLflow user, created by mlflow/entrypoint.sh
    mlflow_reader_password: str
    mlflow_backend_store_uri: str
    mlflow_auth_database_uri: str
    mlflow_auth_config_path: str
    mlflow_flask_secret_key: str
    mlflow_allowed_hosts: str
    data_store: str  # s3://<bucket>/datastore
    s3_endpoint_url: str  # the S3 server every worker and the MLflow server reach
    s3_access_key_id: str
    s3_secret_access_key: str
    s3_conn_id: str  # empty: the keys above; else the Airflow connection whose keys the tasks and model server use
    airflow_api_url: str  # empty: the model server announces no windows (mlops_monitor's hourly run judges them)
    airflow_api_username: str
    airflow_api_password: str
    model_name: str
    serving_token: str
    serving_webhook_url: str  # where the MLflow server reaches the model server's /webhooks/mlflow
    serving_webhook_secret: str  # what MLflow signs its deliveries with


def _airflow_env(v: StackValues) -> dict[str, str]:
    return {
        **FIXED_ENV,
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": v.sql_alchemy_conn,
        "AIRFLOW__CELERY__BROKER_URL": v.broker_url,
        "AIRFLOW__CELERY__RESULT_BACKEND": v.result_backend,
        "AIRFLOW__CORE__DAGS_FOLDER": v.dags_folder,
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": v.execution_api_url,
        "AIRFLOW__CORE__FERNET_KEY": v.fernet_key,
        "AIRFLOW__API_AUTH__JWT_SECRET": v.jwt_secret,
        "AIRFLOW__API__SECRET_KEY": v.api_secret_key,
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{v.admin_username}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": v.passwords_file,
        "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT": v.scheduler_health_port,
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": v.worker_log_server_port,
        "AIRFLOW__OPERATORS__DEFAULT_QUEUE": v.default_queue,
        # What the pipeline's tasks read (ml/settings.py); the MLflow client reads the credentials itself.
        "MLFLOW_TRACKING_URI": v.mlflow_tracking_uri,
        "MLFLOW_TRACKING_USERNAME": v.mlflow_username,
        "MLFLOW_TRACKING_PASSWORD": v.mlflow_password,
        "MLOPS_DATA_STORE": v.data_store,
        "MLOPS_MODEL_NAME": v.model_name,
        **_s3_env(v, "AWS_ENDPOINT_URL"),
        "MLOPS_S3_CONN_ID": v.s3_conn_id,
    }


def _s3_env(v: StackValues, endpoint_variable: str) -> dict[str, str]:
    """What reaches the S3 bucket: the keys, and the endpoint under the name its reader looks for (boto3 and s3fs
    read AWS_ENDPOINT_URL, MLflow's S3 artifact store MLFLOW_S3_ENDPOINT_URL)."""
    return {
        endpoint_variable: v.s3_endpoint_url,
        "AWS_ACCESS_KEY_ID": v.s3_access_key_id,
        "AWS_SECRET_ACCESS_KEY": v.s3_secret_access_key,
    }


def _model_registry_env(v: StackValues, username: str, password: str) -> dict[str, str]:
    """The model's registry, as the given MLflow user sees it."""
    return {
        "MLFLOW_TRACKING_URI": v.mlflow_tracking_uri,
        "MLFLOW_TRACKING_USERNAME": username,
        "MLFLOW_TRACKING_PASSWORD": password,
        "MLOPS_MODEL_NAME": v.model_name,
    }


def service_env(name: str, v: StackValues) -> dict[str, str]:
    """The environment variables a service needs, natively and in compose (see ``NATIVE_ONLY_ENV`` for the rest)."""
    if name == "airflow-init":
        return {
            **_airflow_env(v),
            "AIRFLOW_ADMIN_USERNAME": v.admin_username,
            "AIRFLOW_ADMIN_PASSWORD": v.admin_password,
        }
    if name in AIRFLOW_SERVICES:
        return _airflow_env(v)
    if name == "mlflow":
        return {
            "MLFLOW_BACKEND_STORE_URI": v.mlflow_backend_store_uri,
            "MLFLOW_AUTH_DATABASE_URI": v.mlflow_auth_database_uri,
            "MLFLOW_AUTH_CONFIG_PATH": v.mlflow_auth_config_path,
            "MLFLOW_AUTH_ADMIN_USERNAME": v.mlflow_username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": v.mlflow_password,
            "MLFLOW_AUTH_READER_USERNAME": v.mlflow_reader_username,
            "MLFLOW_AUTH_READER_PASSWORD": v.mlflow_reader_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": v.mlflow_flask_secret_key,
            "MLFLOW_SERVER_ALLOWED_HOSTS": v.mlflow_allowed_hosts,
            **MLFLOW_WEBHOOK_ENV,
            **MLFLOW_NO_JOB_RUNNER,
            **_s3_env(v, "MLFLOW_S3_ENDPOINT_URL"),
        }
    if name == "serving":
        return {
            **_model_registry_env(v, v.mlflow_reader_username, v.mlflow_reader_password),
            "MLOPS_SERVING_TOKEN": v.serving_token,
            # Where it records what it serves and the labels it is sent (docs/recording.md): the bucket, as the tasks.
            "MLOPS_DATA_STORE": v.data_store,
            **_s3_env(v, "AWS_ENDPOINT_URL"),
            "MLOPS_S3_CONN_ID": v.s3_conn_id,
            "MLOPS_AIRFLOW_API_URL": v.airflow_api_url,
            "MLOPS_AIRFLOW_API_USERNAME": v.airflow_api_username,
            "MLOPS_AIRFLOW_API_PASSWORD": v.airflow_api_password,
            # The secret alone: the model server checks deliveries with it; serving-subscribe registers the webhook.
            "MLOPS_SERVING_WEBHOOK_SECRET": v.serving_webhook_secret,
        }
    if name == "serving-subscribe":
        return {
            **_model_registry_env(v, v.mlflow_username, v.mlflow_password),
            "MLOPS_SERVING_WEBHOOK_URL": v.serving_webhook_url,
            "MLOPS_SERVING_WEBHOOK_SECRET": v.serving_webhook_secret,
        }
    raise KeyError(f"unknown service {name!r}")


def keys_as_a_connection(env: Mapping[str, str], v: StackValues) -> dict[str, str]:
    """A service's environment with the S3 keys as the Airflow connection ``NATIVE_S3_CONNECTION`` instead, as
    Airflow reads one from the environment: what the native stack passes to every S3_CONNECTION_READERS service."""
    connection = {
        "conn_type": "aws",
        "login": v.s3_access_key_id,
        "password": v.s3_secret_access_key,
        "extra": {"endpoint_url": v.s3_endpoint_url},
    }
    kept = {key: value for key, value in env.items() if key not in S3_KEY_ENV}
    return {
        **kept,
        f"AIRFLOW_CONN_{NATIVE_S3_CONNECTION.upper()}": json.dumps(connection),
        "MLOPS_S3_CONN_ID": NATIVE_S3_CONNECTION,
    }


def placeholder_values() -> StackValues:
    """Values whose only use is to list the keys (the compose test)."""
    return StackValues(**{f.name: f"<{f.name}>" for f in fields(StackValues)})


# --- running services as native processes -------------------------------------------------------------------------


@dataclass
class Process:
    name: str
    argv: list[str]
    log: Path
    popen: subprocess.Popen

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError as error:
            return f"(no log: {error})"
        return "\n".join(text[-lines:])

    def stop(self, grace: float = 20) -> None:
        """Stop the whole process group (api-server workers, celery children, task runners)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError):  # children that outlived the leader
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)


def base_env(bin_dir: Path) -> dict[str, str]:
    env = {key: os.environ[key] for key in ("HOME", "LANG") if key in os.environ}
    env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    return env


def start(name: str, argv: list[str], env: Mapping[str, str], log_dir: Path, cwd: Path | None = None) -> Process:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    with log.open("ab") as handle:
        handle.write(f"$ {shlex.join(argv)}\n".encode())
        handle.flush()
        popen = subprocess.Popen(
            argv,
            env=dict(env),
            cwd=cwd,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Process(name, argv, log, popen)


def wait_until(check, timeout: float, what: str, processes: list[Process] = (), interval: float = 0.5):
    """Poll ``check()`` until it returns a truthy value; fail early if a watched process exits."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        for process in processes:
            if process.popen.poll() is not None:
                raise RuntimeError(f"{process.name} exited with {process.popen.returncode} while waiting for {what}")
        try:
            result = check()
            if result:
                return result
        except Exception as error:
            last_error = error
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error!r})")
