"""docker-compose.yaml says what the native stack test runs: same services, commands, ports, health checks,
dependencies and environment (tests/stack.py is the one description both read). Fast: no Docker, no processes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import stack
import yaml
from stack import COMPOSE_ONLY_ENV, FIXED_ENV, NATIVE_ONLY_ENV, SERVICES, compose_placement, service_env

REPO = stack.REPO
INFRASTRUCTURE = {"postgres", "redis", "s3"}
# Started natively by the stack test too (tests/s3.py makes its bucket): compose's one-shot step that creates it.
ONE_SHOT_INFRASTRUCTURE = {"s3-init"}
SECRET_KEY = re.compile(r"PASSWORD|SECRET|FERNET|TOKEN")
VARIABLE = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yaml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def _health_test(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    return [test] if isinstance(test, str) else list(test)


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> volume name (or host path) of a service's volumes."""
    found = {}
    for volume in service.get("volumes") or []:
        source, target = volume.split(":")[:2]
        found[target] = source
    return found


def test_compose_has_exactly_the_described_services(services):
    assert set(services) == set(SERVICES) | INFRASTRUCTURE | ONE_SHOT_INFRASTRUCTURE


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_command_matches_the_stack_test(services, name):
    spec = SERVICES[name]
    assert services[name]["command"] == spec.argv(compose_placement(spec), native=False)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_ports_match(services, name):
    spec = SERVICES[name]
    published = [str(port) for port in services[name].get("ports") or []]
    if spec.port is None:
        assert not published, f"{name} publishes {published} but the stack test gives it no port"
    else:
        assert [port.rsplit(":", 1)[-1] for port in published] == [str(spec.port)]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_health_check_is_the_one_the_stack_test_waits_on(services, name):
    spec, service = SERVICES[name], services[name]
    if spec.one_shot:
        assert "healthcheck" not in service and "restart" not in service
        return
    assert service.get("restart") == "always"
    test = _health_test(service)
    if spec.health_path:
        port = spec.health_port or spec.port
        assert any(f"http://localhost:{port}{spec.health_path}" in part for part in test), test
    else:
        # compose escapes $ as $$; the container's shell then sees the command the stack test runs.
        assert test[0] == "CMD-SHELL"
        assert test[1].replace("$$", "$") == spec.health_shell


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_depends_on_conditions(services, name):
    depends_on = services[name].get("depends_on") or {}
    assert {key: value["condition"] for key, value in depends_on.items()} == dict(SERVICES[name].depends_on)


def test_infrastructure_has_health_checks(services):
    for name in INFRASTRUCTURE:
        assert services[name]["healthcheck"]["test"], name


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_environment_keys_match(services, name):
    expected = set(service_env(name, stack.placeholder_values()))
    actual = set(_env(services[name]))
    assert not (actual - set(COMPOSE_ONLY_ENV)) ^ expected, {
        "missing in compose": sorted(expected - actual),
        "only in compose (declare in COMPOSE_ONLY_ENV or tests/stack.py)": sorted(
            actual - expected - set(COMPOSE_ONLY_ENV)
        ),
    }
    for key, value in FIXED_ENV.items():
        if key in expected:
            assert _env(services[name])[key] == value, key


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_native_environment_is_compose_plus_declared_extras(tmp_path, name):
    """What the stack test really passes to each process: compose's keys plus NATIVE_ONLY_ENV, same URL schemes."""
    from native_stack import NativeStack

    native = NativeStack(tmp_path).env(name)
    expected = set(service_env(name, stack.placeholder_values()))
    if name in stack.S3_CONNECTION_READERS:
        # Natively the S3 keys are an Airflow connection, never the environment's keys.
        assert not set(stack.S3_KEY_ENV) & set(native), name
        assert json.loads(native[f"AIRFLOW_CONN_{stack.NATIVE_S3_CONNECTION.upper()}"])["conn_type"] == "aws"
        assert native["MLOPS_S3_CONN_ID"] == stack.NATIVE_S3_CONNECTION
        native = {key: value for key, value in native.items() if key not in stack.NATIVE_S3_CONNECTION_ENV}
        expected -= {*stack.S3_KEY_ENV, *stack.NATIVE_S3_CONNECTION_ENV}
    assert set(native) - set(NATIVE_ONLY_ENV) == expected


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_url_schemes_match_the_native_stack(services, tmp_path, name):
    from native_stack import NativeStack

    native = NativeStack(tmp_path).env(name)
    for key, value in _env(services[name]).items():
        value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)  # a variable with a default: as compose reads it unset
        if "://" in value and key in native:
            assert value.split("://")[0] == native[key].split("://")[0], key


