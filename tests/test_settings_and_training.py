"""Settings from the environment and per-run overrides; the model families on real data."""

from __future__ import annotations

import pytest

from ml import data, evaluation, training
from ml.settings import MODEL_FAMILIES, ConfigurationError, Settings, param_defaults


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
    changed = settings.with_overrides(
        {"accuracy_threshold": "0.85", "hyperparameters": '{"n_estimators": 5}', "unknown": 1}
    )
    assert changed.accuracy_threshold == 0.85 and changed.hyperparameters == {"n_estimators": 5}


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"MLOPS_MODEL_FAMILY": "deep_forest"}, "model_family 'deep_forest' is unknown"),
        ({"MLOPS_ACCURACY_THRESHOLD": "1.5"}, r"accuracy_threshold 1.5 is outside \[0, 1\]"),
        ({"MLOPS_ACCURACY_THRESHOLD": "high"}, "MLOPS_ACCURACY_THRESHOLD='high' is not a number"),
        ({"MLOPS_HYPERPARAMETERS": "[1]"}, "must be a JSON object"),
        ({"MLOPS_COMPARE_WITH_CHAMPION": "maybe"}, "is not a boolean"),
    ],
)
def test_bad_settings_are_named(environ, message):
    with pytest.raises(ConfigurationError, match=message):
        Settings.from_env(environ)


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


def test_unknown_hyperparameter_is_named():
    with pytest.raises(ConfigurationError, match="hyperparameters depth are not accepted by random_forest"):
        training.build_pipeline("random_forest", {"depth": 3}, seed=1)


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
