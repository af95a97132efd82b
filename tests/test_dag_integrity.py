"""The DAG file imports through Airflow's DagBag and keeps the contract of DESIGN.md."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta

import pytest
from conftest import DAGS

CONTRACT_EDGES = {
    ("extract_data", "transform_data"),
    ("transform_data", "train_model"),
    ("train_model", "validate_model"),
    ("validate_model", "deploy_model"),
    ("deploy_model", "archive_model"),
    ("deploy_model", "rollback_model"),
}
# Between transform_data and train_model, the candidates: listed once, then one mapped task instance each.
CANDIDATE_EDGES = {
    ("transform_data", "plan_candidates"),
    ("transform_data", "train_candidate"),
    ("plan_candidates", "train_candidate"),
    ("train_candidate", "train_model"),
}
CONTRACT_TASKS = {task for edge in CONTRACT_EDGES for task in edge}


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag.dags["mlops_pipeline"]


def test_dag_identity_and_schedule(dag):
    from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable

    from ml.assets import training_data_asset

    assert dag.dag_id == "mlops_pipeline"
    # Daily, as the contract says, or when the training data (an Asset) is updated, whichever comes first.
    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    daily = dag.timetable.timetable
    assert isinstance(daily, CronTriggerTimetable)
    assert (daily.expression, str(daily.timezone)) == ("0 0 * * *", "UTC")
    assert dag.timetable.asset_condition == training_data_asset()
    assert isinstance(dag.timetable.asset_condition, Asset)
    assert dag.catchup is False
    assert "ml" in dag.tags and "intro" not in dag.tags
    assert dag.doc_md and "rollback_model" in dag.doc_md
    assert dag.max_active_runs == 1


def test_daily_cadence_survives_serialization(dag):
    from datetime import UTC, datetime

    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.timetables.base import TimeRestriction

    timetable = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag)).timetable
    assert timetable.summary == "Asset or 0 0 * * *"
    restriction = TimeRestriction(earliest=datetime(2026, 3, 4, 10, 30, tzinfo=UTC), latest=None, catchup=False)
    first = timetable.next_dagrun_info(last_automated_data_interval=None, restriction=restriction)
    second = timetable.next_dagrun_info(last_automated_data_interval=first.data_interval, restriction=restriction)
    assert second.run_after - first.run_after == timedelta(days=1)
    assert (second.run_after.hour, second.run_after.minute) == (0, 0)


def test_unpausing_starts_no_run_beside_the_one_a_user_triggers(dag):
    """The trigger form unpauses the DAG; the first scheduled run is then the next midnight, not the last one, so the
    user's own run is the one that trains. The DAG page's header shows only the asset: the description names both."""
    from datetime import UTC, datetime

    from airflow.serialization.serialized_objects import DagSerialization

    assert dag.start_date is None, "with a start_date, catchup=False starts the last midnight's run on unpause"
    now = datetime.now(UTC)
    first = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag)).next_dagrun_info(
        last_automated_run_info=None
    )
    assert first.run_after >= now - timedelta(minutes=5), first
    assert (first.run_after.hour, first.run_after.minute) == (0, 0)
    assert dag.description.startswith("Daily at 00:00 UTC, and whenever the training data is updated")


def test_task_logs_end_without_the_returned_dict(dag):
    """Airflow would log each task's returned dict whole as its last line; the XCom tab shows it."""
    shown = {
        task.task_id: getattr(task, "show_return_value_in_logs", None)
        if hasattr(task, "show_return_value_in_logs")
        else task.partial_kwargs.get("show_return_value_in_logs")
        for task in dag.tasks
    }
    assert shown == dict.fromkeys(dag.task_ids, False)


def test_ingest_dag_updates_the_asset_the_pipeline_is_scheduled_on(dag):
    from airflow.dag_processing.dagbag import DagBag

    ingest = DagBag(dag_folder=str(DAGS)).dags["mlops_ingest"]
    assert ingest.catchup is False and ingest.max_active_runs == 1
    assert [task.task_id for task in ingest.tasks] == ["land_batch"]
    assert ingest.get_task("land_batch").outlets == [dag.timetable.asset_condition]
    assert set(ingest.params) == {"batch", "shift", "file_format", "from_feedback", "since", "until", "version"}


