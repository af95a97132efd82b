"""Several candidates in one run: mapped train_candidate tasks, child MLflow runs, one chosen and registered.

Real Airflow (dag.test()) and a real MLflow store; one module store whose runs build on each other.
"""

from __future__ import annotations

import re

import pytest
from conftest import production_markers, retraining_home, version_count

from ml import registry, tags, training
from ml.airflow_runner import run_dag
from ml.settings import ConfigurationError, Settings

pytestmark = pytest.mark.slow

THREE = [
    {"model_family": "logistic_regression"},
    {"model_family": "logistic_regression", "hyperparameters": {"C": 0.001}},
    {"model_family": "random_forest", "hyperparameters": {"n_estimators": 10, "max_depth": 3}},
]
# Each value passes the estimator's own check, but not together: the forest refuses them only when it is fitted.
FAILS_AT_FIT = {"model_family": "random_forest", "hyperparameters": {"bootstrap": False, "max_samples": 0.5}}


def candidate_states(run) -> dict[int, str]:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        instances = session.scalars(
            select(TaskInstance).where(
                TaskInstance.dag_id == run.dag_id,
                TaskInstance.run_id == run.run_id,
                TaskInstance.task_id == "train_candidate",
            )
        ).all()
        return {ti.map_index: str(ti.state) for ti in instances}


@pytest.fixture(scope="module")
def three(airflow_db, tmp_path_factory):
    """A first run with three candidates (two families, two settings of one)."""
    with retraining_home(tmp_path_factory, "candidates"):
        settings = Settings.from_env()
        yield settings, run_dag(conf={"candidates": THREE})


def test_three_candidates_are_child_runs_and_only_the_best_is_registered(three):
    settings, run = three
    assert run.state == "success", run.tasks
    assert candidate_states(run) == {0: "success", 1: "success", 2: "success"}
    trained = run.result("train_model")
    assert trained["model_trained"] is True and trained["model_version"] == 1
    assert version_count(settings) == 1
    assert production_markers(settings) == (1, [1])

    client = registry.client_for(settings)
    parent_id = trained["parent_run_id"]
    children = client.search_runs(
        [client.get_run(parent_id).info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    assert len(children) == 3
    by_index = {int(child.data.tags[tags.CANDIDATE_INDEX]): child for child in children}
    for index, child in by_index.items():
        assert child.data.params["model_family"] == THREE[index]["model_family"]
        assert {"selection_accuracy", "selection_roc_auc", "selection_average_precision", "selection_f1"} <= set(
            child.data.metrics
        )
    best = max(by_index, key=lambda i: (by_index[i].data.metrics["selection_accuracy"], -i))
    version = registry.get_version(client, settings.model_name, 1)
    assert version.run_id == by_index[best].info.run_id == trained["run_id"]
    chosen = client.get_run(version.run_id)
    assert {"accuracy", "roc_auc", "average_precision", "f1"} <= set(chosen.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "evaluation")}
    assert {
        "evaluation/confusion_matrix.png",
        "evaluation/roc_curve.png",
        "evaluation/precision_recall_curve.png",
    } <= artifacts
    # The losers' models stay in their runs: none is a version.
    assert [v.run_id for v in registry.list_versions(client, settings.model_name)] == [version.run_id]

    # Side by side, with why the chosen one won: the run note, the parent run, the version's description.
    headline = f"| #{best + 1} {THREE[best]['model_family']} |"
    for text in (
        run.note,
        client.get_run(parent_id).data.tags["mlflow.note.content"],
        client.get_model_version(settings.model_name, "1").description,
    ):
        assert "| candidate | hyper-parameters | **accuracy** | ROC AUC | average precision | F1 | |" in text
        assert "#2 logistic_regression | C=0.001" in text
        row = next(line for line in text.splitlines() if line.startswith(headline))
        assert row.endswith("| chosen |"), row
        assert f"#{best + 1} {THREE[best]['model_family']} has the highest accuracy (" in text
        assert "Scores on the selection split carved from the training rows; chosen by accuracy" in text
    assert run.note.startswith("**v1 promoted**"), run.note


def test_a_retried_candidate_reuses_the_run_an_earlier_try_finished(three):
    """A candidate's task instance run again (a retry, a cleared task) fits nothing: its model is in MLflow already."""
    from ml import steps
    from ml.context import RunContext
    from ml.results import TransformResult

    settings, run = three
    split = TransformResult.from_xcom(run.result("transform_data"))
    again = settings.for_run({"candidates": THREE})
    candidate = training.candidates_of(again)[2]
    retried = steps.train_candidate(again, RunContext(run.dag_id, run.run_id, 2, {}), split, candidate)
    row = next(row for row in run.result("train_model")["candidates"] if row["name"] == "#3 random_forest")
    assert (retried.run_id, retried.scores) == (row["run_id"], row["scores"])


def test_a_candidate_that_fails_to_fit_leaves_the_run_to_the_others(three):
    settings, _ = three
    run = run_dag(conf={"candidates": [FAILS_AT_FIT, THREE[0]], "accuracy_threshold": 0.5})
    assert run.state == "success", run.tasks
    assert candidate_states(run) == {0: "failed", 1: "success"}
    trained = run.result("train_model")
    assert trained["model_family"] == "logistic_regression"
    assert [row["status"] for row in trained["candidates"]] == ["failed", "chosen"]
    assert "#2 logistic_regression is the only candidate that trained; 1 of 2 candidates failed" in run.note
    assert production_markers(settings)[0] == trained["model_version"]


def test_when_every_candidate_fails_the_run_fails_and_production_stays(three):
    settings, _ = three
    before, count = production_markers(settings), version_count(settings)
    run = run_dag(conf={"candidates": [FAILS_AT_FIT, FAILS_AT_FIT]})
    assert run.state == "failed"
    assert candidate_states(run) == {0: "failed", 1: "failed"}
    assert run.state_of("train_model") == "failed" and run.tasks["train_model"].try_number == 1
    assert (production_markers(settings), version_count(settings)) == (before, count)


@pytest.mark.parametrize(
    ("candidates", "message"),
    [
        ([{"model_family": "svm"}], "candidates[0]: model_family 'svm' is unknown"),
        ([{}, {"hyperparameters": {"C": -1}}], "candidates[1] (logistic_regression): hyperparameters for"),
        ([{"hyperparameters": {"gamma": 1}}], "candidates[0] (logistic_regression): hyperparameters gamma are not"),
        ([{"familly": "random_forest"}], "candidates[0] has unknown keys ['familly']"),
        ([{}] * 9, "candidates holds 9 entries; a run trains at most 8"),
        ([[]], "candidates[0] must be a JSON object"),
    ],
)
def test_bad_candidate_specs_are_refused_naming_the_entry(mlops_env, candidates, message):
    """Before any data is read: extract_data, the first task, fails without retry; the settings refuse them alike."""
    from airflow.sdk.exceptions import AirflowFailException

    from ml import tasks

    with pytest.raises(AirflowFailException) as failed:
        tasks.extract_data({"params": {"candidates": candidates}})
    assert message in str(failed.value)
    with pytest.raises(ConfigurationError, match=re.escape(message)):
        training.candidates_of(Settings.from_env({}).for_run({"candidates": candidates}))
