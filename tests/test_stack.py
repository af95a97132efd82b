"""The production stack, proven natively: the services of docker-compose.yaml run as processes on this machine.

PostgreSQL (127.0.0.1:5432, trust auth, user postgres) and Redis (127.0.0.1:6379) must be running; the test is
skipped, loudly, only when one of them is absent. It creates fresh databases (Airflow, MLflow, MLflow's users),
starts the MLflow server with basic-auth through the image's own entrypoint script, runs airflow-init's script, then
starts Airflow's api-server, scheduler, dag-processor and two Celery workers, each in its own process group with its
own AIRFLOW_HOME and the environment of ``tests/stack.py`` (which ``tests/test_compose.py`` compares with compose);
``tests/native_stack.py`` does the starting, as it does for bench/stack_bench.py.
The data store and MLflow's artifacts are in a bucket of the session's S3 server (tests/s3.py), and the two workers
share no folder, as on two hosts: each has its own working folder, HOME, TMPDIR and DAGs folder. It triggers
``mlops_pipeline`` through the REST API, checks through MLflow's REST API that Production moved to version 1, and
shows which worker ran which task (both did; each task's log is in its worker's folder alone), then triggers a run
that must fail validation, kills the worker running its train_model and checks that the retry ran on the other worker
and that Production stayed, with one version for the run. It also measures the issue's benchmark:
trigger-to-Production time of mlops_pipeline against trigger-to-success of a stub DAG with seven empty tasks
(bench/dags/stub_pipeline.py), on the same stack. Last, it subscribes the model server to the registry's webhooks as
compose does (serving-subscribe), moves Production under a small load and times the first answer from the new
version: told by the webhook, against a twin server that polls at the default interval.

Run it:  .venv/bin/pytest -m stack -s tests/test_stack.py
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import stack
from airflow_api import Airflow
from conftest import PROMOTED_RUN_STATES, free_port
from native_stack import (
    MODEL_NAME,
    RUN_TIMEOUT,
    WORKERS,
    Mlflow,
    NativeStack,
    bring_up,
    missing_services,
    native_stack,
    task_timeline,
)
from stack import Process

from ml import records
from ml.serving.app import DEFAULT_POLL_INTERVAL

pytestmark = [pytest.mark.stack, pytest.mark.slow]

LOAD_PAUSE = 0.02  # between one server's predictions: at most 50 a second each, fewer on two shared cores


@pytest.fixture(scope="module")
def services_available() -> None:
    missing = missing_services()
    if missing:
        message = f"STACK TEST SKIPPED: {' and '.join(missing)} not reachable; start them to prove the stack"
        print(f"\n{'!' * len(message)}\n{message}\n{'!' * len(message)}")
        pytest.skip(message)


def test_pipeline_runs_on_the_native_stack(services_available, s3_server, tmp_path: Path) -> None:
    import httpx

    began = time.monotonic()
    figures: dict[str, float] = {}
    with native_stack(tmp_path, s3_server) as s:
        running = bring_up(s, dag_ids=("mlops_pipeline", "stub_pipeline"))
        airflow, mlflow, watched = running.airflow, running.mlflow, running.watched

        # Authentication is enforced; the pipeline's credentials work.
        search = f"{s.mlflow_url}/api/2.0/mlflow/registered-models/search"
        assert httpx.get(search, timeout=10).status_code == 401
        assert httpx.get(search, auth=(s.mlflow_user[0], "wrong"), timeout=10).status_code == 401
        assert httpx.get(search, auth=s.mlflow_user, timeout=10).status_code == 200
        assert httpx.get(f"{s.api_url}/api/v2/dags", timeout=10).status_code == 401, "REST API must need a token"
        # compose's health checks, run natively against the live processes.
        s.health_shell("airflow-dag-processor", hostname=socket.gethostname())
        s.health_shell("airflow-worker", hostname=socket.gethostname())

        # Benchmark baseline: seven empty tasks, trigger to success.
        t0 = time.monotonic()
        stub_run = airflow.trigger("stub_pipeline")
        assert airflow.wait_for_run("stub_pipeline", stub_run, watched) == "success"
        figures["stub_1"] = time.monotonic() - t0

        # The pipeline: trigger to Production moving to version 1.
        assert mlflow.production_version(MODEL_NAME) is None
        t0 = time.monotonic()
        run_id = airflow.trigger("mlops_pipeline")
        moved = stack.wait_until(
            lambda: (
                mlflow.production_version(MODEL_NAME)
                or (airflow.run_state("mlops_pipeline", run_id) == "failed" and -1)
            ),
            RUN_TIMEOUT,
            "Production to move",
            watched,
            interval=0.25,
        )
        figures["pipeline"] = time.monotonic() - t0
        state = airflow.wait_for_run("mlops_pipeline", run_id, watched)
        figures["pipeline_run"] = time.monotonic() - t0
        tis = airflow.task_instances("mlops_pipeline", run_id)
        assert state == "success", {task: ti["state"] for task, ti in tis.items()}
        assert moved == 1
        # rollback_model ran on the worker too, found the deployment healthy and ended skipped.
        assert {task: ti["state"] for task, ti in tis.items()} == PROMOTED_RUN_STATES
        # Every task went through Redis to a Celery worker: the stack's own queue, which only its workers read; the
        # worker that ran a task logged executing it, and its task log is in that worker's folder alone.
        ran_on = _workers_of(s, "mlops_pipeline", run_id, tis)
        print(f"\ntasks by worker (queue {s.values.default_queue}): {ran_on}")
        assert set(ran_on.values()) == set(WORKERS), f"the run's tasks did not use both workers: {ran_on}"
        tags = mlflow.version_tags(MODEL_NAME, 1)
        assert tags["mlops.validation.status"] == "passed"
        assert tags["mlops.deployment.airflow_run_id"] == run_id
        # Artifacts went through the server's proxy into its artifacts destination in the bucket, not onto the
        # worker's disk; the snapshot and the split are in the bucket too.
        stored = s3_server.filesystem(s3_server.admin).find(s.bucket)
        assert [p for p in stored if p.startswith(f"{s.bucket}/artifacts/") and p.endswith("/MLmodel")], stored
        for home in (s.root / "homes").iterdir():
            assert not (home / "mlruns").exists() and not (home / "mlartifacts").exists(), home
        assert [p for p in stored if p.startswith(f"{s.bucket}/datastore/snapshots/")], stored

        # A run that fails validation: Production stays on version 1, the new version is tagged failed.
        # Same data as the first run: force_retrain, or the run ends early with "no new data". The worker running its
        # train_model is killed (SIGKILL, its task processes with it): the scheduler finds the task's heartbeat gone,
        # and the retry runs on the other worker and registers the run's one version; nothing is lost.
        failing = airflow.trigger("mlops_pipeline", {"accuracy_threshold": 1.0, "force_retrain": True})
        victim = _kill_the_worker_running(s, airflow, "mlops_pipeline", failing, "train_model", watched)
        watched = [process for process in watched if process.name != victim]
        airflow.wait_for_run("mlops_pipeline", failing, watched)
        failing_tis = airflow.task_instances("mlops_pipeline", failing)
        states = {task: ti["state"] for task, ti in failing_tis.items()}
        assert mlflow.production_version(MODEL_NAME) == 1, states
        assert mlflow.version_tags(MODEL_NAME, 2)["mlops.validation.status"] == "failed", states
        assert mlflow.http.get("/model-versions/get", params={"name": MODEL_NAME, "version": "3"}).status_code == 404
        assert states["train_model"] == "success" and states["validate_model"] == "skipped", states
        assert states["archive_model"] == states["rollback_model"] == "skipped", states
        train = failing_tis["train_model"]
        (survivor,) = (name for name in WORKERS if name != victim)
        assert train["try_number"] == 2
        assert train["id"] in s.processes[survivor].log.read_text(errors="replace")
        retried = s.root / "homes" / survivor / "logs" / "dag_id=mlops_pipeline" / f"run_id={failing}"
        assert (retried / "task_id=train_model" / "attempt=2.log").exists()
        print(f"train_model: try 1 on {victim}, killed; try 2 on {survivor}")

        # The baseline once more, on a warm stack.
        t0 = time.monotonic()
        stub_run = airflow.trigger("stub_pipeline")
        assert airflow.wait_for_run("stub_pipeline", stub_run, watched) == "success"
        figures["stub_2"] = time.monotonic() - t0
        timelines = {
            "mlops_pipeline": task_timeline(tis.values()),
            "stub_pipeline": task_timeline(airflow.all_task_instances("stub_pipeline", stub_run)),
        }

        serving = _check_serving(s, Mlflow(s.mlflow_url, *s.mlflow_user))
        # The model servers record what they answered in the bucket, with the keys of the S3 connection alone.
        recorded = records.records_uri(s.data_store).removeprefix("s3://")
        stack.wait_until(
            lambda: s3_server.filesystem(s3_server.admin).find(recorded),
            30,
            "the model servers' records in the bucket",
            interval=1,
        )

    # Every service that reads an Airflow connection had the S3 keys as one: no task log, nor any service's log,
    # shows the secret.
    secret = s3_server.service.secret_key.encode()
    logs = [path for path in tmp_path.rglob("*.log") if path.is_file()]
    assert any("task_id=train_model" in str(path) for path in logs), "the task logs are where they are looked for"
    for log in logs:
        assert secret not in log.read_bytes(), log

    baseline = min(figures["stub_1"], figures["stub_2"])
    total = time.monotonic() - began
    print(
        "\nstack benchmark (native Celery stack, REST trigger to Production moving):\n"
        f"  mlops_pipeline trigger -> Production v1: {figures['pipeline']:.1f} s "
        f"(run finished after {figures['pipeline_run']:.1f} s)\n"
        f"  stub_pipeline (7 empty tasks) trigger -> success: {figures['stub_1']:.1f} s, "
        f"then {figures['stub_2']:.1f} s\n"
        f"  ratio pipeline / stub: {figures['pipeline'] / baseline:.2f}x (baseline: the faster stub run)\n"
        f"  stack start-up {running.startup_seconds:.0f} s; whole test {total:.0f} s\n"
        f"  alias moved -> first answer from the new version, {serving['requests']:.0f} requests under load, "
        f"none failed: webhook {serving['webhook']:.2f} s, polling every {DEFAULT_POLL_INTERVAL:.0f} s (default) "
        f"{serving['polling']:.2f} s; serving checks took {serving['took']:.0f} s\n"
        "  per task, seconds from the previous task's end to this one's start, then running:\n"
        + "\n".join(f"    {dag_id:<15} {timeline}" for dag_id, timeline in timelines.items())
    )


def _kill_the_worker_running(
    s: NativeStack, airflow: Airflow, dag_id: str, run_id: str, task_id: str, watched: list[Process]
) -> str:
    """SIGKILL the worker (its whole process group) as soon as it runs the task; returns its name."""
    import os
    import signal

    def running_on() -> str | None:
        ti = airflow.task_instances(dag_id, run_id).get(task_id)
        if ti is None or ti["state"] != "running":
            return None
        return next((name for name in WORKERS if ti["id"] in s.processes[name].log.read_text(errors="replace")), None)

    victim = stack.wait_until(running_on, RUN_TIMEOUT, f"{task_id} to run", watched, interval=0.2)
    os.killpg(s.processes[victim].popen.pid, signal.SIGKILL)
    s.processes[victim].popen.wait(timeout=10)
    return victim


def _workers_of(s: NativeStack, dag_id: str, run_id: str, tis: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Which worker ran each task of a run: the one whose log records executing it (exactly one), whose folder holds
    the task's log file (a mapped task's under its map index; no other worker's does). Each worker imported the
    pipeline's libraries before it forked its tasks (ml/celery_worker.py, ml/preload.py)."""
    logs = {name: s.processes[name].log.read_text(errors="replace") for name in WORKERS}
    for name, text in logs.items():
        assert "preloaded" in text and "ml.preload" in text, name
    folders = [set(s.worker_folders(name).values()) for name in WORKERS]
    assert not set.intersection(*folders), "the workers share a folder"
    ran_on = {}
    for task_id, ti in tis.items():
        assert ti["queue"] == s.values.default_queue, (task_id, ti["queue"])
        workers = [name for name, text in logs.items() if ti["id"] in text]
        assert len(workers) == 1, f"{task_id} ({ti['id']}) is in the logs of {workers or 'no worker'}"
        ran_on[task_id] = workers[0]
        task_logs = {
            name: list(
                (s.root / "homes" / name / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}").glob(
                    f"task_id={task_id}/**/*.log"
                )
            )
            for name in WORKERS
        }
        assert [name for name, found in task_logs.items() if found] == workers, (task_id, task_logs)
    return ran_on


