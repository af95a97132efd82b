"""Reliability: bad configuration, a tracking server that goes away, killed workers, overlapping moves of
Production and the manual rollback path. Every scenario ends by checking the registry, never just a return code."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import fault_hooks
import pytest
from conftest import PIPELINE_TASKS, MlflowServer, production_markers, task_note, use_fresh_home, version_count

from ml import registry, steps, tags
from ml.airflow_runner import run_dag
from ml.context import RunContext
from ml.results import TransformResult
from ml.settings import Settings

pytestmark = pytest.mark.slow


def assert_consistent(settings: Settings) -> int | None:
    aliased, staged = production_markers(settings)
    assert staged == ([aliased] if aliased is not None else []), (aliased, staged)
    history = registry.deployment_history(registry.client_for(settings), settings.model_name)
    if history:
        last = history[-1]
        expected = last.previous_version if last.event == "rolled_back" else last.version
        assert expected == aliased, history
    return aliased


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MLOPS_MODEL_FAMILY", "deep_forest", "model_family 'deep_forest' is unknown"),
        ("MLOPS_ACCURACY_THRESHOLD", "1.5", "accuracy_threshold 1.5 is outside [0, 1]"),
        ("MLFLOW_TRACKING_URI", "mlflow-tracking://nowhere", "unsupported scheme 'mlflow-tracking'"),
        ("MLOPS_DATA_SOURCE", "ftp://files.example/cases.xlsx", "is not recognised"),
        ("MLOPS_PRODUCTION_ALIAS", "latest", "production_alias 'latest' is reserved by MLflow"),
        ("MLOPS_PRODUCTION_ALIAS", "v1", "production_alias 'v1' is reserved by MLflow"),
        ("MLOPS_DATA_SOURCE", "~nosuchuser/cases.csv", "Could not determine home directory"),
        ("MLOPS_DATA_SOURCE", "http://[::1/cases.csv", "Invalid IPv6 URL"),
    ],
)
def test_bad_configuration_fails_at_the_first_task_without_retry(
    airflow_db, mlops_env, monkeypatch, capfd, variable, value, message
):
    monkeypatch.setenv(variable, value)
    run = run_dag()
    assert run.state == "failed"
    assert run.state_of("extract_data") == "failed"
    assert run.tasks["extract_data"].try_number == 1
    assert run.state_of("train_model") == "upstream_failed"
    assert message in capfd.readouterr().out
    assert version_count(mlops_env) == 0


@pytest.mark.slow
def test_a_misspelt_parameter_fails_the_first_task_and_leaves_rollback_skipped_with_a_note(airflow_db, mlops_env):
    assert run_dag().state == "success"
    run = run_dag(conf={"acuracy_threshold": 0.9})
    assert run.state == "failed"
    assert (run.state_of("extract_data"), run.tasks["extract_data"].try_number) == ("failed", 1)
    assert run.state_of("rollback_model") == "skipped", "nothing ran, so nothing is rolled back: no red safety net"
    assert run.result("rollback_model")["rollback_performed"] is False
    assert run.note.startswith("**refused**: unknown parameter 'acuracy_threshold' (did you mean"), run.note
    assert run.note.endswith("Production stays v1.")
    assert (production_markers(mlops_env), version_count(mlops_env)) == ((1, [1]), 1)


def test_bad_parameters_are_refused_before_a_run_starts(airflow_db, mlops_env):
    from airflow.sdk.exceptions import ParamValidationError

    with pytest.raises(ParamValidationError, match="model_family"):
        run_dag(conf={"model_family": "deep_forest"})
    with pytest.raises(ParamValidationError, match="accuracy_threshold"):
        run_dag(conf={"accuracy_threshold": 2})
    with pytest.raises(ParamValidationError, match="random_seed"):
        run_dag(conf={"random_seed": -1})


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"acuracy_threshold": 0.5}, "unknown parameter 'acuracy_threshold' (did you mean 'accuracy_threshold'?)"),
        ({"post_deploy_check": False}, "'post_deploy_check' cannot be set per run"),
        ({"step_hook": "fault_hooks:stop_mlflow_server"}, "'step_hook' cannot be set per run"),
        ({"tracking_uri": "sqlite:////tmp/elsewhere.db"}, "'tracking_uri' cannot be set per run"),
    ],
)
def test_a_run_cannot_set_what_it_does_not_declare(airflow_db, mlops_env, capfd, conf, message):
    run = run_dag(conf=conf)
    assert run.state == "failed"
    assert run.state_of("extract_data") == "failed"
    assert run.tasks["extract_data"].try_number == 1
    assert message in capfd.readouterr().out
    assert version_count(mlops_env) == 0


@pytest.mark.parametrize(
    ("conf", "failed_task", "message"),
    [
        (
            {"hyperparameters": {"C": -1}},
            "extract_data",
            "The 'C' parameter of LogisticRegression must be a float in the range (0.0, inf]. Got -1 instead.",
        ),
        (
            {"model_family": "random_forest", "hyperparameters": {"n_estimators": "many"}},
            "extract_data",
            "The 'n_estimators' parameter of RandomForestClassifier must be an int",
        ),
        ({"test_size": 0.999}, "transform_data", "test_size 0.999 leaves 0 of 569 rows for training"),
        ({"data_source": "INFINITE"}, "transform_data", "infinite values in feature columns: mean radius (2 rows)"),
    ],
)
def test_errors_a_check_can_catch_fail_before_training_without_retry(
    airflow_db, mlops_env, tmp_path, capfd, conf, failed_task, message
):
    if conf.get("data_source") == "INFINITE":
        from ml import data

        frame = data.load_source("sklearn:breast_cancer")
        frame.loc[[3, 7], "mean radius"] = [float("inf"), float("-inf")]
        frame.to_csv(tmp_path / "cases.csv", index=False)
        conf = {"data_source": str(tmp_path / "cases.csv")}
    run = run_dag(conf=conf)
    assert run.state == "failed"
    assert run.state_of(failed_task) == "failed"
    assert run.tasks[failed_task].try_number == 1
    assert run.state_of("train_model") == "upstream_failed"
    assert message in capfd.readouterr().out
    assert version_count(mlops_env) == 0


def _wrong_data_source(kind: str, tmp_path) -> dict[str, str]:
    """A data source that is wrong as configured, of the given kind, as a run's conf."""
    if kind == "label the bundled data set lacks":
        return {"data_source": "sklearn:breast_cancer", "label_column": "nosuch"}
    if kind == "missing file":
        return {"data_source": str(tmp_path / "nowhere" / "cases.csv")}
    if kind == "directory named like a file":
        (tmp_path / "cases.csv").mkdir()
        return {"data_source": str(tmp_path / "cases.csv")}
    database = tmp_path / "cases.db"
    if kind == "missing SQLite file":
        return {"data_source": f"sqlite:///{database}", "data_query": "cases"}
    sqlite3.connect(database).close()
    if kind == "missing table":
        return {"data_source": f"sqlite:///{database}", "data_query": "cases"}
    return {"data_source": f"sqlite:///{database}", "data_query": "SELECT nosuch FROM sqlite_master"}


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("label the bundled data set lacks", "label column 'nosuch' is not a column of the bundled data set"),
        ("missing file", "cases.csv does not exist"),
        ("directory named like a file", "cases.csv is a directory"),
        ("missing SQLite file", "cases.db does not exist"),
        ("missing table", "no such table: cases"),
        ("query refused as written", "no such column: nosuch"),
    ],
)
def test_a_data_source_wrong_as_configured_fails_without_retry(airflow_db, mlops_env, tmp_path, capfd, kind, message):
    run = run_dag(conf=_wrong_data_source(kind, tmp_path))
    assert run.state == "failed"
    assert run.state_of("extract_data") == "failed"
    assert run.tasks["extract_data"].try_number == 1, "a retry would fail the same way"
    assert message in capfd.readouterr().out
    assert version_count(mlops_env) == 0
    if kind == "missing SQLite file":
        assert not (tmp_path / "cases.db").exists(), "reading a source never writes one"


