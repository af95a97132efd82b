"""The command line under careless input: one line naming the problem and exit status 2, never a traceback; no store
created by a typo; a quick answer when the tracking server is away; distinct exit statuses for what a run did."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, alarming_lines, free_port, production_markers, version_count

CLI = [sys.executable, "-m", "ml.cli"]


def mlops(*arguments: str, home: Path, timeout: float = 120, **environ: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLOPS_", "MLFLOW_TRACKING_URI"))}
    env.update({"MLOPS_HOME": str(home), "PYTHONPATH": str(REPO / "tests"), **environ})
    return subprocess.run([*CLI, *arguments], capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def refused(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert message in result.stderr


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--conf", "notjson"], "--conf is not valid JSON"),
        (["--conf", "[1, 2]"], "--conf must be a JSON object"),
        (["--param", "novalue"], "--param takes KEY=VALUE, got 'novalue'"),
        (["--param", "acuracy_threshold=0.9"], "unknown parameter 'acuracy_threshold' (did you mean"),
        (["--param", "post_deploy_check=false"], "'post_deploy_check' cannot be set per run"),
        (["--param", "force_retrain=perhaps"], "force_retrain='perhaps' is not a boolean"),
        (["--param", "test_size=NaN"], "test_size=nan is not a finite number"),
    ],
)
def test_run_refuses_bad_parameters_before_anything_runs(tmp_path, arguments, message):
    home = tmp_path / "home"
    refused(mlops("run", *arguments, home=home), message)
    assert not home.exists(), "nothing is created for a refused command"


HUGE_NUMBER = "7" * 5000
DEEP_NESTING = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--param", f"random_seed={HUGE_NUMBER}"], "random_seed='777"),
        (["--param", f"hyperparameters={DEEP_NESTING}"], "hyperparameters is not readable JSON: it nests"),
        (["--conf", f'{{"random_seed": {HUGE_NUMBER}}}'], "--conf is not readable JSON: it holds a number too long"),
        (["--conf", f'{{"hyperparameters": {DEEP_NESTING}}}'], "--conf is not readable JSON: it nests"),
    ],
)
def test_run_refuses_values_too_long_or_deep_to_read_in_one_short_line(tmp_path, arguments, message):
    result = mlops("run", *arguments, home=tmp_path / "home")
    refused(result, message)
    assert len(result.stderr.strip().splitlines()) == 1 and len(result.stderr) < 300, result.stderr


def test_run_help_documents_the_exit_statuses(tmp_path):
    shown = mlops("run", "--help", home=tmp_path).stdout
    for line in ("0    the new version is Production", "3    the new version was not promoted", "4    the new"):
        assert line in shown
    assert "130  stopped by SIGINT or SIGTERM" in shown


def test_a_home_that_is_a_file_is_refused(tmp_path):
    home = tmp_path / "home"
    home.write_text("not a folder")
    for command in ("status", "run", "env"):
        refused(mlops(command, home=home), "is a file, not a folder")


def test_the_environment_make_airflow_ui_evaluates_is_what_airflow_reads(tmp_path):
    """``eval "$(mlops env)"``, then Airflow's configuration: its home, the DAGs, the warm executor, the heartbeat."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLOPS_", "MLFLOW_", "AIRFLOW"))}
    env["MLOPS_HOME"] = str(tmp_path / "home")
    read = "; ".join(
        f"print(conf.get({section!r}, {key!r}))"
        for section, key in (("core", "dags_folder"), ("core", "executor"), ("workers", "min_heartbeat_interval"))
    )
    python = f"{shlex.quote(sys.executable)} -c {shlex.quote(f'from airflow.configuration import conf; {read}')}"
    script = f'eval "$({shlex.join(CLI)} env)" && {python}'
    out = subprocess.run(["bash", "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(REPO / "dags"), "ml.local_executor.WarmLocalExecutor", "1"]
    assert (tmp_path / "home" / "airflow").is_dir()


def test_status_on_a_mistyped_home_creates_nothing(tmp_path):
    home = tmp_path / "mlpos"
    refused(mlops("status", home=home), "no MLflow store at")
    refused(mlops("rollback", home=home), "no MLflow store at")
    served = mlops("serve", "--port", str(free_port()), home=home, timeout=60)
    refused(served, f"no MLflow store at {home / 'mlflow.db'}")
    assert len(served.stderr.strip().splitlines()) == 1, served.stderr
    assert not home.exists()


def test_status_against_an_unreachable_server_answers_within_seconds(tmp_path):
    started = time.monotonic()
    result = mlops("status", home=tmp_path, MLFLOW_TRACKING_URI=f"http://user:secret@127.0.0.1:{free_port()}")
    refused(result, "does not answer within 5 s")
    assert time.monotonic() - started < 30
    assert "secret" not in result.stderr


@pytest.mark.slow
def test_status_reads_past_a_malformed_history_tag(mlops_env):
    from ml import registry, tags

    client = registry.client_for(mlops_env)
    registry.ensure_registered_model(client, mlops_env.model_name)
    client.set_registered_model_tag(mlops_env.model_name, f"{tags.HISTORY_PREFIX}2026-01-01T00:00:00Z.v1", "{oops")
    shown = mlops("status", "--json", home=mlops_env.home, MLFLOW_TRACKING_URI=mlops_env.tracking_uri)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert json.loads(shown.stdout)["history"] == []
    assert "is not a deployment record" in shown.stderr


def test_ingest_refuses_non_finite_shifts(tmp_path):
    # tests/test_data_aware.py::test_shift_multiplies_and_offsets has the other spellings of NaN and infinity.
    incoming = str(tmp_path / "incoming") + "/"
    result = mlops("ingest", "--shift", '{"*": {"offset": Infinity}}', home=tmp_path, MLOPS_DATA_SOURCE=incoming)
    refused(result, "must be finite numbers")
    assert not (tmp_path / "incoming" / "batch-0000.csv").exists()


AIRFLOW_DB_STATES = """
import sqlite3, sys
from airflow.utils.db import _REVISION_HEADS_MAP
from ml.airflow_runner import airflow_db_is_current, migrate_airflow_db

states = [airflow_db_is_current()]
migrate_airflow_db()
states.append(airflow_db_is_current())
with sqlite3.connect(sys.argv[1]) as connection:  # as left by the Airflow release before the installed one
    connection.execute("UPDATE alembic_version SET version_num = ?", (list(_REVISION_HEADS_MAP.values())[-2],))
states.append(airflow_db_is_current())
print(states)
"""


def test_the_airflow_database_is_migrated_only_when_it_is_not_current(tmp_path):
    """A new database, one left by an older Airflow and one that cannot be read are migrated (or the migration says
    why it cannot be); a migrated one counts as current, and ``mlops run`` then skips ``airflow db migrate``."""
    database = tmp_path / "airflow" / "airflow.db"
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(database.parent),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{database}",
    }
    database.parent.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", AIRFLOW_DB_STATES, str(database)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == "[False, True, False]"
    unreadable = {**env, "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'missing' / 'airflow.db'}"}
    checked = subprocess.run(
        [sys.executable, "-c", "from ml.airflow_runner import airflow_db_is_current; print(airflow_db_is_current())"],
        capture_output=True,
        text=True,
        env=unreadable,
        timeout=300,
    )
    assert checked.stdout.splitlines()[-1:] == ["False"], checked.stderr[-3000:]


MIGRATE_AIRFLOW_DB = """
import json, logging, subprocess
from logging.handlers import BufferingHandler
from pathlib import Path

import airflow  # configures logging as Airflow does; mlops run has imported it before it prepares the database
import alembic.migration  # its import gives Alembic's logger a NullHandler: importing, not configuring
from ml.airflow_runner import airflow_db_is_current, migrate_airflow_db

started = []
run = subprocess.run


def recorded(command, *args, **kwargs):
    started.append(command)
    return run(command, *args, **kwargs)


def logging_state():
    loggers = [logging.root, *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    return {lg.name: (lg.level, list(lg.handlers), lg.propagate, lg.disabled) for lg in loggers}


subprocess.run = recorded
# As in a process that has not configured logging: there Alembic's env.py would configure it from alembic.ini.
logging.root.handlers.clear()
# What Airflow and Alembic would print: Airflow logs at INFO here, as in mlops -v.
narrated = BufferingHandler(capacity=100_000)
logging.getLogger("airflow").addHandler(narrated)
logging.getLogger("alembic").addHandler(narrated)
before = logging_state()
migrate_airflow_db()
after = logging_state()
report = {
    "airflow_commands": [c[1:] for c in started if isinstance(c, list) and Path(c[0]).name == "airflow"],
    "logging_changed": sorted(name for name in before if after[name] != before[name]),
    "narrated": [f"{r.name}: {r.getMessage()}" for r in narrated.buffer if r.levelno < logging.WARNING],
}
print(json.dumps({**report, "current": airflow_db_is_current()}))
"""


def _airflow_env(home: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
    }


def _migrate(home: Path) -> dict[str, Any]:
    """``migrate_airflow_db()`` in a new process: the Airflow commands it started, the loggers whose level, handlers,
    propagation or state it changed, what Airflow and Alembic logged below WARNING, and whether the database is
    current afterwards."""
    env = {**_airflow_env(home), "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO"}
    result = subprocess.run(
        [sys.executable, "-c", MIGRATE_AIRFLOW_DB], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def _airflow(home: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "airflow"), *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=_airflow_env(home), timeout=300)


def _rows(database: Path, query: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(database)) as connection:
        return connection.execute(query).fetchall()


@pytest.fixture(scope="module")
def created_airflow_home(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """A new Airflow database prepared by ``migrate_airflow_db()``, and what that reported."""
    home = tmp_path_factory.mktemp("created") / "airflow"
    home.mkdir()
    return home, _migrate(home)


def test_a_new_airflow_database_is_created_in_process_as_airflow_db_migrate_creates_it(created_airflow_home, tmp_path):
    home, created = created_airflow_home
    assert created == {"airflow_commands": [], "logging_changed": [], "narrated": [], "current": True}
    checked = _airflow(home, "db", "check-migrations", "--migration-wait-timeout", "1")
    assert checked.returncode == 0, checked.stderr[-3000:]
    reference = tmp_path / "airflow"
    reference.mkdir()
    migrated = _airflow(reference, "db", "migrate")
    assert migrated.returncode == 0, migrated.stderr[-3000:]
    # Same tables, indexes and triggers (an external DB manager's included), revision, pools and log file templates.
    for query in (
        "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name",
        "SELECT * FROM alembic_version",
        "SELECT * FROM slot_pool ORDER BY id",
        "SELECT id, filename, elasticsearch_id FROM log_template ORDER BY id",
    ):
        assert _rows(home / "airflow.db", query) == _rows(reference / "airflow.db", query), query
    assert [pool for (pool,) in _rows(home / "airflow.db", "SELECT pool FROM slot_pool")] == ["default_pool"]


def test_an_airflow_database_at_an_older_revision_is_upgraded_by_airflow_db_migrate(created_airflow_home, tmp_path):
    from airflow.utils.db import _REVISION_HEADS_MAP

    home = tmp_path / "airflow"
    home.mkdir()
    shutil.copy(created_airflow_home[0] / "airflow.db", home / "airflow.db")
    previous = list(_REVISION_HEADS_MAP)[-2]
    downgraded = _airflow(home, "db", "downgrade", "--to-version", previous, "--yes")
    assert downgraded.returncode == 0, downgraded.stderr[-3000:]
    assert _rows(home / "airflow.db", "SELECT * FROM alembic_version") == [(_REVISION_HEADS_MAP[previous],)]
    upgraded = _migrate(home)
    assert upgraded == {"airflow_commands": [["db", "migrate"]], "logging_changed": [], "narrated": [], "current": True}


PREPARED_FOR_RUNS = """
import gc, json
from ml.airflow_runner import prepare_in_process_runs, run_dag

gc.collect()
gc.freeze()
frozen = gc.get_freeze_count()
prepare_in_process_runs()
prepared = gc.get_freeze_count() - frozen
run = run_dag("stub_pipeline")
gc.collect()
print(json.dumps({"prepared": prepared, "state": run.state, "unfrozen": len(gc.get_objects())}))
"""


def test_mlops_run_starts_the_execution_api_before_its_first_task_and_freezes_it(created_airflow_home, tmp_path):
    """``mlops run``'s start-up builds the in-process execution API that ``dag.test()`` serves tasks from, where the
    collector is off, not in the first task: its routes are frozen, and the run after it builds nothing that big."""
    home = tmp_path / "airflow"
    home.mkdir()
    shutil.copy(created_airflow_home[0] / "airflow.db", home / "airflow.db")
    env = {**_airflow_env(home), "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "bench" / "dags")}
    result = subprocess.run(
        [sys.executable, "-c", PREPARED_FOR_RUNS], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.splitlines()[-1])
    assert found["state"] == "success"
    # Importing Airflow and preparing its database freeze about 400,000 objects, the API's routes as many again.
    assert found["prepared"] > 600_000
    # The stub's run leaves about 35,000 objects unfrozen. Had the first task built the API's routes, they would still
    # be unfrozen, walked by each of the run's full collections.
    assert found["unfrozen"] < 100_000, found


def _store(settings) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": settings.tracking_uri, "MLOPS_RETRY_DELAY_SECONDS": "1"}


@pytest.mark.slow
def test_run_exit_status_says_what_happened(airflow_db, mlops_env):
    store = _store(mlops_env)
    promoted = mlops("run", home=mlops_env.home, timeout=600, **store)
    assert promoted.returncode == 0, promoted.stdout[-3000:] + promoted.stderr[-3000:]
    assert production_markers(mlops_env) == (1, [1])
    no_new_data = mlops("run", home=mlops_env.home, timeout=600, **store)
    assert no_new_data.returncode == 0 and "no new data" in no_new_data.stdout
    # Nothing changed, and the output says so without a line that reads as a failure.
    assert production_markers(mlops_env) == (1, [1]) and version_count(mlops_env) == 1
    assert "run note                  : **no new data**" in no_new_data.stdout
    assert alarming_lines(no_new_data.stdout + no_new_data.stderr) == []
    rejected = mlops(
        "run", "--param", "accuracy_threshold=1", "--param", "force_retrain=true", home=mlops_env.home, **store
    )
    assert rejected.returncode == 3, rejected.stdout[-3000:]
    rolled_back = mlops(
        "run",
        "--param",
        "force_retrain=true",
        home=mlops_env.home,
        timeout=600,
        MLOPS_DEPLOY_CHECK_HOOK="deploy_hooks:refuse",
        **store,
    )
    assert rolled_back.returncode == 4, rolled_back.stdout[-3000:]
    assert production_markers(mlops_env) == (1, [1])


@pytest.mark.slow
@pytest.mark.parametrize(("signal_name", "hang_at"), [("SIGTERM", "deploy_check"), ("SIGINT", "train_model")])
def test_a_signal_stops_a_run_cleanly(airflow_db, mlops_env, tmp_path, signal_name, hang_at):
    import signal

    from ml import registry, tags
    from ml.airflow_runner import run_dag

    assert run_dag().state == "success"
    assert production_markers(mlops_env) == (1, [1])
    marker = tmp_path / "hanging"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLOPS_")}
    env.update(
        {
            "MLOPS_HOME": str(mlops_env.home),
            "PYTHONPATH": str(REPO / "tests"),
            "MLOPS_STEP_HOOK": "fault_hooks:hang_in_step",
            "MLOPS_DEPLOY_CHECK_HOOK": "fault_hooks:hang_in_deploy_check",
            "MLOPS_TEST_HANG_AT": hang_at,
            "MLOPS_TEST_HANG_MARKER": str(marker),
            **_store(mlops_env),
        }
    )
    process = subprocess.Popen(
        [*CLI, "run", "--param", "force_retrain=true"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 300
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert marker.exists(), process.communicate(timeout=60)
    stopped_at = time.monotonic()
    process.send_signal(getattr(signal, signal_name))
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stdout[-3000:] + stderr[-3000:]
    assert time.monotonic() - stopped_at < 120
    assert "stopped                   : by SIGINT; rollback_model ran" in stdout
    assert production_markers(mlops_env) == (1, [1]), "Production is what it was before the run"
    client = registry.client_for(mlops_env)
    candidates = [v for v in registry.list_versions(client, mlops_env.model_name) if v.version != 1]
    if hang_at == "train_model":
        assert candidates == [], "stopped before training: nothing registered"
    else:
        assert [v.tags.get(tags.DEPLOYMENT_STATUS) for v in candidates] == ["rolled_back"]


@pytest.mark.parametrize("command", [["status"], ["rollback"], ["run"]])
def test_a_store_that_is_no_database_is_refused_in_one_line(tmp_path, command):
    home = tmp_path / "home"
    home.mkdir()
    (home / "mlflow.db").write_text("garbage, not a database\n" * 100)
    result = mlops(*command, home=home)
    refused(result, f"the MLflow store {home / 'mlflow.db'} is not an SQLite database")
    assert (home / "mlflow.db").read_text().startswith("garbage"), "the file is left as it was"


def test_status_leaves_an_empty_store_file_empty(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "mlflow.db").touch()
    refused(mlops("status", home=home), "holds no MLflow store (no registry tables)")
    assert (home / "mlflow.db").stat().st_size == 0


def test_a_task_refuses_a_store_that_is_no_database_without_retry(tmp_path):
    from ml import registry

    database = tmp_path / "mlflow.db"
    database.write_text("garbage, not a database\n" * 100)
    with pytest.raises(registry.RegistryError, match="is not an SQLite database"):
        registry.use_write_ahead_log(str(database))