def _check_serving(s: NativeStack, mlflow: Mlflow) -> dict[str, float]:
    """Subscribe the model server to the registry's webhooks as compose does, start it and a polling-only twin, move
    Production under a small load and time each one's first answer from the new version."""
    import httpx
    from sklearn.datasets import load_breast_cancer

    began = time.monotonic()
    s.run_one_shot("serving-subscribe", timeout=120)
    subscribed = s.processes["serving-subscribe"].tail()
    assert "subscribed to the registry's alias events" in subscribed, subscribed
    assert s.values.mlflow_password not in subscribed and s.values.serving_webhook_secret not in subscribed
    rows = load_breast_cancer(as_frame=True).data.head(3)
    body = {"dataframe_split": {"columns": list(rows.columns), "data": rows.values.tolist()}}
    polling_port = free_port()
    told = Served(s.start("serving"), s.ports["serving"], s.values.serving_token, body)
    polled = Served(s.start_polling_server(polling_port), polling_port, s.values.serving_token, body)
    for server in (told, polled):
        stack.wait_until(
            lambda server=server: httpx.get(f"{server.url}/health", timeout=10).status_code == 200,
            120,
            f"{server.process.name} /health",
            [server.process],
        )
        assert server.answering_version() == "1"
    health = httpx.get(f"{told.url}/health", timeout=10)
    print(f"\nserving: /health {health.status_code} {health.text[:400]}")

    # Production moves to version 2 (the run that failed validation made it): both servers must follow it while
    # answering every request.
    loads = [Load(server, "2") for server in (told, polled)]
    for load in loads:
        load.start()
    time.sleep(1)
    moved_at = mlflow.set_alias(MODEL_NAME, "production", 2)
    for load in loads:
        load.join(timeout=30)
    for load in loads:
        assert not load.is_alive(), f"{load.server.process.name} did not answer from version 2 within 30 s"
        assert not load.failures, f"{load.server.process.name}: {load.failures[:3]}"
    assert "the registry says the 'production' alias moved; reading it now" in told.process.log.read_text()
    assert "reading it now" not in polled.process.log.read_text()
    webhook, polling = (load.first_new_answer_at - moved_at for load in loads)
    assert webhook < DEFAULT_POLL_INTERVAL, f"the webhook took {webhook:.2f} s, no faster than polling"
    return {
        "webhook": webhook,
        "polling": polling,
        "requests": sum(load.requests for load in loads),
        "took": time.monotonic() - began,
    }


@dataclasses.dataclass
class Served:
    process: Process
    port: int
    token: str
    body: dict[str, Any]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def predict(self):
        import httpx

        return httpx.post(
            f"{self.url}/invocations",
            json=self.body,
            headers={"authorization": f"Bearer {self.token}"},
            timeout=10,
        )

    def answering_version(self) -> str:
        return self.predict().headers["x-model-version"]


class Load(threading.Thread):
    """A steady trickle of predictions (one each LOAD_PAUSE) until the server answers from ``version``."""

    def __init__(self, server: Served, version: str) -> None:
        super().__init__(daemon=True)
        self.server, self.version = server, version
        self.requests = 0
        self.failures: list[str] = []
        self.first_new_answer_at = float("inf")

    def run(self) -> None:
        while True:
            try:
                answer = self.server.predict()
            except Exception as error:
                self.failures.append(repr(error))
            else:
                if answer.status_code != 200:
                    self.failures.append(f"{answer.status_code} {answer.text[:200]}")
                elif answer.headers["x-model-version"] == self.version:
                    self.first_new_answer_at = time.monotonic()
                    return
            finally:
                self.requests += 1
            time.sleep(LOAD_PAUSE)