def test_a_data_source_that_does_not_answer_is_retried(airflow_db, mlops_env, capfd):
    # Nothing listens on port 1: the connection is refused, as by a database that is restarting.
    run = run_dag(conf={"data_source": "postgresql+psycopg://postgres@127.0.0.1:1/cases", "data_query": "cases"})
    assert run.state == "failed"
    assert run.tasks["extract_data"].try_number == 2, "retried once: the database may answer next time"
    assert "Connection refused" in capfd.readouterr().out
    assert version_count(mlops_env) == 0


def test_ingest_dag_on_the_bundled_source_fails_at_once(airflow_db, mlops_env, capfd):
    # Kept out of tests/test_data_aware.py, whose module-scoped loop expects the ingest DAG's asset to be its own.
    landed = run_dag("mlops_ingest")
    assert landed.state == "failed"
    assert landed.tasks["land_batch"].try_number == 1, "a target that cannot take batches is not retried"
    assert "is a bundled data set, which cannot take new batches" in capfd.readouterr().out


def test_a_task_that_runs_too_long_is_stopped(airflow_db, mlops_env, monkeypatch, tmp_path):
    monkeypatch.setenv("MLOPS_TASK_TIMEOUT_SECONDS", "15")
    monkeypatch.setenv("MLOPS_STEP_HOOK", "fault_hooks:hang_in_step")
    monkeypatch.setenv("MLOPS_TEST_HANG_AT", "train_model")
    started = time.monotonic()
    run = run_dag()
    assert time.monotonic() - started < 300, "the hanging task (600 s) was stopped, not waited for"
    assert run.state == "failed"
    assert run.state_of("train_model") == "failed"
    assert run.state_of("rollback_model") == "skipped", "it ran, and found nothing to roll back"
    assert version_count(mlops_env) == 0 and production_markers(mlops_env) == (None, [])


