"""Settings from the environment and per-run overrides; the model families on real data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ml import data, evaluation, training
from ml.settings import MODEL_FAMILIES, ConfigurationError, Settings, declarations, param_defaults


def test_defaults_need_no_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({})
    assert settings.home == tmp_path / ".mlops"
    assert settings.tracking_uri == f"sqlite:///{tmp_path / '.mlops' / 'mlflow.db'}"
    assert (settings.accuracy_threshold, settings.data_source) == (0.8, "sklearn:breast_cancer")


def test_environment_and_overrides():
    settings = Settings.from_env(
        {
            "MLOPS_ACCURACY_THRESHOLD": "0.9",
            "MLOPS_MODEL_FAMILY": "random_forest",
            "MLOPS_HYPERPARAMETERS": '{"max_depth": 4}',
        }
    )
    assert (settings.accuracy_threshold, settings.model_family, settings.hyperparameters) == (
        0.9,
        "random_forest",
        {"max_depth": 4},
    )
    changed = settings.for_run(
        {"accuracy_threshold": "0.85", "hyperparameters": '{"n_estimators": 5}', "force_retrain": "false"}
    )
    assert changed.accuracy_threshold == 0.85 and changed.hyperparameters == {"n_estimators": 5}
    assert changed.force_retrain is False, "the string 'false' is False, not a truthy string"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"acuracy_threshold": 0.9}, "unknown parameter 'acuracy_threshold' (did you mean 'accuracy_threshold'?)"),
        ({"post_deploy_check": False}, "'post_deploy_check' cannot be set per run: it is the deployment's setting"),
        ({"step_hook": "os:system"}, "'step_hook' cannot be set per run"),
        ({"tracking_uri": "sqlite:////tmp/other.db"}, "'tracking_uri' cannot be set per run"),
        ({"model_name": "other"}, "'model_name' cannot be set per run"),
        ({"home": "/tmp"}, "'home' cannot be set per run"),
        ({"force_retrain": "perhaps"}, "force_retrain='perhaps' is not a boolean"),
        ({"random_seed": -1}, "random_seed -1 is outside [0, 4294967295]"),
        ({"test_size": "nan"}, "test_size='nan' is not a finite number"),
        ({"accuracy_threshold": True}, "accuracy_threshold=True is not a number"),
    ],
)
def test_a_run_may_override_only_its_declared_parameters(params, message):
    settings = Settings.from_env({})
    with pytest.raises(ConfigurationError) as refused:
        settings.for_run(params)
    assert message in str(refused.value)


def test_a_dag_may_declare_parameters_of_its_own():
    settings = Settings.from_env({})
    assert settings.for_run({"target_version": "3"}, declared={"target_version", "reason"}) == settings
    with pytest.raises(ConfigurationError, match="'model_name' cannot be set per run"):
        settings.for_run({"model_name": "other"}, declared={"target_version", "reason"})


def test_the_settings_repr_masks_credentials_and_leaves_out_the_serving_token():
    settings = Settings.from_env(
        {
            "MLOPS_DATA_SOURCE": "postgresql://etl:warehouse-pass@db.internal/warehouse",
            "MLOPS_DATA_QUERY": "SELECT * FROM features",
            "MLFLOW_TRACKING_URI": "https://ops:tracking-pass@mlflow.internal/",
            "MLFLOW_REGISTRY_URI": "https://mlflow.internal/?token=registry-token",
            "MLOPS_SERVING_TOKEN": "serving-token",
            "MLOPS_SERVING_WEBHOOK_SECRET": "webhook-secret",
        }
    )
    shown = repr(settings)
    for secret in ("warehouse-pass", "tracking-pass", "registry-token", "serving-token", "webhook-secret"):
        assert secret not in shown
    assert "data_source='postgresql://etl:***@db.internal/warehouse'" in shown
    assert "tracking_uri='https://ops:***@mlflow.internal/'" in shown
    assert "registry_uri='https://mlflow.internal/?token=***'" in shown
    assert "data_query='SELECT * FROM features'" in shown
    assert "serving_token" not in shown


def test_every_setting_is_declared_once_with_its_environment_name_and_description():
    specs = declarations()
    assert {spec.declaration.env for spec in specs.values()} >= {"MLOPS_HOME", "MLFLOW_TRACKING_URI"}
    assert len({spec.declaration.env for spec in specs.values()}) == len(specs)
    assert all(spec.declaration.description for spec in specs.values())
    run_names = set(Settings.from_env({}).param_specs())
    assert run_names == {name for name, spec in specs.items() if spec.declaration.per_run}
    assert not run_names & {"post_deploy_check", "step_hook", "deploy_check_hook", "tracking_uri", "model_name"}


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"MLOPS_MODEL_FAMILY": "deep_forest"}, "model_family 'deep_forest' is unknown"),
        ({"MLOPS_ACCURACY_THRESHOLD": "1.5"}, r"accuracy_threshold 1.5 is outside \[0, 1\]"),
        ({"MLOPS_ACCURACY_THRESHOLD": "high"}, "MLOPS_ACCURACY_THRESHOLD='high' is not a number"),
        ({"MLOPS_HYPERPARAMETERS": "[1]"}, "must be a JSON object"),
        ({"MLOPS_COMPARE_WITH_CHAMPION": "maybe"}, "is not a boolean"),
        ({"MLOPS_PRODUCTION_ALIAS": "latest"}, "production_alias 'latest' is reserved by MLflow"),
        ({"MLOPS_PRODUCTION_ALIAS": "v1"}, "production_alias 'v1' is reserved by MLflow"),
        ({"MLOPS_PRODUCTION_ALIAS": "prod alias"}, "may hold only letters, digits, _ and -"),
        ({"MLOPS_DATA_SOURCE": "~nosuchuser/cases.csv"}, "cannot be used: Could not determine home directory"),
        ({"MLOPS_DATA_SOURCE": "http://[::1/cases.csv"}, "cannot be used: Invalid IPv6 URL"),
        ({"MLOPS_TASK_TIMEOUT_SECONDS": "0"}, "task_timeout 0.0 must be greater than 0"),
        ({"MLOPS_DRIFT_THRESHOLD": "inf"}, "MLOPS_DRIFT_THRESHOLD='inf' is not a finite number"),
        ({"MLOPS_S3_CONN_ID": "my s3"}, "MLOPS_S3_CONN_ID='my s3' is no Airflow connection id"),
    ],
)
def test_bad_settings_are_named(environ, message):
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env(environ)


def test_a_symlink_loop_as_data_source_is_named(tmp_path):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(ConfigurationError, match="cannot be used"):
        Settings.from_env({"MLOPS_DATA_SOURCE": str(loop / "cases.csv")})


def test_param_defaults_survive_a_bad_environment(monkeypatch):
    monkeypatch.setenv("MLOPS_ACCURACY_THRESHOLD", "7")
    assert param_defaults()["accuracy_threshold"] == 0.8
    monkeypatch.setenv("MLOPS_ACCURACY_THRESHOLD", "0.7")
    assert param_defaults()["accuracy_threshold"] == 0.7


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    frame = data.load_source("sklearn:breast_cancer")
    features = [c for c in frame.columns if c != "target"]
    store = str(tmp_path_factory.mktemp("store"))
    result = data.split_frame(
        frame, label="target", features=features, test_size=0.2, seed=42, data_store=store, run_folder="r"
    )
    return data.read_frame(result.train_uri), data.read_frame(result.test_uri), features


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_every_family_learns_the_data(split, family):
    train, test, features = split
    pipeline = training.build_pipeline(family, {"n_estimators": 20} if family != "logistic_regression" else {}, seed=42)
    pipeline.fit(train[features], train["target"])
    assert evaluation.score(pipeline.predict(test[features]), test["target"])["accuracy"] > 0.9


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_every_family_is_logged_and_loads_back_as_it_predicts(split, family, mlops_env):
    """MLflow saves the pipeline with skops, which refuses every type it was not told to trust (a tree's included)."""
    from ml import tracking

    train, test, features = split
    pipeline = training.build_pipeline(family, {"n_estimators": 5} if family != "logistic_regression" else {}, seed=42)
    pipeline.fit(train[features], train["target"])
    mlflow = tracking.connect(mlops_env)
    with mlflow.start_run():
        model_uri = tracking.log_model(mlflow, pipeline, train[features], mlops_env.model_name)
    loaded = tracking.load_model(mlflow, model_uri)
    assert list(loaded.predict(test[features])) == list(pipeline.predict(test[features]))


def test_scores_compare_classes_as_text():
    truth = pd.Series([0, 1, 1, 0, 1, 1])
    assert evaluation.score(["0", "1", "0", "0", "1", "1"], truth) == evaluation.score(
        np.array([0.0, 1.0, 0.0, 0.0, 1.0, 1.0]).astype(int), truth.astype(str)
    )
    scored = evaluation.score(np.array([0, 1, 0, 0, 1, 1]), truth)
    assert scored["accuracy"] == pytest.approx(5 / 6)
    assert scored["recall"] == pytest.approx(3 / 4)  # class "1", the last of the labels' classes, is the positive one
    assert scored["precision"] == 1.0
    # "10" sorts before "9" as text: the positive class is "9".
    assert evaluation.score(np.array([9, 9, 10]), pd.Series([9, 10, 10]))["recall"] == 1.0
    three = evaluation.score(np.array(["a", "b", "c", "c"]), pd.Series(["a", "b", "b", "c"]))
    assert three["accuracy"] == 0.75 and three["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_unknown_hyperparameter_is_named():
    with pytest.raises(ConfigurationError, match="hyperparameters depth are not accepted by random_forest"):
        training.build_pipeline("random_forest", {"depth": 3}, seed=1)


@pytest.mark.parametrize(
    ("family", "hyperparameters", "message"),
    [
        ("logistic_regression", {"C": -1}, "The 'C' parameter of LogisticRegression must be a float in the range"),
        ("random_forest", {"max_depth": 0}, "The 'max_depth' parameter of RandomForestClassifier must be an int"),
        ("gradient_boosting", {"learning_rate": "fast"}, "The 'learning_rate' parameter of GradientBoosting"),
    ],
)
def test_hyperparameters_are_checked_against_the_estimators_constraints(family, hyperparameters, message):
    with pytest.raises(ConfigurationError, match=f"hyperparameters for {family}: {message}"):
        training.resolve_hyperparameters(family, hyperparameters)


def test_non_finite_hyperparameters_are_refused():
    with pytest.raises(ConfigurationError, match="hyperparameters: C must be finite numbers"):
        Settings.from_env({}).for_run({"hyperparameters": '{"C": Infinity}'})


def test_judge_against_threshold_and_champion():
    passed = evaluation.judge(
        0.95, threshold=0.8, champion_accuracy=0.955, champion_version=3, tolerance=0.01, compare_with_champion=True
    )
    worse = evaluation.judge(
        0.90, threshold=0.8, champion_accuracy=0.95, champion_version=3, tolerance=0.01, compare_with_champion=True
    )
    ignored = evaluation.judge(
        0.90, threshold=0.8, champion_accuracy=0.95, champion_version=3, tolerance=0.01, compare_with_champion=False
    )
    low = evaluation.judge(
        0.70, threshold=0.8, champion_accuracy=None, champion_version=None, tolerance=0.01, compare_with_champion=True
    )
    assert passed.passed and ignored.passed
    assert not worse.passed and "worse than Production version 3" in worse.reasons[0]
    assert not low.passed and low.reasons == ["accuracy 0.7000 is below the threshold 0.8000"]


def test_readme_configuration_table_lists_every_setting():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("## Configuration") : readme.index("## How a run decides")]
    missing = [spec.declaration.env for spec in declarations().values() if f"`{spec.declaration.env}`" not in table]
    assert missing == []


@pytest.mark.parametrize(
    ("param", "value", "message"),
    [
        ("hyperparameters", "[" * 5000 + "]" * 5000, "hyperparameters is not readable JSON: it nests"),
        ("random_seed", "7" * 5000, "random_seed='777"),
        ("model_family", "x" * 5000, "(5002 characters) is unknown"),
    ],
)
def test_a_run_parameter_too_long_or_deep_to_read_fails_the_first_task_without_retry(mlops_env, param, value, message):
    # What the trigger form or a run's conf hands the tasks, as the Params arrive; the same values in the environment
    # are refused alike, and never break the DAG files' import.
    from airflow.sdk.exceptions import AirflowFailException

    from ml import tasks

    with pytest.raises(AirflowFailException) as failed:
        tasks.extract_data({"params": {param: value}})
    assert message in str(failed.value)
    assert "\n" not in str(failed.value) and len(str(failed.value)) < 300
    environment = f"MLOPS_{param.upper()}"
    with pytest.raises(ConfigurationError, match=f"(?i){param}"):
        Settings.from_env({environment: value})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(environment, value)
        assert getattr(Settings.from_env_or_embedded(), param) == getattr(Settings.from_env({}), param)


def test_the_service_models_fill_in_missing_values_as_they_were_trained_to(split):
    # A served request with null or NaN is answered (200): every family's pipeline imputes the training medians.
    train, test, features = split
    for family in MODEL_FAMILIES:
        hyperparameters = {"n_estimators": 20} if family != "logistic_regression" else {}
        pipeline = training.build_pipeline(family, hyperparameters, 42).fit(train[features], train["target"])
        medians = train[features].median()
        gapped = test[features].head(5).copy()
        gapped.iloc[0, 3] = np.nan
        filled = gapped.fillna(medians)
        np.testing.assert_array_equal(pipeline.predict_proba(gapped), pipeline.predict_proba(filled), err_msg=family)
