"""End-to-end runs of mlops_pipeline through Airflow (dag.test) against real MLflow stores.

The module shares one store whose first run promotes version 1; every later test states its expectations relative to
the registry as it found it, so none depends on what another test left behind beyond that baseline.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import production_markers, retraining_home, task_note

import mlflow
from ml import registry
from ml.airflow_runner import run_dag
from ml.settings import Settings

pytestmark = pytest.mark.slow


def version_count(settings: Settings) -> int:
    return len(registry.list_versions(registry.client_for(settings), settings.model_name))


@pytest.fixture(scope="module")
def baseline(airflow_db, tmp_path_factory):
    """A fresh SQLite MLflow store and the first pipeline run against it."""
    with retraining_home(tmp_path_factory, "e2e"):
        settings = Settings.from_env()
        yield settings, run_dag()


@pytest.fixture
def settings(baseline, monkeypatch) -> Settings:
    return baseline[0]


def test_first_run_promotes_version_1_with_full_lineage(baseline):
    settings, run = baseline
    assert run.state == "success", run.tasks
    assert production_markers(settings) == (1, [1])
    assert run.result("extract_data")["records"] == 569 and run.result("extract_data")["data_extracted"] is True
    assert run.result("transform_data")["features"] == 30
    assert run.result("validate_model")["validation"] == "passed"
    assert run.result("deploy_model") | {"deployed": True, "previous_version": None} == run.result("deploy_model")
    assert run.result("archive_model")["archived"] is True
    assert run.result("rollback_model")["rollback_performed"] is False
    # Nothing was rolled back, and the grid says so; the run's note says what happened, with links into MLflow.
    assert {task: outcome.state for task, outcome in run.tasks.items() if outcome.state != "success"} == {
        "rollback_model": "skipped"
    }
    assert run.note.startswith("**v1 promoted**, accuracy 0.9"), run.note
    assert "[MLflow run](http://localhost:5000/#/experiments/" in run.note
    assert f"[{settings.model_name} v1](http://localhost:5000/#/models/{settings.model_name}/versions/1?" in run.note

    client = registry.client_for(settings)
    version = registry.get_version(client, settings.model_name, 1)
    digest = run.result("extract_data")["digest"]
    assert version.tags["mlops.airflow.dag_id"] == "mlops_pipeline"
    assert version.tags["mlops.airflow.run_id"] == run.run_id
    assert version.tags["mlops.airflow.try_number"] == "1"
    assert version.tags["mlops.data.digest"] == digest
    assert version.tags["mlops.random_seed"] == "42"
    assert version.tags["mlops.code.revision"].startswith(("git:", "package:"))
    assert version.tags["mlops.validation.status"] == "passed"
    assert version.tags["mlops.deployment.status"] == "production"
    assert version.tags["mlops.deployment.airflow_run_id"] == run.run_id
    assert version.tags["mlops.deployment.data_digest"] == digest
    assert version.tags["mlops.deployment.replaced_version"] == "none"
    assert [(e.event, e.version) for e in registry.deployment_history(client, settings.model_name)] == [("promoted", 1)]

    mlflow_run = client.get_run(version.run_id)
    assert mlflow_run.data.params["model_family"] == "logistic_regression"
    assert mlflow_run.data.metrics["accuracy"] > 0.9
    assert mlflow_run.data.tags["mlops.airflow.url"].endswith(f"/dags/mlops_pipeline/runs/{run.run_id}")
    tagged = [({t.key: t.value for t in d.tags}, d.dataset) for d in mlflow_run.inputs.dataset_inputs]
    inputs = {tags_of.get("mlflow.data.context"): dataset for tags_of, dataset in tagged}
    assert {"training", "evaluation"} <= set(inputs)
    assert all(digest[:12] in dataset.name for dataset in inputs.values())
    # Which digest is which: the snapshot's (as on the version), which the digest MLflow shows abbreviates; each
    # split is described by address and schema, never hashed or profiled row by row.
    for tags_of, dataset in tagged:
        assert tags_of["snapshot sha256 (whole data set, as on the model version)"] == digest
        assert dataset.digest == digest[:8]
        assert (
            tags_of["dataset digest (shown by MLflow)"]
            == f"{digest[:8]}: the first characters of the snapshot's sha256"
        )
        assert "mean radius" in dataset.schema and dataset.profile in ("", None, "null")
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "evaluation")}
    assert "evaluation/confusion_matrix.png" in artifacts
    model_info = mlflow.models.get_model_info(f"models:/{settings.model_name}/1")
    assert model_info.signature.inputs.input_names()[0] == "mean radius"
    assert model_info.saved_input_example_info is not None


def test_failed_validation_leaves_production_and_records_why(settings):
    before, count = production_markers(settings), version_count(settings)
    run = run_dag(conf={"accuracy_threshold": 1.0})
    candidate = run.result("train_model")["model_version"]
    assert candidate == count + 1
    assert production_markers(settings) == before
    assert run.result("validate_model")["validation"] == "failed"
    assert run.result("deploy_model")["deployed"] is False
    assert run.result("deploy_model")["previous_version"] == before[0]
    assert run.result("rollback_model")["rollback_performed"] is False
    # The grid: the run succeeds, but validate_model's square is not green: it rejected the version, which ends it
    # skipped with a note saying why; nothing was promoted, so deploy_model and the tasks after it are skipped.
    assert run.state == "success"
    assert [run.state_of(task) for task in ("train_model", "validate_model", "deploy_model", "archive_model")] == [
        "success",
        "skipped",
        "skipped",
        "skipped",
    ]
    assert run.state_of("rollback_model") == "skipped"
    assert task_note(run, "validate_model").startswith(f"v{candidate} rejected: accuracy ")
    assert task_note(run, "deploy_model") is None
    assert run.note.startswith(f"**v{candidate} rejected**: accuracy "), run.note
    assert "is below the threshold 1.0000" in run.note
    tags = registry.get_version(registry.client_for(settings), settings.model_name, candidate).tags
    assert tags["mlops.validation.status"] == "failed"
    assert "below the threshold 1.0000" in tags["mlops.validation.reasons"]
    assert tags["mlops.deployment.status"] == "rejected"


def test_candidate_worse_than_production_is_not_promoted(settings):
    before = production_markers(settings)
    weak = {"accuracy_threshold": 0.5, "hyperparameters": {"C": 0.0001}}
    run = run_dag(conf=weak)
    result = run.result("validate_model")
    assert result["validation"] == "failed", result
    assert result["champion_version"] == before[0]
    assert any("worse than Production" in reason for reason in result["reasons"])
    assert production_markers(settings) == before


def test_failed_post_deploy_check_restores_the_prior_version(settings, monkeypatch):
    before = production_markers(settings)
    monkeypatch.setenv("MLOPS_DEPLOY_CHECK_HOOK", "deploy_hooks:refuse")
    run = run_dag()
    candidate = run.result("train_model")["model_version"]
    deploy = run.result("deploy_model")
    assert (deploy["deployed"], deploy["promoted"], deploy["health_check"]) == (False, True, "failed")
    assert "HTTP 503" in deploy["reason"]
    rollback = run.result("rollback_model")
    assert rollback["rollback_performed"] is True
    assert rollback["restored_version"] == rollback["production_version"] == before[0]
    assert (run.state_of("archive_model"), run.state_of("rollback_model")) == ("skipped", "success")
    assert run.note.startswith(f"**v{candidate} rolled back**: post-deploy check failed: "), run.note
    assert f"Production is back to v{before[0]}." in run.note
    assert production_markers(settings) == before
    client = registry.client_for(settings)
    demoted = registry.get_version(client, settings.model_name, candidate)
    assert demoted.stage == "Archived"
    assert demoted.tags["mlops.deployment.status"] == "rolled_back"
    history = registry.deployment_history(client, settings.model_name)
    assert [(e.event, e.version, e.previous_version) for e in history[-2:]] == [
        ("promoted", candidate, before[0]),
        ("rolled_back", candidate, before[0]),
    ]


def _cancer() -> pd.DataFrame:
    from ml.data import load_source

    return load_source("sklearn:breast_cancer")


def _as_csv(frame: pd.DataFrame) -> bytes:
    return frame.to_csv(index=False).encode()


def _scarce_class() -> pd.DataFrame:
    cancer = _cancer()
    return pd.concat([cancer[cancer["target"] == 0].head(3), cancer[cancer["target"] == 1]])


def _as_parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _with_list_column() -> bytes:
    frame = _cancer()
    return _as_parquet(pa.Table.from_pandas(frame.assign(readings=[[1.0, 2.0]] * len(frame)), preserve_index=False))


def _with_duplicated_parquet_columns() -> bytes:
    frame = _cancer()
    columns = [pa.array(frame["mean radius"]), pa.array(frame["mean radius"]), pa.array(frame["target"])]
    return _as_parquet(pa.Table.from_arrays(columns, names=["mean radius", "mean radius", "target"]))


BAD_DATA = {
    "missing label": ("csv", lambda: _as_csv(_cancer().drop(columns="target")), "label column 'target' is missing"),
    "one class": ("csv", lambda: _as_csv(_cancer().assign(target=1)), "has 1 class(es)"),
    "empty file": ("csv", lambda: b"", "is empty"),
    "non-numeric column": ("csv", lambda: _as_csv(_cancer().assign(note="check")), "non-numeric feature columns: note"),
    "all-NaN column": ("csv", lambda: _as_csv(_cancer().assign(unused=float("nan"))), "entirely empty: unused"),
    "duplicated column names": (
        "csv",
        lambda: b"mean radius,mean radius,target\n" + b"1.0,2.0,0\n" * 60,
        "duplicated column names: mean radius",
    ),
    "duplicated column names in Parquet": (
        "parquet",
        _with_duplicated_parquet_columns,
        "has duplicated column names: mean radius",
    ),
    "list-valued column in Parquet": (
        "parquet",
        _with_list_column,
        "column 'readings' holds ndarray values (row 0: array([1., 2.])); each cell must hold a single value",
    ),
    "file cut short": ("parquet", lambda: b"PAR1 a Parquet file still being written", "is not readable Parquet yet"),
    "CSV that is not UTF-8": (
        "csv",
        lambda: b"mean r\xe9dius,target\n" + b"1.0,0\n" * 30 + b"\xff\xfe,1\n" * 30,
        "is not readable CSV: not UTF-8 text (byte 6)",
    ),
    "schema unlike Production's": (
        "csv",
        lambda: _as_csv(_cancer().rename(columns={"mean radius": "radius"})),
        "columns differ from the Production model's signature; missing: mean radius; unexpected: radius",
    ),
    "too few rows per class": ("csv", lambda: _as_csv(_scarce_class()), "too few rows per class"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_fails_clearly_and_registers_nothing(settings, case, tmp_path, capfd):
    suffix, make, message = BAD_DATA[case]
    path = tmp_path / f"cases.{suffix}"
    path.write_bytes(make())
    before, count = production_markers(settings), version_count(settings)
    run = run_dag(conf={"data_source": str(path)})
    assert run.state == "failed"
    failed = [task for task, outcome in run.tasks.items() if outcome.state == "failed"]
    assert failed in (["extract_data"], ["transform_data"])
    # Only a file that may still be landing is tried again; a retry of anything else would fail the same way.
    assert run.tasks[failed[0]].try_number == (2 if case == "file cut short" else 1)
    output = capfd.readouterr().out
    assert message in output
    assert str(path) in output, "the error names the file"
    assert run.state_of("train_model") == "upstream_failed"
    assert run.state_of("rollback_model") == "skipped", "nothing was rolled back"
    assert version_count(settings) == count
    assert production_markers(settings) == before


def test_a_snapshot_replaced_with_a_matching_hash_is_written_again_before_it_is_trained_on(baseline):
    # Sixty rows with their labels flipped, and the sha256 of the new file beside it: only the content, checked
    # against the digest the snapshot is named by, tells it from the data Production was trained on.
    snapshot = Path(baseline[1].result("extract_data")["snapshot_uri"])
    good = _cancer()
    good.iloc[:60].assign(target=1 - good["target"].iloc[:60]).to_parquet(snapshot, index=False)
    Path(f"{snapshot}.sha256").write_text(hashlib.sha256(snapshot.read_bytes()).hexdigest())

    run = run_dag()
    assert run.state == "success", run.tasks
    transformed = run.result("transform_data")
    assert transformed["train_rows"] + transformed["test_rows"] == len(good)
    pd.testing.assert_frame_equal(pd.read_parquet(snapshot), good)


def test_the_same_rows_in_another_order_are_no_new_data(airflow_db, mlops_env, monkeypatch, tmp_path):
    monkeypatch.delenv("MLOPS_FORCE_RETRAIN")
    source = tmp_path / "cases.csv"
    _cancer().to_csv(source, index=False)
    first = run_dag(conf={"data_source": str(source)})
    assert first.state == "success", first.tasks
    _cancer().sample(frac=1, random_state=5).to_csv(source, index=False)
    again = run_dag(conf={"data_source": str(source)})
    extracted = again.result("extract_data")
    assert (extracted["unchanged"], extracted["skipped_reason"]) == (True, "no new data")
    assert extracted["snapshot_uri"] == first.result("extract_data")["snapshot_uri"]
    assert version_count(mlops_env) == 1


def test_a_categorical_label_with_an_unused_category_trains_on_the_classes_it_has(airflow_db, mlops_env, tmp_path):
    frame = _cancer()
    names = pd.Categorical.from_codes(frame["target"], categories=["malignant", "benign", "unknown"])
    source = tmp_path / "cases.parquet"
    frame.assign(target=names).to_parquet(source, index=False)
    run = run_dag(conf={"data_source": str(source)})
    assert run.state == "success", run.tasks
    assert sorted(run.result("transform_data")["classes"]) == ["benign", "malignant"]
    assert version_count(mlops_env) == 1


def test_pipeline_over_a_real_mlflow_server(airflow_db, server_env, mlflow_server):
    run = run_dag()
    assert run.state == "success", run.tasks
    assert production_markers(server_env) == (1, [1])
    assert Path(mlflow_server.root / "artifacts").exists()
    failing = run_dag(conf={"accuracy_threshold": 1.0})
    assert failing.result("validate_model")["validation"] == "failed"
    assert production_markers(server_env) == (1, [1])
    assert version_count(server_env) == 2


def test_deploy_checks_that_the_model_server_follows(settings, monkeypatch, tmp_path):
    from conftest import free_port
    from test_serving import answering_version, model_server

    monkeypatch.setenv("MLOPS_FORCE_RETRAIN", "true")
    monkeypatch.setenv("MLOPS_SERVING_TOKEN", "a-token-the-server-and-the-check-share")  # the server requires it
    with model_server(settings, tmp_path) as server:
        monkeypatch.setenv("MLOPS_SERVING_URL", server.url)
        run = run_dag()
        promoted = run.result("train_model")["model_version"]
        assert run.result("deploy_model")["deployed"] is True, run.result("deploy_model")
        assert answering_version(server) == str(promoted)

    monkeypatch.setenv("MLOPS_SERVING_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLOPS_SERVING_TIMEOUT_SECONDS", "2")
    unserved = run_dag()
    deploy = unserved.result("deploy_model")
    assert (deploy["deployed"], deploy["health_check"]) == (False, "failed")
    assert "still serves version None" in deploy["reason"]
    assert unserved.result("rollback_model")["rollback_performed"] is True
    assert production_markers(settings) == (promoted, [promoted])