def test_airflow_services_share_urls_volumes_and_data_store(services):
    api, mlflow = SERVICES["airflow-apiserver"], SERVICES["mlflow"]
    for name in stack.AIRFLOW_SERVICES:
        env, mounts = _env(services[name]), _mounts(services[name])
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == f"http://airflow-apiserver:{api.port}/execution/"
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg://")
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow")
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://")
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:6379/")
        assert env["AIRFLOW__CORE__DAGS_FOLDER"] == stack.CONTAINER_DAGS
        assert env["AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_SERVER_PORT"] == str(
            SERVICES["airflow-scheduler"].health_port
        )
        assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{mlflow.port}"
        # The snapshots' store: the bucket, in every Airflow container; no volume of data.
        assert env["MLOPS_DATA_STORE"] == stack.COMPOSE_DATA_STORE
        assert stack.CONTAINER_DATA_STORE not in mounts, f"{name} mounts a data store volume"
        assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] == stack.CONTAINER_PASSWORDS_FILE
    passwords_dir = str(Path(stack.CONTAINER_PASSWORDS_FILE).parent)
    writer, reader = _mounts(services["airflow-init"]), _mounts(services["airflow-apiserver"])
    assert writer[passwords_dir] == reader[passwords_dir]
    assert _env(services["serving"])["MLFLOW_TRACKING_URI"] == f"http://mlflow:{mlflow.port}"


def test_mlflow_server_configuration(services):
    env, mounts = _env(services["mlflow"]), _mounts(services["mlflow"])
    for key in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI"):
        # psycopg2: MLflow 3.17's registry breaks promotions on PostgreSQL with psycopg 3 (mlflow/mlflow#24592).
        assert env[key].startswith("postgresql+psycopg2://") and "@postgres:5432/" in env[key], key
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == stack.CONTAINER_AUTH_CONFIG
    assert not mounts, "the MLflow server keeps its artifacts in the bucket, in no volume"
    assert "mlflow:5000" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    # Every variable the basic-auth template needs without a default is set.
    template = (REPO / "mlflow" / "basic_auth.ini").read_text()
    lines = [line for line in template.splitlines() if not line.lstrip().startswith("#")]
    needed = set(re.findall(r"\$\{(\w+)\}", "\n".join(lines)))
    assert needed and needed <= set(env)
    postgres_init = (REPO / "docker" / "postgres-init.sql").read_text()
    for database in {
        uri.rsplit("/", 1)[-1] for uri in (env["MLFLOW_BACKEND_STORE_URI"], env["MLFLOW_AUTH_DATABASE_URI"])
    }:
        assert f"CREATE DATABASE {database};" in postgres_init


def test_no_secrets_in_the_compose_file(services):
    for name, service in services.items():
        for key, value in _env(service).items():
            if SECRET_KEY.search(key) and not key.endswith(("_FILE", "_PATH")):
                # Required (${VAR:?...}), or optional and empty unless .env sets it (${VAR:-}): never a literal.
                assert re.fullmatch(r"\$\{\w+(:\?[^}]+|:-)\}", value), f"{name}.{key} must come from .env"
            if "@" in value and "://" in value:
                # user:password@host, the password from .env and nothing literal besides the variables
                assert re.search(r":\$\{\w+:\?[^}]+\}@", value), f"{name}.{key}: the password must be ${{VAR:?...}}"
                literal = re.sub(r"\$\{[^}]*\}", "", value)
                assert re.search(r"://:@", literal), f"{name}.{key} has a literal user or password"