def test_tasks_and_edges_follow_the_contract(dag):
    """The contract's seven tasks and their edges, and the candidates between transform_data and train_model only."""
    assert set(dag.task_ids) == CONTRACT_TASKS | {"plan_candidates", "train_candidate"}
    edges = {(upstream, task.task_id) for task in dag.tasks for upstream in task.upstream_task_ids}
    assert edges == CONTRACT_EDGES | CANDIDATE_EDGES


def test_candidates_are_one_mapped_task_instance_each(dag):
    from airflow.sdk.definitions.mappedoperator import MappedOperator

    mapped = [task.task_id for task in dag.tasks if isinstance(task, MappedOperator)]
    assert mapped == ["train_candidate"]
    assert set(dag.get_task("train_candidate").op_kwargs_expand_input.value) == {"candidate"}


def test_trigger_rules_and_retries(dag):
    assert dag.get_task("deploy_model").trigger_rule == "none_failed"
    assert dag.get_task("rollback_model").trigger_rule == "all_done"
    assert dag.get_task("archive_model").trigger_rule == "all_success"
    # Runs when some candidates failed, once they are all done; skipped with the candidates on unchanged data.
    assert dag.get_task("train_model").trigger_rule == "all_done_min_one_success"
    for task in dag.tasks:
        assert task.retries == 1


def test_retry_delay_defaults_to_five_minutes():
    code = "import dags.mlops_pipeline as m; print(m.default_args['retry_delay'].total_seconds())"
    env = {k: v for k, v in __import__("os").environ.items() if k != "MLOPS_RETRY_DELAY_SECONDS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert float(out.stdout.strip()) == timedelta(minutes=5).total_seconds()


def test_params_have_descriptions_and_sane_defaults(dag):
    params = dag.params
    expected = {
        "accuracy_threshold": 0.8,
        "model_family": "logistic_regression",
        "data_source": "sklearn:breast_cancer",
        "label_column": "target",
        "compare_with_champion": True,
    }
    for name, default in expected.items():
        assert params[name] == default
    for name in params:
        assert params.get_param(name).description, f"Param {name} has no description"
    with pytest.raises(Exception, match=r"greater than the maximum|maximum"):
        dag.params.get_param("accuracy_threshold").resolve(1.5)


def test_the_trigger_form_is_held_once_by_the_dag(dag):
    """A task reads the DAG's Params at run time, so a per-task copy would only be deep-copied and serialised."""
    from ml.settings import run_parameter_names

    # Beside the per-run settings, the reason a run was started (mlops_monitor gives it).
    assert list(dag.params) == [*run_parameter_names(), "reason"]
    assert [task.task_id for task in dag.tasks if task.params] == []


@pytest.mark.parametrize(
    ("name", "refused"),
    [("test_size", 0), ("test_size", 1), ("accuracy_threshold", -0.1), ("random_seed", 2**32), ("model_family", "svm")],
)
def test_the_form_refuses_values_out_of_bounds_in_its_schema_dialect(dag, name, refused):
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError):
        dag.params.get_param(name).resolve(refused)


