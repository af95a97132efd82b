"""The DAG file imports through Airflow's DagBag and keeps the contract of DESIGN.md."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def dag():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag.dags["mlops_pipeline"]


def test_dag_identity_and_schedule(dag):
    assert dag.dag_id == "mlops_pipeline"
    assert dag.schedule == "@daily" or str(dag.timetable.summary) == "@daily"
    assert dag.catchup is False
    assert {"intro", "ml"} <= set(dag.tags)
    assert dag.doc_md and "rollback_model" in dag.doc_md
    assert dag.max_active_runs == 1


def test_tasks_and_edges_follow_the_contract(dag):
    assert set(dag.task_ids) == {t for edge in CONTRACT_EDGES for t in edge}
    edges = {(upstream, task.task_id) for task in dag.tasks for upstream in task.upstream_task_ids}
    assert edges == CONTRACT_EDGES


def test_trigger_rules_and_retries(dag):
    assert dag.get_task("deploy_model").trigger_rule == "none_failed"
    assert dag.get_task("rollback_model").trigger_rule == "all_done"
    assert dag.get_task("archive_model").trigger_rule == "all_success"
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
    with pytest.raises(Exception, match="greater than the maximum|maximum"):
        dag.params.get_param("accuracy_threshold").resolve(1.5)


def test_no_heavy_imports_at_dag_file_top_level():
    code = (
        "import sys, runpy; runpy.run_path(sys.argv[1]);"
        "heavy = sorted(m for m in ('mlflow', 'sklearn', 'pandas', 'numpy', 'scipy', 'matplotlib') if m in sys.modules);"
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(DAGS / "mlops_pipeline.py")], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == ""
