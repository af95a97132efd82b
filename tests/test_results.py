"""Step results survive XCom: what to_xcom() emits carries the contract's keys and reads back as the same result."""

from __future__ import annotations

import json

import pytest

from ml.results import (
    NO_NEW_DATA,
    CandidateResult,
    DeployResult,
    ExtractResult,
    Skip,
    TrainResult,
    TransformResult,
    ValidateResult,
)

SKIP = Skip(NO_NEW_DATA, 3)
DRIFT = {"drift_max_psi": 0.31, "drift_max_psi_feature": "a", "drift_high": True, "drift_reference_version": 3}
RESULTS = [
    (
        ExtractResult(569, "sklearn:breast_cancer", "file:///s.parquet", "d" * 64, ["a", "target"], ["restored v1"]),
        {"records"},
    ),
    (ExtractResult(569, "src", "file:///s.parquet", "d" * 64, ["a"], [], trained_on_same_data=3, skip=SKIP), set()),
    (
        TransformResult(["a"], "target", "d" * 64, "file:///s", [0, 1], "file:///tr", "file:///te", 400, 169),
        {"data_transformed", "features"},
    ),
    (TrainResult("model", 4, 0.97, "run", "logistic_regression", DRIFT), {"model_trained", "accuracy"}),
    (TrainResult("model", skip=SKIP), set()),
    (
        ValidateResult("model", 4, False, 0.91, ["too weak"], 0.8, 3, 0.95, "run", DRIFT, 0.0),
        {"validation", "accuracy"},
    ),
    (DeployResult(True, "model", 4, 3, True, "passed", "passed validation"), {"deployed", "version"}),
    (DeployResult(False, "model", None, 3, False, "not_run", "no new data", skip=SKIP), {"deployed"}),
    (
        CandidateResult(1, "random_forest", {"max_depth": 3}, "child", "models:/m-1", {"accuracy": 0.95}),
        {"candidate_trained", "run_id", "model_uri", "scores"},
    ),
]


@pytest.mark.parametrize(("result", "contract_keys"), RESULTS)
def test_a_result_reads_back_from_its_xcom_dict(result, contract_keys):
    emitted = json.loads(json.dumps(result.to_xcom()))
    assert contract_keys <= set(emitted)
    if getattr(result, "skip", None) is None:
        assert type(result).from_xcom(emitted) == result
    else:
        assert emitted["skipped_reason"] == NO_NEW_DATA and emitted["production_version"] == 3
        assert type(result).from_xcom(emitted).skip == SKIP


def test_the_emitted_keys_are_the_documented_ones():
    transformed, trained, validated, deployed = RESULTS[2][0], RESULTS[3][0], RESULTS[5][0], RESULTS[6][0]
    assert set(transformed.to_xcom()) == {
        *("data_transformed", "features", "feature_names", "label_column", "classes", "train_uri", "test_uri"),
        *("train_rows", "test_rows", "digest", "snapshot_uri", "parent_run_id"),
    }
    assert set(trained.to_xcom()) == {
        *("model_trained", "accuracy", "run_id", "model_name", "model_version", "model_uri", "model_family"),
        *("parent_run_id", "candidates", "selection", "selection_metric"),
        *DRIFT,
    }
    assert set(validated.to_xcom()) == {
        *("validation", "accuracy", "threshold", "champion_version", "champion_accuracy", "reasons", "model_name"),
        *("model_version", "run_id", "drift_margin_required"),
        *("comparison_rows", "comparison_excluded_rows", "comparison_accuracy", "comparison_note"),
        *DRIFT,
    }
    assert set(deployed.to_xcom()) == {
        *("deployed", "version", "model_version", "model_name", "previous_version", "promoted", "health_check"),
        *("reason", "approval"),
    }


def test_a_failed_upstream_step_is_refused_by_name():
    with pytest.raises(ValueError, match="Model training failed"):
        TrainResult.from_xcom({"model_trained": False, "model_name": "model"})


def test_deploy_without_a_verdict_fails_at_once_unless_the_run_had_nothing_to_do(mlops_env):
    """deploy_model also runs when Airflow skipped validate_model, which happens only on a run with nothing to do."""
    from airflow.sdk.exceptions import AirflowFailException

    from ml import tasks

    transformed = RESULTS[2][0].to_xcom()
    with pytest.raises(AirflowFailException, match="MissingResultError: validate_model returned no verdict"):
        tasks.deploy_model({"transform_data_result": transformed})