@pytest.mark.parametrize("dag_file", ["mlops_pipeline.py", "mlops_ingest.py", "mlops_monitor.py"])
def test_no_heavy_imports_at_dag_file_top_level(dag_file):
    """Every parse pays for what the file imports: no ML library, nor difflib or the credential patterns of
    ml.redaction, which only a refused parameter and masking need."""
    code = (
        "import sys, runpy; runpy.run_path(sys.argv[1]);"
        "import ml.redaction;"
        "loaded = sorted(m for m in ('mlflow', 'sklearn', 'pandas', 'numpy', 'scipy', 'matplotlib', 'difflib') "
        "if m in sys.modules);"
        "print(','.join(loaded), ml.redaction._secret_patterns.cache_info().currsize)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(DAGS / dag_file)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0", "nothing listed before the count of compiled patterns"


def test_trigger_form_submits_with_its_defaults(dag):
    """The Airflow UI holds the Trigger button back while a non-nullable field is empty ("" counts as empty)."""
    for name in dag.params:
        param = dag.params.get_param(name)
        types = param.schema["type"] if isinstance(param.schema["type"], list) else [param.schema["type"]]
        if param.value in ("", None):
            assert "null" in types, f"Param {name} is empty by default but the form requires it"
        param.resolve()
    assert dag.params.get_param("data_query").value is None
    assert dag.params.validate()["data_query"] is None


def _parse(monkeypatch: pytest.MonkeyPatch, **environ: str):
    """Parse the DAG files afresh, as the DAG processor does, with these environment variables."""
    from airflow.dag_processing.dagbag import DagBag

    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    return DagBag(dag_folder=str(DAGS))


def test_every_task_has_a_configurable_timeout(monkeypatch):
    for environ, seconds in (({}, 3600), ({"MLOPS_TASK_TIMEOUT_SECONDS": "90"}, 90)):
        bag = _parse(monkeypatch, **environ)
        assert {task.execution_timeout for dag in bag.dags.values() for task in dag.tasks} == {
            timedelta(seconds=seconds)
        }


@pytest.mark.parametrize(
    "source",
    ["~nosuchuser/cases.csv", "http://[::1/cases.csv", "postgresql://h:99999/db", "LOOP/cases.csv"],
)
def test_a_bad_data_source_never_breaks_the_dag_files(tmp_path, monkeypatch, source):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    bag = _parse(monkeypatch, MLOPS_DATA_SOURCE=source.replace("LOOP", str(loop)))
    assert bag.import_errors == {}
    assert sorted(bag.dags) == ["mlops_ingest", "mlops_monitor", "mlops_pipeline", "mlops_rollback"]
    assert bag.dags["mlops_pipeline"].params["data_source"] == "sklearn:breast_cancer"


def test_the_form_never_holds_a_password_and_refuses_a_run_that_brings_one(monkeypatch):
    """The deployment's password stays out of the serialised DAG (the form, the REST API); a run's own password is
    refused when the run is triggered, before Airflow stores its conf."""
    from airflow.sdk.definitions.param import ParamValidationError
    from airflow.serialization.serialized_objects import DagSerialization

    bag = _parse(
        monkeypatch,
        MLOPS_DATA_SOURCE="postgresql+psycopg://reader:hunter2-secret@127.0.0.1/cases",
        MLOPS_DATA_QUERY="cases",
    )
    pipeline = bag.dags["mlops_pipeline"]
    assert pipeline.params["data_source"] == "postgresql+psycopg://reader:***@127.0.0.1/cases"
    assert "hunter2" not in json.dumps(DagSerialization.to_dict(pipeline), default=str)
    source = pipeline.params.get_param("data_source")
    for accepted in ("postgresql+psycopg://reader:***@127.0.0.1/cases", "postgresql+psycopg://reader@db/other"):
        source.resolve(accepted)
    for refused in ("postgresql+psycopg://reader:hunter2@db/other", "https://u:p w@files.example/cases.csv"):
        with pytest.raises(ParamValidationError):
            source.resolve(refused)


def test_the_monitor_runs_on_its_schedule_and_on_recorded_traffic_and_can_start_the_pipeline():
    from airflow.dag_processing.dagbag import DagBag
    from airflow.sdk import AssetOrTimeSchedule

    from ml.assets import recorded_traffic_asset

    monitor = DagBag(dag_folder=str(DAGS)).dags["mlops_monitor"]
    assert isinstance(monitor.timetable, AssetOrTimeSchedule)
    assert monitor.timetable.timetable.expression == "0 * * * *"
    assert monitor.timetable.asset_condition == recorded_traffic_asset()
    assert recorded_traffic_asset().uri.endswith("/datastore/records")
    assert {(up, task.task_id) for task in monitor.tasks for up in task.upstream_task_ids} == {
        ("judge_window", "retraining_due"),
        ("retraining_due", "start_retraining"),
    }
    trigger = monitor.get_task("start_retraining")
    assert trigger.trigger_dag_id == "mlops_pipeline" and trigger.skip_when_already_exists
    assert monitor.catchup is False and monitor.max_active_runs == 1