def _use_fragile_home(monkeypatch: pytest.MonkeyPatch, home: Path, server: MlflowServer) -> Settings:
    use_fresh_home(monkeypatch, home)
    monkeypatch.setenv("MLOPS_FORCE_RETRAIN", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    return Settings.from_env()


@pytest.fixture(scope="module")
def fragile_home(airflow_db, tmp_path_factory) -> Iterator[tuple[Path, MlflowServer]]:
    """A home on a real tracking server with version 1 in Production, shared by the steps' scenarios: each one ends
    with the server up and a run that promoted a version, and checks what it did against the Production it found."""
    home = tmp_path_factory.mktemp("fragile") / "mlops"
    server = MlflowServer(home.parent / "mlflow-server")
    server.start()
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            settings = _use_fragile_home(monkeypatch, home, server)
            assert run_dag().state == "success"
            assert production_markers(settings) == (1, [1])
        yield home, server
    finally:
        server.stop()


@pytest.fixture
def fragile_server(fragile_home, monkeypatch) -> tuple[Settings, MlflowServer]:
    """The shared home's settings and server (up again if an earlier scenario failed while it was stopped), and a step
    hook that can stop it."""
    home, server = fragile_home
    if server.process is None:
        server.start()
    settings = _use_fragile_home(monkeypatch, home, server)
    monkeypatch.setattr(fault_hooks, "mlflow_server", server)
    monkeypatch.setenv("MLOPS_STEP_HOOK", "fault_hooks:stop_mlflow_server")
    return settings, server


@pytest.mark.parametrize("step", PIPELINE_TASKS)
def test_tracking_server_down_during_a_step(fragile_server, monkeypatch, step):
    settings, server = fragile_server
    before = assert_consistent(settings)
    monkeypatch.setattr(fault_hooks, "fault_step", step)
    run = run_dag()
    assert run.state_of(step) == "failed"
    assert run.tasks[step].try_number == 2, "the task is retried once, per default_args"
    server.start()
    production_after = assert_consistent(settings)
    candidate = registry.find_version_for_run_key(registry.client_for(settings), settings.model_name, run.run_key)
    healthy_deploy = run.result("deploy_model").get("deployed") is True
    assert production_after == (candidate.version if healthy_deploy else before)
    assert healthy_deploy == (step in {"archive_model", "rollback_model"})

    monkeypatch.setattr(fault_hooks, "fault_step", "")
    recovered = run_dag()
    assert recovered.state == "success"
    assert assert_consistent(settings) == recovered.result("train_model")["model_version"]


def _train_in_a_child(home: str, tracking_uri: str, transform_result: TransformResult, run_id: str) -> None:
    os.environ.update({"MLOPS_HOME": home, "MLFLOW_TRACKING_URI": tracking_uri})
    steps.train(Settings.from_env(), RunContext("mlops_pipeline", run_id, 1, {}), transform_result)


@pytest.mark.parametrize("kill_when", ["model version registered", "training run started"])
def test_worker_killed_during_train_registers_exactly_one_version(mlops_env, kill_when):
    run = RunContext("mlops_pipeline", f"killed-{kill_when.split()[0]}", 1, {})
    transformed = steps.transform(mlops_env, run, steps.extract(mlops_env, run))
    client = registry.client_for(mlops_env)
    context = multiprocessing.get_context("spawn")
    child = context.Process(
        target=_train_in_a_child,
        args=(str(mlops_env.home), mlops_env.tracking_uri, transformed, run.run_id),
    )
    child.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.is_alive():
        if kill_when == "model version registered":
            reached = registry.find_version_for_run_key(client, mlops_env.model_name, run.run_key) is not None
        else:
            reached = (
                bool(client.search_runs([client.get_experiment_by_name(mlops_env.experiment_name).experiment_id]))
                if client.get_experiment_by_name(mlops_env.experiment_name)
                else False
            )
        if reached:
            os.kill(child.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    child.join(30)
    assert child.exitcode == -signal.SIGKILL, "the worker was killed mid-task"

    retried = steps.train(mlops_env, RunContext(run.dag_id, run.run_id, 2, {}), transformed)
    matching = [
        v
        for v in registry.list_versions(client, mlops_env.model_name)
        if v.tags.get(tags.AIRFLOW_RUN_KEY) == run.run_key
    ]
    assert [v.version for v in matching] == [retried.model_version]
    assert version_count(mlops_env) == 1


def _promote_in_a_child(home: str, tracking_uri: str, version: int, start: float, outcome) -> None:
    os.environ.update({"MLOPS_HOME": home, "MLFLOW_TRACKING_URI": tracking_uri})
    settings = Settings.from_env()
    time.sleep(max(0.0, start - time.time()))
    try:
        registry.promote(settings, version, expected_current=1, actor=f"run-{version}", reason="overlap")
        outcome.put((version, "promoted"))
    except registry.ProductionMovedError:
        outcome.put((version, "refused"))


def test_overlapping_promotions_let_exactly_one_through(mlops_env, tmp_path):
    client = registry.client_for(mlops_env)
    registry.ensure_registered_model(client, mlops_env.model_name)
    for number in range(1, 6):
        client.create_model_version(mlops_env.model_name, (tmp_path / str(number)).as_uri())
    registry.promote(mlops_env, 1, expected_current=None, actor="setup", reason="first")
    context = multiprocessing.get_context("spawn")
    outcome = context.Queue()
    start = time.time() + 3
    children = [
        context.Process(
            target=_promote_in_a_child, args=(str(mlops_env.home), mlops_env.tracking_uri, v, start, outcome)
        )
        for v in range(2, 6)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
    results = dict(outcome.get(timeout=5) for _ in children)
    winners = [v for v, result in results.items() if result == "promoted"]
    assert len(winners) == 1, results
    assert assert_consistent(mlops_env) == winners[0]
    events = registry.deployment_history(client, mlops_env.model_name)
    assert [(e.event, e.version, e.previous_version) for e in events] == [
        ("promoted", 1, None),
        ("promoted", winners[0], 1),
    ]


def test_manual_rollback_while_a_run_is_deploying(airflow_db, mlops_env, monkeypatch):
    assert run_dag().state == "success"
    assert run_dag().state == "success"
    assert production_markers(mlops_env) == (2, [2])
    monkeypatch.setattr(fault_hooks, "fault_step", "deploy_model")
    monkeypatch.setattr(fault_hooks, "rollback_settings", mlops_env)
    monkeypatch.setenv("MLOPS_STEP_HOOK", "fault_hooks:manual_rollback_meanwhile")
    run = run_dag()
    assert run.state == "success"
    deploy = run.result("deploy_model")
    assert deploy["deployed"] is False and "expected 2" in deploy["reason"]
    assert run.result("rollback_model")["rollback_performed"] is False
    assert assert_consistent(mlops_env) == 1
    candidate = registry.get_version(registry.client_for(mlops_env), mlops_env.model_name, 3)
    assert candidate.tags[tags.DEPLOYMENT_STATUS] == "superseded"
    events = registry.deployment_history(registry.client_for(mlops_env), mlops_env.model_name)
    assert [(e.event, e.version) for e in events] == [("promoted", 1), ("promoted", 2), ("manual_rollback", 1)]


def test_rollback_dag_and_command_line(airflow_db, mlops_env):
    assert run_dag().state == "success"
    assert run_dag(conf={"accuracy_threshold": 1.0}).state == "success"
    assert run_dag().state == "success"
    assert production_markers(mlops_env) == (3, [3])

    refused = run_dag("mlops_rollback", conf={"target_version": "2"})
    assert refused.state == "failed" and refused.tasks["rollback_production"].try_number == 1
    missing = run_dag("mlops_rollback", conf={"target_version": "42"})
    assert missing.state == "failed"
    assert production_markers(mlops_env) == (3, [3])

    rolled = run_dag("mlops_rollback", conf={"target_version": "previous", "reason": "latency regression"})
    assert rolled.state == "success"
    assert rolled.result("rollback_production") | {"replaced_version": 3, "production_version": 1} == rolled.result(
        "rollback_production"
    )
    assert assert_consistent(mlops_env) == 1

    cli = [sys.executable, "-m", "ml.cli"]
    forward = subprocess.run([*cli, "rollback", "--to", "3"], capture_output=True, text=True)
    assert forward.returncode == 0, forward.stderr
    assert assert_consistent(mlops_env) == 3
    never_validated = subprocess.run([*cli, "rollback", "--to", "2"], capture_output=True, text=True)
    assert never_validated.returncode == 2
    assert "version 2 of 'breast_cancer_classifier' never passed validation" in never_validated.stderr
    status = json.loads(subprocess.run([*cli, "status", "--json"], capture_output=True, text=True, check=True).stdout)
    assert status["production_version"] == 3
    assert [(e["event"], e["version"], e["previous_version"]) for e in status["history"]] == [
        ("promoted", 1, None),
        ("promoted", 3, 1),
        ("manual_rollback", 1, 3),
        ("manual_rollback", 3, 1),
    ]
    assert status["history"][2]["actor"].startswith("airflow:mlops_rollback/")
    assert status["history"][2]["reason"] == "latency regression"


def _clear_from(dag_id: str, run_id: str, first_task: str) -> None:
    """What the UI's Clear with "downstream" does to a finished run: its tasks from ``first_task`` on run again."""
    from airflow.models.taskinstance import clear_task_instances
    from airflow.utils.session import create_session

    from ml.airflow_runner import dag_run_row

    downstream = PIPELINE_TASKS[PIPELINE_TASKS.index(first_task) :]
    with create_session() as session:
        dag_run = dag_run_row(session, dag_id, run_id)
        cleared = [ti for ti in dag_run.get_task_instances(session=session) if ti.task_id in downstream]
        clear_task_instances(cleared, session)


@pytest.mark.slow
@pytest.mark.parametrize("first_task", ["train_model", "validate_model"])
def test_an_old_run_cleared_and_run_again_never_puts_its_old_version_back(airflow_db, mlops_env, first_task):
    from airflow_harness import run_existing

    first = run_dag()
    assert (first.state, production_markers(mlops_env)) == ("success", (1, [1]))
    assert run_dag().state == "success"
    assert production_markers(mlops_env) == (2, [2])

    _clear_from("mlops_pipeline", first.run_id, first_task)
    again = run_existing("mlops_pipeline", first.run_id)
    assert again.state == "success", again.tasks
    assert production_markers(mlops_env) == (2, [2]), "Production stays the newer version"
    verdict = again.result("validate_model")
    assert verdict["validation"] == "failed" and verdict["model_version"] == 1
    assert "version 1 was in Production and left it (archived)" in verdict["reasons"][0]
    assert again.result("deploy_model")["deployed"] is False
    client = registry.client_for(mlops_env)
    old = registry.get_version(client, mlops_env.model_name, 1)
    assert old.tags[tags.VALIDATION_STATUS] == "passed", "its earlier verdict stays, for a deliberate rollback"
    assert version_count(mlops_env) == 2
    assert again.note.startswith("**v1 rejected**"), again.note
    # Run again, the run's validate_model rejects the version it promoted the first time, and its square says so.
    assert again.state_of("validate_model") == "skipped"
    assert task_note(again, "validate_model").startswith("v1 rejected: version 1 was in Production and left it")


@pytest.mark.slow
def test_a_note_written_by_hand_outlives_the_run_ending_again(airflow_db, mlops_env):
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.api_fastapi.core_api.services.public.dag_run import patch_dag_run_note
    from airflow.utils.session import create_session
    from airflow_harness import run_existing

    from ml.airflow_runner import dag_run_row

    first = run_dag()
    assert first.note.startswith("**v1 promoted**")
    with create_session() as session:
        # What the UI's note editor calls through the REST API: the note, with the user who wrote it.
        row = dag_run_row(session, "mlops_pipeline", first.run_id)
        patch_dag_run_note(dag_run=row, note="checked by ops", user=SimpleAuthManagerUser(username="ops", role="admin"))
    _clear_from("mlops_pipeline", first.run_id, "rollback_model")
    assert run_existing("mlops_pipeline", first.run_id).note == "checked by ops"