def test_env_example_lists_every_variable(compose):
    lines = (REPO / "docker-compose.yaml").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    used = set(VARIABLE.findall(text)) - {"HOSTNAME"}
    example = {
        line.split("=", 1)[0]
        for line in (REPO / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used <= example, sorted(used - example)
    required = set(re.findall(r"\$\{(\w+):\?", text))
    for line in (REPO / ".env.example").read_text().splitlines():
        if line.split("=", 1)[0] in required:
            assert line.endswith("="), f"{line.split('=')[0]} is a secret: leave it empty in .env.example"
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()


def test_images_install_the_lock_and_place_files_where_compose_expects_them():
    lock = (REPO / "requirements.lock").read_text()
    airflow_version = re.search(r"^apache-airflow==(\S+)$", lock, re.M).group(1)
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^FROM apache/airflow:{re.escape(airflow_version)}-python3\.11$", dockerfile, re.M)
    assert "-r /opt/mlops/src/requirements.lock" in dockerfile
    assert "--no-deps /opt/mlops/src" in dockerfile
    assert f"docker {stack.CONTAINER_SOURCE}/docker" in dockerfile
    assert f"dags {stack.CONTAINER_DAGS}" in dockerfile
    assert stack.CONTAINER_DATA_STORE in dockerfile and str(Path(stack.CONTAINER_PASSWORDS_FILE).parent) in dockerfile
    assert (REPO / "docker" / "airflow-init.sh").exists()

    mlflow_dockerfile = (REPO / "mlflow" / "Dockerfile").read_text()
    assert "--constraint /tmp/requirements.lock" in mlflow_dockerfile
    assert '"mlflow[auth]"' in mlflow_dockerfile and "psycopg2-binary" in mlflow_dockerfile
    assert "COPY mlflow/entrypoint.sh mlflow/basic_auth.ini /opt/mlflow/" in mlflow_dockerfile
    assert 'ENTRYPOINT ["/opt/mlflow/entrypoint.sh"]' in mlflow_dockerfile
    # The native run adds what the image's ENTRYPOINT adds, behind the launcher that reads the S3 connection.
    assert SERVICES["mlflow"].native_prefix == (
        "python",
        "-m",
        "ml.object_store",
        "sh",
        "{source}/mlflow/entrypoint.sh",
    )
    assert not (REPO / "mlflow" / "__init__.py").exists()

    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert ".venv" in ignored and ".env" in ignored


def test_registry_webhooks_reach_the_model_server_with_one_secret_and_an_admin_subscribes(services):
    """MLflow delivers alias events to the model server; only serving-subscribe holds the admin's credentials."""
    mlflow, serving, subscribe = (_env(services[name]) for name in ("mlflow", "serving", "serving-subscribe"))
    for key, value in stack.MLFLOW_WEBHOOK_ENV.items():
        assert mlflow[key] == value, key
    serving_port = SERVICES["serving"].port
    assert subscribe["MLOPS_SERVING_WEBHOOK_URL"] == f"http://serving:{serving_port}/webhooks/mlflow"
    assert subscribe["MLOPS_SERVING_WEBHOOK_URL"].split("://")[0] in mlflow["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"]
    assert subscribe["MLOPS_SERVING_WEBHOOK_SECRET"] == serving["MLOPS_SERVING_WEBHOOK_SECRET"]
    assert subscribe["MLFLOW_TRACKING_USERNAME"] == mlflow["MLFLOW_AUTH_ADMIN_USERNAME"]
    assert subscribe["MLFLOW_TRACKING_PASSWORD"] == mlflow["MLFLOW_AUTH_ADMIN_PASSWORD"]
    # The model server keeps its read-only login and never tries to subscribe itself.
    assert serving["MLFLOW_TRACKING_USERNAME"] == mlflow["MLFLOW_AUTH_READER_USERNAME"]
    assert "MLOPS_SERVING_WEBHOOK_URL" not in serving
    assert subscribe["MLFLOW_TRACKING_URI"] == serving["MLFLOW_TRACKING_URI"]
    assert services["serving-subscribe"]["image"] == services["serving"]["image"]


def test_snapshots_and_artifacts_share_the_bucket_and_workers_share_no_volume(services, compose):
    """The S3 service and its bucket are the one storage the workers share: the data store and MLflow's artifacts
    are in the bucket that s3-init creates, reached with one endpoint and one pair of keys from .env."""
    s3, init = services["s3"], services["s3-init"]
    assert s3["image"].startswith("chrislusf/seaweedfs:") and init["image"] == s3["image"]
    assert "-s3" in s3["command"] and "-s3.port=8333" in s3["command"]
    assert stack.COMPOSE_S3_ENDPOINT.endswith(":8333")
    assert any("8333/healthz" in part for part in _health_test(s3)) and s3.get("restart") == "always"
    assert "healthcheck" not in init and "restart" not in init
    assert init["depends_on"] == {"s3": {"condition": "service_healthy"}}
    assert "s3.bucket.create -name $$S3_BUCKET" in init["command"][0]
    assert _env(init)["S3_BUCKET"] == stack.COMPOSE_BUCKET
    keys = {name: _env(s3)[name] for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    assert all(re.fullmatch(r"\$\{\w+:\?[^}]+\}", value) for value in keys.values()), keys

    worker, mlflow = _env(services["airflow-worker"]), _env(services["mlflow"])
    assert worker["MLOPS_DATA_STORE"] == stack.COMPOSE_DATA_STORE == f"s3://{stack.COMPOSE_BUCKET}/datastore"
    command = services["mlflow"]["command"]
    assert command[command.index("--artifacts-destination") + 1] == stack.COMPOSE_ARTIFACTS
    assert "--serve-artifacts" in command
    endpoint = f"${{S3_ENDPOINT_URL:-{stack.COMPOSE_S3_ENDPOINT}}}"
    assert worker["AWS_ENDPOINT_URL"] == mlflow["MLFLOW_S3_ENDPOINT_URL"] == endpoint
    serving = _env(services["serving"])
    for env in (worker, mlflow, serving):
        assert {name: env[name] for name in keys} == keys
    # The model server loads models through the MLflow server; it writes its records of requests and labels into the
    # same data store as the tasks, where the monitor reads them.
    assert serving["MLOPS_DATA_STORE"] == worker["MLOPS_DATA_STORE"]
    assert serving["AWS_ENDPOINT_URL"] == endpoint

    # An Airflow connection may hold the keys instead (MLOPS_S3_CONN_ID, optional): for the tasks and the model
    # server, which read one through Airflow; not for the MLflow server, whose image carries no Airflow.
    for env in (worker, serving):
        assert env["MLOPS_S3_CONN_ID"] == "${MLOPS_S3_CONN_ID:-}"
    assert "MLOPS_S3_CONN_ID" not in mlflow
    # The model server announces completed windows to Airflow's API only where .env names it and a user.
    for name in ("MLOPS_AIRFLOW_API_URL", "MLOPS_AIRFLOW_API_USERNAME", "MLOPS_AIRFLOW_API_PASSWORD"):
        assert serving[name] == f"${{{name}:-}}"

    for name in ("airflow-worker", "mlflow"):
        assert services[name]["depends_on"]["s3-init"] == {"condition": "service_completed_successfully"}
    # Task logs are the only volume a worker mounts (the UI reads them; each worker's log server serves them too).
    assert set(_mounts(services["airflow-worker"]).values()) == {"airflow-logs"}
    assert set(compose["volumes"]) == {"postgres-db-volume", "s3-data", "airflow-logs", "airflow-auth"}
    assert "boto3" in (REPO / "mlflow" / "Dockerfile").read_text()
